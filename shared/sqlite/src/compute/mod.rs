//! Computed traits and audiences on the embedded store: definitions, the
//! compute worker, the change log and the lookback sweep.
//!
//! These tables live in their own database file, `compute.db`, with its
//! own writer, so that the compute worker and the identity worker commit
//! in parallel. The compute writer reads the store (`events`, `profiles`,
//! `spaces`) through `store.db` attached as `s`, in WAL snapshots that
//! never block the identity worker; store readers attach `compute.db` as
//! `c` to serve computed values with profiles.
//!
//! The local recompute queue is a transactional outbox: the identity
//! worker's commit appends each event to `events` (with its sequence
//! number) in the same transaction that updates the graph, and the compute
//! worker consumes `events` in that order behind its own cursor, advanced
//! in the transaction that writes the states and the change log. Expiry
//! and backfill requests go through `compute_requests` the same way. Each
//! event is therefore folded into exactly one profile state exactly once,
//! even across crashes.

mod batch;
mod definitions;
mod worker;

use definitions::{load_definitions, set_version};

use std::collections::{btree_map, BTreeMap, HashMap};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use kindred_domain::compute::{Class, Definition, ProfileState, Ruleset};
use kindred_domain::{Millis, Traits};
use rusqlite::{params, Connection, OptionalExtension, Transaction};
use serde_json::Value;
use tracing::{error, info, info_span};

use super::parallel::{self, par_map, pipeline};
use super::profiles::root_with_traits;
use super::{lock, SqliteStore};
use kindred_store::compute::{
    absorb, apply_event, check_delete, check_put, decode_state, encode_state, parse_stored_event,
    rebuild_stale, recompute, Recomputed,
};
use kindred_store::ports::{
    ChangeRecord, Computations, ComputedValues, DefinitionRecord, DefinitionStatus,
};
use kindred_store::{now_millis, Result, StoreError};

pub(crate) const SCHEMA: &str = "
-- Entries of `events` or `compute_requests` the compute step could not
-- process (say, an undecodable body) and stepped over, with why.
CREATE TABLE IF NOT EXISTS compute_set_aside (
    queue TEXT NOT NULL,
    seq INTEGER NOT NULL,
    reason TEXT NOT NULL,
    at INTEGER NOT NULL,
    PRIMARY KEY (queue, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS definitions (
    space_id TEXT NOT NULL,
    key TEXT NOT NULL,
    class TEXT NOT NULL,
    version INTEGER NOT NULL,
    body TEXT NOT NULL,
    status TEXT NOT NULL,
    done INTEGER NOT NULL,
    total INTEGER NOT NULL,
    error TEXT,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    deleted INTEGER NOT NULL,
    PRIMARY KEY (space_id, key)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS definition_sets (
    space_id TEXT PRIMARY KEY,
    version INTEGER NOT NULL,
    backfill_after TEXT
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS compute_states (
    space_id TEXT NOT NULL,
    profile_id TEXT NOT NULL,
    state BLOB NOT NULL,
    computed TEXT NOT NULL,
    due INTEGER,
    PRIMARY KEY (space_id, profile_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS compute_due ON compute_states (space_id, due) WHERE due IS NOT NULL;
CREATE TABLE IF NOT EXISTS compute_requests (
    seq INTEGER PRIMARY KEY,
    space_id TEXT NOT NULL,
    profile_id TEXT NOT NULL,
    as_of INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS changes (
    seq INTEGER PRIMARY KEY,
    space_id TEXT NOT NULL,
    profile_id TEXT NOT NULL,
    key TEXT NOT NULL,
    class TEXT NOT NULL,
    old TEXT,
    new TEXT NOT NULL,
    at INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS changes_by_space ON changes (space_id, seq);
-- Account-level computed values (`kindred_store::accounts`), written
-- conditionally on `version`.
CREATE TABLE IF NOT EXISTS account_values (
    space_id TEXT NOT NULL,
    group_id TEXT NOT NULL,
    computed TEXT NOT NULL,
    version INTEGER NOT NULL,
    PRIMARY KEY (space_id, group_id)
) WITHOUT ROWID;
-- A regulation blanks a deleted person's entries.
CREATE INDEX IF NOT EXISTS changes_by_profile ON changes (space_id, profile_id);
CREATE TABLE IF NOT EXISTS compute_cursors (
    name TEXT PRIMARY KEY,
    seq INTEGER NOT NULL
) WITHOUT ROWID;
-- `compute_requests` keeps its last served row, so that new requests are
-- numbered after the cursor. A data directory whose table was emptied
-- (before that) gets a marker row at the cursor, which is never served.
INSERT INTO compute_requests (seq, space_id, profile_id, as_of)
SELECT c.seq, '', '', 0 FROM compute_cursors c
WHERE c.name = 'compute_requests'
  AND c.seq > coalesce((SELECT max(seq) FROM compute_requests), 0);
";

/// Brings a `compute.db` from before account-level definitions up to date:
/// its change log gains the account a change is about.
pub(crate) fn migrate(conn: &Connection) -> Result<()> {
    crate::add_column_if_missing(conn, "changes", "group_id", "TEXT")
}

const EVENTS_CURSOR: &str = "compute";
const REQUESTS_CURSOR: &str = "compute_requests";
/// Events folded per transaction: the more, the more events of one
/// profile share one read and write of its state.
const EVENTS_PER_BATCH: usize = 4096;
/// Below this many entries a batch is short: the worker waits a moment.
const SMALL_BATCH: usize = 64;
/// Root profiles visited per backfill step.
const BACKFILL_CHUNK: usize = 500;

const RECORD_COLUMNS: &str =
    "key, class, version, body, status, done, total, error, created_at, updated_at";

struct RawRecord {
    key: String,
    class: String,
    version: i64,
    body: String,
    status: String,
    done: i64,
    total: i64,
    error: Option<String>,
    created_at: i64,
    updated_at: i64,
}

/// Gives a connection the SQL function `kindred_holds(value)`: whether a
/// stored computed value puts its profile on its definition's member list
/// ([`kindred_store::compute::holds`]; an unreadable value does not).
pub(crate) fn register_holds(conn: &Connection) -> rusqlite::Result<()> {
    use rusqlite::functions::FunctionFlags;
    conn.create_scalar_function(
        "kindred_holds",
        1,
        FunctionFlags::SQLITE_UTF8 | FunctionFlags::SQLITE_DETERMINISTIC,
        |ctx| {
            let json = ctx.get_raw(0).as_str().unwrap_or_default();
            Ok(serde_json::from_str::<kindred_store::ComputedValue>(json)
                .is_ok_and(|v| kindred_store::compute::holds(&v)))
        },
    )
}

/// The root's computed values, without keys of deleted definitions.
pub(crate) fn live_values(conn: &Connection, space_id: &str, root: &str) -> Result<ComputedValues> {
    let json: Option<String> = conn
        .prepare_cached(
            "SELECT computed FROM compute_states WHERE space_id = ?1 AND profile_id = ?2",
        )?
        .query_row(params![space_id, root], |r| r.get(0))
        .optional()?;
    let Some(json) = json else {
        return Ok(ComputedValues::new());
    };
    let mut values: ComputedValues = serde_json::from_str(&json)?;
    if !values.is_empty() {
        let mut live =
            conn.prepare_cached("SELECT key FROM definitions WHERE space_id = ?1 AND deleted = 0")?;
        let keys = live
            .query_map([space_id], |r| r.get::<_, String>(0))?
            .collect::<rusqlite::Result<std::collections::BTreeSet<String>>>()?;
        values.retain(|k, _| keys.contains(k));
    }
    Ok(values)
}

/// Counters since start.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ComputeStats {
    pub events: u64,
    pub requests: u64,
    /// Profile states evaluated.
    pub recomputed: u64,
    /// Of those, the ones written (the others came out as stored).
    pub written: u64,
    /// Definition states rebuilt from a profile's history.
    pub rebuilt: u64,
    pub changes: u64,
    /// Entries skipped after failing repeatedly (logged as errors).
    pub skipped: u64,
}

/// The local compute worker: folds events into profile states, serves
/// recompute requests and runs backfills, on a thread of its own.
pub struct ComputeWorker {
    store: Arc<SqliteStore>,
    state: Mutex<WorkerState>,
}

#[derive(Default)]
struct WorkerState {
    rulesets: HashMap<String, (i64, Arc<Ruleset>)>,
    /// Per space, the latest `as_of` of an explicit lookback run: a run in
    /// the future moves the space's clock forward for later recomputes.
    clock: HashMap<String, Millis>,
    stats: ComputeStats,
}

/// One profile's state loaded into a batch.
struct Loaded {
    state: ProfileState,
    stored: ComputedValues,
    now: Millis,
    dirty: bool,
    /// The root's custom traits, when they were read with its row.
    traits: Option<String>,
    /// The row as stored (none yet for a new profile): a profile whose
    /// state, values and next change come out the same is not rewritten.
    row: Option<StateRow>,
    /// Whether some definition had no current state when the row was
    /// decoded (worked out there, off the database thread).
    stale: bool,
    /// Merged profiles' states are folded in and stale definitions rebuilt
    /// (once per batch: the batch reads one snapshot of the graph).
    settled: bool,
}

/// A `compute_states` row.
struct StateRow {
    /// A blob, or JSON text in data directories from before the binary encoding.
    state: Vec<u8>,
    computed: String,
    due: Option<Millis>,
}

/// A profile evaluated and encoded, ready to write.
struct Flushed {
    space_id: String,
    root: String,
    /// The encoded state and values, unless they are what is stored.
    write: Option<(Vec<u8>, String)>,
    due: Option<Millis>,
    changes: Vec<kindred_domain::compute::Change>,
    now: Millis,
}

/// The profiles one transaction touches, in key order (so that they are
/// written in the order of the table's B-tree).
struct Batch<'t> {
    tx: &'t Transaction<'t>,
    /// Threads for the CPU work (see [`parallel`]).
    threads: usize,
    profiles: BTreeMap<(String, String), Loaded>,
    stats: ComputeStats,
}

fn cursor(conn: &Connection, name: &str) -> Result<i64> {
    Ok(conn
        .prepare_cached("SELECT seq FROM compute_cursors WHERE name = ?1")?
        .query_row([name], |r| r.get(0))
        .optional()?
        .unwrap_or(0))
}

fn set_cursor(tx: &Transaction<'_>, name: &str, seq: i64) -> Result<()> {
    tx.prepare_cached(
        "INSERT INTO compute_cursors (name, seq) VALUES (?1, ?2)
         ON CONFLICT (name) DO UPDATE SET seq = excluded.seq",
    )?
    .execute(params![name, seq])?;
    Ok(())
}

/// A [`StateRow`] from `SELECT state, computed, due`.
fn state_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<StateRow> {
    let state = match r.get_ref(0)? {
        rusqlite::types::ValueRef::Blob(b) | rusqlite::types::ValueRef::Text(b) => b.to_vec(),
        _ => Vec::new(),
    };
    Ok(StateRow {
        state,
        computed: r.get(1)?,
        due: r.get(2)?,
    })
}

fn read_state(tx: &Transaction<'_>, space_id: &str, root: &str) -> Result<Option<StateRow>> {
    Ok(tx
        .prepare_cached(
            "SELECT state, computed, due FROM compute_states WHERE space_id = ?1 AND profile_id = ?2",
        )?
        .query_row(params![space_id, root], state_row)
        .optional()?)
}

/// A queued event with its profile's root, in a batch.
struct Resolved<'a> {
    ruleset: Arc<Ruleset>,
    space_id: &'a String,
    root: String,
    /// The root's custom traits, when read with its row.
    traits: Option<String>,
    seq: i64,
    now: Millis,
    body: &'a String,
}

/// A root to load into a batch: its space's definitions, and the time to
/// evaluate it at.
type Root = (Arc<Ruleset>, String, String, Millis);

/// Identity resolution is on the path from every event to its profile;
/// computed values may lag. So when the CPU is contended the compute
/// thread gives way (niceness 9 on Linux) and uses what is left; on an
/// idle machine it runs at full speed.
fn give_way_to_identity() {
    kindred_store::priority::lower_to("compute", kindred_store::priority::COMPUTE);
}

fn add(total: &mut ComputeStats, s: &ComputeStats) {
    total.events += s.events;
    total.requests += s.requests;
    total.recomputed += s.recomputed;
    total.written += s.written;
    total.rebuilt += s.rebuilt;
    total.changes += s.changes;
}
