//! Queries as values: [`QueryString`], the [`sql!`](crate::sql) macro and the [`Query`] trait.
//!
//! Nothing here does I/O. A [`QueryString`] is a SQL template with `{}` placeholders and
//! their arguments; an argument may itself be a `QueryString`, which is spliced in with its
//! own arguments renumbered. Compiling gives SQL with `$1..$n` and the parameter list.

use std::any::Any;
use std::borrow::Cow;
use std::fmt;

use smallvec::SmallVec;
use tokio_postgres::types::ToSql;

use crate::error::{Error, Result};

/// A parameter value, owned by the query that carries it.
///
/// ```
/// let value: pgengine::query::Param = Box::new(42_i32);
/// # let _ = value;
/// ```
pub type Param = Box<dyn ToSql + Send + Sync>;

/// One argument of a [`QueryString`]: a value sent as a parameter, or a nested query
/// spliced in. Made with `Arg::from`: any `ToSql + Send + Sync + 'static` value, or a
/// `QueryString`.
///
/// ```
/// use pgengine::query::{Arg, QueryString};
/// let args = vec![Arg::from(1_i32), Arg::from(QueryString::new("SELECT 2"))];
/// assert_eq!(args.len(), 2);
/// ```
pub struct Arg(ArgKind);

enum ArgKind {
    /// A value, sent as a `$n` parameter.
    Value(Value),
    /// A nested query, spliced into the template with its own arguments renumbered
    /// (boxed: an argument stays small, and most are values).
    Query(Box<QueryString>),
}

/// A parameter value: the scalar types most parameters have are held as they are,
/// anything else boxed (a query of a few integers allocates nothing per argument).
enum Value {
    Bool(bool),
    Int2(i16),
    Int4(i32),
    Int8(i64),
    Float4(f32),
    Float8(f64),
    Oid(u32),
    Text(&'static str),
    Boxed(Param),
}

impl Value {
    /// `value`, held as it is when it is one of the scalar types, else boxed. (Each
    /// check is on the type alone, decided when the program compiles.)
    fn new<T: ToSql + Send + Sync + 'static>(value: T) -> Self {
        let any: &dyn Any = &value;
        if let Some(&v) = any.downcast_ref::<i32>() {
            Value::Int4(v)
        } else if let Some(&v) = any.downcast_ref::<i64>() {
            Value::Int8(v)
        } else if let Some(&v) = any.downcast_ref::<&'static str>() {
            Value::Text(v)
        } else if let Some(&v) = any.downcast_ref::<bool>() {
            Value::Bool(v)
        } else if let Some(&v) = any.downcast_ref::<i16>() {
            Value::Int2(v)
        } else if let Some(&v) = any.downcast_ref::<f64>() {
            Value::Float8(v)
        } else if let Some(&v) = any.downcast_ref::<f32>() {
            Value::Float4(v)
        } else if let Some(&v) = any.downcast_ref::<u32>() {
            Value::Oid(v)
        } else {
            Value::Boxed(Box::new(value))
        }
    }

    /// The value, as the driver takes it: the same `ToSql` as the value given.
    fn as_sql(&self) -> &(dyn ToSql + Sync) {
        match self {
            Value::Bool(v) => v,
            Value::Int2(v) => v,
            Value::Int4(v) => v,
            Value::Int8(v) => v,
            Value::Float4(v) => v,
            Value::Float8(v) => v,
            Value::Oid(v) => v,
            Value::Text(v) => v,
            Value::Boxed(v) => v.as_ref(),
        }
    }
}

impl<T: ToSql + Send + Sync + 'static> From<T> for Arg {
    fn from(value: T) -> Self {
        Arg(ArgKind::Value(Value::new(value)))
    }
}

impl Arg {
    /// A value already boxed (its type known only at run time, as a driver's or a
    /// binding's values are), sent as a parameter.
    ///
    /// ```
    /// use pgengine::query::{Arg, Param, QueryString};
    /// let value: Param = Box::new(7_i64);
    /// let q = QueryString::new("SELECT {}").arg(Arg::boxed(value));
    /// assert_eq!(q.compile().unwrap().params().len(), 1);
    /// ```
    pub fn boxed(value: Param) -> Self {
        Arg(ArgKind::Value(Value::Boxed(value)))
    }

    /// The value, as a parameter; `None` for a nested query.
    fn as_value(&self) -> Option<&(dyn ToSql + Sync)> {
        match &self.0 {
            ArgKind::Value(value) => Some(value.as_sql()),
            ArgKind::Query(_) => None,
        }
    }
}

impl From<QueryString> for Arg {
    fn from(query: QueryString) -> Self {
        Arg(ArgKind::Query(Box::new(query)))
    }
}

impl fmt::Debug for Arg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            ArgKind::Value(value) => write!(f, "{:?}", value.as_sql()),
            ArgKind::Query(query) => write!(f, "{query:?}"),
        }
    }
}

/// A query's arguments: the first [`INLINE_ARGS`] held in the query itself.
type Args = SmallVec<[Arg; INLINE_ARGS]>;

/// The arguments a query holds without allocating: most statements have few.
const INLINE_ARGS: usize = 4;

/// A SQL template with `{}` placeholders and their arguments.
///
/// `{{` and `}}` stand for literal braces. A query built from a plain string with
/// [`QueryString::raw`] (as `&str` and `String` queries are) is sent exactly as written.
///
/// Nesting has no depth limit of its own: compiling and dropping a query do not recurse,
/// so any depth fits any thread's stack (tested 100,000 levels deep on a 2 MiB thread).
/// The server's parser has its own limit, and a statement nested too deeply for it is
/// the server's error.
///
/// ```
/// use pgengine::{sql, QueryString};
/// let inner = sql!("SELECT id FROM band WHERE popularity > {}", 100);
/// let outer = sql!("SELECT name FROM band WHERE id IN ({}) AND name <> {}", inner, "x");
/// let compiled = outer.compile().unwrap();
/// assert_eq!(
///     compiled.sql(),
///     "SELECT name FROM band WHERE id IN (SELECT id FROM band WHERE popularity > $1) AND name <> $2"
/// );
/// assert_eq!(compiled.params().len(), 2);
/// ```
pub struct QueryString {
    template: Cow<'static, str>,
    args: Args,
    raw: bool,
    /// The template's `$n` form, compiled with the program by [`sql!`](crate::sql); used
    /// while every argument is a value (a nested query needs renumbering).
    precompiled: Option<&'static str>,
}

impl QueryString {
    /// A template without arguments yet; add them with [`arg`](Self::arg).
    ///
    /// ```
    /// let q = pgengine::QueryString::new("SELECT {} + {}").arg(1_i32).arg(2_i32);
    /// assert_eq!(q.compile().unwrap().sql(), "SELECT $1 + $2");
    /// ```
    pub fn new(template: impl Into<Cow<'static, str>>) -> Self {
        Self {
            template: template.into(),
            args: Args::new(),
            raw: false,
            precompiled: None,
        }
    }

    /// A template with its arguments, as [`sql!`](crate::sql) builds it.
    ///
    /// ```
    /// use pgengine::query::{Arg, QueryString};
    /// let q = QueryString::with_args("SELECT {}", vec![Arg::from(7_i64)]);
    /// assert_eq!(q.compile().unwrap().params().len(), 1);
    /// ```
    pub fn with_args(template: impl Into<Cow<'static, str>>, args: Vec<Arg>) -> Self {
        Self {
            template: template.into(),
            args: Args::from_vec(args),
            raw: false,
            precompiled: None,
        }
    }

    /// What [`sql!`](crate::sql) builds from a literal template: `sql` is the template's
    /// `$n` form, checked against the arguments while the program compiled.
    #[doc(hidden)]
    #[inline]
    pub fn precompiled<const N: usize>(
        template: &'static str,
        sql: &'static str,
        args: [Arg; N],
    ) -> Self {
        // Moved in as one buffer when they fit (this runs for every `sql!` query): the
        // places past the arguments hold a filler that owns nothing, never read and
        // never dropped.
        let held = if N <= INLINE_ARGS {
            let mut given = args.into_iter();
            let filler = || Arg(ArgKind::Value(Value::Bool(false)));
            let buffer = std::array::from_fn(|_| given.next().unwrap_or_else(filler));
            Args::from_buf_and_len(buffer, N)
        } else {
            args.into_iter().collect()
        };
        Self {
            template: Cow::Borrowed(template),
            args: held,
            raw: false,
            precompiled: Some(sql),
        }
    }

    /// Plain SQL sent exactly as written: no placeholders, braces are not special.
    ///
    /// ```
    /// let q = pgengine::QueryString::raw("SELECT '{\"a\": 1}'::jsonb");
    /// assert_eq!(q.compile().unwrap().sql(), "SELECT '{\"a\": 1}'::jsonb");
    /// ```
    pub fn raw(sql: impl Into<Cow<'static, str>>) -> Self {
        Self {
            template: sql.into(),
            args: Args::new(),
            raw: true,
            precompiled: None,
        }
    }

    /// SQL already written with `$1..$n` placeholders, with its parameters in order (as
    /// asyncpg and Piccolo write queries): sent as written, braces are not special. It
    /// cannot be nested in another `QueryString` (its `$n` would need renumbering).
    ///
    /// ```
    /// use pgengine::query::{Param, QueryString};
    /// let params: Vec<Param> = vec![Box::new(1_i32), Box::new("x")];
    /// let q = QueryString::positional("SELECT $1::int, '{}', $2::text", params);
    /// let compiled = q.compile().unwrap();
    /// assert_eq!(compiled.sql(), "SELECT $1::int, '{}', $2::text");
    /// assert_eq!(compiled.params().len(), 2);
    /// ```
    pub fn positional(sql: impl Into<Cow<'static, str>>, params: Vec<Param>) -> Self {
        Self {
            template: sql.into(),
            args: params.into_iter().map(Arg::boxed).collect(),
            raw: true,
            precompiled: None,
        }
    }

    /// Adds the next argument: a value or a nested `QueryString`.
    ///
    /// ```
    /// let q = pgengine::QueryString::new("SELECT {}").arg("hello");
    /// assert_eq!(q.compile().unwrap().params().len(), 1);
    /// ```
    pub fn arg(mut self, arg: impl Into<Arg>) -> Self {
        self.args.push(arg.into());
        self.precompiled = None; // its placeholders were counted without this argument
        self
    }

    /// The template as written.
    ///
    /// ```
    /// assert_eq!(pgengine::sql!("SELECT {}", 1).template(), "SELECT {}");
    /// ```
    pub fn template(&self) -> &str {
        &self.template
    }

    /// Compiles to SQL with `$1..$n` and the parameters in order.
    ///
    /// A placeholder count that differs from the argument count is an
    /// [`InvalidInput`](crate::ErrorKind::InvalidInput) error naming both counts, and so
    /// is a statement of more than 65,535 parameters (the protocol's limit).
    ///
    /// ```
    /// let err = pgengine::QueryString::new("SELECT {}, {}").arg(1).compile().unwrap_err();
    /// assert!(err.to_string().contains("2 placeholders but 1 argument"));
    /// ```
    pub fn compile(&self) -> Result<CompiledQuery<'_>> {
        if let Some(sql) = self.precompiled
            && let Some(params) = self.values()
        {
            return CompiledQuery::new(Cow::Borrowed(sql), params);
        }
        if self.raw && !self.args.is_empty() {
            // Positional: the SQL already numbers its parameters.
            return match self.values() {
                Some(params) => CompiledQuery::new(Cow::Borrowed(&self.template), params),
                None => Err(Error::invalid_input(
                    "a positional ($n) query takes values, not nested queries",
                )),
            };
        }
        let braces = || memchr::memchr2(b'{', b'}', self.template.as_bytes()).is_some();
        if self.args.is_empty() && (self.raw || !braces()) {
            return Ok(CompiledQuery {
                sql: Cow::Borrowed(&self.template),
                params: Params::new(),
            });
        }
        let mut sql = String::with_capacity(self.template.len() + 8);
        let mut params = Params::with_capacity(self.args.len());
        self.compile_into(&mut sql, &mut params)?;
        CompiledQuery::new(Cow::Owned(sql), params)
    }

    /// The arguments as parameters, in order; `None` when one is a nested query. (A
    /// loop rather than `collect` into an `Option`: this runs for every query.)
    fn values(&self) -> Option<Params<'_>> {
        if self.args.len() <= INLINE {
            // Written in place: no length check per parameter.
            let mut inline = [UNUSED; INLINE];
            for (slot, arg) in inline.iter_mut().zip(&self.args) {
                *slot = arg.as_value()?;
            }
            return Some(Params::Inline(self.args.len(), inline));
        }
        let values = self.args.iter().map(Arg::as_value);
        Some(Params::Heap(values.collect::<Option<_>>()?))
    }

    /// Appends this query's SQL and parameters, nested queries spliced in. A loop with
    /// the enclosing queries on a list (allocated only when there is nesting), not
    /// recursion: any depth fits any thread.
    fn compile_into<'a>(&'a self, sql: &mut String, params: &mut Params<'a>) -> Result<()> {
        let Some(mut current) = Splice::start(self, sql)? else {
            return Ok(());
        };
        let mut enclosing: Vec<Splice<'a>> = Vec::new();
        loop {
            let Some(piece) = current.pieces.next() else {
                if current.args.next().is_some() {
                    return Err(current.query.count_mismatch());
                }
                match enclosing.pop() {
                    Some(outer) => current = outer,
                    None => return Ok(()),
                }
                continue;
            };
            match piece? {
                Piece::Text(text) => sql.push_str(text),
                Piece::Placeholder => match current.args.next().map(|arg| &arg.0) {
                    Some(ArgKind::Value(value)) => {
                        params.push(value.as_sql());
                        push_placeholder(sql, params.len());
                    }
                    Some(ArgKind::Query(nested)) => {
                        if let Some(inner) = Splice::start(nested, sql)? {
                            enclosing.push(std::mem::replace(&mut current, inner));
                        }
                    }
                    None => return Err(current.query.count_mismatch()),
                },
            }
        }
    }

    /// The error for a template whose placeholders and arguments differ in number.
    fn count_mismatch(&self) -> Error {
        let placeholders = Pieces::of(&self.template)
            .filter(|piece| matches!(piece, Ok(Piece::Placeholder)))
            .count();
        Error::invalid_input(format!(
            "query template has {placeholders} placeholder{} but {} argument{}: {}",
            plural(placeholders),
            self.args.len(),
            plural(self.args.len()),
            self.template
        ))
    }
}

/// A query being spliced in by [`QueryString::compile_into`]: what is left of its
/// template and of its arguments.
struct Splice<'a> {
    query: &'a QueryString,
    pieces: Pieces<'a>,
    args: std::slice::Iter<'a, Arg>,
}

impl<'a> Splice<'a> {
    /// Starts splicing `query`; a raw query is appended whole at once (`None`).
    fn start(query: &'a QueryString, sql: &mut String) -> Result<Option<Self>> {
        if !query.raw {
            return Ok(Some(Self {
                query,
                pieces: Pieces::of(&query.template),
                args: query.args.iter(),
            }));
        }
        if !query.args.is_empty() {
            return Err(Error::invalid_input(format!(
                "a raw or positional ($n) query cannot be nested, it has {} arguments",
                query.args.len()
            )));
        }
        sql.push_str(&query.template);
        Ok(None)
    }
}

/// Drops nested queries one level at a time from a list, not by recursion, so that a
/// query nested any depth deep is dropped on any thread.
impl Drop for QueryString {
    fn drop(&mut self) {
        if !self
            .args
            .iter()
            .any(|arg| matches!(arg.0, ArgKind::Query(_)))
        {
            return;
        }
        let mut nested = Vec::new();
        take_nested(&mut self.args, &mut nested);
        while let Some(mut query) = nested.pop() {
            take_nested(&mut query.args, &mut nested);
        } // each `query` is dropped here with no nested query left in it
    }
}

/// Moves the nested queries out of `args` onto `into`; values are dropped.
fn take_nested(args: &mut Args, into: &mut Vec<QueryString>) {
    for arg in args.drain(..) {
        if let ArgKind::Query(query) = arg.0 {
            into.push(*query);
        }
    }
}

fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
}

/// Appends `$n` (with `itoa`: this runs for every parameter).
fn push_placeholder(sql: &mut String, n: usize) {
    sql.push('$');
    sql.push_str(itoa::Buffer::new().format(n));
}

/// A template cut into literal text and placeholders; `{{` and `}}` come out as the text
/// `{` and `}`, a lone brace as an error. Braces are ASCII, so the byte offsets found by
/// scanning bytes are always character boundaries.
struct Pieces<'a> {
    template: &'a str,
    at: usize,
}

enum Piece<'a> {
    Text(&'a str),
    Placeholder,
}

impl<'a> Pieces<'a> {
    fn of(template: &'a str) -> Self {
        Self { template, at: 0 }
    }
}

impl<'a> Iterator for Pieces<'a> {
    type Item = Result<Piece<'a>>;

    fn next(&mut self) -> Option<Self::Item> {
        let rest = &self.template[self.at..];
        if rest.is_empty() {
            return None;
        }
        let bytes = rest.as_bytes();
        let (piece, consumed) = match memchr::memchr2(b'{', b'}', bytes) {
            None => (Piece::Text(rest), rest.len()),
            Some(0) => match (bytes[0], bytes.get(1)) {
                (b'{', Some(b'}')) => (Piece::Placeholder, 2),
                (brace, Some(&next)) if next == brace => (Piece::Text(&rest[..1]), 2),
                (brace, _) => {
                    self.at = self.template.len();
                    let c = brace as char;
                    return Some(Err(Error::invalid_input(format!(
                        "unmatched '{c}' in query template (write '{c}{c}' for a literal brace): {}",
                        self.template
                    ))));
                }
            },
            Some(text) => (Piece::Text(&rest[..text]), text),
        };
        self.at += consumed;
        Some(Ok(piece))
    }
}

impl fmt::Debug for QueryString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QueryString")
            .field("template", &self.template)
            .field("args", &self.args.len())
            .finish()
    }
}

impl fmt::Display for QueryString {
    /// The template as written (arguments are never shown).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.template)
    }
}

/// A compiled [`QueryString`]: SQL with `$1..$n`, and the parameters that fill them.
///
/// ```
/// let q = pgengine::sql!("SELECT {}::int", 5);
/// let compiled = q.compile().unwrap();
/// assert_eq!((compiled.sql(), compiled.params().len()), ("SELECT $1::int", 1));
/// ```
pub struct CompiledQuery<'a> {
    sql: Cow<'a, str>,
    params: Params<'a>,
}

/// A compiled statement's parameters: up to [`INLINE`] of them inline (most statements
/// have few), so compiling one allocates nothing more than its SQL. (Not a `SmallVec`,
/// which would make [`CompiledQuery`] invariant in its lifetime.)
enum Params<'a> {
    /// The first `.0` are the parameters; the others are [`UNUSED`].
    Inline(usize, [&'a (dyn ToSql + Sync); INLINE]),
    Heap(Vec<&'a (dyn ToSql + Sync)>),
}

/// The parameters a compiled statement holds without allocating.
const INLINE: usize = 4;

/// What fills the inline places not taken (never sent).
const UNUSED: &(dyn ToSql + Sync) = &0_i32;

impl<'a> Params<'a> {
    fn new() -> Self {
        Params::Inline(0, [UNUSED; INLINE])
    }

    fn with_capacity(capacity: usize) -> Self {
        match capacity <= INLINE {
            true => Self::new(),
            false => Params::Heap(Vec::with_capacity(capacity)),
        }
    }

    fn push(&mut self, param: &'a (dyn ToSql + Sync)) {
        match self {
            Params::Inline(len, inline) if *len < INLINE => {
                inline[*len] = param;
                *len += 1;
            }
            Params::Inline(len, inline) => {
                let mut heap = Vec::with_capacity(INLINE * 2);
                heap.extend_from_slice(&inline[..*len]);
                heap.push(param);
                *self = Params::Heap(heap);
            }
            Params::Heap(heap) => heap.push(param),
        }
    }

    fn as_slice(&self) -> &[&'a (dyn ToSql + Sync)] {
        match self {
            Params::Inline(len, inline) => &inline[..*len],
            Params::Heap(heap) => heap,
        }
    }

    fn len(&self) -> usize {
        self.as_slice().len()
    }
}

impl fmt::Debug for CompiledQuery<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CompiledQuery")
            .field("sql", &self.sql)
            .field("params", &self.params.len())
            .finish()
    }
}

/// The most parameters one statement can carry: the protocol counts them in 16 bits.
pub(crate) const MAX_PARAMETERS: usize = u16::MAX as usize;

impl<'a> CompiledQuery<'a> {
    /// `sql` with its `params`, refusing more parameters than the protocol carries.
    fn new(sql: Cow<'a, str>, params: Params<'a>) -> Result<Self> {
        let count = params.len();
        if count > MAX_PARAMETERS {
            return Err(Error::invalid_input(format!(
                "a statement takes at most {MAX_PARAMETERS} parameters (the protocol's limit), \
                 this one has {count}; split it, or pass an array parameter"
            )));
        }
        Ok(Self { sql, params })
    }

    /// The SQL to send.
    ///
    /// ```
    /// assert_eq!(pgengine::sql!("SELECT 1").compile().unwrap().sql(), "SELECT 1");
    /// ```
    pub fn sql(&self) -> &str {
        &self.sql
    }

    /// The parameters, in `$n` order.
    ///
    /// ```
    /// assert!(pgengine::sql!("SELECT 1").compile().unwrap().params().is_empty());
    /// ```
    pub fn params(&self) -> &[&'a (dyn ToSql + Sync)] {
        self.params.as_slice()
    }
}

/// Builds a [`QueryString`] from a template and its arguments.
///
/// Each argument is moved in: any `ToSql + Send + Sync + 'static` value, or a nested
/// `QueryString`. A literal template is checked and compiled with the program: a lone
/// brace, or placeholders and arguments that differ in number, do not compile, and no
/// work is left for run time (a template that is not a literal is checked when the
/// query runs).
///
/// ```
/// use pgengine::sql;
/// let q = sql!("SELECT * FROM band WHERE popularity > {}", 100);
/// assert_eq!(q.compile().unwrap().sql(), "SELECT * FROM band WHERE popularity > $1");
/// ```
///
/// ```compile_fail
/// let q = pgengine::sql!("SELECT {}, {}", 1); // two placeholders, one argument
/// ```
///
/// ```compile_fail
/// let q = pgengine::sql!("SELECT '{'"); // a lone brace: write '{{'
/// ```
#[macro_export]
macro_rules! sql {
    ($template:literal $(, $arg:expr)* $(,)?) => {{
        const SHAPE: $crate::query::__private::Shape =
            $crate::query::__private::Shape::of($template);
        const _: () = SHAPE.check($crate::__sql_count!($($arg),*));
        const BYTES: [u8; SHAPE.len] = $crate::query::__private::precompile::<{ SHAPE.len }>($template);
        const SQL: &str = $crate::query::__private::utf8(&BYTES);
        $crate::QueryString::precompiled($template, SQL, [$($crate::query::Arg::from($arg)),*])
    }};
    ($template:expr $(,)?) => {
        $crate::QueryString::new($template)
    };
    ($template:expr, $($arg:expr),+ $(,)?) => {
        $crate::QueryString::with_args($template, ::std::vec![$($crate::query::Arg::from($arg)),+])
    };
}

/// The number of arguments given to [`sql!`](crate::sql).
#[doc(hidden)]
#[macro_export]
macro_rules! __sql_count {
    () => { 0usize };
    ($head:expr $(, $tail:expr)*) => { 1usize + $crate::__sql_count!($($tail),*) };
}

/// What [`sql!`](crate::sql) runs while the program compiles; not an API.
#[doc(hidden)]
pub mod __private {
    /// A literal template, scanned: the length of its `$n` form and its placeholders.
    #[derive(Clone, Copy)]
    pub struct Shape {
        pub len: usize,
        pub placeholders: usize,
        pub lone_brace: bool,
    }

    impl Shape {
        /// Scans `template` with the rules of the run-time compiler: `{}` is a
        /// placeholder, `{{` and `}}` are literal braces, any other brace is lone.
        pub const fn of(template: &str) -> Shape {
            let bytes = template.as_bytes();
            let (mut at, mut len, mut placeholders) = (0, 0, 0);
            while at < bytes.len() {
                let byte = bytes[at];
                let next = if at + 1 < bytes.len() {
                    bytes[at + 1]
                } else {
                    0
                };
                if byte == b'{' && next == b'}' {
                    placeholders += 1;
                    len += 1 + digits(placeholders);
                    at += 2;
                } else if byte == b'{' || byte == b'}' {
                    if next != byte {
                        return Shape {
                            len: 0,
                            placeholders: 0,
                            lone_brace: true,
                        };
                    }
                    len += 1;
                    at += 2;
                } else {
                    len += 1;
                    at += 1;
                }
            }
            Shape {
                len,
                placeholders,
                lone_brace: false,
            }
        }

        /// Fails the build unless the template is well formed and takes `args`.
        pub const fn check(self, args: usize) {
            assert!(
                !self.lone_brace,
                "sql!: lone brace in the template; write a literal brace twice"
            );
            assert!(
                self.placeholders == args,
                "sql!: the template's placeholders and the arguments differ in number"
            );
        }
    }

    /// The `$n` form of a well-formed template whose form is `N` bytes long.
    pub const fn precompile<const N: usize>(template: &str) -> [u8; N] {
        let bytes = template.as_bytes();
        let mut sql = [0u8; N];
        let (mut at, mut out, mut placeholders) = (0, 0, 0);
        while at < bytes.len() {
            let byte = bytes[at];
            if byte == b'{' && bytes[at + 1] == b'}' {
                placeholders += 1;
                sql[out] = b'$';
                let width = digits(placeholders);
                let (mut rest, mut digit) = (placeholders, width);
                while digit > 0 {
                    sql[out + digit] = b'0' + (rest % 10) as u8;
                    rest /= 10;
                    digit -= 1;
                }
                out += 1 + width;
                at += 2;
            } else {
                sql[out] = byte;
                out += 1;
                at += if byte == b'{' || byte == b'}' { 2 } else { 1 };
            }
        }
        sql
    }

    /// The bytes as text (they are: a template's bytes with ASCII swapped in).
    pub const fn utf8(bytes: &[u8]) -> &str {
        match core::str::from_utf8(bytes) {
            Ok(text) => text,
            Err(_) => panic!("sql!: the compiled template is not UTF-8"),
        }
    }

    const fn digits(mut n: usize) -> usize {
        let mut width = 1;
        while n >= 10 {
            n /= 10;
            width += 1;
        }
        width
    }
}

/// Anything that yields the statements to run, in order.
///
/// Implemented for [`QueryString`], `&'static str`, `String` (plain SQL, sent as written) and
/// `Vec<QueryString>`. Other crates' query builders can implement it.
///
/// ```
/// use pgengine::{Query, QueryString};
/// struct CreateBand;
/// impl Query for CreateBand {
///     fn into_querystrings(self) -> Vec<QueryString> {
///         vec![
///             QueryString::raw("CREATE TABLE band (id serial PRIMARY KEY, name text)"),
///             QueryString::raw("CREATE INDEX ON band (name)"),
///         ]
///     }
/// }
/// assert_eq!(CreateBand.into_querystrings().len(), 2);
/// ```
pub trait Query: Send {
    /// The statements of this query, in the order they run.
    fn into_querystrings(self) -> Vec<QueryString>;

    /// The same, without a `Vec` for a single statement (the engine's hot path; not an
    /// API of its own).
    #[doc(hidden)]
    fn into_statements(self) -> OneOrMany<QueryString>
    where
        Self: Sized,
    {
        OneOrMany::Many(self.into_querystrings())
    }
}

/// One item or several; one without a `Vec` (the engine's hot path: a query is most
/// often a single statement).
#[doc(hidden)]
pub enum OneOrMany<T> {
    One(T),
    Many(Vec<T>),
}

impl<T> std::ops::Deref for OneOrMany<T> {
    type Target = [T];

    fn deref(&self) -> &[T] {
        match self {
            OneOrMany::One(item) => std::slice::from_ref(item),
            OneOrMany::Many(items) => items,
        }
    }
}

impl Query for QueryString {
    fn into_querystrings(self) -> Vec<QueryString> {
        vec![self]
    }

    fn into_statements(self) -> OneOrMany<QueryString> {
        OneOrMany::One(self)
    }
}

impl Query for &'static str {
    fn into_querystrings(self) -> Vec<QueryString> {
        vec![QueryString::raw(self)]
    }

    fn into_statements(self) -> OneOrMany<QueryString> {
        OneOrMany::One(QueryString::raw(self))
    }
}

impl Query for String {
    fn into_querystrings(self) -> Vec<QueryString> {
        vec![QueryString::raw(self)]
    }

    fn into_statements(self) -> OneOrMany<QueryString> {
        OneOrMany::One(QueryString::raw(self))
    }
}

/// A query built with sea-query 0.32 (feature `with-sea-query-0_32`): the `$n` SQL and
/// values of `build_postgres`, run as they are.
///
/// ```
/// # #[cfg(feature = "with-sea-query-0_32")]
/// # pgengine_testing::doctest(async |engine| {
/// use pgengine::prelude::*;
/// use sea_query::{Alias, Expr, PostgresQueryBuilder};
/// use sea_query_postgres::PostgresBinder;
/// let query = sea_query::Query::select()
///     .column(Alias::new("name"))
///     .from(Alias::new("band"))
///     .and_where(Expr::col(Alias::new("popularity")).gt(100))
///     .build_postgres(PostgresQueryBuilder);
/// let rows = engine.fetch(query).await?;
/// # Ok(()) });
/// ```
#[cfg(feature = "with-sea-query-0_32")]
impl Query for (String, sea_query_postgres::PostgresValues) {
    fn into_querystrings(self) -> Vec<QueryString> {
        let (sql, values) = self;
        let params = values
            .0
            .into_iter()
            .map(|value| Box::new(value) as Param)
            .collect();
        vec![QueryString::positional(sql, params)]
    }
}

impl Query for Vec<QueryString> {
    fn into_querystrings(self) -> Vec<QueryString> {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::{CompiledQuery, INLINE, Params};
    use tokio_postgres::types::ToSql;

    /// A compiled query lends itself for a shorter time (what bundles of statements
    /// borrowed together need): it is covariant in its lifetime.
    #[allow(dead_code)]
    fn shortens<'long: 'short, 'short>(query: CompiledQuery<'long>) -> CompiledQuery<'short> {
        query
    }

    #[test]
    fn params_keep_their_order_inline_and_beyond() {
        let values: Vec<i32> = (0..10).collect();
        for count in [0, 1, INLINE, INLINE + 1, 10] {
            let pushed = |capacity| {
                let mut params = Params::with_capacity(capacity);
                for value in &values[..count] {
                    params.push(value as &(dyn ToSql + Sync));
                }
                params
            };
            for params in [pushed(0), pushed(count)] {
                assert_eq!(params.len(), count);
                let debug: Vec<String> = params
                    .as_slice()
                    .iter()
                    .map(|param| format!("{param:?}"))
                    .collect();
                let want: Vec<String> = values[..count].iter().map(i32::to_string).collect();
                assert_eq!(debug, want);
            }
        }
    }
}
