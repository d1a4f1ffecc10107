//! What every Kindred Lambda function sets up the same way.

use aws_config::{BehaviorVersion, SdkConfig};

/// JSON logs for CloudWatch, one object per line, filtered by `RUST_LOG`
/// (default `info`; the routers' per-request lines are at debug and on by
/// default here). Handlers log ids and counts, never payloads.
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,kindred_http=debug"));
    tracing_subscriber::fmt()
        .json()
        .with_env_filter(filter)
        .with_ansi(false)
        .without_time()
        .with_current_span(true)
        .init();
}

/// The SDK's configuration from the Lambda environment (region,
/// credentials; `AWS_ENDPOINT_URL_*` points it at emulators in tests).
pub async fn sdk_config() -> SdkConfig {
    aws_config::defaults(BehaviorVersion::latest()).load().await
}

/// A required environment variable, or a message naming it.
pub fn env(name: &str) -> Result<String, String> {
    std::env::var(name).map_err(|_| format!("the environment variable {name} is not set"))
}

/// The configuration of the functions that work on the table and send to
/// the compute queue (`identity`, `compute`, `expiry`, `profile-api`),
/// from their environment, loaded once.
#[derive(Clone, Debug)]
pub struct Config {
    pub table: String,
    /// The compute queue: recorded events, recomputes and backfill passes.
    pub compute_queue_url: String,
    /// The sync queue (`changes`, `merge`, `deliver`), where destinations
    /// are deployed.
    pub sync_queue_url: Option<String>,
    /// The secret destination secrets are sealed under (the key is its
    /// SHA-256), where destinations are deployed.
    pub secrets_key: Option<String>,
    /// Destinations may be at internal addresses, and Segment-compatible
    /// hosts may be `http` (`KINDRED_ALLOW_PRIVATE_DESTINATIONS=true`; the
    /// template's `AllowPrivateDestinations`, off by default).
    pub allow_private_destinations: bool,
}

impl Config {
    pub fn load() -> Result<Self, String> {
        Ok(Self {
            table: env("KINDRED_TABLE")?,
            compute_queue_url: env("KINDRED_COMPUTE_QUEUE_URL")?,
            sync_queue_url: std::env::var("KINDRED_SYNC_QUEUE_URL").ok(),
            secrets_key: std::env::var("KINDRED_SECRETS_KEY").ok(),
            allow_private_destinations: std::env::var("KINDRED_ALLOW_PRIVATE_DESTINATIONS")
                .is_ok_and(|v| v == "true"),
        })
    }

    /// The sealer of destination secrets, if a key is configured.
    pub fn sealer(&self) -> Option<kindred_store::secret::Sealer> {
        use sha2::{Digest, Sha256};
        self.secrets_key.as_ref().map(|k| {
            let key: [u8; 32] = Sha256::digest(k.as_bytes()).into();
            kindred_store::secret::Sealer::from_key(&key)
        })
    }
}

/// The store's running request and capacity totals, for
/// [`kindred_http::with_request_costs`].
pub fn request_cost(store: &crate::DynamoStore) -> kindred_http::RequestCost {
    let u = store.usage();
    kindred_http::RequestCost {
        read_requests: u.read_requests,
        write_requests: u.write_requests,
        read_units: u.read_units,
        write_units: u.write_units,
    }
}
