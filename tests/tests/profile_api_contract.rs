//! Golden tests of the Profile API's response shapes against the examples
//! of Segment's Profile API documentation (segmentio/segment-docs,
//! `src/unify/profile-api.md`), on `kindred serve` and on the AWS
//! functions over DynamoDB: every documented field is there with the
//! documented type and nullability, the only other fields are Kindred's
//! documented additions, cursors end with `"next": ""`, and errors carry
//! Segment's codes and messages.

use std::collections::BTreeSet;

use serde_json::{json, Value};

use crate::compute_contract::Engine;

/// Segment's documented example of each resource (abridged to one item).
fn documented(resource: &str) -> Value {
    match resource {
        "traits" => json!({
            "traits": {"first_name": "Bob"},
            "cursor": {"url": "/v1/spaces/x/collections/users/profiles/use_1/traits",
                       "has_more": false, "next": "", "limit": 10}
        }),
        "external_ids" => json!({
            "data": [{"source_id": "GFu4AJc2bE", "collection": "users",
                      "id": "1d1cd931", "type": "cross_domain_id",
                      "created_at": "2017-11-30T06:05:01.40468Z", "encoding": "none",
                      "first_message_id": "ajs-0af8"}],
            "cursor": {"url": "/x", "has_more": true, "next": "map_0vK", "limit": 10}
        }),
        "events" => json!({
            "data": [{
                "external_ids": [{"collection": "users", "type": "user_id",
                                  "id": "c0HN02fNe1", "encoding": "none"}],
                "context": {"ip": "73.92.233.78"},
                "type": "track", "message_id": "ajs-1a60", "source_id": "CRx5M9uk2p",
                "timestamp": "2018-01-05T00:16:35.663Z", "properties": {"path": "/docs"},
                "event": "Page Viewed", "related": {"users": "use_RkjG"}
            }],
            "cursor": {"url": "/x", "has_more": true, "next": "MTUxMzc1", "limit": 10}
        }),
        "metadata" => json!({"metadata": {
            "created_at": "2017-10-23T00:22:42.78Z", "updated_at": "2018-01-05T00:16:36.919Z",
            "expires_at": null, "first_message_id": "ajs-32ed", "first_source_id": "GFu4AJc2bE",
            "last_message_id": "ajs-1a60", "last_source_id": "CRx5M9uk2p"
        }}),
        "links" => json!({"data": [{"to_collection": "accounts", "external_ids": [{
            "id": "ADGCJE3Y8H", "type": "group_id", "source_id": "DFAAJc2bE",
            "collection": "accounts", "created_at": "2018-10-06T03:43:26.63387Z",
            "encoding": "none"}]}]}),
        other => panic!("no documented example of {other}"),
    }
}

/// Kindred's documented additions (README, Profile API reference): the
/// fields a response may carry beyond Segment's, by path.
const ADDITIONS: &[&str] = &[
    "metadata.profile_id",
    "metadata.merged_profile_ids",
    "metadata.merges",
    "data[].added_at",
    "data[].received_at",
    "data[].client_timestamp",
    "data[].dropped_traits",
    "data[].traits",
    "data[].name",
    "data[].group_id",
    "data[].external_ids[].first_message_id",
    "cursor",
];

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// Checks `got` against the documented `doc`: same keys (less free-form
/// maps such as traits, context and properties), same types; `event` may
/// be null for calls that are not tracks.
fn same_shape(path: &str, doc: &Value, got: &Value) {
    match (doc, got) {
        (Value::Object(d), Value::Object(g)) => {
            if ["traits", "context", "properties"].contains(&path.rsplit('.').next().unwrap()) {
                return;
            }
            for (k, dv) in d {
                let gv = g
                    .get(k)
                    .unwrap_or_else(|| panic!("{path}.{k} is missing from {got}"));
                same_shape(&format!("{path}.{k}"), dv, gv);
            }
            for k in g.keys().filter(|k| !d.contains_key(*k)) {
                let field = format!("{path}.{k}");
                let field = field.trim_start_matches('.');
                assert!(
                    ADDITIONS.contains(&field),
                    "{field} is not documented: {got}"
                );
            }
        }
        (Value::Array(d), Value::Array(g)) => {
            for item in g {
                same_shape(&format!("{path}[]"), &d[0], item);
            }
        }
        (Value::String(_), Value::Null) if path.ends_with("].event") => {}
        _ => assert_eq!(kind(doc), kind(got), "{path}: {got}"),
    }
}

async fn read(e: &impl Engine, lookup: &str, resource: &str, query: &str) -> Value {
    let (status, body) = e.profile_api(lookup, resource, query).await;
    assert_eq!(status, 200, "{resource}?{query}: {body}");
    body
}

async fn golden(e: &impl Engine, resource: &str, query: &str) -> Value {
    let body = read(e, "user_id:u1", resource, query).await;
    same_shape("", &documented(resource), &body);
    body
}

async fn send_profile(e: &impl Engine) {
    let at = "2026-03-01T10:00:00.000Z";
    e.batch(vec![
        // RudderStack's SDKs send an identify's traits in context.traits only.
        json!({"type": "identify", "userId": "u1", "anonymousId": "a1", "timestamp": at,
               "messageId": "m-identify",
               "context": {"traits": {"email": "Jo@Example.com", "first_name": "Jo"}}}),
        json!({"type": "track", "userId": "u1", "event": "Page Viewed", "messageId": "m-track",
               "timestamp": "2026-03-01T10:05:00.000Z", "properties": {"path": "/docs"},
               "context": {"traits": {"crossDomainId": "xd-1"}, "ip": "73.92.233.78"}}),
        json!({"type": "group", "userId": "u1", "groupId": "g1", "messageId": "m-group",
               "timestamp": "2026-03-01T10:06:00.000Z", "traits": {"name": "Acme"}}),
        json!({"type": "page", "userId": "u1", "name": "Home", "messageId": "m-page",
               "timestamp": "2026-03-01T10:07:00.000Z"}),
    ])
    .await;
    e.settle().await;
}

async fn shapes_are_segment_s(e: &impl Engine) {
    send_profile(e).await;
    let traits = golden(e, "traits", "").await;
    assert_eq!(
        traits["traits"]["first_name"], "Jo",
        "context.traits of an identify"
    );
    assert_eq!(traits["cursor"]["next"], "");
    let verbose = golden(e, "traits", "verbose=true").await;
    let first_name = &verbose["traits"]["first_name"];
    assert_eq!(first_name["value"], "Jo");
    assert!(first_name["source_id"]
        .as_str()
        .unwrap()
        .starts_with("src_"));
    assert_eq!(first_name["updated_at"], "2026-03-01T10:00:00.000Z");

    let ids = golden(e, "external_ids", "").await;
    let types: BTreeSet<&str> = ids["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["type"].as_str().unwrap())
        .collect();
    assert_eq!(
        types,
        BTreeSet::from(["anonymous_id", "cross_domain_id", "email", "user_id"])
    );
    assert!(ids["data"][0].get("added_at").is_none(), "{ids}");
    let verbose = golden(e, "external_ids", "verbose=true").await;
    assert!(verbose["data"][0]["added_at"].is_string(), "{verbose}");

    let meta = golden(e, "metadata", "").await["metadata"].clone();
    let profile_id = meta["profile_id"].as_str().unwrap().to_string();
    assert_eq!(meta["first_message_id"], "m-identify");
    assert_eq!(meta["last_message_id"], "m-page");
    assert_eq!(meta["expires_at"], Value::Null);
    assert_eq!(meta["first_source_id"], meta["last_source_id"]);

    let links = golden(e, "links", "").await;
    assert_eq!(links["data"][0]["external_ids"][0]["id"], "g1");
    assert_eq!(links["cursor"]["next"], "");

    // Events, newest first, one per page through the opaque cursor.
    let mut seen = Vec::new();
    let mut query = "limit=1".to_string();
    loop {
        let page = golden(e, "events", &query).await;
        let item = &page["data"][0];
        assert_eq!(item["related"]["users"], profile_id.as_str());
        seen.push(item["message_id"].as_str().unwrap().to_string());
        let next = page["cursor"]["next"].as_str().unwrap();
        if page["cursor"]["has_more"] == false {
            assert_eq!(next, "");
            break;
        }
        assert!(!next.is_empty() && !next.contains('.'), "opaque: {next}");
        query = format!("limit=1&next={next}");
    }
    assert_eq!(seen, ["m-page", "m-group", "m-track", "m-identify"]);
    let tracks = golden(e, "events", "include=Page%20Viewed&sort=asc").await;
    let track = &tracks["data"][0];
    assert_eq!(tracks["data"].as_array().unwrap().len(), 1, "{tracks}");
    assert_eq!(
        (
            &track["event"],
            &track["type"],
            &track["properties"]["path"]
        ),
        (&json!("Page Viewed"), &json!("track"), &json!("/docs"))
    );
    assert_eq!(track["timestamp"], "2026-03-01T10:05:00.000Z");
    assert!(track["external_ids"].as_array().unwrap().contains(
        &json!({"collection": "users", "type": "cross_domain_id", "id": "xd-1", "encoding": "none"})
    ));
    let group = golden(
        e,
        "events",
        "start=2026-03-01T10:06:00Z&end=2026-03-01T10:07:00Z",
    )
    .await;
    assert_eq!(group["data"][0]["group_id"], "g1", "{group}");
    assert_eq!(group["data"][0]["traits"]["name"], "Acme");
    let day = golden(e, "events", "start=2026-03-02").await;
    assert_eq!(day["data"], json!([]), "a date is its midnight");
}

async fn errors_are_segment_s(e: &impl Engine) {
    send_profile(e).await;
    let (status, body) = e.profile_api("user_id:nobody", "traits", "").await;
    assert_eq!(status, 404);
    assert_eq!(
        body,
        json!({"error": {"code": "not_found", "message": "Profile was not found."}})
    );
    assert_eq!(
        read(e, "user_id:u1", "traits", "limit=200").await["cursor"]["limit"],
        200
    );
    for (resource, query, parameter) in [
        ("traits", "limit=201", "limit"),
        ("traits", "class=nope", "class"),
        ("traits", "verbose=maybe", "verbose"),
        ("events", "limit=101", "limit"),
        ("events", "sort=up", "sort"),
        ("events", "next=not-a-cursor", "next"),
        ("events", "start=soon", "start"),
        ("external_ids", "limit=0", "limit"),
        ("links", "limit=101", "limit"),
        ("metadata", "verbose=2", "verbose"),
    ] {
        let (status, body) = e.profile_api("user_id:u1", resource, query).await;
        assert_eq!(status, 400, "{resource}?{query}: {body}");
        assert_eq!(body["error"]["code"], "validation_error", "{body}");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains(&format!("`{parameter}`")), "{message}");
    }
    let (status, body) = e.profile_api("u1", "traits", "").await;
    assert_eq!(
        (status, &body["error"]["code"]),
        (400, &json!("validation_error"))
    );
}

async fn account(e: &impl Engine, group: &str, resource: &str, query: &str) -> Value {
    let (status, body) = e.account_api(group, resource, query).await;
    assert_eq!(status, 200, "{group}/{resource}?{query}: {body}");
    body
}

/// Segment's `accounts` collection: group calls make and update an
/// account (newest trait wins), a call with `context.groupId` is one of
/// its events, and the account and its users link both ways.
async fn accounts_are_served_like_segment_s(e: &impl Engine) {
    let at = |m: u32| format!("2026-03-02T10:{m:02}:00.000Z");
    e.batch(vec![
        json!({"type": "identify", "userId": "u1", "traits": {"email": "u1@acme.io"}, "timestamp": at(0)}),
        json!({"type": "group", "userId": "u1", "groupId": "g1", "messageId": "g-1", "timestamp": at(1),
               "traits": {"name": "Acme", "plan": "team"}}),
        json!({"type": "group", "userId": "u2", "groupId": "g1", "messageId": "g-2", "timestamp": at(3),
               "traits": {"plan": "enterprise"}}),
        // Older than the plan above: it does not win.
        json!({"type": "group", "userId": "u3", "groupId": "g1", "messageId": "g-3", "timestamp": at(2),
               "traits": {"plan": "free", "region": "eu"}}),
        json!({"type": "track", "userId": "u1", "event": "Seat Added", "messageId": "t-1",
               "timestamp": at(4), "context": {"groupId": "g1"}}),
        json!({"type": "group", "userId": "u1", "groupId": "g2", "messageId": "g-4", "timestamp": at(5)}),
    ])
    .await;
    e.settle().await;
    let traits = account(e, "g1", "traits", "").await;
    same_shape("", &documented("traits"), &traits);
    assert_eq!(
        traits["traits"],
        json!({"name": "Acme", "plan": "enterprise", "region": "eu"})
    );
    let verbose = account(e, "g1", "traits", "verbose=true&include=plan").await;
    assert_eq!(verbose["traits"]["plan"]["updated_at"], at(3));
    let ids = account(e, "g1", "external_ids", "").await;
    same_shape("", &documented("external_ids"), &ids);
    assert_eq!(
        (
            &ids["data"][0]["id"],
            &ids["data"][0]["type"],
            &ids["data"][0]["collection"]
        ),
        (&json!("g1"), &json!("group_id"), &json!("accounts"))
    );
    let meta = account(e, "g1", "metadata", "").await;
    same_shape("", &documented("metadata"), &meta);
    assert_eq!(
        (
            &meta["metadata"]["first_message_id"],
            &meta["metadata"]["last_message_id"]
        ),
        (&json!("g-1"), &json!("t-1"))
    );
    let events = account(e, "g1", "events", "sort=asc").await;
    let ids: Vec<&str> = events["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["message_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["g-1", "g-3", "g-2", "t-1"]);
    assert_eq!(events["data"][0]["related"], json!({"accounts": "g1"}));
    let tracks = account(e, "g1", "events", "include=Seat%20Added").await;
    assert_eq!(tracks["data"][0]["event"], "Seat Added", "{tracks}");
    // Linked both ways: the account's users, and each user's accounts.
    let links = account(e, "g1", "links", "").await;
    let users: Vec<Vec<String>> = links["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            assert_eq!(l["to_collection"], "users");
            l["external_ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|i| {
                    format!(
                        "{}:{}",
                        i["type"].as_str().unwrap(),
                        i["id"].as_str().unwrap()
                    )
                })
                .collect()
        })
        .collect();
    assert_eq!(users.len(), 3, "{links}");
    assert!(
        users
            .iter()
            .any(|u| u.contains(&"email:u1@acme.io".to_string())),
        "{links}"
    );
    let (_, of_user) = e.profile_api("user_id:u1", "links", "").await;
    let groups: Vec<&Value> = of_user["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| &l["external_ids"][0]["id"])
        .collect();
    assert_eq!(groups, [&json!("g1"), &json!("g2")]);

    // Segment's errors.
    let (status, body) = e.account_api("nope", "traits", "").await;
    assert_eq!(status, 404);
    assert_eq!(body["error"]["message"], "Profile was not found.");
    let (status, body) = e
        .collection_api("accounts", "user_id:u1", "traits", "")
        .await;
    assert_eq!(
        (status, &body["error"]["code"]),
        (400, &json!("validation_error"))
    );
    let (status, body) = e
        .collection_api("things", "group_id:g1", "traits", "")
        .await;
    assert_eq!(
        (status, &body["error"]["code"]),
        (400, &json!("validation_error"))
    );
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("`collection`"));
}

crate::common::on_both_stores!("profile_api_contract", crate::common::Server::start();
    shapes_are_segment_s, errors_are_segment_s, accounts_are_served_like_segment_s);
