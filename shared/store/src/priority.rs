//! CPU priorities of Kindred's own threads. On two cores everything
//! competes for the same CPU, so work that may wait gives way to work a
//! client is waiting on: a Profile API read first, then a batch being
//! read and identity resolution, then computed values (BENCHMARKS.md,
//! issue 19). The levels are on thread-priority's cross-platform scale
//! (0-99), whose niceness on Linux the comments give.

use thread_priority::{set_current_thread_priority, ThreadPriority, ThreadPriorityValue};
use tracing::info;

/// The Tracking API's parsing of batches, and the local queue's writer,
/// which compresses what it appends (niceness 4).
pub const INGEST: u8 = 38;
/// The compute worker (niceness 9): identity resolution comes first,
/// computed values may lag.
pub const COMPUTE: u8 = 25;

/// Lowers the calling thread's CPU priority to `level`. A thread that
/// cannot change it keeps the default, and the log says so.
pub fn lower_to(thread: &str, level: u8) {
    let result = ThreadPriorityValue::try_from(level)
        .map_err(|e| e.to_string())
        .and_then(|p| {
            set_current_thread_priority(ThreadPriority::Crossplatform(p))
                .map_err(|e| format!("{e:?}"))
        });
    if let Err(e) = result {
        info!(thread, error = %e, "the thread keeps the default priority");
    }
}
