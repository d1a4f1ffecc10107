//! The `profile-api` function: the Profile API and the admin API (the
//! same routers `kindred serve` runs) on API Gateway, reading DynamoDB.
//! The template deploys it twice: as `profile-api` (the admin API and the
//! Profile API's writes) and, with `KINDRED_READ_ONLY=true`, as
//! `profile-reads` (the Profile API's reads, on a role that may only read
//! the table).

use std::sync::Arc;

use aws_config::SdkConfig;
use kindred_aws::compute::DynamoComputations;
use kindred_aws::lambda::request_cost;
use kindred_aws::sync::DynamoDestinations;
use kindred_aws::{DynamoStore, SqsQueue};
use kindred_http::ui::UiPrefix;
use kindred_http::{profile_api_app, with_request_costs, ReadState, Router};

pub use kindred_aws::lambda::Config;

/// The router the function serves.
pub fn app(config: &Config, sdk: &SdkConfig) -> Router {
    let mut store = DynamoStore::new(aws_sdk_dynamodb::Client::new(sdk), &config.table);
    if let Some(sealer) = config.sealer() {
        store = store.with_sealer(sealer);
    }
    let store = Arc::new(store);
    // Destinations need the sync queue and the secrets key; without them
    // their routes answer 501.
    let destinations: Option<Arc<dyn kindred_store::Destinations>> =
        match (&config.sync_queue_url, &config.secrets_key) {
            (Some(url), Some(_)) => Some(Arc::new(DynamoDestinations {
                store: store.clone(),
                queue: Arc::new(SqsQueue::new(aws_sdk_sqs::Client::new(sdk), url)),
            })),
            _ => None,
        };
    let compute = Arc::new(SqsQueue::new(
        aws_sdk_sqs::Client::new(sdk),
        &config.compute_queue_url,
    ));
    let app = profile_api_app(ReadState {
        spaces: store.clone(),
        profiles: store.clone(),
        computations: Some(Arc::new(DynamoComputations {
            store: store.clone(),
            queue: compute.clone(),
            sync: (config.sync_queue_url.as_ref())
                .map(|url| Arc::new(SqsQueue::new(aws_sdk_sqs::Client::new(sdk), url))),
        })),
        destinations,
        allow_private_destinations: config.allow_private_destinations,
        // Regulations run on the sync queue.
        privacy: config.sync_queue_url.as_ref().map(|url| {
            Arc::new(kindred_aws::privacy::DynamoPrivacy {
                store: store.clone(),
                queue: Arc::new(SqsQueue::new(aws_sdk_sqs::Client::new(sdk), url)),
                compute: compute.clone(),
            }) as Arc<dyn kindred_store::privacy::Privacy>
        }),
        profile_rate_limiter: Arc::new(kindred_http::RateLimiter::profile_api()),
    });
    let app = app.layer(kindred_http::middleware::from_fn(explorer_prefix));
    with_request_costs(app, Arc::new(move || request_cost(&store)))
}

/// Tells the explorer the path it is served under: the path the browser
/// asked for (API Gateway's request context: `/prod/ui/…` on the
/// execute-api address, the base path on a custom domain) before the one
/// the router sees (`/ui/…`).
async fn explorer_prefix(
    mut request: kindred_http::Request,
    next: kindred_http::middleware::Next,
) -> kindred_http::Response {
    use lambda_http::request::RequestContext;
    use lambda_http::RequestExt;
    let asked = match request.extensions().request_context_ref() {
        Some(RequestContext::ApiGatewayV1(context)) => context.path.clone(),
        _ => None,
    };
    if let Some(prefix) = asked.and_then(|a| UiPrefix::of(&a, request.uri().path())) {
        request.extensions_mut().insert(prefix);
    }
    next.run(request).await
}

/// The router of the reads-only deployment: the same routes, refusing
/// every method that could write ([`kindred_http::reads_only`]).
pub fn reads_app(config: &Config, sdk: &SdkConfig) -> Router {
    kindred_http::reads_only(app(config, sdk))
}

/// Whether this deployment is the reads-only one (`KINDRED_READ_ONLY`).
pub fn read_only_from_env() -> bool {
    std::env::var("KINDRED_READ_ONLY").is_ok_and(|v| v == "true" || v == "1")
}
