//! Configuration of `kindred serve`: flags, then environment, then
//! defaults; loaded and checked once at start.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::Args;

#[derive(Args, Clone, Debug)]
pub struct ServeArgs {
    /// Where the embedded store and queue live.
    #[arg(long, env = "KINDRED_DATA_DIR", default_value = "./kindred-data")]
    pub data_dir: PathBuf,
    /// Address to listen on.
    #[arg(long, env = "KINDRED_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: String,
    /// Events per second each space may send before getting 429s.
    #[arg(long, env = "KINDRED_INGEST_RATE", default_value_t = 250_000)]
    pub ingest_rate: u32,
    /// Milliseconds before the first retry of a failed delivery to a
    /// destination (each next retry waits about twice as long).
    #[arg(long, env = "KINDRED_SYNC_RETRY_BASE_MS", default_value_t = 1_000)]
    pub sync_retry_base_ms: u64,
    /// Delivery attempts before calls go to the destination's dead letters
    /// (20: about an hour of failures with the default backoff).
    #[arg(long, env = "KINDRED_SYNC_MAX_ATTEMPTS", default_value_t = 20)]
    pub sync_max_attempts: u32,
    /// Lets destinations point at loopback, private, link-local and other
    /// internal addresses, and Segment-compatible hosts use plain http.
    /// Off by default: an admin token must not become a way to reach the
    /// services inside your network.
    #[arg(long, env = "KINDRED_ALLOW_PRIVATE_DESTINATIONS")]
    pub allow_private_destinations: bool,
}

#[derive(Clone, Debug)]
pub struct Config {
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    pub ingest_rate: u32,
    /// How deliveries to destinations are retried.
    pub sync: kindred_sync::RetryPolicy,
    /// Destinations may be at internal addresses.
    pub allow_private_destinations: bool,
}

impl Config {
    pub fn load(args: ServeArgs) -> anyhow::Result<Self> {
        let listen = args.listen.parse().with_context(|| {
            format!(
                "--listen {:?} is not an address like 127.0.0.1:8080",
                args.listen
            )
        })?;
        anyhow::ensure!(args.ingest_rate > 0, "--ingest-rate must be at least 1");
        anyhow::ensure!(
            args.sync_retry_base_ms > 0,
            "--sync-retry-base-ms must be at least 1"
        );
        anyhow::ensure!(
            args.sync_max_attempts > 0,
            "--sync-max-attempts must be at least 1"
        );
        Ok(Self {
            data_dir: args.data_dir,
            listen,
            ingest_rate: args.ingest_rate,
            sync: kindred_sync::RetryPolicy {
                base: std::time::Duration::from_millis(args.sync_retry_base_ms),
                max_attempts: args.sync_max_attempts,
                ..kindred_sync::RetryPolicy::default()
            },
            allow_private_destinations: args.allow_private_destinations,
        })
    }
}

/// Logs to stderr; `KINDRED_LOG=json` for JSON lines, `RUST_LOG` for levels.
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if std::env::var("KINDRED_LOG").as_deref() == Ok("json") {
        builder.json().init();
    } else {
        builder.init();
    }
}
