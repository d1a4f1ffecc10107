//! The ports: what the HTTP routers and workers need from storage, split by
//! capability. Async ports serve request handlers; [`IdentityGraph`] is the
//! unit of work the identity pipeline runs resolution against.

use std::collections::BTreeMap;

use async_trait::async_trait;
use kindred_domain::account::{Account, AccountUpdate};
use kindred_domain::compute::Class;
use kindred_domain::{
    Event, ExternalId, Facts, Identifier, IdentitySettings, Millis, Plan, Traits,
};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::token::TokenKind;
use crate::Result;

/// Who a presented token belongs to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpaceAuth {
    pub space_id: String,
    /// The event source of the space's write key; recorded on identifiers and traits.
    pub source_id: String,
    pub kind: TokenKind,
    /// The space's clock tolerance for event times (SPEC 2), in milliseconds.
    pub future_tolerance: Millis,
    /// The space's Profile API rate (requests per second).
    pub profile_api_rate: u32,
    /// The pages that may send the space's events from a browser (empty:
    /// any), checked by [`kindred_domain::origin::allows`].
    pub allowed_origins: Vec<String>,
}

impl SpaceAuth {
    /// What a verified token unlocks, with the space's settings that the
    /// APIs apply per request.
    pub fn new(
        space_id: String,
        source_id: String,
        kind: TokenKind,
        settings: &IdentitySettings,
    ) -> Self {
        Self {
            space_id,
            source_id,
            kind,
            future_tolerance: settings.future_tolerance(),
            profile_api_rate: settings.profile_api_requests_per_second,
            allowed_origins: settings.allowed_origins.clone(),
        }
    }
}

/// A space's credentials, shown once on creation.
/// (`Debug` leaves the secrets out: this is shown once, never logged.)
#[derive(Clone, serde::Serialize)]
pub struct NewSpace {
    pub space_id: String,
    pub write_key: String,
    pub access_token: String,
    pub admin_token: String,
}

impl std::fmt::Debug for NewSpace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NewSpace")
            .field("space_id", &self.space_id)
            .finish_non_exhaustive()
    }
}

/// A write key or token as listed: never the secret nor its hash.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenRecord {
    /// The public id (12 characters), also the token's visible prefix.
    pub token_id: String,
    pub kind: TokenKind,
    pub label: Option<String>,
    pub created_at: Millis,
    pub revoked_at: Option<Millis>,
}

impl TokenRecord {
    /// What the secret starts with (`wk_` + the public id): enough to
    /// tell tokens apart, not to use one.
    pub fn prefix(&self) -> String {
        format!("{}_{}", self.kind.prefix(), self.token_id)
    }
}

/// How a revocation went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Revoked {
    Revoked,
    /// No live token with that id in the space.
    NotFound,
    /// It is the space's last live admin token: revoking it would lock
    /// the space's administration out.
    LastAdmin,
}

/// Longest token label, in bytes.
pub const MAX_TOKEN_LABEL_BYTES: usize = 200;
/// Most live tokens (all kinds together) in one space.
pub const MAX_LIVE_TOKENS: usize = 100;

/// The refusal of one more live token than [`MAX_LIVE_TOKENS`].
pub fn too_many_tokens() -> crate::StoreError {
    crate::StoreError::Invalid(format!(
        "a space has at most {MAX_LIVE_TOKENS} live keys and tokens; revoke one first"
    ))
}

/// A token label: optional, at most 200 bytes, no control characters.
pub fn check_label(label: Option<&str>) -> Result<()> {
    match label {
        Some(l) if l.len() > MAX_TOKEN_LABEL_BYTES || l.chars().any(char::is_control) => {
            Err(crate::StoreError::Invalid(
                "label: at most 200 bytes, without control characters".into(),
            ))
        }
        _ => Ok(()),
    }
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
    /// Mints a write key or token for the space; the secret is returned
    /// once and stored hashed.
    async fn create_token(
        &self,
        space_id: &str,
        kind: TokenKind,
        label: Option<String>,
    ) -> Result<(TokenRecord, String)>;
    /// The space's tokens, live and revoked, oldest first.
    async fn tokens(&self, space_id: &str) -> Result<Vec<TokenRecord>>;
    /// Revokes a token of the space (never another space's), unless it is
    /// the space's last live admin token.
    async fn revoke_token(&self, space_id: &str, token_id: &str) -> Result<Revoked>;
    /// Starts a browser session of the explorer for a token that has just
    /// been authenticated: kept under the hash of the session's random id
    /// (the browser holds the id, never the token) until `expires_at`.
    async fn start_session(
        &self,
        session_hash: [u8; 32],
        token_id: &str,
        kind: TokenKind,
        expires_at: Millis,
    ) -> Result<()>;
    /// The space of a session: `None` if there is no such session, it has
    /// expired (as of `now`), or its token has been revoked since.
    async fn session_auth(&self, session_hash: [u8; 32], now: Millis) -> Result<Option<SpaceAuth>>;
    /// Ends a session (signing out); nothing if there is none.
    async fn end_session(&self, session_hash: [u8; 32]) -> Result<()>;
}

/// How the background stages of a deployment are doing (`/healthz`).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct HealthReport {
    /// Workers that are down: `(worker, why)`.
    pub down: Vec<(String, String)>,
    /// Per stage (`queue`: accepted, not yet applied by identity
    /// resolution; `compute`; `sync`): entries pending and the age of the
    /// oldest in seconds.
    pub lags: Vec<(&'static str, u64, f64)>,
}

#[async_trait]
pub trait HealthCheck: Send + Sync {
    async fn health(&self) -> HealthReport;
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
    /// When the identifier joined the profile: later than `created_at`
    /// for one that came with a merge (the root's list records it).
    pub added_at: Millis,
    /// The profile of the merge tree that claimed it (the root, or a
    /// profile merged into it): where it sits in the identity graph.
    pub owner: String,
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
    /// Computed traits and audiences by key.
    pub computed: ComputedValues,
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

impl EventQuery {
    /// Whether an event of this name passes `include` and `exclude`
    /// (an event without a name, such as an identify, only when
    /// `include` is empty).
    pub fn keeps(&self, name: Option<&str>) -> bool {
        let included =
            self.include.is_empty() || name.is_some_and(|n| self.include.iter().any(|i| i == n));
        included && !name.is_some_and(|n| self.exclude.iter().any(|e| e == n))
    }
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
    /// Computed traits and audiences.
    pub computed: bool,
}

impl ProfileParts {
    pub const ALL: Self = Self {
        external_ids: true,
        links: true,
        merges: true,
        activity: true,
        computed: true,
    };
}

/// An account (Segment's `accounts` collection) and the profiles its
/// group calls linked to it (as linked: some may since have merged).
#[derive(Clone, Debug, PartialEq)]
pub struct AccountDoc {
    pub account: Account,
    pub users: Vec<String>,
}

#[async_trait]
pub trait Profiles: Send + Sync {
    /// The account of `group_id`.
    async fn account(&self, space_id: &str, group_id: &str) -> Result<Option<AccountDoc>>;
    /// The events that named the account, in `(timestamp, seq)` order, at
    /// most `query.limit`.
    async fn account_events(
        &self,
        space_id: &str,
        group_id: &str,
        query: &EventQuery,
    ) -> Result<Vec<StoredEvent>>;
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
    /// What the event does to the account it names.
    pub account: Option<AccountUpdate<'a>>,
    /// Processing time (dedup records expire relative to it).
    pub now: Millis,
}

impl EventRecord<'_> {
    /// The encoding the event sent an identifier with (`externalIds`),
    /// `"none"` for one it did not send encoded.
    pub fn encoding_of(&self, id: &Identifier) -> &str {
        self.external_ids
            .iter()
            .find(|e| &e.id == id)
            .map_or("none", |e| e.encoding.as_str())
    }
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
    /// Whether the event names a suppressed person (any of its
    /// identifiers is on the space's suppression list for an event
    /// received at `received_at`): if so it is counted as dropped and
    /// nothing of it is stored.
    /// Returns the suppressed identifier that dropped it.
    async fn drop_if_suppressed(
        &mut self,
        space_id: &str,
        ids: &[Identifier],
        received_at: Millis,
    ) -> Result<Option<Identifier>>;
    /// Appends to the violations log (with the event's writes where the
    /// store can).
    async fn record_violations(
        &mut self,
        space_id: &str,
        violations: &[crate::privacy::Violation],
    ) -> Result<()>;
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
    /// Applies the event's account update ([`EventRecord::account`]) and
    /// links the account to `profile_id`, after the event is recorded,
    /// and again when it turns out a duplicate (`profile_id` then
    /// `None`): the update is idempotent, so a store that cannot make it
    /// with the event's own writes heals on the retry. A store that makes
    /// it with the event's writes does nothing here.
    async fn record_account(
        &mut self,
        space_id: &str,
        record: &EventRecord<'_>,
        profile_id: Option<&str>,
    ) -> Result<()> {
        let _ = (space_id, record, profile_id);
        Ok(())
    }
}

/// A computed trait's or audience's value on a profile.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ComputedValue {
    #[serde(rename = "c")]
    pub class: Class,
    #[serde(rename = "v")]
    pub value: Value,
    #[serde(rename = "t")]
    pub updated_at: Millis,
}

pub type ComputedValues = BTreeMap<String, ComputedValue>;

/// Where a definition's backfill over stored history stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DefinitionStatus {
    Backfilling { done: u64, total: u64 },
    Ready,
    Failed(String),
}

/// A stored computed trait or audience definition.
#[derive(Clone, Debug, PartialEq)]
pub struct DefinitionRecord {
    pub key: String,
    pub class: Class,
    /// Bumped on every replace.
    pub version: u64,
    /// The JSON body as given (validated).
    pub body: Value,
    pub status: DefinitionStatus,
    pub created_at: Millis,
    pub updated_at: Millis,
}

/// One entry of a space's outbound change log.
#[derive(Clone, Debug, PartialEq)]
pub struct ChangeRecord {
    /// Position in the space's log; `since` continues after it.
    pub seq: i64,
    /// The profile whose value changed; empty for an account's change.
    pub profile_id: String,
    /// The account whose value changed (account-level definitions).
    pub group_id: Option<String>,
    pub key: String,
    pub class: Class,
    pub old: Option<Value>,
    pub new: Value,
    pub at: Millis,
}

/// Computed traits and audiences: their definitions, the change log and
/// the lookback sweep.
#[async_trait]
pub trait Computations: Send + Sync {
    /// Creates or replaces a definition after validating it together with
    /// the space's others (references, cycles, key taken by the other
    /// class); a new version starts backfilling.
    async fn put_definition(
        &self,
        space_id: &str,
        class: Class,
        key: &str,
        body: &Value,
    ) -> Result<DefinitionRecord>;
    async fn definition(
        &self,
        space_id: &str,
        class: Class,
        key: &str,
    ) -> Result<Option<DefinitionRecord>>;
    async fn definitions(&self, space_id: &str, class: Class) -> Result<Vec<DefinitionRecord>>;
    /// `false` if there was none; refused while another audience references it.
    async fn delete_definition(&self, space_id: &str, class: Class, key: &str) -> Result<bool>;
    /// Builds the definition again from every profile's history (a new
    /// version, same body); `None` if there is no such definition.
    async fn rebackfill(
        &self,
        space_id: &str,
        class: Class,
        key: &str,
    ) -> Result<Option<DefinitionRecord>>;
    /// Changes after `since`, oldest first, at most `limit`.
    async fn changes(&self, space_id: &str, since: i64, limit: usize) -> Result<Vec<ChangeRecord>>;
    /// The profiles a user-level definition holds for: an audience's
    /// members (its value `true`), a computed trait's profiles with a value
    /// (any but `null`), as [`crate::compute::holds`] says, in profile id
    /// order after `after`, at most `limit`, with the value.
    async fn members(
        &self,
        space_id: &str,
        class: Class,
        key: &str,
        after: &str,
        limit: usize,
    ) -> Result<Vec<(String, ComputedValue)>>;
    /// How many profiles each user-level definition holds for, by key
    /// (as [`Computations::members`] counts them; a key with none may be
    /// left out).
    async fn sizes(&self, space_id: &str) -> Result<BTreeMap<String, u64>>;
    /// Enqueues a recompute, as of `as_of`, of exactly the profiles whose
    /// next change by time has come; returns how many.
    async fn run_lookback(&self, space_id: &str, as_of: Millis) -> Result<u64>;
    /// Group ids of the space's accounts after `after`, in order, at most `limit`.
    async fn account_ids(&self, space_id: &str, after: &str, limit: usize) -> Result<Vec<String>>;
    /// An account's computed values and their version (0: none stored yet).
    async fn account_values(&self, space_id: &str, group_id: &str)
        -> Result<(ComputedValues, i64)>;
    /// Stores an account's computed values and logs `changes` (at `at`),
    /// both at once and only if the stored values are still at `version`;
    /// `false` if another writer moved them first.
    async fn write_account_values(
        &self,
        space_id: &str,
        group_id: &str,
        version: i64,
        values: &ComputedValues,
        changes: &[kindred_domain::compute::Change],
        at: Millis,
    ) -> Result<bool>;
}

/// Storage requests and capacity a request consumed (what an adapter that
/// counts them reports, for the Profile API's per-request cost log).
#[derive(Clone, Copy, Debug, Default)]
pub struct RequestCost {
    pub read_requests: u64,
    pub write_requests: u64,
    pub read_units: f64,
    pub write_units: f64,
}
