//! Privacy operations, authenticated with the space's admin token:
//! regulations (delete and/or suppress people, or lift a suppression) in
//! the shape of Segment's.

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::get;
use axum::{Json, Router};
use kindred_domain::event::format_millis;
use kindred_domain::privacy::RegulationRequest;
use kindred_store::privacy::{Privacy, RegulationRecord};
use kindred_store::token::TokenKind;
use serde_json::{json, Value};

use crate::error::ApiError;
use crate::profile::authorize;
use crate::ReadState;

pub fn router(state: ReadState) -> Router {
    Router::new()
        .route("/v1/spaces/{space_id}/regulations", get(list).post(create))
        .route(
            "/v1/spaces/{space_id}/regulations/{regulation_id}",
            get(read),
        )
        .with_state(state)
}

async fn admin(
    state: &ReadState,
    headers: &HeaderMap,
    space_id: &str,
) -> Result<Arc<dyn Privacy>, ApiError> {
    authorize(state, headers, space_id, TokenKind::Admin).await?;
    state.privacy.clone().ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_IMPLEMENTED,
            "not_implemented",
            "regulations are not available in this deployment yet",
        )
    })
}

/// A regulation as the API shows it; `subjects` only when asked (a
/// regulation may name 5,000).
fn regulation_json(r: &RegulationRecord, subjects: bool) -> Value {
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for s in &r.subjects {
        *counts.entry(s.status.as_str()).or_default() += 1;
    }
    let mut out = json!({
        "id": r.regulation_id,
        "regulation_type": r.regulation_type.as_str(),
        "subject_type": r.subject_type,
        "status": r.status().as_str(),
        "created_at": format_millis(r.created_at),
        "finished_at": r.finished_at.map(format_millis),
        "subject_count": r.subjects.len(),
        "subjects_by_status": counts,
        "profiles_deleted": r.subjects.iter().map(|s| s.profiles_deleted).sum::<u64>(),
    });
    if subjects {
        out["subjects"] = r
            .subjects
            .iter()
            .map(|s| {
                let mut one = json!({"index": s.index, "status": s.status.as_str(),
                                     "profiles_deleted": s.profiles_deleted});
                if let Some(reason) = &s.reason {
                    one["reason"] = json!(reason);
                }
                one
            })
            .collect();
    }
    out
}

async fn create(
    State(state): State<ReadState>,
    Path(space_id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let privacy = admin(&state, &headers, &space_id).await?;
    let body: Value = serde_json::from_slice(&body)
        .map_err(|_| ApiError::bad_request("the body is not valid JSON"))?;
    let request =
        RegulationRequest::parse(&body).map_err(|e| ApiError::bad_request(e.to_string()))?;
    let record = privacy.create_regulation(&space_id, &request).await?;
    Ok((StatusCode::CREATED, Json(regulation_json(&record, false))))
}

async fn read(
    State(state): State<ReadState>,
    Path((space_id, regulation_id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    let privacy = admin(&state, &headers, &space_id).await?;
    let record = privacy
        .regulation(&space_id, &regulation_id)
        .await?
        .ok_or_else(|| ApiError::not_found("no such regulation"))?;
    Ok(Json(regulation_json(&record, true)))
}

async fn list(
    State(state): State<ReadState>,
    Path(space_id): Path<String>,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    let privacy = admin(&state, &headers, &space_id).await?;
    let limit = match query.get("limit") {
        None => 20,
        Some(v) => v
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=100).contains(n))
            .ok_or_else(|| ApiError::bad_request("limit: from 1 to 100"))?,
    };
    let before = query.get("next").map(String::as_str);
    let mut records = privacy
        .regulations(&space_id, before, limit + 1)
        .await
        .map_err(|e| match e {
            kindred_store::StoreError::NotFound => {
                ApiError::bad_request("next: not a cursor of this list")
            }
            other => other.into(),
        })?;
    let has_more = records.len() > limit;
    records.truncate(limit);
    let next = if has_more {
        records.last().map(|r| r.regulation_id.clone())
    } else {
        None
    };
    Ok(Json(json!({
        "data": records.iter().map(|r| regulation_json(r, false)).collect::<Vec<_>>(),
        "cursor": {"has_more": has_more, "next": next.unwrap_or_default(), "limit": limit},
        "suppressed_events": privacy.suppressed_events(&space_id).await?,
    })))
}
