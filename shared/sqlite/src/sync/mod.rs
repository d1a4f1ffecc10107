//! Destinations and their outboxes on the embedded store (`sync.db`).
//!
//! `sync.db` has its own writer, so queuing and recording deliveries never
//! waits for the identity or compute writers; it reads the change log
//! (`compute.db`, attached as `c`) and the merge log and profiles
//! (`store.db`, attached as `s`) in WAL snapshots.
//!
//! Fan-out ([`SyncWorker`]) turns each change and merge into the calls of
//! every destination of its space, in one transaction with its cursors:
//! every change reaches every destination exactly once, in log order. The
//! delivery worker (`kindred-sync`) drains each destination's queue in
//! order through [`Outbox`].

mod destinations;
mod fan_out;
mod outbox;

use std::collections::HashMap;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use kindred_domain::compute::Class;
use kindred_domain::event::format_millis;
use kindred_domain::resolve::IdentifierEntry;
use kindred_domain::sync::{
    alias_call, change_calls, check_secret, ChangeEntry, Settings, SyncPosition,
};
use kindred_domain::Identifier;
use rusqlite::{params, Connection, OptionalExtension, Transaction};
use serde_json::Value;
use tracing::info_span;

use super::SqliteStore;
use kindred_store::sync::{
    account_current_calls, current_calls, current_calls_to, secret_context, Attempt, DeadLetter,
    DeliveryError, DestinationRecord, DestinationStatus, Destinations, Outbox, PendingCall, Target,
    Targets, User,
};
use kindred_store::{now_millis, Result, StoreError};

pub(crate) const SCHEMA: &str = "
-- Change-log and merge-log entries the fan-out could not decode and
-- stepped over, with why (the rest of the log goes on).
CREATE TABLE IF NOT EXISTS fan_out_set_aside (
    log TEXT NOT NULL,
    seq INTEGER NOT NULL,
    space_id TEXT NOT NULL,
    reason TEXT NOT NULL,
    at INTEGER NOT NULL,
    PRIMARY KEY (log, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS destinations (
    space_id TEXT NOT NULL,
    destination_id TEXT NOT NULL,
    name TEXT,
    settings TEXT NOT NULL,
    secret BLOB,
    version INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    -- Changes up to here are covered by the initial sync; merges up to
    -- here happened before the destination existed.
    since_change INTEGER NOT NULL,
    since_merge INTEGER NOT NULL,
    -- 1 while the current values are still to be queued: of the keys in
    -- `initial_keys` (JSON list; NULL: every key).
    initial_pending INTEGER NOT NULL,
    initial_keys TEXT,
    -- 1 once a first initial sync is done: from then on changes keep
    -- flowing during a later one (for the keys it had before).
    synced INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (space_id, destination_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS deliveries (
    seq INTEGER PRIMARY KEY,
    space_id TEXT NOT NULL,
    destination_id TEXT NOT NULL,
    profile_id TEXT NOT NULL,
    call TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    dead INTEGER NOT NULL DEFAULT 0,
    error TEXT
);
CREATE INDEX IF NOT EXISTS deliveries_queue ON deliveries (space_id, destination_id, dead, seq);
CREATE TABLE IF NOT EXISTS destination_stats (
    space_id TEXT NOT NULL,
    destination_id TEXT NOT NULL,
    delivered INTEGER NOT NULL,
    last_success_at INTEGER,
    last_error_at INTEGER,
    last_error_status INTEGER,
    last_error_message TEXT,
    PRIMARY KEY (space_id, destination_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS sync_cursors (
    name TEXT PRIMARY KEY,
    seq INTEGER NOT NULL
) WITHOUT ROWID;
";

/// Changes fanned out per transaction.
const CHANGES_PER_STEP: usize = 2048;
const MERGES_PER_STEP: usize = 512;
const CHANGES_CURSOR: &str = "changes";
const MERGES_CURSOR: &str = "merges";
const IDENTIFIERS_CURSOR: &str = "identifiers";

fn cursor(conn: &Connection, name: &str) -> Result<i64> {
    Ok(conn
        .prepare_cached("SELECT seq FROM sync_cursors WHERE name = ?1")?
        .query_row([name], |r| r.get(0))
        .optional()?
        .unwrap_or(0))
}

fn set_cursor(tx: &Transaction<'_>, name: &str, seq: i64) -> Result<()> {
    tx.prepare_cached(
        "INSERT INTO sync_cursors (name, seq) VALUES (?1, ?2)
         ON CONFLICT (name) DO UPDATE SET seq = excluded.seq",
    )?
    .execute(params![name, seq])?;
    Ok(())
}

/// A destinations row.
struct Row {
    space_id: String,
    destination_id: String,
    name: Option<String>,
    settings: Settings,
    secret: Option<Vec<u8>>,
    version: u64,
    created_at: i64,
    updated_at: i64,
    since_change: i64,
    since_merge: i64,
    initial_pending: bool,
    initial_keys: Option<std::collections::BTreeSet<String>>,
    synced: bool,
}

const ROW_COLUMNS: &str = "space_id, destination_id, name, settings, secret, version, created_at,
     updated_at, since_change, since_merge, initial_pending, initial_keys, synced";

/// The space's enabled destinations and their settings.
pub(crate) fn enabled_destinations(
    conn: &Connection,
    space_id: &str,
) -> Result<Vec<(String, Settings)>> {
    Ok(rows(
        conn,
        "WHERE space_id = ?1 ORDER BY destination_id",
        &[&space_id],
    )?
    .into_iter()
    .filter(|r| r.settings.enabled)
    .map(|r| (r.destination_id, r.settings))
    .collect())
}

fn rows(conn: &Connection, filter: &str, args: &[&dyn rusqlite::ToSql]) -> Result<Vec<Row>> {
    let mut stmt =
        conn.prepare_cached(&format!("SELECT {ROW_COLUMNS} FROM destinations {filter}"))?;
    let found = stmt.query_map(args, |r| {
        Ok((
            r.get::<_, String>(3)?,
            (
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, Option<String>>(2)?,
                r.get::<_, Option<Vec<u8>>>(4)?,
            ),
            (
                r.get::<_, i64>(5)?,
                r.get::<_, i64>(6)?,
                r.get::<_, i64>(7)?,
                r.get::<_, i64>(8)?,
                r.get::<_, i64>(9)?,
                r.get::<_, bool>(10)?,
            ),
            (r.get::<_, Option<String>>(11)?, r.get::<_, bool>(12)?),
        ))
    })?;
    let mut out = Vec::new();
    for r in found {
        let (settings, (space_id, destination_id, name, secret), numbers, (initial_keys, synced)) =
            r?;
        let initial_keys = initial_keys.map(|k| serde_json::from_str(&k)).transpose()?;
        let (version, created_at, updated_at, since_change, since_merge, initial_pending) = numbers;
        let stored: Value = serde_json::from_str(&settings)?;
        let settings = Settings::from_stored(&stored)
            .map_err(|e| StoreError::Undecodable(format!("stored destination settings: {e}")))?;
        out.push(Row {
            space_id,
            destination_id,
            name,
            settings,
            secret,
            version: version as u64,
            created_at,
            updated_at,
            since_change,
            since_merge,
            initial_pending,
            initial_keys,
            synced,
        });
    }
    Ok(out)
}

/// What one fan-out step did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FanOut {
    pub changes: u64,
    pub merges: u64,
    pub initial_syncs: u64,
    pub calls: u64,
    /// The step stopped at its size limit: there is more to fan out.
    pub more: bool,
}

struct Inserter<'a> {
    stmt: rusqlite::CachedStatement<'a>,
}

/// A profile's root and the root's identifiers.
type RootIds = (String, Arc<Vec<IdentifierEntry>>);

/// Profiles' identifiers, read once per fan-out step.
#[derive(Default)]
struct IdCache {
    /// (space, profile) -> its root.
    roots: HashMap<(String, String), RootIds>,
}

/// Runs the fan-out in the background of `kindred serve`.
pub struct SyncWorker {
    store: Arc<SqliteStore>,
}

/// Opens `sync.db`'s writer: its schema, with the store and the compute
/// databases attached for reading.
pub(crate) fn open_writer(
    dir: &std::path::Path,
    store: &std::path::Path,
    compute: &std::path::Path,
) -> Result<Connection> {
    let conn = super::open(&dir.join("sync.db"), super::Durability::Normal)?;
    conn.execute_batch(SCHEMA)?;
    conn.execute("ATTACH DATABASE ?1 AS s", [store.to_string_lossy()])?;
    conn.execute("ATTACH DATABASE ?1 AS c", [compute.to_string_lossy()])?;
    Ok(conn)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sync_transaction_leaves_the_attached_databases_writable() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path()).unwrap();
        store
            .sync_tx(|tx| {
                set_cursor(tx, "test", 1)?;
                let _: i64 = tx.query_row("SELECT count(*) FROM c.changes", [], |r| r.get(0))?;
                let _: i64 = tx.query_row("SELECT count(*) FROM s.merge_log", [], |r| r.get(0))?;
                // The identity and compute writers can commit meanwhile.
                for file in ["compute.db", "store.db"] {
                    let other = Connection::open(dir.path().join(file))?;
                    other.busy_timeout(Duration::ZERO)?;
                    other.execute_batch("BEGIN IMMEDIATE; COMMIT;")?;
                }
                Ok(())
            })
            .unwrap();
    }
}
