//! Workers that cannot die silently: each background loop of `kindred
//! serve` runs under [`supervise`], which catches a panic or an error of
//! one step, logs it, marks the worker down with the reason, and runs the
//! step again after a backoff; [`Health`] reports who is down and how far
//! behind each stage is (for `/healthz`).

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tracing::{error, info};

use super::lock;
use kindred_store::Result;

/// The first wait after a failure; each further consecutive failure
/// doubles it, up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// How far behind one stage is: entries it has not processed yet, and the
/// age of the oldest of them (0 when idle).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Lag {
    pub events: u64,
    pub seconds: f64,
}

impl Lag {
    /// `pending` entries, the oldest received at `oldest` (ms), seen at `now`.
    pub fn of(pending: i64, oldest: Option<i64>, now: i64) -> Self {
        let events = pending.max(0) as u64;
        let seconds = match (events, oldest) {
            (0, _) | (_, None) => 0.0,
            (_, Some(at)) => (now - at).max(0) as f64 / 1000.0,
        };
        Self { events, seconds }
    }
}

/// One worker's state as `/healthz` shows it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WorkerState {
    /// Why the last step failed, while it keeps failing.
    pub down: Option<String>,
    /// Consecutive failed steps.
    pub failures: u32,
    /// Times the worker was restarted after a failure, since start.
    pub restarts: u64,
}

/// A worker's health, shared between its loop and the health endpoint.
#[derive(Debug)]
pub struct WorkerHealth {
    pub name: &'static str,
    state: Mutex<WorkerState>,
}

impl WorkerHealth {
    pub fn new(name: &'static str) -> Arc<Self> {
        Arc::new(Self {
            name,
            state: Mutex::new(WorkerState::default()),
        })
    }

    pub fn state(&self) -> WorkerState {
        lock(&self.state).clone()
    }

    fn failed(&self, reason: String) -> u32 {
        let mut s = lock(&self.state);
        s.failures += 1;
        s.restarts += 1;
        s.down = Some(reason);
        s.failures
    }

    fn succeeded(&self) {
        let mut s = lock(&self.state);
        if s.down.take().is_some() {
            info!(
                worker = self.name,
                after_failures = s.failures,
                "worker recovered"
            );
        }
        s.failures = 0;
    }
}

/// Runs `step` until `stop` is set. A step that returns an error or
/// panics marks the worker down (with the error, never event data: store
/// errors carry no payloads), is logged, and is run again after a backoff
/// that doubles with each consecutive failure (200 ms to 10 s); the first
/// step that succeeds marks it up again. The step waits by itself when it
/// has nothing to do.
pub fn supervise(health: &WorkerHealth, stop: &AtomicBool, mut step: impl FnMut() -> Result<()>) {
    while !stop.load(Ordering::Relaxed) {
        let outcome = catch_unwind(AssertUnwindSafe(&mut step));
        if let Ok(Err(e)) = &outcome {
            // The full error for the operator's log (store errors carry
            // no event data).
            error!(worker = health.name, error = ?e, "worker step error");
        }
        let reason = match outcome {
            Ok(Ok(())) => {
                health.succeeded();
                continue;
            }
            Ok(Err(e)) => format!("storage error: {}", describe(&e)),
            Err(panic) => {
                // The payload is logged, never shown: `/healthz` is public.
                error!(worker = health.name, panic = %panic_text(&*panic), "worker step panicked");
                "the worker panicked".to_string()
            }
        };
        let failures = health.failed(reason.clone());
        let wait = FIRST_BACKOFF
            .saturating_mul(1 << failures.saturating_sub(1).min(10))
            .min(MAX_BACKOFF);
        error!(worker = health.name, failures, retry_in_ms = wait.as_millis() as u64,
               reason = %reason, "worker step failed; restarting it after a backoff");
        let until = Instant::now() + wait;
        while Instant::now() < until && !stop.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(20).min(wait));
        }
    }
}

/// Runs one step over queue entries, turning a panic into an error about
/// the entries (never a storage error), so that the caller's isolation
/// (one entry at a time, then set aside) handles a panicking entry like
/// an undecodable one instead of retrying it forever.
pub(crate) fn catch_panic<T>(step: impl FnOnce() -> Result<T>) -> Result<T> {
    match catch_unwind(AssertUnwindSafe(step)) {
        Ok(result) => result,
        Err(panic) => {
            error!(panic = %panic_text(&*panic), "a step panicked on an entry");
            Err(kindred_store::StoreError::Invariant(
                "processing the entry panicked",
            ))
        }
    }
}

fn panic_text(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic".into())
}

/// What kind of storage failure an error is, in words an operator can act
/// on (the database's own message is logged, never shown: `/healthz` is
/// public).
pub fn describe(e: &kindred_store::StoreError) -> String {
    use rusqlite::ErrorCode;
    match e {
        kindred_store::StoreError::Sqlite(rusqlite::Error::SqliteFailure(f, _)) => match f.code {
            ErrorCode::ReadOnly => "the database is read-only".into(),
            ErrorCode::DiskFull => "the disk is full".into(),
            ErrorCode::SystemIoFailure => "an I/O error".into(),
            ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked => "the database is locked".into(),
            ErrorCode::CannotOpen => "the database cannot be opened".into(),
            ErrorCode::PermissionDenied => "permission denied".into(),
            ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase => {
                "the database is damaged".into()
            }
            _ => "a database failure".into(),
        },
        kindred_store::StoreError::Sqlite(_) => "a database failure".into(),
        kindred_store::StoreError::Corrupt(_) | kindred_store::StoreError::Undecodable(_) => {
            "stored data could not be decoded".into()
        }
        kindred_store::StoreError::Closed => "the store is shutting down".into(),
        kindred_store::StoreError::Service(_) => "a storage service failure".into(),
        _ => "an entry could not be processed".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kindred_store::StoreError;

    #[test]
    fn a_failing_or_panicking_step_is_restarted_and_reported() {
        let health = WorkerHealth::new("test");
        let stop = AtomicBool::new(false);
        let mut calls = 0;
        let mut seen = Vec::new();
        supervise(&health, &stop, || {
            calls += 1;
            seen.push(health.state());
            match calls {
                1 => Err(StoreError::Invalid("disk on fire".into())),
                2 => panic!("worker bug"),
                3 => Ok(()),
                _ => {
                    stop.store(true, Ordering::Relaxed);
                    Ok(())
                }
            }
        });
        assert_eq!(calls, 4);
        assert_eq!(seen[0].down, None);
        // Fixed words only: the error's own text is logged, not shown.
        assert_eq!(
            seen[1].down.as_deref(),
            Some("storage error: an entry could not be processed")
        );
        assert_eq!(seen[2].down.as_deref(), Some("the worker panicked"));
        assert_eq!(seen[2].failures, 2);
        assert_eq!(
            seen[3],
            WorkerState {
                down: None,
                failures: 0,
                restarts: 2
            }
        );
    }
}
