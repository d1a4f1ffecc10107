//! The adapter-independent steps of computing traits and audiences: the
//! checks of a definition write against the space's other definitions,
//! folding a merged profile's state into its root, and turning a state
//! into the values to store, the changes to log and the next due time.
//! The SQLite and DynamoDB adapters differ only in how they read and write.

use kindred_domain::compute::{
    settle, Change, Class, Definition, DefinitionError, ProfileState, Ruleset, Values,
    MAX_DEFINITIONS,
};
use kindred_domain::{Millis, Traits};
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
    mut stored: ComputedValues,
    traits: &Traits,
    now: Millis,
) -> Recomputed {
    ruleset.retain_known(state);
    ruleset.prune(state, now);
    let computed = ruleset.evaluate(state, traits, now);
    let plain: Values = stored
        .iter()
        .map(|(k, v)| (k.clone(), v.value.clone()))
        .collect();
    let (settled, changes) = settle(ruleset, &plain, &computed);
    let mut values = ComputedValues::new();
    for (k, v) in settled {
        let entry = match stored.remove(&k) {
            Some(old) if old.value == v => old,
            _ => ComputedValue {
                class: ruleset.get(&k).map_or(Class::ComputedTrait, |d| d.class()),
                value: v,
                updated_at: now,
            },
        };
        values.insert(k, entry);
    }
    let due = ruleset.next_change_from(state, traits, now, &computed);
    Recomputed {
        values,
        changes,
        due,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kindred_domain::compute::{Definition, EventFacts};
    use serde_json::json;

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
