//! Where the Tracking API's CPU work runs: reading a batch's events
//! (parsing, validating, writing each back as the stored JSON) takes
//! milliseconds of CPU per request. Done on the async runtime's worker
//! threads, it held them while Profile API requests waited behind it, and
//! their p99 went from ~2.5 ms to 7-13 ms while ingest ran at full speed
//! (BENCHMARKS.md, issue 19). So that work runs on threads of its own, one
//! per core, at a lower CPU priority (niceness 4 on Linux): a read that
//! arrives meanwhile is served first, and on an idle machine ingest runs at
//! full speed.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{mpsc, Arc, Mutex, OnceLock};

use kindred_store::priority;
use tokio::sync::oneshot;
use tracing::error;

use crate::error::ApiError;

type Job = Box<dyn FnOnce() + Send>;

struct Pool {
    jobs: mpsc::Sender<Job>,
}

fn pool() -> &'static Pool {
    static POOL: OnceLock<Pool> = OnceLock::new();
    POOL.get_or_init(|| {
        let (jobs, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
        for i in 0..threads {
            let rx = Arc::clone(&rx);
            let spawned = std::thread::Builder::new()
                .name(format!("kindred-ingest-{i}"))
                .spawn(move || {
                    priority::lower_to("ingest", priority::INGEST);
                    loop {
                        let job = match rx.lock() {
                            Ok(rx) => rx.recv(),
                            Err(poisoned) => poisoned.into_inner().recv(),
                        };
                        let Ok(job) = job else { return };
                        // A panicking job drops its answer (the caller
                        // gets a 500) and leaves the thread serving.
                        if catch_unwind(AssertUnwindSafe(job)).is_err() {
                            error!("an ingest job panicked");
                        }
                    }
                });
            if let Err(e) = spawned {
                error!(error = %e, "could not start an ingest thread");
            }
        }
        Pool { jobs }
    })
}

/// Runs `work` on an ingest thread and answers its result; a job that
/// panics, or a pool that could not start, answers `500`.
pub(crate) async fn run<T: Send + 'static>(
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ApiError> {
    let (tx, rx) = oneshot::channel();
    let job: Job = Box::new(move || {
        let _ = tx.send(work());
    });
    if pool().jobs.send(job).is_err() {
        error!("no ingest thread is running");
        return Err(ApiError::internal());
    }
    rx.await.map_err(|_| ApiError::internal())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The calling thread's niceness, from Linux's `/proc`.
    fn niceness() -> i32 {
        let stat = std::fs::read_to_string("/proc/thread-self/stat").unwrap();
        let after_name = &stat[stat.rfind(')').unwrap() + 2..];
        after_name.split(' ').nth(16).unwrap().parse().unwrap()
    }

    #[tokio::test]
    async fn work_runs_on_an_ingest_thread_below_the_caller_s_priority() {
        let (name, nice) = run(|| {
            let name = std::thread::current().name().map(str::to_string);
            (name, niceness())
        })
        .await
        .unwrap();
        assert!(name.unwrap().starts_with("kindred-ingest-"));
        // Niceness 4, unless the process already runs below it (an
        // unprivileged thread cannot raise its priority).
        let caller = niceness();
        assert!(
            nice == 4 || (caller > 4 && nice == caller),
            "{nice} (caller {caller})"
        );
    }

    #[tokio::test]
    async fn a_panicking_job_answers_500_and_the_threads_go_on() {
        let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
        for _ in 0..threads + 1 {
            let failed = run(|| -> u8 { panic!("a bad job") }).await;
            assert_eq!(
                failed.unwrap_err().status,
                axum::http::StatusCode::INTERNAL_SERVER_ERROR
            );
        }
        assert_eq!(run(|| 7).await.unwrap(), 7);
    }
}
