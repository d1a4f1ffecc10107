//! The identity worker's copy of the resolved graph: which profile owns
//! an identifier, and each profile's parent or, for a root, its facts.
//! `store.db` stays the record; this saves the worker reading it back
//! (the B-tree descents on text keys and the JSON decoding were about a
//! quarter of its time, BENCHMARKS.md, issue 19).
//!
//! It is only as good as the assurance that nothing else wrote the graph
//! since it was filled:
//! - it is filled and changed only inside the worker's own write
//!   transactions, with what those read and wrote;
//! - a batch [`GraphCache::begin`]s with the store writer's *epoch*,
//!   bumped by every other taker of `store.db`'s writer (privacy, splits,
//!   admin, tools), and SQLite's `data_version` (another connection or
//!   process committed): if either moved since the cache was last known
//!   good, it is emptied;
//! - it is known good again only after the batch commits
//!   ([`GraphCache::committed`]): a batch that fails or panics leaves it
//!   to be emptied by the next.
//!
//! Memory is bounded: two generations of at most [`GENERATION_BYTES`]
//! each (estimated); a full young generation becomes the old one and the
//! old one is dropped, and an entry read from the old generation moves
//! back to the young one, so what the worker keeps touching stays.

use std::collections::HashMap;

use kindred_domain::{Identifier, IdentifierEntry, Plan, ProfileFacts, Traits};
use serde_json::Value;

/// The most one generation holds at the start of a batch, by the
/// estimate of [`Node::bytes`] and [`owner_bytes`] (a batch adds what it
/// touches on top). Nearly every hit is on what the last batch or two
/// touched: on the 1M-event bench, 8 MiB answered 83 % of lookups and
/// 48 MiB 88 %, at the same rate (~30,500 events/s) and 90 MiB more RSS.
pub const GENERATION_BYTES: usize = 8 << 20;

/// A profile as resolution walks it.
#[derive(Clone, Debug, PartialEq)]
pub enum Node {
    /// Merged into this parent.
    Merged(String),
    Root(ProfileFacts),
}

impl Node {
    /// About what the node takes in memory, with its key.
    fn bytes(&self, id: &str) -> usize {
        64 + id.len()
            + match self {
                Node::Merged(parent) => parent.len(),
                Node::Root(p) => 96 + entries_bytes(&p.identifiers) + traits_bytes(&p.traits),
            }
    }
}

fn entries_bytes(entries: &[IdentifierEntry]) -> usize {
    entries
        .iter()
        .map(|e| 64 + e.id.kind.len() + e.id.value.len())
        .sum()
}

fn traits_bytes(traits: &Traits) -> usize {
    traits
        .iter()
        .map(|(k, t)| 96 + k.len() + t.source_id.len() + value_bytes(&t.value))
        .sum()
}

fn value_bytes(v: &Value) -> usize {
    32 + match v {
        Value::String(s) => s.len(),
        Value::Array(items) => items.iter().map(value_bytes).sum(),
        Value::Object(map) => map.iter().map(|(k, v)| 32 + k.len() + value_bytes(v)).sum(),
        _ => 0,
    }
}

fn owner_bytes(id: &Identifier, owner: &str) -> usize {
    96 + id.kind.len() + id.value.len() + owner.len()
}

#[derive(Default)]
struct Generation {
    /// Space → identifier → the profile that claimed it (as stored: the
    /// root is found by following parents).
    owners: HashMap<String, HashMap<Identifier, String>>,
    /// Space → profile id → node.
    nodes: HashMap<String, HashMap<String, Node>>,
    bytes: usize,
}

impl Generation {
    fn take_owner(&mut self, space_id: &str, id: &Identifier) -> Option<String> {
        let owner = self.owners.get_mut(space_id)?.remove(id)?;
        self.bytes = self.bytes.saturating_sub(owner_bytes(id, &owner));
        Some(owner)
    }

    fn take_node(&mut self, space_id: &str, profile_id: &str) -> Option<Node> {
        let node = self.nodes.get_mut(space_id)?.remove(profile_id)?;
        self.bytes = self.bytes.saturating_sub(node.bytes(profile_id));
        Some(node)
    }

    fn put_owner(&mut self, space_id: &str, id: Identifier, owner: String) {
        let bytes = owner_bytes(&id, &owner);
        let space = match self.owners.get_mut(space_id) {
            Some(space) => space,
            None => self.owners.entry(space_id.to_string()).or_default(),
        };
        if let Some(old) = space.insert(id.clone(), owner) {
            self.bytes = self.bytes.saturating_sub(owner_bytes(&id, &old));
        }
        self.bytes += bytes;
    }

    fn put_node(&mut self, space_id: &str, profile_id: String, node: Node) {
        let bytes = node.bytes(&profile_id);
        let space = match self.nodes.get_mut(space_id) {
            Some(space) => space,
            None => self.nodes.entry(space_id.to_string()).or_default(),
        };
        if let Some(old) = space.insert(profile_id.clone(), node) {
            self.bytes = self.bytes.saturating_sub(old.bytes(&profile_id));
        }
        self.bytes += bytes;
    }
}

/// What the cache is known to agree with: the writer's epoch and
/// `store.db`'s `data_version` as the worker's connection saw them.
pub type Mark = (u64, i64);

/// See the module documentation.
pub struct GraphCache {
    young: Generation,
    old: Generation,
    /// `None` while a batch may be changing the graph, or before the
    /// first batch.
    good_at: Option<Mark>,
    generation_bytes: usize,
    /// Lookups answered, and lookups that went to `store.db`.
    pub hits: u64,
    pub misses: u64,
}

impl Default for GraphCache {
    fn default() -> Self {
        Self::with_budget(GENERATION_BYTES)
    }
}

impl GraphCache {
    /// A cache whose generations hold at most `generation_bytes` each.
    pub fn with_budget(generation_bytes: usize) -> Self {
        Self {
            young: Generation::default(),
            old: Generation::default(),
            good_at: None,
            generation_bytes,
            hits: 0,
            misses: 0,
        }
    }

    /// Starts a batch made at `mark`: empties the cache unless it is
    /// known to agree with the store at that mark, makes room, and marks
    /// it as changing until [`GraphCache::committed`].
    pub fn begin(&mut self, mark: Mark) {
        if self.good_at.take() != Some(mark) {
            self.young = Generation::default();
            self.old = Generation::default();
        }
        if self.young.bytes > self.generation_bytes {
            self.old = std::mem::take(&mut self.young);
        }
    }

    /// The batch begun at `mark` committed: the cache agrees with the
    /// store again.
    pub fn committed(&mut self, mark: Mark) {
        self.good_at = Some(mark);
        tracing::debug!(
            hits = self.hits,
            misses = self.misses,
            bytes = self.bytes(),
            "graph cache"
        );
    }

    /// Estimated bytes held.
    pub fn bytes(&self) -> usize {
        self.young.bytes + self.old.bytes
    }

    /// The profile that claimed `id`, if known.
    pub fn owner(&mut self, space_id: &str, id: &Identifier) -> Option<String> {
        let young = self.young.owners.get(space_id).and_then(|s| s.get(id));
        if let Some(owner) = young {
            self.hits += 1;
            return Some(owner.clone());
        }
        let Some(owner) = self.old.take_owner(space_id, id) else {
            self.misses += 1;
            return None;
        };
        self.hits += 1;
        self.young.put_owner(space_id, id.clone(), owner.clone());
        Some(owner)
    }

    /// Profile `profile_id`, if known.
    pub fn node(&mut self, space_id: &str, profile_id: &str) -> Option<Node> {
        let young = self
            .young
            .nodes
            .get(space_id)
            .and_then(|s| s.get(profile_id));
        if let Some(node) = young {
            self.hits += 1;
            return Some(node.clone());
        }
        let Some(node) = self.old.take_node(space_id, profile_id) else {
            self.misses += 1;
            return None;
        };
        self.hits += 1;
        self.young
            .put_node(space_id, profile_id.to_string(), node.clone());
        Some(node)
    }

    /// Remembers what was read from the store.
    pub fn learn_owner(&mut self, space_id: &str, id: &Identifier, owner: &str) {
        self.young
            .put_owner(space_id, id.clone(), owner.to_string());
    }

    /// Remembers what was read from the store.
    pub fn learn_node(&mut self, space_id: &str, profile_id: &str, node: Node) {
        self.young.put_node(space_id, profile_id.to_string(), node);
    }

    /// Follows the writes of `plan`, just applied in the store.
    pub fn applied(&mut self, space_id: &str, plan: &Plan) {
        match plan {
            Plan::Unresolved => {}
            Plan::Create(c) => {
                for e in &c.identifiers {
                    self.learn_owner(space_id, &e.id, &c.profile_id);
                }
                let facts = ProfileFacts {
                    id: c.profile_id.clone(),
                    version: 1,
                    created_at: c.created_at,
                    merges: 0,
                    identifiers: c.identifiers.clone(),
                    traits: c.traits.clone(),
                };
                self.learn_node(space_id, &c.profile_id, Node::Root(facts));
            }
            Plan::Attach(a) => {
                for (child, _) in &a.children {
                    self.old.take_node(space_id, child);
                    self.learn_node(space_id, child, Node::Merged(a.profile_id.clone()));
                }
                for e in &a.claims {
                    self.old.take_owner(space_id, &e.id);
                    self.learn_owner(space_id, &e.id, &a.profile_id);
                }
                if !plan.writes_root() {
                    return;
                }
                // The root was read for the plan, so it is at hand; if it
                // is not (it cannot be, but a cache may only forget), the
                // store has it.
                let root = self
                    .young
                    .take_node(space_id, &a.profile_id)
                    .or_else(|| self.old.take_node(space_id, &a.profile_id));
                let Some(Node::Root(mut facts)) = root else {
                    return;
                };
                facts.version += 1;
                facts.merges = a.merges;
                if let Some(identifiers) = &a.identifiers {
                    facts.identifiers = identifiers.clone();
                }
                if let Some(traits) = &a.traits {
                    facts.traits = traits.clone();
                }
                self.learn_node(space_id, &a.profile_id, Node::Root(facts));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(value: &str) -> Identifier {
        Identifier {
            kind: "user_id".into(),
            value: value.into(),
        }
    }

    fn root(profile_id: &str) -> Node {
        Node::Root(ProfileFacts {
            id: profile_id.into(),
            version: 1,
            ..ProfileFacts::default()
        })
    }

    #[test]
    fn a_mark_that_moved_empties_the_cache() {
        let mut cache = GraphCache::default();
        cache.begin((0, 1));
        cache.learn_owner("s", &id("a"), "p1");
        cache.committed((0, 1));
        cache.begin((0, 1));
        assert_eq!(cache.owner("s", &id("a")).as_deref(), Some("p1"));
        cache.committed((0, 1));
        // Another writer took the store's writer.
        cache.begin((1, 1));
        assert_eq!(cache.owner("s", &id("a")), None);
    }

    #[test]
    fn a_batch_that_did_not_commit_empties_the_cache() {
        let mut cache = GraphCache::default();
        cache.begin((0, 1));
        cache.learn_owner("s", &id("a"), "p1");
        // No `committed`: the batch failed and rolled back.
        cache.begin((0, 1));
        assert_eq!(cache.owner("s", &id("a")), None);
    }

    #[test]
    fn spaces_are_kept_apart() {
        let mut cache = GraphCache::default();
        cache.learn_owner("s1", &id("a"), "p1");
        cache.learn_node("s1", "p1", root("p1"));
        assert_eq!(cache.owner("s2", &id("a")), None);
        assert_eq!(cache.node("s2", "p1"), None);
        assert_eq!(cache.node("s1", "p1"), Some(root("p1")));
    }

    #[test]
    fn a_full_generation_ages_and_what_is_used_again_stays() {
        let mut cache = GraphCache::with_budget(1_000);
        cache.begin((0, 0));
        for i in 0..20 {
            cache.learn_owner("s", &id(&format!("u{i}")), &format!("p{i}"));
        }
        cache.committed((0, 0));
        // Over budget: the young generation becomes the old one.
        cache.begin((0, 0));
        assert_eq!(cache.young.bytes, 0);
        // Read again: back in the young generation.
        assert_eq!(cache.owner("s", &id("u3")).as_deref(), Some("p3"));
        cache.committed((0, 0));
        for i in 20..40 {
            cache.learn_owner("s", &id(&format!("u{i}")), &format!("p{i}"));
        }
        cache.begin((0, 0));
        // u3 was used again and aged once; u4 was not and aged twice.
        assert_eq!(cache.owner("s", &id("u3")).as_deref(), Some("p3"));
        assert_eq!(cache.owner("s", &id("u4")), None);
    }

    #[test]
    fn an_applied_merge_points_the_child_at_its_parent_and_moves_the_root_on() {
        let mut cache = GraphCache::default();
        cache.learn_node("s", "p1", root("p1"));
        cache.learn_node("s", "p2", root("p2"));
        let claimed = IdentifierEntry {
            id: id("new"),
            added_at: 5,
        };
        let plan = Plan::Attach(kindred_domain::Attach {
            profile_id: "p1".into(),
            expected_version: 1,
            children: vec![("p2".into(), 1)],
            claims: vec![claimed.clone()],
            identifiers: Some(vec![claimed]),
            merges: 1,
            traits: None,
        });
        cache.applied("s", &plan);
        assert_eq!(cache.node("s", "p2"), Some(Node::Merged("p1".into())));
        assert_eq!(cache.owner("s", &id("new")).as_deref(), Some("p1"));
        let Some(Node::Root(p1)) = cache.node("s", "p1") else {
            panic!("p1 is a root");
        };
        assert_eq!((p1.version, p1.merges, p1.identifiers.len()), (2, 1, 1));
    }
}
