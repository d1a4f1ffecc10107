//! The embedded adapters: one SQLite database for the store (`store.db`)
//! and one for the durable queue (`queue.db`), both in WAL mode.
//!
//! SQLite (through `rusqlite` with the bundled library) was chosen over
//! `redb` because it gives real multi-statement ACID transactions with
//! savepoints, secondary indexes and ordered range scans out of the box,
//! a single well-understood file format, and it lets the adapter express
//! DynamoDB's conditional writes directly as `UPDATE ... WHERE version = ?`
//! and primary-key inserts.

mod audit;
pub mod backup;
mod body;
mod compute;
mod graph;
mod health;
mod parallel;
mod privacy;
mod profiles;
mod queue;
mod spaces;
mod sync;
mod worker;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Instant;

use rusqlite::Connection;

pub use audit::{AuditEvent, GraphAudit};
pub use compute::{ComputeStats, ComputeWorker};
pub use graph::{OptimisticGraph, TxGraph};
pub use health::{describe, supervise, Lag, WorkerHealth, WorkerState};
pub use queue::{QueueEntry, SqliteQueue};
pub use sync::{FanOut, SyncWorker};
pub use worker::{IdentityWorker, WorkerStats};

use kindred_store::Result;

const STORE_SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS spaces (
    space_id TEXT PRIMARY KEY,
    source_id TEXT NOT NULL,
    settings TEXT NOT NULL,
    settings_version INTEGER NOT NULL,
    created_at INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS tokens (
    token_id TEXT PRIMARY KEY,
    hash BLOB NOT NULL,
    space_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    revoked_at INTEGER,
    label TEXT
) WITHOUT ROWID;
-- The explorer's browser sessions: the hash of a session's random id
-- (the browser holds the id), the token it was started with, until when.
CREATE TABLE IF NOT EXISTS ui_sessions (
    id_hash BLOB PRIMARY KEY,
    token_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    expires_at INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS profiles (
    space_id TEXT NOT NULL,
    profile_id TEXT NOT NULL,
    parent_id TEXT,
    version INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    first_message_id TEXT NOT NULL,
    last_message_id TEXT NOT NULL,
    merges INTEGER NOT NULL,
    identifiers TEXT NOT NULL,
    traits TEXT NOT NULL,
    PRIMARY KEY (space_id, profile_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS profiles_by_parent ON profiles (space_id, parent_id) WHERE parent_id IS NOT NULL;
CREATE TABLE IF NOT EXISTS identifiers (
    space_id TEXT NOT NULL,
    id_type TEXT NOT NULL,
    id_value TEXT NOT NULL,
    profile_id TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    first_message_id TEXT NOT NULL,
    source_id TEXT NOT NULL,
    encoding TEXT NOT NULL,
    PRIMARY KEY (space_id, id_type, id_value)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY,
    space_id TEXT NOT NULL,
    profile_id TEXT,
    ts INTEGER NOT NULL,
    message_id TEXT NOT NULL,
    name TEXT,
    body TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_by_profile ON events (space_id, profile_id, ts);
CREATE TABLE IF NOT EXISTS messages (
    space_id TEXT NOT NULL,
    message_id TEXT NOT NULL,
    seen_at INTEGER NOT NULL,
    PRIMARY KEY (space_id, message_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS merges (
    space_id TEXT NOT NULL,
    child_id TEXT NOT NULL,
    parent_id TEXT NOT NULL,
    message_id TEXT NOT NULL,
    merged_at INTEGER NOT NULL,
    PRIMARY KEY (space_id, parent_id, child_id)
) WITHOUT ROWID;
-- Every merge in commit order, for the sync step's `alias` calls (rows
-- are never deleted, so sequence numbers only grow).
CREATE TABLE IF NOT EXISTS merge_log (
    seq INTEGER PRIMARY KEY,
    space_id TEXT NOT NULL,
    child_id TEXT NOT NULL,
    parent_id TEXT NOT NULL,
    merged_at INTEGER NOT NULL
);
-- Identifiers new to Kindred that an existing profile gained, for the
-- sync step (destinations send them the profile's current values); rows
-- older than a week are pruned.
CREATE TABLE IF NOT EXISTS identifier_log (
    seq INTEGER PRIMARY KEY,
    space_id TEXT NOT NULL,
    profile_id TEXT NOT NULL,
    identifiers TEXT NOT NULL,
    at INTEGER NOT NULL
);
-- Accounts (kindred_domain::account), written with the events that name
-- them: the account as JSON, its events (by events.seq) and its users.
CREATE TABLE IF NOT EXISTS accounts (
    space_id TEXT NOT NULL,
    group_id TEXT NOT NULL,
    account TEXT NOT NULL,
    PRIMARY KEY (space_id, group_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS account_events (
    space_id TEXT NOT NULL,
    group_id TEXT NOT NULL,
    ts INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    PRIMARY KEY (space_id, group_id, ts, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS account_users (
    space_id TEXT NOT NULL,
    group_id TEXT NOT NULL,
    profile_id TEXT NOT NULL,
    PRIMARY KEY (space_id, group_id, profile_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS links (
    space_id TEXT NOT NULL,
    profile_id TEXT NOT NULL,
    group_id TEXT NOT NULL,
    linked_at INTEGER NOT NULL,
    message_id TEXT NOT NULL,
    PRIMARY KEY (space_id, profile_id, group_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS dead_letters (
    seq INTEGER PRIMARY KEY,
    space_id TEXT NOT NULL,
    source_id TEXT NOT NULL,
    body TEXT NOT NULL,
    error TEXT NOT NULL,
    failed_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS cursors (
    name TEXT PRIMARY KEY,
    seq INTEGER NOT NULL
) WITHOUT ROWID;
";

/// How durable a connection's commits are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Durability {
    /// fsync on every commit: an acknowledged event survives power loss.
    Full,
    /// fsync at checkpoints only: survives a process crash; what a power
    /// loss could undo is re-derived from the fully durable queue.
    Normal,
}

/// Page cache per connection: the writer keeps the hot graph in memory;
/// readers share the OS page cache and stay small, since there may be many.
const WRITER_CACHE_KIB: i64 = 65_536;
const READER_CACHE_KIB: i64 = 8_192;
/// Database pages are read through a memory map (up to this much of each
/// file): a page that is not in a connection's cache is then a memory
/// read, not a system call and a copy. Mapped pages count in the
/// process's RSS (a 1 GiB map took the 1M-event run's RSS to 880 MB).
const MMAP_BYTES: i64 = 64 << 20;
/// `store.db`'s WAL is checkpointed into the database every this many
/// pages (1 GiB of 16 KiB pages): a page that many transactions rewrite
/// is copied into the database once per checkpoint instead of once per
/// few transactions. The idle worker empties the WAL after a burst.
const STORE_CHECKPOINT_PAGES: i64 = 65_536;
/// Idle read connections kept for reuse.
const MAX_IDLE_READERS: usize = 16;

/// How long a connection waits for another's lock before failing.
pub(crate) const BUSY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);
/// A WAL that a checkpoint has emptied is cut back to this size, so a
/// burst does not leave a WAL file at its largest behind it.
const WAL_KEPT_BYTES: i64 = 16 << 20;

pub(crate) fn open(path: &Path, durability: Durability) -> Result<Connection> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    // Larger pages: fewer B-tree levels and page fetches per lookup (takes
    // effect when the database file is created).
    conn.pragma_update(None, "page_size", 16_384)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(
        None,
        "synchronous",
        match durability {
            Durability::Full => "FULL",
            Durability::Normal => "NORMAL",
        },
    )?;
    conn.pragma_update(None, "cache_size", -WRITER_CACHE_KIB)?;
    conn.pragma_update(None, "mmap_size", MMAP_BYTES)?;
    conn.pragma_update(None, "temp_store", "MEMORY")?;
    // Fewer, larger checkpoints: pages rewritten between two are written once.
    conn.pragma_update(None, "wal_autocheckpoint", 8192)?;
    conn.pragma_update(None, "journal_size_limit", WAL_KEPT_BYTES)?;
    conn.set_prepared_statement_cache_capacity(64);
    Ok(conn)
}

pub(crate) fn open_reader(path: &Path) -> Result<Connection> {
    let conn = open(path, Durability::Normal)?;
    conn.pragma_update(None, "cache_size", -READER_CACHE_KIB)?;
    Ok(conn)
}

/// The embedded store: a writer connection and a pool of readers.
pub struct SqliteStore {
    /// Lets `&self` methods hand an owned handle to blocking tasks.
    me: Weak<SqliteStore>,
    path: PathBuf,
    compute_path: PathBuf,
    writer: Mutex<Connection>,
    /// The writer of `compute.db` (computed traits and audiences).
    compute_writer: Mutex<Connection>,
    /// The writer of `sync.db` (destinations and their outboxes).
    sync_writer: Mutex<Connection>,
    /// Seals destination secrets (key in `secrets.key`).
    sealer: kindred_store::secret::Sealer,
    sync_path: PathBuf,
    sync_readers: Mutex<Vec<Connection>>,
    readers: Mutex<Vec<Connection>>,
    /// Recently verified tokens, keyed by the SHA-256 of the secret.
    auth_cache: Mutex<HashMap<[u8; 32], (kindred_store::SpaceAuth, Instant)>>,
    /// Bumped (under the cache's lock) whenever cached verdicts may have
    /// gone stale: a lookup that started before is not cached.
    auth_generation: std::sync::atomic::AtomicU64,
    /// Held while regulations run: one runner at a time.
    regulation_runner: Mutex<()>,
    /// The queue the identity worker applies (set by the composition):
    /// a regulation clears the person's applied events from it.
    queue: std::sync::OnceLock<Arc<SqliteQueue>>,
}

/// A pooled read connection, returned to its pool on drop.
pub(crate) struct Reader<'a> {
    pool: &'a Mutex<Vec<Connection>>,
    conn: Option<Connection>,
}

impl std::ops::Deref for Reader<'_> {
    type Target = Connection;
    fn deref(&self) -> &Connection {
        self.conn.as_ref().expect("present until drop")
    }
}

impl Drop for Reader<'_> {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            let mut idle = lock(self.pool);
            if idle.len() < MAX_IDLE_READERS {
                idle.push(conn);
            }
        }
    }
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock leaves SQLite consistent (the
    // transaction rolls back on drop), so the poison flag carries no meaning.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl SqliteStore {
    /// Opens (creating if needed) the store in `dir`.
    pub fn open(dir: &Path) -> Result<Arc<Self>> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join("store.db");
        let writer = open(&path, Durability::Normal)?;
        upgrade(&writer)?;
        writer.pragma_update(None, "wal_autocheckpoint", STORE_CHECKPOINT_PAGES)?;
        writer.execute_batch(STORE_SCHEMA)?;
        writer.execute_batch(privacy::SCHEMA)?;
        // Data directories from before token labels.
        add_column_if_missing(&writer, "tokens", "label", "TEXT")?;
        let compute_path = dir.join("compute.db");
        let compute_writer = open(&compute_path, Durability::Normal)?;
        compute_writer.execute_batch(compute::SCHEMA)?;
        compute::migrate(&compute_writer)?;
        compute_writer.execute("ATTACH DATABASE ?1 AS s", [path.to_string_lossy()])?;
        // An attached database has its own page cache and memory map, which
        // start at SQLite's defaults (2 MB, none): the compute writer reads
        // the profiles on every step.
        compute_writer.pragma_update(Some("s"), "cache_size", -WRITER_CACHE_KIB)?;
        compute_writer.pragma_update(Some("s"), "mmap_size", MMAP_BYTES)?;
        let sync_writer = sync::open_writer(dir, &path, &compute_path)?;
        let sealer = kindred_store::secret::Sealer::load_or_create(&dir.join("secrets.key"))?;
        Ok(Arc::new_cyclic(|me| Self {
            me: me.clone(),
            path,
            compute_path,
            writer: Mutex::new(writer),
            compute_writer: Mutex::new(compute_writer),
            sync_writer: Mutex::new(sync_writer),
            sealer,
            sync_path: dir.join("sync.db"),
            sync_readers: Mutex::new(Vec::new()),
            readers: Mutex::new(Vec::new()),
            auth_cache: Mutex::new(HashMap::new()),
            auth_generation: std::sync::atomic::AtomicU64::new(0),
            regulation_runner: Mutex::new(()),
            queue: std::sync::OnceLock::new(),
        }))
    }

    /// Tells the store which queue its identity worker applies.
    pub fn attach_queue(&self, queue: Arc<SqliteQueue>) {
        let _ = self.queue.set(queue);
    }

    pub(crate) fn reader(&self) -> Result<Reader<'_>> {
        let pooled = lock(&self.readers).pop();
        let conn = match pooled {
            Some(c) => c,
            None => {
                let conn = open_reader(&self.path)?;
                conn.execute(
                    "ATTACH DATABASE ?1 AS c",
                    [self.compute_path.to_string_lossy()],
                )?;
                conn.pragma_update(Some("c"), "cache_size", -READER_CACHE_KIB)?;
                conn.pragma_update(Some("c"), "mmap_size", MMAP_BYTES)?;
                compute::register_holds(&conn)?;
                conn
            }
        };
        Ok(Reader {
            pool: &self.readers,
            conn: Some(conn),
        })
    }

    /// A read connection to `sync.db` (destinations, outboxes): the
    /// Destinations API and the delivery worker read without waiting for
    /// the sync writer.
    pub(crate) fn sync_reader(&self) -> Result<Reader<'_>> {
        let pooled = lock(&self.sync_readers).pop();
        let conn = match pooled {
            Some(c) => c,
            None => open_reader(&self.sync_path)?,
        };
        Ok(Reader {
            pool: &self.sync_readers,
            conn: Some(conn),
        })
    }

    pub(crate) fn writer(&self) -> MutexGuard<'_, Connection> {
        lock(&self.writer)
    }

    /// Makes `store.db`'s writer refuse every write (`query_only`), or
    /// accept them again: a storage fault on demand, for failure drills
    /// and the tests that check nothing acknowledged is lost through one.
    pub fn set_read_only(&self, read_only: bool) -> Result<()> {
        self.writer().pragma_update(None, "query_only", read_only)?;
        Ok(())
    }

    pub(crate) fn compute_writer(&self) -> MutexGuard<'_, Connection> {
        lock(&self.compute_writer)
    }

    pub(crate) fn sync_writer(&self) -> MutexGuard<'_, Connection> {
        lock(&self.sync_writer)
    }

    /// Runs blocking store work off the async runtime.
    pub(crate) async fn blocking<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&SqliteStore) -> Result<T> + Send + 'static,
    {
        let store = self.me.upgrade().ok_or(kindred_store::StoreError::Closed)?;
        tokio::task::spawn_blocking(move || f(&store))
            .await
            .map_err(|_| kindred_store::StoreError::Closed)?
    }

    /// Runs `f` in one write transaction over the identity graph (the
    /// unit of work of tests and tools; the worker batches many events).
    pub fn with_graph<T>(&self, f: impl FnOnce(&mut TxGraph<'_>) -> Result<T>) -> Result<T> {
        let mut conn = self.writer();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let out = {
            let mut graph = TxGraph::new(&tx);
            f(&mut graph)?
        };
        tx.commit()?;
        Ok(out)
    }
}

/// The layout of the data directory this build writes, kept in
/// `store.db`'s `user_version`:
/// - 0: before the marker (event bodies stored as JSON text);
/// - 1: event bodies compressed ([`body`]); text bodies still read;
/// - 2: the queue (`queue.db`) holds bodies compressed the same way, and
///   `store.db` takes them as they are; text entries still read.
pub const DATA_FORMAT: i64 = 2;

/// Brings an older data directory up to [`DATA_FORMAT`] when the store
/// opens, or refuses one written by a newer Kindred before anything in
/// it is touched.
fn upgrade(conn: &Connection) -> Result<()> {
    let found: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if found > DATA_FORMAT {
        return Err(kindred_store::StoreError::DataFormat(format!(
            "this data directory was written by a newer Kindred (data format {found}; this \
             build reads formats 0 to {DATA_FORMAT}): run that version of `kindred serve` on \
             it, or `kindred restore` a backup taken before the upgrade into a new directory"
        )));
    }
    // 0 -> 1 and 1 -> 2: nothing to rewrite; older text bodies (in
    // `store.db` and in the queue) are read as they are, and what is
    // written from now on is compressed. The mark is what makes an older
    // build, which could not read a compressed queue entry, refuse it.
    if found < DATA_FORMAT {
        conn.pragma_update(None, "user_version", DATA_FORMAT)?;
    }
    Ok(())
}

/// Adds `column` to `table` of a data directory from before it existed.
pub(crate) fn add_column_if_missing(
    conn: &Connection,
    table: &str,
    column: &str,
    declaration: &str,
) -> Result<()> {
    let exists: bool = conn.query_row(
        "SELECT EXISTS (SELECT 1 FROM pragma_table_info(?1) WHERE name = ?2)",
        rusqlite::params![table, column],
        |r| r.get(0),
    )?;
    if !exists {
        conn.execute(
            &format!("ALTER TABLE {table} ADD COLUMN {column} {declaration}"),
            [],
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod migration_tests {
    use super::*;

    /// A data directory from before account-level definitions: its change
    /// log gains `group_id`, and its entries still read.
    #[tokio::test]
    async fn an_older_change_log_gains_the_account_column() {
        let dir = tempfile::tempdir().unwrap();
        {
            let old = Connection::open(dir.path().join("compute.db")).unwrap();
            old.execute_batch(
                "CREATE TABLE changes (seq INTEGER PRIMARY KEY, space_id TEXT NOT NULL,
                     profile_id TEXT NOT NULL, key TEXT NOT NULL, class TEXT NOT NULL,
                     old TEXT, new TEXT NOT NULL, at INTEGER NOT NULL);
                 INSERT INTO changes (space_id, profile_id, key, class, old, new, at)
                 VALUES ('sp', 'prf_1', 'vip', 'audience', NULL, 'true', 1);",
            )
            .unwrap();
        }
        let store = SqliteStore::open(dir.path()).unwrap();
        use kindred_store::ports::Computations;
        let changes = store.changes("sp", 0, 10).await.unwrap();
        assert_eq!(changes.len(), 1);
        assert_eq!(
            (
                changes[0].profile_id.as_str(),
                changes[0].group_id.as_deref()
            ),
            ("prf_1", None)
        );
        // Opening it again (the column is there now) changes nothing.
        drop(store);
        let store = SqliteStore::open(dir.path()).unwrap();
        assert_eq!(store.changes("sp", 0, 10).await.unwrap(), changes);
    }
}
