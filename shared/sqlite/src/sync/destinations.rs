//! Destinations on SQLite: creating and replacing them (the rules are
//! the domain's `SyncPosition` and `check_secret`), reading them and
//! their delivery status.

use super::*;
use kindred_store::secret::Secret;

impl Row {
    pub(super) fn position(&self) -> SyncPosition {
        SyncPosition {
            initial_pending: self.initial_pending,
            synced: self.synced,
            since_change: self.since_change,
        }
    }

    pub(super) fn record(&self) -> DestinationRecord {
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
    /// Every destination of every space with its delivery counts (for
    /// `/metrics`; secrets are not read).
    pub async fn delivery_statuses(&self) -> Result<Vec<(String, String, DestinationStatus)>> {
        self.blocking(|s| {
            let conn = s.sync_reader()?;
            let ids: Vec<(String, String)> = conn
                .prepare_cached("SELECT space_id, destination_id FROM destinations ORDER BY 1, 2")?
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect::<rusqlite::Result<_>>()?;
            ids.into_iter()
                .map(|(space, id)| {
                    let status = status_of(&conn, &space, &id)?;
                    Ok((space, id, status))
                })
                .collect()
        })
        .await
    }

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

    pub(super) fn put_destination_now(
        &self,
        space_id: &str,
        destination_id: &str,
        name: Option<String>,
        settings: Settings,
        secret: Option<Secret>,
    ) -> Result<(DestinationRecord, bool)> {
        let now = now_millis();
        let sealed = secret.map(|s| {
            self.sealer
                .seal(s.expose(), &secret_context(space_id, destination_id))
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
}

pub(super) fn status_of(
    conn: &Connection,
    space_id: &str,
    destination_id: &str,
) -> Result<DestinationStatus> {
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
        secret: Option<Secret>,
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
