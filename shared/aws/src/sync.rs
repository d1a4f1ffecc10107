//! The sync step on AWS: the `sync` function's handling of the sync
//! queue, and the Destinations port the `profile-api` function serves
//! ([`DynamoDestinations`], which wakes the sync step on every write).
//!
//! - `changes`: the compute function sends one per space it changed,
//!   delayed past the change log's settle window. The handler takes the
//!   space's fan-out lease, runs pending initial syncs, turns the changes
//!   after the space's cursor into calls in each destination's outbox,
//!   moves the cursor and wakes the destinations that got calls.
//! - `merge`: the identity function sends one per merging event;
//!   destinations with `alias_on_merge` get an `alias`.
//! - `deliver`: drains one destination's outbox under its delivery lease
//!   (so its calls stay in order), with the same worker as `kindred
//!   serve`. A failed request re-sends `deliver` delayed by the backoff:
//!   a failing destination waits alone.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use kindred_domain::event::format_millis;
use kindred_domain::resolve::IdentifierEntry;
use kindred_domain::sync::{alias_call, change_calls, ChangeEntry, Settings};
use kindred_domain::Identifier;
use kindred_store::ports::{ProfileLookup, ProfileParts, Profiles};
use kindred_store::token::random_base62;
use kindred_store::{
    account_current_calls, current_calls, current_calls_to, now_millis, DeadLetter,
    DestinationRecord, DestinationStatus, Destinations, Outbox, Result, User,
};
use kindred_sync::{Deliverer, Step};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tracing::{info, warn};

use crate::dynamo::{opt_s, DeliveryLease, DestinationState};
use crate::{DynamoStore, SqsQueue};

/// How long a fan-out or a delivery run may hold its lease.
const LEASE_MS: i64 = 120_000;
/// How long one `deliver` message drains before handing over to the next.
const DELIVER_BUDGET: Duration = Duration::from_secs(20);
/// Changes fanned out per `changes` message.
const CHANGES_PER_MESSAGE: usize = 1_000;
/// Root profiles one sync message reads for a destination's initial sync.
pub const INITIAL_SYNC_ROOTS: usize = 500;
/// How long the compute function delays its `changes` message: past the
/// change log's settle window, so that the changes are readable.
pub const CHANGES_DELAY_SECS: u32 = 6;

/// A message on the sync queue.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SyncMessage {
    Changes {
        space_id: String,
    },
    /// The event `message_id` merged profiles into `profile_id` (empty:
    /// the profile the event was recorded on, for a redelivered event
    /// that may have merged).
    Merge {
        space_id: String,
        profile_id: String,
        message_id: String,
    },
    /// An existing profile gained identifiers new to Kindred (at `at`):
    /// destinations that sync their types get its current values.
    Identified {
        space_id: String,
        profile_id: String,
        identifiers: Vec<Identifier>,
        at: i64,
    },
    Deliver {
        space_id: String,
        destination_id: String,
    },
    /// Runs (a slice of) a regulation ([`crate::privacy`]).
    Regulation {
        space_id: String,
        regulation_id: String,
    },
}

/// What the sync step works with.
pub struct SyncStep {
    pub store: Arc<DynamoStore>,
    pub queue: Arc<SqsQueue>,
    pub deliverer: Arc<Deliverer>,
    /// How long a regulation's delete waits after its suppression
    /// ([`crate::privacy::SETTLE`]).
    pub regulation_settle: Duration,
    /// Root profiles one sync message reads for a destination's initial
    /// sync ([`INITIAL_SYNC_ROOTS`]).
    pub initial_sync_roots: usize,
}

/// A profile's root and the root's identifiers (its whole tree's).
async fn root_ids(
    store: &DynamoStore,
    space_id: &str,
    profile_id: &str,
) -> Result<Option<(String, Vec<IdentifierEntry>)>> {
    let parts = ProfileParts {
        external_ids: true,
        ..ProfileParts::default()
    };
    let doc = store
        .profile(
            space_id,
            &ProfileLookup::ProfileId(profile_id.to_string()),
            parts,
        )
        .await?;
    Ok(doc.map(|d| {
        let ids = d
            .external_ids
            .into_iter()
            .map(|e| IdentifierEntry {
                id: e.id,
                added_at: e.created_at,
            })
            .collect();
        (d.profile_id, ids)
    }))
}

impl SyncStep {
    /// Handles one batch (`(sqs message id, body)`); returns the ids of the
    /// messages to retry.
    pub async fn handle(&self, messages: Vec<(String, String)>) -> Vec<String> {
        let mut failed = Vec::new();
        for (sqs_id, body) in messages {
            let result = match serde_json::from_str::<SyncMessage>(&body) {
                Ok(SyncMessage::Changes { space_id }) => self.fan_out(&space_id).await,
                Ok(SyncMessage::Merge {
                    space_id,
                    profile_id,
                    message_id,
                }) => self.merge(&space_id, &profile_id, &message_id).await,
                Ok(SyncMessage::Identified {
                    space_id,
                    profile_id,
                    identifiers,
                    at,
                }) => {
                    self.identified(&space_id, &profile_id, &identifiers, at)
                        .await
                }
                Ok(SyncMessage::Deliver {
                    space_id,
                    destination_id,
                }) => self.deliver(&space_id, &destination_id).await,
                Ok(SyncMessage::Regulation {
                    space_id,
                    regulation_id,
                }) => {
                    crate::privacy::run_regulation(
                        &self.store,
                        &self.queue,
                        &space_id,
                        &regulation_id,
                        self.regulation_settle,
                    )
                    .await
                }
                Err(e) => {
                    warn!(sqs_message_id = %sqs_id, error = %e, "not a sync message");
                    failed.push(sqs_id);
                    continue;
                }
            };
            if let Err(e) = result {
                warn!(sqs_message_id = %sqs_id, error = %e, "sync step failed; SQS will redeliver it");
                failed.push(sqs_id);
            }
        }
        failed
    }

    async fn wake(&self, space_id: &str, destination_id: &str, delay_secs: u32) -> Result<()> {
        self.queue
            .send_delayed(
                &SyncMessage::Deliver {
                    space_id: space_id.to_string(),
                    destination_id: destination_id.to_string(),
                },
                delay_secs,
            )
            .await
    }

    /// Initial syncs, then the changes after the space's cursor.
    async fn fan_out(&self, space_id: &str) -> Result<()> {
        let me = random_base62(16);
        let Some(cursor) = self
            .store
            .take_sync_lease(space_id, &me, now_millis() + LEASE_MS)
            .await?
        else {
            // Another run has the space; look again after it.
            return self
                .queue
                .send_delayed(
                    &SyncMessage::Changes {
                        space_id: space_id.to_string(),
                    },
                    2,
                )
                .await;
        };
        let mut dests = self.store.destination_items(space_id).await?;
        let mut woken: Vec<String> = Vec::new();
        let mut more = false;
        for d in dests.iter_mut() {
            if d.record.initial_sync_pending && d.record.settings.enabled {
                match self.initial_sync(space_id, d).await? {
                    Some((horizon, done)) => {
                        if let Some(horizon) = horizon {
                            d.since_change = horizon;
                        }
                        d.record.initial_sync_pending = !done;
                        more |= !done;
                        d.synced = true;
                    }
                    // Not recorded (the destination changed meanwhile):
                    // the next run reads it again.
                    None => more = true,
                }
                woken.push(d.record.destination_id.clone());
            }
        }
        let changes = self
            .store
            .read_changes(space_id, cursor, CHANGES_PER_MESSAGE)
            .await?;
        let mut queued: BTreeMap<String, Vec<(String, Value)>> = BTreeMap::new();
        let mut ids: BTreeMap<String, Option<(String, Vec<IdentifierEntry>)>> = BTreeMap::new();
        for c in &changes {
            let at = format_millis(c.at);
            let change = ChangeEntry {
                seq: Some(c.seq),
                key: &c.key,
                class: c.class,
                new: &c.new,
                at: &at,
                group_id: c.group_id.as_deref(),
            };
            let receivers: Vec<_> = dests
                .iter()
                .filter(|state| {
                    (state.position()).receives_change(&state.record.settings, c.seq, &c.key)
                })
                .collect();
            if receivers.is_empty() {
                continue;
            }
            // A user's change goes to the user; an account's to each of
            // its users (as linked now, each root once).
            let roots = match &c.group_id {
                None => {
                    if !ids.contains_key(&c.profile_id) {
                        let found = root_ids(&self.store, space_id, &c.profile_id).await?;
                        ids.insert(c.profile_id.clone(), found);
                    }
                    ids.get(&c.profile_id)
                        .cloned()
                        .flatten()
                        .into_iter()
                        .collect()
                }
                Some(g) => self.account_roots(space_id, g).await?,
            };
            for state in receivers {
                let d = &state.record;
                for (root, root_ids) in &roots {
                    let calls = change_calls(
                        space_id,
                        &d.destination_id,
                        &d.settings,
                        root,
                        root_ids,
                        &change,
                    );
                    queued
                        .entry(d.destination_id.clone())
                        .or_default()
                        .extend(calls.into_iter().map(|call| (root.clone(), call)));
                }
            }
        }
        for (destination_id, calls) in queued {
            if !calls.is_empty() {
                self.store.enqueue(space_id, &destination_id, calls).await?;
                woken.push(destination_id);
            }
        }
        let next = changes.last().map_or(cursor, |c| c.seq);
        if !self.store.release_sync_lease(space_id, &me, next).await? {
            warn!(space_id, "the fan-out lease expired before the run ended");
        }
        woken.sort();
        woken.dedup();
        for d in &woken {
            self.wake(space_id, d, 0).await?;
        }
        if more || changes.len() >= CHANGES_PER_MESSAGE {
            self.queue
                .send_json(&[SyncMessage::Changes {
                    space_id: space_id.to_string(),
                }])
                .await?;
        }
        info!(
            space_id,
            changes = changes.len(),
            destinations = woken.len(),
            "fanned out"
        );
        Ok(())
    }

    /// The current values of every account of the space with values, to
    /// each of its users, for an initial sync.
    async fn account_values_calls(
        &self,
        space_id: &str,
        state: &DestinationState,
        now: &str,
        calls: &mut Vec<(String, Value)>,
    ) -> Result<()> {
        let d = &state.record;
        let mut after = String::new();
        loop {
            let page = self.store.account_ids(space_id, &after, 500).await?;
            for group_id in &page {
                let (mut values, _) = self.store.account_values(space_id, group_id).await?;
                if let Some(keys) = &state.initial_keys {
                    values.retain(|k, _| keys.contains(k));
                }
                if values.is_empty() {
                    continue;
                }
                let users = self.account_roots(space_id, group_id).await?;
                let users: Vec<User<'_>> = (users.iter())
                    .map(|(root, ids)| User { root, ids })
                    .collect();
                calls.extend(account_current_calls(
                    space_id,
                    &d.destination_id,
                    &d.settings,
                    group_id,
                    &users,
                    &values,
                    now,
                ));
            }
            match page.last() {
                Some(last) if page.len() == 500 => after = last.clone(),
                _ => return Ok(()),
            }
        }
    }

    /// The root profiles (each once) of an account's linked users, with
    /// their identifiers.
    async fn account_roots(
        &self,
        space_id: &str,
        group_id: &str,
    ) -> Result<Vec<(String, Vec<IdentifierEntry>)>> {
        let linked = (self.store.account(space_id, group_id).await?)
            .map(|doc| doc.users)
            .unwrap_or_default();
        let mut roots: Vec<(String, Vec<IdentifierEntry>)> = Vec::new();
        for profile_id in &linked {
            if let Some(found) = root_ids(&self.store, space_id, profile_id).await? {
                if !roots.iter().any(|(r, _)| *r == found.0) {
                    roots.push(found);
                }
            }
        }
        Ok(roots)
    }

    /// Queues the current values of one stretch of the space's root
    /// profiles for a destination's pending initial sync (a large space
    /// takes several messages, each going on where the last stopped);
    /// returns the change-log position a first pass covers (changes after
    /// it are sent as changes) and whether the pass is done, or `None` if
    /// the destination changed meanwhile and the stretch was not recorded
    /// (its next run reads it again). A change
    /// written while the states are read may reach the destination both
    /// as a current value and as a change.
    async fn initial_sync(
        &self,
        space_id: &str,
        state: &DestinationState,
    ) -> Result<Option<(Option<i64>, bool)>> {
        let d = &state.record;
        // The first stretch's start. A change stamped before it is taken
        // as read by the pass (sending it again would announce an entry
        // twice); one whose transaction commits after the pass read its
        // profile is the (rare) exception and is missed, and one stamped
        // after it but read by the pass arrives twice. See README, "Not
        // built yet".
        let horizon = state
            .position()
            .horizon_after_pass(now_millis() * 1_000_000 - 1);
        let now = format_millis(now_millis());
        let from = state.initial_cursor.clone();
        let (states, next) = self
            .store
            .root_states(space_id, from.clone(), self.initial_sync_roots)
            .await?;
        let mut calls: Vec<(String, Value)> = Vec::new();
        for (profile_id, mut values) in states {
            if let Some(keys) = &state.initial_keys {
                values.retain(|k, _| keys.contains(k));
            }
            let Some((root, ids)) = root_ids(&self.store, space_id, &profile_id).await? else {
                continue;
            };
            let current = current_calls(
                space_id,
                &d.destination_id,
                &d.settings,
                &root,
                &ids,
                &values,
                &now,
            );
            calls.extend(current.into_iter().map(|call| (root.clone(), call)));
        }
        let done = next.is_none();
        if done {
            // The last stretch sends the accounts' values too.
            self.account_values_calls(space_id, state, &now, &mut calls)
                .await?;
        }
        let n = calls.len();
        self.store
            .enqueue(space_id, &d.destination_id, calls)
            .await?;
        let recorded = self
            .store
            .initial_sync_progress(
                space_id,
                &d.destination_id,
                d.version,
                from.as_ref(),
                next.as_ref(),
                horizon,
            )
            .await?;
        info!(space_id, destination_id = %d.destination_id, calls = n, done, recorded, "initial sync queued");
        Ok(recorded.then_some((horizon, done)))
    }

    async fn merge(&self, space_id: &str, parent: &str, message_id: &str) -> Result<()> {
        let dests: Vec<DestinationRecord> = self
            .store
            .destination_items(space_id)
            .await?
            .into_iter()
            .filter(|d| d.position().receives_alias(&d.record.settings))
            .map(|d| d.record)
            .collect();
        if dests.is_empty() {
            return Ok(());
        }
        // A redelivered duplicate names no profile: the event's own.
        let parent: String = if parent.is_empty() {
            let event = self
                .store
                .event_items(space_id, &[message_id.to_string()])
                .await?;
            match event.first().and_then(|e| opt_s(e, "profile_id")) {
                Some(p) => p.to_string(),
                None => return Ok(()),
            }
        } else {
            parent.to_string()
        };
        let parent = parent.as_str();
        let merges = self.store.merged_by(space_id, parent, message_id).await?;
        if merges.is_empty() {
            return Ok(());
        }
        let Some((_, parent_ids)) = root_ids(&self.store, space_id, parent).await? else {
            return Ok(());
        };
        for (child, at) in merges {
            let child_ids = self.store.own_identifiers(space_id, &child).await?;
            // A stable number per merge, for the alias's messageId.
            let seq = crate::dynamo::event_seq(&format!("{message_id}#{child}"));
            for d in &dests {
                if let Some(call) = alias_call(
                    space_id,
                    &d.destination_id,
                    seq,
                    &child_ids,
                    &parent_ids,
                    &format_millis(at),
                ) {
                    self.store
                        .enqueue(
                            space_id,
                            &d.destination_id,
                            vec![(parent.to_string(), call)],
                        )
                        .await?;
                    self.wake(space_id, &d.destination_id, 0).await?;
                }
            }
        }
        Ok(())
    }

    /// The current values of `profile_id`, to its new identifiers, for
    /// each destination that syncs their types.
    async fn identified(
        &self,
        space_id: &str,
        profile_id: &str,
        claimed: &[Identifier],
        at: i64,
    ) -> Result<()> {
        let types = || claimed.iter().map(|i| i.kind.as_str());
        let dests: Vec<DestinationRecord> = self
            .store
            .destination_items(space_id)
            .await?
            .into_iter()
            .filter(|d| {
                d.position()
                    .receives_identifiers(&d.record.settings, types())
            })
            .map(|d| d.record)
            .collect();
        if dests.is_empty() {
            return Ok(());
        }
        let Some((root, ids)) = root_ids(&self.store, space_id, profile_id).await? else {
            return Ok(());
        };
        let values = self.store.computed_values(space_id, &root).await?;
        if values.is_empty() {
            return Ok(());
        }
        for d in &dests {
            let calls = current_calls_to(
                space_id,
                &d.destination_id,
                &d.settings,
                &root,
                &ids,
                &values,
                &format_millis(at),
                Some(claimed),
            );
            if calls.is_empty() {
                continue;
            }
            let calls = calls.into_iter().map(|c| (root.clone(), c)).collect();
            self.store
                .enqueue(space_id, &d.destination_id, calls)
                .await?;
            self.wake(space_id, &d.destination_id, 0).await?;
        }
        Ok(())
    }

    async fn deliver(&self, space_id: &str, destination_id: &str) -> Result<()> {
        let me = random_base62(16);
        let lease = self
            .store
            .take_delivery_lease(space_id, destination_id, &me, now_millis() + LEASE_MS)
            .await?;
        let retry_at = match lease {
            DeliveryLease::Gone => return Ok(()),
            // Another run is draining it; make sure someone looks again
            // after it (it may have seen an empty queue just before).
            DeliveryLease::Busy => return self.wake(space_id, destination_id, 2).await,
            DeliveryLease::Taken { retry_at } => retry_at,
        };
        // A failed attempt's backoff is still running: the delayed wake it
        // scheduled will come; new calls wait behind the failing one.
        let outcome = if retry_at > now_millis() {
            Ok(After::Done)
        } else {
            self.drain(space_id, destination_id).await
        };
        self.store
            .release_delivery_lease(space_id, destination_id, &me)
            .await?;
        match outcome? {
            After::Done => Ok(()),
            After::More => self.wake(space_id, destination_id, 0).await,
            After::Retry(wait) => {
                self.store
                    .set_retry_at(
                        space_id,
                        destination_id,
                        now_millis() + wait.as_millis() as i64,
                    )
                    .await?;
                self.wake(space_id, destination_id, wait.as_secs_f64().ceil() as u32)
                    .await
            }
        }
    }

    /// Delivers until the queue is empty, the run's time is up, or a
    /// request failed.
    async fn drain(&self, space_id: &str, destination_id: &str) -> Result<After> {
        let Some(target) = self.store.target(space_id, destination_id).await? else {
            return Ok(After::Done);
        };
        let started = Instant::now();
        loop {
            match self.deliverer.deliver_next(&target).await? {
                Step::Idle => return Ok(After::Done),
                Step::Sent if started.elapsed() > DELIVER_BUDGET => return Ok(After::More),
                Step::Sent => {}
                Step::Retry(wait) => return Ok(After::Retry(wait)),
            }
        }
    }
}

/// How a delivery run ended.
enum After {
    Done,
    More,
    Retry(Duration),
}

/// Destinations on DynamoDB for the `profile-api` function: every write
/// wakes the sync step (initial sync of a new destination, delivery of
/// replayed calls).
pub struct DynamoDestinations {
    pub store: Arc<DynamoStore>,
    pub queue: Arc<SqsQueue>,
}

#[async_trait]
impl Destinations for DynamoDestinations {
    async fn put_destination(
        &self,
        space_id: &str,
        destination_id: &str,
        name: Option<String>,
        settings: Settings,
        secret: Option<kindred_store::secret::Secret>,
    ) -> Result<(DestinationRecord, bool)> {
        let out = self
            .store
            .put_destination(space_id, destination_id, name, settings, secret)
            .await?;
        if out.0.initial_sync_pending {
            self.queue
                .send_json(&[SyncMessage::Changes {
                    space_id: space_id.to_string(),
                }])
                .await?;
        }
        Ok(out)
    }

    async fn destination(
        &self,
        space_id: &str,
        destination_id: &str,
    ) -> Result<Option<DestinationRecord>> {
        self.store.destination(space_id, destination_id).await
    }

    async fn destinations(&self, space_id: &str) -> Result<Vec<DestinationRecord>> {
        self.store.destinations(space_id).await
    }

    async fn delete_destination(&self, space_id: &str, destination_id: &str) -> Result<bool> {
        self.store
            .delete_destination(space_id, destination_id)
            .await
    }

    async fn destination_status(
        &self,
        space_id: &str,
        destination_id: &str,
    ) -> Result<Option<DestinationStatus>> {
        self.store
            .destination_status(space_id, destination_id)
            .await
    }

    async fn dead_letters(
        &self,
        space_id: &str,
        destination_id: &str,
        limit: usize,
    ) -> Result<Vec<DeadLetter>> {
        self.store
            .dead_letters(space_id, destination_id, limit)
            .await
    }

    async fn replay(&self, space_id: &str, destination_id: &str) -> Result<u64> {
        let n = self.store.replay(space_id, destination_id).await?;
        if n > 0 {
            self.queue
                .send_json(&[SyncMessage::Deliver {
                    space_id: space_id.to_string(),
                    destination_id: destination_id.to_string(),
                }])
                .await?;
        }
        Ok(n)
    }
}
