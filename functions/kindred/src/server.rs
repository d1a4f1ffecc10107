//! `kindred serve`: the shared routers and the identity worker on the
//! embedded store, in one process.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use kindred_http::{AppState, RateLimiter};
use kindred_sqlite::{
    describe, ComputeWorker, IdentityWorker, Lag, SqliteQueue, SqliteStore, SyncWorker,
    WorkerHealth,
};
use kindred_store::{HealthCheck, HealthReport};
use kindred_sync::Deliverer;
use tokio::sync::oneshot;
use tracing::info;

use crate::config::Config;

/// The local composition: store, queue, worker and the routers' state.
pub struct Local {
    pub store: Arc<SqliteStore>,
    pub queue: Arc<SqliteQueue>,
    pub worker: Arc<IdentityWorker>,
    pub compute: Arc<ComputeWorker>,
    /// Fans the change log out to the destinations' outboxes.
    pub sync: Arc<SyncWorker>,
    /// Drains the outboxes.
    pub deliverer: Arc<Deliverer>,
    /// The health of the identity, compute and sync threads.
    pub health: Arc<LocalHealth>,
    pub state: AppState,
}

/// What `/healthz` reports locally: who is down, and each stage's lag.
pub struct LocalHealth {
    pub identity: Arc<WorkerHealth>,
    pub compute: Arc<WorkerHealth>,
    pub sync: Arc<WorkerHealth>,
    worker: Arc<IdentityWorker>,
    compute_worker: Arc<ComputeWorker>,
    sync_worker: Arc<SyncWorker>,
}

#[async_trait::async_trait]
impl HealthCheck for LocalHealth {
    async fn health(&self) -> HealthReport {
        let (worker, compute, sync) = (
            Arc::clone(&self.worker),
            Arc::clone(&self.compute_worker),
            Arc::clone(&self.sync_worker),
        );
        let lags = tokio::task::spawn_blocking(move || {
            [
                ("queue", worker.lag()),
                ("compute", compute.lag()),
                ("sync", sync.lag()),
            ]
        })
        .await;
        let mut report = HealthReport::default();
        for h in [&self.identity, &self.compute, &self.sync] {
            if let Some(reason) = h.state().down {
                report.down.push((h.name.to_string(), reason));
            }
        }
        match lags {
            Ok(lags) => {
                for (stage, lag) in lags {
                    let lag = lag.unwrap_or_else(|e| {
                        report.down.push((
                            format!("{stage} lag"),
                            format!("storage error: {}", describe(&e)),
                        ));
                        Lag::default()
                    });
                    report.lags.push((stage, lag.events, lag.seconds));
                }
            }
            Err(_) => report
                .down
                .push(("health".into(), "the lag could not be read".into())),
        }
        report
    }
}

pub fn open(config: &Config) -> anyhow::Result<Local> {
    let store = SqliteStore::open(&config.data_dir)
        .with_context(|| format!("opening the store in {}", config.data_dir.display()))?;
    let queue = SqliteQueue::open(&config.data_dir).context("opening the queue")?;
    store.attach_queue(Arc::clone(&queue));
    let worker = IdentityWorker::new(Arc::clone(&store), Arc::clone(&queue));
    let compute = ComputeWorker::new(Arc::clone(&store));
    let sync = SyncWorker::new(Arc::clone(&store));
    let health = Arc::new(LocalHealth {
        identity: WorkerHealth::new("identity"),
        compute: WorkerHealth::new("compute"),
        sync: WorkerHealth::new("sync"),
        worker: Arc::clone(&worker),
        compute_worker: Arc::clone(&compute),
        sync_worker: Arc::clone(&sync),
    });
    let deliverer = Deliverer::new(
        store.clone(),
        config.sync,
        config.allow_private_destinations,
    );
    let state = AppState {
        spaces: store.clone(),
        profiles: store.clone(),
        queue: queue.clone(),
        rate_limiter: Arc::new(RateLimiter::new(config.ingest_rate)),
        computations: Some(store.clone()),
        destinations: Some(store.clone()),
        allow_private_destinations: config.allow_private_destinations,
        privacy: Some(store.clone()),
        health: Some(health.clone()),
        profile_rate_limiter: Arc::new(RateLimiter::profile_api()),
        // Known once the listener is bound (`start`).
        public_url: config.public_url.clone(),
    };
    Ok(Local {
        store,
        queue,
        worker,
        compute,
        sync,
        deliverer,
        health,
        state,
    })
}

/// A running server: HTTP on `addr`, the identity and compute workers on
/// their threads.
pub struct Running {
    pub addr: SocketAddr,
    /// Where `/metrics` is served (`--metrics-listen`), if anywhere.
    pub metrics_addr: Option<SocketAddr>,
    pub local: Local,
    stop_worker: Arc<AtomicBool>,
    worker: Option<std::thread::JoinHandle<()>>,
    compute: Option<std::thread::JoinHandle<()>>,
    sync: Option<std::thread::JoinHandle<()>>,
    deliverer: Option<tokio::task::JoinHandle<()>>,
    stop_http: Option<oneshot::Sender<()>>,
    http: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
    stop_metrics: Option<oneshot::Sender<()>>,
    metrics: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
}

/// Opens the store, creates the `default` space on an empty one (its
/// credentials are returned, to be shown once), and starts serving.
pub async fn start(config: &Config) -> anyhow::Result<(Running, Option<kindred_store::NewSpace>)> {
    let local = open(config)?;
    let created = if local.store.space_count()? == 0 {
        Some(local.store.create_space("default")?)
    } else {
        None
    };
    let stop_worker = Arc::new(AtomicBool::new(false));
    let health = &local.health;
    let worker = local
        .worker
        .spawn(Arc::clone(&stop_worker), Arc::clone(&health.identity));
    let compute = local
        .compute
        .spawn(Arc::clone(&stop_worker), Arc::clone(&health.compute));
    let sync = local
        .sync
        .spawn(Arc::clone(&stop_worker), Arc::clone(&health.sync));
    let deliverer = tokio::spawn(
        Arc::clone(&local.deliverer).run(local.store.clone(), Arc::clone(&stop_worker)),
    );
    // Regulations a stop interrupted carry on.
    local.store.start_regulations();
    tokio::spawn(account_passes(
        local.store.clone(),
        Arc::clone(&stop_worker),
    ));
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("listening on {}", config.listen))?;
    let addr = listener.local_addr()?;
    let mut local = local;
    local.state.public_url = Some(
        config
            .public_url
            .clone()
            .unwrap_or_else(|| crate::config::default_public_url(addr)),
    );
    let (stop_http, stopped) = oneshot::channel::<()>();
    let app = kindred_http::with_request_timeout(
        kindred_http::app(local.state.clone()),
        config.limits.request_timeout,
    );
    let http = tokio::spawn(serve_http(listener, app, config.limits, stopped));
    let (mut metrics_addr, mut stop_metrics, mut metrics) = (None, None, None);
    if let Some(at) = config.metrics_listen {
        let listener = tokio::net::TcpListener::bind(at)
            .await
            .with_context(|| format!("listening for metrics on {at}"))?;
        metrics_addr = Some(listener.local_addr()?);
        let (stop, stopped) = oneshot::channel::<()>();
        let app = kindred_http::with_request_timeout(
            crate::metrics::router(crate::metrics::Sources::of(&local, &config.data_dir)),
            config.limits.request_timeout,
        );
        stop_metrics = Some(stop);
        metrics = Some(tokio::spawn(serve_http(
            listener,
            app,
            config.limits,
            stopped,
        )));
    }
    Ok((
        Running {
            addr,
            metrics_addr,
            stop_metrics,
            metrics,
            local,
            stop_worker,
            worker: Some(worker),
            compute: Some(compute),
            sync: Some(sync),
            deliverer: Some(deliverer),
            stop_http: Some(stop_http),
            http: Some(http),
        },
        created,
    ))
}

impl Running {
    /// Waits until the identity worker has applied everything queued so
    /// far, and the compute worker has computed it.
    pub async fn wait_idle(&self) -> anyhow::Result<()> {
        self.wait_identity().await?;
        self.wait_compute().await
    }

    /// Waits until the identity worker has applied everything queued so
    /// far, however long that takes while it makes progress (a 5M-event
    /// bench queues minutes of work); an error once it has applied nothing
    /// for [`WAIT_LIMIT`].
    pub async fn wait_identity(&self) -> anyhow::Result<()> {
        let target = self.local.queue.last_seq();
        let mut seen = self.local.worker.cursor()?;
        loop {
            until("the identity worker to apply a batch", 2, || {
                let cursor = self.local.worker.cursor()?;
                Ok(cursor >= target || cursor > seen)
            })
            .await?;
            seen = self.local.worker.cursor()?;
            if seen >= target {
                return Ok(());
            }
        }
    }

    /// Waits until the compute worker has folded in every recorded event,
    /// served every request and finished every backfill.
    pub async fn wait_compute(&self) -> anyhow::Result<()> {
        until("the compute worker to be idle", 5, || {
            Ok(self.local.compute.is_idle()?)
        })
        .await
    }

    /// Waits until every change and merge logged so far is in the
    /// destinations' outboxes.
    pub async fn wait_fanned_out(&self) -> anyhow::Result<()> {
        until("the fan-out to catch up", 5, || {
            Ok(self.local.sync.is_caught_up()?)
        })
        .await
    }

    /// Stops accepting requests, lets in-flight ones finish, stops the worker.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(tx) = self.stop_http.take() {
            let _ = tx.send(());
        }
        if let Some(http) = self.http.take() {
            http.await??;
        }
        if let Some(tx) = self.stop_metrics.take() {
            let _ = tx.send(());
        }
        if let Some(metrics) = self.metrics.take() {
            metrics.await??;
        }
        self.stop_worker.store(true, Ordering::Relaxed);
        if let Some(d) = self.deliverer.take() {
            let _ = d.await;
        }
        for worker in [self.worker.take(), self.compute.take(), self.sync.take()]
            .into_iter()
            .flatten()
        {
            let _ = tokio::task::spawn_blocking(move || worker.join()).await;
        }
        Ok(())
    }
}

/// The HTTP server: HTTP/1.1 with a header-read timeout, at most
/// `limits.max_connections` connections at once (past that, new ones wait in the
/// listen backlog), and a graceful stop that lets requests in flight end.
async fn serve_http(
    listener: tokio::net::TcpListener,
    app: kindred_http::Router,
    limits: crate::config::ServerLimits,
    stop: oneshot::Receiver<()>,
) -> std::io::Result<()> {
    use hyper_util::rt::{TokioIo, TokioTimer};
    use hyper_util::service::TowerToHyperService;
    use tower::ServiceExt;
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let permits = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    tokio::pin!(stop);
    loop {
        let permit = tokio::select! {
            p = Arc::clone(&permits).acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
            _ = &mut stop => break,
        };
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors, say: wait a moment, go on.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut stop => break,
        };
        let _ = stream.set_nodelay(true);
        let service =
            TowerToHyperService::new(app.clone().map_request(
                |r: hyper::Request<hyper::body::Incoming>| r.map(axum::body::Body::new),
            ));
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_read_timeout);
        let connection = graceful.watch(builder.serve_connection(TokioIo::new(stream), service));
        tokio::spawn(async move {
            let _permit = permit;
            let _ = connection.await;
        });
    }
    // Requests in flight may finish; a client that never reads its
    // answer does not hold the stop up for long.
    if tokio::time::timeout(Duration::from_secs(30), graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("connections still open 30 s after the stop; closing them");
    }
    Ok(())
}

/// Computes account-level traits and audiences every hour (as Segment
/// does), as the hourly lookback sweep runs for users; a lookback run
/// through the API computes them at once too.
async fn account_passes(store: Arc<kindred_sqlite::SqliteStore>, stop: Arc<AtomicBool>) {
    let mut hourly = tokio::time::interval(Duration::from_secs(3600));
    hourly.tick().await;
    loop {
        hourly.tick().await;
        if stop.load(std::sync::atomic::Ordering::Relaxed) {
            return;
        }
        let spaces = {
            let store = Arc::clone(&store);
            tokio::task::spawn_blocking(move || store.definition_spaces()).await
        };
        let spaces = match spaces {
            Ok(Ok(spaces)) => spaces,
            Ok(Err(e)) => {
                tracing::error!(error = %e, "listing spaces for the account pass failed");
                continue;
            }
            Err(_) => continue,
        };
        for space_id in spaces {
            let now = kindred_store::now_millis();
            match kindred_store::accounts::run(store.as_ref(), store.as_ref(), &space_id, now).await
            {
                Ok(p) => tracing::info!(
                    space_id,
                    accounts = p.accounts,
                    changes = p.changes,
                    "hourly account pass"
                ),
                Err(e) => tracing::error!(space_id, error = %e, "hourly account pass failed"),
            }
        }
    }
}

pub async fn serve(config: Config) -> anyhow::Result<()> {
    let (running, created) = start(&config).await?;
    if let Some(space) = created {
        println!("Created the space \"default\". Its credentials are shown only this once:");
        println!("{}", serde_json::to_string_pretty(&space)?);
    }
    info!(address = %running.addr, data_dir = %config.data_dir.display(), "kindred serving");
    println!("Kindred is listening on http://{}", running.addr);
    if let Some(at) = running.metrics_addr {
        println!("Prometheus metrics at http://{at}/metrics");
    }
    shutdown_signal().await;
    running.stop().await?;
    info!("kindred stopped");
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing the SIGTERM handler");
    tokio::select! {
        _ = ctrl_c => {}
        _ = term.recv() => {}
    }
}

/// How long a `wait_*` waits before it reports the worker stuck (a test
/// then fails instead of hanging).
const WAIT_LIMIT: Duration = Duration::from_secs(120);

/// Polls `done` every `every_ms` until it holds; an error after [`WAIT_LIMIT`].
async fn until(
    what: &str,
    every_ms: u64,
    mut done: impl FnMut() -> anyhow::Result<bool>,
) -> anyhow::Result<()> {
    let start = std::time::Instant::now();
    while !done()? {
        if start.elapsed() > WAIT_LIMIT {
            anyhow::bail!("waited {WAIT_LIMIT:?} for {what}");
        }
        tokio::time::sleep(Duration::from_millis(every_ms)).await;
    }
    Ok(())
}
