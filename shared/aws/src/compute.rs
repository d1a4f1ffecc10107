//! The compute step on AWS: the `compute` function's handling of the
//! compute queue, the `expiry` function's sweep, and the definitions and
//! change-log port ([`DynamoComputations`]) the `profile-api` function
//! serves. The rules are the domain's; the fold is the store's.

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;
use kindred_domain::compute::Class;
use kindred_domain::Millis;
use kindred_store::ports::{ChangeRecord, Computations, ComputedValue, DefinitionRecord};
use kindred_store::{now_millis, Result, StoreError};
use serde_json::Value;
use tracing::{info, warn};

use crate::dynamo::compute::{ComputeMessage, Folded, Pending};
use crate::dynamo::profiles::Resolved;
use crate::dynamo::{get_s, opt_s};
use crate::{DynamoStore, SqsQueue};

/// Re-reads and retries of one profile's fold after losing a race.
const FOLD_ATTEMPTS: u32 = 8;

/// Definitions, the change log and the lookback sweep on DynamoDB; new
/// work (backfills, recomputes) goes to the compute queue.
pub struct DynamoComputations {
    pub store: Arc<DynamoStore>,
    pub queue: Arc<SqsQueue>,
    /// The sync queue, told when an account pass logs changes (none where
    /// destinations are not deployed).
    pub sync: Option<Arc<SqsQueue>>,
}

impl DynamoComputations {
    /// Starts (or restarts) the backfill pass of the set version written.
    async fn start_backfill(&self, space_id: &str, set_version: i64) -> Result<()> {
        self.queue
            .send_json(&[ComputeMessage::Backfill {
                space_id: space_id.to_string(),
                set_version,
                start: None,
            }])
            .await
    }
}

#[async_trait]
impl Computations for DynamoComputations {
    async fn members(
        &self,
        space_id: &str,
        class: Class,
        key: &str,
        after: &str,
        limit: usize,
    ) -> Result<Vec<(String, ComputedValue)>> {
        self.store.members(space_id, class, key, after, limit).await
    }

    async fn sizes(&self, space_id: &str) -> Result<BTreeMap<String, u64>> {
        self.store.member_counts(space_id).await
    }

    async fn put_definition(
        &self,
        space_id: &str,
        class: Class,
        key: &str,
        body: &Value,
    ) -> Result<DefinitionRecord> {
        let (record, set_version) = self
            .store
            .write_definition(space_id, class, key, Some(body), false)
            .await?;
        self.start_backfill(space_id, set_version).await?;
        record.ok_or(StoreError::Invariant(
            "a definition just written is missing",
        ))
    }

    async fn definition(
        &self,
        space_id: &str,
        class: Class,
        key: &str,
    ) -> Result<Option<DefinitionRecord>> {
        Ok(self
            .store
            .definition_set(space_id)
            .await?
            .records
            .into_iter()
            .find(|r| r.key == key && r.class == class))
    }

    async fn definitions(&self, space_id: &str, class: Class) -> Result<Vec<DefinitionRecord>> {
        let mut records: Vec<DefinitionRecord> = self
            .store
            .definition_set(space_id)
            .await?
            .records
            .into_iter()
            .filter(|r| r.class == class)
            .collect();
        records.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(records)
    }

    async fn delete_definition(&self, space_id: &str, class: Class, key: &str) -> Result<bool> {
        match self
            .store
            .write_definition(space_id, class, key, None, false)
            .await
        {
            Ok((_, set_version)) => {
                // Definitions still backfilling continue in a new pass.
                self.start_backfill(space_id, set_version).await?;
                Ok(true)
            }
            Err(StoreError::NotFound) => Ok(false),
            Err(e) => Err(e),
        }
    }

    async fn rebackfill(
        &self,
        space_id: &str,
        class: Class,
        key: &str,
    ) -> Result<Option<DefinitionRecord>> {
        let Some(current) = self.definition(space_id, class, key).await? else {
            return Ok(None);
        };
        let (record, set_version) = self
            .store
            .write_definition(space_id, class, key, Some(&current.body), true)
            .await?;
        self.start_backfill(space_id, set_version).await?;
        Ok(record)
    }

    async fn changes(&self, space_id: &str, since: i64, limit: usize) -> Result<Vec<ChangeRecord>> {
        self.store.read_changes(space_id, since, limit).await
    }

    async fn run_lookback(&self, space_id: &str, as_of: Millis) -> Result<u64> {
        if self
            .store
            .get(crate::dynamo::space_key(space_id), false)
            .await?
            .is_none()
        {
            return Err(StoreError::NotFound);
        }
        sweep_space(&self.store, &self.queue, space_id, as_of).await
    }

    async fn account_ids(&self, space_id: &str, after: &str, limit: usize) -> Result<Vec<String>> {
        self.store.account_ids(space_id, after, limit).await
    }

    async fn account_values(
        &self,
        space_id: &str,
        group_id: &str,
    ) -> Result<(kindred_store::ComputedValues, i64)> {
        self.store.account_values(space_id, group_id).await
    }

    async fn write_account_values(
        &self,
        space_id: &str,
        group_id: &str,
        version: i64,
        values: &kindred_store::ComputedValues,
        changes: &[kindred_domain::compute::Change],
        at: Millis,
    ) -> Result<bool> {
        let written = self
            .store
            .write_account_values(space_id, group_id, version, values, changes, at)
            .await?;
        if let (true, false, Some(sync)) = (written, changes.is_empty(), &self.sync) {
            let tick = crate::sync::SyncMessage::Changes {
                space_id: space_id.to_string(),
            };
            sync.send_delayed(&tick, crate::sync::CHANGES_DELAY_SECS)
                .await?;
        }
        Ok(written)
    }
}

/// Sends a recompute of every profile of the space whose next change has
/// come by `as_of` to the compute queue; returns how many.
pub async fn sweep_space(
    store: &DynamoStore,
    queue: &SqsQueue,
    space_id: &str,
    as_of: Millis,
) -> Result<u64> {
    let due = store.due_profiles(space_id, as_of).await?;
    let messages: Vec<ComputeMessage> = due
        .into_iter()
        .map(|profile_id| ComputeMessage::Recompute {
            space_id: space_id.to_string(),
            profile_id,
            as_of,
            backfill: None,
        })
        .collect();
    queue.send_json(&messages).await?;
    Ok(messages.len() as u64)
}

/// The expiry function's work: sweeps every space that has definitions.
pub async fn sweep_all(store: &DynamoStore, queue: &SqsQueue, as_of: Millis) -> Result<u64> {
    let mut total = 0;
    for space_id in store.definition_spaces().await? {
        let n = sweep_space(store, queue, &space_id, as_of).await?;
        info!(space_id, due = n, "lookback sweep");
        total += n;
    }
    Ok(total)
}

/// Profiles to fold, by the profile a message named.
#[derive(Default)]
struct Work {
    sqs_ids: Vec<String>,
    pending: Vec<Pending>,
    as_of: Millis,
    backfill: Vec<(i64, Vec<(String, u64)>)>,
}

/// Handles one batch of compute-queue messages (`(sqs message id,
/// body)`); returns the SQS ids of the messages to retry. Messages of
/// one profile are folded together; each profile succeeds or fails alone.
///
/// `sync`: the sync queue, told (delayed past the change log's settle
/// window) about every space whose log may have grown: where a profile
/// changed, and where an event had been folded before (a retry of a batch
/// whose first run may have stopped before telling it).
pub async fn handle(
    store: &DynamoStore,
    queue: &SqsQueue,
    sync: Option<&SqsQueue>,
    messages: Vec<(String, String)>,
) -> Vec<String> {
    let mut failed = Vec::new();
    let mut by_space: BTreeMap<String, Vec<(String, ComputeMessage)>> = BTreeMap::new();
    for (sqs_id, body) in messages {
        match serde_json::from_str::<ComputeMessage>(&body) {
            Ok(m) => {
                let space = match &m {
                    ComputeMessage::Event { space_id, .. }
                    | ComputeMessage::Recompute { space_id, .. }
                    | ComputeMessage::Backfill { space_id, .. } => space_id.clone(),
                };
                by_space.entry(space).or_default().push((sqs_id, m));
            }
            Err(e) => {
                warn!(sqs_message_id = %sqs_id, error = %e, "not a compute message");
                failed.push(sqs_id);
            }
        }
    }
    for (space_id, messages) in by_space {
        failed.extend(handle_space(store, queue, sync, &space_id, messages).await);
    }
    failed
}

async fn handle_space(
    store: &DynamoStore,
    queue: &SqsQueue,
    sync: Option<&SqsQueue>,
    space_id: &str,
    messages: Vec<(String, ComputeMessage)>,
) -> Vec<String> {
    let all_ids = || {
        messages
            .iter()
            .map(|(id, _)| id.clone())
            .collect::<Vec<_>>()
    };
    let set = match store.definition_set(space_id).await {
        Ok(set) => set,
        Err(e) => {
            warn!(space_id, error = %e, "definitions not readable; the batch will be retried");
            return all_ids();
        }
    };
    let ruleset = match set.ruleset() {
        Ok(r) => r,
        Err(e) => {
            warn!(space_id, error = %e, "stored definitions do not validate");
            return all_ids();
        }
    };
    let all = all_ids();
    let mut failed = Vec::new();
    let (work, events) = sort_messages(store, queue, space_id, messages, &mut failed).await;
    let (work, folded_before) =
        with_pending_events(store, space_id, work, events, &mut failed).await;
    let roots = by_root(store, space_id, work, &mut failed).await;
    let changed = fold_roots(store, &ruleset, space_id, roots, &mut failed).await;
    if let (Some(sync), true) = (sync, folded_before || changed) {
        let tick = crate::sync::SyncMessage::Changes {
            space_id: space_id.to_string(),
        };
        if let Err(e) = sync
            .send_delayed(&tick, crate::sync::CHANGES_DELAY_SECS)
            .await
        {
            warn!(space_id, error = %e, "the sync step was not told; the batch will be retried");
            return all;
        }
    }
    failed
}

/// Recompute requests by profile and event messages as they came; runs
/// backfill pages at once (a failed one is added to `failed`).
async fn sort_messages(
    store: &DynamoStore,
    queue: &SqsQueue,
    space_id: &str,
    messages: Vec<(String, ComputeMessage)>,
    failed: &mut Vec<String>,
) -> (BTreeMap<String, Work>, Vec<(String, String)>) {
    let mut work: BTreeMap<String, Work> = BTreeMap::new();
    let mut events: Vec<(String, String)> = Vec::new();
    for (sqs_id, m) in messages {
        match m {
            ComputeMessage::Event { message_id, .. } => events.push((sqs_id, message_id)),
            ComputeMessage::Recompute {
                profile_id,
                as_of,
                backfill,
                ..
            } => {
                let w = work.entry(profile_id).or_default();
                w.sqs_ids.push(sqs_id);
                w.as_of = w.as_of.max(as_of);
                w.backfill.extend(backfill);
            }
            ComputeMessage::Backfill {
                set_version, start, ..
            } => {
                if let Err(e) = backfill_page(store, queue, space_id, set_version, start).await {
                    warn!(space_id, error = %e, "backfill page failed; it will be retried");
                    failed.push(sqs_id);
                }
            }
        }
    }
    (work, events)
}

/// Adds the events not folded yet to the work of the profile they were
/// recorded on; also answers whether some event had been folded before
/// (a redelivery: its changes may not have been announced).
async fn with_pending_events(
    store: &DynamoStore,
    space_id: &str,
    mut work: BTreeMap<String, Work>,
    events: Vec<(String, String)>,
    failed: &mut Vec<String>,
) -> (BTreeMap<String, Work>, bool) {
    let mut folded_before = false;
    let ids: Vec<String> = events.iter().map(|(_, m)| m.clone()).collect();
    let items = match store.event_items(space_id, &ids).await {
        Ok(items) => items,
        Err(e) => {
            warn!(space_id, error = %e, "events not readable; they will be retried");
            failed.extend(events.into_iter().map(|(sqs_id, _)| sqs_id));
            return (work, false);
        }
    };
    for (sqs_id, message_id) in events {
        let item = items
            .iter()
            .find(|i| opt_s(i, "message_id") == Some(message_id.as_str()));
        let Some(item) = item else {
            // Expired or never recorded: nothing to fold.
            continue;
        };
        let (Some(profile_id), false) = (opt_s(item, "profile_id"), item.contains_key("cmp"))
        else {
            // Attached to no profile, or folded already.
            folded_before |= item.contains_key("cmp");
            continue;
        };
        let Ok(body) = get_s(item, "body") else {
            failed.push(sqs_id);
            continue;
        };
        let w = work.entry(profile_id.to_string()).or_default();
        w.sqs_ids.push(sqs_id);
        w.pending.push(Pending {
            message_id,
            body: body.to_string(),
        });
    }
    (work, folded_before)
}

/// The work grouped by root profile, with the tree read (it serves the
/// first fold attempt).
async fn by_root(
    store: &DynamoStore,
    space_id: &str,
    work: BTreeMap<String, Work>,
    failed: &mut Vec<String>,
) -> BTreeMap<String, (Work, Option<Resolved>)> {
    let mut roots: BTreeMap<String, (Work, Option<Resolved>)> = BTreeMap::new();
    for (profile_id, w) in work {
        match store.resolve(space_id, profile_id, true).await {
            Ok(Some(tree)) => {
                let (root, resolved) = roots.entry(tree.tree[0].clone()).or_default();
                *resolved = Some(tree);
                root.sqs_ids.extend(w.sqs_ids);
                root.pending.extend(w.pending);
                root.as_of = root.as_of.max(w.as_of);
                root.backfill.extend(w.backfill);
            }
            Ok(None) => {}
            Err(e) => {
                warn!(space_id, error = %e, "profile not readable; it will be retried");
                failed.extend(w.sqs_ids);
            }
        }
    }
    roots
}

/// Folds each root; answers whether some fold logged a change.
async fn fold_roots(
    store: &DynamoStore,
    ruleset: &kindred_domain::compute::Ruleset,
    space_id: &str,
    roots: BTreeMap<String, (Work, Option<Resolved>)>,
    failed: &mut Vec<String>,
) -> bool {
    let mut changed = false;
    for (root, (w, tree)) in roots {
        match fold_root(store, ruleset, space_id, &root, &w, tree).await {
            Ok(folded) => {
                info!(
                    space_id,
                    profile_id = %root,
                    events = folded.events,
                    absorbed = folded.absorbed,
                    rebuilt = folded.rebuilt,
                    changes = folded.changes,
                    "profile recomputed"
                );
                changed |= folded.changes > 0;
                for (pass, defs) in &w.backfill {
                    if let Err(e) = store
                        .backfill_progress(space_id, *pass, defs, 1, None)
                        .await
                    {
                        warn!(space_id, error = %e, "backfill progress not recorded");
                    }
                }
            }
            Err(e) => {
                warn!(space_id, profile_id = %root, error = %e, "profile not recomputed; it will be retried");
                failed.extend(w.sqs_ids);
            }
        }
    }
    changed
}

/// Folds one root's work, re-reading after a lost race: events another
/// worker folded meanwhile are dropped.
async fn fold_root(
    store: &DynamoStore,
    ruleset: &kindred_domain::compute::Ruleset,
    space_id: &str,
    root: &str,
    work: &Work,
    mut tree: Option<Resolved>,
) -> Result<Folded> {
    let mut pending: Vec<&Pending> = work.pending.iter().collect();
    let mut total = Folded::default();
    let mut attempt = 0;
    while attempt < FOLD_ATTEMPTS {
        if attempt > 0 {
            crate::retry::jitter(10, attempt, 6).await;
            let ids: Vec<String> = pending.iter().map(|p| p.message_id.clone()).collect();
            let items = store.event_items(space_id, &ids).await?;
            pending.retain(|p| {
                items.iter().any(|i| {
                    opt_s(i, "message_id") == Some(p.message_id.as_str()) && !i.contains_key("cmp")
                })
            });
        }
        // After a lost race the tree may have grown (or the root been
        // merged away): read it again.
        let tree = match tree.take() {
            Some(tree) => tree,
            None => match store.resolve(space_id, root.to_string(), true).await? {
                Some(tree) => tree,
                None => return Ok(total),
            },
        };
        match store
            .fold(space_id, ruleset, &tree, &pending, work.as_of)
            .await
        {
            Err(StoreError::Conflict) => attempt += 1,
            Err(e) => return Err(e),
            Ok(folded) => {
                total.events += folded.events;
                total.absorbed += folded.absorbed;
                total.rebuilt += folded.rebuilt;
                total.changes += folded.changes;
                total.members_left = folded.members_left;
                if folded.members_left == 0 {
                    return Ok(total);
                }
                // Member-list writes that did not fit: another
                // transaction on the state (its events are folded).
                pending.clear();
                attempt = 0;
            }
        }
    }
    Err(StoreError::Conflict)
}

/// Reads one stretch of the space's root profiles for a backfill pass and
/// sends their recomputes and the pass's continuation.
async fn backfill_page(
    store: &DynamoStore,
    queue: &SqsQueue,
    space_id: &str,
    set_version: i64,
    start: Option<BTreeMap<String, String>>,
) -> Result<()> {
    let set = store.definition_set(space_id).await?;
    let defs = set.backfilling();
    if set.version != set_version || defs.is_empty() {
        // A newer pass (or none) covers the definitions still backfilling.
        return Ok(());
    }
    let from = start
        .as_ref()
        .map(serde_json::to_string)
        .transpose()?
        .unwrap_or_default();
    let (roots, next) = store
        .root_profiles(space_id, start, crate::dynamo::compute::BACKFILL_ROOTS)
        .await?;
    let as_of = now_millis();
    let recomputes: Vec<ComputeMessage> = roots
        .iter()
        .map(|profile_id| ComputeMessage::Recompute {
            space_id: space_id.to_string(),
            profile_id: profile_id.clone(),
            as_of,
            backfill: Some((set_version, defs.clone())),
        })
        .collect();
    queue.send_json(&recomputes).await?;
    let to = next
        .as_ref()
        .map(serde_json::to_string)
        .transpose()?
        .unwrap_or_else(|| "end".into());
    store
        .backfill_progress(
            space_id,
            set_version,
            &defs,
            roots.len() as u64,
            Some((&from, &to, next.is_none())),
        )
        .await?;
    if let Some(next) = next {
        queue
            .send_json(&[ComputeMessage::Backfill {
                space_id: space_id.to_string(),
                set_version,
                start: Some(next),
            }])
            .await?;
    }
    Ok(())
}
