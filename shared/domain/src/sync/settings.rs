//! A destination's settings: what they mean, how they are validated, and
//! where the server may send to.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr};

use serde_json::{json, Map, Value};

/// Where a destination's calls go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// POST of Segment-spec JSON to a URL, signed with HMAC-SHA256.
    Webhook,
    /// A Segment-compatible Tracking API (`/v1/batch`, Basic auth with a write key).
    Segment,
}

impl Kind {
    /// The setting that holds where calls go: a webhook's `url`, a
    /// Segment-compatible API's `host`.
    pub fn endpoint_field(self) -> &'static str {
        match self {
            Self::Webhook => "url",
            Self::Segment => "host",
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Webhook => "webhook",
            Kind::Segment => "segment",
        }
    }
}

/// Which identifier values of a profile a call is made for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Strategy {
    /// One call per value of every listed type.
    All,
    /// One call, with the earliest-added value of each listed type.
    FirstAdded,
    /// One call, with the latest-added value of each listed type.
    LastAdded,
}

impl Strategy {
    pub fn as_str(self) -> &'static str {
        match self {
            Strategy::All => "all",
            Strategy::FirstAdded => "first_added",
            Strategy::LastAdded => "last_added",
        }
    }
}

/// The form of `context.personas` in the calls a destination receives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Personas {
    /// Segment Engage's: `computation_class` `trait` or `audience`,
    /// `computation_id` `tra_…`/`aud_…`, `computation_key`, `namespace`
    /// (`spa_…`) and `space_id`. New destinations get it.
    Segment,
    /// Kindred's first form: `computation_class` `computed_trait` or
    /// `audience` and `computation_id` the key. Destinations stored
    /// before the setting existed keep it, so their receivers go on
    /// working; a replace may move them to `segment`.
    KindredV1,
}

impl Personas {
    pub fn as_str(self) -> &'static str {
        match self {
            Personas::Segment => "segment",
            Personas::KindredV1 => "kindred_v1",
        }
    }
}

/// A destination's settings, validated. Secrets are not part of it: they
/// are stored apart, encrypted, and never returned.
#[derive(Clone, Debug, PartialEq)]
pub struct Settings {
    pub kind: Kind,
    /// The webhook URL, or the Segment-compatible API's base URL.
    pub endpoint: String,
    /// The trait and audience keys to send; `None`: all.
    pub keys: Option<BTreeSet<String>>,
    /// `identify` with `{key: value}`.
    pub identify: bool,
    /// `track` with `Audience Entered` / `Audience Exited` / `Trait Computed`.
    pub track: bool,
    pub strategy: Strategy,
    /// Identifier types, in the order their values are preferred.
    pub id_types: Vec<String>,
    pub alias_on_merge: bool,
    /// A `delete` call (Segment's shape) when a regulation deletes a
    /// person the destination was sent.
    pub forward_deletes: bool,
    /// Calls per HTTP request (webhook: 1 sends a bare call, more sends
    /// `{"batch": [...]}`; segment: `/v1/batch` up to this many).
    pub batch_size: usize,
    pub enabled: bool,
    pub personas: Personas,
}

/// A settings body that does not validate; names the bad field.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct SettingsError {
    pub field: String,
    pub message: String,
}

fn bad(field: &str, message: impl Into<String>) -> SettingsError {
    SettingsError {
        field: field.into(),
        message: message.into(),
    }
}

/// Most calls a webhook or Segment request carries (Segment's batch limit
/// is 500 KB; 100 calls of computed values stay well inside it).
pub const MAX_BATCH: usize = 100;
/// Most destinations one space may have.
pub const MAX_DESTINATIONS: usize = 50;

/// The refusal of one more destination than [`MAX_DESTINATIONS`].
pub fn too_many_destinations() -> SettingsError {
    bad(
        "id",
        format!("a space has at most {MAX_DESTINATIONS} destinations; delete one first"),
    )
}

/// Identifier types sent when a destination names none.
pub const DEFAULT_ID_TYPES: [&str; 3] = ["user_id", "anonymous_id", "email"];

/// The secret a body carries for its kind (webhook `secret`, segment
/// `write_key`), if any.
pub fn secret_field(kind: Kind) -> &'static str {
    match kind {
        Kind::Webhook => "secret",
        Kind::Segment => "write_key",
    }
}

/// What a replace must send before changes: nothing, every current
/// value, or those of some keys.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Resync {
    Nothing,
    Every,
    Keys(BTreeSet<String>),
}

impl Settings {
    /// Validates a `PUT .../destinations/{id}` body. Returns the settings
    /// and the secret the body carries.
    pub fn parse(body: &Value) -> Result<(Settings, Option<String>), SettingsError> {
        let obj = body
            .as_object()
            .ok_or_else(|| bad("body", "must be a JSON object"))?;
        const KNOWN: [&str; 14] = [
            "kind",
            "url",
            "host",
            "secret",
            "write_key",
            "keys",
            "calls",
            "id_sync",
            "alias_on_merge",
            "forward_deletes",
            "batch_size",
            "enabled",
            "name",
            "personas",
        ];
        if let Some(k) = obj.keys().find(|k| !KNOWN.contains(&k.as_str())) {
            return Err(bad(k, "is not a destination setting"));
        }
        let (kind, endpoint) = kind_and_endpoint(obj)?;
        let secret = secret_of(obj, kind)?;
        let keys = keys_of(obj)?;
        let (identify, track) = calls_of(obj)?;
        let (strategy, id_types) = id_sync_of(obj)?;
        let flag = |name: &str, default: bool| match obj.get(name) {
            None | Some(Value::Null) => Ok(default),
            Some(Value::Bool(b)) => Ok(*b),
            Some(_) => Err(bad(name, "must be true or false")),
        };
        let alias_on_merge = flag("alias_on_merge", false)?;
        let forward_deletes = flag("forward_deletes", false)?;
        let enabled = flag("enabled", true)?;
        let batch_size = match obj.get("batch_size") {
            None | Some(Value::Null) => match kind {
                Kind::Webhook => 1,
                Kind::Segment => MAX_BATCH,
            },
            Some(v) => v
                .as_u64()
                .filter(|n| (1..=MAX_BATCH as u64).contains(n))
                .ok_or_else(|| {
                    bad(
                        "batch_size",
                        format!("must be a whole number from 1 to {MAX_BATCH}"),
                    )
                })? as usize,
        };
        if let Some(name) = obj.get("name") {
            if !name.is_string() {
                return Err(bad("name", "must be a string"));
            }
        }
        let personas = match obj.get("personas") {
            None | Some(Value::Null) => Personas::Segment,
            Some(v) if v == "segment" => Personas::Segment,
            Some(v) if v == "kindred_v1" => Personas::KindredV1,
            Some(_) => return Err(bad("personas", "is not one of segment, kindred_v1")),
        };
        Ok((
            Settings {
                kind,
                endpoint,
                keys,
                identify,
                track,
                strategy,
                id_types,
                alias_on_merge,
                forward_deletes,
                batch_size,
                enabled,
                personas,
            },
            secret,
        ))
    }

    /// Settings as an adapter stored them ([`Settings::to_json`]): those
    /// stored before the `personas` setting existed keep the form their
    /// receivers were built for.
    pub fn from_stored(stored: &Value) -> Result<Settings, SettingsError> {
        let (mut settings, _) = Settings::parse(stored)?;
        if stored.get("personas").is_none() {
            settings.personas = Personas::KindredV1;
        }
        Ok(settings)
    }

    /// The settings as returned by the API (no secret).
    pub fn to_json(&self) -> Value {
        let mut calls = Vec::new();
        if self.identify {
            calls.push("identify");
        }
        if self.track {
            calls.push("track");
        }
        let mut out = json!({
            "kind": self.kind.as_str(),
            "keys": match &self.keys {
                None => json!("all"),
                Some(k) => json!(k),
            },
            "calls": calls,
            "id_sync": {"strategy": self.strategy.as_str(), "types": self.id_types},
            "alias_on_merge": self.alias_on_merge,
            "forward_deletes": self.forward_deletes,
            "batch_size": self.batch_size,
            "enabled": self.enabled,
            "personas": self.personas.as_str(),
        });
        out[self.kind.endpoint_field()] = json!(self.endpoint);
        out
    }

    /// Why a replace from `old` to these settings must carry the secret
    /// again: the stored one was given for another kind, or (a Segment
    /// write key, sent as-is) for another host. `None` if it may be kept.
    pub fn secret_needed_after(&self, old: &Settings) -> Option<SettingsError> {
        let moved =
            self.kind != old.kind || (self.kind == Kind::Segment && self.endpoint != old.endpoint);
        moved.then(|| {
            bad(
                secret_field(self.kind),
                format!(
                    "is required when the kind or the {} changes (the stored one is not sent elsewhere)",
                    self.kind.endpoint_field()
                ),
            )
        })
    }

    /// The current values a replace from `old` must send first: the keys
    /// newly selected, or every key when the destination is enabled again.
    pub fn resync_keys(&self, old: &Settings) -> Resync {
        if self.enabled && !old.enabled {
            return Resync::Every;
        }
        match (&old.keys, &self.keys) {
            (None, _) => Resync::Nothing,
            (Some(_), None) => Resync::Every,
            (Some(o), Some(n)) => {
                let added: BTreeSet<String> = n.difference(o).cloned().collect();
                if added.is_empty() {
                    Resync::Nothing
                } else {
                    Resync::Keys(added)
                }
            }
        }
    }

    /// Whether an initial sync is pending after a replace from `old`, and
    /// of which keys (`None`: every key): the keys this replace adds,
    /// together with those of a pass still pending (`old_pending`, of
    /// `old_keys`).
    pub fn pending_after(
        &self,
        old: &Settings,
        old_pending: bool,
        old_keys: Option<BTreeSet<String>>,
    ) -> (bool, Option<BTreeSet<String>>) {
        let added = match self.resync_keys(old) {
            Resync::Nothing => return (old_pending, old_keys.filter(|_| old_pending)),
            Resync::Every => None,
            Resync::Keys(k) => Some(k),
        };
        if !old_pending {
            return (true, added);
        }
        (
            true,
            old_keys.zip(added).map(|(mut a, b)| {
                a.extend(b);
                a
            }),
        )
    }

    /// Whether changes of `key` are sent.
    pub fn selects(&self, key: &str) -> bool {
        self.keys.as_ref().is_none_or(|k| k.contains(key))
    }

    /// Where a request of calls is POSTed.
    pub fn request_url(&self) -> String {
        match self.kind {
            Kind::Webhook => self.endpoint.clone(),
            Kind::Segment => format!("{}/v1/batch", self.endpoint),
        }
    }

    /// The request body for these calls.
    pub fn request_body(&self, calls: &[Value]) -> Value {
        match (self.kind, calls) {
            (Kind::Webhook, [one]) if self.batch_size == 1 => one.clone(),
            _ => json!({ "batch": calls }),
        }
    }
}

/// `kind` and its endpoint field (`url` or `host`), refusing the other
/// kind's fields.
fn kind_and_endpoint(obj: &Map<String, Value>) -> Result<(Kind, String), SettingsError> {
    let kind = match obj.get("kind").and_then(Value::as_str) {
        Some("webhook") => Kind::Webhook,
        Some("segment") => Kind::Segment,
        Some(_) => return Err(bad("kind", "is not one of webhook, segment")),
        None => return Err(bad("kind", "is required (webhook or segment)")),
    };
    let endpoint_field = kind.endpoint_field();
    let other = match kind {
        Kind::Webhook => Kind::Segment.endpoint_field(),
        Kind::Segment => Kind::Webhook.endpoint_field(),
    };
    if obj.contains_key(other) {
        return Err(bad(
            other,
            format!("is not a {} setting (use {endpoint_field})", kind.as_str()),
        ));
    }
    let endpoint = obj
        .get(endpoint_field)
        .and_then(Value::as_str)
        .ok_or_else(|| bad(endpoint_field, "is required"))?;
    let endpoint = http_url(endpoint).ok_or_else(|| {
        bad(
            endpoint_field,
            "must be an http:// or https:// URL with a host",
        )
    })?;
    let endpoint = match kind {
        Kind::Webhook => endpoint,
        Kind::Segment => endpoint.trim_end_matches('/').to_string(),
    };
    let wrong_secret = match kind {
        Kind::Webhook => "write_key",
        Kind::Segment => "secret",
    };
    if obj.contains_key(wrong_secret) {
        return Err(bad(
            wrong_secret,
            format!("is not a {} setting", kind.as_str()),
        ));
    }
    Ok((kind, endpoint))
}

/// The secret a body carries (`secret` or `write_key`), if any.
fn secret_of(obj: &Map<String, Value>, kind: Kind) -> Result<Option<String>, SettingsError> {
    Ok(match obj.get(secret_field(kind)) {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if !s.is_empty() && s.len() <= 512 => Some(s.clone()),
        Some(_) => {
            return Err(bad(
                secret_field(kind),
                "must be a non-empty string of at most 512 characters",
            ))
        }
    })
}

/// `keys`: a list, or every key (`None`).
fn keys_of(obj: &Map<String, Value>) -> Result<Option<BTreeSet<String>>, SettingsError> {
    Ok(match obj.get("keys") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s == "all" => None,
        Some(Value::Array(a)) => {
            let mut keys = BTreeSet::new();
            for (i, k) in a.iter().enumerate() {
                let k = k
                    .as_str()
                    .filter(|k| !k.is_empty())
                    .ok_or_else(|| bad(&format!("keys[{i}]"), "must be a trait or audience key"))?;
                keys.insert(k.to_string());
            }
            Some(keys)
        }
        Some(_) => return Err(bad("keys", "must be a list of keys, or \"all\"")),
    })
}

/// `calls`: whether `identify` and `track` calls are sent.
fn calls_of(obj: &Map<String, Value>) -> Result<(bool, bool), SettingsError> {
    Ok(match obj.get("calls") {
        None | Some(Value::Null) => (true, true),
        Some(Value::Array(a)) if !a.is_empty() => {
            let (mut identify, mut track) = (false, false);
            for (i, c) in a.iter().enumerate() {
                match c.as_str() {
                    Some("identify") => identify = true,
                    Some("track") => track = true,
                    _ => return Err(bad(&format!("calls[{i}]"), "is not one of identify, track")),
                }
            }
            (identify, track)
        }
        Some(_) => return Err(bad("calls", "must be a non-empty list of identify, track")),
    })
}

/// `id_sync`: the strategy and the identifier types it sends.
fn id_sync_of(obj: &Map<String, Value>) -> Result<(Strategy, Vec<String>), SettingsError> {
    Ok(match obj.get("id_sync") {
        None | Some(Value::Null) => (
            Strategy::LastAdded,
            DEFAULT_ID_TYPES.iter().map(|s| s.to_string()).collect(),
        ),
        Some(Value::Object(o)) => {
            if let Some(k) = o.keys().find(|k| *k != "strategy" && *k != "types") {
                return Err(bad(&format!("id_sync.{k}"), "is not an id_sync setting"));
            }
            let strategy = match o.get("strategy").and_then(Value::as_str) {
                None => Strategy::LastAdded,
                Some("all") => Strategy::All,
                Some("first_added") => Strategy::FirstAdded,
                Some("last_added") => Strategy::LastAdded,
                Some(_) => {
                    return Err(bad(
                        "id_sync.strategy",
                        "is not one of all, first_added, last_added",
                    ))
                }
            };
            let types = match o.get("types") {
                None => DEFAULT_ID_TYPES.iter().map(|s| s.to_string()).collect(),
                Some(Value::Array(a)) if !a.is_empty() => {
                    let mut types: Vec<String> = Vec::new();
                    for (i, t) in a.iter().enumerate() {
                        let t = t.as_str().filter(|t| !t.is_empty()).ok_or_else(|| {
                            bad(&format!("id_sync.types[{i}]"), "must be an identifier type")
                        })?;
                        if !types.iter().any(|x| x == t) {
                            types.push(t.to_string());
                        }
                    }
                    types
                }
                Some(_) => {
                    return Err(bad(
                        "id_sync.types",
                        "must be a non-empty list of identifier types",
                    ))
                }
            };
            (strategy, types)
        }
        Some(_) => {
            return Err(bad(
                "id_sync",
                "must be an object like {\"strategy\": \"all\", \"types\": [\"email\"]}",
            ))
        }
    })
}

/// `s` if it is an http(s) URL with a host, without spaces or
/// credentials, as the HTTP client will read it.
fn http_url(s: &str) -> Option<String> {
    if s.len() > 2048 || s.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return None;
    }
    let rest = s
        .strip_prefix("https://")
        .or_else(|| s.strip_prefix("http://"))?;
    let authority = rest.split(['/', '?', '#']).next()?;
    if authority.is_empty() || authority.contains('@') {
        return None;
    }
    let url = url::Url::parse(s).ok()?;
    url.host()?;
    Some(s.to_string())
}

/// Whether an address is inside a network rather than on the internet:
/// loopback, private (RFC 1918), link-local (169.254/16, fe80::/10, where
/// cloud metadata services answer), CGNAT (100.64/10), unique-local
/// (fc00::/7), multicast, unspecified, broadcast, documentation and
/// benchmarking ranges, and IPv6 forms that embed such an IPv4 address.
/// A destination may reach one only where the operator opted in.
pub fn is_internal(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, c, _] = v4.octets();
            v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_multicast()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_documentation()
                || a == 0
                || (a == 100 && (64..128).contains(&b))
                || (a == 192 && b == 0 && c == 0)
                || (a == 198 && (18..20).contains(&b))
                || a >= 240
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_internal(IpAddr::V4(v4));
            }
            let seg = v6.segments();
            // NAT64 (64:ff9b::/96) and 6to4 (2002::/16) embed an IPv4 address.
            if seg[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
                let [a, b] = seg[6].to_be_bytes();
                let [c, d] = seg[7].to_be_bytes();
                return is_internal(IpAddr::V4(Ipv4Addr::new(a, b, c, d)));
            }
            if seg[0] == 0x2002 {
                let [a, b] = seg[1].to_be_bytes();
                let [c, d] = seg[2].to_be_bytes();
                return is_internal(IpAddr::V4(Ipv4Addr::new(a, b, c, d)));
            }
            v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                // Local-use NAT64 (64:ff9b:1::/48) and Teredo (2001::/32),
                // which tunnel to addresses that cannot be checked here.
                || seg[..3] == [0x64, 0xff9b, 1]
                || seg[..2] == [0x2001, 0]
                // IPv4-compatible (::a.b.c.d, deprecated) and other ::/96.
                || seg[..6] == [0; 6]
                || (seg[0] & 0xfe00) == 0xfc00
                || (seg[0] & 0xffc0) == 0xfe80
                || (seg[0] & 0xffc0) == 0xfec0
                || (seg[0] == 0x2001 && seg[1] == 0x0db8)
        }
    }
}

/// Why a destination may not be called from here.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Unreachable(pub String);

/// What `--allow-private-destinations` (or the AWS template's parameter)
/// turns on: destinations at internal addresses, and `http` to a
/// Segment-compatible host (the write key would travel in clear).
pub const OPT_IN: &str = "--allow-private-destinations";

impl Settings {
    /// Whether the endpoint may be called, by what its URL says alone: an
    /// IP literal must not be internal, a `localhost` name neither, and a
    /// Segment-compatible host must be `https`. A host name is checked
    /// again, address by address, when it is resolved at send time.
    pub fn check_reach(&self, allow_private: bool) -> Result<(), Unreachable> {
        if allow_private {
            return Ok(());
        }
        let url = url::Url::parse(&self.endpoint)
            .map_err(|_| Unreachable("the destination's URL cannot be parsed".into()))?;
        let internal = match url.host() {
            Some(url::Host::Ipv4(ip)) => is_internal(IpAddr::V4(ip)),
            Some(url::Host::Ipv6(ip)) => is_internal(IpAddr::V6(ip)),
            Some(url::Host::Domain(name)) => {
                let name = name.trim_end_matches('.').to_ascii_lowercase();
                name == "localhost" || name.ends_with(".localhost")
            }
            None => true,
        };
        if internal {
            return Err(Unreachable(format!(
                "the destination's host is a loopback, private or otherwise internal address; \
                 Kindred calls internal addresses only when started with {OPT_IN}"
            )));
        }
        if self.kind == Kind::Segment && url.scheme() == "http" {
            return Err(Unreachable(format!(
                "a Segment-compatible host must use https: over http the write key travels \
                 in clear (allowed only with {OPT_IN})"
            )));
        }
        Ok(())
    }
}
