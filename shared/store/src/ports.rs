//! The ports: what the HTTP routers and workers need from storage, split by
//! capability. Async ports serve request handlers; [`IdentityGraph`] is the
//! unit of work the identity pipeline runs resolution against.

use async_trait::async_trait;
use kindred_domain::{
    Event, ExternalId, Facts, Identifier, IdentitySettings, Millis, Plan, Traits,
};

use crate::token::TokenKind;
use crate::Result;

/// Who a presented token belongs to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpaceAuth {
    pub space_id: String,
    /// The event source of the space's write key; recorded on identifiers and traits.
    pub source_id: String,
    pub kind: TokenKind,
}

/// A space's credentials, shown once on creation.
#[derive(Clone, Debug, serde::Serialize)]
pub struct NewSpace {
    pub space_id: String,
    pub write_key: String,
    pub access_token: String,
    pub admin_token: String,
}

#[async_trait]
pub trait Spaces: Send + Sync {
    /// The space a token of the given kind belongs to; `None` if unknown or revoked.
    async fn authenticate(&self, secret: &str, kind: TokenKind) -> Result<Option<SpaceAuth>>;
    async fn identity_settings(&self, space_id: &str) -> Result<IdentitySettings>;
    /// Replaces the settings; events processed afterwards use them.
    async fn put_identity_settings(
        &self,
        space_id: &str,
        settings: &IdentitySettings,
    ) -> Result<()>;
}

/// An accepted event on its way to the identity pipeline (also the SQS
/// message body, as JSON).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct QueuedEvent {
    pub space_id: String,
    pub source_id: String,
    /// The normalized event body as JSON ([`Event::body`]).
    pub body: String,
}

#[async_trait]
pub trait EventQueue: Send + Sync {
    /// Returns only once every event is durable: then, and only then, the
    /// ingest endpoint may answer 200.
    async fn enqueue(&self, events: Vec<QueuedEvent>) -> Result<()>;
}

/// How a Profile API caller names a profile.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProfileLookup {
    /// `profile_id:prf_...`, merged-away ids included.
    ProfileId(String),
    Identifier(Identifier),
}

#[derive(Clone, Debug, PartialEq)]
pub struct ExternalIdRecord {
    pub id: Identifier,
    pub source_id: String,
    pub collection: String,
    pub encoding: String,
    pub created_at: Millis,
    pub first_message_id: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinkRecord {
    pub group_id: String,
    pub linked_at: Millis,
    pub message_id: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MergeRecord {
    pub parent_id: String,
    pub child_id: String,
    pub message_id: String,
    pub merged_at: Millis,
}

/// Everything about one resolved (root) profile, with its merged-away
/// profiles folded in.
#[derive(Clone, Debug, PartialEq)]
pub struct ProfileDoc {
    pub profile_id: String,
    /// The root and every profile merged into it.
    pub tree: Vec<String>,
    pub created_at: Millis,
    pub updated_at: Millis,
    pub first_message_id: String,
    pub last_message_id: String,
    pub merges: u32,
    pub traits: Traits,
    pub external_ids: Vec<ExternalIdRecord>,
    pub links: Vec<LinkRecord>,
    pub merge_history: Vec<MergeRecord>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EventQuery {
    pub start: Option<Millis>,
    pub end: Option<Millis>,
    pub include: Vec<String>,
    pub exclude: Vec<String>,
    pub limit: usize,
    pub descending: bool,
    /// Continue after this `(timestamp, seq)` position.
    pub after: Option<(Millis, i64)>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct StoredEvent {
    pub timestamp: Millis,
    pub seq: i64,
    pub body: String,
}

/// Which parts of a profile to load beyond its root record, traits and tree.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProfileParts {
    pub external_ids: bool,
    pub links: bool,
    pub merges: bool,
    /// `updated_at` and `last_message_id` from the newest event.
    pub activity: bool,
}

impl ProfileParts {
    pub const ALL: Self = Self {
        external_ids: true,
        links: true,
        merges: true,
        activity: true,
    };
}

#[async_trait]
pub trait Profiles: Send + Sync {
    /// The resolved root profile; parts not asked for are left empty.
    async fn profile(
        &self,
        space_id: &str,
        lookup: &ProfileLookup,
        parts: ProfileParts,
    ) -> Result<Option<ProfileDoc>>;
    /// Events of the given profile tree in `(timestamp, seq)` order, at most `query.limit`.
    async fn events(
        &self,
        space_id: &str,
        tree: &[String],
        query: &EventQuery,
    ) -> Result<Vec<StoredEvent>>;
}

/// Whether an event was recorded or had been seen before.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Applied {
    Recorded,
    Duplicate,
}

/// The event being applied, with what the pipeline derived from it.
#[derive(Clone, Copy, Debug)]
pub struct EventRecord<'a> {
    pub event: &'a Event,
    pub body_json: &'a str,
    pub source_id: &'a str,
    pub external_ids: &'a [ExternalId],
    pub group_id: Option<&'a str>,
    /// Processing time (dedup records expire relative to it).
    pub now: Millis,
}

/// One unit of work on a space's identity graph. `apply` is conditional:
/// it fails with [`crate::StoreError::Conflict`] and writes nothing if an
/// identifier to claim is owned, a profile is not at the version read or
/// no longer a root; it answers [`Applied::Duplicate`] and writes nothing
/// if the message id was already recorded.
///
/// Async so that network adapters (DynamoDB) and embedded ones (SQLite,
/// whose futures complete on first poll; see
/// [`crate::identity::complete_now`]) run the same pipeline.
#[allow(async_fn_in_trait)]
pub trait IdentityGraph {
    async fn is_duplicate(&mut self, space_id: &str, message_id: &str) -> Result<bool>;
    async fn facts(&mut self, space_id: &str, ids: &[Identifier]) -> Result<Facts>;
    async fn apply(
        &mut self,
        space_id: &str,
        plan: &Plan,
        record: &EventRecord<'_>,
    ) -> Result<Applied>;
    /// Waits before the next attempt after repeated conflicts.
    async fn backoff(&mut self, wait: std::time::Duration);
}
