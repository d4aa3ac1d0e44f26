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

#[derive(Debug, PartialEq, pgengine::FromRow)]
struct Venue {
    name: String,
    #[pgengine(rename = "seats")]
    capacity: i32,
    #[pgengine(flatten)]
    place: Place,
}

#[derive(Debug, PartialEq, pgengine::FromRow)]
struct Place {
    city: String,
    country: Option<String>,
}

#[derive(Debug, PartialEq, pgengine::FromRow)]
struct Pair(i32, String);

/// `#[derive(FromRow)]`: fields by name, renamed, flattened, and a tuple struct by
/// position; a missing column and a type mismatch are errors naming the column.
#[tokio::test]
async fn derived_rows_read_columns_by_name() {
    let (_db, engine) = crate::common::engine().await;
    let venue: Venue = engine
        .fetch_one_as("SELECT 'Hall' AS name, 500 AS seats, 'Oslo' AS city, NULL::text AS country")
        .await
        .unwrap();
    assert_eq!(
        venue,
        Venue {
            name: "Hall".into(),
            capacity: 500,
            place: Place {
                city: "Oslo".into(),
                country: None
            },
        }
    );
    let pair: Pair = engine.fetch_one_as("SELECT 7, 'seven'").await.unwrap();
    assert_eq!(pair, Pair(7, "seven".into()));

    let missing = engine
        .fetch_one_as::<Venue, _>(
            "SELECT 'Hall' AS name, 500 AS capacity, 'Oslo' AS city, NULL::text AS country",
        )
        .await
        .unwrap_err();
    assert!(missing.to_string().contains("column seats"), "{missing}");
    let mismatch = engine
        .fetch_one_as::<Venue, _>(
            "SELECT 'Hall' AS name, 'many' AS seats, 'Oslo' AS city, NULL::text AS country",
        )
        .await
        .unwrap_err();
    assert!(mismatch.to_string().contains("column seats"), "{mismatch}");
}

/// `batch_as` streams typed batches; a row that does not fit is an error, not a panic.
#[tokio::test]
async fn a_typed_batch_streams_values() {
    use futures::TryStreamExt;
    let (_db, engine) = crate::common::engine().await;
    let batches: Vec<Vec<Pair>> = engine
        .batch_as("SELECT g, 'n' || g FROM generate_series(1, 25) g", 10)
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    let sizes: Vec<usize> = batches.iter().map(Vec::len).collect();
    assert_eq!(sizes, [10, 10, 5]);
    assert_eq!(batches[2][4], Pair(25, "n25".into()));
    let mut wrong = engine
        .batch_as::<Pair, _>("SELECT 'x', 1", 10)
        .await
        .unwrap();
    let error = wrong.next().await.unwrap_err();
    assert!(error.to_string().contains("column 0"), "{error}");
}
