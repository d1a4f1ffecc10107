//! RudderStack's SDKs (a Segment alternative), pointed at Kindred
//! unchanged, gzip on: identify, track and group calls come back as
//! traits, events and links. RudderStack's Python SDK sends an
//! identify's traits only in `context.traits`; they are the profile's
//! traits all the same.

use crate::common::clients::{node_with, python_with, run};
use crate::common::Server;
use serde_json::{json, Value};

async fn read_back(s: &Server, user: &str, email: &str, plan: &str, account: &str) {
    s.settle().await;
    let traits = s.profile(&format!("email:{email}"), "traits").await;
    assert_eq!(traits.status, 200, "{}", traits.body);
    assert_eq!(traits.body["traits"]["plan"], plan, "{}", traits.body);
    let events = s
        .profile(&format!("user_id:{user}"), "events?sort=asc")
        .await
        .body;
    // The SDKs stamp each call with the device's clock: the order within
    // a millisecond is not theirs to promise, so compare as a set.
    let mut calls: Vec<(&str, Option<&str>)> = events["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["type"].as_str().unwrap(), e["event"].as_str()))
        .collect();
    calls.sort();
    assert_eq!(
        calls,
        [
            ("group", None),
            ("identify", None),
            ("track", Some("Order Completed")),
        ]
    );
    let links = s.profile(&format!("user_id:{user}"), "links").await.body;
    assert_eq!(links["data"][0]["external_ids"][0]["id"], account);
    let ids = s
        .profile(&format!("user_id:{user}"), "external_ids")
        .await
        .body;
    let types: Vec<&Value> = ids["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| &i["type"])
        .collect();
    for kind in ["user_id", "anonymous_id", "email"] {
        assert!(types.contains(&&json!(kind)), "{kind}: {ids}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rudderstack_python_sdk_works_unchanged() {
    let Some(python) = python_with("rudderstack.analytics") else {
        return;
    };
    let s = Server::start().await;
    let args = vec![s.space.write_key.clone(), s.base.clone()];
    run(python, "python/send_with_rudderstack_client.py", args).await;
    read_back(&s, "rs-user", "rs.user@example.com", "scale", "acct-rs").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rudderstack_node_sdk_works_unchanged() {
    let Some(node) = node_with("@rudderstack/rudder-sdk-node") else {
        return;
    };
    let s = Server::start().await;
    let args = vec![s.space.write_key.clone(), s.base.clone()];
    run(node, "node/send_with_rudderstack.cjs", args).await;
    read_back(
        &s,
        "node-user",
        "node.user@example.com",
        "team",
        "acct-node",
    )
    .await;
}
