//! The DynamoDB adapters: one table per deployment, single-table design
//! (see `ARCHITECTURE.md` for every item type, key and access pattern).
//!
//! Merge protection is enforced by DynamoDB itself: identifiers are
//! claimed with `attribute_not_exists`, profiles are written only at the
//! version read and while they have no parent, and a merge is one
//! `TransactWriteItems`. An event item is keyed by its message id and put
//! with `attribute_not_exists`, so it is also the dedup record.

pub(crate) mod accounts;
mod audit;
pub mod compute;
mod graph;
pub(crate) mod privacy;
pub(crate) mod profiles;
mod roots;
mod spaces;
mod split;
mod sync;
mod write;

pub(crate) use write::{conditional_failed, transact_put};

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, BillingMode, ConsumedCapacity, GlobalSecondaryIndex,
    KeySchemaElement, KeyType, KeysAndAttributes, Projection, ProjectionType,
    ReturnConsumedCapacity, ScalarAttributeType, TimeToLiveSpecification,
};
use aws_sdk_dynamodb::Client;
use kindred_domain::{Identifier, IdentityRules, ProfileFacts};
use kindred_store::{Result, SpaceAuth, StoreError};

pub use graph::DynamoGraph;
pub use sync::{DeliveryLease, DestinationState};

pub type Item = HashMap<String, AttributeValue>;

/// DynamoDB's limit on the keys of one `BatchGetItem`.
const MAX_BATCH_KEYS: usize = 100;

/// Partition and sort key attribute names of the table.
pub(crate) const PK: &str = "pk";
pub(crate) const SK: &str = "sk";
/// The events-by-profile index and its keys.
pub(crate) const EVENTS_INDEX: &str = "events_by_profile";
pub(crate) const GPK: &str = "gpk";
pub(crate) const GSK: &str = "gsk";
/// The sparse index of each space's root profiles: only a root's profile
/// item carries its keys (set when it is created or split off, removed
/// when it merges into another), so a backfill or an initial sync reads
/// the space's roots and nothing else. Keys only: writing a root's other
/// attributes costs the index nothing.
pub(crate) const ROOTS_INDEX: &str = "roots_by_space";
pub(crate) const RPK: &str = "rpk";
pub(crate) const RSK: &str = "rsk";
/// Index partitions per space, so that a space creating many profiles at
/// once spreads its index writes (one index partition key takes about
/// 1,000 writes a second).
pub(crate) const ROOT_SHARDS: u64 = 16;
/// TTL attribute (epoch seconds).
pub(crate) const EXPIRES_AT: &str = "expires_at";
/// The sort key of every item that is alone in its partition.
pub(crate) const META: &str = "META";

/// How long an event (and with it its message id's dedup record) is kept.
pub const EVENT_RETENTION_DAYS: i64 = 400;

/// DynamoDB request and capacity counters of one store handle, summed
/// over every call (`ReturnConsumedCapacity=TOTAL`).
#[derive(Default)]
pub struct Usage {
    read_requests: AtomicU64,
    write_requests: AtomicU64,
    /// Thousandths of a capacity unit.
    read_milli_units: AtomicU64,
    write_milli_units: AtomicU64,
    /// The part of `write_milli_units` that `TransactWriteItems` reported.
    transaction_milli_units: AtomicU64,
}

/// A snapshot of [`Usage`].
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct UsageSnapshot {
    pub read_requests: u64,
    pub write_requests: u64,
    pub read_units: f64,
    pub write_units: f64,
    /// The part of `write_units` spent in transactions (DynamoDB bills
    /// each item of one twice: a prepare and a commit write).
    pub transaction_write_units: f64,
}

impl UsageSnapshot {
    pub fn since(self, before: UsageSnapshot) -> UsageSnapshot {
        UsageSnapshot {
            read_requests: self.read_requests - before.read_requests,
            write_requests: self.write_requests - before.write_requests,
            read_units: self.read_units - before.read_units,
            write_units: self.write_units - before.write_units,
            transaction_write_units: self.transaction_write_units - before.transaction_write_units,
        }
    }
}

/// Thousandths of the read or write units a call reported.
fn milli_units<'a>(
    consumed: impl IntoIterator<Item = &'a ConsumedCapacity>,
    side: fn(&ConsumedCapacity) -> Option<f64>,
) -> u64 {
    consumed
        .into_iter()
        .map(|c| side(c).or(c.capacity_units()).unwrap_or(0.0))
        .map(|units| (units * 1000.0).round() as u64)
        .sum()
}

impl Usage {
    pub(crate) fn read<'a>(&self, consumed: impl IntoIterator<Item = &'a ConsumedCapacity>) {
        self.read_requests.fetch_add(1, Ordering::Relaxed);
        self.read_milli_units.fetch_add(
            milli_units(consumed, ConsumedCapacity::read_capacity_units),
            Ordering::Relaxed,
        );
    }

    pub(crate) fn write<'a>(&self, consumed: impl IntoIterator<Item = &'a ConsumedCapacity>) {
        self.write_requests.fetch_add(1, Ordering::Relaxed);
        self.write_milli_units.fetch_add(
            milli_units(consumed, ConsumedCapacity::write_capacity_units),
            Ordering::Relaxed,
        );
    }

    /// A `TransactWriteItems` call and the capacity it reported.
    pub(crate) fn transaction<'a>(&self, consumed: impl IntoIterator<Item = &'a ConsumedCapacity>) {
        let milli = milli_units(consumed, ConsumedCapacity::write_capacity_units);
        self.write_requests.fetch_add(1, Ordering::Relaxed);
        self.write_milli_units.fetch_add(milli, Ordering::Relaxed);
        self.transaction_milli_units
            .fetch_add(milli, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> UsageSnapshot {
        let units = |a: &AtomicU64| a.load(Ordering::Relaxed) as f64 / 1000.0;
        UsageSnapshot {
            read_requests: self.read_requests.load(Ordering::Relaxed),
            write_requests: self.write_requests.load(Ordering::Relaxed),
            read_units: units(&self.read_milli_units),
            write_units: units(&self.write_milli_units),
            transaction_write_units: units(&self.transaction_milli_units),
        }
    }
}

/// Caches that make a warm worker cheap. Every entry is either immutable
/// (a child's parent never changes) or only an optimisation whose
/// staleness the conditional writes catch.
#[derive(Default)]
pub(crate) struct Caches {
    /// Root profile facts as last read or written; a stale entry makes a
    /// conditional write fail, which evicts it.
    pub profiles: HashMap<(String, String), ProfileFacts>,
    /// Merged-away profile -> its parent (until a split takes it back:
    /// see `split.rs`).
    pub parents: HashMap<(String, String), String>,
    /// The split mark (time) last acted on, by identifier owner.
    pub resplits: HashMap<(String, String), i64>,
    /// A space's identity rules and whether it has a suppression list.
    pub rules: HashMap<String, (IdentityRules, bool, Instant)>,
    pub auth: HashMap<[u8; 32], (SpaceAuth, Instant)>,
}

const MAX_CACHED_PROFILES: usize = 200_000;

/// The DynamoDB store: identity graph, spaces and profiles.
pub struct DynamoStore {
    pub(crate) client: Client,
    pub(crate) table: String,
    pub(crate) usage: Arc<Usage>,
    pub(crate) caches: Mutex<Caches>,
    /// Seals destination secrets; `None` where none are configured.
    pub(crate) sealer: Option<Arc<kindred_store::secret::Sealer>>,
}

/// Waits before another attempt at a write that lost a race (0 to
/// 5·2^min(attempt, cap) ms), so that racing writers spread out.
pub(crate) async fn backoff(attempt: u32, cap: u32) {
    crate::retry::jitter(5, attempt, cap).await;
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl DynamoStore {
    pub fn new(client: Client, table: impl Into<String>) -> Self {
        Self {
            client,
            table: table.into(),
            usage: Arc::new(Usage::default()),
            caches: Mutex::new(Caches::default()),
            sealer: None,
        }
    }

    pub fn table(&self) -> &str {
        &self.table
    }

    pub fn usage(&self) -> UsageSnapshot {
        self.usage.snapshot()
    }

    /// A unit of work on the identity graph for one worker.
    pub fn graph(&self) -> DynamoGraph<'_> {
        DynamoGraph::new(self)
    }

    /// The item alone in partition `pk`.
    pub(crate) async fn get(&self, pk: String, consistent: bool) -> Result<Option<Item>> {
        let out = self
            .client
            .get_item()
            .table_name(&self.table)
            .set_key(Some(key(pk, META)))
            .consistent_read(consistent)
            .return_consumed_capacity(ReturnConsumedCapacity::Total)
            .send()
            .await
            .map_err(service)?;
        self.usage.read(out.consumed_capacity());
        Ok(out.item().cloned())
    }

    /// Runs a query page by page (counting its capacity), handing each
    /// item to `visit` until it answers `false`.
    pub(crate) async fn query_pages(
        &self,
        query: aws_sdk_dynamodb::operation::query::builders::QueryFluentBuilder,
        mut visit: impl FnMut(&Item) -> Result<bool>,
    ) -> Result<()> {
        let mut start = None;
        loop {
            let out = query
                .clone()
                .set_exclusive_start_key(start)
                .return_consumed_capacity(ReturnConsumedCapacity::Total)
                .send()
                .await
                .map_err(service)?;
            self.usage.read(out.consumed_capacity());
            for item in out.items() {
                if !visit(item)? {
                    return Ok(());
                }
            }
            match out.last_evaluated_key() {
                Some(k) => start = Some(k.clone()),
                None => return Ok(()),
            }
        }
    }

    /// Batch read of the given keys (found items, any order), re-asking
    /// for unprocessed keys with jittered backoff.
    pub(crate) async fn batch_get(&self, keys: Vec<Item>, consistent: bool) -> Result<Vec<Item>> {
        let mut found = Vec::new();
        for chunk in keys.chunks(MAX_BATCH_KEYS) {
            let mut pending = chunk.to_vec();
            let mut attempt = 0u32;
            while !pending.is_empty() {
                let request = KeysAndAttributes::builder()
                    .set_keys(Some(pending))
                    .consistent_read(consistent)
                    .build()
                    .map_err(service)?;
                let out = self
                    .client
                    .batch_get_item()
                    .request_items(&self.table, request)
                    .return_consumed_capacity(ReturnConsumedCapacity::Total)
                    .send()
                    .await
                    .map_err(service)?;
                self.usage.read(out.consumed_capacity());
                if let Some(items) = out.responses().and_then(|r| r.get(&self.table)) {
                    found.extend(items.iter().cloned());
                }
                pending = out
                    .unprocessed_keys()
                    .and_then(|u| u.get(&self.table))
                    .map(|k| k.keys().to_vec())
                    .unwrap_or_default();
                if !pending.is_empty() {
                    attempt += 1;
                    crate::retry::jitter(10, attempt, 6).await;
                }
            }
        }
        Ok(found)
    }

    pub(crate) fn cache_profile(&self, space_id: &str, facts: ProfileFacts) {
        let mut caches = lock(&self.caches);
        if caches.profiles.len() >= MAX_CACHED_PROFILES {
            caches.profiles.clear();
        }
        caches
            .profiles
            .insert((space_id.to_string(), facts.id.clone()), facts);
    }

    pub(crate) fn forget_profile(&self, space_id: &str, profile_id: &str) {
        lock(&self.caches)
            .profiles
            .remove(&(space_id.to_string(), profile_id.to_string()));
    }

    /// Creates the table with its index and TTL, as `infra/template.yaml`
    /// declares it (tests and local tools; on AWS the template owns it).
    pub async fn create_table(client: &Client, table: &str) -> Result<(), StoreError> {
        let attr = |name: &str| {
            AttributeDefinition::builder()
                .attribute_name(name)
                .attribute_type(ScalarAttributeType::S)
                .build()
                .map_err(service)
        };
        let key = |name: &str, kind: KeyType| {
            KeySchemaElement::builder()
                .attribute_name(name)
                .key_type(kind)
                .build()
                .map_err(service)
        };
        client
            .create_table()
            .table_name(table)
            .billing_mode(BillingMode::PayPerRequest)
            .attribute_definitions(attr(PK)?)
            .attribute_definitions(attr(SK)?)
            .attribute_definitions(attr(GPK)?)
            .attribute_definitions(attr(GSK)?)
            .attribute_definitions(attr(RPK)?)
            .attribute_definitions(attr(RSK)?)
            .key_schema(key(PK, KeyType::Hash)?)
            .key_schema(key(SK, KeyType::Range)?)
            .global_secondary_indexes(
                GlobalSecondaryIndex::builder()
                    .index_name(EVENTS_INDEX)
                    .key_schema(key(GPK, KeyType::Hash)?)
                    .key_schema(key(GSK, KeyType::Range)?)
                    .projection(
                        Projection::builder()
                            .projection_type(ProjectionType::All)
                            .build(),
                    )
                    .build()
                    .map_err(service)?,
            )
            .global_secondary_indexes(
                GlobalSecondaryIndex::builder()
                    .index_name(ROOTS_INDEX)
                    .key_schema(key(RPK, KeyType::Hash)?)
                    .key_schema(key(RSK, KeyType::Range)?)
                    .projection(
                        Projection::builder()
                            .projection_type(ProjectionType::KeysOnly)
                            .build(),
                    )
                    .build()
                    .map_err(service)?,
            )
            .send()
            .await
            .map_err(service)?;
        client
            .update_time_to_live()
            .table_name(table)
            .time_to_live_specification(
                TimeToLiveSpecification::builder()
                    .enabled(true)
                    .attribute_name(EXPIRES_AT)
                    .build()
                    .map_err(service)?,
            )
            .send()
            .await
            .map_err(service)?;
        Ok(())
    }
}

/// Any SDK or builder failure: retryable by the caller, details kept for logs.
pub(crate) fn service(e: impl std::error::Error) -> StoreError {
    StoreError::Service(aws_sdk_dynamodb::error::DisplayErrorContext(e).to_string())
}

// ---- keys -------------------------------------------------------------

/// Identifier types are free-form (custom `externalIds`): escape the
/// separator so that a type can never run into its value.
fn escape(part: &str) -> String {
    part.replace('%', "%25").replace('#', "%23")
}

pub(crate) fn space_key(space_id: &str) -> String {
    format!("SPACE#{space_id}")
}

pub(crate) fn token_key(token_id: &str) -> String {
    format!("TOKEN#{token_id}")
}

pub(crate) fn identifier_key(space_id: &str, id: &Identifier) -> String {
    format!("ID#{space_id}#{}#{}", escape(&id.kind), id.value)
}

pub(crate) fn profile_key(space_id: &str, profile_id: &str) -> String {
    format!("PRF#{space_id}#{profile_id}")
}

/// The roots index partition of one of a space's shards.
pub(crate) fn roots_key(space_id: &str, shard: u64) -> String {
    format!("ROOTS#{space_id}#{shard}")
}

/// The roots index keys a root profile's item carries (its shard: a
/// stable FNV-1a hash of the profile id).
pub(crate) fn root_index_keys(space_id: &str, profile_id: &str) -> [(String, AttributeValue); 2] {
    let hash = profile_id.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    [
        (RPK.to_string(), s(roots_key(space_id, hash % ROOT_SHARDS))),
        (RSK.to_string(), s(profile_id)),
    ]
}

pub(crate) fn event_key(space_id: &str, message_id: &str) -> String {
    format!("EVT#{space_id}#{message_id}")
}

pub(crate) fn merge_sort_key(child_id: &str) -> String {
    format!("MERGE#{child_id}")
}

pub(crate) fn link_sort_key(group_id: &str) -> String {
    format!("LINK#{group_id}")
}

/// Events of a profile sort by timestamp, then by `seq`: a fixed-width,
/// order-preserving string of both.
pub(crate) fn event_order(timestamp: i64, seq: i64) -> String {
    format!(
        "{:016x}#{:016x}",
        (timestamp as u64) ^ (1 << 63),
        seq as u64
    )
}

/// A stable per-event tie-breaker (DynamoDB has no insertion sequence).
pub fn event_seq(message_id: &str) -> i64 {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(message_id.as_bytes());
    let bytes: [u8; 8] = digest[..8].try_into().expect("8 bytes");
    (u64::from_be_bytes(bytes) >> 1) as i64
}

pub(crate) fn key(pk: String, sk: &str) -> Item {
    HashMap::from([
        (PK.to_string(), AttributeValue::S(pk)),
        (SK.to_string(), AttributeValue::S(sk.to_string())),
    ])
}

// ---- attribute values ---------------------------------------------------

pub(crate) fn s(v: impl Into<String>) -> AttributeValue {
    AttributeValue::S(v.into())
}

pub(crate) fn n(v: impl ToString) -> AttributeValue {
    AttributeValue::N(v.to_string())
}

pub(crate) fn get_s<'a>(item: &'a Item, name: &str) -> Result<&'a str, StoreError> {
    match item.get(name) {
        Some(AttributeValue::S(v)) => Ok(v),
        _ => Err(StoreError::Service(format!(
            "item attribute {name} missing or not a string"
        ))),
    }
}

pub(crate) fn opt_s<'a>(item: &'a Item, name: &str) -> Option<&'a str> {
    match item.get(name) {
        Some(AttributeValue::S(v)) => Some(v),
        _ => None,
    }
}

pub(crate) fn get_n(item: &Item, name: &str) -> Result<i64, StoreError> {
    match item.get(name) {
        Some(AttributeValue::N(v)) => v
            .parse()
            .map_err(|_| StoreError::Service(format!("item attribute {name} is not an integer"))),
        _ => Err(StoreError::Service(format!(
            "item attribute {name} missing or not a number"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kindred_domain::event::{MAX_GROUP_ID_BYTES, MAX_MESSAGE_ID_CHARS};
    use kindred_domain::identifier::{MAX_IDENTIFIER_BYTES, MAX_TYPE_BYTES};

    /// The longest keys the input limits allow fit DynamoDB's (2,048
    /// bytes for a partition key, 1,024 for a sort key): nothing that
    /// passes ingest can fail to be written for its key's size.
    #[test]
    fn the_longest_keys_the_limits_allow_fit_dynamodb() {
        let space = "s".repeat(64);
        // A type of separators only triples when escaped.
        let id = Identifier::new("#".repeat(MAX_TYPE_BYTES), "v".repeat(MAX_IDENTIFIER_BYTES));
        assert!(identifier_key(&space, &id).len() <= 2_048);
        // Message ids count characters: four bytes each at most.
        let message_id = "𝄞".repeat(MAX_MESSAGE_ID_CHARS);
        assert!(event_key(&space, &message_id).len() <= 2_048);
        assert!(link_sort_key(&"g".repeat(MAX_GROUP_ID_BYTES)).len() <= 1_024);
        let profile = format!("prf_{}", "x".repeat(40));
        assert!(profile_key(&space, &profile).len() <= 2_048);
        assert!(merge_sort_key(&profile).len() <= 1_024);
    }
}
