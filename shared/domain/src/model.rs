//! An in-memory identity graph that executes plans with the same
//! conditions as the store adapters. It is the reference model for tests:
//! a store's graph must equal this model replaying the same events in the
//! order the store committed them.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use crate::identifier::Identifier;
use crate::resolve::{resolve, Condition, Facts, Incoming, Plan, ProfileFacts};
use crate::settings::IdentityRules;

#[derive(Clone, Debug, Default)]
pub struct MemoryGraph {
    profiles: BTreeMap<String, Node>,
    owners: HashMap<Identifier, String>,
    created: u64,
}

#[derive(Clone, Debug)]
struct Node {
    facts: ProfileFacts,
    parent: Option<String>,
    events: Vec<String>,
}

/// A condition of the plan did not hold.
#[derive(Debug, PartialEq, Eq)]
pub struct Conflict;

impl MemoryGraph {
    pub fn root<'a>(&'a self, mut id: &'a str) -> &'a str {
        while let Some(parent) = self.profiles.get(id).and_then(|n| n.parent.as_deref()) {
            id = parent;
        }
        id
    }

    pub fn facts(&self, ids: &[Identifier]) -> Facts {
        let mut facts = Facts::default();
        for id in ids {
            if let Some(owner) = self.owners.get(id) {
                let root = self.root(owner).to_string();
                facts
                    .profiles
                    .entry(root.clone())
                    .or_insert_with(|| self.profiles[&root].facts.clone());
                facts.owners.insert(id.clone(), root);
            }
        }
        facts
    }

    /// Whether one of a plan's conditions holds.
    fn holds(&self, condition: Condition<'_>) -> bool {
        match condition {
            Condition::Absent(id) => !self.profiles.contains_key(id),
            Condition::Exists(id) => self.profiles.contains_key(id),
            Condition::RootAt(id, version) => self
                .profiles
                .get(id)
                .is_some_and(|n| n.parent.is_none() && n.facts.version == version),
            Condition::Unclaimed(id) => !self.owners.contains_key(id),
        }
    }

    /// Applies a plan if its conditions hold, recording the event.
    pub fn apply(&mut self, plan: &Plan, message_id: &str) -> Result<(), Conflict> {
        if !plan.conditions().into_iter().all(|c| self.holds(c)) {
            return Err(Conflict);
        }
        match plan {
            Plan::Unresolved => Ok(()),
            Plan::Create(c) => {
                for e in &c.identifiers {
                    self.owners.insert(e.id.clone(), c.profile_id.clone());
                }
                self.profiles.insert(
                    c.profile_id.clone(),
                    Node {
                        facts: ProfileFacts {
                            id: c.profile_id.clone(),
                            version: 1,
                            created_at: c.created_at,
                            merges: 0,
                            identifiers: c.identifiers.clone(),
                            traits: c.traits.clone(),
                        },
                        parent: None,
                        events: vec![message_id.to_string()],
                    },
                );
                Ok(())
            }
            Plan::Attach(a) => {
                for e in &a.claims {
                    self.owners.insert(e.id.clone(), a.profile_id.clone());
                }
                for (child, _) in &a.children {
                    let node = self.profiles.get_mut(child).expect("checked above");
                    node.parent = Some(a.profile_id.clone());
                    node.facts.version += 1;
                }
                let parent = self.profiles.get_mut(&a.profile_id).expect("checked above");
                if plan.writes_root() {
                    parent.facts.version += 1;
                }
                if let Some(ids) = &a.identifiers {
                    parent.facts.identifiers = ids.clone();
                }
                if let Some(traits) = &a.traits {
                    parent.facts.traits = traits.clone();
                }
                parent.facts.merges = a.merges;
                parent.events.push(message_id.to_string());
                Ok(())
            }
        }
    }

    /// Resolves and applies one event, as a single worker would.
    pub fn process(
        &mut self,
        incoming: &Incoming<'_>,
        rules: &IdentityRules,
        message_id: &str,
    ) -> Option<String> {
        let facts = self.facts(incoming.identifiers);
        self.created += 1;
        let new_id = format!("prf_model{}", self.created);
        let resolution = resolve(incoming, &facts, rules, &new_id);
        self.apply(&resolution.plan, message_id)
            .expect("a serial model never conflicts");
        resolution.plan.profile_id().map(str::to_string)
    }

    /// The root profiles as sets of identifiers: two graphs resolve
    /// identity the same way when their partitions are equal.
    pub fn partition(&self) -> BTreeSet<BTreeSet<Identifier>> {
        let mut groups: BTreeMap<&str, BTreeSet<Identifier>> = BTreeMap::new();
        for (id, owner) in &self.owners {
            groups
                .entry(self.root(owner))
                .or_default()
                .insert(id.clone());
        }
        groups.into_values().collect()
    }

    /// The root profiles as sets of message ids attached to their trees.
    pub fn event_partition(&self) -> BTreeSet<BTreeSet<String>> {
        let mut groups: BTreeMap<&str, BTreeSet<String>> = BTreeMap::new();
        for (id, node) in &self.profiles {
            groups
                .entry(self.root(id))
                .or_default()
                .extend(node.events.iter().cloned());
        }
        groups.into_values().filter(|g| !g.is_empty()).collect()
    }

    /// Root profiles with their facts.
    pub fn roots(&self) -> impl Iterator<Item = &ProfileFacts> {
        self.profiles
            .values()
            .filter(|n| n.parent.is_none())
            .map(|n| &n.facts)
    }
}
