//! The roots index: each space's root profiles, read without a scan by
//! backfills and initial syncs, and the migration that indexes the roots
//! of a table written by an older Kindred.

use std::collections::BTreeMap;

use aws_sdk_dynamodb::types::ReturnConsumedCapacity;
use kindred_store::{Result, StoreError};

use super::{
    get_s, key, root_index_keys, roots_key, s, service, DynamoStore, Item, META, PK, ROOTS_INDEX,
    ROOT_SHARDS, RSK,
};

/// Largest page of one roots index query.
const ROOTS_PAGE: usize = 1_000;
/// The cursor field naming the roots index shard a walk is in.
const SHARD: &str = "shard";

impl DynamoStore {
    /// Up to `limit` of the space's root profiles, read from the roots
    /// index shard by shard from `start`; returns them and where to
    /// continue (`None`: every shard is read). The cursor names the shard
    /// and, inside it, the index's last evaluated key.
    pub async fn root_profiles(
        &self,
        space_id: &str,
        start: Option<BTreeMap<String, String>>,
        limit: usize,
    ) -> Result<(Vec<String>, Option<BTreeMap<String, String>>)> {
        let mut roots = Vec::new();
        let mut start = start.unwrap_or_default();
        let mut shard: u64 = match start.remove(SHARD) {
            Some(v) => v.parse().map_err(|_| {
                StoreError::Undecodable(format!("a roots cursor names shard {v:?}"))
            })?,
            None => 0,
        };
        let mut after: Option<Item> =
            (!start.is_empty()).then(|| start.into_iter().map(|(k, v)| (k, s(v))).collect());
        while shard < ROOT_SHARDS && roots.len() < limit {
            let page = (limit - roots.len()).min(ROOTS_PAGE) as i32;
            let out = self
                .client
                .query()
                .table_name(&self.table)
                .index_name(ROOTS_INDEX)
                .key_condition_expression("rpk = :rpk")
                .expression_attribute_values(":rpk", s(roots_key(space_id, shard)))
                .limit(page)
                .set_exclusive_start_key(after.take())
                .return_consumed_capacity(ReturnConsumedCapacity::Total)
                .send()
                .await
                .map_err(service)?;
            self.usage.read(out.consumed_capacity());
            for item in out.items() {
                roots.push(get_s(item, RSK)?.to_string());
            }
            match out.last_evaluated_key() {
                Some(k) => after = Some(k.clone()),
                None => shard += 1,
            }
        }
        if shard >= ROOT_SHARDS {
            return Ok((roots, None));
        }
        let mut next: BTreeMap<String, String> = after
            .unwrap_or_default()
            .into_iter()
            .filter_map(|(name, v)| v.as_s().ok().map(|v| (name, v.clone())))
            .collect();
        next.insert(SHARD.into(), shard.to_string());
        Ok((roots, Some(next)))
    }

    /// Indexes every root profile of the table that is not indexed yet
    /// (profiles written before the roots index existed); returns how many
    /// it indexed. One `Scan` of the table, run once after upgrading
    /// (`kindred migrate`); safe while the functions run: a profile that
    /// merges meanwhile is left out by its condition.
    pub async fn index_roots(&self) -> Result<u64> {
        let mut indexed = 0;
        let mut start = None;
        loop {
            let page = self
                .client
                .scan()
                .table_name(&self.table)
                .filter_expression(
                    "begins_with(pk, :prf) AND sk = :meta \
                     AND attribute_not_exists(parent_id) AND attribute_not_exists(rpk)",
                )
                .expression_attribute_values(":prf", s("PRF#"))
                .expression_attribute_values(":meta", s(META))
                .projection_expression("pk, profile_id")
                .set_exclusive_start_key(start)
                .return_consumed_capacity(ReturnConsumedCapacity::Total)
                .send()
                .await
                .map_err(service)?;
            self.usage.read(page.consumed_capacity());
            for item in page.items() {
                let pk = get_s(item, PK)?;
                let profile_id = get_s(item, "profile_id")?;
                let space_id = pk
                    .strip_prefix("PRF#")
                    .and_then(|rest| rest.strip_suffix(profile_id))
                    .and_then(|rest| rest.strip_suffix('#'))
                    .ok_or_else(|| StoreError::Undecodable(format!("profile item {pk}")))?;
                let [(_, rpk), (_, rsk)] = root_index_keys(space_id, profile_id);
                let update = self
                    .client
                    .update_item()
                    .table_name(&self.table)
                    .set_key(Some(key(pk.to_string(), META)))
                    .update_expression("SET rpk = :rpk, rsk = :rsk")
                    .condition_expression(
                        "attribute_exists(pk) AND attribute_not_exists(parent_id)",
                    )
                    .expression_attribute_values(":rpk", rpk)
                    .expression_attribute_values(":rsk", rsk);
                if self.conditional_update(update).await?.is_some() {
                    indexed += 1;
                }
            }
            match page.last_evaluated_key() {
                Some(k) => start = Some(k.clone()),
                None => return Ok(indexed),
            }
        }
    }

    /// Takes a profile out of the roots index, as an older Kindred wrote
    /// it (tests of the migration).
    pub async fn unindex_root(&self, space_id: &str, profile_id: &str) -> Result<()> {
        let update = self
            .client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(key(super::profile_key(space_id, profile_id), META)))
            .update_expression("REMOVE rpk, rsk")
            .condition_expression("attribute_exists(pk)");
        self.conditional_update(update).await?;
        Ok(())
    }
}
