//! A profile's page: traits, identifiers, the identity graph as a
//! picture, refused identifiers, computed values, accounts and events.

use std::collections::{BTreeMap, HashMap};

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, Uri};
use axum::response::{IntoResponse, Redirect, Response};
use kindred_domain::identifier::extract_identifiers;
use kindred_domain::privacy::identifier_hash_hex;
use kindred_domain::traits::visible;
use kindred_domain::Identifier;
use kindred_store::privacy::Violation;
use kindred_store::{EventQuery, ProfileDoc, ProfileLookup, ProfileParts};
use serde_json::Value;

use super::html::{cut, esc, profile_link, table, time, url_part, value, Page};
use super::{search_form, session, UiError};
use crate::profile::events::{event_query, segment_shape, shaped_page};
use crate::ReadState;

/// How many of the newest events are read to name what each merge and
/// each refusal came with (older ones show their message id only).
const EXPLAIN_EVENTS: usize = 500;

pub(crate) async fn page(
    State(state): State<ReadState>,
    Path(profile_id): Path<String>,
    Query(mut params): Query<HashMap<String, String>>,
    headers: HeaderMap,
    uri: Uri,
) -> Result<Response, UiError> {
    let s = session(&state, &headers).await?;
    let lookup = ProfileLookup::ProfileId(profile_id.clone());
    let all = ProfileParts {
        external_ids: true,
        links: true,
        merges: true,
        activity: true,
        computed: true,
    };
    let doc = state
        .profiles
        .profile(&s.space_id, &lookup, all)
        .await?
        .ok_or_else(|| UiError::not_found(format!("No profile {profile_id}.")))?;
    if doc.profile_id != profile_id {
        // A profile merged into another: its root's page.
        return Ok(
            Redirect::to(&format!("/ui/profiles/{}", url_part(&doc.profile_id))).into_response(),
        );
    }
    let violations = match &state.privacy {
        Some(p) => p
            .violations(&s.space_id, Some(&lookup), 0, None, 100)
            .await?
            .map(|page| page.entries)
            .unwrap_or_default(),
        None => Vec::new(),
    };
    // What each recent event carried, to name the identifiers of merges
    // and refusals.
    let recent = state
        .profiles
        .events(
            &s.space_id,
            &doc.tree,
            &EventQuery {
                limit: EXPLAIN_EVENTS,
                descending: true,
                ..EventQuery::default()
            },
        )
        .await?;
    let mut carried: HashMap<String, Vec<Identifier>> = HashMap::new();
    for e in &recent {
        if let Ok(event) = kindred_store::compute::parse_stored_event(&e.body) {
            let ids = extract_identifiers(&event)
                .into_iter()
                .map(|x| x.id)
                .collect();
            carried.insert(event.message_id.clone(), ids);
        }
    }

    // An empty field of the filter form is no filter.
    params.retain(|_, v| !v.trim().is_empty());
    params.entry("limit".into()).or_insert_with(|| "25".into());
    // The form's "To" day is included: the query ends at the next midnight.
    let mut asked = params.clone();
    if let Some(end) = asked.get_mut("end") {
        if let Some(next) = chrono::NaiveDate::parse_from_str(end, "%Y-%m-%d")
            .ok()
            .and_then(|d| d.succ_opt())
        {
            *end = next.to_string();
        }
    }
    let (query, limit) = event_query(&asked)?;
    let found = state
        .profiles
        .events(&s.space_id, &doc.tree, &query)
        .await?;
    let events = shaped_page(found, limit, &uri, |e| {
        segment_shape(e, &s.source_id, &doc.profile_id)
    })?;

    let mut page = Page::new(&doc.profile_id, Some(&s));
    page.push(&search_form(""));
    page.push(&format!(
        "<h1>Profile <code>{}</code></h1>",
        esc(&doc.profile_id)
    ));
    page.push(&format!(
        "<p class=\"meta\">Created {} · updated {} · {} merge(s) · first message <code>{}</code> · last message <code>{}</code></p>",
        time(doc.created_at),
        time(doc.updated_at),
        doc.merges,
        esc(&doc.first_message_id),
        esc(&doc.last_message_id),
    ));
    page.push("<h2>Identity graph</h2>");
    page.push(&graph(&s.space_id, &doc, &violations, &carried));
    page.push(&traits(&doc.traits));
    page.push(&computed(&doc.computed));
    page.push(&identifiers(&doc));
    page.push(&refused(&s.space_id, &doc, &violations, &carried));
    page.push(&accounts(&doc));
    page.push(&events_section(&params, &events));
    Ok(page.finish().into_response())
}

/// Traits with their source and time (a profile's or an account's).
pub(crate) fn traits(traits: &kindred_domain::Traits) -> String {
    let rows: Vec<Vec<String>> = visible(traits)
        .map(|(k, t)| {
            vec![
                esc(k),
                value(&t.value, 300),
                esc(&t.source_id),
                time(t.updated_at),
            ]
        })
        .collect();
    format!(
        "<h2>Traits</h2>{}",
        table(&["trait", "value", "source", "updated"], &rows)
    )
}

/// Computed values, each linking its definition (a profile's or an
/// account's).
pub(crate) fn computed(values: &kindred_store::ComputedValues) -> String {
    let rows: Vec<Vec<String>> = values
        .iter()
        .map(|(k, c)| {
            vec![
                format!(
                    "<a href=\"/ui/computations/{}/{}\">{}</a>",
                    c.class.as_str(),
                    url_part(k),
                    esc(k)
                ),
                esc(c.class.as_str()),
                value(&c.value, 200),
                time(c.updated_at),
            ]
        })
        .collect();
    format!(
        "<h2>Audiences and computed traits</h2>{}",
        table(&["key", "kind", "value", "since"], &rows)
    )
}

/// The profile's identifiers, first seen first.
fn by_first_seen(doc: &ProfileDoc) -> Vec<&kindred_store::ExternalIdRecord> {
    let mut ids: Vec<_> = doc.external_ids.iter().collect();
    ids.sort_by(|a, b| {
        (a.created_at, &a.id.kind, &a.id.value).cmp(&(b.created_at, &b.id.kind, &b.id.value))
    });
    ids
}

fn identifiers(doc: &ProfileDoc) -> String {
    let rows: Vec<Vec<String>> = by_first_seen(doc)
        .into_iter()
        .map(|e| {
            vec![
                esc(&e.id.kind),
                esc(&e.id.value),
                time(e.created_at),
                time(e.added_at),
                format!("<code>{}</code>", esc(&e.first_message_id)),
                profile_link(&e.owner),
            ]
        })
        .collect();
    format!(
        "<h2>Identifiers</h2>{}",
        table(
            &[
                "type",
                "value",
                "first seen",
                "on this profile since",
                "first message",
                "claimed by"
            ],
            &rows
        )
    )
}

/// A refused identifier's value when a recent event named it (the log
/// keeps only its hash).
fn refused_value(
    space_id: &str,
    doc: &ProfileDoc,
    v: &Violation,
    carried: &HashMap<String, Vec<Identifier>>,
) -> Option<Identifier> {
    let matches =
        |id: &&Identifier| id.kind == v.id_type && identifier_hash_hex(space_id, id) == v.id_hash;
    // The event that was refused, or this profile holding the identifier
    // (refused to another profile because it is this one's).
    carried
        .get(&v.message_id)
        .and_then(|ids| ids.iter().find(matches))
        .or_else(|| doc.external_ids.iter().map(|e| &e.id).find(matches))
        .cloned()
}

fn refused(
    space_id: &str,
    doc: &ProfileDoc,
    violations: &[Violation],
    carried: &HashMap<String, Vec<Identifier>>,
) -> String {
    let rows: Vec<Vec<String>> = violations
        .iter()
        .map(|v| {
            let shown = refused_value(space_id, doc, v, carried).map_or_else(
                || format!("<code>#{}</code>", esc(&cut(&v.id_hash, 13))),
                |id| esc(&id.value),
            );
            vec![
                time(v.at),
                esc(&v.id_type),
                shown,
                esc(&v.rule),
                v.other_profile_id
                    .as_deref()
                    .map(profile_link)
                    .unwrap_or_default(),
                format!("<code>{}</code>", esc(&v.message_id)),
            ]
        })
        .collect();
    format!(
        "<h2>Refused by merge protection</h2>{}",
        table(
            &["when", "type", "identifier", "rule", "owned by", "message"],
            &rows
        )
    )
}

fn accounts(doc: &ProfileDoc) -> String {
    let rows: Vec<Vec<String>> = doc
        .links
        .iter()
        .map(|l| {
            vec![
                format!(
                    "<a href=\"/ui/accounts/{}\">{}</a>",
                    url_part(&l.group_id),
                    esc(&l.group_id)
                ),
                time(l.linked_at),
                format!("<code>{}</code>", esc(&l.message_id)),
            ]
        })
        .collect();
    format!(
        "<h2>Accounts</h2>{}",
        table(&["group_id", "linked", "message"], &rows)
    )
}

fn events_section(params: &HashMap<String, String>, events: &Value) -> String {
    let get = |k: &str| params.get(k).map(String::as_str).unwrap_or_default();
    let mut out = String::from("<h2>Events</h2>");
    out.push_str(&format!(
        "<form method=\"get\" class=\"filters\">\
         <label>Only events named <input name=\"include\" value=\"{}\" placeholder=\"Order Completed,Signed Up\"></label>\
         <label>Leave out <input name=\"exclude\" value=\"{}\"></label>\
         <label>From <input type=\"date\" name=\"start\" value=\"{}\"></label>\
         <label>To <input type=\"date\" name=\"end\" value=\"{}\"></label>\
         <label>Order <select name=\"sort\"><option value=\"desc\"{}>newest first</option><option value=\"asc\"{}>oldest first</option></select></label>\
         <button type=\"submit\">Filter</button></form>",
        esc(get("include")),
        esc(get("exclude")),
        esc(get("start")),
        esc(get("end")),
        if get("sort") == "asc" { "" } else { " selected" },
        if get("sort") == "asc" { " selected" } else { "" },
    ));
    let rows: Vec<Vec<String>> = events["data"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| {
            let what = e["event"]
                .as_str()
                .or(e["name"].as_str())
                .unwrap_or_default();
            let ids: Vec<String> = e["external_ids"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|i| format!("{}:{}", value(&i["type"], 40), value(&i["id"], 80)))
                .collect();
            let detail = if e["traits"].is_object() {
                &e["traits"]
            } else {
                &e["properties"]
            };
            vec![
                value(&e["timestamp"], 40),
                value(&e["type"], 20),
                esc(what),
                ids.join("<br>"),
                format!("<code>{}</code>", value(detail, 400)),
                format!("<code>{}</code>", value(&e["message_id"], 80)),
            ]
        })
        .collect();
    out.push_str(&table(
        &[
            "time",
            "type",
            "event",
            "identifiers",
            "traits or properties",
            "message",
        ],
        &rows,
    ));
    if let Some(next) = events["cursor"]["next"].as_str().filter(|n| !n.is_empty()) {
        let mut query: Vec<String> = params
            .iter()
            .filter(|(k, _)| k.as_str() != "next")
            .map(|(k, v)| format!("{}={}", url_part(k), url_part(v)))
            .collect();
        query.sort();
        query.push(format!("next={}", url_part(next)));
        out.push_str(&format!(
            "<p><a href=\"?{}\">Older events →</a></p>",
            esc(&query.join("&"))
        ));
    }
    out
}

/// Box geometry of the picture.
const BOX_W: i64 = 360;
const GAP_X: i64 = 30;
const GAP_Y: i64 = 80;
const LINE: i64 = 16;
const SHOWN_IDS: usize = 8;
/// Room right of the tree for the merges' labels.
const LABEL_W: i64 = 420;
const REFUSED_H: i64 = 52;
const SHOWN_REFUSALS: usize = 20;

/// The merge tree as an SVG picture: a box per profile with the
/// identifiers it claimed, an arrow per merge labelled with its time, its
/// event and the identifiers that event carried, and a dashed red box per
/// identifier that merge protection refused, tied to where it was refused.
fn graph(
    space_id: &str,
    doc: &ProfileDoc,
    violations: &[Violation],
    carried: &HashMap<String, Vec<Identifier>>,
) -> String {
    // Levels: the root, then each profile under the one it merged into.
    let mut children: BTreeMap<&str, Vec<&kindred_store::MergeRecord>> = BTreeMap::new();
    for m in &doc.merge_history {
        children.entry(m.parent_id.as_str()).or_default().push(m);
    }
    let mut level: HashMap<&str, usize> = HashMap::new();
    let mut order: Vec<Vec<&str>> = vec![vec![doc.profile_id.as_str()]];
    level.insert(doc.profile_id.as_str(), 0);
    let mut depth = 0;
    while depth < order.len() {
        let mut next = Vec::new();
        for p in &order[depth] {
            for m in children.get(p).into_iter().flatten() {
                if !level.contains_key(m.child_id.as_str()) {
                    level.insert(m.child_id.as_str(), depth + 1);
                    next.push(m.child_id.as_str());
                }
            }
        }
        if !next.is_empty() {
            order.push(next);
        }
        depth += 1;
    }
    // A profile of the tree without a recorded merge: under the root.
    for p in &doc.tree {
        if !level.contains_key(p.as_str()) {
            if order.len() < 2 {
                order.push(Vec::new());
            }
            level.insert(p.as_str(), 1);
            order[1].push(p.as_str());
        }
    }
    let mut owned: HashMap<&str, Vec<String>> = HashMap::new();
    for e in by_first_seen(doc) {
        let at = if level.contains_key(e.owner.as_str()) {
            e.owner.as_str()
        } else {
            doc.profile_id.as_str()
        };
        owned
            .entry(at)
            .or_default()
            .push(format!("{}:{}", e.id.kind, e.id.value));
    }
    let height = |p: &str| {
        let n = owned.get(p).map_or(0, Vec::len);
        let lines = n.min(SHOWN_IDS) + usize::from(n > SHOWN_IDS);
        36 + LINE * lines as i64
    };
    let mut pos: HashMap<&str, (i64, i64)> = HashMap::new();
    let mut y = 20;
    let mut width = 0;
    for row in &order {
        let row_h = row.iter().map(|p| height(p)).max().unwrap_or(0);
        for (i, p) in row.iter().enumerate() {
            pos.insert(p, (20 + i as i64 * (BOX_W + GAP_X), y));
        }
        width = width.max(20 + row.len() as i64 * (BOX_W + GAP_X));
        y += row_h + GAP_Y;
    }
    let mut svg = String::new();
    // Merges.
    for m in &doc.merge_history {
        let (Some(&(px, py)), Some(&(cx, cy))) =
            (pos.get(m.parent_id.as_str()), pos.get(m.child_id.as_str()))
        else {
            continue;
        };
        let (x1, y1) = (px + BOX_W / 2, py + height(&m.parent_id));
        let (x2, y2) = (cx + BOX_W / 2, cy);
        svg.push_str(&format!(
            "<line class=\"merge\" x1=\"{x1}\" y1=\"{y1}\" x2=\"{x2}\" y2=\"{y2}\" marker-end=\"url(#arrow)\"/>"
        ));
        let via: Vec<String> = carried
            .get(&m.message_id)
            .map(|ids| {
                ids.iter()
                    .filter(|id| doc.external_ids.iter().any(|e| &e.id == *id))
                    .map(|id| format!("{}:{}", id.kind, id.value))
                    .collect()
            })
            .unwrap_or_default();
        let (lx, ly) = ((x1 + x2) / 2 + 6, (y1 + y2) / 2 - 8);
        svg.push_str(&format!(
            "<text class=\"label\" x=\"{lx}\" y=\"{ly}\">merged {} by message {}</text>",
            time(m.merged_at),
            esc(&cut(&m.message_id, 24))
        ));
        if !via.is_empty() {
            svg.push_str(&format!(
                "<text class=\"label via\" x=\"{lx}\" y=\"{}\">through {}</text>",
                ly + 14,
                esc(&cut(&via.join(" + "), 60))
            ));
        }
    }
    // Profiles.
    for p in order.iter().flatten() {
        let (x, y) = pos[p];
        let h = height(p);
        let class = if *p == doc.profile_id {
            "node root"
        } else {
            "node"
        };
        svg.push_str(&format!(
            "<a href=\"/ui/profiles/{}\"><rect class=\"{class}\" x=\"{x}\" y=\"{y}\" width=\"{BOX_W}\" height=\"{h}\" rx=\"6\"/>\
             <text class=\"title\" x=\"{}\" y=\"{}\">{}{}</text></a>",
            url_part(p),
            x + 10,
            y + 20,
            esc(p),
            if *p == doc.profile_id { " (this profile)" } else { " (merged in)" },
        ));
        let list = owned.get(p).cloned().unwrap_or_default();
        for (i, id) in list.iter().take(SHOWN_IDS).enumerate() {
            svg.push_str(&format!(
                "<text class=\"id\" x=\"{}\" y=\"{}\">{}</text>",
                x + 10,
                y + 38 + LINE * i as i64,
                esc(&cut(id, 44))
            ));
        }
        if list.len() > SHOWN_IDS {
            svg.push_str(&format!(
                "<text class=\"id more\" x=\"{}\" y=\"{}\">and {} more</text>",
                x + 10,
                y + 38 + LINE * SHOWN_IDS as i64,
                list.len() - SHOWN_IDS
            ));
        }
    }
    // Refusals: a column right of the tree, each tied to where it was
    // refused (the profile the event landed on, or this one).
    let tree_h = y - GAP_Y + 20;
    let column_x = width + LABEL_W;
    let mut column_h = 0;
    for (i, v) in violations.iter().take(SHOWN_REFUSALS).enumerate() {
        let (x, ry) = (column_x, 20 + i as i64 * (REFUSED_H + 16));
        let shown = refused_value(space_id, doc, v, carried).map_or_else(
            || format!("{} #{}", v.id_type, cut(&v.id_hash, 13)),
            |id| format!("{}:{}", id.kind, id.value),
        );
        let at = v
            .profile_id
            .as_deref()
            .filter(|p| pos.contains_key(p))
            .unwrap_or(doc.profile_id.as_str());
        let (px, py) = pos[at];
        svg.push_str(&format!(
            "<line class=\"refusal\" x1=\"{}\" y1=\"{}\" x2=\"{x}\" y2=\"{}\"/>",
            px + BOX_W,
            py + 16,
            ry + REFUSED_H / 2,
        ));
        svg.push_str(&format!(
            "<rect class=\"refused\" x=\"{x}\" y=\"{ry}\" width=\"{BOX_W}\" height=\"{REFUSED_H}\" rx=\"6\"/>\
             <text class=\"title\" x=\"{}\" y=\"{}\">refused: {}</text>\
             <text class=\"id\" x=\"{}\" y=\"{}\">rule {} · message {}</text>",
            x + 10,
            ry + 20,
            esc(&cut(&shown, 40)),
            x + 10,
            ry + 40,
            esc(&v.rule),
            esc(&cut(&v.message_id, 20)),
        ));
        column_h = ry + REFUSED_H + 20;
    }
    if column_h > 0 {
        width = column_x + BOX_W + 20;
    } else {
        width += LABEL_W;
    }
    let total_h = tree_h.max(column_h);
    format!(
        "<figure class=\"graph\"><svg xmlns=\"http://www.w3.org/2000/svg\" role=\"img\" aria-label=\"identity graph\" \
         width=\"{width}\" height=\"{total_h}\" viewBox=\"0 0 {width} {total_h}\">\
         <defs><marker id=\"arrow\" viewBox=\"0 0 10 10\" refX=\"10\" refY=\"5\" markerWidth=\"8\" markerHeight=\"8\" orient=\"auto\">\
         <path d=\"M0,0 L10,5 L0,10 z\" class=\"arrowhead\"/></marker></defs>{svg}</svg>\
         <figcaption>Each box is a profile with the identifiers it claimed; an arrow is a merge (the older profile above). \
         Dashed red boxes are identifiers merge protection refused.</figcaption></figure>"
    )
}

/// An account's page: its traits, its account-level computed values and
/// the profiles linked to it.
pub(crate) async fn account(
    State(state): State<ReadState>,
    Path(group_id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, UiError> {
    let s = session(&state, &headers).await?;
    let doc = state
        .profiles
        .account(&s.space_id, &group_id)
        .await?
        .ok_or_else(|| UiError::not_found(format!("No account {group_id}.")))?;
    let values = match &state.computations {
        Some(c) => c.account_values(&s.space_id, &group_id).await?.0,
        None => Default::default(),
    };
    let a = &doc.account;
    let mut page = Page::new(&a.group_id, Some(&s));
    page.push(&search_form(""));
    page.push(&format!(
        "<h1>Account <code>{}</code></h1>\
         <p class=\"meta\">Created {} · updated {} · first message <code>{}</code> · last message <code>{}</code></p>",
        esc(&a.group_id),
        time(a.created_at),
        time(a.updated_at),
        esc(&a.first_message_id),
        esc(&a.last_message_id),
    ));
    page.push(&traits(&a.traits));
    page.push(&computed(&values));
    let users: Vec<Vec<String>> = doc.users.iter().map(|p| vec![profile_link(p)]).collect();
    page.push(&format!("<h2>Users</h2>{}", table(&["profile"], &users)));
    Ok(page.finish().into_response())
}
