//! What Segment's browser library (analytics.js 2.0, `@segment/analytics-next`)
//! needs besides the Tracking API: the source settings it fetches from its
//! CDN before sending anything (`GET {cdnURL}/v1/projects/{writeKey}/settings`)
//! and its client metrics (`POST {apiHost}/m`). The short event routes
//! (`/v1/t`, `/v1/b`…) are the Tracking API's own ([`crate::tracking`]).

use axum::extract::{Path, Request, State};
use axum::http::header::CACHE_CONTROL;
use axum::http::{HeaderValue, StatusCode};
use axum::response::Response;
use axum::Json;
use kindred_store::token::TokenKind;
use serde_json::{json, Value};

use crate::cors::{check_origin, respond};
use crate::error::ApiError;
use crate::TrackingState;

/// Where browsers reach Kindred's Tracking API: `--public-url` locally, the
/// API's own address on AWS. The settings route hands it to the library.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PublicUrl {
    /// `http` or `https`, the library's `protocol`.
    pub protocol: String,
    /// Host, port and any path prefix, without a trailing slash.
    pub host: String,
}

impl PublicUrl {
    /// Reads `http(s)://host[:port][/prefix]`.
    pub fn parse(url: &str) -> Result<Self, String> {
        let bad = || format!("the public URL {url:?} is not http(s)://host[:port][/path]");
        let (protocol, rest) = url.trim().split_once("://").ok_or_else(bad)?;
        let protocol = protocol.to_ascii_lowercase();
        let host = rest.trim_end_matches('/');
        let authority = host.split('/').next().unwrap_or("");
        if !matches!(protocol.as_str(), "http" | "https")
            || authority.is_empty()
            || authority.contains('@')
            || host.contains(['?', '#', ' '])
        {
            return Err(bad());
        }
        Ok(Self {
            protocol,
            host: host.to_string(),
        })
    }

    /// The library's `apiHost`: where it appends `/t`, `/b`…
    pub fn api_host(&self) -> String {
        format!("{}/v1", self.host)
    }
}

/// How long a CDN or browser may keep a space's settings.
const SETTINGS_CACHE: &str = "public, max-age=300, s-maxage=300";

/// `GET /v1/projects/{writeKey}/settings`: the settings Segment's CDN
/// serves for a source, reduced to what makes the library send everything
/// to Kindred and load nothing else: only the `Segment.io` integration
/// (any other makes it fetch that integration's code), no remote plugins
/// or middleware, and client metrics off.
pub async fn settings(
    State(state): State<TrackingState>,
    Path(write_key): Path<String>,
    request: Request,
) -> Response {
    let (parts, _) = request.into_parts();
    let result = async {
        let auth = state
            .spaces
            .authenticate(&write_key, TokenKind::WriteKey)
            .await?
            .ok_or_else(|| ApiError::not_found("no source has this write key"))?;
        check_origin(&auth, &parts.headers)?;
        state
            .rate_limiter
            .take(&auth.space_id, 1)
            .map_err(ApiError::rate_limited)?;
        let public = state
            .public_url
            .clone()
            .or_else(|| parts.extensions.get::<PublicUrl>().cloned())
            .ok_or_else(|| {
                tracing::error!("no public URL is configured for the settings route");
                ApiError::internal()
            })?;
        Ok::<_, ApiError>(Json(settings_document(&write_key, &public)))
    }
    .await;
    let mut response = respond(result);
    let cache = if response.status() == StatusCode::OK {
        SETTINGS_CACHE
    } else {
        "no-store"
    };
    response
        .headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static(cache));
    response
}

/// The settings document (the shape of Segment's CDN answer).
pub fn settings_document(write_key: &str, public: &PublicUrl) -> Value {
    json!({
        "integrations": {
            "Segment.io": {
                "apiKey": write_key,
                "apiHost": public.api_host(),
                "protocol": public.protocol,
                "unbundledIntegrations": [],
                "addBundledMetadata": true,
            }
        },
        "metrics": {"sampleRate": 0, "host": public.api_host()},
        "plan": {},
        "middlewareSettings": {},
        "enabledMiddleware": {},
        "remotePlugins": [],
        "analyticsNextEnabled": true,
    })
}

/// `POST /v1/m`: the library's own client metrics. Kindred keeps none
/// (the settings turn them off); answered so that a page configured
/// otherwise sees no errors.
pub async fn metrics() -> StatusCode {
    StatusCode::NO_CONTENT
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn public_urls_are_read_with_a_path_prefix() {
        let u = PublicUrl::parse("https://events.example.com/").unwrap();
        assert_eq!(
            (u.protocol.as_str(), u.api_host().as_str()),
            ("https", "events.example.com/v1")
        );
        let u = PublicUrl::parse("http://localhost:8080/kindred").unwrap();
        assert_eq!(u.api_host(), "localhost:8080/kindred/v1");
        for bad in [
            "localhost:8080",
            "ftp://x",
            "https://",
            "https://u@h",
            "https://h/?q",
        ] {
            assert!(PublicUrl::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_settings_send_everything_to_kindred_and_nothing_elsewhere() {
        let u = PublicUrl::parse("https://k.example").unwrap();
        let doc = settings_document("wk_1", &u);
        let integrations = doc["integrations"].as_object().unwrap();
        assert_eq!(integrations.len(), 1);
        assert_eq!(doc["integrations"]["Segment.io"]["apiHost"], "k.example/v1");
        assert_eq!(doc["integrations"]["Segment.io"]["protocol"], "https");
        assert_eq!(doc["metrics"]["sampleRate"], 0);
        assert_eq!(doc["remotePlugins"], json!([]));
    }
}
