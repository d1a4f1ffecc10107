//! The sync step's leases on DynamoDB (one fan-out per space, one
//! delivery run per destination at a time) and what fan-out reads of a
//! merge.

use super::*;

impl DynamoStore {
    /// Takes the space's fan-out lease until `until` if it is free (or
    /// expired); returns the change-log cursor, or `None` if another
    /// holder has it.
    pub async fn take_sync_lease(
        &self,
        space_id: &str,
        owner: &str,
        until: i64,
    ) -> Result<Option<i64>> {
        let request = self
            .client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(key(space_key(space_id), SYNC)))
            .update_expression("SET lease_owner = :me, lease_until = :until")
            .condition_expression("attribute_not_exists(lease_until) OR lease_until < :now")
            .expression_attribute_values(":me", s(owner))
            .expression_attribute_values(":until", n(until))
            .expression_attribute_values(":now", n(now_millis()))
            .return_values(ReturnValue::AllNew);
        Ok(self.conditional_update(request).await?.map(|out| {
            out.attributes()
                .and_then(|a| opt_n(a, "cursor"))
                .unwrap_or(0)
        }))
    }

    /// Moves the cursor and frees the lease, if `owner` still holds it.
    pub async fn release_sync_lease(
        &self,
        space_id: &str,
        owner: &str,
        cursor: i64,
    ) -> Result<bool> {
        let request = self
            .client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(key(space_key(space_id), SYNC)))
            .update_expression("SET #c = :c REMOVE lease_owner, lease_until")
            .condition_expression("lease_owner = :me")
            .expression_attribute_names("#c", "cursor")
            .expression_attribute_values(":c", n(cursor))
            .expression_attribute_values(":me", s(owner));
        Ok(self.conditional_update(request).await?.is_some())
    }

    /// Takes a destination's delivery lease (one deliverer at a time keeps
    /// its calls in order).
    pub async fn take_delivery_lease(
        &self,
        space_id: &str,
        destination_id: &str,
        owner: &str,
        until: i64,
    ) -> Result<DeliveryLease> {
        let request = self
            .client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(key(space_key(space_id), &dest_sort(destination_id))))
            .update_expression("SET deliver_owner = :me, deliver_until = :until")
            .condition_expression(
                "attribute_exists(pk) AND (attribute_not_exists(deliver_until) OR deliver_until < :now)",
            )
            .expression_attribute_values(":me", s(owner))
            .expression_attribute_values(":until", n(until))
            .expression_attribute_values(":now", n(now_millis()))
            .return_values(ReturnValue::AllNew);
        match self.conditional_update(request).await? {
            Some(out) => Ok(DeliveryLease::Taken {
                retry_at: out
                    .attributes()
                    .and_then(|a| opt_n(a, "retry_at"))
                    .unwrap_or(0),
            }),
            None if self
                .destination_item(space_id, destination_id)
                .await?
                .is_none() =>
            {
                Ok(DeliveryLease::Gone)
            }
            None => Ok(DeliveryLease::Busy),
        }
    }

    /// Records when the destination's next attempt is due (after a failed
    /// one): an earlier wake-up leaves it alone.
    pub async fn set_retry_at(&self, space_id: &str, destination_id: &str, at: i64) -> Result<()> {
        let request = self
            .client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(key(space_key(space_id), &dest_sort(destination_id))))
            .update_expression("SET retry_at = :at")
            .condition_expression("attribute_exists(pk)")
            .expression_attribute_values(":at", n(at));
        self.conditional_update(request).await?;
        Ok(())
    }

    pub async fn release_delivery_lease(
        &self,
        space_id: &str,
        destination_id: &str,
        owner: &str,
    ) -> Result<()> {
        let request = self
            .client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(key(space_key(space_id), &dest_sort(destination_id))))
            .update_expression("REMOVE deliver_owner, deliver_until")
            .condition_expression("deliver_owner = :me")
            .expression_attribute_values(":me", s(owner));
        self.conditional_update(request).await?;
        Ok(())
    }

    /// The profiles merged into `parent` by the event `message_id`.
    pub async fn merged_by(
        &self,
        space_id: &str,
        parent: &str,
        message_id: &str,
    ) -> Result<Vec<(String, i64)>> {
        let query = self
            .client
            .query()
            .table_name(&self.table)
            .key_condition_expression("pk = :pk AND begins_with(sk, :m)")
            .expression_attribute_values(":pk", s(crate::dynamo::profile_key(space_id, parent)))
            .expression_attribute_values(":m", s("MERGE#"))
            .consistent_read(true);
        let mut out = Vec::new();
        self.query_pages(query, |item| {
            if opt_s(item, "message_id") == Some(message_id) {
                out.push((
                    get_s(item, "child_id")?.to_string(),
                    opt_n(item, "merged_at").unwrap_or(0),
                ));
            }
            Ok(true)
        })
        .await?;
        Ok(out)
    }

    /// A profile's own identifiers (for a merged-away profile: those it
    /// had when it merged), with when each was added.
    pub async fn own_identifiers(
        &self,
        space_id: &str,
        profile_id: &str,
    ) -> Result<Vec<kindred_domain::resolve::IdentifierEntry>> {
        match self
            .get(crate::dynamo::profile_key(space_id, profile_id), true)
            .await?
        {
            Some(item) => Ok(serde_json::from_str(get_s(&item, "identifiers")?)?),
            None => Ok(Vec::new()),
        }
    }
}
