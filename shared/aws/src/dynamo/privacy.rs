//! Regulations and the suppression list on DynamoDB.
//!
//! | item | `pk` | `sk` | attributes |
//! |---|---|---|---|
//! | regulation | `REG#{space}` | its id (time-ordered) | `regulation_type`, `subject_type`, `created_at`, `finished_at`, `subject_count` |
//! | a regulation's subject | `REGSUB#{space}#{regulation}` | 5-digit index | `subject_id` (until done), `subject_hash`, `status`, `reason`, `profiles_deleted`, `suppressed_at` |
//! | suppressed identifier | `SUP#{space}#{hash}` | `FOREVER` | `subjects` (string set of subject hashes) |
//! | suppressed identifier, bounded | `SUP#{space}#{hash}` | `BEFORE` | `before` (ms), `expires_at` (TTL) |
//! | a subject's suppressed identifiers | `SUPSUBJ#{space}#{subject hash}` | `META` | `ids` (string set of hashes) |
//! | dropped events | `SPACE#{space}` | `SUPPRESSED` | `n` |
//!
//! Hashes are `kindred_domain::privacy::identifier_hash` in hex: no
//! identifier is stored in clear. The space item's `suppressing` flag
//! (cached with the identity rules) spares spaces without a list the
//! lookup.

use aws_sdk_dynamodb::types::{
    AttributeValue, DeleteRequest, PutRequest, ReturnConsumedCapacity, WriteRequest,
};
use kindred_domain::privacy::{
    identifier_hash, BOUNDED_SUPPRESSION_RETENTION, VIOLATION_RETENTION,
};
use kindred_domain::{Identifier, IdentifierEntry, Millis};
use kindred_store::privacy::{Violation, ViolationPage};
use kindred_store::Result;

use super::compute::changes_key;
use super::sync::{dead_key, out_key};
use super::{
    get_s, identifier_key, key, n, opt_s, profile_key, s, service, space_key, DynamoStore, Item,
    EXPIRES_AT, META, PK, SK,
};

const FOREVER: &str = "FOREVER";
const BEFORE: &str = "BEFORE";
const SUPPRESSED: &str = "SUPPRESSED";

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn sup_key(space_id: &str, hash: &str) -> String {
    format!("SUP#{space_id}#{hash}")
}

fn subject_list_key(space_id: &str, subject_hash: &str) -> String {
    format!("SUPSUBJ#{space_id}#{subject_hash}")
}

fn violations_key(space_id: &str, profile_id: Option<&str>) -> String {
    match profile_id {
        None => format!("VIOL#{space_id}"),
        Some(p) => format!("VIOL#{space_id}#{p}"),
    }
}

pub(crate) fn regulations_key(space_id: &str) -> String {
    format!("REG#{space_id}")
}

pub(crate) fn subjects_key(space_id: &str, regulation_id: &str) -> String {
    format!("REGSUB#{space_id}#{regulation_id}")
}

impl DynamoStore {
    /// The identity step's check: whether any of the event's identifiers
    /// is suppressed for an event received at `received_at`; a dropped
    /// event is counted.
    pub(crate) async fn drop_if_suppressed(
        &self,
        space_id: &str,
        ids: &[Identifier],
        received_at: Millis,
    ) -> Result<Option<Identifier>> {
        if ids.is_empty() || !self.space_suppressing(space_id).await? {
            return Ok(None);
        }
        let mut keys = Vec::with_capacity(ids.len() * 2);
        let mut by_key = std::collections::HashMap::new();
        for id in ids {
            let pk = sup_key(space_id, &hex(&identifier_hash(space_id, id)));
            by_key.insert(pk.clone(), id);
            keys.push(key(pk.clone(), FOREVER));
            keys.push(key(pk, BEFORE));
        }
        // Eventually consistent (half the units): a regulation deletes only
        // after the list has long settled (`crate::privacy::SETTLE`).
        let items = self.batch_get(keys, false).await?;
        let dropped = items
            .iter()
            .find(|item| match opt_s(item, SK) {
                Some(FOREVER) => {
                    matches!(item.get("subjects"), Some(AttributeValue::Ss(s)) if !s.is_empty())
                }
                Some(BEFORE) => match item.get("before") {
                    Some(AttributeValue::N(v)) => v.parse::<i64>().is_ok_and(|b| received_at < b),
                    _ => false,
                },
                _ => false,
            })
            .and_then(|item| opt_s(item, PK))
            .and_then(|pk| by_key.get(pk))
            .map(|id| (*id).clone());
        if dropped.is_some() {
            let out = self
                .client
                .update_item()
                .table_name(&self.table)
                .set_key(Some(key(space_key(space_id), SUPPRESSED)))
                .update_expression("ADD n :one")
                .expression_attribute_values(":one", n(1))
                .return_consumed_capacity(ReturnConsumedCapacity::Total)
                .send()
                .await
                .map_err(service)?;
            self.usage.write(out.consumed_capacity());
        }
        Ok(dropped)
    }

    /// Events dropped because they named a suppressed person.
    pub(crate) async fn suppressed_count(&self, space_id: &str) -> Result<u64> {
        let out = self
            .client
            .get_item()
            .table_name(&self.table)
            .set_key(Some(key(space_key(space_id), SUPPRESSED)))
            .return_consumed_capacity(ReturnConsumedCapacity::Total)
            .send()
            .await
            .map_err(service)?;
        self.usage.read(out.consumed_capacity());
        Ok(match out.item().and_then(|i| i.get("n")) {
            Some(AttributeValue::N(v)) => v.parse().unwrap_or(0),
            _ => 0,
        })
    }

    /// Puts identifiers on the space's suppression list for `subject`:
    /// until UNSUPPRESS (`received_before: None`), or only for events
    /// received before a moment (kept 15 days).
    pub(crate) async fn suppress(
        &self,
        space_id: &str,
        subject_hash: &str,
        ids: &[Identifier],
        received_before: Option<Millis>,
    ) -> Result<()> {
        // The flag first: an identity step that sees an item also sees it.
        let out = self
            .client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(key(space_key(space_id), META)))
            .update_expression("SET suppressing = :t")
            .condition_expression("attribute_exists(pk)")
            .expression_attribute_values(":t", AttributeValue::Bool(true))
            .return_consumed_capacity(ReturnConsumedCapacity::Total)
            .send()
            .await
            .map_err(service)?;
        self.usage.write(out.consumed_capacity());
        // A set: the subject is usually one of the person's identifiers.
        let hashes: Vec<String> = ids
            .iter()
            .map(|id| hex(&identifier_hash(space_id, id)))
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        for hash in &hashes {
            let request = match received_before {
                None => self
                    .client
                    .update_item()
                    .table_name(&self.table)
                    .set_key(Some(key(sup_key(space_id, hash), FOREVER)))
                    .update_expression("ADD subjects :s")
                    .expression_attribute_values(
                        ":s",
                        AttributeValue::Ss(vec![subject_hash.to_string()]),
                    ),
                Some(before) => self
                    .client
                    .update_item()
                    .table_name(&self.table)
                    .set_key(Some(key(sup_key(space_id, hash), BEFORE)))
                    .update_expression("SET #b = :b, #e = :e")
                    // Only ever later.
                    .condition_expression("attribute_not_exists(#b) OR #b < :b")
                    .expression_attribute_names("#b", "before")
                    .expression_attribute_names("#e", EXPIRES_AT)
                    .expression_attribute_values(":b", n(before))
                    .expression_attribute_values(
                        ":e",
                        n((before + BOUNDED_SUPPRESSION_RETENTION) / 1000),
                    ),
            };
            // A bounded suppression already later than this one stays.
            self.conditional_update(request).await?;
        }
        if received_before.is_none() && !hashes.is_empty() {
            let out = self
                .client
                .update_item()
                .table_name(&self.table)
                .set_key(Some(key(subject_list_key(space_id, subject_hash), META)))
                .update_expression("ADD ids :ids")
                .expression_attribute_values(":ids", AttributeValue::Ss(hashes))
                .return_consumed_capacity(ReturnConsumedCapacity::Total)
                .send()
                .await
                .map_err(service)?;
            self.usage.write(out.consumed_capacity());
        }
        Ok(())
    }

    /// Lifts every suppression made for `subject`.
    pub(crate) async fn unsuppress(&self, space_id: &str, subject_hash: &str) -> Result<()> {
        let list_key = subject_list_key(space_id, subject_hash);
        let Some(list) = self.get(list_key.clone(), true).await? else {
            return Ok(());
        };
        let hashes = match list.get("ids") {
            Some(AttributeValue::Ss(ids)) => ids.clone(),
            _ => Vec::new(),
        };
        for hash in hashes {
            let out = self
                .client
                .update_item()
                .table_name(&self.table)
                .set_key(Some(key(sup_key(space_id, &hash), FOREVER)))
                .update_expression("DELETE subjects :s")
                .expression_attribute_values(
                    ":s",
                    AttributeValue::Ss(vec![subject_hash.to_string()]),
                )
                .return_consumed_capacity(ReturnConsumedCapacity::Total)
                .send()
                .await
                .map_err(service)?;
            self.usage.write(out.consumed_capacity());
        }
        self.delete_keys(vec![key(list_key, META)]).await
    }

    /// Deletes every item of a person's profiles: the identifiers they own
    /// (free to claim again), each member's profile partition (profile,
    /// merge records, account links, and the accounts' links back), events, computed state and due
    /// entry, their change log entries and their calls queued or dead at
    /// any destination. Calls queued under `keep` (a regulation's own
    /// farewell calls) stay.
    pub(crate) async fn delete_person(
        &self,
        space_id: &str,
        members: &[String],
        identifiers: &[IdentifierEntry],
        keep: &str,
    ) -> Result<()> {
        let mut keys: Vec<Item> = identifiers
            .iter()
            .map(|e| key(identifier_key(space_id, &e.id), META))
            .collect();
        for member in members {
            for item in self
                .items_with_prefix(profile_key(space_id, member), "", true)
                .await?
            {
                let sort = get_s(&item, SK)?;
                // A link to an account has its twin in the account's
                // partition, naming this profile as one of its users.
                if let Some(group_id) = sort.strip_prefix("LINK#") {
                    let account = super::accounts::account_key(space_id, group_id);
                    keys.push(key(account, &format!("USER#{member}")));
                }
                keys.push(key(get_s(&item, PK)?.to_string(), sort));
            }
            let mut events = Vec::new();
            self.walk_member(space_id, member, ("0", "~"), false, 500, |item| {
                events.push(key(get_s(item, PK)?.to_string(), get_s(item, SK)?));
                Ok(true)
            })
            .await?;
            keys.extend(events);
            // The person's violations log entries, and their copies in
            // the space's list.
            for item in self
                .items_with_prefix(violations_key(space_id, Some(member)), "", true)
                .await?
            {
                let sort = get_s(&item, SK)?.to_string();
                keys.push(key(violations_key(space_id, None), &sort));
                keys.push(key(get_s(&item, PK)?.to_string(), &sort));
            }
            self.forget_profile(space_id, member);
        }
        // The change log, and every destination's queue and dead letters:
        // one partition each, read whole and filtered by profile.
        let mut partitions = vec![changes_key(space_id)];
        for d in self.destination_items(space_id).await? {
            partitions.push(out_key(space_id, &d.record.destination_id));
            partitions.push(dead_key(space_id, &d.record.destination_id));
        }
        for pk in partitions {
            for item in self.items_with_prefix(pk, "", true).await? {
                let profile = opt_s(&item, "profile_id");
                if profile.is_some_and(|p| p != keep && members.iter().any(|m| m == p)) {
                    keys.push(key(get_s(&item, PK)?.to_string(), get_s(&item, SK)?));
                }
            }
        }
        self.delete_keys(keys).await?;
        // The computed state last, once no profile of the person is left
        // for a fold to resolve: off every member list (sizes are
        // counted) and deleted, at the version read.
        for member in members {
            self.delete_compute_state(space_id, member).await?;
        }
        Ok(())
    }

    /// Appends to the violations log: one item in the space's partition,
    /// one in each named profile's, kept 30 days.
    pub(crate) async fn record_violations(
        &self,
        space_id: &str,
        violations: &[Violation],
    ) -> Result<()> {
        let mut requests = Vec::new();
        for (i, v) in violations.iter().enumerate() {
            let sort = format!("{:013}#{}#{i:03}", v.at.max(0), v.message_id);
            let mut partitions = vec![violations_key(space_id, None)];
            for p in [&v.profile_id, &v.other_profile_id].into_iter().flatten() {
                partitions.push(violations_key(space_id, Some(p)));
            }
            for pk in partitions {
                let mut item = key(pk, &sort);
                item.insert("message_id".into(), s(&v.message_id));
                if let Some(p) = &v.profile_id {
                    item.insert("profile_id".into(), s(p));
                }
                if let Some(p) = &v.other_profile_id {
                    item.insert("other_profile_id".into(), s(p));
                }
                item.insert("id_type".into(), s(&v.id_type));
                item.insert("id_hash".into(), s(&v.id_hash));
                item.insert("rule".into(), s(&v.rule));
                item.insert("detail".into(), s(v.detail.to_string()));
                item.insert("at".into(), n(v.at));
                item.insert(EXPIRES_AT.into(), n((v.at + VIOLATION_RETENTION) / 1000));
                requests.push(
                    WriteRequest::builder()
                        .put_request(
                            PutRequest::builder()
                                .set_item(Some(item))
                                .build()
                                .map_err(service)?,
                        )
                        .build(),
                );
            }
        }
        self.batch_write(requests).await
    }

    /// A page of the violations log, oldest first: of the space, or of
    /// the profiles `members` (a tree) merged in order.
    pub(crate) async fn violation_page(
        &self,
        space_id: &str,
        members: Option<&[String]>,
        since: Millis,
        next: Option<&str>,
        limit: usize,
    ) -> Result<ViolationPage> {
        let partitions: Vec<String> = match members {
            None => vec![violations_key(space_id, None)],
            Some(members) => members
                .iter()
                .map(|m| violations_key(space_id, Some(m)))
                .collect(),
        };
        let from = format!("{:013}", since.max(0));
        let mut found: std::collections::BTreeMap<String, Item> = Default::default();
        for pk in partitions {
            let mut query = self
                .client
                .query()
                .table_name(&self.table)
                .expression_attribute_values(":pk", s(pk));
            query = match next {
                Some(after) => query
                    .key_condition_expression("pk = :pk AND sk > :after")
                    .expression_attribute_values(":after", s(after)),
                None => query
                    .key_condition_expression("pk = :pk AND sk >= :from")
                    .expression_attribute_values(":from", s(&from)),
            };
            let mut taken = 0;
            self.query_pages(query, |item| {
                if let Some(sort) = opt_s(item, SK) {
                    found.insert(sort.to_string(), item.clone());
                }
                taken += 1;
                Ok(taken <= limit)
            })
            .await?;
        }
        let has_more = found.len() > limit;
        let entries: Vec<(String, Item)> = found.into_iter().take(limit).collect();
        let next = if has_more {
            entries.last().map(|(sort, _)| sort.clone())
        } else {
            None
        };
        Ok(ViolationPage {
            entries: entries
                .iter()
                .map(|(_, item)| {
                    Ok(Violation {
                        message_id: get_s(item, "message_id")?.to_string(),
                        profile_id: opt_s(item, "profile_id").map(str::to_string),
                        other_profile_id: opt_s(item, "other_profile_id").map(str::to_string),
                        id_type: get_s(item, "id_type")?.to_string(),
                        id_hash: get_s(item, "id_hash")?.to_string(),
                        rule: get_s(item, "rule")?.to_string(),
                        detail: serde_json::from_str(get_s(item, "detail")?)
                            .unwrap_or(serde_json::Value::Null),
                        at: super::get_n(item, "at")?,
                    })
                })
                .collect::<Result<_>>()?,
            next,
        })
    }

    pub(crate) async fn delete_keys(&self, keys: Vec<Item>) -> Result<()> {
        // A batch may not name one key twice.
        let mut seen = std::collections::HashSet::new();
        let requests = keys
            .into_iter()
            .filter(|k| {
                seen.insert((
                    opt_s(k, PK).unwrap_or_default().to_string(),
                    opt_s(k, SK).unwrap_or_default().to_string(),
                ))
            })
            .map(|k| {
                Ok(WriteRequest::builder()
                    .delete_request(
                        DeleteRequest::builder()
                            .set_key(Some(k))
                            .build()
                            .map_err(service)?,
                    )
                    .build())
            })
            .collect::<Result<Vec<_>>>()?;
        self.batch_write(requests).await
    }
}
