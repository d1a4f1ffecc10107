//! Destinations and what they are sent (SPEC 11): a destination's settings
//! and their validation, the Segment-spec calls that a change, a current
//! value (initial sync) or a merge becomes for one destination, the
//! messageId receivers deduplicate on, the webhook signature and the retry
//! schedule. Pure: no HTTP, no clock, no randomness (jitter comes in as a
//! number).

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr};

use hmac::{Hmac, Mac};
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};

use crate::compute::Class;
use crate::resolve::IdentifierEntry;
use crate::Millis;

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

impl Settings {
    /// Validates a `PUT .../destinations/{id}` body. Returns the settings
    /// and the secret the body carries.
    pub fn parse(body: &Value) -> Result<(Settings, Option<String>), SettingsError> {
        let obj = body
            .as_object()
            .ok_or_else(|| bad("body", "must be a JSON object"))?;
        const KNOWN: [&str; 13] = [
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
        ];
        if let Some(k) = obj.keys().find(|k| !KNOWN.contains(&k.as_str())) {
            return Err(bad(k, "is not a destination setting"));
        }
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
        let secret = match obj.get(secret_field(kind)) {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) if !s.is_empty() && s.len() <= 512 => Some(s.clone()),
            Some(_) => {
                return Err(bad(
                    secret_field(kind),
                    "must be a non-empty string of at most 512 characters",
                ))
            }
        };
        let keys = match obj.get("keys") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) if s == "all" => None,
            Some(Value::Array(a)) => {
                let mut keys = BTreeSet::new();
                for (i, k) in a.iter().enumerate() {
                    let k = k.as_str().filter(|k| !k.is_empty()).ok_or_else(|| {
                        bad(&format!("keys[{i}]"), "must be a trait or audience key")
                    })?;
                    keys.insert(k.to_string());
                }
                Some(keys)
            }
            Some(_) => return Err(bad("keys", "must be a list of keys, or \"all\"")),
        };
        let (identify, track) = match obj.get("calls") {
            None | Some(Value::Null) => (true, true),
            Some(Value::Array(a)) if !a.is_empty() => {
                let (mut identify, mut track) = (false, false);
                for (i, c) in a.iter().enumerate() {
                    match c.as_str() {
                        Some("identify") => identify = true,
                        Some("track") => track = true,
                        _ => {
                            return Err(bad(
                                &format!("calls[{i}]"),
                                "is not one of identify, track",
                            ))
                        }
                    }
                }
                (identify, track)
            }
            Some(_) => return Err(bad("calls", "must be a non-empty list of identify, track")),
        };
        let (strategy, id_types) = match obj.get("id_sync") {
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
        };
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
            },
            secret,
        ))
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

    /// The keys whose current values a replace from `old` must send first
    /// (`Some(None)`: every key), or `None` if none: the keys newly
    /// selected, or every key when the destination is enabled again.
    pub fn resync_keys(&self, old: &Settings) -> Option<Option<BTreeSet<String>>> {
        if self.enabled && !old.enabled {
            return Some(None);
        }
        match (&old.keys, &self.keys) {
            (None, _) => None,
            (Some(_), None) => Some(None),
            (Some(o), Some(n)) => {
                let added: BTreeSet<String> = n.difference(o).cloned().collect();
                (!added.is_empty()).then_some(Some(added))
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
        match (old_pending, self.resync_keys(old)) {
            (false, None) => (false, None),
            (true, None) => (true, old_keys),
            (false, Some(k)) => (true, k),
            (true, Some(k)) => (
                true,
                old_keys.zip(k).map(|(mut a, b)| {
                    a.extend(b);
                    a
                }),
            ),
        }
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

/// A change of the outbound change log, as the sync step reads it.
#[derive(Clone, Debug, PartialEq)]
pub struct ChangeEntry<'a> {
    /// The change's position in the space's log; `None` for a current
    /// value sent by an initial sync.
    pub seq: Option<i64>,
    pub key: &'a str,
    pub class: Class,
    pub new: &'a Value,
    pub at: &'a str,
}

/// A deterministic messageId: the same (change, destination, identifier)
/// always gets the same id, so receivers can deduplicate retries.
pub fn message_id(parts: &[&str]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_le_bytes());
        h.update(p.as_bytes());
    }
    let digest = h.finalize();
    let hex: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
    format!("kdr-{hex}")
}

/// The values a call is addressed with: `userId`, `anonymousId` and
/// traits for the other identifier types (`email`).
#[derive(Clone, Debug, Default, PartialEq)]
struct Address {
    user_id: Option<String>,
    anonymous_id: Option<String>,
    other: Vec<(String, String)>,
    /// What the messageId names.
    label: String,
}

/// The profile's identifiers of `types`, in the order they were added.
fn of_types<'a>(ids: &'a [IdentifierEntry], types: &[String]) -> Vec<&'a IdentifierEntry> {
    let mut out: Vec<&IdentifierEntry> =
        ids.iter().filter(|e| types.contains(&e.id.kind)).collect();
    out.sort_by_key(|a| a.added_at);
    out
}

fn addresses(settings: &Settings, ids: &[IdentifierEntry]) -> Vec<Address> {
    let chosen = of_types(ids, &settings.id_types);
    let one = |e: &IdentifierEntry| {
        let mut a = Address {
            label: format!("{}:{}", e.id.kind, e.id.value),
            ..Address::default()
        };
        a.set(&e.id.kind, &e.id.value);
        a
    };
    match settings.strategy {
        Strategy::All => {
            // The value of a call about an email needs a userId or an
            // anonymousId too (the Segment spec requires one): the
            // profile's latest.
            let fallback_user = latest(ids, "user_id");
            let fallback_anon = latest(ids, "anonymous_id");
            chosen
                .into_iter()
                .map(|e| {
                    let mut a = one(e);
                    if a.user_id.is_none() && a.anonymous_id.is_none() {
                        a.user_id = fallback_user.clone();
                        if a.user_id.is_none() {
                            a.anonymous_id = fallback_anon.clone();
                        }
                    }
                    a
                })
                .collect()
        }
        Strategy::FirstAdded | Strategy::LastAdded => {
            let mut a = Address::default();
            let mut labels = Vec::new();
            for t in &settings.id_types {
                let of_type = chosen.iter().filter(|e| e.id.kind == *t);
                let pick = if settings.strategy == Strategy::FirstAdded {
                    of_type.min_by_key(|e| e.added_at)
                } else {
                    of_type.max_by_key(|e| e.added_at)
                };
                if let Some(e) = pick {
                    a.set(&e.id.kind, &e.id.value);
                    labels.push(format!("{}:{}", e.id.kind, e.id.value));
                }
            }
            if labels.is_empty() {
                return Vec::new();
            }
            if a.user_id.is_none() && a.anonymous_id.is_none() {
                a.user_id = latest(ids, "user_id");
                if a.user_id.is_none() {
                    a.anonymous_id = latest(ids, "anonymous_id");
                }
            }
            a.label = labels.join("|");
            vec![a]
        }
    }
}

fn latest(ids: &[IdentifierEntry], kind: &str) -> Option<String> {
    ids.iter()
        .filter(|e| e.id.kind == kind)
        .max_by_key(|e| e.added_at)
        .map(|e| e.id.value.clone())
}

impl Address {
    fn set(&mut self, kind: &str, value: &str) {
        match kind {
            "user_id" => self.user_id = Some(value.to_string()),
            "anonymous_id" => self.anonymous_id = Some(value.to_string()),
            _ => self.other.push((kind.to_string(), value.to_string())),
        }
    }

    /// Adds `userId` / `anonymousId` to a call, and the other identifiers
    /// to `traits` (identify) or `context.traits` (track).
    fn fill(&self, call: &mut Map<String, Value>, traits_field: &str) {
        if let Some(u) = &self.user_id {
            call.insert("userId".into(), json!(u));
        }
        if let Some(a) = &self.anonymous_id {
            call.insert("anonymousId".into(), json!(a));
        }
        if !self.other.is_empty() {
            let traits = call
                .entry(traits_field.to_string())
                .or_insert_with(|| json!({}));
            for (k, v) in &self.other {
                traits[k] = json!(v);
            }
        }
    }
}

/// The Segment-spec calls one change (or current value) becomes for one
/// destination: for each address of the id-sync strategy, an identify
/// with `{key: value}` and/or a track (`Audience Entered` / `Audience
/// Exited` for audiences, `Trait Computed` for traits), each with a
/// deterministic messageId. Empty if the key is not selected or the
/// profile has none of the destination's identifier types.
pub fn change_calls(
    space_id: &str,
    destination_id: &str,
    settings: &Settings,
    profile_id: &str,
    ids: &[IdentifierEntry],
    change: &ChangeEntry<'_>,
) -> Vec<Value> {
    if !settings.selects(change.key) {
        return Vec::new();
    }
    let personas = json!({
        "computation_class": change.class.as_str(),
        "computation_key": change.key,
        "computation_id": change.key,
        "space_id": space_id,
        "profile_id": profile_id,
    });
    let origin = match change.seq {
        Some(seq) => format!("change:{seq}"),
        None => format!("current:{profile_id}:{}:{}", change.key, change.new),
    };
    let mut calls = Vec::new();
    for address in addresses(settings, ids) {
        let id_of =
            |call: &str| message_id(&[space_id, destination_id, &origin, call, &address.label]);
        if settings.identify {
            let mut call = Map::new();
            call.insert("type".into(), json!("identify"));
            call.insert("messageId".into(), json!(id_of("identify")));
            call.insert("traits".into(), json!({ change.key: change.new }));
            address.fill(&mut call, "traits");
            call.insert("timestamp".into(), json!(change.at));
            call.insert("context".into(), json!({"personas": personas}));
            calls.push(Value::Object(call));
        }
        if settings.track {
            let (event, properties) = match change.class {
                Class::Audience => (
                    if change.new == &Value::Bool(true) {
                        "Audience Entered"
                    } else {
                        "Audience Exited"
                    },
                    json!({"audience_key": change.key, change.key: change.new}),
                ),
                Class::ComputedTrait => (
                    "Trait Computed",
                    json!({"trait_key": change.key, change.key: change.new}),
                ),
            };
            let mut call = Map::new();
            call.insert("type".into(), json!("track"));
            call.insert("messageId".into(), json!(id_of("track")));
            call.insert("event".into(), json!(event));
            call.insert("properties".into(), properties);
            address.fill(&mut call, "context_traits");
            let context_traits = call.remove("context_traits");
            call.insert("timestamp".into(), json!(change.at));
            let mut context = json!({"personas": personas});
            if let Some(t) = context_traits {
                context["traits"] = t;
            }
            call.insert("context".into(), context);
            calls.push(Value::Object(call));
        }
    }
    calls
}

/// Whether an initial sync sends this current value: audience members,
/// and traits that have a value.
pub fn worth_initial_sync(class: Class, value: &Value) -> bool {
    match class {
        Class::Audience => value == &Value::Bool(true),
        Class::ComputedTrait => !value.is_null(),
    }
}

/// The `alias` call a merge becomes for a destination with
/// `alias_on_merge`: the merged-away profile's user id (or anonymous id)
/// as `previousId`, the surviving profile's user id as `userId`. `None`
/// when either side has no such identifier.
pub fn alias_call(
    space_id: &str,
    destination_id: &str,
    merge_seq: i64,
    child: &[IdentifierEntry],
    parent: &[IdentifierEntry],
    at: &str,
) -> Option<Value> {
    let own: Vec<IdentifierEntry> = parent
        .iter()
        .filter(|e| !child.iter().any(|c| c.id == e.id))
        .cloned()
        .collect();
    // The user id survives; the other side's id is the previous one. A
    // merge into an anonymous profile aliases that profile's anonymous id
    // to the merged-in user.
    let (previous, user) = match (latest(&own, "user_id"), latest(child, "user_id")) {
        (Some(p), child_user) => (child_user.or_else(|| latest(child, "anonymous_id"))?, p),
        (None, Some(c)) => (latest(&own, "anonymous_id")?, c),
        (None, None) => return None,
    };
    if user == previous {
        return None;
    }
    Some(json!({
        "type": "alias",
        "messageId": message_id(&[space_id, destination_id, &format!("merge:{merge_seq}"), "alias"]),
        "previousId": previous,
        "userId": user,
        "timestamp": at,
        "context": {"personas": {"space_id": space_id}},
    }))
}

/// The `delete` calls a regulation's deletion of a profile becomes for a
/// destination with `forward_deletes`, in Segment's shape (what its
/// webhooks receive for a deleted user): one per user id of the profile,
/// or per anonymous id when it has none; none when it has neither.
pub fn delete_calls(
    space_id: &str,
    destination_id: &str,
    regulation_id: &str,
    ids: &[IdentifierEntry],
    at: &str,
) -> Vec<Value> {
    let users: Vec<&IdentifierEntry> = ids.iter().filter(|e| e.id.kind == "user_id").collect();
    let (field, chosen) = if users.is_empty() {
        (
            "anonymousId",
            ids.iter().filter(|e| e.id.kind == "anonymous_id").collect(),
        )
    } else {
        ("userId", users)
    };
    chosen
        .into_iter()
        .map(|e| {
            json!({
                "type": "delete",
                "messageId": message_id(&[space_id, destination_id, &format!("regulation:{regulation_id}"), "delete", &e.id.value]),
                field: e.id.value,
                "timestamp": at,
                "context": {"personas": {"space_id": space_id}, "regulation_id": regulation_id},
            })
        })
        .collect()
}

/// The webhook signature header's value: `sha256=` and the hex HMAC-SHA256,
/// under the destination's secret, of the timestamp header's value, a `.`
/// and the exact request body. The timestamp is signed so that a captured
/// request cannot be replayed later: receivers check it is recent
/// ([`verify_signature`]).
pub fn sign(secret: &str, timestamp: i64, body: &[u8]) -> String {
    let hex: String = mac(secret, timestamp, body)
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("sha256={hex}")
}

fn mac(secret: &str, timestamp: i64, body: &[u8]) -> Hmac<Sha256> {
    let mut mac =
        Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes a key of any length");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    mac
}

/// The name of the webhook signature header.
pub const SIGNATURE_HEADER: &str = "X-Kindred-Signature";
/// The name of the header with the signing time, in Unix seconds.
pub const TIMESTAMP_HEADER: &str = "X-Kindred-Timestamp";
/// How old a signed request a receiver should accept, at most (seconds).
pub const SIGNATURE_TOLERANCE_SECS: i64 = 300;

/// The check a receiver makes: the signature matches (compared in
/// constant time) and the timestamp is within `tolerance_secs` of `now_secs`.
pub fn verify_signature(
    secret: &str,
    timestamp_header: &str,
    signature_header: &str,
    body: &[u8],
    now_secs: i64,
    tolerance_secs: i64,
) -> bool {
    let Ok(timestamp) = timestamp_header.trim().parse::<i64>() else {
        return false;
    };
    if now_secs.abs_diff(timestamp) > tolerance_secs.unsigned_abs() {
        return false;
    }
    let Some(hex) = signature_header.trim().strip_prefix("sha256=") else {
        return false;
    };
    let Some(given) = (0..hex.len())
        .step_by(2)
        .map(|i| {
            hex.get(i..i + 2)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        })
        .collect::<Option<Vec<u8>>>()
    else {
        return false;
    };
    mac(secret, timestamp, body).verify_slice(&given).is_ok()
}

/// How a delivery attempt ended, as the retry schedule sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Delivered,
    /// Worth retrying: 5xx, 408, 429 (with its `Retry-After`, in ms, if
    /// any), or no answer at all.
    Retry {
        retry_after: Option<u64>,
    },
    /// The receiver refused the calls themselves (4xx): retrying cannot help.
    Rejected,
}

/// What an HTTP status means for a delivery.
pub fn outcome(status: u16, retry_after: Option<u64>) -> Outcome {
    match status {
        200..=299 => Outcome::Delivered,
        408 | 429 | 500..=599 => Outcome::Retry { retry_after },
        _ => Outcome::Rejected,
    }
}

/// The retry schedule: attempts made so far -> how long to wait before
/// the next one. Exponential from `base_ms`, capped at `max_ms`, with
/// "equal jitter" (`jitter` in `[0, 1)`: half the delay is fixed, half
/// random), and never sooner than the receiver's `Retry-After`.
pub fn retry_delay(
    attempts: u32,
    base_ms: u64,
    max_ms: u64,
    jitter: f64,
    retry_after: Option<u64>,
) -> u64 {
    let exp = base_ms
        .saturating_mul(1u64 << attempts.saturating_sub(1).min(30))
        .min(max_ms);
    let jittered = exp / 2 + ((exp / 2) as f64 * jitter.clamp(0.0, 1.0)) as u64;
    jittered.max(retry_after.unwrap_or(0).min(max_ms.max(1) * 4))
}

/// Parses a `Retry-After` header: seconds, or an HTTP date relative to `now`.
pub fn parse_retry_after(value: &str, now: Millis) -> Option<u64> {
    let v = value.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(secs.saturating_mul(1000));
    }
    let at = chrono::DateTime::parse_from_rfc2822(v)
        .ok()?
        .timestamp_millis();
    Some((at - now).max(0) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Identifier;

    fn entry(kind: &str, value: &str, at: Millis) -> IdentifierEntry {
        IdentifierEntry {
            id: Identifier::new(kind, value),
            added_at: at,
        }
    }

    fn settings(body: Value) -> Settings {
        Settings::parse(&body).unwrap().0
    }

    #[test]
    fn settings_validate_and_name_the_bad_field() {
        let (s, secret) =
            Settings::parse(&json!({"kind": "webhook", "url": "http://x/hook", "secret": "s3"}))
                .unwrap();
        assert_eq!(secret.as_deref(), Some("s3"));
        assert_eq!(s.strategy, Strategy::LastAdded);
        assert_eq!(s.batch_size, 1);
        assert!(s.identify && s.track && s.enabled && !s.alias_on_merge);
        assert!(s.to_json().get("secret").is_none());
        let s = settings(
            json!({"kind": "segment", "host": "https://api.segment.io/", "write_key": "wk"}),
        );
        assert_eq!(s.request_url(), "https://api.segment.io/v1/batch");
        assert_eq!(s.batch_size, MAX_BATCH);
        for (body, field) in [
            (json!([]), "body"),
            (json!({"url": "http://x"}), "kind"),
            (json!({"kind": "email", "url": "http://x"}), "kind"),
            (json!({"kind": "webhook"}), "url"),
            (json!({"kind": "webhook", "url": "ftp://x"}), "url"),
            (json!({"kind": "webhook", "url": "http://"}), "url"),
            (json!({"kind": "webhook", "host": "http://x"}), "host"),
            (
                json!({"kind": "segment", "host": "http://x", "secret": "s"}),
                "secret",
            ),
            (
                json!({"kind": "webhook", "url": "http://x", "keys": [1]}),
                "keys[0]",
            ),
            (
                json!({"kind": "webhook", "url": "http://x", "calls": ["page"]}),
                "calls[0]",
            ),
            (
                json!({"kind": "webhook", "url": "http://x", "calls": []}),
                "calls",
            ),
            (
                json!({"kind": "webhook", "url": "http://x", "id_sync": {"strategy": "newest"}}),
                "id_sync.strategy",
            ),
            (
                json!({"kind": "webhook", "url": "http://x", "id_sync": {"types": []}}),
                "id_sync.types",
            ),
            (
                json!({"kind": "webhook", "url": "http://x", "id_sync": {"limit": 1}}),
                "id_sync.limit",
            ),
            (
                json!({"kind": "webhook", "url": "http://x", "batch_size": 0}),
                "batch_size",
            ),
            (
                json!({"kind": "webhook", "url": "http://x", "batch_size": 101}),
                "batch_size",
            ),
            (
                json!({"kind": "webhook", "url": "http://x", "alias_on_merge": "yes"}),
                "alias_on_merge",
            ),
            (
                json!({"kind": "webhook", "url": "http://x", "secret": ""}),
                "secret",
            ),
            (
                json!({"kind": "webhook", "url": "http://x", "colour": "red"}),
                "colour",
            ),
        ] {
            let err = Settings::parse(&body).unwrap_err();
            assert_eq!(err.field, field, "{body}: {err}");
        }
    }

    fn audience_change<'a>(new: &'a Value) -> ChangeEntry<'a> {
        ChangeEntry {
            seq: Some(7),
            key: "vip",
            class: Class::Audience,
            new,
            at: "2026-11-29T10:00:00.000Z",
        }
    }

    #[test]
    fn the_all_strategy_sends_one_call_per_identifier_value() {
        let s = settings(
            json!({"kind": "webhook", "url": "http://x", "calls": ["track"],
            "id_sync": {"strategy": "all", "types": ["email", "user_id"]}}),
        );
        let ids = [
            entry("anonymous_id", "a1", 1),
            entry("email", "A@x.io", 2),
            entry("user_id", "u1", 3),
            entry("email", "b@x.io", 4),
        ];
        let t = json!(true);
        let calls = change_calls("sp", "d1", &s, "prf_1", &ids, &audience_change(&t));
        assert_eq!(calls.len(), 3);
        assert_eq!(calls[0]["event"], "Audience Entered");
        assert_eq!(calls[0]["context"]["traits"]["email"], "a@x.io");
        assert_eq!(
            calls[0]["userId"], "u1",
            "an email call carries the profile's user id"
        );
        assert_eq!(calls[1]["userId"], "u1");
        assert!(calls[1]["context"].get("traits").is_none());
        assert_eq!(calls[2]["context"]["traits"]["email"], "b@x.io");
        assert_eq!(
            calls[0]["context"]["personas"]["computation_class"],
            "audience"
        );
        assert_eq!(calls[0]["context"]["personas"]["computation_key"], "vip");
        assert_eq!(calls[0]["context"]["personas"]["space_id"], "sp");
        let mids: BTreeSet<&str> = calls
            .iter()
            .map(|c| c["messageId"].as_str().unwrap())
            .collect();
        assert_eq!(mids.len(), 3, "one messageId per identifier");
        // Deterministic per (change, destination, identifier).
        assert_eq!(
            change_calls("sp", "d1", &s, "prf_1", &ids, &audience_change(&t)),
            calls
        );
        let other = change_calls("sp", "d2", &s, "prf_1", &ids, &audience_change(&t));
        assert_ne!(other[0]["messageId"], calls[0]["messageId"]);
    }

    #[test]
    fn first_and_last_added_send_one_call_with_one_value_per_type() {
        let ids = [
            entry("email", "first@x.io", 1),
            entry("user_id", "u1", 2),
            entry("email", "last@x.io", 3),
            entry("anonymous_id", "a1", 4),
        ];
        let f = json!(false);
        for (strategy, email) in [("first_added", "first@x.io"), ("last_added", "last@x.io")] {
            let s = settings(json!({"kind": "webhook", "url": "http://x",
                "id_sync": {"strategy": strategy, "types": ["user_id", "email"]}}));
            let calls = change_calls("sp", "d", &s, "p", &ids, &audience_change(&f));
            assert_eq!(calls.len(), 2, "{strategy}");
            assert_eq!(calls[0]["type"], "identify");
            assert_eq!(calls[0]["traits"], json!({"vip": false, "email": email}));
            assert_eq!(calls[0]["userId"], "u1");
            assert!(calls[0].get("anonymousId").is_none(), "not a listed type");
            assert_eq!(calls[1]["event"], "Audience Exited");
            assert_eq!(calls[1]["context"]["traits"]["email"], email);
        }
        // No identifier of the listed types: nothing to send.
        let s = settings(
            json!({"kind": "webhook", "url": "http://x", "id_sync": {"types": ["phone"]}}),
        );
        assert!(change_calls("sp", "d", &s, "p", &ids, &audience_change(&f)).is_empty());
        // An unselected key: nothing.
        let s = settings(json!({"kind": "webhook", "url": "http://x", "keys": ["other"]}));
        assert!(change_calls("sp", "d", &s, "p", &ids, &audience_change(&f)).is_empty());
    }

    #[test]
    fn traits_become_identify_and_trait_computed() {
        let s = settings(json!({"kind": "segment", "host": "http://x", "write_key": "k"}));
        let v = json!(42.5);
        let change = ChangeEntry {
            seq: None,
            key: "ltv",
            class: Class::ComputedTrait,
            new: &v,
            at: "2026-11-29T10:00:00.000Z",
        };
        let calls = change_calls("sp", "d", &s, "p", &[entry("user_id", "u", 1)], &change);
        assert_eq!(calls[0]["traits"]["ltv"], 42.5);
        assert_eq!(calls[1]["event"], "Trait Computed");
        assert_eq!(
            calls[1]["properties"],
            json!({"trait_key": "ltv", "ltv": 42.5})
        );
        assert!(worth_initial_sync(Class::ComputedTrait, &v));
        assert!(!worth_initial_sync(Class::Audience, &json!(false)));
    }

    #[test]
    fn alias_names_the_merged_away_and_the_surviving_user() {
        let child = [entry("anonymous_id", "anon", 1)];
        let parent = [entry("user_id", "u1", 0), entry("anonymous_id", "anon", 1)];
        let a = alias_call("sp", "d", 3, &child, &parent, "t").unwrap();
        assert_eq!(a["previousId"], "anon");
        assert_eq!(a["userId"], "u1");
        assert_eq!(a, alias_call("sp", "d", 3, &child, &parent, "t").unwrap());
        let child = [entry("user_id", "old", 1), entry("anonymous_id", "anon", 1)];
        assert_eq!(
            alias_call("sp", "d", 3, &child, &parent, "t").unwrap()["previousId"],
            "old"
        );
        assert!(alias_call("sp", "d", 3, &[entry("email", "e@x", 1)], &parent, "t").is_none());
        // Merged into an anonymous profile: its anonymous id becomes the user.
        let anon_parent = [entry("anonymous_id", "a0", 0), entry("user_id", "u7", 2)];
        let a = alias_call(
            "sp",
            "d",
            4,
            &[entry("user_id", "u7", 2)],
            &anon_parent,
            "t",
        )
        .unwrap();
        assert_eq!(
            (a["previousId"].as_str(), a["userId"].as_str()),
            (Some("a0"), Some("u7"))
        );
        // Nobody has a user id: nothing to alias to.
        assert!(alias_call(
            "sp",
            "d",
            5,
            &[entry("anonymous_id", "a1", 1)],
            &[entry("anonymous_id", "a0", 0)],
            "t"
        )
        .is_none());
    }

    #[test]
    fn a_stored_secret_does_not_follow_a_new_kind_or_segment_host() {
        let hook = settings(json!({"kind": "webhook", "url": "http://a"}));
        let seg = settings(json!({"kind": "segment", "host": "http://a", "write_key": "k"}));
        let other_host =
            settings(json!({"kind": "segment", "host": "http://evil", "write_key": "k"}));
        let other_url = settings(json!({"kind": "webhook", "url": "http://b"}));
        assert_eq!(seg.secret_needed_after(&hook).unwrap().field, "write_key");
        assert_eq!(hook.secret_needed_after(&seg).unwrap().field, "secret");
        assert!(other_host.secret_needed_after(&seg).is_some());
        assert!(seg.secret_needed_after(&seg).is_none());
        // A webhook secret only signs: a new URL may keep it.
        assert!(other_url.secret_needed_after(&hook).is_none());
    }

    #[test]
    fn a_replace_resyncs_only_what_it_adds() {
        let some =
            |keys: &[&str]| settings(json!({"kind": "webhook", "url": "http://a", "keys": keys}));
        let all = settings(json!({"kind": "webhook", "url": "http://a"}));
        assert_eq!(
            some(&["a", "b"]).resync_keys(&some(&["a"])),
            Some(Some(BTreeSet::from(["b".to_string()])))
        );
        assert_eq!(some(&["a"]).resync_keys(&some(&["a", "b"])), None);
        assert_eq!(all.resync_keys(&some(&["a"])), Some(None));
        assert_eq!(some(&["a"]).resync_keys(&all), None);
        let off = settings(json!({"kind": "webhook", "url": "http://a", "enabled": false}));
        assert_eq!(all.resync_keys(&off), Some(None));
        // A pass still pending keeps its keys and gains the added ones.
        let b = BTreeSet::from(["b".to_string()]);
        let c = BTreeSet::from(["c".to_string()]);
        let bc = BTreeSet::from(["b".to_string(), "c".to_string()]);
        let abc = some(&["a", "b", "c"]);
        assert_eq!(
            abc.pending_after(&some(&["a", "b"]), true, Some(b.clone())),
            (true, Some(bc))
        );
        assert_eq!(
            abc.pending_after(&some(&["a", "b"]), false, None),
            (true, Some(c))
        );
        assert_eq!(
            abc.pending_after(&abc, true, Some(b.clone())),
            (true, Some(b))
        );
        assert_eq!(abc.pending_after(&abc, false, None), (false, None));
        assert_eq!(
            abc.pending_after(&some(&["a", "b"]), true, None),
            (true, None)
        );
    }

    #[test]
    fn signatures_are_hmac_sha256_of_the_timestamp_and_body() {
        // HMAC-SHA256 of "1700000000." + the body, as Python's hmac computes it.
        let sig = sign("Jefe", 1_700_000_000, b"what do ya want for nothing?");
        assert_eq!(
            sig,
            "sha256=1cdd0650c8be1cb0974b1788d458b1e781206cfef59b85faafc582d2e182c57e"
        );
        let body = b"what do ya want for nothing?";
        let ok = |ts: &str, sig: &str, body: &[u8], now: i64| {
            verify_signature("Jefe", ts, sig, body, now, SIGNATURE_TOLERANCE_SECS)
        };
        assert!(ok("1700000000", &sig, body, 1_700_000_100));
        // Replayed ten minutes later: refused.
        assert!(!ok("1700000000", &sig, body, 1_700_000_600));
        // A fresh timestamp on an old signature: refused.
        assert!(!ok("1700000500", &sig, body, 1_700_000_500));
        assert!(!ok(
            "1700000000",
            &sig,
            b"what do ya want for something?",
            1_700_000_000
        ));
        assert!(!ok("1700000000", "sha256=zz", body, 1_700_000_000));
        assert!(!ok("soon", &sig, body, 1_700_000_000));
        assert!(!verify_signature(
            "other",
            "1700000000",
            &sig,
            body,
            1_700_000_000,
            300
        ));
    }

    #[test]
    fn internal_addresses_are_recognised() {
        for ip in [
            "127.0.0.1",
            "127.1.2.3",
            "10.0.0.1",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "100.127.255.255",
            "0.0.0.0",
            "255.255.255.255",
            "224.0.0.1",
            "::1",
            "::",
            "fe80::1",
            "fc00::1",
            "fd12:3456::1",
            "ff02::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "64:ff9b::a00:1",
            "2002:7f00:1::",
            "::127.0.0.1",
            "64:ff9b:1::a00:1",
            "2001:0:4136:e378:8000:63bf:3fff:fdd2",
        ] {
            assert!(is_internal(ip.parse().unwrap()), "{ip}");
        }
        for ip in [
            "8.8.8.8",
            "1.1.1.1",
            "100.128.0.1",
            "172.32.0.1",
            "2606:4700::1111",
            "::ffff:8.8.8.8",
        ] {
            assert!(!is_internal(ip.parse().unwrap()), "{ip}");
        }
    }

    #[test]
    fn reach_refuses_internal_literals_localhost_and_clear_segment_keys() {
        let refused = [
            json!({"kind": "webhook", "url": "http://127.0.0.1:9000/hook"}),
            json!({"kind": "webhook", "url": "http://169.254.169.254/latest/meta-data"}),
            json!({"kind": "webhook", "url": "http://10.0.0.1/"}),
            json!({"kind": "webhook", "url": "http://[::1]:8080/"}),
            // Other spellings of 127.0.0.1 that URL parsers accept.
            json!({"kind": "webhook", "url": "http://2130706433/"}),
            json!({"kind": "webhook", "url": "http://0x7f.1/"}),
            json!({"kind": "webhook", "url": "http://localhost:3000/"}),
            json!({"kind": "webhook", "url": "http://api.LOCALHOST./"}),
            json!({"kind": "segment", "host": "http://api.example.com", "write_key": "k"}),
        ];
        for body in refused {
            let s = settings(body.clone());
            assert!(s.check_reach(false).is_err(), "{body}");
            assert!(s.check_reach(true).is_ok(), "{body}");
        }
        for body in [
            json!({"kind": "webhook", "url": "http://hooks.example.com/x"}),
            json!({"kind": "webhook", "url": "https://8.8.8.8/x"}),
            json!({"kind": "segment", "host": "https://api.segment.io", "write_key": "k"}),
        ] {
            assert!(settings(body.clone()).check_reach(false).is_ok(), "{body}");
        }
        // Credentials in the URL are refused outright (they hide the host).
        let err =
            Settings::parse(&json!({"kind": "webhook", "url": "http://x@127.0.0.1/"})).unwrap_err();
        assert_eq!(err.field, "url");
    }

    #[test]
    fn retries_back_off_exponentially_with_jitter_and_honour_retry_after() {
        assert_eq!(outcome(204, None), Outcome::Delivered);
        assert_eq!(
            outcome(429, Some(2000)),
            Outcome::Retry {
                retry_after: Some(2000)
            }
        );
        assert_eq!(outcome(503, None), Outcome::Retry { retry_after: None });
        assert_eq!(outcome(400, None), Outcome::Rejected);
        assert_eq!(
            outcome(301, None),
            Outcome::Rejected,
            "a redirect is not a delivery"
        );
        assert_eq!(retry_delay(1, 100, 10_000, 0.0, None), 50);
        assert_eq!(retry_delay(1, 100, 10_000, 0.999_999, None), 99);
        assert_eq!(retry_delay(4, 100, 10_000, 0.0, None), 400);
        assert_eq!(retry_delay(30, 100, 10_000, 0.0, None), 5_000);
        assert_eq!(retry_delay(1, 100, 10_000, 0.0, Some(3_000)), 3_000);
        assert_eq!(parse_retry_after(" 2 ", 0), Some(2_000));
        let now = chrono::DateTime::parse_from_rfc2822("Sun, 29 Nov 2026 10:00:00 GMT")
            .unwrap()
            .timestamp_millis();
        assert_eq!(
            parse_retry_after("Sun, 29 Nov 2026 10:00:05 GMT", now),
            Some(5_000)
        );
        assert_eq!(parse_retry_after("soon", now), None);
    }
}
