//! Each destination's outbox on SQLite: the calls waiting, their
//! attempts, dead letters and replays (the delivery worker's port).

use super::*;

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
                            .open(sealed, &secret_context(&r.space_id, &r.destination_id))?
                            .into(),
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
