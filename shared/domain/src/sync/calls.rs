//! The Segment-spec calls that a change, a current value (initial sync),
//! a merge or a deletion becomes for one destination, and the messageId
//! receivers deduplicate on.

use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};

use crate::compute::{computation_id, Class};
use crate::resolve::IdentifierEntry;
use crate::Identifier;

use super::settings::*;

/// A change of the outbound change log, as the sync step reads it.
#[derive(Clone, Debug, PartialEq)]
pub struct ChangeEntry<'a> {
    /// The change's position in the space's log; `None` for a current
    /// value sent by an initial sync.
    pub seq: Option<i64>,
    pub key: &'a str,
    pub class: Class,
    pub new: &'a Value,
    pub at: &'a str,
    /// The account of an account-level change: its calls go to each of
    /// the account's users with `context.groupId` (as Segment sends
    /// account audiences).
    pub group_id: Option<&'a str>,
}

/// A deterministic messageId: the same (change, destination, identifier)
/// always gets the same id, so receivers can deduplicate retries.
pub fn message_id(parts: &[&str]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_le_bytes());
        h.update(p.as_bytes());
    }
    let digest = h.finalize();
    let hex: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
    format!("kdr-{hex}")
}

/// The values a call is addressed with: `userId`, `anonymousId` and
/// traits for the other identifier types (`email`).
#[derive(Clone, Debug, Default, PartialEq)]
struct Address {
    user_id: Option<String>,
    anonymous_id: Option<String>,
    other: Vec<(String, String)>,
    /// What the messageId names.
    label: String,
}

/// The profile's identifiers of `types`, in the order they were added.
fn of_types<'a>(ids: &'a [IdentifierEntry], types: &[String]) -> Vec<&'a IdentifierEntry> {
    let mut out: Vec<&IdentifierEntry> =
        ids.iter().filter(|e| types.contains(&e.id.kind)).collect();
    out.sort_by_key(|a| a.added_at);
    out
}

fn addresses(settings: &Settings, ids: &[IdentifierEntry]) -> Vec<Address> {
    let chosen = of_types(ids, &settings.id_types);
    let one = |e: &IdentifierEntry| {
        let mut a = Address {
            label: format!("{}:{}", e.id.kind, e.id.value),
            ..Address::default()
        };
        a.set(&e.id.kind, &e.id.value);
        a
    };
    match settings.strategy {
        Strategy::All => {
            // The value of a call about an email needs a userId or an
            // anonymousId too (the Segment spec requires one): the
            // profile's latest.
            let fallback_user = latest(ids, "user_id");
            let fallback_anon = latest(ids, "anonymous_id");
            chosen
                .into_iter()
                .map(|e| {
                    let mut a = one(e);
                    if a.user_id.is_none() && a.anonymous_id.is_none() {
                        a.user_id = fallback_user.clone();
                        if a.user_id.is_none() {
                            a.anonymous_id = fallback_anon.clone();
                        }
                    }
                    a
                })
                .collect()
        }
        Strategy::FirstAdded | Strategy::LastAdded => {
            let mut a = Address::default();
            let mut labels = Vec::new();
            for t in &settings.id_types {
                let of_type = chosen.iter().filter(|e| e.id.kind == *t);
                let pick = if settings.strategy == Strategy::FirstAdded {
                    of_type.min_by_key(|e| e.added_at)
                } else {
                    of_type.max_by_key(|e| e.added_at)
                };
                if let Some(e) = pick {
                    a.set(&e.id.kind, &e.id.value);
                    labels.push(format!("{}:{}", e.id.kind, e.id.value));
                }
            }
            if labels.is_empty() {
                return Vec::new();
            }
            if a.user_id.is_none() && a.anonymous_id.is_none() {
                a.user_id = latest(ids, "user_id");
                if a.user_id.is_none() {
                    a.anonymous_id = latest(ids, "anonymous_id");
                }
            }
            a.label = labels.join("|");
            vec![a]
        }
    }
}

fn latest(ids: &[IdentifierEntry], kind: &str) -> Option<String> {
    ids.iter()
        .filter(|e| e.id.kind == kind)
        .max_by_key(|e| e.added_at)
        .map(|e| e.id.value.clone())
}

impl Address {
    fn set(&mut self, kind: &str, value: &str) {
        match kind {
            "user_id" => self.user_id = Some(value.to_string()),
            "anonymous_id" => self.anonymous_id = Some(value.to_string()),
            _ => self.other.push((kind.to_string(), value.to_string())),
        }
    }

    /// Adds `userId` / `anonymousId` to a call, and the other identifiers
    /// to `traits` (identify) or `context.traits` (track).
    fn fill(&self, call: &mut Map<String, Value>, traits_field: &str) {
        if let Some(u) = &self.user_id {
            call.insert("userId".into(), json!(u));
        }
        if let Some(a) = &self.anonymous_id {
            call.insert("anonymousId".into(), json!(a));
        }
        if !self.other.is_empty() {
            let traits = call
                .entry(traits_field.to_string())
                .or_insert_with(|| json!({}));
            for (k, v) in &self.other {
                traits[k] = json!(v);
            }
        }
    }
}

/// `context.personas` of a call about `key`, in the given form.
pub fn personas(form: Personas, space_id: &str, class: Class, key: &str) -> Value {
    match form {
        Personas::Segment => json!({
            "computation_class": class.segment_name(),
            "computation_id": computation_id(space_id, class, key),
            "computation_key": key,
            "namespace": format!("spa_{space_id}"),
            "space_id": space_id,
        }),
        Personas::KindredV1 => json!({
            "computation_class": class.as_str(),
            "computation_key": key,
            "computation_id": key,
            "space_id": space_id,
        }),
    }
}

/// The Segment-spec calls one change (or current value) becomes for one
/// destination: for each address of the id-sync strategy, an identify
/// with `{key: value}` and/or a track (`Audience Entered` / `Audience
/// Exited` for audiences, `Trait Computed` for traits), each with a
/// deterministic messageId. Empty if the key is not selected or the
/// profile has none of the destination's identifier types.
pub fn change_calls(
    space_id: &str,
    destination_id: &str,
    settings: &Settings,
    profile_id: &str,
    ids: &[IdentifierEntry],
    change: &ChangeEntry<'_>,
) -> Vec<Value> {
    change_calls_to(
        space_id,
        destination_id,
        settings,
        profile_id,
        ids,
        change,
        None,
    )
}

/// [`change_calls`], only to the addresses that carry one of `only` (the
/// identifiers a profile just gained) when given.
pub fn change_calls_to(
    space_id: &str,
    destination_id: &str,
    settings: &Settings,
    profile_id: &str,
    ids: &[IdentifierEntry],
    change: &ChangeEntry<'_>,
    only: Option<&[Identifier]>,
) -> Vec<Value> {
    if !settings.selects(change.key) {
        return Vec::new();
    }
    let mut personas = personas(settings.personas, space_id, change.class, change.key);
    personas["profile_id"] = json!(profile_id);
    let origin = match change.seq {
        Some(seq) if change.group_id.is_some() => format!("change:{seq}:{profile_id}"),
        Some(seq) => format!("change:{seq}"),
        None => match change.group_id {
            Some(g) => format!("current:{profile_id}:{g}:{}:{}", change.key, change.new),
            None => format!("current:{profile_id}:{}:{}", change.key, change.new),
        },
    };
    let mut calls = Vec::new();
    let wanted = |a: &Address| {
        only.is_none_or(|only| {
            a.label.split('|').any(|l| {
                only.iter()
                    .any(|id| l.split_once(':') == Some((&id.kind, &id.value)))
            })
        })
    };
    for address in addresses(settings, ids).into_iter().filter(wanted) {
        let id_of =
            |call: &str| message_id(&[space_id, destination_id, &origin, call, &address.label]);
        if settings.identify {
            let mut call = Map::new();
            call.insert("type".into(), json!("identify"));
            call.insert("messageId".into(), json!(id_of("identify")));
            call.insert("traits".into(), json!({ change.key: change.new }));
            address.fill(&mut call, "traits");
            call.insert("timestamp".into(), json!(change.at));
            call.insert("context".into(), context(&personas, change.group_id));
            calls.push(Value::Object(call));
        }
        if settings.track {
            let (event, properties) = match change.class {
                Class::Audience => (
                    if change.new == &Value::Bool(true) {
                        "Audience Entered"
                    } else {
                        "Audience Exited"
                    },
                    json!({"audience_key": change.key, change.key: change.new}),
                ),
                Class::ComputedTrait => (
                    "Trait Computed",
                    json!({"trait_key": change.key, change.key: change.new}),
                ),
            };
            let mut call = Map::new();
            call.insert("type".into(), json!("track"));
            call.insert("messageId".into(), json!(id_of("track")));
            call.insert("event".into(), json!(event));
            call.insert("properties".into(), properties);
            address.fill(&mut call, "context_traits");
            let context_traits = call.remove("context_traits");
            call.insert("timestamp".into(), json!(change.at));
            let mut context = context(&personas, change.group_id);
            if let Some(t) = context_traits {
                context["traits"] = t;
            }
            call.insert("context".into(), context);
            calls.push(Value::Object(call));
        }
    }
    calls
}

/// A change call's `context`: its `personas`, and the account's
/// `groupId` for an account-level change.
fn context(personas: &Value, group_id: Option<&str>) -> Value {
    let mut context = json!({ "personas": personas });
    if let Some(g) = group_id {
        context["groupId"] = json!(g);
    }
    context
}

/// Whether an initial sync sends this current value: audience members,
/// and traits that have a value.
pub fn worth_initial_sync(class: Class, value: &Value) -> bool {
    match class {
        Class::Audience => value == &Value::Bool(true),
        Class::ComputedTrait => !value.is_null(),
    }
}

/// The `alias` call a merge becomes for a destination with
/// `alias_on_merge`: the merged-away profile's user id (or anonymous id)
/// as `previousId`, the surviving profile's user id as `userId`. `None`
/// when either side has no such identifier.
pub fn alias_call(
    space_id: &str,
    destination_id: &str,
    merge_seq: i64,
    child: &[IdentifierEntry],
    parent: &[IdentifierEntry],
    at: &str,
) -> Option<Value> {
    let own: Vec<IdentifierEntry> = parent
        .iter()
        .filter(|e| !child.iter().any(|c| c.id == e.id))
        .cloned()
        .collect();
    // The user id survives; the other side's id is the previous one. A
    // merge into an anonymous profile aliases that profile's anonymous id
    // to the merged-in user.
    let (previous, user) = match (latest(&own, "user_id"), latest(child, "user_id")) {
        (Some(p), child_user) => (child_user.or_else(|| latest(child, "anonymous_id"))?, p),
        (None, Some(c)) => (latest(&own, "anonymous_id")?, c),
        (None, None) => return None,
    };
    if user == previous {
        return None;
    }
    Some(json!({
        "type": "alias",
        "messageId": message_id(&[space_id, destination_id, &format!("merge:{merge_seq}"), "alias"]),
        "previousId": previous,
        "userId": user,
        "timestamp": at,
        "context": {"personas": {"space_id": space_id}},
    }))
}

/// The `delete` calls a regulation's deletion of a profile becomes for a
/// destination with `forward_deletes`, in Segment's shape (what its
/// webhooks receive for a deleted user): one per user id of the profile,
/// or per anonymous id when it has none; none when it has neither.
pub fn delete_calls(
    space_id: &str,
    destination_id: &str,
    regulation_id: &str,
    ids: &[IdentifierEntry],
    at: &str,
) -> Vec<Value> {
    let users: Vec<&IdentifierEntry> = ids.iter().filter(|e| e.id.kind == "user_id").collect();
    let (field, chosen) = if users.is_empty() {
        (
            "anonymousId",
            ids.iter().filter(|e| e.id.kind == "anonymous_id").collect(),
        )
    } else {
        ("userId", users)
    };
    chosen
        .into_iter()
        .map(|e| {
            json!({
                "type": "delete",
                "messageId": message_id(&[space_id, destination_id, &format!("regulation:{regulation_id}"), "delete", &e.id.value]),
                field: e.id.value,
                "timestamp": at,
                "context": {"personas": {"space_id": space_id}, "regulation_id": regulation_id},
            })
        })
        .collect()
}
