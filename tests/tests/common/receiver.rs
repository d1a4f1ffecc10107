//! A destination for the sync tests: an HTTP server on a free port that
//! records every request and answers as the test tells it to (OK, a
//! status, 429 with `Retry-After`), and that can go down and come back on
//! the same port.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use serde_json::Value;
use tokio::sync::oneshot;

/// How the receiver answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Ok,
    Status(u16),
    /// 429 with `Retry-After: secs`.
    TooMany(u64),
}

/// One request as received.
#[derive(Clone, Debug)]
pub struct Request {
    pub path: String,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// The status it was answered with.
    pub status: u16,
    pub at: Instant,
    /// Wall-clock milliseconds when it was answered.
    pub at_ms: i64,
}

impl Request {
    /// The Segment calls in the body: a bare call or `{"batch": [...]}`.
    pub fn calls(&self) -> Vec<Value> {
        let v: Value = serde_json::from_slice(&self.body).expect("a JSON body");
        match v.get("batch") {
            Some(Value::Array(a)) => a.clone(),
            _ => vec![v],
        }
    }

    /// The check a webhook receiver makes (README, "Webhook signatures"):
    /// the HMAC of the timestamp header and the body under `secret`, and a
    /// timestamp within five minutes of when the request arrived.
    pub fn signed_by(&self, secret: &str) -> bool {
        let header = |name: &str| {
            self.headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
        };
        kindred_domain::sync::verify_signature(
            secret,
            header("x-kindred-timestamp"),
            header("x-kindred-signature"),
            &self.body,
            self.at_ms / 1000,
            kindred_domain::sync::SIGNATURE_TOLERANCE_SECS,
        )
    }
}

#[derive(Default)]
struct Shared {
    mode: Mutex<Option<Mode>>,
    log: Mutex<Vec<Request>>,
}

pub struct Receiver {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

async fn record(
    State(shared): State<Arc<Shared>>,
    uri: axum::http::Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let mode = shared.mode.lock().unwrap().unwrap_or(Mode::Ok);
    let (status, response) = match mode {
        Mode::Ok => (200, (StatusCode::OK, "{}").into_response()),
        Mode::Status(s) => {
            let code = StatusCode::from_u16(s).unwrap();
            (s, (code, "receiver says no").into_response())
        }
        Mode::TooMany(secs) => (
            429,
            (
                StatusCode::TOO_MANY_REQUESTS,
                [("Retry-After", secs.to_string())],
                "slow down",
            )
                .into_response(),
        ),
    };
    shared.log.lock().unwrap().push(Request {
        path: uri.path().to_string(),
        headers,
        body,
        status,
        at: Instant::now(),
        at_ms: kindred_store::now_millis(),
    });
    response
}

impl Receiver {
    pub async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut r = Self {
            addr,
            shared: Arc::default(),
            stop: None,
            task: None,
        };
        r.serve(listener);
        r
    }

    fn serve(&mut self, listener: tokio::net::TcpListener) {
        let app = Router::new()
            .route("/{*path}", post(record))
            .with_state(Arc::clone(&self.shared));
        let (stop, stopped) = oneshot::channel::<()>();
        self.stop = Some(stop);
        self.task = Some(tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = stopped.await;
                })
                .await
                .unwrap();
        }));
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn set(&self, mode: Mode) {
        *self.shared.mode.lock().unwrap() = Some(mode);
    }

    /// Stops listening: connections are refused until [`Receiver::up`].
    pub async fn down(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.unwrap();
        }
    }

    /// Listens again on the same port.
    pub async fn up(&mut self) {
        let listener = tokio::net::TcpListener::bind(self.addr).await.unwrap();
        self.serve(listener);
    }

    pub fn requests(&self) -> Vec<Request> {
        self.shared.log.lock().unwrap().clone()
    }

    /// Every call the receiver accepted (answered 2xx), in arrival order.
    pub fn accepted(&self) -> Vec<Value> {
        self.requests()
            .iter()
            .filter(|r| r.status < 300)
            .flat_map(|r| r.calls())
            .collect()
    }

    /// Waits until `done(accepted calls)` holds; panics after `limit`.
    pub async fn wait_for(&self, limit: Duration, what: &str, done: impl Fn(&[Value]) -> bool) {
        let start = Instant::now();
        loop {
            let calls = self.accepted();
            if done(&calls) {
                return;
            }
            assert!(
                start.elapsed() < limit,
                "{what}: not after {limit:?}; accepted so far: {calls:#?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
