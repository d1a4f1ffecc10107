//! Profile reads on the embedded store (the Profile API's port).

use crate::body::StoredBody;
use async_trait::async_trait;
use kindred_domain::{Identifier, IdentifierEntry};
use rusqlite::types::Value as SqlValue;
use rusqlite::{params, params_from_iter, Connection, OptionalExtension};

use super::SqliteStore;
use kindred_store::ports::{
    AccountDoc, EventQuery, ExternalIdRecord, LinkRecord, MergeRecord, ProfileDoc, ProfileLookup,
    ProfileParts, Profiles, StoredEvent,
};
use kindred_store::profile::{assemble, LatestEvent, ProfileReads, RootRecord};
use kindred_store::Result;

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
    let (created_at, first_message_id, merges, identifiers, traits): (
        i64,
        String,
        i64,
        String,
        String,
    ) = conn
        .prepare_cached(
            "SELECT created_at, first_message_id, merges, identifiers, traits
             FROM profiles WHERE space_id = ?1 AND profile_id = ?2",
        )?
        .query_row(params![space_id, root], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
        })?;
    let root = RootRecord {
        profile_id: root,
        created_at,
        first_message_id,
        merges: merges as u32,
        identifiers: serde_json::from_str(&identifiers)?,
        traits: serde_json::from_str(&traits)?,
    };
    let tree = tree(conn, space_id, &root.profile_id)?;
    let mut reads = ProfileReads {
        external_ids: Vec::new(),
        latest: Vec::new(),
        links: Vec::new(),
        merges: Vec::new(),
        computed: Default::default(),
        root,
        tree,
    };
    if parts.external_ids {
        reads.external_ids = external_id_records(conn, space_id, &reads.root.identifiers)?;
    }
    if parts.activity {
        let mut latest_stmt = conn.prepare_cached(
            "SELECT ts, seq, message_id FROM events INDEXED BY events_by_profile
             WHERE space_id = ?1 AND profile_id = ?2 ORDER BY ts DESC, seq DESC LIMIT 1",
        )?;
        for member in &reads.tree {
            if let Some(latest) = latest_stmt
                .query_row(params![space_id, member], |r| {
                    Ok(LatestEvent {
                        timestamp: r.get(0)?,
                        seq: r.get(1)?,
                        message_id: r.get(2)?,
                    })
                })
                .optional()?
            {
                reads.latest.push(latest);
            }
        }
    }
    if parts.links {
        let mut link_stmt = conn.prepare_cached(
            "SELECT group_id, linked_at, message_id FROM links WHERE space_id = ?1 AND profile_id = ?2",
        )?;
        for member in &reads.tree {
            for link in link_stmt.query_map(params![space_id, member], |r| {
                Ok(LinkRecord {
                    group_id: r.get(0)?,
                    linked_at: r.get(1)?,
                    message_id: r.get(2)?,
                })
            })? {
                reads.links.push(link?);
            }
        }
    }
    if parts.merges {
        let mut merge_stmt = conn.prepare_cached(
            "SELECT child_id, message_id, merged_at FROM merges WHERE space_id = ?1 AND parent_id = ?2",
        )?;
        for member in &reads.tree {
            for merge in merge_stmt.query_map(params![space_id, member], |r| {
                Ok(MergeRecord {
                    parent_id: member.clone(),
                    child_id: r.get(0)?,
                    message_id: r.get(1)?,
                    merged_at: r.get(2)?,
                })
            })? {
                reads.merges.push(merge?);
            }
        }
    }
    if parts.computed {
        reads.computed = super::compute::live_values(conn, space_id, &reads.root.profile_id)?;
    }
    Ok(Some(assemble(reads, parts)))
}

/// The stored records of `identifiers` that exist.
fn external_id_records(
    conn: &Connection,
    space_id: &str,
    identifiers: &[IdentifierEntry],
) -> Result<Vec<ExternalIdRecord>> {
    let mut id_stmt = conn.prepare_cached(
        "SELECT source_id, encoding, created_at, first_message_id, profile_id FROM identifiers
         WHERE space_id = ?1 AND id_type = ?2 AND id_value = ?3",
    )?;
    let mut records = Vec::with_capacity(identifiers.len());
    for entry in identifiers {
        let row = id_stmt
            .query_row(params![space_id, entry.id.kind, entry.id.value], |r| {
                Ok(ExternalIdRecord {
                    id: entry.id.clone(),
                    source_id: r.get(0)?,
                    collection: "users".into(),
                    encoding: r.get(1)?,
                    created_at: r.get(2)?,
                    first_message_id: r.get(3)?,
                    added_at: entry.added_at,
                    owner: r.get(4)?,
                })
            })
            .optional()?;
        records.extend(row);
    }
    Ok(records)
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
    sql.push_str(&format!(
        " AND profile_id IN ({})",
        placeholders(tree.len())
    ));
    args.extend(tree.iter().map(|t| SqlValue::Text(t.clone())));
    select_events(conn, sql, args, q)
}

fn placeholders(n: usize) -> String {
    vec!["?"; n].join(", ")
}

/// The events of one account, through its index.
fn load_account_events(
    conn: &Connection,
    space_id: &str,
    group_id: &str,
    q: &EventQuery,
) -> Result<Vec<StoredEvent>> {
    let sql = String::from(
        "SELECT ts, seq, body FROM account_events JOIN events USING (seq, ts, space_id)
         WHERE space_id = ? AND group_id = ?",
    );
    let args = vec![
        SqlValue::Text(space_id.to_string()),
        SqlValue::Text(group_id.to_string()),
    ];
    select_events(conn, sql, args, q)
}

/// `sql` (selecting `ts, seq, body` from rows that `args` pick) with the
/// query's filters, order, cursor and limit.
fn select_events(
    conn: &Connection,
    mut sql: String,
    mut args: Vec<SqlValue>,
    q: &EventQuery,
) -> Result<Vec<StoredEvent>> {
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
            body: r.get::<_, StoredBody>(2)?.0,
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

    async fn account(&self, space_id: &str, group_id: &str) -> Result<Option<AccountDoc>> {
        let (space_id, group_id) = (space_id.to_string(), group_id.to_string());
        self.blocking(move |s| load_account(&*s.reader()?, &space_id, &group_id))
            .await
    }

    async fn account_events(
        &self,
        space_id: &str,
        group_id: &str,
        query: &EventQuery,
    ) -> Result<Vec<StoredEvent>> {
        let (space_id, group_id, query) =
            (space_id.to_string(), group_id.to_string(), query.clone());
        self.blocking(move |s| load_account_events(&*s.reader()?, &space_id, &group_id, &query))
            .await
    }
}

fn load_account(conn: &Connection, space_id: &str, group_id: &str) -> Result<Option<AccountDoc>> {
    let Some(json) = conn
        .prepare_cached("SELECT account FROM accounts WHERE space_id = ?1 AND group_id = ?2")?
        .query_row(params![space_id, group_id], |r| r.get::<_, String>(0))
        .optional()?
    else {
        return Ok(None);
    };
    let users = conn
        .prepare_cached(
            "SELECT profile_id FROM account_users WHERE space_id = ?1 AND group_id = ?2
             ORDER BY profile_id",
        )?
        .query_map(params![space_id, group_id], |r| r.get::<_, String>(0))?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(Some(AccountDoc {
        account: serde_json::from_str(&json)?,
        users,
    }))
}
