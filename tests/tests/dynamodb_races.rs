//! Concurrency against DynamoDB Local: 8 workers, each with its own client
//! and caches (like 8 Lambda instances), race overlapping events (shared
//! devices, group emails, logouts without reset). DynamoDB's conditions
//! must keep the graph exactly what a serial replay gives.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use kindred::workload::Workload;
use kindred_aws::dynamo::DynamoGraph;
use kindred_aws::DynamoStore;
use kindred_domain::event::Envelope;
use kindred_domain::{Event, Facts, Identifier, IdentityRules, Plan};
use kindred_store::identity::{process_event, Job, Outcome, SpaceRules};
use kindred_store::ports::{Applied, EventRecord, IdentityGraph};
use kindred_store::token::new_profile_id;
use kindred_store::Result;
use kindred_tests::{assert_serializable, emulators, fresh_dynamo};

const WORKERS: usize = 8;
const EVENTS: usize = 2_400;

/// Notes the order in which applies succeed, and counts conflicts.
struct Recording<'a> {
    inner: DynamoGraph<'a>,
    order: Arc<Mutex<Vec<String>>>,
    conflicts: usize,
}

impl IdentityGraph for Recording<'_> {
    async fn drop_if_suppressed(
        &mut self,
        space_id: &str,
        ids: &[Identifier],
        received_at: kindred_domain::Millis,
    ) -> Result<Option<Identifier>> {
        self.inner
            .drop_if_suppressed(space_id, ids, received_at)
            .await
    }
    async fn record_violations(
        &mut self,
        space_id: &str,
        violations: &[kindred_store::privacy::Violation],
    ) -> Result<()> {
        self.inner.record_violations(space_id, violations).await
    }
    async fn is_duplicate(&mut self, space_id: &str, message_id: &str) -> Result<bool> {
        self.inner.is_duplicate(space_id, message_id).await
    }
    async fn facts(&mut self, space_id: &str, ids: &[Identifier]) -> Result<Facts> {
        self.inner.facts(space_id, ids).await
    }
    async fn apply(
        &mut self,
        space_id: &str,
        plan: &Plan,
        record: &EventRecord<'_>,
    ) -> Result<Applied> {
        let outcome = self.inner.apply(space_id, plan, record).await;
        match &outcome {
            Ok(Applied::Recorded) => self
                .order
                .lock()
                .unwrap()
                .push(record.event.message_id.clone()),
            Err(kindred_store::StoreError::Conflict) => self.conflicts += 1,
            _ => {}
        }
        outcome
    }
    async fn backoff(&mut self, wait: std::time::Duration) {
        self.inner.backoff(wait).await;
    }
}

fn parse(value: serde_json::Value) -> Event {
    Event::parse(
        value,
        Envelope {
            kind: None,
            received_at: 1_767_225_600_000,
            batch_sent_at: None,
            generated_message_id: "unused",
            future_tolerance: kindred_domain::event::DEFAULT_FUTURE_TOLERANCE,
        },
    )
    .expect("the workload only makes valid events")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_workers_racing_on_dynamodb_equal_a_serial_replay() {
    if !emulators("eight_workers_racing_on_dynamodb_equal_a_serial_replay") {
        return;
    }
    let setup = fresh_dynamo().await;
    let space = setup.create_space("race").await.unwrap();
    let rules = IdentityRules::default();

    // Few users, many events: identifiers overlap heavily.
    let mut workload = Workload::new(7, 60);
    let events: Vec<Event> = (0..EVENTS).map(|_| parse(workload.next_event())).collect();
    let sent: BTreeSet<String> = events.iter().map(|e| e.message_id.clone()).collect();
    let events = Arc::new(events);
    let order = Arc::new(Mutex::new(Vec::new()));
    let table = setup.table().to_string();

    let mut handles = Vec::new();
    for worker in 0..WORKERS {
        let (events, order, table) = (Arc::clone(&events), Arc::clone(&order), table.clone());
        let rules = SpaceRules {
            rules: rules.clone(),
        };
        let space_id = space.space_id.clone();
        handles.push(tokio::spawn(async move {
            let config = kindred_tests::aws_config().await;
            let store = DynamoStore::new(aws_sdk_dynamodb::Client::new(&config), table);
            let mut graph = Recording {
                inner: store.graph(),
                order,
                conflicts: 0,
            };
            let (mut recorded, mut duplicates) = (0usize, 0usize);
            for event in events.iter().skip(worker).step_by(WORKERS) {
                let body = serde_json::Value::Object(event.body.clone()).to_string();
                let job = Job {
                    space_id: &space_id,
                    source_id: "src_race",
                    event,
                    body_json: &body,
                    now: 1_767_225_600_000,
                };
                match process_event(&mut graph, &rules, &job, new_profile_id)
                    .await
                    .unwrap()
                {
                    Outcome::Duplicate => duplicates += 1,
                    _ => recorded += 1,
                }
            }
            (recorded, duplicates, graph.conflicts)
        }));
    }
    let (mut recorded, mut duplicates, mut conflicts) = (0, 0, 0);
    for h in handles {
        let (r, d, c) = h.await.unwrap();
        recorded += r;
        duplicates += d;
        conflicts += c;
    }
    println!("recorded {recorded}, duplicates {duplicates}, conflicts re-planned {conflicts}");
    assert_eq!(recorded, sent.len(), "every distinct event recorded once");
    assert_eq!(duplicates, EVENTS - sent.len());

    let mut audit = setup.audit(&space.space_id).await.unwrap();
    let position: HashMap<String, usize> = order
        .lock()
        .unwrap()
        .iter()
        .enumerate()
        .map(|(i, m)| (m.clone(), i))
        .collect();
    audit.events.sort_by_key(|e| position[&e.message_id]);
    assert_serializable(&audit, &rules, &sent);
    assert!(audit.roots.len() > 40, "the workload makes many profiles");
    assert!(
        audit.merges.values().any(|m| *m > 0),
        "the workload merges profiles"
    );
}
