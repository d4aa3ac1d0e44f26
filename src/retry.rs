//! [`RetryPolicy`]: run a transaction again after a serialization failure or a deadlock.

use std::time::Duration;

/// How often, and how patiently, a closure-form transaction is run again when it fails
/// with a serialization failure (`40001`) or a deadlock (`40P01`). No other error is
/// retried. The wait before attempt `n + 1` is random in `0..=min(max_backoff,
/// initial_backoff × 2ⁿ⁻¹)` ("full jitter"), so that competing transactions spread out.
///
/// ```
/// use std::time::Duration;
/// let policy = pgengine::RetryPolicy::new(5)
///     .initial_backoff(Duration::from_millis(5))
///     .max_backoff(Duration::from_millis(200));
/// assert_eq!(policy.max_attempts(), 5);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    max_attempts: u32,
    initial_backoff: Duration,
    max_backoff: Duration,
}

impl RetryPolicy {
    /// At most `max_attempts` runs in all (at least 1), waiting 10 ms to 1 s between them.
    ///
    /// ```
    /// assert_eq!(pgengine::RetryPolicy::new(3).max_attempts(), 3);
    /// ```
    pub fn new(max_attempts: u32) -> Self {
        Self {
            max_attempts: max_attempts.max(1),
            initial_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_secs(1),
        }
    }

    /// The longest wait before the second attempt.
    ///
    /// ```
    /// let p = pgengine::RetryPolicy::new(3).initial_backoff(std::time::Duration::from_millis(1));
    /// # let _ = p;
    /// ```
    pub fn initial_backoff(mut self, backoff: std::time::Duration) -> Self {
        self.initial_backoff = backoff;
        self
    }

    /// The cap on any one wait.
    ///
    /// ```
    /// let p = pgengine::RetryPolicy::new(3).max_backoff(std::time::Duration::from_millis(50));
    /// # let _ = p;
    /// ```
    pub fn max_backoff(mut self, backoff: Duration) -> Self {
        self.max_backoff = backoff;
        self
    }

    /// The most runs in all.
    ///
    /// ```
    /// assert_eq!(pgengine::RetryPolicy::new(0).max_attempts(), 1);
    /// ```
    pub fn max_attempts(&self) -> u32 {
        self.max_attempts
    }

    /// How long to wait after `attempts_made` failed runs.
    pub(crate) fn backoff(&self, attempts_made: u32) -> Duration {
        let exponent = attempts_made.saturating_sub(1).min(20);
        let ceiling = self
            .initial_backoff
            .saturating_mul(1 << exponent)
            .min(self.max_backoff);
        ceiling.mul_f64(rand::random::<f64>())
    }
}

impl Default for RetryPolicy {
    /// Three attempts.
    fn default() -> Self {
        Self::new(3)
    }
}
