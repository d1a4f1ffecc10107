//! `GET /metrics` of `kindred serve --metrics-listen ADDR`: the process's
//! figures in the Prometheus text format, on an address of their own.
//!
//! They are the whole process's, every space's together, so they are not
//! on the API's port, where a space's token would read other spaces'
//! traffic: operators bind the metrics address where only their scraper
//! reaches it (the default is none; `127.0.0.1:9464` is a usual choice).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::http::header::CONTENT_TYPE;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use kindred_store::metrics::{global, Exposition, Sample};
use kindred_store::HealthCheck;

use crate::server::Local;

/// What `/metrics` reads when scraped.
#[derive(Clone)]
pub struct Sources {
    pub store: Arc<kindred_sqlite::SqliteStore>,
    pub worker: Arc<kindred_sqlite::IdentityWorker>,
    pub health: Arc<crate::server::LocalHealth>,
    pub deliveries: Arc<kindred_sync::DeliveryStats>,
    pub data_dir: std::path::PathBuf,
}

impl Sources {
    pub fn of(local: &Local, data_dir: &std::path::Path) -> Self {
        Self {
            store: Arc::clone(&local.store),
            worker: Arc::clone(&local.worker),
            health: Arc::clone(&local.health),
            deliveries: Arc::clone(&local.deliverer.stats),
            data_dir: data_dir.to_path_buf(),
        }
    }
}

pub fn router(sources: Sources) -> Router {
    Router::new().route(
        "/metrics",
        get(move || {
            let sources = sources.clone();
            async move {
                (
                    [(CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
                    render(&sources).await,
                )
                    .into_response()
            }
        }),
    )
}

fn one(value: f64) -> Vec<Sample> {
    vec![(vec![], value)]
}

/// The exposition: what was counted as it went, then what is read now.
pub async fn render(sources: &Sources) -> String {
    let mut out = Exposition::default();
    global().render(&mut out);

    let stats = sources.worker.stats();
    let applied: Vec<Sample> = [
        ("recorded", stats.recorded),
        ("duplicate", stats.duplicates),
        ("unresolved", stats.unresolved),
        ("suppressed", stats.suppressed),
        ("dead_lettered", stats.dead_lettered),
    ]
    .into_iter()
    .map(|(outcome, n)| (vec![("outcome", outcome.to_string())], n as f64))
    .collect();
    out.counter(
        "kindred_events_applied_total",
        "Queued events the identity worker has taken off the queue since start, by outcome \
         (recorded on a profile or unattached, dropped as a duplicate or as a suppressed \
         person's, set aside after failing).",
        &applied,
    );
    out.counter(
        "kindred_profiles_created_total",
        "Profiles created since start.",
        &one(stats.created as f64),
    );
    out.counter(
        "kindred_merges_total",
        "Profiles merged into another since start.",
        &one(stats.merged as f64),
    );

    let refused: Vec<Sample> = stats
        .refused
        .iter()
        .map(|(rule, n)| (vec![("rule", rule.clone())], *n as f64))
        .collect();
    out.counter(
        "kindred_identifiers_refused_total",
        "Identifiers left out of an event's resolution since start, by rule: merge protection \
         (limit, merge_cap, identifier_cap, identifier_bytes) or a blocked value (blocked_value). \
         The violations log has each one.",
        &refused,
    );

    let report = sources.health.health().await;
    let mut events = Vec::new();
    let mut seconds = Vec::new();
    for (stage, n, s) in &report.lags {
        events.push((vec![("stage", stage.to_string())], *n as f64));
        seconds.push((vec![("stage", stage.to_string())], *s));
    }
    out.gauge(
        "kindred_lag_events",
        "Work accepted and not yet done, by stage: queue (identity), compute, sync (fan-out).",
        &events,
    );
    out.gauge(
        "kindred_lag_seconds",
        "Age of the oldest work not yet done, by stage.",
        &seconds,
    );
    let down: Vec<Sample> = report
        .down
        .iter()
        .map(|(worker, _)| (vec![("worker", worker.clone())], 1.0))
        .collect();
    out.gauge(
        "kindred_worker_down",
        "1 for each background worker that is failing (see /healthz for why).",
        &down,
    );

    let d = &sources.deliveries;
    out.counter(
        "kindred_delivery_requests_total",
        "Requests made to destinations since start.",
        &one(d.requests.load(Ordering::Relaxed) as f64),
    );
    out.counter(
        "kindred_delivery_failed_requests_total",
        "Requests to destinations that failed (to be retried, or dead) since start.",
        &one(d.failed_requests.load(Ordering::Relaxed) as f64),
    );
    out.counter(
        "kindred_delivered_calls_total",
        "Calls (identify, track) destinations accepted since start.",
        &one(d.delivered.load(Ordering::Relaxed) as f64),
    );

    // Per destination, from sync.db: what the status API reports.
    match sources.store.delivery_statuses().await {
        Ok(statuses) => {
            let mut calls = Vec::new();
            for (space, destination, s) in statuses {
                for (state, n) in [
                    ("delivered", s.delivered),
                    ("pending", s.pending),
                    ("retrying", s.retrying),
                    ("dead", s.dead),
                ] {
                    calls.push((
                        vec![
                            ("space", space.clone()),
                            ("destination", destination.clone()),
                            ("state", state.to_string()),
                        ],
                        n as f64,
                    ));
                }
            }
            out.gauge(
                "kindred_destination_calls",
                "Calls of each destination by state, as its status API reports them: delivered \
                 (ever), pending and retrying (now), dead (given up, until replayed).",
                &calls,
            );
        }
        Err(e) => tracing::warn!(error = %e, "reading the destinations' delivery counts"),
    }

    let files: Vec<Sample> = [
        "store.db",
        "store.db-wal",
        "queue.db",
        "queue.db-wal",
        "compute.db",
        "compute.db-wal",
        "sync.db",
        "sync.db-wal",
    ]
    .into_iter()
    .filter_map(|name| {
        let len = std::fs::metadata(sources.data_dir.join(name)).ok()?.len();
        Some((vec![("file", name.to_string())], len as f64))
    })
    .collect();
    out.gauge(
        "kindred_sqlite_bytes",
        "Size of each SQLite file of the data directory.",
        &files,
    );
    out.text
}
