//! Online backups of a data directory (`kindred backup` / `kindred
//! restore`), taken while a server runs.
//!
//! Each database is copied with `VACUUM INTO` from one read transaction
//! of its own (WAL readers never block the writers), one after another in
//! the order that keeps every cross-file reference pointing backwards:
//! the queue first, then `sync.db` (its cursors point into the change
//! and merge logs), `compute.db` (its cursor points into `store.db`'s
//! events) and `store.db` last. So:
//! - every event acknowledged before the backup began is in the copy:
//!   either still in the queue's copy or, if applied and truncated from
//!   the queue before that copy was taken, in `store.db`'s, taken later;
//! - an event in both is applied once after a restore (the identity step
//!   deduplicates by message id), and the compute and sync steps redo
//!   whatever their earlier copies had not reached yet.
//!
//! A restore copies the files into an empty data directory and moves the
//! queue's sequence past the identity step's cursor, so that events
//! accepted after the restore are numbered after everything the copy of
//! `store.db` counts as applied.

use std::path::Path;

use rusqlite::{params, Connection, OptionalExtension};
use serde_json::json;

use kindred_store::{now_millis, Result, StoreError};

/// The databases, in the order they are copied.
const DATABASES: [&str; 4] = ["queue.db", "sync.db", "compute.db", "store.db"];
/// Copied as they are (they never change after they are made).
const PLAIN_FILES: [&str; 1] = ["secrets.key"];
/// What a backup directory holds besides the files: when and of what.
const MANIFEST: &str = "kindred-backup.json";

fn refuse(message: String) -> StoreError {
    StoreError::Invalid(message)
}

/// Whether `dir` is missing or empty.
fn is_empty(dir: &Path) -> Result<bool> {
    match std::fs::read_dir(dir) {
        Ok(mut entries) => Ok(entries.next().is_none()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(true),
        Err(e) => Err(e.into()),
    }
}

/// What a backup wrote: each file and its size.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackupReport {
    pub files: Vec<(String, u64)>,
}

/// Takes a consistent snapshot of the data directory `data_dir` (a
/// server may be running on it) into `dest`, which must be missing or
/// empty.
pub fn backup(data_dir: &Path, dest: &Path) -> Result<BackupReport> {
    if !data_dir.join("store.db").exists() {
        return Err(refuse(format!(
            "{} is not a Kindred data directory (no store.db)",
            data_dir.display()
        )));
    }
    if !is_empty(dest)? {
        return Err(refuse(format!(
            "{} is not empty: a backup goes into a new directory",
            dest.display()
        )));
    }
    std::fs::create_dir_all(dest)?;
    let started = now_millis();
    let mut files = Vec::new();
    for name in DATABASES {
        let source = data_dir.join(name);
        if !source.exists() {
            continue;
        }
        let conn = Connection::open(&source)?;
        conn.busy_timeout(std::time::Duration::from_secs(30))?;
        let target = dest.join(name);
        conn.execute("VACUUM INTO ?1", [target.to_string_lossy()])?;
        files.push((name.to_string(), std::fs::metadata(&target)?.len()));
    }
    for name in PLAIN_FILES {
        let source = data_dir.join(name);
        if source.exists() {
            let n = std::fs::copy(&source, dest.join(name))?;
            files.push((name.to_string(), n));
        }
    }
    let manifest = json!({
        "kindred_backup": 1,
        "started_at": kindred_domain::event::format_millis(started),
        "finished_at": kindred_domain::event::format_millis(now_millis()),
        "files": files.iter().map(|(n, size)| json!({"name": n, "bytes": size})).collect::<Vec<_>>(),
    });
    std::fs::write(dest.join(MANIFEST), serde_json::to_vec_pretty(&manifest)?)?;
    Ok(BackupReport { files })
}

/// Restores the backup in `from` into `data_dir`, which must be missing
/// or empty (no server may run on it).
pub fn restore(from: &Path, data_dir: &Path) -> Result<()> {
    if !from.join(MANIFEST).exists() {
        return Err(refuse(format!(
            "{} is not a Kindred backup (no {MANIFEST})",
            from.display()
        )));
    }
    if !is_empty(data_dir)? {
        return Err(refuse(format!(
            "{} is not empty: restore into a new data directory",
            data_dir.display()
        )));
    }
    std::fs::create_dir_all(data_dir)?;
    for name in DATABASES.iter().chain(PLAIN_FILES.iter()) {
        let source = from.join(name);
        if source.exists() {
            // (Under another name first: a restore cut short leaves no
            // file that looks complete.)
            let partial = data_dir.join(format!("{name}.restoring"));
            std::fs::copy(&source, &partial)?;
            std::fs::rename(&partial, data_dir.join(name))?;
        }
    }
    // The queue's next numbers come after the identity step's cursor.
    let applied: i64 = Connection::open(data_dir.join("store.db"))?
        .query_row(
            "SELECT seq FROM cursors WHERE name = ?1",
            [crate::worker::CURSOR],
            |r| r.get(0),
        )
        .optional()?
        .unwrap_or(0);
    let queue = data_dir.join("queue.db");
    if queue.exists() && applied > 0 {
        let conn = Connection::open(&queue)?;
        let known: Option<i64> = conn
            .query_row(
                "SELECT seq FROM sqlite_sequence WHERE name = 'queue'",
                [],
                |r| r.get(0),
            )
            .optional()?;
        match known {
            Some(seq) if seq >= applied => {}
            Some(_) => {
                conn.execute(
                    "UPDATE sqlite_sequence SET seq = ?1 WHERE name = 'queue'",
                    params![applied],
                )?;
            }
            None => {
                conn.execute(
                    "INSERT INTO sqlite_sequence (name, seq) VALUES ('queue', ?1)",
                    params![applied],
                )?;
            }
        }
    }
    Ok(())
}
