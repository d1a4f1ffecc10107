//! Delivering a request of calls: the webhook signature, how a
//! response is read, and the retry schedule.

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::Millis;

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
