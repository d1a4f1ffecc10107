//! The admin API of a space, authenticated with its admin token.

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::routing::get;
use axum::{Json, Router};
use kindred_domain::{IdentityRules, IdentitySettings};
use kindred_store::token::TokenKind;
use serde_json::Value;

use crate::error::ApiError;
use crate::profile::authorize;
use crate::ReadState;

pub fn router(state: ReadState) -> Router {
    Router::new()
        .route(
            "/v1/spaces/{space_id}/identity_settings",
            get(get_settings).put(put_settings),
        )
        .with_state(state)
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
    let value: Value = serde_json::from_slice(body)
        .map_err(|_| ApiError::bad_request("the body is not valid JSON"))?;
    let settings: IdentitySettings = serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        ApiError::bad_request(format!("{path}: {}", e.inner()))
    })?;
    IdentityRules::new(settings.clone()).map_err(|e| ApiError::bad_request(e.to_string()))?;
    Ok(settings)
}
