//! Hostile input through HTTP on `kindred serve`: the write key is public,
//! so every field of an event, its clock included, is the attacker's.

use crate::common::Server;
use kindred_domain::event::{format_millis, parse_time};
use reqwest::StatusCode;
use serde_json::{json, Value};

const HOUR: i64 = 3_600_000;

fn now_ms() -> i64 {
    kindred_store::now_millis()
}

async fn traits(s: &Server, lookup: &str) -> Value {
    let r = s.profile(lookup, "traits?limit=200").await;
    assert_eq!(r.status, StatusCode::OK, "{lookup}: {}", r.body);
    r.body["traits"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_future_timestamp_does_not_pin_a_trait() {
    let s = Server::start().await;
    let before = now_ms();
    let r = s
        .track(
            "/v1/identify",
            &json!({"userId": "u1", "traits": {"plan": "hacked"},
                    "timestamp": "3000-01-01T00:00:00Z"}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    s.settle().await;
    s.track(
        "/v1/identify",
        &json!({"userId": "u1", "traits": {"plan": "real"}}),
    )
    .await;
    s.settle().await;
    assert_eq!(traits(&s, "user_id:u1").await["plan"], "real");

    // The Profile API shows the time that was used; the client's is kept.
    let events = s.profile("user_id:u1", "events?sort=asc").await;
    let first = &events.body["data"][0];
    assert_eq!(first["client_timestamp"], "3000-01-01T00:00:00Z");
    let used = parse_time(first["timestamp"].as_str().unwrap()).unwrap();
    let received = parse_time(first["received_at"].as_str().unwrap()).unwrap();
    assert_eq!(used, received, "clamped to receivedAt");
    assert!(used >= before && used <= now_ms(), "{first}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_future_timestamp_does_not_hold_a_computed_window_open() {
    let s = Server::start().await;
    let r = s
        .admin(
            "PUT",
            "/computed_traits/recent_orders",
            Some(&json!({"type": "event_counter", "event": "Order Completed",
                         "lookback": {"hours": 1}})),
        )
        .await;
    assert!(r.status.is_success(), "{}", r.body);
    s.track(
        "/v1/track",
        &json!({"userId": "u1", "event": "Order Completed",
                "timestamp": "3000-01-01T00:00:00Z"}),
    )
    .await;
    s.settle().await;
    assert_eq!(traits(&s, "user_id:u1").await["recent_orders"], 1);
    // Two hours later the order has left the one-hour window: it was
    // counted at the time Kindred received it, not in the year 3000.
    let r = s
        .admin(
            "POST",
            "/lookback/run",
            Some(&json!({"as_of": format_millis(now_ms() + 2 * HOUR)})),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.body["profiles_enqueued"], json!(1), "{}", r.body);
    s.settle().await;
    assert_eq!(traits(&s, "user_id:u1").await["recent_orders"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn merge_protection_windows_count_on_received_time() {
    let s = Server::start().await;
    // At most one email a day.
    let mut settings = s.admin("GET", "/identity_settings", None).await.body;
    settings["types"]["email"]["limit"] = json!({"count": 1, "frequency": "daily"});
    let r = s.admin("PUT", "/identity_settings", Some(&settings)).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    // The first email claims to be three days old, the second is now: by
    // the clients' clocks they are two days apart, but Kindred received
    // both today, so the second is refused.
    let r = s
        .track(
            "/v1/batch",
            &json!({"batch": [
                {"type": "identify", "userId": "u1", "traits": {"email": "old@example.com"},
                 "timestamp": format_millis(now_ms() - 72 * HOUR)},
                {"type": "identify", "userId": "u1", "traits": {"email": "new@example.com"}}
            ]}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    s.settle().await;
    let ids = s.profile("user_id:u1", "external_ids").await.body;
    let emails: Vec<&str> = ids["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["type"] == "email")
        .map(|e| e["id"].as_str().unwrap())
        .collect();
    assert_eq!(emails, vec!["old@example.com"], "{ids}");
    // Merge protection dropped the second email from the event (SPEC 5).
    let other = s.profile("email:new@example.com", "metadata").await;
    assert_eq!(other.status, StatusCode::NOT_FOUND, "{}", other.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn times_before_2000_are_refused_per_event_and_the_rest_applied() {
    let s = Server::start().await;
    let r = s
        .track(
            "/v1/batch",
            &json!({"batch": [
                {"type": "track", "userId": "u1", "event": "Old", "timestamp": "1999-12-31T23:59:59Z"},
                {"type": "track", "userId": "u1", "event": "History", "timestamp": "2003-04-05T06:07:08Z"},
                {"type": "track", "userId": "u1", "event": "Skewed",
                 "timestamp": "2026-01-01T00:00:00Z", "sentAt": "9000-01-01T00:00:00Z"}
            ]}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.body["accepted"], 1, "{}", r.body);
    let rejected = r.body["rejected"].as_array().unwrap();
    assert_eq!(rejected.len(), 2, "{}", r.body);
    for (item, index) in rejected.iter().zip([0, 2]) {
        assert_eq!(item["index"], index);
        assert_eq!(item["code"], "invalid_timestamp");
        assert!(item["message"].as_str().unwrap().contains("2000"), "{item}");
    }
    s.settle().await;
    let events = s.profile("user_id:u1", "events").await.body;
    let data = events["data"].as_array().unwrap();
    assert_eq!(data.len(), 1, "{events}");
    assert_eq!(data[0]["event"], "History");
    assert_eq!(data[0]["timestamp"], "2003-04-05T06:07:08.000Z");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_clock_tolerance_is_a_space_setting() {
    let s = Server::start().await;
    let mut settings = s.admin("GET", "/identity_settings", None).await.body;
    assert_eq!(settings["future_tolerance_seconds"], 300, "{settings}");
    settings["future_tolerance_seconds"] = json!(7200);
    let r = s.admin("PUT", "/identity_settings", Some(&settings)).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    settings["future_tolerance_seconds"] = json!(100_000);
    let r = s.admin("PUT", "/identity_settings", Some(&settings)).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.body);
    assert!(
        r.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("future_tolerance_seconds"),
        "{}",
        r.body
    );
    let in_an_hour = format_millis(now_ms() + HOUR);
    s.track(
        "/v1/track",
        &json!({"userId": "u1", "event": "Soon", "timestamp": in_an_hour}),
    )
    .await;
    s.settle().await;
    let events = s.profile("user_id:u1", "events").await.body;
    assert_eq!(
        events["data"][0]["timestamp"],
        json!(in_an_hour),
        "{events}"
    );
}

/// A host name of this machine that resolves to a loopback address
/// (Debian and most Linux images map the machine's own name to 127.0.x.1
/// in /etc/hosts).
async fn loopback_name() -> String {
    let name = std::fs::read_to_string("/etc/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    let resolved: Vec<std::net::SocketAddr> = tokio::net::lookup_host((name.as_str(), 80))
        .await
        .map(|a| a.collect())
        .unwrap_or_default();
    assert!(
        !name.is_empty() && resolved.iter().all(|a| a.ip().is_loopback()) && !resolved.is_empty(),
        "this test needs the machine's name ({name:?}) to resolve to loopback; it resolved to {resolved:?}"
    );
    name
}

async fn define_buyers(s: &Server) {
    let r = s
        .admin(
            "PUT",
            "/audiences/buyers",
            Some(&json!({"condition": {"performed": {"event": "Order Completed"}}})),
        )
        .await;
    assert!(r.status.is_success(), "{}", r.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destinations_cannot_reach_inside_unless_the_operator_opts_in() {
    let closed = Server::start_with(1_000_000, false).await;
    let open = Server::start_with(1_000_000, true).await;
    let literals = [
        "http://127.0.0.1:9/hook",
        "http://169.254.169.254/latest/meta-data/",
        "http://10.0.0.1/hook",
        "http://[::1]:9/hook",
        "http://localhost:9/hook",
    ];
    for url in literals {
        let body = json!({"kind": "webhook", "url": url});
        let r = closed.admin("PUT", "/destinations/d", Some(&body)).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{url}: {}", r.body);
        assert_eq!(r.body["error"]["code"], "invalid_request_error");
        let message = r.body["error"]["message"].as_str().unwrap();
        assert!(message.starts_with("url: "), "{message}");
        assert!(
            message.contains("--allow-private-destinations"),
            "{message}"
        );
        let r = open.admin("PUT", "/destinations/d", Some(&body)).await;
        assert!(r.status.is_success(), "{url}: {}", r.body);
    }
    // http to a Segment-compatible host would send the write key in clear.
    let segment = json!({"kind": "segment", "host": "http://api.example.com", "write_key": "k"});
    let r = closed.admin("PUT", "/destinations/s", Some(&segment)).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.body);
    assert!(r.body["error"]["message"]
        .as_str()
        .unwrap()
        .starts_with("host: "));
    assert!(open
        .admin("PUT", "/destinations/s", Some(&segment))
        .await
        .status
        .is_success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_name_that_resolves_inside_is_refused_at_send_time() {
    let name = loopback_name().await;
    for allow in [false, true] {
        let s = Server::start_with(1_000_000, allow).await;
        let receiver = crate::common::receiver::Receiver::start().await;
        receiver.set(crate::common::receiver::Mode::Ok);
        define_buyers(&s).await;
        // The name passes the URL check: it is looked up when sending,
        // and the connection goes only to an address that was allowed.
        let url = receiver.url("/hook").replace("127.0.0.1", &name);
        let r = s
            .admin(
                "PUT",
                "/destinations/internal",
                Some(&json!({"kind": "webhook", "url": url})),
            )
            .await;
        assert!(r.status.is_success(), "{}", r.body);
        s.track(
            "/v1/track",
            &json!({"userId": "u1", "event": "Order Completed"}),
        )
        .await;
        s.settle().await;
        let start = std::time::Instant::now();
        loop {
            let st = s
                .admin("GET", "/destinations/internal/status", None)
                .await
                .body;
            if allow && st["delivered"].as_u64() >= Some(2) {
                assert_eq!(receiver.accepted().len(), 2, "{st}");
                break;
            }
            if !allow && st["dead"].as_u64() >= Some(2) {
                let message = st["last_error"]["message"].as_str().unwrap();
                assert!(message.contains("internal address"), "{st}");
                assert!(st["last_error"]["status"].is_null(), "{st}");
                assert!(
                    receiver.requests().is_empty(),
                    "nothing reached the receiver"
                );
                let dead = s
                    .admin("GET", "/destinations/internal/dead_letters", None)
                    .await;
                let letters = dead.body["data"].as_array().unwrap();
                assert_eq!(letters.len(), 2, "{}", dead.body);
                break;
            }
            assert!(
                start.elapsed() < std::time::Duration::from_secs(30),
                "allow={allow}: {st}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }
}

/// Sends a batch of one bad event between two good ones and checks the
/// bad one's rejection (code and the field named) and that both good ones
/// were applied.
async fn one_bad_in_a_batch(s: &Server, user: &str, bad: Value, field: &str) {
    let good = |n: u32| json!({"type": "track", "userId": user, "event": format!("Good {n}")});
    let r = s
        .track("/v1/batch", &json!({"batch": [good(1), bad, good(2)]}))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.body["accepted"], 2, "{}", r.body);
    let rejected = &r.body["rejected"][0];
    assert_eq!(rejected["index"], 1, "{}", r.body);
    assert_eq!(rejected["code"], "invalid_id", "{}", r.body);
    let message = rejected["message"].as_str().unwrap();
    assert!(message.starts_with(field), "{field}: {message}");
    assert!(message.contains("1024 bytes"), "{message}");
    s.settle().await;
    let events = s.profile(&format!("user_id:{user}"), "events").await.body;
    assert_eq!(events["data"].as_array().unwrap().len(), 2, "{events}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identifier_values_are_at_most_1024_bytes_of_every_type() {
    let s = Server::start().await;
    // 400 characters, 1,200 bytes: the limit counts bytes.
    let wide = "é".repeat(600);
    let long = "x".repeat(1025);
    one_bad_in_a_batch(
        &s,
        "u1",
        json!({"type": "identify", "userId": wide}),
        "userId",
    )
    .await;
    one_bad_in_a_batch(
        &s,
        "u2",
        json!({"type": "identify", "anonymousId": "a2", "traits": {"email": format!("{long}@x.io")}}),
        "traits.email",
    )
    .await;
    one_bad_in_a_batch(
        &s,
        "u3",
        json!({"type": "track", "event": "E", "anonymousId": "a3",
               "context": {"externalIds": [{"id": long, "type": "crm_id", "collection": "users", "encoding": "none"}]}}),
        "context.externalIds[0].id",
    )
    .await;
    one_bad_in_a_batch(
        &s,
        "u4",
        json!({"type": "track", "event": "E", "anonymousId": "a4",
               "context": {"device": {"type": "ios", "id": long}}}),
        "context.device.id",
    )
    .await;
    // 1,024 bytes exactly is fine.
    let r = s
        .track("/v1/identify", &json!({"userId": "x".repeat(1024)}))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn emails_are_nfc_normalized_before_lowercasing() {
    let s = Server::start().await;
    // "é" as e + a combining acute accent, upper case.
    s.track(
        "/v1/identify",
        &json!({"userId": "u1", "traits": {"email": "Jose\u{0301}@Example.com"}}),
    )
    .await;
    s.settle().await;
    // Found by the precomposed form, in any case.
    let r = s
        .profile("email:JOS\u{00c9}@example.com", "external_ids")
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let emails: Vec<&Value> = r.body["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["type"] == "email")
        .collect();
    assert_eq!(emails[0]["id"], "jos\u{00e9}@example.com");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_profiles_traits_keep_the_newest_values_within_64_kib() {
    let s = Server::start().await;
    let big = "v".repeat(25_000);
    let now = now_ms();
    // Four identifies of 25 KB each, oldest first, then one small trait:
    // together they are over 64 KiB.
    let events: Vec<Value> = (0..4)
        .map(|i| {
            json!({"type": "identify", "userId": "u1", "traits": {format!("blob_{i}"): big},
                   "timestamp": format_millis(now - (10 - i) * 60_000)})
        })
        .chain([json!({"type": "identify", "userId": "u1", "traits": {"plan": "pro"}})])
        .collect();
    for e in events {
        let r = s.track("/v1/batch", &json!({"batch": [e]})).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    }
    s.settle().await;
    let traits = traits(&s, "user_id:u1").await;
    assert_eq!(traits["plan"], "pro");
    assert!(traits.get("blob_3").is_some() && traits.get("blob_2").is_some());
    assert!(
        traits.get("blob_0").is_none() && traits.get("blob_1").is_none(),
        "oldest dropped"
    );
    assert!(traits.to_string().len() <= 64 * 1024);
    // The event that made the profile drop them records which.
    let events = s
        .profile("user_id:u1", "events?sort=asc&limit=10")
        .await
        .body;
    let dropped: Vec<&Value> = events["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e.get("dropped_traits"))
        .collect();
    assert!(!dropped.is_empty(), "{events}");
    let all: Vec<&str> = dropped
        .iter()
        .flat_map(|d| d.as_array().unwrap().iter().map(|k| k.as_str().unwrap()))
        .collect();
    assert!(
        all.contains(&"blob_0") && all.contains(&"blob_1"),
        "{all:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_settings_are_bounded() {
    let s = Server::start().await;
    let base = s.admin("GET", "/identity_settings", None).await.body;
    let refused = |mut settings: Value, edit: &dyn Fn(&mut Value), field: &'static str| {
        edit(&mut settings);
        (settings, field)
    };
    let cases = [
        refused(
            base.clone(),
            &|v| {
                v["blocked"] = json!((0..101)
                    .map(|i| json!({"value": format!("v{i}")}))
                    .collect::<Vec<_>>())
            },
            "blocked: ",
        ),
        refused(
            base.clone(),
            &|v| v["blocked"] = json!([{"value": "x".repeat(1025)}]),
            "blocked[0].value: ",
        ),
        refused(
            base.clone(),
            &|v| v["blocked"] = json!([{"value": "(\\w{100}){100}", "regex": true}]),
            "blocked[0].value: the regular expression is too complex",
        ),
        refused(
            base.clone(),
            &|v| v["types"]["user_id"]["priority"] = json!(4_294_967_295u32),
            "types.user_id.priority: ",
        ),
    ];
    for (settings, field) in cases {
        let r = s.admin("PUT", "/identity_settings", Some(&settings)).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{field}: {}", r.body);
        assert_eq!(r.body["error"]["code"], "invalid_request_error");
        let message = r.body["error"]["message"].as_str().unwrap();
        assert!(message.starts_with(field), "{field}: {message}");
    }
    // The stored settings are unchanged and events still flow.
    assert_eq!(s.admin("GET", "/identity_settings", None).await.body, base);
    let r = s.track("/v1/identify", &json!({"userId": "u1"})).await;
    assert_eq!(r.status, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn definitions_and_where_filters_are_bounded() {
    let s = Server::start().await;
    let filters: Vec<Value> = (0..21)
        .map(|i| json!({"property": format!("p{i}"), "op": "exists"}))
        .collect();
    let r = s
        .admin(
            "PUT",
            "/computed_traits/too_picky",
            Some(&json!({"type": "event_counter", "event": "E", "where": filters})),
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.body);
    assert!(r.body["error"]["message"]
        .as_str()
        .unwrap()
        .starts_with("where: has more than 20 filters"));
    for i in 0..200 {
        let r = s
            .admin(
                "PUT",
                &format!("/computed_traits/count_{i}"),
                Some(&json!({"type": "event_counter", "event": format!("E{i}")})),
            )
            .await;
        assert!(r.status.is_success(), "{i}: {}", r.body);
    }
    let r = s
        .admin(
            "PUT",
            "/audiences/one_more",
            Some(&json!({"condition": {"performed": {"event": "E"}}})),
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.body);
    assert!(
        r.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("at most 200 computed traits and audiences"),
        "{}",
        r.body
    );
    // Replacing one of the 200 is still fine.
    let r = s
        .admin(
            "PUT",
            "/computed_traits/count_0",
            Some(&json!({"type": "event_counter", "event": "Other"})),
        )
        .await;
    assert!(r.status.is_success(), "{}", r.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destinations_per_space_are_bounded() {
    let s = Server::start_with(1_000_000, false).await;
    for i in 0..50 {
        let r = s
            .admin(
                "PUT",
                &format!("/destinations/d{i}"),
                Some(&json!({"kind": "webhook", "url": "https://hooks.example.com/x"})),
            )
            .await;
        assert!(r.status.is_success(), "{i}: {}", r.body);
    }
    let r = s
        .admin(
            "PUT",
            "/destinations/d50",
            Some(&json!({"kind": "webhook", "url": "https://hooks.example.com/x"})),
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.body);
    assert!(r.body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("at most 50 destinations"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_auth_is_checked_before_the_body_is_read() {
    let s = Server::start().await;
    // Not gzip at all, and over the size limit: an unknown key is a 401
    // before either is looked at.
    let client = reqwest::Client::new();
    for (body, encoding) in [
        (b"not gzip".to_vec(), "gzip"),
        (vec![b'x'; 600 * 1024], "identity"),
    ] {
        let r = client
            .post(format!("{}/v1/batch", s.base))
            .basic_auth("wk_unknownkeyunknownkey", Some(""))
            .header("content-encoding", encoding)
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["error"]["code"], "authentication_error");
    }
    // The right key gets to the body, and its error.
    let r = s
        .post_raw(
            "/v1/batch",
            b"not gzip".to_vec(),
            &[("content-encoding", "gzip")],
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.body);
}

async fn healthz(s: &Server) -> (StatusCode, Value) {
    let r = s.get_as("/healthz", None).await;
    (r.status, r.body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storage_fault_shows_in_healthz_and_loses_nothing() {
    let s = Server::start().await;
    let (status, body) = healthz(&s).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    for stage in ["queue", "compute", "sync"] {
        assert_eq!(body[format!("{stage}_lag_events")], 0, "{body}");
        assert_eq!(body[format!("{stage}_lag_seconds")], 0.0, "{body}");
    }

    // store.db refuses writes; the queue still accepts (and fsyncs) events.
    s.running.local.store.set_read_only(true).unwrap();
    for i in 0..20 {
        let r = s
            .track("/v1/identify", &json!({"userId": format!("u{i}")}))
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    }
    let start = std::time::Instant::now();
    let down = loop {
        let (status, body) = healthz(&s).await;
        if status == StatusCode::SERVICE_UNAVAILABLE && body["queue_lag_events"] == 20 {
            break body;
        }
        assert!(start.elapsed().as_secs() < 30, "{status} {body}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert_eq!(down["status"], "unavailable");
    assert_eq!(down["down"][0]["worker"], "identity", "{down}");
    let reason = down["down"][0]["reason"].as_str().unwrap();
    assert_eq!(reason, "storage error: the database is read-only");
    assert!(down["queue_lag_seconds"].as_f64().unwrap() >= 0.0);

    // Writable again: the worker recovers by itself and applies everything.
    s.running.local.store.set_read_only(false).unwrap();
    s.settle().await;
    let start = std::time::Instant::now();
    loop {
        let (status, body) = healthz(&s).await;
        if status == StatusCode::OK {
            assert_eq!(body["queue_lag_events"], 0, "{body}");
            assert_eq!(body["down"], json!([]), "{body}");
            break;
        }
        assert!(start.elapsed().as_secs() < 30, "{status} {body}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    for i in 0..20 {
        let r = s.profile(&format!("user_id:u{i}"), "metadata").await;
        assert_eq!(r.status, StatusCode::OK, "u{i}: {}", r.body);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undecodable_entry_is_set_aside_and_the_rest_go_on() {
    use crate::common::receiver::{Mode, Receiver};
    let s = Server::start_for_local_receivers().await;
    let receiver = Receiver::start().await;
    receiver.set(Mode::Ok);
    let r = s
        .admin(
            "PUT",
            "/computed_traits/orders",
            Some(&json!({"type": "event_counter", "event": "Order Completed"})),
        )
        .await;
    assert!(r.status.is_success(), "{}", r.body);
    let r = s
        .admin(
            "PUT",
            "/destinations/crm",
            Some(&json!({"kind": "webhook", "url": receiver.url("/hook"), "calls": ["identify"]})),
        )
        .await;
    assert!(r.status.is_success(), "{}", r.body);
    s.running.wait_fanned_out().await.unwrap();
    s.track("/v1/identify", &json!({"userId": "u1"})).await;
    s.settle().await;
    let profile = s.profile("user_id:u1", "metadata").await.body["metadata"]["profile_id"]
        .as_str()
        .unwrap()
        .to_string();

    // A damaged recorded event (compute's input) and a damaged change-log
    // entry (the fan-out's input), written behind Kindred's back.
    let open = |name: &str| {
        let c = rusqlite::Connection::open(s.dir.path().join(name)).unwrap();
        c.busy_timeout(std::time::Duration::from_secs(10)).unwrap();
        c
    };
    let store = open("store.db");
    store
        .execute(
            "INSERT INTO events (space_id, profile_id, ts, message_id, name, body)
             VALUES ('default', ?1, 0, 'broken-1', 'Order Completed', '{not json')",
            [&profile],
        )
        .unwrap();
    let bad_event = store.last_insert_rowid();
    let compute = open("compute.db");
    compute
        .execute(
            "INSERT INTO changes (space_id, profile_id, key, class, old, new, at)
             VALUES ('default', ?1, 'orders', 'computed_trait', NULL, '{not json', 0)",
            [&profile],
        )
        .unwrap();
    let bad_change = compute.last_insert_rowid();

    // The entries behind them go on.
    s.track(
        "/v1/track",
        &json!({"userId": "u1", "event": "Order Completed"}),
    )
    .await;
    s.settle().await;
    assert_eq!(traits(&s, "user_id:u1").await["orders"], 1);
    receiver
        .wait_for(
            std::time::Duration::from_secs(30),
            "the good change is delivered",
            |calls| calls.iter().any(|c| c["traits"]["orders"] == 1),
        )
        .await;

    let (queue, seq, reason): (String, i64, String) = compute
        .query_row(
            "SELECT queue, seq, reason FROM compute_set_aside",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .unwrap();
    assert_eq!((queue.as_str(), seq), ("events", bad_event));
    assert!(reason.contains("decoded"), "{reason}");
    let sync = open("sync.db");
    let (log, seq, reason): (String, i64, String) = sync
        .query_row("SELECT log, seq, reason FROM fan_out_set_aside", [], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })
        .unwrap();
    assert_eq!((log.as_str(), seq), ("changes", bad_change));
    assert!(reason.contains("decoded"), "{reason}");
    let (status, body) = healthz(&s).await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_keys_rotate_and_a_revoked_one_gets_401_at_once() {
    let s = Server::start().await;
    let r = s
        .admin(
            "POST",
            "/tokens",
            Some(&json!({"kind": "write_key", "label": "ios app"})),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    let new_key = r.body["token"].as_str().unwrap().to_string();
    assert!(new_key.starts_with(r.body["prefix"].as_str().unwrap()));
    let old_key = s.space.write_key.clone();
    // Both work.
    for key in [&old_key, &new_key] {
        let r = s
            .track_as(
                "/v1/track",
                &json!({"userId": "u1", "event": "E"}),
                Some(key),
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    }
    // The list shows prefixes and times, never a secret.
    let list = s.admin("GET", "/tokens", None).await;
    assert_eq!(list.status, StatusCode::OK);
    let text = list.body.to_string();
    assert!(
        !text.contains(&old_key) && !text.contains(&new_key),
        "{text}"
    );
    let old = list.body["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| old_key.starts_with(t["prefix"].as_str().unwrap()))
        .unwrap()
        .clone();
    assert_eq!(old["kind"], "write_key");
    // Revoked: 401 at once; the new key goes on.
    let r = s
        .admin(
            "DELETE",
            &format!("/tokens/{}", old["id"].as_str().unwrap()),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.body);
    let r = s
        .track_as(
            "/v1/track",
            &json!({"userId": "u1", "event": "E"}),
            Some(&old_key),
        )
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{}", r.body);
    assert_eq!(r.body["error"]["code"], "authentication_error");
    let r = s
        .track_as(
            "/v1/track",
            &json!({"userId": "u1", "event": "E"}),
            Some(&new_key),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    // The last admin token cannot be revoked.
    let admins: Vec<Value> = s.admin("GET", "/tokens", None).await.body["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["kind"] == "admin_token")
        .cloned()
        .collect();
    let r = s
        .admin(
            "DELETE",
            &format!("/tokens/{}", admins[0]["id"].as_str().unwrap()),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{}", r.body);
    // Another space's admin token can neither list nor revoke this space's.
    let other = s.running.local.store.create_space("other").unwrap();
    let r = s
        .get_as("/v1/spaces/default/tokens", Some(&other.admin_token))
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{}", r.body);
    let r = s
        .delete_as(
            &format!(
                "/v1/spaces/other/tokens/{}",
                admins[0]["id"].as_str().unwrap()
            ),
            &other.admin_token,
        )
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "{}", r.body);
    // Bad requests name the field.
    let r = s
        .admin("POST", "/tokens", Some(&json!({"kind": "root"})))
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(r.body["error"]["message"]
        .as_str()
        .unwrap()
        .starts_with("kind:"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_profile_api_has_a_per_space_rate_limit() {
    let s = Server::start().await;
    s.track("/v1/identify", &json!({"userId": "u1"})).await;
    s.settle().await;
    let mut settings = s.admin("GET", "/identity_settings", None).await.body;
    assert_eq!(
        settings["profile_api_requests_per_second"], 5000,
        "{settings}"
    );
    settings["profile_api_requests_per_second"] = json!(5);
    let r = s.admin("PUT", "/identity_settings", Some(&settings)).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let mut limited = None;
    for _ in 0..20 {
        let r = s.profile("user_id:u1", "traits").await;
        if r.status == StatusCode::TOO_MANY_REQUESTS {
            limited = Some(r);
            break;
        }
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    }
    let r = limited.expect("20 requests at once go over 5 per second");
    assert_eq!(r.body["error"]["code"], "rate_limit_error", "{}", r.body);
    let retry: u64 = r.headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!(retry >= 1);
    // Admin calls are not counted against it, and another space is not
    // affected.
    assert_eq!(
        s.admin("GET", "/identity_settings", None).await.status,
        StatusCode::OK
    );
    let other = s.running.local.store.create_space("other").unwrap();
    let r = s
        .get_as(
            "/v1/spaces/other/collections/users/profiles/user_id:u1/traits",
            Some(&other.access_token),
        )
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "{}", r.body);
    // After the wait it answers again.
    tokio::time::sleep(std::time::Duration::from_secs(retry)).await;
    assert_eq!(
        s.profile("user_id:u1", "traits").await.status,
        StatusCode::OK
    );
}

fn limits(max_connections: usize) -> kindred::config::ServerLimits {
    kindred::config::ServerLimits {
        max_connections,
        header_read_timeout: std::time::Duration::from_secs(2),
        request_timeout: std::time::Duration::from_secs(2),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_headers_and_slow_bodies_are_cut_off() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let s = Server::start_limited(1_000_000, true, limits(100)).await;
    let addr = s.running.addr;
    // Headers that never end: the connection is closed.
    let mut slow = tokio::net::TcpStream::connect(addr).await.unwrap();
    slow.write_all(b"POST /v1/track HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let read = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        slow.read_to_end(&mut buf),
    )
    .await;
    assert!(read.is_ok(), "the connection was not closed");
    // A body that never arrives: 408 after the request timeout.
    let mut slow = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST /v1/track HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
         Authorization: Basic {}\r\nContent-Length: 1000\r\n\r\n{{\"userId\":",
        base64_basic(&s.space.write_key)
    );
    slow.write_all(head.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(std::time::Duration::from_secs(10), slow.read(&mut buf))
        .await
        .expect("an answer within the timeout")
        .unwrap();
    let answer = String::from_utf8_lossy(&buf[..n]);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("request_timeout"), "{answer}");
}

fn base64_basic(user: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(format!("{user}:"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_the_cap_wait_for_one_to_close() {
    let s = Server::start_limited(1_000_000, true, limits(2)).await;
    let addr = s.running.addr;
    let first = tokio::net::TcpStream::connect(addr).await.unwrap();
    let _second = tokio::net::TcpStream::connect(addr).await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let client = reqwest::Client::builder()
        .timeout(std::time::Duration::from_millis(700))
        .build()
        .unwrap();
    let url = format!("{}/healthz", s.base);
    assert!(
        client.get(&url).send().await.is_err(),
        "a third connection was served"
    );
    drop(first);
    let client = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(5))
        .build()
        .unwrap();
    let r = client.get(&url).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
}
