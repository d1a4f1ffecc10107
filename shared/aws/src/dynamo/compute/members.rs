//! Member lists on DynamoDB: for each user-level definition, an item per
//! profile it holds for (`kindred_store::compute::holds`), and its size as
//! counters, both written in the same transaction as the compute state
//! whose values they follow. So a list and its size are exact at every
//! state version, whatever races.
//!
//! - A member item: `MEM#{space}#{class}#{key}#{shard}` / the profile id,
//!   and nothing else: written only when a profile enters or leaves the
//!   list, never when its value changes (a computed trait's value changes
//!   with most events; the value is read from the state when a page of the
//!   list is). The shard (of the profile id) spreads a list's writes over
//!   [`MEMBER_SHARDS`] partitions.
//! - A size: `MEMN#{space}#{class}#{key}` / a shard, a number each fold
//!   adds its net change to (on the shard of the profile it folds).
//! - A state that needs more member writes than one transaction has room
//!   for (a backfill of many definitions at once) keeps the rest in its
//!   item (`mq`); the next transaction on that state writes them first,
//!   and the fold runs such transactions until none are left.
//! - A state written before member lists existed has no `mx` mark: its
//!   values have no member items yet, so its first fold enters every one.

use super::*;

/// Partitions of one member list (and sorts of its size).
pub(crate) const MEMBER_SHARDS: u64 = 8;

/// A member-list write not yet made: the profile enters the list
/// (`delta` 1: its item is put, the size grows) or leaves it (-1).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(super) struct MemberTodo {
    #[serde(rename = "c")]
    class: Class,
    #[serde(rename = "k")]
    key: String,
    #[serde(rename = "p")]
    profile_id: String,
    #[serde(rename = "d")]
    delta: i64,
}

fn member_key(space_id: &str, class: Class, key: &str, shard: u64) -> String {
    format!("MEM#{space_id}#{}#{key}#{shard}", class.as_str())
}

fn size_key(space_id: &str, class: Class, key: &str) -> String {
    format!("MEMN#{space_id}#{}#{key}", class.as_str())
}

fn shard_of(profile_id: &str) -> u64 {
    event_seq(profile_id) as u64 % MEMBER_SHARDS
}

/// The entries and exits that bring a profile's member items from `old`
/// to `new` (the rule is the store's [`member_writes`]; a changed value
/// alone writes nothing here).
pub(super) fn todos(
    profile_id: &str,
    old: &ComputedValues,
    new: &ComputedValues,
) -> Vec<MemberTodo> {
    member_writes(old, new)
        .into_iter()
        .filter(|w| w.delta != 0)
        .map(|w| MemberTodo {
            class: w.class,
            key: w.key.to_string(),
            profile_id: profile_id.to_string(),
            delta: w.delta,
        })
        .collect()
}

/// Entries and exits made one after another, as one write per member
/// item (DynamoDB takes one action per item in a transaction): their
/// deltas summed; an exit undone by an entry (or the reverse) is none.
pub(super) fn coalesce(todos: Vec<MemberTodo>) -> Vec<MemberTodo> {
    let mut out: Vec<MemberTodo> = Vec::new();
    let mut at: HashMap<(Class, String, String), usize> = HashMap::new();
    for t in todos {
        let id = (t.class, t.key.clone(), t.profile_id.clone());
        match at.get(&id) {
            Some(&i) => out[i].delta += t.delta,
            None => {
                at.insert(id, out.len());
                out.push(t);
            }
        }
    }
    out.retain(|t| t.delta != 0);
    out
}

impl DynamoStore {
    /// As many of `todos` as fit in `room` transaction actions, as those
    /// actions (member items, then one size update per list, on
    /// `counter_shard`), and the rest.
    pub(super) fn member_actions(
        &self,
        space_id: &str,
        todos: Vec<MemberTodo>,
        room: usize,
        counter_shard: u64,
    ) -> Result<(Vec<TransactWriteItem>, Vec<MemberTodo>)> {
        let mut actions = Vec::new();
        let mut sizes: BTreeMap<(Class, String), i64> = BTreeMap::new();
        let mut rest = Vec::new();
        for t in todos {
            let list = (t.class, t.key.clone());
            let needs = 1 + usize::from(!sizes.contains_key(&list));
            if !rest.is_empty() || actions.len() + sizes.len() + needs > room {
                rest.push(t);
                continue;
            }
            let pk = member_key(space_id, t.class, &t.key, shard_of(&t.profile_id));
            // One item, so one entry or exit, whatever the sum said.
            let delta = t.delta.signum();
            actions.push(if delta > 0 {
                transact_put(&self.table, key(pk, &t.profile_id), None)?
            } else {
                let delete = Delete::builder()
                    .table_name(&self.table)
                    .set_key(Some(key(pk, &t.profile_id)))
                    .build()
                    .map_err(service)?;
                TransactWriteItem::builder().delete(delete).build()
            });
            *sizes.entry(list).or_default() += delta;
        }
        for ((class, list_key), delta) in sizes {
            if delta == 0 {
                continue;
            }
            let update = Update::builder()
                .table_name(&self.table)
                .set_key(Some(key(
                    size_key(space_id, class, &list_key),
                    &format!("{counter_shard:02}"),
                )))
                .update_expression("ADD members :d")
                .expression_attribute_values(":d", n(delta))
                .build()
                .map_err(service)?;
            actions.push(TransactWriteItem::builder().update(update).build());
        }
        Ok((actions, rest))
    }

    /// Deletes a profile's compute state (a regulation) and takes it off
    /// every member list on the way: in transactions at the state's
    /// version, the last of which deletes the state and its due entry.
    pub(crate) async fn delete_compute_state(
        &self,
        space_id: &str,
        profile_id: &str,
    ) -> Result<()> {
        let mut attempt = 0;
        loop {
            let Some(item) = self.get(state_key(space_id, profile_id), true).await? else {
                return Ok(());
            };
            let mut st = fold::state_of(&item)?;
            let mut todo = std::mem::take(&mut st.todo);
            if st.indexed {
                todo.extend(todos(profile_id, &st.values, &ComputedValues::new()));
            }
            // Room for the state's own write and its due entry's delete.
            let (mut actions, rest) = self.member_actions(
                space_id,
                coalesce(todo),
                MAX_TRANSACTION_ITEMS - 2,
                shard_of(profile_id),
            )?;
            let at_version = |b: aws_sdk_dynamodb::types::builders::DeleteBuilder| {
                b.table_name(&self.table)
                    .set_key(Some(key(state_key(space_id, profile_id), META)))
                    .condition_expression("version = :v")
                    .expression_attribute_values(":v", n(st.version))
            };
            if rest.is_empty() {
                let delete = at_version(Delete::builder()).build().map_err(service)?;
                actions.push(TransactWriteItem::builder().delete(delete).build());
                actions.push(self.delete_due(space_id, profile_id)?);
            } else {
                // More than one transaction: the values are emptied and the
                // rest kept in the state, as a fold would.
                let update = Update::builder()
                    .table_name(&self.table)
                    .set_key(Some(key(state_key(space_id, profile_id), META)))
                    .condition_expression("version = :v")
                    .update_expression(
                        "SET computed = :none, mx = :yes, mq = :rest, version = version + :one",
                    )
                    .expression_attribute_values(":v", n(st.version))
                    .expression_attribute_values(":one", n(1))
                    .expression_attribute_values(":none", s("{}"))
                    .expression_attribute_values(":yes", AttributeValue::Bool(true))
                    .expression_attribute_values(":rest", s(serde_json::to_string(&rest)?))
                    .build()
                    .map_err(service)?;
                actions.push(TransactWriteItem::builder().update(update).build());
            }
            match self.transact(actions).await {
                Ok(()) if rest.is_empty() => return Ok(()),
                Ok(()) => attempt = 0,
                Err(StoreError::Conflict) if attempt < ATTEMPTS => {
                    attempt += 1;
                    jitter(attempt).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// The shard a fold of `profile_id` adds its size changes to.
    pub(super) fn counter_shard(profile_id: &str) -> u64 {
        shard_of(profile_id)
    }

    /// Profiles on a member list after `after`, in id order, at most
    /// `limit`, with their values (read from their states). A profile
    /// whose state no longer holds (an exit not written yet, or a state
    /// that moved on between the two reads) is skipped, and reading goes on
    /// until the page is full or the list ends.
    pub(crate) async fn members(
        &self,
        space_id: &str,
        class: Class,
        list_key: &str,
        after: &str,
        limit: usize,
    ) -> Result<Vec<(String, ComputedValue)>> {
        let mut out = Vec::new();
        let mut after = after.to_string();
        while out.len() < limit {
            let ids = self
                .member_ids(space_id, class, list_key, &after, limit)
                .await?;
            let Some(last) = ids.last() else { break };
            after = last.clone();
            let exhausted = ids.len() < limit;
            let keys = ids
                .iter()
                .map(|p| key(state_key(space_id, p), META))
                .collect();
            let mut values: HashMap<String, ComputedValue> = HashMap::new();
            for item in self.batch_get(keys, false).await? {
                let mut computed: ComputedValues = serde_json::from_str(get_s(&item, "computed")?)?;
                if let Some(v) = computed
                    .remove(list_key)
                    .filter(|v| v.class == class && holds(v))
                {
                    values.insert(get_s(&item, "profile_id")?.to_string(), v);
                }
            }
            out.extend(
                ids.into_iter()
                    .filter_map(|p| values.remove(&p).map(|v| (p, v))),
            );
            if exhausted {
                break;
            }
        }
        out.truncate(limit);
        Ok(out)
    }

    /// The ids of up to `limit` member items after `after`, in id order,
    /// from every shard of the list.
    async fn member_ids(
        &self,
        space_id: &str,
        class: Class,
        list_key: &str,
        after: &str,
        limit: usize,
    ) -> Result<Vec<String>> {
        let reads = (0..MEMBER_SHARDS).map(|shard| async move {
            let mut query = self
                .client
                .query()
                .table_name(&self.table)
                .expression_attribute_values(":pk", s(member_key(space_id, class, list_key, shard)))
                .limit(limit.clamp(1, 1_000) as i32);
            query = if after.is_empty() {
                query.key_condition_expression("pk = :pk")
            } else {
                query
                    .key_condition_expression("pk = :pk AND sk > :after")
                    .expression_attribute_values(":after", s(after))
            };
            let mut found = Vec::new();
            self.query_pages(query, |item| {
                found.push(get_s(item, SK)?.to_string());
                Ok(found.len() < limit)
            })
            .await?;
            Ok::<_, StoreError>(found)
        });
        let mut ids = Vec::new();
        for shard in futures::future::join_all(reads).await {
            ids.extend(shard?);
        }
        ids.sort();
        ids.truncate(limit);
        Ok(ids)
    }

    /// The size of each of the space's user-level definitions that has
    /// members, by key.
    pub(crate) async fn member_counts(&self, space_id: &str) -> Result<BTreeMap<String, u64>> {
        let set = self.definition_set(space_id).await?;
        let reads = set.records.iter().map(|r| async move {
            let items = self
                .items_with_prefix(size_key(space_id, r.class, &r.key), "", false)
                .await?;
            let mut total = 0i64;
            for item in &items {
                total += get_n(item, "members")?;
            }
            Ok::<_, StoreError>((r.key.clone(), total))
        });
        let mut sizes = BTreeMap::new();
        for size in futures::future::join_all(reads).await {
            let (key, total) = size?;
            if total > 0 {
                sizes.insert(key, total as u64);
            }
        }
        Ok(sizes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn todo(key: &str, profile: &str, delta: i64) -> MemberTodo {
        MemberTodo {
            class: Class::Audience,
            key: key.into(),
            profile_id: profile.into(),
            delta,
        }
    }

    #[test]
    fn entries_and_exits_of_one_item_become_one_write_or_none() {
        let out = coalesce(vec![
            todo("a", "p1", 1),
            todo("b", "p1", 1),
            todo("a", "p1", -1),
            todo("a", "p2", -1),
            todo("a", "p2", 1),
            todo("a", "p3", -1),
        ]);
        assert_eq!(out, vec![todo("b", "p1", 1), todo("a", "p3", -1)]);
    }

    #[test]
    fn what_does_not_fit_a_transaction_waits_in_order() {
        let store = DynamoStore::new(
            aws_sdk_dynamodb::Client::from_conf(
                aws_sdk_dynamodb::Config::builder()
                    .behavior_version(aws_sdk_dynamodb::config::BehaviorVersion::latest())
                    .build(),
            ),
            "t",
        );
        let todos: Vec<MemberTodo> = (0..10)
            .map(|i| todo(&format!("k{}", i % 3), &format!("p{i}"), 1))
            .collect();
        // Each of the first lists needs its item and its size update.
        let (actions, rest) = store.member_actions("s", todos.clone(), 5, 0).unwrap();
        assert_eq!(actions.len(), 4);
        assert_eq!(rest, todos[2..].to_vec());
        let (actions, rest) = store.member_actions("s", todos.clone(), 100, 0).unwrap();
        assert_eq!(actions.len(), 13);
        assert!(rest.is_empty());
    }
}
