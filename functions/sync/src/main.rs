use kindred_sync::RetryPolicy;
use kindred_sync_function::{handle, step, Config};
use lambda_runtime::{service_fn, LambdaEvent};

#[tokio::main]
async fn main() -> Result<(), lambda_runtime::Error> {
    kindred_aws::lambda::init_logging();
    let sdk = kindred_aws::lambda::sdk_config().await;
    let config = Config::load_with_secrets(&sdk).await?;
    let step = &step(&config, &sdk, RetryPolicy::default())?;
    let emf = &kindred_store::emf::Emf::new("sync");
    lambda_runtime::run(service_fn(
        move |event: LambdaEvent<aws_lambda_events::sqs::SqsEvent>| async move {
            let answer = handle(step, event.payload).await;
            emf.flush();
            Ok::<_, lambda_runtime::Error>(answer)
        },
    ))
    .await
}
