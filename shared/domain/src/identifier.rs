//! Identifiers: the `(type, value)` pairs extracted from every event that
//! identity resolution matches on (SPEC 3).

use serde::{Deserialize, Serialize};
use serde_json::Value;
use unicode_normalization::UnicodeNormalization;

use crate::event::{Event, EventKind, Rejection};

/// Longest identifier value, in bytes of UTF-8 (every type).
pub const MAX_IDENTIFIER_BYTES: usize = 1024;
/// Longest identifier type name, in bytes.
pub const MAX_TYPE_BYTES: usize = 128;

/// One identifier. Values are normalized on extraction (emails trimmed and
/// lowercased) so that equal identities compare equal.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Identifier {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(rename = "id")]
    pub value: String,
}

impl Identifier {
    pub fn new(kind: impl Into<String>, value: impl Into<String>) -> Self {
        let kind = kind.into();
        let value = normalize_lookup(&kind, &value.into());
        Self { kind, value }
    }
}

/// An identifier with the descriptive fields of the Profile API.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExternalId {
    pub id: Identifier,
    pub collection: String,
    pub encoding: String,
}

/// Normalizes a value for storage and for every lookup: emails are trimmed,
/// put in Unicode normal form C (so that `é` typed as one code point or as
/// `e` and a combining accent is one address) and lowercased; other types
/// keep their exact value (user ids are case-sensitive in Segment).
pub fn normalize_lookup(kind: &str, value: &str) -> String {
    if kind == "email" {
        value.trim().nfc().collect::<String>().to_lowercase()
    } else {
        value.to_string()
    }
}

/// Extracts every identifier an event carries, deduplicated, in a stable
/// order. Blocked values are *not* removed here (that needs the space's
/// settings). `group_id` is not an identity identifier: it links the
/// profile to an account (see [`group_link`]).
pub fn extract_identifiers(event: &Event) -> Vec<ExternalId> {
    let mut out: Vec<ExternalId> = Vec::new();
    let _ = visit_identifiers(event, &mut |kind, value, encoding, _field| {
        let id = Identifier::new(kind, value);
        if !id.value.trim().is_empty() && !out.iter().any(|e| e.id == id) {
            out.push(ExternalId {
                id,
                collection: "users".into(),
                encoding: encoding.into(),
            });
        }
        Ok(())
    });
    out
}

/// [`extract_identifiers`], then the custom types a space reads from
/// traits or properties (`(type, source)` pairs of
/// [`crate::IdentityRules::sources`]): a string or integer value at the
/// source becomes an identifier of that type. A value over the size
/// limit is not one (the event is already accepted).
pub fn extract_identifiers_with<'a>(
    event: &Event,
    sources: impl IntoIterator<Item = (&'a str, &'a str)>,
) -> Vec<ExternalId> {
    let mut out = extract_identifiers(event);
    for (kind, path) in sources {
        let value = if let Some(key) = path.strip_prefix("context.traits.") {
            event
                .object("context")
                .and_then(|c| c.get("traits"))
                .and_then(|t| t.get(key))
        } else if let Some(key) = path.strip_prefix("traits.") {
            event.profile_traits().and_then(|t| t.get(key))
        } else if let Some(key) = path.strip_prefix("properties.") {
            match event.kind {
                EventKind::Track | EventKind::Page | EventKind::Screen => {
                    event.object("properties").and_then(|p| p.get(key))
                }
                _ => None,
            }
        } else {
            None
        };
        let value = match value {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Number(n)) if n.is_i64() || n.is_u64() => n.to_string(),
            _ => continue,
        };
        let id = Identifier::new(kind, value);
        if id.value.trim().is_empty()
            || id.value.len() > MAX_IDENTIFIER_BYTES
            || out.iter().any(|e| e.id == id)
        {
            continue;
        }
        out.push(ExternalId {
            id,
            collection: "users".into(),
            encoding: "none".into(),
        });
    }
    out
}

/// Refuses an event one of whose identifiers is over the size limits
/// (values of at most 1,024 bytes, types of at most 128), naming the field.
pub fn check_identifier_sizes(event: &Event) -> Result<(), Rejection> {
    visit_identifiers(event, &mut |kind, value, _, field| {
        // Measured as stored: normalizing an email can make it longer.
        if value.len().max(normalize_lookup(kind, value).len()) > MAX_IDENTIFIER_BYTES {
            return Err(Rejection::new(
                "invalid_id",
                format!("{field} must be at most {MAX_IDENTIFIER_BYTES} bytes"),
            ));
        }
        if kind.len() > MAX_TYPE_BYTES {
            return Err(Rejection::new(
                "invalid_id",
                format!("{field}: a type must be at most {MAX_TYPE_BYTES} bytes"),
            ));
        }
        Ok(())
    })
}

/// `(type, value, encoding, field the value came from)` of one identifier.
type Visit<'a> = dyn FnMut(&str, &str, &str, &dyn std::fmt::Display) -> Result<(), Rejection> + 'a;

/// Calls `f(type, value, encoding, field)` for every identifier source
/// of SPEC 3 that the event fills, in a stable order.
fn visit_identifiers(event: &Event, f: &mut Visit<'_>) -> Result<(), Rejection> {
    let mut add = |kind: &str, value: &str, encoding: &str, field: &dyn std::fmt::Display| {
        f(kind, value, encoding, field)
    };
    if let Some(u) = &event.user_id {
        add("user_id", u, "none", &"userId")?;
    }
    if let Some(a) = &event.anonymous_id {
        add("anonymous_id", a, "none", &"anonymousId")?;
    }
    if event.kind == EventKind::Alias {
        // SPEC 5: an alias is matched like an event carrying both ids. The
        // previous id of an alias is the identity used before the user id
        // was known, i.e. an anonymous id.
        if let Some(prev) = event.str_field("previousId") {
            add("anonymous_id", prev, "none", &"previousId")?;
        }
    }
    let context = event.object("context");
    let email_sources = [
        (
            event.object("traits").and_then(|t| t.get("email")),
            "traits.email",
        ),
        (
            context
                .and_then(|c| c.get("traits"))
                .and_then(|t| t.get("email")),
            "context.traits.email",
        ),
    ];
    for (email, field) in email_sources {
        if let Some(Value::String(e)) = email {
            add("email", e, "none", &field)?;
        }
    }
    if let Some(Value::String(id)) = context
        .and_then(|c| c.get("traits"))
        .and_then(|t| t.get("crossDomainId"))
    {
        add(
            "cross_domain_id",
            id,
            "none",
            &"context.traits.crossDomainId",
        )?;
    }
    if let Some(device) = context
        .and_then(|c| c.get("device"))
        .and_then(Value::as_object)
    {
        let platform = device
            .get("type")
            .and_then(Value::as_str)
            .map(str::to_ascii_lowercase);
        if let Some(platform @ ("ios" | "android")) = platform.as_deref() {
            if let Some(id) = device.get("id").and_then(Value::as_str) {
                add(&format!("{platform}.id"), id, "none", &"context.device.id")?;
            }
            if device.get("adTrackingEnabled") == Some(&Value::Bool(true)) {
                if let Some(ad) = device.get("advertisingId").and_then(Value::as_str) {
                    let field = "context.device.advertisingId";
                    add(&format!("{platform}.idfa"), ad, "none", &field)?;
                }
            }
            if let Some(token) = device.get("token").and_then(Value::as_str) {
                let field = "context.device.token";
                add(&format!("{platform}.push_token"), token, "none", &field)?;
            }
        }
    }
    if let Some(ga) = context
        .and_then(|c| c.get("integrations"))
        .or_else(|| event.body.get("integrations"))
        .and_then(|i| i.get("Google Analytics"))
        .and_then(|g| g.get("clientId"))
        .and_then(Value::as_str)
    {
        add(
            "ga_client_id",
            ga,
            "none",
            &"integrations.Google Analytics.clientId",
        )?;
    }
    if let Some(Value::Array(external)) = context.and_then(|c| c.get("externalIds")) {
        for (i, entry) in external.iter().enumerate() {
            let field = |name: &str| entry.get(name).and_then(Value::as_str);
            if let (Some(id), Some(kind), Some(collection), Some(encoding)) = (
                field("id"),
                field("type"),
                field("collection"),
                field("encoding"),
            ) {
                let kind = kind.trim().to_ascii_lowercase();
                if kind.is_empty() || collection != "users" || kind == "group_id" {
                    continue;
                }
                let field = format!("context.externalIds[{i}].id");
                add(&kind, id, encoding, &field)?;
            }
        }
    }
    Ok(())
}

/// The account a `group` call links the profile to.
pub fn group_link(event: &Event) -> Option<&str> {
    match event.kind {
        EventKind::Group => event.str_field("groupId"),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{parse_time, Envelope};
    use serde_json::json;

    fn ids(payload: Value) -> Vec<(String, String)> {
        let e = Event::parse(
            payload,
            Envelope {
                kind: None,
                received_at: parse_time("2026-05-01T00:00:00Z").unwrap(),
                batch_sent_at: None,
                generated_message_id: "m",
                future_tolerance: crate::event::DEFAULT_FUTURE_TOLERANCE,
            },
        )
        .unwrap();
        extract_identifiers(&e)
            .into_iter()
            .map(|x| (x.id.kind, x.id.value))
            .collect()
    }

    fn pair(k: &str, v: &str) -> (String, String) {
        (k.to_string(), v.to_string())
    }

    #[test]
    fn every_spec_source_is_extracted() {
        let got = ids(json!({
            "type": "identify", "userId": "u1", "anonymousId": "a1",
            "traits": {"email": "  Jane@Example.COM "},
            "context": {
                "traits": {"email": "jane@example.com", "crossDomainId": "xd-1"},
                "device": {"type": "iOS", "id": "dev-1", "advertisingId": "ad-1",
                           "adTrackingEnabled": true, "token": "tok-1"},
                "integrations": {"Google Analytics": {"clientId": "ga-1"}},
                "externalIds": [
                    {"id": "C-9", "type": "CRM_ID", "collection": "users", "encoding": "none"},
                    {"id": "x", "type": "missing_encoding", "collection": "users"}
                ]
            }
        }));
        assert_eq!(
            got,
            vec![
                pair("user_id", "u1"),
                pair("anonymous_id", "a1"),
                pair("email", "jane@example.com"),
                pair("cross_domain_id", "xd-1"),
                pair("ios.id", "dev-1"),
                pair("ios.idfa", "ad-1"),
                pair("ios.push_token", "tok-1"),
                pair("ga_client_id", "ga-1"),
                pair("crm_id", "C-9"),
            ]
        );
    }

    #[test]
    fn advertising_id_needs_ad_tracking_and_android_is_prefixed() {
        let got = ids(json!({"type": "track", "event": "E", "anonymousId": "a",
            "context": {"device": {"type": "android", "id": "d", "advertisingId": "ad"}}}));
        assert_eq!(
            got,
            vec![pair("anonymous_id", "a"), pair("android.id", "d")]
        );
    }

    #[test]
    fn alias_previous_id_is_an_anonymous_id() {
        let got = ids(json!({"type": "alias", "userId": "u", "previousId": "p"}));
        assert_eq!(got, vec![pair("user_id", "u"), pair("anonymous_id", "p")]);
    }

    #[test]
    fn lookups_are_normalized_like_extraction() {
        assert_eq!(normalize_lookup("email", " A@B.co"), "a@b.co");
        assert_eq!(normalize_lookup("user_id", "AbC"), "AbC");
    }

    #[test]
    fn a_space_s_custom_types_are_read_from_traits_and_properties() {
        let event = |v: Value| Event::parse(v, Envelope::received(1_700_000_000_000, "g")).unwrap();
        let sources = [
            ("phone", "traits.phone"),
            ("crm_id", "properties.crm_id"),
            ("crm_id", "context.traits.crm_id"),
        ];
        let pairs = |e: &Event| -> Vec<(String, String)> {
            extract_identifiers_with(e, sources)
                .into_iter()
                .map(|x| (x.id.kind, x.id.value))
                .collect()
        };
        let identify = event(json!({"type": "identify", "userId": "u1",
            "traits": {"phone": "+4712345678"}, "context": {"traits": {"crm_id": 42}}}));
        assert_eq!(
            pairs(&identify),
            vec![
                pair("user_id", "u1"),
                pair("phone", "+4712345678"),
                pair("crm_id", "42")
            ]
        );
        let track = event(json!({"type": "track", "event": "E", "anonymousId": "a1",
            "properties": {"crm_id": "C-7", "phone": "not a trait"}}));
        assert_eq!(
            pairs(&track),
            vec![pair("anonymous_id", "a1"), pair("crm_id", "C-7")]
        );
        // Objects, floats, blanks and the same value twice are not identifiers.
        let odd = event(json!({"type": "identify", "userId": "u1",
            "traits": {"phone": {"n": 1}}, "context": {"traits": {"crm_id": 1.5}}}));
        assert_eq!(pairs(&odd), vec![pair("user_id", "u1")]);
    }
}
