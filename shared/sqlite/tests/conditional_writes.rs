//! The identity graph's conditions hold on the embedded adapter: a plan
//! made from stale facts is refused whole, nothing of it written.

use kindred_domain::event::Envelope;
use kindred_domain::{resolve, Event, Identifier, IdentityRules, Incoming, Plan};
use kindred_sqlite::SqliteStore;
use kindred_store::identity::{complete_now, process_event, Job, Outcome, SpaceRules};
use kindred_store::{Applied, EventRecord, IdentityGraph, StoreError};
use serde_json::json;

fn event(body: serde_json::Value) -> Event {
    Event::parse(
        body,
        Envelope {
            kind: None,
            received_at: 1_767_225_600_000,
            batch_sent_at: None,
            generated_message_id: "gen",
            future_tolerance: kindred_domain::event::DEFAULT_FUTURE_TOLERANCE,
        },
    )
    .unwrap()
}

fn record<'a>(e: &'a Event, body: &'a str) -> EventRecord<'a> {
    EventRecord {
        event: e,
        body_json: body,
        source_id: "src",
        external_ids: &[],
        group_id: None,
        account: None,
        now: 1_000,
    }
}

fn send(store: &SqliteStore, space: &str, body: serde_json::Value) -> Outcome {
    let e = event(body);
    let json = serde_json::Value::Object(e.body.clone()).to_string();
    let rules = SpaceRules {
        rules: IdentityRules::default(),
    };
    let mut n = 0;
    store
        .with_graph(|g| {
            let job = Job {
                space_id: space,
                source_id: "src",
                event: &e,
                body_json: &json,
                now: 1_000,
            };
            complete_now(process_event(g, &rules, &job, || {
                n += 1;
                format!("prf_test{n}")
            }))
        })
        .unwrap()
}

fn ids(pairs: &[(&str, &str)]) -> Vec<Identifier> {
    pairs.iter().map(|(k, v)| Identifier::new(*k, *v)).collect()
}

#[test]
fn a_plan_from_stale_facts_conflicts_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path()).unwrap();
    let rules = IdentityRules::default();
    send(
        &store,
        "s",
        json!({"type": "identify", "userId": "u1", "anonymousId": "a1", "messageId": "m1"}),
    );
    send(
        &store,
        "s",
        json!({"type": "identify", "anonymousId": "a2", "messageId": "m2"}),
    );

    // Facts read now; then another worker merges a2 into u1's profile.
    let wanted = ids(&[("anonymous_id", "a2"), ("email", "x@y.z")]);
    let stale = store
        .with_graph(|g| complete_now(g.facts("s", &wanted)))
        .unwrap();
    send(
        &store,
        "s",
        json!({"type": "identify", "userId": "u1", "anonymousId": "a2", "messageId": "m3"}),
    );

    let e = event(
        json!({"type": "identify", "anonymousId": "a2", "traits": {"email": "x@y.z"}, "messageId": "m4"}),
    );
    let incoming = Incoming {
        identifiers: &wanted,
        traits: None,
        timestamp: 2_000,
        received_at: 2_000,
        source_id: "src",
    };
    let plan = resolve(&incoming, &stale, &rules, "prf_new").plan;
    assert!(matches!(plan, Plan::Attach(_)));
    let body = serde_json::Value::Object(e.body.clone()).to_string();
    let outcome = store.with_graph(|g| complete_now(g.apply("s", &plan, &record(&e, &body))));
    assert!(matches!(outcome, Err(StoreError::Conflict)), "{outcome:?}");
    // Nothing of the refused plan landed: not the claim, not the message.
    let audit = store.audit("s").unwrap();
    assert!(!audit
        .owners
        .contains_key(&Identifier::new("email", "x@y.z")));
    assert!(!audit.events.iter().any(|ev| ev.message_id == "m4"));
    // Re-planning on fresh facts succeeds.
    let fresh = store
        .with_graph(|g| complete_now(g.facts("s", &wanted)))
        .unwrap();
    let plan = resolve(&incoming, &fresh, &rules, "prf_new").plan;
    let outcome = store.with_graph(|g| complete_now(g.apply("s", &plan, &record(&e, &body))));
    assert_eq!(outcome.unwrap(), Applied::Recorded);
}

#[test]
fn claiming_an_owned_identifier_conflicts() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path()).unwrap();
    let rules = IdentityRules::default();
    let wanted = ids(&[("user_id", "u9")]);
    let empty = store
        .with_graph(|g| complete_now(g.facts("s", &wanted)))
        .unwrap();
    send(
        &store,
        "s",
        json!({"type": "identify", "userId": "u9", "messageId": "m1"}),
    );
    let incoming = Incoming {
        identifiers: &wanted,
        traits: None,
        timestamp: 2_000,
        received_at: 2_000,
        source_id: "src",
    };
    let plan = resolve(&incoming, &empty, &rules, "prf_other").plan;
    assert!(matches!(plan, Plan::Create(_)));
    let e = event(json!({"type": "identify", "userId": "u9", "messageId": "m2"}));
    let outcome = store.with_graph(|g| complete_now(g.apply("s", &plan, &record(&e, "{}"))));
    assert!(matches!(outcome, Err(StoreError::Conflict)));
    assert_eq!(
        store.audit("s").unwrap().roots.len(),
        1,
        "no second profile was created"
    );
}

#[test]
fn a_message_id_is_applied_once_per_space() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path()).unwrap();
    let body = json!({"type": "track", "event": "E", "userId": "u", "messageId": "same"});
    assert!(matches!(
        send(&store, "s", body.clone()),
        Outcome::Recorded { created: true, .. }
    ));
    assert_eq!(send(&store, "s", body.clone()), Outcome::Duplicate);
    // Another space has its own message ids.
    assert!(matches!(send(&store, "t", body), Outcome::Recorded { .. }));
    assert_eq!(store.audit("s").unwrap().events.len(), 1);
}
