//! The compute fold on DynamoDB: a root's state item brought up to date
//! in the fold order of `kindred_store::compute` and written in one
//! transaction with its due entry, its changes and the events' marks.

use super::*;

pub(super) fn pack(state: &ProfileState, recent: &[String]) -> Result<AttributeValue> {
    use std::io::Write;
    let json = serde_json::to_vec(&(state, recent))?;
    let mut z = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::fast());
    z.write_all(&json)
        .and_then(|_| z.finish())
        .map(|bytes| AttributeValue::B(aws_sdk_dynamodb::primitives::Blob::new(bytes)))
        .map_err(|e| StoreError::Service(format!("compressing a state: {e}")))
}

pub(super) fn unpack(item: &Item) -> Result<Packed> {
    let Some(AttributeValue::B(bytes)) = item.get("state") else {
        return Err(StoreError::Service("a compute state has no state".into()));
    };
    let (state, recent) =
        serde_json::from_reader(flate2::read::DeflateDecoder::new(bytes.as_ref()))?;
    Ok(Packed { state, recent })
}

pub(super) fn state_of(item: &Item) -> Result<StateItem> {
    let Packed { state, recent } = unpack(item)?;
    Ok(StateItem {
        profile_id: get_s(item, "profile_id")?.to_string(),
        version: get_n(item, "version")?,
        state,
        values: serde_json::from_str(get_s(item, "computed")?)?,
        clock: get_n(item, "clock")?,
        recent,
        due: get_n(item, "due").ok(),
        indexed: matches!(item.get("mx"), Some(AttributeValue::Bool(true))),
        todo: match opt_s(item, "mq") {
            Some(json) => serde_json::from_str(json)?,
            None => Vec::new(),
        },
    })
}

impl DynamoStore {
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
        let (mut root, children) = self.read_states(space_id, tree).await?;
        let read_version = root.version;
        let mut writes = Vec::new();
        // The member-list writes due: the root's left over, then those
        // that take the merged profiles off every list, then (below) those
        // from the root's values as its member items show them to the new.
        let mut todo = std::mem::take(&mut root.todo);
        let listed = if root.indexed {
            root.values.clone()
        } else {
            ComputedValues::new()
        };
        // 1. States of profiles merged into the root since it was last folded.
        for mut child in children {
            writes.extend(self.child_deletes(space_id, &child)?);
            todo.append(&mut child.todo);
            if child.indexed {
                let gone = ComputedValues::new();
                todo.extend(members::todos(&child.profile_id, &child.values, &gone));
            }
            absorb(
                ruleset,
                (&mut root.state, &mut root.values),
                (child.state, child.values),
            );
            root.clock = root.clock.max(child.clock);
            root.recent.extend(child.recent);
            folded.absorbed += 1;
        }
        // 2. Definitions with no current state, from the folded history.
        if !ruleset.stale(&root.state).is_empty() {
            let history = self.folded_history(space_id, tree, &root.recent).await?;
            folded.rebuilt += rebuild_stale(ruleset, &mut root.state, &history)?;
        }
        // 3. The new events, each marked folded in the same transaction.
        for p in pending {
            apply_event(ruleset, &mut root.state, &parse_stored_event(&p.body)?);
            writes.push(self.fold_mark(space_id, &p.message_id, root_id)?);
            root.recent.push(p.message_id.clone());
            folded.events += 1;
        }
        let excess = root.recent.len().saturating_sub(RECENT);
        root.recent.drain(..excess);

        // 4. Recompute as of the profile's clock.
        let now = now_millis().max(root.clock).max(as_of);
        let traits: Traits = if ruleset.reads_custom_traits() {
            serde_json::from_str(get_s(&tree.root, "traits")?)?
        } else {
            Traits::new()
        };
        let values = std::mem::take(&mut root.values);
        let Recomputed {
            values,
            changes,
            due,
        } = recompute(ruleset, &mut root.state, values, &traits, now);
        if !changes.is_empty() {
            writes.push(self.change_put(space_id, root_id, read_version + 1, now, &changes)?);
            folded.changes = changes.len();
        }
        // 5. The member lists, as far as the transaction has room (the
        // state keeps the rest, written by the next transaction on it).
        todo.extend(members::todos(root_id, &listed, &values));
        let room = MAX_TRANSACTION_ITEMS.saturating_sub(writes.len() + 2);
        let (mut lists, rest) = self.member_actions(
            space_id,
            members::coalesce(todo),
            room,
            DynamoStore::counter_shard(root_id),
        )?;
        folded.members_left = rest.len();
        root.todo = rest;
        let mut state_writes = self.state_writes(space_id, &root, &values, due, now)?;
        state_writes.append(&mut writes);
        state_writes.append(&mut lists);
        let writes = state_writes;
        if writes.len() > MAX_TRANSACTION_ITEMS {
            return Err(StoreError::Internal(format!(
                "folding this profile needs {} writes in one transaction; DynamoDB allows {MAX_TRANSACTION_ITEMS}",
                writes.len()
            )));
        }
        self.transact(writes).await?;
        Ok(folded)
    }

    /// The tree's stored states, strongly consistent: the root's (a fresh
    /// one if it has none yet) and those of the profiles merged into it.
    async fn read_states(
        &self,
        space_id: &str,
        tree: &Resolved,
    ) -> Result<(StateItem, Vec<StateItem>)> {
        let root_id = &tree.tree[0];
        let keys = tree
            .tree
            .iter()
            .map(|p| key(state_key(space_id, p), META))
            .collect();
        let mut root = None;
        let mut children = Vec::new();
        for item in self.batch_get(keys, true).await? {
            let st = state_of(&item)?;
            if &st.profile_id == root_id {
                root = Some(st);
            } else {
                children.push(st);
            }
        }
        let root = root.unwrap_or(StateItem {
            profile_id: root_id.clone(),
            version: 0,
            state: ProfileState::default(),
            values: ComputedValues::new(),
            clock: 0,
            recent: Vec::new(),
            due: None,
            indexed: true,
            todo: Vec::new(),
        });
        Ok((root, children))
    }

    /// Deletes a merged profile's state (at the version read) and its due entry.
    fn child_deletes(&self, space_id: &str, child: &StateItem) -> Result<Vec<TransactWriteItem>> {
        let delete = Delete::builder()
            .table_name(&self.table)
            .set_key(Some(key(state_key(space_id, &child.profile_id), META)))
            .condition_expression("version = :v")
            .expression_attribute_values(":v", n(child.version))
            .build()
            .map_err(service)?;
        let mut writes = vec![TransactWriteItem::builder().delete(delete).build()];
        if child.due.is_some() {
            writes.push(self.delete_due(space_id, &child.profile_id)?);
        }
        Ok(writes)
    }

    /// Marks an event folded into `root_id` (once: a redelivery finds the mark).
    fn fold_mark(
        &self,
        space_id: &str,
        message_id: &str,
        root_id: &str,
    ) -> Result<TransactWriteItem> {
        let update = Update::builder()
            .table_name(&self.table)
            .set_key(Some(key(event_key(space_id, message_id), META)))
            .update_expression("SET cmp = :root")
            .condition_expression("attribute_exists(pk) AND attribute_not_exists(cmp)")
            .expression_attribute_values(":root", s(root_id))
            .build()
            .map_err(service)?;
        Ok(TransactWriteItem::builder().update(update).build())
    }

    /// The root's new state item, conditioned on the version read (first),
    /// and its due entry when the due time moves.
    fn state_writes(
        &self,
        space_id: &str,
        root: &StateItem,
        values: &ComputedValues,
        due: Option<Millis>,
        now: Millis,
    ) -> Result<Vec<TransactWriteItem>> {
        let root_id = &root.profile_id;
        let read_version = root.version;
        let mut item = key(state_key(space_id, root_id), META);
        item.insert("profile_id".into(), s(root_id));
        item.insert("version".into(), n(read_version + 1));
        item.insert("state".into(), pack(&root.state, &root.recent)?);
        item.insert("computed".into(), s(serde_json::to_string(values)?));
        item.insert("clock".into(), n(now));
        if let Some(due) = due {
            item.insert("due".into(), n(due));
        }
        item.insert("mx".into(), AttributeValue::Bool(true));
        if !root.todo.is_empty() {
            item.insert("mq".into(), s(serde_json::to_string(&root.todo)?));
        }
        let mut writes = vec![versioned_put(&self.table, item, read_version)?];
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
        Ok(writes)
    }

    /// The change log entry of one fold, ordered by when it is written
    /// (the compute clock may run ahead of it, after a lookback run in the
    /// future).
    fn change_put(
        &self,
        space_id: &str,
        root_id: &str,
        version: i64,
        now: Millis,
        changes: &[Change],
    ) -> Result<TransactWriteItem> {
        let base = change_base(now_millis(), root_id, version);
        let mut item = key(changes_key(space_id), &change_sort(base));
        item.insert("profile_id".into(), s(root_id));
        item.insert("at".into(), n(now));
        item.insert("changes".into(), s(serde_json::to_string(changes)?));
        transact_put(&self.table, item, Some("attribute_not_exists(pk)"))
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
                crate::dynamo::backoff(attempt, 8).await;
            }
        }
        Ok(())
    }

    pub(super) fn delete_due(&self, space_id: &str, profile_id: &str) -> Result<TransactWriteItem> {
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
    pub(super) async fn folded_history(
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
