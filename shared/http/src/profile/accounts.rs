//! The `accounts` collection of the Profile API (Segment's): an account
//! named `group_id:{id}`, made by the events that name it
//! ([`kindred_domain::account`]), with its traits, external id, events,
//! metadata and the users linked to it.

use std::collections::BTreeSet;

use axum::http::Uri;
use kindred_domain::event::format_millis;
use kindred_store::{AccountDoc, ProfileLookup, ProfileParts};
use serde_json::{json, Value};

use super::events::{event_query, segment_shape, shaped_page};
use super::params::{flag, invalid, list, page, Params, MAX_ITEMS};
use crate::error::ApiError;
use crate::ReadState;

/// The account a lookup names: only `group_id:{id}`.
pub(crate) fn group_id(lookup: &str) -> Result<&str, ApiError> {
    match lookup.split_once(':') {
        Some(("group_id", id)) if !id.is_empty() => Ok(id),
        _ => Err(invalid(
            "external_id",
            "must be group_id:{id} in the accounts collection",
        )),
    }
}

pub(crate) async fn resource(
    state: &ReadState,
    space_id: &str,
    source_id: &str,
    group_id: &str,
    resource: &str,
    params: &Params,
    uri: &Uri,
) -> Result<Value, ApiError> {
    let doc = state
        .profiles
        .account(space_id, group_id)
        .await?
        .ok_or_else(|| ApiError::not_found("Profile was not found."))?;
    match resource {
        "traits" => traits(state, space_id, &doc, params, uri).await,
        "external_ids" => external_ids(&doc, source_id, params, uri),
        "metadata" => metadata(&doc, source_id, params),
        "links" => links(state, space_id, source_id, &doc, params, uri).await,
        _ => events(state, space_id, source_id, &doc, params, uri).await,
    }
}

/// The account's traits, with its account-level computed traits and
/// audiences (as Segment shows them).
async fn traits(
    state: &ReadState,
    space_id: &str,
    doc: &AccountDoc,
    params: &Params,
    uri: &Uri,
) -> Result<Value, ApiError> {
    let computed = match &state.computations {
        Some(c) => c.account_values(space_id, &doc.account.group_id).await?.0,
        None => Default::default(),
    };
    super::trait_page(&doc.account.traits, &computed, params, uri)
}

fn external_ids(
    doc: &AccountDoc,
    source_id: &str,
    params: &Params,
    uri: &Uri,
) -> Result<Value, ApiError> {
    flag(params, "verbose")?;
    let include = list(params, "include");
    let a = &doc.account;
    let ids: Vec<Value> = [json!({
        "id": a.group_id, "type": "group_id", "source_id": source_id,
        "collection": "accounts", "created_at": format_millis(a.created_at),
        "encoding": "none", "first_message_id": a.first_message_id,
    })]
    .into_iter()
    .filter(|_| include.is_empty() || include.iter().any(|t| t == "group_id"))
    .collect();
    let (data, cursor) = page(ids, params, uri, MAX_ITEMS)?;
    Ok(json!({"data": data, "cursor": cursor}))
}

fn metadata(doc: &AccountDoc, source_id: &str, params: &Params) -> Result<Value, ApiError> {
    flag(params, "verbose")?;
    let a = &doc.account;
    Ok(json!({"metadata": {
        "created_at": format_millis(a.created_at),
        "updated_at": format_millis(a.updated_at),
        "expires_at": null,
        "first_message_id": a.first_message_id,
        "first_source_id": source_id,
        "last_message_id": a.last_message_id,
        "last_source_id": source_id,
    }}))
}

/// The users linked to the account (by its group calls), each as its
/// current (root) profile's external ids, once per person.
async fn links(
    state: &ReadState,
    space_id: &str,
    source_id: &str,
    doc: &AccountDoc,
    params: &Params,
    uri: &Uri,
) -> Result<Value, ApiError> {
    let parts = ProfileParts {
        external_ids: true,
        ..ProfileParts::default()
    };
    let mut seen = BTreeSet::new();
    let mut users = Vec::new();
    for profile_id in &doc.users {
        let lookup = ProfileLookup::ProfileId(profile_id.clone());
        let Some(user) = state.profiles.profile(space_id, &lookup, parts).await? else {
            continue;
        };
        if seen.insert(user.profile_id.clone()) {
            users.push(user);
        }
    }
    let (users, cursor) = page(users, params, uri, MAX_ITEMS)?;
    let data: Vec<Value> = users
        .iter()
        .map(|u| {
            let ids: Vec<Value> = u
                .external_ids
                .iter()
                .map(|e| {
                    json!({"id": e.id.value, "type": e.id.kind, "source_id": source_id,
                           "collection": "users", "created_at": format_millis(e.created_at),
                           "encoding": e.encoding})
                })
                .collect();
            json!({"to_collection": "users", "external_ids": ids, "profile_id": u.profile_id})
        })
        .collect();
    Ok(json!({"data": data, "cursor": cursor}))
}

async fn events(
    state: &ReadState,
    space_id: &str,
    source_id: &str,
    doc: &AccountDoc,
    params: &Params,
    uri: &Uri,
) -> Result<Value, ApiError> {
    let (query, limit) = event_query(params)?;
    let found = state
        .profiles
        .account_events(space_id, &doc.account.group_id, &query)
        .await?;
    shaped_page(found, limit, uri, |event| {
        let mut shaped = segment_shape(event, source_id, "");
        shaped["related"] = json!({"accounts": doc.account.group_id});
        shaped
    })
}
