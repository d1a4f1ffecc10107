//! A full read of one space's identity graph on DynamoDB (a consistent
//! scan), for consistency checks in tests and operations. Costs a scan of
//! the table: never on a request path.

use std::collections::HashMap;

use kindred_domain::Identifier;
use kindred_store::audit::{AuditEvent, GraphAudit};
use kindred_store::Result;

use super::{get_n, get_s, opt_s, service, DynamoStore, Item, PK, SK};

impl DynamoStore {
    pub async fn audit(&self, space_id: &str) -> Result<GraphAudit> {
        let mut items: Vec<Item> = Vec::new();
        let mut start = None;
        loop {
            let out = self
                .client
                .scan()
                .table_name(&self.table)
                .consistent_read(true)
                .set_exclusive_start_key(start)
                .send()
                .await
                .map_err(service)?;
            items.extend(out.items().iter().cloned());
            match out.last_evaluated_key() {
                Some(k) => start = Some(k.clone()),
                None => break,
            }
        }
        let (profiles, identifiers, events) = (
            format!("PRF#{space_id}#"),
            format!("ID#{space_id}#"),
            format!("EVT#{space_id}#"),
        );
        let mut audit = GraphAudit::default();
        let mut parents: HashMap<String, Option<String>> = HashMap::new();
        for item in items.iter().filter(|i| {
            opt_s(i, PK).is_some_and(|pk| pk.starts_with(&profiles)) && opt_s(i, SK) == Some("META")
        }) {
            let id = get_s(item, "profile_id")?.to_string();
            let parent = opt_s(item, "parent_id").map(str::to_string);
            if parent.is_none() {
                audit.roots.insert(
                    id.clone(),
                    serde_json::from_str(get_s(item, "identifiers")?)?,
                );
                audit
                    .merges
                    .insert(id.clone(), get_n(item, "merges")? as u32);
                audit
                    .traits
                    .insert(id.clone(), serde_json::from_str(get_s(item, "traits")?)?);
            }
            parents.insert(id, parent);
        }
        let root = |id: &str| {
            let mut current = id.to_string();
            while let Some(Some(p)) = parents.get(&current) {
                current = p.clone();
            }
            current
        };
        for item in &items {
            let Some(pk) = opt_s(item, PK) else { continue };
            if pk.starts_with(&identifiers) {
                audit.owners.insert(
                    Identifier::new(get_s(item, "id_type")?, get_s(item, "id_value")?),
                    root(get_s(item, "profile_id")?),
                );
            } else if pk.starts_with(&events) {
                audit.events.push(AuditEvent {
                    seq: get_n(item, "seq")?,
                    message_id: get_s(item, "message_id")?.to_string(),
                    body: get_s(item, "body")?.to_string(),
                    root: opt_s(item, "profile_id").map(&root),
                });
            }
        }
        Ok(audit)
    }
}
