//! What the compute step reads back: the profiles due by time (the due
//! index) and the change log.

use super::*;

impl DynamoStore {
    /// Root profiles of the space whose next change has come by `as_of`:
    /// a range read of each shard of the due index, never a scan.
    pub async fn due_profiles(&self, space_id: &str, as_of: Millis) -> Result<Vec<String>> {
        let mut due = Vec::new();
        for shard in 0..DUE_SHARDS {
            let query = self
                .client
                .query()
                .table_name(&self.table)
                .index_name(EVENTS_INDEX)
                .key_condition_expression("gpk = :p AND gsk <= :due")
                .expression_attribute_values(":p", s(due_partition(space_id, shard)))
                .expression_attribute_values(":due", s(due_sort(as_of)))
                .projection_expression("profile_id");
            self.query_pages(query, |item| {
                due.push(get_s(item, "profile_id")?.to_string());
                Ok(true)
            })
            .await?;
        }
        Ok(due)
    }

    /// Changes after `since`, oldest first, at most `limit`; only those
    /// older than [`CHANGES_SETTLE_MS`].
    pub async fn read_changes(
        &self,
        space_id: &str,
        since: i64,
        limit: usize,
    ) -> Result<Vec<ChangeRecord>> {
        let settled = (now_millis() - CHANGES_SETTLE_MS) * 1_000_000 + 999_999;
        let from = since.max(-1) + 1;
        let from = from - from % 1_000;
        let query = self
            .client
            .query()
            .table_name(&self.table)
            .key_condition_expression("pk = :pk AND sk BETWEEN :lo AND :hi")
            .expression_attribute_values(":pk", s(changes_key(space_id)))
            .expression_attribute_values(":lo", s(change_sort(from)))
            .expression_attribute_values(":hi", s(change_sort(settled)))
            .limit(limit.clamp(1, 1_000) as i32);
        let mut out = Vec::new();
        self.query_pages(query, |item| {
            let base: i64 = get_s(item, SK)?
                .parse()
                .map_err(|_| StoreError::Service("a change item's key is not a number".into()))?;
            let changes: Vec<Change> = serde_json::from_str(get_s(item, "changes")?)?;
            for (i, c) in changes.into_iter().enumerate() {
                let seq = base + i as i64;
                if seq <= since {
                    continue;
                }
                out.push(ChangeRecord {
                    seq,
                    profile_id: get_s(item, "profile_id")?.to_string(),
                    group_id: opt_s(item, "group_id").map(str::to_string),
                    key: c.key,
                    class: c.class,
                    old: c.old,
                    new: c.new,
                    at: get_n(item, "at")?,
                });
                if out.len() >= limit {
                    return Ok(false);
                }
            }
            Ok(true)
        })
        .await?;
        Ok(out)
    }
}
