//! Segment's real Python client, pointed at Kindred with `host=`, works
//! unchanged: its events show up in the Profile API.

use std::process::Command;

use crate::common::Server;
use reqwest::StatusCode;

/// The interpreter with `segment-analytics-python` installed: the test
/// command sets KINDRED_PYTHON to the venv it prepares.
fn python() -> Option<String> {
    let python = std::env::var("KINDRED_PYTHON").unwrap_or_else(|_| "python3".into());
    let ok = Command::new(&python)
        .args(["-c", "import segment.analytics"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    ok.then_some(python)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_segment_python_client_works_unchanged() {
    let Some(python) = python() else {
        if std::env::var("CI").is_ok() {
            panic!("segment-analytics-python is missing in CI: the test command installs it");
        }
        eprintln!(
            "SKIPPED: segment-analytics-python is not installed (tests/run-all.sh installs it)"
        );
        return;
    };
    let s = Server::start().await;
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/python/send_with_segment_client.py"
    );
    let base = s.base.clone();
    let key = s.space.write_key.clone();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(python)
            .arg(script)
            .arg(key)
            .arg(base)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
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
    // The alias linked the second anonymous id to the user.
    let via_alias = s.profile("anonymous_id:py-anon-2", "metadata").await;
    assert_eq!(via_alias.status, StatusCode::OK);
}
