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
use rusqlite::{params, Connection, OptionalExtension, Transaction};
use serde_json::Value;
use tracing::info_span;

use super::SqliteStore;
use crate::sync::{
    current_calls, secret_context, Attempt, DeadLetter, DeliveryError, DestinationRecord,
    DestinationStatus, Destinations, Outbox, PendingCall, Target, Targets,
};
use crate::{now_millis, Result, StoreError};

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
        let settings = Settings::parse(&stored)
            .map_err(|e| StoreError::Undecodable(format!("stored destination settings: {e}")))?
            .0;
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

impl Row {
    fn position(&self) -> SyncPosition {
        SyncPosition {
            initial_pending: self.initial_pending,
            synced: self.synced,
            since_change: self.since_change,
        }
    }

    fn record(&self) -> DestinationRecord {
        DestinationRecord {
            destination_id: self.destination_id.clone(),
            name: self.name.clone(),
            settings: self.settings.clone(),
            has_secret: self.secret.is_some(),
            version: self.version,
            initial_sync_pending: self.initial_pending,
            created_at: self.created_at,
            updated_at: self.updated_at,
        }
    }
}

impl SqliteStore {
    /// One transaction on `sync.db`. Deferred, not immediate: `BEGIN
    /// IMMEDIATE` would take the write lock of every attached database too,
    /// stalling the identity and compute writers. This connection is the
    /// only writer of `sync.db`, so a deferred transaction never has to
    /// wait to upgrade.
    pub(crate) fn sync_tx<T>(&self, f: impl FnOnce(&Transaction<'_>) -> Result<T>) -> Result<T> {
        let mut conn = self.sync_writer();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Deferred)?;
        let out = f(&tx)?;
        tx.commit()?;
        Ok(out)
    }

    fn put_destination_now(
        &self,
        space_id: &str,
        destination_id: &str,
        name: Option<String>,
        settings: Settings,
        secret: Option<String>,
    ) -> Result<(DestinationRecord, bool)> {
        let now = now_millis();
        let sealed = secret.map(|s| {
            self.sealer
                .seal(&s, &secret_context(space_id, destination_id))
        });
        self.sync_tx(|tx| {
            let old = rows(
                tx,
                "WHERE space_id = ?1 AND destination_id = ?2",
                &[&space_id, &destination_id],
            )?
            .pop();
            check_secret(&settings, old.as_ref().map(|o| &o.settings), sealed.is_some())
                .map_err(|e| StoreError::Invalid(e.to_string()))?;
            let settings_json = settings.to_json().to_string();
            let created = old.is_none();
            if created {
                // Counted in the same write transaction as the insert.
                let count: i64 = tx.query_row(
                    "SELECT COUNT(*) FROM destinations WHERE space_id = ?1",
                    [&space_id],
                    |r| r.get(0),
                )?;
                if count as usize >= kindred_domain::sync::MAX_DESTINATIONS {
                    return Err(StoreError::Invalid(
                        kindred_domain::sync::too_many_destinations().to_string(),
                    ));
                }
            }
            match old {
                None => {
                    tx.prepare_cached(
                        "INSERT INTO destinations (space_id, destination_id, name, settings, secret,
                             version, created_at, updated_at, since_change, since_merge, initial_pending)
                         VALUES (?1, ?2, ?3, ?4, ?5, 1, ?6, ?6, 0,
                             (SELECT coalesce(max(seq), 0) FROM s.merge_log), 1)",
                    )?
                    .execute(params![space_id, destination_id, name, settings_json, sealed, now])?;
                    tx.prepare_cached(
                        "INSERT OR REPLACE INTO destination_stats (space_id, destination_id, delivered)
                         VALUES (?1, ?2, 0)",
                    )?
                    .execute(params![space_id, destination_id])?;
                }
                Some(old) => {
                    // What must be sent first: the keys this replace adds,
                    // with those of a pass still pending.
                    let (pending, keys) = settings.pending_after(
                        &old.settings,
                        old.initial_pending,
                        old.initial_keys.clone(),
                    );
                    let keys = keys.map(|k| serde_json::to_string(&k)).transpose()?;
                    tx.prepare_cached(
                        "UPDATE destinations SET name = ?3, settings = ?4,
                             secret = coalesce(?5, secret), version = version + 1,
                             updated_at = ?6, initial_pending = ?7, initial_keys = ?8
                         WHERE space_id = ?1 AND destination_id = ?2",
                    )?
                    .execute(params![
                        space_id,
                        destination_id,
                        name,
                        settings_json,
                        sealed,
                        now,
                        pending,
                        keys
                    ])?;
                }
            }
            let row = rows(
                tx,
                "WHERE space_id = ?1 AND destination_id = ?2",
                &[&space_id, &destination_id],
            )?
            .pop()
            .ok_or(StoreError::Invariant("a destination just written is gone"))?;
            Ok((row.record(), created))
        })
    }

    /// Fans out what was logged since the cursors: initial syncs of new
    /// destinations, `alias` calls for merges, the calls of each change.
    /// Returns how many calls were queued.
    pub fn fan_out(&self) -> Result<FanOut> {
        let span = info_span!("sync_fan_out");
        let _e = span.enter();
        let pending = {
            let conn = self.sync_reader()?;
            rows(&conn, "WHERE initial_pending = 1", &[])?
        };
        let mut initial = (0, 0);
        for d in pending.iter().filter(|d| d.settings.enabled) {
            initial.0 += 1;
            initial.1 += self.initial_sync(d)?;
        }
        let mut step = self.fan_out_logs()?;
        step.initial_syncs = initial.0;
        step.calls += initial.1;
        Ok(step)
    }

    /// Queues the current value of every selected key of every profile of
    /// the destination's space, then moves its change horizon to the end
    /// of the change log as of the same snapshot: from then on the
    /// destination gets changes only. The states are read in one read
    /// transaction (so values and horizon agree) while the calls are
    /// written in chunks, each its own short write transaction: other
    /// destinations' deliveries and the API go on meanwhile. If the
    /// destination is replaced or deleted during the pass, the pass stops
    /// (a replace that needs one starts a new pass). A crash mid-pass
    /// starts it again; the calls already sent are sent again with the same
    /// messageIds.
    fn initial_sync(&self, d: &Row) -> Result<u64> {
        const CHUNK: usize = 5_000;
        let reader = self.reader()?;
        let snapshot = reader.unchecked_transaction()?;
        let horizon: i64 =
            snapshot.query_row("SELECT coalesce(max(seq), 0) FROM c.changes", [], |r| {
                r.get(0)
            })?;
        let current = |tx: &Transaction<'_>| -> Result<bool> {
            Ok(tx
                .prepare_cached(
                    "SELECT 1 FROM destinations WHERE space_id = ?1 AND destination_id = ?2
                       AND version = ?3 AND initial_pending = 1",
                )?
                .exists(params![d.space_id, d.destination_id, d.version as i64])?)
        };
        let flush = |calls: &mut Vec<(String, Value)>, last: bool| -> Result<bool> {
            self.sync_tx(|tx| {
                if !current(tx)? {
                    return Ok(false);
                }
                let mut insert = Inserter::new(tx)?;
                for (profile_id, call) in calls.iter() {
                    insert.call(d, profile_id, call)?;
                }
                if last {
                    tx.prepare_cached(
                        "UPDATE destinations SET initial_pending = 0, initial_keys = NULL,
                             since_change = coalesce(?3, since_change), synced = 1
                         WHERE space_id = ?1 AND destination_id = ?2",
                    )?
                    .execute(params![
                        d.space_id,
                        d.destination_id,
                        d.position().horizon_after_pass(horizon)
                    ])?;
                }
                Ok(true)
            })
            .inspect(|_| calls.clear())
        };
        let mut ids = IdCache::default();
        let mut buffer: Vec<(String, Value)> = Vec::new();
        let mut queued = 0u64;
        let now = format_millis(now_millis());
        let mut stmt = snapshot
            .prepare("SELECT profile_id, computed FROM c.compute_states WHERE space_id = ?1")?;
        let mut states = stmt.query([&d.space_id])?;
        while let Some(row) = states.next()? {
            let profile_id: String = row.get(0)?;
            let computed: String = row.get(1)?;
            let mut computed: crate::ComputedValues = serde_json::from_str(&computed)?;
            if let Some(keys) = &d.initial_keys {
                computed.retain(|k, _| keys.contains(k));
            }
            let (root, root_ids) = ids.root(&snapshot, &d.space_id, &profile_id)?;
            let calls = current_calls(
                &d.space_id,
                &d.destination_id,
                &d.settings,
                &root,
                &root_ids,
                &computed,
                &now,
            );
            buffer.extend(calls.into_iter().map(|call| (root.clone(), call)));
            if buffer.len() >= CHUNK {
                queued += buffer.len() as u64;
                if !flush(&mut buffer, false)? {
                    return Ok(queued);
                }
            }
        }
        queued += buffer.len() as u64;
        flush(&mut buffer, true)?;
        Ok(queued)
    }

    /// One transaction: merges and changes after the cursors.
    fn fan_out_logs(&self) -> Result<FanOut> {
        self.sync_tx(|tx| {
            let mut out = FanOut::default();
            let dests = rows(tx, "WHERE 1 = 1", &[])?;
            if dests.is_empty() {
                // Nothing to send: keep the cursors at the logs' ends so a
                // first destination starts from its initial sync.
                let changes: i64 =
                    tx.query_row("SELECT coalesce(max(seq), 0) FROM c.changes", [], |r| {
                        r.get(0)
                    })?;
                let merges: i64 =
                    tx.query_row("SELECT coalesce(max(seq), 0) FROM s.merge_log", [], |r| {
                        r.get(0)
                    })?;
                if cursor(tx, CHANGES_CURSOR)? != changes {
                    set_cursor(tx, CHANGES_CURSOR, changes)?;
                }
                if cursor(tx, MERGES_CURSOR)? != merges {
                    set_cursor(tx, MERGES_CURSOR, merges)?;
                }
                return Ok(out);
            }
            let mut ids = IdCache::default();
            let mut insert = Inserter::new(tx)?;
            let mut by_space: HashMap<&str, Vec<&Row>> = HashMap::new();
            for d in dests.iter().filter(|d| d.position().live(&d.settings)) {
                by_space.entry(d.space_id.as_str()).or_default().push(d);
            }

            // Merges, then changes: an alias reaches a destination before
            // the changes logged after the merge.
            let after = cursor(tx, MERGES_CURSOR)?;
            let mut last = after;
            {
                let mut stmt = tx.prepare_cached(
                    "SELECT seq, space_id, child_id, parent_id, merged_at FROM s.merge_log
                     WHERE seq > ?1 ORDER BY seq LIMIT ?2",
                )?;
                let merges = stmt.query_map(params![after, MERGES_PER_STEP as i64], |r| {
                    Ok((
                        r.get::<_, i64>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, String>(2)?,
                        r.get::<_, String>(3)?,
                        r.get::<_, i64>(4)?,
                    ))
                })?;
                for m in merges {
                    let (seq, space_id, child, parent, at) = m?;
                    last = seq;
                    let Some(dests) = by_space.get(space_id.as_str()) else {
                        continue;
                    };
                    let mut one = || -> Result<()> {
                        for d in dests
                            .iter()
                            .filter(|d| d.position().receives_alias(&d.settings))
                            .filter(|d| seq > d.since_merge)
                        {
                            let child_ids = ids.own(tx, &space_id, &child)?;
                            let parent_ids = ids.own(tx, &space_id, &parent)?;
                            if let Some(call) = alias_call(
                                &space_id,
                                &d.destination_id,
                                seq,
                                &child_ids,
                                &parent_ids,
                                &format_millis(at),
                            ) {
                                insert.call(d, &parent, &call)?;
                                out.calls += 1;
                            }
                        }
                        Ok(())
                    };
                    set_aside_if_undecodable(
                        tx,
                        "merges",
                        seq,
                        &space_id,
                        super::health::catch_panic(&mut one),
                    )?;
                    out.merges += 1;
                }
            }
            if last > after {
                set_cursor(tx, MERGES_CURSOR, last)?;
            }

            let after = cursor(tx, CHANGES_CURSOR)?;
            let mut last = after;
            {
                let mut stmt = tx.prepare_cached(
                    "SELECT seq, space_id, profile_id, key, class, new, at FROM c.changes
                     WHERE seq > ?1 ORDER BY seq LIMIT ?2",
                )?;
                let changes = stmt.query_map(params![after, CHANGES_PER_STEP as i64], |r| {
                    Ok((
                        r.get::<_, i64>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, String>(2)?,
                        r.get::<_, String>(3)?,
                        r.get::<_, String>(4)?,
                        r.get::<_, String>(5)?,
                        r.get::<_, i64>(6)?,
                    ))
                })?;
                for c in changes {
                    let (seq, space_id, profile_id, key, class, new, at) = c?;
                    last = seq;
                    out.changes += 1;
                    let Some(dests) = by_space.get(space_id.as_str()) else {
                        continue;
                    };
                    let mut one = || -> Result<()> {
                        let class = Class::parse(&class).ok_or_else(|| {
                            StoreError::Undecodable(format!("unknown class {class:?}"))
                        })?;
                        let new: Value = serde_json::from_str(&new)?;
                        let at = format_millis(at);
                        let change = ChangeEntry {
                            seq: Some(seq),
                            key: &key,
                            class,
                            new: &new,
                            at: &at,
                        };
                        for d in dests
                            .iter()
                            .filter(|d| d.position().receives_change(&d.settings, seq, &key))
                        {
                            let (root, root_ids) = ids.root(tx, &space_id, &profile_id)?;
                            for call in change_calls(
                                &space_id,
                                &d.destination_id,
                                &d.settings,
                                &root,
                                &root_ids,
                                &change,
                            ) {
                                insert.call(d, &root, &call)?;
                                out.calls += 1;
                            }
                        }
                        Ok(())
                    };
                    set_aside_if_undecodable(
                        tx,
                        "changes",
                        seq,
                        &space_id,
                        super::health::catch_panic(&mut one),
                    )?;
                }
            }
            if last > after {
                set_cursor(tx, CHANGES_CURSOR, last)?;
            }
            out.more =
                out.changes >= CHANGES_PER_STEP as u64 || out.merges >= MERGES_PER_STEP as u64;
            Ok(out)
        })
    }
}

/// Passes a storage error on (the step is retried); records any other
/// failure of one log entry (an undecodable value, a damaged identifier
/// list) in `fan_out_set_aside` and logs it, so that the entries behind it
/// go on.
fn set_aside_if_undecodable(
    tx: &Connection,
    log: &str,
    seq: i64,
    space_id: &str,
    outcome: Result<()>,
) -> Result<()> {
    match outcome {
        Ok(()) => Ok(()),
        Err(e @ (StoreError::Sqlite(_) | StoreError::Closed)) => Err(e),
        Err(e) => {
            tracing::error!(space_id, log, seq, error = %e,
                            "a log entry the fan-out cannot decode was set aside");
            tx.prepare_cached(
                "INSERT OR REPLACE INTO fan_out_set_aside (log, seq, space_id, reason, at)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
            )?
            .execute(params![
                log,
                seq,
                space_id,
                e.to_string(),
                crate::now_millis()
            ])?;
            Ok(())
        }
    }
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

impl<'a> Inserter<'a> {
    fn new(tx: &'a Transaction<'_>) -> Result<Self> {
        Ok(Self {
            stmt: tx.prepare_cached(
                "INSERT INTO deliveries (space_id, destination_id, profile_id, call)
                 VALUES (?1, ?2, ?3, ?4)",
            )?,
        })
    }

    fn call(&mut self, d: &Row, profile_id: &str, call: &Value) -> Result<()> {
        self.stmt.execute(params![
            d.space_id,
            d.destination_id,
            profile_id,
            call.to_string()
        ])?;
        Ok(())
    }
}

/// A profile's root and the root's identifiers.
type RootIds = (String, Arc<Vec<IdentifierEntry>>);

/// Profiles' identifiers, read once per fan-out step.
#[derive(Default)]
struct IdCache {
    /// (space, profile) -> its root.
    roots: HashMap<(String, String), RootIds>,
}

impl IdCache {
    /// A profile's own identifiers and its parent, if merged.
    fn row(
        tx: &Connection,
        space_id: &str,
        profile_id: &str,
    ) -> Result<Option<(Option<String>, Vec<IdentifierEntry>)>> {
        let found = tx
            .prepare_cached(
                "SELECT parent_id, identifiers FROM profiles WHERE space_id = ?1 AND profile_id = ?2",
            )?
            .query_row(params![space_id, profile_id], |r| {
                Ok((r.get::<_, Option<String>>(0)?, r.get::<_, String>(1)?))
            })
            .optional()?;
        match found {
            None => Ok(None),
            Some((parent, ids)) => Ok(Some((parent, serde_json::from_str(&ids)?))),
        }
    }

    fn own(
        &mut self,
        tx: &Connection,
        space_id: &str,
        profile_id: &str,
    ) -> Result<Vec<IdentifierEntry>> {
        Ok(Self::row(tx, space_id, profile_id)?
            .map(|(_, ids)| ids)
            .unwrap_or_default())
    }

    /// The profile's current root and the root's identifiers (its whole
    /// tree's).
    fn root(&mut self, tx: &Connection, space_id: &str, profile_id: &str) -> Result<RootIds> {
        let key = (space_id.to_string(), profile_id.to_string());
        if let Some(found) = self.roots.get(&key) {
            return Ok(found.clone());
        }
        let mut current = profile_id.to_string();
        let mut found = (current.clone(), Arc::new(Vec::new()));
        // Parent chains are short; the bound guards against a cycle.
        for _ in 0..64 {
            match Self::row(tx, space_id, &current)? {
                None => break,
                Some((Some(parent), _)) => current = parent,
                Some((None, ids)) => {
                    found = (current.clone(), Arc::new(ids));
                    break;
                }
            }
        }
        self.roots.insert(key, found.clone());
        Ok(found)
    }
}

/// Runs the fan-out in the background of `kindred serve`.
pub struct SyncWorker {
    store: Arc<SqliteStore>,
}

impl SyncWorker {
    pub fn new(store: Arc<SqliteStore>) -> Arc<Self> {
        Arc::new(Self { store })
    }

    /// Fans out until `stop` is set, pausing briefly when caught up.
    /// Runs the fan-out on its own thread under [`super::supervise`].
    pub fn spawn(
        self: &Arc<Self>,
        stop: Arc<AtomicBool>,
        health: Arc<super::WorkerHealth>,
    ) -> std::thread::JoinHandle<()> {
        let me = Arc::clone(self);
        std::thread::Builder::new()
            .name("kindred-sync".into())
            .spawn(move || {
                super::supervise(&health, &stop, || {
                    if !me.store.fan_out()?.more {
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    Ok(())
                })
            })
            .expect("spawning the sync thread")
    }

    /// Changes and merges logged but not yet fanned out to the
    /// destinations' outboxes, and the age of the oldest change.
    pub fn lag(&self) -> Result<super::Lag> {
        let (changes_done, merges_done) = {
            let conn = self.store.sync_reader()?;
            (
                cursor(&conn, CHANGES_CURSOR)?,
                cursor(&conn, MERGES_CURSOR)?,
            )
        };
        let conn = self.store.reader()?;
        let changes: i64 =
            conn.query_row("SELECT coalesce(max(seq), 0) FROM c.changes", [], |r| {
                r.get(0)
            })?;
        let merges: i64 =
            conn.query_row("SELECT coalesce(max(seq), 0) FROM merge_log", [], |r| {
                r.get(0)
            })?;
        let oldest: Option<i64> = conn
            .prepare_cached("SELECT at FROM c.changes WHERE seq > ?1 ORDER BY seq LIMIT 1")?
            .query_row([changes_done], |r| r.get(0))
            .optional()?;
        let pending = (changes - changes_done).max(0) + (merges - merges_done).max(0);
        Ok(super::Lag::of(pending, oldest, crate::now_millis()))
    }

    /// Whether everything logged so far has been fanned out.
    pub fn is_caught_up(&self) -> Result<bool> {
        let conn = self.store.sync_writer();
        let changes: i64 =
            conn.query_row("SELECT coalesce(max(seq), 0) FROM c.changes", [], |r| {
                r.get(0)
            })?;
        let merges: i64 =
            conn.query_row("SELECT coalesce(max(seq), 0) FROM s.merge_log", [], |r| {
                r.get(0)
            })?;
        let pending: bool = conn.query_row(
            "SELECT EXISTS (SELECT 1 FROM destinations WHERE initial_pending = 1)",
            [],
            |r| r.get(0),
        )?;
        Ok(!pending
            && cursor(&conn, CHANGES_CURSOR)? >= changes
            && cursor(&conn, MERGES_CURSOR)? >= merges)
    }
}

fn status_of(conn: &Connection, space_id: &str, destination_id: &str) -> Result<DestinationStatus> {
    let mut status = DestinationStatus::default();
    let stats = conn
        .prepare_cached(
            "SELECT delivered, last_success_at, last_error_at, last_error_status, last_error_message
             FROM destination_stats WHERE space_id = ?1 AND destination_id = ?2",
        )?
        .query_row(params![space_id, destination_id], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, Option<i64>>(1)?,
                r.get::<_, Option<i64>>(2)?,
                r.get::<_, Option<i64>>(3)?,
                r.get::<_, Option<String>>(4)?,
            ))
        })
        .optional()?;
    if let Some((delivered, success, error_at, error_status, message)) = stats {
        status.delivered = delivered as u64;
        status.last_success_at = success;
        status.last_error = error_at.map(|at| DeliveryError {
            status: error_status.map(|s| s as u16),
            message: message.unwrap_or_default(),
            at,
        });
    }
    let (pending, retrying, dead): (i64, i64, i64) = conn
        .prepare_cached(
            "SELECT coalesce(sum(dead = 0 AND attempts = 0), 0),
                    coalesce(sum(dead = 0 AND attempts > 0), 0),
                    coalesce(sum(dead = 1), 0)
             FROM deliveries WHERE space_id = ?1 AND destination_id = ?2",
        )?
        .query_row(params![space_id, destination_id], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })?;
    status.pending = pending as u64;
    status.retrying = retrying as u64;
    status.dead = dead as u64;
    Ok(status)
}

#[async_trait]
impl Destinations for SqliteStore {
    async fn put_destination(
        &self,
        space_id: &str,
        destination_id: &str,
        name: Option<String>,
        settings: Settings,
        secret: Option<String>,
    ) -> Result<(DestinationRecord, bool)> {
        let (space_id, destination_id) = (space_id.to_string(), destination_id.to_string());
        self.blocking(move |s| {
            s.put_destination_now(&space_id, &destination_id, name, settings, secret)
        })
        .await
    }

    async fn destination(
        &self,
        space_id: &str,
        destination_id: &str,
    ) -> Result<Option<DestinationRecord>> {
        let (space_id, destination_id) = (space_id.to_string(), destination_id.to_string());
        self.blocking(move |s| {
            let conn = s.sync_reader()?;
            Ok(rows(
                &conn,
                "WHERE space_id = ?1 AND destination_id = ?2",
                &[&space_id, &destination_id],
            )?
            .pop()
            .map(|r| r.record()))
        })
        .await
    }

    async fn destinations(&self, space_id: &str) -> Result<Vec<DestinationRecord>> {
        let space_id = space_id.to_string();
        self.blocking(move |s| {
            let conn = s.sync_reader()?;
            Ok(rows(
                &conn,
                "WHERE space_id = ?1 ORDER BY destination_id",
                &[&space_id],
            )?
            .iter()
            .map(Row::record)
            .collect())
        })
        .await
    }

    async fn delete_destination(&self, space_id: &str, destination_id: &str) -> Result<bool> {
        let (space_id, destination_id) = (space_id.to_string(), destination_id.to_string());
        self.blocking(move |s| {
            s.sync_tx(|tx| {
                let gone = tx
                    .prepare_cached(
                        "DELETE FROM destinations WHERE space_id = ?1 AND destination_id = ?2",
                    )?
                    .execute(params![space_id, destination_id])?;
                for table in ["deliveries", "destination_stats"] {
                    tx.execute(
                        &format!("DELETE FROM {table} WHERE space_id = ?1 AND destination_id = ?2"),
                        params![space_id, destination_id],
                    )?;
                }
                Ok(gone > 0)
            })
        })
        .await
    }

    async fn destination_status(
        &self,
        space_id: &str,
        destination_id: &str,
    ) -> Result<Option<DestinationStatus>> {
        let (space_id, destination_id) = (space_id.to_string(), destination_id.to_string());
        self.blocking(move |s| {
            let conn = s.sync_reader()?;
            let exists = conn
                .prepare_cached(
                    "SELECT 1 FROM destinations WHERE space_id = ?1 AND destination_id = ?2",
                )?
                .exists(params![space_id, destination_id])?;
            if !exists {
                return Ok(None);
            }
            Ok(Some(status_of(&conn, &space_id, &destination_id)?))
        })
        .await
    }

    async fn dead_letters(
        &self,
        space_id: &str,
        destination_id: &str,
        limit: usize,
    ) -> Result<Vec<DeadLetter>> {
        let (space_id, destination_id) = (space_id.to_string(), destination_id.to_string());
        self.blocking(move |s| {
            let conn = s.sync_reader()?;
            let mut stmt = conn.prepare_cached(
                "SELECT seq, profile_id, call, attempts, coalesce(error, '') FROM deliveries
                 WHERE space_id = ?1 AND destination_id = ?2 AND dead = 1 ORDER BY seq LIMIT ?3",
            )?;
            let found = stmt.query_map(params![space_id, destination_id, limit as i64], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, i64>(3)?,
                    r.get::<_, String>(4)?,
                ))
            })?;
            let mut out = Vec::new();
            for f in found {
                let (seq, profile_id, call, attempts, error) = f?;
                out.push(DeadLetter {
                    seq,
                    profile_id,
                    call: serde_json::from_str(&call)?,
                    attempts: attempts as u32,
                    error,
                });
            }
            Ok(out)
        })
        .await
    }

    async fn replay(&self, space_id: &str, destination_id: &str) -> Result<u64> {
        let (space_id, destination_id) = (space_id.to_string(), destination_id.to_string());
        self.blocking(move |s| {
            s.sync_tx(|tx| {
                Ok(tx
                    .prepare_cached(
                        "UPDATE deliveries SET dead = 0, attempts = 0
                         WHERE space_id = ?1 AND destination_id = ?2 AND dead = 1",
                    )?
                    .execute(params![space_id, destination_id])? as u64)
            })
        })
        .await
    }
}

#[async_trait]
impl Targets for SqliteStore {
    async fn targets(&self) -> Result<Vec<Target>> {
        self.blocking(|s| {
            let conn = s.sync_reader()?;
            let mut out = Vec::new();
            for r in rows(&conn, "WHERE 1 = 1", &[])? {
                if !r.settings.enabled {
                    continue;
                }
                let secret = match &r.secret {
                    None => None,
                    Some(sealed) => Some(
                        s.sealer
                            .open(sealed, &secret_context(&r.space_id, &r.destination_id))?,
                    ),
                };
                out.push(Target {
                    space_id: r.space_id,
                    destination_id: r.destination_id,
                    version: r.version,
                    settings: r.settings,
                    secret,
                });
            }
            Ok(out)
        })
        .await
    }
}

#[async_trait]
impl Outbox for SqliteStore {
    async fn enqueue(
        &self,
        space_id: &str,
        destination_id: &str,
        calls: Vec<(String, Value)>,
    ) -> Result<()> {
        let (space_id, destination_id) = (space_id.to_string(), destination_id.to_string());
        self.blocking(move |s| {
            s.sync_tx(|tx| {
                let exists = tx
                    .prepare_cached(
                        "SELECT 1 FROM destinations WHERE space_id = ?1 AND destination_id = ?2",
                    )?
                    .exists(params![space_id, destination_id])?;
                if !exists {
                    return Err(StoreError::NotFound);
                }
                let mut stmt = tx.prepare_cached(
                    "INSERT INTO deliveries (space_id, destination_id, profile_id, call)
                     VALUES (?1, ?2, ?3, ?4)",
                )?;
                for (profile_id, call) in &calls {
                    stmt.execute(params![
                        space_id,
                        destination_id,
                        profile_id,
                        call.to_string()
                    ])?;
                }
                Ok(())
            })
        })
        .await
    }

    async fn next_calls(
        &self,
        space_id: &str,
        destination_id: &str,
        limit: usize,
    ) -> Result<Vec<PendingCall>> {
        let (space_id, destination_id) = (space_id.to_string(), destination_id.to_string());
        self.blocking(move |s| {
            let conn = s.sync_reader()?;
            let mut stmt = conn.prepare_cached(
                "SELECT seq, call, attempts FROM deliveries INDEXED BY deliveries_queue
                 WHERE space_id = ?1 AND destination_id = ?2 AND dead = 0 ORDER BY seq LIMIT ?3",
            )?;
            let found = stmt.query_map(params![space_id, destination_id, limit as i64], |r| {
                Ok(PendingCall {
                    seq: r.get(0)?,
                    call: r.get(1)?,
                    attempts: r.get::<_, i64>(2)? as u32,
                })
            })?;
            Ok(found.collect::<rusqlite::Result<Vec<_>>>()?)
        })
        .await
    }

    async fn record(
        &self,
        space_id: &str,
        destination_id: &str,
        seqs: &[i64],
        attempt: Attempt,
    ) -> Result<()> {
        let (space_id, destination_id) = (space_id.to_string(), destination_id.to_string());
        let seqs = seqs.to_vec();
        self.blocking(move |s| {
            s.sync_tx(|tx| {
                match &attempt {
                    Attempt::Delivered { at } => {
                        let mut del = tx.prepare_cached(
                            "DELETE FROM deliveries WHERE seq = ?1 AND space_id = ?2
                               AND destination_id = ?3 AND dead = 0",
                        )?;
                        let mut n = 0;
                        for seq in &seqs {
                            n += del.execute(params![seq, space_id, destination_id])?;
                        }
                        tx.prepare_cached(
                            "UPDATE destination_stats SET delivered = delivered + ?3,
                                 last_success_at = ?4
                             WHERE space_id = ?1 AND destination_id = ?2",
                        )?
                        .execute(params![
                            space_id,
                            destination_id,
                            n as i64,
                            at
                        ])?;
                    }
                    Attempt::Failed { error, dead } => {
                        let mut upd = tx.prepare_cached(
                            "UPDATE deliveries SET attempts = attempts + 1, dead = ?4, error = ?5
                             WHERE seq = ?1 AND space_id = ?2 AND destination_id = ?3 AND dead = 0",
                        )?;
                        let text = match error.status {
                            Some(code) => format!("{code}: {}", error.message),
                            None => error.message.clone(),
                        };
                        for seq in &seqs {
                            upd.execute(params![seq, space_id, destination_id, dead, text])?;
                        }
                        tx.prepare_cached(
                            "UPDATE destination_stats SET last_error_at = ?3,
                                 last_error_status = ?4, last_error_message = ?5
                             WHERE space_id = ?1 AND destination_id = ?2",
                        )?
                        .execute(params![
                            space_id,
                            destination_id,
                            error.at,
                            error.status,
                            error.message
                        ])?;
                    }
                }
                Ok(())
            })
        })
        .await
    }
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
