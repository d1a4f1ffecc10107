//! The compute port on SQLite: definitions (validated with the space's
//! others, versioned, backfilled), the change log and lookback requests.

use super::*;

pub(super) fn class_of(s: &str) -> Result<Class> {
    Class::parse(s).ok_or(StoreError::Undecodable(format!("unknown class {s}")))
}

/// The space's live definitions, parsed.
pub(super) fn load_definitions(conn: &Connection, space_id: &str) -> Result<Vec<Definition>> {
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

pub(super) fn set_version(conn: &Connection, space_id: &str) -> Result<i64> {
    Ok(conn
        .prepare_cached("SELECT version FROM definition_sets WHERE space_id = ?1")?
        .query_row([space_id], |r| r.get(0))
        .optional()?
        .unwrap_or(0))
}

pub(super) fn record_of(r: &rusqlite::Row<'_>) -> rusqlite::Result<RawRecord> {
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

impl RawRecord {
    pub(super) fn into_record(self) -> Result<DefinitionRecord> {
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

pub(super) fn get_record(
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

pub(super) fn space_exists(conn: &Connection, space_id: &str) -> Result<bool> {
    Ok(conn
        .prepare_cached("SELECT 1 FROM spaces WHERE space_id = ?1")?
        .query_row([space_id], |_| Ok(()))
        .optional()?
        .is_some())
}

/// Starts a new backfill pass over the space's profiles for every
/// definition that is backfilling.
pub(super) fn restart_backfill(tx: &Transaction<'_>, space_id: &str, now: Millis) -> Result<()> {
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

impl SqliteStore {
    pub(super) fn put_definition_now(
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

    pub(super) fn delete_definition_now(
        &self,
        space_id: &str,
        class: Class,
        key: &str,
    ) -> Result<bool> {
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
    /// The spaces that have (or had) definitions.
    pub fn definition_spaces(&self) -> Result<Vec<String>> {
        let conn = self.reader()?;
        let mut stmt = conn.prepare("SELECT space_id FROM c.definition_sets")?;
        let rows = stmt.query_map([], |r| r.get(0))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    pub fn sweep_all(&self, as_of: Millis) -> Result<u64> {
        let mut n = 0;
        for space in self.definition_spaces()? {
            n += self.sweep(&space, as_of)?;
        }
        Ok(n)
    }
}

/// Whether a stored computed value (`j.value`: `{"c", "v", "t"}`) puts
/// its profile on its definition's member list: the store's rule,
/// [`kindred_store::compute::holds`], as the SQL function
/// `kindred_holds` every reader has ([`super::register_holds`]).
const MEMBER: &str = "kindred_holds(j.value)";

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

    async fn members(
        &self,
        space_id: &str,
        class: Class,
        key: &str,
        after: &str,
        limit: usize,
    ) -> Result<Vec<(String, kindred_store::ComputedValue)>> {
        let (space_id, key, after) = (space_id.to_string(), key.to_string(), after.to_string());
        self.blocking(move |s| {
            let conn = s.reader()?;
            let mut stmt = conn.prepare_cached(&format!(
                "SELECT profile_id, j.value FROM compute_states, json_each(computed) AS j
                 WHERE space_id = ?1 AND profile_id > ?2 AND j.key = ?3
                   AND json_extract(j.value, '$.c') = ?4 AND {MEMBER}
                 ORDER BY profile_id LIMIT ?5"
            ))?;
            let rows = stmt.query_map(
                params![space_id, after, key, class.as_str(), limit as i64],
                |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)),
            )?;
            let mut out = Vec::new();
            for row in rows {
                let (profile_id, value) = row?;
                out.push((profile_id, serde_json::from_str(&value)?));
            }
            Ok(out)
        })
        .await
    }

    async fn sizes(&self, space_id: &str) -> Result<BTreeMap<String, u64>> {
        let space_id = space_id.to_string();
        self.blocking(move |s| {
            let conn = s.reader()?;
            let mut stmt = conn.prepare_cached(&format!(
                "SELECT j.key, count(*) FROM compute_states, json_each(computed) AS j
                 WHERE space_id = ?1 AND {MEMBER} GROUP BY j.key"
            ))?;
            let rows = stmt.query_map(params![space_id], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?))
            })?;
            let mut out = BTreeMap::new();
            for row in rows {
                let (key, n) = row?;
                out.insert(key, n.max(0) as u64);
            }
            Ok(out)
        })
        .await
    }

    async fn changes(&self, space_id: &str, since: i64, limit: usize) -> Result<Vec<ChangeRecord>> {
        let space_id = space_id.to_string();
        self.blocking(move |s| {
            let conn = s.reader()?;
            let mut stmt = conn.prepare_cached(
                "SELECT seq, profile_id, key, class, old, new, at, group_id FROM changes
                 WHERE space_id = ?1 AND seq > ?2 AND (profile_id <> '' OR group_id IS NOT NULL)
                 ORDER BY seq LIMIT ?3",
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
                    r.get::<_, Option<String>>(7)?,
                ))
            })?;
            let mut out = Vec::new();
            for row in rows {
                let (seq, profile_id, key, class, old, new, at, group_id) = row?;
                out.push(ChangeRecord {
                    seq,
                    profile_id,
                    group_id,
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

    async fn account_ids(&self, space_id: &str, after: &str, limit: usize) -> Result<Vec<String>> {
        let (space_id, after) = (space_id.to_string(), after.to_string());
        self.blocking(move |s| {
            let conn = s.reader()?;
            let mut stmt = conn.prepare_cached(
                "SELECT group_id FROM accounts WHERE space_id = ?1 AND group_id > ?2
                 ORDER BY group_id LIMIT ?3",
            )?;
            let ids = stmt
                .query_map(params![space_id, after, limit as i64], |r| r.get(0))?
                .collect::<rusqlite::Result<_>>()?;
            Ok(ids)
        })
        .await
    }

    async fn account_values(
        &self,
        space_id: &str,
        group_id: &str,
    ) -> Result<(ComputedValues, i64)> {
        let (space_id, group_id) = (space_id.to_string(), group_id.to_string());
        self.blocking(move |s| {
            let row: Option<(String, i64)> = s
                .reader()?
                .prepare_cached(
                    "SELECT computed, version FROM c.account_values
                     WHERE space_id = ?1 AND group_id = ?2",
                )?
                .query_row(params![space_id, group_id], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()?;
            match row {
                Some((json, version)) => Ok((serde_json::from_str(&json)?, version)),
                None => Ok((ComputedValues::new(), 0)),
            }
        })
        .await
    }

    async fn write_account_values(
        &self,
        space_id: &str,
        group_id: &str,
        version: i64,
        values: &ComputedValues,
        changes: &[kindred_domain::compute::Change],
        at: Millis,
    ) -> Result<bool> {
        let (space_id, group_id) = (space_id.to_string(), group_id.to_string());
        let computed = serde_json::to_string(values)?;
        let changes = changes.to_vec();
        self.blocking(move |s| {
            let mut conn = s.compute_writer();
            let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let stored: i64 = tx
                .prepare_cached(
                    "SELECT version FROM account_values WHERE space_id = ?1 AND group_id = ?2",
                )?
                .query_row(params![space_id, group_id], |r| r.get(0))
                .optional()?
                .unwrap_or(0);
            if stored != version {
                return Ok(false);
            }
            tx.prepare_cached(
                "INSERT INTO account_values (space_id, group_id, computed, version)
                 VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (space_id, group_id)
                 DO UPDATE SET computed = excluded.computed, version = excluded.version",
            )?
            .execute(params![space_id, group_id, computed, version + 1])?;
            let mut insert = tx.prepare_cached(
                "INSERT INTO changes (space_id, profile_id, key, class, old, new, at, group_id)
                 VALUES (?1, '', ?2, ?3, ?4, ?5, ?6, ?7)",
            )?;
            for c in &changes {
                insert.execute(params![
                    space_id,
                    c.key,
                    c.class.as_str(),
                    c.old.as_ref().map(Value::to_string),
                    c.new.to_string(),
                    at,
                    group_id
                ])?;
            }
            drop(insert);
            tx.commit()?;
            Ok(true)
        })
        .await
    }
}
