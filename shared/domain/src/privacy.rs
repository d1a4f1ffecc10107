//! Privacy operations (GDPR, CCPA), in Segment's shape: a regulation
//! deletes and/or suppresses the people that subject ids name, or lifts a
//! suppression. The suppression list outlives the deletion, so it holds
//! no identifier in clear: only [`identifier_hash`]es.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::identifier::{Identifier, MAX_TYPE_BYTES};
use crate::Millis;

/// Most subject ids one regulation may name (Segment's limit).
pub const MAX_SUBJECTS: usize = 5_000;
/// Longest subject id, in bytes (as every identifier value).
pub const MAX_SUBJECT_BYTES: usize = 1_024;

/// What a regulation does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum RegulationType {
    /// Deletes the person and stops collecting them until UNSUPPRESS.
    SuppressWithDelete,
    /// Deletes the person; events received after the delete are collected.
    DeleteInternal,
    /// Stops collecting the person; what is stored stays.
    SuppressOnly,
    /// Collects the person again.
    Unsuppress,
}

impl RegulationType {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::SuppressWithDelete => "SUPPRESS_WITH_DELETE",
            Self::DeleteInternal => "DELETE_INTERNAL",
            Self::SuppressOnly => "SUPPRESS_ONLY",
            Self::Unsuppress => "UNSUPPRESS",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [
            Self::SuppressWithDelete,
            Self::DeleteInternal,
            Self::SuppressOnly,
            Self::Unsuppress,
        ]
        .into_iter()
        .find(|t| t.as_str() == s)
    }

    /// Whether the person's stored data is deleted.
    pub fn deletes(self) -> bool {
        matches!(self, Self::SuppressWithDelete | Self::DeleteInternal)
    }

    /// Whether the person's identifiers go on the suppression list for good
    /// (until UNSUPPRESS).
    pub fn suppresses(self) -> bool {
        matches!(self, Self::SuppressWithDelete | Self::SuppressOnly)
    }
}

/// Where a subject of a regulation stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SubjectStatus {
    Initialized,
    Running,
    Finished,
    Failed,
}

impl SubjectStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Initialized => "initialized",
            Self::Running => "running",
            Self::Finished => "finished",
            Self::Failed => "failed",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [
            Self::Initialized,
            Self::Running,
            Self::Finished,
            Self::Failed,
        ]
        .into_iter()
        .find(|t| t.as_str() == s)
    }

    /// A regulation's status from its subjects': failed if any failed,
    /// finished when all are, running once one has started.
    pub fn overall(subjects: impl IntoIterator<Item = SubjectStatus>) -> SubjectStatus {
        let (mut all_finished, mut any_started, mut any_failed, mut empty) =
            (true, false, false, true);
        for s in subjects {
            empty = false;
            any_failed |= s == Self::Failed;
            any_started |= s != Self::Initialized;
            all_finished &= matches!(s, Self::Finished | Self::Failed);
        }
        match () {
            _ if empty => Self::Finished,
            _ if all_finished && any_failed => Self::Failed,
            _ if all_finished => Self::Finished,
            _ if any_started => Self::Running,
            _ => Self::Initialized,
        }
    }
}

/// A validated `POST .../regulations` body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegulationRequest {
    pub regulation_type: RegulationType,
    /// The identifier type the subject ids are of (`USER_ID` is `user_id`).
    pub subject_type: String,
    /// The subjects, normalized as identifiers are (emails lowercased).
    pub subjects: Vec<Identifier>,
}

/// A request body that does not validate; names the field.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct RequestError {
    pub field: String,
    pub message: String,
}

fn bad(field: impl Into<String>, message: impl Into<String>) -> RequestError {
    RequestError {
        field: field.into(),
        message: message.into(),
    }
}

impl RegulationRequest {
    pub fn parse(body: &Value) -> Result<Self, RequestError> {
        let obj = body
            .as_object()
            .ok_or_else(|| bad("body", "must be a JSON object"))?;
        if let Some(k) = obj
            .keys()
            .find(|k| !["regulation_type", "subject_type", "subject_ids"].contains(&k.as_str()))
        {
            return Err(bad(k.as_str(), "is not a regulation field"));
        }
        let regulation_type = obj
            .get("regulation_type")
            .and_then(Value::as_str)
            .and_then(RegulationType::parse)
            .ok_or_else(|| {
                bad(
                    "regulation_type",
                    "is one of SUPPRESS_WITH_DELETE, DELETE_INTERNAL, SUPPRESS_ONLY, UNSUPPRESS",
                )
            })?;
        let subject_type = obj
            .get("subject_type")
            .and_then(Value::as_str)
            .filter(|t| !t.is_empty() && t.len() <= MAX_TYPE_BYTES)
            .map(|t| t.trim().to_ascii_lowercase())
            .ok_or_else(|| {
                bad(
                    "subject_type",
                    "is USER_ID or an identifier type (email, anonymous_id, ...)",
                )
            })?;
        let ids = obj
            .get("subject_ids")
            .and_then(Value::as_array)
            .ok_or_else(|| bad("subject_ids", "is an array of ids"))?;
        if ids.is_empty() || ids.len() > MAX_SUBJECTS {
            return Err(bad("subject_ids", "holds 1 to 5000 ids"));
        }
        let mut subjects = Vec::with_capacity(ids.len());
        for (i, id) in ids.iter().enumerate() {
            let id = id
                .as_str()
                .map(str::trim)
                .filter(|s| !s.is_empty() && s.len() <= MAX_SUBJECT_BYTES)
                .ok_or_else(|| {
                    bad(
                        format!("subject_ids[{i}]"),
                        "is a non-empty string of at most 1024 bytes",
                    )
                })?;
            subjects.push(Identifier::new(subject_type.clone(), id));
        }
        Ok(Self {
            regulation_type,
            subject_type,
            subjects,
        })
    }
}

/// The suppression list's key for an identifier of a space: SHA-256 over
/// the space, the type and the normalized value, so the list names nobody
/// in clear and one space's hashes are no use in another.
pub fn identifier_hash(space_id: &str, id: &Identifier) -> [u8; 32] {
    let mut h = Sha256::new();
    for part in [space_id, id.kind.as_str(), id.value.as_str()] {
        h.update((part.len() as u64).to_be_bytes());
        h.update(part.as_bytes());
    }
    h.finalize().into()
}

/// [`identifier_hash`] in lowercase hex, as logs and item keys show it.
pub fn identifier_hash_hex(space_id: &str, id: &Identifier) -> String {
    identifier_hash(space_id, id)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// How long the violations log keeps an entry.
pub const VIOLATION_RETENTION: Millis = 30 * 24 * 3_600_000;

/// A suppression as stored: the identifier's hash, the subject whose
/// regulation made it, and its reach.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Suppression {
    pub id_hash: [u8; 32],
    /// The hash of the regulation's subject identifier: UNSUPPRESS of that
    /// subject lifts every suppression made for it.
    pub subject_hash: [u8; 32],
    /// `None`: every event until UNSUPPRESS. `Some(t)`: only events
    /// received before `t` (a DELETE_INTERNAL keeps the person's events
    /// still queued when it ran from bringing them back).
    pub received_before: Option<Millis>,
}

impl Suppression {
    /// Whether an event received at `received_at` is dropped.
    pub fn drops(&self, received_at: Millis) -> bool {
        self.received_before.is_none_or(|t| received_at < t)
    }
}

/// A profile's identifier list without `remove`: what stays, and which
/// of `remove` it had. Removed identifiers stop counting against merge
/// protection's limits and are free to be claimed by any profile.
pub fn without_identifiers(
    list: &[crate::resolve::IdentifierEntry],
    remove: &[Identifier],
) -> (Vec<crate::resolve::IdentifierEntry>, Vec<Identifier>) {
    let mut removed = Vec::new();
    let kept = list
        .iter()
        .filter(|e| {
            let gone = remove.contains(&e.id);
            if gone && !removed.contains(&e.id) {
                removed.push(e.id.clone());
            }
            !gone
        })
        .cloned()
        .collect();
    (kept, removed)
}

/// A wrong merge undone: how the root's identifier list divides. The
/// identifiers owned by a profile of the child's subtree (the ones it
/// brought, and those its members claimed) leave with the child; the
/// rest stay on the parent. `(to the child, kept by the parent)`.
pub fn split_identifiers(
    list: Vec<crate::resolve::IdentifierEntry>,
    owned_by_child: impl Fn(&Identifier) -> bool,
) -> (
    Vec<crate::resolve::IdentifierEntry>,
    Vec<crate::resolve::IdentifierEntry>,
) {
    list.into_iter().partition(|e| owned_by_child(&e.id))
}

/// The root's merge count after a split: the child's own merges, and the
/// merge of the child itself, leave with it.
pub fn merges_after_split(root_merges: u32, child_merges: u32) -> u32 {
    root_merges.saturating_sub(child_merges.saturating_add(1))
}

/// Most identifiers one removal request may name.
pub const MAX_REMOVALS: usize = 100;

/// Reads `{"external_ids": [{"type", "id"}]}` (Segment's Delete Profile
/// Identifier shape), normalizing as the identity step does.
pub fn parse_removal(body: &Value) -> Result<Vec<Identifier>, RequestError> {
    let list = body
        .get("external_ids")
        .and_then(Value::as_array)
        .filter(|l| !l.is_empty() && l.len() <= MAX_REMOVALS)
        .ok_or_else(|| bad("external_ids", "is an array of 1 to 100 {\"type\", \"id\"}"))?;
    list.iter()
        .enumerate()
        .map(|(i, e)| {
            let field = |f: &str| {
                e.get(f)
                    .and_then(Value::as_str)
                    .map(str::trim)
                    .filter(|v| !v.is_empty() && v.len() <= MAX_SUBJECT_BYTES)
                    .ok_or_else(|| {
                        bad(
                            format!("external_ids[{i}].{f}"),
                            "is a non-empty string of at most 1024 bytes",
                        )
                    })
            };
            Ok(Identifier::new(
                field("type")?.to_ascii_lowercase(),
                field("id")?,
            ))
        })
        .collect()
}

/// How long a DELETE_INTERNAL's bounded suppressions are kept: past the
/// longest an acknowledged event can wait in a queue (SQS keeps messages
/// 14 days).
pub const BOUNDED_SUPPRESSION_RETENTION: Millis = 15 * 24 * 3_600_000;

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn requests_are_validated_naming_the_field() {
        let ok = RegulationRequest::parse(&json!({
            "regulation_type": "SUPPRESS_WITH_DELETE",
            "subject_type": "USER_ID",
            "subject_ids": ["u1", " u2 "]}))
        .unwrap();
        assert_eq!(ok.subject_type, "user_id");
        assert_eq!(ok.subjects[1], Identifier::new("user_id", "u2"));
        let email = RegulationRequest::parse(&json!({
            "regulation_type": "DELETE_INTERNAL", "subject_type": "email",
            "subject_ids": ["Ada@Example.COM"]}))
        .unwrap();
        assert_eq!(email.subjects[0].value, "ada@example.com");
        let too_many: Vec<String> = (0..5001).map(|i| format!("u{i}")).collect();
        for (body, field) in [
            (
                json!({"regulation_type": "FORGET", "subject_type": "USER_ID", "subject_ids": ["a"]}),
                "regulation_type",
            ),
            (
                json!({"regulation_type": "UNSUPPRESS", "subject_ids": ["a"]}),
                "subject_type",
            ),
            (
                json!({"regulation_type": "UNSUPPRESS", "subject_type": "USER_ID", "subject_ids": []}),
                "subject_ids",
            ),
            (
                json!({"regulation_type": "UNSUPPRESS", "subject_type": "USER_ID", "subject_ids": too_many}),
                "subject_ids",
            ),
            (
                json!({"regulation_type": "UNSUPPRESS", "subject_type": "USER_ID", "subject_ids": ["a", 7]}),
                "subject_ids[1]",
            ),
            (
                json!({"regulation_type": "UNSUPPRESS", "subject_type": "USER_ID", "subject_ids": ["x".repeat(1025)]}),
                "subject_ids[0]",
            ),
            (
                json!({"regulation_type": "UNSUPPRESS", "subject_type": "USER_ID", "subject_ids": ["a"], "extra": 1}),
                "extra",
            ),
        ] {
            assert_eq!(
                RegulationRequest::parse(&body).unwrap_err().field,
                field,
                "{body}"
            );
        }
    }

    #[test]
    fn hashes_depend_on_space_type_and_normalized_value() {
        let a = identifier_hash("s1", &Identifier::new("email", "Ada@Example.com"));
        assert_eq!(
            a,
            identifier_hash("s1", &Identifier::new("email", "ada@example.com"))
        );
        assert_ne!(
            a,
            identifier_hash("s2", &Identifier::new("email", "ada@example.com"))
        );
        assert_ne!(
            a,
            identifier_hash("s1", &Identifier::new("user_id", "ada@example.com"))
        );
        // Length-prefixed parts: no two splits of the same bytes collide.
        assert_ne!(
            identifier_hash("s", &Identifier::new("ab", "c")),
            identifier_hash("s", &Identifier::new("a", "bc"))
        );
    }

    #[test]
    fn removal_keeps_the_rest_in_order() {
        use crate::resolve::IdentifierEntry;
        let e = |k: &str, v: &str, at| IdentifierEntry {
            id: Identifier::new(k, v),
            added_at: at,
        };
        let list = vec![
            e("user_id", "u1", 1),
            e("email", "a@x.io", 2),
            e("anonymous_id", "d1", 3),
        ];
        let (kept, removed) = without_identifiers(
            &list,
            &[
                Identifier::new("email", "A@x.io"),
                Identifier::new("email", "nope@x.io"),
            ],
        );
        assert_eq!(kept, vec![list[0].clone(), list[2].clone()]);
        assert_eq!(removed, vec![Identifier::new("email", "a@x.io")]);
        let ok =
            parse_removal(&json!({"external_ids": [{"type": "EMAIL", "id": "A@x.io"}]})).unwrap();
        assert_eq!(ok, vec![Identifier::new("email", "a@x.io")]);
        for (body, field) in [
            (json!({}), "external_ids"),
            (json!({"external_ids": []}), "external_ids"),
            (
                json!({"external_ids": [{"type": "email"}]}),
                "external_ids[0].id",
            ),
        ] {
            assert_eq!(parse_removal(&body).unwrap_err().field, field, "{body}");
        }
    }

    #[test]
    fn bounded_suppressions_drop_only_earlier_events() {
        let s = Suppression {
            id_hash: [0; 32],
            subject_hash: [0; 32],
            received_before: Some(1_000),
        };
        assert!(s.drops(999));
        assert!(!s.drops(1_000));
        let forever = Suppression {
            received_before: None,
            ..s
        };
        assert!(forever.drops(i64::MAX));
    }

    #[test]
    fn a_regulation_is_failed_or_finished_only_when_every_subject_is_done() {
        use SubjectStatus::*;
        assert_eq!(
            SubjectStatus::overall([Initialized, Initialized]),
            Initialized
        );
        assert_eq!(SubjectStatus::overall([Finished, Initialized]), Running);
        assert_eq!(SubjectStatus::overall([Finished, Failed]), Failed);
        assert_eq!(SubjectStatus::overall([Finished, Finished]), Finished);
    }
}
