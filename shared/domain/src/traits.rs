//! Profile traits: per key, the most recently updated value wins (by event
//! timestamp), and `null` removes a trait (SPEC 5).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::Millis;

/// One trait value. A `null` value is a tombstone: it hides the trait and
/// keeps an older, late-arriving value from bringing it back.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TraitValue {
    #[serde(rename = "v")]
    pub value: Value,
    #[serde(rename = "t")]
    pub updated_at: Millis,
    #[serde(rename = "s")]
    pub source_id: String,
}

pub type Traits = BTreeMap<String, TraitValue>;

/// Most a profile's traits may take, encoded as stored (JSON).
pub const MAX_TRAITS_BYTES: usize = 64 * 1024;

/// Keeps a profile's traits within [`MAX_TRAITS_BYTES`]: when they are
/// larger, the newest values that fit are kept and the rest dropped.
/// Returns the dropped keys (sorted), to be recorded.
pub fn fit(traits: &mut Traits) -> Vec<String> {
    let entry_len = |k: &String, v: &TraitValue| {
        serde_json::to_string(k).map_or(0, |s| s.len())
            + serde_json::to_string(v).map_or(0, |s| s.len())
            + 2 // the ':' and a ','
    };
    let total: usize = 2 + traits.iter().map(|(k, v)| entry_len(k, v)).sum::<usize>();
    if total <= MAX_TRAITS_BYTES {
        return Vec::new();
    }
    let mut newest_first: Vec<(&String, &TraitValue)> = traits.iter().collect();
    newest_first.sort_by(|a, b| b.1.updated_at.cmp(&a.1.updated_at).then(a.0.cmp(b.0)));
    let mut used = 2;
    let mut dropped = Vec::new();
    for (k, v) in newest_first {
        let len = entry_len(k, v);
        if used + len <= MAX_TRAITS_BYTES {
            used += len;
        } else {
            dropped.push(k.clone());
        }
    }
    for k in &dropped {
        traits.remove(k);
    }
    dropped.sort();
    dropped
}

/// Applies an identify call's traits; returns whether anything changed.
/// A value at the same timestamp replaces the stored one (the later
/// arrival wins a tie).
pub fn apply_updates(
    traits: &mut Traits,
    updates: &Map<String, Value>,
    at: Millis,
    source_id: &str,
) -> bool {
    let mut changed = false;
    for (key, value) in updates {
        match traits.get(key) {
            Some(old) if old.updated_at > at => {}
            Some(old) if old.updated_at == at && old.value == *value => {}
            _ => {
                traits.insert(
                    key.clone(),
                    TraitValue {
                        value: value.clone(),
                        updated_at: at,
                        source_id: source_id.to_string(),
                    },
                );
                changed = true;
            }
        }
    }
    changed
}

/// Folds another profile's traits in: per key the newest value wins; on a
/// tie the receiving profile keeps its own.
pub fn merge_traits(into: &mut Traits, other: &Traits) {
    for (key, theirs) in other {
        match into.get(key) {
            Some(ours) if ours.updated_at >= theirs.updated_at => {}
            _ => {
                into.insert(key.clone(), theirs.clone());
            }
        }
    }
}

/// The visible traits: tombstones left out.
pub fn visible(traits: &Traits) -> impl Iterator<Item = (&String, &TraitValue)> {
    traits.iter().filter(|(_, t)| !t.value.is_null())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn updates(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn newer_wins_older_is_ignored_null_removes() {
        let mut t = Traits::new();
        assert!(apply_updates(
            &mut t,
            &updates(json!({"plan": "pro", "age": 3})),
            10,
            "s"
        ));
        assert!(!apply_updates(
            &mut t,
            &updates(json!({"plan": "free"})),
            5,
            "s"
        ));
        assert_eq!(t["plan"].value, json!("pro"));
        assert!(apply_updates(
            &mut t,
            &updates(json!({"plan": null})),
            20,
            "s"
        ));
        assert_eq!(
            visible(&t).map(|(k, _)| k.as_str()).collect::<Vec<_>>(),
            ["age"]
        );
        // A late, older value does not resurrect the removed trait.
        assert!(!apply_updates(
            &mut t,
            &updates(json!({"plan": "basic"})),
            15,
            "s"
        ));
        assert!(t["plan"].value.is_null());
    }

    #[test]
    fn merge_keeps_the_newest_per_key() {
        let mut a = Traits::new();
        apply_updates(
            &mut a,
            &updates(json!({"plan": "pro", "city": "Oslo"})),
            10,
            "s",
        );
        let mut b = Traits::new();
        apply_updates(&mut b, &updates(json!({"plan": "free"})), 20, "s");
        apply_updates(&mut b, &updates(json!({"city": "Rome"})), 5, "s");
        merge_traits(&mut a, &b);
        assert_eq!(a["plan"].value, json!("free"));
        assert_eq!(a["city"].value, json!("Oslo"));
    }
}
