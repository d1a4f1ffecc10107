//! Account-level computed values on DynamoDB (`kindred_store::accounts`
//! computes them): one item per account (`ACV#{space}#{group}`), written
//! conditionally on its version in the same transaction as the
//! change-log item of its changes; the space's accounts are listed from
//! the account items' entries in the events index (`ACTS#{space}`).

use super::*;

fn values_key(space_id: &str, group_id: &str) -> String {
    format!("ACV#{space_id}#{group_id}")
}

/// The events-index partition listing a space's accounts (each account
/// item carries it, with its group id as the sort key).
pub(crate) fn accounts_partition(space_id: &str) -> String {
    format!("ACTS#{space_id}")
}

impl DynamoStore {
    /// Group ids of the space's accounts after `after`, in order, at most `limit`.
    pub async fn account_ids(
        &self,
        space_id: &str,
        after: &str,
        limit: usize,
    ) -> Result<Vec<String>> {
        let mut query = self
            .client
            .query()
            .table_name(&self.table)
            .index_name(EVENTS_INDEX)
            .expression_attribute_values(":p", s(accounts_partition(space_id)))
            .projection_expression("gsk");
        // (A key condition cannot compare with an empty string.)
        query = if after.is_empty() {
            query.key_condition_expression("gpk = :p")
        } else {
            query
                .key_condition_expression("gpk = :p AND gsk > :after")
                .expression_attribute_values(":after", s(after))
        };
        let mut ids = Vec::new();
        self.query_pages(query, |item| {
            ids.push(get_s(item, GSK)?.to_string());
            Ok(ids.len() < limit)
        })
        .await?;
        Ok(ids)
    }

    /// An account's computed values and their version (0: none yet).
    pub async fn account_values(
        &self,
        space_id: &str,
        group_id: &str,
    ) -> Result<(ComputedValues, i64)> {
        match self.get(values_key(space_id, group_id), true).await? {
            Some(item) => Ok((
                serde_json::from_str(get_s(&item, "computed")?)?,
                get_n(&item, "version")?,
            )),
            None => Ok((ComputedValues::new(), 0)),
        }
    }

    /// Stores an account's values at `version + 1` if they are still at
    /// `version`, with a change-log item of `changes` in the same
    /// transaction; `false` if another writer moved them first.
    pub async fn write_account_values(
        &self,
        space_id: &str,
        group_id: &str,
        version: i64,
        values: &ComputedValues,
        changes: &[Change],
        at: Millis,
    ) -> Result<bool> {
        let mut item = key(values_key(space_id, group_id), META);
        item.insert("computed".into(), s(serde_json::to_string(values)?));
        item.insert("version".into(), n(version + 1));
        let mut writes = vec![versioned_put(&self.table, item, version)?];
        if !changes.is_empty() {
            let base = change_base(now_millis(), &format!("account:{group_id}"), version);
            let mut entry = key(changes_key(space_id), &change_sort(base));
            entry.insert("profile_id".into(), s(""));
            entry.insert("group_id".into(), s(group_id));
            entry.insert("at".into(), n(at));
            entry.insert("changes".into(), s(serde_json::to_string(changes)?));
            writes.push(transact_put(
                &self.table,
                entry,
                Some("attribute_not_exists(pk)"),
            )?);
        }
        Ok(self.transact_conditional(writes).await?.is_ok())
    }
}
