//! Queries as values: [`QueryString`], the [`sql!`](crate::sql) macro and the [`Query`] trait.
//!
//! Nothing here does I/O. A [`QueryString`] is a SQL template with `{}` placeholders and
//! their arguments; an argument may itself be a `QueryString`, which is spliced in with its
//! own arguments renumbered. Compiling gives SQL with `$1..$n` and the parameter list.

use std::borrow::Cow;
use std::fmt;

use tokio_postgres::types::ToSql;

use crate::error::{Error, Result};

/// A parameter value, owned by the query that carries it.
///
/// ```
/// let value: pgengine::query::Param = Box::new(42_i32);
/// # let _ = value;
/// ```
pub type Param = Box<dyn ToSql + Send + Sync>;

/// One argument of a [`QueryString`]: a value sent as a parameter, or a nested query spliced in.
///
/// ```
/// use pgengine::query::{Arg, QueryString};
/// let args = vec![Arg::from(1_i32), Arg::from(QueryString::new("SELECT 2"))];
/// assert_eq!(args.len(), 2);
/// ```
pub enum Arg {
    /// A value, sent as a `$n` parameter.
    Value(Param),
    /// A nested query, spliced into the template with its own arguments renumbered.
    Query(QueryString),
}

impl<T: ToSql + Send + Sync + 'static> From<T> for Arg {
    fn from(value: T) -> Self {
        Arg::Value(Box::new(value))
    }
}

impl From<QueryString> for Arg {
    fn from(query: QueryString) -> Self {
        Arg::Query(query)
    }
}

impl fmt::Debug for Arg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Arg::Value(value) => write!(f, "{value:?}"),
            Arg::Query(query) => write!(f, "{query:?}"),
        }
    }
}

/// A SQL template with `{}` placeholders and their arguments.
///
/// `{{` and `}}` stand for literal braces. A query built from a plain string with
/// [`QueryString::raw`] (as `&str` and `String` queries are) is sent exactly as written.
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
    args: Vec<Arg>,
    raw: bool,
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
            args: Vec::new(),
            raw: false,
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
            args,
            raw: false,
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
            args: Vec::new(),
            raw: true,
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
    /// [`InvalidInput`](crate::ErrorKind::InvalidInput) error naming both counts.
    ///
    /// ```
    /// let err = pgengine::sql!("SELECT {}, {}", 1).compile().unwrap_err();
    /// assert!(err.to_string().contains("2 placeholders but 1 argument"));
    /// ```
    pub fn compile(&self) -> Result<CompiledQuery<'_>> {
        let braces = || memchr::memchr2(b'{', b'}', self.template.as_bytes()).is_some();
        if self.args.is_empty() && (self.raw || !braces()) {
            return Ok(CompiledQuery {
                sql: Cow::Borrowed(&self.template),
                params: Vec::new(),
            });
        }
        let mut sql = String::with_capacity(self.template.len() + 8);
        let mut params = Vec::with_capacity(self.args.len());
        self.compile_into(&mut sql, &mut params)?;
        Ok(CompiledQuery {
            sql: Cow::Owned(sql),
            params,
        })
    }

    fn compile_into<'a>(
        &'a self,
        sql: &mut String,
        params: &mut Vec<&'a (dyn ToSql + Sync)>,
    ) -> Result<()> {
        if self.raw {
            if !self.args.is_empty() {
                return Err(Error::invalid_input(format!(
                    "a raw query takes no arguments, got {}",
                    self.args.len()
                )));
            }
            sql.push_str(&self.template);
            return Ok(());
        }
        let mut args = self.args.iter();
        for piece in Pieces::of(&self.template) {
            match piece? {
                Piece::Text(text) => sql.push_str(text),
                Piece::Placeholder => match args.next() {
                    Some(Arg::Value(value)) => {
                        params.push(value.as_ref() as &(dyn ToSql + Sync));
                        push_placeholder(sql, params.len());
                    }
                    Some(Arg::Query(nested)) => nested.compile_into(sql, params)?,
                    None => return Err(self.count_mismatch()),
                },
            }
        }
        match args.next() {
            Some(_) => Err(self.count_mismatch()),
            None => Ok(()),
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
    params: Vec<&'a (dyn ToSql + Sync)>,
}

impl fmt::Debug for CompiledQuery<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CompiledQuery")
            .field("sql", &self.sql)
            .field("params", &self.params.len())
            .finish()
    }
}

impl<'a> CompiledQuery<'a> {
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
        &self.params
    }
}

/// Builds a [`QueryString`] from a template and its arguments.
///
/// Each argument is moved in: any `ToSql + Send + Sync + 'static` value, or a nested
/// `QueryString`.
///
/// ```
/// use pgengine::sql;
/// let q = sql!("SELECT * FROM band WHERE popularity > {}", 100);
/// assert_eq!(q.compile().unwrap().sql(), "SELECT * FROM band WHERE popularity > $1");
/// ```
#[macro_export]
macro_rules! sql {
    ($template:expr $(,)?) => {
        $crate::QueryString::new($template)
    };
    ($template:expr, $($arg:expr),+ $(,)?) => {
        $crate::QueryString::with_args($template, ::std::vec![$($crate::query::Arg::from($arg)),+])
    };
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
}

impl Query for QueryString {
    fn into_querystrings(self) -> Vec<QueryString> {
        vec![self]
    }
}

impl Query for &'static str {
    fn into_querystrings(self) -> Vec<QueryString> {
        vec![QueryString::raw(self)]
    }
}

impl Query for String {
    fn into_querystrings(self) -> Vec<QueryString> {
        vec![QueryString::raw(self)]
    }
}

impl Query for Vec<QueryString> {
    fn into_querystrings(self) -> Vec<QueryString> {
        self
    }
}
