//! Helpers shared by the cross-crate tests: the serial-replay check of
//! the race tests, and access to the AWS emulators that
//! `tests/emulators.sh` starts (tests that need them are skipped, with a
//! message, when they are not running; under `CI=true` they must be).

use std::collections::{BTreeMap, BTreeSet};

use kindred_aws::DynamoStore;
use kindred_domain::model::MemoryGraph;
use kindred_domain::{extract_identifiers, Event, Identifier, IdentityRules, Incoming};
use kindred_store::audit::GraphAudit;

/// Checks every invariant of SPEC 5 on an audited graph and compares it to
/// a serial replay of the committed events in commit order.
pub fn assert_serializable(audit: &GraphAudit, rules: &IdentityRules, sent: &BTreeSet<String>) {
    // Every distinct message attached exactly once.
    let attached: Vec<&str> = audit.events.iter().map(|e| e.message_id.as_str()).collect();
    let unique: BTreeSet<&str> = attached.iter().copied().collect();
    assert_eq!(attached.len(), unique.len(), "an event was applied twice");
    assert_eq!(unique.len(), sent.len(), "an event was lost");

    // Identifier ownership: each root's recorded identifiers are exactly the
    // identifier rows that resolve to it, and no identifier is in two roots.
    let mut recorded: BTreeMap<&Identifier, &str> = BTreeMap::new();
    for (root, ids) in &audit.roots {
        for e in ids {
            assert!(
                recorded.insert(&e.id, root).is_none(),
                "{:?} owned twice",
                e.id
            );
        }
        // Limits (the workload's timestamps all fall inside every window).
        let mut per_type: BTreeMap<&str, usize> = BTreeMap::new();
        for e in ids {
            *per_type.entry(&e.id.kind).or_default() += 1;
        }
        for (kind, count) in per_type {
            assert!(
                count <= rules.rule(kind).limit.count as usize,
                "{root} has {count} {kind}"
            );
        }
    }
    let owners: BTreeMap<&Identifier, &str> =
        audit.owners.iter().map(|(i, r)| (i, r.as_str())).collect();
    assert_eq!(
        recorded, owners,
        "profile records disagree with identifier ownership"
    );

    // Serial replay in commit order.
    let mut model = MemoryGraph::default();
    for e in &audit.events {
        let event = Event::from_stored(serde_json::from_str(&e.body).unwrap()).unwrap();
        let ids: Vec<Identifier> = extract_identifiers(&event)
            .into_iter()
            .map(|x| x.id)
            .collect();
        let incoming = Incoming {
            identifiers: &ids,
            traits: event.profile_traits(),
            timestamp: event.timestamp,
            received_at: event.received_at,
            source_id: "src",
        };
        model.process(&incoming, rules, &e.message_id);
    }
    let mut store_partition: BTreeMap<&str, BTreeSet<Identifier>> = BTreeMap::new();
    for (id, root) in &audit.owners {
        store_partition.entry(root).or_default().insert(id.clone());
    }
    let store_partition: BTreeSet<BTreeSet<Identifier>> = store_partition.into_values().collect();
    assert_eq!(
        store_partition,
        model.partition(),
        "identity differs from a serial replay"
    );
    // Each root's merge count and traits (value and time) are the replay's.
    type Root = (u32, Vec<(String, serde_json::Value, i64)>);
    let view = |traits: &kindred_domain::Traits| {
        traits
            .iter()
            .map(|(k, t)| (k.clone(), t.value.clone(), t.updated_at))
            .collect::<Vec<_>>()
    };
    let ids = |entries: &[kindred_domain::IdentifierEntry]| -> BTreeSet<Identifier> {
        entries.iter().map(|e| e.id.clone()).collect()
    };
    let store_roots: BTreeMap<BTreeSet<Identifier>, Root> = audit
        .roots
        .iter()
        .filter(|(_, entries)| !entries.is_empty())
        .map(|(root, entries)| {
            let merges = audit.merges.get(root).copied().unwrap_or_default();
            let traits = audit.traits.get(root).map(view).unwrap_or_default();
            (ids(entries), (merges, traits))
        })
        .collect();
    let model_roots: BTreeMap<BTreeSet<Identifier>, Root> = model
        .roots()
        .filter(|f| !f.identifiers.is_empty())
        .map(|f| (ids(&f.identifiers), (f.merges, view(&f.traits))))
        .collect();
    assert_eq!(
        store_roots, model_roots,
        "merge counts or traits differ from a serial replay"
    );
    let mut store_events: BTreeMap<&str, BTreeSet<String>> = BTreeMap::new();
    for e in &audit.events {
        if let Some(root) = &e.root {
            store_events
                .entry(root)
                .or_default()
                .insert(e.message_id.clone());
        }
    }
    let store_events: BTreeSet<BTreeSet<String>> = store_events.into_values().collect();
    assert_eq!(
        store_events,
        model.event_partition(),
        "events landed differently than in a serial replay"
    );
}

/// Whether the emulators are up; prints why a test is skipped if not.
pub fn emulators(test: &str) -> bool {
    if std::env::var_os("KINDRED_EMULATORS").is_some() {
        return true;
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "{test}: the AWS emulators must run in CI (tests/run-all.sh starts them)"
    );
    eprintln!("SKIPPED {test}: no AWS emulators (run `source tests/emulators.sh` first, or ./tests/run-all.sh)");
    false
}

/// SDK configuration from the environment the emulator script exports.
pub async fn aws_config() -> aws_config::SdkConfig {
    aws_config::defaults(aws_config::BehaviorVersion::latest())
        .load()
        .await
}

fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}-{:x}",
        std::process::id(),
        rand::random::<u64>()
    )
}

/// A DynamoDB store on a fresh table of DynamoDB Local.
pub async fn fresh_dynamo() -> DynamoStore {
    let config = aws_config().await;
    let client = aws_sdk_dynamodb::Client::new(&config);
    let table = unique("kindred-test");
    DynamoStore::create_table(&client, &table)
        .await
        .expect("creating a table on DynamoDB Local");
    DynamoStore::new(client, table)
}

/// A fresh SQS queue (and its dead-letter queue after `max_receives`) on
/// the emulator: (client, queue url, dlq url).
pub async fn fresh_queue(max_receives: u32) -> (aws_sdk_sqs::Client, String, String) {
    use aws_sdk_sqs::types::QueueAttributeName;
    let config = aws_config().await;
    let client = aws_sdk_sqs::Client::new(&config);
    let name = unique("kindred-test");
    let dlq = client
        .create_queue()
        .queue_name(format!("{name}-dlq"))
        .send()
        .await
        .expect("creating a DLQ")
        .queue_url()
        .expect("queue url")
        .to_string();
    let dlq_arn = client
        .get_queue_attributes()
        .queue_url(&dlq)
        .attribute_names(QueueAttributeName::QueueArn)
        .send()
        .await
        .expect("DLQ attributes")
        .attributes()
        .and_then(|a| a.get(&QueueAttributeName::QueueArn).cloned())
        .expect("DLQ arn");
    let queue = client
        .create_queue()
        .queue_name(&name)
        .attributes(QueueAttributeName::VisibilityTimeout, "1")
        .attributes(
            QueueAttributeName::RedrivePolicy,
            serde_json::json!({"deadLetterTargetArn": dlq_arn, "maxReceiveCount": max_receives})
                .to_string(),
        )
        .send()
        .await
        .expect("creating a queue")
        .queue_url()
        .expect("queue url")
        .to_string();
    (client, queue, dlq)
}

/// What Lambda's event source mapping hands an SQS consumer: the SQS event
/// fixture with one record per received message.
pub fn sqs_event(messages: &[aws_sdk_sqs::types::Message]) -> aws_lambda_events::sqs::SqsEvent {
    let fixture: serde_json::Value = serde_json::from_str(include_str!(
        "../../functions/compute/fixtures/sqs-event.json"
    ))
    .expect("the SQS event fixture");
    let template = &fixture["Records"][0];
    let records: Vec<serde_json::Value> = messages
        .iter()
        .map(|m| {
            let mut record = template.clone();
            record["messageId"] = m.message_id().unwrap_or_default().into();
            record["receiptHandle"] = m.receipt_handle().unwrap_or_default().into();
            record["body"] = m.body().unwrap_or_default().into();
            record
        })
        .collect();
    serde_json::from_value(serde_json::json!({ "Records": records })).expect("an SQS event")
}
