//! Kindred's HTTP surface as axum routers: the Tracking API, the Profile
//! API and the admin API. The local server and the Lambda functions (via
//! `lambda_http`) run these very routers.

pub mod admin;
pub mod auth;
pub mod error;
pub mod profile;
pub mod tracking;

use std::sync::Arc;

use axum::extract::Request;
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::Response;
use axum::routing::get;
use axum::Json;
use kindred_store::token::random_base62;
use kindred_store::{EventQueue, Profiles, Spaces};
use serde_json::json;

pub use axum::body::Body;
pub use axum::Router;
pub use error::ApiError;
pub use tracking::RateLimiter;

/// What the handlers need, behind ports so that any adapter fits.
#[derive(Clone)]
pub struct AppState {
    pub spaces: Arc<dyn Spaces>,
    pub profiles: Arc<dyn Profiles>,
    pub queue: Arc<dyn EventQueue>,
    pub rate_limiter: Arc<RateLimiter>,
}

/// What the Tracking API needs (the `ingest` function has only this).
#[derive(Clone)]
pub struct TrackingState {
    pub spaces: Arc<dyn Spaces>,
    pub queue: Arc<dyn EventQueue>,
    pub rate_limiter: Arc<RateLimiter>,
}

/// What the Profile and admin APIs need (the `profile-api` function).
#[derive(Clone)]
pub struct ReadState {
    pub spaces: Arc<dyn Spaces>,
    pub profiles: Arc<dyn Profiles>,
}

impl AppState {
    pub fn tracking(&self) -> TrackingState {
        TrackingState {
            spaces: Arc::clone(&self.spaces),
            queue: Arc::clone(&self.queue),
            rate_limiter: Arc::clone(&self.rate_limiter),
        }
    }

    pub fn read(&self) -> ReadState {
        ReadState {
            spaces: Arc::clone(&self.spaces),
            profiles: Arc::clone(&self.profiles),
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

async fn request_id(request: Request, next: Next) -> Response {
    let id = format!("req_{}", random_base62(20));
    let mut response = next.run(request).await;
    if let Ok(value) = HeaderValue::from_str(&id) {
        response.headers_mut().insert("Request-Id", value);
    }
    response
}

fn health() -> Router {
    Router::new()
        .route(
            "/",
            get(|| async { Json(json!({"service": "kindred", "status": "ok"})) }),
        )
        .route("/healthz", get(|| async { Json(json!({"status": "ok"})) }))
}

/// Everything one local process serves on one port.
pub fn app(state: AppState) -> Router {
    finish(
        health()
            .merge(tracking::router(state.tracking()))
            .merge(profile::router(state.read()))
            .merge(admin::router(state.read())),
    )
}

/// The `ingest` function's routes: the Tracking API.
pub fn ingest_app(state: TrackingState) -> Router {
    finish(health().merge(tracking::router(state)))
}

/// The `profile-api` function's routes: the Profile API and admin API.
pub fn profile_api_app(state: ReadState) -> Router {
    finish(
        health()
            .merge(profile::router(state.clone()))
            .merge(admin::router(state)),
    )
}

/// A response body's bytes (for callers that hold a router but do not
/// depend on axum, like the Lambda tests).
pub async fn body_bytes(body: Body) -> Result<Vec<u8>, axum::Error> {
    Ok(axum::body::to_bytes(body, usize::MAX).await?.to_vec())
}
