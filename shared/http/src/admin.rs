//! The admin API of a space, authenticated with its admin token.

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{delete, get};
use axum::{Json, Router};
use kindred_domain::event::format_millis;
use kindred_domain::IdentitySettings;
use kindred_store::token::TokenKind;
use kindred_store::{Revoked, TokenRecord};
use serde_json::{json, Value};

use crate::error::ApiError;
use crate::profile::authorize;
use crate::ReadState;

pub fn router(state: ReadState) -> Router {
    Router::new()
        .route(
            "/v1/spaces/{space_id}/identity_settings",
            get(get_settings).put(put_settings),
        )
        .route(
            "/v1/spaces/{space_id}/tokens",
            get(list_tokens).post(create_token),
        )
        .route(
            "/v1/spaces/{space_id}/tokens/{token_id}",
            delete(revoke_token),
        )
        .with_state(state)
}

/// A token as listed: its public prefix and times, never the secret.
fn token_json(t: &TokenRecord) -> Value {
    json!({
        "id": t.token_id,
        "prefix": t.prefix(),
        "kind": t.kind.as_str(),
        "label": t.label,
        "created_at": format_millis(t.created_at),
        "revoked_at": t.revoked_at.map(format_millis),
    })
}

async fn list_tokens(
    State(state): State<ReadState>,
    Path(space_id): Path<String>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    authorize(&state, &headers, &space_id, TokenKind::Admin).await?;
    let tokens = state.spaces.tokens(&space_id).await?;
    Ok(Json(
        json!({"data": tokens.iter().map(token_json).collect::<Vec<_>>()}),
    ))
}

/// Mints a write key, access token or admin token; the secret is in this
/// answer only.
async fn create_token(
    State(state): State<ReadState>,
    Path(space_id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    authorize(&state, &headers, &space_id, TokenKind::Admin).await?;
    let body: Value = serde_json::from_slice(&body)
        .map_err(|_| ApiError::bad_request("the body is not valid JSON"))?;
    if let Some(k) = body
        .as_object()
        .and_then(|o| o.keys().find(|k| !["kind", "label"].contains(&k.as_str())))
    {
        return Err(ApiError::bad_request(format!(
            "{k}: is not a token setting"
        )));
    }
    let kind = body
        .get("kind")
        .and_then(Value::as_str)
        .and_then(TokenKind::parse)
        .ok_or_else(|| {
            ApiError::bad_request("kind: is one of write_key, access_token, admin_token")
        })?;
    let label = match body.get("label") {
        None | Some(Value::Null) => None,
        Some(Value::String(l)) => Some(l.clone()),
        Some(_) => return Err(ApiError::bad_request("label: must be a string")),
    };
    let (record, secret) = state.spaces.create_token(&space_id, kind, label).await?;
    let mut out = token_json(&record);
    out["token"] = json!(secret);
    Ok((StatusCode::CREATED, Json(out)))
}

/// Revokes a token of the space: locally at once, on AWS within the
/// authentication cache time (10 s).
async fn revoke_token(
    State(state): State<ReadState>,
    Path((space_id, token_id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<StatusCode, ApiError> {
    authorize(&state, &headers, &space_id, TokenKind::Admin).await?;
    if !kindred_store::token::valid_token_id(&token_id) {
        return Err(ApiError::not_found(format!("no live token {token_id:?}")));
    }
    match state.spaces.revoke_token(&space_id, &token_id).await? {
        Revoked::Revoked => Ok(StatusCode::NO_CONTENT),
        Revoked::NotFound => Err(ApiError::not_found(format!("no live token {token_id:?}"))),
        Revoked::LastAdmin => Err(ApiError::new(
            StatusCode::CONFLICT,
            "invalid_request_error",
            "this is the space's last admin token: create another one before revoking it",
        )),
    }
}

async fn get_settings(
    State(state): State<ReadState>,
    Path(space_id): Path<String>,
    headers: HeaderMap,
) -> Result<Json<IdentitySettings>, ApiError> {
    authorize(&state, &headers, &space_id, TokenKind::Admin).await?;
    Ok(Json(state.spaces.identity_settings(&space_id).await?))
}

/// Replaces the identity settings; only events processed afterwards see them.
async fn put_settings(
    State(state): State<ReadState>,
    Path(space_id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<IdentitySettings>, ApiError> {
    authorize(&state, &headers, &space_id, TokenKind::Admin).await?;
    let settings = parse_settings(&body)?;
    state
        .spaces
        .put_identity_settings(&space_id, &settings)
        .await?;
    Ok(Json(settings))
}

/// Parses and validates settings, naming the bad field in the error.
pub fn parse_settings(body: &[u8]) -> Result<IdentitySettings, ApiError> {
    IdentitySettings::parse(body).map_err(|e| ApiError::bad_request(e.to_string()))
}
