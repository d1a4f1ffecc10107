//! Segment's browser library in a real browser: a local page loads
//! `@segment/analytics-next` (pinned in `tests/browser/package.json`) in
//! headless Chromium, sets only `cdnURL` (or, with the CDN snippet, a
//! self-hosted copy of the library and `_cdn`), and visits: page,
//! identify, track. The events and the merged profile are read back from
//! the Profile API. The driver is `tests/browser/run.mjs`.

use std::path::PathBuf;
use std::process::Command;

use crate::common::Server;
use reqwest::StatusCode;
use serde_json::Value;

/// The driver's folder, with its npm packages installed, and Chromium:
/// the test command installs both (KINDRED_BROWSER_TESTS is then set).
pub(crate) fn browser_tools() -> Option<PathBuf> {
    let dir = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/browser"));
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    let ready = dir.join("node_modules/@segment/analytics-next").is_dir()
        && dir.join("node_modules/playwright-core").is_dir()
        && PathBuf::from(chromium).exists();
    if ready {
        return Some(dir);
    }
    if std::env::var("CI").is_ok() || std::env::var("KINDRED_BROWSER_TESTS").is_ok() {
        panic!(
            "Chromium or tests/browser's npm packages are missing: tests/run-all.sh installs them"
        );
    }
    eprintln!("SKIPPED: Chromium or tests/browser/node_modules is missing (tests/run-all.sh installs them)");
    None
}

/// Runs the page in `mode` for `user` and checks what the browser saw.
async fn visit(s: &Server, dir: PathBuf, user: &str, mode: &str) -> Value {
    let (base, key, user_arg, mode_arg) = (
        s.base.clone(),
        s.space.write_key.clone(),
        user.to_string(),
        mode.to_string(),
    );
    let out = tokio::task::spawn_blocking(move || {
        Command::new("node")
            .current_dir(&dir)
            .args(["run.mjs", &base, &key, &user_arg, &mode_arg])
            .output()
            .expect("node runs")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{mode}: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_str(stdout.trim()).expect("the driver's report");
    assert_eq!(report["visit"], "done", "{mode}: {report}");
    assert_eq!(report["acknowledged"], 5, "{mode}: {report}");
    assert_eq!(report["console"], serde_json::json!([]), "{mode}: {report}");
    let requests = report["requests"].as_array().unwrap();
    // The settings first (nothing is sent before them), then the events;
    // every answer a 200 (a refused preflight would be a failed request).
    let first = &requests[0];
    assert_eq!(first["method"], "GET", "{mode}: {report}");
    assert_eq!(
        first["url"],
        format!("{}/v1/projects/{}/settings", s.base, s.space.write_key)
    );
    let allowed: &[&str] = if mode == "batching" {
        &["/v1/b"]
    } else {
        &["/v1/p", "/v1/i", "/v1/t"]
    };
    for r in &requests[1..] {
        assert_eq!(r["status"], 200, "{mode}: {report}");
        assert_eq!(r["method"], "POST", "{mode}: {report}");
        let path = r["url"].as_str().unwrap().trim_start_matches(&s.base);
        assert!(allowed.contains(&path), "{mode}: {path} in {report}");
    }
    report
}

/// The profile the visit made: every event, the anonymous page view
/// before `identify` included, under the user.
async fn check_profile(s: &Server, user: &str, report: &Value) {
    s.settle().await;
    let events = s
        .profile(&format!("user_id:{user}"), "events?limit=50&sort=asc")
        .await;
    assert_eq!(events.status, StatusCode::OK, "{}", events.body);
    let data = events.body["data"].as_array().unwrap();
    let mut kinds: Vec<String> = data
        .iter()
        .map(|e| {
            let name = e["event"].as_str().or(e["name"].as_str()).unwrap_or("-");
            format!("{} {name}", e["type"].as_str().unwrap())
        })
        .collect();
    kinds.sort();
    assert_eq!(
        kinds,
        [
            "identify -",
            "page -",
            "page Install",
            "track Product Viewed",
            "track Signed Up"
        ],
        "{}",
        events.body
    );
    let origin = report["origin"].as_str().unwrap();
    for e in data {
        assert_eq!(e["context"]["library"]["name"], "analytics.js", "{e}");
        assert!(
            e["context"]["page"]["url"]
                .as_str()
                .unwrap()
                .starts_with(origin),
            "{e}"
        );
        assert!(
            e.get("writeKey").is_none(),
            "the write key is not stored: {e}"
        );
    }

    let ids = s.profile(&format!("user_id:{user}"), "external_ids").await;
    let ids: Vec<(String, String)> = ids.body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            (
                i["type"].as_str().unwrap().to_string(),
                i["id"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert!(
        ids.contains(&("email".into(), format!("{user}@example.com"))),
        "{ids:?}"
    );
    let anonymous: Vec<&String> = ids
        .iter()
        .filter(|(t, _)| t == "anonymous_id")
        .map(|(_, v)| v)
        .collect();
    assert_eq!(
        anonymous.len(),
        1,
        "the browser's one anonymous id: {ids:?}"
    );
    // The anonymous id finds the same profile.
    let by_anonymous = s
        .profile(&format!("anonymous_id:{}", anonymous[0]), "traits")
        .await;
    assert_eq!(
        by_anonymous.body["traits"]["plan"], "pro",
        "{}",
        by_anonymous.body
    );
}

async fn run(mode: &str) {
    let Some(dir) = browser_tools() else {
        return;
    };
    let s = Server::start().await;
    let user = format!("web-{mode}");
    let report = visit(&s, dir, &user, mode).await;
    check_profile(&s, &user, &report).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_bundling_analytics_next_sends_each_call() {
    run("npm").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_bundling_analytics_next_sends_batches() {
    run("batching").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cdn_snippet_with_a_self_hosted_library_sends_each_call() {
    run("snippet").await;
}
