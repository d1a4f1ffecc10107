//! Fuzzing harnesses for kindred-domain's parsers. Each takes the raw bytes
//! of one HTTP request body and walks them through the steps the HTTP layer
//! (shared/http) takes before and after the domain answers, so that a panic
//! here is a panic a client can cause. The files in fuzz_targets/ only hand
//! libFuzzer's input to these functions.

use std::sync::OnceLock;

use kindred_domain::compute::{Class, Definition, Ruleset};
use kindred_domain::event::{strip_write_key, BatchBody, MAX_BATCH_BYTES, MAX_EVENT_BYTES};
use kindred_domain::sync::Settings;
use kindred_domain::{
    extract_identifiers, Envelope, Event, EventKind, Identifier, IdentityRules, IdentitySettings,
    Millis, Rejection,
};
use serde_json::{json, Map, Value};

/// When every fuzzed event is received: 2026-05-01T12:00:00Z. Fixed, so
/// that a crash replays exactly.
pub const RECEIVED_AT: Millis = 1_777_636_800_000;

/// The `messageId` the API would generate (`api-` and 22 base62 characters).
const GENERATED_MESSAGE_ID: &str = "api-fuzz000000000000000000";

/// The one place an [`Envelope`] is built: when the domain's `Envelope`
/// changes, only this function does. Fields not set here (the space's
/// clock tolerance) keep the defaults of `Envelope::received`.
pub fn envelope(kind: Option<EventKind>, batch_sent_at: Option<Millis>) -> Envelope<'static> {
    Envelope {
        kind,
        batch_sent_at,
        ..Envelope::received(RECEIVED_AT, GENERATED_MESSAGE_ID)
    }
}

/// The Tracking API: the body as a batch (each item parsed on its own, with
/// the batch's `sentAt`, `context` and `integrations`), then the same body
/// as one call to `/v1/{type}`; every accepted event goes through the queue
/// round trip the workers make (`Event::from_stored`).
pub fn event_batch(body: &[u8]) {
    if body.len() > MAX_BATCH_BYTES {
        return;
    }
    // The very parser the Tracking API uses (kindred_domain::event::BatchBody).
    if let Some(parsed) = BatchBody::parse(body) {
        for raw in parsed.batch.as_deref().unwrap_or_default() {
            accepted(parsed.event(raw, envelope(None, None)));
        }
    }
    if body.len() <= MAX_EVENT_BYTES {
        if let Ok(value) = serde_json::from_slice::<Value>(body) {
            // Posted to the endpoint its `type` names (or to /v1/track).
            let kind = value
                .get("type")
                .and_then(Value::as_str)
                .and_then(EventKind::parse)
                .unwrap_or(EventKind::Track);
            accepted(Event::parse(
                strip_write_key(value),
                envelope(Some(kind), None),
            ));
        }
    }
}

/// What happens to an accepted event: queued as JSON text, read back by a
/// worker, its identifiers and computation facts taken.
fn accepted(parsed: Result<Event, Rejection>) {
    let Ok(event) = parsed else {
        return;
    };
    let queued = Value::Object(event.body).to_string();
    let Ok(stored) = serde_json::from_str::<Map<String, Value>>(&queued) else {
        return;
    };
    if let Ok(again) = Event::from_stored(stored) {
        std::hint::black_box(extract_identifiers(&again));
        std::hint::black_box(again.facts().map(|f| f.timestamp));
        std::hint::black_box(again.profile_traits());
    }
}

/// The key a fuzzed definition is stored under; audiences may reference it
/// (a cycle) or the keys of [`existing_definitions`].
const DEFINITION_KEY: &str = "fuzzed";

/// Definitions a space already has, which a new one must stand with.
fn existing_definitions() -> &'static [Definition] {
    static DEFS: OnceLock<Vec<Definition>> = OnceLock::new();
    DEFS.get_or_init(|| {
        [
            (
                Class::ComputedTrait,
                "lifetime_value",
                json!({"type": "aggregation", "function": "sum",
                       "event": "Order Completed", "property": "revenue"}),
            ),
            (
                Class::Audience,
                "high_value_users",
                json!({"condition": {"trait": {"name": "lifetime_value", "op": ">", "value": 500}}}),
            ),
            (
                Class::Audience,
                "buyers",
                json!({"condition": {"performed": {"event": "Order Completed"}}}),
            ),
        ]
        .into_iter()
        .map(|(class, key, body)| {
            Definition::parse(class, key, 1, &body).expect("the fixed definitions are valid")
        })
        .collect()
    })
}

/// The Definitions API (`PUT .../computed_traits/{key}` and
/// `.../audiences/{key}`): the body validated as either class, then checked
/// against the space's other definitions as the stores do (`check_put`:
/// references exist, no cycle).
pub fn definition(body: &[u8]) {
    let Ok(value) = serde_json::from_slice::<Value>(body) else {
        return;
    };
    for class in [Class::ComputedTrait, Class::Audience] {
        let parsed = match Definition::parse(class, DEFINITION_KEY, 1, &value) {
            Ok(parsed) => parsed,
            Err(e) => {
                std::hint::black_box(e.to_string());
                continue;
            }
        };
        let mut defs = existing_definitions().to_vec();
        defs.push(parsed);
        match Ruleset::new(defs) {
            Ok(ruleset) => {
                std::hint::black_box(ruleset.fresh());
            }
            Err(e) => {
                std::hint::black_box(e.to_string());
            }
        }
    }
}

/// The Admin API's `PUT .../identity_settings` (`IdentitySettings::parse`,
/// as shared/http/src/admin.rs calls it), then the settings in use: the rule of a type
/// and the blocked-value check of a few identifiers.
pub fn identity_settings(body: &[u8]) {
    let settings = match IdentitySettings::parse(body) {
        Ok(settings) => settings,
        Err(e) => {
            std::hint::black_box(e.to_string());
            return;
        }
    };
    let Ok(rules) = IdentityRules::new(settings.clone()) else {
        panic!("settings that parse must compile");
    };
    std::hint::black_box(serde_json::to_vec(rules.settings()).ok());
    let configured = settings.types.keys().take(8).map(String::as_str);
    for kind in ["user_id", "email", "anonymous_id", "crm_id"]
        .into_iter()
        .chain(configured)
    {
        std::hint::black_box(rules.rule(kind));
        for value in ["u-42", " Team@Acme.com ", "null", "0", "000-000", ""] {
            std::hint::black_box(rules.is_blocked(&Identifier::new(kind, value)));
        }
    }
}

/// The Destinations API's `PUT .../destinations/{id}`, then what the stores
/// do with accepted settings: store `to_json()` and parse it back on load;
/// and what the sync step and a replace ask of them.
pub fn destination_settings(body: &[u8]) {
    let Ok(value) = serde_json::from_slice::<Value>(body) else {
        return;
    };
    let settings = match Settings::parse(&value) {
        Ok((settings, _secret)) => settings,
        Err(e) => {
            std::hint::black_box(e.to_string());
            return;
        }
    };
    std::hint::black_box(value.get("name").and_then(Value::as_str));
    let stored = settings.to_json().to_string();
    let Ok(stored) = serde_json::from_str::<Value>(&stored) else {
        return;
    };
    let Ok((loaded, _)) = Settings::parse(&stored) else {
        return;
    };
    std::hint::black_box(loaded.secret_needed_after(&settings));
    std::hint::black_box(loaded.pending_after(&settings, true, None));
    std::hint::black_box(settings.selects("high_value_users"));
    std::hint::black_box(settings.request_url());
    std::hint::black_box(settings.request_body(&[json!({"type": "identify"})]));
}
