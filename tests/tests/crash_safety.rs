//! Crash safety: `kindred serve` is killed with SIGKILL while a client is
//! sending batches; after a restart, every acknowledged event is in the
//! profiles exactly once (SPEC 2: nothing acknowledged may ever be lost).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
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

/// The message ids of every event in the store's events table (read
/// from the files directly, while no server runs).
fn applied(dir: &Path) -> BTreeSet<String> {
    let conn = rusqlite::Connection::open(dir.join("store.db")).unwrap();
    let mut stmt = conn.prepare("SELECT message_id FROM events").unwrap();
    let ids = stmt
        .query_map([], |r| r.get::<_, String>(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    ids
}

/// How many of batch `n`'s events are in `ids`.
fn of_batch(ids: &BTreeSet<String>, n: usize) -> usize {
    (0..EVENTS_PER_BATCH)
        .filter(|i| ids.contains(&format!("b{n}-{i}")))
        .count()
}

/// What one sending lane saw in a round.
#[derive(Default)]
struct Lane {
    acked: Vec<usize>,
    /// The batch whose request was under way when the server died (sent,
    /// no answer): it must end up all applied or not at all.
    in_flight: Option<usize>,
    next: usize,
}

async fn send_until_it_fails(
    client: reqwest::Client,
    base: String,
    key: String,
    first: usize,
    step: usize,
) -> Lane {
    let mut lane = Lane {
        next: first,
        ..Lane::default()
    };
    loop {
        let n = lane.next;
        lane.next += step;
        match client
            .post(format!("{base}/v1/batch"))
            .basic_auth(&key, Some(""))
            .json(&batch(n))
            .send()
            .await
        {
            Ok(r) if r.status().is_success() => lane.acked.push(n),
            Ok(r) => panic!("batch {n}: {}", r.status()),
            // Refused: the server was already gone, nothing was sent.
            Err(e) if e.is_connect() => return lane,
            Err(_) => {
                lane.in_flight = Some(n);
                return lane;
            }
        }
    }
}

/// Three rounds of: start, send from eight clients at once, SIGKILL. In
/// every round some acknowledged batches must still have been waiting in
/// the queue when the kill landed (read from the files before the
/// restart), and some batch must have been in flight; after the last
/// restart every acknowledged event is applied exactly once and every
/// in-flight batch is there whole or not at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_while_sending_loses_no_acknowledged_event() {
    const LANES: usize = 8;
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

    let mut acked: BTreeSet<usize> = BTreeSet::new();
    let mut in_flight: Vec<usize> = Vec::new();
    let mut next_batch = 0;
    for round in 0..3 {
        let mut child = serve(dir.path(), port);
        wait_healthy(&client, &base).await;
        let lanes: Vec<_> = (0..LANES)
            .map(|lane| {
                tokio::spawn(send_until_it_fails(
                    client.clone(),
                    base.clone(),
                    write_key.clone(),
                    next_batch + lane,
                    LANES,
                ))
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(700 + 300 * round)).await;
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        let mut round_acked = Vec::new();
        let mut round_in_flight = 0;
        for lane in lanes {
            let lane = lane.await.unwrap();
            next_batch = next_batch.max(lane.next);
            round_acked.extend(lane.acked);
            if let Some(n) = lane.in_flight {
                in_flight.push(n);
                round_in_flight += 1;
            }
        }
        next_batch += LANES;
        let stored = applied(dir.path());
        let waiting = round_acked
            .iter()
            .filter(|n| of_batch(&stored, **n) < EVENTS_PER_BATCH)
            .count();
        println!(
            "round {round}: {} batches acknowledged, {waiting} of them not yet applied at the kill, {round_in_flight} in flight",
            round_acked.len()
        );
        assert!(
            waiting > 0,
            "round {round}: every acknowledged batch was already applied, so the kill tested nothing of the queue"
        );
        assert!(
            round_in_flight > 0,
            "round {round}: no request was in flight at the kill"
        );
        acked.extend(round_acked);
    }

    let mut child = serve(dir.path(), port);
    wait_healthy(&client, &base).await;
    let deadline = Instant::now() + Duration::from_secs(120);
    for &n in &acked {
        loop {
            let r: Value = client
                .get(format!("{base}/v1/spaces/crash/collections/users/profiles/user_id:u-{n}/events?limit=100"))
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
                        .map(|e| e["message_id"].as_str().unwrap().to_string())
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
    // Everything queued is applied once the identity step has no lag.
    wait_applied(&client, &base, deadline).await;
    child.kill().unwrap();
    child.wait().unwrap();
    let stored = applied(dir.path());
    for &n in &in_flight {
        let found = of_batch(&stored, n);
        assert!(
            found == 0 || found == EVENTS_PER_BATCH,
            "in-flight batch {n}: {found} of {EVENTS_PER_BATCH} events"
        );
    }
    println!(
        "{} acknowledged batches all present exactly once after 3 SIGKILLs; {} in-flight batches whole or absent",
        acked.len(),
        in_flight.len()
    );
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

/// Sends batches `first, first + step, …` until `stop` is set or the
/// server is gone, adding each acknowledged one to `acked`.
async fn send_into(
    client: reqwest::Client,
    base: String,
    key: String,
    (first, step): (usize, usize),
    acked: std::sync::Arc<std::sync::Mutex<BTreeSet<usize>>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) {
    let mut n = first;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
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
            _ => return,
        }
        n += step;
    }
}

/// Waits until the server has applied everything it acknowledged (fails
/// after `deadline`).
async fn wait_applied(client: &reqwest::Client, base: &str, deadline: Instant) {
    loop {
        let h: Value = client
            .get(format!("{base}/healthz"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if h["queue_lag_events"] == 0 {
            return;
        }
        assert!(Instant::now() < deadline, "not applied: {h}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn kindred(args: &[&str], dirs: &[&Path]) -> std::process::Output {
    let mut cmd = Command::new(kindred_bin());
    cmd.args(args);
    for d in dirs {
        cmd.arg(d);
    }
    cmd.output().unwrap()
}

/// `kindred backup` of a running server while clients send: restored
/// into a new data directory, every event acknowledged before the
/// backup began is there, applied exactly once, and the restored server
/// goes on numbering and applying new events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_taken_under_load_restores_every_event_acknowledged_before_it() {
    const LANES: usize = 4;
    let dir = tempfile::tempdir().unwrap();
    let out = kindred(
        &["space", "create", "backed-up", "--data-dir"],
        &[dir.path()],
    );
    assert!(out.status.success());
    let space: Value = serde_json::from_slice(&out.stdout).unwrap();
    let write_key = space["write_key"].as_str().unwrap().to_string();
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();
    let mut child = serve(dir.path(), port);
    wait_healthy(&client, &base).await;

    let acked = std::sync::Arc::new(std::sync::Mutex::new(BTreeSet::new()));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let lanes: Vec<_> = (0..LANES)
        .map(|lane| {
            tokio::spawn(send_into(
                client.clone(),
                base.clone(),
                write_key.clone(),
                (lane, LANES),
                acked.clone(),
                stop.clone(),
            ))
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(800)).await;
    let before: BTreeSet<usize> = acked.lock().unwrap().clone();
    let backup = tempfile::tempdir().unwrap();
    let dest = backup.path().join("snapshot");
    let (data, to) = (dir.path().to_path_buf(), dest.clone());
    let out =
        tokio::task::spawn_blocking(move || kindred(&["backup", "--data-dir"], &[&data, &to]))
            .await
            .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let during = acked.lock().unwrap().len() - before.len();
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for lane in lanes {
        lane.await.unwrap();
    }
    child.kill().unwrap();
    child.wait().unwrap();
    println!(
        "{} batches acknowledged before the backup, {during} while it ran",
        before.len()
    );
    assert!(
        !before.is_empty() && during > 0,
        "the backup ran under load"
    );

    // A restore refuses a data directory with data in it, and a
    // directory that is not a backup, naming them.
    let refused = |out: std::process::Output, why: &str| {
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(!out.status.success() && stderr.contains(why), "{stderr}");
    };
    refused(
        kindred(&["restore", "--data-dir"], &[dir.path(), &dest]),
        "is not empty",
    );
    let restored = tempfile::tempdir().unwrap();
    let target = restored.path().join("data");
    refused(
        kindred(&["restore", "--data-dir"], &[&target, dir.path()]),
        "is not a Kindred backup",
    );
    let out = kindred(&["restore", "--data-dir"], &[&target, &dest]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let mut child = serve(&target, port);
    wait_healthy(&client, &base).await;
    wait_applied(&client, &base, Instant::now() + Duration::from_secs(120)).await;
    // New events after the restore are numbered after what was applied.
    let fresh = 1_000_000;
    let r = client
        .post(format!("{base}/v1/batch"))
        .basic_auth(&write_key, Some(""))
        .json(&batch(fresh))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success());
    wait_applied(&client, &base, Instant::now() + Duration::from_secs(120)).await;
    child.kill().unwrap();
    child.wait().unwrap();

    let stored = applied(&target);
    let missing: Vec<&usize> = before
        .iter()
        .filter(|n| of_batch(&stored, **n) < EVENTS_PER_BATCH)
        .collect();
    assert!(
        missing.is_empty(),
        "acknowledged before the backup, lost: {missing:?}"
    );
    assert_eq!(of_batch(&stored, fresh), EVENTS_PER_BATCH, "the new batch");
    let conn = rusqlite::Connection::open(target.join("store.db")).unwrap();
    let (all, distinct): (i64, i64) = conn
        .query_row(
            "SELECT count(*), count(DISTINCT message_id) FROM events",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!(all, distinct, "each event once");
}

/// `kindred serve` on a data directory from a newer Kindred stops at
/// once with a message that says what to run, instead of changing it.
#[test]
fn serve_refuses_a_data_directory_from_a_newer_kindred() {
    let dir = tempfile::tempdir().unwrap();
    let raw = rusqlite::Connection::open(dir.path().join("store.db")).unwrap();
    raw.pragma_update(None, "user_version", kindred_sqlite::DATA_FORMAT + 1)
        .unwrap();
    let port = free_port().to_string();
    let out = Command::new(kindred_bin())
        .args([
            "serve",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--data-dir",
        ])
        .arg(dir.path())
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("written by a newer Kindred"), "{stderr}");
    assert!(stderr.contains("kindred restore"), "{stderr}");
}
