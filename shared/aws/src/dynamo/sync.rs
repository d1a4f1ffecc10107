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

use std::collections::{BTreeMap, BTreeSet, HashMap};

use async_trait::async_trait;
use aws_sdk_dynamodb::error::{ProvideErrorMetadata, SdkError};
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

use super::{get_n, get_s, key, n, opt_s, s, service, space_key, DynamoStore, Item, META, PK, SK};

const DEST_PREFIX: &str = "DEST#";
const DEST_COUNT: &str = "DESTCOUNT";
/// DynamoDB's limits: items per `BatchWriteItem`, actions per transaction.
const MAX_BATCH_WRITE: usize = 25;
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

impl DynamoStore {
    /// Puts a new destination item and counts it in its space, in one
    /// transaction; `Err((true, _))` if another write won the id.
    async fn create_destination(
        &self,
        space_id: &str,
        item: Item,
    ) -> std::result::Result<(Item, bool), (bool, StoreError)> {
        let max = kindred_domain::sync::MAX_DESTINATIONS as i64;
        let built = (|| {
            let put = Put::builder()
                .table_name(&self.table)
                .set_item(Some(item.clone()))
                .condition_expression("attribute_not_exists(pk)")
                .build()?;
            let count = TxUpdate::builder()
                .table_name(&self.table)
                .set_key(Some(key(space_key(space_id), DEST_COUNT)))
                .update_expression("ADD destinations :one")
                .condition_expression("attribute_not_exists(destinations) OR destinations < :max")
                .expression_attribute_values(":one", n(1))
                .expression_attribute_values(":max", n(max))
                .build()?;
            Ok::<_, aws_sdk_dynamodb::error::BuildError>((put, count))
        })();
        let (put, count) = built.map_err(|e| (false, service(e)))?;
        let items = vec![
            TransactWriteItem::builder().put(put).build(),
            TransactWriteItem::builder().update(count).build(),
        ];
        match self.transact_conditional(items).await {
            Ok(Ok(())) => Ok((item, true)),
            // Another write created the id first: read again.
            Ok(Err(c)) if c.failed(0) => Err((true, StoreError::Conflict)),
            Ok(Err(_)) => Err((
                false,
                StoreError::Invalid(kindred_domain::sync::too_many_destinations().to_string()),
            )),
            Err(e) => Err((false, e)),
        }
    }
}

/// Whether a request failed only because its condition did not hold.
fn conditional_failed<E: ProvideErrorMetadata, R>(e: &SdkError<E, R>) -> bool {
    e.as_service_error().and_then(|e| e.code()) == Some("ConditionalCheckFailedException")
}

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
        settings: Settings::parse(&settings)
            .map_err(|e| StoreError::Undecodable(format!("stored destination settings: {e}")))?
            .0,
        has_secret: item.contains_key("secret"),
        version: get_n(item, "version")? as u64,
        initial_sync_pending: boolean(item, "initial_pending"),
        created_at: get_n(item, "created_at")?,
        updated_at: get_n(item, "updated_at")?,
    })
}

type Update = aws_sdk_dynamodb::operation::update_item::builders::UpdateItemFluentBuilder;
type Updated = aws_sdk_dynamodb::operation::update_item::UpdateItemOutput;

impl DynamoStore {
    /// Sends a conditional update: `None` if its condition did not hold.
    pub(crate) async fn conditional_update(&self, request: Update) -> Result<Option<Updated>> {
        match request
            .return_consumed_capacity(ReturnConsumedCapacity::Total)
            .send()
            .await
        {
            Ok(out) => {
                self.usage.write(out.consumed_capacity());
                Ok(Some(out))
            }
            Err(e) if conditional_failed(&e) => Ok(None),
            Err(e) => Err(service(e)),
        }
    }

    /// Seals destination secrets with this key (required to write or
    /// deliver to destinations with secrets).
    pub fn with_sealer(mut self, sealer: Sealer) -> Self {
        self.sealer = Some(std::sync::Arc::new(sealer));
        self
    }

    fn sealer(&self) -> Result<&Sealer> {
        self.sealer.as_deref().ok_or_else(|| {
            StoreError::Config("destination secrets are not configured in this deployment".into())
        })
    }

    async fn destination_item(&self, space_id: &str, id: &str) -> Result<Option<Item>> {
        let out = self
            .client
            .get_item()
            .table_name(&self.table)
            .set_key(Some(key(space_key(space_id), &dest_sort(id))))
            .consistent_read(true)
            .return_consumed_capacity(ReturnConsumedCapacity::Total)
            .send()
            .await
            .map_err(service)?;
        self.usage.read(out.consumed_capacity());
        Ok(out.item().cloned())
    }

    /// Every item of a partition (keys and attributes), in key order.
    async fn partition(&self, pk: String, limit: Option<usize>) -> Result<Vec<Item>> {
        let mut query = self
            .client
            .query()
            .table_name(&self.table)
            .key_condition_expression("pk = :pk")
            .expression_attribute_values(":pk", s(pk))
            .consistent_read(true);
        if let Some(l) = limit {
            query = query.limit(l.clamp(1, 1_000) as i32);
        }
        let mut out = Vec::new();
        self.query_pages(query, |item| {
            out.push(item.clone());
            Ok(limit.is_none_or(|l| out.len() < l))
        })
        .await?;
        Ok(out)
    }

    async fn count(&self, pk: String, filter: Option<&str>) -> Result<u64> {
        let mut total = 0u64;
        let mut start = None;
        loop {
            let mut q = self
                .client
                .query()
                .table_name(&self.table)
                .key_condition_expression("pk = :pk")
                .expression_attribute_values(":pk", s(pk.clone()))
                .select(Select::Count)
                .set_exclusive_start_key(start)
                .return_consumed_capacity(ReturnConsumedCapacity::Total);
            if let Some(f) = filter {
                q = q
                    .filter_expression(f)
                    .expression_attribute_values(":zero", n(0));
            }
            let out = q.send().await.map_err(service)?;
            self.usage.read(out.consumed_capacity());
            total += out.count() as u64;
            match out.last_evaluated_key() {
                Some(k) => start = Some(k.clone()),
                None => return Ok(total),
            }
        }
    }

    pub(crate) async fn batch_write(&self, mut requests: Vec<WriteRequest>) -> Result<()> {
        while !requests.is_empty() {
            let chunk: Vec<WriteRequest> = requests
                .drain(..requests.len().min(MAX_BATCH_WRITE))
                .collect();
            let mut pending = chunk;
            let mut attempt = 0u32;
            while !pending.is_empty() {
                let out = self
                    .client
                    .batch_write_item()
                    .request_items(&self.table, pending)
                    .return_consumed_capacity(ReturnConsumedCapacity::Total)
                    .send()
                    .await
                    .map_err(service)?;
                self.usage.write(out.consumed_capacity());
                pending = out
                    .unprocessed_items()
                    .and_then(|u| u.get(&self.table))
                    .cloned()
                    .unwrap_or_default();
                if !pending.is_empty() {
                    attempt += 1;
                    crate::retry::jitter(10, attempt, 6).await;
                }
            }
        }
        Ok(())
    }

    /// The two actions that move an item: put it in its new place, delete
    /// the old one (a pair never splits across transactions).
    fn moved(&self, to: Item, from: Item) -> Result<[TransactWriteItem; 2]> {
        Ok([
            TransactWriteItem::builder()
                .put(
                    Put::builder()
                        .table_name(&self.table)
                        .set_item(Some(to))
                        .build()
                        .map_err(service)?,
                )
                .build(),
            TransactWriteItem::builder()
                .delete(
                    Delete::builder()
                        .table_name(&self.table)
                        .set_key(Some(from))
                        .build()
                        .map_err(service)?,
                )
                .build(),
        ])
    }

    /// Runs the actions in transactions of at most 100.
    async fn transact_chunks(&self, actions: Vec<TransactWriteItem>) -> Result<()> {
        for chunk in actions.chunks(MAX_TRANSACT) {
            let out = self
                .client
                .transact_write_items()
                .set_transact_items(Some(chunk.to_vec()))
                .return_consumed_capacity(ReturnConsumedCapacity::Total)
                .send()
                .await
                .map_err(service)?;
            self.usage.transaction(out.consumed_capacity());
        }
        Ok(())
    }

    /// The destination with its secret opened, if it exists and is enabled.
    pub async fn target(&self, space_id: &str, destination_id: &str) -> Result<Option<Target>> {
        let Some(item) = self.destination_item(space_id, destination_id).await? else {
            return Ok(None);
        };
        let record = record_of(&item)?;
        if !record.settings.enabled {
            return Ok(None);
        }
        let secret = match item.get("secret") {
            Some(AttributeValue::B(sealed)) => Some(
                self.sealer()?
                    .open(sealed.as_ref(), &secret_context(space_id, destination_id))?,
            ),
            _ => None,
        };
        Ok(Some(Target {
            space_id: space_id.to_string(),
            destination_id: destination_id.to_string(),
            version: record.version,
            settings: record.settings,
            secret,
        }))
    }

    /// Records one stretch of a destination's initial sync, if the
    /// destination is still at `version` and the pass still at `from`:
    /// where it goes on (`next`), or that it is done (`None`). The first
    /// stretch of a first pass (`horizon`) marks the destination synced
    /// and moves its change horizon; a later pass (changes kept flowing
    /// meanwhile) does not.
    pub async fn initial_sync_progress(
        &self,
        space_id: &str,
        destination_id: &str,
        version: u64,
        from: Option<&BTreeMap<String, String>>,
        next: Option<&BTreeMap<String, String>>,
        horizon: Option<i64>,
    ) -> Result<bool> {
        let mut set = vec!["synced = :t"];
        let mut remove = Vec::new();
        let mut request = self
            .client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(key(space_key(space_id), &dest_sort(destination_id))))
            .expression_attribute_values(":t", AttributeValue::Bool(true))
            .expression_attribute_values(":v", n(version));
        request = match from {
            Some(from) => request
                .condition_expression("version = :v AND initial_cursor = :from")
                .expression_attribute_values(":from", s(serde_json::to_string(from)?)),
            None => request
                .condition_expression("version = :v AND attribute_not_exists(initial_cursor)"),
        };
        if let Some(h) = horizon {
            set.push("since_change = :h");
            request = request.expression_attribute_values(":h", n(h));
        }
        match next {
            Some(next) => {
                set.push("initial_cursor = :next");
                request =
                    request.expression_attribute_values(":next", s(serde_json::to_string(next)?));
            }
            None => {
                set.push("initial_pending = :f");
                remove.extend(["initial_keys", "initial_cursor"]);
                request = request.expression_attribute_values(":f", AttributeValue::Bool(false));
            }
        }
        let mut expression = format!("SET {}", set.join(", "));
        if !remove.is_empty() {
            expression.push_str(&format!(" REMOVE {}", remove.join(", ")));
        }
        Ok(self
            .conditional_update(request.update_expression(expression))
            .await?
            .is_some())
    }

    /// Up to `limit` of the space's root profiles from `start` (the roots
    /// index, no scan), each with its stored computed values (a root
    /// without a compute state is left out), and where to go on.
    pub async fn root_states(
        &self,
        space_id: &str,
        start: Option<BTreeMap<String, String>>,
        limit: usize,
    ) -> Result<(
        Vec<(String, kindred_store::ComputedValues)>,
        Option<BTreeMap<String, String>>,
    )> {
        let (roots, next) = self.root_profiles(space_id, start, limit).await?;
        let keys = roots
            .iter()
            .map(|p| key(super::compute::state_key(space_id, p), META))
            .collect();
        let prefix = super::compute::state_key(space_id, "");
        let mut out = Vec::new();
        for item in self.batch_get(keys, true).await? {
            let profile_id = get_s(&item, PK)?
                .strip_prefix(&prefix)
                .unwrap_or_default()
                .to_string();
            if let Some(computed) = opt_s(&item, "computed") {
                out.push((profile_id, serde_json::from_str(computed)?));
            }
        }
        // The order the roots were read in, whatever order the batch read
        // answered in.
        let order: HashMap<&str, usize> = roots
            .iter()
            .enumerate()
            .map(|(i, p)| (p.as_str(), i))
            .collect();
        out.sort_by_key(|(p, _)| order.get(p.as_str()).copied());
        Ok((out, next))
    }

    /// The space's destinations as stored, with their sync state.
    pub async fn destination_items(&self, space_id: &str) -> Result<Vec<DestinationState>> {
        let query = self
            .client
            .query()
            .table_name(&self.table)
            .key_condition_expression("pk = :pk AND begins_with(sk, :prefix)")
            .expression_attribute_values(":pk", s(space_key(space_id)))
            .expression_attribute_values(":prefix", s(DEST_PREFIX))
            .consistent_read(true);
        let mut out = Vec::new();
        self.query_pages(query, |item| {
            out.push(DestinationState {
                record: record_of(item)?,
                since_change: opt_n(item, "since_change").unwrap_or(0),
                initial_keys: initial_keys(item)?,
                synced: boolean(item, "synced"),
                initial_cursor: opt_s(item, "initial_cursor")
                    .map(serde_json::from_str)
                    .transpose()?,
            });
            Ok(true)
        })
        .await?;
        Ok(out)
    }
}

#[async_trait]
impl Destinations for DynamoStore {
    async fn put_destination(
        &self,
        space_id: &str,
        destination_id: &str,
        name: Option<String>,
        settings: Settings,
        secret: Option<String>,
    ) -> Result<(DestinationRecord, bool)> {
        let sealed = match &secret {
            Some(sec) => Some(
                self.sealer()?
                    .seal(sec, &secret_context(space_id, destination_id)),
            ),
            None => None,
        };
        let settings_json = settings.to_json().to_string();
        for attempt in 0..PUT_ATTEMPTS {
            let now = now_millis();
            let old = self.destination_item(space_id, destination_id).await?;
            let before = old.as_ref().map(record_of).transpose()?;
            check_secret(
                &settings,
                before.as_ref().map(|b| &b.settings),
                sealed.is_some(),
            )
            .map_err(|e| StoreError::Invalid(e.to_string()))?;
            let result = match (&old, before) {
                (None, _) | (_, None) => {
                    let sealed = sealed
                        .as_ref()
                        .ok_or(StoreError::Invariant("a new destination without a secret"))?;
                    let mut item = key(space_key(space_id), &dest_sort(destination_id));
                    item.insert("destination_id".into(), s(destination_id));
                    if let Some(name) = &name {
                        item.insert("name".into(), s(name));
                    }
                    item.insert("settings".into(), s(&settings_json));
                    item.insert("secret".into(), AttributeValue::B(sealed.clone().into()));
                    item.insert("version".into(), n(1));
                    item.insert("created_at".into(), n(now));
                    item.insert("updated_at".into(), n(now));
                    item.insert("initial_pending".into(), AttributeValue::Bool(true));
                    item.insert("since_change".into(), n(0));
                    // Numbers of a re-created destination start past any
                    // of an earlier one's (a run still draining the old
                    // queue can never remove a new call).
                    item.insert("next_seq".into(), n(now * 1_000));
                    item.insert("delivered".into(), n(0));
                    self.create_destination(space_id, item).await
                }
                (Some(old), Some(before)) => {
                    // What must be sent first: the keys this replace adds,
                    // with those of a pass still pending.
                    let old_keys = initial_keys(old)?;
                    let (resync, keys) = settings.pending_after(
                        &before.settings,
                        before.initial_sync_pending,
                        old_keys,
                    );
                    let mut update =
                        "SET settings = :s, version = version + :one, updated_at = :now, \
                                      initial_pending = :ip"
                            .to_string();
                    let mut remove = Vec::new();
                    let mut request = self
                        .client
                        .update_item()
                        .table_name(&self.table)
                        .set_key(Some(key(space_key(space_id), &dest_sort(destination_id))))
                        .condition_expression("version = :v")
                        .expression_attribute_values(":s", s(&settings_json))
                        .expression_attribute_values(":one", n(1))
                        .expression_attribute_values(":now", n(now))
                        .expression_attribute_values(":ip", AttributeValue::Bool(resync))
                        .expression_attribute_values(":v", n(before.version));
                    match &name {
                        Some(name) => {
                            update.push_str(", #name = :name");
                            request = request
                                .expression_attribute_names("#name", "name")
                                .expression_attribute_values(":name", s(name));
                        }
                        None => {
                            remove.push("#name");
                            request = request.expression_attribute_names("#name", "name");
                        }
                    }
                    match keys {
                        Some(keys) => {
                            update.push_str(", initial_keys = :keys");
                            request = request.expression_attribute_values(
                                ":keys",
                                s(serde_json::to_string(&keys)?),
                            );
                        }
                        None => remove.push("initial_keys"),
                    }
                    if resync {
                        // A pass pending with other keys starts again
                        // with all of them.
                        remove.push("initial_cursor");
                    }
                    if !remove.is_empty() {
                        update.push_str(" REMOVE ");
                        update.push_str(&remove.join(", "));
                    }
                    if let Some(sealed) = &sealed {
                        update = update.replacen(
                            "SET settings = :s",
                            "SET settings = :s, secret = :secret",
                            1,
                        );
                        request = request.expression_attribute_values(
                            ":secret",
                            AttributeValue::B(sealed.clone().into()),
                        );
                    }
                    request
                        .update_expression(update)
                        .return_values(ReturnValue::AllNew)
                        .return_consumed_capacity(ReturnConsumedCapacity::Total)
                        .send()
                        .await
                        .map(|out| {
                            self.usage.write(out.consumed_capacity());
                            (out.attributes().cloned().unwrap_or_default(), false)
                        })
                        .map_err(|e| (conditional_failed(&e), service(e)))
                }
            };
            match result {
                Ok((item, created)) => return Ok((record_of(&item)?, created)),
                Err((true, _)) => {
                    // Another write won: read again and retry.
                    super::backoff(attempt, 6).await;
                }
                Err((false, e)) => return Err(e),
            }
        }
        Err(StoreError::Service(
            "a destination write kept losing races".into(),
        ))
    }

    async fn destination(
        &self,
        space_id: &str,
        destination_id: &str,
    ) -> Result<Option<DestinationRecord>> {
        self.destination_item(space_id, destination_id)
            .await?
            .map(|i| record_of(&i))
            .transpose()
    }

    async fn destinations(&self, space_id: &str) -> Result<Vec<DestinationRecord>> {
        Ok(self
            .destination_items(space_id)
            .await?
            .into_iter()
            .map(|d| d.record)
            .collect())
    }

    async fn delete_destination(&self, space_id: &str, destination_id: &str) -> Result<bool> {
        let delete = Delete::builder()
            .table_name(&self.table)
            .set_key(Some(key(space_key(space_id), &dest_sort(destination_id))))
            .condition_expression("attribute_exists(pk)")
            .build()
            .map_err(service)?;
        let count = TxUpdate::builder()
            .table_name(&self.table)
            .set_key(Some(key(space_key(space_id), DEST_COUNT)))
            .update_expression("ADD destinations :minus_one")
            .expression_attribute_values(":minus_one", n(-1))
            .build()
            .map_err(service)?;
        let items = vec![
            TransactWriteItem::builder().delete(delete).build(),
            TransactWriteItem::builder().update(count).build(),
        ];
        // A destination already gone fails the delete's condition.
        let existed = self.transact_conditional(items).await?.is_ok();
        for pk in [
            out_key(space_id, destination_id),
            dead_key(space_id, destination_id),
        ] {
            let keys = self
                .partition(pk, None)
                .await?
                .iter()
                .map(|item| Ok(key(get_s(item, PK)?.to_string(), get_s(item, SK)?)))
                .collect::<Result<Vec<_>>>()?;
            self.delete_keys(keys).await?;
        }
        Ok(existed)
    }

    async fn destination_status(
        &self,
        space_id: &str,
        destination_id: &str,
    ) -> Result<Option<DestinationStatus>> {
        let Some(item) = self.destination_item(space_id, destination_id).await? else {
            return Ok(None);
        };
        let queue = out_key(space_id, destination_id);
        Ok(Some(DestinationStatus {
            delivered: opt_n(&item, "delivered").unwrap_or(0) as u64,
            pending: self.count(queue.clone(), Some("attempts = :zero")).await?,
            retrying: self.count(queue, Some("attempts > :zero")).await?,
            dead: self.count(dead_key(space_id, destination_id), None).await?,
            last_success_at: opt_n(&item, "last_success_at"),
            last_error: opt_n(&item, "last_error_at").map(|at| DeliveryError {
                status: opt_n(&item, "last_error_status").map(|s| s as u16),
                message: opt_s(&item, "last_error_message")
                    .unwrap_or_default()
                    .to_string(),
                at,
            }),
        }))
    }

    async fn dead_letters(
        &self,
        space_id: &str,
        destination_id: &str,
        limit: usize,
    ) -> Result<Vec<DeadLetter>> {
        self.partition(dead_key(space_id, destination_id), Some(limit))
            .await?
            .iter()
            .map(|item| {
                Ok(DeadLetter {
                    seq: get_s(item, SK)?
                        .parse()
                        .map_err(|_| StoreError::Undecodable("a dead letter's key".into()))?,
                    profile_id: get_s(item, "profile_id")?.to_string(),
                    call: serde_json::from_str(get_s(item, "call")?)?,
                    attempts: opt_n(item, "attempts").unwrap_or(0) as u32,
                    error: opt_s(item, "error").unwrap_or_default().to_string(),
                })
            })
            .collect()
    }

    async fn replay(&self, space_id: &str, destination_id: &str) -> Result<u64> {
        let dead = self
            .partition(dead_key(space_id, destination_id), None)
            .await?;
        let mut actions = Vec::new();
        for item in &dead {
            let sk = get_s(item, SK)?;
            let mut back = key(out_key(space_id, destination_id), sk);
            for attr in ["call", "profile_id"] {
                if let Some(v) = item.get(attr) {
                    back.insert(attr.into(), v.clone());
                }
            }
            back.insert("attempts".into(), n(0));
            actions.extend(self.moved(back, key(dead_key(space_id, destination_id), sk))?);
        }
        self.transact_chunks(actions).await?;
        Ok(dead.len() as u64)
    }
}

#[async_trait]
impl Outbox for DynamoStore {
    async fn enqueue(
        &self,
        space_id: &str,
        destination_id: &str,
        calls: Vec<(String, Value)>,
    ) -> Result<()> {
        if calls.is_empty() {
            return Ok(());
        }
        // Each chunk is one transaction with the counter's move, so calls
        // become visible in the order of their numbers.
        for chunk in calls.chunks(MAX_TRANSACT - 1) {
            let mut attempt = 0u32;
            loop {
                let item = self
                    .destination_item(space_id, destination_id)
                    .await?
                    .ok_or(StoreError::NotFound)?;
                let read = opt_n(&item, "next_seq").unwrap_or(0);
                let mut actions = vec![TransactWriteItem::builder()
                    .update(
                        aws_sdk_dynamodb::types::Update::builder()
                            .table_name(&self.table)
                            .set_key(Some(key(space_key(space_id), &dest_sort(destination_id))))
                            .update_expression("SET next_seq = :new")
                            .condition_expression("next_seq = :read")
                            .expression_attribute_values(":new", n(read + chunk.len() as i64))
                            .expression_attribute_values(":read", n(read))
                            .build()
                            .map_err(service)?,
                    )
                    .build()];
                for (i, (profile_id, call)) in chunk.iter().enumerate() {
                    let mut item = key(
                        out_key(space_id, destination_id),
                        &seq_sort(read + 1 + i as i64),
                    );
                    item.insert("profile_id".into(), s(profile_id));
                    item.insert("call".into(), s(call.to_string()));
                    item.insert("attempts".into(), n(0));
                    actions.push(
                        TransactWriteItem::builder()
                            .put(
                                Put::builder()
                                    .table_name(&self.table)
                                    .set_item(Some(item))
                                    .build()
                                    .map_err(service)?,
                            )
                            .build(),
                    );
                }
                match self.transact(actions).await {
                    Ok(()) => break,
                    // Another writer moved the counter first: read again.
                    Err(StoreError::Conflict) if attempt < PUT_ATTEMPTS => {
                        attempt += 1;
                        super::backoff(attempt, 6).await;
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(())
    }

    async fn next_calls(
        &self,
        space_id: &str,
        destination_id: &str,
        limit: usize,
    ) -> Result<Vec<PendingCall>> {
        self.partition(out_key(space_id, destination_id), Some(limit))
            .await?
            .iter()
            .map(|item| {
                Ok(PendingCall {
                    seq: get_s(item, SK)?
                        .parse()
                        .map_err(|_| StoreError::Undecodable("a queued call's key".into()))?,
                    call: get_s(item, "call")?.to_string(),
                    attempts: opt_n(item, "attempts").unwrap_or(0) as u32,
                })
            })
            .collect()
    }

    async fn record(
        &self,
        space_id: &str,
        destination_id: &str,
        seqs: &[i64],
        attempt: Attempt,
    ) -> Result<()> {
        let queue = out_key(space_id, destination_id);
        let dest = key(space_key(space_id), &dest_sort(destination_id));
        let stats = match &attempt {
            Attempt::Delivered { at } => {
                let deletes = seqs
                    .iter()
                    .map(|seq| {
                        Ok(WriteRequest::builder()
                            .delete_request(
                                DeleteRequest::builder()
                                    .set_key(Some(key(queue.clone(), &seq_sort(*seq))))
                                    .build()
                                    .map_err(service)?,
                            )
                            .build())
                    })
                    .collect::<Result<Vec<_>>>()?;
                self.batch_write(deletes).await?;
                self.client
                    .update_item()
                    .table_name(&self.table)
                    .set_key(Some(dest))
                    .update_expression("ADD delivered :n SET last_success_at = :at")
                    .condition_expression("attribute_exists(pk)")
                    .expression_attribute_values(":n", n(seqs.len()))
                    .expression_attribute_values(":at", n(at))
            }
            Attempt::Failed { error, dead } => {
                let text = match error.status {
                    Some(code) => format!("{code}: {}", error.message),
                    None => error.message.clone(),
                };
                if *dead {
                    let mut actions = Vec::new();
                    let keys: Vec<Item> = seqs
                        .iter()
                        .map(|q| key(queue.clone(), &seq_sort(*q)))
                        .collect();
                    for item in self.batch_get(keys, true).await? {
                        let sk = get_s(&item, SK)?.to_string();
                        let mut letter = item.clone();
                        letter.insert(PK.into(), s(dead_key(space_id, destination_id)));
                        letter.insert(
                            "attempts".into(),
                            n(opt_n(&item, "attempts").unwrap_or(0) + 1),
                        );
                        letter.insert("error".into(), s(&text));
                        actions.extend(self.moved(letter, key(queue.clone(), &sk))?);
                    }
                    self.transact_chunks(actions).await?;
                } else {
                    for seq in seqs {
                        let request = self
                            .client
                            .update_item()
                            .table_name(&self.table)
                            .set_key(Some(key(queue.clone(), &seq_sort(*seq))))
                            .update_expression("ADD attempts :one SET #e = :e")
                            .condition_expression("attribute_exists(pk)")
                            .expression_attribute_names("#e", "error")
                            .expression_attribute_values(":one", n(1))
                            .expression_attribute_values(":e", s(&text));
                        // Gone already (delivered by a run before): nothing to count.
                        self.conditional_update(request).await?;
                    }
                }
                let mut update = self
                    .client
                    .update_item()
                    .table_name(&self.table)
                    .set_key(Some(dest))
                    .condition_expression("attribute_exists(pk)")
                    .expression_attribute_values(":at", n(error.at))
                    .expression_attribute_values(":m", s(&error.message));
                update = match error.status {
                    Some(code) => update
                        .update_expression(
                            "SET last_error_at = :at, last_error_message = :m, last_error_status = :st",
                        )
                        .expression_attribute_values(":st", n(code)),
                    None => update.update_expression(
                        "SET last_error_at = :at, last_error_message = :m REMOVE last_error_status",
                    ),
                };
                update
            }
        };
        // The destination was deleted meanwhile: nothing to count.
        self.conditional_update(stats).await?;
        Ok(())
    }
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

impl DynamoStore {
    /// Takes the space's fan-out lease until `until` if it is free (or
    /// expired); returns the change-log cursor, or `None` if another
    /// holder has it.
    pub async fn take_sync_lease(
        &self,
        space_id: &str,
        owner: &str,
        until: i64,
    ) -> Result<Option<i64>> {
        let request = self
            .client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(key(space_key(space_id), SYNC)))
            .update_expression("SET lease_owner = :me, lease_until = :until")
            .condition_expression("attribute_not_exists(lease_until) OR lease_until < :now")
            .expression_attribute_values(":me", s(owner))
            .expression_attribute_values(":until", n(until))
            .expression_attribute_values(":now", n(now_millis()))
            .return_values(ReturnValue::AllNew);
        Ok(self.conditional_update(request).await?.map(|out| {
            out.attributes()
                .and_then(|a| opt_n(a, "cursor"))
                .unwrap_or(0)
        }))
    }

    /// Moves the cursor and frees the lease, if `owner` still holds it.
    pub async fn release_sync_lease(
        &self,
        space_id: &str,
        owner: &str,
        cursor: i64,
    ) -> Result<bool> {
        let request = self
            .client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(key(space_key(space_id), SYNC)))
            .update_expression("SET #c = :c REMOVE lease_owner, lease_until")
            .condition_expression("lease_owner = :me")
            .expression_attribute_names("#c", "cursor")
            .expression_attribute_values(":c", n(cursor))
            .expression_attribute_values(":me", s(owner));
        Ok(self.conditional_update(request).await?.is_some())
    }

    /// Takes a destination's delivery lease (one deliverer at a time keeps
    /// its calls in order).
    pub async fn take_delivery_lease(
        &self,
        space_id: &str,
        destination_id: &str,
        owner: &str,
        until: i64,
    ) -> Result<DeliveryLease> {
        let request = self
            .client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(key(space_key(space_id), &dest_sort(destination_id))))
            .update_expression("SET deliver_owner = :me, deliver_until = :until")
            .condition_expression(
                "attribute_exists(pk) AND (attribute_not_exists(deliver_until) OR deliver_until < :now)",
            )
            .expression_attribute_values(":me", s(owner))
            .expression_attribute_values(":until", n(until))
            .expression_attribute_values(":now", n(now_millis()))
            .return_values(ReturnValue::AllNew);
        match self.conditional_update(request).await? {
            Some(out) => Ok(DeliveryLease::Taken {
                retry_at: out
                    .attributes()
                    .and_then(|a| opt_n(a, "retry_at"))
                    .unwrap_or(0),
            }),
            None if self
                .destination_item(space_id, destination_id)
                .await?
                .is_none() =>
            {
                Ok(DeliveryLease::Gone)
            }
            None => Ok(DeliveryLease::Busy),
        }
    }

    /// Records when the destination's next attempt is due (after a failed
    /// one): an earlier wake-up leaves it alone.
    pub async fn set_retry_at(&self, space_id: &str, destination_id: &str, at: i64) -> Result<()> {
        let request = self
            .client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(key(space_key(space_id), &dest_sort(destination_id))))
            .update_expression("SET retry_at = :at")
            .condition_expression("attribute_exists(pk)")
            .expression_attribute_values(":at", n(at));
        self.conditional_update(request).await?;
        Ok(())
    }

    pub async fn release_delivery_lease(
        &self,
        space_id: &str,
        destination_id: &str,
        owner: &str,
    ) -> Result<()> {
        let request = self
            .client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(key(space_key(space_id), &dest_sort(destination_id))))
            .update_expression("REMOVE deliver_owner, deliver_until")
            .condition_expression("deliver_owner = :me")
            .expression_attribute_values(":me", s(owner));
        self.conditional_update(request).await?;
        Ok(())
    }

    /// The profiles merged into `parent` by the event `message_id`.
    pub async fn merged_by(
        &self,
        space_id: &str,
        parent: &str,
        message_id: &str,
    ) -> Result<Vec<(String, i64)>> {
        let query = self
            .client
            .query()
            .table_name(&self.table)
            .key_condition_expression("pk = :pk AND begins_with(sk, :m)")
            .expression_attribute_values(":pk", s(super::profile_key(space_id, parent)))
            .expression_attribute_values(":m", s("MERGE#"))
            .consistent_read(true);
        let mut out = Vec::new();
        self.query_pages(query, |item| {
            if opt_s(item, "message_id") == Some(message_id) {
                out.push((
                    get_s(item, "child_id")?.to_string(),
                    opt_n(item, "merged_at").unwrap_or(0),
                ));
            }
            Ok(true)
        })
        .await?;
        Ok(out)
    }

    /// A profile's own identifiers (for a merged-away profile: those it
    /// had when it merged), with when each was added.
    pub async fn own_identifiers(
        &self,
        space_id: &str,
        profile_id: &str,
    ) -> Result<Vec<kindred_domain::resolve::IdentifierEntry>> {
        match self
            .get(super::profile_key(space_id, profile_id), true)
            .await?
        {
            Some(item) => Ok(serde_json::from_str(get_s(&item, "identifiers")?)?),
            None => Ok(Vec::new()),
        }
    }
}
