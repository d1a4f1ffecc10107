//! The `profile-api` function: the Profile API and the admin API (the
//! same routers `kindred serve` runs) on API Gateway, reading DynamoDB.

use std::sync::Arc;

use aws_config::SdkConfig;
use kindred_aws::compute::DynamoComputations;
use kindred_aws::lambda::request_cost;
use kindred_aws::{DynamoStore, SqsQueue};
use kindred_http::{profile_api_app, with_request_costs, ReadState, Router};

pub use kindred_aws::lambda::Config;

/// The router the function serves.
pub fn app(config: &Config, sdk: &SdkConfig) -> Router {
    let store = Arc::new(DynamoStore::new(
        aws_sdk_dynamodb::Client::new(sdk),
        &config.table,
    ));
    let app = profile_api_app(ReadState {
        spaces: store.clone(),
        profiles: store.clone(),
        computations: Some(Arc::new(DynamoComputations {
            store: store.clone(),
            queue: Arc::new(SqsQueue::new(
                aws_sdk_sqs::Client::new(sdk),
                &config.compute_queue_url,
            )),
        })),
        // Destinations on AWS are not built yet: their routes answer 501.
        destinations: None,
    });
    with_request_costs(app, Arc::new(move || request_cost(&store)))
}
