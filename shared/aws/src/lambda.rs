//! What every Kindred Lambda function sets up the same way.

use aws_config::{BehaviorVersion, SdkConfig};

/// JSON logs for CloudWatch, one object per line, filtered by `RUST_LOG`
/// (default `info`: no line per request; `debug` adds each request and
/// its DynamoDB cost). Handlers log ids and counts, never payloads.
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
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
    /// SHA-256), where destinations are deployed: read at start-up from
    /// Secrets Manager (`KINDRED_SECRETS_KEY_ARN`), never from the
    /// environment on AWS (`KINDRED_SECRETS_KEY` is for local tools).
    pub secrets_key: Option<String>,
    /// Destinations may be at internal addresses, and Segment-compatible
    /// hosts may be `http` (`KINDRED_ALLOW_PRIVATE_DESTINATIONS=true`; the
    /// template's `AllowPrivateDestinations`, off by default).
    pub allow_private_destinations: bool,
}

impl Config {
    /// The configuration, with the secrets key read from Secrets Manager
    /// when `KINDRED_SECRETS_KEY_ARN` names it.
    pub async fn load_with_secrets(sdk: &SdkConfig) -> Result<Self, String> {
        let mut config = Self::load()?;
        if let Ok(arn) = std::env::var("KINDRED_SECRETS_KEY_ARN") {
            config.secrets_key = Some(secret_value(sdk, &arn).await?);
        }
        Ok(config)
    }

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

/// A secret's string value from Secrets Manager.
pub async fn secret_value(sdk: &SdkConfig, arn: &str) -> Result<String, String> {
    let out = aws_sdk_secretsmanager::Client::new(sdk)
        .get_secret_value()
        .secret_id(arn)
        .send()
        .await
        .map_err(|e| {
            format!(
                "the secrets key could not be read from Secrets Manager: {}",
                aws_sdk_secretsmanager::error::DisplayErrorContext(&e)
            )
        })?;
    out.secret_string()
        .map(str::to_string)
        .ok_or_else(|| "the secrets key's secret has no string value".to_string())
}

/// The store's running request and capacity totals, for
/// `kindred_http::with_request_costs` (in the Lambda functions).
pub fn request_cost(store: &crate::DynamoStore) -> kindred_store::RequestCost {
    let u = store.usage();
    kindred_store::RequestCost {
        read_requests: u.read_requests,
        write_requests: u.write_requests,
        read_units: u.read_units,
        write_units: u.write_units,
    }
}

/// An SQS batch as the functions' steps take it: (message id, body).
pub fn sqs_messages(event: aws_lambda_events::sqs::SqsEvent) -> Vec<(String, String)> {
    event
        .records
        .into_iter()
        .map(|r| (r.message_id.unwrap_or_default(), r.body.unwrap_or_default()))
        .collect()
}

/// The partial batch response naming the messages that failed: SQS
/// redelivers those only (`ReportBatchItemFailures`).
pub fn batch_failures(
    failed: impl IntoIterator<Item = String>,
) -> aws_lambda_events::sqs::SqsBatchResponse {
    let mut response = aws_lambda_events::sqs::SqsBatchResponse::default();
    for id in failed {
        let mut failure = aws_lambda_events::sqs::BatchItemFailure::default();
        failure.item_identifier = id;
        response.batch_item_failures.push(failure);
    }
    response
}
