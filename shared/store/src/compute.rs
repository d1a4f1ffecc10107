//! The adapter-independent steps of computing traits and audiences: the
//! checks of a definition write against the space's other definitions,
//! and the fold of a root profile's state.
//!
//! **The fold order.** Both stores bring a root's state up to date in
//! these steps, in this order, and differ only in how they read and write:
//! 1. [`absorb`] the state of each profile merged into the root since it
//!    was last folded (merging drops the definitions either side had no
//!    current state for);
//! 2. [`rebuild_stale`] those definitions from the tree's history, the
//!    events already folded into some state (read only when
//!    [`Ruleset::stale`] names some);
//! 3. [`apply_event`] each new event, in order;
//! 4. [`recompute`] as of the profile's clock: prune, evaluate, settle
//!    against the stored values.

use kindred_domain::compute::{
    rebuild, settle, Change, Class, Definition, DefinitionError, ProfileState, Ruleset, Values,
    MAX_DEFINITIONS,
};
use kindred_domain::{Event, Millis, Traits};
use serde_json::Value;

use crate::ports::{ComputedValue, ComputedValues};
use crate::{Result, StoreError};

/// Checks a create or replace of `key` against the space's live
/// definitions: `live_class` is the class the key has now, if any.
pub fn check_put(
    live_class: Option<Class>,
    parsed: Definition,
    others: Vec<Definition>,
) -> Result<()> {
    if let Some(other) = live_class.filter(|c| *c != parsed.class()) {
        return Err(DefinitionError {
            field: "key".into(),
            message: format!("is already used by a {}", other.as_str().replace('_', " ")),
        }
        .into());
    }
    let mut defs: Vec<Definition> = others.into_iter().filter(|d| d.key != parsed.key).collect();
    defs.push(parsed);
    if defs.len() > MAX_DEFINITIONS {
        return Err(DefinitionError {
            field: "key".into(),
            message: format!(
                "a space has at most {MAX_DEFINITIONS} computed traits and audiences together"
            ),
        }
        .into());
    }
    Ruleset::new(defs)?;
    Ok(())
}

/// Checks that the definitions left after a delete still stand together.
pub fn check_delete(key: &str, all: Vec<Definition>) -> Result<()> {
    let rest = all.into_iter().filter(|d| d.key != key).collect();
    if Ruleset::new(rest).is_err() {
        return Err(DefinitionError {
            field: "key".into(),
            message: "is referenced by another audience; change that audience first".into(),
        }
        .into());
    }
    Ok(())
}

/// Folds the state and values of a profile merged into `root`: each event
/// is in exactly one state, so merging them is exact, and a membership
/// the merged profile had is not announced again.
pub fn absorb(
    ruleset: &Ruleset,
    root: (&mut ProfileState, &mut ComputedValues),
    child: (ProfileState, ComputedValues),
) {
    ruleset.merge(root.0, child.0);
    for (k, v) in child.1 {
        let ours = root.1.entry(k).or_insert_with(|| v.clone());
        if v.value == Value::Bool(true) {
            ours.value = Value::Bool(true);
        }
    }
}

/// Reads an event body the store accepted earlier.
pub fn parse_stored_event(body: &str) -> Result<Event> {
    let body = serde_json::from_str(body)?;
    Event::from_stored(body)
        .map_err(|r| StoreError::Undecodable(format!("a stored event: {}", r.code)))
}

/// Step 2 of the fold: rebuilds every definition `state` has no current
/// state for from `history` (stored bodies); returns how many.
pub fn rebuild_stale(
    ruleset: &Ruleset,
    state: &mut ProfileState,
    history: &[String],
) -> Result<usize> {
    let stale = ruleset.stale(state);
    if stale.is_empty() {
        return Ok(0);
    }
    let events = history
        .iter()
        .map(|b| parse_stored_event(b))
        .collect::<Result<Vec<_>>>()?;
    let rebuilt: Vec<_> = stale
        .into_iter()
        .map(|d| {
            (
                d.key.clone(),
                rebuild(d, events.iter().filter_map(Event::facts)),
            )
        })
        .collect();
    let n = rebuilt.len();
    state.defs.extend(rebuilt);
    Ok(n)
}

/// Step 3 of the fold: one new event.
pub fn apply_event(ruleset: &Ruleset, state: &mut ProfileState, event: &Event) {
    if let Some(facts) = event.facts() {
        ruleset.apply(state, &facts);
    }
}

/// The first byte of a binary-encoded state (JSON states start with `{`).
const BINARY_STATE: u8 = 1;

/// A profile's compute state as stored: a version byte, then postcard
/// (compact, and several times faster to read and write than JSON for
/// per-hour maps). `capacity` is a guess of the size (the last stored
/// one), which saves growing the buffer step by step.
pub fn encode_state(state: &ProfileState, capacity: usize) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(capacity.max(64));
    out.push(BINARY_STATE);
    postcard::to_io(state, &mut out)
        .map_err(|e| StoreError::Undecodable(format!("encoding a state: {e}")))?;
    Ok(out)
}

/// Reads a state written by [`encode_state`], or a JSON one (data
/// directories from before the binary encoding).
pub fn decode_state(bytes: &[u8]) -> Result<ProfileState> {
    match bytes.split_first() {
        Some((&BINARY_STATE, rest)) => postcard::from_bytes(rest)
            .map_err(|e| StoreError::Undecodable(format!("a stored state: {e}"))),
        _ => Ok(serde_json::from_slice(bytes)?),
    }
}

/// The plain values of stored ones.
pub fn plain(stored: &ComputedValues) -> Values {
    stored
        .iter()
        .map(|(k, v)| (k.clone(), v.value.clone()))
        .collect()
}

/// Settled values as stored: a value that did not change keeps the time
/// it was set; a new one is stamped `now`.
pub fn stamp(
    settled: Values,
    mut stored: ComputedValues,
    now: Millis,
    class_of: impl Fn(&str) -> Option<Class>,
) -> ComputedValues {
    let mut values = ComputedValues::new();
    for (k, v) in settled {
        let class = class_of(&k).unwrap_or(Class::ComputedTrait);
        // A key defined again as the other class is a new value.
        let entry = match stored.remove(&k) {
            Some(old) if old.value == v && old.class == class => old,
            _ => ComputedValue {
                class,
                value: v,
                updated_at: now,
            },
        };
        values.insert(k, entry);
    }
    values
}

/// A profile's state evaluated at a moment.
#[derive(Debug)]
pub struct Recomputed {
    /// The values to store.
    pub values: ComputedValues,
    /// What changed since the stored values, for the change log.
    pub changes: Vec<Change>,
    /// When time alone next changes a value.
    pub due: Option<Millis>,
}

/// Prunes the state to what `now` still needs, evaluates it and settles
/// the result against the stored values.
pub fn recompute(
    ruleset: &Ruleset,
    state: &mut ProfileState,
    stored: ComputedValues,
    traits: &Traits,
    now: Millis,
) -> Recomputed {
    ruleset.retain_known(state);
    ruleset.prune(state, now);
    let computed = ruleset.evaluate(state, traits, now);
    let plain = plain(&stored);
    let (settled, changes) = settle(ruleset, &plain, &computed);
    let values = stamp(settled, stored, now, |k| {
        ruleset.get(k).map(Definition::class)
    });
    let due = ruleset.next_change_from(state, traits, now, &computed);
    Recomputed {
        values,
        changes,
        due,
    }
}

/// Whether a stored value puts its profile on its definition's member
/// list: an audience's `true`, a computed trait's any value but `null`.
/// The explorer's member lists and sizes, and the Definitions API's, count
/// exactly these.
pub fn holds(value: &ComputedValue) -> bool {
    match value.class {
        Class::Audience => value.value == Value::Bool(true),
        Class::ComputedTrait => !value.value.is_null(),
    }
}

/// One write to a member list: the profile enters it or its value there
/// changes (`put`), or it leaves (`put: None`); `delta` is what the list's
/// size changes by.
#[derive(Debug, Clone, PartialEq)]
pub struct MemberWrite<'a> {
    pub class: Class,
    pub key: &'a str,
    pub put: Option<&'a ComputedValue>,
    pub delta: i64,
}

/// The member-list writes that storing `new` over `old` for one profile
/// needs (a profile merged away: `new` empty). A key whose class changed
/// (deleted and defined again) leaves one list and enters the other.
pub fn member_writes<'a>(old: &'a ComputedValues, new: &'a ComputedValues) -> Vec<MemberWrite<'a>> {
    let mut writes = Vec::new();
    let held = |v: Option<&'a ComputedValue>| v.filter(|v| holds(v));
    let keys: std::collections::BTreeSet<&'a str> =
        old.keys().chain(new.keys()).map(String::as_str).collect();
    for key in keys {
        match (held(old.get(key)), held(new.get(key))) {
            (None, None) => {}
            (Some(o), Some(n)) if o.class == n.class => {
                if o != n {
                    writes.push(MemberWrite {
                        class: n.class,
                        key,
                        put: Some(n),
                        delta: 0,
                    });
                }
            }
            (o, n) => {
                if let Some(o) = o {
                    writes.push(MemberWrite {
                        class: o.class,
                        key,
                        put: None,
                        delta: -1,
                    });
                }
                if let Some(n) = n {
                    writes.push(MemberWrite {
                        class: n.class,
                        key,
                        put: Some(n),
                        delta: 1,
                    });
                }
            }
        }
    }
    writes
}

#[cfg(test)]
mod tests {
    use super::*;
    use kindred_domain::compute::{Definition, EventFacts};
    use serde_json::json;

    #[test]
    fn a_key_defined_again_as_the_other_class_is_a_new_value() {
        let stored: ComputedValues = [(
            "vip".to_string(),
            ComputedValue {
                class: Class::Audience,
                value: json!(true),
                updated_at: 1,
            },
        )]
        .into_iter()
        .collect();
        let settled: Values = [("vip".to_string(), json!(true))].into_iter().collect();
        let same = stamp(settled.clone(), stored.clone(), 9, |_| {
            Some(Class::Audience)
        });
        assert_eq!(same["vip"].updated_at, 1);
        let other = stamp(settled, stored, 9, |_| Some(Class::ComputedTrait));
        assert_eq!(
            other["vip"],
            ComputedValue {
                class: Class::ComputedTrait,
                value: json!(true),
                updated_at: 9
            }
        );
    }

    #[test]
    fn member_writes_follow_what_a_profile_holds() {
        let v = |class, value: Value, t| ComputedValue {
            class,
            value,
            updated_at: t,
        };
        let old: ComputedValues = [
            ("buyers".to_string(), v(Class::Audience, json!(true), 1)),
            ("vip".to_string(), v(Class::Audience, json!(true), 1)),
            ("churned".to_string(), v(Class::Audience, json!(false), 1)),
            ("spend".to_string(), v(Class::ComputedTrait, json!(10), 1)),
            ("last".to_string(), v(Class::ComputedTrait, json!("x"), 1)),
            ("moved".to_string(), v(Class::Audience, json!(true), 1)),
        ]
        .into_iter()
        .collect();
        let new: ComputedValues = [
            ("buyers".to_string(), v(Class::Audience, json!(true), 1)),
            ("vip".to_string(), v(Class::Audience, json!(false), 2)),
            ("churned".to_string(), v(Class::Audience, json!(true), 2)),
            ("spend".to_string(), v(Class::ComputedTrait, json!(12), 2)),
            ("last".to_string(), v(Class::ComputedTrait, Value::Null, 2)),
            ("moved".to_string(), v(Class::ComputedTrait, json!(0), 2)),
            ("zero".to_string(), v(Class::ComputedTrait, json!(0), 2)),
        ]
        .into_iter()
        .collect();
        let got: Vec<(Class, &str, bool, i64)> = member_writes(&old, &new)
            .into_iter()
            .map(|w| (w.class, w.key, w.put.is_some(), w.delta))
            .collect();
        assert_eq!(
            got,
            vec![
                (Class::Audience, "churned", true, 1),
                (Class::ComputedTrait, "last", false, -1),
                (Class::Audience, "moved", false, -1),
                (Class::ComputedTrait, "moved", true, 1),
                (Class::ComputedTrait, "spend", true, 0),
                (Class::Audience, "vip", false, -1),
                (Class::ComputedTrait, "zero", true, 1),
            ]
        );
        // A profile merged away leaves every list it was on.
        let gone: i64 = member_writes(&old, &ComputedValues::new())
            .iter()
            .map(|w| w.delta)
            .sum();
        assert_eq!(gone, -5);
    }

    #[test]
    fn states_round_trip_in_binary_and_json_ones_still_read() {
        let d = Definition::parse(
            Class::ComputedTrait,
            "spend",
            3,
            &json!({"type": "aggregation", "function": "sum", "event": "Order Completed",
                    "property": "revenue", "lookback": {"days": 7}}),
        )
        .unwrap();
        let r = Ruleset::new(vec![d]).unwrap();
        let mut state = r.fresh();
        let props = json!({"revenue": 12.5});
        for ts in [1_000_000_000_000, 1_000_003_600_000] {
            r.apply(
                &mut state,
                &EventFacts {
                    name: "Order Completed",
                    timestamp: ts,
                    properties: props.as_object(),
                },
            );
        }
        let binary = encode_state(&state, 0).unwrap();
        let json = serde_json::to_vec(&state).unwrap();
        assert!(
            binary.len() < json.len() / 2,
            "{} vs {}",
            binary.len(),
            json.len()
        );
        assert_eq!(decode_state(&binary).unwrap(), state);
        assert_eq!(decode_state(&json).unwrap(), state);
        assert!(decode_state(&[BINARY_STATE, 0xff, 0xff]).is_err());
    }
}
