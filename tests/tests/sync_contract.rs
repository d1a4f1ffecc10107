//! One contract for the sync ports (destinations and their outboxes), run
//! against the embedded SQLite adapter and against the DynamoDB adapter on
//! DynamoDB Local. Each case gets a fresh store.

use std::collections::BTreeSet;
use std::sync::Arc;

use aws_sdk_dynamodb::types::AttributeValue;
use kindred_domain::sync::Settings;
use kindred_sqlite::SqliteStore;
use kindred_store::secret::Sealer;
use kindred_store::{Attempt, DeliveryError, Destinations, Outbox, StoreError};
use kindred_tests::{emulators, fresh_dynamo};
use serde_json::json;

fn webhook(url: &str) -> Settings {
    Settings::parse(&json!({"kind": "webhook", "url": url}))
        .unwrap()
        .0
}

/// Creating, replacing and reading destinations, space by space.
async fn destinations_contract<A: Destinations>(a: &A) {
    let space = "contract";
    // A new destination needs its secret.
    let r = a
        .put_destination(space, "d1", None, webhook("http://h/1"), None)
        .await;
    assert!(matches!(r, Err(StoreError::Invalid(_))), "{r:?}");
    let (r, created) = a
        .put_destination(
            space,
            "d1",
            Some("CRM".into()),
            webhook("http://h/1"),
            Some("s1".into()),
        )
        .await
        .unwrap();
    assert!(created);
    assert_eq!(
        (r.version, r.has_secret, r.initial_sync_pending),
        (1, true, true)
    );
    assert_eq!(r.name.as_deref(), Some("CRM"));
    // A replace keeps the secret.
    let (r, created) = a
        .put_destination(space, "d1", None, webhook("http://h/2"), None)
        .await
        .unwrap();
    assert!(!created);
    assert_eq!((r.version, r.has_secret), (2, true));
    assert_eq!(r.settings.endpoint, "http://h/2");
    assert_eq!(r.name, None);
    assert_eq!(a.destinations(space).await.unwrap().len(), 1);
    // Nothing crosses spaces.
    assert!(a.destinations("other").await.unwrap().is_empty());
    assert!(a.destination("other", "d1").await.unwrap().is_none());
    assert!(a.destination_status("other", "d1").await.unwrap().is_none());
}

/// A destination's outbox: order, attempts, dead letters, replay, delete.
async fn outbox_contract<A: Destinations + Outbox>(a: &A) {
    let space = "contract";
    let (_, created) = a
        .put_destination(space, "d1", None, webhook("http://h/1"), Some("s1".into()))
        .await
        .unwrap();
    assert!(created);

    // The outbox keeps order and counts attempts.
    let calls = (0..5).map(|i| (format!("p{i}"), json!({"n": i}))).collect();
    a.enqueue(space, "d1", calls).await.unwrap();
    let r = a
        .enqueue(space, "nope", vec![("p".into(), json!({}))])
        .await;
    assert!(matches!(r, Err(StoreError::NotFound)), "{r:?}");
    let first = a.next_calls(space, "d1", 3).await.unwrap();
    let numbers: Vec<String> = first.iter().map(|c| c.call.clone()).collect();
    assert_eq!(numbers, [r#"{"n":0}"#, r#"{"n":1}"#, r#"{"n":2}"#]);
    assert!(first.windows(2).all(|w| w[0].seq < w[1].seq));
    a.record(
        space,
        "d1",
        &[first[0].seq, first[1].seq],
        Attempt::Delivered { at: 1_000 },
    )
    .await
    .unwrap();
    let rest = a.next_calls(space, "d1", 10).await.unwrap();
    assert_eq!(rest.len(), 3);
    let st = a.destination_status(space, "d1").await.unwrap().unwrap();
    assert_eq!(
        (st.delivered, st.pending, st.retrying, st.dead),
        (2, 3, 0, 0)
    );
    assert_eq!(st.last_success_at, Some(1_000));

    let unavailable = DeliveryError {
        status: Some(503),
        message: "Service Unavailable".into(),
        at: 2_000,
    };
    a.record(
        space,
        "d1",
        &[rest[0].seq],
        Attempt::Failed {
            error: unavailable,
            dead: false,
        },
    )
    .await
    .unwrap();
    let again = a.next_calls(space, "d1", 10).await.unwrap();
    assert_eq!((again[0].seq, again[0].attempts), (rest[0].seq, 1));
    let st = a.destination_status(space, "d1").await.unwrap().unwrap();
    assert_eq!((st.pending, st.retrying), (2, 1));
    assert_eq!(st.last_error.as_ref().unwrap().status, Some(503));

    let refused = DeliveryError {
        status: Some(400),
        message: "Bad Request".into(),
        at: 3_000,
    };
    a.record(
        space,
        "d1",
        &[rest[0].seq, rest[1].seq],
        Attempt::Failed {
            error: refused,
            dead: true,
        },
    )
    .await
    .unwrap();
    let left = a.next_calls(space, "d1", 10).await.unwrap();
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].call, r#"{"n":4}"#);
    let dead = a.dead_letters(space, "d1", 10).await.unwrap();
    assert_eq!(dead.len(), 2);
    assert_eq!(
        (dead[0].call.clone(), dead[0].attempts),
        (json!({"n": 2}), 2)
    );
    assert_eq!(
        (dead[1].call.clone(), dead[1].attempts),
        (json!({"n": 3}), 1)
    );
    assert_eq!(dead[1].profile_id, "p3");
    assert!(dead[0].error.starts_with("400"), "{}", dead[0].error);
    let st = a.destination_status(space, "d1").await.unwrap().unwrap();
    assert_eq!((st.pending, st.retrying, st.dead), (1, 0, 2));

    // Replay puts them back in their place, attempts reset.
    assert_eq!(a.replay(space, "d1").await.unwrap(), 2);
    let back = a.next_calls(space, "d1", 10).await.unwrap();
    let numbers: Vec<&str> = back.iter().map(|c| c.call.as_str()).collect();
    assert_eq!(numbers, [r#"{"n":2}"#, r#"{"n":3}"#, r#"{"n":4}"#]);
    assert!(back.iter().all(|c| c.attempts == 0));
    assert!(a.dead_letters(space, "d1", 10).await.unwrap().is_empty());

    // Delete takes the queue with it.
    assert!(a.delete_destination(space, "d1").await.unwrap());
    assert!(a.destination(space, "d1").await.unwrap().is_none());
    assert!(a.next_calls(space, "d1", 10).await.unwrap().is_empty());
    assert!(!a.delete_destination(space, "d1").await.unwrap());
}

async fn racing_puts<A: Destinations + 'static>(a: Arc<A>) {
    let puts = (0..12).map(|i| {
        let a = Arc::clone(&a);
        tokio::spawn(async move {
            a.put_destination(
                "race",
                "d",
                None,
                webhook(&format!("http://h/{i}")),
                Some(format!("s{i}").into()),
            )
            .await
            .unwrap()
        })
    });
    let results: Vec<_> = futures::future::join_all(puts)
        .await
        .into_iter()
        .map(|r| r.unwrap())
        .collect();
    assert_eq!(results.iter().filter(|(_, created)| *created).count(), 1);
    let versions: BTreeSet<u64> = results.iter().map(|(r, _)| r.version).collect();
    assert_eq!(
        versions,
        (1..=12).collect(),
        "each write saw its own version"
    );
}

/// 60 creates race for the 50 places of a space: exactly 50 win, the rest
/// are refused with the limit, and a delete frees a place.
async fn racing_creates_keep_the_destination_limit<A: Destinations + 'static>(a: Arc<A>) {
    let max = kindred_domain::sync::MAX_DESTINATIONS;
    let creates = (0..max + 10).map(|i| {
        let a = Arc::clone(&a);
        tokio::spawn(async move {
            a.put_destination(
                "limit",
                &format!("d{i}"),
                None,
                webhook("http://h/x"),
                Some("s".into()),
            )
            .await
        })
    });
    let results: Vec<_> = futures::future::join_all(creates)
        .await
        .into_iter()
        .map(|r| r.unwrap())
        .collect();
    let created = results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(created, max);
    for r in results.iter().filter(|r| r.is_err()) {
        match r {
            Err(StoreError::Invalid(m)) => assert!(m.contains("at most 50 destinations"), "{m}"),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(a.destinations("limit").await.unwrap().len(), max);
    let (winner, _) = results.iter().find_map(|r| r.as_ref().ok()).unwrap();
    assert!(a
        .delete_destination("limit", &winner.destination_id)
        .await
        .unwrap());
    a.put_destination(
        "limit",
        "again",
        None,
        webhook("http://h/x"),
        Some("s".into()),
    )
    .await
    .unwrap();
    let refused = a
        .put_destination(
            "limit",
            "one_more",
            None,
            webhook("http://h/x"),
            Some("s".into()),
        )
        .await;
    assert!(
        matches!(refused, Err(StoreError::Invalid(_))),
        "{refused:?}"
    );
}

fn sqlite() -> (tempfile::TempDir, Arc<SqliteStore>) {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path()).unwrap();
    (dir, store)
}

/// A fresh DynamoDB Local table with a secrets key, if the emulators run.
async fn dynamodb(test: &str) -> Option<Arc<kindred_aws::DynamoStore>> {
    if !emulators(test) {
        return None;
    }
    Some(Arc::new(
        fresh_dynamo().await.with_sealer(Sealer::from_key(&[9; 32])),
    ))
}

#[tokio::test]
async fn sqlite_destinations() {
    let (_dir, store) = sqlite();
    destinations_contract(&*store).await;
}

#[tokio::test]
async fn sqlite_outboxes() {
    let (_dir, store) = sqlite();
    outbox_contract(&*store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_racing_puts() {
    let (_dir, store) = sqlite();
    racing_puts(store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_racing_creates_keep_the_destination_limit() {
    let (_dir, store) = sqlite();
    racing_creates_keep_the_destination_limit(store).await;
}

#[tokio::test]
async fn dynamodb_destinations() {
    let Some(store) = dynamodb("dynamodb_destinations").await else {
        return;
    };
    destinations_contract(&*store).await;
}

#[tokio::test]
async fn dynamodb_outboxes() {
    let Some(store) = dynamodb("dynamodb_outboxes").await else {
        return;
    };
    outbox_contract(&*store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dynamodb_racing_puts() {
    let Some(store) = dynamodb("dynamodb_racing_puts").await else {
        return;
    };
    racing_puts(store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dynamodb_racing_creates_keep_the_destination_limit() {
    let Some(store) = dynamodb("dynamodb_racing_creates_keep_the_destination_limit").await else {
        return;
    };
    racing_creates_keep_the_destination_limit(store).await;
}

#[tokio::test]
async fn dynamodb_stores_destination_secrets_sealed() {
    let Some(store) = dynamodb("dynamodb_stores_destination_secrets_sealed").await else {
        return;
    };
    store
        .put_destination(
            "sealed",
            "d",
            None,
            webhook("http://h"),
            Some("whsec_plain".into()),
        )
        .await
        .unwrap();
    let target = store.target("sealed", "d").await.unwrap().unwrap();
    assert_eq!(
        target.secret.as_ref().map(|s| s.expose()),
        Some("whsec_plain")
    );
    let client = aws_sdk_dynamodb::Client::new(&kindred_tests::aws_config().await);
    let raw = client
        .get_item()
        .table_name(store.table())
        .key("pk", AttributeValue::S("SPACE#sealed".into()))
        .key("sk", AttributeValue::S("DEST#d".into()))
        .consistent_read(true)
        .send()
        .await
        .unwrap();
    let sealed = raw.item().unwrap()["secret"]
        .as_b()
        .unwrap()
        .as_ref()
        .to_vec();
    assert!(
        !sealed.windows(11).any(|w| w == b"whsec_plain"),
        "stored in the clear"
    );
}
