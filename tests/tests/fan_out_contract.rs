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

crate::common::on_both_stores!(
    "fan_out_contract",
    crate::common::Server::start_for_local_receivers();
    changes_and_one_alias_reach_a_signed_webhook,
    failed_deliveries_are_retried_until_they_land,
    a_new_destination_gets_the_current_values_then_changes,
    a_member_s_new_email_gets_the_current_membership,
);
