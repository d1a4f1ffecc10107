//! The `ingest` function: the Tracking API router (the same one
//! `kindred serve` runs) on API Gateway, authenticating write keys against
//! DynamoDB and sending accepted events to the identity queue on SQS. A
//! request is answered 200 only after SQS accepted every event in it.

use std::sync::Arc;

use aws_config::SdkConfig;
use kindred_aws::lambda::{env, request_cost};
use kindred_aws::{DynamoStore, SqsQueue};
use kindred_http::{ingest_app, with_request_costs, RateLimiter, Router, TrackingState};

/// The function's configuration, from its environment, loaded once.
#[derive(Clone, Debug)]
pub struct Config {
    pub table: String,
    pub events_queue_url: String,
    /// Events per second per space (the per-instance token bucket; API
    /// Gateway throttling bounds the total).
    pub ingest_rate: u32,
}

impl Config {
    pub fn load() -> Result<Self, String> {
        Ok(Self {
            table: env("KINDRED_TABLE")?,
            events_queue_url: env("KINDRED_EVENTS_QUEUE_URL")?,
            ingest_rate: match std::env::var("KINDRED_INGEST_RATE") {
                Ok(v) => v
                    .parse()
                    .map_err(|_| format!("KINDRED_INGEST_RATE is not a number: {v}"))?,
                Err(_) => 250_000,
            },
        })
    }
}

/// The router the function serves.
pub fn app(config: &Config, sdk: &SdkConfig) -> Router {
    let store = Arc::new(DynamoStore::new(
        aws_sdk_dynamodb::Client::new(sdk),
        &config.table,
    ));
    let queue = SqsQueue::new(aws_sdk_sqs::Client::new(sdk), &config.events_queue_url);
    let app = ingest_app(TrackingState {
        spaces: store.clone(),
        queue: Arc::new(queue),
        rate_limiter: Arc::new(RateLimiter::new(config.ingest_rate)),
    });
    with_request_costs(app, Arc::new(move || request_cost(&store)))
}
