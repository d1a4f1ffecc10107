//! Concurrency: many workers race overlapping events against the embedded
//! store (SPEC 5). The result must be exactly what a serial replay in the
//! store's commit order gives: no limit exceeded, no identifier owned
//! twice, every event attached exactly once.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use kindred::workload::Workload;
use kindred_domain::event::Envelope;
use kindred_domain::model::MemoryGraph;
use kindred_domain::{extract_identifiers, Event, Identifier, IdentityRules, Incoming};
use kindred_store::identity::{process_event, Job, Outcome, SpaceRules};
use kindred_store::sqlite::{GraphAudit, OptimisticGraph, SqliteStore};
use kindred_store::token::new_profile_id;

const WORKERS: usize = 8;
const EVENTS: usize = 5_000;

fn parse(value: serde_json::Value) -> Event {
    Event::parse(
        value,
        Envelope {
            kind: None,
            received_at: 1_767_225_600_000,
            batch_sent_at: None,
            generated_message_id: "unused",
        },
    )
    .expect("the workload only makes valid events")
}

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

#[test]
fn eight_workers_racing_overlapping_events_equal_a_serial_replay() {
    let dir = tempfile::tempdir().unwrap();
    let setup = SqliteStore::open(dir.path()).unwrap();
    let space = setup.create_space("race").unwrap();
    let source = "src_race";
    let rules = IdentityRules::default();

    // Few users, many events: identifiers overlap heavily.
    let mut workload = Workload::new(42, 150);
    let events: Vec<Event> = (0..EVENTS).map(|_| parse(workload.next_event())).collect();
    let sent: BTreeSet<String> = events.iter().map(|e| e.message_id.clone()).collect();
    let events = Arc::new(events);

    let mut handles = Vec::new();
    for worker in 0..WORKERS {
        let events = Arc::clone(&events);
        let path = dir.path().to_path_buf();
        let rules = SpaceRules {
            rules: rules.clone(),
        };
        let space_id = space.space_id.clone();
        handles.push(std::thread::spawn(move || {
            // Each worker has its own connections, like separate processes.
            let store = SqliteStore::open(&path).unwrap();
            let mut graph = OptimisticGraph::new(&store);
            let mut outcomes = (0usize, 0usize);
            for event in events.iter().skip(worker).step_by(WORKERS) {
                let body = serde_json::Value::Object(event.body.clone()).to_string();
                let job = Job {
                    space_id: &space_id,
                    source_id: source,
                    event,
                    body_json: &body,
                    now: 0,
                };
                let outcome = process_event(&mut graph, &rules, &job, new_profile_id).unwrap();
                match outcome {
                    Outcome::Duplicate => outcomes.1 += 1,
                    _ => outcomes.0 += 1,
                }
            }
            (outcomes, graph.conflicts)
        }));
    }
    let mut recorded = 0;
    let mut duplicates = 0;
    let mut conflicts = 0;
    for h in handles {
        let ((r, d), c) = h.join().unwrap();
        recorded += r;
        duplicates += d;
        conflicts += c;
    }
    println!("recorded {recorded}, duplicates {duplicates}, conflicts re-planned {conflicts}");
    assert_eq!(recorded, sent.len());
    assert_eq!(duplicates, EVENTS - sent.len());

    let audit = setup.audit(&space.space_id).unwrap();
    assert_serializable(&audit, &rules, &sent);
    assert!(audit.roots.len() > 100, "the workload makes many profiles");
    assert!(
        audit.merges.values().any(|m| *m > 0),
        "the workload merges profiles"
    );
}
