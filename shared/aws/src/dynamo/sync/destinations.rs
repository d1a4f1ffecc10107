//! Destinations on DynamoDB: creating (counted per space in one
//! transaction), replacing and deleting them, their sync state and the
//! initial sync's progress.

use super::*;

impl DynamoStore {
    /// Puts a new destination item and counts it in its space, in one
    /// transaction; `Err((true, _))` if another write won the id.
    pub(super) async fn create_destination(
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

impl DynamoStore {
    /// Seals destination secrets with this key (required to write or
    /// deliver to destinations with secrets).
    pub fn with_sealer(mut self, sealer: Sealer) -> Self {
        self.sealer = Some(std::sync::Arc::new(sealer));
        self
    }

    pub(super) fn sealer(&self) -> Result<&Sealer> {
        self.sealer.as_deref().ok_or_else(|| {
            StoreError::Config("destination secrets are not configured in this deployment".into())
        })
    }

    pub(super) async fn destination_item(&self, space_id: &str, id: &str) -> Result<Option<Item>> {
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
    pub(super) async fn partition(&self, pk: String, limit: Option<usize>) -> Result<Vec<Item>> {
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

    pub(super) async fn count(&self, pk: String, filter: Option<&str>) -> Result<u64> {
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

    /// The two actions that move an item: put it in its new place, delete
    /// the old one (a pair never splits across transactions).
    pub(super) fn moved(&self, to: Item, from: Item) -> Result<[TransactWriteItem; 2]> {
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
    pub(super) async fn transact_chunks(&self, actions: Vec<TransactWriteItem>) -> Result<()> {
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
                    .open(sealed.as_ref(), &secret_context(space_id, destination_id))?
                    .into(),
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
            .map(|p| key(crate::dynamo::compute::state_key(space_id, p), META))
            .collect();
        let prefix = crate::dynamo::compute::state_key(space_id, "");
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

/// One put of a destination, as asked (the secret already sealed).
struct DestinationPut<'a> {
    space_id: &'a str,
    destination_id: &'a str,
    name: Option<String>,
    settings: &'a Settings,
    settings_json: String,
    sealed: Option<Vec<u8>>,
}

impl DestinationPut<'_> {
    /// The item of a new destination: an initial sync pending.
    fn new_item(&self, now: i64) -> Result<Item> {
        let sealed = self
            .sealed
            .as_ref()
            .ok_or(StoreError::Invariant("a new destination without a secret"))?;
        let mut item = key(space_key(self.space_id), &dest_sort(self.destination_id));
        item.insert("destination_id".into(), s(self.destination_id));
        if let Some(name) = &self.name {
            item.insert("name".into(), s(name));
        }
        item.insert("settings".into(), s(&self.settings_json));
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
        Ok(item)
    }
}

/// A put's outcome: the item written and whether it was created, or
/// whether it lost a race (read again and retry) and why it failed.
type PutOutcome = std::result::Result<(Item, bool), (bool, StoreError)>;

impl DynamoStore {
    /// Replaces a destination read at `before.version`: the settings, the
    /// name, the secret if a new one was given, and what a replace must
    /// send first (`Settings::pending_after`).
    async fn replace_destination(
        &self,
        put: &DestinationPut<'_>,
        old: &Item,
        before: DestinationRecord,
        now: i64,
    ) -> Result<PutOutcome> {
        // What must be sent first: the keys this replace adds,
        // with those of a pass still pending.
        let old_keys = initial_keys(old)?;
        let (resync, keys) =
            put.settings
                .pending_after(&before.settings, before.initial_sync_pending, old_keys);
        let mut update = "SET settings = :s, version = version + :one, updated_at = :now, \
                          initial_pending = :ip"
            .to_string();
        let mut remove = Vec::new();
        let mut request = self
            .client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(key(
                space_key(put.space_id),
                &dest_sort(put.destination_id),
            )))
            .condition_expression("version = :v")
            .expression_attribute_values(":s", s(&put.settings_json))
            .expression_attribute_values(":one", n(1))
            .expression_attribute_values(":now", n(now))
            .expression_attribute_values(":ip", AttributeValue::Bool(resync))
            .expression_attribute_values(":v", n(before.version));
        match &put.name {
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
                request =
                    request.expression_attribute_values(":keys", s(serde_json::to_string(&keys)?));
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
        if let Some(sealed) = &put.sealed {
            update = update.replacen(
                "SET settings = :s",
                "SET settings = :s, secret = :secret",
                1,
            );
            request = request
                .expression_attribute_values(":secret", AttributeValue::B(sealed.clone().into()));
        }
        Ok(request
            .update_expression(update)
            .return_values(ReturnValue::AllNew)
            .return_consumed_capacity(ReturnConsumedCapacity::Total)
            .send()
            .await
            .map(|out| {
                self.usage.write(out.consumed_capacity());
                (out.attributes().cloned().unwrap_or_default(), false)
            })
            .map_err(|e| (conditional_failed(&e), service(e))))
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
        secret: Option<kindred_store::secret::Secret>,
    ) -> Result<(DestinationRecord, bool)> {
        let sealed = match &secret {
            Some(sec) => Some(
                self.sealer()?
                    .seal(sec.expose(), &secret_context(space_id, destination_id)),
            ),
            None => None,
        };
        let put = DestinationPut {
            space_id,
            destination_id,
            name,
            settings_json: settings.to_json().to_string(),
            settings: &settings,
            sealed,
        };
        for attempt in 0..PUT_ATTEMPTS {
            let now = now_millis();
            let old = self.destination_item(space_id, destination_id).await?;
            let before = old.as_ref().map(record_of).transpose()?;
            check_secret(
                &settings,
                before.as_ref().map(|b| &b.settings),
                put.sealed.is_some(),
            )
            .map_err(|e| StoreError::Invalid(e.to_string()))?;
            let result = match (&old, before) {
                (Some(old), Some(before)) => {
                    self.replace_destination(&put, old, before, now).await?
                }
                _ => {
                    let item = put.new_item(now)?;
                    self.create_destination(space_id, item).await
                }
            };
            match result {
                Ok((item, created)) => return Ok((record_of(&item)?, created)),
                Err((true, _)) => {
                    // Another write won: read again and retry.
                    crate::dynamo::backoff(attempt, 6).await;
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
