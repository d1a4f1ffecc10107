//! Profile reads on the embedded store (the Profile API's port).

use async_trait::async_trait;
use kindred_domain::{Identifier, IdentifierEntry, Traits};
use rusqlite::types::Value as SqlValue;
use rusqlite::{params, params_from_iter, Connection, OptionalExtension};

use super::SqliteStore;
use crate::ports::{
    EventQuery, ExternalIdRecord, LinkRecord, MergeRecord, ProfileDoc, ProfileLookup, ProfileParts,
    Profiles, StoredEvent,
};
use crate::Result;

/// Follows merge pointers from `profile_id` to its root.
pub(crate) fn root_of(
    conn: &Connection,
    space_id: &str,
    profile_id: &str,
) -> Result<Option<String>> {
    Ok(root_with_traits(conn, space_id, profile_id, false)?.map(|(root, _)| root))
}

/// The root of the profile's tree, with the root's custom traits when
/// `traits` asks for them (one lookup instead of two).
pub(crate) fn root_with_traits(
    conn: &Connection,
    space_id: &str,
    profile_id: &str,
    traits: bool,
) -> Result<Option<(String, Option<String>)>> {
    let mut stmt = conn.prepare_cached(if traits {
        "SELECT parent_id, traits FROM profiles WHERE space_id = ?1 AND profile_id = ?2"
    } else {
        "SELECT parent_id, NULL FROM profiles WHERE space_id = ?1 AND profile_id = ?2"
    })?;
    let mut current = profile_id.to_string();
    loop {
        let row: Option<(Option<String>, Option<String>)> = stmt
            .query_row(params![space_id, current], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?;
        match row {
            None => return Ok(None),
            Some((None, t)) => return Ok(Some((current, t))),
            Some((Some(p), _)) => current = p,
        }
    }
}

/// The root and every profile merged into it, breadth first. (A plain
/// indexed lookup per level: the planner cannot misjudge it.)
pub(crate) fn tree(conn: &Connection, space_id: &str, root: &str) -> Result<Vec<String>> {
    let mut tree = vec![root.to_string()];
    let mut children_stmt = conn.prepare_cached(
        "SELECT profile_id FROM profiles INDEXED BY profiles_by_parent
         WHERE space_id = ?1 AND parent_id = ?2",
    )?;
    let mut next = 0;
    while next < tree.len() {
        let parent = tree[next].clone();
        next += 1;
        for child in
            children_stmt.query_map(params![space_id, parent], |r| r.get::<_, String>(0))?
        {
            tree.push(child?);
        }
    }
    Ok(tree)
}

/// The profile an identifier belongs to (the one that claimed it).
pub(crate) fn owner_of(
    conn: &Connection,
    space_id: &str,
    id: &Identifier,
) -> Result<Option<String>> {
    Ok(conn
        .prepare_cached(
            "SELECT profile_id FROM identifiers WHERE space_id = ?1 AND id_type = ?2 AND id_value = ?3",
        )?
        .query_row(params![space_id, id.kind, id.value], |r| r.get(0))
        .optional()?)
}

/// The root of the profile a lookup names, if it exists.
pub(crate) fn root_of_lookup(
    conn: &Connection,
    space_id: &str,
    lookup: &ProfileLookup,
) -> Result<Option<String>> {
    let start = match lookup {
        ProfileLookup::ProfileId(id) => Some(id.clone()),
        ProfileLookup::Identifier(id) => owner_of(conn, space_id, id)?,
    };
    match start {
        Some(start) => root_of(conn, space_id, &start),
        None => Ok(None),
    }
}

fn load_profile(
    conn: &Connection,
    space_id: &str,
    lookup: &ProfileLookup,
    parts: ProfileParts,
) -> Result<Option<ProfileDoc>> {
    let Some(root) = root_of_lookup(conn, space_id, lookup)? else {
        return Ok(None);
    };
    let row = conn
        .prepare_cached(
            "SELECT created_at, updated_at, first_message_id, last_message_id, merges, identifiers, traits
             FROM profiles WHERE space_id = ?1 AND profile_id = ?2",
        )?
        .query_row(params![space_id, root], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, String>(3)?,
                r.get::<_, i64>(4)?,
                r.get::<_, String>(5)?,
                r.get::<_, String>(6)?,
            ))
        })?;
    let (created_at, updated_at, first_message_id, last_message_id, merges, identifiers, traits) =
        row;
    let identifiers: Vec<IdentifierEntry> = serde_json::from_str(&identifiers)?;
    let traits: Traits = serde_json::from_str(&traits)?;

    let tree = tree(conn, space_id, &root)?;

    let mut external_ids = Vec::with_capacity(identifiers.len());
    let identifiers = if parts.external_ids {
        identifiers
    } else {
        Vec::new()
    };
    let mut id_stmt = conn.prepare_cached(
        "SELECT source_id, encoding, created_at, first_message_id FROM identifiers
         WHERE space_id = ?1 AND id_type = ?2 AND id_value = ?3",
    )?;
    for entry in identifiers {
        let row = id_stmt
            .query_row(params![space_id, entry.id.kind, entry.id.value], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
            })
            .optional()?;
        if let Some((source_id, encoding, created_at, first_message_id)) = row {
            external_ids.push(ExternalIdRecord {
                id: entry.id,
                source_id,
                collection: "users".into(),
                encoding,
                created_at,
                first_message_id,
            });
        }
    }

    // The profile's last activity is its newest event (events that change
    // nothing on the profile do not write it).
    let (mut updated_at, mut last_message_id) = (updated_at, last_message_id);
    let mut latest_ts = i64::MIN;
    let mut latest_stmt = conn.prepare_cached(
        "SELECT ts, message_id FROM events INDEXED BY events_by_profile WHERE space_id = ?1 AND profile_id = ?2
         ORDER BY ts DESC, seq DESC LIMIT 1",
    )?;
    for member in tree.iter().filter(|_| parts.activity) {
        let latest: Option<(i64, String)> = latest_stmt
            .query_row(params![space_id, member], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?;
        if let Some((ts, message_id)) = latest {
            if ts > latest_ts {
                latest_ts = ts;
                last_message_id = message_id;
                updated_at = updated_at.max(ts);
            }
        }
    }

    let mut links: Vec<LinkRecord> = Vec::new();
    if parts.links {
        let mut link_stmt = conn.prepare_cached(
            "SELECT group_id, linked_at, message_id FROM links WHERE space_id = ?1 AND profile_id = ?2",
        )?;
        for member in &tree {
            for link in link_stmt.query_map(params![space_id, member], |r| {
                Ok(LinkRecord {
                    group_id: r.get(0)?,
                    linked_at: r.get(1)?,
                    message_id: r.get(2)?,
                })
            })? {
                let link = link?;
                if !links.iter().any(|l| l.group_id == link.group_id) {
                    links.push(link);
                }
            }
        }
    }
    let mut merge_history = Vec::new();
    if parts.merges {
        let mut merge_stmt = conn.prepare_cached(
            "SELECT child_id, message_id, merged_at FROM merges WHERE space_id = ?1 AND parent_id = ?2",
        )?;
        for member in &tree {
            for merge in merge_stmt.query_map(params![space_id, member], |r| {
                Ok(MergeRecord {
                    parent_id: member.clone(),
                    child_id: r.get(0)?,
                    message_id: r.get(1)?,
                    merged_at: r.get(2)?,
                })
            })? {
                merge_history.push(merge?);
            }
        }
    }
    let computed = if parts.computed {
        super::compute::live_values(conn, space_id, &root)?
    } else {
        Default::default()
    };
    links.sort_by(|a, b| (a.linked_at, &a.group_id).cmp(&(b.linked_at, &b.group_id)));
    merge_history.sort_by(|a, b| (a.merged_at, &a.child_id).cmp(&(b.merged_at, &b.child_id)));

    Ok(Some(ProfileDoc {
        profile_id: root,
        tree,
        created_at,
        updated_at,
        first_message_id,
        last_message_id,
        merges: merges as u32,
        traits,
        computed,
        external_ids,
        links,
        merge_history,
    }))
}

fn load_events(
    conn: &Connection,
    space_id: &str,
    tree: &[String],
    q: &EventQuery,
) -> Result<Vec<StoredEvent>> {
    let mut sql = String::from(
        "SELECT ts, seq, body FROM events INDEXED BY events_by_profile WHERE space_id = ?",
    );
    let mut args: Vec<SqlValue> = vec![SqlValue::Text(space_id.to_string())];
    let placeholders = |n: usize| vec!["?"; n].join(", ");
    sql.push_str(&format!(
        " AND profile_id IN ({})",
        placeholders(tree.len())
    ));
    args.extend(tree.iter().map(|t| SqlValue::Text(t.clone())));
    if let Some(start) = q.start {
        sql.push_str(" AND ts >= ?");
        args.push(SqlValue::Integer(start));
    }
    if let Some(end) = q.end {
        sql.push_str(" AND ts < ?");
        args.push(SqlValue::Integer(end));
    }
    if !q.include.is_empty() {
        sql.push_str(&format!(" AND name IN ({})", placeholders(q.include.len())));
        args.extend(q.include.iter().map(|n| SqlValue::Text(n.clone())));
    }
    if !q.exclude.is_empty() {
        sql.push_str(&format!(
            " AND (name IS NULL OR name NOT IN ({}))",
            placeholders(q.exclude.len())
        ));
        args.extend(q.exclude.iter().map(|n| SqlValue::Text(n.clone())));
    }
    let (cmp, order) = if q.descending {
        ("<", "DESC")
    } else {
        (">", "ASC")
    };
    if let Some((ts, seq)) = q.after {
        sql.push_str(&format!(" AND (ts, seq) {cmp} (?, ?)"));
        args.push(SqlValue::Integer(ts));
        args.push(SqlValue::Integer(seq));
    }
    sql.push_str(&format!(" ORDER BY ts {order}, seq {order} LIMIT ?"));
    args.push(SqlValue::Integer(q.limit as i64));
    let mut stmt = conn.prepare_cached(&sql)?;
    let rows = stmt.query_map(params_from_iter(args), |r| {
        Ok(StoredEvent {
            timestamp: r.get(0)?,
            seq: r.get(1)?,
            body: r.get(2)?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

#[async_trait]
impl Profiles for SqliteStore {
    async fn profile(
        &self,
        space_id: &str,
        lookup: &ProfileLookup,
        parts: ProfileParts,
    ) -> Result<Option<ProfileDoc>> {
        let (space_id, lookup) = (space_id.to_string(), lookup.clone());
        self.blocking(move |s| load_profile(&*s.reader()?, &space_id, &lookup, parts))
            .await
    }

    async fn events(
        &self,
        space_id: &str,
        tree: &[String],
        query: &EventQuery,
    ) -> Result<Vec<StoredEvent>> {
        let (space_id, tree, query) = (space_id.to_string(), tree.to_vec(), query.clone());
        self.blocking(move |s| load_events(&*s.reader()?, &space_id, &tree, &query))
            .await
    }
}
