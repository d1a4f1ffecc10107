//! The `expiry` function: invoked hourly by an EventBridge rule, it reads
//! each space's due index (a range read per shard, never a scan of the
//! profiles) and sends the profiles whose next change by time has come to
//! the compute queue.

use kindred_aws::{DynamoStore, SqsQueue};
use kindred_store::{now_millis, Result};
use serde_json::Value;
use tracing::info;

pub use kindred_aws::lambda::Config;

/// Runs the sweep as of the scheduled event's `time` (or now, if the
/// event has none or it is in the past); answers how many profiles were sent.
pub async fn handle(store: &DynamoStore, queue: &SqsQueue, event: &Value) -> Result<Value> {
    let scheduled = event
        .get("time")
        .and_then(Value::as_str)
        .and_then(kindred_domain::event::parse_time)
        .unwrap_or(0);
    let as_of = scheduled.max(now_millis());
    let sent = kindred_aws::compute::sweep_all(store, queue, as_of).await?;
    info!(as_of, profiles = sent, "lookback expiry sweep done");
    Ok(serde_json::json!({ "as_of": as_of, "profiles_enqueued": sent }))
}
