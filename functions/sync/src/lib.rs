//! The `sync` function: consumes the sync queue (`changes` from the
//! compute function, `merge` from the identity function, `deliver` to
//! drain a destination's outbox) and sends computed traits, audiences
//! and aliases to destinations. Failures are reported per message
//! (`batchItemFailures`); after the queue's `maxReceiveCount` SQS moves a
//! failing message to the dead-letter queue. Calls a destination refuses,
//! or that keep failing, go to that destination's own dead letters
//! (listed and replayed through the Destinations API).

use std::sync::Arc;

use aws_config::SdkConfig;
use aws_lambda_events::sqs::{SqsBatchResponse, SqsEvent};
use kindred_aws::lambda::{batch_failures, sqs_messages};
use kindred_aws::sync::SyncStep;
use kindred_aws::{DynamoStore, SqsQueue};
use kindred_sync::{Deliverer, RetryPolicy};

pub use kindred_aws::lambda::Config;

/// The sync step as configured (the secrets key and the sync queue are
/// required here).
pub fn step(config: &Config, sdk: &SdkConfig, policy: RetryPolicy) -> Result<SyncStep, String> {
    let sealer = config
        .sealer()
        .ok_or("the environment variable KINDRED_SECRETS_KEY is not set")?;
    let url = config
        .sync_queue_url
        .as_ref()
        .ok_or("the environment variable KINDRED_SYNC_QUEUE_URL is not set")?;
    let store = Arc::new(
        DynamoStore::new(aws_sdk_dynamodb::Client::new(sdk), &config.table).with_sealer(sealer),
    );
    Ok(SyncStep {
        deliverer: Deliverer::new(store.clone(), policy, config.allow_private_destinations),
        queue: Arc::new(SqsQueue::new(aws_sdk_sqs::Client::new(sdk), url)),
        store,
        regulation_settle: kindred_aws::privacy::SETTLE,
        initial_sync_roots: kindred_aws::sync::INITIAL_SYNC_ROOTS,
    })
}

/// Handles one SQS batch; each message succeeds or fails alone.
pub async fn handle(step: &SyncStep, event: SqsEvent) -> SqsBatchResponse {
    batch_failures(step.handle(sqs_messages(event)).await)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_message_that_is_not_a_sync_message_is_reported_failed() {
        // Fails before any AWS call, so no endpoint is needed.
        let sdk = SdkConfig::builder()
            .behavior_version(aws_sdk_dynamodb::config::BehaviorVersion::latest())
            .region(aws_sdk_dynamodb::config::Region::new("us-east-1"))
            .build();
        let config = Config {
            table: "unused".into(),
            compute_queue_url: "unused".into(),
            sync_queue_url: Some("http://localhost:1/queue".into()),
            secrets_key: Some("k".into()),
            allow_private_destinations: false,
        };
        let sync = step(&config, &sdk, RetryPolicy::default()).unwrap();
        let event: SqsEvent =
            serde_json::from_str(include_str!("../fixtures/sqs-event.json")).unwrap();
        let response = handle(&sync, event).await;
        assert_eq!(response.batch_item_failures.len(), 1);
        assert_eq!(
            response.batch_item_failures[0].item_identifier,
            "c0a5e0a4-7c4e-4f7b-9a51-2a4f0c6e6f11"
        );
        // Without a secrets key the function does not start.
        let missing = Config {
            secrets_key: None,
            ..config
        };
        assert!(step(&missing, &sdk, RetryPolicy::default()).is_err());
    }
}
