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
use axum::{Json, Router};
use kindred_store::token::random_base62;
use kindred_store::{EventQueue, Profiles, Spaces};
use serde_json::json;

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

/// Everything one local process serves on one port.
pub fn app(state: AppState) -> Router {
    let health = Router::new()
        .route(
            "/",
            get(|| async { Json(json!({"service": "kindred", "status": "ok"})) }),
        )
        .route("/healthz", get(|| async { Json(json!({"status": "ok"})) }));
    finish(
        health
            .merge(tracking::router(state.clone()))
            .merge(profile::router(state.clone()))
            .merge(admin::router(state)),
    )
}
