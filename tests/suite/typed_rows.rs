//! Typed rows: tuples in column order, structs through `column`, NULL as `Option`, and
//! clear errors (naming the column) for a type or a column count that does not fit.

use pgengine::prelude::*;
use pgengine::{ErrorKind, FromRow, Row, column};

#[derive(Debug, PartialEq)]
struct Band {
    name: String,
    popularity: Option<i32>,
}

impl FromRow for Band {
    fn from_row(row: &Row) -> pgengine::Result<Self> {
        Ok(Band {
            name: column(row, "name")?,
            popularity: column(row, "popularity")?,
        })
    }
}

#[tokio::test]
async fn rows_become_tuples_and_structs() {
    let (_db, engine) = crate::common::engine().await;
    engine
        .run_ddl("CREATE TABLE band (name text, popularity int); INSERT INTO band VALUES ('a', 1), ('b', NULL)")
        .await
        .unwrap();
    let pairs: Vec<(String, Option<i32>)> = engine
        .fetch_as("SELECT name, popularity FROM band ORDER BY name")
        .await
        .unwrap();
    assert_eq!(pairs, [("a".to_owned(), Some(1)), ("b".to_owned(), None)]);
    let bands: Vec<Band> = engine
        .fetch_as("SELECT * FROM band ORDER BY name")
        .await
        .unwrap();
    assert_eq!(
        bands[1],
        Band {
            name: "b".into(),
            popularity: None
        }
    );
    let (count,): (i64,) = engine
        .fetch_one_as("SELECT count(*) FROM band")
        .await
        .unwrap();
    assert_eq!(count, 2);
    let none: Option<Band> = engine
        .fetch_optional_as("SELECT * FROM band WHERE false")
        .await
        .unwrap();
    assert!(none.is_none());
    let eight: (i32, i32, i32, i32, i32, i32, i32, String) = engine
        .fetch_one_as("SELECT 1, 2, 3, 4, 5, 6, 7, 'eight'")
        .await
        .unwrap();
    assert_eq!(eight.7, "eight");
    // Inside a transaction too.
    let tx = engine.begin().await.unwrap();
    let inside: Vec<(String,)> = tx.fetch_as("SELECT name FROM band").await.unwrap();
    assert_eq!(inside.len(), 2);
    tx.commit().await.unwrap();
}

#[tokio::test]
async fn a_mismatch_is_an_error_naming_the_column() {
    let (_db, engine) = crate::common::engine().await;
    let err = engine
        .fetch_one_as::<(String, i32), _>("SELECT 'x' AS name, 'not a number' AS popularity")
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Driver, "{err}");
    assert!(err.to_string().contains("popularity"), "{err}");
    assert!(err.to_string().contains("i32"), "{err}");

    let err = engine
        .fetch_one_as::<(i32,), _>("SELECT NULL::int")
        .await
        .unwrap_err();
    assert_eq!(
        err.kind(),
        ErrorKind::Driver,
        "a NULL into a non-Option: {err}"
    );

    let err = engine
        .fetch_one_as::<(i32, i32), _>("SELECT 1")
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Driver, "{err}");
    assert!(err.to_string().contains("1 columns where 2"), "{err}");

    let err = engine
        .fetch_as::<Band, _>("SELECT 'x' AS name")
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("popularity"),
        "a missing column is named: {err}"
    );
}
