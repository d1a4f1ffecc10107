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
    /// Connections served at once; past it new ones wait in the listen
    /// backlog until one closes.
    #[arg(long, env = "KINDRED_MAX_CONNECTIONS", default_value_t = 4_096)]
    pub max_connections: usize,
    /// Seconds a client may take to send a request's headers.
    #[arg(long, env = "KINDRED_HEADER_READ_TIMEOUT_SECS", default_value_t = 10)]
    pub header_read_timeout_secs: u64,
    /// Seconds a request may take from its headers to its answer, its
    /// body included (408 past it).
    #[arg(long, env = "KINDRED_REQUEST_TIMEOUT_SECS", default_value_t = 30)]
    pub request_timeout_secs: u64,
    /// Where browsers reach this server, like https://events.example.com:
    /// the source settings that Segment's browser library fetches send
    /// its events there. Default: http:// and the listen address
    /// (localhost when listening on every interface).
    #[arg(long, env = "KINDRED_PUBLIC_URL")]
    pub public_url: Option<String>,
    /// Serve Prometheus metrics at http://ADDRESS/metrics, like
    /// 127.0.0.1:9464 (off by default). They cover every space, so the
    /// address is the operator's alone: bind it where only the scraper
    /// reaches it.
    #[arg(long, env = "KINDRED_METRICS_LISTEN")]
    pub metrics_listen: Option<String>,
}

/// What the HTTP server allows a client.
#[derive(Clone, Copy, Debug)]
pub struct ServerLimits {
    /// Connections served at once.
    pub max_connections: usize,
    pub header_read_timeout: std::time::Duration,
    pub request_timeout: std::time::Duration,
}

impl Default for ServerLimits {
    fn default() -> Self {
        Self {
            max_connections: 4_096,
            header_read_timeout: std::time::Duration::from_secs(10),
            request_timeout: std::time::Duration::from_secs(30),
        }
    }
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
    /// Connections, header and request timeouts.
    pub limits: ServerLimits,
    /// Where browsers reach this server; `None`: from the listen address.
    pub public_url: Option<kindred_http::PublicUrl>,
    /// Where `/metrics` is served, if anywhere.
    pub metrics_listen: Option<SocketAddr>,
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
            args.max_connections > 0,
            "--max-connections must be at least 1"
        );
        anyhow::ensure!(
            args.header_read_timeout_secs > 0 && args.request_timeout_secs > 0,
            "--header-read-timeout-secs and --request-timeout-secs must be at least 1"
        );
        anyhow::ensure!(
            args.sync_retry_base_ms > 0,
            "--sync-retry-base-ms must be at least 1"
        );
        anyhow::ensure!(
            args.sync_max_attempts > 0,
            "--sync-max-attempts must be at least 1"
        );
        let metrics_listen = args
            .metrics_listen
            .as_deref()
            .map(|a| {
                a.parse().with_context(|| {
                    format!("--metrics-listen {a:?} is not an address like 127.0.0.1:9464")
                })
            })
            .transpose()?;
        let public_url = args
            .public_url
            .as_deref()
            .map(kindred_http::PublicUrl::parse)
            .transpose()
            .map_err(|e| anyhow::anyhow!("--public-url: {e}"))?;
        Ok(Self {
            metrics_listen,
            data_dir: args.data_dir,
            public_url,
            listen,
            ingest_rate: args.ingest_rate,
            sync: kindred_sync::RetryPolicy {
                base: std::time::Duration::from_millis(args.sync_retry_base_ms),
                max_attempts: args.sync_max_attempts,
                ..kindred_sync::RetryPolicy::default()
            },
            allow_private_destinations: args.allow_private_destinations,
            limits: ServerLimits {
                max_connections: args.max_connections,
                header_read_timeout: std::time::Duration::from_secs(args.header_read_timeout_secs),
                request_timeout: std::time::Duration::from_secs(args.request_timeout_secs),
            },
        })
    }
}

/// Where browsers reach a server listening on `addr` when no public URL
/// is configured: `http://` and the address, `localhost` for every
/// interface.
pub fn default_public_url(addr: SocketAddr) -> kindred_http::PublicUrl {
    let host = if addr.ip().is_unspecified() {
        format!("localhost:{}", addr.port())
    } else {
        addr.to_string()
    };
    kindred_http::PublicUrl {
        protocol: "http".into(),
        host,
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
