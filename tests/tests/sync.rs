//! Sync to destinations through HTTP on `kindred serve`: the Destinations
//! API, payloads per id-sync strategy, signatures, initial sync, retries
//! through faults, dead letters and replay, alias on merge, and a
//! `segment` destination that is another Kindred.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use crate::common::receiver::{Mode, Receiver};
use crate::common::Server;
use kindred_domain::event::format_millis;
use reqwest::StatusCode;
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(30);

async fn define(s: &Server, collection: &str, key: &str, body: Value) {
    let r = s
        .admin("PUT", &format!("/{collection}/{key}"), Some(&body))
        .await;
    assert!(r.status.is_success(), "{key}: {} {}", r.status, r.body);
}

async fn destination(s: &Server, id: &str, body: Value) -> Value {
    let r = s
        .admin("PUT", &format!("/destinations/{id}"), Some(&body))
        .await;
    assert!(r.status.is_success(), "{id}: {} {}", r.status, r.body);
    r.body
}

async fn send(s: &Server, events: Vec<Value>) {
    let r = s.track("/v1/batch", &json!({ "batch": events })).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    s.settle().await;
}

fn order(user: &str) -> Value {
    json!({"type": "track", "userId": user, "event": "Order Completed",
           "properties": {"revenue": 10}, "timestamp": format_millis(kindred_store::now_millis())})
}

async fn status(s: &Server, id: &str) -> Value {
    let r = s
        .admin("GET", &format!("/destinations/{id}/status"), None)
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    r.body
}

async fn wait_status(s: &Server, id: &str, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    let start = Instant::now();
    loop {
        let body = status(s, id).await;
        if done(&body) {
            return body;
        }
        assert!(start.elapsed() < WAIT, "{what}: {body}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until fan-out has queued everything logged and every destination
/// of the space has nothing pending or retrying: nothing more can arrive
/// (instead of a quiet window that a slow machine could overrun).
async fn settled(s: &Server) {
    s.running.wait_fanned_out().await.unwrap();
    let list = s.admin("GET", "/destinations", None).await.body;
    for d in list["data"].as_array().unwrap() {
        let id = d["id"].as_str().unwrap();
        wait_status(s, id, "nothing left to deliver", |st| {
            st["pending"] == 0 && st["retrying"] == 0
        })
        .await;
    }
}

fn message_ids(calls: &[Value]) -> BTreeSet<String> {
    calls
        .iter()
        .map(|c| c["messageId"].as_str().unwrap().to_string())
        .collect()
}

fn count_event(calls: &[Value], event: &str) -> usize {
    calls.iter().filter(|c| c["event"] == event).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_reach_two_webhooks_signed_with_the_identifiers_of_each_strategy() {
    let s = Server::start_for_local_receivers().await;
    let a = Receiver::start().await;
    let b = Receiver::start().await;
    define(
        &s,
        "computed_traits",
        "order_count",
        json!({
        "type": "event_counter", "event": "Order Completed"}),
    )
    .await;
    define(
        &s,
        "audiences",
        "vip",
        json!({"condition": {"performed": {
        "event": "Order Completed", "count": {"at_least": 2}}}}),
    )
    .await;

    // Two accounts of one kind; the first gets a generated secret, shown once.
    let created = destination(
        &s,
        "crm_a",
        json!({"kind": "webhook", "url": a.url("/hook"),
        "id_sync": {"strategy": "all", "types": ["email", "user_id"]}}),
    )
    .await;
    let secret_a = created["secret"].as_str().unwrap().to_string();
    assert!(secret_a.starts_with("whsec_"), "{created}");
    destination(
        &s,
        "crm_b",
        json!({"kind": "webhook", "url": b.url("/in"), "secret": "b-secret",
        "keys": ["vip"], "calls": ["track"], "batch_size": 10}),
    )
    .await;
    let read = s.admin("GET", "/destinations/crm_b", None).await;
    assert_eq!(read.status, StatusCode::OK);
    assert!(read.body.get("secret").is_none(), "{}", read.body);
    assert_eq!(read.body["secret_set"], json!(true));
    assert_eq!(read.body["keys"], json!(["vip"]));
    assert_eq!(
        read.body["id_sync"],
        json!({"strategy": "last_added", "types": ["user_id", "anonymous_id", "email"]})
    );
    let list = s.admin("GET", "/destinations", None).await;
    assert_eq!(list.body["data"].as_array().unwrap().len(), 2);
    let status_a = status(&s, "crm_a").await;
    assert_eq!(status_a["delivered"], json!(0));

    // First order: order_count 1. Second: order_count 2 and vip entered.
    send(
        &s,
        vec![
            json!({"type": "identify", "userId": "u1", "anonymousId": "anon1",
               "traits": {"email": "U1@Example.com"}}),
            order("u1"),
        ],
    )
    .await;
    send(&s, vec![order("u1")]).await;

    // A: every value of email and user_id, identify and track: 3 changes x 2 ids x 2 calls.
    a.wait_for(WAIT, "crm_a gets 12 calls", |c| c.len() >= 12)
        .await;
    let calls = a.accepted();
    assert_eq!(calls.len(), 12);
    assert_eq!(
        message_ids(&calls).len(),
        12,
        "one messageId per change, call and identifier"
    );
    for r in a.requests() {
        assert_eq!(r.path, "/hook");
        assert!(r.signed_by(&secret_a), "HMAC over the timestamp and body");
        assert!(!r.signed_by("b-secret"));
    }
    let identifies: Vec<&Value> = calls.iter().filter(|c| c["type"] == "identify").collect();
    assert_eq!(identifies.len(), 6);
    let by_email: Vec<&&Value> = identifies
        .iter()
        .filter(|c| c["traits"].get("email").is_some())
        .collect();
    assert_eq!(by_email.len(), 3);
    for c in &by_email {
        assert_eq!(c["traits"]["email"], "u1@example.com");
        assert_eq!(c["userId"], "u1");
    }
    let last_count: Vec<&&Value> = identifies
        .iter()
        .filter(|c| c["traits"].get("order_count") == Some(&json!(2)))
        .collect();
    assert_eq!(last_count.len(), 2);
    // Segment Engage's context.personas.
    let personas = &last_count[0]["context"]["personas"];
    assert_eq!(personas["computation_class"], "trait");
    assert_eq!(personas["computation_key"], "order_count");
    assert_eq!(personas["space_id"], json!(s.space.space_id));
    assert_eq!(personas["namespace"], format!("spa_{}", s.space.space_id));
    let id = personas["computation_id"].as_str().unwrap();
    assert!(id.starts_with("tra_") && id.len() == 28, "{id}");
    assert_eq!(count_event(&calls, "Audience Entered"), 2);
    assert_eq!(count_event(&calls, "Trait Computed"), 4);
    // Per profile, in log order: order_count 1 before 2.
    let counts: Vec<i64> = identifies
        .iter()
        .filter_map(|c| c["traits"].get("order_count").and_then(Value::as_i64))
        .collect();
    assert_eq!(counts, vec![1, 1, 2, 2]);

    // B: only vip, only track, one call with the latest of each type.
    b.wait_for(WAIT, "crm_b gets Audience Entered", |c| !c.is_empty())
        .await;
    let calls = b.accepted();
    assert_eq!(calls.len(), 1, "{calls:#?}");
    let entered = &calls[0];
    assert_eq!(entered["type"], "track");
    assert_eq!(entered["event"], "Audience Entered");
    assert_eq!(entered["userId"], "u1");
    assert_eq!(entered["anonymousId"], "anon1");
    assert_eq!(entered["context"]["traits"]["email"], "u1@example.com");
    assert_eq!(
        entered["properties"],
        json!({"audience_key": "vip", "vip": true})
    );
    let r = &b.requests()[0];
    assert!(
        r.calls().len() == 1
            && serde_json::from_slice::<Value>(&r.body)
                .unwrap()
                .get("batch")
                .is_some()
    );

    // A destination added now first gets the current values, then changes only.
    let c = Receiver::start().await;
    destination(
        &s,
        "late",
        json!({"kind": "webhook", "url": c.url("/x"), "calls": ["identify"]}),
    )
    .await;
    c.wait_for(WAIT, "initial sync", |c| c.len() >= 2).await;
    let mut initial: Vec<Value> = c.accepted().iter().map(|c| c["traits"].clone()).collect();
    initial.sort_by_key(|t| t.to_string());
    assert_eq!(
        initial,
        vec![
            json!({"email": "u1@example.com", "order_count": 2}),
            json!({"email": "u1@example.com", "vip": true})
        ]
    );
    send(&s, vec![order("u1")]).await;
    c.wait_for(WAIT, "the next change", |c| c.len() >= 3).await;
    a.wait_for(WAIT, "crm_a gets the next change", |c| c.len() >= 16)
        .await;
    settled(&s).await;
    let late = c.accepted();
    assert_eq!(late.len(), 3, "{late:#?}");
    assert_eq!(
        late[2]["traits"],
        json!({"order_count": 3, "email": "u1@example.com"})
    );
    assert_eq!(b.accepted().len(), 1, "vip did not change");
    let st = wait_status(&s, "crm_a", "crm_a delivered", |b| {
        b["delivered"] == json!(16)
    })
    .await;
    assert_eq!(
        (
            st["pending"].as_u64(),
            st["retrying"].as_u64(),
            st["dead"].as_u64()
        ),
        (Some(0), Some(0), Some(0))
    );
    assert!(st["last_success_at"].is_string());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_are_retried_until_every_call_arrives_once_and_the_healthy_destination_waits_for_nothing(
) {
    let s = Server::start_for_local_receivers().await;
    let mut flaky = Receiver::start().await;
    let healthy = Receiver::start().await;
    define(
        &s,
        "computed_traits",
        "order_count",
        json!({
        "type": "event_counter", "event": "Order Completed"}),
    )
    .await;
    flaky.set(Mode::Status(500));
    destination(
        &s,
        "flaky",
        json!({"kind": "webhook", "url": flaky.url("/f"), "secret": "f", "batch_size": 5}),
    )
    .await;
    destination(
        &s,
        "healthy",
        json!({"kind": "webhook", "url": healthy.url("/h"), "secret": "h"}),
    )
    .await;
    let users: Vec<String> = (0..10).map(|i| format!("user{i}")).collect();
    send(&s, users.iter().map(|u| order(u)).collect()).await;

    // 500, then 429 with Retry-After, then down.
    let seen = |r: &Receiver, status: u16| r.requests().iter().any(|q| q.status == status);
    let start = Instant::now();
    while !seen(&flaky, 500) {
        assert!(
            start.elapsed() < WAIT,
            "no request reached the flaky receiver"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    flaky.set(Mode::TooMany(1));
    while !seen(&flaky, 429) {
        assert!(start.elapsed() < WAIT, "no retry after the 500");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let st = wait_status(&s, "flaky", "the 429 is the last error", |b| {
        b["last_error"]["status"] == json!(429)
    })
    .await;
    assert!(st["retrying"].as_u64().unwrap() > 0, "{st}");
    let answered_429 = flaky
        .requests()
        .iter()
        .find(|r| r.status == 429)
        .unwrap()
        .at_ms;
    flaky.down().await;
    // The healthy destination got everything meanwhile: 10 changes, identify + track.
    healthy
        .wait_for(WAIT, "the healthy destination", |c| c.len() >= 20)
        .await;
    assert!(
        flaky.accepted().is_empty(),
        "nothing was accepted by the flaky one yet"
    );
    // The retry after the 429 waited for its Retry-After, then found nobody listening.
    let st = wait_status(&s, "flaky", "a connection failure", |b| {
        b["last_error"]["status"].is_null() && b["last_error"]["message"] == "could not connect"
    })
    .await;
    let failed_at =
        kindred_domain::event::parse_time(st["last_error"]["at"].as_str().unwrap()).unwrap();
    assert!(
        failed_at - answered_429 >= 1_000,
        "retried {} ms after a Retry-After of 1 s",
        failed_at - answered_429
    );
    flaky.set(Mode::Ok);
    flaky.up().await;
    flaky
        .wait_for(WAIT, "every call after recovery", |c| {
            message_ids(c).len() >= 20
        })
        .await;
    settled(&s).await;
    let accepted = flaky.accepted();
    assert_eq!(message_ids(&accepted).len(), 20);
    assert_eq!(accepted.len(), 20, "each call accepted once");
    assert_eq!(healthy.accepted().len(), 20);
    assert!(healthy.requests().iter().all(|r| r.status == 200));
    // Every user's identify and track arrived, in order.
    for u in &users {
        let mine: Vec<&Value> = accepted
            .iter()
            .filter(|c| c["userId"] == json!(u))
            .collect();
        assert_eq!(mine.len(), 2, "{u}");
        assert_eq!(
            (mine[0]["type"].as_str(), mine[1]["type"].as_str()),
            (Some("identify"), Some("track"))
        );
    }
    let st = wait_status(&s, "flaky", "all delivered", |b| {
        b["delivered"] == json!(20)
    })
    .await;
    assert_eq!(
        (st["retrying"].as_u64(), st["dead"].as_u64()),
        (Some(0), Some(0)),
        "{st}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_calls_go_to_dead_letters_and_replay_delivers_them() {
    let s = Server::start_for_local_receivers().await;
    let r = Receiver::start().await;
    r.set(Mode::Status(400));
    define(
        &s,
        "audiences",
        "buyers",
        json!({"condition": {"performed": {"event": "Order Completed"}}}),
    )
    .await;
    destination(
        &s,
        "crm",
        json!({"kind": "webhook", "url": r.url("/c"), "secret": "x"}),
    )
    .await;
    send(&s, vec![order("u1")]).await;
    let st = wait_status(&s, "crm", "both calls dead", |b| b["dead"] == json!(2)).await;
    assert_eq!(st["last_error"]["status"], json!(400));
    assert_eq!(st["last_error"]["message"], "Bad Request: receiver says no");
    assert_eq!(r.requests().len(), 2, "a 400 is not retried");
    let dead = s.admin("GET", "/destinations/crm/dead_letters", None).await;
    assert_eq!(dead.status, StatusCode::OK);
    let letters = dead.body["data"].as_array().unwrap();
    assert_eq!(letters.len(), 2);
    assert_eq!(letters[0]["call"]["type"], "identify");
    assert_eq!(letters[1]["call"]["event"], "Audience Entered");
    assert_eq!(letters[0]["attempts"], json!(1));
    assert!(letters[0]["error"].as_str().unwrap().starts_with("400"));

    r.set(Mode::Ok);
    let replay = s.admin("POST", "/destinations/crm/replay", None).await;
    assert_eq!(replay.status, StatusCode::ACCEPTED);
    assert_eq!(replay.body["replayed"], json!(2));
    r.wait_for(WAIT, "the replayed calls", |c| c.len() == 2)
        .await;
    let st = wait_status(&s, "crm", "delivered after replay", |b| {
        b["delivered"] == json!(2)
    })
    .await;
    assert_eq!(st["dead"], json!(0));
    assert_eq!(
        r.accepted()[0]["messageId"],
        letters[0]["call"]["messageId"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_destinations_api_validates_and_keeps_spaces_apart() {
    let s = Server::start_for_local_receivers().await;
    for (body, field) in [
        (json!({"kind": "email"}), "kind"),
        (json!({"kind": "webhook"}), "url"),
        (json!({"kind": "segment", "host": "http://h"}), "write_key"),
        (
            json!({"kind": "webhook", "url": "http://h", "id_sync": {"strategy": "most"}}),
            "id_sync.strategy",
        ),
    ] {
        let r = s.admin("PUT", "/destinations/d1", Some(&body)).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{body}");
        assert_eq!(r.body["error"]["code"], "invalid_request_error");
        assert!(
            r.body["error"]["message"]
                .as_str()
                .unwrap()
                .starts_with(field),
            "{}",
            r.body
        );
    }
    let r = s
        .admin(
            "PUT",
            "/destinations/bad%20id",
            Some(&json!({"kind": "webhook", "url": "http://h"})),
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(
        s.admin("GET", "/destinations/nope", None).await.status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        s.admin("GET", "/destinations/nope/status", None)
            .await
            .status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        s.admin("POST", "/destinations/nope/replay", None)
            .await
            .status,
        StatusCode::NOT_FOUND
    );

    let r = s
        .admin(
            "PUT",
            "/destinations/d1",
            Some(&json!({"kind": "webhook", "url": "http://h/1"})),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED);
    // A replace keeps the secret and shows none.
    let r = s
        .admin(
            "PUT",
            "/destinations/d1",
            Some(&json!({"kind": "webhook", "url": "http://h/2", "enabled": false})),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.body.get("secret").is_none());
    assert_eq!(
        (r.body["version"].as_u64(), r.body["enabled"].as_bool()),
        (Some(2), Some(false))
    );
    assert_eq!(r.body["secret_set"], json!(true));

    // Another space's admin token reaches nothing here, and its own list is empty.
    let other = s.running.local.store.create_space("other").unwrap();
    let path = format!("/v1/spaces/{}/destinations/d1", s.space.space_id);
    let r = s.get_as(&path, Some(&other.admin_token)).await;
    assert!(
        r.status == StatusCode::UNAUTHORIZED || r.status == StatusCode::FORBIDDEN,
        "{}",
        r.status
    );
    let r = s
        .get_as("/v1/spaces/other/destinations", Some(&other.admin_token))
        .await;
    assert_eq!(r.body["data"], json!([]));
    // Access tokens are not admin tokens.
    let r = s.get_as(&path, Some(&s.space.access_token)).await;
    assert!(r.status == StatusCode::UNAUTHORIZED || r.status == StatusCode::FORBIDDEN);

    assert_eq!(
        s.admin("DELETE", "/destinations/d1", None).await.status,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        s.admin("GET", "/destinations/d1", None).await.status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        s.admin("DELETE", "/destinations/d1", None).await.status,
        StatusCode::NOT_FOUND
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_segment_destination_that_is_another_kindred_shows_the_synced_traits() {
    let s = Server::start_for_local_receivers().await;
    let mirror = Server::start_for_local_receivers().await;
    define(
        &s,
        "computed_traits",
        "order_count",
        json!({
        "type": "event_counter", "event": "Order Completed"}),
    )
    .await;
    define(
        &s,
        "audiences",
        "vip",
        json!({"condition": {"performed": {
        "event": "Order Completed", "count": {"at_least": 2}}}}),
    )
    .await;
    destination(
        &s,
        "mirror",
        json!({"kind": "segment", "host": mirror.base,
        "write_key": mirror.space.write_key, "id_sync": {"types": ["user_id"]}}),
    )
    .await;
    send(&s, vec![order("u1"), order("u1")]).await;
    let start = Instant::now();
    loop {
        mirror.settle().await;
        let r = mirror.profile("user_id:u1", "traits").await;
        if r.status == StatusCode::OK
            && r.body["traits"]["vip"] == json!(true)
            && r.body["traits"]["order_count"] == json!(2)
        {
            break;
        }
        assert!(
            start.elapsed() < WAIT,
            "not synced: {} {}",
            r.status,
            r.body
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let events = mirror.profile("user_id:u1", "events").await.body;
    let names: Vec<&str> = events["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["event"].as_str())
        .collect();
    assert!(names.contains(&"Audience Entered"), "{events}");
    let st = status(&s, "mirror").await;
    assert_eq!(st["dead"], json!(0), "{st}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_puts_of_one_destination_create_it_once_and_count_every_replace() {
    let s = Server::start_for_local_receivers().await;
    let bodies: Vec<Value> = (0..16)
        .map(|i| json!({"kind": "webhook", "url": format!("http://h/{i}"), "secret": format!("s{i}")}))
        .collect();
    let replies = futures::future::join_all(
        bodies
            .iter()
            .map(|b| s.admin("PUT", "/destinations/race", Some(b))),
    )
    .await;
    let created = replies
        .iter()
        .filter(|r| r.status == StatusCode::CREATED)
        .count();
    let replaced = replies
        .iter()
        .filter(|r| r.status == StatusCode::OK)
        .count();
    assert_eq!((created, replaced), (1, 15));
    let versions: BTreeSet<u64> = replies
        .iter()
        .map(|r| r.body["version"].as_u64().unwrap())
        .collect();
    assert_eq!(
        versions,
        (1..=16).collect(),
        "each write saw its own version"
    );
    let read = s.admin("GET", "/destinations/race", None).await;
    assert_eq!(read.body["version"], json!(16));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_initial_sync_larger_than_one_chunk_sends_every_value_once_then_changes() {
    let s = Server::start_for_local_receivers().await;
    let r = Receiver::start().await;
    define(
        &s,
        "computed_traits",
        "order_count",
        json!({
        "type": "event_counter", "event": "Order Completed"}),
    )
    .await;
    define(
        &s,
        "audiences",
        "buyers",
        json!({"condition": {"performed": {"event": "Order Completed"}}}),
    )
    .await;
    // 1,600 profiles x 2 values x (identify + track): 6,400 calls, two chunks.
    for chunk in (0..1600).collect::<Vec<usize>>().chunks(400) {
        let events: Vec<Value> = chunk.iter().map(|i| order(&format!("bulk{i}"))).collect();
        let reply = s.track("/v1/batch", &json!({ "batch": events })).await;
        assert_eq!(reply.status, StatusCode::OK);
    }
    s.settle().await;
    destination(
        &s,
        "bulk",
        json!({"kind": "webhook", "url": r.url("/b"), "secret": "x", "batch_size": 100}),
    )
    .await;
    r.wait_for(WAIT, "the initial sync", |c| c.len() >= 6400)
        .await;
    s.running.wait_fanned_out().await.unwrap();
    let read = s.admin("GET", "/destinations/bulk", None).await;
    assert_eq!(read.body["initial_sync"], "done");
    send(&s, vec![order("bulk7")]).await;
    r.wait_for(WAIT, "the change after", |c| c.len() >= 6402)
        .await;
    settled(&s).await;
    let calls = r.accepted();
    assert_eq!(calls.len(), 6402);
    assert_eq!(message_ids(&calls).len(), 6402);
    assert_eq!(count_event(&calls, "Audience Entered"), 1600);
    let last = &calls[6400];
    assert_eq!(
        (
            last["userId"].as_str(),
            last["traits"]["order_count"].as_i64()
        ),
        (Some("bulk7"), Some(2))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_audience_exit_arrives_and_a_new_email_gets_the_entry_once() {
    let s = Server::start_for_local_receivers().await;
    let r = Receiver::start().await;
    define(
        &s,
        "audiences",
        "recent_buyers",
        json!({"condition": {"performed": {
        "event": "Order Completed", "within": {"days": 1}}}}),
    )
    .await;
    destination(
        &s,
        "crm",
        json!({"kind": "webhook", "url": r.url("/c"), "secret": "x",
        "id_sync": {"strategy": "all", "types": ["email"]}}),
    )
    .await;
    send(
        &s,
        vec![
            json!({"type": "identify", "userId": "u1", "traits": {"email": "first@example.com"}}),
            order("u1"),
        ],
    )
    .await;
    r.wait_for(WAIT, "the entry", |c| {
        count_event(c, "Audience Entered") == 1
    })
    .await;
    // A second email for the member gets the membership, once; the
    // first is not sent it again.
    send(
        &s,
        vec![
            json!({"type": "identify", "userId": "u1", "traits": {"email": "second@example.com"}}),
        ],
    )
    .await;
    settled(&s).await;
    r.wait_for(WAIT, "the second email's entry", |c| {
        count_event(c, "Audience Entered") == 2
    })
    .await;
    let entered: Vec<String> = r
        .accepted()
        .iter()
        .filter(|c| c["event"] == "Audience Entered")
        .map(|c| {
            c["context"]["traits"]["email"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(entered, ["first@example.com", "second@example.com"]);
    // A day later the order has aged out: the exit reaches both emails.
    let later = format_millis(kindred_store::now_millis() + 25 * 3_600_000);
    let run = s
        .admin("POST", "/lookback/run", Some(&json!({"as_of": later})))
        .await;
    assert_eq!(run.status, StatusCode::OK, "{}", run.body);
    s.settle().await;
    r.wait_for(WAIT, "the exits", |c| {
        count_event(c, "Audience Exited") == 2
    })
    .await;
    let calls = r.accepted();
    let exits: Vec<&Value> = calls
        .iter()
        .filter(|c| c["event"] == "Audience Exited")
        .collect();
    let emails: BTreeSet<&str> = exits
        .iter()
        .map(|c| c["context"]["traits"]["email"].as_str().unwrap())
        .collect();
    assert_eq!(
        emails,
        BTreeSet::from(["first@example.com", "second@example.com"])
    );
    assert_eq!(
        exits[0]["properties"],
        json!({"audience_key": "recent_buyers", "recent_buyers": false})
    );
    assert_eq!(exits[0]["userId"], "u1");
    let identifies: Vec<&Value> = calls
        .iter()
        .filter(|c| c["type"] == "identify" && c["traits"]["recent_buyers"] == json!(false))
        .collect();
    assert_eq!(identifies.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adding_a_key_sends_its_values_and_keeps_the_others_flowing() {
    let s = Server::start_for_local_receivers().await;
    let r = Receiver::start().await;
    define(
        &s,
        "audiences",
        "recent",
        json!({"condition": {"performed": {
        "event": "Order Completed", "within": {"days": 1}}}}),
    )
    .await;
    define(
        &s,
        "audiences",
        "ever",
        json!({"condition": {"performed": {"event": "Order Completed"}}}),
    )
    .await;
    destination(
        &s,
        "crm",
        json!({"kind": "webhook", "url": r.url("/c"), "secret": "x",
        "keys": ["recent"], "calls": ["identify"]}),
    )
    .await;
    send(&s, vec![order("u1")]).await;
    r.wait_for(WAIT, "recent entered", |c| c.len() == 1).await;
    // A kind change must bring its own secret: the stored one stays put.
    let moved = s
        .admin(
            "PUT",
            "/destinations/crm",
            Some(&json!({"kind": "segment", "host": r.url("")})),
        )
        .await;
    assert_eq!(moved.status, StatusCode::BAD_REQUEST, "{}", moved.body);
    assert!(moved.body["error"]["message"]
        .as_str()
        .unwrap()
        .starts_with("write_key"));
    // Adding `ever`: its current value is sent; `recent` is not sent again.
    destination(
        &s,
        "crm",
        json!({"kind": "webhook", "url": r.url("/c"),
        "keys": ["recent", "ever"], "calls": ["identify"]}),
    )
    .await;
    r.wait_for(WAIT, "ever's current value", |c| c.len() == 2)
        .await;
    s.running.wait_fanned_out().await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let calls = r.accepted();
    assert_eq!(calls.len(), 2, "{calls:#?}");
    assert_eq!(calls[1]["traits"]["ever"], json!(true));
    // The old key keeps flowing: the exit of `recent` arrives.
    let later = format_millis(kindred_store::now_millis() + 25 * 3_600_000);
    let run = s
        .admin("POST", "/lookback/run", Some(&json!({"as_of": later})))
        .await;
    assert_eq!(run.status, StatusCode::OK);
    s.settle().await;
    r.wait_for(WAIT, "recent exited", |c| c.len() == 3).await;
    assert_eq!(r.accepted()[2]["traits"]["recent"], json!(false));
}
