//! The identity step as the `identity` function runs it: each queued
//! event through dedup, resolution and the conditional writes on
//! DynamoDB, then announced to the compute queue (and, for merges, to the
//! sync queue). Failures are per message: SQS redelivers only those.

use kindred_store::identity::{process_event, Job, Outcome, SpaceRules};
use kindred_store::ports::QueuedEvent;
use kindred_store::token::new_profile_id;
use kindred_store::{now_millis, Result, StoreError};
use tracing::{info, info_span, warn, Instrument};

use crate::dynamo::compute::ComputeMessage;
use crate::sync::SyncMessage;
use crate::{DynamoStore, SqsQueue};

/// One message of the events queue, as the step takes it.
pub struct Received {
    pub sqs_id: String,
    pub body: String,
    /// Received before (SQS's `ApproximateReceiveCount` above 1): an
    /// attempt may have applied it without sending its announcements.
    pub redelivered: bool,
}

/// Runs one queued event through dedup, resolution and the conditional
/// writes on DynamoDB (re-planned on conflict).
pub async fn identify(store: &DynamoStore, queued: &QueuedEvent) -> Result<Outcome> {
    let event = kindred_store::compute::parse_stored_event(&queued.body)?;
    let rules = SpaceRules {
        rules: store.identity_rules(&queued.space_id).await?,
    };
    let job = Job {
        space_id: &queued.space_id,
        source_id: &queued.source_id,
        event: &event,
        body_json: &queued.body,
        now: now_millis(),
    };
    let mut graph = store.graph();
    process_event(&mut graph, &rules, &job, new_profile_id).await
}

/// Handles one batch of the events queue; returns the SQS ids of the
/// messages that failed. Messages are independent: each is applied or
/// reported failed on its own, and one is reported done only once its
/// announcements were sent.
///
/// `sync`: where a merging event is announced (for `alias` calls), if
/// destinations are deployed.
pub async fn handle(
    store: &DynamoStore,
    compute: &SqsQueue,
    sync: Option<&SqsQueue>,
    messages: Vec<Received>,
) -> Vec<String> {
    let mut failed: Vec<String> = Vec::new();
    let mut recorded: Vec<(String, ComputeMessage)> = Vec::new();
    let mut merges: Vec<(String, SyncMessage)> = Vec::new();
    for Received {
        sqs_id,
        body,
        redelivered,
    } in messages
    {
        let span = info_span!("identity", sqs_message_id = %sqs_id);
        let result = async {
            let queued: QueuedEvent = serde_json::from_str(&body)
                .map_err(|e| StoreError::Undecodable(format!("not a queued event: {e}")))?;
            let message_id = serde_json::from_str::<serde_json::Value>(&queued.body)
                .ok()
                .and_then(|v| v["messageId"].as_str().map(str::to_string))
                .unwrap_or_default();
            let before = store.usage();
            let outcome = Box::pin(identify(store, &queued)).await?;
            let usage = store.usage().since(before);
            let (name, refused) = match &outcome {
                Outcome::Recorded { refused, .. } => ("recorded", refused.as_slice()),
                Outcome::Unresolved { refused } => ("unresolved", refused.as_slice()),
                Outcome::Duplicate => ("duplicate", &[][..]),
                Outcome::Suppressed => ("suppressed", &[][..]),
            };
            let (profile_id, created, merged, claimed) = match &outcome {
                Outcome::Recorded {
                    profile_id,
                    created,
                    merged,
                    claimed,
                    ..
                } => (profile_id.as_str(), *created, *merged, claimed.as_slice()),
                _ => ("", false, 0, &[][..]),
            };
            kindred_store::emf::counts().applied(name, created, merged, refused);
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
            // New identifiers of an existing profile are announced (its
            // current values are sent to them). A redelivered event whose
            // announcement failed is a duplicate by then: that
            // announcement is not made again.
            if !claimed.is_empty() {
                merges.push((
                    sqs_id.clone(),
                    SyncMessage::Identified {
                        space_id: queued.space_id.clone(),
                        profile_id: profile_id.to_string(),
                        identifiers: claimed.to_vec(),
                        at: kindred_store::now_millis(),
                    },
                ));
            }
            // Nothing of a suppressed person's event was stored: nothing to compute.
            if !matches!(outcome, Outcome::Unresolved { .. } | Outcome::Suppressed)
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
            failed.push(sqs_id);
        }
    }
    if let Some(sync) = sync {
        let messages: Vec<&SyncMessage> = merges.iter().map(|(_, m)| m).collect();
        if let Err(e) = sync.send_json(&messages).await {
            warn!(error = %e, "merge messages not sent; SQS will redeliver their events");
            failed.extend(merges.iter().map(|(sqs_id, _)| sqs_id.clone()));
        }
    }
    let messages: Vec<&ComputeMessage> = recorded.iter().map(|(_, m)| m).collect();
    if let Err(e) = compute.send_json(&messages).await {
        warn!(error = %e, "compute messages not sent; SQS will redeliver their events");
        failed.extend(recorded.into_iter().map(|(sqs_id, _)| sqs_id));
    }
    failed
}
