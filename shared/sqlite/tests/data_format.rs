//! Data directories across Kindred versions: one written before event
//! bodies were compressed opens, reads as before and goes on (new events
//! compressed); one written by a newer Kindred is refused, with a message
//! that says what to do, before anything in it changes.

use kindred_sqlite::{IdentityWorker, SqliteQueue, SqliteStore, DATA_FORMAT};
mod common;

use common::queued;
use kindred_store::EventQueue;
use serde_json::json;

fn bodies(store: &SqliteStore) -> Vec<(String, String)> {
    let audit = store.audit("s").unwrap();
    audit
        .events
        .into_iter()
        .map(|e| (e.message_id, e.body))
        .collect()
}

/// The one text column `sql` selects, row by row.
fn strings(raw: &rusqlite::Connection, sql: &str) -> Vec<String> {
    raw.prepare(sql)
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

/// How each stored event's body is kept (`text` or `blob`).
fn kinds(raw: &rusqlite::Connection) -> Vec<String> {
    strings(raw, "SELECT typeof(body) FROM events ORDER BY seq")
}

#[tokio::test]
async fn a_data_directory_from_before_compression_reads_and_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let before = {
        let store = SqliteStore::open(dir.path()).unwrap();
        let queue = SqliteQueue::open(dir.path()).unwrap();
        store.create_space("s").unwrap();
        let worker = IdentityWorker::new(store.clone(), queue.clone());
        let events = (0..3)
            .map(|i| {
                queued(
                    "s",
                    json!({"type": "track", "event": "Signed In", "userId": "u1",
                           "messageId": format!("m{i}"), "properties": {"i": i}}),
                )
            })
            .collect();
        queue.enqueue(events).await.unwrap();
        worker.drain().unwrap();
        bodies(&store)
    };
    assert_eq!(before.len(), 3);
    let raw = rusqlite::Connection::open(dir.path().join("store.db")).unwrap();
    assert_eq!(kinds(&raw), ["blob"; 3], "stored compressed");

    // The directory as the build before the format marker wrote it.
    for (message_id, body) in &before {
        raw.execute(
            "UPDATE events SET body = ?1 WHERE message_id = ?2",
            [body, message_id],
        )
        .unwrap();
    }
    raw.pragma_update(None, "user_version", 0).unwrap();
    assert_eq!(kinds(&raw), ["text"; 3]);

    let store = SqliteStore::open(dir.path()).unwrap();
    let queue = SqliteQueue::open(dir.path()).unwrap();
    assert_eq!(bodies(&store), before, "older bodies read as they are");
    let format: i64 = raw
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    assert_eq!(format, DATA_FORMAT, "the directory is marked upgraded");

    let worker = IdentityWorker::new(store.clone(), queue.clone());
    queue
        .enqueue(vec![queued(
            "s",
            json!({"type": "track", "event": "Signed In", "userId": "u1", "messageId": "m3"}),
        )])
        .await
        .unwrap();
    worker.drain().unwrap();
    let after = bodies(&store);
    assert_eq!(&after[..3], &before[..], "older events unchanged");
    assert!(after[3].1.contains("\"m3\""), "{:?}", after[3]);
    assert_eq!(kinds(&raw), ["text", "text", "text", "blob"]);
}

#[test]
fn a_data_directory_from_a_newer_kindred_is_refused_before_anything_is_created() {
    let dir = tempfile::tempdir().unwrap();
    let raw = rusqlite::Connection::open(dir.path().join("store.db")).unwrap();
    raw.pragma_update(None, "user_version", DATA_FORMAT + 1)
        .unwrap();
    let refused = SqliteStore::open(dir.path()).err().expect("refused");
    let message = refused.to_string();
    assert!(message.contains("newer Kindred"), "{message}");
    assert!(message.contains("kindred restore"), "{message}");
    let tables: i64 = raw
        .query_row("SELECT count(*) FROM sqlite_master", [], |r| r.get(0))
        .unwrap();
    assert_eq!(tables, 0, "nothing created in it");
}

#[tokio::test]
async fn a_queue_from_before_format_2_is_applied_and_new_entries_are_compressed() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = SqliteStore::open(dir.path()).unwrap();
        store.create_space("s").unwrap();
        SqliteQueue::open(dir.path()).unwrap();
    }
    // An entry as format 1 queued it: the event's JSON as text, not yet
    // applied when that build stopped.
    let old = queued(
        "s",
        json!({"type": "identify", "userId": "u1", "messageId": "m-old",
               "traits": {"plan": "pro"}}),
    );
    let queue_db = rusqlite::Connection::open(dir.path().join("queue.db")).unwrap();
    queue_db
        .execute(
            "INSERT INTO queue (space_id, source_id, body) VALUES (?1, ?2, ?3)",
            [&old.space_id, &old.source_id, &old.body],
        )
        .unwrap();
    let raw = rusqlite::Connection::open(dir.path().join("store.db")).unwrap();
    raw.pragma_update(None, "user_version", 1).unwrap();

    let store = SqliteStore::open(dir.path()).unwrap();
    let queue = SqliteQueue::open(dir.path()).unwrap();
    let format: i64 = raw
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    assert_eq!(format, DATA_FORMAT);
    queue
        .enqueue(vec![queued(
            "s",
            json!({"type": "track", "event": "Signed In", "userId": "u1", "messageId": "m-new"}),
        )])
        .await
        .unwrap();
    assert_eq!(
        strings(&queue_db, "SELECT typeof(body) FROM queue ORDER BY seq"),
        ["text", "blob"],
        "new entries queued compressed"
    );

    IdentityWorker::new(store.clone(), queue.clone())
        .drain()
        .unwrap();
    let events = bodies(&store);
    assert_eq!(events.len(), 2, "{events:?}");
    assert_eq!(events[0].0, "m-old");
    assert!(events[0].1.contains("\"plan\":\"pro\""), "{:?}", events[0]);
    assert_eq!(events[1].0, "m-new");
    assert!(events[1].1.contains("\"Signed In\""), "{:?}", events[1]);
    assert_eq!(kinds(&raw), ["blob", "blob"], "both stored compressed");
}
