// The compute handler's future is deeper than the default limit allows.
#![recursion_limit = "256"]

use kindred_aws::{DynamoStore, SqsQueue};
use kindred_compute::{handle, Config};
use lambda_runtime::{service_fn, LambdaEvent};

#[tokio::main]
async fn main() -> Result<(), lambda_runtime::Error> {
    kindred_aws::lambda::init_logging();
    let config = Config::load()?;
    let sdk = kindred_aws::lambda::sdk_config().await;
    let store = &DynamoStore::new(aws_sdk_dynamodb::Client::new(&sdk), &config.table);
    let queue = &SqsQueue::new(aws_sdk_sqs::Client::new(&sdk), &config.compute_queue_url);
    let sync = config
        .sync_queue_url
        .as_ref()
        .map(|url| SqsQueue::new(aws_sdk_sqs::Client::new(&sdk), url));
    let sync = &sync;
    lambda_runtime::run(service_fn(
        move |event: LambdaEvent<aws_lambda_events::sqs::SqsEvent>| async move {
            Ok::<_, lambda_runtime::Error>(handle(store, queue, sync.as_ref(), event.payload).await)
        },
    ))
    .await
}
