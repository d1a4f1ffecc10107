//! The event queue on SQS. Ingest sends accepted events with
//! `SendMessageBatch` (at most 10 messages and 256 KiB per call) and
//! answers 200 only once every message is accepted by SQS; failed entries
//! are re-sent, and if they keep failing the request fails (the client
//! retries; the identity step drops repeats by message id).

use async_trait::async_trait;
use aws_sdk_sqs::types::SendMessageBatchRequestEntry;
use aws_sdk_sqs::Client;
use kindred_store::ports::{EventQueue, QueuedEvent};
use kindred_store::{Result, StoreError};

/// SQS limits of one `SendMessageBatch`.
const MAX_BATCH_MESSAGES: usize = 10;
const MAX_BATCH_BYTES: usize = 256 * 1024;
const SEND_ATTEMPTS: u32 = 5;

pub struct SqsQueue {
    client: Client,
    queue_url: String,
    /// SQS requests this handle made (`SendMessageBatch`, `SendMessage`),
    /// for the cost figures.
    requests: std::sync::atomic::AtomicU64,
}

fn service(e: impl std::error::Error) -> StoreError {
    StoreError::Service(aws_sdk_sqs::error::DisplayErrorContext(e).to_string())
}

impl SqsQueue {
    pub fn new(client: Client, queue_url: impl Into<String>) -> Self {
        Self {
            client,
            queue_url: queue_url.into(),
            requests: Default::default(),
        }
    }

    /// How many SQS requests this handle has made.
    pub fn requests(&self) -> u64 {
        self.requests.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn count_request(&self) {
        self.requests
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// Sends one batch, re-sending entries SQS reports as failed.
    async fn send_batch(&self, bodies: Vec<String>) -> Result<()> {
        let mut pending: Vec<(String, String)> = bodies
            .into_iter()
            .enumerate()
            .map(|(i, b)| (i.to_string(), b))
            .collect();
        for attempt in 0..SEND_ATTEMPTS {
            if attempt > 0 {
                crate::retry::jitter(25, attempt, SEND_ATTEMPTS).await;
            }
            let entries = pending
                .iter()
                .map(|(id, body)| {
                    SendMessageBatchRequestEntry::builder()
                        .id(id)
                        .message_body(body)
                        .build()
                        .map_err(service)
                })
                .collect::<Result<Vec<_>>>()?;
            self.count_request();
            let out = self
                .client
                .send_message_batch()
                .queue_url(&self.queue_url)
                .set_entries(Some(entries))
                .send()
                .await;
            let out = match out {
                Ok(out) => out,
                Err(e) if attempt + 1 < SEND_ATTEMPTS => {
                    tracing::warn!(error = %aws_sdk_sqs::error::DisplayErrorContext(&e), attempt, "SendMessageBatch failed; retrying");
                    continue;
                }
                Err(e) => return Err(service(e)),
            };
            let failed: Vec<&str> = out.failed().iter().map(|f| f.id()).collect();
            if let Some(f) = out.failed().iter().find(|f| f.sender_fault()) {
                return Err(StoreError::Internal(format!(
                    "SQS refused a message: {}",
                    f.code()
                )));
            }
            pending.retain(|(id, _)| failed.contains(&id.as_str()));
            if pending.is_empty() {
                return Ok(());
            }
        }
        Err(StoreError::Service(format!(
            "{} messages not accepted by SQS after {SEND_ATTEMPTS} attempts",
            pending.len()
        )))
    }
}

impl SqsQueue {
    /// Sends each item as one JSON message, in batches of at most 10
    /// messages and 256 KiB sent concurrently; returns once SQS has
    /// accepted every one.
    pub async fn send_json<T: serde::Serialize>(&self, items: &[T]) -> Result<()> {
        let mut batch: Vec<String> = Vec::new();
        let mut bytes = 0;
        let mut sends = Vec::new();
        for item in items {
            let body = serde_json::to_string(item)?;
            if body.len() > MAX_BATCH_BYTES {
                return Err(StoreError::Internal(
                    "a message is larger than SQS allows".into(),
                ));
            }
            if batch.len() == MAX_BATCH_MESSAGES || bytes + body.len() > MAX_BATCH_BYTES {
                sends.push(std::mem::take(&mut batch));
                bytes = 0;
            }
            bytes += body.len();
            batch.push(body);
        }
        if !batch.is_empty() {
            sends.push(batch);
        }
        futures::future::try_join_all(sends.into_iter().map(|b| self.send_batch(b))).await?;
        Ok(())
    }
}

impl SqsQueue {
    /// Sends one JSON message that becomes visible after `delay_secs`
    /// (at most 900, SQS's limit).
    pub async fn send_delayed<T: serde::Serialize>(&self, item: &T, delay_secs: u32) -> Result<()> {
        self.count_request();
        self.client
            .send_message()
            .queue_url(&self.queue_url)
            .message_body(serde_json::to_string(item)?)
            .delay_seconds(delay_secs.min(900) as i32)
            .send()
            .await
            .map_err(service)?;
        Ok(())
    }
}

#[async_trait]
impl EventQueue for SqsQueue {
    async fn enqueue(&self, events: Vec<QueuedEvent>) -> Result<()> {
        self.send_json(&events).await
    }
}
