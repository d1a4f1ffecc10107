//! The Tracking API (SPEC 2), compatible with Segment's HTTP Tracking API
//! and its client libraries: `/v1/identify|track|page|screen|group|alias|batch`,
//! and the short routes of Segment's browser library (`/v1/i|t|p|s|g|a`,
//! `/v1/b` for a batch), all with CORS ([`crate::cors`]).

use kindred_store::metrics;
use std::collections::HashMap;
use std::io::Read;
use std::sync::Mutex;
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use kindred_domain::event::{
    strip_write_key, BatchBody, Envelope, MAX_BATCH_BYTES, MAX_EVENT_BYTES,
};
use kindred_domain::{Event, EventKind, Millis};
use kindred_store::token::{random_base62, TokenKind};
use kindred_store::{now_millis, QueuedEvent, SpaceAuth};
use serde_json::{json, Value};
use tracing::debug;

use crate::auth::basic_user;
use crate::cors::{self, check_origin, respond};
use crate::error::ApiError;
use crate::{browser, TrackingState};

pub fn router(state: TrackingState) -> Router {
    cors::layer(
        Router::new()
            .route("/v1/batch", post(batch))
            .route("/v1/import", post(batch))
            .route("/v1/b", post(batch))
            .route("/v1/m", post(browser::metrics))
            // identify, track, page, screen, group, alias, and i, t, p, s, g, a
            .route("/v1/{call}", post(single))
            .route("/v1/projects/{write_key}/settings", get(browser::settings))
            .with_state(state),
    )
}

/// The event type of a route: Segment's names, and the browser library's
/// one-letter ones.
fn route_kind(call: &str) -> Option<EventKind> {
    match call {
        "i" => Some(EventKind::Identify),
        "t" => Some(EventKind::Track),
        "p" => Some(EventKind::Page),
        "s" => Some(EventKind::Screen),
        "g" => Some(EventKind::Group),
        "a" => Some(EventKind::Alias),
        _ => EventKind::parse(call),
    }
}

/// Per-space token buckets: `rate` events per second, bursts of one second.
pub struct RateLimiter {
    rate: f64,
    buckets: Mutex<HashMap<String, (f64, Instant)>>,
}

impl RateLimiter {
    pub fn new(events_per_second: u32) -> Self {
        Self {
            rate: f64::from(events_per_second.max(1)),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Buckets for the Profile API, where each space's rate is its own
    /// setting (passed to [`RateLimiter::take_at`]).
    pub fn profile_api() -> Self {
        Self::new(kindred_domain::settings::DEFAULT_PROFILE_API_RATE)
    }

    /// Takes `n` tokens, or says how many seconds to wait.
    pub(crate) fn take(&self, space_id: &str, n: usize) -> Result<(), u64> {
        self.take_at(space_id, n, self.rate)
    }

    /// Takes `n` tokens from the space's bucket refilled at `rate` per
    /// second (a space's own setting), or says how many seconds to wait.
    pub fn take_at(&self, space_id: &str, n: usize, rate: f64) -> Result<(), u64> {
        let rate = rate.max(1.0);
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let (tokens, at) = buckets.entry(space_id.to_string()).or_insert((rate, now));
        *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * rate).min(rate);
        *at = now;
        let n = n as f64;
        if *tokens >= n || (n > rate && *tokens >= rate) {
            *tokens -= n;
            Ok(())
        } else {
            Err(((n.min(rate) - *tokens) / rate).ceil().max(1.0) as u64)
        }
    }
}

/// Reads the body, gunzipping it if asked, within the batch limit.
async fn read_body(headers: &HeaderMap, body: Body) -> Result<Bytes, ApiError> {
    let too_large = || {
        ApiError::bad_request(format!(
            "the request body is larger than {} KB",
            MAX_BATCH_BYTES / 1024
        ))
    };
    let raw = axum::body::to_bytes(body, MAX_BATCH_BYTES)
        .await
        .map_err(|_| too_large())?;
    let encoding = headers
        .get(header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    match encoding.as_str() {
        "" | "identity" => Ok(raw),
        "gzip" => {
            let mut out = Vec::new();
            flate2::read::GzDecoder::new(&raw[..])
                .take(MAX_BATCH_BYTES as u64 + 1)
                .read_to_end(&mut out)
                .map_err(|_| ApiError::bad_request("the body is not valid gzip"))?;
            if out.len() > MAX_BATCH_BYTES {
                return Err(too_large());
            }
            Ok(out.into())
        }
        other => Err(ApiError::bad_request(format!(
            "unsupported Content-Encoding {other:?}; use gzip or none"
        ))),
    }
}

/// The space of a write key given as HTTP Basic auth: checked before the
/// body is read or decompressed, so an unknown key costs no more than a
/// lookup. `None` when the request has no Basic auth (the key may then be
/// the body's `writeKey`).
async fn authenticate_header(
    state: &TrackingState,
    headers: &HeaderMap,
) -> Result<Option<SpaceAuth>, ApiError> {
    match basic_user(headers) {
        Some(key) => Ok(Some(authenticate(state, Some(&key)).await?)),
        None => Ok(None),
    }
}

async fn authenticate(state: &TrackingState, key: Option<&str>) -> Result<SpaceAuth, ApiError> {
    let Some(key) = key else {
        return Err(ApiError::unauthorized(
            "a write key is required: HTTP Basic auth with the write key as user name, or writeKey in the body",
        ));
    };
    state
        .spaces
        .authenticate(key, TokenKind::WriteKey)
        .await?
        .ok_or_else(|| ApiError::unauthorized("unknown write key"))
}

fn malformed() -> ApiError {
    ApiError::bad_request("the body is not valid JSON")
}

fn generated_message_id() -> String {
    format!("api-{}", random_base62(22))
}

async fn single(
    State(state): State<TrackingState>,
    Path(call): Path<String>,
    request: Request,
) -> Response {
    let Some(kind) = route_kind(&call) else {
        return ApiError::not_found("no such route").into_response();
    };
    let (parts, body) = request.into_parts();
    let result = async {
        let header_auth = authenticate_header(&state, &parts.headers).await?;
        let bytes = read_body(&parts.headers, body).await?;
        if bytes.len() > MAX_EVENT_BYTES {
            return Err(ApiError::bad_request(format!(
                "the event is larger than {} KB",
                MAX_EVENT_BYTES / 1024
            )));
        }
        let value: Value = serde_json::from_slice(&bytes).map_err(|_| malformed())?;
        let auth = match header_auth {
            Some(auth) => auth,
            None => authenticate(&state, value.get("writeKey").and_then(Value::as_str)).await?,
        };
        check_origin(&auth, &parts.headers)?;
        check_rate(&state, &auth, 1)?;
        let generated = generated_message_id();
        let envelope = Envelope {
            kind: Some(kind),
            received_at: now_millis(),
            batch_sent_at: None,
            generated_message_id: &generated,
            future_tolerance: auth.future_tolerance,
        };
        let event = Event::parse(strip_write_key(value), envelope).map_err(|r| {
            metrics::global().event_refused(r.code);
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                format!("{}: {}", r.code, r.message),
            )
        })?;
        let event = queued(&auth.space_id, &auth.source_id, event);
        enqueue(&state, &auth, vec![event]).await?;
        Ok::<_, ApiError>(Json(json!({"success": true})))
    }
    .await;
    respond(counted(result))
}

async fn batch(State(state): State<TrackingState>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let result = async {
        let header_auth = authenticate_header(&state, &parts.headers).await?;
        let bytes = read_body(&parts.headers, body).await?;
        // A first look (the items are not parsed yet): the key and how many.
        let (write_key, count) = {
            let parsed = BatchBody::parse(&bytes).ok_or_else(malformed)?;
            let items = parsed
                .batch
                .as_deref()
                .ok_or_else(|| ApiError::bad_request("batch must be an array of events"))?;
            (parsed.write_key, items.len())
        };
        let auth = match header_auth {
            Some(auth) => auth,
            None => authenticate(&state, write_key.as_deref()).await?,
        };
        check_origin(&auth, &parts.headers)?;
        check_rate(&state, &auth, count.max(1))?;
        let (space_id, source_id) = (auth.space_id.clone(), auth.source_id.clone());
        let tolerance = auth.future_tolerance;
        let (accepted, rejected) = crate::cpu::run(move || {
            read_events(&bytes, tolerance, |e| queued(&space_id, &source_id, e))
        })
        .await??;
        if accepted.is_empty() && !rejected.is_empty() {
            return Err(ApiError::bad_request("no event in the batch is valid")
                .with_details(json!({"rejected": rejected})));
        }
        let count = accepted.len();
        enqueue(&state, &auth, accepted).await?;
        Ok::<_, ApiError>(Json(
            json!({"success": true, "accepted": count, "rejected": rejected}),
        ))
    }
    .await;
    respond(counted(result))
}

/// A batch's events, each read on its own: the valid ones (as `keep`
/// makes them) and what was wrong with the others, by index.
fn read_events<T>(
    bytes: &[u8],
    future_tolerance: Millis,
    keep: impl Fn(Event) -> T,
) -> Result<(Vec<T>, Vec<Value>), ApiError> {
    let parsed = BatchBody::parse(bytes).ok_or_else(malformed)?;
    let items = parsed.batch.as_deref().unwrap_or_default();
    let received_at = now_millis();
    let mut accepted = Vec::with_capacity(items.len());
    let mut rejected = Vec::new();
    for (index, raw) in items.iter().enumerate() {
        let generated = generated_message_id();
        let outcome = parsed.event(
            raw,
            Envelope {
                future_tolerance,
                ..Envelope::received(received_at, &generated)
            },
        );
        match outcome {
            Ok(event) => accepted.push(keep(event)),
            Err(r) => {
                metrics::global().event_refused(r.code);
                rejected.push(json!({"index": index, "code": r.code, "message": r.message}));
            }
        }
    }
    Ok((accepted, rejected))
}

/// Counts a Tracking API request refused whole, by its error code.
fn counted<T>(result: Result<T, ApiError>) -> Result<T, ApiError> {
    if let Err(e) = &result {
        metrics::global().tracking_request_refused(e.code);
    }
    result
}

fn check_rate(state: &TrackingState, auth: &SpaceAuth, n: usize) -> Result<(), ApiError> {
    state
        .rate_limiter
        .take(&auth.space_id, n)
        .map_err(ApiError::rate_limited)
}

/// The event as the queue keeps it.
fn queued(space_id: &str, source_id: &str, event: Event) -> QueuedEvent {
    QueuedEvent {
        space_id: space_id.to_string(),
        source_id: source_id.to_string(),
        body: Value::Object(event.body).to_string(),
    }
}

async fn enqueue(
    state: &TrackingState,
    auth: &SpaceAuth,
    events: Vec<QueuedEvent>,
) -> Result<(), ApiError> {
    let count = events.len();
    state.queue.enqueue(events).await?;
    metrics::global()
        .events_accepted
        .fetch_add(count as u64, std::sync::atomic::Ordering::Relaxed);
    debug!(space_id = %auth.space_id, events = count, "events accepted");
    Ok(())
}
