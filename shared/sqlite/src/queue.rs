//! The durable local queue (`queue.db`): an append-only log of accepted
//! events. One writer thread appends with group commit (every request
//! waiting at that moment shares one fsync'd transaction) and answers each
//! request only after its commit. Consumers read after a cursor that they
//! store atomically with their own work, so a crash anywhere replays
//! exactly what was not yet processed; truncation removes only what every
//! consumer has passed.

use std::path::Path;
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use rusqlite::types::ValueRef;
use rusqlite::{params, Connection, OptionalExtension};
use tokio::sync::oneshot;
use tracing::error;

use super::body::{decode, encode, received_at, StoredBody};
use super::{lock, open, open_reader, Durability};
use kindred_store::ports::{EventQueue, QueuedEvent};
use kindred_store::{Result, StoreError};

/// The queue is fsynced on every commit: an event is acknowledged only
/// once it is on disk, so not even a power loss undoes an acknowledgement.
/// (A SIGKILL keeps the page cache, so no crash test would notice a
/// weaker setting: the test below pins it.)
const QUEUE_DURABILITY: Durability = Durability::Full;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS queue (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    space_id TEXT NOT NULL,
    source_id TEXT NOT NULL,
    body TEXT NOT NULL
);";
// `body` holds the event compressed as `store.db` keeps it (a BLOB,
// [`crate::body`]) since data format 2; entries queued by an older build
// are JSON text, and both are read.

/// Requests waiting together are committed in one transaction, up to this
/// many events.
const GROUP_COMMIT_EVENTS: usize = 20_000;

#[derive(Clone, Debug, PartialEq)]
pub struct QueueEntry {
    pub seq: i64,
    pub event: QueuedEvent,
}

/// A queue entry as `queue.db` holds it: the body still in its stored
/// form, decoded only when it is about to be applied, so a large batch
/// does not hold every body twice.
pub(crate) struct StoredEntry {
    pub seq: i64,
    pub space_id: String,
    pub source_id: String,
    body: StoredForm,
}

enum StoredForm {
    /// Compressed as `store.db` keeps it ([`crate::body`]): `store.db`
    /// takes these bytes as they are.
    Compressed(Vec<u8>),
    /// JSON text, as a build before data format 2 queued it.
    Json(String),
}

impl StoredEntry {
    /// The event's JSON.
    pub fn json(&self) -> Result<String> {
        match &self.body {
            StoredForm::Compressed(bytes) => decode(bytes).map_err(StoreError::Undecodable),
            StoredForm::Json(json) => Ok(json.clone()),
        }
    }

    /// The body already compressed, if the queue holds it so.
    pub fn compressed(&self) -> Option<&[u8]> {
        match &self.body {
            StoredForm::Compressed(bytes) => Some(bytes),
            StoredForm::Json(_) => None,
        }
    }

    pub fn decoded(self) -> Result<QueueEntry> {
        let body = match self.body {
            StoredForm::Compressed(bytes) => decode(&bytes).map_err(StoreError::Undecodable)?,
            StoredForm::Json(json) => json,
        };
        Ok(QueueEntry {
            seq: self.seq,
            event: QueuedEvent {
                space_id: self.space_id,
                source_id: self.source_id,
                body,
            },
        })
    }
}

enum Command {
    Append(Vec<QueuedEvent>, oneshot::Sender<Result<()>>),
    Truncate(i64),
}

pub struct SqliteQueue {
    commands: Mutex<mpsc::Sender<Command>>,
    reader: Mutex<Connection>,
    last_seq: Arc<LastSeq>,
}

/// The highest committed sequence number, and a way to wait for it to grow.
#[derive(Default)]
struct LastSeq {
    seq: Mutex<i64>,
    grew: Condvar,
}

impl SqliteQueue {
    pub fn open(dir: &Path) -> Result<Arc<Self>> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join("queue.db");
        let writer = open(&path, QUEUE_DURABILITY)?;
        writer.execute_batch(SCHEMA)?;
        let last: i64 =
            writer.query_row("SELECT COALESCE(MAX(seq), 0) FROM queue", [], |r| r.get(0))?;
        let reader = open_reader(&path)?;
        let (commands, rx) = mpsc::channel();
        let last_seq = Arc::new(LastSeq {
            seq: Mutex::new(last),
            grew: Condvar::new(),
        });
        {
            let last_seq = Arc::clone(&last_seq);
            std::thread::Builder::new()
                .name("kindred-queue-writer".into())
                .spawn(move || {
                    // Appending is ingest work, compression included.
                    kindred_store::priority::lower_to(
                        "queue writer",
                        kindred_store::priority::INGEST,
                    );
                    writer_loop(writer, rx, last_seq)
                })?;
        }
        Ok(Arc::new(Self {
            commands: Mutex::new(commands),
            reader: Mutex::new(reader),
            last_seq,
        }))
    }

    /// Up to `max` entries after `after`, in order.
    pub fn read_after(&self, after: i64, max: usize) -> Result<Vec<QueueEntry>> {
        self.read_stored_after(after, max)?
            .into_iter()
            .map(StoredEntry::decoded)
            .collect()
    }

    /// Up to `max` entries after `after`, in order, bodies as stored.
    pub(crate) fn read_stored_after(&self, after: i64, max: usize) -> Result<Vec<StoredEntry>> {
        let conn = lock(&self.reader);
        let mut stmt = conn.prepare_cached(
            "SELECT seq, space_id, source_id, body FROM queue WHERE seq > ?1 ORDER BY seq LIMIT ?2",
        )?;
        let rows = stmt.query_map(params![after, max as i64], |r| {
            let body = match r.get_ref(3)? {
                ValueRef::Blob(blob) => StoredForm::Compressed(blob.to_vec()),
                _ => StoredForm::Json(r.get(3)?),
            };
            Ok(StoredEntry {
                seq: r.get(0)?,
                space_id: r.get(1)?,
                source_id: r.get(2)?,
                body,
            })
        })?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    }

    /// The sequence number of the last of up to `max` entries after `after`.
    pub(crate) fn last_of(&self, after: i64, max: usize) -> Result<Option<i64>> {
        Ok(lock(&self.reader)
            .prepare_cached(
                "SELECT max(seq) FROM (SELECT seq FROM queue WHERE seq > ?1 ORDER BY seq LIMIT ?2)",
            )?
            .query_row(params![after, max as i64], |r| r.get(0))?)
    }

    /// Removes every entry up to and including `seq` (all consumers are past it).
    pub fn truncate_through(&self, seq: i64) {
        let _ = lock(&self.commands).send(Command::Truncate(seq));
    }

    /// The highest committed sequence number.
    /// Deletes the entries through `seq` now (all consumers must have
    /// passed it and made that durable): a regulation clears the queue of
    /// the events of a person it deleted.
    pub fn truncate_now(&self, seq: i64) -> Result<()> {
        lock(&self.reader).execute("DELETE FROM queue WHERE seq <= ?1", [seq])?;
        Ok(())
    }

    pub fn last_seq(&self) -> i64 {
        *lock(&self.last_seq.seq)
    }

    /// When Kindred received the oldest entry after `after` (its body's
    /// `receivedAt`), if there is one.
    pub fn oldest_after(&self, after: i64) -> Result<Option<i64>> {
        let conn = lock(&self.reader);
        // A body that cannot be read has no time to tell (the worker
        // sets its entry aside); the lag is then reported without an age.
        let body: Option<StoredBody> = conn
            .prepare_cached("SELECT body FROM queue WHERE seq > ?1 ORDER BY seq LIMIT 1")?
            .query_row([after], |r| Ok(r.get(0).ok()))
            .optional()?
            .flatten();
        Ok(body
            .and_then(|StoredBody(json)| received_at(&json))
            .and_then(|r| kindred_domain::event::parse_time(&r)))
    }

    /// Blocks until an entry after `after` is committed or `timeout` passes;
    /// returns the highest committed sequence number.
    pub fn wait_after(&self, after: i64, timeout: Duration) -> i64 {
        let guard = lock(&self.last_seq.seq);
        let (guard, _) = self
            .last_seq
            .grew
            .wait_timeout_while(guard, timeout, |seq| *seq <= after)
            .unwrap_or_else(|p| p.into_inner());
        *guard
    }
}

#[async_trait]
impl EventQueue for SqliteQueue {
    async fn enqueue(&self, events: Vec<QueuedEvent>) -> Result<()> {
        if events.is_empty() {
            return Ok(());
        }
        let (done, wait) = oneshot::channel();
        lock(&self.commands)
            .send(Command::Append(events, done))
            .map_err(|_| StoreError::Closed)?;
        wait.await.map_err(|_| StoreError::Closed)?
    }
}

fn writer_loop(mut conn: Connection, rx: mpsc::Receiver<Command>, last_seq: Arc<LastSeq>) {
    while let Ok(first) = rx.recv() {
        let mut appends = Vec::new();
        let mut truncate = None;
        let mut pending = 0;
        let mut take = |cmd: Command, appends: &mut Vec<_>, pending: &mut usize| match cmd {
            Command::Append(events, done) => {
                *pending += events.len();
                appends.push((events, done));
            }
            Command::Truncate(seq) => truncate = Some(seq),
        };
        take(first, &mut appends, &mut pending);
        while pending < GROUP_COMMIT_EVENTS {
            match rx.try_recv() {
                Ok(cmd) => take(cmd, &mut appends, &mut pending),
                Err(_) => break,
            }
        }
        if !appends.is_empty() {
            let result = append_all(&mut conn, &appends);
            match &result {
                Ok(last) => {
                    *lock(&last_seq.seq) = *last;
                    last_seq.grew.notify_all();
                }
                Err(e) => error!(error = %e, "queue append failed"),
            }
            for (_, done) in appends {
                let _ = done.send(match &result {
                    Ok(_) => Ok(()),
                    Err(_) => Err(StoreError::Closed),
                });
            }
        }
        if let Some(seq) = truncate {
            if let Err(e) = truncate_and_reclaim(&conn, seq) {
                error!(error = %e, "queue truncation failed");
            }
        }
    }
}

/// Free pages in `queue.db` beyond which an emptied queue gives them back.
const RECLAIM_BYTES: i64 = 16 << 20;

/// Deletes the entries through `seq`. When that empties the queue and
/// it holds more than [`RECLAIM_BYTES`] of free pages (a burst that has
/// been applied), the file is rebuilt (cheap: nothing is left in it) and
/// its WAL emptied, so the space goes back to the file system instead of
/// staying in `queue.db` for the next burst.
fn truncate_and_reclaim(conn: &Connection, seq: i64) -> Result<()> {
    conn.execute("DELETE FROM queue WHERE seq <= ?1", [seq])?;
    let (empty, free): (bool, i64) = conn.query_row(
        "SELECT NOT EXISTS (SELECT 1 FROM queue),
                (SELECT freelist_count FROM pragma_freelist_count)
                  * (SELECT page_size FROM pragma_page_size)",
        [],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    if empty && free > RECLAIM_BYTES {
        // VACUUM keeps AUTOINCREMENT's high-water mark (sqlite_sequence),
        // so sequence numbers still only grow.
        conn.execute_batch("VACUUM")?;
        conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?;
    }
    Ok(())
}

type Pending = (Vec<QueuedEvent>, oneshot::Sender<Result<()>>);

fn append_all(conn: &mut Connection, appends: &[Pending]) -> Result<i64> {
    // Compressed before the transaction opens, on this thread (below the
    // Profile API's priority), and once: the identity worker stores these
    // bytes as they are.
    let encoded = appends
        .iter()
        .flat_map(|(events, _)| events)
        .map(|e| Ok((e, encode(&e.body)?)))
        .collect::<Result<Vec<_>>>()?;
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    {
        let mut stmt =
            tx.prepare_cached("INSERT INTO queue (space_id, source_id, body) VALUES (?1, ?2, ?3)")?;
        for (e, body) in &encoded {
            stmt.execute(params![e.space_id, e.source_id, body])?;
        }
    }
    let last = tx.last_insert_rowid();
    tx.commit()?;
    Ok(last)
}

#[cfg(test)]
mod durability {
    use super::*;

    #[test]
    fn the_queue_syncs_every_commit() {
        assert!(matches!(QUEUE_DURABILITY, Durability::Full));
        let dir = tempfile::tempdir().unwrap();
        let conn = open(&dir.path().join("queue.db"), QUEUE_DURABILITY).unwrap();
        let synchronous: i64 = conn
            .query_row("PRAGMA synchronous", [], |r| r.get(0))
            .unwrap();
        assert_eq!(synchronous, 2, "synchronous=FULL");
    }
}
