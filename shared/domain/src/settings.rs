//! Per-space identity resolution settings: priorities, limits with
//! frequencies, and blocked values (SPEC 4).

use std::collections::BTreeMap;

use regex::{Regex, RegexBuilder};
use serde::{Deserialize, Serialize};

use crate::identifier::Identifier;
use crate::Millis;

const HOUR: Millis = 3_600_000;
const DAY: Millis = 24 * HOUR;

/// Over how long a limit counts the values added to a profile.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Frequency {
    Ever,
    Annually,
    Monthly,
    Weekly,
    Daily,
}

impl Frequency {
    /// The window length, or `None` for `ever`.
    pub fn window(self) -> Option<Millis> {
        match self {
            Self::Ever => None,
            Self::Annually => Some(365 * DAY),
            Self::Monthly => Some(30 * DAY),
            Self::Weekly => Some(7 * DAY),
            Self::Daily => Some(DAY),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Limit {
    pub count: u32,
    pub frequency: Frequency,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TypeRule {
    /// 1 is the highest priority.
    pub priority: u32,
    pub limit: Limit,
    /// Where a custom type's values are read from, besides
    /// `context.externalIds` (Segment's identity onboarding): `traits.KEY`
    /// (an identify's traits), `context.traits.KEY` (any call's) or
    /// `properties.KEY` (a track, page or screen call's).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from: Vec<String>,
}

/// Most `from` sources of one type.
pub const MAX_SOURCES: usize = 10;

/// Types Kindred extracts itself, which cannot take `from` sources.
fn is_built_in(kind: &str) -> bool {
    matches!(kind, "user_id" | "email" | "group_id" | "cross_domain_id")
        || BUILT_IN_TYPES.contains(&kind)
}

/// Whether `path` names a source a custom type can be read from.
fn valid_source(path: &str) -> bool {
    ["traits.", "context.traits.", "properties."]
        .iter()
        .any(|p| {
            path.strip_prefix(p)
                .is_some_and(|k| !k.is_empty() && k.len() <= 256)
        })
}

/// A value that is never used as an identifier. `types` empty means every type.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BlockedValue {
    pub value: String,
    #[serde(default)]
    pub regex: bool,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub types: Vec<String>,
}

/// The settings as stored and as shown by the admin API.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct IdentitySettings {
    pub types: BTreeMap<String, TypeRule>,
    pub blocked: Vec<BlockedValue>,
    /// How far past the moment Kindred received an event its time may be
    /// before it is clamped to that moment (SPEC 2), in seconds.
    #[serde(default = "default_future_tolerance_seconds")]
    pub future_tolerance_seconds: u32,
    /// Profile API requests per second the space's access tokens may make
    /// together (bursts of one second); over it, `429 rate_limit_error`.
    #[serde(default = "default_profile_api_rate")]
    pub profile_api_requests_per_second: u32,
    /// The web pages (origins) that may send events from a browser; empty
    /// means any page, as on Segment ([`crate::origin`]).
    #[serde(default)]
    pub allowed_origins: Vec<String>,
}

fn default_profile_api_rate() -> u32 {
    DEFAULT_PROFILE_API_RATE
}

/// Segment's Profile API allows 100 requests/s; Kindred's default is higher
/// (a backend reading a profile per page view), and a space may set its own.
pub const DEFAULT_PROFILE_API_RATE: u32 = 5_000;
/// The highest Profile API rate a space may set.
pub const MAX_PROFILE_API_RATE: u32 = 1_000_000;

fn default_future_tolerance_seconds() -> u32 {
    (crate::event::DEFAULT_FUTURE_TOLERANCE / 1000) as u32
}

/// Most blocked values a space may set.
pub const MAX_BLOCKED: usize = 100;
/// Longest blocked value or pattern, in bytes.
pub const MAX_BLOCKED_BYTES: usize = 1024;
/// Most identifier types a settings document may configure.
pub const MAX_TYPES: usize = 200;
/// The lowest priority a type may have (priorities are 1..=this).
pub const MAX_PRIORITY: u32 = 10_000;
/// Memory a blocked pattern may compile to (the regex crate's size limit):
/// a pattern is matched against every identifier of every event.
const REGEX_SIZE_LIMIT: usize = 256 * 1024;

/// The largest clock tolerance a space may set: a day.
pub const MAX_FUTURE_TOLERANCE_SECONDS: u32 = 86_400;

impl IdentitySettings {
    /// Reads and validates a settings document (the Admin API's body),
    /// naming the bad field in the error.
    pub fn parse(body: &[u8]) -> Result<Self, SettingsError> {
        let value: serde_json::Value = serde_json::from_slice(body).map_err(|_| SettingsError {
            field: "body".into(),
            message: "not valid JSON".into(),
        })?;
        let settings: IdentitySettings =
            serde_path_to_error::deserialize(value).map_err(|e| SettingsError {
                field: e.path().to_string(),
                message: e.inner().to_string(),
            })?;
        IdentityRules::new(settings.clone())?;
        Ok(settings)
    }

    /// The clock tolerance in milliseconds.
    pub fn future_tolerance(&self) -> Millis {
        Millis::from(
            self.future_tolerance_seconds
                .min(MAX_FUTURE_TOLERANCE_SECONDS),
        ) * 1000
    }
}

/// The identifier types Kindred extracts itself (SPEC 3), besides user_id and email.
const BUILT_IN_TYPES: [&str; 8] = [
    "android.id",
    "android.idfa",
    "android.push_token",
    "anonymous_id",
    "ga_client_id",
    "ios.id",
    "ios.idfa",
    "ios.push_token",
];

/// Per profile caps (SPEC 4).
pub const MAX_MERGES: u32 = 100;
pub const MAX_IDENTIFIERS: usize = 1000;
/// Per profile, the identifiers' types and values together take at most
/// this many bytes as stored (JSON strings, escapes counted; 1,000
/// identifiers of 1 KiB would not fit a DynamoDB item of 400 KB): past
/// it, like past the count, no new identifiers.
pub const MAX_IDENTIFIER_BYTES_PER_PROFILE: usize = 256 * 1024;

/// The bytes an identifier's type and value take in a profile's stored
/// identifier list (as JSON strings, so a hostile value full of control
/// characters counts six bytes for each).
pub fn stored_identifier_bytes(id: &Identifier) -> usize {
    let json = |s: &str| serde_json::to_string(s).map_or(s.len() * 6 + 2, |j| j.len());
    json(&id.kind) + json(&id.value)
}

impl Default for IdentitySettings {
    fn default() -> Self {
        let mut types = BTreeMap::new();
        types.insert(
            "user_id".to_string(),
            TypeRule {
                priority: 1,
                limit: Limit {
                    count: 1,
                    frequency: Frequency::Ever,
                },
                from: Vec::new(),
            },
        );
        types.insert("email".to_string(), TypeRule::fallback(2));
        for (i, kind) in BUILT_IN_TYPES.iter().enumerate() {
            let mut rule = TypeRule::fallback(3 + i as u32);
            if *kind == "anonymous_id" {
                rule.limit.frequency = Frequency::Weekly;
            }
            types.insert(kind.to_string(), rule);
        }
        let mut blocked = vec![BlockedValue {
            value: "^[0-]*$".into(),
            regex: true,
            types: vec![],
        }];
        for v in [
            "-1",
            "null",
            "none",
            "undefined",
            "anonymous",
            "[object Object]",
            "NaN",
        ] {
            blocked.push(BlockedValue {
                value: v.into(),
                regex: false,
                types: vec![],
            });
        }
        Self {
            types,
            blocked,
            future_tolerance_seconds: default_future_tolerance_seconds(),
            profile_api_requests_per_second: DEFAULT_PROFILE_API_RATE,
            allowed_origins: Vec::new(),
        }
    }
}

impl TypeRule {
    /// Limit 5 annually, the default of every type without its own.
    fn fallback(priority: u32) -> Self {
        Self {
            priority,
            limit: Limit {
                count: 5,
                frequency: Frequency::Annually,
            },
            from: Vec::new(),
        }
    }
}

/// A settings document that cannot be used, naming the bad field.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{field}: {message}")]
pub struct SettingsError {
    pub field: String,
    pub message: String,
}

/// Settings compiled for use: regexes built, unknown types defaulted.
#[derive(Clone, Debug)]
pub struct IdentityRules {
    settings: IdentitySettings,
    blocked: Vec<(Matcher, Vec<String>)>,
    /// The rule of an unseen custom type.
    fallback: TypeRule,
}

#[derive(Clone, Debug)]
enum Matcher {
    Exact(String),
    Pattern(Regex),
}

impl IdentityRules {
    pub fn new(settings: IdentitySettings) -> Result<Self, SettingsError> {
        let bad = |field: String, message: &str| SettingsError {
            field,
            message: message.to_string(),
        };
        if settings.types.len() > MAX_TYPES {
            return Err(bad("types".into(), "at most 200 identifier types"));
        }
        for (kind, rule) in &settings.types {
            if kind.len() > crate::identifier::MAX_TYPE_BYTES {
                return Err(bad("types".into(), "a type name is at most 128 bytes"));
            }
            if kind.is_empty() || kind != &kind.to_ascii_lowercase() {
                return Err(bad(format!("types.{kind}"), "types must be lowercase"));
            }
            if rule.priority == 0 || rule.priority > MAX_PRIORITY {
                return Err(bad(
                    format!("types.{kind}.priority"),
                    "priority is 1 (highest) to 10000",
                ));
            }
            if rule.limit.count == 0 {
                return Err(bad(
                    format!("types.{kind}.limit.count"),
                    "a limit must allow at least one value",
                ));
            }
            if !rule.from.is_empty() && is_built_in(kind) {
                return Err(bad(
                    format!("types.{kind}.from"),
                    "only custom types are read from other fields",
                ));
            }
            if rule.from.len() > MAX_SOURCES {
                return Err(bad(format!("types.{kind}.from"), "at most 10 sources"));
            }
            for (i, path) in rule.from.iter().enumerate() {
                if !valid_source(path) {
                    return Err(bad(
                        format!("types.{kind}.from[{i}]"),
                        "must be traits.KEY, context.traits.KEY or properties.KEY",
                    ));
                }
            }
        }
        if settings.future_tolerance_seconds > MAX_FUTURE_TOLERANCE_SECONDS {
            return Err(bad(
                "future_tolerance_seconds".into(),
                "at most 86400 (a day)",
            ));
        }
        if !(1..=MAX_PROFILE_API_RATE).contains(&settings.profile_api_requests_per_second) {
            return Err(bad(
                "profile_api_requests_per_second".into(),
                "from 1 to 1000000",
            ));
        }
        if settings.allowed_origins.len() > crate::origin::MAX_ALLOWED_ORIGINS {
            return Err(bad("allowed_origins".into(), "at most 100 origins"));
        }
        for (i, origin) in settings.allowed_origins.iter().enumerate() {
            crate::origin::check_pattern(origin)
                .map_err(|why| bad(format!("allowed_origins[{i}]"), why))?;
        }
        if settings.blocked.len() > MAX_BLOCKED {
            return Err(bad("blocked".into(), "at most 100 blocked values"));
        }
        let mut blocked = Vec::with_capacity(settings.blocked.len());
        for (i, b) in settings.blocked.iter().enumerate() {
            if b.value.len() > MAX_BLOCKED_BYTES {
                return Err(bad(format!("blocked[{i}].value"), "at most 1024 bytes"));
            }
            if b.types.len() > MAX_TYPES
                || b.types
                    .iter()
                    .any(|t| t.len() > crate::identifier::MAX_TYPE_BYTES)
            {
                return Err(bad(
                    format!("blocked[{i}].types"),
                    "at most 200 types of at most 128 bytes",
                ));
            }
            let matcher = if b.regex {
                let compiled = RegexBuilder::new(&b.value)
                    .size_limit(REGEX_SIZE_LIMIT)
                    .dfa_size_limit(REGEX_SIZE_LIMIT)
                    .build()
                    .map_err(|e| {
                        let why = match e {
                            regex::Error::CompiledTooBig(_) => {
                                "the regular expression is too complex"
                            }
                            _ => "not a valid regular expression",
                        };
                        bad(format!("blocked[{i}].value"), why)
                    })?;
                Matcher::Pattern(compiled)
            } else {
                Matcher::Exact(b.value.to_lowercase())
            };
            blocked.push((matcher, b.types.clone()));
        }
        let fallback_priority = settings
            .types
            .values()
            .map(|r| r.priority)
            .max()
            .unwrap_or(0)
            .saturating_add(1);
        Ok(Self {
            settings,
            blocked,
            fallback: TypeRule::fallback(fallback_priority),
        })
    }

    pub fn settings(&self) -> &IdentitySettings {
        &self.settings
    }

    /// The `(type, source)` pairs of the custom types read from traits
    /// or properties.
    pub fn sources(&self) -> impl Iterator<Item = (&str, &str)> {
        self.settings
            .types
            .iter()
            .flat_map(|(kind, rule)| rule.from.iter().map(move |p| (kind.as_str(), p.as_str())))
    }

    /// The rule of a type; an unseen custom type gets the defaults and
    /// ranks below every configured type.
    pub fn rule(&self, kind: &str) -> &TypeRule {
        self.settings.types.get(kind).unwrap_or(&self.fallback)
    }

    /// Exact blocked values match case-insensitively (`None` from Python
    /// is as useless as `none`); patterns match as written.
    pub fn is_blocked(&self, id: &Identifier) -> bool {
        self.blocked.iter().any(|(matcher, types)| {
            (types.is_empty() || types.iter().any(|t| t == &id.kind))
                && match matcher {
                    Matcher::Exact(v) => id.value.to_lowercase() == *v,
                    Matcher::Pattern(r) => r.is_match(&id.value),
                }
        })
    }
}

impl Default for IdentityRules {
    fn default() -> Self {
        Self::new(IdentitySettings::default()).expect("default settings are valid")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A profile at every limit (1,000 identifiers whose stored bytes
    /// reach the cap, escapes included, and traits at theirs) still fits
    /// one DynamoDB item of 400 KB with room for its other attributes.
    #[test]
    fn a_profile_at_every_limit_fits_one_dynamodb_item() {
        use crate::resolve::IdentifierEntry;
        use crate::traits::MAX_TRAITS_BYTES;
        let mut list = Vec::new();
        let mut used = 0;
        let mut i = 0u32;
        while list.len() < MAX_IDENTIFIERS {
            // Control characters: six bytes each once stored.
            let id = Identifier::new(format!("custom_{i}"), format!("{i}{}", "\u{1}".repeat(45)));
            let bytes = stored_identifier_bytes(&id);
            if used + bytes > MAX_IDENTIFIER_BYTES_PER_PROFILE {
                break;
            }
            used += bytes;
            list.push(IdentifierEntry {
                id,
                added_at: 1_795_906_800_000,
            });
            i += 1;
        }
        assert!(used > MAX_IDENTIFIER_BYTES_PER_PROFILE * 9 / 10, "{used}");
        let identifiers = serde_json::to_string(&list).unwrap().len();
        // Ids, version, times, merges, first message id, key attributes.
        let other_attributes = 2 * 1024;
        let item = identifiers + MAX_TRAITS_BYTES + other_attributes;
        assert!(item < 400 * 1024, "{item} bytes");
    }

    #[test]
    fn defaults_follow_the_spec() {
        let rules = IdentityRules::default();
        assert_eq!(rules.rule("user_id").priority, 1);
        assert_eq!(rules.rule("user_id").limit.count, 1);
        assert_eq!(rules.rule("user_id").limit.frequency, Frequency::Ever);
        assert_eq!(rules.rule("email").priority, 2);
        assert_eq!(rules.rule("email").limit.frequency, Frequency::Annually);
        assert_eq!(rules.rule("android.id").priority, 3);
        assert_eq!(rules.rule("anonymous_id").priority, 6);
        assert_eq!(
            rules.rule("anonymous_id").limit.frequency,
            Frequency::Weekly
        );
        assert_eq!(rules.rule("ios.push_token").priority, 10);
        let custom = rules.rule("crm_id");
        assert_eq!((custom.priority, custom.limit.count), (11, 5));
    }

    #[test]
    fn priorities_cannot_overflow() {
        // Found by fuzzing (fuzz/regressions/identity_settings): the
        // fallback priority of unseen types was the highest priority + 1.
        let mut s = IdentitySettings::default();
        s.types.get_mut("user_id").unwrap().priority = u32::MAX;
        let err = IdentityRules::new(s.clone()).unwrap_err();
        assert_eq!(err.field, "types.user_id.priority");
        s.types.get_mut("user_id").unwrap().priority = MAX_PRIORITY;
        let rules = IdentityRules::new(s).unwrap();
        assert_eq!(rules.rule("crm_id").priority, MAX_PRIORITY + 1);
    }

    #[test]
    fn default_blocked_values() {
        let rules = IdentityRules::default();
        for v in [
            "0",
            "000-000",
            "",
            "-1",
            "null",
            "None",
            "undefined",
            "anonymous",
            "[object Object]",
            "NaN",
        ] {
            assert!(rules.is_blocked(&Identifier::new("anonymous_id", v)), "{v}");
        }
        for v in ["a1", "10", "nullable", "user-0"] {
            assert!(
                !rules.is_blocked(&Identifier::new("anonymous_id", v)),
                "{v}"
            );
        }
    }

    #[test]
    fn blocked_values_can_target_one_type_and_bad_regex_names_the_field() {
        let mut s = IdentitySettings::default();
        s.blocked.push(BlockedValue {
            value: "team@.*".into(),
            regex: true,
            types: vec!["email".into()],
        });
        let rules = IdentityRules::new(s.clone()).unwrap();
        assert!(rules.is_blocked(&Identifier::new("email", "team@acme.com")));
        assert!(!rules.is_blocked(&Identifier::new("user_id", "team@acme.com")));
        s.blocked.push(BlockedValue {
            value: "(".into(),
            regex: true,
            types: vec![],
        });
        let err = IdentityRules::new(s).unwrap_err();
        assert_eq!(err.field, "blocked[9].value");
    }
}
