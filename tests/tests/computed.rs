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
async fn high_value_users_answers_membership_as_a_trait() {
    let s = Server::start().await;
    define(&s, "computed_traits", "lifetime_value", json!({
        "type": "aggregation", "function": "sum", "event": "Order Completed", "property": "revenue"})).await;
    define(
        &s,
        "audiences",
        "high_value_users",
        json!({
        "condition": {"trait": {"name": "lifetime_value", "op": ">", "value": 500}}}),
    )
    .await;
    let now = now_ms();
    batch(
        &s,
        vec![
            order("big", 300, now - HOUR),
            order("big", 250, now),
            order("small", 100, now),
        ],
    )
    .await;
    s.settle().await;

    let body = traits(&s, "user_id:big", "include=high_value_users").await;
    assert_eq!(body["traits"], json!({"high_value_users": true}));
    assert_eq!(body["cursor"]["has_more"], json!(false));
    let body = traits(&s, "user_id:big", "class=computed_trait").await;
    assert_eq!(body["traits"], json!({"lifetime_value": 550}));
    let body = traits(&s, "user_id:small", "class=audience").await;
    assert_eq!(
        body["traits"],
        json!({}),
        "a non-member never in the audience has no value"
    );
    let body = traits(&s, "user_id:small", "verbose=true&include=lifetime_value").await;
    assert_eq!(body["traits"]["lifetime_value"]["value"], json!(100));
    assert_eq!(
        body["traits"]["lifetime_value"]["source_id"],
        json!("kindred:compute")
    );

    // The change log: two trait values and one entry, with the SPEC 8 payloads.
    let log = changes(&s, 0).await;
    let entered: Vec<&Value> = log
        .iter()
        .filter(|c| c["key"] == "high_value_users")
        .collect();
    assert_eq!(entered.len(), 1, "{log:?}");
    let payloads = entered[0]["payloads"].as_array().unwrap();
    assert_eq!(payloads[0]["type"], "identify");
    assert_eq!(payloads[0]["traits"], json!({"high_value_users": true}));
    assert_eq!(payloads[1]["event"], "Audience Entered");
    assert_eq!(
        payloads[1]["context"]["personas"]["computation_key"],
        "high_value_users"
    );
    assert_eq!(
        log.iter().filter(|c| c["key"] == "lifetime_value").count(),
        2
    );
    // Paging continues after `since`.
    let first = log[0]["seq"].as_i64().unwrap();
    assert_eq!(changes(&s, first).await.len(), log.len() - 1);
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lookback_boundaries_are_exact_to_the_hour_and_expiry_exits_once() {
    away_from_hour_boundary().await;
    let s = Server::start().await;
    define(
        &s,
        "computed_traits",
        "orders_90d",
        json!({
        "type": "event_counter", "event": "Order Completed", "lookback": {"days": 90}}),
    )
    .await;
    define(
        &s,
        "audiences",
        "ordered_90d",
        json!({"condition": {"performed": {
        "event": "Order Completed", "within": {"days": 90}}}}),
    )
    .await;
    let now = now_ms();
    batch(
        &s,
        vec![
            order("u1", 10, now - 2_159 * HOUR),
            order("u1", 10, now - 2_161 * HOUR),
            order("u2", 10, now - 10 * HOUR),
        ],
    )
    .await;
    s.settle().await;
    let body = traits(&s, "user_id:u1", "include=orders_90d,ordered_90d").await;
    assert_eq!(
        body["traits"],
        json!({"orders_90d": 1, "ordered_90d": true})
    );
    let before = changes(&s, 0).await;
    let since = before.last().unwrap()["seq"].as_i64().unwrap();

    // An hour later the 2,159-hour-old order has aged out; only u1 is due.
    let r = s
        .admin(
            "POST",
            "/lookback/run",
            Some(&json!({"as_of": format_millis(now + HOUR)})),
        )
        .await;
    assert_eq!(r.body["profiles_enqueued"], json!(1), "{}", r.body);
    s.settle().await;
    let body = traits(&s, "user_id:u1", "include=orders_90d,ordered_90d").await;
    assert_eq!(
        body["traits"],
        json!({"orders_90d": 0, "ordered_90d": false})
    );
    let body = traits(&s, "user_id:u2", "include=orders_90d,ordered_90d").await;
    assert_eq!(
        body["traits"],
        json!({"orders_90d": 1, "ordered_90d": true})
    );
    let after = changes(&s, since).await;
    let exits: Vec<&Value> = after.iter().filter(|c| c["key"] == "ordered_90d").collect();
    assert_eq!(exits.len(), 1, "{after:?}");
    assert_eq!(exits[0]["payloads"][1]["event"], "Audience Exited");
    assert_eq!(
        after.len(),
        2,
        "the counter's change and the exit: {after:?}"
    );
    // Running it again finds nobody due.
    let r = s
        .admin(
            "POST",
            "/lookback/run",
            Some(&json!({"as_of": format_millis(now + HOUR)})),
        )
        .await;
    assert_eq!(r.body["profiles_enqueued"], json!(0), "{}", r.body);

    // A later run, after the request queue has drained, is served too:
    // u2's order (10 hours old at `now`) ages out 2,150 hours later.
    let r = s
        .admin(
            "POST",
            "/lookback/run",
            Some(&json!({"as_of": format_millis(now + 2_150 * HOUR)})),
        )
        .await;
    assert_eq!(r.body["profiles_enqueued"], json!(1), "{}", r.body);
    s.settle().await;
    let body = traits(&s, "user_id:u2", "include=orders_90d,ordered_90d").await;
    assert_eq!(
        body["traits"],
        json!({"orders_90d": 0, "ordered_90d": false})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_definition_is_backfilled_over_stored_history() {
    let s = Server::start().await;
    let now = now_ms();
    let mut events = Vec::new();
    for i in 0..40 {
        events.push(json!({"type": "page", "userId": format!("u{i}"), "name": "Shoes",
            "properties": {"category": if i % 2 == 0 { "shoes" } else { "hats" }}, "timestamp": format_millis(now - i * HOUR)}));
        events.push(
            json!({"type": "page", "userId": format!("u{i}"), "properties": {"category": "shoes"}}),
        );
    }
    batch(&s, events).await;
    s.settle().await;
    let created = define(&s, "computed_traits", "favourite_category", json!({
        "type": "most_frequent", "event": "Page Viewed", "property": "category", "lookback": {"days": 30}})).await;
    assert_eq!(created["class"], "computed_trait");
    assert!(
        ["backfilling", "ready"].contains(&created["status"].as_str().unwrap()),
        "{created}"
    );
    s.settle().await;
    let r = s
        .admin("GET", "/computed_traits/favourite_category", None)
        .await;
    assert_eq!(r.body["status"], "ready", "{}", r.body);
    assert_eq!(
        traits(&s, "user_id:u0", "").await["traits"]["favourite_category"],
        "shoes"
    );
    assert_eq!(
        traits(&s, "user_id:u1", "").await["traits"].get("favourite_category"),
        None
    );
    // A re-run builds it again from history.
    let r = s
        .admin("POST", "/computed_traits/favourite_category/backfill", None)
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.body);
    assert!(r.body["version"].as_u64() > created["version"].as_u64());
    s.settle().await;
    assert_eq!(
        traits(&s, "user_id:u2", "").await["traits"]["favourite_category"],
        "shoes"
    );
    let list = s.admin("GET", "/computed_traits", None).await;
    assert_eq!(list.body["data"].as_array().unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_merge_combines_states_without_entering_twice() {
    let s = Server::start().await;
    define(
        &s,
        "audiences",
        "repeat_buyers",
        json!({"condition": {"performed": {
        "event": "Order Completed", "count": {"at_least": 2}}}}),
    )
    .await;
    define(
        &s,
        "audiences",
        "buyers",
        json!({"condition": {"performed": {"event": "Order Completed"}}}),
    )
    .await;
    let now = now_ms();
    batch(&s, vec![
        json!({"type": "track", "anonymousId": "a1", "event": "Order Completed", "timestamp": format_millis(now - HOUR)}),
        order("u1", 5, now),
    ]).await;
    s.settle().await;
    batch(
        &s,
        vec![json!({"type": "identify", "anonymousId": "a1", "userId": "u1"})],
    )
    .await;
    s.settle().await;
    let body = traits(&s, "anonymous_id:a1", "class=audience").await;
    assert_eq!(
        body["traits"],
        json!({"buyers": true, "repeat_buyers": true})
    );
    let log = changes(&s, 0).await;
    let count = |key: &str| log.iter().filter(|c| c["key"] == key).count();
    assert_eq!(count("repeat_buyers"), 1, "{log:?}");
    // Both profiles entered `buyers` before the merge; the merged one does not again.
    assert_eq!(count("buyers"), 2, "{log:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_definitions_api_validates_and_names_the_field() {
    let s = Server::start().await;
    let bad = s
        .admin(
            "PUT",
            "/audiences/a",
            Some(&json!({"condition": {"performed": {"event": "A", "count": {"at_leest": 1}}}})),
        )
        .await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    assert_eq!(bad.body["error"]["code"], "invalid_request_error");
    assert!(
        bad.body["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("condition.performed.count.at_leest:"),
        "{}",
        bad.body
    );
    let missing = s
        .admin(
            "PUT",
            "/audiences/a",
            Some(&json!({"condition": {"audience": "nope"}})),
        )
        .await;
    assert_eq!(missing.status, StatusCode::BAD_REQUEST, "{}", missing.body);
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

    define(
        &s,
        "audiences",
        "x",
        json!({"condition": {"performed": {"event": "A"}}}),
    )
    .await;
    define(
        &s,
        "audiences",
        "y",
        json!({"condition": {"audience": "x"}}),
    )
    .await;
    let cycle = s
        .admin(
            "PUT",
            "/audiences/x",
            Some(&json!({"condition": {"audience": "y"}})),
        )
        .await;
    assert_eq!(cycle.status, StatusCode::BAD_REQUEST);
    assert!(
        cycle.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("cycle"),
        "{}",
        cycle.body
    );
    let referenced = s.admin("DELETE", "/audiences/x", None).await;
    assert_eq!(
        referenced.status,
        StatusCode::BAD_REQUEST,
        "{}",
        referenced.body
    );
    let taken = s
        .admin(
            "PUT",
            "/computed_traits/x",
            Some(&json!({"type": "event_counter", "event": "A"})),
        )
        .await;
    assert_eq!(taken.status, StatusCode::BAD_REQUEST);
    assert!(
        taken.body["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("key:"),
        "{}",
        taken.body
    );

    assert_eq!(
        s.admin("DELETE", "/audiences/y", None).await.status,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        s.admin("GET", "/audiences/y", None).await.status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        s.admin("DELETE", "/audiences/y", None).await.status,
        StatusCode::NOT_FOUND
    );
    let replaced = s
        .admin(
            "PUT",
            "/audiences/x",
            Some(&json!({"condition": {"performed": {"event": "B"}}})),
        )
        .await;
    assert_eq!(replaced.status, StatusCode::OK, "{}", replaced.body);
    assert_eq!(
        replaced.body["definition"]["condition"]["performed"]["event"],
        "B"
    );

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
async fn racing_definition_writes_never_make_a_cycle() {
    let s = std::sync::Arc::new(Server::start().await);
    for round in 0..10 {
        let (a, b) = (format!("a{round}"), format!("b{round}"));
        define(
            &s,
            "audiences",
            &a,
            json!({"condition": {"performed": {"event": "A"}}}),
        )
        .await;
        define(
            &s,
            "audiences",
            &b,
            json!({"condition": {"performed": {"event": "B"}}}),
        )
        .await;
        let (s1, s2) = (s.clone(), s.clone());
        let (a1, b1, a2, b2) = (a.clone(), b.clone(), a.clone(), b.clone());
        let one = tokio::spawn(async move {
            s1.admin(
                "PUT",
                &format!("/audiences/{a1}"),
                Some(&json!({"condition": {"audience": b1}})),
            )
            .await
            .status
        });
        let two = tokio::spawn(async move {
            s2.admin(
                "PUT",
                &format!("/audiences/{b2}"),
                Some(&json!({"condition": {"audience": a2}})),
            )
            .await
            .status
        });
        let (one, two) = (one.await.unwrap(), two.await.unwrap());
        let ok = [one, two].iter().filter(|s| s.is_success()).count();
        assert_eq!(
            ok, 1,
            "exactly one of two writes that would close a cycle wins: {one} {two}"
        );
    }
}

/// Enough profiles that the compute worker's batches are split over
/// threads (states decoded, evaluated and encoded in parallel): every
/// profile still gets exactly its own value, on ingest and on expiry.
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
