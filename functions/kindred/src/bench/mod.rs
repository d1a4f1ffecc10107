//! `kindred bench`: the whole local pipeline under a realistic workload.
//! Events go through the HTTP batch endpoint into profiles; then the
//! Profile API is read at a fixed request rate. Prints figures; asserts
//! nothing about time.

pub mod compute;
pub mod privacy;
pub mod sync;
pub mod workload;

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use serde_json::{json, Value};
use tokio::sync::{mpsc, Mutex};

use crate::config::Config;
use crate::server::start;
use workload::Workload;

#[derive(Args, Clone, Debug)]
pub struct BenchArgs {
    /// Events to send through the batch endpoint.
    #[arg(long, default_value_t = 1_000_000)]
    pub events: usize,
    /// Distinct users in the workload (default: one per 20 events).
    #[arg(long)]
    pub users: Option<usize>,
    /// Events per batch request.
    #[arg(long, default_value_t = 100)]
    pub batch_size: usize,
    /// Concurrent HTTP connections sending batches.
    #[arg(long, default_value_t = 4)]
    pub connections: usize,
    /// Workload seed: the same seed sends the same events.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Profile API requests per second in the latency phase.
    #[arg(long, default_value_t = 1_000)]
    pub api_rate: u32,
    /// Length of the latency phase.
    #[arg(long, default_value_t = 10)]
    pub api_seconds: u64,
    /// Seconds to wait between ingest and the latency phase (lets the OS
    /// finish writing back what ingest dirtied); with
    /// `--api-during-ingest`, between the first batch and the phase.
    #[arg(long, default_value_t = 0)]
    pub api_delay: u64,
    /// Run the latency phase while ingest goes on at full speed (mixed
    /// load) instead of after it.
    #[arg(long)]
    pub api_during_ingest: bool,
    /// Data directory (default: a fresh temporary one, removed afterwards).
    #[arg(long)]
    pub data_dir: Option<std::path::PathBuf>,
    /// Define the 20 computed traits and audiences of
    /// [`crate::bench::compute::DEFINITIONS`] before ingest, then measure
    /// recompute and backfill over the profiles.
    #[arg(long)]
    pub definitions: bool,
    /// Instead of the pipeline: time the lookback sweep over this many
    /// profile states, of which `--due-percent` are due.
    #[arg(long)]
    pub sweep_profiles: Option<u64>,
    #[arg(long, default_value_t = 1.0)]
    pub due_percent: f64,
    /// Instead of the pipeline: measure sync to a local receiver over this
    /// many profiles (deliveries per second, change-to-delivery latency).
    #[arg(long)]
    pub sync_profiles: Option<usize>,
    /// Instead of the pipeline: time a SUPPRESS_WITH_DELETE regulation of
    /// this many people (each two merged profiles and five events).
    #[arg(long)]
    pub regulation_subjects: Option<usize>,
}

fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// Page cache waiting to be written back, machine-wide.
fn dirty_mib() -> Option<f64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|l| l.starts_with("Dirty:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    if let Some(n) = args.sweep_profiles {
        return crate::bench::compute::sweep(n, args.due_percent);
    }
    let temp = tempfile_dir()?;
    let data_dir = args.data_dir.clone().unwrap_or_else(|| temp.clone());
    let config = Config {
        data_dir: data_dir.clone(),
        listen: "127.0.0.1:0".parse()?,
        ingest_rate: u32::MAX,
        sync: kindred_sync::RetryPolicy::default(),
        // The sync bench's receiver is on 127.0.0.1.
        allow_private_destinations: true,
        limits: crate::config::ServerLimits::default(),
        public_url: None,
        metrics_listen: None,
    };
    let (running, created) = start(&config).await?;
    let space = match created {
        Some(s) => s,
        None => running
            .local
            .store
            .create_space(&format!("bench{}", std::process::id()))?,
    };
    if let Some(n) = args.regulation_subjects {
        let result = crate::bench::privacy::run(&running, &space, n.max(1)).await;
        running.stop().await?;
        if args.data_dir.is_none() {
            let _ = std::fs::remove_dir_all(&temp);
        }
        return result;
    }
    if let Some(n) = args.sync_profiles {
        let result = crate::bench::sync::run(&running, &space, n.max(1)).await;
        running.stop().await?;
        if args.data_dir.is_none() {
            let _ = std::fs::remove_dir_all(&temp);
        }
        return result;
    }
    let base = format!("http://{}", running.addr);
    if args.definitions {
        crate::bench::compute::define(&running, &space.space_id).await?;
    }
    let users = args.users.unwrap_or((args.events / 20).max(10));
    println!(
        "kindred bench: {} events, {} users, batches of {}, {} connections, seed {}",
        args.events, users, args.batch_size, args.connections, args.seed
    );

    // Batches are generated on a thread of their own while being sent, so
    // the workload never sits in memory whole.
    let (tx, rx) = mpsc::channel::<Vec<u8>>(64);
    let (events, batch_size, seed) = (args.events, args.batch_size.max(1), args.seed);
    let generator = std::thread::spawn(move || {
        // The generator stands for clients on other machines: it gives way
        // to the server's serving threads, as the ingest threads do.
        kindred_store::priority::lower_to("load generator", kindred_store::priority::INGEST);
        let mut workload = Workload::new(seed, users);
        let mut sent = 0;
        while sent < events {
            let n = batch_size.min(events - sent);
            let batch: Vec<Value> = (0..n).map(|_| workload.next_event()).collect();
            sent += n;
            let body = serde_json::to_vec(&json!({"batch": batch})).expect("serializable");
            if tx.blocking_send(body).is_err() {
                break;
            }
        }
    });
    let rx = Arc::new(Mutex::new(rx));
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(args.connections)
        .build()?;
    let started = Instant::now();
    let mut senders = Vec::new();
    for _ in 0..args.connections.max(1) {
        let (rx, client, url, key) = (
            Arc::clone(&rx),
            client.clone(),
            format!("{base}/v1/batch"),
            space.write_key.clone(),
        );
        senders.push(tokio::spawn(async move {
            let mut accepted = 0u64;
            loop {
                let body = { rx.lock().await.recv().await };
                let Some(body) = body else { break };
                let response = client
                    .post(&url)
                    .basic_auth(&key, Some(""))
                    .header("content-type", "application/json")
                    .body(body)
                    .send()
                    .await?;
                anyhow::ensure!(
                    response.status().is_success(),
                    "batch refused: {}",
                    response.status()
                );
                let reply: Value = response.json().await?;
                accepted += reply["accepted"].as_u64().unwrap_or(0);
            }
            Ok::<_, anyhow::Error>(accepted)
        }));
    }
    let phase = LatencyPhase {
        base: base.clone(),
        space_id: space.space_id.clone(),
        token: space.access_token.clone(),
        users,
        rate: args.api_rate.max(1),
        seconds: args.api_seconds.max(1),
    };
    let delay = Duration::from_secs(args.api_delay);
    let phase = if args.api_during_ingest {
        Phase::During(phase.start_apart(delay))
    } else {
        Phase::After(phase)
    };
    let mut accepted = 0;
    for s in senders {
        accepted += s.await??;
    }
    let _ = generator.join();
    let acked_at = started.elapsed();
    running.wait_identity().await?;
    let elapsed = started.elapsed();
    running.wait_compute().await?;
    let computed_at = started.elapsed();
    let stats = running.local.worker.stats();
    let rate = accepted as f64 / elapsed.as_secs_f64();
    println!();
    println!("ingest, end to end (HTTP batch -> durable queue -> identity -> profiles)");
    println!("  events accepted        {accepted}");
    println!(
        "  all acknowledged after {:.2} s ({:.0} events/s)",
        acked_at.as_secs_f64(),
        accepted as f64 / acked_at.as_secs_f64()
    );
    println!("  all in profiles after  {:.2} s", elapsed.as_secs_f64());
    println!("  end-to-end throughput  {rate:.0} events/s");
    if args.definitions {
        let c = running.local.compute.stats();
        println!(
            "  computed after         {:.2} s ({} profile recomputes, {} changes)",
            computed_at.as_secs_f64(),
            c.recomputed,
            c.changes
        );
    }
    println!(
        "  profiles created {}, merges {}, duplicates dropped {}, unresolved {}",
        stats.created, stats.merged, stats.duplicates, stats.unresolved
    );
    let rss_after_ingest = peak_rss_mib();
    if args.definitions {
        crate::bench::compute::recompute_and_backfill(
            &running,
            &data_dir,
            &space.space_id,
            accepted,
        )
        .await?;
    }

    let latency = match phase {
        Phase::During(during) => {
            println!();
            println!(
                "(the latency phase below ran while ingest did, from {} s after the first batch)",
                args.api_delay
            );
            LatencyPhase::finished(during).await?
        }
        Phase::After(phase) => {
            tokio::time::sleep(delay).await;
            println!();
            println!(
                "dirty page cache before the latency phase: {} MiB (after a {} s wait)",
                dirty_mib().map_or("?".into(), |d| format!("{d:.0}")),
                args.api_delay
            );
            LatencyPhase::finished(phase.start_apart(Duration::ZERO)).await?
        }
    };
    latency.print();
    println!();
    println!(
        "peak RSS: {:.0} MiB after ingest, {:.0} MiB at the end (server and load generator in one process)",
        rss_after_ingest.unwrap_or(0.0),
        peak_rss_mib().unwrap_or(0.0)
    );
    println!(
        "{}",
        json!({
            "events": accepted, "end_to_end_events_per_s": rate.round(),
            "peak_rss_mib": peak_rss_mib().map(f64::round),
            "api_p50_ms": ms(percentile(&latency.latencies, 0.50)),
            "api_p99_ms": ms(percentile(&latency.latencies, 0.99)),
            "api_during_ingest": args.api_during_ingest,
        })
    );
    running.stop().await?;
    if args.data_dir.is_none() {
        let _ = std::fs::remove_dir_all(&temp);
    }
    Ok(())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Profile API requests at a fixed rate; latency is measured from each
/// request's scheduled send time, so a slow response delays no
/// measurement.
struct LatencyPhase {
    base: String,
    space_id: String,
    token: String,
    users: usize,
    rate: u32,
    seconds: u64,
}

/// The latency phase, started alongside ingest or waiting for its end.
enum Phase {
    During(std::thread::JoinHandle<anyhow::Result<Latency>>),
    After(LatencyPhase),
}

/// What a latency phase measured.
struct Latency {
    rate: u32,
    seconds: u64,
    /// From the scheduled send, sorted.
    latencies: Vec<Duration>,
    /// From the actual send, sorted.
    from_send: Vec<Duration>,
    per_second: Vec<Vec<Duration>>,
    failures: usize,
    elapsed: Duration,
}

impl LatencyPhase {
    /// Starts the phase after `delay` on a thread and runtime of its own,
    /// as a client on another machine: the server's tasks (and the ingest
    /// senders') never hold up its timers or the reading of its replies.
    fn start_apart(self, delay: Duration) -> std::thread::JoinHandle<anyhow::Result<Latency>> {
        std::thread::spawn(move || {
            std::thread::sleep(delay);
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?
                .block_on(self.run())
        })
    }

    async fn finished(
        phase: std::thread::JoinHandle<anyhow::Result<Latency>>,
    ) -> anyhow::Result<Latency> {
        tokio::task::spawn_blocking(move || phase.join())
            .await?
            .map_err(|_| anyhow::anyhow!("the latency phase panicked"))?
    }

    async fn run(self) -> anyhow::Result<Latency> {
        let client = reqwest::Client::new();
        let total = u64::from(self.rate) * self.seconds;
        let interval = Duration::from_secs_f64(1.0 / f64::from(self.rate));
        let resources = ["traits", "external_ids", "metadata", "events?limit=10"];
        let mut tasks = Vec::with_capacity(total as usize);
        let started = Instant::now();
        for i in 0..total {
            let due = started + interval * i as u32;
            tokio::time::sleep_until(due.into()).await;
            let user = (i as usize * 7919) % self.users;
            let url = format!(
                "{}/v1/spaces/{}/collections/users/profiles/user_id:user-{user}/{}",
                self.base,
                self.space_id,
                resources[i as usize % resources.len()]
            );
            let (client, token) = (client.clone(), self.token.clone());
            tasks.push(tokio::spawn(async move {
                let sent = Instant::now();
                let response = client.get(&url).basic_auth(&token, Some("")).send().await;
                let ok = match response {
                    Ok(r) => {
                        let status = r.status();
                        let _ = r.bytes().await;
                        status.is_success() || status == reqwest::StatusCode::NOT_FOUND
                    }
                    Err(_) => false,
                };
                (i, due.elapsed(), sent.elapsed(), ok)
            }));
        }
        let mut latency = Latency {
            rate: self.rate,
            seconds: self.seconds,
            latencies: Vec::with_capacity(tasks.len()),
            from_send: Vec::with_capacity(tasks.len()),
            per_second: vec![Vec::new(); self.seconds as usize],
            failures: 0,
            elapsed: Duration::ZERO,
        };
        for t in tasks {
            let (i, scheduled, sent, ok) = t.await?;
            latency.latencies.push(scheduled);
            latency.from_send.push(sent);
            latency.per_second[(i / u64::from(self.rate)) as usize].push(scheduled);
            latency.failures += usize::from(!ok);
        }
        latency.elapsed = started.elapsed();
        latency.latencies.sort();
        latency.from_send.sort();
        for second in &mut latency.per_second {
            second.sort();
        }
        Ok(latency)
    }
}

impl Latency {
    fn print(&self) {
        println!();
        println!(
            "Profile API at {} requests/s for {} s (traits, external_ids, metadata, events)",
            self.rate, self.seconds
        );
        println!(
            "  requests {}, failed {}, achieved {:.0}/s",
            self.latencies.len(),
            self.failures,
            self.latencies.len() as f64 / self.elapsed.as_secs_f64()
        );
        let at = |sorted: &[Duration], p| ms(percentile(sorted, p));
        println!(
            "  latency from the scheduled send: p50 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms, max {:.2} ms",
            at(&self.latencies, 0.50),
            at(&self.latencies, 0.99),
            at(&self.latencies, 0.999),
            at(&self.latencies, 1.0)
        );
        println!(
            "  from the request's send (the runtime's timer fires up to 1 ms after the scheduled time): p50 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms",
            at(&self.from_send, 0.50),
            at(&self.from_send, 0.99),
            at(&self.from_send, 0.999),
        );
        println!("  p99 per second of the phase (ms):");
        let mut line = String::from("   ");
        for second in &self.per_second {
            line.push_str(&format!(" {:.1}", at(second, 0.99)));
        }
        println!("{line}");
    }
}

fn tempfile_dir() -> anyhow::Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!("kindred-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}
