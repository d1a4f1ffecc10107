//! Every cross-crate and end-to-end test, in one test binary.
//!
//! One binary instead of one per file: each links the whole workspace and
//! the AWS SDK, so separate binaries multiplied the link time and the disk
//! the test command needs. nextest still runs every test in its own process.

mod common;

mod browser;
mod browser_routes;
mod compute_contract;
mod computed;
mod crash_safety;
mod deployed;
mod dynamodb_costs;
mod fan_out_contract;
mod hardening;
mod http_api;
mod identity_contract;
mod identity_races;
mod lambda_compute;
mod lambda_pipeline;
mod metrics;
mod openapi;
mod privacy;
mod profile_api_contract;
mod queue_contract;
mod reference_workload;
mod rudderstack_clients;
mod segment_python_client;
mod store_contract;
mod sync;
mod sync_contract;
mod ui;
