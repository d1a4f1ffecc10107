//! DynamoDB requests and capacity units per event, as DynamoDB Local
//! reports them (`ReturnConsumedCapacity=TOTAL`), for the three kinds of
//! event that matter for cost and for calls that name an account. Prints the figures BENCHMARKS.md quotes and
//! holds the design's bound for the common case: an event from a known
//! identity costs at most one read request and two write units.

use kindred_aws::{identify, DynamoStore, UsageSnapshot};
use kindred_store::identity::Outcome;
use kindred_store::ports::QueuedEvent;
use kindred_tests::{aws_config, emulators, fresh_dynamo};
use serde_json::json;

fn queued(space: &str, event: serde_json::Value) -> QueuedEvent {
    QueuedEvent {
        space_id: space.to_string(),
        source_id: "src_costs".into(),
        body: event.to_string(),
    }
}

async fn cost(store: &DynamoStore, event: &QueuedEvent) -> (Outcome, UsageSnapshot) {
    let before = store.usage();
    let outcome = identify(store, event).await.unwrap();
    (outcome, store.usage().since(before))
}

fn show(label: &str, u: UsageSnapshot) {
    println!(
        "{label:<48} read requests {}, read units {:.1}, write requests {}, write units {:.1}",
        u.read_requests, u.read_units, u.write_requests, u.write_units
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_and_capacity_units_per_event() {
    if !emulators("requests_and_capacity_units_per_event") {
        return;
    }
    let store = fresh_dynamo().await;
    let space = store.create_space("costs").await.unwrap().space_id;
    // An hour ago: inside every window, whatever the day the test runs.
    let at = kindred_domain::event::format_millis(kindred_store::now_millis() - 3_600_000);
    let at = at.as_str();
    let track = |id: &str, anon: &str| {
        json!({"type": "track", "event": "Product Viewed", "messageId": id, "anonymousId": anon,
               "properties": {"sku": "A-1", "price": 19.5}, "timestamp": at})
    };

    // (b) A new identity: a profile and its identifiers created.
    let new = queued(
        &space,
        json!({"type": "identify", "messageId": "b", "anonymousId": "dev-1", "userId": "u-1",
               "traits": {"email": "u1@example.com", "name": "Ada"}, "timestamp": at}),
    );
    let (outcome, b) = cost(&store, &new).await;
    assert!(matches!(outcome, Outcome::Recorded { created: true, .. }));

    // (a) A known identity, warm (the worker has seen the profile).
    let (outcome, a_warm) = cost(&store, &queued(&space, track("a1", "dev-1"))).await;
    assert!(matches!(
        outcome,
        Outcome::Recorded {
            created: false,
            merged: 0,
            ..
        }
    ));

    // (a) A known identity on a cold worker (a fresh Lambda instance).
    let cold = DynamoStore::new(
        aws_sdk_dynamodb::Client::new(&aws_config().await),
        store.table(),
    );
    let (_, a_cold) = cost(&cold, &queued(&space, track("a2", "dev-1"))).await;

    // A repeated message id.
    let (outcome, dup) = cost(&store, &queued(&space, track("a1", "dev-1"))).await;
    assert_eq!(outcome, Outcome::Duplicate);

    // (c) A merge: a second device's profile joins through the user id.
    cost(&store, &queued(&space, track("c0", "dev-2"))).await;
    let merge = queued(
        &space,
        json!({"type": "identify", "messageId": "c", "anonymousId": "dev-2", "userId": "u-1",
               "traits": {"plan": "pro"}, "timestamp": at}),
    );
    let (outcome, c) = cost(&store, &merge).await;
    assert!(
        matches!(outcome, Outcome::Recorded { merged: 1, .. }),
        "{outcome:?}"
    );

    // A group call of a known user (its account made, then updated), and
    // a track naming the account in context.groupId.
    let group = |id: &str, plan: &str| {
        json!({"type": "group", "messageId": id, "userId": "u-1", "groupId": "acme",
               "traits": {"plan": plan}, "timestamp": at})
    };
    let (_, group_new) = cost(&store, &queued(&space, group("g1", "team"))).await;
    let (_, group_update) = cost(&store, &queued(&space, group("g2", "enterprise"))).await;
    let in_account = json!({"type": "track", "event": "Seat Added", "messageId": "g3",
                            "userId": "u-1", "context": {"groupId": "acme"}, "timestamp": at});
    let (_, account_event) = cost(&store, &queued(&space, in_account)).await;

    println!();
    show("(a) known identity, warm worker", a_warm);
    show("(a) known identity, cold worker", a_cold);
    show("(b) new identity (3 identifiers)", b);
    show("(c) merge of two profiles", c);
    show("repeated messageId (dropped)", dup);
    show("group call, new account", group_new);
    show("group call, account updated", group_update);
    show("track with context.groupId", account_event);

    // DynamoDB Local reports capacity as AWS would; without it the bound
    // below could not fail, so its presence is part of the check.
    assert!(a_warm.write_units > 0.0, "no consumed capacity reported");
    assert!(a_warm.read_requests <= 1, "{a_warm:?}");
    assert!(a_warm.write_units <= 2.0, "{a_warm:?}");
    assert!(a_cold.read_requests <= 3, "{a_cold:?}");
}

/// The compute step's cost per event with 20 definitions, on a profile
/// that already has a state (the common case), and on the first event of
/// a profile (no state yet).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compute_requests_and_capacity_units_per_event() {
    if !emulators("compute_requests_and_capacity_units_per_event") {
        return;
    }
    use kindred_aws::compute::{handle, DynamoComputations};
    use kindred_aws::dynamo::compute::ComputeMessage;
    use kindred_domain::compute::Class;
    use kindred_store::ports::Computations;
    use std::sync::Arc;

    let store = Arc::new(fresh_dynamo().await);
    let space = store.create_space("compute-costs").await.unwrap().space_id;
    let (sqs, queue_url, _) = kindred_tests::fresh_queue(3).await;
    let queue = Arc::new(kindred_aws::SqsQueue::new(sqs, &queue_url));
    let defs = DynamoComputations {
        store: store.clone(),
        queue: queue.clone(),
        sync: None,
    };
    for i in 0..10 {
        let trait_def = json!({"type": "event_counter", "event": format!("Event {i}"), "lookback": {"days": 30}});
        defs.put_definition(
            &space,
            Class::ComputedTrait,
            &format!("count_{i}"),
            &trait_def,
        )
        .await
        .unwrap();
        let audience = json!({"condition": {"performed": {"event": format!("Event {i}"), "within": {"days": 7}}}});
        defs.put_definition(&space, Class::Audience, &format!("did_{i}"), &audience)
            .await
            .unwrap();
    }
    // An hour ago: inside every window, whatever the day the test runs.
    let at = kindred_domain::event::format_millis(kindred_store::now_millis() - 3_600_000);
    let at = at.as_str();
    let event = |id: &str, name: &str| {
        queued(
            &space,
            json!({"type": "track", "event": name, "messageId": id, "userId": "u-1",
                   "properties": {"sku": "A-1"}, "timestamp": at}),
        )
    };
    let fold = |id: &str| {
        let message = ComputeMessage::Event {
            space_id: space.clone(),
            message_id: id.to_string(),
        };
        vec![(
            format!("sqs-{id}"),
            serde_json::to_string(&message).unwrap(),
        )]
    };
    identify(&store, &event("e1", "Event 1")).await.unwrap();
    let before = store.usage();
    assert!(handle(&store, &queue, None, fold("e1")).await.is_empty());
    let first = store.usage().since(before);
    let members = defs
        .members(&space, Class::Audience, "did_1", "", 10)
        .await
        .unwrap();
    let sizes = defs.sizes(&space).await.unwrap();
    println!("member lists after the first event: did_1 {members:?}, sizes {sizes:?}");

    identify(&store, &event("e2", "Event 2")).await.unwrap();
    let before = store.usage();
    assert!(handle(&store, &queue, None, fold("e2")).await.is_empty());
    let known = store.usage().since(before);

    let before = store.usage();
    assert!(handle(&store, &queue, None, fold("e2")).await.is_empty());
    let repeat = store.usage().since(before);

    println!();
    show("compute, first event of a profile (20 defs)", first);
    show("compute, event on a profile with a state", known);
    show("compute, redelivered event (dropped)", repeat);
    assert!(known.write_units > 0.0, "no consumed capacity reported");
    assert_eq!(repeat.write_requests, 0, "{repeat:?}");
}
