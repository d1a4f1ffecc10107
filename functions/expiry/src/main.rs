use std::sync::Arc;

use kindred_aws::compute::DynamoComputations;
use kindred_aws::{DynamoStore, SqsQueue};
use kindred_expiry::{handle, Config};
use lambda_runtime::{service_fn, LambdaEvent};

#[tokio::main]
async fn main() -> Result<(), lambda_runtime::Error> {
    kindred_aws::lambda::init_logging();
    let config = Config::load()?;
    let sdk = kindred_aws::lambda::sdk_config().await;
    let computations = &DynamoComputations {
        store: Arc::new(DynamoStore::new(
            aws_sdk_dynamodb::Client::new(&sdk),
            &config.table,
        )),
        queue: Arc::new(SqsQueue::new(
            aws_sdk_sqs::Client::new(&sdk),
            &config.compute_queue_url,
        )),
        sync: (config.sync_queue_url.as_ref())
            .map(|url| Arc::new(SqsQueue::new(aws_sdk_sqs::Client::new(&sdk), url))),
    };
    lambda_runtime::run(service_fn(
        move |event: LambdaEvent<serde_json::Value>| async move {
            handle(computations, &event.payload)
                .await
                .map_err(lambda_runtime::Error::from)
        },
    ))
    .await
}
