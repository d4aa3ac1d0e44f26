//! `examples/web_service.rs`, started on a free port and driven over HTTP by a real
//! client, concurrently: health, accounts, serializable transfers retried on conflict
//! (money is conserved), a listing streamed from a batch, a long poll woken by NOTIFY.

#[allow(dead_code, unreachable_pub)]
#[path = "../../examples/web_service.rs"]
mod example;

use std::collections::BTreeMap;

use example::{Account, Transfer};
use rand::Rng;
use reqwest::StatusCode;

const ACCOUNTS: i32 = 250;
const OPENING_BALANCE: i64 = 1_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_service_serves_concurrent_clients() {
    let (_db, engine) = crate::common::engine_with(16).await;
    example::migrate(&engine).await.unwrap();
    let app = example::app(engine.clone()).await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    let http = reqwest::Client::new();

    let health = http.get(format!("{base}/health")).send().await.unwrap();
    assert_eq!(health.status(), StatusCode::OK);
    assert_eq!(health.text().await.unwrap(), "ok");

    // Accounts, opened concurrently; a duplicate is a conflict.
    let opened = futures::future::join_all((1..=ACCOUNTS).map(|id| {
        let account = Account {
            id,
            owner: format!("owner {id}"),
            balance: OPENING_BALANCE,
        };
        http.post(format!("{base}/accounts")).json(&account).send()
    }))
    .await;
    assert!(
        opened
            .iter()
            .all(|r| r.as_ref().unwrap().status() == StatusCode::CREATED)
    );
    let duplicate = Account {
        id: 1,
        owner: "again".into(),
        balance: 1,
    };
    let response = http
        .post(format!("{base}/accounts"))
        .json(&duplicate)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CONFLICT);

    // A long poll waiting for the next committed transfer.
    let poll = tokio::spawn({
        let (http, base) = (http.clone(), base.clone());
        async move {
            let response = http
                .get(format!("{base}/transfers/next?timeout_ms=20000"))
                .send()
                .await
                .unwrap();
            (response.status(), response.text().await.unwrap())
        }
    });
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;

    // 64 concurrent transfers, some between the same accounts: serializable, retried on
    // conflict. None can overdraw (at most 64 × 15 < 1,000 leaves an account).
    let transfers: Vec<Transfer> = {
        let mut rng = rand::rng();
        (0..64)
            .map(|_| {
                let from = rng.random_range(1..=20);
                let to = loop {
                    let to = rng.random_range(1..=20);
                    if to != from {
                        break to;
                    }
                };
                Transfer {
                    from,
                    to,
                    amount: rng.random_range(1..=15),
                }
            })
            .collect()
    };
    let answers = futures::future::join_all(
        transfers
            .iter()
            .map(|t| http.post(format!("{base}/transfer")).json(t).send()),
    )
    .await;
    for answer in answers {
        let answer = answer.unwrap();
        assert_eq!(
            answer.status(),
            StatusCode::OK,
            "{}",
            answer.text().await.unwrap()
        );
    }
    let (status, payload) = poll.await.unwrap();
    assert_eq!(status, StatusCode::OK);
    let event: serde_json::Value = serde_json::from_str(&payload).unwrap();
    assert!(
        event["amount"]
            .as_i64()
            .is_some_and(|a| (1..=15).contains(&a)),
        "{payload}"
    );

    // Refused transfers change nothing.
    for refused in [
        Transfer {
            from: 1,
            to: 2,
            amount: 1_000_000,
        },
        Transfer {
            from: 9_999,
            to: 2,
            amount: 1,
        },
    ] {
        let response = http
            .post(format!("{base}/transfer"))
            .json(&refused)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::CONFLICT);
    }

    // The listing, streamed in batches of 100: every account, each balance as the
    // transfers say.
    let listing = http.get(format!("{base}/accounts")).send().await.unwrap();
    assert_eq!(listing.status(), StatusCode::OK);
    let accounts: Vec<Account> = listing
        .text()
        .await
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(accounts.len(), ACCOUNTS as usize);
    let mut expected: BTreeMap<i32, i64> = (1..=ACCOUNTS).map(|id| (id, OPENING_BALANCE)).collect();
    for t in &transfers {
        *expected.get_mut(&t.from).unwrap() -= t.amount;
        *expected.get_mut(&t.to).unwrap() += t.amount;
    }
    let listed: BTreeMap<i32, i64> = accounts.iter().map(|a| (a.id, a.balance)).collect();
    assert_eq!(listed, expected);

    server.abort();
    engine.close_connection_pool().await;
}
