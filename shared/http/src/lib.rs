//! Kindred's HTTP surface as axum routers: the Tracking API, the Profile
//! API and the admin API. The local server and the Lambda functions (via
//! `lambda_http`) run these very routers.

pub mod admin;
pub mod auth;
pub mod browser;
pub mod compute;
pub mod cors;
mod cpu;
pub mod destinations;
pub mod error;
pub mod openapi;
pub mod privacy;
pub mod profile;
pub mod tracking;
pub mod ui;

use std::sync::Arc;

use axum::http::HeaderValue;
use axum::middleware::Next;
pub use axum::response::Response;
use axum::routing::get;
use axum::Json;
use kindred_store::privacy::Privacy;
use kindred_store::token::random_base62;
use kindred_store::{Computations, Destinations, EventQueue, HealthCheck, Profiles, Spaces};
use serde_json::json;

pub use axum::body::Body;
pub use axum::extract::Request;
pub use axum::middleware;
pub use axum::Router;
pub use browser::PublicUrl;
pub use error::ApiError;
pub use tracking::RateLimiter;

/// What the handlers need, behind ports so that any adapter fits.
#[derive(Clone)]
pub struct AppState {
    pub spaces: Arc<dyn Spaces>,
    pub profiles: Arc<dyn Profiles>,
    pub queue: Arc<dyn EventQueue>,
    pub rate_limiter: Arc<RateLimiter>,
    /// `None` where computed traits are not available (answered 501).
    pub computations: Option<Arc<dyn Computations>>,
    /// `None` where destinations are not available (answered 501).
    pub destinations: Option<Arc<dyn Destinations>>,
    /// Destinations may be at internal addresses (the operator opted in).
    pub allow_private_destinations: bool,
    /// `None` where regulations are not available (answered 501).
    pub privacy: Option<Arc<dyn Privacy>>,
    /// The background workers' health and lag, where there are any.
    pub health: Option<Arc<dyn HealthCheck>>,
    /// Per-space Profile API buckets.
    pub profile_rate_limiter: Arc<RateLimiter>,
    /// Where browsers reach the Tracking API (the settings route's answer).
    pub public_url: Option<PublicUrl>,
}

/// What the Tracking API needs (the `ingest` function has only this).
#[derive(Clone)]
pub struct TrackingState {
    pub spaces: Arc<dyn Spaces>,
    pub queue: Arc<dyn EventQueue>,
    pub rate_limiter: Arc<RateLimiter>,
    /// Where browsers reach the Tracking API; `None` where each request
    /// carries it as a [`PublicUrl`] extension (on AWS, the API's address).
    pub public_url: Option<PublicUrl>,
}

/// What the Profile and admin APIs need (the `profile-api` function).
#[derive(Clone)]
pub struct ReadState {
    pub spaces: Arc<dyn Spaces>,
    pub profiles: Arc<dyn Profiles>,
    pub computations: Option<Arc<dyn Computations>>,
    pub destinations: Option<Arc<dyn Destinations>>,
    pub allow_private_destinations: bool,
    pub privacy: Option<Arc<dyn Privacy>>,
    /// Per-space Profile API buckets (each space's own rate).
    pub profile_rate_limiter: Arc<RateLimiter>,
}

impl AppState {
    pub fn tracking(&self) -> TrackingState {
        TrackingState {
            spaces: Arc::clone(&self.spaces),
            queue: Arc::clone(&self.queue),
            rate_limiter: Arc::clone(&self.rate_limiter),
            public_url: self.public_url.clone(),
        }
    }

    pub fn read(&self) -> ReadState {
        ReadState {
            spaces: Arc::clone(&self.spaces),
            profiles: Arc::clone(&self.profiles),
            computations: self.computations.clone(),
            destinations: self.destinations.clone(),
            allow_private_destinations: self.allow_private_destinations,
            privacy: self.privacy.clone(),
            profile_rate_limiter: Arc::clone(&self.profile_rate_limiter),
        }
    }
}

/// Adds the layers every Kindred response has: a `Request-Id` header and
/// JSON 404s for unknown routes.
pub fn finish(router: Router) -> Router {
    router
        .fallback(|| async { ApiError::not_found("no such route") })
        .layer(axum::middleware::from_fn(request_id))
}

/// Tags the response with a `Request-Id` and logs the request at debug
/// level: the route template (never the raw path, which can hold an
/// email), the status and the time taken.
async fn request_id(request: Request, next: Next) -> Response {
    let id = format!("req_{}", random_base62(20));
    let method = request.method().clone();
    let route = request
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |p| p.as_str().to_string());
    let started = std::time::Instant::now();
    let mut response = next.run(request).await;
    kindred_store::metrics::global().request(
        method.as_str(),
        &route,
        response.status().as_u16(),
        started.elapsed(),
    );
    tracing::debug!(
        request_id = %id,
        %method,
        route,
        status = response.status().as_u16(),
        ms = started.elapsed().as_secs_f64() * 1000.0,
        "request"
    );
    if let Ok(value) = HeaderValue::from_str(&id) {
        response.headers_mut().insert("Request-Id", value);
    }
    response
}

fn health(check: Option<Arc<dyn HealthCheck>>) -> Router {
    Router::new()
        .route(
            "/",
            get(|| async { Json(json!({"service": "kindred", "status": "ok"})) }),
        )
        .route(
            "/healthz",
            get(move || {
                let check = check.clone();
                async move { healthz(check.as_deref()).await }
            }),
        )
}

/// `200` while every worker runs, `503` with the reasons while one is
/// down; always with each stage's lag (`queue_lag_events`,
/// `queue_lag_seconds`, `compute_…`, `sync_…`; 0 when idle).
async fn healthz(check: Option<&dyn HealthCheck>) -> axum::response::Response {
    use axum::response::IntoResponse;
    let Some(check) = check else {
        return Json(json!({"status": "ok"})).into_response();
    };
    let report = check.health().await;
    let mut body = json!({
        "status": if report.down.is_empty() { "ok" } else { "unavailable" },
        "down": report.down.iter().map(|(worker, reason)| json!({"worker": worker, "reason": reason})).collect::<Vec<_>>(),
    });
    for (stage, events, seconds) in &report.lags {
        body[format!("{stage}_lag_events")] = json!(events);
        body[format!("{stage}_lag_seconds")] = json!(seconds);
    }
    let status = if report.down.is_empty() {
        axum::http::StatusCode::OK
    } else {
        axum::http::StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body)).into_response()
}

/// Everything one local process serves on one port.
pub fn app(state: AppState) -> Router {
    finish(
        health(state.health.clone())
            .merge(tracking::router(state.tracking()))
            .merge(profile::router(state.read()))
            .merge(admin::router(state.read()))
            .merge(compute::router(state.read()))
            .merge(destinations::router(state.read()))
            .merge(privacy::router(state.read()))
            .merge(ui::router(state.read()))
            .merge(openapi::router()),
    )
}

/// The `ingest` function's routes: the Tracking API.
pub fn ingest_app(state: TrackingState) -> Router {
    finish(health(None).merge(tracking::router(state)))
}

/// The `profile-api` function's routes: the Profile API, the admin API
/// and the operator's explorer.
pub fn profile_api_app(state: ReadState) -> Router {
    finish(
        health(None)
            .merge(profile::router(state.clone()))
            .merge(admin::router(state.clone()))
            .merge(compute::router(state.clone()))
            .merge(destinations::router(state.clone()))
            .merge(privacy::router(state.clone()))
            .merge(ui::router(state))
            .merge(openapi::router()),
    )
}

/// Answers `405 read_only` to every request that could write (any method
/// but GET, HEAD and OPTIONS): the Profile API's reads function on AWS,
/// whose role may only read the table, so that a write routed to it by
/// mistake is refused plainly rather than failing on a denied write.
pub fn reads_only(router: Router) -> Router {
    router.layer(axum::middleware::from_fn(
        |request: Request, next: Next| async move {
            use axum::http::Method;
            use axum::response::IntoResponse;
            if matches!(
                *request.method(),
                Method::GET | Method::HEAD | Method::OPTIONS
            ) {
                return next.run(request).await;
            }
            ApiError::new(
                axum::http::StatusCode::METHOD_NOT_ALLOWED,
                "read_only",
                "this function only reads; writes go to the admin API",
            )
            .into_response()
        },
    ))
}

/// Answers `408 request_timeout` to a request not done within `limit`
/// (for servers that face clients directly; API Gateway has its own).
pub fn with_request_timeout(router: Router, limit: std::time::Duration) -> Router {
    router.layer(axum::middleware::from_fn(
        move |request: Request, next: Next| async move {
            match tokio::time::timeout(limit, next.run(request)).await {
                Ok(response) => response,
                Err(_) => {
                    use axum::response::IntoResponse;
                    ApiError::new(
                        axum::http::StatusCode::REQUEST_TIMEOUT,
                        "request_timeout",
                        "the request took too long (its body arrived too slowly)",
                    )
                    .into_response()
                }
            }
        },
    ))
}

/// A response body's bytes (for callers that hold a router but do not
/// depend on axum, like the Lambda tests).
pub async fn body_bytes(body: Body) -> Result<Vec<u8>, axum::Error> {
    Ok(axum::body::to_bytes(body, usize::MAX).await?.to_vec())
}

pub use kindred_store::RequestCost;

/// Prints the function's CloudWatch embedded-metric lines after each
/// request ([`kindred_store::emf`]): on Lambda an instance serves one
/// request at a time, so each flush is that request's figures.
pub fn with_emf(router: Router, function: &'static str) -> Router {
    let emf = Arc::new(kindred_store::emf::Emf::new(function));
    router.layer(axum::middleware::from_fn(
        move |request: Request, next: Next| {
            let emf = Arc::clone(&emf);
            async move {
                let response = next.run(request).await;
                emf.flush();
                response
            }
        },
    ))
}

/// Logs (at debug: a line per request costs CloudWatch money), after each
/// request, what it cost in storage requests and units (`usage` reads the
/// adapter's running totals). Meant for Lambda, where
/// an instance serves one request at a time, so the difference is the
/// request's own.
pub fn with_request_costs(
    router: Router,
    usage: Arc<dyn Fn() -> RequestCost + Send + Sync>,
) -> Router {
    router.layer(axum::middleware::from_fn(
        move |request: Request, next: Next| {
            let usage = Arc::clone(&usage);
            async move {
                let before = usage();
                let response = next.run(request).await;
                let after = usage();
                tracing::debug!(
                    status = response.status().as_u16(),
                    dynamodb_read_requests = after.read_requests - before.read_requests,
                    dynamodb_write_requests = after.write_requests - before.write_requests,
                    dynamodb_read_units = after.read_units - before.read_units,
                    dynamodb_write_units = after.write_units - before.write_units,
                    "request cost"
                );
                response
            }
        },
    ))
}
