//! The sync step's ports: destinations as the admin API manages them
//! ([`Destinations`]), and the per-destination outbox of Segment calls the
//! delivery worker drains ([`Outbox`]). Adapters fill the outbox from the
//! outbound change log and the merge log, exactly once per change and
//! destination, in log order.

use async_trait::async_trait;
use kindred_domain::resolve::IdentifierEntry;
use kindred_domain::sync::{change_calls_to, worth_initial_sync, ChangeEntry, Settings};
use kindred_domain::Identifier;
use kindred_domain::Millis;
use serde_json::Value;

use crate::{ComputedValues, Result};

/// What a destination's sealed secret is bound to: a secret sealed for one
/// destination does not open as another's.
pub fn secret_context(space_id: &str, destination_id: &str) -> String {
    format!("{space_id}/{destination_id}")
}

/// The calls that bring a destination up to a profile's current values
/// (its initial sync): audience memberships and traits that have a value.
pub fn current_calls(
    space_id: &str,
    destination_id: &str,
    settings: &Settings,
    root: &str,
    ids: &[IdentifierEntry],
    values: &ComputedValues,
    at: &str,
) -> Vec<Value> {
    current_calls_to(
        space_id,
        destination_id,
        settings,
        root,
        ids,
        values,
        at,
        None,
    )
}

/// [`current_calls`] only to the addresses of `only` when given: what a
/// profile's new identifiers are sent when it gains them (a member's
/// second email learns its memberships).
#[allow(clippy::too_many_arguments)]
pub fn current_calls_to(
    space_id: &str,
    destination_id: &str,
    settings: &Settings,
    root: &str,
    ids: &[IdentifierEntry],
    values: &ComputedValues,
    at: &str,
    only: Option<&[Identifier]>,
) -> Vec<Value> {
    let user = User { root, ids };
    values_calls(
        space_id,
        destination_id,
        settings,
        user,
        values,
        at,
        only,
        None,
    )
}

/// One user a call is about: its root profile and identifiers.
#[derive(Clone, Copy)]
pub struct User<'a> {
    pub root: &'a str,
    pub ids: &'a [IdentifierEntry],
}

/// The calls that bring a destination up to an account's current values
/// (its initial sync): for each of the account's `users`, the calls of
/// each value with `context.groupId`, as its changes are sent. Each call
/// comes with the root profile it is about.
pub fn account_current_calls(
    space_id: &str,
    destination_id: &str,
    settings: &Settings,
    group_id: &str,
    users: &[User<'_>],
    values: &ComputedValues,
    at: &str,
) -> Vec<(String, Value)> {
    let mut out = Vec::new();
    for user in users {
        let calls = values_calls(
            space_id,
            destination_id,
            settings,
            *user,
            values,
            at,
            None,
            Some(group_id),
        );
        out.extend(calls.into_iter().map(|c| (user.root.to_string(), c)));
    }
    out
}

#[allow(clippy::too_many_arguments)]
fn values_calls(
    space_id: &str,
    destination_id: &str,
    settings: &Settings,
    User { root, ids }: User<'_>,
    values: &ComputedValues,
    at: &str,
    only: Option<&[Identifier]>,
    account: Option<&str>,
) -> Vec<Value> {
    let mut calls = Vec::new();
    for (key, v) in values {
        if !worth_initial_sync(v.class, &v.value) {
            continue;
        }
        let change = ChangeEntry {
            seq: None,
            key,
            class: v.class,
            new: &v.value,
            at,
            group_id: account,
        };
        calls.extend(change_calls_to(
            space_id,
            destination_id,
            settings,
            root,
            ids,
            &change,
            only,
        ));
    }
    calls
}

/// A configured destination, as the API shows it (never its secret).
#[derive(Clone, Debug, PartialEq)]
pub struct DestinationRecord {
    pub destination_id: String,
    pub name: Option<String>,
    pub settings: Settings,
    /// Whether a secret (webhook signing secret, Segment write key) is set.
    pub has_secret: bool,
    /// Bumped on every replace.
    pub version: u64,
    /// The current values of the selected keys are still to be queued.
    pub initial_sync_pending: bool,
    pub created_at: Millis,
    pub updated_at: Millis,
}

/// The last failed delivery attempt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeliveryError {
    /// The receiver's HTTP status; `None` when there was no answer.
    pub status: Option<u16>,
    pub message: String,
    pub at: Millis,
}

/// Where a destination's deliveries stand.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct DestinationStatus {
    /// Calls the destination accepted.
    pub delivered: u64,
    /// Calls queued and not attempted yet.
    pub pending: u64,
    /// Calls that failed at least once and will be tried again.
    pub retrying: u64,
    /// Calls in the dead-letter store.
    pub dead: u64,
    pub last_success_at: Option<Millis>,
    pub last_error: Option<DeliveryError>,
}

/// A call in the dead-letter store.
#[derive(Clone, Debug, PartialEq)]
pub struct DeadLetter {
    pub seq: i64,
    pub profile_id: String,
    pub call: Value,
    pub attempts: u32,
    pub error: String,
}

#[async_trait]
pub trait Destinations: Send + Sync {
    /// Creates or replaces a destination. `secret: None` keeps the stored
    /// one. A new destination, or one whose key selection grew, first
    /// queues the current values (initial sync).
    async fn put_destination(
        &self,
        space_id: &str,
        destination_id: &str,
        name: Option<String>,
        settings: Settings,
        secret: Option<crate::secret::Secret>,
    ) -> Result<(DestinationRecord, bool)>;
    async fn destination(
        &self,
        space_id: &str,
        destination_id: &str,
    ) -> Result<Option<DestinationRecord>>;
    async fn destinations(&self, space_id: &str) -> Result<Vec<DestinationRecord>>;
    /// Removes the destination with its queued and dead calls; `false` if
    /// there was none.
    async fn delete_destination(&self, space_id: &str, destination_id: &str) -> Result<bool>;
    async fn destination_status(
        &self,
        space_id: &str,
        destination_id: &str,
    ) -> Result<Option<DestinationStatus>>;
    /// Dead letters, oldest first, at most `limit`.
    async fn dead_letters(
        &self,
        space_id: &str,
        destination_id: &str,
        limit: usize,
    ) -> Result<Vec<DeadLetter>>;
    /// Puts every dead letter back in the queue; returns how many.
    async fn replay(&self, space_id: &str, destination_id: &str) -> Result<u64>;
}

/// A destination the delivery worker serves, with its secret opened.
#[derive(Clone, Debug, PartialEq)]
pub struct Target {
    pub space_id: String,
    pub destination_id: String,
    pub version: u64,
    pub settings: Settings,
    pub secret: Option<crate::secret::Secret>,
}

/// A queued call.
#[derive(Clone, Debug, PartialEq)]
pub struct PendingCall {
    pub seq: i64,
    /// The call's JSON.
    pub call: String,
    /// Attempts made so far.
    pub attempts: u32,
}

/// How an attempt to deliver some calls ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Attempt {
    Delivered {
        at: Millis,
    },
    /// Failed; `dead`: the calls go to the dead-letter store.
    Failed {
        error: DeliveryError,
        dead: bool,
    },
}

/// The destinations' outboxes: filled by the fan-out, drained in order by
/// the delivery worker.
#[async_trait]
pub trait Outbox: Send + Sync {
    /// Appends calls to a destination's queue, after everything queued
    /// before, in the order given (`(profile id, call)`).
    async fn enqueue(
        &self,
        space_id: &str,
        destination_id: &str,
        calls: Vec<(String, Value)>,
    ) -> Result<()>;
    /// The oldest queued (not dead) calls of a destination, at most `limit`.
    async fn next_calls(
        &self,
        space_id: &str,
        destination_id: &str,
        limit: usize,
    ) -> Result<Vec<PendingCall>>;
    /// Records an attempt at these calls: delivered ones leave the queue;
    /// failed ones count an attempt, dead ones move to the dead letters.
    async fn record(
        &self,
        space_id: &str,
        destination_id: &str,
        seqs: &[i64],
        attempt: Attempt,
    ) -> Result<()>;
}

/// Where a long-running delivery worker (`kindred serve`) learns which
/// destinations to serve.
#[async_trait]
pub trait Targets: Send + Sync {
    /// Every enabled destination of every space, with its secret opened.
    async fn targets(&self) -> Result<Vec<Target>>;
}
