//! `kindred bench --regulation-subjects N`: how long SUPPRESS_WITH_DELETE
//! takes for N people, each a merge tree of two profiles (a device and a
//! user) with a few events, among as many people who stay.
//!
//! Prints figures; asserts nothing about time.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::{json, Value};

use crate::server::Running;

/// Events per person: a page as a device, an identify joining the device
/// to the user (a merge), and three tracks.
fn person(i: usize, prefix: &str) -> Vec<Value> {
    let user = format!("{prefix}-{i}");
    let device = format!("{prefix}-device-{i}");
    let mut events = vec![
        json!({"type": "track", "userId": user, "event": "Signed Up"}),
        json!({"type": "page", "anonymousId": device, "name": "Home"}),
        json!({"type": "identify", "userId": user, "anonymousId": device,
               "traits": {"email": format!("{user}@example.com"), "plan": "pro"}}),
    ];
    for n in 0..2 {
        events.push(
            json!({"type": "track", "userId": user, "event": "Order Completed",
                           "properties": {"revenue": n}}),
        );
    }
    events
}

pub async fn run(
    running: &Running,
    space: &kindred_store::NewSpace,
    n: usize,
) -> anyhow::Result<()> {
    let base = format!("http://{}", running.addr);
    let client = reqwest::Client::new();
    println!("kindred bench --regulation-subjects {n}: people of 2 merged profiles and 5 events each, as many kept");
    let started = Instant::now();
    for prefix in ["gone", "kept"] {
        let events: Vec<Value> = (0..n).flat_map(|i| person(i, prefix)).collect();
        for chunk in events.chunks(500) {
            let r = client
                .post(format!("{base}/v1/batch"))
                .basic_auth(&space.write_key, Some(""))
                .json(&json!({ "batch": chunk }))
                .send()
                .await?;
            if !r.status().is_success() {
                bail!("batch refused: {}", r.status());
            }
        }
    }
    running.wait_idle().await?;
    println!(
        "  ingested {} events in {:.1} s",
        2 * 5 * n,
        started.elapsed().as_secs_f64()
    );

    let url = format!("{base}/v1/spaces/{}/regulations", space.space_id);
    let started = Instant::now();
    let mut ids = Vec::new();
    let subjects: Vec<String> = (0..n).map(|i| format!("gone-{i}")).collect();
    for chunk in subjects.chunks(5_000) {
        let r = client
            .post(&url)
            .basic_auth(&space.admin_token, Some(""))
            .json(
                &json!({"regulation_type": "SUPPRESS_WITH_DELETE", "subject_type": "USER_ID",
                          "subject_ids": chunk}),
            )
            .send()
            .await?;
        let body: Value = r.json().await?;
        ids.push(body["id"].as_str().context("a regulation id")?.to_string());
    }
    let mut deleted = 0;
    for id in &ids {
        loop {
            let body: Value = client
                .get(format!("{url}/{id}"))
                .basic_auth(&space.admin_token, Some(""))
                .send()
                .await?
                .json()
                .await?;
            match body["status"].as_str() {
                Some("finished") => {
                    deleted += body["profiles_deleted"].as_u64().unwrap_or(0);
                    break;
                }
                Some("failed") => bail!("the regulation failed: {body}"),
                _ => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }
    let took = started.elapsed().as_secs_f64();
    println!("  SUPPRESS_WITH_DELETE of {n} subjects: {took:.2} s ({:.0} subjects/s), {deleted} profiles deleted", n as f64 / took);
    let kept = client
        .get(format!(
            "{base}/v1/spaces/{}/collections/users/profiles/user_id:kept-0/traits",
            space.space_id
        ))
        .basic_auth(&space.access_token, Some(""))
        .send()
        .await?;
    if !kept.status().is_success() {
        bail!("a kept person is gone: {}", kept.status());
    }
    Ok(())
}
