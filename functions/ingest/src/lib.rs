//! The `ingest` function: the Tracking API router (the same one
//! `kindred serve` runs) on API Gateway, authenticating write keys against
//! DynamoDB and sending accepted events to the identity queue on SQS. A
//! request is answered 200 only after SQS accepted every event in it.

use std::sync::Arc;

use aws_config::SdkConfig;
use kindred_aws::lambda::{env, request_cost};
use kindred_aws::{DynamoStore, SqsQueue};
use kindred_http::middleware::from_fn as axum_from_fn;
use kindred_http::{ingest_app, with_request_costs, PublicUrl, RateLimiter, Router, TrackingState};
use lambda_http::request::RequestContext;
use lambda_http::RequestExt;

/// The function's configuration, from its environment, loaded once.
#[derive(Clone, Debug)]
pub struct Config {
    pub table: String,
    pub events_queue_url: String,
    /// Events per second per space (the per-instance token bucket; API
    /// Gateway throttling bounds the total).
    pub ingest_rate: u32,
    /// Where browsers reach the Tracking API (a custom domain); `None`:
    /// the address each request came in on (the API's own).
    pub public_url: Option<PublicUrl>,
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
            public_url: match std::env::var("KINDRED_PUBLIC_URL") {
                Ok(v) if !v.trim().is_empty() => {
                    Some(PublicUrl::parse(&v).map_err(|e| format!("KINDRED_PUBLIC_URL: {e}"))?)
                }
                _ => None,
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
        public_url: config.public_url.clone(),
    });
    let app = app.layer(axum_from_fn(api_address));
    with_request_costs(app, Arc::new(move || request_cost(&store)))
}

/// Tags each request with the address API Gateway received it on (its
/// request context, not a client's `Host` header): the public URL of the
/// settings route when none is configured.
async fn api_address(
    mut request: kindred_http::Request,
    next: kindred_http::middleware::Next,
) -> kindred_http::Response {
    let domain = match request.extensions().request_context_ref() {
        Some(RequestContext::ApiGatewayV2(context)) => context.domain_name.clone(),
        _ => None,
    };
    if let Some(url) = domain.and_then(|d| PublicUrl::parse(&format!("https://{d}")).ok()) {
        request.extensions_mut().insert(url);
    }
    next.run(request).await
}
