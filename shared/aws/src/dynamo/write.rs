//! Every kind of DynamoDB write, once: transactions and their
//! cancellation reasons, puts in a transaction, conditional updates,
//! failed-condition checks and batch writes with their unprocessed items
//! retried. Each counts its capacity in [`super::Usage`]; the adapters
//! say what to write and read the outcome.

use std::collections::HashMap;

use aws_sdk_dynamodb::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError;
use aws_sdk_dynamodb::operation::update_item::builders::UpdateItemFluentBuilder as Update;
use aws_sdk_dynamodb::types::{
    AttributeValue, ReturnConsumedCapacity, TransactWriteItem, WriteRequest,
};
use kindred_store::{Result, StoreError};

use super::{backoff, key, service, DynamoStore, Item};

/// Most items of one `BatchWriteItem`.
const MAX_BATCH_WRITE: usize = 25;

/// A transaction DynamoDB cancelled because a condition failed: the
/// reason code of each action, in order (`"None"` where it held).
pub(crate) struct Cancelled(pub Vec<String>);

impl Cancelled {
    /// Whether the condition of action `i` failed.
    pub(crate) fn failed(&self, i: usize) -> bool {
        self.0.get(i).map(String::as_str) == Some("ConditionalCheckFailed")
    }
}

impl DynamoStore {
    /// Sends one transaction, counting its capacity. A cancellation by
    /// `TransactionConflict` alone (another write to one of its items at
    /// the same moment) is sent again after a jittered backoff, up to 16
    /// times; a cancellation where a condition failed is `Ok(Err(_))`, for
    /// the caller to read which.
    pub(crate) async fn transact_conditional(
        &self,
        items: Vec<aws_sdk_dynamodb::types::TransactWriteItem>,
    ) -> Result<std::result::Result<(), Cancelled>, StoreError> {
        use aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError;
        let mut attempt = 0u32;
        loop {
            let out = self
                .client
                .transact_write_items()
                .set_transact_items(Some(items.clone()))
                .return_consumed_capacity(ReturnConsumedCapacity::Total)
                .send()
                .await;
            let e = match out {
                Ok(out) => {
                    self.usage.transaction(out.consumed_capacity());
                    return Ok(Ok(()));
                }
                Err(e) => e,
            };
            let codes: Vec<String> = match e.as_service_error() {
                Some(TransactWriteItemsError::TransactionCanceledException(c)) => c
                    .cancellation_reasons()
                    .iter()
                    .map(|r| r.code().unwrap_or("None").to_string())
                    .collect(),
                _ => Vec::new(),
            };
            if codes.iter().any(|c| c == "ConditionalCheckFailed") {
                return Ok(Err(Cancelled(codes)));
            }
            if attempt < 16 && codes.iter().any(|c| c == "TransactionConflict") {
                attempt += 1;
                backoff(attempt, 5).await;
                continue;
            }
            return Err(service(e));
        }
    }
}

/// One put of a transaction, with its condition.
pub(crate) fn transact_put(
    table: &str,
    item: Item,
    condition: Option<&str>,
) -> Result<aws_sdk_dynamodb::types::TransactWriteItem, StoreError> {
    let put = aws_sdk_dynamodb::types::Put::builder()
        .table_name(table)
        .set_item(Some(item))
        .set_condition_expression(condition.map(str::to_string))
        .build()
        .map_err(service)?;
    Ok(aws_sdk_dynamodb::types::TransactWriteItem::builder()
        .put(put)
        .build())
}

/// Whether a request failed because its condition did not hold.
pub(crate) fn conditional_failed<E: ProvideErrorMetadata, R>(e: &SdkError<E, R>) -> bool {
    e.as_service_error().and_then(|e| e.code()) == Some("ConditionalCheckFailedException")
}

/// What a conditional update answers.
pub(crate) type Updated = aws_sdk_dynamodb::operation::update_item::UpdateItemOutput;

/// Whether a failed transaction lost a race (re-read and retry) rather
/// than failed.
fn lost_race(e: &aws_sdk_dynamodb::error::SdkError<TransactWriteItemsError>) -> bool {
    match e.as_service_error() {
        Some(TransactWriteItemsError::TransactionCanceledException(c)) => {
            c.cancellation_reasons().iter().any(|r| {
                matches!(
                    r.code(),
                    Some("ConditionalCheckFailed" | "TransactionConflict")
                )
            })
        }
        Some(TransactWriteItemsError::TransactionInProgressException(_)) => true,
        _ => false,
    }
}

impl DynamoStore {
    /// Sends one transaction: `Conflict` if it lost a race (a condition
    /// failed or another write got there first): re-read and retry.
    pub(crate) async fn transact(&self, items: Vec<TransactWriteItem>) -> Result<()> {
        let out = self
            .client
            .transact_write_items()
            .set_transact_items(Some(items))
            .return_consumed_capacity(ReturnConsumedCapacity::Total)
            .send()
            .await;
        match out {
            Ok(out) => {
                self.usage.transaction(out.consumed_capacity());
                Ok(())
            }
            Err(e) => {
                self.usage.write(None);
                if lost_race(&e) {
                    Err(StoreError::Conflict)
                } else {
                    Err(service(e))
                }
            }
        }
    }

    /// Puts an item unless one with its key exists: `false` if it did.
    pub(crate) async fn put_if_absent(&self, item: Item) -> Result<bool> {
        let out = self
            .client
            .put_item()
            .table_name(&self.table)
            .set_item(Some(item))
            .condition_expression("attribute_not_exists(pk)")
            .return_consumed_capacity(ReturnConsumedCapacity::Total)
            .send()
            .await;
        match out {
            Ok(out) => {
                self.usage.write(out.consumed_capacity());
                Ok(true)
            }
            Err(e) => {
                self.usage.write(None);
                if conditional_failed(&e) {
                    Ok(false)
                } else {
                    Err(service(e))
                }
            }
        }
    }

    /// Sends a conditional update: `None` if its condition did not hold.
    /// (A failed request counts as one write request, with no units.)
    pub(crate) async fn conditional_update(&self, request: Update) -> Result<Option<Updated>> {
        match request
            .return_consumed_capacity(ReturnConsumedCapacity::Total)
            .send()
            .await
        {
            Ok(out) => {
                self.usage.write(out.consumed_capacity());
                Ok(Some(out))
            }
            Err(e) => {
                self.usage.write(None);
                if conditional_failed(&e) {
                    Ok(None)
                } else {
                    Err(service(e))
                }
            }
        }
    }

    /// One conditional update; `false` if its condition did not hold.
    pub(crate) async fn update_if(
        &self,
        pk: &str,
        sk: &str,
        expression: &str,
        condition: &str,
        values: HashMap<String, AttributeValue>,
    ) -> Result<bool> {
        let request = self
            .client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(key(pk.to_string(), sk)))
            .update_expression(expression)
            .condition_expression(condition)
            .set_expression_attribute_values(Some(values));
        Ok(self.conditional_update(request).await?.is_some())
    }

    /// Writes in batches of 25, sending unprocessed items again after a
    /// jittered wait until every one is written.
    pub(crate) async fn batch_write(&self, mut requests: Vec<WriteRequest>) -> Result<()> {
        while !requests.is_empty() {
            let chunk: Vec<WriteRequest> = requests
                .drain(..requests.len().min(MAX_BATCH_WRITE))
                .collect();
            let mut pending = chunk;
            let mut attempt = 0u32;
            while !pending.is_empty() {
                let out = self
                    .client
                    .batch_write_item()
                    .request_items(&self.table, pending)
                    .return_consumed_capacity(ReturnConsumedCapacity::Total)
                    .send()
                    .await
                    .map_err(service)?;
                self.usage.write(out.consumed_capacity());
                pending = out
                    .unprocessed_items()
                    .and_then(|u| u.get(&self.table))
                    .cloned()
                    .unwrap_or_default();
                if !pending.is_empty() {
                    attempt += 1;
                    crate::retry::jitter(10, attempt, 6).await;
                }
            }
        }
        Ok(())
    }
}
