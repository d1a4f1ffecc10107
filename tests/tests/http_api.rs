//! Scenario tests through HTTP: the Tracking API, identity resolution as a
//! user sees it, and every Profile API parameter.

use std::io::Write;

use crate::common::Server;
use reqwest::StatusCode;
use serde_json::{json, Value};

fn ids_of(reply: &Value) -> Vec<(String, String)> {
    let mut ids: Vec<(String, String)> = reply["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["type"].as_str().unwrap().to_string(),
                e["id"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    ids.sort();
    ids
}

fn pair(k: &str, v: &str) -> (String, String) {
    (k.to_string(), v.to_string())
}

async fn profile_id(s: &Server, lookup: &str) -> String {
    let r = s.profile(lookup, "metadata").await;
    assert_eq!(r.status, StatusCode::OK, "{lookup}: {}", r.body);
    r.body["metadata"]["profile_id"]
        .as_str()
        .unwrap()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anonymous_id_not_reset_between_two_users_keeps_two_profiles() {
    let s = Server::start().await;
    s.track("/v1/page", &json!({"anonymousId": "a1", "name": "Home"}))
        .await;
    s.track(
        "/v1/identify",
        &json!({"anonymousId": "a1", "userId": "u1"}),
    )
    .await;
    s.track(
        "/v1/identify",
        &json!({"anonymousId": "a1", "userId": "u2"}),
    )
    .await;
    s.settle().await;
    let p1 = profile_id(&s, "user_id:u1").await;
    let p2 = profile_id(&s, "user_id:u2").await;
    assert_ne!(p1, p2, "u2 must not be merged with u1");
    assert_eq!(
        profile_id(&s, "anonymous_id:a1").await,
        p1,
        "a1 stays with the first"
    );
    let ids = ids_of(&s.profile("user_id:u2", "external_ids").await.body);
    assert_eq!(ids, vec![pair("user_id", "u2")]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_email_from_a_second_device_merges_and_newest_traits_win() {
    let s = Server::start().await;
    s.track(
        "/v1/identify",
        &json!({"anonymousId": "laptop", "userId": "u1",
        "traits": {"email": "Jo@Example.com", "plan": "free", "city": "Oslo"},
        "timestamp": "2026-03-01T10:00:00Z"}),
    )
    .await;
    s.track(
        "/v1/identify",
        &json!({"anonymousId": "phone",
        "traits": {"plan": "pro"}, "timestamp": "2026-03-02T10:00:00Z"}),
    )
    .await;
    s.track(
        "/v1/track",
        &json!({"anonymousId": "phone", "event": "Opened App",
        "timestamp": "2026-03-02T10:01:00Z"}),
    )
    .await;
    s.settle().await;
    let laptop = profile_id(&s, "anonymous_id:laptop").await;
    let phone = profile_id(&s, "anonymous_id:phone").await;
    assert_ne!(laptop, phone);
    // The phone identifies with the same email (different case): merge.
    s.track(
        "/v1/identify",
        &json!({"anonymousId": "phone",
        "traits": {"email": "jo@example.com "}, "timestamp": "2026-03-03T10:00:00Z"}),
    )
    .await;
    s.settle().await;
    assert_eq!(
        profile_id(&s, "anonymous_id:phone").await,
        laptop,
        "the older profile is the parent"
    );
    assert_eq!(
        profile_id(&s, &format!("profile_id:{phone}")).await,
        laptop,
        "merged ids resolve"
    );
    let traits = s.profile("email:JO@EXAMPLE.COM", "traits").await;
    assert_eq!(traits.body["traits"]["plan"], "pro", "newest value wins");
    assert_eq!(traits.body["traits"]["city"], "Oslo");
    let events = s.profile("user_id:u1", "events?limit=100").await;
    assert_eq!(
        events.body["data"].as_array().unwrap().len(),
        4,
        "events of both devices"
    );
    let merges = s.profile("user_id:u1", "merges").await;
    assert_eq!(merges.body["data"][0]["parent_id"], laptop.as_str());
    assert_eq!(merges.body["data"][0]["child_id"], phone.as_str());
    assert!(merges.body["data"][0]["message_id"].is_string());
    let meta = s.profile("user_id:u1", "metadata").await;
    assert_eq!(meta.body["metadata"]["merged_profile_ids"], json!([phone]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocked_values_do_not_merge_and_settings_can_block_more() {
    let s = Server::start().await;
    s.track(
        "/v1/identify",
        &json!({"userId": "u1", "anonymousId": "undefined"}),
    )
    .await;
    s.track(
        "/v1/identify",
        &json!({"userId": "u2", "anonymousId": "undefined"}),
    )
    .await;
    s.track(
        "/v1/identify",
        &json!({"userId": "u3", "traits": {"email": "none"}}),
    )
    .await;
    s.settle().await;
    assert_ne!(
        profile_id(&s, "user_id:u1").await,
        profile_id(&s, "user_id:u2").await
    );
    assert_eq!(
        s.profile("anonymous_id:undefined", "metadata").await.status,
        StatusCode::NOT_FOUND
    );

    // Block team addresses, then two users sharing one stay apart.
    let path = "/v1/spaces/default/identity_settings";
    let mut settings = s.get_as(path, Some(&s.space.admin_token)).await.body;
    assert_eq!(settings["types"]["user_id"]["priority"], 1);
    settings["blocked"]
        .as_array_mut()
        .unwrap()
        .push(json!({"value": "^team@", "regex": true, "types": ["email"]}));
    settings["types"]["anonymous_id"]["limit"] = json!({"count": 10, "frequency": "daily"});
    let put = s.put_as(path, &settings, &s.space.admin_token).await;
    assert_eq!(put.status, StatusCode::OK, "{}", put.body);
    s.track(
        "/v1/identify",
        &json!({"anonymousId": "x1", "traits": {"email": "team@acme.com"}}),
    )
    .await;
    s.track(
        "/v1/identify",
        &json!({"anonymousId": "x2", "traits": {"email": "team@acme.com"}}),
    )
    .await;
    s.settle().await;
    assert_ne!(
        profile_id(&s, "anonymous_id:x1").await,
        profile_id(&s, "anonymous_id:x2").await
    );
    let got = s.get_as(path, Some(&s.space.admin_token)).await.body;
    assert_eq!(got["types"]["anonymous_id"]["limit"]["frequency"], "daily");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_settings_are_validated_and_admin_only() {
    let s = Server::start().await;
    let path = "/v1/spaces/default/identity_settings";
    let bad = s.put_as(path, &json!({"types": {"email": {"priority": "high", "limit": {"count": 1, "frequency": "ever"}}}, "blocked": []}), &s.space.admin_token).await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    assert_eq!(bad.body["error"]["code"], "invalid_request_error");
    assert!(
        bad.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("types.email.priority"),
        "{}",
        bad.body
    );
    let bad = s
        .put_as(
            path,
            &json!({"types": {}, "blocked": [{"value": "(", "regex": true}]}),
            &s.space.admin_token,
        )
        .await;
    assert!(
        bad.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("blocked[0].value"),
        "{}",
        bad.body
    );
    let bad = s.put_as(path, &json!({"types": {"email": {"priority": 1, "limit": {"count": 1, "frequency": "hourly"}}}, "blocked": []}), &s.space.admin_token).await;
    assert!(
        bad.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("types.email.limit.frequency"),
        "{}",
        bad.body
    );
    // The access token and the write key are not admin tokens.
    assert_eq!(
        s.get_as(path, Some(&s.space.access_token)).await.status,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        s.get_as(path, Some(&s.space.write_key)).await.status,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(s.get_as(path, None).await.status, StatusCode::UNAUTHORIZED);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_profile_api_parameter() {
    let s = Server::start().await;
    let mut batch = vec![
        json!({"type": "identify", "userId": "p1", "anonymousId": "pa",
        "traits": {"email": "p1@x.com", "a": 1, "b": 2, "c": 3, "gone": "soon"},
        "timestamp": "2026-01-01T00:00:00Z"}),
    ];
    for (i, name) in ["Viewed", "Added", "Viewed", "Bought", "Viewed"]
        .iter()
        .enumerate()
    {
        batch.push(json!({"type": "track", "userId": "p1", "event": name,
            "timestamp": format!("2026-01-0{}T00:00:00Z", i + 2), "messageId": format!("ev{i}")}));
    }
    batch.push(
        json!({"type": "identify", "userId": "p1", "traits": {"gone": null},
        "timestamp": "2026-01-09T00:00:00Z"}),
    );
    batch.push(
        json!({"type": "group", "userId": "p1", "groupId": "acct-1", "traits": {"name": "Acme"}}),
    );
    let r = s.track("/v1/batch", &json!({"batch": batch})).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    s.settle().await;

    // traits: include, limit + next, verbose, class.
    let all = s.profile("user_id:p1", "traits").await.body;
    assert_eq!(
        all["traits"],
        json!({"a": 1, "b": 2, "c": 3, "email": "p1@x.com"}),
        "null removed the trait"
    );
    assert_eq!(all["cursor"]["has_more"], false);
    let some = s.profile("user_id:p1", "traits?include=a,c").await.body;
    assert_eq!(some["traits"], json!({"a": 1, "c": 3}));
    let first = s.profile("user_id:p1", "traits?limit=2").await.body;
    assert_eq!(first["traits"], json!({"a": 1, "b": 2}));
    assert_eq!(first["cursor"]["has_more"], true);
    assert_eq!(first["cursor"]["limit"], 2);
    let next = first["cursor"]["next"].as_str().unwrap();
    let second = s
        .profile("user_id:p1", &format!("traits?limit=2&next={next}"))
        .await
        .body;
    assert_eq!(second["traits"], json!({"c": 3, "email": "p1@x.com"}));
    assert_eq!(second["cursor"]["has_more"], false);
    let verbose = s
        .profile("user_id:p1", "traits?include=a&verbose=true")
        .await
        .body;
    assert_eq!(verbose["traits"]["a"]["value"], 1);
    assert_eq!(
        verbose["traits"]["a"]["updated_at"],
        "2026-01-01T00:00:00.000Z"
    );
    assert!(verbose["traits"]["a"]["source_id"]
        .as_str()
        .unwrap()
        .starts_with("src_"));
    let audiences = s.profile("user_id:p1", "traits?class=audience").await.body;
    assert_eq!(audiences["traits"], json!({}));
    // Bad parameters: profile_api_contract::errors_are_segment_s.

    // external_ids: include, limit, next.
    let ext = s.profile("user_id:p1", "external_ids").await.body;
    assert_eq!(
        ids_of(&ext),
        vec![
            pair("anonymous_id", "pa"),
            pair("email", "p1@x.com"),
            pair("user_id", "p1")
        ]
    );
    let e0 = &ext["data"][0];
    for field in [
        "id",
        "type",
        "source_id",
        "collection",
        "created_at",
        "encoding",
        "first_message_id",
    ] {
        assert!(e0.get(field).is_some(), "external id lacks {field}");
    }
    let only_email = s
        .profile("user_id:p1", "external_ids?include=email")
        .await
        .body;
    assert_eq!(ids_of(&only_email), vec![pair("email", "p1@x.com")]);
    let paged = s.profile("user_id:p1", "external_ids?limit=2").await.body;
    assert_eq!(paged["data"].as_array().unwrap().len(), 2);
    let next = paged["cursor"]["next"].as_str().unwrap();
    let rest = s
        .profile("user_id:p1", &format!("external_ids?limit=2&next={next}"))
        .await
        .body;
    assert_eq!(rest["data"].as_array().unwrap().len(), 1);
    assert_eq!(rest["cursor"]["has_more"], false);

    // events: sort, limit + next, include, exclude, start, end.
    let names = |v: &Value| -> Vec<String> {
        v["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                e["event"]
                    .as_str()
                    .unwrap_or(e["type"].as_str().unwrap())
                    .to_string()
            })
            .collect()
    };
    let desc = s
        .profile("user_id:p1", "events?include=Viewed,Added,Bought")
        .await
        .body;
    assert_eq!(
        names(&desc),
        ["Viewed", "Bought", "Viewed", "Added", "Viewed"]
    );
    let asc = s
        .profile(
            "user_id:p1",
            "events?include=Viewed,Added,Bought&sort=asc&limit=2",
        )
        .await
        .body;
    assert_eq!(names(&asc), ["Viewed", "Added"]);
    let next = asc["cursor"]["next"].as_str().unwrap();
    let asc2 = s
        .profile(
            "user_id:p1",
            &format!("events?include=Viewed,Added,Bought&sort=asc&limit=2&next={next}"),
        )
        .await
        .body;
    assert_eq!(names(&asc2), ["Viewed", "Bought"]);
    let excl = s
        .profile("user_id:p1", "events?exclude=Viewed&sort=asc")
        .await
        .body;
    assert_eq!(
        names(&excl),
        ["identify", "Added", "Bought", "identify", "group"]
    );
    let window = s
        .profile(
            "user_id:p1",
            "events?start=2026-01-03T00:00:00Z&end=2026-01-05T00:00:00Z&sort=asc",
        )
        .await
        .body;
    assert_eq!(names(&window), ["Added", "Viewed"]);
    for bad in [
        "events?sort=up",
        "events?start=yesterday",
        "events?next=zzz",
    ] {
        assert_eq!(
            s.profile("user_id:p1", bad).await.status,
            StatusCode::BAD_REQUEST,
            "{bad}"
        );
    }

    // metadata, links, the older namespaces prefix.
    let meta = s.profile("user_id:p1", "metadata").await.body;
    for field in [
        "created_at",
        "updated_at",
        "first_message_id",
        "last_message_id",
    ] {
        assert!(
            meta["metadata"][field].is_string(),
            "metadata lacks {field}"
        );
    }
    let links = s.profile("user_id:p1", "links").await.body;
    assert_eq!(links["data"][0]["to_collection"], "accounts");
    assert_eq!(links["data"][0]["external_ids"][0]["id"], "acct-1");
    let old = s
        .get_as(
            "/v1/namespaces/default/collections/users/profiles/email:P1@X.COM/traits?include=a",
            Some(&s.space.access_token),
        )
        .await;
    assert_eq!(old.body["traits"], json!({"a": 1}));

    // Unknown profiles, resources and malformed lookups.
    assert_eq!(
        s.profile("user_id:nobody", "traits").await.body["error"]["code"],
        "not_found"
    );
    assert_eq!(
        s.profile("user_id:p1", "nonsense").await.status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        s.profile("no-colon", "traits").await.status,
        StatusCode::BAD_REQUEST
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authentication_failures_and_space_isolation() {
    let s = Server::start().await;
    let event = json!({"userId": "u", "event": "E"});
    let none = s.track_as("/v1/track", &event, None).await;
    assert_eq!(none.status, StatusCode::UNAUTHORIZED);
    assert_eq!(none.body["error"]["code"], "authentication_error");
    let wrong = s
        .track_as("/v1/track", &event, Some("wk_AAAAAAAAAAAAnotavalidkey"))
        .await;
    assert_eq!(wrong.status, StatusCode::UNAUTHORIZED);
    // The access token is not a write key.
    assert_eq!(
        s.track_as("/v1/track", &event, Some(&s.space.access_token))
            .await
            .status,
        StatusCode::UNAUTHORIZED
    );
    // writeKey in the body works (and is not stored with the event).
    let body_key = json!({"userId": "u", "event": "E", "writeKey": s.space.write_key});
    assert_eq!(
        s.track_as("/v1/track", &body_key, None).await.status,
        StatusCode::OK
    );
    s.settle().await;
    let events = s.profile("user_id:u", "events").await.body;
    assert!(events["data"][0].get("writeKey").is_none());

    // A second space: its token never reads the first space's data.
    let other = s.running.local.store.create_space("other").unwrap();
    let path = "/v1/spaces/default/collections/users/profiles/user_id:u/traits";
    let cross = s.get_as(path, Some(&other.access_token)).await;
    assert_eq!(cross.status, StatusCode::UNAUTHORIZED);
    assert!(cross.body.get("traits").is_none());
    let own = s
        .get_as(
            "/v1/spaces/other/collections/users/profiles/user_id:u/traits",
            Some(&other.access_token),
        )
        .await;
    assert_eq!(
        own.status,
        StatusCode::NOT_FOUND,
        "the other space has no such profile"
    );
    assert_eq!(
        s.get_as(path, Some("at_AAAAAAAAAAAAforged")).await.status,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(s.get_as(path, None).await.status, StatusCode::UNAUTHORIZED);
    // Every response, errors included, carries a Request-Id.
    assert!(cross
        .headers
        .get("request-id")
        .unwrap()
        .to_str()
        .unwrap()
        .starts_with("req_"));
    assert!(none.headers.contains_key("request-id"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_clear_errors_and_loses_nothing_else() {
    let s = Server::start().await;
    let malformed = s
        .post_raw(
            "/v1/track",
            b"{not json".to_vec(),
            &[("content-type", "application/json")],
        )
        .await;
    assert_eq!(malformed.status, StatusCode::BAD_REQUEST);
    assert_eq!(malformed.body["error"]["code"], "invalid_request_error");
    assert!(malformed.body["error"]["message"].is_string());

    let big = "x".repeat(33 * 1024);
    let oversize = s
        .track(
            "/v1/track",
            &json!({"userId": "u", "event": "E", "properties": {"blob": big}}),
        )
        .await;
    assert_eq!(oversize.status, StatusCode::BAD_REQUEST);
    assert!(oversize.body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("32 KB"));

    let huge: Vec<Value> = (0..20)
        .map(|i| {
            json!({"type": "track", "userId": "u", "event": "E",
        "messageId": format!("h{i}"), "properties": {"blob": "y".repeat(30 * 1024)}})
        })
        .collect();
    let too_big = s.track("/v1/batch", &json!({"batch": huge})).await;
    assert_eq!(too_big.status, StatusCode::BAD_REQUEST);
    assert!(too_big.body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("500 KB"));

    let missing = s.track("/v1/track", &json!({"event": "E"})).await;
    assert_eq!(missing.status, StatusCode::BAD_REQUEST);
    assert!(missing.body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("missing_identity"));

    // One bad event in a batch: the good ones are accepted, the bad one listed.
    let batch = json!({"batch": [
        {"type": "track", "userId": "ok1", "event": "Good", "messageId": "g1"},
        {"type": "track", "event": "No identity", "messageId": "bad1"},
        {"type": "track", "userId": "ok2", "event": "Big", "properties": {"blob": big}},
        {"type": "identify", "userId": "ok3", "messageId": "g2"}
    ]});
    let r = s.track("/v1/batch", &batch).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.body["accepted"], 2);
    let rejected = r.body["rejected"].as_array().unwrap();
    assert_eq!(rejected.len(), 2);
    assert_eq!(rejected[0]["index"], 1);
    assert_eq!(rejected[0]["code"], "missing_identity");
    assert_eq!(rejected[1]["index"], 2);
    assert_eq!(rejected[1]["code"], "event_too_large");
    s.settle().await;
    assert_eq!(
        s.profile("user_id:ok1", "events").await.body["data"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    assert_eq!(
        s.profile("user_id:ok3", "events").await.body["data"]
            .as_array()
            .unwrap()
            .len(),
        1
    );

    let all_bad = s
        .track(
            "/v1/batch",
            &json!({"batch": [{"type": "track", "event": "E"}]}),
        )
        .await;
    assert_eq!(all_bad.status, StatusCode::BAD_REQUEST);
    assert_eq!(all_bad.body["rejected"][0]["index"], 0);
    let no_batch = s.track("/v1/batch", &json!({"events": []})).await;
    assert_eq!(no_batch.status, StatusCode::BAD_REQUEST);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_ids_deduplicate_and_gzip_bodies_are_accepted() {
    let s = Server::start().await;
    let event = json!({"userId": "d", "event": "Once", "messageId": "dup-1"});
    for _ in 0..3 {
        assert_eq!(s.track("/v1/track", &event).await.status, StatusCode::OK);
    }
    let batch = json!({"batch": [{"type": "track", "userId": "d", "event": "Once", "messageId": "dup-1"},
                                 {"type": "track", "userId": "d", "event": "Twice", "messageId": "dup-2"}]});
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(batch.to_string().as_bytes()).unwrap();
    let r = s
        .post_raw(
            "/v1/batch",
            gz.finish().unwrap(),
            &[
                ("content-encoding", "gzip"),
                ("content-type", "application/json"),
            ],
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let broken = s
        .post_raw(
            "/v1/batch",
            b"not gzip".to_vec(),
            &[("content-encoding", "gzip")],
        )
        .await;
    assert_eq!(broken.status, StatusCode::BAD_REQUEST);
    s.settle().await;
    let events = s.profile("user_id:d", "events").await.body;
    let ids: Vec<&str> = events["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["message_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 2, "{ids:?}");
    assert!(ids.contains(&"dup-1") && ids.contains(&"dup-2"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_space_over_its_ingest_rate_gets_429_with_retry_after() {
    let s = Server::start_with_rate(10).await;
    let batch = |n: usize| -> Value {
        let events: Vec<Value> = (0..10)
            .map(|i| json!({"type": "track", "userId": "r", "event": "E", "messageId": format!("r{n}-{i}")}))
            .collect();
        json!({ "batch": events })
    };
    // 100 events at 10 per second: they could all pass only if the ten
    // requests took nine seconds, so a 429 comes whatever the scheduling.
    let mut limited = None;
    for n in 0..10 {
        let r = s.track("/v1/batch", &batch(n)).await;
        if r.status != StatusCode::OK {
            limited = Some(r);
            break;
        }
    }
    let limited = limited.expect("100 events at once go over 10 per second");
    assert_eq!(limited.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(limited.body["error"]["code"], "rate_limit_error");
    let retry: u64 = limited
        .headers
        .get("retry-after")
        .unwrap()
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_client_clock_skew() {
    let s = Server::start().await;
    assert_eq!(s.get_as("/", None).await.status, StatusCode::OK);
    assert_eq!(s.get_as("/healthz", None).await.status, StatusCode::OK);
    assert_eq!(
        s.get_as("/nope", None).await.body["error"]["code"],
        "not_found"
    );
    // No timestamp: receivedAt - (sentAt - originalTimestamp).
    let r = s.track("/v1/batch", &json!({"sentAt": "2020-01-01T00:00:10Z", "batch": [
        {"type": "track", "userId": "skew", "event": "E", "originalTimestamp": "2020-01-01T00:00:00Z"}]})).await;
    assert_eq!(r.status, StatusCode::OK);
    s.settle().await;
    let e = &s.profile("user_id:skew", "events").await.body["data"][0];
    let ts = kindred_domain::event::parse_time(e["timestamp"].as_str().unwrap()).unwrap();
    let received = kindred_domain::event::parse_time(e["received_at"].as_str().unwrap()).unwrap();
    assert_eq!(received - ts, 10_000);
}
