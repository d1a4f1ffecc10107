//! The identity worker drains the durable queue exactly once, and an event
//! that cannot be applied is set aside instead of blocking the others.

use kindred_sqlite::{IdentityWorker, SqliteQueue, SqliteStore};
mod common;

use common::queued;
use kindred_store::EventQueue;
use serde_json::json;

fn drain_with_retries(worker: &IdentityWorker, queue: &SqliteQueue) {
    for _ in 0..50 {
        let _ = worker.run_once();
        if worker.cursor().unwrap() >= queue.last_seq() {
            return;
        }
    }
    panic!("the worker did not get past the queue");
}

#[tokio::test]
async fn a_poisoned_event_is_dead_lettered_and_the_rest_applied_once() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path()).unwrap();
    let queue = SqliteQueue::open(dir.path()).unwrap();
    store.create_space("s").unwrap();
    let worker = IdentityWorker::new(store.clone(), queue.clone());
    queue
        .enqueue(vec![queued(
            "s",
            json!({"type": "identify", "userId": "bad", "messageId": "m0"}),
        )])
        .await
        .unwrap();
    worker.drain().unwrap();
    // Damage the stored profile so that any event for it fails to apply.
    let raw = rusqlite::Connection::open(dir.path().join("store.db")).unwrap();
    raw.execute(
        "UPDATE profiles SET identifiers = 'not json' WHERE space_id = 's'",
        [],
    )
    .unwrap();

    let batch = vec![
        queued(
            "s",
            json!({"type": "track", "event": "E", "userId": "u1", "messageId": "m1"}),
        ),
        queued(
            "s",
            json!({"type": "track", "event": "E", "userId": "bad", "messageId": "m2"}),
        ),
        queued(
            "s",
            json!({"type": "track", "event": "E", "userId": "u2", "messageId": "m3"}),
        ),
        queued(
            "s",
            json!({"type": "track", "event": "E", "userId": "u1", "messageId": "m1"}),
        ),
    ];
    queue.enqueue(batch).await.unwrap();
    drain_with_retries(&worker, &queue);

    let stats = worker.stats();
    assert_eq!(stats.dead_lettered, 1);
    assert_eq!(stats.duplicates, 1);
    let ids: Vec<String> = raw
        .prepare("SELECT message_id FROM events WHERE space_id = 's' ORDER BY seq")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(
        ids,
        ["m0", "m1", "m3"],
        "good events applied once, in order"
    );
    let (seq_body, error): (String, String) = raw
        .query_row("SELECT body, error FROM dead_letters", [], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .unwrap();
    assert!(
        seq_body.contains("\"m2\""),
        "the poisoned event is kept whole"
    );
    assert!(!error.is_empty());
}
