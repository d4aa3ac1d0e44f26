//! [`FromRow`]: typed rows, for [`Executor::fetch_as`](crate::Executor::fetch_as) and
//! its siblings. Tuples read their columns in order; a struct implements it by naming
//! its columns with [`column`].

use std::fmt::Display;

use tokio_postgres::Row;
use tokio_postgres::row::RowIndex;
use tokio_postgres::types::FromSql;

use crate::error::{Error, ErrorKind, Result};

/// A value made from one row. Implemented for tuples of up to 8 columns, read in order;
/// derived for a struct with `#[derive(pgengine::FromRow)]` (each field from the column
/// of its name; `#[pgengine(rename = "column")]`, `#[pgengine(flatten)]`), or
/// implemented by hand with [`column`], which names the column in its errors.
///
/// ```
/// # pgengine_testing::doctest(async |engine| {
/// use pgengine::prelude::*;
/// #[derive(pgengine::FromRow)]
/// struct Band {
///     name: String,
///     #[pgengine(rename = "popularity")]
///     fans: i32,
/// }
/// let band: Band = engine.fetch_one_as("SELECT name, popularity FROM band ORDER BY name LIMIT 1").await?;
/// assert_eq!((band.name.as_str(), band.fans), ("Pythonistas", 1000));
/// # Ok(()) });
/// ```
///
/// By hand:
///
/// ```
/// # pgengine_testing::doctest(async |engine| {
/// use pgengine::prelude::*;
/// use pgengine::{FromRow, Row, column};
///
/// struct Band { name: String, popularity: i32 }
///
/// impl FromRow for Band {
///     fn from_row(row: &Row) -> pgengine::Result<Self> {
///         Ok(Band { name: column(row, "name")?, popularity: column(row, "popularity")? })
///     }
/// }
///
/// let bands: Vec<Band> = engine.fetch_as("SELECT name, popularity FROM band ORDER BY name").await?;
/// assert_eq!((bands[0].name.as_str(), bands[0].popularity), ("Pythonistas", 1000));
/// let (count,): (i64,) = engine.fetch_one_as("SELECT count(*) FROM band").await?;
/// # Ok(()) });
/// ```
pub trait FromRow: Sized {
    /// Makes the value from `row`; a column missing or of another type is an
    /// [`ErrorKind::Driver`] error naming the column.
    fn from_row(row: &Row) -> Result<Self>;
}

/// The value of column `index` (a name or a position) of `row`, as `T`; a column
/// missing or of another type is an [`ErrorKind::Driver`] error naming the column.
///
/// ```
/// # pgengine_testing::doctest(async |engine| {
/// use pgengine::prelude::*;
/// let row = engine.fetch_one("SELECT 'Rustaceans' AS name").await?;
/// let name: String = pgengine::column(&row, "name")?;
/// let wrong = pgengine::column::<i32, _>(&row, "name").unwrap_err();
/// assert!(wrong.to_string().contains("column name"));
/// # Ok(()) });
/// ```
pub fn column<'a, T, I>(row: &'a Row, index: I) -> Result<T>
where
    T: FromSql<'a>,
    I: RowIndex + Display,
{
    row.try_get(&index).map_err(|e| {
        let source = std::error::Error::source(&e).map(|s| format!(": {s}"));
        Error::new(
            ErrorKind::Driver,
            format!(
                "column {index} cannot be read as {}: {e}{}",
                std::any::type_name::<T>(),
                source.unwrap_or_default()
            ),
        )
    })
}

/// The name of column `index` of `row`, for errors.
fn column_name(row: &Row, index: usize) -> String {
    row.columns()
        .get(index)
        .map_or_else(|| index.to_string(), |c| c.name().to_owned())
}

macro_rules! tuple_from_row {
    ($count:literal: $($t:ident $i:tt),+) => {
        impl<$($t),+> FromRow for ($($t,)+)
        where
            $(for<'a> $t: FromSql<'a>,)+
        {
            fn from_row(row: &Row) -> Result<Self> {
                if row.len() != $count {
                    return Err(Error::new(
                        ErrorKind::Driver,
                        format!("the row has {} columns where {} are read", row.len(), $count),
                    ));
                }
                Ok(($(column::<$t, _>(row, $i)
                    .map_err(|e| e.context(format!("column {:?}", column_name(row, $i))))?,)+))
            }
        }
    };
}

tuple_from_row!(1: A 0);
tuple_from_row!(2: A 0, B 1);
tuple_from_row!(3: A 0, B 1, C 2);
tuple_from_row!(4: A 0, B 1, C 2, D 3);
tuple_from_row!(5: A 0, B 1, C 2, D 3, E 4);
tuple_from_row!(6: A 0, B 1, C 2, D 3, E 4, F 5);
tuple_from_row!(7: A 0, B 1, C 2, D 3, E 4, F 5, G 6);
tuple_from_row!(8: A 0, B 1, C 2, D 3, E 4, F 5, G 6, H 7);
