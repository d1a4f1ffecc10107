//! CORS for the routes web pages call: the Tracking API (analytics.js /
//! analytics-next post from the page's origin, with an `Authorization`
//! header, so browsers ask first with a preflight) and the settings route.
//! The Profile and admin APIs have none: they are server-side only.
//!
//! A preflight carries no credentials, so it cannot name a space: every
//! preflight is allowed, and a space's `allowed_origins` is enforced on
//! the request itself ([`check_origin`]), whose refusal carries no CORS
//! headers, so the page cannot read it either.

use axum::extract::Request;
use axum::http::header::{
    ACCESS_CONTROL_ALLOW_HEADERS, ACCESS_CONTROL_ALLOW_METHODS, ACCESS_CONTROL_ALLOW_ORIGIN,
    ACCESS_CONTROL_EXPOSE_HEADERS, ACCESS_CONTROL_MAX_AGE, ORIGIN, VARY,
};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Router;
use kindred_store::SpaceAuth;

use crate::error::ApiError;

pub const ALLOW_METHODS: &str = "POST, GET, OPTIONS";
/// What analytics-next sends: `authorization` (the write key),
/// `content-type` (`text/plain` needs none, `application/json` does) and
/// `x-retry-count` on retries.
pub const ALLOW_HEADERS: &str = "authorization, content-type, x-retry-count";
/// A day; browsers cap it lower (Chromium at two hours).
pub const MAX_AGE: &str = "86400";
/// A 429's `Retry-After` is read by the library to pace its retries.
pub const EXPOSE_HEADERS: &str = "Retry-After";

/// Marks a response refused because of the page's origin: it gets no CORS
/// headers.
#[derive(Clone, Copy, Debug)]
pub struct OriginRefused;

/// Answers preflights and adds CORS headers to every response of `router`'s
/// routes (errors and 429s included).
pub fn layer(router: Router) -> Router {
    router.layer(axum::middleware::from_fn(cors))
}

async fn cors(request: Request, next: Next) -> Response {
    let allow_origin = allow_origin(request.headers());
    if request.method() == Method::OPTIONS {
        let mut response = StatusCode::NO_CONTENT.into_response();
        let headers = response.headers_mut();
        headers.insert(ACCESS_CONTROL_ALLOW_ORIGIN, allow_origin);
        headers.insert(
            ACCESS_CONTROL_ALLOW_METHODS,
            HeaderValue::from_static(ALLOW_METHODS),
        );
        headers.insert(
            ACCESS_CONTROL_ALLOW_HEADERS,
            HeaderValue::from_static(ALLOW_HEADERS),
        );
        headers.insert(ACCESS_CONTROL_MAX_AGE, HeaderValue::from_static(MAX_AGE));
        headers.insert(VARY, HeaderValue::from_static("Origin"));
        return response;
    }
    let mut response = next.run(request).await;
    if response.extensions().get::<OriginRefused>().is_none() {
        let headers = response.headers_mut();
        headers.insert(ACCESS_CONTROL_ALLOW_ORIGIN, allow_origin);
        headers.insert(
            ACCESS_CONTROL_EXPOSE_HEADERS,
            HeaderValue::from_static(EXPOSE_HEADERS),
        );
        headers.append(VARY, HeaderValue::from_static("Origin"));
    }
    response
}

/// The page's own origin echoed back (so that a space restricting origins
/// and one allowing all answer alike), or `*` without one. Credentials are
/// never allowed: the write key travels in the request itself.
fn allow_origin(headers: &HeaderMap) -> HeaderValue {
    match headers.get(ORIGIN) {
        Some(origin) if origin.as_bytes() != b"null" && !origin.is_empty() => origin.clone(),
        _ => HeaderValue::from_static("*"),
    }
}

/// Refuses a browser request from a page the space does not allow.
/// Requests without `Origin` (servers, mobile apps) are not browsers'.
pub fn check_origin(auth: &SpaceAuth, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(origin) = headers.get(ORIGIN) else {
        return Ok(());
    };
    let origin = origin.to_str().unwrap_or("");
    if kindred_domain::origin::allows(&auth.allowed_origins, origin) {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::FORBIDDEN,
            ORIGIN_NOT_ALLOWED,
            "this page's origin may not send events to the space (its allowed_origins setting)",
        ))
    }
}

/// The error code of [`check_origin`]'s refusal.
pub const ORIGIN_NOT_ALLOWED: &str = "origin_not_allowed";

/// A handler's result as a response, without CORS headers when the page's
/// origin was refused.
pub fn respond<T: IntoResponse>(result: Result<T, ApiError>) -> Response {
    match result {
        Ok(ok) => ok.into_response(),
        Err(e) => {
            let refused = e.code == ORIGIN_NOT_ALLOWED;
            let mut response = e.into_response();
            if refused {
                response.extensions_mut().insert(OriginRefused);
            }
            response
        }
    }
}
