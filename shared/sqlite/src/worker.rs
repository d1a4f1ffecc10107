//! The local identity worker: drains the durable queue into the identity
//! graph. Each batch of queue entries is processed in one store
//! transaction that also advances the worker's cursor, so every entry is
//! applied exactly once even across crashes.

use std::collections::HashMap;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kindred_domain::{IdentityRules, IdentitySettings};
use rusqlite::{params, OptionalExtension, Transaction};
use tracing::{debug_span, error};

use super::graph::TxGraph;
use super::queue::SqliteQueue;
use super::{lock, SqliteStore};
use kindred_store::identity::{complete_now, process_event, Job, Outcome, SpaceRules};
use kindred_store::token::new_profile_id;
use kindred_store::{now_millis, Result, StoreError};

pub(crate) const CURSOR: &str = "identity";
/// How long message ids are remembered for deduplication (SPEC: >= 24 h).
pub const DEDUP_RETENTION_MS: i64 = 7 * 24 * 3_600_000;

/// Counters since start.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WorkerStats {
    pub recorded: u64,
    pub created: u64,
    pub merged: u64,
    pub unresolved: u64,
    pub duplicates: u64,
    /// Events of suppressed people, dropped.
    pub suppressed: u64,
    /// Entries that failed repeatedly and were moved to `dead_letters`.
    pub dead_lettered: u64,
    /// Identifiers refused (blocked, or by merge protection), by rule.
    pub refused: std::collections::BTreeMap<String, u64>,
}

impl WorkerStats {
    fn count_refused(&mut self, rules: &[String]) {
        for rule in rules {
            *self.refused.entry(rule.clone()).or_default() += 1;
        }
    }
}

pub struct IdentityWorker {
    store: Arc<SqliteStore>,
    queue: Arc<SqliteQueue>,
    batch: usize,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    cursor: Option<i64>,
    rules: HashMap<String, (i64, Arc<SpaceRules>)>,
    stats: WorkerStats,
    last_truncate: Option<Instant>,
    /// The last sequence number whose queue rows were handed to truncation.
    truncated_through: i64,
    /// The last sequence number applied when `settle` last emptied
    /// `store.db`'s WAL.
    settled_through: i64,
    last_cleanup: Option<Instant>,
    /// Consecutive failed steps.
    failures: u32,
    /// After a failed batch: go one entry at a time up to this sequence number.
    careful_until: Option<i64>,
}

/// Failures of a single entry before it is dead-lettered.
pub const POISON_ATTEMPTS: u32 = 3;

impl IdentityWorker {
    pub fn new(store: Arc<SqliteStore>, queue: Arc<SqliteQueue>) -> Arc<Self> {
        Arc::new(Self {
            store,
            queue,
            // Larger batches dirty fewer pages per event: each commit
            // writes every page it touched to the WAL, and the graph's
            // keys (message ids, identifiers, profile ids) are random, so
            // a batch of 2,048 rewrote about one page per event in each
            // index. 16,384 (with store.db's larger checkpoints) applied
            // the bench workload ~65% faster, and 65,536 ~20% faster again
            // than 16,384 (32,768: ~12%), RSS about 30 MB higher with the
            // bodies decoded one at a time (BENCHMARKS.md, issue 19). A
            // batch is what is queued, up to this: under light load it is
            // small, and under full load an event is applied at most a
            // few seconds after it was acknowledged.
            batch: 65_536,
            // Housekeeping (dedup expiry, planner statistics) first runs an
            // hour after start, when the tables hold representative data.
            state: Mutex::new(State {
                last_cleanup: Some(Instant::now()),
                ..State::default()
            }),
        })
    }

    pub fn stats(&self) -> WorkerStats {
        lock(&self.state).stats.clone()
    }

    /// The sequence number of the last queue entry applied.
    pub fn cursor(&self) -> Result<i64> {
        let mut state = lock(&self.state);
        self.load_cursor(&mut state)
    }

    /// Accepted events the worker has not applied yet, and the age of the
    /// oldest. Reads the stored cursor, never the worker's lock, so it
    /// answers while a batch runs or the worker is failing.
    pub fn lag(&self) -> Result<super::Lag> {
        let applied = self.stored_cursor()?;
        let pending = self.queue.last_seq() - applied;
        let oldest = if pending > 0 {
            self.queue.oldest_after(applied)?
        } else {
            None
        };
        Ok(super::Lag::of(pending, oldest, now_millis()))
    }

    fn load_cursor(&self, state: &mut State) -> Result<i64> {
        if let Some(c) = state.cursor {
            return Ok(c);
        }
        let c = self.stored_cursor()?;
        state.cursor = Some(c);
        Ok(c)
    }

    /// The last applied sequence number as committed.
    fn stored_cursor(&self) -> Result<i64> {
        Ok(self
            .store
            .reader()?
            .query_row("SELECT seq FROM cursors WHERE name = ?1", [CURSOR], |r| {
                r.get(0)
            })
            .optional()?
            .unwrap_or(0))
    }

    /// One step of the worker: a batch of what is queued; returns how many
    /// entries it consumed. After a failed batch the entries up to its end
    /// go one at a time, and an entry that fails [`POISON_ATTEMPTS`] times
    /// in a row is moved to the `dead_letters` table (kept, with the
    /// error) so that it cannot block the events behind it.
    pub fn run_once(&self) -> Result<usize> {
        let (cursor, careful_until) = {
            let mut state = lock(&self.state);
            (self.load_cursor(&mut state)?, state.careful_until)
        };
        let careful = careful_until.is_some_and(|until| cursor < until);
        let limit = if careful { 1 } else { self.batch };
        match super::health::catch_panic(|| self.run_batch(limit)) {
            Ok(n) => {
                let mut state = lock(&self.state);
                state.failures = 0;
                if !careful {
                    state.careful_until = None;
                }
                Ok(n)
            }
            Err(e) => {
                let failed_until = self.queue.last_of(cursor, limit)?;
                let mut state = lock(&self.state);
                state.failures += 1;
                // Only an entry that cannot be applied is set aside; I/O and
                // lock errors are retried for as long as they last.
                let about_the_entry = !matches!(e, StoreError::Sqlite(_) | StoreError::Closed);
                if careful && about_the_entry && state.failures >= POISON_ATTEMPTS {
                    state.failures = 0;
                    drop(state);
                    self.dead_letter_next(&e)?;
                    return Ok(1);
                }
                if !careful {
                    state.careful_until = failed_until;
                }
                Err(e)
            }
        }
    }

    /// Moves the next queue entry to `dead_letters`, advancing the cursor.
    fn dead_letter_next(&self, error: &kindred_store::StoreError) -> Result<()> {
        let mut state = lock(&self.state);
        let cursor = self.load_cursor(&mut state)?;
        let Some(entry) = self.queue.read_stored_after(cursor, 1)?.pop() else {
            return Ok(());
        };
        // A body that cannot even be decoded is kept as `{}`, and the
        // error says why: the entry must not block the ones behind it.
        let (body, error) = match entry.json() {
            Ok(body) => (body, error.to_string()),
            Err(undecodable) => ("{}".to_string(), format!("{error}; {undecodable}")),
        };
        let mut conn = self.store.writer();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        tx.execute(
            "INSERT INTO dead_letters (seq, space_id, source_id, body, error, failed_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6) ON CONFLICT DO NOTHING",
            params![
                entry.seq,
                entry.space_id,
                entry.source_id,
                body,
                error,
                now_millis()
            ],
        )?;
        set_cursor(&tx, entry.seq)?;
        tx.commit()?;
        error!(space_id = %entry.space_id, seq = entry.seq, error = %error, "event moved to dead_letters");
        state.cursor = Some(entry.seq);
        state.stats.dead_lettered += 1;
        Ok(())
    }

    fn run_batch(&self, limit: usize) -> Result<usize> {
        let started = Instant::now();
        let mut state = lock(&self.state);
        let cursor = self.load_cursor(&mut state)?;
        let entries = self.queue.read_stored_after(cursor, limit)?;
        let Some(last) = entries.last().map(|e| e.seq) else {
            return Ok(0);
        };
        // The queue rows a batch applied are deleted only once store.db
        // has them on disk. store.db commits with synchronous=NORMAL (its
        // WAL is fsync'd at checkpoints), so the commit after which the
        // queue is truncated is made with FULL: that fsyncs the WAL, and
        // with it every earlier commit, before any queue row goes.
        let truncate = state
            .last_truncate
            .is_none_or(|t| t.elapsed() > Duration::from_secs(5));
        let mut conn = self.store.writer();
        conn.pragma_update(
            None,
            "synchronous",
            if truncate { "FULL" } else { "NORMAL" },
        )?;
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let mut stats = state.stats.clone();
        {
            let mut graph = TxGraph::new(&tx);
            let now = now_millis();
            for entry in &entries {
                // Debug level: an info span is formatted for every event
                // (1.6 % of this thread's time in a profile of the bench).
                let _span =
                    debug_span!("identity", space_id = %entry.space_id, seq = entry.seq).entered();
                let rules = rules_for(&tx, &mut state.rules, &entry.space_id)?;
                let Some(rules) = rules else {
                    return Err(StoreError::Internal(
                        "the event's space does not exist".into(),
                    ));
                };
                let body = entry.json()?;
                let event = kindred_store::compute::parse_stored_event(&body)?;
                graph.queued(&body, entry.compressed());
                let job = Job {
                    space_id: &entry.space_id,
                    source_id: &entry.source_id,
                    event: &event,
                    body_json: &body,
                    now,
                };
                let outcome =
                    complete_now(process_event(&mut graph, &rules, &job, new_profile_id))?;
                match outcome {
                    Outcome::Recorded {
                        profile_id,
                        created,
                        merged,
                        claimed,
                        refused,
                    } => {
                        stats.recorded += 1;
                        stats.count_refused(&refused);
                        stats.created += created as u64;
                        stats.merged += merged as u64;
                        if !claimed.is_empty() {
                            tx.prepare_cached(
                                "INSERT INTO identifier_log (space_id, profile_id, identifiers, at)
                                 VALUES (?1, ?2, ?3, ?4)",
                            )?
                            .execute(rusqlite::params![
                                entry.space_id,
                                profile_id,
                                serde_json::to_string(&claimed)?,
                                now
                            ])?;
                        }
                    }
                    Outcome::Unresolved { refused } => {
                        stats.unresolved += 1;
                        stats.count_refused(&refused);
                    }
                    Outcome::Duplicate => stats.duplicates += 1,
                    Outcome::Suppressed => stats.suppressed += 1,
                }
            }
        }
        set_cursor(&tx, last)?;
        tx.commit()?;
        drop(conn);
        kindred_store::metrics::global()
            .identity_batch
            .observe(started.elapsed());
        state.cursor = Some(last);
        state.stats = stats;
        if truncate {
            state.last_truncate = Some(Instant::now());
            state.truncated_through = last;
            self.queue.truncate_through(last);
        }
        if state
            .last_cleanup
            .is_none_or(|t| t.elapsed() > Duration::from_secs(3600))
        {
            state.last_cleanup = Some(Instant::now());
            let writer = self.store.writer();
            writer.execute(
                "DELETE FROM messages WHERE seen_at < ?1",
                [now_millis() - DEDUP_RETENTION_MS],
            )?;
            // Fan-out reads the log within seconds; a week covers a sync
            // worker that was down.
            writer.execute(
                "DELETE FROM identifier_log WHERE at < ?1",
                [now_millis() - 7 * 86_400_000],
            )?;
            SqliteStore::expire_suppressions(&writer, now_millis())?;
            // Keep the query planner's statistics current as tables grow.
            writer.execute_batch("PRAGMA optimize")?;
        }
        Ok(entries.len())
    }

    /// When the queue has been applied: checkpoints `store.db` into its
    /// file and empties its WAL (a completed checkpoint fsyncs the
    /// database, so everything applied is on disk), then lets the queue
    /// drop what was applied since the last truncation. Without it, the
    /// last seconds of a burst would stay in `queue.db`, and the WAL at
    /// its largest, until the next event. Waits at most a moment for
    /// readers; if they hold the WAL, it tries again when next idle.
    pub fn settle(&self) -> Result<()> {
        let mut state = lock(&self.state);
        let cursor = self.load_cursor(&mut state)?;
        // (Not `truncated_through`: a burst applied in one batch was
        // handed to truncation by that batch, and its pages still fill
        // the WAL.)
        if cursor <= state.settled_through {
            return Ok(());
        }
        let conn = self.store.writer();
        conn.busy_timeout(Duration::from_millis(100))?;
        let busy = conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| {
            r.get::<_, i64>(0)
        });
        conn.busy_timeout(super::BUSY_TIMEOUT)?;
        if busy? == 0 {
            state.settled_through = cursor;
            if cursor > state.truncated_through {
                state.truncated_through = cursor;
                self.queue.truncate_through(cursor);
            }
        }
        Ok(())
    }

    /// Processes until the queue is empty as of the call.
    pub fn drain(&self) -> Result<()> {
        let target = self.queue.last_seq();
        while self.cursor()? < target {
            self.run_once()?;
        }
        Ok(())
    }

    /// Runs on a thread of its own until `stop` is set.
    /// Runs the worker on its own thread under [`super::supervise`]: a
    /// failing or panicking batch is logged, reported in `health` and
    /// retried with backoff.
    pub fn spawn(
        self: &Arc<Self>,
        stop: Arc<AtomicBool>,
        health: Arc<super::WorkerHealth>,
    ) -> std::thread::JoinHandle<()> {
        let worker = Arc::clone(self);
        std::thread::Builder::new()
            .name("kindred-identity".into())
            .spawn(move || {
                super::supervise(&health, &stop, || {
                    if worker.run_once()? == 0 {
                        worker.settle()?;
                        let cursor = worker.cursor()?;
                        worker.queue.wait_after(cursor, Duration::from_millis(200));
                    }
                    Ok(())
                })
            })
            .expect("spawning the identity worker thread")
    }
}

fn set_cursor(tx: &Transaction<'_>, seq: i64) -> Result<()> {
    tx.prepare_cached(
        "INSERT INTO cursors (name, seq) VALUES (?1, ?2)
         ON CONFLICT (name) DO UPDATE SET seq = excluded.seq",
    )?
    .execute(params![CURSOR, seq])?;
    Ok(())
}

/// The space's compiled rules, reloaded when its settings version changes.
fn rules_for(
    tx: &Transaction<'_>,
    cache: &mut HashMap<String, (i64, Arc<SpaceRules>)>,
    space_id: &str,
) -> Result<Option<Arc<SpaceRules>>> {
    let version: Option<i64> = tx
        .prepare_cached("SELECT settings_version FROM spaces WHERE space_id = ?1")?
        .query_row([space_id], |r| r.get(0))
        .optional()?;
    let Some(version) = version else {
        return Ok(None);
    };
    if let Some((v, rules)) = cache.get(space_id) {
        if *v == version {
            return Ok(Some(Arc::clone(rules)));
        }
    }
    let json: String = tx.query_row(
        "SELECT settings FROM spaces WHERE space_id = ?1",
        [space_id],
        |r| r.get(0),
    )?;
    let settings: IdentitySettings = serde_json::from_str(&json)?;
    let rules = Arc::new(SpaceRules {
        rules: IdentityRules::new(settings)
            .map_err(|e| kindred_store::StoreError::Undecodable(e.to_string()))?,
    });
    cache.insert(space_id.to_string(), (version, Arc::clone(&rules)));
    Ok(Some(rules))
}
