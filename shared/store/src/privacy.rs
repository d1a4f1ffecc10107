//! Privacy operations' port ([`Privacy`]: regulations as the Admin API
//! records and shows them) and what every store does the same way when a
//! regulation deletes a person: the calls that tell destinations the
//! person is gone ([`farewell_calls`]).

use async_trait::async_trait;
use kindred_domain::compute::Class;
use kindred_domain::privacy::{RegulationRequest, RegulationType, SubjectStatus};
use kindred_domain::resolve::IdentifierEntry;
use kindred_domain::sync::{change_calls, delete_calls, ChangeEntry, Settings};
use kindred_domain::{Identifier, Millis};
use serde_json::Value;

use crate::{ComputedValues, ProfileLookup, Result};

/// One subject of a regulation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubjectRecord {
    /// Its position in the request's `subject_ids`.
    pub index: usize,
    pub status: SubjectStatus,
    /// Why it failed.
    pub reason: Option<String>,
    /// Profiles (a merge tree counts each member) it deleted.
    pub profiles_deleted: u64,
}

/// A regulation as recorded. The subject ids themselves are kept only
/// until their subject is done: a finished deletion leaves no copy of
/// them here.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegulationRecord {
    pub regulation_id: String,
    pub regulation_type: RegulationType,
    pub subject_type: String,
    pub created_at: Millis,
    pub finished_at: Option<Millis>,
    pub subjects: Vec<SubjectRecord>,
}

impl RegulationRecord {
    pub fn status(&self) -> SubjectStatus {
        SubjectStatus::overall(self.subjects.iter().map(|s| s.status))
    }
}

/// One entry of the violations log (Segment's identity Insights): an
/// identifier of an event that was not used, and why. The identifier is
/// kept as its type and hash, never its value.
#[derive(Clone, Debug, PartialEq)]
pub struct Violation {
    pub message_id: String,
    /// The profile the event landed on (`None`: unattached, or dropped).
    pub profile_id: Option<String>,
    /// The profile that owns the identifier (a merge refused with it).
    pub other_profile_id: Option<String>,
    pub id_type: String,
    /// `kindred_domain::privacy::identifier_hash_hex`.
    pub id_hash: String,
    /// `blocked_value`, `limit`, `merge_cap`, `identifier_cap`,
    /// `identifier_bytes` or `suppressed`.
    pub rule: String,
    pub detail: Value,
    /// When Kindred received the event.
    pub at: Millis,
}

impl Violation {
    /// The log entry of an identifier resolution refused.
    pub fn refused(
        space_id: &str,
        message_id: &str,
        profile_id: Option<&str>,
        refusal: &kindred_domain::Refusal,
        at: Millis,
    ) -> Self {
        Self {
            message_id: message_id.to_string(),
            profile_id: profile_id.map(str::to_string),
            other_profile_id: refusal.owner.clone(),
            id_type: refusal.id.kind.clone(),
            id_hash: kindred_domain::privacy::identifier_hash_hex(space_id, &refusal.id),
            rule: refusal.rule.name().to_string(),
            detail: refusal.rule.detail(),
            at,
        }
    }

    /// The log entry of an event dropped because `id` is suppressed.
    pub fn suppressed(space_id: &str, message_id: &str, id: &Identifier, at: Millis) -> Self {
        Self {
            message_id: message_id.to_string(),
            profile_id: None,
            other_profile_id: None,
            id_type: id.kind.clone(),
            id_hash: kindred_domain::privacy::identifier_hash_hex(space_id, id),
            rule: "suppressed".into(),
            detail: Value::Null,
            at,
        }
    }
}

/// A page of the violations log: entries oldest first from `since`, and
/// where the next page starts.
#[derive(Clone, Debug, PartialEq)]
pub struct ViolationPage {
    pub entries: Vec<Violation>,
    pub next: Option<String>,
}

/// What splitting a merge did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SplitOutcome {
    /// The child is a root again with the identifiers it brought.
    Split {
        parent: String,
        child: String,
        /// The identifiers that left the parent with the child.
        moved: Vec<Identifier>,
    },
    /// No profile by that lookup.
    NoProfile,
    /// The child is not a profile merged into that one.
    NotMerged,
}

/// A new regulation's id: `reg_`, the time in hex (so ids sort by
/// creation) and 12 random base62 characters.
pub fn new_regulation_id(now: Millis) -> String {
    format!("reg_{:011x}{}", now.max(0), crate::token::random_base62(12))
}

/// Regulations: recorded, then run in the background (and resumed after
/// a restart) until every subject is finished or failed.
#[async_trait]
pub trait Privacy: Send + Sync {
    /// Records a regulation and starts running it.
    async fn create_regulation(
        &self,
        space_id: &str,
        request: &RegulationRequest,
    ) -> Result<RegulationRecord>;
    async fn regulation(
        &self,
        space_id: &str,
        regulation_id: &str,
    ) -> Result<Option<RegulationRecord>>;
    /// The space's regulations, newest first, before `before` (an id).
    async fn regulations(
        &self,
        space_id: &str,
        before: Option<&str>,
        limit: usize,
    ) -> Result<Vec<RegulationRecord>>;
    /// Events dropped because they named a suppressed person.
    async fn suppressed_events(&self, space_id: &str) -> Result<u64>;
    /// The violations log, oldest first from `since` (or from the opaque
    /// `next` of a previous page), of the space or of one profile's tree.
    /// `None` when the profile does not exist.
    async fn violations(
        &self,
        space_id: &str,
        profile: Option<&ProfileLookup>,
        since: Millis,
        next: Option<&str>,
        limit: usize,
    ) -> Result<Option<ViolationPage>>;
    /// Undoes a merge: `child` (merged into the profile `lookup` names,
    /// directly or through another child) becomes a root again with the
    /// identifiers it brought and the events recorded on it; the two
    /// never merge again. Both are recomputed.
    async fn split(
        &self,
        space_id: &str,
        lookup: &ProfileLookup,
        child: &str,
    ) -> Result<SplitOutcome>;
    /// Takes identifiers off the profile `lookup` names (its whole merge
    /// tree): they stop counting against its limits and are free to be
    /// claimed again. `None` when there is no such profile; otherwise the
    /// identifiers it had, now removed.
    async fn remove_identifiers(
        &self,
        space_id: &str,
        lookup: &ProfileLookup,
        ids: &[Identifier],
    ) -> Result<Option<Vec<Identifier>>>;
}

/// The traits a set of stored events sets, replayed in time order: what
/// one side of a split merge would hold had the two never merged. Each
/// event is `(timestamp, order among events of the same millisecond,
/// stored body)`; `source_id` is the space's source, as on ingest.
pub fn replay_traits(
    mut events: Vec<(Millis, i64, String)>,
    source_id: &str,
) -> Result<kindred_domain::Traits> {
    events.sort_by_key(|(ts, order, _)| (*ts, *order));
    let mut traits = kindred_domain::Traits::new();
    for (_, _, body) in events {
        let event = kindred_domain::Event::from_stored(serde_json::from_str(&body)?)
            .map_err(|r| crate::StoreError::Undecodable(format!("a stored event: {}", r.code)))?;
        if let Some(updates) = event.profile_traits() {
            kindred_domain::traits::apply_updates(&mut traits, updates, event.timestamp, source_id);
        }
    }
    kindred_domain::traits::fit(&mut traits);
    Ok(traits)
}

/// A deleted person as destinations knew them, captured before the
/// delete: their identifiers and computed values.
pub struct Farewell<'a> {
    pub space_id: &'a str,
    pub regulation_id: &'a str,
    pub root: &'a str,
    pub ids: &'a [IdentifierEntry],
    pub values: &'a ComputedValues,
    /// When the regulation ran (RFC 3339).
    pub at: &'a str,
}

impl Farewell<'_> {
    /// The calls that tell one destination the person is gone: an
    /// `Audience Exited` (and/or identify with `false`) for every audience
    /// they were in, and with `forward_deletes` a `delete` call, addressed
    /// with the identifiers the destination was sent.
    pub fn calls(&self, destination_id: &str, settings: &Settings) -> Vec<Value> {
        let mut calls = Vec::new();
        let exited = Value::Bool(false);
        for (key, v) in self.values {
            if v.class != Class::Audience || v.value != Value::Bool(true) {
                continue;
            }
            let change = ChangeEntry {
                seq: None,
                key,
                class: v.class,
                new: &exited,
                at: self.at,
                group_id: None,
            };
            calls.extend(change_calls(
                self.space_id,
                destination_id,
                settings,
                self.root,
                self.ids,
                &change,
            ));
        }
        if settings.forward_deletes {
            calls.extend(delete_calls(
                self.space_id,
                destination_id,
                self.regulation_id,
                self.ids,
                self.at,
            ));
        }
        calls
    }
}
