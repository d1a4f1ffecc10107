//! The profile document, assembled once for every store: the adapters
//! read the stored records of a profile's tree ([`ProfileReads`]) and
//! [`assemble`] applies the rules that make them one profile (last
//! activity, links de-duplicated by `group_id`, sort orders, identifiers
//! in the root's order).

use kindred_domain::{IdentifierEntry, Millis, Traits};

use crate::ports::{
    ComputedValues, ExternalIdRecord, LinkRecord, MergeRecord, ProfileDoc, ProfileParts,
};

/// The root profile's own record.
#[derive(Clone, Debug)]
pub struct RootRecord {
    pub profile_id: String,
    pub created_at: Millis,
    pub first_message_id: String,
    pub merges: u32,
    pub identifiers: Vec<IdentifierEntry>,
    pub traits: Traits,
}

/// The newest stored event of one profile in the tree.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LatestEvent {
    pub timestamp: Millis,
    pub seq: i64,
    pub message_id: String,
}

/// What an adapter read for one profile: the root, its tree (root first)
/// and, for the parts asked for, the records of every profile in the
/// tree in any order.
#[derive(Clone, Debug)]
pub struct ProfileReads {
    pub root: RootRecord,
    pub tree: Vec<String>,
    /// The identifier records of the root's identifiers that exist.
    pub external_ids: Vec<ExternalIdRecord>,
    /// The newest event of each profile in the tree that has one.
    pub latest: Vec<LatestEvent>,
    /// Links of every profile in the tree, the root's first.
    pub links: Vec<LinkRecord>,
    pub merges: Vec<MergeRecord>,
    pub computed: ComputedValues,
}

/// One profile from what the adapter read.
///
/// - `updated_at` and `last_message_id` are the profile's last activity:
///   the newest stored event of any profile in its tree (by timestamp,
///   then arrival), or `created_at` and `first_message_id` when it has
///   none (or `parts.activity` was not asked for). Events that change
///   nothing on the profile count as activity; deleted events do not.
/// - external ids follow the order of the root's identifier list;
/// - a group linked from several profiles of the tree appears once, as
///   first read (the root's own link wins); links sort by `(linked_at,
///   group_id)` and merges by `(merged_at, child_id)`.
pub fn assemble(reads: ProfileReads, parts: ProfileParts) -> ProfileDoc {
    let ProfileReads {
        root,
        tree,
        mut external_ids,
        latest,
        links: read_links,
        mut merges,
        computed,
    } = reads;

    let mut ordered_ids = Vec::new();
    if parts.external_ids {
        for entry in &root.identifiers {
            if let Some(at) = external_ids.iter().position(|r| r.id == entry.id) {
                ordered_ids.push(external_ids.swap_remove(at));
            }
        }
    }

    let newest = latest
        .into_iter()
        .filter(|_| parts.activity)
        .max_by(|a, b| (a.timestamp, a.seq).cmp(&(b.timestamp, b.seq)));
    let (updated_at, last_message_id) = match newest {
        Some(e) if e.timestamp > root.created_at => (e.timestamp, e.message_id),
        Some(e) => (root.created_at, e.message_id),
        None => (root.created_at, root.first_message_id.clone()),
    };

    let mut links: Vec<LinkRecord> = Vec::new();
    if parts.links {
        for link in read_links {
            if !links.iter().any(|l| l.group_id == link.group_id) {
                links.push(link);
            }
        }
    }
    links.sort_by(|a, b| (a.linked_at, &a.group_id).cmp(&(b.linked_at, &b.group_id)));
    if !parts.merges {
        merges.clear();
    }
    merges.sort_by(|a, b| (a.merged_at, &a.child_id).cmp(&(b.merged_at, &b.child_id)));

    ProfileDoc {
        profile_id: root.profile_id,
        tree,
        created_at: root.created_at,
        updated_at,
        first_message_id: root.first_message_id,
        last_message_id,
        merges: root.merges,
        traits: root.traits,
        computed: if parts.computed {
            computed
        } else {
            Default::default()
        },
        external_ids: ordered_ids,
        links,
        merge_history: merges,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kindred_domain::Identifier;

    fn reads() -> ProfileReads {
        let id = |v: &str| Identifier::new("email", v);
        ProfileReads {
            root: RootRecord {
                profile_id: "prf_root".into(),
                created_at: 100,
                first_message_id: "m-first".into(),
                merges: 1,
                identifiers: vec![
                    IdentifierEntry {
                        id: id("b@x.io"),
                        added_at: 1,
                    },
                    IdentifierEntry {
                        id: id("a@x.io"),
                        added_at: 2,
                    },
                ],
                traits: Traits::default(),
            },
            tree: vec!["prf_root".into(), "prf_child".into()],
            external_ids: ["a@x.io", "b@x.io"]
                .into_iter()
                .map(|v| ExternalIdRecord {
                    id: id(v),
                    source_id: "src".into(),
                    collection: "users".into(),
                    encoding: "none".into(),
                    created_at: 1,
                    first_message_id: "m".into(),
                    added_at: 1,
                    owner: "prf_root".into(),
                })
                .collect(),
            latest: vec![
                LatestEvent {
                    timestamp: 500,
                    seq: 3,
                    message_id: "m-root".into(),
                },
                LatestEvent {
                    timestamp: 500,
                    seq: 9,
                    message_id: "m-child".into(),
                },
            ],
            links: vec![
                LinkRecord {
                    group_id: "g2".into(),
                    linked_at: 50,
                    message_id: "root-g2".into(),
                },
                LinkRecord {
                    group_id: "g1".into(),
                    linked_at: 70,
                    message_id: "root-g1".into(),
                },
                LinkRecord {
                    group_id: "g2".into(),
                    linked_at: 10,
                    message_id: "child-g2".into(),
                },
            ],
            merges: vec![],
            computed: Default::default(),
        }
    }

    #[test]
    fn the_document_follows_one_set_of_rules() {
        let doc = assemble(reads(), ProfileParts::ALL);
        let ids: Vec<_> = doc
            .external_ids
            .iter()
            .map(|r| r.id.value.as_str())
            .collect();
        assert_eq!(ids, ["b@x.io", "a@x.io"], "the root's identifier order");
        assert_eq!(
            (doc.updated_at, doc.last_message_id.as_str()),
            (500, "m-child")
        );
        let links: Vec<_> = doc.links.iter().map(|l| l.message_id.as_str()).collect();
        assert_eq!(links, ["root-g2", "root-g1"], "one link per group, sorted");
    }

    #[test]
    fn without_events_activity_is_the_creation() {
        let mut r = reads();
        r.latest.clear();
        let doc = assemble(r.clone(), ProfileParts::ALL);
        assert_eq!(
            (doc.updated_at, doc.last_message_id.as_str()),
            (100, "m-first")
        );
        let doc = assemble(reads(), ProfileParts::default());
        assert_eq!(
            (doc.updated_at, doc.last_message_id.as_str()),
            (100, "m-first")
        );
        assert!(doc.external_ids.is_empty() && doc.links.is_empty());
        // An event dated before the profile's creation is still its last one.
        r.latest = vec![LatestEvent {
            timestamp: 40,
            seq: 1,
            message_id: "m-old".into(),
        }];
        let doc = assemble(r, ProfileParts::ALL);
        assert_eq!(
            (doc.updated_at, doc.last_message_id.as_str()),
            (100, "m-old")
        );
    }
}
