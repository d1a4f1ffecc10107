//! Kindred on AWS: the DynamoDB adapters of the store ports, the SQS
//! event queue, and the identity step as the `identity` function runs it.
//! The identity rules are the domain's and the retry loop is the store's
//! pipeline; nothing here decides who is who.

pub mod compute;
pub mod dynamo;
pub mod lambda;
pub mod privacy;
pub mod sqs;
pub mod sync;

use kindred_domain::Event;
use kindred_store::identity::{process_event, Job, Outcome, SpaceRules};
use kindred_store::ports::QueuedEvent;
use kindred_store::token::new_profile_id;
use kindred_store::{now_millis, Result, StoreError};

pub use dynamo::{DynamoStore, UsageSnapshot};
pub use sqs::SqsQueue;

/// Runs one queued event through dedup, resolution and the conditional
/// writes on DynamoDB (re-planned on conflict).
pub async fn identify(store: &DynamoStore, queued: &QueuedEvent) -> Result<Outcome> {
    let body = serde_json::from_str(&queued.body)?;
    let event = Event::from_stored(body)
        .map_err(|r| StoreError::Invalid(format!("queued event invalid: {}", r.code)))?;
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
