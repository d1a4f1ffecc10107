//! Fan-out on SQLite: initial syncs of new destinations, then the merges
//! and changes logged since the cursors, turned into calls in each
//! destination's outbox, in one transaction per step.

use super::*;

impl SqliteStore {
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
    pub(super) fn initial_sync(&self, d: &Row) -> Result<u64> {
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
            let mut computed: kindred_store::ComputedValues = serde_json::from_str(&computed)?;
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
        drop(states);
        drop(stmt);
        // Accounts' values, to each of their users.
        let mut stmt = snapshot
            .prepare("SELECT group_id, computed FROM c.account_values WHERE space_id = ?1")?;
        let mut accounts = stmt.query([&d.space_id])?;
        while let Some(row) = accounts.next()? {
            let group_id: String = row.get(0)?;
            let mut computed: kindred_store::ComputedValues =
                serde_json::from_str(&row.get::<_, String>(1)?)?;
            if let Some(keys) = &d.initial_keys {
                computed.retain(|k, _| keys.contains(k));
            }
            if computed.is_empty() {
                continue;
            }
            let users = account_roots(&snapshot, &mut ids, "", &d.space_id, &group_id)?;
            let users: Vec<User<'_>> = (users.iter())
                .map(|(root, ids)| User { root, ids })
                .collect();
            buffer.extend(account_current_calls(
                &d.space_id,
                &d.destination_id,
                &d.settings,
                &group_id,
                &users,
                &computed,
                &now,
            ));
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

    /// One transaction: merges and changes after the cursors. Merges
    /// first: an alias reaches a destination before the changes logged
    /// after the merge.
    pub(super) fn fan_out_logs(&self) -> Result<FanOut> {
        self.sync_tx(|tx| {
            let mut out = FanOut::default();
            let dests = rows(tx, "WHERE 1 = 1", &[])?;
            if dests.is_empty() {
                keep_cursors_at_the_ends(tx)?;
                return Ok(out);
            }
            let mut by_space: HashMap<&str, Vec<&Row>> = HashMap::new();
            for d in dests.iter().filter(|d| d.position().live(&d.settings)) {
                by_space.entry(d.space_id.as_str()).or_default().push(d);
            }
            let mut fan = Fan {
                tx,
                by_space,
                ids: IdCache::default(),
                insert: Inserter::new(tx)?,
            };
            fan.merges(&mut out)?;
            fan.changes(&mut out)?;
            let identified = fan.identifiers(&mut out)?;
            out.more = out.changes >= CHANGES_PER_STEP as u64
                || out.merges >= MERGES_PER_STEP as u64
                || identified >= MERGES_PER_STEP;
            Ok(out)
        })
    }
}

/// With no destination there is nothing to send: the cursors stay at the
/// logs' ends, so that a first destination starts from its initial sync.
fn keep_cursors_at_the_ends(tx: &Transaction<'_>) -> Result<()> {
    let changes: i64 = tx.query_row("SELECT coalesce(max(seq), 0) FROM c.changes", [], |r| {
        r.get(0)
    })?;
    let merges: i64 = tx.query_row("SELECT coalesce(max(seq), 0) FROM s.merge_log", [], |r| {
        r.get(0)
    })?;
    if cursor(tx, CHANGES_CURSOR)? != changes {
        set_cursor(tx, CHANGES_CURSOR, changes)?;
    }
    if cursor(tx, MERGES_CURSOR)? != merges {
        set_cursor(tx, MERGES_CURSOR, merges)?;
    }
    let identified = identifier_log_end(tx)?;
    if cursor(tx, IDENTIFIERS_CURSOR)? != identified {
        set_cursor(tx, IDENTIFIERS_CURSOR, identified)?;
    }
    Ok(())
}

fn identifier_log_end(conn: &Connection) -> Result<i64> {
    Ok(conn.query_row(
        "SELECT coalesce(max(seq), 0) FROM s.identifier_log",
        [],
        |r| r.get(0),
    )?)
}

/// One fan-out transaction's live destinations by space, and its caches.
struct Fan<'t, 'd> {
    tx: &'t Transaction<'t>,
    by_space: HashMap<&'d str, Vec<&'d Row>>,
    ids: IdCache,
    insert: Inserter<'t>,
}

/// One log the fan-out reads: its name (for `fan_out_set_aside`), its
/// cursor and the query of its entries after the cursor (`?1`), at most
/// `?2`, selecting `seq` and `space_id` first.
struct Log {
    name: &'static str,
    cursor: &'static str,
    sql: &'static str,
    per_step: usize,
}

const MERGE_LOG: Log = Log {
    name: "merges",
    cursor: MERGES_CURSOR,
    sql: "SELECT seq, space_id, child_id, parent_id, merged_at FROM s.merge_log
          WHERE seq > ?1 ORDER BY seq LIMIT ?2",
    per_step: MERGES_PER_STEP,
};

const CHANGE_LOG: Log = Log {
    name: "changes",
    cursor: CHANGES_CURSOR,
    sql: "SELECT seq, space_id, profile_id, key, class, new, at, group_id FROM c.changes
          WHERE seq > ?1 ORDER BY seq LIMIT ?2",
    per_step: CHANGES_PER_STEP,
};

const IDENTIFIER_LOG: Log = Log {
    name: "identifiers",
    cursor: IDENTIFIERS_CURSOR,
    sql: "SELECT seq, space_id, profile_id, identifiers, at FROM s.identifier_log
          WHERE seq > ?1 ORDER BY seq LIMIT ?2",
    per_step: MERGES_PER_STEP,
};

/// Hands each entry of `log` after its cursor to `handle` with the live
/// destinations of its space (entries of spaces without any are passed
/// over), sets aside an entry `handle` cannot decode, and moves the
/// cursor. Returns how many entries were read.
fn each_entry(
    tx: &Transaction<'_>,
    by_space: &HashMap<&str, Vec<&Row>>,
    log: &Log,
    mut handle: impl FnMut(&rusqlite::Row<'_>, i64, &str, &[&Row]) -> Result<()>,
) -> Result<usize> {
    let after = cursor(tx, log.cursor)?;
    let mut last = after;
    let mut read = 0;
    {
        let mut stmt = tx.prepare_cached(log.sql)?;
        let mut rows = stmt.query(params![after, log.per_step as i64])?;
        while let Some(row) = rows.next()? {
            let seq: i64 = row.get(0)?;
            let space_id: String = row.get(1)?;
            last = seq;
            read += 1;
            let Some(dests) = by_space.get(space_id.as_str()) else {
                continue;
            };
            let outcome =
                crate::health::catch_panic(|| handle(row, seq, &space_id, dests.as_slice()));
            set_aside_if_undecodable(tx, log.name, seq, &space_id, outcome)?;
        }
    }
    if last > after {
        set_cursor(tx, log.cursor, last)?;
    }
    Ok(read)
}

impl Fan<'_, '_> {
    /// The merges after the cursor, as `alias` calls.
    fn merges(&mut self, out: &mut FanOut) -> Result<()> {
        let Fan {
            tx,
            by_space,
            ids,
            insert,
        } = self;
        let tx = *tx;
        out.merges += each_entry(tx, by_space, &MERGE_LOG, |row, seq, space_id, dests| {
            let (child, parent): (String, String) = (row.get(2)?, row.get(3)?);
            let at: i64 = row.get(4)?;
            for d in dests
                .iter()
                .filter(|d| d.position().receives_alias(&d.settings))
                .filter(|d| seq > d.since_merge)
            {
                let child_ids = ids.own(tx, space_id, &child)?;
                let parent_ids = ids.own(tx, space_id, &parent)?;
                if let Some(call) = alias_call(
                    space_id,
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
        })? as u64;
        Ok(())
    }

    /// The changes after the cursor, as the calls of each destination
    /// that receives them.
    fn changes(&mut self, out: &mut FanOut) -> Result<()> {
        let Fan {
            tx,
            by_space,
            ids,
            insert,
        } = self;
        let tx = *tx;
        out.changes += each_entry(tx, by_space, &CHANGE_LOG, |row, seq, space_id, dests| {
            let (profile_id, key): (String, String) = (row.get(2)?, row.get(3)?);
            let class: String = row.get(4)?;
            let class = Class::parse(&class)
                .ok_or_else(|| StoreError::Undecodable(format!("unknown class {class:?}")))?;
            let new: Value = serde_json::from_str(&row.get::<_, String>(5)?)?;
            let at = format_millis(row.get(6)?);
            let group_id: Option<String> = row.get(7)?;
            let change = ChangeEntry {
                seq: Some(seq),
                key: &key,
                class,
                new: &new,
                at: &at,
                group_id: group_id.as_deref(),
            };
            let receivers: Vec<&&Row> = dests
                .iter()
                .filter(|d| d.position().receives_change(&d.settings, seq, &key))
                .collect();
            if receivers.is_empty() {
                return Ok(());
            }
            // A user's change goes to the user; an account's to each of
            // its users (as linked now, each root once).
            let roots = match &group_id {
                None => vec![ids.root(tx, space_id, &profile_id)?],
                Some(group_id) => account_roots(tx, ids, "s.", space_id, group_id)?,
            };
            for d in receivers {
                for (root, root_ids) in &roots {
                    for call in change_calls(
                        space_id,
                        &d.destination_id,
                        &d.settings,
                        root,
                        root_ids,
                        &change,
                    ) {
                        insert.call(d, root, &call)?;
                        out.calls += 1;
                    }
                }
            }
            Ok(())
        })? as u64;
        Ok(())
    }

    /// The identifiers profiles gained after the cursor: each destination
    /// that syncs their type gets the profile's current values, addressed
    /// to them. Returns how many entries were read.
    fn identifiers(&mut self, out: &mut FanOut) -> Result<usize> {
        let Fan {
            tx,
            by_space,
            ids,
            insert,
        } = self;
        let tx = *tx;
        each_entry(tx, by_space, &IDENTIFIER_LOG, |row, _, space_id, dests| {
            let profile_id: String = row.get(2)?;
            let claimed: Vec<Identifier> = serde_json::from_str(&row.get::<_, String>(3)?)?;
            let at = format_millis(row.get(4)?);
            let types = || claimed.iter().map(|i| i.kind.as_str());
            let mut values = None;
            for d in dests
                .iter()
                .filter(|d| d.position().receives_identifiers(&d.settings, types()))
            {
                let (root, root_ids) = ids.root(tx, space_id, &profile_id)?;
                if values.is_none() {
                    values = Some(crate::compute::live_values(tx, space_id, &root)?);
                }
                for call in current_calls_to(
                    space_id,
                    &d.destination_id,
                    &d.settings,
                    &root,
                    &root_ids,
                    values.as_ref().expect("read above"),
                    &at,
                    Some(&claimed),
                ) {
                    insert.call(d, &root, &call)?;
                    out.calls += 1;
                }
            }
            Ok(())
        })
    }
}

/// The root profiles (each once) of the profiles group calls linked to
/// an account, with their identifiers; `schema` is how the connection
/// names `store.db` (`"s."` on the sync writer, `""` on a reader).
fn account_roots(
    conn: &Connection,
    ids: &mut IdCache,
    schema: &str,
    space_id: &str,
    group_id: &str,
) -> Result<Vec<RootIds>> {
    let linked: Vec<String> = conn
        .prepare_cached(&format!(
            "SELECT profile_id FROM {schema}account_users WHERE space_id = ?1 AND group_id = ?2
             ORDER BY profile_id"
        ))?
        .query_map(params![space_id, group_id], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    let mut roots: Vec<RootIds> = Vec::new();
    for profile_id in linked {
        let found = ids.root(conn, space_id, &profile_id)?;
        if !roots.iter().any(|(r, _)| *r == found.0) {
            roots.push(found);
        }
    }
    Ok(roots)
}

/// Passes a storage error on (the step is retried); records any other
/// failure of one log entry (an undecodable value, a damaged identifier
/// list) in `fan_out_set_aside` and logs it, so that the entries behind it
/// go on.
pub(super) fn set_aside_if_undecodable(
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
                kindred_store::now_millis()
            ])?;
            Ok(())
        }
    }
}

impl<'a> Inserter<'a> {
    pub(super) fn new(tx: &'a Transaction<'_>) -> Result<Self> {
        Ok(Self {
            stmt: tx.prepare_cached(
                "INSERT INTO deliveries (space_id, destination_id, profile_id, call)
                 VALUES (?1, ?2, ?3, ?4)",
            )?,
        })
    }

    pub(super) fn call(&mut self, d: &Row, profile_id: &str, call: &Value) -> Result<()> {
        self.stmt.execute(params![
            d.space_id,
            d.destination_id,
            profile_id,
            call.to_string()
        ])?;
        Ok(())
    }
}

impl IdCache {
    /// A profile's own identifiers and its parent, if merged.
    pub(super) fn row(
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

    pub(super) fn own(
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
    pub(super) fn root(
        &mut self,
        tx: &Connection,
        space_id: &str,
        profile_id: &str,
    ) -> Result<RootIds> {
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

impl SyncWorker {
    pub fn new(store: Arc<SqliteStore>) -> Arc<Self> {
        Arc::new(Self { store })
    }

    /// Fans out until `stop` is set, pausing briefly when caught up.
    /// Runs the fan-out on its own thread under [`crate::supervise`].
    pub fn spawn(
        self: &Arc<Self>,
        stop: Arc<AtomicBool>,
        health: Arc<crate::WorkerHealth>,
    ) -> std::thread::JoinHandle<()> {
        let me = Arc::clone(self);
        std::thread::Builder::new()
            .name("kindred-sync".into())
            .spawn(move || {
                crate::supervise(&health, &stop, || {
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
    pub fn lag(&self) -> Result<crate::Lag> {
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
        Ok(crate::Lag::of(pending, oldest, kindred_store::now_millis()))
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
            && cursor(&conn, MERGES_CURSOR)? >= merges
            && cursor(&conn, IDENTIFIERS_CURSOR)? >= identifier_log_end(&conn)?)
    }
}
