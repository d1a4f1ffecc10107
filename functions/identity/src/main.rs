use kindred_aws::DynamoStore;
use kindred_identity::{handle, Config};
use lambda_runtime::{service_fn, LambdaEvent};

#[tokio::main]
async fn main() -> Result<(), lambda_runtime::Error> {
    kindred_aws::lambda::init_logging();
    let config = Config::load()?;
    let sdk = kindred_aws::lambda::sdk_config().await;
    // One store per instance: its caches stay warm across invocations.
    let store = DynamoStore::new(aws_sdk_dynamodb::Client::new(&sdk), &config.table);
    let store = &store;
    let compute =
        &kindred_aws::SqsQueue::new(aws_sdk_sqs::Client::new(&sdk), &config.compute_queue_url);
    let sync = config
        .sync_queue_url
        .as_ref()
        .map(|url| kindred_aws::SqsQueue::new(aws_sdk_sqs::Client::new(&sdk), url));
    let sync = &sync;
    let emf = &kindred_store::emf::Emf::new("identity");
    lambda_runtime::run(service_fn(
        move |event: LambdaEvent<aws_lambda_events::sqs::SqsEvent>| async move {
            let started = std::time::Instant::now();
            let answer = handle(store, compute, sync.as_ref(), event.payload).await;
            kindred_store::emf::counts().value("IdentityBatchDuration", vec![], started.elapsed());
            emf.flush();
            Ok::<_, lambda_runtime::Error>(answer)
        },
    ))
    .await
}
