//! The identity graph on DynamoDB. Reads are strongly consistent batch
//! gets; writes carry every condition of the plan, so two workers racing
//! on the same identifiers cannot both succeed: the loser's transaction is
//! cancelled whole and the pipeline re-reads and re-plans.

use std::collections::{HashMap, HashSet};

use aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError;
use aws_sdk_dynamodb::types::{AttributeValue, ReturnConsumedCapacity, TransactWriteItem, Update};
use kindred_domain::{Condition, Facts, Identifier, IdentifierEntry, Plan, ProfileFacts, Traits};
use kindred_store::ports::{Applied, EventRecord, IdentityGraph};
use kindred_store::{Result, StoreError};
use sha2::{Digest, Sha256};

use super::{
    event_key, event_order, event_seq, get_n, get_s, identifier_key, key, link_sort_key, lock,
    merge_sort_key, n, opt_s, profile_key, root_index_keys, s, service, transact_put, DynamoStore,
    Item, EVENT_RETENTION_DAYS, EXPIRES_AT, GPK, GSK, META, PK,
};

/// Split marks remembered as seen (beyond it, they are read again).
const MAX_CACHED_RESPLITS: usize = 10_000;
/// DynamoDB's limit on the items of one `TransactWriteItems`.
const MAX_TRANSACTION_ITEMS: usize = 100;

pub struct DynamoGraph<'a> {
    store: &'a DynamoStore,
    /// Transactions sent so far; part of each one's idempotency token.
    transactions: u64,
}

impl<'a> DynamoGraph<'a> {
    pub(crate) fn new(store: &'a DynamoStore) -> Self {
        Self {
            store,
            transactions: 0,
        }
    }
}

fn profile_facts(item: &Item) -> Result<ProfileFacts> {
    let identifiers: Vec<IdentifierEntry> = serde_json::from_str(get_s(item, "identifiers")?)?;
    let traits: Traits = serde_json::from_str(get_s(item, "traits")?)?;
    Ok(ProfileFacts {
        id: get_s(item, "profile_id")?.to_string(),
        version: get_n(item, "version")? as u64,
        created_at: get_n(item, "created_at")?,
        merges: get_n(item, "merges")? as u32,
        identifiers,
        traits,
    })
}

impl IdentityGraph for DynamoGraph<'_> {
    async fn drop_if_suppressed(
        &mut self,
        space_id: &str,
        ids: &[Identifier],
        received_at: kindred_domain::Millis,
    ) -> Result<Option<Identifier>> {
        self.store
            .drop_if_suppressed(space_id, ids, received_at)
            .await
    }

    async fn record_violations(
        &mut self,
        space_id: &str,
        violations: &[kindred_store::privacy::Violation],
    ) -> Result<()> {
        // After the event's own transaction, which may hold 100 actions:
        // a failure here loses log entries, never the event.
        if let Err(e) = self.store.record_violations(space_id, violations).await {
            tracing::warn!(space_id, error = %e, "violations not logged");
        }
        Ok(())
    }

    async fn is_duplicate(&mut self, _space_id: &str, _message_id: &str) -> Result<bool> {
        // The event item is the dedup record and is written only if absent,
        // so `apply` detects a repeat; reading it first would cost every
        // event a read request.
        Ok(false)
    }

    async fn facts(&mut self, space_id: &str, ids: &[Identifier]) -> Result<Facts> {
        let unique: HashSet<&Identifier> = ids.iter().collect();
        let keys = unique
            .iter()
            .map(|id| key(identifier_key(space_id, id), META))
            .collect();
        let items = self.store.batch_get(keys, true).await?;
        let by_key: HashMap<&str, &Item> = items
            .iter()
            .filter_map(|i| opt_s(i, PK).map(|k| (k, i)))
            .collect();
        let mut owner_of: HashMap<Identifier, String> = HashMap::new();
        let mut resplit = Vec::new();
        for id in unique {
            if let Some(item) = by_key.get(identifier_key(space_id, id).as_str()) {
                let owner = get_s(item, "profile_id")?.to_string();
                if let Ok(at) = get_n(item, super::split::RESPLIT) {
                    resplit.push((owner.clone(), at));
                }
                owner_of.insert(id.clone(), owner);
            }
        }
        if !resplit.is_empty() {
            // The owner's profile was split out of a tree: the merge
            // pointers cached on its way up may be gone. Read them again.
            // Once per split seen, not per event.
            let mut caches = lock(&self.store.caches);
            for (start, at) in resplit {
                let seen = (space_id.to_string(), start.clone());
                if caches.resplits.get(&seen) == Some(&at) {
                    continue;
                }
                if caches.resplits.len() >= MAX_CACHED_RESPLITS {
                    caches.resplits.clear();
                }
                caches.resplits.insert(seen, at);
                let mut current = start;
                while let Some(parent) = caches
                    .parents
                    .remove(&(space_id.to_string(), current.clone()))
                {
                    current = parent;
                }
                caches.profiles.remove(&(space_id.to_string(), current));
            }
        }

        // Follow each owner to its root: known parents first, then the
        // profile items (cached root facts, or read).
        let mut roots: HashMap<String, ProfileFacts> = HashMap::new();
        let mut root_of: HashMap<String, String> = HashMap::new();
        let mut unresolved: Vec<String> = owner_of.values().cloned().collect();
        unresolved.sort();
        unresolved.dedup();
        let mut hops = 0;
        while !unresolved.is_empty() {
            hops += 1;
            if hops > 1_000 {
                return Err(StoreError::Invariant("a cycle of merge pointers"));
            }
            let mut to_read = Vec::new();
            {
                let caches = lock(&self.store.caches);
                for start in std::mem::take(&mut unresolved) {
                    let mut current = start.clone();
                    while let Some(parent) =
                        caches.parents.get(&(space_id.to_string(), current.clone()))
                    {
                        current = parent.clone();
                    }
                    if let Some(facts) = caches
                        .profiles
                        .get(&(space_id.to_string(), current.clone()))
                    {
                        roots.insert(current.clone(), facts.clone());
                        root_of.insert(start, current);
                    } else {
                        to_read.push((start, current));
                    }
                }
            }
            if to_read.is_empty() {
                break;
            }
            let mut wanted: Vec<&String> = to_read.iter().map(|(_, c)| c).collect();
            wanted.sort();
            wanted.dedup();
            let keys = wanted
                .iter()
                .map(|p| key(profile_key(space_id, p), META))
                .collect();
            let items = self.store.batch_get(keys, true).await?;
            for item in &items {
                let id = get_s(item, "profile_id")?.to_string();
                match opt_s(item, "parent_id") {
                    Some(parent) => {
                        lock(&self.store.caches)
                            .parents
                            .insert((space_id.to_string(), id), parent.to_string());
                    }
                    None => self.store.cache_profile(space_id, profile_facts(item)?),
                }
            }
            if items.len() < wanted.len() {
                return Err(StoreError::Invariant(
                    "an identifier names a profile that does not exist",
                ));
            }
            // Everything read is now cached: go round again.
            unresolved = to_read.into_iter().map(|(start, _)| start).collect();
        }

        let mut facts = Facts::default();
        for (id, owner) in owner_of {
            let root = root_of.get(&owner).cloned().unwrap_or(owner);
            facts.owners.insert(id, root);
        }
        if roots.len() > 1 {
            let mut ids: Vec<&String> = roots.keys().collect();
            ids.sort();
            facts
                .apart
                .extend(self.store.split_blocks(space_id, &ids).await?);
        }
        facts.profiles = roots;
        Ok(facts)
    }

    async fn apply(
        &mut self,
        space_id: &str,
        plan: &Plan,
        record: &EventRecord<'_>,
    ) -> Result<Applied> {
        let store = self.store;
        let profile_id = plan.profile_id();
        if let (Some(profile_id), Some(group_id)) = (profile_id, record.group_id) {
            // Written first and idempotently: a retry after a crash between
            // the two writes finds the event recorded and the link in place.
            self.put_link(space_id, profile_id, group_id, record)
                .await?;
        }
        let event = event_item(space_id, profile_id, record);
        // Nothing but the event to write: one put, conditioned on the
        // event alone. (An `Exists` condition is left unchecked here, for
        // cost: an event attached to a profile deleted meanwhile is removed
        // with it by the regulation's sweep of the tree's events.)
        let simple = matches!(plan.conditions().as_slice(), [] | [Condition::Exists(_)]);
        if simple {
            // An event on a known profile: one conditional put, which is
            // also the dedup check. A profile merged away meanwhile is
            // harmless: its events stay in its root's tree.
            return Ok(if store.put_if_absent(event).await? {
                Applied::Recorded
            } else {
                Applied::Duplicate
            });
        }

        let items = transaction_items(&store.table, space_id, plan, record, event)?;
        if items.len() > MAX_TRANSACTION_ITEMS {
            return Err(StoreError::Internal(format!(
                "the event needs {} writes in one transaction; DynamoDB allows {MAX_TRANSACTION_ITEMS}",
                items.len()
            )));
        }
        self.transactions += 1;
        let token = request_token(space_id, plan, record, self.transactions);
        let out = store
            .client
            .transact_write_items()
            .set_transact_items(Some(items))
            .client_request_token(token)
            .return_consumed_capacity(ReturnConsumedCapacity::Total)
            .send()
            .await;
        match out {
            Ok(out) => {
                store.usage.transaction(out.consumed_capacity());
                self.remember(space_id, plan);
                Ok(Applied::Recorded)
            }
            Err(e) => {
                store.usage.write(None);
                self.forget(space_id, plan);
                match e.as_service_error() {
                    Some(TransactWriteItemsError::TransactionCanceledException(c)) => {
                        let reasons = c.cancellation_reasons();
                        let code = |i: usize| reasons.get(i).and_then(|r| r.code()).unwrap_or("");
                        if code(0) == "ConditionalCheckFailed" {
                            // The event item is always first.
                            return Ok(Applied::Duplicate);
                        }
                        if reasons.iter().any(|r| {
                            matches!(
                                r.code(),
                                Some("ConditionalCheckFailed" | "TransactionConflict")
                            )
                        }) {
                            return Err(StoreError::Conflict);
                        }
                        Err(service(e))
                    }
                    Some(TransactWriteItemsError::TransactionInProgressException(_)) => {
                        Err(StoreError::Conflict)
                    }
                    _ => Err(service(e)),
                }
            }
        }
    }

    async fn backoff(&mut self, wait: std::time::Duration) {
        tokio::time::sleep(wait).await;
    }

    async fn record_account(
        &mut self,
        space_id: &str,
        record: &EventRecord<'_>,
        profile_id: Option<&str>,
    ) -> Result<()> {
        let Some(update) = &record.account else {
            return Ok(());
        };
        // A group call links its user to the account.
        let user = profile_id.filter(|_| record.group_id.is_some());
        self.store.record_account(space_id, update, user).await
    }
}

impl DynamoGraph<'_> {
    async fn put_link(
        &self,
        space_id: &str,
        profile_id: &str,
        group_id: &str,
        record: &EventRecord<'_>,
    ) -> Result<()> {
        let store = self.store;
        let mut item = key(profile_key(space_id, profile_id), &link_sort_key(group_id));
        item.insert("group_id".into(), s(group_id));
        item.insert("linked_at".into(), n(record.event.timestamp));
        item.insert("message_id".into(), s(&record.event.message_id));
        // Linked before: the first link's time is kept.
        store.put_if_absent(item).await?;
        Ok(())
    }

    /// After a successful write, the cache holds the new root facts.
    fn remember(&self, space_id: &str, plan: &Plan) {
        match plan {
            Plan::Unresolved => {}
            Plan::Create(c) => self.store.cache_profile(
                space_id,
                ProfileFacts {
                    id: c.profile_id.clone(),
                    version: 1,
                    created_at: c.created_at,
                    merges: 0,
                    identifiers: c.identifiers.clone(),
                    traits: c.traits.clone(),
                },
            ),
            Plan::Attach(a) => {
                let mut caches = lock(&self.store.caches);
                for (child, _) in &a.children {
                    caches
                        .profiles
                        .remove(&(space_id.to_string(), child.clone()));
                    caches
                        .parents
                        .insert((space_id.to_string(), child.clone()), a.profile_id.clone());
                }
                let entry = (space_id.to_string(), a.profile_id.clone());
                let written = plan.writes_root();
                match caches.profiles.get_mut(&entry) {
                    Some(facts) if written && facts.version == a.expected_version => {
                        facts.version += 1;
                        facts.merges = a.merges;
                        if let Some(ids) = &a.identifiers {
                            facts.identifiers = ids.clone();
                        }
                        if let Some(traits) = &a.traits {
                            facts.traits = traits.clone();
                        }
                    }
                    Some(_) if written => {
                        caches.profiles.remove(&entry);
                    }
                    _ => {}
                }
            }
        }
    }

    /// After a refused write, the profiles it named are read afresh.
    fn forget(&self, space_id: &str, plan: &Plan) {
        if let Plan::Attach(a) = plan {
            self.store.forget_profile(space_id, &a.profile_id);
            for (child, _) in &a.children {
                self.store.forget_profile(space_id, child);
            }
        }
    }
}

fn event_item(space_id: &str, profile_id: Option<&str>, record: &EventRecord<'_>) -> Item {
    let event = record.event;
    let seq = event_seq(&event.message_id);
    let mut item = key(event_key(space_id, &event.message_id), META);
    item.insert("space_id".into(), s(space_id));
    item.insert("message_id".into(), s(&event.message_id));
    item.insert("ts".into(), n(event.timestamp));
    item.insert("seq".into(), n(seq));
    item.insert("body".into(), s(record.body_json));
    item.insert("source_id".into(), s(record.source_id));
    if let Some(name) = &event.name {
        item.insert("name".into(), s(name));
    }
    item.insert(
        EXPIRES_AT.into(),
        n(record.now / 1000 + EVENT_RETENTION_DAYS * 86_400),
    );
    if let Some(profile_id) = profile_id {
        item.insert("profile_id".into(), s(profile_id));
        item.insert(GPK.into(), s(profile_key(space_id, profile_id)));
        item.insert(GSK.into(), s(event_order(event.timestamp, seq)));
    }
    item
}

/// Every write of a plan, the event first (its failed condition means
/// "duplicate"), each with its condition.
fn transaction_items(
    table: &str,
    space_id: &str,
    plan: &Plan,
    record: &EventRecord<'_>,
    event: Item,
) -> Result<Vec<TransactWriteItem>> {
    let message_id = &record.event.message_id;
    // Each write carries the plan's condition on its item (the domain's
    // `Plan::conditions`): `Absent` and `Unclaimed` on the puts that
    // create, `RootAt` on the updates of the root and of each profile
    // merged into it, `Exists` as a condition check.
    let conditions = plan.conditions();
    let version = |id: &str| {
        plan.expected_version(id).ok_or(StoreError::Invariant(
            "a written profile without its version condition",
        ))
    };
    let mut items = vec![transact_put(
        table,
        event,
        Some("attribute_not_exists(pk)"),
    )?];
    let claim = |items: &mut Vec<TransactWriteItem>, e: &IdentifierEntry, owner: &str| {
        let mut item = key(identifier_key(space_id, &e.id), META);
        item.insert("profile_id".into(), s(owner));
        item.insert("id_type".into(), s(&e.id.kind));
        item.insert("id_value".into(), s(&e.id.value));
        item.insert("created_at".into(), n(e.added_at));
        item.insert("first_message_id".into(), s(message_id));
        item.insert("source_id".into(), s(record.source_id));
        item.insert("encoding".into(), s(record.encoding_of(&e.id)));
        items.push(transact_put(table, item, Some("attribute_not_exists(pk)"))?);
        Ok::<_, StoreError>(())
    };
    match plan {
        Plan::Unresolved => {}
        Plan::Create(c) => {
            let mut item = key(profile_key(space_id, &c.profile_id), META);
            item.insert("profile_id".into(), s(&c.profile_id));
            item.insert("version".into(), n(1));
            item.insert("created_at".into(), n(c.created_at));
            item.insert("first_message_id".into(), s(message_id));
            item.insert("merges".into(), n(0));
            item.insert(
                "identifiers".into(),
                s(serde_json::to_string(&c.identifiers)?),
            );
            item.insert("traits".into(), s(serde_json::to_string(&c.traits)?));
            item.extend(root_index_keys(space_id, &c.profile_id));
            items.push(transact_put(table, item, Some("attribute_not_exists(pk)"))?);
            for e in &c.identifiers {
                claim(&mut items, e, &c.profile_id)?;
            }
        }
        Plan::Attach(a) => {
            for (child, _) in &a.children {
                let update = Update::builder()
                    .table_name(table)
                    .set_key(Some(key(profile_key(space_id, child), META)))
                    .update_expression(
                        "SET parent_id = :parent, version = version + :one REMOVE rpk, rsk",
                    )
                    .condition_expression("version = :v AND attribute_not_exists(parent_id)")
                    .expression_attribute_values(":parent", s(&a.profile_id))
                    .expression_attribute_values(":one", n(1))
                    .expression_attribute_values(":v", n(version(child)?))
                    .build()
                    .map_err(service)?;
                items.push(TransactWriteItem::builder().update(update).build());
                let mut merge = key(profile_key(space_id, &a.profile_id), &merge_sort_key(child));
                merge.insert("child_id".into(), s(child));
                merge.insert("message_id".into(), s(message_id));
                merge.insert("merged_at".into(), n(record.now));
                items.push(transact_put(table, merge, None)?);
            }
            if plan.writes_root() {
                let mut expression = String::from("SET version = version + :one, merges = :merges");
                let mut values: HashMap<String, AttributeValue> = HashMap::from([
                    (":one".into(), n(1)),
                    (":merges".into(), n(a.merges)),
                    (":v".into(), n(version(&a.profile_id)?)),
                ]);
                if let Some(ids) = &a.identifiers {
                    expression.push_str(", identifiers = :ids");
                    values.insert(":ids".into(), s(serde_json::to_string(ids)?));
                }
                if let Some(traits) = &a.traits {
                    expression.push_str(", traits = :traits");
                    values.insert(":traits".into(), s(serde_json::to_string(traits)?));
                }
                // The version covers the identifier list, so the per-type
                // counts that merge protection limits are part of it.
                let update = Update::builder()
                    .table_name(table)
                    .set_key(Some(key(profile_key(space_id, &a.profile_id), META)))
                    .update_expression(expression)
                    .condition_expression("version = :v AND attribute_not_exists(parent_id)")
                    .set_expression_attribute_values(Some(values))
                    .build()
                    .map_err(service)?;
                items.push(TransactWriteItem::builder().update(update).build());
            }
            for e in &a.claims {
                claim(&mut items, e, &a.profile_id)?;
            }
            if let Some(Condition::Exists(id)) = conditions.first() {
                let check = aws_sdk_dynamodb::types::ConditionCheck::builder()
                    .table_name(table)
                    .set_key(Some(key(profile_key(space_id, id), META)))
                    .condition_expression("attribute_exists(pk)")
                    .build()
                    .map_err(service)?;
                items.push(TransactWriteItem::builder().condition_check(check).build());
            }
        }
    }
    Ok(items)
}

/// Idempotency token of one transaction: the SDK's own retries of the
/// same call are applied once; another attempt (even of an identical plan,
/// after a cancellation) is a new request.
fn request_token(space_id: &str, plan: &Plan, record: &EventRecord<'_>, attempt: u64) -> String {
    let mut hash = Sha256::new();
    hash.update(attempt.to_le_bytes());
    hash.update(space_id.as_bytes());
    hash.update([0]);
    hash.update(record.event.message_id.as_bytes());
    hash.update([0]);
    hash.update(format!("{plan:?}").as_bytes());
    let digest = hash.finalize();
    digest[..18].iter().map(|b| format!("{b:02x}")).collect()
}
