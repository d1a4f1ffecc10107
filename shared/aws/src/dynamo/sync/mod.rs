//! Destinations and their outboxes on DynamoDB.
//!
//! | item | `pk` | `sk` |
//! |---|---|---|
//! | destination | `SPACE#{space}` | `DEST#{id}` |
//! | queued call | `OUT#{space}#{id}` | 20-digit sequence number |
//! | dead letter | `DEAD#{space}#{id}` | its sequence number |
//!
//! | a space's destination count | `SPACE#{space}` | `DESTCOUNT` |
//!
//! A destination is created in one transaction with the increment of its
//! space's count (conditioned on the limit) and deleted with its
//! decrement, so racing creates cannot pass the limit together. It is
//! replaced only at the version read (optimistic, retried
//! with jitter); calls are numbered by an atomic counter on the
//! destination item, so a destination's queue is one partition read in
//! order; moving a call to or from the dead letters is one transaction.

mod destinations;
mod leases;
mod outbox;

use std::collections::{BTreeMap, BTreeSet, HashMap};

use async_trait::async_trait;

use aws_sdk_dynamodb::types::{
    AttributeValue, Delete, DeleteRequest, Put, ReturnConsumedCapacity, ReturnValue, Select,
    TransactWriteItem, Update as TxUpdate, WriteRequest,
};
use kindred_domain::sync::{check_secret, Settings, SyncPosition};
use kindred_store::secret::Sealer;
use kindred_store::sync::secret_context;
use kindred_store::{
    now_millis, Attempt, DeadLetter, DeliveryError, DestinationRecord, DestinationStatus,
    Destinations, Outbox, PendingCall, Result, StoreError, Target,
};
use serde_json::Value;

use super::{
    conditional_failed, get_n, get_s, key, n, opt_s, s, service, space_key, DynamoStore, Item,
    META, PK, SK,
};

const DEST_PREFIX: &str = "DEST#";
const DEST_COUNT: &str = "DESTCOUNT";
/// DynamoDB's limit of actions per transaction.
const MAX_TRANSACT: usize = 100;
/// Attempts at a destination write that lost a race.
const PUT_ATTEMPTS: u32 = 32;

fn dest_sort(id: &str) -> String {
    format!("{DEST_PREFIX}{id}")
}

pub(crate) fn out_key(space_id: &str, id: &str) -> String {
    format!("OUT#{space_id}#{id}")
}

pub(crate) fn dead_key(space_id: &str, id: &str) -> String {
    format!("DEAD#{space_id}#{id}")
}

fn seq_sort(seq: i64) -> String {
    format!("{seq:020}")
}

/// Whether a request failed only because its condition did not hold.
fn opt_n(item: &Item, name: &str) -> Option<i64> {
    item.get(name)
        .and_then(|v| v.as_n().ok())
        .and_then(|v| v.parse().ok())
}

fn boolean(item: &Item, name: &str) -> bool {
    matches!(item.get(name), Some(AttributeValue::Bool(true)))
}

/// The keys a pending initial sync sends (`None`: every key).
fn initial_keys(item: &Item) -> Result<Option<BTreeSet<String>>> {
    Ok(opt_s(item, "initial_keys")
        .map(serde_json::from_str)
        .transpose()?)
}

/// A destination with where its sync stands.
#[derive(Clone, Debug)]
pub struct DestinationState {
    pub record: DestinationRecord,
    /// Changes up to here were covered by the first initial sync.
    pub since_change: i64,
    /// The keys a pending initial sync sends (`None`: every key).
    pub initial_keys: Option<BTreeSet<String>>,
    /// Whether a first initial sync has begun (its horizon is set).
    pub synced: bool,
    /// Where a pending initial sync goes on in the space's roots.
    pub initial_cursor: Option<BTreeMap<String, String>>,
}

impl DestinationState {
    pub fn position(&self) -> SyncPosition {
        SyncPosition {
            initial_pending: self.record.initial_sync_pending,
            synced: self.synced,
            since_change: self.since_change,
        }
    }
}

fn record_of(item: &Item) -> Result<DestinationRecord> {
    let settings: Value = serde_json::from_str(get_s(item, "settings")?)?;
    Ok(DestinationRecord {
        destination_id: get_s(item, "destination_id")?.to_string(),
        name: opt_s(item, "name").map(str::to_string),
        settings: Settings::from_stored(&settings)
            .map_err(|e| StoreError::Undecodable(format!("stored destination settings: {e}")))?,
        has_secret: item.contains_key("secret"),
        version: get_n(item, "version")? as u64,
        initial_sync_pending: boolean(item, "initial_pending"),
        created_at: get_n(item, "created_at")?,
        updated_at: get_n(item, "updated_at")?,
    })
}

/// How taking a destination's delivery lease went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeliveryLease {
    /// Taken; the destination's next attempt is not due before `retry_at`.
    Taken { retry_at: i64 },
    /// Another run is draining it.
    Busy,
    /// The destination no longer exists.
    Gone,
}

/// The sort key of a space's sync item (fan-out cursor and lease).
const SYNC: &str = "SYNC";
