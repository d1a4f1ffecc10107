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

/// After a burst is applied, an idle worker's `settle` leaves no queue
/// rows, gives the queue's pages back to the file system and empties
/// `store.db`'s WAL; and the queue goes on numbering after the rebuild.
#[tokio::test]
async fn a_settled_burst_leaves_neither_queue_pages_nor_a_wal_behind() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path()).unwrap();
    let queue = SqliteQueue::open(dir.path()).unwrap();
    store.create_space("s").unwrap();
    let worker = IdentityWorker::new(store.clone(), queue.clone());
    // Padding that does not compress (the queue holds bodies
    // compressed): ~1 KB of it in every event.
    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
    let mut padding = || {
        (0..128)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                format!("{:016x}", state)
            })
            .collect::<String>()
    };
    for batch in 0..40 {
        let events = (0..1_000)
            .map(|i| {
                queued(
                    "s",
                    json!({"type": "track", "event": "E", "userId": format!("u{}", i % 50),
                           "messageId": format!("m{batch}-{i}"), "properties": {"p": padding()}}),
                )
            })
            .collect();
        queue.enqueue(events).await.unwrap();
    }
    let size = |name: &str| {
        std::fs::metadata(dir.path().join(name))
            .map(|m| m.len())
            .unwrap_or(0)
    };
    assert!(size("queue.db") + size("queue.db-wal") > 40_000_000);
    worker.drain().unwrap();
    assert!(size("store.db-wal") > 0, "the burst went through the WAL");
    let last = queue.last_seq();

    worker.settle().unwrap();
    // The queue's writer thread truncates; wait for it.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !queue.read_after(0, 1).unwrap().is_empty()
        || size("queue.db") > 4_000_000
        || size("queue.db-wal") > 0
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the queue was not reclaimed"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(size("store.db-wal"), 0, "the store's WAL checkpointed away");
    assert_eq!(
        store.audit("s").unwrap().events.len(),
        40_000,
        "every event still applied"
    );

    queue
        .enqueue(vec![queued(
            "s",
            json!({"type": "track", "event": "E", "userId": "u1", "messageId": "after"}),
        )])
        .await
        .unwrap();
    assert_eq!(
        queue.last_seq(),
        last + 1,
        "numbering goes on past the rebuild"
    );
    worker.drain().unwrap();
    assert_eq!(store.audit("s").unwrap().events.len(), 40_001);
}

/// The profile event `message_id` was recorded on.
fn profile_of(raw: &rusqlite::Connection, message_id: &str) -> String {
    raw.query_row(
        "SELECT profile_id FROM events WHERE space_id = 's' AND message_id = ?1",
        [message_id],
        |r| r.get(0),
    )
    .unwrap()
}

/// The worker keeps the resolved graph between batches: a split and an
/// identifier removal made through the store between two batches must be
/// what the next batch resolves against, not the worker's copy.
#[tokio::test]
async fn the_worker_resolves_against_a_split_and_a_removal_made_between_its_batches() {
    use kindred_store::privacy::{Privacy, SplitOutcome};
    use kindred_store::ProfileLookup;
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path()).unwrap();
    let queue = SqliteQueue::open(dir.path()).unwrap();
    store.create_space("s").unwrap();
    let worker = IdentityWorker::new(store.clone(), queue.clone());
    let raw = rusqlite::Connection::open(dir.path().join("store.db")).unwrap();
    let send = |body: serde_json::Value| {
        let queue = queue.clone();
        let worker = worker.clone();
        async move {
            queue.enqueue(vec![queued("s", body)]).await.unwrap();
            worker.drain().unwrap();
        }
    };
    send(json!({"type": "identify", "userId": "u1", "anonymousId": "a1", "messageId": "m1"})).await;
    send(json!({"type": "track", "event": "E", "anonymousId": "a2", "messageId": "m2"})).await;
    // a2's profile merges into u1's.
    send(json!({"type": "identify", "userId": "u1", "anonymousId": "a2", "messageId": "m3"})).await;
    let (u1s, a2s) = (profile_of(&raw, "m1"), profile_of(&raw, "m2"));
    assert_ne!(u1s, a2s);
    let parent = profile_of(&raw, "m3");
    let child = if parent == u1s { &a2s } else { &u1s };
    send(json!({"type": "track", "event": "E", "anonymousId": "a2", "messageId": "m4"})).await;
    assert_eq!(
        profile_of(&raw, "m4"),
        parent,
        "merged: a2's events go to the root"
    );

    let user = |v: &str, kind: &str| kindred_domain::Identifier {
        kind: kind.into(),
        value: v.into(),
    };
    let split = store
        .split("s", &ProfileLookup::ProfileId(parent.clone()), child)
        .await
        .unwrap();
    assert!(matches!(split, SplitOutcome::Split { .. }), "{split:?}");
    send(json!({"type": "track", "event": "E", "anonymousId": "a2", "messageId": "m5"})).await;
    assert_eq!(
        profile_of(&raw, "m5"),
        a2s,
        "split: a2 is its first profile's again"
    );

    let removed = store
        .remove_identifiers(
            "s",
            &ProfileLookup::Identifier(user("u1", "user_id")),
            &[user("a1", "anonymous_id")],
        )
        .await
        .unwrap();
    assert_eq!(removed, Some(vec![user("a1", "anonymous_id")]));
    send(json!({"type": "track", "event": "E", "anonymousId": "a1", "messageId": "m6"})).await;
    let fresh = profile_of(&raw, "m6");
    assert!(
        fresh != u1s && fresh != a2s,
        "a1 was free again: a new profile"
    );
}
