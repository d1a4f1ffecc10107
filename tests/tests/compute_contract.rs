//! One contract for computed traits and audiences, run on `kindred serve`
//! (SQLite, over HTTP) and on the AWS functions' handlers in process over
//! DynamoDB Local and the emulator's SQS: definitions and their checks,
//! folding events into values and the change log, lookback expiry, stale
//! definitions rebuilt from history, merged states, racing definition
//! writes. Each case runs on a fresh store; the same body checks both.

use std::time::Duration;

use kindred_aws::dynamo::compute::CHANGES_SETTLE_MS;
use kindred_domain::event::format_millis;
use serde_json::{json, Value};

use crate::common::Server;
use crate::lambda_compute::Deployment;

const HOUR: i64 = 3_600_000;

/// What a compute case needs from a running Kindred.
pub(crate) trait Engine: Sync {
    /// A Definitions or admin API call: status and body.
    async fn admin(&self, method: &str, path: &str, body: Option<&Value>) -> (u16, Value);
    /// A batch through the Tracking API (every event accepted).
    async fn batch(&self, events: Vec<Value>);
    /// Until identity, compute and backfills have nothing left to do.
    async fn settle(&self);
    /// A Profile API call in `collection`: `resource` of `lookup` with
    /// `query`, status and body.
    async fn collection_api(
        &self,
        collection: &str,
        lookup: &str,
        resource: &str,
        query: &str,
    ) -> (u16, Value);

    /// A Profile API call about a user.
    async fn profile_api(&self, lookup: &str, resource: &str, query: &str) -> (u16, Value) {
        self.collection_api("users", lookup, resource, query).await
    }

    /// A Profile API call about the account `group_id:{group}`.
    async fn account_api(&self, group: &str, resource: &str, query: &str) -> (u16, Value) {
        let lookup = format!("group_id:{group}");
        self.collection_api("accounts", &lookup, resource, query)
            .await
    }
    /// The change log after `since`, once every change so far is served.
    async fn changes(&self, since: i64) -> Vec<Value>;

    async fn define(&self, collection: &str, key: &str, body: Value) -> Value {
        let (status, reply) = self
            .admin("PUT", &format!("/{collection}/{key}"), Some(&body))
            .await;
        assert!((200..300).contains(&status), "{key}: {status} {reply}");
        reply
    }

    /// The Profile API's traits of a profile.
    async fn traits(&self, lookup: &str, query: &str) -> Value {
        let (status, reply) = self.profile_api(lookup, "traits", query).await;
        assert_eq!(status, 200, "{reply}");
        reply
    }

    async fn lookback(&self, as_of: i64) -> u64 {
        let body = json!({"as_of": format_millis(as_of)});
        let (status, reply) = self.admin("POST", "/lookback/run", Some(&body)).await;
        assert_eq!(status, 200, "{reply}");
        reply["profiles_enqueued"].as_u64().unwrap()
    }
}

impl Engine for Server {
    async fn admin(&self, method: &str, path: &str, body: Option<&Value>) -> (u16, Value) {
        let r = Server::admin(self, method, path, body).await;
        (r.status.as_u16(), r.body)
    }

    async fn batch(&self, events: Vec<Value>) {
        let r = self.track("/v1/batch", &json!({ "batch": events })).await;
        assert_eq!(r.status, 200, "{}", r.body);
    }

    async fn settle(&self) {
        Server::settle(self).await;
    }

    async fn collection_api(
        &self,
        collection: &str,
        lookup: &str,
        resource: &str,
        query: &str,
    ) -> (u16, Value) {
        let path = format!(
            "/v1/spaces/{}/collections/{collection}/profiles/{lookup}/{resource}?{query}",
            self.space.space_id
        );
        let r = self.get_as(&path, Some(&self.space.access_token)).await;
        (r.status.as_u16(), r.body)
    }

    async fn changes(&self, since: i64) -> Vec<Value> {
        let (status, reply) = Engine::admin(
            self,
            "GET",
            &format!("/changes?since={since}&limit=1000"),
            None,
        )
        .await;
        assert_eq!(status, 200, "{reply}");
        reply["data"].as_array().unwrap().clone()
    }
}

impl Engine for Deployment {
    async fn admin(&self, method: &str, path: &str, body: Option<&Value>) -> (u16, Value) {
        Deployment::admin(self, method, path, body).await
    }

    async fn batch(&self, events: Vec<Value>) {
        Deployment::batch(self, events).await;
    }

    async fn settle(&self) {
        Deployment::settle(self).await;
    }

    async fn collection_api(
        &self,
        collection: &str,
        lookup: &str,
        resource: &str,
        query: &str,
    ) -> (u16, Value) {
        Deployment::collection(self, collection, lookup, resource, query).await
    }

    async fn changes(&self, since: i64) -> Vec<Value> {
        // The change log serves entries once they are settled.
        tokio::time::sleep(Duration::from_millis(CHANGES_SETTLE_MS as u64 + 500)).await;
        Deployment::changes(self, since).await
    }
}

fn order(user: &str, revenue: i64, at: i64) -> Value {
    json!({"type": "track", "userId": user, "event": "Order Completed",
           "properties": {"revenue": revenue}, "timestamp": format_millis(at)})
}

/// Waits past the next hour boundary if it is less than three minutes
/// away, so that "now" stays in one hour for the rest of a case.
async fn away_from_hour_boundary() {
    let into = kindred_store::now_millis().rem_euclid(HOUR);
    if into > HOUR - 180_000 {
        tokio::time::sleep(Duration::from_millis((HOUR - into + 1_000) as u64)).await;
    }
}

fn message(reply: &Value) -> &str {
    reply["error"]["message"].as_str().unwrap_or_default()
}

/// Validation names the field; references must exist and not close a
/// cycle; a key belongs to one class; a referenced audience cannot go.
async fn definitions(e: &impl Engine) {
    let (status, bad) = e
        .admin(
            "PUT",
            "/audiences/a",
            Some(&json!({"condition": {"performed": {"event": "A", "count": {"at_leest": 1}}}})),
        )
        .await;
    assert_eq!(status, 400, "{bad}");
    assert_eq!(bad["error"]["code"], "invalid_request_error");
    assert!(
        message(&bad).starts_with("condition.performed.count.at_leest:"),
        "{bad}"
    );
    let (status, missing) = e
        .admin(
            "PUT",
            "/audiences/a",
            Some(&json!({"condition": {"audience": "nope"}})),
        )
        .await;
    assert_eq!(status, 400, "{missing}");

    let created = e
        .define(
            "audiences",
            "x",
            json!({"condition": {"performed": {"event": "A"}}}),
        )
        .await;
    assert_eq!(created["status"], "backfilling", "{created}");
    e.define("audiences", "y", json!({"condition": {"audience": "x"}}))
        .await;
    let (status, cycle) = e
        .admin(
            "PUT",
            "/audiences/x",
            Some(&json!({"condition": {"audience": "y"}})),
        )
        .await;
    assert_eq!(status, 400, "{cycle}");
    assert!(message(&cycle).contains("cycle"), "{cycle}");
    let (status, referenced) = e.admin("DELETE", "/audiences/x", None).await;
    assert_eq!(status, 400, "{referenced}");
    let (status, taken) = e
        .admin(
            "PUT",
            "/computed_traits/x",
            Some(&json!({"type": "event_counter", "event": "A"})),
        )
        .await;
    assert_eq!(status, 400, "{taken}");
    assert!(message(&taken).starts_with("key:"), "{taken}");

    assert_eq!(e.admin("DELETE", "/audiences/y", None).await.0, 204);
    assert_eq!(e.admin("GET", "/audiences/y", None).await.0, 404);
    assert_eq!(e.admin("DELETE", "/audiences/y", None).await.0, 404);
    let (status, replaced) = e
        .admin(
            "PUT",
            "/audiences/x",
            Some(&json!({"condition": {"performed": {"event": "B"}}})),
        )
        .await;
    assert_eq!(status, 200, "{replaced}");
    assert_eq!(
        replaced["definition"]["condition"]["performed"]["event"],
        "B"
    );
    // The (empty) space's backfill pass finishes.
    e.settle().await;
    let (_, x) = e.admin("GET", "/audiences/x", None).await;
    assert_eq!(x["status"], "ready", "{x}");
    let (_, list) = e.admin("GET", "/audiences", None).await;
    assert_eq!(list["data"].as_array().unwrap().len(), 1, "{list}");
}

/// Events fold into a trait and an audience that reads it; the change
/// log has each change once, with its SPEC 8 payloads, and pages.
async fn folding_and_the_change_log(e: &impl Engine) {
    e.define("computed_traits", "lifetime_value", json!({
        "type": "aggregation", "function": "sum", "event": "Order Completed", "property": "revenue"}))
        .await;
    e.define(
        "audiences",
        "high_value_users",
        json!({"condition": {"trait": {"name": "lifetime_value", "op": ">", "value": 500}}}),
    )
    .await;
    let now = kindred_store::now_millis();
    e.batch(vec![
        order("big", 300, now - HOUR),
        order("big", 250, now),
        order("small", 100, now),
    ])
    .await;
    e.settle().await;

    let body = e.traits("user_id:big", "include=high_value_users").await;
    assert_eq!(body["traits"], json!({"high_value_users": true}), "{body}");
    assert_eq!(body["cursor"]["has_more"], json!(false), "{body}");
    let body = e.traits("user_id:big", "class=computed_trait").await;
    assert_eq!(body["traits"], json!({"lifetime_value": 550}), "{body}");
    let body = e.traits("user_id:small", "class=audience").await;
    assert_eq!(
        body["traits"],
        json!({}),
        "a non-member never in the audience has no value"
    );
    let body = e
        .traits("user_id:small", "verbose=true&include=lifetime_value")
        .await;
    assert_eq!(body["traits"]["lifetime_value"]["value"], json!(100));
    assert_eq!(
        body["traits"]["lifetime_value"]["source_id"],
        json!("kindred:compute")
    );

    let log = e.changes(0).await;
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
        2,
        "{log:?}"
    );
    let seqs: Vec<i64> = log.iter().map(|c| c["seq"].as_i64().unwrap()).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "ordered: {seqs:?}");
    assert_eq!(e.changes(seqs[0]).await.len(), log.len() - 1, "paging");
}

/// Windows are exact to the hour; a lookback run recomputes exactly the
/// profiles whose next change by time has come, and an exit is logged once.
async fn lookback_sweep(e: &impl Engine) {
    away_from_hour_boundary().await;
    e.define(
        "computed_traits",
        "orders_90d",
        json!({"type": "event_counter", "event": "Order Completed", "lookback": {"days": 90}}),
    )
    .await;
    e.define(
        "audiences",
        "ordered_90d",
        json!({"condition": {"performed": {"event": "Order Completed", "within": {"days": 90}}}}),
    )
    .await;
    let now = kindred_store::now_millis();
    e.batch(vec![
        order("u1", 10, now - 2_159 * HOUR),
        order("u1", 10, now - 2_161 * HOUR),
        order("u2", 10, now - 10 * HOUR),
    ])
    .await;
    e.settle().await;
    let body = e
        .traits("user_id:u1", "include=orders_90d,ordered_90d")
        .await;
    assert_eq!(
        body["traits"],
        json!({"orders_90d": 1, "ordered_90d": true})
    );
    let before = e.changes(0).await;
    let since = before.last().unwrap()["seq"].as_i64().unwrap();

    // An hour later the 2,159-hour-old order has aged out: only u1 is due.
    assert_eq!(e.lookback(now + HOUR).await, 1);
    e.settle().await;
    let body = e
        .traits("user_id:u1", "include=orders_90d,ordered_90d")
        .await;
    assert_eq!(
        body["traits"],
        json!({"orders_90d": 0, "ordered_90d": false})
    );
    let body = e
        .traits("user_id:u2", "include=orders_90d,ordered_90d")
        .await;
    assert_eq!(
        body["traits"],
        json!({"orders_90d": 1, "ordered_90d": true})
    );
    let after = e.changes(since).await;
    let exits: Vec<&Value> = after.iter().filter(|c| c["key"] == "ordered_90d").collect();
    assert_eq!(exits.len(), 1, "{after:?}");
    assert_eq!(exits[0]["new"], false);
    assert_eq!(exits[0]["payloads"][1]["event"], "Audience Exited");
    assert_eq!(
        after.len(),
        2,
        "the counter's change and the exit: {after:?}"
    );
    // Nobody is due any more at that time.
    assert_eq!(e.lookback(now + HOUR).await, 0);
    // u2's order (10 hours old at `now`) ages out 2,150 hours later.
    assert_eq!(e.lookback(now + 2_150 * HOUR).await, 1);
    e.settle().await;
    let body = e
        .traits("user_id:u2", "include=orders_90d,ordered_90d")
        .await;
    assert_eq!(
        body["traits"],
        json!({"orders_90d": 0, "ordered_90d": false})
    );
}

/// A relative date condition on a trait (Segment's "within next N
/// days") flips by time alone: the sweep finds the profile due then.
async fn relative_date_conditions_follow_the_clock(e: &impl Engine) {
    away_from_hour_boundary().await;
    // Segment's four relative conditions, three days wide.
    for (key, name, op) in [
        ("trial_ending", "trial_ends_at", "within_next"),
        ("trial_far", "trial_ends_at", "after_next"),
        ("recent_signup", "signed_up_at", "within_last"),
        ("old_signup", "signed_up_at", "before_last"),
    ] {
        e.define(
            "audiences",
            key,
            json!({"condition": {"trait": {"name": name, "op": op, "value": {"days": 3}}}}),
        )
        .await;
    }
    let now = kindred_store::now_millis();
    let day = 24 * HOUR;
    e.batch(vec![
        json!({"type": "identify", "userId": "t1", "traits": {
            "trial_ends_at": format_millis(now + 5 * day), "signed_up_at": format_millis(now - HOUR)}}),
        json!({"type": "identify", "userId": "t2", "traits": {
            "trial_ends_at": format_millis(now + HOUR), "signed_up_at": format_millis(now - 2 * day)}}),
    ])
    .await;
    e.settle().await;
    let audiences = |user: &'static str| async move {
        let traits = e.traits(&format!("user_id:{user}"), "class=audience").await;
        let mut keys: Vec<String> = (traits["traits"].as_object().unwrap().iter())
            .filter(|(_, member)| **member == true)
            .map(|(key, _)| key.clone())
            .collect();
        keys.sort();
        keys
    };
    assert_eq!(audiences("t1").await, ["recent_signup", "trial_far"]);
    assert_eq!(audiences("t2").await, ["recent_signup", "trial_ending"]);
    // Two days and an hour later t1's trial ends within three days (no
    // longer after them), t2's has ended, and t2 signed up more than
    // three days ago.
    assert_eq!(e.lookback(now + 2 * day + HOUR).await, 2);
    e.settle().await;
    assert_eq!(audiences("t1").await, ["recent_signup", "trial_ending"]);
    assert_eq!(audiences("t2").await, ["old_signup"]);
}

/// A definition created after the events is built from the history
/// already folded (a stale definition), and again on request.
async fn stale_definitions_are_rebuilt_from_history(e: &impl Engine) {
    let now = kindred_store::now_millis();
    e.define(
        "computed_traits",
        "orders",
        json!({"type": "event_counter", "event": "Order Completed"}),
    )
    .await;
    let mut events = Vec::new();
    for i in 0..8 {
        let user = format!("u{i}");
        let category = if i % 2 == 0 { "shoes" } else { "hats" };
        events.push(json!({"type": "page", "userId": user, "name": "Shoes",
            "properties": {"category": category}, "timestamp": format_millis(now - i * HOUR)}));
        events.push(json!({"type": "page", "userId": user, "properties": {"category": "shoes"}}));
        events.push(order(&user, 1, now - i * HOUR));
    }
    e.batch(events).await;
    e.settle().await;
    let created = e.define("computed_traits", "favourite_category", json!({
        "type": "most_frequent", "event": "Page Viewed", "property": "category", "lookback": {"days": 30}}))
        .await;
    assert_eq!(created["class"], "computed_trait");
    let id = created["id"].as_str().unwrap();
    assert!(id.starts_with("tra_") && id.len() == 28, "{created}");
    e.settle().await;
    let (_, reply) = e
        .admin("GET", "/computed_traits/favourite_category", None)
        .await;
    assert_eq!(reply["status"], "ready", "{reply}");
    let body = e.traits("user_id:u0", "").await;
    assert_eq!(body["traits"]["favourite_category"], "shoes", "{body}");
    assert_eq!(body["traits"]["orders"], 1, "{body}");
    let body = e.traits("user_id:u1", "").await;
    assert_eq!(body["traits"].get("favourite_category"), None, "{body}");

    // A re-run builds it again, as a new version, from the same history.
    let (status, reply) = e
        .admin("POST", "/computed_traits/favourite_category/backfill", None)
        .await;
    assert_eq!(status, 202, "{reply}");
    assert!(reply["version"].as_u64() > created["version"].as_u64());
    e.settle().await;
    let body = e.traits("user_id:u2", "").await;
    assert_eq!(body["traits"]["favourite_category"], "shoes", "{body}");
    assert_eq!(body["traits"]["orders"], 1, "not counted twice: {body}");
}

/// A merge folds the merged profile's state into the root: the count
/// spans both, and a membership both had is not entered again.
async fn a_merge_combines_states_without_entering_twice(e: &impl Engine) {
    e.define(
        "audiences",
        "repeat_buyers",
        json!({"condition": {"performed": {"event": "Order Completed", "count": {"at_least": 2}}}}),
    )
    .await;
    e.define(
        "audiences",
        "buyers",
        json!({"condition": {"performed": {"event": "Order Completed"}}}),
    )
    .await;
    e.settle().await;
    let now = kindred_store::now_millis();
    e.batch(vec![
        json!({"type": "track", "anonymousId": "a1", "event": "Order Completed",
               "timestamp": format_millis(now - HOUR)}),
        order("u1", 5, now),
    ])
    .await;
    e.settle().await;
    e.batch(vec![
        json!({"type": "identify", "anonymousId": "a1", "userId": "u1"}),
    ])
    .await;
    e.settle().await;
    let body = e.traits("anonymous_id:a1", "class=audience").await;
    assert_eq!(
        body["traits"],
        json!({"buyers": true, "repeat_buyers": true}),
        "{body}"
    );
    let log = e.changes(0).await;
    let count = |key: &str| log.iter().filter(|c| c["key"] == key).count();
    assert_eq!(count("repeat_buyers"), 1, "{log:?}");
    // Both profiles entered `buyers` before the merge; the merged one does not again.
    assert_eq!(count("buyers"), 2, "{log:?}");
}

/// A page of a definition's member list: the profile ids and the next cursor.
async fn member_page(e: &impl Engine, path: &str) -> (Vec<String>, Value) {
    let (status, reply) = e.admin("GET", path, None).await;
    assert_eq!(status, 200, "{path}: {reply}");
    let ids = reply["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["profile_id"].as_str().unwrap().to_string())
        .collect();
    (ids, reply["cursor"]["next"].clone())
}

async fn size(e: &impl Engine, path: &str) -> Value {
    let (status, reply) = e.admin("GET", path, None).await;
    assert_eq!(status, 200, "{path}: {reply}");
    reply["size"].clone()
}

async fn profile_id(e: &impl Engine, lookup: &str) -> String {
    let (status, reply) = e.profile_api(lookup, "metadata", "").await;
    assert_eq!(status, 200, "{lookup}: {reply}");
    reply["metadata"]["profile_id"]
        .as_str()
        .unwrap()
        .to_string()
}

/// Member lists and sizes follow the values: entered by folds and by a
/// backfill over history, left when a profile merges into another (the
/// merged profile is listed no more), paged in profile id order.
async fn member_lists_follow_values_and_merges(e: &impl Engine) {
    e.define(
        "audiences",
        "buyers",
        json!({"condition": {"performed": {"event": "Order Completed"}}}),
    )
    .await;
    e.define(
        "computed_traits",
        "orders",
        json!({"type": "event_counter", "event": "Order Completed"}),
    )
    .await;
    e.settle().await;
    let now = kindred_store::now_millis();
    e.batch(vec![
        order("u1", 5, now),
        order("u2", 7, now),
        json!({"type": "track", "anonymousId": "a1", "event": "Order Completed",
               "timestamp": format_millis(now - HOUR)}),
        json!({"type": "identify", "userId": "u3", "traits": {"plan": "free"}}),
    ])
    .await;
    e.settle().await;
    let (u1, u2, a1) = (
        profile_id(e, "user_id:u1").await,
        profile_id(e, "user_id:u2").await,
        profile_id(e, "anonymous_id:a1").await,
    );
    let mut buyers = vec![u1.clone(), u2.clone(), a1.clone()];
    buyers.sort();
    assert_eq!(size(e, "/audiences/buyers").await, json!(3));
    assert_eq!(size(e, "/computed_traits/orders").await, json!(3));
    let (all, next) = member_page(e, "/audiences/buyers/members").await;
    assert_eq!(all, buyers);
    assert_eq!(next, Value::Null);
    // Pages of two, in profile id order.
    let (first, next) = member_page(e, "/audiences/buyers/members?limit=2").await;
    assert_eq!(first, buyers[..2]);
    let after = next.as_str().unwrap();
    let (rest, _) = member_page(
        e,
        &format!("/audiences/buyers/members?limit=2&after={after}"),
    )
    .await;
    assert_eq!(rest, buyers[2..]);
    // The anonymous buyer turns out to be u1: one profile, listed once.
    e.batch(vec![
        json!({"type": "identify", "anonymousId": "a1", "userId": "u1"}),
    ])
    .await;
    e.settle().await;
    let root = profile_id(e, "user_id:u1").await;
    assert_eq!(root, profile_id(e, "anonymous_id:a1").await);
    let mut after_merge = vec![root.clone(), u2.clone()];
    after_merge.sort();
    assert_eq!(
        member_page(e, "/audiences/buyers/members").await.0,
        after_merge
    );
    assert_eq!(size(e, "/audiences/buyers").await, json!(2));
    let (status, reply) = e
        .admin("GET", "/computed_traits/orders/members", None)
        .await;
    assert_eq!(status, 200, "{reply}");
    let values: Vec<(&str, i64)> = reply["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["profile_id"].as_str().unwrap(),
                m["value"].as_i64().unwrap(),
            )
        })
        .collect();
    let mut expected = vec![(root.as_str(), 2), (u2.as_str(), 1)];
    expected.sort();
    assert_eq!(values, expected);
    // A definition made after the events is listed from history.
    e.define(
        "audiences",
        "repeat_buyers",
        json!({"condition": {"performed": {"event": "Order Completed", "count": {"at_least": 2}}}}),
    )
    .await;
    e.settle().await;
    assert_eq!(
        member_page(e, "/audiences/repeat_buyers/members").await.0,
        vec![root]
    );
    assert_eq!(size(e, "/audiences/repeat_buyers").await, json!(1));
    // Bad pages and unknown definitions are refused plainly.
    let (status, _) = e
        .admin("GET", "/audiences/buyers/members?limit=0", None)
        .await;
    assert_eq!(status, 400);
    let (status, _) = e.admin("GET", "/audiences/nobody/members", None).await;
    assert_eq!(status, 404);
}

/// Two writes that would each close a cycle race: exactly one wins.
async fn racing_definition_writes_never_make_a_cycle(e: &impl Engine) {
    for round in 0..5 {
        let (a, b) = (format!("a{round}"), format!("b{round}"));
        let leaf = |event: &str| json!({"condition": {"performed": {"event": event}}});
        e.define("audiences", &a, leaf("A")).await;
        e.define("audiences", &b, leaf("B")).await;
        let to_b = json!({"condition": {"audience": b}});
        let to_a = json!({"condition": {"audience": a}});
        let (path_a, path_b) = (format!("/audiences/{a}"), format!("/audiences/{b}"));
        let (one, two) = futures::join!(
            e.admin("PUT", &path_a, Some(&to_b)),
            e.admin("PUT", &path_b, Some(&to_a)),
        );
        let ok = [one.0, two.0]
            .iter()
            .filter(|s| (200..300).contains(*s))
            .count();
        assert_eq!(
            ok, 1,
            "exactly one of two writes that would close a cycle wins: {one:?} {two:?}"
        );
    }
}

crate::common::on_both_stores!(
    "compute_contract",
    crate::common::Server::start();
    definitions,
    folding_and_the_change_log,
    lookback_sweep,
    relative_date_conditions_follow_the_clock,
    stale_definitions_are_rebuilt_from_history,
    a_merge_combines_states_without_entering_twice,
    member_lists_follow_values_and_merges,
    racing_definition_writes_never_make_a_cycle,
);
