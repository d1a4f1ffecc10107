//! Crash safety: `kindred serve` is killed with SIGKILL while a client is
//! sending batches; after a restart, every acknowledged event is in the
//! profiles exactly once (SPEC 2: nothing acknowledged may ever be lost).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

const EVENTS_PER_BATCH: usize = 50;

fn kindred_bin() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().and_then(Path::parent).unwrap();
    let bin = dir.join("kindred");
    if !bin.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "-p", "kindred", "--bin", "kindred"])
            .status()
            .unwrap();
        assert!(status.success(), "building the kindred binary failed");
    }
    bin
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn serve(data_dir: &Path, port: u16) -> Child {
    Command::new(kindred_bin())
        .args(["serve", "--data-dir"])
        .arg(data_dir)
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

async fn wait_healthy(client: &reqwest::Client, base: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if let Ok(r) = client.get(format!("{base}/healthz")).send().await {
            if r.status().is_success() {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("kindred did not become healthy");
}

fn batch(n: usize) -> Value {
    let events: Vec<Value> = (0..EVENTS_PER_BATCH)
        .map(|i| {
            json!({"type": if i == 0 { "identify" } else { "track" }, "event": "Crash Test",
                   "userId": format!("u-{n}"), "anonymousId": format!("a-{n}"),
                   "messageId": format!("b{n}-{i}"), "properties": {"i": i}})
        })
        .collect();
    json!({"batch": events})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_while_sending_loses_no_acknowledged_event() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(kindred_bin())
        .args(["space", "create", "crash", "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(out.status.success());
    let space: Value = serde_json::from_slice(&out.stdout).unwrap();
    let write_key = space["write_key"].as_str().unwrap().to_string();
    let access = space["access_token"].as_str().unwrap().to_string();
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();

    let acked = Arc::new(Mutex::new(BTreeSet::new()));
    let mut next_batch = 0;
    for round in 0..3 {
        let mut child = serve(dir.path(), port);
        wait_healthy(&client, &base).await;
        let stop = Arc::new(AtomicBool::new(false));
        let mut senders = Vec::new();
        // Four concurrent clients, each sending its own batches.
        for lane in 0..4 {
            let (client, base, key, acked, stop) = (
                client.clone(),
                base.clone(),
                write_key.clone(),
                Arc::clone(&acked),
                Arc::clone(&stop),
            );
            let first = next_batch + lane;
            senders.push(tokio::spawn(async move {
                let mut n = first;
                while !stop.load(Ordering::Relaxed) {
                    let sent = client
                        .post(format!("{base}/v1/batch"))
                        .basic_auth(&key, Some(""))
                        .json(&batch(n))
                        .send()
                        .await;
                    match sent {
                        Ok(r) if r.status().is_success() => {
                            acked.lock().unwrap().insert(n);
                        }
                        _ => break,
                    }
                    n += 4;
                }
                n
            }));
        }
        tokio::time::sleep(Duration::from_millis(700 + 300 * round)).await;
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        stop.store(true, Ordering::Relaxed);
        for s in senders {
            next_batch = next_batch.max(s.await.unwrap());
        }
        next_batch += 4;
    }

    let acked: Vec<usize> = acked.lock().unwrap().iter().copied().collect();
    assert!(
        acked.len() > 10,
        "the client got batches acknowledged before the kills"
    );
    let mut child = serve(dir.path(), port);
    wait_healthy(&client, &base).await;
    let deadline = Instant::now() + Duration::from_secs(120);
    for &n in &acked {
        loop {
            let r: Value = client
                .get(format!("{base}/v1/spaces/crash/collections/users/profiles/user_id:u-{n}/events?limit=200"))
                .basic_auth(&access, Some(""))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            let ids: Vec<String> = r["data"]
                .as_array()
                .map(|d| {
                    d.iter()
                        .map(|e| e["messageId"].as_str().unwrap().to_string())
                        .collect()
                })
                .unwrap_or_default();
            let unique: BTreeSet<&String> = ids.iter().collect();
            assert_eq!(
                unique.len(),
                ids.len(),
                "batch {n}: an event was applied twice"
            );
            if ids.len() == EVENTS_PER_BATCH {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "batch {n}: {} of {EVENTS_PER_BATCH} events",
                ids.len()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    println!(
        "{} acknowledged batches all present exactly once after 3 SIGKILLs",
        acked.len()
    );
    child.kill().unwrap();
    child.wait().unwrap();
}

/// A regulation whose run is killed part way resumes when Kindred starts
/// again, and ends with every subject done once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_regulation_killed_mid_run_resumes_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(kindred_bin())
        .args(["space", "create", "regulated", "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(out.status.success());
    let space: Value = serde_json::from_slice(&out.stdout).unwrap();
    let admin = space["admin_token"].as_str().unwrap().to_string();
    let write_key = space["write_key"].as_str().unwrap().to_string();
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();
    let regulations = format!("{base}/v1/spaces/regulated/regulations");

    let mut child = serve(dir.path(), port);
    wait_healthy(&client, &base).await;
    // People to delete, so each subject has work to do.
    let events: Vec<Value> = (0..500)
        .map(|i| json!({"type": "identify", "userId": format!("p-{i}"), "traits": {"n": i}}))
        .collect();
    let r = client
        .post(format!("{base}/v1/batch"))
        .basic_auth(&write_key, Some(""))
        .json(&json!({ "batch": events }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let subjects: Vec<String> = (0..5_000).map(|i| format!("p-{i}")).collect();
    let r = client
        .post(&regulations)
        .basic_auth(&admin, Some(""))
        .json(
            &json!({"regulation_type": "SUPPRESS_WITH_DELETE", "subject_type": "USER_ID",
                      "subject_ids": subjects}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let id = r.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let show = |client: reqwest::Client, url: String, admin: String| async move {
        client
            .get(url)
            .basic_auth(admin, Some(""))
            .send()
            .await
            .unwrap()
            .json::<Value>()
            .await
            .unwrap()
    };
    // Killed once some, not all, subjects are done.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let body = show(client.clone(), format!("{regulations}/{id}"), admin.clone()).await;
        if body["subjects_by_status"]["finished"].as_u64().unwrap_or(0) > 0 {
            assert_ne!(
                body["status"], "finished",
                "killed before the end: {}",
                body["subjects_by_status"]
            );
            break;
        }
        assert!(Instant::now() < deadline, "no subject finished");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    child.kill().unwrap();
    child.wait().unwrap();

    let mut child = serve(dir.path(), port);
    wait_healthy(&client, &base).await;
    let deadline = Instant::now() + Duration::from_secs(120);
    let body = loop {
        let body = show(client.clone(), format!("{regulations}/{id}"), admin.clone()).await;
        if body["status"] == "finished" {
            break body;
        }
        assert!(Instant::now() < deadline, "{}", body["subjects_by_status"]);
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(
        body["subjects_by_status"]["finished"], 5_000,
        "{}",
        body["subjects_by_status"]
    );
    // (A subject whose delete committed before the kill, but that was not
    // yet marked done, deletes nothing when it runs again: the count
    // covers the last run of each subject.)
    let deleted = body["profiles_deleted"].as_u64().unwrap();
    assert!(deleted <= 500, "{deleted}");
    let access = space["access_token"].as_str().unwrap();
    for i in 0..500 {
        let r = client
            .get(format!(
                "{base}/v1/spaces/regulated/collections/users/profiles/user_id:p-{i}/traits"
            ))
            .basic_auth(access, Some(""))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 404, "p-{i} was deleted");
    }
    child.kill().unwrap();
    child.wait().unwrap();
}
