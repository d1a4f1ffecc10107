//! Privacy operations, authenticated with the space's admin token:
//! regulations (delete and/or suppress people, or lift a suppression) in
//! the shape of Segment's.

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use axum::{Json, Router};
use kindred_domain::event::format_millis;
use kindred_domain::privacy::{parse_removal, RegulationRequest};
use kindred_store::privacy::{Privacy, RegulationRecord, SplitOutcome, Violation};
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
        .route(
            "/v1/spaces/{space_id}/collections/users/profiles/{lookup}/external_ids/delete",
            post(remove_identifiers),
        )
        .route(
            "/v1/spaces/{space_id}/collections/users/profiles/{lookup}/merges/{child}/split",
            post(split),
        )
        .route("/v1/spaces/{space_id}/violations", get(space_violations))
        .route(
            "/v1/spaces/{space_id}/collections/users/profiles/{lookup}/violations",
            get(profile_violations),
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
    let limit = crate::error::limit_param(&query, 20, 100)?;
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

/// `POST .../profiles/{lookup}/external_ids/delete` (Segment's Delete
/// Profile Identifier shape): takes identifiers off a profile.
async fn remove_identifiers(
    State(state): State<ReadState>,
    Path((space_id, lookup)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let privacy = admin(&state, &headers, &space_id).await?;
    let lookup = crate::profile::parse_lookup(&lookup)?;
    let body: Value = serde_json::from_slice(&body)
        .map_err(|_| ApiError::bad_request("the body is not valid JSON"))?;
    let ids = parse_removal(&body).map_err(|e| ApiError::bad_request(e.to_string()))?;
    let removed = privacy
        .remove_identifiers(&space_id, &lookup, &ids)
        .await?
        .ok_or_else(|| ApiError::not_found("Profile was not found."))?;
    Ok(Json(json!({
        "removed": removed.iter().map(|i| json!({"type": i.kind, "id": i.value})).collect::<Vec<_>>(),
    })))
}

fn violation_json(v: &Violation) -> Value {
    json!({
        "message_id": v.message_id,
        "profile_id": v.profile_id,
        "other_profile_id": v.other_profile_id,
        "identifier_type": v.id_type,
        "identifier_hash": format!("sha256:{}", v.id_hash),
        "rule": v.rule,
        "detail": v.detail,
        "at": format_millis(v.at),
    })
}

/// `since` (RFC 3339, default: the whole 30 days kept), `limit` (1-100,
/// default 20), `next`.
async fn violations_page(
    privacy: &dyn Privacy,
    space_id: &str,
    profile: Option<&kindred_store::ProfileLookup>,
    query: &HashMap<String, String>,
) -> Result<Json<Value>, ApiError> {
    let limit = crate::error::limit_param(query, 20, 100)?;
    let since = match query.get("since") {
        None => 0,
        Some(t) => kindred_domain::event::parse_time(t)
            .ok_or_else(|| ApiError::bad_request("since: an RFC 3339 time"))?,
    };
    let page = privacy
        .violations(
            space_id,
            profile,
            since,
            query.get("next").map(String::as_str),
            limit,
        )
        .await
        .map_err(|e| match e {
            kindred_store::StoreError::Invalid(m) => ApiError::bad_request(m),
            other => other.into(),
        })?
        .ok_or_else(|| ApiError::not_found("Profile was not found."))?;
    Ok(Json(json!({
        "data": page.entries.iter().map(violation_json).collect::<Vec<_>>(),
        "cursor": {"has_more": page.next.is_some(), "next": page.next.unwrap_or_default(), "limit": limit},
    })))
}

/// `GET /v1/spaces/{space}/violations` (admin token): the space's log.
async fn space_violations(
    State(state): State<ReadState>,
    Path(space_id): Path<String>,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    let privacy = admin(&state, &headers, &space_id).await?;
    violations_page(privacy.as_ref(), &space_id, None, &query).await
}

/// `GET .../profiles/{lookup}/violations` (access token): the entries of
/// the profile's tree, the merges refused with it included.
async fn profile_violations(
    State(state): State<ReadState>,
    Path((space_id, lookup)): Path<(String, String)>,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    authorize(&state, &headers, &space_id, TokenKind::Access).await?;
    let privacy = state.privacy.clone().ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_IMPLEMENTED,
            "not_implemented",
            "the violations log is not available in this deployment yet",
        )
    })?;
    let lookup = crate::profile::parse_lookup(&lookup)?;
    violations_page(privacy.as_ref(), &space_id, Some(&lookup), &query).await
}

/// `POST .../profiles/{lookup}/merges/{child}/split` (admin token): undoes
/// a wrong merge (README, "Splitting a merge").
async fn split(
    State(state): State<ReadState>,
    Path((space_id, lookup, child)): Path<(String, String, String)>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    let privacy = admin(&state, &headers, &space_id).await?;
    let lookup = crate::profile::parse_lookup(&lookup)?;
    match privacy.split(&space_id, &lookup, &child).await? {
        SplitOutcome::Split {
            parent,
            child,
            moved,
        } => Ok(Json(json!({
            "parent": parent,
            "child": child,
            "moved_external_ids": moved.iter().map(|i| json!({"type": i.kind, "id": i.value})).collect::<Vec<_>>(),
        }))),
        SplitOutcome::NoProfile => Err(ApiError::not_found("Profile was not found.")),
        SplitOutcome::NotMerged => Err(ApiError::not_found(
            "that profile is not merged into this one",
        )),
    }
}
