//! The `identity` function: consumes the events queue and runs each event
//! through the identity pipeline on DynamoDB. Failures are reported per
//! message (`batchItemFailures`): SQS redelivers only those, and after the
//! queue's `maxReceiveCount` moves them to the dead-letter queue, so one
//! poisoned message never blocks the others.
//!
//! Every recorded event (and every repeat of one, in case the first
//! attempt stopped before this step) is then sent to the compute queue;
//! a message is reported done only once that send succeeded.

use aws_lambda_events::sqs::{BatchItemFailure, SqsBatchResponse, SqsEvent};
use kindred_aws::dynamo::compute::ComputeMessage;
use kindred_aws::sync::SyncMessage;
use kindred_aws::{identify, DynamoStore, SqsQueue};
use kindred_store::identity::Outcome;
use kindred_store::ports::QueuedEvent;
use kindred_store::StoreError;
use tracing::{info, info_span, warn, Instrument};

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
    let mut response = SqsBatchResponse::default();
    let mut recorded: Vec<(String, ComputeMessage)> = Vec::new();
    let mut merges: Vec<(String, SyncMessage)> = Vec::new();
    for record in event.records {
        let sqs_id = record.message_id.clone().unwrap_or_default();
        // A message received before may have been applied by an attempt
        // whose announcements were not sent (the reason it came back).
        let redelivered = record
            .attributes
            .get("ApproximateReceiveCount")
            .and_then(|c| c.parse::<u32>().ok())
            .is_some_and(|c| c > 1);
        let span = info_span!("identity", sqs_message_id = %sqs_id);
        let result = async {
            let queued: QueuedEvent = serde_json::from_str(record.body.as_deref().unwrap_or(""))
                .map_err(|e| StoreError::Invalid(format!("not a queued event: {e}")))?;
            let message_id = serde_json::from_str::<serde_json::Value>(&queued.body)
                .ok()
                .and_then(|v| v["messageId"].as_str().map(str::to_string))
                .unwrap_or_default();
            let before = store.usage();
            let outcome = Box::pin(identify(store, &queued)).await?;
            let usage = store.usage().since(before);
            let (profile_id, created, merged) = match &outcome {
                Outcome::Recorded {
                    profile_id,
                    created,
                    merged,
                } => (profile_id.as_str(), *created, *merged),
                _ => ("", false, 0),
            };
            // Ids and counts only: never the event or its traits.
            info!(
                space_id = %queued.space_id,
                message_id,
                profile_id,
                created,
                merged,
                duplicate = outcome == Outcome::Duplicate,
                suppressed = outcome == Outcome::Suppressed,
                dynamodb_read_requests = usage.read_requests,
                dynamodb_write_requests = usage.write_requests,
                dynamodb_read_units = usage.read_units,
                dynamodb_write_units = usage.write_units,
                "event applied"
            );
            // A merge is announced (for `alias` calls); so is a redelivered
            // duplicate, which may be a merge whose announcement failed:
            // the sync step finds its profile and merges from the event
            // (none: nothing to announce; the alias's messageId is stable,
            // so destinations drop one announced twice).
            let unsure = outcome == Outcome::Duplicate && redelivered;
            if (merged > 0 || unsure) && !message_id.is_empty() {
                merges.push((
                    sqs_id.clone(),
                    SyncMessage::Merge {
                        space_id: queued.space_id.clone(),
                        profile_id: profile_id.to_string(),
                        message_id: message_id.clone(),
                    },
                ));
            }
            // Nothing of a suppressed person's event was stored: nothing to compute.
            if !matches!(outcome, Outcome::Unresolved | Outcome::Suppressed)
                && !message_id.is_empty()
            {
                recorded.push((
                    sqs_id.clone(),
                    ComputeMessage::Event {
                        space_id: queued.space_id.clone(),
                        message_id,
                    },
                ));
            }
            Ok::<_, StoreError>(())
        }
        .instrument(span)
        .await;
        if let Err(e) = result {
            warn!(sqs_message_id = %sqs_id, error = %e, "event not applied; SQS will redeliver it");
            let mut failure = BatchItemFailure::default();
            failure.item_identifier = sqs_id;
            response.batch_item_failures.push(failure);
        }
    }
    if let Some(sync) = sync {
        let messages: Vec<&SyncMessage> = merges.iter().map(|(_, m)| m).collect();
        if let Err(e) = sync.send_json(&messages).await {
            warn!(error = %e, "merge messages not sent; SQS will redeliver their events");
            for (sqs_id, _) in &merges {
                let mut failure = BatchItemFailure::default();
                failure.item_identifier = sqs_id.clone();
                response.batch_item_failures.push(failure);
            }
        }
    }
    let messages: Vec<&ComputeMessage> = recorded.iter().map(|(_, m)| m).collect();
    if let Err(e) = compute.send_json(&messages).await {
        warn!(error = %e, "compute messages not sent; SQS will redeliver their events");
        for (sqs_id, _) in recorded {
            let mut failure = BatchItemFailure::default();
            failure.item_identifier = sqs_id;
            response.batch_item_failures.push(failure);
        }
    }
    response
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
    async fn a_message_that_is_not_a_queued_event_is_reported_failed_alone() {
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
