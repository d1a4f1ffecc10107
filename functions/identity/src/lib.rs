//! The `identity` function: consumes the events queue and runs each event
//! through the identity pipeline on DynamoDB. Failures are reported per
//! message (`batchItemFailures`): SQS redelivers only those, and after the
//! queue's `maxReceiveCount` moves them to the dead-letter queue, so one
//! poisoned message never blocks the others.
//!
//! Every recorded event (and every repeat of one, in case the first
//! attempt stopped before this step) is then sent to the compute queue;
//! a message is reported done only once that send succeeded.

use aws_lambda_events::sqs::{SqsBatchResponse, SqsEvent};
use kindred_aws::identity::Received;
use kindred_aws::lambda::batch_failures;
use kindred_aws::{DynamoStore, SqsQueue};

pub use kindred_aws::lambda::Config;

/// Handles one SQS batch. Messages are independent: each is applied or
/// reported failed on its own.
///
/// `sync`: where a merging event is announced (for `alias` calls), if
/// destinations are deployed.
pub async fn handle(
    store: &DynamoStore,
    compute: &SqsQueue,
    sync: Option<&SqsQueue>,
    event: SqsEvent,
) -> SqsBatchResponse {
    let messages = event
        .records
        .into_iter()
        .map(|record| Received {
            redelivered: record
                .attributes
                .get("ApproximateReceiveCount")
                .and_then(|c| c.parse::<u32>().ok())
                .is_some_and(|c| c > 1),
            sqs_id: record.message_id.unwrap_or_default(),
            body: record.body.unwrap_or_default(),
        })
        .collect();
    batch_failures(kindred_aws::identity::handle(store, compute, sync, messages).await)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fixture with `{{BODY}}` replaced, as Lambda delivers it.
    fn sqs_event(body: &str) -> SqsEvent {
        let template = include_str!("../fixtures/sqs-event.json");
        let body = serde_json::to_string(body).unwrap();
        serde_json::from_str(&template.replace("\"{{BODY}}\"", &body)).unwrap()
    }

    #[tokio::test]
    async fn a_message_that_is_not_a_queued_event_is_reported_failed() {
        // Fails before any DynamoDB call, so no endpoint is needed.
        let sdk = aws_config_for_tests();
        let store = DynamoStore::new(aws_sdk_dynamodb::Client::from_conf(sdk), "unused");
        let sqs = aws_sdk_sqs::Client::from_conf(
            aws_sdk_sqs::Config::builder()
                .behavior_version(aws_sdk_sqs::config::BehaviorVersion::latest())
                .region(aws_sdk_sqs::config::Region::new("us-east-1"))
                .build(),
        );
        let compute = SqsQueue::new(sqs, "unused");
        let response = handle(&store, &compute, None, sqs_event("this is not JSON")).await;
        let failed: Vec<&str> = response
            .batch_item_failures
            .iter()
            .map(|f| f.item_identifier.as_str())
            .collect();
        assert_eq!(failed, ["059f36b4-87a3-44ab-83d2-661975830a7d"]);
    }

    fn aws_config_for_tests() -> aws_sdk_dynamodb::Config {
        aws_sdk_dynamodb::Config::builder()
            .behavior_version(aws_sdk_dynamodb::config::BehaviorVersion::latest())
            .region(aws_sdk_dynamodb::config::Region::new("us-east-1"))
            .build()
    }
}
