//! What a web page's requests see, checked directly over HTTP on `kindred
//! serve`: the browser library's short routes, CORS on every Tracking API
//! answer (preflights, errors and 429s included), the source settings
//! route, and a space's allowed origins. `browser.rs` drives the real
//! library in Chromium.

use crate::common::{Reply, Server};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

const PAGE: &str = "http://shop.example.test:5173";

/// A request as a browser on `PAGE` would send it: `Origin`, and
/// `text/plain` like analytics-next.
async fn from_page(
    s: &Server,
    method: Method,
    path: &str,
    origin: Option<&str>,
    key: Option<&str>,
    body: Option<&Value>,
) -> Reply {
    let mut req = s.client.request(method, format!("{}{path}", s.base));
    if let Some(origin) = origin {
        req = req.header("Origin", origin);
    }
    if let Some(key) = key {
        req = req.basic_auth(key, Some(""));
    }
    if let Some(body) = body {
        req = req
            .header("Content-Type", "text/plain")
            .body(body.to_string());
    }
    Server::reply(req.send().await.unwrap()).await
}

fn header<'a>(r: &'a Reply, name: &str) -> Option<&'a str> {
    r.headers.get(name).map(|v| v.to_str().unwrap())
}

fn assert_cors(r: &Reply, origin: &str) {
    assert_eq!(
        header(r, "access-control-allow-origin"),
        Some(origin),
        "{:?} {}",
        r.status,
        r.body
    );
    assert_eq!(
        header(r, "access-control-expose-headers"),
        Some("Retry-After"),
        "{:?}",
        r.status
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preflights_are_answered_on_every_browser_route_without_a_key() {
    let s = Server::start().await;
    let paths = [
        "/v1/t",
        "/v1/i",
        "/v1/p",
        "/v1/s",
        "/v1/g",
        "/v1/a",
        "/v1/b",
        "/v1/m",
        "/v1/track",
        "/v1/batch",
        "/v1/import",
        "/v1/projects/wk_anything/settings",
    ];
    for path in paths {
        let r = s
            .client
            .request(Method::OPTIONS, format!("{}{path}", s.base))
            .header("Origin", PAGE)
            .header("Access-Control-Request-Method", "POST")
            .header(
                "Access-Control-Request-Headers",
                "authorization,content-type,x-retry-count",
            )
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::NO_CONTENT, "{path}");
        let h = r.headers();
        assert_eq!(h["access-control-allow-origin"], PAGE, "{path}");
        assert_eq!(h["access-control-allow-methods"], "POST, GET, OPTIONS");
        let allowed = h["access-control-allow-headers"].to_str().unwrap();
        for wanted in ["authorization", "content-type", "x-retry-count"] {
            assert!(allowed.contains(wanted), "{path}: {allowed}");
        }
        assert_eq!(h["access-control-max-age"], "86400");
        assert!(h.get("access-control-allow-credentials").is_none());
    }

    // The Profile and admin APIs stay server-side: no CORS at all.
    let space = &s.space.space_id;
    for path in [
        format!("/v1/spaces/{space}/collections/users/profiles/user_id:x/traits"),
        format!("/v1/spaces/{space}/identity_settings"),
    ] {
        let r = s
            .client
            .request(Method::OPTIONS, format!("{}{path}", s.base))
            .header("Origin", PAGE)
            .header("Access-Control-Request-Method", "GET")
            .send()
            .await
            .unwrap();
        assert_ne!(r.status(), StatusCode::NO_CONTENT, "{path}");
        assert!(r.headers().get("access-control-allow-origin").is_none());
        let r = from_page(
            &s,
            Method::GET,
            &path,
            Some(PAGE),
            Some(&s.space.access_token),
            None,
        )
        .await;
        assert!(
            header(&r, "access-control-allow-origin").is_none(),
            "{path}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_and_rate_limits_carry_cors_headers() {
    let s = Server::start_with_rate(3).await;
    let event = json!({"userId": "u1", "event": "Viewed"});

    // 401: no key, and an unknown key.
    let r = from_page(&s, Method::POST, "/v1/t", Some(PAGE), None, Some(&event)).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(r.body["error"]["code"], "authentication_error");
    assert_cors(&r, PAGE);
    let r = from_page(
        &s,
        Method::POST,
        "/v1/t",
        Some(PAGE),
        Some("wk_forgedforgedforged"),
        Some(&event),
    )
    .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_cors(&r, PAGE);

    // 400: not JSON, and an event nobody can be found for.
    let r = s
        .client
        .post(format!("{}/v1/t", s.base))
        .header("Origin", PAGE)
        .basic_auth(&s.space.write_key, Some(""))
        .body("{not json")
        .send()
        .await
        .unwrap();
    let r = Server::reply(r).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_cors(&r, PAGE);
    let r = from_page(
        &s,
        Method::POST,
        "/v1/t",
        Some(PAGE),
        Some(&s.space.write_key),
        Some(&json!({"event": "No one"})),
    )
    .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.body);
    assert_cors(&r, PAGE);

    // 429 over the space's rate, with a Retry-After the page can read.
    let batch = json!({"batch": (0..10).map(|i| json!({"type": "track", "userId": format!("u{i}"), "event": "E"})).collect::<Vec<_>>()});
    let mut limited = None;
    for _ in 0..5 {
        let r = from_page(
            &s,
            Method::POST,
            "/v1/b",
            Some(PAGE),
            Some(&s.space.write_key),
            Some(&batch),
        )
        .await;
        if r.status == StatusCode::TOO_MANY_REQUESTS {
            limited = Some(r);
            break;
        }
    }
    let r = limited.expect("a 429 within five batches of 10 at 3 events/s");
    assert!(header(&r, "retry-after").is_some());
    assert_cors(&r, PAGE);

    // A request without Origin (a server) is answered `*`.
    let r = from_page(&s, Method::POST, "/v1/t", None, None, Some(&event)).await;
    assert_eq!(header(&r, "access-control-allow-origin"), Some("*"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_short_routes_are_the_tracking_api() {
    let s = Server::start().await;
    let key = s.space.write_key.clone();
    // As analytics-next sends them: text/plain, the key in the header and
    // in the body, `_metadata`, `sentAt`.
    let common = |kind: &str, id: &str| {
        json!({"type": kind, "messageId": id, "anonymousId": "anon-b1", "writeKey": key,
               "sentAt": "2026-11-29T10:00:00.000Z", "timestamp": "2026-11-29T10:00:00.000Z",
               "_metadata": {"bundled": ["Segment.io"], "unbundled": [], "bundledIds": []},
               "context": {"page": {"url": "http://shop.example.test/"}, "userAgent": "Chromium"}})
    };
    let mut calls = vec![
        ("/v1/i", {
            let mut e = common("identify", "m-i");
            e["userId"] = json!("b-user");
            e["traits"] = json!({"email": "B.User@Example.com", "plan": "pro"});
            e
        }),
        ("/v1/t", {
            let mut e = common("track", "m-t");
            e["event"] = json!("Added to Cart");
            e
        }),
        ("/v1/p", common("page", "m-p")),
        ("/v1/s", {
            let mut e = common("screen", "m-s");
            e["name"] = json!("Home");
            e
        }),
        ("/v1/g", {
            let mut e = common("group", "m-g");
            e["groupId"] = json!("acme");
            e
        }),
    ];
    let mut alias = common("alias", "m-a");
    alias["previousId"] = json!("anon-b1");
    alias["userId"] = json!("b-user");
    calls.push(("/v1/a", alias));
    for (path, body) in &calls {
        let r = from_page(&s, Method::POST, path, Some(PAGE), Some(&key), Some(body)).await;
        assert_eq!(r.status, StatusCode::OK, "{path}: {}", r.body);
        assert_cors(&r, PAGE);
    }
    // The key in the body alone, and a retry of the same messageId.
    let mut retried = common("track", "m-t");
    retried["event"] = json!("Added to Cart");
    let r = from_page(&s, Method::POST, "/v1/t", Some(PAGE), None, Some(&retried)).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    // The batching strategy's body.
    let batch = json!({"writeKey": key, "sentAt": "2026-11-29T10:00:01.000Z", "batch": [
        {"type": "track", "messageId": "m-b1", "anonymousId": "anon-b1", "event": "Checkout Started",
         "timestamp": "2026-11-29T10:00:01.000Z"},
        {"type": "track", "messageId": "m-b2", "event": "No one"}]});
    let r = from_page(&s, Method::POST, "/v1/b", Some(PAGE), None, Some(&batch)).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.body["accepted"], 1, "{}", r.body);
    assert_eq!(r.body["rejected"][0]["index"], 1, "{}", r.body);
    // Client metrics are answered and kept nowhere.
    let r = from_page(
        &s,
        Method::POST,
        "/v1/m",
        Some(PAGE),
        None,
        Some(&json!({"series": []})),
    )
    .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    assert_cors(&r, PAGE);
    // An unknown one-letter route is still a JSON 404 a page can read.
    let r = from_page(
        &s,
        Method::POST,
        "/v1/x",
        Some(PAGE),
        Some(&key),
        Some(&json!({})),
    )
    .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_cors(&r, PAGE);

    s.settle().await;
    let events = s
        .profile("email:b.user@example.com", "events?limit=50&sort=asc")
        .await;
    assert_eq!(events.status, StatusCode::OK, "{}", events.body);
    let mut kinds: Vec<(String, String)> = events.body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["message_id"].as_str().unwrap().to_string(),
                e["type"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    kinds.sort();
    let expected: Vec<(String, String)> = [
        ("m-a", "alias"),
        ("m-b1", "track"),
        ("m-g", "group"),
        ("m-i", "identify"),
        ("m-p", "page"),
        ("m-s", "screen"),
        ("m-t", "track"),
    ]
    .iter()
    .map(|(a, b)| (a.to_string(), b.to_string()))
    .collect();
    assert_eq!(
        kinds, expected,
        "one event per call, the retry deduplicated"
    );
    let traits = s.profile("user_id:b-user", "traits").await;
    assert_eq!(traits.body["traits"]["plan"], "pro", "{}", traits.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_settings_route_points_the_library_at_kindred() {
    let s = Server::start().await;
    let key = s.space.write_key.clone();
    let path = format!("/v1/projects/{key}/settings");
    let r = from_page(&s, Method::GET, &path, Some(PAGE), None, None).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_cors(&r, PAGE);
    let cache = header(&r, "cache-control").unwrap();
    assert!(
        cache.contains("public") && cache.contains("max-age="),
        "{cache}"
    );
    let host = s.base.trim_start_matches("http://");
    let io = &r.body["integrations"]["Segment.io"];
    assert_eq!(io["apiKey"], key.as_str());
    assert_eq!(io["apiHost"], format!("{host}/v1"));
    assert_eq!(io["protocol"], "http");
    assert_eq!(r.body["integrations"].as_object().unwrap().len(), 1);
    assert_eq!(r.body["metrics"]["sampleRate"], 0);
    assert_eq!(r.body["remotePlugins"], json!([]));

    // An unknown key: a 404 the page can read, not cached.
    let r = from_page(
        &s,
        Method::GET,
        "/v1/projects/wk_nobodynobodynobody/settings",
        Some(PAGE),
        None,
        None,
    )
    .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "{}", r.body);
    assert_cors(&r, PAGE);
    assert_eq!(header(&r, "cache-control"), Some("no-store"));
    // Other tokens of the space are not write keys.
    let r = from_page(
        &s,
        Method::GET,
        &format!("/v1/projects/{}/settings", s.space.access_token),
        None,
        None,
        None,
    )
    .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_space_may_restrict_the_pages_that_send_its_events() {
    let s = Server::start().await;
    let key = s.space.write_key.clone();
    let mut settings = s.admin("GET", "/identity_settings", None).await.body;
    assert_eq!(settings["allowed_origins"], json!([]), "{settings}");

    for (bad, field) in [
        (json!(["shop.example.test"]), "allowed_origins[0]"),
        (
            json!(["https://ok.example", "https://x.example/path"]),
            "allowed_origins[1]",
        ),
    ] {
        settings["allowed_origins"] = bad;
        let r = s.admin("PUT", "/identity_settings", Some(&settings)).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.body);
        assert!(
            r.body["error"]["message"].as_str().unwrap().contains(field),
            "{}",
            r.body
        );
    }
    settings["allowed_origins"] = json!([PAGE, "https://*.example.com"]);
    let r = s.admin("PUT", "/identity_settings", Some(&settings)).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);

    let event = |id: &str| json!({"userId": "o-user", "event": "E", "messageId": id});
    for (origin, id) in [
        (Some(PAGE), "allowed-exact"),
        (Some("https://www.example.com"), "allowed-wildcard"),
        (None, "server"),
    ] {
        let r = from_page(
            &s,
            Method::POST,
            "/v1/t",
            origin,
            Some(&key),
            Some(&event(id)),
        )
        .await;
        assert_eq!(r.status, StatusCode::OK, "{origin:?}: {}", r.body);
        if let Some(origin) = origin {
            assert_cors(&r, origin);
        }
    }
    for origin in ["https://evil.example.net", "https://example.com", "null"] {
        for path in ["/v1/t", "/v1/track"] {
            let r = from_page(
                &s,
                Method::POST,
                path,
                Some(origin),
                Some(&key),
                Some(&event("refused")),
            )
            .await;
            assert_eq!(r.status, StatusCode::FORBIDDEN, "{origin}: {}", r.body);
            assert_eq!(r.body["error"]["code"], "origin_not_allowed");
            assert!(header(&r, "access-control-allow-origin").is_none());
        }
        let batch = json!({"writeKey": key, "batch": [event("refused")]});
        let r = from_page(&s, Method::POST, "/v1/b", Some(origin), None, Some(&batch)).await;
        assert_eq!(r.status, StatusCode::FORBIDDEN, "{origin}: {}", r.body);
        let r = from_page(
            &s,
            Method::GET,
            &format!("/v1/projects/{key}/settings"),
            Some(origin),
            None,
            None,
        )
        .await;
        assert_eq!(r.status, StatusCode::FORBIDDEN, "{origin}: {}", r.body);
        assert!(header(&r, "access-control-allow-origin").is_none());
    }

    s.settle().await;
    let events = s.profile("user_id:o-user", "events?limit=50").await;
    let mut ids: Vec<&str> = events.body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["message_id"].as_str().unwrap())
        .collect();
    ids.sort();
    assert_eq!(ids, ["allowed-exact", "allowed-wildcard", "server"]);
}
