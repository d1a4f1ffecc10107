//! Regulations on AWS: the Admin API records them (`profile-api`), and
//! the `sync` function runs them as messages on the sync queue, a slice
//! of subjects per message, so that a regulation of 5,000 subjects never
//! outruns an invocation.
//!
//! A subject runs in two steps. First its person's identifiers go on the
//! suppression list. The identity function reads whether a space has a
//! list with its cached rules, so the delete waits until every identity
//! instance has seen the list (the rules cache time plus the identity
//! function's timeout, [`SETTLE`]): then every event is either applied
//! before the delete (and deleted by it) or dropped. Second, the delete:
//! the calls that tell destinations the person is gone are queued, then
//! every item of theirs is deleted.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use aws_sdk_dynamodb::types::{
    AttributeValue, Delete, PutRequest, ReturnConsumedCapacity, TransactWriteItem, Update,
    WriteRequest,
};
use kindred_domain::event::format_millis;
use kindred_domain::privacy::{
    identifier_hash, without_identifiers, RegulationRequest, RegulationType, SubjectStatus,
};
use kindred_domain::{Identifier, IdentifierEntry};
use kindred_store::privacy::{
    new_regulation_id, Farewell, Privacy, RegulationRecord, SplitOutcome, SubjectRecord,
    ViolationPage,
};
use kindred_store::{now_millis, Outbox, ProfileLookup, Result, StoreError};
use tracing::{info, warn};

use crate::dynamo::compute::ComputeMessage;
use crate::dynamo::privacy::{hex, regulations_key, subjects_key};
use crate::dynamo::{
    get_n, get_s, identifier_key, key, n, opt_s, profile_key, s, service, DynamoStore, Item, META,
    SK,
};
use crate::sqs::SqsQueue;
use crate::sync::SyncMessage;

/// How long a subject's delete waits after its suppression: the identity
/// function's rules cache (10 s) and its timeout (10 s), with a margin.
pub const SETTLE: Duration = Duration::from_secs(30);

/// Work one message does before handing the rest to the next.
const BUDGET: Duration = Duration::from_secs(40);

/// The Admin API's regulations on DynamoDB.
pub struct DynamoPrivacy {
    pub store: Arc<DynamoStore>,
    /// The sync queue, where regulations run.
    pub queue: Arc<SqsQueue>,
    /// The compute queue: the two sides of a split are recomputed.
    pub compute: Arc<SqsQueue>,
}

fn subject_sort(index: usize) -> String {
    format!("{index:05}")
}

fn marker(regulation_id: &str) -> String {
    format!("regulation:{regulation_id}")
}

fn subject_record(item: &Item) -> Result<SubjectRecord> {
    let status = get_s(item, "status")?;
    Ok(SubjectRecord {
        index: get_s(item, SK)?
            .parse()
            .map_err(|_| StoreError::Undecodable("a subject's index".into()))?,
        status: SubjectStatus::parse(status)
            .ok_or_else(|| StoreError::Undecodable(format!("subject status {status:?}")))?,
        reason: opt_s(item, "reason").map(str::to_string),
        profiles_deleted: get_n(item, "profiles_deleted").unwrap_or(0) as u64,
    })
}

impl DynamoPrivacy {
    async fn record(&self, space_id: &str, item: &Item) -> Result<RegulationRecord> {
        let regulation_id = get_s(item, SK)?.to_string();
        let mut subjects = self
            .store
            .items_with_prefix(subjects_key(space_id, &regulation_id), "", false)
            .await?
            .iter()
            .map(subject_record)
            .collect::<Result<Vec<_>>>()?;
        subjects.sort_by_key(|s| s.index);
        let kind = get_s(item, "regulation_type")?;
        Ok(RegulationRecord {
            regulation_type: RegulationType::parse(kind)
                .ok_or_else(|| StoreError::Undecodable(format!("regulation type {kind:?}")))?,
            subject_type: get_s(item, "subject_type")?.to_string(),
            created_at: get_n(item, "created_at")?,
            finished_at: get_n(item, "finished_at").ok(),
            regulation_id,
            subjects,
        })
    }
}

#[async_trait]
impl Privacy for DynamoPrivacy {
    async fn create_regulation(
        &self,
        space_id: &str,
        request: &RegulationRequest,
    ) -> Result<RegulationRecord> {
        let now = now_millis();
        let regulation_id = new_regulation_id(now);
        let mut writes = Vec::with_capacity(request.subjects.len() + 1);
        let mut head = key(regulations_key(space_id), &regulation_id);
        head.insert(
            "regulation_type".into(),
            s(request.regulation_type.as_str()),
        );
        head.insert("subject_type".into(), s(&request.subject_type));
        head.insert("created_at".into(), n(now));
        head.insert("subject_count".into(), n(request.subjects.len()));
        writes.push(head);
        for (i, subject) in request.subjects.iter().enumerate() {
            let mut item = key(subjects_key(space_id, &regulation_id), &subject_sort(i));
            item.insert("subject_id".into(), s(&subject.value));
            item.insert(
                "subject_hash".into(),
                s(hex(&identifier_hash(space_id, subject))),
            );
            item.insert("status".into(), s(SubjectStatus::Initialized.as_str()));
            item.insert("profiles_deleted".into(), n(0));
            writes.push(item);
        }
        let requests = writes
            .into_iter()
            .map(|item| {
                Ok(WriteRequest::builder()
                    .put_request(
                        PutRequest::builder()
                            .set_item(Some(item))
                            .build()
                            .map_err(service)?,
                    )
                    .build())
            })
            .collect::<Result<Vec<_>>>()?;
        self.store.batch_write(requests).await?;
        self.queue
            .send_json(&[SyncMessage::Regulation {
                space_id: space_id.to_string(),
                regulation_id: regulation_id.clone(),
            }])
            .await?;
        Ok(RegulationRecord {
            regulation_id,
            regulation_type: request.regulation_type,
            subject_type: request.subject_type.clone(),
            created_at: now,
            finished_at: None,
            subjects: (0..request.subjects.len())
                .map(|index| SubjectRecord {
                    index,
                    status: SubjectStatus::Initialized,
                    reason: None,
                    profiles_deleted: 0,
                })
                .collect(),
        })
    }

    async fn regulation(
        &self,
        space_id: &str,
        regulation_id: &str,
    ) -> Result<Option<RegulationRecord>> {
        let out = self
            .store
            .client
            .get_item()
            .table_name(&self.store.table)
            .set_key(Some(key(regulations_key(space_id), regulation_id)))
            .return_consumed_capacity(ReturnConsumedCapacity::Total)
            .send()
            .await
            .map_err(service)?;
        self.store.usage.read(out.consumed_capacity());
        match out.item() {
            Some(item) => Ok(Some(self.record(space_id, item).await?)),
            None => Ok(None),
        }
    }

    async fn regulations(
        &self,
        space_id: &str,
        before: Option<&str>,
        limit: usize,
    ) -> Result<Vec<RegulationRecord>> {
        if let Some(id) = before {
            if self.regulation(space_id, id).await?.is_none() {
                return Err(StoreError::NotFound);
            }
        }
        let mut query = self
            .store
            .client
            .query()
            .table_name(&self.store.table)
            .expression_attribute_values(":pk", s(regulations_key(space_id)))
            .scan_index_forward(false);
        query = match before {
            Some(id) => query
                .key_condition_expression("pk = :pk AND sk < :before")
                .expression_attribute_values(":before", s(id)),
            None => query.key_condition_expression("pk = :pk"),
        };
        let mut heads = Vec::new();
        self.store
            .query_pages(query, |item| {
                heads.push(item.clone());
                Ok(heads.len() < limit)
            })
            .await?;
        let mut out = Vec::with_capacity(heads.len());
        for head in &heads {
            out.push(self.record(space_id, head).await?);
        }
        Ok(out)
    }

    async fn suppressed_events(&self, space_id: &str) -> Result<u64> {
        self.store.suppressed_count(space_id).await
    }

    async fn violations(
        &self,
        space_id: &str,
        profile: Option<&ProfileLookup>,
        since: i64,
        next: Option<&str>,
        limit: usize,
    ) -> Result<Option<ViolationPage>> {
        let members = match profile {
            None => None,
            Some(lookup) => {
                let Some(start) = start_of(&self.store, space_id, lookup, false).await? else {
                    return Ok(None);
                };
                match self.store.resolve(space_id, start, false).await? {
                    Some(resolved) => Some(resolved.tree),
                    None => return Ok(None),
                }
            }
        };
        Ok(Some(
            self.store
                .violation_page(space_id, members.as_deref(), since, next, limit)
                .await?,
        ))
    }

    async fn split(
        &self,
        space_id: &str,
        lookup: &ProfileLookup,
        child: &str,
    ) -> Result<SplitOutcome> {
        // One transaction, conditioned on both profiles' versions: a
        // concurrent merge, claim or split makes it fail, and it is made
        // again from a fresh read.
        for attempt in 0..16u32 {
            let Some(start) = start_of(&self.store, space_id, lookup, true).await? else {
                return Ok(SplitOutcome::NoProfile);
            };
            let Some(resolved) = self.store.resolve(space_id, start, true).await? else {
                return Ok(SplitOutcome::NoProfile);
            };
            let root = resolved.tree[0].clone();
            if child == root || !resolved.tree.iter().any(|m| m == child) {
                return Ok(SplitOutcome::NotMerged);
            }
            let Some(moved) = self.store.split_once(space_id, &resolved, child).await? else {
                crate::dynamo::backoff(attempt, 8).await;
                continue;
            };
            // Both sides rebuilt from their own events, compared with the
            // values sent before: the changes reach destinations.
            self.store.reset_states(space_id, &resolved.tree).await?;
            let as_of = now_millis();
            let recompute = |profile_id: &str| ComputeMessage::Recompute {
                space_id: space_id.to_string(),
                profile_id: profile_id.to_string(),
                as_of,
                backfill: None,
            };
            self.compute
                .send_json(&[recompute(&root), recompute(child)])
                .await?;
            info!(space_id, parent = %root, child, "a merge was split");
            return Ok(SplitOutcome::Split {
                parent: root,
                child: child.to_string(),
                moved,
            });
        }
        Err(StoreError::Conflict)
    }

    async fn remove_identifiers(
        &self,
        space_id: &str,
        lookup: &ProfileLookup,
        ids: &[Identifier],
    ) -> Result<Option<Vec<Identifier>>> {
        // One transaction, conditioned on the root's version: a
        // concurrent merge or claim makes it fail, and it is made again
        // from a fresh read.
        for attempt in 0..16u32 {
            let Some(start) = start_of(&self.store, space_id, lookup, true).await? else {
                return Ok(None);
            };
            let Some(resolved) = self.store.resolve(space_id, start, true).await? else {
                return Ok(None);
            };
            let root = resolved.tree[0].clone();
            let members = self
                .store
                .batch_get(
                    resolved
                        .tree
                        .iter()
                        .map(|m| key(profile_key(space_id, m), META))
                        .collect(),
                    true,
                )
                .await?;
            let mut items = Vec::new();
            let mut removed_all = Vec::new();
            for member in &members {
                let id = get_s(member, "profile_id")?;
                let list: Vec<IdentifierEntry> =
                    serde_json::from_str(get_s(member, "identifiers")?)?;
                let (kept, removed) = without_identifiers(&list, ids);
                if removed.is_empty() {
                    continue;
                }
                let condition = if id == root {
                    removed_all = removed;
                    "version = :v AND attribute_not_exists(parent_id)"
                } else {
                    "version = :v AND attribute_exists(parent_id)"
                };
                let update = Update::builder()
                    .table_name(&self.store.table)
                    .set_key(Some(key(profile_key(space_id, id), META)))
                    .update_expression("SET identifiers = :ids, version = version + :one")
                    .condition_expression(condition)
                    .expression_attribute_values(":ids", s(serde_json::to_string(&kept)?))
                    .expression_attribute_values(":one", n(1))
                    .expression_attribute_values(":v", n(get_n(member, "version")?))
                    .build()
                    .map_err(service)?;
                items.push(TransactWriteItem::builder().update(update).build());
            }
            if removed_all.is_empty() {
                return Ok(Some(Vec::new()));
            }
            for id in &removed_all {
                let delete = Delete::builder()
                    .table_name(&self.store.table)
                    .set_key(Some(key(identifier_key(space_id, id), META)))
                    .build()
                    .map_err(service)?;
                items.push(TransactWriteItem::builder().delete(delete).build());
            }
            if items.len() > 100 {
                return Err(StoreError::Invalid(
                    "too many identifiers and profiles for one removal".into(),
                ));
            }
            match self.store.transact_conditional(items).await? {
                Ok(()) => {
                    for m in &resolved.tree {
                        self.store.forget_profile(space_id, m);
                    }
                    return Ok(Some(removed_all));
                }
                Err(_) => crate::dynamo::backoff(attempt, 8).await,
            }
        }
        Err(StoreError::Conflict)
    }
}

/// The profile a lookup names first (before following merges): the id
/// itself, or the owner of the identifier.
async fn start_of(
    store: &DynamoStore,
    space_id: &str,
    lookup: &ProfileLookup,
    consistent: bool,
) -> Result<Option<String>> {
    match lookup {
        ProfileLookup::ProfileId(id) => Ok(Some(id.clone())),
        ProfileLookup::Identifier(id) => {
            match store.get(identifier_key(space_id, id), consistent).await? {
                Some(item) => Ok(Some(get_s(&item, "profile_id")?.to_string())),
                None => Ok(None),
            }
        }
    }
}

/// A person's merge tree as found now.
struct Person {
    root: String,
    members: Vec<String>,
    identifiers: Vec<IdentifierEntry>,
}

async fn find_person(
    store: &DynamoStore,
    space_id: &str,
    subject: &Identifier,
) -> Result<Option<Person>> {
    let lookup = ProfileLookup::Identifier(subject.clone());
    let Some(owner) = start_of(store, space_id, &lookup, true).await? else {
        return Ok(None);
    };
    let Some(resolved) = store.resolve(space_id, owner, true).await? else {
        return Ok(None);
    };
    Ok(Some(Person {
        root: resolved.tree[0].clone(),
        identifiers: serde_json::from_str(get_s(&resolved.root, "identifiers")?)?,
        members: resolved.tree,
    }))
}

/// What a run of a regulation leaves for the next message.
enum Next {
    Done,
    /// More subjects to run now.
    More,
    /// Subjects waiting for their suppression to settle, this long.
    Wait(Duration),
}

/// Runs a slice of a regulation's subjects; queues the next message
/// (now, or when a suppression has settled) until every one is done.
/// Every step is safe to run again (SQS may deliver a message twice).
pub async fn run_regulation(
    store: &DynamoStore,
    queue: &SqsQueue,
    space_id: &str,
    regulation_id: &str,
    settle: Duration,
) -> Result<()> {
    let Some(head) = store
        .client
        .get_item()
        .table_name(&store.table)
        .set_key(Some(key(regulations_key(space_id), regulation_id)))
        .consistent_read(true)
        .send()
        .await
        .map_err(service)?
        .item()
        .cloned()
    else {
        warn!(space_id, regulation_id, "no such regulation");
        return Ok(());
    };
    let kind = get_s(&head, "regulation_type")?;
    let regulation_type = RegulationType::parse(kind)
        .ok_or_else(|| StoreError::Undecodable(format!("regulation type {kind:?}")))?;
    let subject_type = get_s(&head, "subject_type")?.to_string();
    let started = Instant::now();
    let mut next = Next::Done;
    let subjects = store
        .items_with_prefix(subjects_key(space_id, regulation_id), "", true)
        .await?;
    for item in &subjects {
        let status = get_s(item, "status")?;
        if matches!(status, "finished" | "failed") {
            continue;
        }
        if started.elapsed() > BUDGET {
            next = Next::More;
            break;
        }
        let step = Subject {
            store,
            space_id,
            regulation_id,
            regulation_type,
            sort: get_s(item, SK)?.to_string(),
            subject: Identifier::new(
                subject_type.clone(),
                opt_s(item, "subject_id").unwrap_or_default(),
            ),
            subject_hash: get_s(item, "subject_hash")?.to_string(),
        };
        let outcome = if status == "initialized" {
            step.suppress().await.map(|_| None)
        } else {
            let since = get_n(item, "suppressed_at").unwrap_or(0);
            let ready_at = since + settle.as_millis() as i64;
            let now = now_millis();
            if now < ready_at {
                let wait = Duration::from_millis((ready_at - now) as u64);
                next = match next {
                    Next::Wait(w) => Next::Wait(w.min(wait)),
                    Next::Done => Next::Wait(wait),
                    Next::More => Next::More,
                };
                continue;
            }
            step.delete(queue).await.map(Some)
        };
        match outcome {
            Ok(None) if regulation_type.deletes() => {
                // Suppressed; the delete comes once that has settled.
                next = match next {
                    Next::Done => Next::Wait(settle),
                    other => other,
                };
            }
            Ok(None) => step.set(SubjectStatus::Finished, None, 0).await?,
            Ok(Some(deleted)) => step.set(SubjectStatus::Finished, None, deleted).await?,
            Err(e @ (StoreError::Service(_) | StoreError::Conflict)) => return Err(e),
            Err(e) => {
                warn!(space_id, regulation_id, error = %e, "a regulation's subject failed");
                step.set(SubjectStatus::Failed, Some(&e.to_string()), 0)
                    .await?;
            }
        }
    }
    let message = SyncMessage::Regulation {
        space_id: space_id.to_string(),
        regulation_id: regulation_id.to_string(),
    };
    match next {
        Next::More => queue.send_delayed(&message, 0).await,
        Next::Wait(wait) => {
            queue
                .send_delayed(&message, wait.as_secs_f64().ceil().clamp(1.0, 900.0) as u32)
                .await
        }
        Next::Done => {
            let out = store
                .client
                .update_item()
                .table_name(&store.table)
                .set_key(Some(key(regulations_key(space_id), regulation_id)))
                .update_expression("SET finished_at = if_not_exists(finished_at, :now)")
                .expression_attribute_values(":now", n(now_millis()))
                .return_consumed_capacity(ReturnConsumedCapacity::Total)
                .send()
                .await
                .map_err(service)?;
            store.usage.write(out.consumed_capacity());
            Ok(())
        }
    }
}

/// One subject of a regulation being run.
struct Subject<'a> {
    store: &'a DynamoStore,
    space_id: &'a str,
    regulation_id: &'a str,
    regulation_type: RegulationType,
    sort: String,
    subject: Identifier,
    subject_hash: String,
}

impl Subject<'_> {
    /// The person's identifiers (and the subject) onto the list, or off
    /// it for UNSUPPRESS; the subject is then `running` (until its delete)
    /// or done.
    async fn suppress(&self) -> Result<()> {
        let now = now_millis();
        if self.regulation_type == RegulationType::Unsuppress {
            return self
                .store
                .unsuppress(self.space_id, &self.subject_hash)
                .await;
        }
        self.put_on_list(now).await?;
        if self.regulation_type.deletes() {
            let out = self
                .store
                .client
                .update_item()
                .table_name(&self.store.table)
                .set_key(Some(key(
                    subjects_key(self.space_id, self.regulation_id),
                    &self.sort,
                )))
                .update_expression("SET #s = :running, suppressed_at = :now")
                .expression_attribute_names("#s", "status")
                .expression_attribute_values(":running", s(SubjectStatus::Running.as_str()))
                .expression_attribute_values(":now", n(now))
                .return_consumed_capacity(ReturnConsumedCapacity::Total)
                .send()
                .await
                .map_err(service)?;
            self.store.usage.write(out.consumed_capacity());
        }
        Ok(())
    }

    async fn put_on_list(&self, now: i64) -> Result<Option<Person>> {
        let person = find_person(self.store, self.space_id, &self.subject).await?;
        let mut ids = vec![self.subject.clone()];
        if let Some(p) = &person {
            ids.extend(p.identifiers.iter().map(|e| e.id.clone()));
        }
        let before = match self.regulation_type {
            RegulationType::DeleteInternal => Some(now),
            _ => None,
        };
        self.store
            .suppress(self.space_id, &self.subject_hash, &ids, before)
            .await?;
        Ok(person)
    }

    /// Tells destinations, then deletes every item of the person. Returns
    /// how many profiles it deleted.
    async fn delete(&self, queue: &SqsQueue) -> Result<u64> {
        let now = now_millis();
        // Identifiers the person gained before the list settled, too.
        let Some(person) = self.put_on_list(now).await? else {
            return Ok(0);
        };
        let values = self
            .store
            .computed_values(self.space_id, &person.root)
            .await?;
        let at = format_millis(now);
        let farewell = Farewell {
            space_id: self.space_id,
            regulation_id: self.regulation_id,
            root: &person.root,
            ids: &person.identifiers,
            values: &values,
            at: &at,
        };
        let marker = marker(self.regulation_id);
        for d in self.store.destination_items(self.space_id).await? {
            let d = d.record;
            if !d.settings.enabled {
                continue;
            }
            let calls: Vec<_> = farewell
                .calls(&d.destination_id, &d.settings)
                .into_iter()
                .map(|c| (marker.clone(), c))
                .collect();
            if calls.is_empty() {
                continue;
            }
            self.store
                .enqueue(self.space_id, &d.destination_id, calls)
                .await?;
            queue
                .send_delayed(
                    &SyncMessage::Deliver {
                        space_id: self.space_id.to_string(),
                        destination_id: d.destination_id.clone(),
                    },
                    0,
                )
                .await?;
        }
        self.store
            .delete_person(self.space_id, &person.members, &person.identifiers, &marker)
            .await?;
        info!(
            space_id = self.space_id,
            regulation_id = self.regulation_id,
            profiles = person.members.len(),
            "a regulation deleted a person"
        );
        Ok(person.members.len() as u64)
    }

    /// Records the subject's status; a subject that is done forgets its id.
    async fn set(&self, status: SubjectStatus, reason: Option<&str>, deleted: u64) -> Result<()> {
        let mut update = self
            .store
            .client
            .update_item()
            .table_name(&self.store.table)
            .set_key(Some(key(
                subjects_key(self.space_id, self.regulation_id),
                &self.sort,
            )))
            .update_expression("SET #s = :s, profiles_deleted = :d, reason = :r REMOVE subject_id")
            .expression_attribute_names("#s", "status")
            .expression_attribute_values(":s", s(status.as_str()))
            .expression_attribute_values(":d", n(deleted))
            .expression_attribute_values(":r", reason.map_or(AttributeValue::Null(true), s));
        update = update.return_consumed_capacity(ReturnConsumedCapacity::Total);
        let out = update.send().await.map_err(service)?;
        self.store.usage.write(out.consumed_capacity());
        Ok(())
    }
}
