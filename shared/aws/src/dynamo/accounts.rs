//! Accounts on DynamoDB: one partition per account (`ACT#{space}#{group}`)
//! holding the account (`META`, written conditionally on its version),
//! an index item per event that named it (`EV#{order}`) and one per
//! user a group call linked to it (`USER#{profile}`). The index and link
//! items are idempotent puts and the account update is idempotent
//! ([`kindred_domain::account::Account::apply`]), so a redelivered event
//! writes them again harmlessly.

use std::collections::HashMap;

use kindred_domain::account::{Account, AccountUpdate};
use kindred_store::ports::{AccountDoc, EventQuery, StoredEvent};
use kindred_store::{Result, StoreError};

use super::compute::accounts_partition;
use super::profiles::bounds;
use super::{event_order, event_seq, get_n, get_s, key, n, opt_s, s, DynamoStore, GPK, GSK, META};

pub(crate) fn account_key(space_id: &str, group_id: &str) -> String {
    format!("ACT#{space_id}#{group_id}")
}

/// How often an account update is tried again after another writer
/// changed the account first.
const MAX_ATTEMPTS: usize = 64;

impl DynamoStore {
    /// Records what one event does to its account: the event's index
    /// item, the link to `profile_id` (a group call's user), and the
    /// account itself, conditionally on the version read.
    pub(crate) async fn record_account(
        &self,
        space_id: &str,
        update: &AccountUpdate<'_>,
        profile_id: Option<&str>,
    ) -> Result<()> {
        let pk = account_key(space_id, update.group_id);
        let seq = event_seq(update.message_id);
        let mut index = key(
            pk.clone(),
            &format!("EV#{}", event_order(update.timestamp, seq)),
        );
        index.insert("message_id".into(), s(update.message_id));
        self.put_if_absent(index).await?;
        if let Some(profile_id) = profile_id {
            let mut link = key(pk.clone(), &format!("USER#{profile_id}"));
            link.insert("profile_id".into(), s(profile_id));
            self.put_if_absent(link).await?;
        }
        for _ in 0..MAX_ATTEMPTS {
            let written = match self.get(pk.clone(), true).await? {
                None => {
                    let mut item = key(pk.clone(), META);
                    item.insert(
                        "account".into(),
                        s(serde_json::to_string(&Account::new(update))?),
                    );
                    item.insert("version".into(), n(1));
                    item.insert(GPK.into(), s(accounts_partition(space_id)));
                    item.insert(GSK.into(), s(update.group_id));
                    self.put_if_absent(item).await?
                }
                Some(item) => {
                    let version: i64 = get_n(&item, "version")?;
                    let mut account: Account = serde_json::from_str(get_s(&item, "account")?)?;
                    if !account.apply(update) {
                        return Ok(());
                    }
                    let values = HashMap::from([
                        (":a".to_string(), s(serde_json::to_string(&account)?)),
                        (":v".to_string(), n(version)),
                        (":next".to_string(), n(version + 1)),
                        (":gpk".to_string(), s(accounts_partition(space_id))),
                        (":gsk".to_string(), s(update.group_id)),
                    ]);
                    // (The index entry is set again for accounts made
                    // before the index listed them.)
                    self.update_if(
                        &pk,
                        META,
                        "SET account = :a, version = :next, gpk = :gpk, gsk = :gsk",
                        "version = :v",
                        values,
                    )
                    .await?
                }
            };
            if written {
                return Ok(());
            }
        }
        Err(StoreError::Conflict)
    }

    pub(crate) async fn account_doc(
        &self,
        space_id: &str,
        group_id: &str,
    ) -> Result<Option<AccountDoc>> {
        let pk = account_key(space_id, group_id);
        let Some(item) = self.get(pk.clone(), false).await? else {
            return Ok(None);
        };
        let account: Account = serde_json::from_str(get_s(&item, "account")?)?;
        let mut users = Vec::new();
        for link in self.items_with_prefix(pk, "USER#", false).await? {
            users.push(get_s(&link, "profile_id")?.to_string());
        }
        users.sort();
        Ok(Some(AccountDoc { account, users }))
    }

    /// The account's events in the query's order and bounds: its index
    /// items, then the events themselves, filtered by name.
    pub(crate) async fn account_event_page(
        &self,
        space_id: &str,
        group_id: &str,
        q: &EventQuery,
    ) -> Result<Vec<StoredEvent>> {
        let (lo, hi) = bounds(q);
        let mut out = Vec::new();
        let mut start: Option<HashMap<String, aws_sdk_dynamodb::types::AttributeValue>> = None;
        while out.len() < q.limit {
            let page = (q.limit - out.len()).clamp(10, 500) as i32;
            let reply = self
                .client
                .query()
                .table_name(&self.table)
                .key_condition_expression("pk = :pk AND sk BETWEEN :lo AND :hi")
                .expression_attribute_values(":pk", s(account_key(space_id, group_id)))
                .expression_attribute_values(":lo", s(format!("EV#{lo}")))
                .expression_attribute_values(":hi", s(format!("EV#{hi}")))
                .scan_index_forward(!q.descending)
                .limit(page)
                .set_exclusive_start_key(start.take())
                .return_consumed_capacity(aws_sdk_dynamodb::types::ReturnConsumedCapacity::Total)
                .send()
                .await
                .map_err(super::service)?;
            self.usage.read(reply.consumed_capacity());
            let ids: Vec<String> = reply
                .items()
                .iter()
                .map(|i| get_s(i, "message_id").map(str::to_string))
                .collect::<Result<_>>()?;
            let mut events: HashMap<String, _> = HashMap::new();
            for item in self.event_items(space_id, &ids).await? {
                events.insert(get_s(&item, "message_id")?.to_string(), item);
            }
            // In index order; an event deleted since (privacy) is skipped.
            for id in &ids {
                let Some(item) = events.get(id) else { continue };
                if q.keeps(opt_s(item, "name")) && out.len() < q.limit {
                    out.push(StoredEvent {
                        timestamp: get_n(item, "ts")?,
                        seq: get_n(item, "seq")?,
                        body: get_s(item, "body")?.to_string(),
                    });
                }
            }
            match reply.last_evaluated_key() {
                Some(k) => start = Some(k.clone()),
                None => break,
            }
        }
        Ok(out)
    }
}
