//! The transactions ambient on the current task, one per engine: inside
//! [`TransactionBuilder::run`](crate::TransactionBuilder::run), queries through the same
//! engine on the same task run on the transaction's connection (a tokio task-local). A
//! task started with `tokio::spawn` does not inherit it.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use smallvec::SmallVec;

use super::state::TxShared;
use crate::context::EngineContext;
use crate::error::Result;
use crate::multiplex;
use crate::runner::Runner;

/// The innermost transaction scope of one engine on this task: the transaction, and
/// the turn its nested savepoint transactions take one at a time.
#[derive(Clone)]
pub(crate) struct Scope {
    pub(crate) transaction: Arc<TxShared>,
    pub(crate) nested_turn: Arc<tokio::sync::Mutex<()>>,
}

impl Scope {
    /// A scope for `transaction`, with no nested transaction open yet.
    pub(crate) fn new(transaction: Arc<TxShared>) -> Self {
        Self {
            transaction,
            nested_turn: Arc::default(),
        }
    }
}

/// The innermost scope of each engine with a transaction on the task: inline for the
/// usual one engine (the list allocates nothing then). Counted in [`SCOPES`] for as
/// long as it lives: a scope's future holds it until the future is dropped.
struct Scopes {
    list: SmallVec<[(u64, Scope); 1]>,
    _counted: Counted,
}

impl Default for Scopes {
    fn default() -> Self {
        Self {
            list: SmallVec::new(),
            _counted: Counted::new(),
        }
    }
}

impl Clone for Scopes {
    fn clone(&self) -> Self {
        Self {
            list: self.list.clone(),
            _counted: Counted::new(),
        }
    }
}

tokio::task_local! {
    static AMBIENT: Scopes;
}

/// How many scopes exist in the process, entered or not yet: while there are none, no
/// task is inside one, and a query skips the task-local lookup (an atomic load instead).
///
/// `Relaxed` is enough: a task inside a scope reads the count after its own increment
/// (which happens before its scope is entered), so it never reads 0 there.
static SCOPES: AtomicUsize = AtomicUsize::new(0);

/// One scope counted in [`SCOPES`] for as long as it lives.
struct Counted;

impl Counted {
    fn new() -> Self {
        SCOPES.fetch_add(1, Ordering::Relaxed);
        Counted
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        SCOPES.fetch_sub(1, Ordering::Relaxed);
    }
}

/// `f` of the innermost scope of the engine `engine_id` on this task, if it has one.
fn find<T>(engine_id: u64, f: impl FnOnce(&Scope) -> T) -> Option<T> {
    if SCOPES.load(Ordering::Relaxed) == 0 {
        return None;
    }
    AMBIENT
        .try_with(|ambient| {
            ambient
                .list
                .iter()
                .find(|(id, _)| *id == engine_id)
                .map(|(_, scope)| f(scope))
        })
        .ok()
        .flatten()
}

/// The innermost scope of the engine `engine_id` on this task, if any.
pub(crate) fn current_scope(engine_id: u64) -> Option<Scope> {
    find(engine_id, Scope::clone)
}

/// The ambient transaction of the engine `engine_id` on this task, if any (one
/// task-local lookup, one `Arc` cloned).
pub(crate) fn current(engine_id: u64) -> Option<Arc<TxShared>> {
    find(engine_id, |scope| scope.transaction.clone())
}

/// Runs `future` with `scope` as the innermost scope of engine `engine_id`.
pub(crate) fn scope<F: Future>(
    engine_id: u64,
    scope: Scope,
    future: F,
) -> impl Future<Output = F::Output> {
    let mut ambient = AMBIENT.try_with(Scopes::clone).unwrap_or_default();
    ambient.list.retain(|(id, _)| *id != engine_id);
    ambient.list.push((engine_id, scope));
    AMBIENT.scope(ambient, future)
}

/// Where a query through the engine runs: in the ambient transaction when there is
/// one, else on a connection from the pool.
pub(crate) async fn runner(context: &Arc<EngineContext>) -> Result<Runner> {
    if let Some(transaction) = current(context.id) {
        return Runner::in_transaction(&transaction);
    }
    let connection = context.pool.get().await?;
    Ok(Runner::pooled(context.clone(), connection))
}

/// Where a query through the engine runs: as [`runner`] says, except that outside a
/// transaction, with multiplexing on, a single statement `shareable` (`None` for
/// several, or when the engine may not share) that may share a connection runs on a
/// shared one when one can take it.
pub(crate) async fn runner_for_statement(
    context: &Arc<EngineContext>,
    shareable: Option<&str>,
) -> Result<Runner> {
    // One task-local lookup, and no nested `runner` future: this is every query's path.
    if let Some(transaction) = current(context.id) {
        return Runner::in_transaction(&transaction);
    }
    let multiplexer = &context.multiplexer;
    if multiplexer.is_on()
        && shareable.is_some_and(multiplex::may_share)
        && let Some(ticket) = multiplexer.take(&context.pool).await
    {
        return Ok(Runner::multiplexed(context.clone(), ticket?));
    }
    let connection = context.pool.get().await?;
    Ok(Runner::pooled(context.clone(), connection))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn count() -> usize {
        SCOPES.load(Ordering::Relaxed)
    }

    #[tokio::test]
    async fn a_scope_is_counted_until_its_future_is_dropped_and_a_nested_one_counts_once_more() {
        // One test: no other unit test opens a scope, so the count moves for it alone.
        let before = count();
        let finished = AMBIENT.scope(Scopes::default(), std::future::ready(7));
        let dropped = AMBIENT.scope(Scopes::default(), std::future::ready(8));
        assert_eq!(count(), before + 2);
        assert_eq!(finished.await, 7); // awaited: consumed, its value dropped
        assert_eq!(count(), before + 1);
        drop(dropped); // never polled
        assert_eq!(count(), before);

        let outer = Scopes::default();
        let nested = outer.clone();
        assert_eq!(count(), before + 2);
        drop(outer);
        drop(nested);
        assert_eq!(count(), before);
    }
}
