//! Computed traits and audiences through HTTP on `kindred serve`: the
//! Definitions API, the compute step behind the identity step, the
//! change log, lookback expiry and backfill.

use crate::common::Server;
use kindred_domain::event::format_millis;
use reqwest::StatusCode;
use serde_json::{json, Value};

const HOUR: i64 = 3_600_000;

fn now_ms() -> i64 {
    kindred_store::now_millis()
}

/// Waits past the next hour boundary if it is less than two minutes
/// away, so that "now" stays in one hour for the rest of a short test.
async fn away_from_hour_boundary() {
    let into = now_ms().rem_euclid(HOUR);
    if into > HOUR - 120_000 {
        tokio::time::sleep(std::time::Duration::from_millis(
            (HOUR - into + 1_000) as u64,
        ))
        .await;
    }
}

async fn define(s: &Server, collection: &str, key: &str, body: Value) -> Value {
    let r = s
        .admin("PUT", &format!("/{collection}/{key}"), Some(&body))
        .await;
    assert!(r.status.is_success(), "{key}: {} {}", r.status, r.body);
    r.body
}

async fn traits(s: &Server, lookup: &str, query: &str) -> Value {
    let r = s.profile(lookup, &format!("traits?{query}")).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    r.body
}

async fn changes(s: &Server, since: i64) -> Vec<Value> {
    let r = s
        .admin("GET", &format!("/changes?since={since}&limit=1000"), None)
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    r.body["data"].as_array().unwrap().clone()
}

fn order(user: &str, revenue: i64, at: i64) -> Value {
    json!({"type": "track", "userId": user, "event": "Order Completed",
           "properties": {"revenue": revenue}, "timestamp": format_millis(at)})
}

async fn batch(s: &Server, events: Vec<Value>) {
    let r = s.track("/v1/batch", &json!({ "batch": events })).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cart_abandonment_counts_every_instance_of_the_parent_event() {
    let s = Server::start().await;
    define(
        &s,
        "audiences",
        "cart_abandoners",
        json!({"condition": {"performed": {
        "event": "Product Added", "within": {"days": 7},
        "then_not": {"event": "Order Completed", "within": {"days": 1}}}}}),
    )
    .await;
    let t = now_ms() - 3 * 24 * HOUR;
    let ev = |user: &str, event: &str, at: i64| json!({"type": "track", "userId": user, "event": event, "timestamp": format_millis(at)});
    batch(
        &s,
        vec![
            ev("abandoned", "Product Added", t),
            ev("again", "Product Added", t),
            ev("again", "Order Completed", t + HOUR),
            ev("again", "Product Added", t + 2 * HOUR),
            ev("bought", "Product Added", t),
            ev("bought", "Order Completed", t + HOUR),
        ],
    )
    .await;
    // A cart added just now has not been abandoned yet.
    batch(&s, vec![ev("fresh", "Product Added", now_ms())]).await;
    s.settle().await;
    for (user, member) in [
        ("abandoned", Some(true)),
        ("again", Some(true)),
        ("bought", None),
        ("fresh", None),
    ] {
        let body = traits(&s, &format!("user_id:{user}"), "include=cart_abandoners").await;
        assert_eq!(
            body["traits"].get("cart_abandoners").cloned(),
            member.map(Value::Bool),
            "{user}"
        );
    }
    // A day later, the fresh cart is abandoned: the sweep finds it.
    let r = s
        .admin(
            "POST",
            "/lookback/run",
            Some(&json!({"as_of": format_millis(now_ms() + 25 * HOUR)})),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert!(
        r.body["profiles_enqueued"].as_u64().unwrap() >= 1,
        "{}",
        r.body
    );
    s.settle().await;
    let body = traits(&s, "user_id:fresh", "include=cart_abandoners").await;
    assert_eq!(body["traits"]["cart_abandoners"], json!(true));
}

/// What the Definitions API refuses before any store rule (the rules
/// themselves are `compute_contract::definitions`, on both stores).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_definitions_api_refuses_bad_json_and_other_tokens() {
    let s = Server::start().await;
    let not_json = s
        .client
        .put(format!(
            "{}/v1/spaces/{}/audiences/a",
            s.base, s.space.space_id
        ))
        .basic_auth(&s.space.admin_token, Some(""))
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(not_json.status(), StatusCode::BAD_REQUEST);
    // Only the space's admin token may use it.
    let path = format!("/v1/spaces/{}/audiences", s.space.space_id);
    let r = s.get_as(&path, Some(&s.space.access_token)).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    let r = s
        .get_as("/v1/spaces/other/audiences", Some(&s.space.admin_token))
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_profiles_per_batch_each_get_their_own_values() {
    away_from_hour_boundary().await;
    let s = Server::start().await;
    define(
        &s,
        "computed_traits",
        "orders_2h",
        json!({"type": "event_counter", "event": "Order Completed", "lookback": {"hours": 2}}),
    )
    .await;
    define(
        &s,
        "audiences",
        "repeat_buyers",
        json!({"condition": {"performed": {"event": "Order Completed",
            "count": {"at_least": 3}, "within": {"hours": 2}}}}),
    )
    .await;
    let now = now_ms();
    let users = 300;
    let mut events = Vec::new();
    for i in 0..users {
        for k in 0..(i % 5) {
            events.push(order(&format!("u{i}"), k, now - HOUR / 2));
        }
        events.push(json!({"type": "identify", "userId": format!("u{i}")}));
    }
    for chunk in events.chunks(100) {
        batch(&s, chunk.to_vec()).await;
    }
    s.settle().await;
    // (A profile that never had a value gets no blank one: SPEC 8.)
    let value = |n: i64, blank: Value| if n == 0 { Value::Null } else { blank };
    for i in 0..users {
        let t = traits(&s, &format!("user_id:u{i}"), "").await;
        let orders = i % 5;
        assert_eq!(
            t["traits"]["orders_2h"],
            value(orders, json!(orders)),
            "u{i}: {t}"
        );
        let member = if orders >= 3 {
            json!(true)
        } else {
            Value::Null
        };
        assert_eq!(t["traits"]["repeat_buyers"], member, "u{i}: {t}");
    }
    let members = (0..users).filter(|i| i % 5 >= 3).count();
    // The change log's position before expiry (pages of 1,000).
    let mut since = 0;
    loop {
        let page = changes(&s, since).await;
        match page.last() {
            Some(last) => since = last["seq"].as_i64().unwrap(),
            None => break,
        }
    }
    // Three hours later every order has aged out: each member exits once.
    let r = s
        .admin(
            "POST",
            "/lookback/run",
            Some(&json!({"as_of": format_millis(now + 3 * HOUR)})),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(
        r.body["profiles_enqueued"],
        json!(users - users / 5),
        "{}",
        r.body
    );
    s.settle().await;
    for i in 0..users {
        let t = traits(&s, &format!("user_id:u{i}"), "").await;
        let orders = i % 5;
        assert_eq!(
            t["traits"]["orders_2h"],
            value(orders, json!(0)),
            "u{i}: {t}"
        );
        let member = if orders >= 3 {
            json!(false)
        } else {
            Value::Null
        };
        assert_eq!(t["traits"]["repeat_buyers"], member, "u{i}: {t}");
    }
    let after = changes(&s, since).await;
    let exits: Vec<&Value> = after
        .iter()
        .filter(|c| c["key"] == "repeat_buyers")
        .collect();
    assert_eq!(exits.len(), members, "{after:?}");
    assert!(exits
        .iter()
        .all(|c| c["payloads"][1]["event"] == "Audience Exited"));
}
