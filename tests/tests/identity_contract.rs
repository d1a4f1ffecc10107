//! Identity settings that change what is extracted, on `kindred serve`
//! and on the AWS functions over DynamoDB: a custom identifier type read
//! from a trait or an event property (Segment's identity onboarding)
//! merges profiles, is limited by its own rule, and is looked up like
//! any other.

use serde_json::{json, Value};

use crate::compute_contract::Engine;

async fn profile_of(e: &impl Engine, lookup: &str) -> String {
    let (status, body) = e.profile_api(lookup, "metadata", "").await;
    assert_eq!(status, 200, "{lookup}: {body}");
    body["metadata"]["profile_id"].as_str().unwrap().to_string()
}

async fn custom_identifiers_from_traits_and_properties(e: &impl Engine) {
    let (status, mut settings) = e.admin("GET", "/identity_settings", None).await;
    assert_eq!(status, 200, "{settings}");
    // A type read from a built-in one's fields is refused, naming it.
    let mut bad = settings.clone();
    bad["types"]["user_id"]["from"] = json!(["traits.uid"]);
    let (status, body) = e.admin("PUT", "/identity_settings", Some(&bad)).await;
    assert_eq!(status, 400, "{body}");
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .starts_with("types.user_id.from"));
    bad = settings.clone();
    bad["types"]["phone"] = json!({"priority": 3, "limit": {"count": 1, "frequency": "ever"},
                                   "from": ["headers.phone"]});
    let (status, body) = e.admin("PUT", "/identity_settings", Some(&bad)).await;
    assert_eq!(status, 400, "{body}");
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .starts_with("types.phone.from[0]"));

    settings["types"]["phone"] = json!({"priority": 3, "limit": {"count": 1, "frequency": "ever"},
                                        "from": ["traits.phone", "properties.phone"]});
    let (status, body) = e.admin("PUT", "/identity_settings", Some(&settings)).await;
    assert_eq!(status, 200, "{body}");
    let (_, stored) = e.admin("GET", "/identity_settings", None).await;
    assert_eq!(
        stored["types"]["phone"]["from"],
        json!(["traits.phone", "properties.phone"])
    );

    let at = |m: i64| format!("2026-04-01T10:{m:02}:00Z");
    e.batch(vec![
        json!({"type": "identify", "anonymousId": "a1", "traits": {"phone": "4711"}, "timestamp": at(0)}),
        json!({"type": "track", "anonymousId": "a2", "event": "Signed Up",
               "properties": {"phone": 4711}, "timestamp": at(1)}),
        json!({"type": "identify", "anonymousId": "a3", "traits": {"phone": "4722"}, "timestamp": at(2)}),
    ])
    .await;
    e.settle().await;
    // The shared phone (a string once, a number once) merged a1 and a2.
    let first = profile_of(e, "phone:4711").await;
    assert_eq!(profile_of(e, "anonymous_id:a1").await, first);
    assert_eq!(profile_of(e, "anonymous_id:a2").await, first);
    let (_, ids) = e.profile_api("phone:4711", "external_ids", "").await;
    let phones: Vec<&Value> = ids["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["type"] == "phone")
        .collect();
    assert_eq!(phones.len(), 1, "{ids}");

    // a3's profile has another phone: with one phone per profile ever,
    // a3 seen with 4711 does not merge the two.
    let second = profile_of(e, "phone:4722").await;
    assert_eq!(profile_of(e, "anonymous_id:a3").await, second);
    e.batch(vec![
        json!({"type": "track", "anonymousId": "a3", "event": "Viewed",
                        "properties": {"phone": "4711"}, "timestamp": at(3)}),
    ])
    .await;
    e.settle().await;
    assert_ne!(profile_of(e, "anonymous_id:a3").await, first);
    assert_eq!(profile_of(e, "phone:4711").await, first);
    assert_eq!(profile_of(e, "phone:4722").await, second);
}

crate::common::on_both_stores!(
    "identity_contract",
    crate::common::Server::start();
    custom_identifiers_from_traits_and_properties,
);
