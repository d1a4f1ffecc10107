//! The space's pages: audiences and computed traits with their members,
//! the change feed, destinations with their dead letters, and the
//! identity settings.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::Form;
use kindred_domain::compute::Class;
use kindred_store::{Computations, DefinitionStatus, Destinations};
use serde::Deserialize;

use super::html::{esc, profile_link, table, time, url_part, value, Page};
use super::{session, UiError};
use crate::compute::{definition_json, on_accounts};
use crate::destinations::{destination_json, status_json};
use crate::ReadState;

fn computations_port(state: &ReadState) -> Result<Arc<dyn Computations>, UiError> {
    state.computations.clone().ok_or_else(|| {
        UiError::new(
            StatusCode::NOT_IMPLEMENTED,
            "Computed traits and audiences are not available in this deployment.",
        )
    })
}

fn destinations_port(state: &ReadState) -> Result<Arc<dyn Destinations>, UiError> {
    state.destinations.clone().ok_or_else(|| {
        UiError::new(
            StatusCode::NOT_IMPLEMENTED,
            "Destinations are not available in this deployment.",
        )
    })
}

fn class_of(segment: &str) -> Result<Class, UiError> {
    Class::parse(segment).ok_or_else(|| UiError::not_found("No such kind of definition."))
}

fn status_cell(status: &DefinitionStatus) -> String {
    match status {
        DefinitionStatus::Ready => "ready".into(),
        DefinitionStatus::Backfilling { done, total } => {
            format!("backfilling ({done} of {total} profiles)")
        }
        DefinitionStatus::Failed(e) => format!("<span class=\"error\">failed: {}</span>", esc(e)),
    }
}

pub(crate) async fn computations(
    State(state): State<ReadState>,
    headers: HeaderMap,
) -> Result<Response, UiError> {
    let s = session(&state, &headers).await?;
    let port = computations_port(&state)?;
    let sizes = port.sizes(&s.space_id).await?;
    let mut page = Page::new("Audiences and computed traits", Some(&s));
    for (class, title) in [
        (Class::Audience, "Audiences"),
        (Class::ComputedTrait, "Computed traits"),
    ] {
        let rows: Vec<Vec<String>> = port
            .definitions(&s.space_id, class)
            .await?
            .iter()
            .map(|r| {
                let size = if on_accounts(&r.body) {
                    "account-level".into()
                } else {
                    sizes.get(&r.key).copied().unwrap_or(0).to_string()
                };
                vec![
                    format!(
                        "<a href=\"/ui/computations/{}/{}\">{}</a>",
                        class.as_str(),
                        url_part(&r.key),
                        esc(&r.key)
                    ),
                    format!("<code>{}</code>", value(&r.body, 300)),
                    size,
                    status_cell(&r.status),
                    time(r.updated_at),
                ]
            })
            .collect();
        page.push(&format!("<h1>{title}</h1>"));
        page.push(&table(
            &["key", "definition", "profiles", "backfill", "updated"],
            &rows,
        ));
    }
    Ok(page.finish().into_response())
}

#[derive(Deserialize)]
pub(crate) struct After {
    #[serde(default)]
    after: String,
}

pub(crate) async fn computation(
    State(state): State<ReadState>,
    Path((class, key)): Path<(String, String)>,
    Query(after): Query<After>,
    headers: HeaderMap,
) -> Result<Response, UiError> {
    let s = session(&state, &headers).await?;
    let class = class_of(&class)?;
    let port = computations_port(&state)?;
    let r = port
        .definition(&s.space_id, class, &key)
        .await?
        .ok_or_else(|| UiError::not_found(format!("No {} {key}.", class.as_str())))?;
    let shown = definition_json(&s.space_id, &r);
    let mut page = Page::new(&r.key, Some(&s));
    page.push(&format!(
        "<h1>{} <code>{}</code></h1><p class=\"meta\">id <code>{}</code> · version {} · {}</p>",
        if class == Class::Audience {
            "Audience"
        } else {
            "Computed trait"
        },
        esc(&r.key),
        value(&shown["id"], 80),
        r.version,
        status_cell(&r.status),
    ));
    let pretty = serde_json::to_string_pretty(&r.body).unwrap_or_default();
    page.push(&format!("<h2>Definition</h2><pre>{}</pre>", esc(&pretty)));
    const PAGE: usize = 50;
    page.push(&format!(
        "<h2>{}</h2>",
        if class == Class::Audience {
            "Members"
        } else {
            "Profiles with a value"
        }
    ));
    if on_accounts(&r.body) {
        page.push(
            "<p class=\"empty\">An account-level definition: its values are on accounts \
             (the Profile API's accounts collection), not listed here.</p>",
        );
        return Ok(page.finish().into_response());
    }
    let members = port
        .members(&s.space_id, class, &r.key, &after.after, PAGE)
        .await?;
    let rows: Vec<Vec<String>> = members
        .iter()
        .map(|(p, v)| vec![profile_link(p), value(&v.value, 200), time(v.updated_at)])
        .collect();
    page.push(&table(&["profile", "value", "since"], &rows));
    if members.len() == PAGE {
        let last = &members[PAGE - 1].0;
        page.push(&format!(
            "<p><a href=\"?after={}\">Next members →</a></p>",
            url_part(last)
        ));
    }
    Ok(page.finish().into_response())
}

#[derive(Deserialize)]
pub(crate) struct Since {
    #[serde(default)]
    since: i64,
}

pub(crate) async fn changes(
    State(state): State<ReadState>,
    Query(since): Query<Since>,
    headers: HeaderMap,
) -> Result<Response, UiError> {
    let s = session(&state, &headers).await?;
    let port = computations_port(&state)?;
    const PAGE: usize = 100;
    let changes = port.changes(&s.space_id, since.since, PAGE).await?;
    let rows: Vec<Vec<String>> = changes
        .iter()
        .map(|c| {
            let who = match &c.group_id {
                Some(g) => format!("account {}", esc(g)),
                None => profile_link(&c.profile_id),
            };
            vec![
                time(c.at),
                who,
                esc(&c.key),
                esc(c.class.as_str()),
                c.old.as_ref().map(|o| value(o, 100)).unwrap_or_default(),
                value(&c.new, 100),
            ]
        })
        .collect();
    let mut page = Page::new("Changes", Some(&s));
    page.push("<h1>Changes</h1><p class=\"hint\">Every change of a computed value, oldest first (what destinations are sent).</p>");
    page.push(&table(
        &["when", "profile", "key", "kind", "from", "to"],
        &rows,
    ));
    if let Some(last) = changes.last().filter(|_| changes.len() == PAGE) {
        page.push(&format!(
            "<p><a href=\"?since={}\">Later changes →</a></p>",
            last.seq
        ));
    }
    Ok(page.finish().into_response())
}

pub(crate) async fn destinations(
    State(state): State<ReadState>,
    headers: HeaderMap,
) -> Result<Response, UiError> {
    let s = session(&state, &headers).await?;
    let port = destinations_port(&state)?;
    let mut rows = Vec::new();
    for d in port.destinations(&s.space_id).await? {
        let shown = destination_json(&d);
        let status = shown_status(port.as_ref(), &s.space_id, &d.destination_id).await?;
        let last_error = match &status["last_error"] {
            serde_json::Value::Null => String::new(),
            // Its message can name the endpoint: the admin token's to read.
            e if !s.admin => format!("{} at {}", value(&e["status"], 10), value(&e["at"], 40)),
            e => format!(
                "{} at {}: {}",
                value(&e["status"], 10),
                value(&e["at"], 40),
                value(&e["message"], 200)
            ),
        };
        rows.push(vec![
            format!(
                "<a href=\"/ui/destinations/{}\">{}</a>",
                url_part(&d.destination_id),
                esc(&d.destination_id)
            ),
            value(&shown["kind"], 40),
            value(&status["delivered"], 20),
            value(&status["pending"], 20),
            value(&status["retrying"], 20),
            value(&status["dead"], 20),
            value(&status["last_success_at"], 40),
            last_error,
        ]);
    }
    let mut page = Page::new("Destinations", Some(&s));
    page.push("<h1>Destinations</h1>");
    page.push(&table(
        &[
            "destination",
            "type",
            "delivered",
            "pending",
            "retrying",
            "dead",
            "last success",
            "last error",
        ],
        &rows,
    ));
    Ok(page.finish().into_response())
}

/// A destination's status as its API shows it (`null` if it is gone).
async fn shown_status(
    port: &dyn Destinations,
    space_id: &str,
    id: &str,
) -> Result<serde_json::Value, UiError> {
    Ok(port
        .destination_status(space_id, id)
        .await?
        .map(|st| status_json(&st))
        .unwrap_or_default())
}

#[derive(Deserialize)]
pub(crate) struct Notice {
    #[serde(default)]
    replayed: Option<u64>,
}

pub(crate) async fn destination(
    State(state): State<ReadState>,
    Path(id): Path<String>,
    Query(notice): Query<Notice>,
    headers: HeaderMap,
) -> Result<Response, UiError> {
    let s = session(&state, &headers).await?;
    let port = destinations_port(&state)?;
    let d = port
        .destination(&s.space_id, &id)
        .await?
        .ok_or_else(|| UiError::not_found(format!("No destination {id}.")))?;
    let shown = destination_json(&d);
    let status = shown_status(port.as_ref(), &s.space_id, &id).await?;
    let mut page = Page::new(&id, Some(&s));
    page.push(&format!("<h1>Destination <code>{}</code></h1>", esc(&id)));
    if let Some(n) = notice.replayed {
        page.push(&format!(
            "<p class=\"notice\">{n} dead letter(s) queued again.</p>"
        ));
    }
    // Settings (the endpoint, which may carry credentials in its URL)
    // and error messages are the admin token's to read.
    let mut status = status;
    if !s.admin {
        if let Some(e) = status["last_error"].as_object_mut() {
            e.remove("message");
        }
    }
    if s.admin {
        page.push(&format!(
            "<h2>Settings</h2><pre>{}</pre>",
            esc(&serde_json::to_string_pretty(&shown).unwrap_or_default())
        ));
    } else {
        page.push(&format!(
            "<p class=\"meta\">{} destination, version {}. Its settings need the admin token.</p>",
            value(&shown["kind"], 40),
            value(&shown["version"], 20)
        ));
    }
    page.push(&format!(
        "<h2>Status</h2><pre>{}</pre>",
        esc(&serde_json::to_string_pretty(&status).unwrap_or_default()),
    ));
    page.push("<h2>Dead letters</h2>");
    if s.admin {
        let letters = port.dead_letters(&s.space_id, &id, 100).await?;
        let rows: Vec<Vec<String>> = letters
            .iter()
            .map(|l| {
                vec![
                    l.seq.to_string(),
                    profile_link(&l.profile_id),
                    l.attempts.to_string(),
                    esc(&l.error),
                    format!("<code>{}</code>", value(&l.call, 300)),
                ]
            })
            .collect();
        page.push(&table(
            &["#", "profile", "attempts", "error", "call"],
            &rows,
        ));
        if !letters.is_empty() {
            page.push(&format!(
                "<form method=\"post\" action=\"/ui/destinations/{}/replay\">\
                 <button type=\"submit\">Replay every dead letter</button></form>",
                url_part(&id)
            ));
        }
    } else {
        page.push(&format!(
            "<p class=\"empty\">{} dead letter(s). Reading and replaying them needs the admin token.</p>",
            value(&status["dead"], 20)
        ));
    }
    Ok(page.finish().into_response())
}

pub(crate) async fn replay(
    State(state): State<ReadState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, UiError> {
    let s = session(&state, &headers).await?;
    if !s.admin {
        return Err(UiError::admin_only());
    }
    let port = destinations_port(&state)?;
    if port.destination(&s.space_id, &id).await?.is_none() {
        return Err(UiError::not_found(format!("No destination {id}.")));
    }
    let n = port.replay(&s.space_id, &id).await?;
    Ok(Redirect::to(&format!("/ui/destinations/{}?replayed={n}", url_part(&id))).into_response())
}

pub(crate) async fn settings(
    State(state): State<ReadState>,
    Query(params): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Result<Response, UiError> {
    let s = session(&state, &headers).await?;
    let settings = state.spaces.identity_settings(&s.space_id).await?;
    let mut page = Page::new("Identity settings", Some(&s));
    page.push("<h1>Identity settings</h1>");
    if params.contains_key("saved") {
        page.push("<p class=\"notice\">Saved: events processed from now on use them.</p>");
    }
    let rows: Vec<Vec<String>> = settings
        .types
        .iter()
        .map(|(kind, rule)| {
            let rule = serde_json::to_value(rule).unwrap_or_default();
            vec![
                esc(kind),
                value(&rule["priority"], 10),
                value(&rule["limit"], 40),
                value(&rule["frequency"], 80),
            ]
        })
        .collect();
    page.push(&table(
        &["identifier type", "priority", "limit", "frequency"],
        &rows,
    ));
    let pretty = serde_json::to_string_pretty(&settings).unwrap_or_default();
    if s.admin {
        page.push(&format!(
            "<h2>Edit</h2><form method=\"post\" action=\"/ui/settings\" class=\"settings\">\
             <textarea name=\"settings\" rows=\"24\" spellcheck=\"false\">{}</textarea>\
             <button type=\"submit\">Save</button></form>",
            esc(&pretty)
        ));
    } else {
        page.push(&format!(
            "<h2>All settings</h2><pre>{}</pre><p class=\"hint\">Read only: changing them needs the admin token.</p>",
            esc(&pretty)
        ));
    }
    Ok(page.finish().into_response())
}

#[derive(Deserialize)]
pub(crate) struct SettingsForm {
    settings: String,
}

pub(crate) async fn put_settings(
    State(state): State<ReadState>,
    headers: HeaderMap,
    Form(form): Form<SettingsForm>,
) -> Result<Response, UiError> {
    let s = session(&state, &headers).await?;
    if !s.admin {
        return Err(UiError::admin_only());
    }
    let settings = crate::admin::parse_settings(form.settings.as_bytes())?;
    state
        .spaces
        .put_identity_settings(&s.space_id, &settings)
        .await?;
    Ok(Redirect::to("/ui/settings?saved").into_response())
}
