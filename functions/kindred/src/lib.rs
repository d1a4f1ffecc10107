//! The local runner as a library, so tests and the benchmark compose
//! exactly what `kindred serve` runs.

pub mod backfill;
pub mod bench;
pub mod compute_bench;
pub mod config;
pub mod destinations;
pub mod privacy_bench;
pub mod regulations;
pub mod server;
pub mod sync_bench;
pub mod tokens;
pub mod workload;
