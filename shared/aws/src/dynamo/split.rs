//! Splitting a wrong merge on DynamoDB: the items it writes, and the
//! blocks the identity step reads.
//!
//! | item | `pk` | `sk` | attributes |
//! |---|---|---|---|
//! | split block | `PRF#{space}#{a}` | `SPLIT#{b}` | `created_at` (each pair both ways) |
//!
//! A split writes, in one transaction conditioned on the versions it
//! read: the child a root again (no `parent_id`, its identifiers and
//! replayed traits), the parent without them, the merge record deleted
//! and the two blocks. The identifier items the child takes back carry
//! `resplit` (the time), written first: an identity instance that cached
//! the child's merge pointer does not trust it for their owners.

use std::collections::{HashMap, HashSet};

use aws_sdk_dynamodb::types::{Delete, TransactWriteItem, Update};
use kindred_domain::privacy::{merges_after_split, split_identifiers};
use kindred_domain::{Identifier, IdentifierEntry};
use kindred_store::{now_millis, Result};

use super::profiles::Resolved;
use super::{
    get_n, get_s, identifier_key, key, lock, merge_sort_key, n, opt_s, profile_key,
    root_index_keys, s, service, space_key, transact_put, DynamoStore, META, PK,
};

/// Marks an identifier item whose owner left its parent in a split.
pub(crate) const RESPLIT: &str = "resplit";

fn split_sort_key(other: &str) -> String {
    format!("SPLIT#{other}")
}

/// The profiles of `child`'s subtree (itself first), from the merges that
/// built the tree.
fn subtree(resolved: &Resolved, child: &str) -> Vec<String> {
    let mut out = vec![child.to_string()];
    let mut next = 0;
    while next < out.len() {
        let parent = out[next].clone();
        next += 1;
        for m in &resolved.merge_history {
            if m.parent_id == parent && !out.contains(&m.child_id) {
                out.push(m.child_id.clone());
            }
        }
    }
    out
}

impl DynamoStore {
    /// The pairs of `roots` that were split apart, each in both orders
    /// (read only when an event names two roots or more: a merge).
    pub(crate) async fn split_blocks(
        &self,
        space_id: &str,
        roots: &[&String],
    ) -> Result<Vec<(String, String)>> {
        let mut keys = Vec::new();
        for (i, a) in roots.iter().enumerate() {
            for b in &roots[i + 1..] {
                keys.push(key(profile_key(space_id, a), &split_sort_key(b)));
            }
        }
        let mut apart = Vec::new();
        for item in self.batch_get(keys, true).await? {
            let a = get_s(&item, "profile_id")?.to_string();
            let b = get_s(&item, "other_id")?.to_string();
            apart.push((b.clone(), a.clone()));
            apart.push((a, b));
        }
        Ok(apart)
    }

    /// One attempt at splitting `child` out of the tree `resolved`:
    /// `Ok(None)` if something changed since it was read (read again and
    /// retry), else the identifiers the child took back.
    pub(crate) async fn split_once(
        &self,
        space_id: &str,
        resolved: &Resolved,
        child: &str,
    ) -> Result<Option<Vec<Identifier>>> {
        let now = now_millis();
        let root = &resolved.tree[0];
        let child_tree = subtree(resolved, child);
        let parent_side: Vec<String> = resolved
            .tree
            .iter()
            .filter(|m| !child_tree.contains(m))
            .cloned()
            .collect();
        let Some(child_item) = self.get(profile_key(space_id, child), true).await? else {
            return Ok(None);
        };
        let Some(child_parent) = opt_s(&child_item, "parent_id").map(str::to_string) else {
            return Ok(None);
        };
        let list: Vec<IdentifierEntry> =
            serde_json::from_str(get_s(&resolved.root, "identifiers")?)?;
        let owners: HashMap<String, String> = self
            .batch_get(
                list.iter()
                    .map(|e| key(identifier_key(space_id, &e.id), META))
                    .collect(),
                true,
            )
            .await?
            .iter()
            .map(|i| {
                Ok((
                    get_s(i, PK)?.to_string(),
                    get_s(i, "profile_id")?.to_string(),
                ))
            })
            .collect::<Result<_>>()?;
        let child_owns = |id: &Identifier| {
            owners
                .get(&identifier_key(space_id, id))
                .is_some_and(|o| child_tree.contains(o))
        };
        let moving: HashSet<Identifier> = list
            .iter()
            .filter(|e| child_owns(&e.id))
            .map(|e| e.id.clone())
            .collect();
        let (to_child, to_parent) = split_identifiers(list, |id| moving.contains(id));
        // First the marks: harmless if the split then fails (an identity
        // instance only reads those owners' pointers afresh).
        for e in &to_child {
            let update = self
                .client
                .update_item()
                .table_name(&self.table)
                .set_key(Some(key(identifier_key(space_id, &e.id), META)))
                .update_expression("SET #r = :now")
                .condition_expression("attribute_exists(pk)")
                .expression_attribute_names("#r", RESPLIT)
                .expression_attribute_values(":now", n(now));
            self.conditional_update(update).await?;
        }
        let source_id = match self.get(space_key(space_id), true).await? {
            Some(space) => get_s(&space, "source_id")?.to_string(),
            None => return Ok(None),
        };
        let child_traits = self
            .replayed_traits(space_id, &child_tree, &source_id)
            .await?;
        let parent_traits = self
            .replayed_traits(space_id, &parent_side, &source_id)
            .await?;

        let update = |pk: String, expression: &str, condition: &str| {
            Update::builder()
                .table_name(&self.table)
                .set_key(Some(key(pk, META)))
                .update_expression(expression)
                .condition_expression(condition)
                .expression_attribute_values(":one", n(1))
        };
        let mut items = vec![TransactWriteItem::builder()
            .update(
                update(
                    profile_key(space_id, child),
                    "REMOVE parent_id SET identifiers = :ids, traits = :traits, \
                     version = version + :one, rpk = :rpk, rsk = :rsk",
                    "version = :v AND parent_id = :parent",
                )
                .set_expression_attribute_values(Some(
                    root_index_keys(space_id, child)
                        .into_iter()
                        .map(|(name, v)| (format!(":{name}"), v))
                        .chain([(":one".to_string(), n(1))])
                        .collect(),
                ))
                .expression_attribute_values(":ids", s(serde_json::to_string(&to_child)?))
                .expression_attribute_values(":traits", s(serde_json::to_string(&child_traits)?))
                .expression_attribute_values(":v", n(get_n(&child_item, "version")?))
                .expression_attribute_values(":parent", s(&child_parent))
                .build()
                .map_err(service)?,
            )
            .build()];
        let merges = merges_after_split(
            get_n(&resolved.root, "merges")? as u32,
            get_n(&child_item, "merges")? as u32,
        );
        items.push(
            TransactWriteItem::builder()
                .update(
                    update(
                        profile_key(space_id, root),
                        "SET identifiers = :ids, traits = :traits, merges = :merges, version = version + :one",
                        "version = :v AND attribute_not_exists(parent_id)",
                    )
                    .expression_attribute_values(":ids", s(serde_json::to_string(&to_parent)?))
                    .expression_attribute_values(
                        ":traits",
                        s(serde_json::to_string(&parent_traits)?),
                    )
                    .expression_attribute_values(":merges", n(merges))
                    .expression_attribute_values(":v", n(get_n(&resolved.root, "version")?))
                    .build()
                    .map_err(service)?,
                )
                .build(),
        );
        items.push(
            TransactWriteItem::builder()
                .delete(
                    Delete::builder()
                        .table_name(&self.table)
                        .set_key(Some(key(
                            profile_key(space_id, &child_parent),
                            &merge_sort_key(child),
                        )))
                        .condition_expression("attribute_exists(pk)")
                        .build()
                        .map_err(service)?,
                )
                .build(),
        );
        for (a, b) in [(root.as_str(), child), (child, root.as_str())] {
            let mut block = key(profile_key(space_id, a), &split_sort_key(b));
            block.insert("profile_id".into(), s(a));
            block.insert("other_id".into(), s(b));
            block.insert("created_at".into(), n(now));
            items.push(transact_put(&self.table, block, None)?);
        }
        if self.transact_conditional(items).await?.is_err() {
            return Ok(None);
        }
        // This instance's own caches; other instances find the versions
        // changed (their writes fail and re-read) and the marks.
        let mut caches = lock(&self.caches);
        for m in &resolved.tree {
            caches
                .profiles
                .remove(&(space_id.to_string(), m.to_string()));
        }
        for m in &child_tree {
            caches
                .parents
                .remove(&(space_id.to_string(), m.to_string()));
        }
        Ok(Some(to_child.into_iter().map(|e| e.id).collect()))
    }

    /// The traits the events recorded on `members` set, replayed in time
    /// order ([`kindred_store::privacy::replay_traits`]).
    async fn replayed_traits(
        &self,
        space_id: &str,
        members: &[String],
        source_id: &str,
    ) -> Result<kindred_domain::Traits> {
        let mut events = Vec::new();
        for member in members {
            self.walk_member(space_id, member, ("0", "~"), false, 1_000, |item| {
                events.push((
                    get_n(item, "ts")?,
                    get_n(item, "seq")?,
                    get_s(item, "body")?.to_string(),
                ));
                Ok(true)
            })
            .await?;
        }
        kindred_store::privacy::replay_traits(events, source_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kindred_store::ports::MergeRecord;

    #[test]
    fn a_subtree_is_the_child_and_everything_merged_into_it() {
        let merge = |p: &str, c: &str| MergeRecord {
            parent_id: p.into(),
            child_id: c.into(),
            message_id: "m".into(),
            merged_at: 0,
        };
        let resolved = Resolved {
            root: Default::default(),
            tree: ["r", "a", "b", "c", "d"].map(String::from).to_vec(),
            merge_history: vec![
                merge("r", "a"),
                merge("r", "b"),
                merge("a", "c"),
                merge("c", "d"),
            ],
        };
        assert_eq!(subtree(&resolved, "a"), ["a", "c", "d"]);
        assert_eq!(subtree(&resolved, "b"), ["b"]);
    }
}
