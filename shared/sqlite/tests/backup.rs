//! A restore numbers new events after what the copy of `store.db` has
//! applied, even when the queue's copy (taken first) ends before it.

mod common;

use kindred_sqlite::backup::{backup, restore};
use kindred_sqlite::{IdentityWorker, SqliteQueue, SqliteStore};
use kindred_store::{EventQueue, QueuedEvent};
use serde_json::json;

fn queued(n: usize) -> QueuedEvent {
    common::queued(
        "s",
        json!({"type": "identify", "userId": format!("u{n}"), "messageId": format!("m{n}")}),
    )
}

fn message_ids(dir: &std::path::Path) -> Vec<String> {
    let conn = rusqlite::Connection::open(dir.join("store.db")).unwrap();
    let mut stmt = conn
        .prepare("SELECT message_id FROM events ORDER BY message_id")
        .unwrap();
    let ids = stmt
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    ids
}

#[tokio::test]
async fn new_events_after_a_restore_come_after_everything_applied() {
    let live = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(live.path()).unwrap();
    let queue = SqliteQueue::open(live.path()).unwrap();
    store.create_space("s").unwrap();
    let worker = IdentityWorker::new(store.clone(), queue.clone());
    queue.enqueue((0..5).map(queued).collect()).await.unwrap();
    worker.drain().unwrap();

    let copies = tempfile::tempdir().unwrap();
    let snapshot = copies.path().join("snapshot");
    backup(live.path(), &snapshot).unwrap();
    // What a backup under load sees: after the queue's copy, more events
    // arrive and are applied before `store.db` is copied.
    queue.enqueue((5..9).map(queued).collect()).await.unwrap();
    worker.drain().unwrap();
    std::fs::remove_file(snapshot.join("store.db")).unwrap();
    let conn = rusqlite::Connection::open(live.path().join("store.db")).unwrap();
    conn.execute(
        "VACUUM INTO ?1",
        [snapshot.join("store.db").to_string_lossy()],
    )
    .unwrap();
    drop((worker, queue, store));

    let restored = copies.path().join("restored");
    restore(&snapshot, &restored).unwrap();
    let store = SqliteStore::open(&restored).unwrap();
    let queue = SqliteQueue::open(&restored).unwrap();
    let worker = IdentityWorker::new(store.clone(), queue.clone());
    worker.drain().unwrap();
    queue.enqueue(vec![queued(9)]).await.unwrap();
    worker.drain().unwrap();
    let ids = message_ids(&restored);
    assert_eq!(
        ids,
        (0..10).map(|n| format!("m{n}")).collect::<Vec<_>>(),
        "every event once, the one after the restore too"
    );
}

#[test]
fn a_restore_refuses_a_used_data_directory_and_a_non_backup() {
    let live = tempfile::tempdir().unwrap();
    SqliteStore::open(live.path()).unwrap();
    let copies = tempfile::tempdir().unwrap();
    let snapshot = copies.path().join("snapshot");
    backup(live.path(), &snapshot).unwrap();
    let used = restore(&snapshot, live.path()).unwrap_err().to_string();
    assert!(used.contains("is not empty"), "{used}");
    let not_backup = restore(live.path(), &copies.path().join("new"))
        .unwrap_err()
        .to_string();
    assert!(
        not_backup.contains("is not a Kindred backup"),
        "{not_backup}"
    );
    let again = backup(live.path(), &snapshot).unwrap_err().to_string();
    assert!(again.contains("is not empty"), "{again}");
}
