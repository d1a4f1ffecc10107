//! The Destinations API (SPEC 11), with the space's admin token:
//! configure where computed traits, audiences and merges are synced, see
//! how delivery goes, and replay dead letters.

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use axum::{Json, Router};
use kindred_domain::event::format_millis;
use kindred_domain::sync::{secret_field, Kind, Settings};
use kindred_store::token::{random_base62, TokenKind};
use kindred_store::{DestinationRecord, DestinationStatus, Destinations};
use serde_json::{json, Value};

use crate::error::ApiError;
use crate::profile::authorize;
use crate::ReadState;

pub fn router(state: ReadState) -> Router {
    Router::new()
        .route("/v1/spaces/{space_id}/destinations", get(list))
        .route(
            "/v1/spaces/{space_id}/destinations/{id}",
            get(read).put(put).delete(delete),
        )
        .route(
            "/v1/spaces/{space_id}/destinations/{id}/status",
            get(status),
        )
        .route(
            "/v1/spaces/{space_id}/destinations/{id}/dead_letters",
            get(dead_letters),
        )
        .route(
            "/v1/spaces/{space_id}/destinations/{id}/replay",
            post(replay),
        )
        .with_state(state)
}

async fn admin(
    state: &ReadState,
    headers: &HeaderMap,
    space_id: &str,
) -> Result<Arc<dyn Destinations>, ApiError> {
    authorize(state, headers, space_id, TokenKind::Admin).await?;
    state.destinations.clone().ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_IMPLEMENTED,
            "not_implemented",
            "destinations are not available in this deployment yet",
        )
    })
}

/// A destination id: 1-64 characters of `[A-Za-z0-9_-]`.
fn check_id(id: &str) -> Result<(), ApiError> {
    if kindred_store::valid_space_id(id) {
        Ok(())
    } else {
        Err(ApiError::bad_request(
            "id: must be 1-64 characters of letters, digits, '_' and '-'",
        ))
    }
}

fn missing(id: &str) -> ApiError {
    ApiError::not_found(format!("no destination {id:?}"))
}

pub fn destination_json(r: &DestinationRecord) -> Value {
    let mut out = json!({
        "id": r.destination_id,
        "version": r.version,
        "initial_sync": if r.initial_sync_pending { "pending" } else { "done" },
        "created_at": format_millis(r.created_at),
        "updated_at": format_millis(r.updated_at),
    });
    if let Some(name) = &r.name {
        out["name"] = json!(name);
    }
    if let (Value::Object(o), Value::Object(s)) = (&mut out, r.settings.to_json()) {
        o.extend(s);
    }
    // Never the secret itself.
    out[format!("{}_set", secret_field(r.settings.kind))] = json!(r.has_secret);
    out
}

pub fn status_json(s: &DestinationStatus) -> Value {
    json!({
        "delivered": s.delivered,
        "pending": s.pending,
        "retrying": s.retrying,
        "dead": s.dead,
        "last_success_at": s.last_success_at.map(format_millis),
        "last_error": s.last_error.as_ref().map(|e| json!({
            "status": e.status,
            "message": e.message,
            "at": format_millis(e.at),
        })),
    })
}

async fn list(
    State(state): State<ReadState>,
    Path(space_id): Path<String>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    let port = admin(&state, &headers, &space_id).await?;
    let all = port.destinations(&space_id).await?;
    Ok(Json(
        json!({"data": all.iter().map(destination_json).collect::<Vec<_>>()}),
    ))
}

async fn read(
    State(state): State<ReadState>,
    Path((space_id, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    let port = admin(&state, &headers, &space_id).await?;
    let r = port
        .destination(&space_id, &id)
        .await?
        .ok_or_else(|| missing(&id))?;
    Ok(Json(destination_json(&r)))
}

async fn put(
    State(state): State<ReadState>,
    Path((space_id, id)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let port = admin(&state, &headers, &space_id).await?;
    check_id(&id)?;
    let body: Value = serde_json::from_slice(&body)
        .map_err(|_| ApiError::bad_request("the body is not valid JSON"))?;
    let (settings, mut secret) =
        Settings::parse(&body).map_err(|e| ApiError::bad_request(e.to_string()))?;
    settings
        .check_reach(state.allow_private_destinations)
        .map_err(|e| ApiError::bad_request(format!("{}: {e}", settings.kind.endpoint_field())))?;
    let name = body.get("name").and_then(Value::as_str).map(str::to_string);
    // A new webhook without a secret gets one, shown only in this answer.
    let mut generated = None;
    if secret.is_none()
        && settings.kind == Kind::Webhook
        && port.destination(&space_id, &id).await?.is_none()
    {
        let s = format!("whsec_{}", random_base62(32));
        generated = Some(s.clone());
        secret = Some(s);
    }
    let (r, created) = port
        .put_destination(&space_id, &id, name, settings, secret.map(Into::into))
        .await?;
    let mut out = destination_json(&r);
    if let Some(s) = generated {
        out["secret"] = json!(s);
    }
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(out)))
}

async fn delete(
    State(state): State<ReadState>,
    Path((space_id, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<StatusCode, ApiError> {
    let port = admin(&state, &headers, &space_id).await?;
    if port.delete_destination(&space_id, &id).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(missing(&id))
    }
}

async fn status(
    State(state): State<ReadState>,
    Path((space_id, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    let port = admin(&state, &headers, &space_id).await?;
    let s = port
        .destination_status(&space_id, &id)
        .await?
        .ok_or_else(|| missing(&id))?;
    Ok(Json(status_json(&s)))
}

async fn dead_letters(
    State(state): State<ReadState>,
    Path((space_id, id)): Path<(String, String)>,
    Query(params): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    let port = admin(&state, &headers, &space_id).await?;
    let limit = crate::error::limit_param(&params, 100, 1000)?;
    if port.destination(&space_id, &id).await?.is_none() {
        return Err(missing(&id));
    }
    let letters = port.dead_letters(&space_id, &id, limit).await?;
    let data: Vec<Value> = letters
        .iter()
        .map(|d| {
            json!({
                "seq": d.seq,
                "profile_id": d.profile_id,
                "attempts": d.attempts,
                "error": d.error,
                "call": d.call,
            })
        })
        .collect();
    Ok(Json(json!({ "data": data })))
}

async fn replay(
    State(state): State<ReadState>,
    Path((space_id, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let port = admin(&state, &headers, &space_id).await?;
    if port.destination(&space_id, &id).await?.is_none() {
        return Err(missing(&id));
    }
    let n = port.replay(&space_id, &id).await?;
    Ok((StatusCode::ACCEPTED, Json(json!({ "replayed": n }))))
}
