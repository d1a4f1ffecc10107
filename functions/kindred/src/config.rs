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
}

#[derive(Clone, Debug)]
pub struct Config {
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    pub ingest_rate: u32,
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
        Ok(Self {
            data_dir: args.data_dir,
            listen,
            ingest_rate: args.ingest_rate,
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
