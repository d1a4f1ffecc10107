//! Segment's real Python client, pointed at Kindred with `host=`, works
//! unchanged: its events show up in the Profile API, its group calls make
//! accounts, and account audiences over them ("any user" and "all users")
//! reach a destination.

use std::time::{Duration, Instant};

use crate::common::clients::{python_with, run};
use crate::common::receiver::Receiver;
use crate::common::Server;
use reqwest::StatusCode;
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_segment_python_client_works_unchanged() {
    let Some(python) = python_with("segment.analytics") else {
        return;
    };
    let s = Server::start_for_local_receivers().await;
    let r = Receiver::start().await;
    // A user audience, and account audiences over it: any user of the
    // account in it, all of them.
    let define = |key: &'static str, body: Value| {
        let s = &s;
        async move {
            let reply = s
                .admin("PUT", &format!("/audiences/{key}"), Some(&body))
                .await;
            assert!(reply.status.is_success(), "{key}: {}", reply.body);
        }
    };
    define(
        "pro_users",
        json!({"condition": {"trait": {"name": "plan", "op": "=", "value": "pro"}}}),
    )
    .await;
    for (key, quantifier) in [("any_pro", "any"), ("all_pro", "all")] {
        let condition = json!({"users": {quantifier: {"audience": "pro_users"}}});
        define(
            key,
            json!({"collection": "accounts", "condition": condition}),
        )
        .await;
    }
    let reply = s
        .admin(
            "PUT",
            "/destinations/crm",
            Some(
                &json!({"kind": "webhook", "url": r.url("/crm"), "secret": "s",
                         "calls": ["track"], "keys": ["any_pro", "all_pro"]}),
            ),
        )
        .await;
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.body);
    let args = vec![s.space.write_key.clone(), s.base.clone()];
    run(python.clone(), "python/send_with_segment_client.py", args).await;
    s.settle().await;

    let traits = s.profile("email:py.user@example.com", "traits").await;
    assert_eq!(traits.status, StatusCode::OK, "{}", traits.body);
    assert_eq!(traits.body["traits"]["plan"], "pro");
    let events = s
        .profile("user_id:py-user", "events?limit=50&sort=asc")
        .await
        .body;
    let types: Vec<&str> = events["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["type"].as_str().unwrap())
        .collect();
    assert_eq!(
        types,
        ["identify", "track", "page", "screen", "group", "alias"]
    );
    assert_eq!(events["data"][1]["properties"]["revenue"], 42.5);
    let links = s.profile("user_id:py-user", "links").await.body;
    assert_eq!(links["data"][0]["external_ids"][0]["id"], "acct-py");
    // The group call made the account, in the accounts collection.
    let account = |resource: &str| {
        format!(
            "/v1/spaces/{}/collections/accounts/profiles/group_id:acct-py/{resource}",
            s.space.space_id
        )
    };
    let token = Some(s.space.access_token.as_str());
    let traits = s.get_as(&account("traits"), token).await;
    assert_eq!(traits.status, StatusCode::OK, "{}", traits.body);
    assert_eq!(traits.body["traits"]["name"], "Py Inc");
    let users = s.get_as(&account("links"), token).await.body;
    let linked = |user: &str| {
        users["data"].as_array().unwrap().iter().any(|l| {
            (l["external_ids"].as_array().unwrap().iter())
                .any(|i| i["type"] == "user_id" && i["id"] == user)
        })
    };
    assert!(linked("py-user") && linked("py-user-2"), "{users}");
    // The account pass (hourly, and with a lookback run): one of the two
    // users is on the pro plan.
    let pass = s.admin("POST", "/lookback/run", Some(&json!({}))).await;
    assert_eq!(pass.status, StatusCode::OK, "{}", pass.body);
    let traits = s.get_as(&account("traits"), token).await.body;
    assert_eq!(traits["traits"]["industry"], "software", "{traits}");
    assert_eq!(traits["traits"]["any_pro"], true, "{traits}");
    assert!(traits["traits"].get("all_pro").is_none(), "{traits}");
    let audiences = s
        .get_as(&format!("{}?class=audience", account("traits")), token)
        .await;
    assert_eq!(audiences.body["traits"], json!({"any_pro": true}));
    // Both users of the account get the entry, with its groupId.
    let entered = |key: &str| -> Vec<String> {
        let mut users: Vec<String> = (r.accepted().iter())
            .filter(|c| {
                c["event"] == "Audience Entered"
                    && c["properties"]["audience_key"] == key
                    && c["context"]["groupId"] == "acct-py"
            })
            .map(|c| c["userId"].as_str().unwrap_or_default().to_string())
            .collect();
        users.sort();
        users
    };
    let both_entered = |key: &'static str| {
        let (entered, r) = (&entered, &r);
        async move {
            let start = Instant::now();
            while entered(key).len() < 2 {
                assert!(
                    start.elapsed() < Duration::from_secs(60),
                    "{key}: {:#?}",
                    r.accepted()
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            assert_eq!(
                entered(key),
                ["py-user", "py-user-2"],
                "{:#?}",
                r.accepted()
            );
        }
    };
    both_entered("any_pro").await;
    let call = &r.accepted()[0];
    assert_eq!(call["properties"]["audience_key"], "any_pro", "{call}");
    assert_eq!(call["context"]["personas"]["computation_class"], "audience");
    assert!(entered("all_pro").is_empty(), "{:#?}", r.accepted());
    // The second user moves to the pro plan: now all users of the account
    // are, and the next pass puts it in `all_pro` too.
    let args = vec![s.space.write_key.clone(), s.base.clone(), "upgrade".into()];
    run(python.clone(), "python/send_with_segment_client.py", args).await;
    s.settle().await;
    let pass = s.admin("POST", "/lookback/run", Some(&json!({}))).await;
    assert_eq!(pass.status, StatusCode::OK, "{}", pass.body);
    let audiences = s
        .get_as(&format!("{}?class=audience", account("traits")), token)
        .await;
    assert_eq!(
        audiences.body["traits"],
        json!({"any_pro": true, "all_pro": true})
    );
    both_entered("all_pro").await;
    // The alias linked the second anonymous id to the user.
    let via_alias = s.profile("anonymous_id:py-anon-2", "metadata").await;
    assert_eq!(via_alias.status, StatusCode::OK);
}
