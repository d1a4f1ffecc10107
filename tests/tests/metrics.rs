//! `/metrics` (`kindred serve --metrics-listen`): Prometheus text that a
//! Prometheus parser reads, with counters that match a known ingest.
//! (Each test runs in its own process under nextest, so the process-wide
//! counters start at zero.)

use crate::common::Server;
use prometheus_parse::{Scrape, Value as Prom};
use reqwest::StatusCode;
use serde_json::json;

/// The values of `metric`'s series that carry these labels.
fn series<'a>(
    scrape: &'a Scrape,
    metric: &'a str,
    labels: &'a [(&str, &str)],
) -> impl Iterator<Item = &'a Prom> {
    scrape
        .samples
        .iter()
        .filter(move |s| s.metric == metric)
        .filter(move |s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| &s.value)
}

fn value(scrape: &Scrape, metric: &str, labels: &[(&str, &str)]) -> Option<f64> {
    series(scrape, metric, labels).find_map(|v| match v {
        Prom::Counter(v) | Prom::Gauge(v) | Prom::Untyped(v) => Some(*v),
        _ => None,
    })
}

/// Observations in a histogram's series with these labels.
fn observations(scrape: &Scrape, metric: &str, labels: &[(&str, &str)]) -> Option<f64> {
    series(scrape, metric, labels).find_map(|v| match v {
        Prom::Histogram(buckets) => buckets.last().map(|b| b.count),
        _ => None,
    })
}

async fn scrape(s: &Server) -> (Scrape, String) {
    let at = s.running.metrics_addr.expect("metrics are served");
    let response = reqwest::get(format!("http://{at}/metrics")).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let content_type = response.headers()["content-type"].to_str().unwrap();
    assert!(
        content_type.starts_with("text/plain; version=0.0.4"),
        "{content_type}"
    );
    let text = response.text().await.unwrap();
    let lines = text.lines().map(|l| Ok(l.to_string()));
    (Scrape::parse(lines).expect("Prometheus text"), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_and_count_a_known_ingest() {
    let s = Server::start().await;
    // A batch: three good events (two people, one merging call) and one
    // with a timestamp before 2000.
    let r = s
        .track(
            "/v1/batch",
            &json!({"batch": [
                {"type": "identify", "userId": "u1", "anonymousId": "a1", "traits": {"plan": "pro"}},
                {"type": "track", "anonymousId": "a2", "event": "Viewed"},
                {"type": "identify", "userId": "u1", "anonymousId": "a2"},
                {"type": "track", "userId": "u2", "event": "Old", "timestamp": "1999-12-31T23:59:59Z"}
            ]}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.body["accepted"], 3, "{}", r.body);
    // A single call, and the same call sent again (a retry: a duplicate).
    let retried = json!({"type": "track", "userId": "u1", "event": "Paid", "messageId": "m-1"});
    for _ in 0..2 {
        assert_eq!(s.track("/v1/track", &retried).await.status, StatusCode::OK);
    }
    // Refused whole: a wrong write key.
    let r = s.track_as("/v1/track", &retried, Some("not-a-key")).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    s.settle().await;
    // A Profile API read.
    assert_eq!(
        s.profile("user_id:u1", "traits").await.status,
        StatusCode::OK
    );

    let (m, text) = scrape(&s).await;
    let v = |metric: &str, labels: &[(&str, &str)]| {
        value(&m, metric, labels).unwrap_or_else(|| panic!("{metric} {labels:?} in\n{text}"))
    };
    assert_eq!(v("kindred_events_accepted_total", &[]), 5.0);
    assert_eq!(
        v(
            "kindred_events_refused_total",
            &[("reason", "invalid_timestamp")]
        ),
        1.0
    );
    assert_eq!(
        v(
            "kindred_tracking_requests_refused_total",
            &[("code", "authentication_error")]
        ),
        1.0
    );
    assert_eq!(
        v("kindred_events_applied_total", &[("outcome", "recorded")]),
        4.0
    );
    assert_eq!(
        v("kindred_events_applied_total", &[("outcome", "duplicate")]),
        1.0
    );
    assert_eq!(v("kindred_profiles_created_total", &[]), 2.0);
    assert_eq!(v("kindred_merges_total", &[]), 1.0);
    assert_eq!(v("kindred_lag_events", &[("stage", "queue")]), 0.0);
    assert!(v("kindred_sqlite_bytes", &[("file", "store.db")]) > 0.0);
    assert_eq!(v("kindred_delivery_requests_total", &[]), 0.0);
    // Latency histograms: per route template (never the path, which held
    // the user id), and the identity worker's batches.
    let batch = observations(
        &m,
        "kindred_http_request_duration_seconds",
        &[("route", "/v1/batch"), ("status", "2xx")],
    );
    assert_eq!(batch, Some(1.0), "{text}");
    let reads = observations(
        &m,
        "kindred_http_request_duration_seconds",
        &[("method", "GET"), ("status", "2xx")],
    );
    assert_eq!(reads, Some(1.0), "{text}");
    assert!(
        !text.contains("u1"),
        "no customer data in the metrics:\n{text}"
    );
    let batches = observations(&m, "kindred_identity_batch_duration_seconds", &[]);
    assert!(batches.is_some_and(|n| n >= 1.0), "{text}");
}

/// The figures cover every space: they are not on the API's port.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_not_served_on_the_api_port() {
    let s = Server::start().await;
    let r = s.get_as("/metrics", Some(&s.space.admin_token)).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "{}", r.body);
}

/// Identifiers refused by merge protection, by rule, and each
/// destination's calls by state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_refusals_and_each_destinations_calls() {
    use crate::common::receiver::Receiver;
    let s = Server::start_for_local_receivers().await;
    let receiver = Receiver::start().await;
    let r = s
        .admin(
            "PUT",
            "/destinations/crm",
            Some(&json!({"kind": "webhook", "url": receiver.url("/hook")})),
        )
        .await;
    assert!(r.status.is_success(), "{}", r.body);
    s.buyers_audience().await;
    // SPEC 5's example: a1 signs in as u1, then (no reset) as u2: the
    // device stays with u1 and is refused for u2 (a user_id limit).
    let r = s
        .track(
            "/v1/batch",
            &json!({"batch": [
                {"type": "identify", "userId": "u1", "anonymousId": "a1"},
                {"type": "track", "userId": "u1", "event": "Order Completed"},
                {"type": "identify", "userId": "u2", "anonymousId": "a1"},
            ]}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    s.settle().await;
    receiver
        .wait_for(
            std::time::Duration::from_secs(30),
            "the audience entry is delivered",
            |calls| !calls.is_empty(),
        )
        .await;
    // The delivery is recorded just after the receiver answers.
    let mut delivered = 0.0;
    for _ in 0..100 {
        let (m, _) = scrape(&s).await;
        delivered = value(
            &m,
            "kindred_destination_calls",
            &[
                ("space", "default"),
                ("destination", "crm"),
                ("state", "delivered"),
            ],
        )
        .unwrap_or(0.0);
        if delivered >= 1.0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(delivered >= 1.0);
    let (m, text) = scrape(&s).await;
    let refused = value(
        &m,
        "kindred_identifiers_refused_total",
        &[("rule", "limit")],
    );
    assert_eq!(refused, Some(1.0), "{text}");
    assert_eq!(
        value(
            &m,
            "kindred_destination_calls",
            &[("destination", "crm"), ("state", "dead")]
        ),
        Some(0.0),
        "{text}"
    );
}
