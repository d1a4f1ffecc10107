//! Deterministic matching and merging with merge protection (SPEC 5).
//!
//! [`resolve`] is a pure function from an event's identifiers, a snapshot
//! of the graph around them ([`Facts`]), the space's rules and the event
//! time to a [`Plan`]. Adapters execute plans atomically with conditions
//! (claim an identifier only if unowned, update a profile only at the
//! version read) and, on conflict, gather fresh facts and resolve again.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::identifier::Identifier;
use crate::settings::{
    IdentityRules, MAX_IDENTIFIERS, MAX_IDENTIFIER_BYTES_PER_PROFILE, MAX_MERGES,
};
use crate::traits::{apply_updates, fit, merge_traits, Traits};
use crate::Millis;

/// An identifier as recorded on its profile, with when it was added: the
/// moment Kindred received the event that added it, never the client's
/// clock, so that a forged time cannot move a frequency window.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdentifierEntry {
    #[serde(flatten)]
    pub id: Identifier,
    #[serde(rename = "at")]
    pub added_at: Millis,
}

/// What resolution needs to know about one root (unmerged) profile.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct ProfileFacts {
    pub id: String,
    pub version: u64,
    pub created_at: Millis,
    /// Merges made into this profile so far, its children's included.
    pub merges: u32,
    /// Every identifier of the profile and of the profiles merged into it.
    pub identifiers: Vec<IdentifierEntry>,
    pub traits: Traits,
}

/// A snapshot of the graph around an event's identifiers.
#[derive(Clone, Debug, Default)]
pub struct Facts {
    /// For each owned incoming identifier, its owner's root profile id.
    pub owners: HashMap<Identifier, String>,
    /// Every root profile named in `owners`.
    pub profiles: HashMap<String, ProfileFacts>,
    /// Pairs of those roots that were split apart and must not merge again
    /// (each pair in both orders).
    pub apart: std::collections::HashSet<(String, String)>,
}

/// The event as resolution sees it.
#[derive(Clone, Copy, Debug)]
pub struct Incoming<'a> {
    /// Extracted identifiers, blocked ones included (they are filtered here).
    pub identifiers: &'a [Identifier],
    /// Traits the event sets (identify), if any.
    pub traits: Option<&'a Map<String, Value>>,
    /// The event time: orders trait updates and profile creation.
    pub timestamp: Millis,
    /// When Kindred received the event: merge-protection frequency windows
    /// count on it (SPEC 2), so a client's clock cannot move them.
    pub received_at: Millis,
    pub source_id: &'a str,
}

/// What to write.
#[derive(Clone, Debug, PartialEq)]
pub enum Plan {
    /// No usable identifier (all blocked): the event is kept, unattached.
    Unresolved,
    Create(Create),
    Attach(Attach),
}

#[derive(Clone, Debug, PartialEq)]
pub struct Create {
    pub profile_id: String,
    pub created_at: Millis,
    /// Claimed on creation; each must be unowned.
    pub identifiers: Vec<IdentifierEntry>,
    pub traits: Traits,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Attach {
    pub profile_id: String,
    /// The parent is written only at this version.
    pub expected_version: u64,
    /// Profiles merged into the parent, each at the version read.
    pub children: Vec<(String, u64)>,
    /// New identifiers; each must be unowned.
    pub claims: Vec<IdentifierEntry>,
    /// The parent's new identifier list, when it changes.
    pub identifiers: Option<Vec<IdentifierEntry>>,
    /// The parent's merge count after this plan.
    pub merges: u32,
    /// The parent's new traits, when they change.
    pub traits: Option<Traits>,
}

impl Plan {
    /// The profile the event lands on.
    pub fn profile_id(&self) -> Option<&str> {
        match self {
            Plan::Unresolved => None,
            Plan::Create(c) => Some(&c.profile_id),
            Plan::Attach(a) => Some(&a.profile_id),
        }
    }

    /// Whether applying the plan changes the graph or the traits (as
    /// opposed to only recording the event on its profile).
    pub fn writes_profile(&self) -> bool {
        match self {
            Plan::Unresolved => false,
            Plan::Create(_) => true,
            Plan::Attach(a) => a.identifiers.is_some() || a.traits.is_some(),
        }
    }

    /// Whether applying the plan writes the (existing or new) root
    /// profile: its facts change, or profiles merge into it. Every store
    /// conditions that write on the version it read.
    pub fn writes_root(&self) -> bool {
        match self {
            Plan::Attach(a) => self.writes_profile() || !a.children.is_empty(),
            _ => self.writes_profile(),
        }
    }
}

/// What must still hold when a plan is applied, checked in the same
/// transaction as its writes (each store translates these, and only
/// these): if one fails, the event is planned again on fresh facts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Condition<'a> {
    /// The new profile's id is not taken.
    Absent(&'a str),
    /// The profile is a root (not merged away) at this version: the root
    /// a plan writes (the version covers its identifier list, so merge
    /// protection's per-type counts are part of it), or one it merges in.
    RootAt(&'a str, u64),
    /// The profile exists: an attach that writes nothing on it (merged
    /// away since is harmless: its events stay in its root's tree).
    Exists(&'a str),
    /// No profile owns the identifier yet.
    Unclaimed(&'a Identifier),
}

impl Plan {
    /// The conditions of this plan, in a fixed order: the profile the
    /// event lands on, the profiles merged into it, the claims.
    pub fn conditions(&self) -> Vec<Condition<'_>> {
        let mut out = Vec::new();
        match self {
            Plan::Unresolved => {}
            Plan::Create(c) => {
                out.push(Condition::Absent(&c.profile_id));
                out.extend(c.identifiers.iter().map(|e| Condition::Unclaimed(&e.id)));
            }
            Plan::Attach(a) => {
                out.push(if self.writes_root() {
                    Condition::RootAt(&a.profile_id, a.expected_version)
                } else {
                    Condition::Exists(&a.profile_id)
                });
                out.extend(a.children.iter().map(|(c, v)| Condition::RootAt(c, *v)));
                out.extend(a.claims.iter().map(|e| Condition::Unclaimed(&e.id)));
            }
        }
        out
    }

    /// The version a plan's condition requires of root `profile_id`, if any.
    pub fn expected_version(&self, profile_id: &str) -> Option<u64> {
        self.conditions().into_iter().find_map(|c| match c {
            Condition::RootAt(p, v) if p == profile_id => Some(v),
            _ => None,
        })
    }
}

/// Why an identifier of an event was not used (Segment's identity
/// "violations").
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Rule {
    /// Its value is on the space's blocked list.
    Blocked,
    /// Merge protection: a type's limit (values per frequency window)
    /// would have been exceeded.
    Limit {
        kind: String,
        count: u32,
        frequency: crate::settings::Frequency,
    },
    /// The merge would have taken a profile past 100 merges.
    MergeCap,
    /// The profile would have had more than 1,000 identifiers.
    IdentifierCap,
    /// The profile's identifiers would have taken more than 256 KiB.
    IdentifierBytes,
    /// The two profiles were split apart (a wrong merge undone) and may
    /// not merge again.
    SplitBlock,
}

impl Rule {
    pub fn name(&self) -> &'static str {
        match self {
            Rule::Blocked => "blocked_value",
            Rule::Limit { .. } => "limit",
            Rule::MergeCap => "merge_cap",
            Rule::IdentifierCap => "identifier_cap",
            Rule::IdentifierBytes => "identifier_bytes",
            Rule::SplitBlock => "split_block",
        }
    }

    /// What of the rule applied, for the log.
    pub fn detail(&self) -> Value {
        match self {
            Rule::Limit {
                kind,
                count,
                frequency,
            } => serde_json::json!({"type": kind, "count": count, "frequency": frequency}),
            Rule::MergeCap => serde_json::json!({"max_merges": MAX_MERGES}),
            Rule::IdentifierCap => serde_json::json!({"max_identifiers": MAX_IDENTIFIERS}),
            Rule::IdentifierBytes => {
                serde_json::json!({"max_bytes": MAX_IDENTIFIER_BYTES_PER_PROFILE})
            }
            Rule::Blocked | Rule::SplitBlock => Value::Null,
        }
    }
}

/// An identifier of an event left out, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub id: Identifier,
    pub rule: Rule,
    /// The profile that owns it, if any (the one a merge was refused with).
    pub owner: Option<String>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Resolution {
    pub plan: Plan,
    /// Every identifier left out, with the rule (blocked or merge
    /// protection), in the order they were left out.
    pub refusals: Vec<Refusal>,
    /// Trait keys dropped to keep the profile's traits within 64 KiB
    /// (the oldest values go first).
    pub dropped_traits: Vec<String>,
}

/// Resolves one event (SPEC 5, steps 1-4). `new_profile_id` is used if a
/// profile has to be created.
pub fn resolve(
    incoming: &Incoming<'_>,
    facts: &Facts,
    rules: &IdentityRules,
    new_profile_id: &str,
) -> Resolution {
    let now = incoming.received_at;
    let mut ids: Vec<Identifier> = Vec::new();
    let mut refusals: Vec<Refusal> = Vec::new();
    for id in incoming.identifiers {
        if rules.is_blocked(id) {
            if !refusals.iter().any(|r| &r.id == id) {
                refusals.push(Refusal {
                    id: id.clone(),
                    rule: Rule::Blocked,
                    owner: None,
                });
            }
        } else if !ids.contains(id) {
            ids.push(id.clone());
        }
    }
    loop {
        if ids.is_empty() {
            return Resolution {
                plan: Plan::Unresolved,
                refusals,
                dropped_traits: Vec::new(),
            };
        }
        // Step 1: the profiles owning any identifier, oldest first.
        let mut found: Vec<&ProfileFacts> = Vec::new();
        let mut new_ids: Vec<&Identifier> = Vec::new();
        for id in &ids {
            match facts.owners.get(id).and_then(|p| facts.profiles.get(p)) {
                Some(p) => {
                    if !found.iter().any(|f| f.id == p.id) {
                        found.push(p);
                    }
                }
                None => new_ids.push(id),
            }
        }
        found.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));

        // Step 3: merge protection over the union.
        let unchanged = found.len() == 1 && new_ids.is_empty();
        let split = found.iter().enumerate().any(|(i, a)| {
            found[i + 1..]
                .iter()
                .any(|b| facts.apart.contains(&(a.id.clone(), b.id.clone())))
        });
        let broken = if split {
            Some(Rule::SplitBlock)
        } else if unchanged {
            None
        } else {
            broken_limit(&found, &new_ids, rules, now)
        };
        let Some(rule) = broken else {
            let (plan, dropped_traits) = build_plan(incoming, &found, &new_ids, new_profile_id);
            return Resolution {
                plan,
                refusals,
                dropped_traits,
            };
        };
        // Drop the incoming identifier of lowest priority and run again.
        let weakest = ids
            .iter()
            .enumerate()
            .max_by(|(_, a), (_, b)| {
                let (ra, rb) = (rules.rule(&a.kind), rules.rule(&b.kind));
                (ra.priority, &a.kind, &a.value).cmp(&(rb.priority, &b.kind, &b.value))
            })
            .map(|(i, _)| i)
            .expect("ids is not empty");
        let id = ids.remove(weakest);
        refusals.push(Refusal {
            owner: facts.owners.get(&id).cloned(),
            id,
            rule,
        });
    }
}

/// The limit the union of the found profiles and the new identifiers
/// would break, if any. A type already over its limit in one profile
/// (settings lowered later) only breaks it if the union makes it worse.
fn broken_limit(
    found: &[&ProfileFacts],
    new_ids: &[&Identifier],
    rules: &IdentityRules,
    now: Millis,
) -> Option<Rule> {
    let mut union: BTreeMap<&Identifier, Millis> = BTreeMap::new();
    for p in found {
        for e in &p.identifiers {
            let at = union.entry(&e.id).or_insert(e.added_at);
            *at = (*at).min(e.added_at);
        }
    }
    for id in new_ids {
        union.entry(id).or_insert(now);
    }
    if found.len() > 1 {
        let merges: u32 = found.iter().map(|p| p.merges).sum::<u32>() + found.len() as u32 - 1;
        if merges > MAX_MERGES {
            return Some(Rule::MergeCap);
        }
    }
    let largest = found.iter().map(|p| p.identifiers.len()).max().unwrap_or(0);
    if union.len() > MAX_IDENTIFIERS && union.len() > largest {
        return Some(Rule::IdentifierCap);
    }
    let bytes = |ids: &mut dyn Iterator<Item = &Identifier>| -> usize {
        ids.map(crate::settings::stored_identifier_bytes).sum()
    };
    let union_bytes = bytes(&mut union.keys().copied());
    if union_bytes > MAX_IDENTIFIER_BYTES_PER_PROFILE {
        let largest_bytes = found
            .iter()
            .map(|p| bytes(&mut p.identifiers.iter().map(|e| &e.id)))
            .max()
            .unwrap_or(0);
        if union_bytes > largest_bytes {
            return Some(Rule::IdentifierBytes);
        }
    }
    let in_window = |kind: &str, entries: &mut dyn Iterator<Item = (&Identifier, Millis)>| {
        let rule = rules.rule(kind);
        let since = rule.limit.frequency.window().map(|w| now - w);
        entries
            .filter(|(id, at)| id.kind == kind && since.is_none_or(|s| *at > s))
            .count()
    };
    let mut kinds: Vec<&str> = union.keys().map(|id| id.kind.as_str()).collect();
    kinds.dedup();
    for kind in kinds {
        let count = in_window(kind, &mut union.iter().map(|(id, at)| (*id, *at)));
        if count <= rules.rule(kind).limit.count as usize {
            continue;
        }
        let before = found
            .iter()
            .map(|p| in_window(kind, &mut p.identifiers.iter().map(|e| (&e.id, e.added_at))))
            .max()
            .unwrap_or(0);
        if count > before {
            let rule = rules.rule(kind);
            return Some(Rule::Limit {
                kind: kind.to_string(),
                count: rule.limit.count,
                frequency: rule.limit.frequency,
            });
        }
    }
    None
}

fn build_plan(
    incoming: &Incoming<'_>,
    found: &[&ProfileFacts],
    new_ids: &[&Identifier],
    new_profile_id: &str,
) -> (Plan, Vec<String>) {
    let now = incoming.timestamp;
    let claims: Vec<IdentifierEntry> = new_ids
        .iter()
        .map(|id| IdentifierEntry {
            id: (*id).clone(),
            added_at: incoming.received_at,
        })
        .collect();
    let Some((parent, children)) = found.split_first() else {
        let mut traits = Traits::new();
        if let Some(updates) = incoming.traits {
            apply_updates(&mut traits, updates, now, incoming.source_id);
        }
        let dropped = fit(&mut traits);
        let plan = Plan::Create(Create {
            profile_id: new_profile_id.to_string(),
            created_at: now,
            identifiers: claims,
            traits,
        });
        return (plan, dropped);
    };
    let mut traits_changed = !children.is_empty();
    let mut traits = parent.traits.clone();
    for child in children {
        merge_traits(&mut traits, &child.traits);
    }
    if let Some(updates) = incoming.traits {
        traits_changed |= apply_updates(&mut traits, updates, now, incoming.source_id);
    }
    let dropped = if traits_changed {
        fit(&mut traits)
    } else {
        Vec::new()
    };
    let identifiers = (!children.is_empty() || !claims.is_empty()).then(|| {
        let mut all = parent.identifiers.clone();
        for child in children {
            all.extend(child.identifiers.iter().cloned());
        }
        all.extend(claims.iter().cloned());
        all
    });
    let plan = Plan::Attach(Attach {
        profile_id: parent.id.clone(),
        expected_version: parent.version,
        children: children.iter().map(|c| (c.id.clone(), c.version)).collect(),
        claims,
        identifiers,
        merges: parent.merges + children.iter().map(|c| c.merges + 1).sum::<u32>(),
        traits: traits_changed.then_some(traits),
    });
    (plan, dropped)
}

#[cfg(test)]
mod condition_tests {
    use super::*;

    fn entry(value: &str) -> IdentifierEntry {
        IdentifierEntry {
            id: Identifier::new("email", value),
            added_at: 1,
        }
    }

    #[test]
    fn each_plan_states_what_its_writes_depend_on() {
        assert!(Plan::Unresolved.conditions().is_empty());
        let create = Plan::Create(Create {
            profile_id: "p".into(),
            created_at: 1,
            identifiers: vec![entry("a@x.io")],
            traits: Traits::new(),
        });
        let a = Identifier::new("email", "a@x.io");
        assert_eq!(
            create.conditions(),
            [Condition::Absent("p"), Condition::Unclaimed(&a)]
        );
        let attach = |claims: Vec<IdentifierEntry>, children: Vec<(String, u64)>| Attach {
            profile_id: "root".into(),
            expected_version: 4,
            children,
            identifiers: (!claims.is_empty()).then(|| claims.clone()),
            claims,
            merges: 0,
            traits: None,
        };
        // Only recording the event: the profile must exist, at any version.
        let plain = Plan::Attach(attach(vec![], vec![]));
        assert_eq!(plain.conditions(), [Condition::Exists("root")]);
        let merge = Plan::Attach(attach(vec![entry("a@x.io")], vec![("child".into(), 2)]));
        assert_eq!(
            merge.conditions(),
            [
                Condition::RootAt("root", 4),
                Condition::RootAt("child", 2),
                Condition::Unclaimed(&a)
            ]
        );
        assert_eq!(merge.expected_version("child"), Some(2));
        assert_eq!(merge.expected_version("other"), None);
    }
}
