//! The local runner as a library, so tests and the benchmark compose
//! exactly what `kindred serve` runs.

pub mod backfill;
pub mod bench;
pub mod config;
pub mod destinations;
pub mod metrics;
pub mod regulations;
pub mod server;
pub mod tokens;
