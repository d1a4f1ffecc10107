//! Privacy operations' port ([`Privacy`]: regulations as the Admin API
//! records and shows them) and what every store does the same way when a
//! regulation deletes a person: the calls that tell destinations the
//! person is gone ([`farewell_calls`]).

use async_trait::async_trait;
use kindred_domain::compute::Class;
use kindred_domain::privacy::{RegulationRequest, RegulationType, SubjectStatus};
use kindred_domain::resolve::IdentifierEntry;
use kindred_domain::sync::{change_calls, delete_calls, ChangeEntry, Settings};
use kindred_domain::Millis;
use serde_json::Value;

use crate::{ComputedValues, Result};

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
