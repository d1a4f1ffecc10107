//! The Profile API (SPEC 6), compatible with Segment's Profile API:
//! `GET /v1/spaces/{space}/collections/users/profiles/{type}:{value}/{resource}`
//! (and the older `/v1/namespaces/...` prefix), with the merge history as
//! an extra resource.

mod accounts;
pub(crate) mod events;
mod params;

use std::collections::BTreeMap;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, Uri};
use axum::routing::get;
use axum::{Json, Router};
use kindred_domain::compute::Class;
use kindred_domain::event::format_millis;
use kindred_domain::traits::visible;
use kindred_domain::Identifier;
use kindred_store::token::TokenKind;
use kindred_store::{ProfileDoc, ProfileLookup, ProfileParts, SpaceAuth};
use serde_json::{json, Map, Value};

use crate::auth::basic_user;
use crate::error::ApiError;
use crate::ReadState;
use params::{cursor, flag, invalid, list, page, Params, MAX_ITEMS, MAX_TRAITS};

pub fn router(state: ReadState) -> Router {
    Router::new()
        .route(
            "/v1/spaces/{space_id}/collections/{collection}/profiles/{lookup}/{resource}",
            get(resource),
        )
        .route(
            "/v1/namespaces/{space_id}/collections/{collection}/profiles/{lookup}/{resource}",
            get(resource),
        )
        .with_state(state)
}

/// Authenticates a token of `kind` for exactly this space. A valid token of
/// another space is refused like an unknown one: it never reaches data.
pub(crate) async fn authorize(
    state: &ReadState,
    headers: &HeaderMap,
    space_id: &str,
    kind: TokenKind,
) -> Result<SpaceAuth, ApiError> {
    let Some(token) = basic_user(headers) else {
        return Err(ApiError::unauthorized(format!(
            "an {} is required as the HTTP Basic user name",
            kind.as_str().replace('_', " ")
        )));
    };
    match state.spaces.authenticate(&token, kind).await? {
        Some(auth) if auth.space_id == space_id => {
            if kind == TokenKind::Access {
                charge_profile_rate(state, &auth)?;
            }
            Ok(auth)
        }
        _ => Err(ApiError::unauthorized(format!(
            "the {} is not valid for this space",
            kind.as_str().replace('_', " ")
        ))),
    }
}

/// Takes one request from the space's Profile API budget (an access
/// token's calls, and the explorer's pages signed in with one).
pub(crate) fn charge_profile_rate(state: &ReadState, auth: &SpaceAuth) -> Result<(), ApiError> {
    state
        .profile_rate_limiter
        .take_at(&auth.space_id, 1, f64::from(auth.profile_api_rate))
        .map_err(ApiError::profile_rate_limited)
}

pub(crate) fn parse_lookup(raw: &str) -> Result<ProfileLookup, ApiError> {
    let (kind, value) = raw
        .split_once(':')
        .filter(|(k, v)| !k.is_empty() && !v.is_empty())
        .ok_or_else(|| {
            invalid(
                "external_id",
                "must be {type}:{value}, for example user_id:u1",
            )
        })?;
    Ok(if kind == "profile_id" {
        ProfileLookup::ProfileId(value.to_string())
    } else {
        ProfileLookup::Identifier(Identifier::new(kind.to_ascii_lowercase(), value))
    })
}

async fn resource(
    State(state): State<ReadState>,
    Path((space_id, collection, lookup, resource)): Path<(String, String, String, String)>,
    Query(params): Query<Params>,
    headers: HeaderMap,
    uri: Uri,
) -> Result<Json<Value>, ApiError> {
    let auth = authorize(&state, &headers, &space_id, TokenKind::Access).await?;
    let source_id = auth.source_id.as_str();
    let known = ["traits", "external_ids", "events", "metadata", "links"];
    let unknown = || ApiError::not_found(format!("Resource {resource:?} was not found."));
    match collection.as_str() {
        "users" if known.contains(&resource.as_str()) || resource == "merges" => {}
        "accounts" if known.contains(&resource.as_str()) => {
            let group_id = accounts::group_id(&lookup)?;
            let body = accounts::resource(
                &state, &space_id, source_id, group_id, &resource, &params, &uri,
            )
            .await?;
            return Ok(Json(body));
        }
        "users" | "accounts" => return Err(unknown()),
        _ => return Err(invalid("collection", "must be users or accounts")),
    }
    let lookup = parse_lookup(&lookup)?;
    let parts = ProfileParts {
        external_ids: resource == "external_ids",
        links: resource == "links",
        merges: resource == "merges",
        activity: resource == "metadata",
        computed: resource == "traits",
    };
    let doc = state
        .profiles
        .profile(&space_id, &lookup, parts)
        .await?
        .ok_or_else(|| ApiError::not_found("Profile was not found."))?;
    let body = match resource.as_str() {
        "traits" => traits(&doc, &params, &uri)?,
        "external_ids" => external_ids(&doc, &params, &uri)?,
        "events" => events::events(&state, &space_id, source_id, &doc, &params, &uri).await?,
        "metadata" => metadata(&doc, source_id, &params)?,
        "links" => links(&doc, source_id, &params, &uri)?,
        _ => merges(&doc, &params, &uri)?,
    };
    Ok(Json(body))
}

fn traits(doc: &ProfileDoc, params: &Params, uri: &Uri) -> Result<Value, ApiError> {
    trait_page(&doc.traits, &doc.computed, params, uri)
}

/// A page of a profile's (or an account's) traits: custom traits and
/// computed values in one key order, filtered by `class` and `include`.
pub(crate) fn trait_page(
    traits: &kindred_domain::Traits,
    computed: &kindred_store::ComputedValues,
    params: &Params,
    uri: &Uri,
) -> Result<Value, ApiError> {
    let limit = params::limit(params, MAX_TRAITS)?;
    let verbose = flag(params, "verbose")?;
    let include = list(params, "include");
    let class = match params.get("class").map(String::as_str) {
        None => None,
        Some(c) => Some(
            Class::parse(c)
                .ok_or_else(|| invalid("class", "must be audience or computed_trait"))?,
        ),
    };
    let after = params.get("next");
    // Custom traits and computed values in one key order; a computed
    // value wins over a custom trait of the same name.
    let mut all: BTreeMap<&String, (&Value, &str, i64)> = BTreeMap::new();
    if class.is_none() {
        for (k, t) in visible(traits) {
            all.insert(k, (&t.value, t.source_id.as_str(), t.updated_at));
        }
    }
    for (k, c) in computed {
        if class.is_none_or(|class| class == c.class) {
            all.insert(k, (&c.value, "kindred:compute", c.updated_at));
        }
    }
    let mut selected = all
        .into_iter()
        .filter(|(k, _)| include.is_empty() || include.contains(k))
        .filter(|(k, _)| after.is_none_or(|a| k.as_str() > a.as_str()));
    let mut out = Map::new();
    let mut last = None;
    for (key, (value, source_id, updated_at)) in selected.by_ref().take(limit) {
        let value = if verbose {
            json!({"value": value, "source_id": source_id, "updated_at": format_millis(updated_at)})
        } else {
            value.clone()
        };
        out.insert(key.clone(), value);
        last = Some(key.clone());
    }
    let has_more = selected.next().is_some();
    Ok(json!({"traits": out, "cursor": cursor(uri, has_more, last, limit)}))
}

fn external_ids(doc: &ProfileDoc, params: &Params, uri: &Uri) -> Result<Value, ApiError> {
    let include = list(params, "include");
    let verbose = flag(params, "verbose")?;
    let mut ids: Vec<_> = doc
        .external_ids
        .iter()
        .filter(|e| include.is_empty() || include.contains(&e.id.kind))
        .collect();
    ids.sort_by(|a, b| {
        (b.created_at, &a.id.kind, &a.id.value).cmp(&(a.created_at, &b.id.kind, &b.id.value))
    });
    let (ids, cursor) = page(ids, params, uri, MAX_ITEMS)?;
    let data: Vec<Value> = ids
        .into_iter()
        .map(|e| {
            let mut item = json!({
                "id": e.id.value, "type": e.id.kind, "source_id": e.source_id,
                "collection": e.collection, "created_at": format_millis(e.created_at),
                "encoding": e.encoding, "first_message_id": e.first_message_id,
            });
            if verbose {
                // When it joined this profile (later than created_at for
                // one that came with a merge).
                item["added_at"] = format_millis(e.added_at).into();
            }
            item
        })
        .collect();
    Ok(json!({"data": data, "cursor": cursor}))
}

/// Segment's metadata fields, then Kindred's: `profile_id`,
/// `merged_profile_ids` and `merges`. A space has one source, so both
/// source ids are the space's; profiles do not expire (`expires_at`).
fn metadata(doc: &ProfileDoc, source_id: &str, params: &Params) -> Result<Value, ApiError> {
    flag(params, "verbose")?;
    Ok(json!({"metadata": {
        "created_at": format_millis(doc.created_at),
        "updated_at": format_millis(doc.updated_at),
        "expires_at": null,
        "first_message_id": doc.first_message_id,
        "first_source_id": source_id,
        "last_message_id": doc.last_message_id,
        "last_source_id": source_id,
        "profile_id": doc.profile_id,
        "merged_profile_ids": doc.tree.iter().skip(1).collect::<Vec<_>>(),
        "merges": doc.merges,
    }}))
}

fn links(doc: &ProfileDoc, source_id: &str, params: &Params, uri: &Uri) -> Result<Value, ApiError> {
    let (links, cursor) = page(doc.links.iter().collect(), params, uri, MAX_ITEMS)?;
    let data: Vec<Value> = links
        .into_iter()
        .map(|l| {
            json!({"to_collection": "accounts", "external_ids": [{
                "id": l.group_id, "type": "group_id", "source_id": source_id,
                "collection": "accounts", "created_at": format_millis(l.linked_at),
                "encoding": "none", "first_message_id": l.message_id,
            }]})
        })
        .collect();
    Ok(json!({"data": data, "cursor": cursor}))
}

fn merges(doc: &ProfileDoc, params: &Params, uri: &Uri) -> Result<Value, ApiError> {
    let (merges, cursor) = page(doc.merge_history.iter().collect(), params, uri, MAX_ITEMS)?;
    let data: Vec<Value> = merges
        .into_iter()
        .map(|m| {
            json!({"parent_id": m.parent_id, "child_id": m.child_id,
                   "message_id": m.message_id, "merged_at": format_millis(m.merged_at)})
        })
        .collect();
    Ok(json!({"profile_id": doc.profile_id, "data": data, "cursor": cursor}))
}
