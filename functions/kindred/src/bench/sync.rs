//! `kindred bench --sync-profiles N`: sync to a local receiver (an HTTP
//! server in this process that accepts everything).
//!
//! 1. **Deliveries per second**: N profiles each with a computed trait and
//!    an audience membership; a webhook destination created afterwards
//!    first gets every current value (initial sync): the time from its
//!    creation until the receiver has every call.
//! 2. **Latency**: with the destination live, events arrive at a steady
//!    rate; for each call, the time from the change being logged (the
//!    call's `timestamp`) to the receiver getting it.
//!
//! Prints figures; asserts nothing about time.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use axum::body::Bytes;
use axum::extract::State;
use axum::routing::post;
use serde_json::{json, Value};

use crate::server::Running;

#[derive(Default)]
struct Received {
    calls: AtomicU64,
    requests: AtomicU64,
    /// Change-to-delivery latencies, in ms, while recording.
    latencies: Mutex<Vec<i64>>,
    recording: std::sync::atomic::AtomicBool,
}

async fn receive(State(r): State<Arc<Received>>, body: Bytes) -> &'static str {
    let now = kindred_store::now_millis();
    let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let calls: Vec<Value> = match v.get("batch") {
        Some(Value::Array(a)) => a.clone(),
        _ => vec![v],
    };
    r.requests.fetch_add(1, Ordering::Relaxed);
    r.calls.fetch_add(calls.len() as u64, Ordering::Relaxed);
    if r.recording.load(Ordering::Relaxed) {
        let mut l = r.latencies.lock().unwrap_or_else(|p| p.into_inner());
        for c in &calls {
            if let Some(at) = c["timestamp"]
                .as_str()
                .and_then(kindred_domain::event::parse_time)
            {
                l.push(now - at);
            }
        }
    }
    "{}"
}

fn percentile(sorted: &[i64], p: f64) -> i64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

async fn admin(
    client: &reqwest::Client,
    base: &str,
    token: &str,
    path: &str,
    body: Value,
) -> anyhow::Result<()> {
    let r = client
        .put(format!("{base}{path}"))
        .basic_auth(token, Some(""))
        .json(&body)
        .send()
        .await?;
    if !r.status().is_success() {
        bail!("PUT {path}: {} {}", r.status(), r.text().await?);
    }
    Ok(())
}

async fn send(
    client: &reqwest::Client,
    base: &str,
    write_key: &str,
    events: Vec<Value>,
) -> anyhow::Result<()> {
    let r = client
        .post(format!("{base}/v1/batch"))
        .basic_auth(write_key, Some(""))
        .json(&json!({ "batch": events }))
        .send()
        .await?;
    if !r.status().is_success() {
        bail!("batch: {}", r.status());
    }
    Ok(())
}

fn order(user: usize) -> Value {
    json!({"type": "track", "userId": format!("bench-user-{user}"), "event": "Order Completed",
           "properties": {"revenue": 25}})
}

pub async fn run(
    running: &Running,
    space: &kindred_store::NewSpace,
    profiles: usize,
) -> anyhow::Result<()> {
    let base = format!("http://{}", running.addr);
    let client = reqwest::Client::new();
    let space_path = format!("/v1/spaces/{}", space.space_id);
    admin(
        &client,
        &base,
        &space.admin_token,
        &format!("{space_path}/computed_traits/order_count"),
        json!({"type": "event_counter", "event": "Order Completed"}),
    )
    .await?;
    admin(
        &client,
        &base,
        &space.admin_token,
        &format!("{space_path}/audiences/buyers"),
        json!({"condition": {"performed": {"event": "Order Completed"}}}),
    )
    .await?;

    let received = Arc::new(Received::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let receiver = format!("http://{}/hook", listener.local_addr()?);
    let app = axum::Router::new()
        .route("/hook", post(receive))
        .with_state(Arc::clone(&received));
    tokio::spawn(async move { axum::serve(listener, app).await });

    println!("kindred bench: sync to a local receiver, {profiles} profiles");
    for chunk in (0..profiles).collect::<Vec<_>>().chunks(500) {
        send(
            &client,
            &base,
            &space.write_key,
            chunk.iter().map(|u| order(*u)).collect(),
        )
        .await?;
    }
    running.wait_idle().await?;

    // 1. Initial sync: 2 values per profile, identify + track each.
    let expected = (profiles * 4) as u64;
    let started = Instant::now();
    admin(
        &client,
        &base,
        &space.admin_token,
        &format!("{space_path}/destinations/bench"),
        json!({"kind": "webhook", "url": receiver, "secret": "bench-secret", "batch_size": 100}),
    )
    .await
    .context("creating the destination")?;
    while received.calls.load(Ordering::Relaxed) < expected {
        if started.elapsed() > Duration::from_secs(600) {
            bail!(
                "only {} of {expected} calls arrived",
                received.calls.load(Ordering::Relaxed)
            );
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let took = started.elapsed().as_secs_f64();
    let per_s = expected as f64 / took;
    println!("\ndeliveries (initial sync of a new webhook destination, batches of 100)");
    println!(
        "  {expected} calls in {} requests, {took:.2} s: {:.0} calls/s",
        received.requests.load(Ordering::Relaxed),
        per_s
    );

    // 2. Latency at a steady rate: each event makes one change (the
    //    counter) for a profile already in the audience.
    let rate = 500usize;
    let seconds = 10usize;
    received.recording.store(true, Ordering::Relaxed);
    let before = received.calls.load(Ordering::Relaxed);
    let tick = Duration::from_millis(100);
    let per_tick = rate / 10;
    let mut next = Instant::now();
    for t in 0..seconds * 10 {
        let events: Vec<Value> = (0..per_tick)
            .map(|i| order((t * per_tick + i) % profiles))
            .collect();
        send(&client, &base, &space.write_key, events).await?;
        next += tick;
        tokio::time::sleep_until(next.into()).await;
    }
    let target = before + (seconds * rate * 2) as u64;
    let waited = Instant::now();
    while received.calls.load(Ordering::Relaxed) < target
        && waited.elapsed() < Duration::from_secs(60)
    {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut l = received
        .latencies
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    l.sort_unstable();
    println!("\nchange-to-delivery latency ({rate} events/s for {seconds} s, each one change, identify + track)");
    println!(
        "  calls {}, p50 {} ms, p99 {} ms, max {} ms",
        l.len(),
        percentile(&l, 0.5),
        percentile(&l, 0.99),
        l.last().copied().unwrap_or(0)
    );
    println!(
        "{}",
        json!({"sync_calls_per_s": per_s.round(), "sync_p99_ms": percentile(&l, 0.99)})
    );
    Ok(())
}
