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
use crate::compute::{
    absorb, apply_event, check_delete, check_put, decode_state, encode_state, parse_stored_event,
    rebuild_stale, recompute, Recomputed,
};
use crate::ports::{
    ChangeRecord, Computations, ComputedValues, DefinitionRecord, DefinitionStatus,
};
use crate::{now_millis, Result, StoreError};

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

const EVENTS_CURSOR: &str = "compute";
const REQUESTS_CURSOR: &str = "compute_requests";
/// Events folded per transaction: the more, the more events of one
/// profile share one read and write of its state.
const EVENTS_PER_BATCH: usize = 4096;
/// Below this many entries a batch is short: the worker waits a moment.
const SMALL_BATCH: usize = 64;
/// Root profiles visited per backfill step.
const BACKFILL_CHUNK: usize = 500;

fn class_of(s: &str) -> Result<Class> {
    Class::parse(s).ok_or(StoreError::Invalid(format!("unknown class {s}")))
}

/// The space's live definitions, parsed.
fn load_definitions(conn: &Connection, space_id: &str) -> Result<Vec<Definition>> {
    let mut stmt = conn.prepare_cached(
        "SELECT key, class, version, body FROM definitions WHERE space_id = ?1 AND deleted = 0",
    )?;
    let rows = stmt.query_map([space_id], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, i64>(2)?,
            r.get::<_, String>(3)?,
        ))
    })?;
    let mut defs = Vec::new();
    for row in rows {
        let (key, class, version, body) = row?;
        let body: Value = serde_json::from_str(&body)?;
        defs.push(Definition::parse(
            class_of(&class)?,
            &key,
            version as u64,
            &body,
        )?);
    }
    Ok(defs)
}

fn set_version(conn: &Connection, space_id: &str) -> Result<i64> {
    Ok(conn
        .prepare_cached("SELECT version FROM definition_sets WHERE space_id = ?1")?
        .query_row([space_id], |r| r.get(0))
        .optional()?
        .unwrap_or(0))
}

fn record_of(r: &rusqlite::Row<'_>) -> rusqlite::Result<RawRecord> {
    Ok(RawRecord {
        key: r.get(0)?,
        class: r.get(1)?,
        version: r.get(2)?,
        body: r.get(3)?,
        status: r.get(4)?,
        done: r.get(5)?,
        total: r.get(6)?,
        error: r.get(7)?,
        created_at: r.get(8)?,
        updated_at: r.get(9)?,
    })
}

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

impl RawRecord {
    fn into_record(self) -> Result<DefinitionRecord> {
        Ok(DefinitionRecord {
            class: class_of(&self.class)?,
            key: self.key,
            version: self.version as u64,
            body: serde_json::from_str(&self.body)?,
            status: match self.status.as_str() {
                "backfilling" => DefinitionStatus::Backfilling {
                    done: self.done as u64,
                    total: self.total as u64,
                },
                "failed" => DefinitionStatus::Failed(self.error.unwrap_or_default()),
                _ => DefinitionStatus::Ready,
            },
            created_at: self.created_at,
            updated_at: self.updated_at,
        })
    }
}

fn get_record(
    conn: &Connection,
    space_id: &str,
    class: Class,
    key: &str,
) -> Result<Option<DefinitionRecord>> {
    conn.prepare_cached(&format!(
        "SELECT {RECORD_COLUMNS} FROM definitions
         WHERE space_id = ?1 AND key = ?2 AND class = ?3 AND deleted = 0"
    ))?
    .query_row(params![space_id, key, class.as_str()], record_of)
    .optional()?
    .map(RawRecord::into_record)
    .transpose()
}

fn space_exists(conn: &Connection, space_id: &str) -> Result<bool> {
    Ok(conn
        .prepare_cached("SELECT 1 FROM spaces WHERE space_id = ?1")?
        .query_row([space_id], |_| Ok(()))
        .optional()?
        .is_some())
}

/// Starts a new backfill pass over the space's profiles for every
/// definition that is backfilling.
fn restart_backfill(tx: &Transaction<'_>, space_id: &str, now: Millis) -> Result<()> {
    let roots: i64 = tx.query_row(
        "SELECT count(*) FROM profiles WHERE space_id = ?1 AND parent_id IS NULL",
        [space_id],
        |r| r.get(0),
    )?;
    tx.execute(
        "UPDATE definitions SET done = 0, total = ?2, updated_at = ?3
         WHERE space_id = ?1 AND status = 'backfilling' AND deleted = 0",
        params![space_id, roots, now],
    )?;
    tx.execute(
        "INSERT INTO definition_sets (space_id, version, backfill_after) VALUES (?1, 1, NULL)
         ON CONFLICT (space_id) DO UPDATE SET version = version + 1, backfill_after = NULL",
        [space_id],
    )?;
    Ok(())
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

impl SqliteStore {
    fn put_definition_now(
        &self,
        space_id: &str,
        class: Class,
        key: &str,
        body: &Value,
        bump_only: bool,
    ) -> Result<DefinitionRecord> {
        let now = now_millis();
        let mut conn = self.compute_writer();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Deferred)?;
        if !space_exists(&tx, space_id)? {
            return Err(StoreError::NotFound);
        }
        let existing: Option<(String, i64, i64, i64)> = tx
            .query_row(
                "SELECT class, version, created_at, deleted FROM definitions
                 WHERE space_id = ?1 AND key = ?2",
                params![space_id, key],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )
            .optional()?;
        let live = existing.as_ref().filter(|e| e.3 == 0);
        if bump_only && live.is_none() {
            return Err(StoreError::NotFound);
        }
        // Versions never repeat, even across delete and re-create.
        let version = existing.as_ref().map_or(now, |e| (e.1 + 1).max(now));
        let parsed = Definition::parse(class, key, version as u64, body)?;
        let live_class = live.map(|e| class_of(&e.0)).transpose()?;
        check_put(live_class, parsed, load_definitions(&tx, space_id)?)?;
        let created_at = live.map_or(now, |e| e.2);
        tx.execute(
            "INSERT INTO definitions (space_id, key, class, version, body, status, done, total, error, created_at, updated_at, deleted)
             VALUES (?1, ?2, ?3, ?4, ?5, 'backfilling', 0, 0, NULL, ?6, ?7, 0)
             ON CONFLICT (space_id, key) DO UPDATE SET class = excluded.class, version = excluded.version,
               body = excluded.body, status = 'backfilling', done = 0, total = 0, error = NULL,
               created_at = excluded.created_at, updated_at = excluded.updated_at, deleted = 0",
            params![space_id, key, class.as_str(), version, body.to_string(), created_at, now],
        )?;
        restart_backfill(&tx, space_id, now)?;
        let record = get_record(&tx, space_id, class, key)?.ok_or(StoreError::Invariant(
            "a definition just written is missing",
        ))?;
        tx.commit()?;
        Ok(record)
    }

    fn delete_definition_now(&self, space_id: &str, class: Class, key: &str) -> Result<bool> {
        let mut conn = self.compute_writer();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Deferred)?;
        if get_record(&tx, space_id, class, key)?.is_none() {
            return Ok(false);
        }
        check_delete(key, load_definitions(&tx, space_id)?)?;
        tx.execute(
            "UPDATE definitions SET deleted = 1, updated_at = ?3 WHERE space_id = ?1 AND key = ?2",
            params![space_id, key, now_millis()],
        )?;
        tx.execute(
            "INSERT INTO definition_sets (space_id, version, backfill_after) VALUES (?1, 1, NULL)
             ON CONFLICT (space_id) DO UPDATE SET version = version + 1",
            [space_id],
        )?;
        tx.commit()?;
        Ok(true)
    }

    /// Enqueues the recompute of every profile of the space whose next
    /// change has come by `as_of` (an index range, not a scan).
    pub fn sweep(&self, space_id: &str, as_of: Millis) -> Result<u64> {
        let mut conn = self.compute_writer();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Deferred)?;
        if !space_exists(&tx, space_id)? {
            return Err(StoreError::NotFound);
        }
        let n = tx.execute(
            "INSERT INTO compute_requests (space_id, profile_id, as_of)
             SELECT space_id, profile_id, ?2 FROM compute_states INDEXED BY compute_due
             WHERE space_id = ?1 AND due <= ?2 ORDER BY due",
            params![space_id, as_of],
        )?;
        tx.execute(
            "UPDATE compute_states SET due = NULL WHERE space_id = ?1 AND due <= ?2",
            params![space_id, as_of],
        )?;
        tx.commit()?;
        Ok(n as u64)
    }

    /// Enqueues the recompute of every profile of the space that has a
    /// computed state, as of `as_of` (after an incident, or to measure).
    pub fn recompute_all(&self, space_id: &str, as_of: Millis) -> Result<u64> {
        let conn = self.compute_writer();
        let n = conn.execute(
            "INSERT INTO compute_requests (space_id, profile_id, as_of)
             SELECT space_id, profile_id, ?2 FROM compute_states WHERE space_id = ?1",
            params![space_id, as_of],
        )?;
        Ok(n as u64)
    }

    /// Sweeps every space as of `as_of`.
    pub fn sweep_all(&self, as_of: Millis) -> Result<u64> {
        let spaces: Vec<String> = {
            let conn = self.reader()?;
            let mut stmt = conn.prepare("SELECT space_id FROM definition_sets")?;
            let rows = stmt.query_map([], |r| r.get(0))?;
            rows.collect::<rusqlite::Result<_>>()?
        };
        let mut n = 0;
        for space in spaces {
            n += self.sweep(&space, as_of)?;
        }
        Ok(n)
    }
}

#[async_trait]
impl Computations for SqliteStore {
    async fn put_definition(
        &self,
        space_id: &str,
        class: Class,
        key: &str,
        body: &Value,
    ) -> Result<DefinitionRecord> {
        let (space_id, key, body) = (space_id.to_string(), key.to_string(), body.clone());
        self.blocking(move |s| s.put_definition_now(&space_id, class, &key, &body, false))
            .await
    }

    async fn definition(
        &self,
        space_id: &str,
        class: Class,
        key: &str,
    ) -> Result<Option<DefinitionRecord>> {
        let (space_id, key) = (space_id.to_string(), key.to_string());
        self.blocking(move |s| get_record(&*s.reader()?, &space_id, class, &key))
            .await
    }

    async fn definitions(&self, space_id: &str, class: Class) -> Result<Vec<DefinitionRecord>> {
        let space_id = space_id.to_string();
        self.blocking(move |s| {
            let conn = s.reader()?;
            let mut stmt = conn.prepare_cached(&format!(
                "SELECT {RECORD_COLUMNS} FROM definitions
                 WHERE space_id = ?1 AND class = ?2 AND deleted = 0 ORDER BY key"
            ))?;
            let rows = stmt.query_map(params![space_id, class.as_str()], record_of)?;
            rows.map(|r| r.map_err(StoreError::from).and_then(RawRecord::into_record))
                .collect()
        })
        .await
    }

    async fn delete_definition(&self, space_id: &str, class: Class, key: &str) -> Result<bool> {
        let (space_id, key) = (space_id.to_string(), key.to_string());
        self.blocking(move |s| s.delete_definition_now(&space_id, class, &key))
            .await
    }

    async fn rebackfill(
        &self,
        space_id: &str,
        class: Class,
        key: &str,
    ) -> Result<Option<DefinitionRecord>> {
        let (space_id, key) = (space_id.to_string(), key.to_string());
        self.blocking(move |s| {
            let Some(current) = get_record(&*s.reader()?, &space_id, class, &key)? else {
                return Ok(None);
            };
            s.put_definition_now(&space_id, class, &key, &current.body, true)
                .map(Some)
        })
        .await
    }

    async fn changes(&self, space_id: &str, since: i64, limit: usize) -> Result<Vec<ChangeRecord>> {
        let space_id = space_id.to_string();
        self.blocking(move |s| {
            let conn = s.reader()?;
            let mut stmt = conn.prepare_cached(
                "SELECT seq, profile_id, key, class, old, new, at FROM changes
                 WHERE space_id = ?1 AND seq > ?2 AND profile_id <> '' ORDER BY seq LIMIT ?3",
            )?;
            let rows = stmt.query_map(params![space_id, since, limit as i64], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, Option<String>>(4)?,
                    r.get::<_, String>(5)?,
                    r.get::<_, i64>(6)?,
                ))
            })?;
            let mut out = Vec::new();
            for row in rows {
                let (seq, profile_id, key, class, old, new, at) = row?;
                out.push(ChangeRecord {
                    seq,
                    profile_id,
                    key,
                    class: class_of(&class)?,
                    old: old.map(|o| serde_json::from_str(&o)).transpose()?,
                    new: serde_json::from_str(&new)?,
                    at,
                });
            }
            Ok(out)
        })
        .await
    }

    async fn run_lookback(&self, space_id: &str, as_of: Millis) -> Result<u64> {
        let space_id = space_id.to_string();
        self.blocking(move |s| s.sweep(&space_id, as_of)).await
    }
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

impl Loaded {
    /// A profile's row as read (or none yet), decoded.
    fn decode(row: Option<StateRow>, now: Millis, ruleset: &Ruleset) -> Result<Loaded> {
        let (state, stored) = match &row {
            Some(r) => (decode_state(&r.state)?, serde_json::from_str(&r.computed)?),
            None => (ProfileState::default(), ComputedValues::new()),
        };
        Ok(Loaded {
            stale: ruleset.has_stale(&state),
            state,
            stored,
            now,
            dirty: false,
            traits: None,
            row,
            settled: false,
        })
    }
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

/// A root to load into a batch: its space's definitions, and the time to
/// evaluate it at.
type Root = (Arc<Ruleset>, String, String, Millis);

impl Batch<'_> {
    /// Reads the states of these roots (those not loaded yet) and decodes
    /// them in parallel, ahead of [`Batch::touch`].
    fn preload(&mut self, roots: Vec<Root>) -> Result<()> {
        let mut roots = roots.into_iter();
        let mut decoded = Vec::with_capacity(roots.len());
        let tx = self.tx;
        let profiles = &self.profiles;
        // Rows are read on this thread while others decode those read.
        pipeline(
            self.threads,
            || {
                for (ruleset, space_id, root, now) in roots.by_ref() {
                    let key = (space_id, root);
                    if !profiles.contains_key(&key) {
                        let row = read_state(tx, &key.0, &key.1)?;
                        return Ok(Some((key, row, now, ruleset)));
                    }
                }
                Ok(None)
            },
            |(key, row, now, ruleset)| {
                Ok::<_, StoreError>((key, Loaded::decode(row, now, &ruleset)?))
            },
            |d| {
                decoded.push(d?);
                Ok::<_, StoreError>(())
            },
        )?;
        for (key, loaded) in decoded {
            self.profiles.entry(key).or_insert(loaded);
        }
        Ok(())
    }

    /// Loads (once per batch) the root's state, folding in the states of
    /// profiles merged into it since, and rebuilds from history the
    /// definitions it has no current state for, from the events before
    /// `history_before` (those already folded into some state).
    fn touch(
        &mut self,
        ruleset: &Ruleset,
        space_id: &str,
        root: &str,
        history_before: i64,
        now: Millis,
        traits: Option<String>,
    ) -> Result<&mut Loaded> {
        let tx = self.tx;
        let loaded = match self
            .profiles
            .entry((space_id.to_string(), root.to_string()))
        {
            btree_map::Entry::Occupied(e) => e.into_mut(),
            btree_map::Entry::Vacant(e) => {
                let row = read_state(tx, space_id, root)?;
                e.insert(Loaded::decode(row, now, ruleset)?)
            }
        };
        loaded.now = loaded.now.max(now);
        if traits.is_some() {
            loaded.traits = traits;
        }
        if loaded.settled {
            return Ok(loaded);
        }
        // States of profiles merged into this one (each event is in exactly
        // one state, so merging them is exact).
        // (Plain indexed lookups, one per tree member: the planner cannot
        // turn them into a scan.)
        let tree = super::profiles::tree(tx, space_id, root)?;
        for child in &tree[1..] {
            let Some(row) = read_state(tx, space_id, child)? else {
                continue;
            };
            absorb(
                ruleset,
                (&mut loaded.state, &mut loaded.stored),
                (
                    decode_state(&row.state)?,
                    serde_json::from_str(&row.computed)?,
                ),
            );
            tx.prepare_cached(
                "DELETE FROM compute_states WHERE space_id = ?1 AND profile_id = ?2",
            )?
            .execute(params![space_id, child])?;
            loaded.dirty = true;
            // (Merging drops definitions either side had no current state for.)
            loaded.stale = true;
        }
        if !loaded.stale {
            loaded.settled = true;
            return Ok(loaded);
        }
        if !ruleset.stale(&loaded.state).is_empty() {
            let mut history: Vec<String> = Vec::new();
            let mut stmt = self.tx.prepare_cached(
                "SELECT body FROM events INDEXED BY events_by_profile
                 WHERE space_id = ?1 AND profile_id = ?2 AND seq < ?3",
            )?;
            for member in tree.iter().map(String::as_str) {
                let rows =
                    stmt.query_map(params![space_id, member, history_before], |r| r.get(0))?;
                for body in rows {
                    history.push(body?);
                }
            }
            self.stats.rebuilt += rebuild_stale(ruleset, &mut loaded.state, &history)? as u64;
            loaded.dirty = true;
        }
        loaded.settled = true;
        Ok(loaded)
    }

    /// Evaluates and writes every dirty profile; appends the changes.
    /// Profiles are evaluated and encoded on other threads while this one
    /// reads traits and writes the profiles evaluated before.
    fn flush(&mut self, rulesets: &HashMap<String, (i64, Arc<Ruleset>)>) -> Result<()> {
        let mut profiles = std::mem::take(&mut self.profiles).into_iter();
        let tx = self.tx;
        let stats = &mut self.stats;
        pipeline(
            self.threads,
            || {
                for ((space_id, root), mut p) in profiles.by_ref() {
                    if !p.dirty {
                        continue;
                    }
                    let Some((_, ruleset)) = rulesets.get(&space_id) else {
                        continue;
                    };
                    // (The custom traits are parsed off this thread.)
                    let traits: Option<String> = if !ruleset.reads_custom_traits() {
                        None
                    } else if let Some(t) = p.traits.take() {
                        Some(t)
                    } else {
                        tx.prepare_cached(
                            "SELECT traits FROM profiles WHERE space_id = ?1 AND profile_id = ?2",
                        )?
                        .query_row(params![space_id, root], |r| r.get::<_, String>(0))
                        .optional()?
                    };
                    return Ok(Some((space_id, root, p, traits, Arc::clone(ruleset))));
                }
                Ok(None)
            },
            |(space_id, root, mut p, traits, ruleset)| {
                let traits: Traits = match traits {
                    Some(t) => serde_json::from_str(&t)?,
                    None => Traits::new(),
                };
                let Recomputed {
                    values,
                    changes,
                    due,
                } = recompute(&ruleset, &mut p.state, p.stored, &traits, p.now);
                let size = p.row.as_ref().map_or(0, |r| r.state.len());
                let state = encode_state(&p.state, size + 64)?;
                let computed = serde_json::to_string(&values)?;
                // Nothing to write when the state, the values and the next
                // change are what is stored (a recompute that time did not
                // move); there are no changes then either.
                let unchanged = p
                    .row
                    .as_ref()
                    .is_some_and(|r| r.due == due && r.state == state && r.computed == computed);
                Ok::<_, StoreError>(Flushed {
                    space_id,
                    root,
                    write: (!unchanged).then_some((state, computed)),
                    due,
                    changes,
                    now: p.now,
                })
            },
            |f| {
                let Flushed {
                    space_id,
                    root,
                    write,
                    due,
                    changes,
                    now,
                } = f?;
                stats.recomputed += 1;
                let Some((state, computed)) = write else {
                    return Ok(());
                };
                stats.written += 1;
                tx.prepare_cached(
                    "INSERT INTO compute_states (space_id, profile_id, state, computed, due)
                     VALUES (?1, ?2, ?3, ?4, ?5)
                     ON CONFLICT (space_id, profile_id) DO UPDATE SET state = excluded.state,
                       computed = excluded.computed, due = excluded.due",
                )?
                .execute(params![space_id, root, state, computed, due])?;
                let mut insert = tx.prepare_cached(
                    "INSERT INTO changes (space_id, profile_id, key, class, old, new, at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                )?;
                for c in &changes {
                    insert.execute(params![
                        space_id,
                        root,
                        c.key,
                        c.class.as_str(),
                        c.old.as_ref().map(Value::to_string),
                        c.new.to_string(),
                        now
                    ])?;
                }
                stats.changes += changes.len() as u64;
                Ok::<_, StoreError>(())
            },
        )
    }
}

impl ComputeWorker {
    pub fn new(store: Arc<SqliteStore>) -> Arc<Self> {
        Arc::new(Self {
            store,
            state: Mutex::new(WorkerState::default()),
        })
    }

    pub fn stats(&self) -> ComputeStats {
        lock(&self.state).stats.clone()
    }

    /// Recorded events not folded in yet, and the age of the oldest (by
    /// its `receivedAt`); pending recompute requests count as entries.
    pub fn lag(&self) -> Result<super::Lag> {
        let conn = self.store.reader()?;
        let folded = cursor(&conn, EVENTS_CURSOR)?;
        let events: i64 =
            conn.query_row("SELECT coalesce(max(seq), 0) FROM events", [], |r| r.get(0))?;
        let requests: i64 = conn.query_row(
            "SELECT coalesce(max(seq), 0) FROM compute_requests",
            [],
            |r| r.get(0),
        )?;
        let served = cursor(&conn, REQUESTS_CURSOR)?;
        let oldest: Option<String> = if events > folded {
            conn.prepare_cached(
                "SELECT CASE WHEN json_valid(body) THEN json_extract(body, '$.receivedAt') END
                 FROM events WHERE seq > ?1
                 ORDER BY seq LIMIT 1",
            )?
            .query_row([folded], |r| r.get(0))
            .optional()?
            .flatten()
        } else {
            None
        };
        let pending = (events - folded).max(0) + (requests - served).max(0);
        Ok(super::Lag::of(
            pending,
            oldest.and_then(|o| kindred_domain::event::parse_time(&o)),
            now_millis(),
        ))
    }

    /// Whether every event and request so far is folded in and no backfill runs.
    pub fn is_idle(&self) -> Result<bool> {
        if self.lag()?.events > 0 {
            return Ok(false);
        }
        let backfilling: bool = self.store.reader()?.query_row(
            "SELECT EXISTS (SELECT 1 FROM definitions WHERE status = 'backfilling' AND deleted = 0)",
            [],
            |r| r.get(0),
        )?;
        Ok(!backfilling)
    }

    fn ruleset(
        state: &mut WorkerState,
        tx: &Transaction<'_>,
        space_id: &str,
    ) -> Result<Arc<Ruleset>> {
        let version = set_version(tx, space_id)?;
        if let Some((v, r)) = state.rulesets.get(space_id) {
            if *v == version {
                return Ok(Arc::clone(r));
            }
        }
        let ruleset = Arc::new(Ruleset::new(load_definitions(tx, space_id)?)?);
        state
            .rulesets
            .insert(space_id.to_string(), (version, Arc::clone(&ruleset)));
        Ok(ruleset)
    }

    /// [`ComputeWorker::ruleset`], looked up once per space per batch: no
    /// definition can change during a batch, since definition writes take
    /// the same writer.
    fn ruleset_in_batch(
        state: &mut WorkerState,
        tx: &Transaction<'_>,
        seen: &mut HashMap<String, Arc<Ruleset>>,
        space_id: &str,
    ) -> Result<Arc<Ruleset>> {
        if let Some(r) = seen.get(space_id) {
            return Ok(Arc::clone(r));
        }
        let r = Self::ruleset(state, tx, space_id)?;
        seen.insert(space_id.to_string(), Arc::clone(&r));
        Ok(r)
    }

    fn now_for(state: &WorkerState, space_id: &str) -> Millis {
        now_millis().max(state.clock.get(space_id).copied().unwrap_or(0))
    }

    /// Folds the next events into their profiles' states; returns how many
    /// events it consumed.
    pub fn run_events(&self, limit: usize) -> Result<usize> {
        let mut state = lock(&self.state);
        let mut conn = self.store.compute_writer();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Deferred)?;
        let after = cursor(&tx, EVENTS_CURSOR)?;
        // Bodies are read (in the same pass) only for spaces with definitions.
        let active: Vec<String> = tx
            .prepare_cached("SELECT DISTINCT space_id FROM definitions WHERE deleted = 0")?
            .query_map([], |r| r.get(0))?
            .collect::<rusqlite::Result<_>>()?;
        type Row = (i64, String, Option<String>, Option<String>);
        let rows: Vec<Row> = {
            let mut stmt = tx.prepare_cached(
                "SELECT seq, space_id, profile_id, body FROM events WHERE seq > ?1 ORDER BY seq LIMIT ?2",
            )?;
            let rows = stmt.query_map(params![after, limit as i64], |r| {
                let space_id: String = r.get(1)?;
                let body = if active.contains(&space_id) {
                    r.get(3)?
                } else {
                    None
                };
                Ok((r.get(0)?, space_id, r.get(2)?, body))
            })?;
            rows.collect::<rusqlite::Result<_>>()?
        };
        let Some(last) = rows.last().map(|r| r.0) else {
            return Ok(0);
        };
        let mut seen = HashMap::new();
        let mut batch = Batch {
            tx: &tx,
            // Events arrive while identity resolution runs: helper threads
            // here took CPU from it (ingest -23.5% with them, -4.5% without,
            // see BENCHMARKS.md) and compute caught up no sooner.
            threads: 1,
            profiles: BTreeMap::new(),
            stats: ComputeStats::default(),
        };
        // Each event's profile's root, looked up once per batch.
        let mut roots: HashMap<(&str, &str), String> = HashMap::new();
        let mut resolved = Vec::with_capacity(rows.len());
        for (seq, space_id, profile_id, body) in &rows {
            let (Some(profile_id), Some(body)) = (profile_id, body) else {
                continue;
            };
            // (A space with definitions has a body: see `active`.)
            let ruleset = Self::ruleset_in_batch(&mut state, &tx, &mut seen, space_id)?;
            let (root, traits) = match roots.get(&(space_id.as_str(), profile_id.as_str())) {
                Some(root) => (root.clone(), None),
                None => {
                    let Some((root, traits)) =
                        root_with_traits(&tx, space_id, profile_id, ruleset.reads_custom_traits())?
                    else {
                        continue;
                    };
                    roots.insert((space_id, profile_id), root.clone());
                    (root, traits)
                }
            };
            let now = Self::now_for(&state, space_id);
            resolved.push((ruleset, space_id, root, traits, *seq, now, body));
        }
        // Parsing the events and decoding the states are CPU work (done on
        // `batch.threads` threads); folding the events in stays in order.
        let events = par_map(batch.threads, resolved.iter().map(|r| r.6).collect(), |b| {
            parse_stored_event(b)
        });
        batch.preload(
            resolved
                .iter()
                .map(|(ruleset, space_id, root, _, _, now, _)| {
                    (Arc::clone(ruleset), (*space_id).clone(), root.clone(), *now)
                })
                .collect(),
        )?;
        for ((ruleset, space_id, root, traits, seq, now, _), event) in
            resolved.into_iter().zip(events)
        {
            let _span = info_span!("compute", space_id = %space_id, seq).entered();
            let event = event?;
            let loaded = batch.touch(&ruleset, space_id, &root, seq, now, traits)?;
            apply_event(&ruleset, &mut loaded.state, &event);
            // Identify calls change the traits audiences may read.
            loaded.dirty = true;
            batch.stats.events += 1;
        }
        batch.flush(&state.rulesets)?;
        let stats = std::mem::take(&mut batch.stats);
        set_cursor(&tx, EVENTS_CURSOR, last)?;
        tx.commit()?;
        add(&mut state.stats, &stats);
        Ok(rows.len())
    }

    /// Serves the next recompute requests (lookback sweeps).
    pub fn run_requests(&self, limit: usize) -> Result<usize> {
        let mut state = lock(&self.state);
        let mut conn = self.store.compute_writer();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Deferred)?;
        let after = cursor(&tx, REQUESTS_CURSOR)?;
        let rows: Vec<(i64, String, String, i64)> = {
            let mut stmt = tx.prepare_cached(
                "SELECT seq, space_id, profile_id, as_of FROM compute_requests WHERE seq > ?1 ORDER BY seq LIMIT ?2",
            )?;
            let rows = stmt.query_map(params![after, limit as i64], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
            })?;
            rows.collect::<rusqlite::Result<_>>()?
        };
        let Some(last) = rows.last().map(|r| r.0) else {
            return Ok(0);
        };
        let history_before = cursor(&tx, EVENTS_CURSOR)? + 1;
        let mut seen = HashMap::new();
        let mut batch = Batch {
            tx: &tx,
            threads: parallel::threads(),
            profiles: BTreeMap::new(),
            stats: ComputeStats::default(),
        };
        let mut resolved = Vec::with_capacity(rows.len());
        for (_, space_id, profile_id, as_of) in &rows {
            let clock = state.clock.entry(space_id.clone()).or_insert(0);
            *clock = (*clock).max(*as_of);
            let ruleset = Self::ruleset_in_batch(&mut state, &tx, &mut seen, space_id)?;
            let Some((root, traits)) =
                root_with_traits(&tx, space_id, profile_id, ruleset.reads_custom_traits())?
            else {
                continue;
            };
            resolved.push((ruleset, space_id, root, traits, (*as_of).max(now_millis())));
        }
        batch.preload(
            resolved
                .iter()
                .map(|(ruleset, space_id, root, _, now)| {
                    (Arc::clone(ruleset), (*space_id).clone(), root.clone(), *now)
                })
                .collect(),
        )?;
        for (ruleset, space_id, root, traits, now) in resolved {
            let loaded = batch.touch(&ruleset, space_id, &root, history_before, now, traits)?;
            loaded.dirty = true;
            batch.stats.requests += 1;
        }
        batch.flush(&state.rulesets)?;
        let stats = std::mem::take(&mut batch.stats);
        set_cursor(&tx, REQUESTS_CURSOR, last)?;
        // The last served row stays: `seq` is a plain rowid, which an
        // empty table would hand out again from 1, behind the cursor.
        tx.execute("DELETE FROM compute_requests WHERE seq < ?1", [last])?;
        tx.commit()?;
        add(&mut state.stats, &stats);
        Ok(rows.len())
    }

    /// Visits the next chunk of root profiles of spaces with backfilling
    /// definitions; returns how many profiles it visited.
    pub fn run_backfill(&self) -> Result<usize> {
        let mut state = lock(&self.state);
        let mut conn = self.store.compute_writer();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Deferred)?;
        let space: Option<(String, Option<String>)> = tx
            .query_row(
                "SELECT s.space_id, s.backfill_after FROM definition_sets s
                 WHERE EXISTS (SELECT 1 FROM definitions d WHERE d.space_id = s.space_id
                               AND d.status = 'backfilling' AND d.deleted = 0)
                 LIMIT 1",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        let Some((space_id, after)) = space else {
            return Ok(0);
        };
        let ruleset = Self::ruleset(&mut state, &tx, &space_id)?;
        let roots: Vec<String> = {
            let mut stmt = tx.prepare_cached(
                "SELECT profile_id FROM profiles WHERE space_id = ?1 AND parent_id IS NULL AND profile_id > ?2
                 ORDER BY profile_id LIMIT ?3",
            )?;
            let rows = stmt.query_map(
                params![space_id, after.unwrap_or_default(), BACKFILL_CHUNK as i64],
                |r| r.get(0),
            )?;
            rows.collect::<rusqlite::Result<_>>()?
        };
        let history_before = cursor(&tx, EVENTS_CURSOR)? + 1;
        let now = Self::now_for(&state, &space_id);
        let mut batch = Batch {
            tx: &tx,
            threads: parallel::threads(),
            profiles: BTreeMap::new(),
            stats: ComputeStats::default(),
        };
        let visited = roots.len();
        let outcome = roots.iter().try_for_each(|root| {
            batch.touch(&ruleset, &space_id, root, history_before, now, None)?;
            Ok::<_, StoreError>(())
        });
        let outcome = outcome.and_then(|()| batch.flush(&state.rulesets));
        if let Err(e) = outcome {
            drop(batch);
            drop(tx);
            error!(space_id = %space_id, error = %e, "backfill failed");
            conn.execute(
                "UPDATE definitions SET status = 'failed', error = ?2
                 WHERE space_id = ?1 AND status = 'backfilling' AND deleted = 0",
                params![
                    space_id,
                    "the profiles' history could not be computed; see the server log"
                ],
            )?;
            return Ok(visited.max(1));
        }
        let stats = std::mem::take(&mut batch.stats);
        if visited < BACKFILL_CHUNK {
            tx.execute(
                "UPDATE definitions SET status = 'ready', done = total
                 WHERE space_id = ?1 AND status = 'backfilling' AND deleted = 0",
                [&space_id],
            )?;
            info!(space_id = %space_id, "backfill finished");
        } else {
            tx.execute(
                "UPDATE definitions SET done = min(done + ?2, total)
                 WHERE space_id = ?1 AND status = 'backfilling' AND deleted = 0",
                params![space_id, visited as i64],
            )?;
        }
        tx.execute(
            "UPDATE definition_sets SET backfill_after = ?2 WHERE space_id = ?1",
            params![space_id, roots.last()],
        )?;
        tx.commit()?;
        add(&mut state.stats, &stats);
        Ok(visited.max(1))
    }

    /// One round: events, then requests, then a backfill chunk.
    pub fn run_once(&self) -> Result<usize> {
        use super::health::catch_panic;
        let events = catch_panic(|| self.run_events(EVENTS_PER_BATCH))
            .or_else(|e| self.isolate(EVENTS_CURSOR, e, |w| catch_panic(|| w.run_events(1))))?;
        let requests = catch_panic(|| self.run_requests(EVENTS_PER_BATCH))
            .or_else(|e| self.isolate(REQUESTS_CURSOR, e, |w| catch_panic(|| w.run_requests(1))))?;
        Ok(events + requests + self.run_backfill()?)
    }

    /// After a failed batch: retries the entries one at a time, and skips
    /// (with an error in the log) one that keeps failing, so that it cannot
    /// hold up everything behind it. Storage errors are only retried.
    fn isolate(
        &self,
        name: &str,
        first: StoreError,
        step: impl Fn(&Self) -> Result<usize>,
    ) -> Result<usize> {
        let transient = |e: &StoreError| matches!(e, StoreError::Sqlite(_) | StoreError::Closed);
        if transient(&first) {
            return Err(first);
        }
        let mut last = first;
        for _ in 0..3 {
            match step(self) {
                Ok(n) => return Ok(n),
                Err(e) if transient(&e) => return Err(e),
                Err(e) => last = e,
            }
        }
        let table = if name == EVENTS_CURSOR {
            "events"
        } else {
            "compute_requests"
        };
        let mut conn = self.store.compute_writer();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Deferred)?;
        let after = cursor(&tx, name)?;
        let next: Option<i64> = tx.query_row(
            &format!("SELECT min(seq) FROM {table} WHERE seq > ?1"),
            [after],
            |r| r.get(0),
        )?;
        if let Some(seq) = next {
            set_cursor(&tx, name, seq)?;
            tx.execute(
                "INSERT OR REPLACE INTO compute_set_aside (queue, seq, reason, at)
                 VALUES (?1, ?2, ?3, ?4)",
                params![table, seq, last.to_string(), now_millis()],
            )?;
            tx.commit()?;
            drop(conn);
            error!(seq, queue = table, error = %last, "the compute step skipped an entry it cannot process");
            lock(&self.state).stats.skipped += 1;
        }
        Ok(1)
    }

    /// Runs until everything so far is computed.
    pub fn drain(&self) -> Result<()> {
        while self.run_once()? > 0 {}
        Ok(())
    }

    /// Runs on a thread of its own until `stop` is set, with the hourly
    /// lookback sweep of every space.
    /// Runs the worker on its own thread under [`super::supervise`].
    pub fn spawn(
        self: &Arc<Self>,
        stop: Arc<AtomicBool>,
        health: Arc<super::WorkerHealth>,
    ) -> std::thread::JoinHandle<()> {
        let worker = Arc::clone(self);
        std::thread::Builder::new()
            .name("kindred-compute".into())
            .spawn(move || {
                give_way_to_identity();
                let mut last_sweep = Instant::now();
                super::supervise(&health, &stop, || {
                    if last_sweep.elapsed() >= Duration::from_secs(3600) {
                        last_sweep = Instant::now();
                        match worker.store.sweep_all(now_millis()) {
                            Ok(n) => info!(profiles = n, "hourly lookback sweep"),
                            Err(e) => error!(error = %e, "hourly lookback sweep failed"),
                        }
                    }
                    // A short batch: let more events gather first, so
                    // that each profile's state is read and written once
                    // for several events (at most 20 ms of lag).
                    if worker.run_once()? < SMALL_BATCH {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    Ok(())
                })
            })
            .expect("spawning the compute worker thread")
    }
}

/// Identity resolution is on the path from every event to its profile;
/// computed values may lag. So when the CPU is contended the compute
/// thread gives way (niceness 9 on Linux) and uses what is left; on an
/// idle machine it runs at full speed.
fn give_way_to_identity() {
    use thread_priority::{set_current_thread_priority, ThreadPriority, ThreadPriorityValue};
    let result = ThreadPriorityValue::try_from(25u8)
        .map_err(|e| e.to_string())
        .and_then(|p| {
            set_current_thread_priority(ThreadPriority::Crossplatform(p))
                .map_err(|e| format!("{e:?}"))
        });
    if let Err(e) = result {
        info!(error = %e, "the compute thread keeps the default priority");
    }
}

fn add(total: &mut ComputeStats, s: &ComputeStats) {
    total.events += s.events;
    total.requests += s.requests;
    total.recomputed += s.recomputed;
    total.written += s.written;
    total.rebuilt += s.rebuilt;
    total.changes += s.changes;
}
