//! The Definitions API (SPEC 10), the change log and the on-demand
//! lookback run, all authenticated with the space's admin token.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use axum::{Json, Router};
use kindred_domain::compute::{computation_id, Class, Collection};
use kindred_domain::event::{format_millis, parse_time};
use kindred_store::token::TokenKind;
use kindred_store::{Computations, DefinitionRecord, DefinitionStatus};
use serde_json::{json, Value};

use crate::error::ApiError;
use crate::profile::authorize;
use crate::ReadState;

pub fn router(state: ReadState) -> Router {
    let mut router = Router::new();
    for (class, collection) in [
        (Class::ComputedTrait, "computed_traits"),
        (Class::Audience, "audiences"),
    ] {
        router = router
            .route(
                &format!("/v1/spaces/{{space_id}}/{collection}"),
                get(move |s, p, h| list(class, s, p, h)),
            )
            .route(
                &format!("/v1/spaces/{{space_id}}/{collection}/{{key}}"),
                get(move |s, p, h| read(class, s, p, h))
                    .put(move |s, p, h, b| put(class, s, p, h, b))
                    .delete(move |s, p, h| delete(class, s, p, h)),
            )
            .route(
                &format!("/v1/spaces/{{space_id}}/{collection}/{{key}}/backfill"),
                post(move |s, p, h| backfill(class, s, p, h)),
            )
            .route(
                &format!("/v1/spaces/{{space_id}}/{collection}/{{key}}/members"),
                get(move |s, p, q, h| members(class, s, p, q, h)),
            );
    }
    router
        .route("/v1/spaces/{space_id}/changes", get(changes))
        .route("/v1/spaces/{space_id}/lookback/run", post(run_lookback))
        .with_state(state)
}

/// Authorizes an admin call and returns the computations port.
async fn admin(
    state: &ReadState,
    headers: &HeaderMap,
    space_id: &str,
) -> Result<Arc<dyn Computations>, ApiError> {
    authorize(state, headers, space_id, TokenKind::Admin).await?;
    state.computations.clone().ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_IMPLEMENTED,
            "not_implemented",
            "computed traits and audiences are not available in this deployment yet",
        )
    })
}

/// A definition as the Definitions API answers it; `id` is the stable
/// `tra_…`/`aud_…` id destinations receive as `computation_id`.
pub fn definition_json(space_id: &str, r: &DefinitionRecord) -> Value {
    let mut out = json!({
        "id": computation_id(space_id, r.class, &r.key),
        "key": r.key,
        "class": r.class.as_str(),
        "collection": Collection::of_body(&r.body).unwrap_or_default().as_str(),
        "version": r.version,
        "definition": r.body,
        "created_at": format_millis(r.created_at),
        "updated_at": format_millis(r.updated_at),
    });
    match &r.status {
        DefinitionStatus::Backfilling { done, total } => {
            out["status"] = json!("backfilling");
            out["progress"] = json!({"done": done, "total": total});
        }
        DefinitionStatus::Ready => out["status"] = json!("ready"),
        DefinitionStatus::Failed(e) => {
            out["status"] = json!("failed");
            out["error"] = json!(e);
        }
    }
    out
}

/// Whether a definition's values are on accounts (not on profiles).
pub fn on_accounts(body: &Value) -> bool {
    Collection::of_body(body).unwrap_or_default() == Collection::Accounts
}

/// A definition as listed: with its size, how many profiles it holds for
/// (`null` for an account-level one, whose values are on accounts).
fn sized(space_id: &str, r: &DefinitionRecord, sizes: &BTreeMap<String, u64>) -> Value {
    let mut out = definition_json(space_id, r);
    out["size"] = if on_accounts(&r.body) {
        Value::Null
    } else {
        json!(sizes.get(&r.key).copied().unwrap_or(0))
    };
    out
}

async fn list(
    class: Class,
    State(state): State<ReadState>,
    Path(space_id): Path<String>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    let port = admin(&state, &headers, &space_id).await?;
    let all = port.definitions(&space_id, class).await?;
    let sizes = port.sizes(&space_id).await?;
    Ok(Json(
        json!({"data": all.iter().map(|r| sized(&space_id, r, &sizes)).collect::<Vec<_>>()}),
    ))
}

/// The profiles a user-level definition holds for (an audience's members,
/// a computed trait's profiles with a value), in profile id order.
async fn members(
    class: Class,
    State(state): State<ReadState>,
    Path((space_id, key)): Path<(String, String)>,
    Query(params): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    let port = admin(&state, &headers, &space_id).await?;
    let r = port
        .definition(&space_id, class, &key)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no {} {key:?}", class.as_str())))?;
    if on_accounts(&r.body) {
        return Err(ApiError::bad_request(
            "an account-level definition's values are on accounts: read them with the Profile API's accounts collection",
        ));
    }
    let limit = crate::error::limit_param(&params, 100, 1000)?;
    let after = params.get("after").map_or("", String::as_str);
    let rows = port.members(&space_id, class, &key, after, limit).await?;
    let next = (rows.len() == limit).then(|| rows[limit - 1].0.clone());
    let data: Vec<Value> = rows
        .iter()
        .map(|(profile_id, v)| {
            json!({"profile_id": profile_id, "value": v.value, "updated_at": format_millis(v.updated_at)})
        })
        .collect();
    Ok(Json(
        json!({"data": data, "cursor": {"after": after, "next": next}}),
    ))
}

async fn read(
    class: Class,
    State(state): State<ReadState>,
    Path((space_id, key)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    let port = admin(&state, &headers, &space_id).await?;
    let r = port
        .definition(&space_id, class, &key)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no {} {key:?}", class.as_str())))?;
    let sizes = port.sizes(&space_id).await?;
    Ok(Json(sized(&space_id, &r, &sizes)))
}

async fn put(
    class: Class,
    State(state): State<ReadState>,
    Path((space_id, key)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let port = admin(&state, &headers, &space_id).await?;
    let body: Value = serde_json::from_slice(&body)
        .map_err(|_| ApiError::bad_request("the body is not valid JSON"))?;
    let r = port.put_definition(&space_id, class, &key, &body).await?;
    let status = if r.created_at == r.updated_at {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(definition_json(&space_id, &r))))
}

async fn delete(
    class: Class,
    State(state): State<ReadState>,
    Path((space_id, key)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<StatusCode, ApiError> {
    let port = admin(&state, &headers, &space_id).await?;
    if port.delete_definition(&space_id, class, &key).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::not_found(format!(
            "no {} {key:?}",
            class.as_str()
        )))
    }
}

async fn backfill(
    class: Class,
    State(state): State<ReadState>,
    Path((space_id, key)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let port = admin(&state, &headers, &space_id).await?;
    let r = port
        .rebackfill(&space_id, class, &key)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no {} {key:?}", class.as_str())))?;
    Ok((StatusCode::ACCEPTED, Json(definition_json(&space_id, &r))))
}

async fn changes(
    State(state): State<ReadState>,
    Path(space_id): Path<String>,
    Query(params): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    let port = admin(&state, &headers, &space_id).await?;
    let since = match params.get("since") {
        None => 0,
        Some(s) => s.parse::<i64>().ok().filter(|s| *s >= 0).ok_or_else(|| {
            ApiError::bad_request("since must be a position from a previous response (or 0)")
        })?,
    };
    let limit = crate::error::limit_param(&params, 100, 1000)?;
    // One more than asked tells whether there is more.
    let mut rows = port.changes(&space_id, since, limit + 1).await?;
    let has_more = rows.len() > limit;
    rows.truncate(limit);
    let next = rows.last().map_or(since, |c| c.seq);
    let data: Vec<Value> = rows
        .iter()
        .map(|c| {
            let at = format_millis(c.at);
            let change = kindred_domain::compute::Change {
                key: c.key.clone(),
                class: c.class,
                old: c.old.clone(),
                new: c.new.clone(),
            };
            let mut out = json!({
                "seq": c.seq,
                "profile_id": c.profile_id,
                "key": c.key,
                "class": c.class.as_str(),
                "old": c.old,
                "new": c.new,
                "at": at,
                "payloads": change.payloads(&space_id, &at),
            });
            if let Some(g) = &c.group_id {
                // An account's change (account-level definitions).
                out["profile_id"] = Value::Null;
                out["group_id"] = json!(g);
                for p in out["payloads"].as_array_mut().into_iter().flatten() {
                    p["context"]["groupId"] = json!(g);
                }
            }
            out
        })
        .collect();
    Ok(Json(
        json!({"data": data, "cursor": {"since": since, "next": next.to_string(), "has_more": has_more}}),
    ))
}

async fn run_lookback(
    State(state): State<ReadState>,
    Path(space_id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let port = admin(&state, &headers, &space_id).await?;
    let as_of = if body.iter().all(u8::is_ascii_whitespace) {
        kindred_store::now_millis()
    } else {
        let body: Value = serde_json::from_slice(&body)
            .map_err(|_| ApiError::bad_request("the body is not valid JSON"))?;
        match body.get("as_of") {
            None | Some(Value::Null) => kindred_store::now_millis(),
            Some(Value::String(s)) => parse_time(s)
                .ok_or_else(|| ApiError::bad_request("as_of: must be an RFC 3339 date-time"))?,
            Some(_) => {
                return Err(ApiError::bad_request(
                    "as_of: must be an RFC 3339 date-time",
                ))
            }
        }
    };
    let n = port.run_lookback(&space_id, as_of).await?;
    // Account-level definitions are computed in this pass (Segment's are
    // batched too): over the users' values as they stand now.
    let accounts =
        kindred_store::accounts::run(state.profiles.as_ref(), port.as_ref(), &space_id, as_of)
            .await?;
    Ok(Json(json!({
        "as_of": format_millis(as_of),
        "profiles_enqueued": n,
        "accounts_computed": accounts.accounts,
        "account_changes": accounts.changes,
    })))
}
