//! The compute worker: folds the events the identity step recorded,
//! serves lookback requests and backfills, each step in one transaction.

use super::*;

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
    pub fn lag(&self) -> Result<crate::Lag> {
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
            conn.prepare_cached("SELECT body FROM events WHERE seq > ?1 ORDER BY seq LIMIT 1")?
                .query_row([folded], |r| r.get::<_, crate::body::StoredBody>(0))
                .optional()?
                .and_then(|body| crate::body::received_at(&body.0))
        } else {
            None
        };
        let pending = (events - folded).max(0) + (requests - served).max(0);
        Ok(crate::Lag::of(
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

    pub(super) fn ruleset(
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
    pub(super) fn ruleset_in_batch(
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

    pub(super) fn now_for(state: &WorkerState, space_id: &str) -> Millis {
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
                    r.get::<_, Option<crate::body::StoredBody>>(3)?.map(|b| b.0)
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
            resolved.push(Resolved {
                ruleset,
                space_id,
                root,
                traits,
                seq: *seq,
                now,
                body,
            });
        }
        // Parsing the events and decoding the states are CPU work (done on
        // `batch.threads` threads); folding the events in stays in order.
        let events = par_map(
            batch.threads,
            resolved.iter().map(|r| r.body).collect(),
            |b| parse_stored_event(b),
        );
        batch.preload(
            resolved
                .iter()
                .map(|r| {
                    (
                        Arc::clone(&r.ruleset),
                        r.space_id.clone(),
                        r.root.clone(),
                        r.now,
                    )
                })
                .collect(),
        )?;
        for (
            Resolved {
                ruleset,
                space_id,
                root,
                traits,
                seq,
                now,
                ..
            },
            event,
        ) in resolved.into_iter().zip(events)
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
        use crate::health::catch_panic;
        let events = catch_panic(|| self.run_events(EVENTS_PER_BATCH))
            .or_else(|e| self.isolate(EVENTS_CURSOR, e, |w| catch_panic(|| w.run_events(1))))?;
        let requests = catch_panic(|| self.run_requests(EVENTS_PER_BATCH))
            .or_else(|e| self.isolate(REQUESTS_CURSOR, e, |w| catch_panic(|| w.run_requests(1))))?;
        Ok(events + requests + self.run_backfill()?)
    }

    /// After a failed batch: retries the entries one at a time, and skips
    /// (with an error in the log) one that keeps failing, so that it cannot
    /// hold up everything behind it. Storage errors are only retried.
    pub(super) fn isolate(
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
    /// Runs the worker on its own thread under [`crate::supervise`].
    pub fn spawn(
        self: &Arc<Self>,
        stop: Arc<AtomicBool>,
        health: Arc<crate::WorkerHealth>,
    ) -> std::thread::JoinHandle<()> {
        let worker = Arc::clone(self);
        std::thread::Builder::new()
            .name("kindred-compute".into())
            .spawn(move || {
                give_way_to_identity();
                let mut last_sweep = Instant::now();
                crate::supervise(&health, &stop, || {
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
