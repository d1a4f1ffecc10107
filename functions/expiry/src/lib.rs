//! The `expiry` function: invoked hourly by an EventBridge rule, it reads
//! each space's due index (a range read per shard, never a scan of the
//! profiles) and sends the profiles whose next change by time has come to
//! the compute queue; then it computes each space's account-level traits
//! and audiences (`kindred_store::accounts`).

use kindred_aws::compute::DynamoComputations;
use kindred_store::{now_millis, Result};
use serde_json::Value;
use tracing::info;

pub use kindred_aws::lambda::Config;

/// Runs the sweep as of the scheduled event's `time` (or now, if the
/// event has none or it is in the past); answers how many profiles were
/// sent and how many accounts were computed.
pub async fn handle(computations: &DynamoComputations, event: &Value) -> Result<Value> {
    let (store, queue) = (computations.store.as_ref(), computations.queue.as_ref());
    let scheduled = event
        .get("time")
        .and_then(Value::as_str)
        .and_then(kindred_domain::event::parse_time)
        .unwrap_or(0);
    let as_of = scheduled.max(now_millis());
    let sent = kindred_aws::compute::sweep_all(store, queue, as_of).await?;
    info!(as_of, profiles = sent, "lookback expiry sweep done");
    let mut accounts = 0;
    for space_id in store.definition_spaces().await? {
        let pass = kindred_store::accounts::run(store, computations, &space_id, as_of).await?;
        info!(
            space_id,
            accounts = pass.accounts,
            changes = pass.changes,
            "account pass"
        );
        accounts += pass.accounts;
    }
    Ok(serde_json::json!({
        "as_of": as_of,
        "profiles_enqueued": sent,
        "accounts_computed": accounts,
    }))
}
