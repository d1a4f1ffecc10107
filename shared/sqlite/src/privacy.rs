//! Regulations on the embedded store: recorded in `store.db`, run in the
//! background one subject at a time (and resumed after a restart), and
//! the suppression list the identity worker checks before storing
//! anything of an event.
//!
//! Deleting a person touches four files that cannot share one
//! transaction, so the steps are ordered to be safe to repeat and to
//! leave nothing behind whatever runs meanwhile:
//! 1. the calls telling destinations the person is gone are queued
//!    (`sync.db`), marked so the purge below keeps them;
//! 2. one `store.db` transaction on the identity worker's own writer puts
//!    the person's identifiers on the suppression list and deletes their
//!    profiles, identifiers, events, links and merge records: an identity
//!    batch is wholly before it (and deleted by it) or after it (and
//!    suppressed);
//! 3. under `compute.db`'s writer (after any compute batch in flight)
//!    their computed state goes and their change log entries are blanked;
//! 4. under `sync.db`'s writer (after any fan-out in flight) their queued
//!    and dead calls go.
//!
//! A fan-out or compute step that starts after step 2 finds no profile
//! and writes nothing about the person.

use crate::body::StoredBody;
use std::collections::{BTreeSet, HashMap};

use async_trait::async_trait;
use kindred_domain::event::format_millis;
use kindred_domain::privacy::{
    identifier_hash, merges_after_split, split_identifiers, without_identifiers, RegulationRequest,
    RegulationType, SubjectStatus, BOUNDED_SUPPRESSION_RETENTION, VIOLATION_RETENTION,
};
use kindred_domain::{Identifier, IdentifierEntry, Millis};
use rusqlite::types::Value as SqlValue;
use rusqlite::{params, params_from_iter, Connection, OptionalExtension, Transaction};
use tracing::{error, info};

use super::{lock, SqliteStore};
use kindred_store::privacy::{
    new_regulation_id, Farewell, Privacy, RegulationRecord, SplitOutcome, SubjectRecord, Violation,
    ViolationPage,
};
use kindred_store::{now_millis, ProfileLookup, Result, StoreError};

pub(crate) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS regulations (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    space_id TEXT NOT NULL,
    regulation_id TEXT NOT NULL UNIQUE,
    regulation_type TEXT NOT NULL,
    subject_type TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    finished_at INTEGER
);
CREATE INDEX IF NOT EXISTS regulations_by_space ON regulations (space_id, seq);
-- subject_id is the subject in clear, kept only until its subject is done.
CREATE TABLE IF NOT EXISTS regulation_subjects (
    regulation_id TEXT NOT NULL,
    idx INTEGER NOT NULL,
    subject_id TEXT,
    subject_hash BLOB NOT NULL,
    status TEXT NOT NULL,
    reason TEXT,
    profiles_deleted INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (regulation_id, idx)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS regulation_subjects_pending ON regulation_subjects (status)
    WHERE status IN ('initialized', 'running');
-- Hashes only (kindred_domain::privacy::identifier_hash): the list
-- outlives the people it names.
CREATE TABLE IF NOT EXISTS suppressions (
    space_id TEXT NOT NULL,
    id_hash BLOB NOT NULL,
    subject_hash BLOB NOT NULL,
    received_before INTEGER,
    created_at INTEGER NOT NULL,
    PRIMARY KEY (space_id, id_hash, subject_hash)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS suppressions_by_subject ON suppressions (space_id, subject_hash);
-- The violations log (identifiers left out, and why); hashes, never values.
CREATE TABLE IF NOT EXISTS violations (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    space_id TEXT NOT NULL,
    profile_id TEXT,
    other_profile_id TEXT,
    message_id TEXT NOT NULL,
    id_type TEXT NOT NULL,
    id_hash TEXT NOT NULL,
    rule TEXT NOT NULL,
    detail TEXT NOT NULL,
    at INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS violations_by_space ON violations (space_id, seq);
CREATE INDEX IF NOT EXISTS violations_by_profile ON violations (space_id, profile_id) WHERE profile_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS violations_by_other ON violations (space_id, other_profile_id) WHERE other_profile_id IS NOT NULL;
-- Profiles split apart (each pair in both orders): they do not merge again.
CREATE TABLE IF NOT EXISTS split_blocks (
    space_id TEXT NOT NULL,
    a TEXT NOT NULL,
    b TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    PRIMARY KEY (space_id, a, b)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS privacy_counts (
    space_id TEXT PRIMARY KEY,
    suppressed_events INTEGER NOT NULL
) WITHOUT ROWID;
";

/// Subjects run between two updates of their statuses (and one clearing
/// of the queue).
const SLICE: usize = 256;

/// The `deliveries.profile_id` of the calls a regulation queued: the
/// purge of the person's calls keeps these.
fn farewell_marker(regulation_id: &str) -> String {
    format!("regulation:{regulation_id}")
}

/// Whether the space has any suppression, per space, for one write
/// transaction (nothing else writes the list meanwhile).
pub(crate) type SuppressionCache = HashMap<String, bool>;

/// The identity step's check: drops (and counts) an event that names a
/// suppressed person.
pub(crate) fn drop_if_suppressed(
    conn: &Connection,
    cache: &mut SuppressionCache,
    space_id: &str,
    ids: &[Identifier],
    received_at: Millis,
) -> Result<Option<Identifier>> {
    let any = match cache.get(space_id) {
        Some(any) => *any,
        None => {
            let any = conn
                .prepare_cached("SELECT 1 FROM suppressions WHERE space_id = ?1 LIMIT 1")?
                .exists([space_id])?;
            cache.insert(space_id.to_string(), any);
            any
        }
    };
    if !any {
        return Ok(None);
    }
    let mut stmt = conn.prepare_cached(
        "SELECT 1 FROM suppressions WHERE space_id = ?1 AND id_hash = ?2
           AND (received_before IS NULL OR received_before > ?3) LIMIT 1",
    )?;
    for id in ids {
        let hash = identifier_hash(space_id, id);
        if stmt.exists(params![space_id, &hash[..], received_at])? {
            conn.prepare_cached(
                "INSERT INTO privacy_counts (space_id, suppressed_events) VALUES (?1, 1)
                 ON CONFLICT (space_id) DO UPDATE SET suppressed_events = suppressed_events + 1",
            )?
            .execute([space_id])?;
            return Ok(Some(id.clone()));
        }
    }
    Ok(None)
}

/// Appends to the violations log, inside the caller's transaction.
pub(crate) fn record_violations(
    conn: &Connection,
    space_id: &str,
    violations: &[Violation],
) -> Result<()> {
    let mut insert = conn.prepare_cached(
        "INSERT INTO violations (space_id, profile_id, other_profile_id, message_id, id_type,
                                 id_hash, rule, detail, at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
    )?;
    for v in violations {
        insert.execute(params![
            space_id,
            v.profile_id,
            v.other_profile_id,
            v.message_id,
            v.id_type,
            v.id_hash,
            v.rule,
            v.detail.to_string(),
            v.at
        ])?;
    }
    Ok(())
}

/// One subject to run.
struct Job {
    space_id: String,
    regulation_id: String,
    regulation_type: RegulationType,
    index: i64,
    subject: Identifier,
    subject_hash: Vec<u8>,
}

/// A person's merge tree as found in one read.
struct Person {
    root: String,
    members: Vec<String>,
    identifiers: Vec<IdentifierEntry>,
}

fn find_person(conn: &Connection, space_id: &str, subject: &Identifier) -> Result<Option<Person>> {
    let lookup = ProfileLookup::Identifier(subject.clone());
    let Some(root) = super::profiles::root_of_lookup(conn, space_id, &lookup)? else {
        return Ok(None);
    };
    let identifiers: String = conn
        .prepare_cached("SELECT identifiers FROM profiles WHERE space_id = ?1 AND profile_id = ?2")?
        .query_row(params![space_id, root], |r| r.get(0))?;
    let members = super::profiles::tree(conn, space_id, &root)?;
    Ok(Some(Person {
        root,
        members,
        identifiers: serde_json::from_str(&identifiers)?,
    }))
}

/// `IN (?, ?, …)` placeholders from `first` on, for `n` values.
fn placeholders(first: usize, n: usize) -> String {
    (first..first + n)
        .map(|i| format!("?{i}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The values an `IN` list binds after the space id.
fn space_and(space_id: &str, members: &[String]) -> Vec<SqlValue> {
    std::iter::once(SqlValue::Text(space_id.to_string()))
        .chain(members.iter().map(|m| SqlValue::Text(m.clone())))
        .collect()
}

/// A JSON string's body as it appears inside a stored JSON document.
fn json_fragment(value: &str) -> String {
    let quoted = serde_json::Value::String(value.to_string()).to_string();
    quoted[1..quoted.len() - 1].to_string()
}

impl SqliteStore {
    /// Runs every subject of every regulation not yet done, in order.
    /// Concurrent calls take turns; each one runs whatever is pending.
    pub fn run_regulations(&self) -> Result<usize> {
        let _turn = lock(&self.regulation_runner);
        let mut done = 0;
        loop {
            let jobs = self.next_subjects(SLICE)?;
            if jobs.is_empty() {
                return Ok(done);
            }
            self.set_subjects(jobs.iter().map(|j| (j, SubjectStatus::Running, None, 0)))?;
            let mut outcomes = Vec::with_capacity(jobs.len());
            let mut deleted_any = false;
            for job in &jobs {
                let outcome = self.run_subject(job);
                deleted_any |= outcome.is_ok() && job.regulation_type.deletes();
                outcomes.push(outcome);
            }
            // The people's raw events in the queue: those queued before
            // their delete are dropped when applied (suppressed); once
            // applied, they leave the queue. Once per slice: it costs an
            // fsync.
            if deleted_any {
                if let Some(through) = self.queue.get().map(|q| q.last_seq()) {
                    self.clear_queue_through(through)?;
                }
            }
            let reasons: Vec<Option<String>> = outcomes
                .iter()
                .zip(&jobs)
                .map(|(o, job)| {
                    o.as_ref().err().map(|e| {
                        let reason = super::describe(e);
                        error!(space_id = %job.space_id, regulation_id = %job.regulation_id,
                               index = job.index, reason = %reason, "a regulation's subject failed");
                        reason
                    })
                })
                .collect();
            self.set_subjects(jobs.iter().zip(&outcomes).zip(&reasons).map(
                |((job, outcome), reason)| match outcome {
                    Ok(deleted) => (job, SubjectStatus::Finished, None, *deleted),
                    Err(_) => (job, SubjectStatus::Failed, reason.as_deref(), 0),
                },
            ))?;
            done += jobs.len();
        }
    }

    fn next_subjects(&self, limit: usize) -> Result<Vec<Job>> {
        let conn = self.reader()?;
        let mut stmt = conn.prepare_cached(
            "SELECT r.space_id, r.regulation_id, r.regulation_type, r.subject_type,
                    s.idx, s.subject_id, s.subject_hash
             FROM regulation_subjects s INDEXED BY regulation_subjects_pending
             JOIN regulations r ON r.regulation_id = s.regulation_id
             WHERE s.status IN ('initialized', 'running')
             ORDER BY r.seq, s.idx LIMIT ?1",
        )?;
        let rows = stmt.query_map([limit as i64], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, String>(3)?,
                r.get::<_, i64>(4)?,
                r.get::<_, Option<String>>(5)?,
                r.get::<_, Vec<u8>>(6)?,
            ))
        })?;
        let mut jobs = Vec::new();
        for row in rows {
            let (space_id, regulation_id, kind, subject_type, index, subject_id, hash) = row?;
            let regulation_type = RegulationType::parse(&kind)
                .ok_or_else(|| StoreError::Undecodable(format!("regulation type {kind:?}")))?;
            jobs.push(Job {
                space_id,
                regulation_id,
                regulation_type,
                index,
                subject: Identifier::new(subject_type, subject_id.unwrap_or_default()),
                subject_hash: hash,
            });
        }
        Ok(jobs)
    }

    /// Records subjects' statuses in one transaction; a subject that is
    /// done forgets its id, and a regulation is finished with its last
    /// subject.
    fn set_subjects<'j>(
        &self,
        updates: impl Iterator<Item = (&'j Job, SubjectStatus, Option<&'j str>, u64)>,
    ) -> Result<()> {
        let mut conn = self.writer();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let mut regulations = BTreeSet::new();
        for (job, status, reason, deleted) in updates {
            let done = matches!(status, SubjectStatus::Finished | SubjectStatus::Failed);
            tx.prepare_cached(
                "UPDATE regulation_subjects SET status = ?3, reason = ?4, profiles_deleted = ?5,
                     subject_id = CASE WHEN ?6 THEN NULL ELSE subject_id END
                 WHERE regulation_id = ?1 AND idx = ?2",
            )?
            .execute(params![
                job.regulation_id,
                job.index,
                status.as_str(),
                reason,
                deleted as i64,
                done
            ])?;
            if done {
                regulations.insert(job.regulation_id.clone());
            }
        }
        for regulation_id in regulations {
            tx.prepare_cached(
                "UPDATE regulations SET finished_at = ?2 WHERE regulation_id = ?1
                   AND NOT EXISTS (SELECT 1 FROM regulation_subjects
                                   WHERE regulation_id = ?1 AND status IN ('initialized', 'running'))",
            )?
            .execute(params![regulation_id, now_millis()])?;
        }
        tx.commit()?;
        Ok(())
    }

    /// One subject, start to end; safe to run again after a crash at any
    /// point. Returns how many profiles it deleted.
    fn run_subject(&self, job: &Job) -> Result<u64> {
        let space_id = job.space_id.as_str();
        if job.regulation_type == RegulationType::Unsuppress {
            self.writer()
                .prepare_cached(
                    "DELETE FROM suppressions WHERE space_id = ?1 AND subject_hash = ?2",
                )?
                .execute(params![space_id, job.subject_hash])?;
            return Ok(0);
        }
        let now = now_millis();
        // 1. Tell destinations, while the person can still be addressed.
        if job.regulation_type.deletes() {
            self.queue_farewells(job, now)?;
        }
        // 2. Suppress and delete in one store.db transaction.
        let Some(members) = self.suppress_and_delete(job, now)? else {
            return Ok(0);
        };
        if members.is_empty() {
            return Ok(0);
        }
        // 3. Computed state and the change log.
        {
            let mut conn = self.compute_writer();
            let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let list = placeholders(2, members.len());
            let args = space_and(space_id, &members);
            tx.execute(
                &format!(
                    "DELETE FROM compute_states WHERE space_id = ?1 AND profile_id IN ({list})"
                ),
                params_from_iter(&args),
            )?;
            // Blanked, not deleted: the log's sequence numbers must only grow.
            tx.execute(
                &format!(
                    "UPDATE changes SET profile_id = '', old = NULL, new = 'null'
                     WHERE space_id = ?1 AND profile_id IN ({list})"
                ),
                params_from_iter(&args),
            )?;
            tx.execute(
                &format!(
                    "UPDATE compute_requests SET profile_id = ''
                     WHERE space_id = ?1 AND profile_id IN ({list})"
                ),
                params_from_iter(&args),
            )?;
            tx.commit()?;
        }
        // 4. Their calls still queued or dead at destinations.
        self.sync_tx(|tx| {
            tx.execute(
                &format!(
                    "DELETE FROM deliveries WHERE space_id = ?1 AND profile_id IN ({})",
                    placeholders(2, members.len())
                ),
                params_from_iter(space_and(space_id, &members)),
            )?;
            Ok(())
        })?;
        info!(space_id, regulation_id = %job.regulation_id, profiles = members.len(),
              "a regulation deleted a person");
        Ok(members.len() as u64)
    }

    /// Queues the exits and deletes destinations are owed, addressed with
    /// the person's identifiers as they are now.
    fn queue_farewells(&self, job: &Job, now: Millis) -> Result<()> {
        let (person, values) = {
            let conn = self.reader()?;
            let Some(person) = find_person(&conn, &job.space_id, &job.subject)? else {
                return Ok(());
            };
            let values = super::compute::live_values(&conn, &job.space_id, &person.root)?;
            (person, values)
        };
        let at = format_millis(now);
        let farewell = Farewell {
            space_id: &job.space_id,
            regulation_id: &job.regulation_id,
            root: &person.root,
            ids: &person.identifiers,
            values: &values,
            at: &at,
        };
        let marker = farewell_marker(&job.regulation_id);
        self.sync_tx(|tx| {
            // Queued once, even when the subject runs again.
            let queued = tx
                .prepare_cached("SELECT 1 FROM deliveries WHERE space_id = ?1 AND profile_id = ?2")?
                .exists(params![job.space_id, marker])?;
            if queued {
                return Ok(());
            }
            let mut insert = tx.prepare_cached(
                "INSERT INTO deliveries (space_id, destination_id, profile_id, call)
                 VALUES (?1, ?2, ?3, ?4)",
            )?;
            for (destination_id, settings) in super::sync::enabled_destinations(tx, &job.space_id)?
            {
                for call in farewell.calls(&destination_id, &settings) {
                    insert.execute(params![
                        job.space_id,
                        destination_id,
                        marker,
                        call.to_string()
                    ])?;
                }
            }
            Ok(())
        })
    }

    /// Step 2: the person's identifiers (and the subject) onto the
    /// suppression list, and with a delete everything of theirs in
    /// `store.db`. Returns the deleted profiles (empty for a suppression),
    /// `None` when the subject names nobody and nothing was to delete.
    fn suppress_and_delete(&self, job: &Job, now: Millis) -> Result<Option<Vec<String>>> {
        let space_id = job.space_id.as_str();
        let mut conn = self.writer();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let person = find_person(&tx, space_id, &job.subject)?;
        let mut named: BTreeSet<Identifier> = BTreeSet::from([job.subject.clone()]);
        if let Some(p) = &person {
            named.extend(p.identifiers.iter().map(|e| e.id.clone()));
        }
        let received_before = match job.regulation_type {
            RegulationType::DeleteInternal => Some(now),
            _ => None,
        };
        {
            let mut insert = tx.prepare_cached(
                "INSERT INTO suppressions (space_id, id_hash, subject_hash, received_before, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (space_id, id_hash, subject_hash) DO UPDATE SET
                   received_before = CASE WHEN suppressions.received_before IS NULL
                                            OR excluded.received_before IS NULL THEN NULL
                                          ELSE max(suppressions.received_before, excluded.received_before) END",
            )?;
            for id in &named {
                insert.execute(params![
                    space_id,
                    &identifier_hash(space_id, id)[..],
                    job.subject_hash,
                    received_before,
                    now
                ])?;
            }
        }
        let deleted = match (&person, job.regulation_type.deletes()) {
            (Some(person), true) => {
                delete_person(&tx, space_id, person, &named)?;
                Some(person.members.clone())
            }
            (Some(_), false) => Some(Vec::new()),
            (None, true) => {
                // Nobody to delete, but unattached events may name them.
                delete_unattached(&tx, space_id, &named)?;
                None
            }
            (None, false) => None,
        };
        tx.commit()?;
        Ok(deleted)
    }

    /// Waits (up to a minute) for the identity worker to apply the queue
    /// through `through`, makes `store.db` durable, and deletes those
    /// entries from the queue.
    fn clear_queue_through(&self, through: i64) -> Result<()> {
        let Some(queue) = self.queue.get() else {
            return Ok(());
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        let applied = loop {
            let cursor: i64 = self
                .reader()?
                .prepare_cached("SELECT seq FROM cursors WHERE name = 'identity'")?
                .query_row([], |r| r.get(0))
                .optional()?
                .unwrap_or(0);
            if cursor >= through || std::time::Instant::now() > deadline {
                break cursor.min(through);
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        };
        {
            // A commit with synchronous=FULL fsyncs the WAL, and with it
            // every commit before, so no applied event depends on the queue.
            let conn = self.writer();
            conn.pragma_update(None, "synchronous", "FULL")?;
            let synced = conn.execute("UPDATE cursors SET seq = seq WHERE name = 'identity'", []);
            conn.pragma_update(None, "synchronous", "NORMAL")?;
            synced?;
        }
        queue.truncate_now(applied)
    }

    /// See [`Privacy::split`]. One `store.db` transaction moves the
    /// child's subtree out (its identifiers: those whose rows it owns; its
    /// traits and the parent's: replayed from each side's events), then
    /// both profiles' computed states are rebuilt from their events.
    fn split_now(
        &self,
        space_id: &str,
        lookup: &ProfileLookup,
        child: &str,
    ) -> Result<SplitOutcome> {
        let now = now_millis();
        let (root, moved) = {
            let mut conn = self.writer();
            let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let Some(root) = super::profiles::root_of_lookup(&tx, space_id, lookup)? else {
                return Ok(SplitOutcome::NoProfile);
            };
            let members = super::profiles::tree(&tx, space_id, &root)?;
            if child == root || !members.iter().any(|m| m == child) {
                return Ok(SplitOutcome::NotMerged);
            }
            let child_tree = super::profiles::tree(&tx, space_id, child)?;
            let parent_side: Vec<String> = members
                .iter()
                .filter(|m| !child_tree.contains(m))
                .cloned()
                .collect();
            let (list, merges, child_merges, child_parent): (String, u32, u32, String) = tx.query_row(
                "SELECT r.identifiers, r.merges, c.merges, c.parent_id FROM profiles r, profiles c
                 WHERE r.space_id = ?1 AND r.profile_id = ?2 AND c.space_id = ?1 AND c.profile_id = ?3",
                params![space_id, root, child],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )?;
            let list: Vec<IdentifierEntry> = serde_json::from_str(&list)?;
            let mut child_owns = BTreeSet::new();
            for e in &list {
                let owner = super::profiles::owner_of(&tx, space_id, &e.id)?;
                if owner.is_some_and(|o| child_tree.contains(&o)) {
                    child_owns.insert(e.id.clone());
                }
            }
            let (to_child, to_parent) = split_identifiers(list, |id| child_owns.contains(id));
            let source_id: String = tx.query_row(
                "SELECT source_id FROM spaces WHERE space_id = ?1",
                [space_id],
                |r| r.get(0),
            )?;
            let child_traits = replay_traits(&tx, space_id, &child_tree, &source_id)?;
            let parent_traits = replay_traits(&tx, space_id, &parent_side, &source_id)?;
            tx.execute(
                "UPDATE profiles SET parent_id = NULL, version = version + 1, updated_at = ?3,
                     identifiers = ?4, traits = ?5
                 WHERE space_id = ?1 AND profile_id = ?2",
                params![
                    space_id,
                    child,
                    now,
                    serde_json::to_string(&to_child)?,
                    serde_json::to_string(&child_traits)?
                ],
            )?;
            tx.execute(
                "UPDATE profiles SET version = version + 1, updated_at = ?3, identifiers = ?4,
                     traits = ?5, merges = ?6
                 WHERE space_id = ?1 AND profile_id = ?2",
                params![
                    space_id,
                    root,
                    now,
                    serde_json::to_string(&to_parent)?,
                    serde_json::to_string(&parent_traits)?,
                    merges_after_split(merges, child_merges)
                ],
            )?;
            tx.execute(
                "DELETE FROM merges WHERE space_id = ?1 AND parent_id = ?2 AND child_id = ?3",
                params![space_id, child_parent, child],
            )?;
            for (a, b) in [(&root, child), (&child.to_string(), root.as_str())] {
                tx.execute(
                    "INSERT OR IGNORE INTO split_blocks (space_id, a, b, created_at) VALUES (?1, ?2, ?3, ?4)",
                    params![space_id, a, b, now],
                )?;
            }
            tx.commit()?;
            (root, to_child.into_iter().map(|e| e.id).collect::<Vec<_>>())
        };
        // Both rebuilt from their own events, compared with the values
        // stored before: the changes (an audience left, a trait changed)
        // reach the change log and destinations.
        {
            let mut conn = self.compute_writer();
            let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let empty = kindred_store::compute::encode_state(&Default::default(), 64)?;
            tx.execute(
                "UPDATE compute_states SET state = ?3 WHERE space_id = ?1 AND profile_id = ?2",
                params![space_id, root, empty],
            )?;
            for profile in [&root, &child.to_string()] {
                tx.execute(
                    "INSERT INTO compute_requests (space_id, profile_id, as_of) VALUES (?1, ?2, ?3)",
                    params![space_id, profile, now],
                )?;
            }
            tx.commit()?;
        }
        info!(space_id, parent = %root, child, "a merge was split");
        Ok(SplitOutcome::Split {
            parent: root,
            child: child.to_string(),
            moved,
        })
    }

    /// Drops DELETE_INTERNAL's bounded suppressions once no event they
    /// guard against can still be queued.
    pub(crate) fn expire_suppressions(conn: &Connection, now: Millis) -> Result<()> {
        conn.prepare_cached(
            "DELETE FROM suppressions WHERE received_before IS NOT NULL AND received_before < ?1",
        )?
        .execute([now - BOUNDED_SUPPRESSION_RETENTION])?;
        conn.prepare_cached("DELETE FROM violations WHERE at < ?1")?
            .execute([now - VIOLATION_RETENTION])?;
        Ok(())
    }

    /// Starts running pending regulations on a thread of the runtime's
    /// blocking pool (after a `POST`, and at start-up to resume).
    pub fn start_regulations(&self) {
        let Some(store) = self.me.upgrade() else {
            return;
        };
        tokio::task::spawn_blocking(move || {
            if let Err(e) = store.run_regulations() {
                error!(error = %super::describe(&e), "running regulations failed; retried at the next request or start");
            }
        });
    }
}

/// The traits the events recorded on `members` set, replayed in time
/// order ([`kindred_store::privacy::replay_traits`]).
fn replay_traits(
    tx: &Transaction<'_>,
    space_id: &str,
    members: &[String],
    source_id: &str,
) -> Result<kindred_domain::Traits> {
    if members.is_empty() {
        return Ok(kindred_domain::Traits::new());
    }
    let mut stmt = tx.prepare(&format!(
        "SELECT ts, seq, body FROM events WHERE space_id = ?1 AND profile_id IN ({})",
        placeholders(2, members.len())
    ))?;
    let events = stmt
        .query_map(params_from_iter(space_and(space_id, members)), |r| {
            Ok((r.get(0)?, r.get(1)?, r.get::<_, StoredBody>(2)?.0))
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    kindred_store::privacy::replay_traits(events, source_id)
}

/// Deletes a person's rows from `store.db` (inside the caller's
/// transaction).
fn delete_person(
    tx: &Transaction<'_>,
    space_id: &str,
    person: &Person,
    named: &BTreeSet<Identifier>,
) -> Result<()> {
    let members = &person.members;
    let list = placeholders(2, members.len());
    let args = space_and(space_id, members);
    let mut unclaim = tx.prepare_cached(
        "DELETE FROM identifiers WHERE space_id = ?1 AND id_type = ?2 AND id_value = ?3",
    )?;
    for e in &person.identifiers {
        unclaim.execute(params![space_id, e.id.kind, e.id.value])?;
    }
    // Events go, but the table's last row is blanked instead: its sequence
    // number is the compute worker's cursor, which must only grow.
    let last: i64 = tx.query_row("SELECT COALESCE(MAX(seq), 0) FROM events", [], |r| r.get(0))?;
    let mut with_last = args.clone();
    with_last.push(SqlValue::Integer(last));
    let last_param = members.len() + 2;
    tx.execute(
        &format!(
            "DELETE FROM events WHERE space_id = ?1 AND profile_id IN ({list}) AND seq < ?{last_param}"
        ),
        params_from_iter(&with_last),
    )?;
    tx.execute(
        &format!(
            "UPDATE events SET profile_id = NULL, name = NULL, message_id = '', body = '{{}}'
             WHERE space_id = ?1 AND profile_id IN ({list})"
        ),
        params_from_iter(&args),
    )?;
    for table in [
        "links",
        "profiles",
        "violations",
        "identifier_log",
        "account_users",
    ] {
        tx.execute(
            &format!("DELETE FROM {table} WHERE space_id = ?1 AND profile_id IN ({list})"),
            params_from_iter(&args),
        )?;
    }
    tx.execute(
        &format!("DELETE FROM merges WHERE space_id = ?1 AND parent_id IN ({list})"),
        params_from_iter(&args),
    )?;
    delete_unattached(tx, space_id, named)
}

/// Events stored without a profile (all their identifiers were blocked)
/// and dead-lettered queue entries that name the person: found by their
/// bodies, which hold the identifier values.
fn delete_unattached(
    tx: &Transaction<'_>,
    space_id: &str,
    named: &BTreeSet<Identifier>,
) -> Result<()> {
    let fragments: Vec<String> = named.iter().map(|i| json_fragment(&i.value)).collect();
    let names = |body: &str| {
        let lower = body.to_lowercase();
        fragments.iter().any(|f| lower.contains(&f.to_lowercase()))
    };
    for (table, filter) in [("events", "profile_id IS NULL AND "), ("dead_letters", "")] {
        let found: Vec<i64> = {
            let mut stmt = tx.prepare(&format!(
                "SELECT seq, body FROM {table} WHERE {filter}space_id = ?1"
            ))?;
            let rows = stmt.query_map([space_id], |r| {
                Ok((r.get::<_, i64>(0)?, r.get::<_, StoredBody>(1)?.0))
            })?;
            let mut found = Vec::new();
            for row in rows {
                let (seq, body) = row?;
                if names(&body) {
                    found.push(seq);
                }
            }
            found
        };
        let mut blank = tx.prepare(&format!("UPDATE {table} SET body = '{{}}' WHERE seq = ?1"))?;
        for seq in found {
            blank.execute([seq])?;
        }
    }
    Ok(())
}

fn subject_records(conn: &Connection, regulation_id: &str) -> Result<Vec<SubjectRecord>> {
    let mut stmt = conn.prepare_cached(
        "SELECT idx, status, reason, profiles_deleted FROM regulation_subjects
         WHERE regulation_id = ?1 ORDER BY idx",
    )?;
    let rows = stmt.query_map([regulation_id], |r| {
        Ok((
            r.get::<_, i64>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, Option<String>>(2)?,
            r.get::<_, i64>(3)?,
        ))
    })?;
    let mut out = Vec::new();
    for row in rows {
        let (index, status, reason, deleted) = row?;
        out.push(SubjectRecord {
            index: index as usize,
            status: SubjectStatus::parse(&status)
                .ok_or_else(|| StoreError::Undecodable(format!("subject status {status:?}")))?,
            reason,
            profiles_deleted: deleted as u64,
        });
    }
    Ok(out)
}

type RegulationRow = (String, String, String, i64, Option<i64>);

fn regulation_record(conn: &Connection, row: RegulationRow) -> Result<RegulationRecord> {
    let (regulation_id, kind, subject_type, created_at, finished_at) = row;
    Ok(RegulationRecord {
        subjects: subject_records(conn, &regulation_id)?,
        regulation_type: RegulationType::parse(&kind)
            .ok_or_else(|| StoreError::Undecodable(format!("regulation type {kind:?}")))?,
        regulation_id,
        subject_type,
        created_at,
        finished_at,
    })
}

#[async_trait]
impl Privacy for SqliteStore {
    async fn create_regulation(
        &self,
        space_id: &str,
        request: &RegulationRequest,
    ) -> Result<RegulationRecord> {
        let space_id = space_id.to_string();
        let request = request.clone();
        let record = self
            .blocking(move |s| {
                let now = now_millis();
                let regulation_id = new_regulation_id(now);
                let mut conn = s.writer();
                let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
                tx.prepare_cached(
                    "INSERT INTO regulations (space_id, regulation_id, regulation_type, subject_type, created_at)
                     VALUES (?1, ?2, ?3, ?4, ?5)",
                )?
                .execute(params![
                    space_id,
                    regulation_id,
                    request.regulation_type.as_str(),
                    request.subject_type,
                    now
                ])?;
                {
                    let mut insert = tx.prepare_cached(
                        "INSERT INTO regulation_subjects (regulation_id, idx, subject_id, subject_hash, status)
                         VALUES (?1, ?2, ?3, ?4, 'initialized')",
                    )?;
                    for (i, subject) in request.subjects.iter().enumerate() {
                        insert.execute(params![
                            regulation_id,
                            i as i64,
                            subject.value,
                            &identifier_hash(&space_id, subject)[..]
                        ])?;
                    }
                }
                let record = regulation_record(
                    &tx,
                    (
                        regulation_id,
                        request.regulation_type.as_str().to_string(),
                        request.subject_type.clone(),
                        now,
                        None,
                    ),
                )?;
                tx.commit()?;
                Ok(record)
            })
            .await?;
        self.start_regulations();
        Ok(record)
    }

    async fn regulation(
        &self,
        space_id: &str,
        regulation_id: &str,
    ) -> Result<Option<RegulationRecord>> {
        let (space_id, regulation_id) = (space_id.to_string(), regulation_id.to_string());
        self.blocking(move |s| {
            let conn = s.reader()?;
            let row: Option<RegulationRow> = conn
                .prepare_cached(
                    "SELECT regulation_id, regulation_type, subject_type, created_at, finished_at
                     FROM regulations WHERE space_id = ?1 AND regulation_id = ?2",
                )?
                .query_row(params![space_id, regulation_id], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
                })
                .optional()?;
            row.map(|row| regulation_record(&conn, row)).transpose()
        })
        .await
    }

    async fn regulations(
        &self,
        space_id: &str,
        before: Option<&str>,
        limit: usize,
    ) -> Result<Vec<RegulationRecord>> {
        let (space_id, before) = (space_id.to_string(), before.map(str::to_string));
        self.blocking(move |s| {
            let conn = s.reader()?;
            let before_seq: i64 = match before {
                None => i64::MAX,
                Some(id) => conn
                    .prepare_cached(
                        "SELECT seq FROM regulations WHERE space_id = ?1 AND regulation_id = ?2",
                    )?
                    .query_row(params![space_id, id], |r| r.get(0))
                    .optional()?
                    .ok_or(StoreError::NotFound)?,
            };
            let rows: Vec<RegulationRow> = conn
                .prepare_cached(
                    "SELECT regulation_id, regulation_type, subject_type, created_at, finished_at
                     FROM regulations WHERE space_id = ?1 AND seq < ?2 ORDER BY seq DESC LIMIT ?3",
                )?
                .query_map(params![space_id, before_seq, limit as i64], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
                })?
                .collect::<rusqlite::Result<_>>()?;
            rows.into_iter()
                .map(|row| regulation_record(&conn, row))
                .collect()
        })
        .await
    }

    async fn violations(
        &self,
        space_id: &str,
        profile: Option<&ProfileLookup>,
        since: Millis,
        next: Option<&str>,
        limit: usize,
    ) -> Result<Option<ViolationPage>> {
        let (space_id, profile) = (space_id.to_string(), profile.cloned());
        let after: i64 = match next {
            None => 0,
            Some(n) => n
                .parse()
                .map_err(|_| StoreError::Invalid("next: not a cursor of this list".into()))?,
        };
        self.blocking(move |s| {
            let conn = s.reader()?;
            let members = match &profile {
                None => None,
                Some(lookup) => {
                    let Some(root) = super::profiles::root_of_lookup(&conn, &space_id, lookup)?
                    else {
                        return Ok(None);
                    };
                    Some(super::profiles::tree(&conn, &space_id, &root)?)
                }
            };
            let mut args = vec![
                SqlValue::Text(space_id.clone()),
                SqlValue::Integer(since),
                SqlValue::Integer(after),
                SqlValue::Integer(limit as i64 + 1),
            ];
            let filter = match &members {
                None => String::new(),
                Some(members) => {
                    let list = placeholders(5, members.len());
                    args.extend(members.iter().map(|m| SqlValue::Text(m.clone())));
                    format!(" AND (profile_id IN ({list}) OR other_profile_id IN ({list}))")
                }
            };
            let mut stmt = conn.prepare(&format!(
                "SELECT seq, profile_id, other_profile_id, message_id, id_type, id_hash, rule, detail, at
                 FROM violations WHERE space_id = ?1 AND at >= ?2 AND seq > ?3{filter}
                 ORDER BY seq LIMIT ?4"
            ))?;
            let rows = stmt.query_map(params_from_iter(&args), |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    Violation {
                        profile_id: r.get(1)?,
                        other_profile_id: r.get(2)?,
                        message_id: r.get(3)?,
                        id_type: r.get(4)?,
                        id_hash: r.get(5)?,
                        rule: r.get(6)?,
                        detail: serde_json::from_str(&r.get::<_, String>(7)?)
                            .unwrap_or(serde_json::Value::Null),
                        at: r.get(8)?,
                    },
                ))
            })?;
            let mut entries: Vec<(i64, Violation)> = rows.collect::<rusqlite::Result<_>>()?;
            let next = (entries.len() > limit).then(|| {
                entries.truncate(limit);
                entries.last().map(|(seq, _)| seq.to_string()).unwrap_or_default()
            });
            Ok(Some(ViolationPage {
                entries: entries.into_iter().map(|(_, v)| v).collect(),
                next,
            }))
        })
        .await
    }

    async fn split(
        &self,
        space_id: &str,
        lookup: &ProfileLookup,
        child: &str,
    ) -> Result<SplitOutcome> {
        let (space_id, lookup, child) = (space_id.to_string(), lookup.clone(), child.to_string());
        self.blocking(move |s| s.split_now(&space_id, &lookup, &child))
            .await
    }

    async fn remove_identifiers(
        &self,
        space_id: &str,
        lookup: &ProfileLookup,
        ids: &[Identifier],
    ) -> Result<Option<Vec<Identifier>>> {
        let (space_id, lookup, ids) = (space_id.to_string(), lookup.clone(), ids.to_vec());
        self.blocking(move |s| {
            let mut conn = s.writer();
            let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let Some(root) = super::profiles::root_of_lookup(&tx, &space_id, &lookup)? else {
                return Ok(None);
            };
            let members = super::profiles::tree(&tx, &space_id, &root)?;
            let mut removed_all = Vec::new();
            for member in &members {
                let list: String = tx
                    .prepare_cached(
                        "SELECT identifiers FROM profiles WHERE space_id = ?1 AND profile_id = ?2",
                    )?
                    .query_row(params![space_id, member], |r| r.get(0))?;
                let list: Vec<IdentifierEntry> = serde_json::from_str(&list)?;
                let (kept, removed) = without_identifiers(&list, &ids);
                if removed.is_empty() {
                    continue;
                }
                // The root's version covers its list: a plan made on the
                // old list fails its condition and is made again.
                tx.prepare_cached(
                    "UPDATE profiles SET identifiers = ?3, version = version + 1, updated_at = ?4
                     WHERE space_id = ?1 AND profile_id = ?2",
                )?
                .execute(params![
                    space_id,
                    member,
                    serde_json::to_string(&kept)?,
                    now_millis()
                ])?;
                if *member == root {
                    removed_all = removed;
                }
            }
            let mut unclaim = tx.prepare_cached(
                "DELETE FROM identifiers WHERE space_id = ?1 AND id_type = ?2 AND id_value = ?3",
            )?;
            for id in &removed_all {
                unclaim.execute(params![space_id, id.kind, id.value])?;
            }
            drop(unclaim);
            tx.commit()?;
            Ok(Some(removed_all))
        })
        .await
    }

    async fn suppressed_events(&self, space_id: &str) -> Result<u64> {
        let space_id = space_id.to_string();
        self.blocking(move |s| {
            let n: Option<i64> = s
                .reader()?
                .prepare_cached("SELECT suppressed_events FROM privacy_counts WHERE space_id = ?1")?
                .query_row([space_id], |r| r.get(0))
                .optional()?;
            Ok(n.unwrap_or(0) as u64)
        })
        .await
    }
}
