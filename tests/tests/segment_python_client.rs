//! Segment's real Python client, pointed at Kindred with `host=`, works
//! unchanged: its events show up in the Profile API.

use crate::common::clients::{python_with, run};
use crate::common::Server;
use reqwest::StatusCode;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_segment_python_client_works_unchanged() {
    let Some(python) = python_with("segment.analytics") else {
        return;
    };
    let s = Server::start().await;
    let args = vec![s.space.write_key.clone(), s.base.clone()];
    run(python, "python/send_with_segment_client.py", args).await;
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
    let ids = &users["data"][0]["external_ids"];
    assert!(
        ids.as_array()
            .unwrap()
            .iter()
            .any(|i| i["type"] == "user_id" && i["id"] == "py-user"),
        "{users}"
    );
    // The alias linked the second anonymous id to the user.
    let via_alias = s.profile("anonymous_id:py-anon-2", "metadata").await;
    assert_eq!(via_alias.status, StatusCode::OK);
}
