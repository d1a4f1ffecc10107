//! Computed traits and audiences (SPEC 7-10): definitions, the incremental
//! engine that keeps them exact as events arrive and as time passes, and
//! the changes they emit for the sync step.
//!
//! The engine is pure: adapters hand it a profile's state, its custom
//! traits, an event or a moment, and store what it returns.

mod definition;
mod ops;
mod state;

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

pub use definition::{
    check_user_conditions, computation_id, evaluation_order, valid_key, Aggregate, Body, Class,
    Collection, ComputedTrait, Condition, Count, Definition, DefinitionError, EventMatch, Filter,
    Funnel, Op, Quantifier, Span, Test, TraitKind, Window, HOUR_MS, MAX_DEFINITIONS,
    MAX_EXPRESSIONS, MAX_WHERE_FILTERS,
};
pub use state::{hour, Acc, DefState, EventFacts};

use crate::event::{Event, EventKind};
use crate::traits::Traits;
use crate::Millis;

/// Computed values of one profile by definition key; a key without a
/// value is absent.
pub type Values = BTreeMap<String, Value>;

/// How many moments ahead the engine looks for the next change of a
/// profile's values before settling for a recheck at the last one.
const MAX_LOOKAHEAD: usize = 64;

impl Event {
    /// The event as computations see it; `None` for calls that carry no
    /// event (identify, group, alias).
    pub fn facts(&self) -> Option<EventFacts<'_>> {
        let name = match self.kind {
            EventKind::Track => self.name.as_deref()?,
            EventKind::Page => "Page Viewed",
            EventKind::Screen => "Screen Viewed",
            _ => return None,
        };
        Some(EventFacts {
            name,
            timestamp: self.timestamp,
            properties: self.object("properties"),
        })
    }
}

/// The state of every definition for one profile.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ProfileState {
    pub defs: BTreeMap<String, DefState>,
}

/// A space's definitions, in evaluation order: the user-level ones (which
/// every method but the `account` ones works with) and the account-level
/// ones.
#[derive(Clone, Debug, Default)]
pub struct Ruleset {
    defs: Vec<Definition>,
    accounts: Vec<Definition>,
    /// Each definition's position in `defs`, by key.
    index: HashMap<String, usize>,
    /// The keys, sorted (the order of a state's map).
    sorted_keys: Vec<String>,
    /// See [`Ruleset::reads_custom_traits`] (worked out once).
    reads_custom: bool,
}

impl Ruleset {
    /// Checks references and cycles and orders the definitions.
    pub fn new(defs: Vec<Definition>) -> Result<Ruleset, DefinitionError> {
        let (accounts, defs): (Vec<_>, Vec<_>) = defs
            .into_iter()
            .partition(|d| d.collection == Collection::Accounts);
        check_user_conditions(&accounts, &defs)?;
        let ordered = |defs: Vec<Definition>| -> Result<Vec<Definition>, DefinitionError> {
            let order = evaluation_order(&defs)?;
            let mut slots: Vec<Option<Definition>> = defs.into_iter().map(Some).collect();
            Ok(order.into_iter().filter_map(|i| slots[i].take()).collect())
        };
        let mut ruleset = Ruleset {
            defs: ordered(defs)?,
            accounts: ordered(accounts)?,
            index: HashMap::new(),
            sorted_keys: Vec::new(),
            reads_custom: false,
        };
        ruleset.index = (ruleset.defs.iter().enumerate())
            .map(|(i, d)| (d.key.clone(), i))
            .collect();
        ruleset.sorted_keys = ruleset.defs.iter().map(|d| d.key.clone()).collect();
        ruleset.sorted_keys.sort();
        ruleset.reads_custom = ruleset.defs.iter().any(|d| {
            let mut names = BTreeSet::new();
            if let Body::Audience(c) = &d.body {
                c.references(&mut names);
            }
            names.iter().any(|n| ruleset.get(n).is_none())
        });
        Ok(ruleset)
    }

    pub fn definitions(&self) -> &[Definition] {
        &self.defs
    }

    /// The account-level definitions, in evaluation order.
    pub fn account_definitions(&self) -> &[Definition] {
        &self.accounts
    }

    /// Whether some account definition reads events: its own (counted
    /// over all its users' events) or a user's in a `users` condition.
    pub fn accounts_read_events(&self) -> bool {
        fn reads(c: &Condition) -> bool {
            match c {
                Condition::Performed { .. } | Condition::NotPerformed { .. } => true,
                Condition::Users { of, .. } => match &of.body {
                    Body::Audience(c) => reads(c),
                    Body::Trait(_) => true,
                },
                Condition::And(cs) | Condition::Or(cs) => cs.iter().any(reads),
                Condition::Not(c) => reads(c),
                Condition::Trait { .. } | Condition::Audience(_) => false,
            }
        }
        self.accounts.iter().any(|d| match &d.body {
            Body::Trait(_) => true,
            Body::Audience(c) => reads(c),
        })
    }

    /// Every account definition's value at `now`, for an account with
    /// `traits` and these users. Account computed traits and `performed`
    /// conditions count the events of all its users together (as
    /// Segment's do); a `users` condition is evaluated on each user with
    /// that user's own events, traits and computed values.
    pub fn evaluate_account(&self, traits: &Traits, members: &[Member<'_>], now: Millis) -> Values {
        let mut all: Vec<EventFacts<'_>> = members
            .iter()
            .flat_map(|m| m.events.iter().copied())
            .collect();
        all.sort_by_key(|e| e.timestamp);
        let mut values = Values::new();
        for d in &self.accounts {
            let s = rebuild(d, all.iter().copied());
            if let Some(v) = evaluate_in(d, &s, traits, &values, now, members) {
                values.insert(d.key.clone(), v);
            }
        }
        values
    }

    /// Whether some audience reads a trait that no definition computes
    /// (a custom trait of the profile).
    pub fn reads_custom_traits(&self) -> bool {
        self.reads_custom
    }

    pub fn is_empty(&self) -> bool {
        self.defs.is_empty()
    }

    pub fn get(&self, key: &str) -> Option<&Definition> {
        self.index.get(key).map(|&i| &self.defs[i])
    }

    /// The state of a profile without events: every definition built, empty.
    pub fn fresh(&self) -> ProfileState {
        ProfileState {
            defs: self
                .defs
                .iter()
                .map(|d| (d.key.clone(), DefState::empty(d)))
                .collect(),
        }
    }

    /// Definitions whose state is missing or was built for another
    /// version: they must be rebuilt from history before `apply`.
    pub fn stale<'a>(&'a self, state: &ProfileState) -> Vec<&'a Definition> {
        self.defs
            .iter()
            .filter(|d| Self::is_stale(d, state))
            .collect()
    }

    /// Whether [`Ruleset::stale`] has any definitions, without listing them.
    pub fn has_stale(&self, state: &ProfileState) -> bool {
        self.defs.iter().any(|d| Self::is_stale(d, state))
    }

    /// The state has no current state for this definition.
    fn is_stale(d: &Definition, state: &ProfileState) -> bool {
        state.defs.get(&d.key).is_none_or(|s| s.v != d.version)
    }

    /// Drops states of definitions that no longer exist.
    pub fn retain_known(&self, state: &mut ProfileState) {
        // (Usually the state has exactly the definitions' keys: one pass
        // over both sorted lists tells.)
        if state.defs.keys().eq(self.sorted_keys.iter()) {
            return;
        }
        state.defs.retain(|k, _| self.get(k).is_some());
    }

    /// Folds one event into every definition's state (missing states start empty).
    pub fn apply(&self, state: &mut ProfileState, event: &EventFacts<'_>) {
        for d in &self.defs {
            let s = state
                .defs
                .entry(d.key.clone())
                .or_insert_with(|| DefState::empty(d));
            apply_one(d, s, event);
        }
    }

    /// Folds a merged-away profile's state in. A definition either side
    /// has no current state for is dropped: the caller rebuilds it from
    /// the merged history (see [`Ruleset::stale`]).
    pub fn merge(&self, into: &mut ProfileState, other: ProfileState) {
        for (key, theirs) in other.defs {
            let Some(d) = self.get(&key) else { continue };
            match into.defs.get_mut(&key) {
                Some(ours) if ours.v == d.version && theirs.v == d.version => ours.merge(theirs),
                Some(_) => {
                    into.defs.remove(&key);
                }
                // Ours is not built: it will be rebuilt from the whole
                // tree's history, which includes theirs.
                None => {}
            }
        }
    }

    /// Forgets what can no longer count at `now` or later.
    pub fn prune(&self, state: &mut ProfileState, now: Millis) {
        for d in &self.defs {
            if let Some(s) = state.defs.get_mut(&d.key) {
                for (leaf, acc) in state::leaves(d).iter().zip(s.l.iter_mut()) {
                    leaf.prune(acc, now);
                }
            }
        }
    }

    /// Every definition's value at `now`.
    pub fn evaluate(&self, state: &ProfileState, traits: &Traits, now: Millis) -> Values {
        let mut values = Values::new();
        for d in &self.defs {
            let value = match state.defs.get(&d.key) {
                Some(s) if s.v == d.version => evaluate_one(d, s, traits, &values, now),
                // Not built yet: no value rather than a wrong one.
                _ => None,
            };
            if let Some(v) = value {
                values.insert(d.key.clone(), v);
            }
        }
        values
    }

    /// The first moment after `now` at which some value will differ from
    /// its value at `now` by time alone; `None` if none ever will. When
    /// more than [`MAX_LOOKAHEAD`] moments pass without a change, the last
    /// one is returned as a moment to look again.
    pub fn next_change(
        &self,
        state: &ProfileState,
        traits: &Traits,
        now: Millis,
    ) -> Option<Millis> {
        let current = self.evaluate(state, traits, now);
        self.next_change_from(state, traits, now, &current)
    }

    /// [`Ruleset::next_change`] for a caller that already holds the
    /// values at `now`.
    pub fn next_change_from(
        &self,
        state: &ProfileState,
        traits: &Traits,
        now: Millis,
        current: &Values,
    ) -> Option<Millis> {
        // Until the first change, every value is its current one, so each
        // definition can be checked alone at its own moments with the
        // others' current values. The first definition to change (in
        // time) changes at one of its own moments: one whose inputs are
        // all unchanged then. So the earliest change any of them finds
        // alone is the first change of all.
        let mut first: Option<Millis> = None;
        let mut moments = Vec::new();
        for d in &self.defs {
            let Some(s) = state.defs.get(&d.key).filter(|s| s.v == d.version) else {
                continue;
            };
            moments.clear();
            for (leaf, acc) in state::leaves(d).iter().zip(&s.l) {
                leaf.moments(acc, now, &mut moments);
            }
            if let Body::Audience(c) = &d.body {
                relative_moments(c, traits, current, &mut moments);
            }
            moments.retain(|t| *t > now && first.is_none_or(|f| *t < f));
            moments.sort_unstable();
            moments.dedup();
            let before = current.get(&d.key);
            for (i, t) in moments.iter().enumerate() {
                if i == MAX_LOOKAHEAD {
                    // Look again then: too far ahead to be worth checking now.
                    first = Some(*t);
                    break;
                }
                if evaluate_one(d, s, traits, current, *t).as_ref() != before {
                    first = Some(*t);
                    break;
                }
            }
        }
        first
    }
}

/// The moments at which the relative date conditions on traits in `c`
/// may change their answer, given the traits and values at hand.
fn relative_moments(c: &Condition, traits: &Traits, values: &Values, out: &mut Vec<Millis>) {
    match c {
        Condition::Trait { name, test } if test.op.is_relative() => {
            let v = values
                .get(name)
                .or_else(|| traits.get(name).map(|t| &t.value));
            ops::relative_moments(test, v, out);
        }
        Condition::And(cs) | Condition::Or(cs) => cs
            .iter()
            .for_each(|c| relative_moments(c, traits, values, out)),
        Condition::Not(c) => relative_moments(c, traits, values, out),
        _ => {}
    }
}

fn apply_one(d: &Definition, s: &mut DefState, event: &EventFacts<'_>) {
    for (leaf, acc) in state::leaves(d).iter().zip(s.l.iter_mut()) {
        leaf.apply(acc, event);
    }
}

/// Builds one definition's state from a profile's history.
pub fn rebuild<'a>(d: &Definition, events: impl IntoIterator<Item = EventFacts<'a>>) -> DefState {
    let mut s = DefState::empty(d);
    for e in events {
        apply_one(d, &mut s, &e);
    }
    s
}

/// One user of an account, as account conditions see it.
#[derive(Clone, Copy, Debug)]
pub struct Member<'a> {
    pub traits: &'a Traits,
    /// The user's computed traits and audiences.
    pub values: &'a Values,
    /// The user's events, oldest first (empty when no account definition
    /// reads events: see [`Ruleset::accounts_read_events`]).
    pub events: &'a [EventFacts<'a>],
}

fn evaluate_one(
    d: &Definition,
    s: &DefState,
    traits: &Traits,
    values: &Values,
    now: Millis,
) -> Option<Value> {
    evaluate_in(d, s, traits, values, now, &[])
}

/// [`evaluate_one`] of an account definition, whose `users` conditions
/// look at `members`.
fn evaluate_in(
    d: &Definition,
    s: &DefState,
    traits: &Traits,
    values: &Values,
    now: Millis,
    members: &[Member<'_>],
) -> Option<Value> {
    let leaves = state::leaves(d);
    match &d.body {
        Body::Trait(_) => leaves.first().and_then(|l| l.value(&s.l[0], now)),
        Body::Audience(c) => {
            let mut next = 0;
            let env = Env {
                leaves: &leaves,
                accs: &s.l,
                traits,
                values,
                now,
                members,
            };
            Some(Value::Bool(env.holds(c, &mut next)))
        }
    }
}

struct Env<'a> {
    leaves: &'a [state::Leaf<'a>],
    accs: &'a [Acc],
    traits: &'a Traits,
    values: &'a Values,
    now: Millis,
    members: &'a [Member<'a>],
}

impl Env<'_> {
    /// Whether `c` holds; `next` walks the leaves in the order
    /// [`state::leaves`] lists them, so every leaf is visited (no
    /// short-circuit).
    fn holds(&self, c: &Condition, next: &mut usize) -> bool {
        match c {
            Condition::Performed { count, .. } => {
                let n = self.leaves[*next].count(&self.accs[*next], self.now);
                *next += 1;
                count.holds(n)
            }
            Condition::NotPerformed { .. } => {
                let n = self.leaves[*next].count(&self.accs[*next], self.now);
                *next += 1;
                n == 0
            }
            Condition::Trait { name, test } => {
                let v = self
                    .values
                    .get(name)
                    .or_else(|| self.traits.get(name).map(|t| &t.value));
                ops::test_at(test, v, self.now)
            }
            Condition::Audience(key) => self.values.get(key) == Some(&Value::Bool(true)),
            Condition::Users { quantifier, of } => {
                let mut matching = self.members.iter().map(|m| {
                    let s = rebuild(of, m.events.iter().copied());
                    evaluate_one(of, &s, m.traits, m.values, self.now) == Some(Value::Bool(true))
                });
                match quantifier {
                    Quantifier::Any => matching.any(|b| b),
                    Quantifier::All => !self.members.is_empty() && matching.all(|b| b),
                    Quantifier::None => !matching.any(|b| b),
                }
            }
            Condition::And(cs) => {
                let all: Vec<bool> = cs.iter().map(|c| self.holds(c, next)).collect();
                all.into_iter().all(|b| b)
            }
            Condition::Or(cs) => {
                let all: Vec<bool> = cs.iter().map(|c| self.holds(c, next)).collect();
                all.into_iter().any(|b| b)
            }
            Condition::Not(c) => !self.holds(c, next),
        }
    }
}

/// One computed value that changed: the input of the sync step.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Change {
    pub key: String,
    pub class: Class,
    pub old: Option<Value>,
    /// `null`: the trait no longer has a value.
    pub new: Value,
}

impl Serialize for Class {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Class {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Class::parse(&s).ok_or_else(|| serde::de::Error::custom("unknown class"))
    }
}

/// A value that is not worth announcing for a profile that never had one.
fn is_blank(v: &Value) -> bool {
    match v {
        Value::Null | Value::Bool(false) => true,
        Value::Number(n) => n.as_f64() == Some(0.0),
        Value::Array(a) => a.is_empty(),
        _ => false,
    }
}

/// Compares freshly computed values with the stored ones: returns the
/// values to store and the changes to announce. A profile that never had
/// a value does not get (or announce) a blank one (`false`, `0`, `[]`);
/// keys of deleted definitions are dropped silently.
pub fn settle(ruleset: &Ruleset, stored: &Values, computed: &Values) -> (Values, Vec<Change>) {
    settle_over(ruleset.definitions(), stored, computed)
}

/// [`settle`] for an account's values (its account definitions).
pub fn settle_account(
    ruleset: &Ruleset,
    stored: &Values,
    computed: &Values,
) -> (Values, Vec<Change>) {
    settle_over(ruleset.account_definitions(), stored, computed)
}

fn settle_over(defs: &[Definition], stored: &Values, computed: &Values) -> (Values, Vec<Change>) {
    let mut out = Values::new();
    let mut changes = Vec::new();
    for d in defs {
        let old = stored.get(&d.key);
        let new = computed.get(&d.key);
        match (old, new) {
            (None, None) => {}
            (None, Some(n)) if is_blank(n) => {}
            (Some(o), Some(n)) if o == n => {
                out.insert(d.key.clone(), o.clone());
            }
            (old, new) => {
                if let Some(n) = new {
                    out.insert(d.key.clone(), n.clone());
                }
                changes.push(Change {
                    key: d.key.clone(),
                    class: d.class(),
                    old: old.cloned(),
                    new: new.cloned().unwrap_or(Value::Null),
                });
            }
        }
    }
    (out, changes)
}

impl Change {
    /// The Segment calls that announce this change (SPEC 8): an identify
    /// with `{key: value}`, and for audiences `Audience Entered` /
    /// `Audience Exited`. Identifiers are filled in by the sync step.
    pub fn payloads(&self, space_id: &str, timestamp: &str) -> Vec<Value> {
        let personas = crate::sync::personas(
            crate::sync::Personas::Segment,
            space_id,
            self.class,
            &self.key,
        );
        let mut traits = Map::new();
        traits.insert(self.key.clone(), self.new.clone());
        let mut calls = vec![json!({
            "type": "identify",
            "traits": traits,
            "timestamp": timestamp,
            "context": {"personas": personas},
        })];
        if self.class == Class::Audience {
            let event = if self.new == Value::Bool(true) {
                "Audience Entered"
            } else {
                "Audience Exited"
            };
            calls.push(json!({
                "type": "track",
                "event": event,
                "properties": {"audience_key": self.key, self.key.clone(): self.new},
                "timestamp": timestamp,
                "context": {"personas": personas},
            }));
        }
        calls
    }
}

#[cfg(test)]
mod account_tests {
    use super::*;
    use crate::traits::TraitValue;

    fn def(class: Class, key: &str, body: Value) -> Definition {
        Definition::parse(class, key, 1, &body).unwrap()
    }

    fn traits(pairs: &[(&str, Value)]) -> Traits {
        pairs
            .iter()
            .map(|(k, v)| {
                let t = TraitValue {
                    value: v.clone(),
                    updated_at: 0,
                    source_id: "src".into(),
                };
                (k.to_string(), t)
            })
            .collect()
    }

    const NOW: Millis = 1_800_000_000_000;

    #[test]
    fn account_audiences_quantify_over_users_and_read_account_traits() {
        let users = vec![def(
            Class::Audience,
            "power_user",
            json!({"condition": {"performed": {"event": "Report Built", "count": {"at_least": 2}}}}),
        )];
        let accounts = vec![
            def(
                Class::Audience,
                "any_admin",
                json!({"collection": "accounts",
                       "condition": {"users": {"any": {"trait": {"name": "role", "op": "=", "value": "admin"}}}}}),
            ),
            def(
                Class::Audience,
                "all_power",
                json!({"collection": "accounts", "condition": {"users": {"all": {"audience": "power_user"}}}}),
            ),
            def(
                Class::Audience,
                "no_churned",
                json!({"collection": "accounts",
                       "condition": {"and": [
                           {"users": {"none": {"performed": {"event": "Churned"}}}},
                           {"trait": {"name": "plan", "op": "=", "value": "enterprise"}}]}}),
            ),
            def(
                Class::ComputedTrait,
                "reports",
                json!({"collection": "accounts", "type": "event_counter", "event": "Report Built",
                       "lookback": {"days": 30}}),
            ),
        ];
        let mut all = users.clone();
        all.extend(accounts);
        let r = Ruleset::new(all).unwrap();
        assert_eq!(r.definitions().len(), 1);
        assert_eq!(r.account_definitions().len(), 4);
        assert!(r.accounts_read_events());

        let admin = traits(&[("role", json!("admin"))]);
        let member = traits(&[("role", json!("member"))]);
        let power = Values::from([("power_user".to_string(), json!(true))]);
        let none = Values::new();
        let report = EventFacts {
            name: "Report Built",
            timestamp: NOW - HOUR_MS,
            properties: None,
        };
        let old = EventFacts {
            timestamp: NOW - 40 * 24 * HOUR_MS,
            ..report
        };
        let churn = EventFacts {
            name: "Churned",
            ..report
        };
        let e1 = [report, old];
        let e2 = [report];
        let account = traits(&[("plan", json!("enterprise"))]);
        let members = [
            Member {
                traits: &admin,
                values: &power,
                events: &e1,
            },
            Member {
                traits: &member,
                values: &power,
                events: &e2,
            },
        ];
        let v = r.evaluate_account(&account, &members, NOW);
        assert_eq!(v["any_admin"], json!(true));
        assert_eq!(v["all_power"], json!(true));
        assert_eq!(v["no_churned"], json!(true));
        // Counted over both users' events, within the lookback.
        assert_eq!(v["reports"], json!(2));

        let e3 = [churn];
        let members = [
            Member {
                traits: &member,
                values: &power,
                events: &e3,
            },
            Member {
                traits: &member,
                values: &none,
                events: &[],
            },
        ];
        let v = r.evaluate_account(&account, &members, NOW);
        assert_eq!(v["any_admin"], json!(false));
        assert_eq!(v["all_power"], json!(false));
        assert_eq!(v["no_churned"], json!(false));

        // No users: "all" does not hold, "none" does.
        let v = r.evaluate_account(&account, &[], NOW);
        assert_eq!(v["all_power"], json!(false));
        assert_eq!(v["no_churned"], json!(true));
    }

    #[test]
    fn users_conditions_are_checked() {
        let bad = Definition::parse(
            Class::Audience,
            "a",
            1,
            &json!({"condition": {"users": {"any": {"audience": "x"}}}}),
        )
        .unwrap_err();
        assert_eq!(bad.field, "condition.users");
        let bad = Definition::parse(
            Class::Audience,
            "a",
            1,
            &json!({"collection": "accounts", "condition": {"users": {"most": {"audience": "x"}}}}),
        )
        .unwrap_err();
        assert_eq!(bad.field, "condition.users.most");
        let bad = Definition::parse(
            Class::Audience,
            "a",
            1,
            &json!({"collection": "teams", "condition": {"audience": "x"}}),
        )
        .unwrap_err();
        assert_eq!(bad.field, "collection");
        let dangling = def(
            Class::Audience,
            "a",
            json!({"collection": "accounts", "condition": {"users": {"any": {"audience": "missing"}}}}),
        );
        let e = Ruleset::new(vec![dangling]).unwrap_err();
        assert!(e.message.contains("missing"), "{e}");
    }
}
