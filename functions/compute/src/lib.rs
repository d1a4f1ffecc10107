//! The `compute` function: consumes the compute queue (recorded events,
//! expiry and backfill recomputes, backfill passes) and folds them into
//! profile states on DynamoDB. Failures are reported per message
//! (`batchItemFailures`): SQS redelivers only those, and after the
//! queue's `maxReceiveCount` moves them to the dead-letter queue.

use aws_lambda_events::sqs::{SqsBatchResponse, SqsEvent};
use kindred_aws::lambda::{batch_failures, sqs_messages};
use kindred_aws::{DynamoStore, SqsQueue};

pub use kindred_aws::lambda::Config;

/// Handles one SQS batch; the messages of one profile are folded together.
pub async fn handle(
    store: &DynamoStore,
    queue: &SqsQueue,
    sync: Option<&SqsQueue>,
    event: SqsEvent,
) -> SqsBatchResponse {
    let messages = sqs_messages(event);
    batch_failures(kindred_aws::compute::handle(store, queue, sync, messages).await)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_message_that_is_not_a_compute_message_is_reported_failed() {
        // Fails before any AWS call, so no endpoint is needed.
        let region = || aws_sdk_dynamodb::config::Region::new("us-east-1");
        let store = DynamoStore::new(
            aws_sdk_dynamodb::Client::from_conf(
                aws_sdk_dynamodb::Config::builder()
                    .behavior_version(aws_sdk_dynamodb::config::BehaviorVersion::latest())
                    .region(region())
                    .build(),
            ),
            "unused",
        );
        let queue = SqsQueue::new(
            aws_sdk_sqs::Client::from_conf(
                aws_sdk_sqs::Config::builder()
                    .behavior_version(aws_sdk_sqs::config::BehaviorVersion::latest())
                    .region(aws_sdk_sqs::config::Region::new("us-east-1"))
                    .build(),
            ),
            "unused",
        );
        let fixture = include_str!("../fixtures/sqs-event.json");
        let event: SqsEvent = serde_json::from_str(fixture).unwrap();
        let response = handle(&store, &queue, None, event).await;
        let failed: Vec<&str> = response
            .batch_item_failures
            .iter()
            .map(|f| f.item_identifier.as_str())
            .collect();
        assert_eq!(failed, ["c0a5e0a4-7c4e-4f7b-9a51-2a4f0c6e6f11"]);
    }
}
