//! One contract for the event queue port, run against the embedded queue
//! (`queue.db`) and against SQS on ministack: whatever `enqueue` accepted
//! is delivered, whole, exactly as sent, however the adapter has to split
//! it (SQS: 10 messages and 256 KiB per call).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use kindred_aws::SqsQueue;
use kindred_sqlite::SqliteQueue;
use kindred_store::ports::{EventQueue, QueuedEvent};
use kindred_tests::{emulators, fresh_queue};

/// Reads back what an adapter delivered.
trait Drain {
    async fn drain(&self, expected: usize) -> Vec<QueuedEvent>;
}

impl Drain for SqliteQueue {
    async fn drain(&self, _expected: usize) -> Vec<QueuedEvent> {
        self.read_after(0, 100_000)
            .unwrap()
            .into_iter()
            .map(|e| e.event)
            .collect()
    }
}

struct Sqs {
    client: aws_sdk_sqs::Client,
    url: String,
}

impl Drain for Sqs {
    async fn drain(&self, expected: usize) -> Vec<QueuedEvent> {
        let mut out = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        while out.len() < expected && Instant::now() < deadline {
            let received = self
                .client
                .receive_message()
                .queue_url(&self.url)
                .max_number_of_messages(10)
                .wait_time_seconds(1)
                .visibility_timeout(60)
                .send()
                .await
                .unwrap();
            for m in received.messages() {
                out.push(serde_json::from_str(m.body().unwrap()).unwrap());
            }
        }
        out
    }
}

fn event(space: &str, i: usize, padding: usize) -> QueuedEvent {
    QueuedEvent {
        space_id: space.to_string(),
        source_id: "src_queue".into(),
        body: serde_json::json!({"messageId": format!("q{i}"), "type": "track",
                                  "event": "Padded", "properties": {"pad": "x".repeat(padding)}})
        .to_string(),
    }
}

async fn everything_enqueued_is_delivered_once_and_intact(
    queue: &dyn EventQueue,
    drain: &impl Drain,
) {
    // 25 small events (three SQS calls), then 12 of ~30 KB (over 256 KiB
    // together), then an empty enqueue, in two spaces.
    let small: Vec<QueuedEvent> = (0..25).map(|i| event("space-a", i, 10)).collect();
    let large: Vec<QueuedEvent> = (25..37).map(|i| event("space-b", i, 30_000)).collect();
    queue.enqueue(small.clone()).await.unwrap();
    queue.enqueue(large.clone()).await.unwrap();
    queue.enqueue(Vec::new()).await.unwrap();

    let sent: BTreeMap<String, QueuedEvent> = small
        .into_iter()
        .chain(large)
        .map(|e| (e.body.clone(), e))
        .collect();
    let delivered = drain.drain(sent.len()).await;
    assert_eq!(delivered.len(), sent.len(), "each event delivered once");
    let got: BTreeMap<String, QueuedEvent> =
        delivered.into_iter().map(|e| (e.body.clone(), e)).collect();
    assert_eq!(got, sent, "delivered exactly as sent");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_queue_delivers_everything_once_and_intact() {
    let dir = tempfile::tempdir().unwrap();
    let queue = SqliteQueue::open(dir.path()).unwrap();
    everything_enqueued_is_delivered_once_and_intact(&*queue, &*queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqs_queue_delivers_everything_once_and_intact() {
    if !emulators("sqs_queue_delivers_everything_once_and_intact") {
        return;
    }
    let (client, url, _dlq) = fresh_queue(5).await;
    let queue = SqsQueue::new(client.clone(), &url);
    everything_enqueued_is_delivered_once_and_intact(&queue, &Sqs { client, url }).await;
}
