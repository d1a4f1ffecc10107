//! Concurrency: many workers race overlapping events against the embedded
//! store (SPEC 5). The result must be exactly what a serial replay in the
//! store's commit order gives: no limit exceeded, no identifier owned
//! twice, every event attached exactly once.

use std::collections::BTreeSet;
use std::sync::Arc;

use kindred::workload::Workload;
use kindred_domain::event::Envelope;
use kindred_domain::{Event, IdentityRules};
use kindred_store::identity::{complete_now, process_event, Job, Outcome, SpaceRules};
use kindred_store::sqlite::{OptimisticGraph, SqliteStore};
use kindred_store::token::new_profile_id;
use kindred_tests::assert_serializable;

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
            future_tolerance: kindred_domain::event::DEFAULT_FUTURE_TOLERANCE,
        },
    )
    .expect("the workload only makes valid events")
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
                let outcome =
                    complete_now(process_event(&mut graph, &rules, &job, new_profile_id)).unwrap();
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
