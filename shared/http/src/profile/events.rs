//! A profile's events (`/events`) in the shape of Segment's Profile API:
//! snake_case fields, the identifiers the event carried, and the profile
//! it belongs to under `related`, not the stored Segment-spec body.

use axum::http::Uri;
use kindred_domain::event::{format_millis, Event, EventKind};
use kindred_domain::identifier::extract_identifiers;
use kindred_store::{EventQuery, ProfileDoc, StoredEvent};
use serde_json::{json, Map, Value};

use super::params::{self, invalid, Params, MAX_ITEMS};
use crate::error::ApiError;
use crate::ReadState;

/// One stored event as Segment's Profile API shows it. Beyond Segment's
/// fields: `received_at`, `client_timestamp` (the event's own time when
/// it was not used), `dropped_traits` (over the limits), `traits` of an
/// identify or group call,
/// `group_id` of a group call and `name` of a page or screen call.
pub(crate) fn segment_shape(event: &Event, source_id: &str, profile_id: &str) -> Value {
    let external_ids: Vec<Value> = extract_identifiers(event)
        .into_iter()
        .map(|e| {
            json!({"collection": e.collection, "type": e.id.kind, "id": e.id.value,
                   "encoding": e.encoding})
        })
        .collect();
    let object = |field: &str| Value::Object(event.object(field).cloned().unwrap_or_default());
    let mut out = json!({
        "external_ids": external_ids,
        "context": object("context"),
        "type": event.kind.as_str(),
        "message_id": event.message_id,
        "source_id": source_id,
        "timestamp": format_millis(event.timestamp),
        "received_at": format_millis(event.received_at),
        "properties": object("properties"),
        "event": if event.kind == EventKind::Track { event.name.clone() } else { None },
        "related": {"users": profile_id},
    });
    let extra: &mut Map<String, Value> = out.as_object_mut().expect("an object");
    match event.kind {
        EventKind::Identify | EventKind::Group => {
            extra.insert("traits".into(), object("traits"));
        }
        EventKind::Page | EventKind::Screen => {
            extra.insert("name".into(), event.name.clone().into());
        }
        _ => {}
    }
    for (stored, shown) in [
        ("clientTimestamp", "client_timestamp"),
        ("droppedTraits", "dropped_traits"),
    ] {
        if let Some(v) = event.body.get(stored) {
            extra.insert(shown.into(), v.clone());
        }
    }
    if let Some(group_id) = event.str_field("groupId") {
        extra.insert("group_id".into(), group_id.into());
    }
    out
}

/// The `EventQuery` of the parameters (one more than `limit`, to know
/// whether there is a next page), and `limit`.
pub(crate) fn event_query(params: &Params) -> Result<(EventQuery, usize), ApiError> {
    let limit = params::limit(params, MAX_ITEMS)?;
    let descending = match params.get("sort").map(String::as_str) {
        None | Some("desc") => true,
        Some("asc") => false,
        Some(_) => return Err(invalid("sort", "must be asc or desc")),
    };
    let after = params::decode_next(params)?
        .map(|n| {
            n.split_once('.')
                .and_then(|(t, s)| Some((t.parse().ok()?, s.parse().ok()?)))
                .ok_or_else(|| invalid("next", "must be the cursor of a previous response"))
        })
        .transpose()?;
    let query = EventQuery {
        start: params::time(params, "start")?,
        end: params::time(params, "end")?,
        include: params::list(params, "include"),
        exclude: params::list(params, "exclude"),
        limit: limit + 1,
        descending,
        after,
    };
    Ok((query, limit))
}

/// One page of `found` (read with [`event_query`]), each event shaped
/// by `shape`, and its cursor.
pub(crate) fn shaped_page(
    mut found: Vec<StoredEvent>,
    limit: usize,
    uri: &Uri,
    shape: impl Fn(&Event) -> Value,
) -> Result<Value, ApiError> {
    let has_more = found.len() > limit;
    found.truncate(limit);
    let next = found
        .last()
        .map(|e| params::encode_next(&format!("{}.{}", e.timestamp, e.seq)));
    let data = found
        .iter()
        .map(|e| Ok(shape(&kindred_store::compute::parse_stored_event(&e.body)?)))
        .collect::<Result<Vec<Value>, kindred_store::StoreError>>()?;
    Ok(json!({"data": data, "cursor": params::cursor(uri, has_more, next, limit)}))
}

pub(crate) async fn events(
    state: &ReadState,
    space_id: &str,
    source_id: &str,
    doc: &ProfileDoc,
    params: &Params,
    uri: &Uri,
) -> Result<Value, ApiError> {
    let (query, limit) = event_query(params)?;
    let found = state.profiles.events(space_id, &doc.tree, &query).await?;
    shaped_page(found, limit, uri, |event| {
        segment_shape(event, source_id, &doc.profile_id)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use kindred_domain::event::Envelope;

    #[test]
    fn a_track_call_in_segment_s_shape() {
        let event = Event::parse(
            json!({"type": "track", "event": "Page Viewed", "userId": "c0HN02fNe1",
                   "messageId": "ajs-1", "timestamp": "2018-01-05T00:16:35.663Z",
                   "properties": {"path": "/docs"},
                   "context": {"traits": {"crossDomainId": "1d1c"}, "ip": "73.92.233.78"}}),
            Envelope::received(1_600_000_000_000, "gen"),
        )
        .unwrap();
        let shaped = segment_shape(&event, "src_1", "prf_1");
        assert_eq!(
            shaped,
            json!({
                "external_ids": [
                    {"collection": "users", "type": "user_id", "id": "c0HN02fNe1", "encoding": "none"},
                    {"collection": "users", "type": "cross_domain_id", "id": "1d1c", "encoding": "none"},
                ],
                "context": {"traits": {"crossDomainId": "1d1c"}, "ip": "73.92.233.78"},
                "type": "track", "message_id": "ajs-1", "source_id": "src_1",
                "timestamp": "2018-01-05T00:16:35.663Z",
                "received_at": "2020-09-13T12:26:40.000Z", "properties": {"path": "/docs"},
                "event": "Page Viewed", "related": {"users": "prf_1"},
            })
        );
    }
}
