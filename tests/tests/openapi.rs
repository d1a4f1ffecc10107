//! The OpenAPI document (`GET /openapi.json`) checked against the server
//! that serves it: `schemathesis` (PyPI, pinned in tests/run-all.sh)
//! calls every operation with generated requests, in this order of phases:
//! the document's examples, its boundaries, random data, and sequences
//! that feed one answer's ids into the next call. Each operation uses the
//! credentials its security scheme names (tests/api/schemathesis.toml).
//! It fails on any 5xx, an undocumented status or content type, or a body
//! that does not match its schema.

use std::path::PathBuf;
use std::process::Command;

use crate::common::Server;
use reqwest::StatusCode;
use serde_json::json;

fn schemathesis() -> Option<PathBuf> {
    let path = std::env::var("KINDRED_SCHEMATHESIS")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../target/api-venv/bin/schemathesis"
            ))
        });
    if path.exists() {
        return Some(path);
    }
    if std::env::var("CI").is_ok() || std::env::var("KINDRED_SCHEMATHESIS").is_ok() {
        panic!(
            "schemathesis is missing at {}: tests/run-all.sh installs it",
            path.display()
        );
    }
    eprintln!("SKIPPED: schemathesis is missing (tests/run-all.sh installs it)");
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_operation_answers_as_the_openapi_document_says() {
    let Some(tool) = schemathesis() else { return };
    let s = Server::start().await;
    // Data for the examples to find: a merged profile with events, an
    // audience, a computed trait.
    let r = s
        .track(
            "/v1/batch",
            &json!({"batch": [
                {"type": "identify", "userId": "u1", "anonymousId": "a1", "traits": {"email": "U1@example.com", "plan": "pro"}},
                {"type": "track", "anonymousId": "a2", "event": "Order Completed", "properties": {"total": 3}},
                {"type": "alias", "previousId": "a2", "userId": "u1"},
                {"type": "group", "userId": "u1", "groupId": "g1", "traits": {"name": "Acme"}},
            ]}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    s.buyers_audience().await;
    s.settle().await;

    let doc = reqwest::get(format!("{}/openapi.json", s.base))
        .await
        .unwrap();
    assert_eq!(doc.status(), StatusCode::OK);
    let doc: serde_json::Value = doc.json().await.unwrap();
    assert_eq!(doc["openapi"], "3.1.0");

    let config = concat!(env!("CARGO_MANIFEST_DIR"), "/api/schemathesis.toml");
    let url = format!("{}/openapi.json", s.base);
    let envs = [
        ("KINDRED_WRITE_KEY", s.space.write_key.clone()),
        ("KINDRED_ACCESS_TOKEN", s.space.access_token.clone()),
        ("KINDRED_ADMIN_TOKEN", s.space.admin_token.clone()),
        ("KINDRED_SPACE", s.space.space_id.clone()),
    ];
    let out = tokio::task::spawn_blocking(move || {
        Command::new(tool)
            // Its cache goes in the working directory: keep it in target.
            .current_dir(env!("CARGO_TARGET_TMPDIR"))
            .envs(envs)
            .env("SCHEMATHESIS_TELEMETRY", "false")
            .args(["--config-file", config, "run", &url])
            .args([
                "--checks",
                "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance",
                // Revoking tokens would revoke the run's own credentials
                // (tests/tests/hardening.rs covers revocation).
                "--exclude-operation-id",
                "revoke_token",
                "--max-examples",
                "20",
                "--seed",
                "1",
                "--workers",
                "1",
                "--no-color",
            ])
            .output()
            .expect("schemathesis runs")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "schemathesis found failures:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // It tested every operation it selected: all but the excluded one
    // (and the document's own route, which it does not call).
    let operations = doc["paths"]
        .as_object()
        .unwrap()
        .values()
        .map(|p| p.as_object().unwrap().len())
        .sum::<usize>();
    let number_after = |label: &str| -> usize {
        let at = stdout
            .find(label)
            .unwrap_or_else(|| panic!("{label} in {stdout}"))
            + label.len();
        stdout[at..]
            .chars()
            .take_while(char::is_ascii_digit)
            .collect::<String>()
            .parse()
            .unwrap()
    };
    let (selected, tested) = (number_after("Selected: "), number_after("Tested: "));
    assert_eq!(tested, selected, "{stdout}");
    assert!(
        selected >= operations - 2,
        "{selected} of {operations}: {stdout}"
    );
    assert!(stdout.contains(" passed"), "{stdout}");
}
