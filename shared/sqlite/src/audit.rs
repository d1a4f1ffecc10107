//! A full read of one space's identity graph, for consistency checks in
//! tests and operations (`root` of every event and identifier).

use std::collections::HashMap;

use kindred_domain::Identifier;
use rusqlite::params;

use super::SqliteStore;
use kindred_store::Result;

pub use kindred_store::audit::{AuditEvent, GraphAudit};

impl SqliteStore {
    pub fn audit(&self, space_id: &str) -> Result<GraphAudit> {
        let conn = self.reader()?;
        let tx = conn.unchecked_transaction()?;
        let mut parents: HashMap<String, Option<String>> = HashMap::new();
        let mut audit = GraphAudit::default();
        {
            let mut stmt = tx.prepare(
                "SELECT profile_id, parent_id, identifiers, merges, traits FROM profiles WHERE space_id = ?1",
            )?;
            let mut rows = stmt.query(params![space_id])?;
            while let Some(r) = rows.next()? {
                let id: String = r.get(0)?;
                let parent: Option<String> = r.get(1)?;
                if parent.is_none() {
                    let ids: String = r.get(2)?;
                    audit.roots.insert(id.clone(), serde_json::from_str(&ids)?);
                    audit.merges.insert(id.clone(), r.get::<_, i64>(3)? as u32);
                    let traits: String = r.get(4)?;
                    audit
                        .traits
                        .insert(id.clone(), serde_json::from_str(&traits)?);
                }
                parents.insert(id, parent);
            }
        }
        let root = |id: &str| {
            let mut current = id.to_string();
            while let Some(Some(p)) = parents.get(&current) {
                current = p.clone();
            }
            current
        };
        {
            let mut stmt = tx.prepare(
                "SELECT id_type, id_value, profile_id FROM identifiers WHERE space_id = ?1",
            )?;
            let mut rows = stmt.query(params![space_id])?;
            while let Some(r) = rows.next()? {
                let owner: String = r.get(2)?;
                audit.owners.insert(
                    Identifier {
                        kind: r.get(0)?,
                        value: r.get(1)?,
                    },
                    root(&owner),
                );
            }
        }
        {
            let mut stmt = tx.prepare(
                "SELECT seq, message_id, body, profile_id FROM events WHERE space_id = ?1 ORDER BY seq",
            )?;
            let mut rows = stmt.query(params![space_id])?;
            while let Some(r) = rows.next()? {
                let profile: Option<String> = r.get(3)?;
                audit.events.push(AuditEvent {
                    seq: r.get(0)?,
                    message_id: r.get(1)?,
                    body: r.get::<_, crate::body::StoredBody>(2)?.0,
                    root: profile.map(|p| root(&p)),
                });
            }
        }
        Ok(audit)
    }
}
