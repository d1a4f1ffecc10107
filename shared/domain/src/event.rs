//! The Segment tracking spec: what an event is, how it is validated, and
//! which moment it describes (SPEC 2).

use chrono::DateTime;
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use crate::identifier::{check_identifier_sizes, extract_identifiers, MAX_IDENTIFIER_BYTES};
use crate::Millis;

/// Largest accepted event, serialized (SPEC 2).
pub const MAX_EVENT_BYTES: usize = 32 * 1024;
/// Largest accepted request body, after decompression (SPEC 2).
pub const MAX_BATCH_BYTES: usize = 500 * 1024;
/// Longest accepted `messageId` (SPEC 2).
pub const MAX_MESSAGE_ID_CHARS: usize = 100;
/// Longest `groupId`, in bytes (an account link's key must fit a
/// DynamoDB sort key of 1,024 bytes with its prefix).
pub const MAX_GROUP_ID_BYTES: usize = 1000;
/// The earliest event time accepted: 2000-01-01T00:00:00Z (SPEC 2).
pub const EARLIEST_EVENT_TIME: Millis = 946_684_800_000;
/// How far past `receivedAt` an event time may be before it is clamped to
/// `receivedAt`, unless the space sets its own (SPEC 2).
pub const DEFAULT_FUTURE_TOLERANCE: Millis = 5 * 60 * 1000;

/// The six Segment calls.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EventKind {
    Identify,
    Track,
    Page,
    Screen,
    Group,
    Alias,
}

impl EventKind {
    pub fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "identify" => Self::Identify,
            "track" => Self::Track,
            "page" => Self::Page,
            "screen" => Self::Screen,
            "group" => Self::Group,
            "alias" => Self::Alias,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Identify => "identify",
            Self::Track => "track",
            Self::Page => "page",
            Self::Screen => "screen",
            Self::Group => "group",
            Self::Alias => "alias",
        }
    }
}

/// Why one event was not accepted. `code` is stable and machine-readable.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejection {
    pub code: &'static str,
    pub message: String,
}

impl Rejection {
    pub fn new(code: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

/// A validated event. `body` is the normalized payload as stored: it always
/// carries `type`, `messageId`, `timestamp` (the resolved event time) and
/// `receivedAt`, so parsing a stored body again yields the same event.
#[derive(Clone, Debug, PartialEq)]
pub struct Event {
    pub kind: EventKind,
    pub message_id: String,
    /// The moment the event describes (SPEC 2 clock-skew rules); lookbacks use it.
    pub timestamp: Millis,
    pub received_at: Millis,
    pub user_id: Option<String>,
    pub anonymous_id: Option<String>,
    /// `event` of a track, `name` of a page or screen.
    pub name: Option<String>,
    pub body: Map<String, Value>,
}

/// What the caller knows that the payload does not.
#[derive(Clone, Copy, Debug)]
pub struct Envelope<'a> {
    /// The call's type when the endpoint names it (`/v1/track`); a batch item carries its own.
    pub kind: Option<EventKind>,
    pub received_at: Millis,
    /// `sentAt` of the enclosing batch, used when the event has none.
    pub batch_sent_at: Option<Millis>,
    /// Used when the event has no `messageId`.
    pub generated_message_id: &'a str,
    /// How far past `received_at` an event time may be; later is clamped
    /// to `received_at` (the space's setting).
    pub future_tolerance: Millis,
}

impl<'a> Envelope<'a> {
    /// An event received now, with the default clock tolerance.
    pub fn received(received_at: Millis, generated_message_id: &'a str) -> Self {
        Self {
            kind: None,
            received_at,
            batch_sent_at: None,
            generated_message_id,
            future_tolerance: DEFAULT_FUTURE_TOLERANCE,
        }
    }
}

impl Event {
    /// Validates one payload from a client and resolves its time (SPEC 2:
    /// clock skew corrected, the future clamped, before 2000 refused) and
    /// message id. `receivedAt` is always the envelope's: a client cannot
    /// say when Kindred received its event.
    pub fn parse(value: Value, envelope: Envelope<'_>) -> Result<Event, Rejection> {
        Self::parse_with(value, envelope, TimeSource::Client)
    }

    fn parse_with(
        value: Value,
        envelope: Envelope<'_>,
        time: TimeSource,
    ) -> Result<Event, Rejection> {
        let Value::Object(mut body) = value else {
            return Err(Rejection::new(
                "invalid_event",
                "an event must be a JSON object",
            ));
        };
        let kind = match body.get("type") {
            Some(Value::String(t)) => EventKind::parse(t).ok_or_else(|| {
                Rejection::new(
                    "invalid_type",
                    "type must be one of identify, track, page, screen, group, alias",
                )
            })?,
            Some(_) => return Err(Rejection::new("invalid_type", "type must be a string")),
            None => envelope
                .kind
                .ok_or_else(|| Rejection::new("invalid_type", "type is required"))?,
        };
        if let Some(path_kind) = envelope.kind {
            if path_kind != kind {
                return Err(Rejection::new(
                    "invalid_type",
                    format!("type {} does not match the endpoint", kind.as_str()),
                ));
            }
        }
        body.insert("type".into(), Value::String(kind.as_str().into()));

        let user_id = id_field(&mut body, "userId")?;
        let anonymous_id = id_field(&mut body, "anonymousId")?;

        let message_id = match body.get("messageId") {
            None | Some(Value::Null) => envelope.generated_message_id.to_string(),
            Some(Value::String(m)) if m.is_empty() => envelope.generated_message_id.to_string(),
            Some(Value::String(m)) => {
                if m.chars().count() > MAX_MESSAGE_ID_CHARS {
                    return Err(Rejection::new(
                        "invalid_message_id",
                        "messageId must be at most 100 characters",
                    ));
                }
                m.clone()
            }
            Some(_) => {
                return Err(Rejection::new(
                    "invalid_message_id",
                    "messageId must be a string",
                ))
            }
        };
        body.insert("messageId".into(), Value::String(message_id.clone()));

        let name = match kind {
            EventKind::Track => match body.get("event") {
                Some(Value::String(e)) if !e.trim().is_empty() => Some(e.clone()),
                _ => {
                    return Err(Rejection::new(
                        "missing_event",
                        "a track call needs a non-empty event name",
                    ))
                }
            },
            EventKind::Page | EventKind::Screen => match body.get("name") {
                Some(Value::String(n)) => Some(n.clone()),
                None | Some(Value::Null) => None,
                Some(_) => return Err(Rejection::new("invalid_name", "name must be a string")),
            },
            _ => None,
        };
        let missing = match kind {
            EventKind::Group => match id_field(&mut body, "groupId")? {
                None => Some(("missing_group_id", "a group call needs a groupId")),
                Some(g) if g.len() > MAX_GROUP_ID_BYTES => {
                    return Err(Rejection::new(
                        "invalid_id",
                        format!("groupId must be at most {MAX_GROUP_ID_BYTES} bytes"),
                    ))
                }
                Some(_) => None,
            },
            EventKind::Alias => (id_field(&mut body, "previousId")?.is_none() || user_id.is_none())
                .then_some((
                    "missing_alias_ids",
                    "an alias call needs both previousId and userId",
                )),
            _ => None,
        };
        if let Some((code, message)) = missing {
            return Err(Rejection::new(code, message));
        }
        for object_field in ["traits", "properties", "context", "integrations"] {
            match body.get(object_field) {
                None | Some(Value::Null) | Some(Value::Object(_)) => {}
                Some(_) => {
                    return Err(Rejection::new(
                        "invalid_field",
                        format!("{object_field} must be an object"),
                    ))
                }
            }
        }

        let (timestamp, received_at) = match time {
            TimeSource::Client => {
                // Fields only Kindred writes: a client's copies are dropped.
                for kindred_only in ["clientTimestamp", "droppedTraits"] {
                    body.remove(kindred_only);
                }
                let timestamp = event_time(&body, &envelope)?;
                // The client's own fields stay as sent; only what Kindred
                // decides is written over, and a replaced client
                // `timestamp` is kept beside it.
                let resolved = format_millis(timestamp);
                if let Some(Value::String(sent)) = body.get("timestamp") {
                    if parse_time(sent) != Some(timestamp) {
                        body.insert("clientTimestamp".into(), Value::String(sent.clone()));
                    }
                }
                body.insert("timestamp".into(), Value::String(resolved));
                if let (false, Some(sent_at)) =
                    (body.contains_key("sentAt"), envelope.batch_sent_at)
                {
                    body.insert("sentAt".into(), Value::String(format_millis(sent_at)));
                }
                body.insert(
                    "receivedAt".into(),
                    Value::String(format_millis(envelope.received_at)),
                );
                (timestamp, envelope.received_at)
            }
            TimeSource::Stored => {
                let stored = |field| match body.get(field) {
                    Some(Value::String(s)) => parse_time(s),
                    _ => None,
                };
                let received_at = stored("receivedAt").unwrap_or(envelope.received_at);
                (stored("timestamp").unwrap_or(received_at), received_at)
            }
        };

        let event = Event {
            kind,
            message_id,
            timestamp,
            received_at,
            user_id,
            anonymous_id,
            name,
            body,
        };
        if time == TimeSource::Client {
            check_identifier_sizes(&event)?;
        }
        if event.user_id.is_none()
            && event.anonymous_id.is_none()
            && extract_identifiers(&event).is_empty()
        {
            return Err(Rejection::new(
                "missing_identity",
                "an event needs a userId, an anonymousId or a valid context.externalIds entry",
            ));
        }
        Ok(event)
    }

    /// Parses a body that `parse` produced earlier (from a queue or the
    /// store): its `timestamp` and `receivedAt` are the ones decided then,
    /// taken as they are.
    pub fn from_stored(body: Map<String, Value>) -> Result<Event, Rejection> {
        Event::parse_with(
            Value::Object(body),
            Envelope::received(0, ""),
            TimeSource::Stored,
        )
    }

    pub fn str_field(&self, field: &str) -> Option<&str> {
        self.body.get(field).and_then(Value::as_str)
    }

    pub fn object(&self, field: &str) -> Option<&Map<String, Value>> {
        self.body.get(field).and_then(Value::as_object)
    }

    /// The traits an identify call sets on the profile: its `traits`, or
    /// `context.traits` when it has no top-level `traits` (RudderStack's
    /// SDKs send an identify's traits there only).
    pub fn profile_traits(&self) -> Option<&Map<String, Value>> {
        match self.kind {
            EventKind::Identify => self.object("traits").or_else(|| {
                self.object("context")
                    .and_then(|c| c.get("traits"))
                    .and_then(Value::as_object)
            }),
            _ => None,
        }
    }
}

/// A `/v1/batch` (or `/v1/import`) body: the events, each parsed on its
/// own so that one bad event never costs the others, and what applies to
/// all of them.
#[derive(Deserialize)]
pub struct BatchBody<'a> {
    #[serde(borrow)]
    pub batch: Option<Vec<&'a RawValue>>,
    #[serde(rename = "sentAt")]
    pub sent_at: Option<Value>,
    pub context: Option<Value>,
    pub integrations: Option<Value>,
    /// A credential, never stored.
    #[serde(rename = "writeKey")]
    pub write_key: Option<String>,
}

impl<'a> BatchBody<'a> {
    /// Reads the body; `None` if it is not a JSON object of this shape.
    pub fn parse(bytes: &'a [u8]) -> Option<Self> {
        serde_json::from_slice(bytes).ok()
    }

    /// The batch's `sentAt`, which corrects every event's clock skew.
    pub fn sent_at(&self) -> Option<Millis> {
        match &self.sent_at {
            Some(Value::String(s)) => parse_time(s),
            _ => None,
        }
    }

    /// One item of the batch as an event: the batch's `context` and
    /// `integrations` apply when the item has none, its `sentAt` is the
    /// envelope's.
    pub fn event(&self, raw: &RawValue, envelope: Envelope<'_>) -> Result<Event, Rejection> {
        if raw.get().len() > MAX_EVENT_BYTES {
            return Err(Rejection::new(
                "event_too_large",
                format!("the event is larger than {} KB", MAX_EVENT_BYTES / 1024),
            ));
        }
        let mut value: Value = serde_json::from_str(raw.get())
            .map_err(|_| Rejection::new("invalid_event", "the event is not valid JSON"))?;
        if let Value::Object(map) = &mut value {
            for (field, shared) in [
                ("context", &self.context),
                ("integrations", &self.integrations),
            ] {
                if let Some(shared) = shared {
                    map.entry(field).or_insert_with(|| shared.clone());
                }
            }
        }
        Event::parse(
            strip_write_key(value),
            Envelope {
                batch_sent_at: self.sent_at(),
                ..envelope
            },
        )
    }
}

/// The write key is a credential: it is never stored with the event.
pub fn strip_write_key(mut value: Value) -> Value {
    if let Value::Object(map) = &mut value {
        map.remove("writeKey");
    }
    value
}

/// Where an event's times come from.
#[derive(Clone, Copy, PartialEq, Eq)]
enum TimeSource {
    /// A client's fields, resolved by the SPEC 2 rules.
    Client,
    /// A stored body's resolved `timestamp` and `receivedAt`.
    Stored,
}

/// Reads an id field (`userId`, `anonymousId`, `groupId`, `previousId`):
/// strings are kept, numbers become strings (as the Segment libraries do),
/// empty values count as absent.
fn id_field(body: &mut Map<String, Value>, field: &str) -> Result<Option<String>, Rejection> {
    let id = match body.get(field) {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s.trim().is_empty() => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(Value::Number(n)) => Some(n.to_string()),
        Some(_) => {
            return Err(Rejection::new(
                "invalid_id",
                format!("{field} must be a string"),
            ))
        }
    };
    match &id {
        Some(id) => {
            if id.len() > MAX_IDENTIFIER_BYTES {
                return Err(Rejection::new(
                    "invalid_id",
                    format!("{field} must be at most {MAX_IDENTIFIER_BYTES} bytes"),
                ));
            }
            body.insert(field.into(), Value::String(id.clone()));
        }
        None => {
            body.remove(field);
        }
    }
    Ok(id)
}

fn time_field(body: &Map<String, Value>, field: &str) -> Result<Option<Millis>, Rejection> {
    match body.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => parse_time(s).map(Some).ok_or_else(|| {
            Rejection::new(
                "invalid_timestamp",
                format!("{field} must be an ISO-8601 date-time with a time zone"),
            )
        }),
        Some(_) => Err(Rejection::new(
            "invalid_timestamp",
            format!("{field} must be a string"),
        )),
    }
}

/// SPEC 2: `timestamp` or else `originalTimestamp`, corrected for the
/// client's clock skew (`+ (receivedAt - sentAt)`) when `sentAt` is given;
/// else `receivedAt`. Every field is the client's and may be hostile: a
/// time past `receivedAt` plus the tolerance is clamped to `receivedAt`
/// (a wrong or forged clock cannot pin a trait or a window in the
/// future), and one before 2000 is refused.
fn event_time(body: &Map<String, Value>, envelope: &Envelope<'_>) -> Result<Millis, Rejection> {
    let timestamp = time_field(body, "timestamp")?;
    let original = time_field(body, "originalTimestamp")?;
    let sent_at = time_field(body, "sentAt")?.or(envelope.batch_sent_at);
    let received = envelope.received_at;
    let time = match (timestamp.or(original), sent_at) {
        (Some(t), Some(s)) => t.saturating_add(received.saturating_sub(s)),
        (Some(t), None) => t,
        (None, _) => received,
    };
    if time < EARLIEST_EVENT_TIME {
        return Err(Rejection::new(
            "invalid_timestamp",
            "the event time is before 2000-01-01T00:00:00Z",
        ));
    }
    if time > received.saturating_add(envelope.future_tolerance.max(0)) {
        return Ok(received);
    }
    Ok(time)
}

/// Parses an RFC 3339 date-time into epoch milliseconds.
pub fn parse_time(s: &str) -> Option<Millis> {
    DateTime::parse_from_rfc3339(s.trim())
        .ok()
        .map(|t| t.timestamp_millis())
}

/// Formats epoch milliseconds as RFC 3339 UTC with milliseconds.
pub fn format_millis(ms: Millis) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn env(kind: Option<EventKind>) -> Envelope<'static> {
        Envelope {
            kind,
            ..Envelope::received(parse_time("2026-05-01T12:00:00Z").unwrap(), "gen-1")
        }
    }

    fn at(s: &str) -> Millis {
        parse_time(s).unwrap()
    }

    #[test]
    fn timestamp_is_taken_when_no_sent_at() {
        let e = Event::parse(
            json!({"type": "track", "event": "A", "userId": "u", "timestamp": "2026-01-01T00:00:00Z",
                   "originalTimestamp": "2025-01-01T00:00:00Z"}),
            env(None),
        )
        .unwrap();
        assert_eq!(e.timestamp, at("2026-01-01T00:00:00Z"));
        assert_eq!(e.body.get("clientTimestamp"), None);
    }

    #[test]
    fn timestamp_is_corrected_for_clock_skew_with_sent_at() {
        // The device clock is an hour ahead: it stamped the event at 13:00
        // and sent it at 13:00:05; Kindred received it at 12:00:00.
        let e = Event::parse(
            json!({"type": "track", "event": "A", "userId": "u",
                   "timestamp": "2026-05-01T13:00:00Z", "sentAt": "2026-05-01T13:00:05Z"}),
            env(None),
        )
        .unwrap();
        assert_eq!(e.timestamp, at("2026-05-01T11:59:55Z"));
        assert_eq!(e.str_field("timestamp"), Some("2026-05-01T11:59:55.000Z"));
        // Nothing the client sent is lost.
        assert_eq!(e.str_field("clientTimestamp"), Some("2026-05-01T13:00:00Z"));
        assert_eq!(e.str_field("sentAt"), Some("2026-05-01T13:00:05Z"));
    }

    #[test]
    fn clock_skew_is_corrected_with_sent_at() {
        // The client clock is a year behind; the event was sent 5 s after it happened.
        let mut envelope = env(Some(EventKind::Track));
        envelope.batch_sent_at = parse_time("2025-05-01T12:00:05Z");
        let e = Event::parse(
            json!({"event": "A", "userId": "u", "originalTimestamp": "2025-05-01T12:00:00Z"}),
            envelope,
        )
        .unwrap();
        assert_eq!(e.timestamp, at("2026-05-01T11:59:55Z"));
        assert_eq!(e.message_id, "gen-1");
        assert_eq!(e.str_field("timestamp"), Some("2026-05-01T11:59:55.000Z"));
        // The batch's sentAt is recorded on the event.
        assert_eq!(e.str_field("sentAt"), Some("2025-05-01T12:00:05.000Z"));
    }

    #[test]
    fn original_timestamp_then_received_at() {
        let e = Event::parse(
            json!({"type": "page", "anonymousId": "a", "originalTimestamp": "2025-05-01T12:00:00Z"}),
            env(None),
        )
        .unwrap();
        assert_eq!(e.timestamp, at("2025-05-01T12:00:00Z"));
        let e = Event::parse(json!({"type": "page", "anonymousId": "a"}), env(None)).unwrap();
        assert_eq!(e.timestamp, e.received_at);
    }

    #[test]
    fn the_future_is_clamped_to_received_at() {
        let received = at("2026-05-01T12:00:00Z");
        let e = Event::parse(
            json!({"type": "identify", "userId": "u", "timestamp": "3000-01-01T00:00:00Z"}),
            env(None),
        )
        .unwrap();
        assert_eq!(e.timestamp, received);
        assert_eq!(e.str_field("clientTimestamp"), Some("3000-01-01T00:00:00Z"));
        // Within the tolerance (5 minutes by default) the time is kept.
        let e = Event::parse(
            json!({"type": "identify", "userId": "u", "timestamp": "2026-05-01T12:04:59Z"}),
            env(None),
        )
        .unwrap();
        assert_eq!(e.timestamp, at("2026-05-01T12:04:59Z"));
        // A space may set its own tolerance.
        let mut strict = env(None);
        strict.future_tolerance = 0;
        let e = Event::parse(
            json!({"type": "identify", "userId": "u", "timestamp": "2026-05-01T12:00:01Z"}),
            strict,
        )
        .unwrap();
        assert_eq!(e.timestamp, received);
        // A forged sentAt far in the past cannot push the time forward either.
        let e = Event::parse(
            json!({"type": "identify", "userId": "u", "timestamp": "2026-05-01T11:00:00Z",
                   "sentAt": "2001-01-01T00:00:00Z"}),
            env(None),
        )
        .unwrap();
        assert_eq!(e.timestamp, received);
    }

    #[test]
    fn before_2000_is_refused_and_history_is_kept() {
        for payload in [
            json!({"type": "identify", "userId": "u", "timestamp": "1999-12-31T23:59:59Z"}),
            json!({"type": "identify", "userId": "u", "originalTimestamp": "1970-01-01T00:00:00Z"}),
            // A sentAt far in the future drags the corrected time before 2000.
            json!({"type": "identify", "userId": "u", "timestamp": "2026-05-01T11:00:00Z",
                   "sentAt": "9999-01-01T00:00:00Z"}),
        ] {
            let err = Event::parse(payload.clone(), env(None)).unwrap_err();
            assert_eq!(err.code, "invalid_timestamp", "{payload}");
        }
        let e = Event::parse(
            json!({"type": "identify", "userId": "u", "timestamp": "2000-01-01T00:00:00Z"}),
            env(None),
        )
        .unwrap();
        assert_eq!(e.timestamp, EARLIEST_EVENT_TIME);
    }

    #[test]
    fn received_at_is_never_the_clients() {
        let e = Event::parse(
            json!({"type": "identify", "userId": "u", "receivedAt": "2001-01-01T00:00:00Z"}),
            env(None),
        )
        .unwrap();
        assert_eq!(e.received_at, at("2026-05-01T12:00:00Z"));
        assert_eq!(e.str_field("receivedAt"), Some("2026-05-01T12:00:00.000Z"));
    }

    #[test]
    fn a_stored_body_keeps_its_resolved_times() {
        let e = Event::parse(
            json!({"type": "track", "event": "A", "userId": "u",
                   "timestamp": "2026-05-01T13:00:00Z", "sentAt": "2026-05-01T13:00:05Z"}),
            env(None),
        )
        .unwrap();
        let again = Event::from_stored(e.body.clone()).unwrap();
        assert_eq!(again, e);
    }

    #[test]
    fn rejects_with_reasons() {
        let cases = [
            (json!([1]), "invalid_event"),
            (json!({"type": "nope", "userId": "u"}), "invalid_type"),
            (json!({"type": "track", "userId": "u"}), "missing_event"),
            (json!({"type": "track", "event": "A"}), "missing_identity"),
            (json!({"type": "group", "userId": "u"}), "missing_group_id"),
            (json!({"type": "alias", "userId": "u"}), "missing_alias_ids"),
            (
                json!({"type": "identify", "userId": "u", "timestamp": "yesterday"}),
                "invalid_timestamp",
            ),
            (
                json!({"type": "identify", "userId": "u", "messageId": "x".repeat(101)}),
                "invalid_message_id",
            ),
            (
                json!({"type": "identify", "userId": {"a": 1}}),
                "invalid_id",
            ),
            (
                json!({"type": "identify", "userId": "u", "traits": [1]}),
                "invalid_field",
            ),
        ];
        for (payload, code) in cases {
            let err = Event::parse(payload.clone(), env(None)).unwrap_err();
            assert_eq!(err.code, code, "{payload}");
        }
    }

    #[test]
    fn numeric_user_id_becomes_a_string_and_stored_form_round_trips() {
        let e = Event::parse(json!({"type": "identify", "userId": 42}), env(None)).unwrap();
        assert_eq!(e.user_id.as_deref(), Some("42"));
        let again = Event::from_stored(e.body.clone()).unwrap();
        assert_eq!(again, e);
    }

    #[test]
    fn external_ids_alone_identify_an_event() {
        let e = Event::parse(
            json!({"type": "track", "event": "A", "context": {"externalIds": [
                {"id": "c-1", "type": "crm_id", "collection": "users", "encoding": "none"}]}}),
            env(None),
        )
        .unwrap();
        assert_eq!(e.name.as_deref(), Some("A"));
    }

    #[test]
    fn an_identify_without_traits_takes_its_context_traits() {
        let parse = |v: Value| Event::parse(v, Envelope::received(1_700_000_000_000, "g")).unwrap();
        // RudderStack's SDKs put an identify's traits in context.traits only.
        let rudder = parse(json!({"type": "identify", "userId": "u1",
                                  "context": {"traits": {"plan": "pro"}}}));
        assert_eq!(rudder.profile_traits().unwrap()["plan"], "pro");
        let both = parse(
            json!({"type": "identify", "userId": "u1", "traits": {"plan": "team"},
                                "context": {"traits": {"plan": "pro"}}}),
        );
        assert_eq!(both.profile_traits().unwrap()["plan"], "team");
        let track = parse(json!({"type": "track", "event": "E", "userId": "u1",
                                 "context": {"traits": {"plan": "pro"}}}));
        assert!(track.profile_traits().is_none());
    }
}
