//! What the adapter's integration tests share.

use kindred_store::QueuedEvent;

/// `body` as the Tracking API queues it for `space`.
pub fn queued(space: &str, body: serde_json::Value) -> QueuedEvent {
    let event = kindred_domain::Event::parse(
        body,
        kindred_domain::Envelope {
            kind: None,
            received_at: 1_767_225_600_000,
            batch_sent_at: None,
            generated_message_id: "unused",
            future_tolerance: kindred_domain::event::DEFAULT_FUTURE_TOLERANCE,
        },
    )
    .unwrap();
    QueuedEvent {
        space_id: space.into(),
        source_id: "src".into(),
        body: serde_json::Value::Object(event.body).to_string(),
    }
}
