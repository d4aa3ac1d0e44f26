//! `QueryString` compilation: pure, no server. Property tests check that compiling never
//! panics, that placeholders and parameters always agree, and that nesting depth does
//! not matter.

use pgengine::query::Arg;
use pgengine::{ErrorKind, QueryString, sql};
use proptest::prelude::*;

/// Template pieces: plain SQL text (may hold `$`, quotes, unicode), escaped braces, or a
/// placeholder.
#[derive(Debug, Clone)]
enum Piece {
    Text(String),
    Escaped,
    Placeholder,
}

fn piece() -> impl Strategy<Value = Piece> {
    prop_oneof![
        "[a-zA-Z0-9 ,.'$é*()=<>-]{0,12}".prop_map(Piece::Text),
        Just(Piece::Escaped),
        Just(Piece::Placeholder),
    ]
}

fn template_of(pieces: &[Piece]) -> (String, usize, String) {
    let mut template = String::new();
    let mut expected_literal = String::new();
    let mut placeholders = 0;
    for piece in pieces {
        match piece {
            Piece::Text(text) => {
                template.push_str(text);
                expected_literal.push_str(text);
            }
            Piece::Escaped => {
                template.push_str("{{}}");
                expected_literal.push_str("{}");
            }
            Piece::Placeholder => {
                placeholders += 1;
                template.push_str("{}");
                expected_literal.push_str(&format!("${placeholders}"));
            }
        }
    }
    (template, placeholders, expected_literal)
}

proptest! {
    /// Any string as a template with any number of arguments: an answer, never a panic;
    /// on success the parameter count equals the argument count.
    #[test]
    fn compiling_never_panics(template in ".{0,64}", args in 0usize..4) {
        let q = QueryString::with_args(template, (0..args).map(|i| Arg::from(i as i32)).collect());
        match q.compile() {
            Ok(compiled) => prop_assert_eq!(compiled.params().len(), args),
            Err(e) => prop_assert_eq!(e.kind(), ErrorKind::InvalidInput),
        }
    }

    /// A well-formed template compiles to `$1..$n` in order with `n` parameters; with one
    /// argument too many or too few it is an error naming both counts.
    #[test]
    fn placeholders_and_parameters_agree(pieces in proptest::collection::vec(piece(), 0..12)) {
        let (template, placeholders, expected) = template_of(&pieces);
        let args = |n: usize| (0..n).map(|i| Arg::from(i as i64)).collect::<Vec<_>>();

        let q = QueryString::with_args(template.clone(), args(placeholders));
        let compiled = q.compile().unwrap();
        prop_assert_eq!(compiled.sql(), expected.as_str());
        prop_assert_eq!(compiled.params().len(), placeholders);

        let extra = QueryString::with_args(template.clone(), args(placeholders + 1)).compile().unwrap_err();
        prop_assert_eq!(extra.kind(), ErrorKind::InvalidInput);
        let expected_counts = format!("{placeholders} placeholder");
        prop_assert!(extra.to_string().contains(&expected_counts));
        let expected_args = format!("{} argument", placeholders + 1);
        prop_assert!(extra.to_string().contains(&expected_args));
        if placeholders > 0 {
            let fewer = QueryString::with_args(template, args(placeholders - 1)).compile().unwrap_err();
            prop_assert_eq!(fewer.kind(), ErrorKind::InvalidInput);
        }
    }

    /// What `sql!` does with a literal template while the program compiles agrees with
    /// the run-time compiler: the same `$n` text and placeholder count, and a lone brace
    /// found by both.
    #[test]
    fn compile_time_and_run_time_compilers_agree(template in "[a-z {}$é]{0,40}") {
        use pgengine::query::__private::{Shape, precompile};
        let shape = Shape::of(&template);
        let args = (0..shape.placeholders).map(|i| Arg::from(i as i32)).collect();
        match QueryString::with_args(template.clone(), args).compile() {
            Ok(compiled) => {
                prop_assert!(!shape.lone_brace);
                let sql = precompile::<256>(&template);
                prop_assert_eq!(&sql[..shape.len], compiled.sql().as_bytes());
                prop_assert_eq!(compiled.params().len(), shape.placeholders);
            }
            Err(e) => prop_assert!(shape.lone_brace, "{}", e),
        }
    }

    /// Nesting a query `depth` levels deep, each level with its own arguments, numbers
    /// the parameters 1..n in reading order, whatever the depth.
    #[test]
    fn nesting_depth_does_not_matter(depth in 0usize..40) {
        let mut query = sql!("SELECT {}", 0_i32);
        for level in 1..=depth {
            let template = format!("SELECT {{}} FROM ({{}}) AS t{level} WHERE {{}} > 0");
            query = sql!(template, level as i32, query, level as i32 * 10);
        }
        let compiled = query.compile().unwrap();
        prop_assert_eq!(compiled.params().len(), 1 + 2 * depth);
        let numbers: Vec<usize> = compiled
            .sql()
            .split('$')
            .skip(1)
            .map(|s| s.chars().take_while(char::is_ascii_digit).collect::<String>().parse().unwrap())
            .collect();
        let mut sorted = numbers.clone();
        sorted.sort_unstable();
        prop_assert_eq!(sorted, (1..=1 + 2 * depth).collect::<Vec<_>>());
    }
}

#[test]
fn nested_query_arguments_are_renumbered() {
    let inner = sql!(
        "SELECT id FROM band WHERE popularity > {} AND name <> {}",
        100,
        "x"
    );
    let outer = sql!(
        "SELECT * FROM concert WHERE band_id IN ({}) AND day = {}",
        inner,
        3
    );
    let compiled = outer.compile().unwrap();
    assert_eq!(
        compiled.sql(),
        "SELECT * FROM concert WHERE band_id IN (SELECT id FROM band WHERE popularity > $1 AND name <> $2) AND day = $3"
    );
    assert_eq!(compiled.params().len(), 3);
}

/// `sql!` with a literal template gives the same as the run-time compiler, also with a
/// nested query (renumbered at run time) or an argument added afterwards (checked then).
#[test]
fn literal_templates_compile_like_the_others() {
    let literal = sql!("SELECT {} + {}, '{{}}'", 1_i32, 2_i32);
    let built = QueryString::new("SELECT {} + {}, '{{}}'")
        .arg(1_i32)
        .arg(2_i32);
    let (literal, built) = (literal.compile().unwrap(), built.compile().unwrap());
    assert_eq!(literal.sql(), "SELECT $1 + $2, '{}'");
    assert_eq!(literal.sql(), built.sql());
    assert_eq!(literal.params().len(), 2);

    let nested = sql!("SELECT {}, ({})", 1_i32, sql!("SELECT {}", 2_i32));
    assert_eq!(nested.compile().unwrap().sql(), "SELECT $1, (SELECT $2)");
    let one_more = sql!("SELECT {}", 1_i32).arg(2_i32).compile().unwrap_err();
    assert_eq!(one_more.kind(), ErrorKind::InvalidInput);
    assert!(
        one_more
            .to_string()
            .contains("1 placeholder but 2 arguments"),
        "{one_more}"
    );
    let many = sql!("{}{}{}{}{}{}{}{}{}{}{}", 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11);
    assert_eq!(many.compile().unwrap().sql(), "$1$2$3$4$5$6$7$8$9$10$11");
}

#[test]
fn braces_and_raw_sql() {
    let q = sql!("SELECT '{{\"a\": {}}}'::jsonb", 1);
    assert_eq!(q.compile().unwrap().sql(), "SELECT '{\"a\": $1}'::jsonb");
    let lone = QueryString::new("SELECT '{'").compile().unwrap_err();
    assert_eq!(lone.kind(), ErrorKind::InvalidInput);
    assert!(lone.to_string().contains("unmatched '{'"));
    let raw = QueryString::raw("SELECT '{'");
    assert_eq!(raw.compile().unwrap().sql(), "SELECT '{'");
    let nested_raw = sql!("SELECT * FROM ({}) t", QueryString::raw("SELECT '}'"));
    assert_eq!(
        nested_raw.compile().unwrap().sql(),
        "SELECT * FROM (SELECT '}') t"
    );
}

#[test]
fn positional_sql_is_sent_as_written_with_its_parameters() {
    let params: Vec<pgengine::query::Param> = vec![Box::new(1_i32), Box::new("x")];
    let q = QueryString::positional("SELECT $1::int, '{', $2::text", params);
    let compiled = q.compile().unwrap();
    assert_eq!(compiled.sql(), "SELECT $1::int, '{', $2::text");
    assert_eq!(compiled.params().len(), 2);
    let nested = sql!(
        "SELECT * FROM ({}) t",
        QueryString::positional("SELECT $1", vec![Box::new(1_i32)])
    );
    let err = nested.compile().unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidInput);
    assert!(err.to_string().contains("cannot be nested"), "{err}");
}

/// With `with-sea-query-0_32`, a sea-query query runs as built: its `$n` SQL with its
/// values as parameters.
#[cfg(feature = "with-sea-query-0_32")]
#[tokio::test]
async fn sea_query_queries_run_as_built() {
    use pgengine::prelude::*;
    use sea_query::{Alias, Expr, PostgresQueryBuilder};
    use sea_query_postgres::PostgresBinder;
    let (_db, engine) = crate::common::engine().await;
    crate::common::create_band(&engine).await;
    let insert = sea_query::Query::insert()
        .into_table(Alias::new("band"))
        .columns([Alias::new("name")])
        .values_panic(["O'Brien; DROP TABLE band".into()])
        .values_panic(["Rustaceans".into()])
        .build_postgres(PostgresQueryBuilder);
    assert!(insert.0.contains("$1"), "{}", insert.0);
    assert_eq!(engine.execute(insert).await.unwrap(), 2);
    let select = sea_query::Query::select()
        .column(Alias::new("name"))
        .from(Alias::new("band"))
        .and_where(Expr::col(Alias::new("name")).like("O'%"))
        .build_postgres(PostgresQueryBuilder);
    let names: Vec<(String,)> = engine.fetch_as(select).await.unwrap();
    assert_eq!(names, [("O'Brien; DROP TABLE band".to_owned(),)]);
}

/// The scalar types a query holds without boxing them are encoded by their own `ToSql`,
/// as boxed values are: read back as sent through prepared statements (where the server
/// gives each parameter its type), declared as their own type in unnamed statements
/// (`statement_cache_capacity=0`, where the value's type is the parameter's), and a value
/// of another type than its parameter is refused as before.
#[tokio::test]
async fn scalar_arguments_keep_their_types() {
    use pgengine::prelude::*;
    let (db, engine) = crate::common::engine().await;
    let row = engine
        .fetch_one(sql!(
            "SELECT {}::bool, {}::int2, {}::int4, {}::int8, {}::float4, {}::float8, \
             {}::oid, {}::text, {}::text",
            true,
            -7_i16,
            i32::MIN,
            i64::MAX,
            1.5_f32,
            -2.25_f64,
            26_u32,
            "static text",
            String::from("owned text")
        ))
        .await
        .unwrap();
    assert!(row.get::<_, bool>(0));
    assert_eq!(row.get::<_, i16>(1), -7);
    assert_eq!(row.get::<_, i32>(2), i32::MIN);
    assert_eq!(row.get::<_, i64>(3), i64::MAX);
    assert_eq!(row.get::<_, f32>(4), 1.5);
    assert_eq!(row.get::<_, f64>(5), -2.25);
    assert_eq!(row.get::<_, u32>(6), 26);
    assert_eq!(row.get::<_, &str>(7), "static text");
    assert_eq!(row.get::<_, &str>(8), "owned text");

    let wrong = engine
        .fetch_one(sql!("SELECT {}::int8", 7_i32))
        .await
        .unwrap_err();
    assert!(
        wrong.to_string().contains("serializing parameter 0"),
        "{wrong}"
    );

    let unnamed = crate::common::builder(&db)
        .statement_cache_capacity(0)
        .build()
        .await
        .unwrap();
    let row = unnamed
        .fetch_one(sql!(
            "SELECT pg_typeof({})::text, pg_typeof({})::text, pg_typeof({})::text, \
             pg_typeof({})::text, pg_typeof({})::text, pg_typeof({})::text, \
             pg_typeof({})::text, pg_typeof({})::text",
            true,
            7_i16,
            7_i32,
            7_i64,
            1.5_f32,
            1.5_f64,
            26_u32,
            "text"
        ))
        .await
        .unwrap();
    let types: Vec<&str> = (0..8).map(|i| row.get(i)).collect();
    assert_eq!(
        types,
        [
            "boolean",
            "smallint",
            "integer",
            "bigint",
            "real",
            "double precision",
            "oid",
            "text"
        ]
    );
    assert_eq!(format!("{:?}", pgengine::query::Arg::from(-7_i16)), "-7");

    // A value boxed at run time (its type unknown to the program) is spliced in too.
    let dynamic: pgengine::query::Param = Box::new(41_i64);
    let answer: i64 = engine
        .fetch_one(
            QueryString::new("SELECT {}::int8 + 1").arg(pgengine::query::Arg::boxed(dynamic)),
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(answer, 42);
}
