//! The Segment tracking spec: what an event is, how it is validated, and
//! which moment it describes (SPEC 2).

use chrono::DateTime;
use serde_json::{Map, Value};

use crate::identifier::extract_identifiers;
use crate::Millis;

/// Largest accepted event, serialized (SPEC 2).
pub const MAX_EVENT_BYTES: usize = 32 * 1024;
/// Largest accepted request body, after decompression (SPEC 2).
pub const MAX_BATCH_BYTES: usize = 500 * 1024;
/// Longest accepted `messageId` (SPEC 2).
pub const MAX_MESSAGE_ID_CHARS: usize = 100;

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
}

impl Event {
    /// Validates one payload and resolves its time and message id.
    pub fn parse(value: Value, envelope: Envelope<'_>) -> Result<Event, Rejection> {
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
            EventKind::Group => id_field(&mut body, "groupId")?
                .is_none()
                .then_some(("missing_group_id", "a group call needs a groupId")),
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

        let timestamp = event_time(&body, &envelope)?;
        body.insert("timestamp".into(), Value::String(format_millis(timestamp)));
        if !body.contains_key("receivedAt") {
            body.insert(
                "receivedAt".into(),
                Value::String(format_millis(envelope.received_at)),
            );
        }
        let received_at = match body.get("receivedAt") {
            Some(Value::String(s)) => parse_time(s).unwrap_or(envelope.received_at),
            _ => envelope.received_at,
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

    /// Parses a body that `parse` produced earlier (from a queue or the store).
    pub fn from_stored(body: Map<String, Value>) -> Result<Event, Rejection> {
        let received_at = match body.get("receivedAt") {
            Some(Value::String(s)) => parse_time(s).unwrap_or(0),
            _ => 0,
        };
        Event::parse(
            Value::Object(body),
            Envelope {
                kind: None,
                received_at,
                batch_sent_at: None,
                generated_message_id: "",
            },
        )
    }

    pub fn str_field(&self, field: &str) -> Option<&str> {
        self.body.get(field).and_then(Value::as_str)
    }

    pub fn object(&self, field: &str) -> Option<&Map<String, Value>> {
        self.body.get(field).and_then(Value::as_object)
    }

    /// The traits an identify call sets on the profile.
    pub fn profile_traits(&self) -> Option<&Map<String, Value>> {
        match self.kind {
            EventKind::Identify => self.object("traits"),
            _ => None,
        }
    }
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
            if id.chars().count() > 1024 {
                return Err(Rejection::new(
                    "invalid_id",
                    format!("{field} must be at most 1024 characters"),
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

/// SPEC 2: `timestamp`; else `receivedAt - (sentAt - originalTimestamp)`;
/// else `originalTimestamp`; else `receivedAt`.
fn event_time(body: &Map<String, Value>, envelope: &Envelope<'_>) -> Result<Millis, Rejection> {
    let timestamp = time_field(body, "timestamp")?;
    let original = time_field(body, "originalTimestamp")?;
    let sent_at = time_field(body, "sentAt")?.or(envelope.batch_sent_at);
    Ok(match (timestamp, original, sent_at) {
        (Some(t), _, _) => t,
        (None, Some(o), Some(s)) => envelope.received_at - (s - o),
        (None, Some(o), None) => o,
        (None, None, _) => envelope.received_at,
    })
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
            received_at: parse_time("2026-05-01T12:00:00Z").unwrap(),
            batch_sent_at: None,
            generated_message_id: "gen-1",
        }
    }

    #[test]
    fn timestamp_wins_over_everything() {
        let e = Event::parse(
            json!({"type": "track", "event": "A", "userId": "u", "timestamp": "2026-01-01T00:00:00Z",
                   "originalTimestamp": "2025-01-01T00:00:00Z", "sentAt": "2025-01-01T00:00:05Z"}),
            env(None),
        )
        .unwrap();
        assert_eq!(e.timestamp, parse_time("2026-01-01T00:00:00Z").unwrap());
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
        assert_eq!(e.timestamp, parse_time("2026-05-01T11:59:55Z").unwrap());
        assert_eq!(e.message_id, "gen-1");
        assert_eq!(e.str_field("timestamp"), Some("2026-05-01T11:59:55.000Z"));
    }

    #[test]
    fn original_timestamp_then_received_at() {
        let e = Event::parse(
            json!({"type": "page", "anonymousId": "a", "originalTimestamp": "2025-05-01T12:00:00Z"}),
            env(None),
        )
        .unwrap();
        assert_eq!(e.timestamp, parse_time("2025-05-01T12:00:00Z").unwrap());
        let e = Event::parse(json!({"type": "page", "anonymousId": "a"}), env(None)).unwrap();
        assert_eq!(e.timestamp, e.received_at);
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
}
