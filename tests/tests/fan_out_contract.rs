//! One contract for fan-out and delivery to destinations, run on `kindred
//! serve` (SQLite) and on the AWS functions' handlers in process over
//! DynamoDB Local and the emulator's SQS: changes and aliases reach a
//! signed webhook once, failed deliveries are retried until they land,
//! and a destination added later gets the current values first, then the
//! changes after them. The same body checks both.

use std::time::{Duration, Instant};

use kindred_domain::event::format_millis;
use serde_json::{json, Value};

use crate::common::receiver::{Mode, Receiver};
use crate::common::Server;
use crate::compute_contract::Engine;
use crate::lambda_compute::Deployment;

const WAIT: Duration = Duration::from_secs(60);

/// What a fan-out case needs beyond [`Engine`].
pub(crate) trait Delivering: Engine {
    /// Lets fan-out and delivery run until `done` holds (fails after a minute).
    async fn deliver_until(&self, what: &str, done: impl Fn() -> bool);
    /// Runs fan-out and delivery on what is queued now.
    async fn drain(&self);
}

/// A destination's status once it satisfies `done` (fails after a minute).
async fn wait_status(
    e: &impl Delivering,
    id: &str,
    what: &str,
    done: impl Fn(&Value) -> bool,
) -> Value {
    let start = Instant::now();
    loop {
        e.drain().await;
        let (status, st) = e
            .admin("GET", &format!("/destinations/{id}/status"), None)
            .await;
        assert_eq!(status, 200, "{st}");
        if done(&st) {
            return st;
        }
        assert!(start.elapsed() < WAIT, "{what}: {st}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn quiet(st: &Value) -> bool {
    st["pending"] == json!(0) && st["retrying"] == json!(0)
}

impl Delivering for Server {
    async fn deliver_until(&self, what: &str, done: impl Fn() -> bool) {
        let start = Instant::now();
        while !done() {
            assert!(start.elapsed() < WAIT, "{what}: not after {WAIT:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn drain(&self) {
        self.running.wait_fanned_out().await.unwrap();
    }
}

impl Delivering for Deployment {
    async fn deliver_until(&self, what: &str, done: impl Fn() -> bool) {
        self.pump_sync_until(what, done).await;
    }

    async fn drain(&self) {
        self.pump_sync().await;
    }
}

fn bought(who: (&str, &str)) -> Value {
    json!({"type": "track", who.0: who.1, "event": "Order Completed",
           "timestamp": format_millis(kindred_store::now_millis())})
}

fn count_event(calls: &[Value], event: &str) -> usize {
    calls.iter().filter(|c| c["event"] == event).count()
}

async fn destination(e: &impl Engine, id: &str, body: Value) -> Value {
    let (status, reply) = e
        .admin("PUT", &format!("/destinations/{id}"), Some(&body))
        .await;
    assert_eq!(status, 201, "{id}: {reply}");
    assert!(reply.get("secret").is_none(), "{reply}");
    reply
}

async fn buyers(e: &impl Engine) {
    e.define(
        "audiences",
        "buyers",
        json!({"condition": {"performed": {"event": "Order Completed"}}}),
    )
    .await;
    e.settle().await;
}

/// Two profiles enter an audience, signed; when they merge, the
/// destination gets one alias and no second entry.
async fn changes_and_one_alias_reach_a_signed_webhook(e: &impl Delivering) {
    let r = Receiver::start().await;
    buyers(e).await;
    destination(
        e,
        "ads",
        json!({"kind": "webhook", "url": r.url("/ads"), "secret": "ads-secret",
               "calls": ["track"], "alias_on_merge": true}),
    )
    .await;
    e.batch(vec![
        bought(("anonymousId", "a1")),
        bought(("userId", "u9")),
    ])
    .await;
    e.settle().await;
    e.deliver_until("both profiles enter", || {
        count_event(&r.accepted(), "Audience Entered") == 2
    })
    .await;
    assert!(r.requests().iter().all(|q| q.signed_by("ads-secret")));
    let calls = r.accepted();
    assert!(calls.iter().any(|c| c["userId"] == "u9"), "{calls:#?}");
    assert!(calls.iter().any(|c| c["anonymousId"] == "a1"), "{calls:#?}");
    assert_eq!(calls[0]["context"]["personas"]["computation_key"], "buyers");

    // The anonymous visitor logs in as u9: the two profiles merge.
    e.batch(vec![
        json!({"type": "identify", "userId": "u9", "anonymousId": "a1"}),
    ])
    .await;
    e.settle().await;
    e.deliver_until("the alias", || {
        r.accepted().iter().any(|c| c["type"] == "alias")
    })
    .await;
    // Whatever else the merge queued has been delivered.
    wait_status(e, "ads", "nothing left to deliver", quiet).await;
    let calls = r.accepted();
    let aliases: Vec<&Value> = calls.iter().filter(|c| c["type"] == "alias").collect();
    assert_eq!(aliases.len(), 1, "{calls:#?}");
    assert_eq!(
        (
            aliases[0]["previousId"].as_str(),
            aliases[0]["userId"].as_str()
        ),
        (Some("a1"), Some("u9"))
    );
    assert_eq!(count_event(&calls, "Audience Entered"), 2, "{calls:#?}");
    assert_eq!(count_event(&calls, "Audience Exited"), 0, "{calls:#?}");
}

/// A member gains a second email: the destination, which syncs every
/// email, sends that email the membership it already has, once, and
/// nothing again to the first.
async fn a_member_s_new_email_gets_the_current_membership(e: &impl Delivering) {
    let r = Receiver::start().await;
    buyers(e).await;
    destination(
        e,
        "mail",
        json!({"kind": "webhook", "url": r.url("/mail"), "secret": "s", "calls": ["identify"],
               "id_sync": {"strategy": "all", "types": ["email"]}}),
    )
    .await;
    e.batch(vec![
        json!({"type": "identify", "userId": "m1", "traits": {"email": "first@x.io"}}),
        bought(("userId", "m1")),
        // Not a member: its new email gets nothing.
        json!({"type": "identify", "userId": "m2", "traits": {"email": "other@x.io"}}),
    ])
    .await;
    e.settle().await;
    let to = |calls: &[Value], email: &str| -> usize {
        calls
            .iter()
            .filter(|c| c["traits"]["email"] == email && c["traits"]["buyers"] == true)
            .count()
    };
    e.deliver_until("the entry", || to(&r.accepted(), "first@x.io") == 1)
        .await;
    e.batch(vec![
        json!({"type": "identify", "userId": "m1", "traits": {"email": "second@x.io"}}),
        json!({"type": "identify", "userId": "m2", "traits": {"email": "other2@x.io"}}),
    ])
    .await;
    e.settle().await;
    e.deliver_until("the second email's membership", || {
        to(&r.accepted(), "second@x.io") == 1
    })
    .await;
    wait_status(e, "mail", "nothing left to deliver", quiet).await;
    let calls = r.accepted();
    assert_eq!(to(&calls, "first@x.io"), 1, "{calls:#?}");
    assert_eq!(to(&calls, "second@x.io"), 1, "{calls:#?}");
    assert_eq!(calls.len(), 2, "nothing for the non-member: {calls:#?}");
    assert_eq!(calls[1]["userId"], "m1", "{calls:#?}");
}

/// A receiver that fails for a while: the call is retried until it
/// lands, and the status shows the failure, then the delivery.
async fn failed_deliveries_are_retried_until_they_land(e: &impl Delivering) {
    let r = Receiver::start().await;
    buyers(e).await;
    destination(
        e,
        "crm",
        json!({"kind": "webhook", "url": r.url("/crm"), "secret": "s", "calls": ["track"]}),
    )
    .await;
    r.set(Mode::Status(503));
    e.batch(vec![bought(("userId", "u1"))]).await;
    e.settle().await;
    e.deliver_until("a failed attempt", || {
        r.requests().iter().any(|q| q.status == 503)
    })
    .await;
    let (_, st) = e.admin("GET", "/destinations/crm/status", None).await;
    assert_eq!(st["last_error"]["status"], json!(503), "{st}");
    assert_eq!(
        st["retrying"].as_u64().unwrap_or(0) + st["pending"].as_u64().unwrap_or(0),
        1,
        "{st}"
    );
    r.set(Mode::Ok);
    e.deliver_until("the retried call", || {
        count_event(&r.accepted(), "Audience Entered") == 1
    })
    .await;
    let st = wait_status(e, "crm", "the delivery counted", quiet).await;
    assert_eq!(
        (
            st["delivered"].as_u64(),
            st["retrying"].as_u64(),
            st["dead"].as_u64()
        ),
        (Some(1), Some(0), Some(0)),
        "{st}"
    );
    assert_eq!(count_event(&r.accepted(), "Audience Entered"), 1);
}

/// A destination added after the events gets every current value once
/// (its initial sync), then the changes after it.
async fn a_new_destination_gets_the_current_values_then_changes(e: &impl Delivering) {
    let r = Receiver::start().await;
    buyers(e).await;
    e.batch(vec![
        bought(("userId", "u1")),
        bought(("userId", "u2")),
        json!({"type": "identify", "userId": "u3"}),
    ])
    .await;
    e.settle().await;
    destination(
        e,
        "late",
        json!({"kind": "webhook", "url": r.url("/late"), "secret": "s", "calls": ["identify"]}),
    )
    .await;
    let members = |calls: &[Value]| -> Vec<String> {
        let mut m: Vec<String> = calls
            .iter()
            .filter(|c| c["traits"]["buyers"] == true)
            .map(|c| c["userId"].as_str().unwrap_or_default().to_string())
            .collect();
        m.sort();
        m
    };
    e.deliver_until("the initial sync", || members(&r.accepted()).len() >= 2)
        .await;
    assert_eq!(members(&r.accepted()), ["u1", "u2"], "{:#?}", r.accepted());
    // A change after the initial sync arrives as a change.
    e.batch(vec![bought(("userId", "u3"))]).await;
    e.settle().await;
    e.deliver_until("u3's change", || members(&r.accepted()).len() >= 3)
        .await;
    assert_eq!(
        members(&r.accepted()),
        ["u1", "u2", "u3"],
        "each value once: {:#?}",
        r.accepted()
    );
}

/// Account-level audiences and computed traits (Segment's): an account
/// is in "any buyer" when one of its users is in the user audience, in
/// "all buyers" when every one is; its computed trait counts all its
/// users' events; its own traits count too. The account pass runs with
/// the lookback run; each user of an account that enters gets the
/// audience with `context.groupId`.
async fn account_audiences_reach_each_user_with_the_group_id(e: &impl Delivering) {
    let r = Receiver::start().await;
    buyers(e).await;
    let accounts = |condition: Value| json!({"collection": "accounts", "condition": condition});
    let any_buyer = e
        .define(
            "audiences",
            "any_buyer",
            accounts(json!({"users": {"any": {"audience": "buyers"}}})),
        )
        .await;
    assert_eq!(any_buyer["collection"], "accounts", "{any_buyer}");
    assert!(any_buyer["id"].as_str().unwrap().starts_with("aud_"));
    // A users condition only in account audiences, named in the error.
    let (status, refused) = e
        .admin(
            "PUT",
            "/audiences/bad",
            Some(&json!({"condition": {"users": {"any": {"audience": "buyers"}}}})),
        )
        .await;
    assert_eq!(status, 400, "{refused}");
    assert!(refused.to_string().contains("condition.users"), "{refused}");
    e.define(
        "audiences",
        "all_buyers",
        accounts(json!({"users": {"all": {"audience": "buyers"}}})),
    )
    .await;
    e.define(
        "audiences",
        "big_spenders",
        accounts(json!({"and": [
            {"trait": {"name": "plan", "op": "=", "value": "enterprise"}},
            {"performed": {"event": "Order Completed", "count": {"at_least": 2}}}]})),
    )
    .await;
    e.define(
        "computed_traits",
        "account_orders",
        json!({"collection": "accounts", "type": "event_counter", "event": "Order Completed"}),
    )
    .await;
    destination(
        e,
        "crm",
        json!({"kind": "webhook", "url": r.url("/crm"), "secret": "s",
               "calls": ["identify", "track"], "keys": ["any_buyer", "all_buyers"]}),
    )
    .await;
    // (Its initial sync, of no values yet, is done first.)
    let start = Instant::now();
    while e.admin("GET", "/destinations/crm", None).await.1["initial_sync"] != "done" {
        assert!(start.elapsed() < WAIT, "the initial sync");
        e.drain().await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let group = |user: &str, account: &str, traits: Value| json!({"type": "group", "userId": user, "groupId": account, "traits": traits});
    e.batch(vec![
        group("ua", "acme", json!({"plan": "enterprise", "name": "Acme"})),
        group("ub", "acme", json!({})),
        group("uc", "solo", json!({"plan": "free"})),
        bought(("userId", "ua")),
        bought(("userId", "uc")),
    ])
    .await;
    e.settle().await;
    let (status, run) = e.admin("POST", "/lookback/run", Some(&json!({}))).await;
    assert_eq!(status, 200, "{run}");
    assert_eq!(run["accounts_computed"], 2, "{run}");
    let traits = |group: &'static str| async move {
        let (status, body) = e.account_api(group, "traits", "").await;
        assert_eq!(status, 200, "{body}");
        body["traits"].clone()
    };
    let acme = traits("acme").await;
    assert_eq!(acme["name"], "Acme", "{acme}");
    assert_eq!(acme["any_buyer"], true, "{acme}");
    assert!(acme.get("all_buyers").is_none(), "never a member: {acme}");
    assert_eq!(acme["account_orders"], 1, "{acme}");
    assert!(acme.get("big_spenders").is_none(), "{acme}");
    let solo = traits("solo").await;
    assert_eq!(
        (
            &solo["any_buyer"],
            &solo["all_buyers"],
            &solo["account_orders"]
        ),
        (&json!(true), &json!(true), &json!(1)),
        "{solo}"
    );
    let (_, only) = e.account_api("acme", "traits", "class=audience").await;
    assert_eq!(only["traits"], json!({"any_buyer": true}), "{only}");

    // Each of acme's users gets its entry, with the account's groupId.
    let entered = |calls: &[Value], key: &str, group: &str| -> Vec<String> {
        let mut users: Vec<String> = calls
            .iter()
            .filter(|c| c["event"] == "Audience Entered" && c["properties"]["audience_key"] == key)
            .filter(|c| c["context"]["groupId"] == group)
            .map(|c| c["userId"].as_str().unwrap_or_default().to_string())
            .collect();
        users.sort();
        users
    };
    e.deliver_until("acme's users enter any_buyer", || {
        entered(&r.accepted(), "any_buyer", "acme").len() == 2
    })
    .await;
    assert_eq!(entered(&r.accepted(), "any_buyer", "acme"), ["ua", "ub"]);
    let calls = r.accepted();
    let identify = calls
        .iter()
        .find(|c| c["type"] == "identify" && c["traits"]["any_buyer"] == true)
        .expect("an identify with the membership");
    assert_eq!(identify["context"]["groupId"], "acme", "{identify}");
    assert_eq!(
        identify["context"]["personas"]["computation_class"],
        "audience"
    );

    // A destination added now gets the accounts' current values in its
    // initial sync, to each of their users.
    let late = Receiver::start().await;
    destination(
        e,
        "late",
        json!({"kind": "webhook", "url": late.url("/late"), "secret": "s",
               "calls": ["identify"], "keys": ["any_buyer"]}),
    )
    .await;
    let members = |calls: &[Value]| -> Vec<String> {
        let mut m: Vec<String> = (calls.iter())
            .filter(|c| c["traits"]["any_buyer"] == true)
            .map(|c| {
                format!(
                    "{}@{}",
                    c["userId"].as_str().unwrap_or("?"),
                    c["context"]["groupId"]
                )
            })
            .collect();
        m.sort();
        m
    };
    e.deliver_until("the late destination's initial sync", || {
        members(&late.accepted()).len() >= 3
    })
    .await;
    assert_eq!(
        members(&late.accepted()),
        ["ua@\"acme\"", "ub@\"acme\"", "uc@\"solo\""],
        "{:#?}",
        late.accepted()
    );

    // ub buys too: acme's users are all buyers now, and it has two orders.
    e.batch(vec![bought(("userId", "ub"))]).await;
    e.settle().await;
    // Four passes race: each account's values are written conditionally
    // on the version read, so each change is logged once.
    let body = json!({});
    let run = || e.admin("POST", "/lookback/run", Some(&body));
    let runs = tokio::join!(run(), run(), run(), run());
    let runs = [runs.0, runs.1, runs.2, runs.3];
    assert!(runs.iter().all(|(status, _)| *status == 200), "{runs:?}");
    let logged: u64 = (runs.iter())
        .map(|(_, r)| r["account_changes"].as_u64().unwrap())
        .sum();
    assert_eq!(
        logged, 3,
        "all_buyers, account_orders, big_spenders once: {runs:?}"
    );
    let acme = traits("acme").await;
    assert_eq!(
        (
            &acme["all_buyers"],
            &acme["account_orders"],
            &acme["big_spenders"]
        ),
        (&json!(true), &json!(2), &json!(true)),
        "{acme}"
    );
    e.deliver_until("acme's users enter all_buyers", || {
        entered(&r.accepted(), "all_buyers", "acme").len() == 2
    })
    .await;
    wait_status(e, "crm", "nothing left to deliver", quiet).await;
    let calls = r.accepted();
    assert_eq!(
        entered(&calls, "any_buyer", "acme").len(),
        2,
        "once each: {calls:#?}"
    );
    // The change log names the account, not a profile.
    let changes = e.changes(0).await;
    let all_buyers: Vec<&Value> = changes
        .iter()
        .filter(|c| c["key"] == "all_buyers" && c["group_id"] == "acme")
        .collect();
    assert_eq!(all_buyers.len(), 1, "{changes:#?}");
    assert_eq!(all_buyers[0]["profile_id"], Value::Null);
    // A run with nothing new changes nothing.
    let (_, run) = e.admin("POST", "/lookback/run", Some(&json!({}))).await;
    assert_eq!(run["account_changes"], 0, "{run}");
}

crate::common::on_both_stores!(
    "fan_out_contract",
    crate::common::Server::start_for_local_receivers();
    changes_and_one_alias_reach_a_signed_webhook,
    failed_deliveries_are_retried_until_they_land,
    a_new_destination_gets_the_current_values_then_changes,
    a_member_s_new_email_gets_the_current_membership,
    account_audiences_reach_each_user_with_the_group_id,
);
