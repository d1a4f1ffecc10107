//! Computed traits and audiences on DynamoDB: definitions, per-profile
//! compute states, the due index, the change log and backfill passes
//! (see `ARCHITECTURE.md`, "Computed traits on AWS").
//!
//! Every event is folded into exactly one state exactly once: the compute
//! step marks each event item it folds (`cmp`, conditioned on not being
//! marked yet) in the same transaction that writes the state at the
//! version it read, deletes the states of profiles merged into it and
//! appends the change-log item.

mod account_values;

pub(crate) use account_values::accounts_partition;
mod changes;
mod definitions;
mod fold;
mod members;

use std::collections::{BTreeMap, HashMap, HashSet};

use aws_sdk_dynamodb::types::{AttributeValue, Delete, Put, TransactWriteItem, Update};
use kindred_domain::compute::{Change, Class, Definition, ProfileState, Ruleset};
use kindred_domain::{Millis, Traits};
use kindred_store::compute::{
    absorb, apply_event, check_delete, check_put, holds, member_writes, parse_stored_event,
    rebuild_stale, recompute, Recomputed,
};
use kindred_store::ports::{
    ChangeRecord, ComputedValue, ComputedValues, DefinitionRecord, DefinitionStatus, EventQuery,
};
use kindred_store::{now_millis, Result, StoreError};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::profiles::{bounds, Resolved};
use super::{
    event_key, event_seq, get_n, get_s, key, n, opt_s, s, service, space_key, transact_put,
    DynamoStore, Item, EVENTS_INDEX, GPK, GSK, META, SK,
};

/// DynamoDB's limit on the actions of one transaction.
const MAX_TRANSACTION_ITEMS: usize = 100;
/// Partitions of a space's due index (spreads the writes of busy spaces).
pub const DUE_SHARDS: u64 = 8;
/// How many recently folded message ids a state remembers: a rebuild
/// reads history from the index, which may lag the base table.
const RECENT: usize = 32;
/// Changes are served only once this old, so that a change written by a
/// slower writer with an earlier time is never skipped by a reader that
/// has moved past it.
pub const CHANGES_SETTLE_MS: i64 = 5_000;
/// Sort key of a space's definition set item.
const SET: &str = "#SET";
/// The partition listing every space that has definitions.
const DEFINITION_SPACES: &str = "DEFSPACES";
/// Root profiles read per backfill message.
pub(crate) const BACKFILL_ROOTS: usize = 4_000;
const ATTEMPTS: u32 = 8;

fn definitions_key(space_id: &str) -> String {
    format!("DEF#{space_id}")
}

fn definition_sort_key(key: &str) -> String {
    format!("KEY#{key}")
}

pub(crate) fn state_key(space_id: &str, profile_id: &str) -> String {
    format!("CMP#{space_id}#{profile_id}")
}

pub(crate) fn changes_key(space_id: &str) -> String {
    format!("CHG#{space_id}")
}

fn due_partition(space_id: &str, shard: u64) -> String {
    format!("DUE#{space_id}#{shard}")
}

/// Order-preserving text of a time, for the due index's sort key.
fn due_sort(due: Millis) -> String {
    format!("{:016x}", (due as u64) ^ (1 << 63))
}

/// A change-log item's sort key: its base sequence number, zero-padded.
fn change_sort(seq: i64) -> String {
    format!("{seq:020}")
}

/// The base sequence number of a change-log item written at `at` for
/// `profile_id`: the time in the high digits, a hash of the profile and
/// the state version in the middle, and room for 1,000 changes per item.
fn change_base(at: Millis, profile_id: &str, version: i64) -> i64 {
    let spread = event_seq(&format!("{profile_id}#{version}")) % 1_000;
    at * 1_000_000 + spread * 1_000
}

/// A transaction's put of an item that carries a `version`: only if the
/// stored one is still at `read_version` (0: none is stored yet).
fn versioned_put(table: &str, item: Item, read_version: i64) -> Result<TransactWriteItem> {
    let put = Put::builder()
        .table_name(table)
        .set_item(Some(item))
        .condition_expression(if read_version == 0 {
            "attribute_not_exists(pk)"
        } else {
            "version = :v"
        })
        .set_expression_attribute_values(
            (read_version > 0).then(|| HashMap::from([(":v".to_string(), n(read_version))])),
        )
        .build()
        .map_err(service)?;
    Ok(TransactWriteItem::builder().put(put).build())
}

/// A message on the compute queue.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ComputeMessage {
    /// An event the identity step recorded (or found recorded).
    Event {
        space_id: String,
        message_id: String,
    },
    /// Recompute a profile as of a moment (expiry, backfill).
    Recompute {
        space_id: String,
        profile_id: String,
        as_of: Millis,
        /// The backfill pass this is part of: `(set version, keys and
        /// versions being backfilled)`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        backfill: Option<(i64, Vec<(String, u64)>)>,
    },
    /// Continue a backfill pass over the space's root profiles.
    Backfill {
        space_id: String,
        set_version: i64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        start: Option<BTreeMap<String, String>>,
    },
}

/// A space's definitions as stored, with the set's version.
pub(crate) struct DefinitionSet {
    pub version: i64,
    last_version: i64,
    pub records: Vec<DefinitionRecord>,
}

async fn jitter(attempt: u32) {
    if attempt > 0 {
        crate::retry::jitter(10, attempt, 6).await;
    }
}

/// A profile's stored compute state.
struct StateItem {
    profile_id: String,
    version: i64,
    state: ProfileState,
    values: ComputedValues,
    clock: Millis,
    recent: Vec<String>,
    /// The due time its due-index item holds, if it has one.
    due: Option<Millis>,
    /// Whether its values have member items (a state written before
    /// member lists existed has none).
    indexed: bool,
    /// Member-list writes its values still need ([`members`]).
    todo: Vec<members::MemberTodo>,
}

/// The part of a state only the compute step reads, stored compressed
/// (per-hour buckets and message ids compress several times over).
struct Packed {
    state: ProfileState,
    recent: Vec<String>,
}

/// The sort key of a profile's due-index item, next to its state.
const DUE: &str = "DUE";

/// An event to fold: its message id and stored body.
pub(crate) struct Pending {
    pub message_id: String,
    pub body: String,
}

/// What one fold of a profile did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Folded {
    pub events: usize,
    pub absorbed: usize,
    pub rebuilt: usize,
    pub changes: usize,
    /// Member-list writes left for another transaction on the state.
    pub members_left: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn change_sequence_numbers_keep_time_order_and_leave_room_per_item() {
        let a = change_base(1_700_000_000_000, "prf_a", 1);
        let b = change_base(1_700_000_000_001, "prf_b", 9);
        assert!(a < b);
        assert_eq!(a % 1_000, 0);
        assert!(change_sort(a) < change_sort(b));
        assert_eq!(change_sort(a).len(), 20);
    }

    #[test]
    fn compute_messages_round_trip_as_json() {
        let m = ComputeMessage::Recompute {
            space_id: "s".into(),
            profile_id: "prf_1".into(),
            as_of: 5,
            backfill: Some((3, vec![("k".into(), 7)])),
        };
        let json = serde_json::to_string(&m).unwrap();
        assert_eq!(serde_json::from_str::<ComputeMessage>(&json).unwrap(), m);
        let e: ComputeMessage =
            serde_json::from_str(r#"{"event":{"space_id":"s","message_id":"m"}}"#).unwrap();
        assert!(matches!(e, ComputeMessage::Event { .. }));
    }
}
