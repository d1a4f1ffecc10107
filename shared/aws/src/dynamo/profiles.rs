//! Profile reads on DynamoDB (the Profile API's port): a profile is its
//! root item plus the items of every profile merged into it, found through
//! the merge records kept under each parent.

use async_trait::async_trait;
use kindred_domain::IdentifierEntry;
use kindred_store::ports::{
    AccountDoc, EventQuery, ExternalIdRecord, LinkRecord, MergeRecord, ProfileDoc, ProfileLookup,
    ProfileParts, Profiles, StoredEvent,
};
use kindred_store::profile::{assemble, LatestEvent, ProfileReads, RootRecord};
use kindred_store::{Result, StoreError};

use super::{
    event_order, get_n, get_s, identifier_key, key, opt_s, profile_key, s, DynamoStore, Item,
    EVENTS_INDEX, META, PK,
};

/// A profile's root item, its tree (root first, breadth first) and the
/// merges that built it.
pub(crate) struct Resolved {
    pub root: Item,
    pub tree: Vec<String>,
    pub merge_history: Vec<MergeRecord>,
}

impl DynamoStore {
    /// Follows `start`'s merge pointers to its root and walks the tree
    /// under it; `None` if there is no such profile.
    pub(crate) async fn resolve(
        &self,
        space_id: &str,
        start: String,
        consistent: bool,
    ) -> Result<Option<Resolved>> {
        let mut current = start;
        let mut hops = 0;
        let root = loop {
            let Some(item) = self
                .get(profile_key(space_id, &current), consistent)
                .await?
            else {
                return Ok(None);
            };
            match opt_s(&item, "parent_id") {
                Some(parent) => current = parent.to_string(),
                None => break item,
            }
            hops += 1;
            if hops > 1_000 {
                return Err(StoreError::Invariant("a cycle of merge pointers"));
            }
        };
        let mut tree = vec![get_s(&root, "profile_id")?.to_string()];
        let mut merge_history = Vec::new();
        let mut next = 0;
        while next < tree.len() {
            let parent = tree[next].clone();
            next += 1;
            for item in self
                .items_with_prefix(profile_key(space_id, &parent), "MERGE#", consistent)
                .await?
            {
                let child = get_s(&item, "child_id")?.to_string();
                merge_history.push(MergeRecord {
                    parent_id: parent.clone(),
                    child_id: child.clone(),
                    message_id: get_s(&item, "message_id")?.to_string(),
                    merged_at: get_n(&item, "merged_at")?,
                });
                tree.push(child);
            }
        }
        Ok(Some(Resolved {
            root,
            tree,
            merge_history,
        }))
    }

    /// Every item of a partition whose sort key starts with `prefix`.
    pub(crate) async fn items_with_prefix(
        &self,
        pk: String,
        prefix: &str,
        consistent: bool,
    ) -> Result<Vec<Item>> {
        let mut query = self
            .client
            .query()
            .table_name(&self.table)
            .expression_attribute_values(":pk", s(pk))
            .consistent_read(consistent);
        // DynamoDB refuses `begins_with` of an empty prefix.
        query = if prefix.is_empty() {
            query.key_condition_expression("pk = :pk")
        } else {
            query
                .key_condition_expression("pk = :pk AND begins_with(sk, :prefix)")
                .expression_attribute_values(":prefix", s(prefix))
        };
        let mut items = Vec::new();
        self.query_pages(query, |item| {
            items.push(item.clone());
            Ok(true)
        })
        .await?;
        Ok(items)
    }

    /// Walks a profile's events in the index between `bounds`, oldest
    /// or newest first, until `visit` answers `false`.
    pub(crate) async fn walk_member(
        &self,
        space_id: &str,
        member: &str,
        bounds: (&str, &str),
        descending: bool,
        page: i32,
        mut visit: impl FnMut(&Item) -> Result<bool>,
    ) -> Result<()> {
        let query = self
            .client
            .query()
            .table_name(&self.table)
            .index_name(EVENTS_INDEX)
            .key_condition_expression("gpk = :p AND gsk BETWEEN :lo AND :hi")
            .expression_attribute_values(":p", s(profile_key(space_id, member)))
            .expression_attribute_values(":lo", s(bounds.0))
            .expression_attribute_values(":hi", s(bounds.1))
            .scan_index_forward(!descending)
            .limit(page);
        self.query_pages(query, &mut visit).await
    }

    /// A profile's events in the index that `q` selects, at most `q.limit`.
    async fn member_events(
        &self,
        space_id: &str,
        member: &str,
        bounds: (&str, &str),
        q: &EventQuery,
    ) -> Result<Vec<StoredEvent>> {
        let mut events = Vec::new();
        if q.limit == 0 {
            return Ok(events);
        }
        let page = (q.limit.max(1) * 2).min(1_000) as i32;
        self.walk_member(space_id, member, bounds, q.descending, page, |item| {
            if q.keeps(opt_s(item, "name")) {
                events.push(StoredEvent {
                    timestamp: get_n(item, "ts")?,
                    seq: get_n(item, "seq")?,
                    body: get_s(item, "body")?.to_string(),
                });
            }
            Ok(events.len() < q.limit)
        })
        .await?;
        Ok(events)
    }
}

impl DynamoStore {
    /// The identifier records of `identifiers` that exist.
    async fn external_id_records(
        &self,
        space_id: &str,
        identifiers: &[IdentifierEntry],
    ) -> Result<Vec<ExternalIdRecord>> {
        let keys = identifiers
            .iter()
            .map(|e| key(identifier_key(space_id, &e.id), META))
            .collect();
        let items = self.batch_get(keys, false).await?;
        let mut records = Vec::with_capacity(items.len());
        for entry in identifiers {
            let pk = identifier_key(space_id, &entry.id);
            if let Some(item) = items.iter().find(|i| opt_s(i, PK) == Some(pk.as_str())) {
                records.push(ExternalIdRecord {
                    id: entry.id.clone(),
                    source_id: get_s(item, "source_id")?.to_string(),
                    collection: "users".into(),
                    encoding: get_s(item, "encoding")?.to_string(),
                    created_at: get_n(item, "created_at")?,
                    first_message_id: get_s(item, "first_message_id")?.to_string(),
                    added_at: entry.added_at,
                    owner: get_s(item, "profile_id")?.to_string(),
                });
            }
        }
        Ok(records)
    }
}

/// Inclusive index bounds for a query's `start`, `end` and `after`.
pub(crate) fn bounds(q: &EventQuery) -> (String, String) {
    let mut lo = (i64::MIN, 0);
    let mut hi = (i64::MAX, i64::MAX);
    if let Some(start) = q.start {
        lo = lo.max((start, 0));
    }
    if let Some(end) = q.end {
        hi = hi.min((end.saturating_sub(1), i64::MAX));
    }
    if let Some((ts, seq)) = q.after {
        if q.descending {
            let before = if seq > 0 {
                (ts, seq - 1)
            } else {
                (ts.saturating_sub(1), i64::MAX)
            };
            hi = hi.min(before);
        } else {
            lo = lo.max((ts, seq.saturating_add(1)));
        }
    }
    (event_order(lo.0, lo.1), event_order(hi.0, hi.1))
}

#[async_trait]
impl Profiles for DynamoStore {
    async fn account(&self, space_id: &str, group_id: &str) -> Result<Option<AccountDoc>> {
        self.account_doc(space_id, group_id).await
    }

    async fn account_events(
        &self,
        space_id: &str,
        group_id: &str,
        query: &EventQuery,
    ) -> Result<Vec<StoredEvent>> {
        self.account_event_page(space_id, group_id, query).await
    }

    async fn profile(
        &self,
        space_id: &str,
        lookup: &ProfileLookup,
        parts: ProfileParts,
    ) -> Result<Option<ProfileDoc>> {
        let start = match lookup {
            ProfileLookup::ProfileId(id) => Some(id.clone()),
            ProfileLookup::Identifier(id) => self
                .get(identifier_key(space_id, id), false)
                .await?
                .map(|item| get_s(&item, "profile_id").map(str::to_string))
                .transpose()?,
        };
        let Some(start) = start else {
            return Ok(None);
        };
        let Some(Resolved {
            root,
            tree,
            merge_history,
        }) = self.resolve(space_id, start, false).await?
        else {
            return Ok(None);
        };
        let root = RootRecord {
            profile_id: get_s(&root, "profile_id")?.to_string(),
            created_at: get_n(&root, "created_at")?,
            first_message_id: get_s(&root, "first_message_id")?.to_string(),
            merges: get_n(&root, "merges")? as u32,
            identifiers: serde_json::from_str(get_s(&root, "identifiers")?)?,
            traits: serde_json::from_str(get_s(&root, "traits")?)?,
        };
        let mut reads = ProfileReads {
            external_ids: Vec::new(),
            latest: Vec::new(),
            links: Vec::new(),
            merges: merge_history,
            computed: Default::default(),
            root,
            tree,
        };
        if parts.external_ids {
            reads.external_ids = self
                .external_id_records(space_id, &reads.root.identifiers)
                .await?;
        }
        if parts.activity {
            let newest = EventQuery {
                limit: 1,
                descending: true,
                ..EventQuery::default()
            };
            let b = bounds(&newest);
            for member in &reads.tree {
                for event in self
                    .member_events(space_id, member, (&b.0, &b.1), &newest)
                    .await?
                {
                    let body: serde_json::Value = serde_json::from_str(&event.body)?;
                    reads.latest.push(LatestEvent {
                        timestamp: event.timestamp,
                        seq: event.seq,
                        message_id: body
                            .get("messageId")
                            .and_then(|v| v.as_str())
                            .unwrap_or_default()
                            .to_string(),
                    });
                }
            }
        }
        if parts.links {
            for member in &reads.tree {
                for item in self
                    .items_with_prefix(profile_key(space_id, member), "LINK#", false)
                    .await?
                {
                    reads.links.push(LinkRecord {
                        group_id: get_s(&item, "group_id")?.to_string(),
                        linked_at: get_n(&item, "linked_at")?,
                        message_id: get_s(&item, "message_id")?.to_string(),
                    });
                }
            }
        }
        if parts.computed {
            reads.computed = self
                .computed_values(space_id, &reads.root.profile_id)
                .await?;
        }
        Ok(Some(assemble(reads, parts)))
    }

    async fn events(
        &self,
        space_id: &str,
        tree: &[String],
        query: &EventQuery,
    ) -> Result<Vec<StoredEvent>> {
        let b = bounds(query);
        let mut events = Vec::new();
        for member in tree {
            events.extend(
                self.member_events(space_id, member, (&b.0, &b.1), query)
                    .await?,
            );
        }
        events.sort_by_key(|e| (e.timestamp, e.seq));
        if query.descending {
            events.reverse();
        }
        events.truncate(query.limit);
        Ok(events)
    }
}
