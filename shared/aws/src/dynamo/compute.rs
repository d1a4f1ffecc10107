//! Computed traits and audiences on DynamoDB: definitions, per-profile
//! compute states, the due index, the change log and backfill passes
//! (see `ARCHITECTURE.md`, "Computed traits on AWS").
//!
//! Every event is folded into exactly one state exactly once: the compute
//! step marks each event item it folds (`cmp`, conditioned on not being
//! marked yet) in the same transaction that writes the state at the
//! version it read, deletes the states of profiles merged into it and
//! appends the change-log item.

use std::collections::{BTreeMap, HashMap, HashSet};

use aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError;
use aws_sdk_dynamodb::types::{
    AttributeValue, Delete, Put, ReturnConsumedCapacity, TransactWriteItem, Update,
};
use kindred_domain::compute::{Change, Class, Definition, ProfileState, Ruleset};
use kindred_domain::{Millis, Traits};
use kindred_store::compute::{
    absorb, apply_event, check_delete, check_put, parse_stored_event, rebuild_stale, recompute,
    Recomputed,
};
use kindred_store::ports::{
    ChangeRecord, ComputedValues, DefinitionRecord, DefinitionStatus, EventQuery,
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

impl DefinitionSet {
    pub fn ruleset(&self) -> Result<Ruleset> {
        Ok(Ruleset::new(self.parsed()?)?)
    }

    fn parsed(&self) -> Result<Vec<Definition>> {
        self.records
            .iter()
            .map(|r| Ok(Definition::parse(r.class, &r.key, r.version, &r.body)?))
            .collect()
    }

    pub fn backfilling(&self) -> Vec<(String, u64)> {
        self.records
            .iter()
            .filter(|r| matches!(r.status, DefinitionStatus::Backfilling { .. }))
            .map(|r| (r.key.clone(), r.version))
            .collect()
    }
}

fn record_of(item: &Item) -> Result<DefinitionRecord> {
    let class = get_s(item, "class")?;
    Ok(DefinitionRecord {
        key: get_s(item, SK)?
            .strip_prefix("KEY#")
            .unwrap_or_default()
            .to_string(),
        class: Class::parse(class)
            .ok_or_else(|| StoreError::Service(format!("unknown class {class}")))?,
        version: get_n(item, "version")? as u64,
        body: serde_json::from_str(get_s(item, "body")?)?,
        status: match get_s(item, "bf_status")? {
            "backfilling" => DefinitionStatus::Backfilling {
                done: get_n(item, "bf_done")?.max(0) as u64,
                total: get_n(item, "bf_total")?.max(0) as u64,
            },
            "failed" => DefinitionStatus::Failed(opt_s(item, "error").unwrap_or("").to_string()),
            _ => DefinitionStatus::Ready,
        },
        created_at: get_n(item, "created_at")?,
        updated_at: get_n(item, "updated_at")?,
    })
}

/// Whether a failed transaction lost a race (re-read and retry) rather
/// than failed.
fn lost_race(e: &aws_sdk_dynamodb::error::SdkError<TransactWriteItemsError>) -> bool {
    match e.as_service_error() {
        Some(TransactWriteItemsError::TransactionCanceledException(c)) => {
            c.cancellation_reasons().iter().any(|r| {
                matches!(
                    r.code(),
                    Some("ConditionalCheckFailed" | "TransactionConflict")
                )
            })
        }
        Some(TransactWriteItemsError::TransactionInProgressException(_)) => true,
        _ => false,
    }
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
}

/// The part of a state only the compute step reads, stored compressed
/// (per-hour buckets and message ids compress several times over).
struct Packed {
    state: ProfileState,
    recent: Vec<String>,
}

fn pack(state: &ProfileState, recent: &[String]) -> Result<AttributeValue> {
    use std::io::Write;
    let json = serde_json::to_vec(&(state, recent))?;
    let mut z = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::fast());
    z.write_all(&json)
        .and_then(|_| z.finish())
        .map(|bytes| AttributeValue::B(aws_sdk_dynamodb::primitives::Blob::new(bytes)))
        .map_err(|e| StoreError::Service(format!("compressing a state: {e}")))
}

fn unpack(item: &Item) -> Result<Packed> {
    let Some(AttributeValue::B(bytes)) = item.get("state") else {
        return Err(StoreError::Service("a compute state has no state".into()));
    };
    let (state, recent) =
        serde_json::from_reader(flate2::read::DeflateDecoder::new(bytes.as_ref()))?;
    Ok(Packed { state, recent })
}

fn state_of(item: &Item) -> Result<StateItem> {
    let Packed { state, recent } = unpack(item)?;
    Ok(StateItem {
        profile_id: get_s(item, "profile_id")?.to_string(),
        version: get_n(item, "version")?,
        state,
        values: serde_json::from_str(get_s(item, "computed")?)?,
        clock: get_n(item, "clock")?,
        recent,
        due: get_n(item, "due").ok(),
    })
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
}

impl DynamoStore {
    pub(crate) async fn transact(&self, items: Vec<TransactWriteItem>) -> Result<()> {
        let out = self
            .client
            .transact_write_items()
            .set_transact_items(Some(items))
            .return_consumed_capacity(ReturnConsumedCapacity::Total)
            .send()
            .await;
        match out {
            Ok(out) => {
                self.usage.transaction(out.consumed_capacity());
                Ok(())
            }
            Err(e) => {
                self.usage.write(None);
                if lost_race(&e) {
                    Err(StoreError::Conflict)
                } else {
                    Err(service(e))
                }
            }
        }
    }

    /// The space's definitions and set version, read strongly consistent
    /// (one partition; the set item sorts first, so any definition read
    /// is at least as new as the set version read).
    pub(crate) async fn definition_set(&self, space_id: &str) -> Result<DefinitionSet> {
        let items = self
            .items_with_prefix(definitions_key(space_id), "", true)
            .await?;
        let mut set = DefinitionSet {
            version: 0,
            last_version: 0,
            records: Vec::new(),
        };
        for item in &items {
            if opt_s(item, SK) == Some(SET) {
                set.version = get_n(item, "version")?;
                set.last_version = get_n(item, "last_version")?;
            } else {
                set.records.push(record_of(item)?);
            }
        }
        Ok(set)
    }

    /// The root's computed values, without keys of deleted definitions.
    pub(crate) async fn computed_values(
        &self,
        space_id: &str,
        root: &str,
    ) -> Result<ComputedValues> {
        let Some(item) = self.get(state_key(space_id, root), false).await? else {
            return Ok(ComputedValues::new());
        };
        let mut values: ComputedValues = serde_json::from_str(get_s(&item, "computed")?)?;
        if !values.is_empty() {
            let live: HashSet<String> = self
                .items_with_prefix(definitions_key(space_id), "KEY#", false)
                .await?
                .iter()
                .filter_map(|i| opt_s(i, SK).and_then(|k| k.strip_prefix("KEY#")))
                .map(str::to_string)
                .collect();
            values.retain(|k, _| live.contains(k));
        }
        Ok(values)
    }

    /// Creates, replaces (`body`), re-versions (`bump_only`) or deletes
    /// (`body: None`) a definition, as one transaction conditioned on the
    /// set version read; the whole set is validated first. Every
    /// definition still backfilling starts a new pass. Returns the record
    /// written (`None` after a delete), or `NotFound`.
    pub(crate) async fn write_definition(
        &self,
        space_id: &str,
        class: Class,
        key_name: &str,
        body: Option<&Value>,
        bump_only: bool,
    ) -> Result<(Option<DefinitionRecord>, i64)> {
        if self.get(space_key(space_id), false).await?.is_none() {
            return Err(StoreError::NotFound);
        }
        for attempt in 0..ATTEMPTS {
            jitter(attempt).await;
            let now = now_millis();
            let set = self.definition_set(space_id).await?;
            let existing = set.records.iter().find(|r| r.key == key_name);
            let pk = definitions_key(space_id);
            let mut items = Vec::new();
            let written = match body {
                Some(body) => {
                    if bump_only && existing.is_none_or(|e| e.class != class) {
                        return Err(StoreError::NotFound);
                    }
                    // Versions never repeat, even across delete and re-create.
                    let version = (set.last_version + 1).max(now);
                    let parsed = Definition::parse(class, key_name, version as u64, body)?;
                    check_put(existing.map(|e| e.class), parsed, set.parsed()?)?;
                    let record = DefinitionRecord {
                        key: key_name.to_string(),
                        class,
                        version: version as u64,
                        body: body.clone(),
                        status: DefinitionStatus::Backfilling { done: 0, total: 0 },
                        created_at: existing.map_or(now, |e| e.created_at),
                        updated_at: now,
                    };
                    let mut item = key(pk.clone(), &definition_sort_key(key_name));
                    item.insert("class".into(), s(class.as_str()));
                    item.insert("version".into(), n(version));
                    item.insert("body".into(), s(body.to_string()));
                    item.insert("bf_status".into(), s("backfilling"));
                    item.insert("bf_done".into(), n(0));
                    item.insert("bf_total".into(), n(0));
                    item.insert("bf_paged".into(), AttributeValue::Bool(false));
                    item.insert("bf_pass".into(), n(set.version + 1));
                    item.insert("created_at".into(), n(record.created_at));
                    item.insert("updated_at".into(), n(now));
                    let put = Put::builder()
                        .table_name(&self.table)
                        .set_item(Some(item))
                        .build()
                        .map_err(service)?;
                    items.push(TransactWriteItem::builder().put(put).build());
                    Some(record)
                }
                None => {
                    match existing {
                        Some(e) if e.class == class => {}
                        _ => return Err(StoreError::NotFound),
                    }
                    check_delete(key_name, set.parsed()?)?;
                    let delete = Delete::builder()
                        .table_name(&self.table)
                        .set_key(Some(key(pk.clone(), &definition_sort_key(key_name))))
                        .build()
                        .map_err(service)?;
                    items.push(TransactWriteItem::builder().delete(delete).build());
                    None
                }
            };
            // The other backfilling definitions restart in the new pass.
            for (other, _) in set.backfilling() {
                if other == key_name {
                    continue;
                }
                let update = Update::builder()
                    .table_name(&self.table)
                    .set_key(Some(key(pk.clone(), &definition_sort_key(&other))))
                    .update_expression(
                        "SET bf_done = :zero, bf_total = :zero, bf_paged = :no, bf_pass = :pass REMOVE bf_cursor",
                    )
                    .expression_attribute_values(":zero", n(0))
                    .expression_attribute_values(":no", AttributeValue::Bool(false))
                    .expression_attribute_values(":pass", n(set.version + 1))
                    .build()
                    .map_err(service)?;
                items.push(TransactWriteItem::builder().update(update).build());
            }
            let last_version = written
                .as_ref()
                .map_or(set.last_version, |r| r.version as i64);
            let update = Update::builder()
                .table_name(&self.table)
                .set_key(Some(key(pk.clone(), SET)))
                .update_expression("SET version = :new, last_version = :last")
                .condition_expression("attribute_not_exists(pk) OR version = :read")
                .expression_attribute_values(":new", n(set.version + 1))
                .expression_attribute_values(":last", n(last_version))
                .expression_attribute_values(":read", n(set.version))
                .build()
                .map_err(service)?;
            items.push(TransactWriteItem::builder().update(update).build());
            let listed = Put::builder()
                .table_name(&self.table)
                .set_item(Some(key(DEFINITION_SPACES.to_string(), space_id)))
                .build()
                .map_err(service)?;
            items.push(TransactWriteItem::builder().put(listed).build());
            if items.len() > MAX_TRANSACTION_ITEMS {
                return Err(StoreError::Invalid(
                    "too many definitions backfilling at once; wait for some to finish".into(),
                ));
            }
            match self.transact(items).await {
                Ok(()) => return Ok((written, set.version + 1)),
                Err(StoreError::Conflict) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(StoreError::Conflict)
    }

    /// Every space that has (or had) definitions.
    pub async fn definition_spaces(&self) -> Result<Vec<String>> {
        Ok(self
            .items_with_prefix(DEFINITION_SPACES.to_string(), "", false)
            .await?
            .iter()
            .filter_map(|i| opt_s(i, SK).map(str::to_string))
            .collect())
    }

    /// Root profiles of the space whose next change has come by `as_of`:
    /// a range read of each shard of the due index, never a scan.
    pub async fn due_profiles(&self, space_id: &str, as_of: Millis) -> Result<Vec<String>> {
        let mut due = Vec::new();
        for shard in 0..DUE_SHARDS {
            let query = self
                .client
                .query()
                .table_name(&self.table)
                .index_name(EVENTS_INDEX)
                .key_condition_expression("gpk = :p AND gsk <= :due")
                .expression_attribute_values(":p", s(due_partition(space_id, shard)))
                .expression_attribute_values(":due", s(due_sort(as_of)))
                .projection_expression("profile_id");
            self.query_pages(query, |item| {
                due.push(get_s(item, "profile_id")?.to_string());
                Ok(true)
            })
            .await?;
        }
        Ok(due)
    }

    /// Changes after `since`, oldest first, at most `limit`; only those
    /// older than [`CHANGES_SETTLE_MS`].
    pub async fn read_changes(
        &self,
        space_id: &str,
        since: i64,
        limit: usize,
    ) -> Result<Vec<ChangeRecord>> {
        let settled = (now_millis() - CHANGES_SETTLE_MS) * 1_000_000 + 999_999;
        let from = since.max(-1) + 1;
        let from = from - from % 1_000;
        let query = self
            .client
            .query()
            .table_name(&self.table)
            .key_condition_expression("pk = :pk AND sk BETWEEN :lo AND :hi")
            .expression_attribute_values(":pk", s(changes_key(space_id)))
            .expression_attribute_values(":lo", s(change_sort(from)))
            .expression_attribute_values(":hi", s(change_sort(settled)))
            .limit(limit.clamp(1, 1_000) as i32);
        let mut out = Vec::new();
        self.query_pages(query, |item| {
            let base: i64 = get_s(item, SK)?
                .parse()
                .map_err(|_| StoreError::Service("a change item's key is not a number".into()))?;
            let changes: Vec<Change> = serde_json::from_str(get_s(item, "changes")?)?;
            for (i, c) in changes.into_iter().enumerate() {
                let seq = base + i as i64;
                if seq <= since {
                    continue;
                }
                out.push(ChangeRecord {
                    seq,
                    profile_id: get_s(item, "profile_id")?.to_string(),
                    key: c.key,
                    class: c.class,
                    old: c.old,
                    new: c.new,
                    at: get_n(item, "at")?,
                });
                if out.len() >= limit {
                    return Ok(false);
                }
            }
            Ok(true)
        })
        .await?;
        Ok(out)
    }

    /// Counts one page of a backfill pass (`page`: the cursor it started
    /// at, the cursor after it, and whether it was the last), or one root
    /// recomputed (`page: None`); then finishes each definition whose
    /// roots are all done. A page is counted once even if its message is
    /// redelivered; counts of another pass or version are ignored.
    pub(crate) async fn backfill_progress(
        &self,
        space_id: &str,
        pass: i64,
        defs: &[(String, u64)],
        by: u64,
        page: Option<(&str, &str, bool)>,
    ) -> Result<()> {
        let now = now_millis();
        for (key_name, version) in defs {
            let pk = definitions_key(space_id);
            let sk = definition_sort_key(key_name);
            let guard = HashMap::from([
                (":v".to_string(), n(*version)),
                (":pass".to_string(), n(pass)),
                (":b".to_string(), s("backfilling")),
            ]);
            let mut condition = String::from("version = :v AND bf_pass = :pass AND bf_status = :b");
            let mut values = guard.clone();
            values.insert(":by".into(), n(by));
            let expression = match page {
                None => "ADD bf_done :by".to_string(),
                Some((from, to, last)) => {
                    condition.push_str(if from.is_empty() {
                        " AND attribute_not_exists(bf_cursor)"
                    } else {
                        " AND bf_cursor = :from"
                    });
                    if !from.is_empty() {
                        values.insert(":from".into(), s(from));
                    }
                    values.insert(":to".into(), s(to));
                    values.insert(":paged".into(), AttributeValue::Bool(last));
                    "ADD bf_total :by SET bf_cursor = :to, bf_paged = :paged".to_string()
                }
            };
            if !self
                .update_if(&pk, &sk, &expression, &condition, values)
                .await?
            {
                continue;
            }
            let mut values = guard;
            values.insert(":ready".into(), s("ready"));
            values.insert(":yes".into(), AttributeValue::Bool(true));
            values.insert(":now".into(), n(now));
            self.update_if(
                &pk,
                &sk,
                "SET bf_status = :ready, updated_at = :now",
                "version = :v AND bf_pass = :pass AND bf_status = :b AND bf_paged = :yes AND bf_done >= bf_total",
                values,
            )
            .await?;
        }
        Ok(())
    }

    /// One conditional update; `false` if its condition did not hold.
    async fn update_if(
        &self,
        pk: &str,
        sk: &str,
        expression: &str,
        condition: &str,
        values: HashMap<String, AttributeValue>,
    ) -> Result<bool> {
        let out = self
            .client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(key(pk.to_string(), sk)))
            .update_expression(expression)
            .condition_expression(condition)
            .set_expression_attribute_values(Some(values))
            .return_consumed_capacity(ReturnConsumedCapacity::Total)
            .send()
            .await;
        match out {
            Ok(out) => {
                self.usage.write(out.consumed_capacity());
                Ok(true)
            }
            Err(e) => {
                self.usage.write(None);
                match e.as_service_error() {
                    Some(
                        aws_sdk_dynamodb::operation::update_item::UpdateItemError::ConditionalCheckFailedException(_),
                    ) => Ok(false),
                    _ => Err(service(e)),
                }
            }
        }
    }

    /// The event items of these message ids that exist, strongly consistent.
    pub(crate) async fn event_items(
        &self,
        space_id: &str,
        message_ids: &[String],
    ) -> Result<Vec<Item>> {
        let keys = message_ids
            .iter()
            .map(|m| key(event_key(space_id, m), META))
            .collect();
        self.batch_get(keys, true).await
    }

    /// Folds `pending` (events not folded anywhere yet) into the state of
    /// the resolved root and recomputes it as of `as_of` (or now, or the
    /// state's own clock, whichever is latest), as one transaction.
    /// `Conflict` means another writer got there first: re-read and retry.
    pub(crate) async fn fold(
        &self,
        space_id: &str,
        ruleset: &Ruleset,
        tree: &Resolved,
        pending: &[&Pending],
        as_of: Millis,
    ) -> Result<Folded> {
        let mut folded = Folded::default();
        let root_id = &tree.tree[0];
        let keys = tree
            .tree
            .iter()
            .map(|p| key(state_key(space_id, p), META))
            .collect();
        let mut items: HashMap<String, StateItem> = HashMap::new();
        for item in self.batch_get(keys, true).await? {
            let st = state_of(&item)?;
            items.insert(st.profile_id.clone(), st);
        }
        let mut root = items.remove(root_id.as_str()).unwrap_or(StateItem {
            profile_id: root_id.clone(),
            version: 0,
            state: ProfileState::default(),
            values: ComputedValues::new(),
            clock: 0,
            recent: Vec::new(),
            due: None,
        });
        let read_version = root.version;
        let mut writes = Vec::new();
        // States of profiles merged into the root since it was last folded.
        for child in items.into_values() {
            absorb(
                ruleset,
                (&mut root.state, &mut root.values),
                (child.state, child.values),
            );
            root.clock = root.clock.max(child.clock);
            root.recent.extend(child.recent);
            let delete = Delete::builder()
                .table_name(&self.table)
                .set_key(Some(key(state_key(space_id, &child.profile_id), META)))
                .condition_expression("version = :v")
                .expression_attribute_values(":v", n(child.version))
                .build()
                .map_err(service)?;
            writes.push(TransactWriteItem::builder().delete(delete).build());
            if child.due.is_some() {
                writes.push(self.delete_due(space_id, &child.profile_id)?);
            }
            folded.absorbed += 1;
        }
        if !ruleset.stale(&root.state).is_empty() {
            let history = self.folded_history(space_id, tree, &root.recent).await?;
            folded.rebuilt += rebuild_stale(ruleset, &mut root.state, &history)?;
        }
        for p in pending {
            apply_event(ruleset, &mut root.state, &parse_stored_event(&p.body)?);
            let update = Update::builder()
                .table_name(&self.table)
                .set_key(Some(key(event_key(space_id, &p.message_id), META)))
                .update_expression("SET cmp = :root")
                .condition_expression("attribute_exists(pk) AND attribute_not_exists(cmp)")
                .expression_attribute_values(":root", s(root_id))
                .build()
                .map_err(service)?;
            writes.push(TransactWriteItem::builder().update(update).build());
            root.recent.push(p.message_id.clone());
            folded.events += 1;
        }
        let excess = root.recent.len().saturating_sub(RECENT);
        root.recent.drain(..excess);

        let now = now_millis().max(root.clock).max(as_of);
        let traits: Traits = if ruleset.reads_custom_traits() {
            serde_json::from_str(get_s(&tree.root, "traits")?)?
        } else {
            Traits::new()
        };
        let Recomputed {
            values,
            changes,
            due,
        } = recompute(ruleset, &mut root.state, root.values, &traits, now);
        let version = read_version + 1;
        let mut item = key(state_key(space_id, root_id), META);
        item.insert("profile_id".into(), s(root_id));
        item.insert("version".into(), n(version));
        item.insert("state".into(), pack(&root.state, &root.recent)?);
        item.insert("computed".into(), s(serde_json::to_string(&values)?));
        item.insert("clock".into(), n(now));
        if let Some(due) = due {
            item.insert("due".into(), n(due));
        }
        // The due index holds a small item of its own, written only when
        // the due time moves (the state is not copied into the index).
        if due != root.due {
            match due {
                Some(due) => {
                    let shard = event_seq(root_id) as u64 % DUE_SHARDS;
                    let mut entry = key(state_key(space_id, root_id), DUE);
                    entry.insert("profile_id".into(), s(root_id));
                    entry.insert(GPK.into(), s(due_partition(space_id, shard)));
                    entry.insert(GSK.into(), s(due_sort(due)));
                    writes.push(transact_put(&self.table, entry, None)?);
                }
                None => writes.push(self.delete_due(space_id, root_id)?),
            }
        }
        let put = Put::builder()
            .table_name(&self.table)
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
        writes.insert(0, TransactWriteItem::builder().put(put).build());
        if !changes.is_empty() {
            // Ordered by when it is written (the compute clock may run
            // ahead of it, after a lookback run in the future).
            let base = change_base(now_millis(), root_id, version);
            let mut item = key(changes_key(space_id), &change_sort(base));
            item.insert("profile_id".into(), s(root_id));
            item.insert("at".into(), n(now));
            item.insert("changes".into(), s(serde_json::to_string(&changes)?));
            writes.push(transact_put(
                &self.table,
                item,
                Some("attribute_not_exists(pk)"),
            )?);
            folded.changes = changes.len();
        }
        if writes.len() > MAX_TRANSACTION_ITEMS {
            return Err(StoreError::Internal(format!(
                "folding this profile needs {} writes in one transaction; DynamoDB allows {MAX_TRANSACTION_ITEMS}",
                writes.len()
            )));
        }
        self.transact(writes).await?;
        Ok(folded)
    }

    /// Forgets what the states of `members` folded (a split changed which
    /// events are theirs): each definition is rebuilt from the profile's
    /// own events at its next fold. The values destinations were sent
    /// stay, so that the fold sends what changed.
    pub(crate) async fn reset_states(&self, space_id: &str, members: &[String]) -> Result<()> {
        for member in members {
            let mut attempt = 0;
            loop {
                let Some(item) = self.get(state_key(space_id, member), true).await? else {
                    break;
                };
                let st = state_of(&item)?;
                let update = self
                    .client
                    .update_item()
                    .table_name(&self.table)
                    .set_key(Some(key(state_key(space_id, member), META)))
                    .update_expression("SET #state = :state, version = version + :one")
                    .condition_expression("version = :v")
                    .expression_attribute_names("#state", "state")
                    .expression_attribute_values(
                        ":state",
                        pack(&ProfileState::default(), &st.recent)?,
                    )
                    .expression_attribute_values(":one", n(1))
                    .expression_attribute_values(":v", n(st.version));
                if self.conditional_update(update).await?.is_some() {
                    break;
                }
                attempt += 1;
                if attempt >= 16 {
                    return Err(StoreError::Conflict);
                }
                super::backoff(attempt, 8).await;
            }
        }
        Ok(())
    }

    fn delete_due(&self, space_id: &str, profile_id: &str) -> Result<TransactWriteItem> {
        let delete = Delete::builder()
            .table_name(&self.table)
            .set_key(Some(key(state_key(space_id, profile_id), DUE)))
            .build()
            .map_err(service)?;
        Ok(TransactWriteItem::builder().delete(delete).build())
    }

    /// The bodies of every event of the tree already folded into some
    /// state: those the index shows marked, plus those the state folded
    /// recently (the index may not show them, or their mark, yet).
    async fn folded_history(
        &self,
        space_id: &str,
        tree: &Resolved,
        recent: &[String],
    ) -> Result<Vec<String>> {
        let mut seen: HashSet<String> = HashSet::new();
        let mut bodies = Vec::new();
        let all = EventQuery {
            limit: usize::MAX,
            ..EventQuery::default()
        };
        let (lo, hi) = bounds(&all);
        for member in &tree.tree {
            self.walk_member(space_id, member, (&lo, &hi), false, 1_000, |item| {
                let message_id = get_s(item, "message_id")?;
                if item.contains_key("cmp") || recent.iter().any(|r| r == message_id) {
                    bodies.push(get_s(item, "body")?.to_string());
                    seen.insert(message_id.to_string());
                }
                Ok(true)
            })
            .await?;
        }
        let missing: Vec<String> = recent
            .iter()
            .filter(|m| !seen.contains(*m))
            .cloned()
            .collect();
        for item in self.event_items(space_id, &missing).await? {
            // Only events recorded in this tree (after a split, the state
            // may remember events that left with the child).
            if opt_s(&item, "profile_id").is_some_and(|p| tree.tree.iter().any(|m| m == p)) {
                bodies.push(get_s(&item, "body")?.to_string());
            }
        }
        Ok(bodies)
    }
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
