//! Which web pages may send a space's events from a browser: the space's
//! `allowed_origins` (empty: any page, as Segment does). An entry is an
//! origin, `scheme://host[:port]`, or a pattern for every subdomain,
//! `scheme://*.example.com[:port]` (the apex is listed separately).
//!
//! Browsers send `Origin` and enforce CORS; other clients can send any
//! `Origin` they like, so this keeps a write key copied from one site off
//! other sites' pages, not off servers (the write key is public either way).

/// Most origins a space may list.
pub const MAX_ALLOWED_ORIGINS: usize = 100;
/// Longest origin or pattern, in bytes (a host name is at most 253).
pub const MAX_ORIGIN_BYTES: usize = 300;

/// Why an origin entry cannot be used.
pub fn check_pattern(pattern: &str) -> Result<(), &'static str> {
    if pattern.len() > MAX_ORIGIN_BYTES {
        return Err("an origin is at most 300 bytes");
    }
    if pattern != pattern.to_ascii_lowercase() {
        return Err("an origin is lowercase");
    }
    let Some((scheme, rest)) = pattern.split_once("://") else {
        return Err("an origin is scheme://host[:port], like https://www.example.com");
    };
    let scheme_ok = scheme.starts_with(|c: char| c.is_ascii_lowercase())
        && scheme
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "+.-".contains(c));
    if !scheme_ok {
        return Err("the scheme of an origin is letters, like https");
    }
    let host = rest.strip_prefix("*.").unwrap_or(rest);
    let (host, port) = match host.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => (h, Some(p)),
        _ => (host, None),
    };
    if let Some(port) = port {
        if port.parse::<u16>().is_err() {
            return Err("the port of an origin is a number up to 65535");
        }
    }
    let host_ok = !host.is_empty()
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-.[]:".contains(c));
    if !host_ok {
        return Err("an origin has no path, query, credentials or wildcard but a leading *.");
    }
    Ok(())
}

/// Whether a page at `origin` (the request's `Origin` header) may send
/// events to a space allowing `allowed` (already checked patterns).
pub fn allows(allowed: &[String], origin: &str) -> bool {
    if allowed.is_empty() {
        return true;
    }
    let origin = origin.trim().to_ascii_lowercase();
    allowed.iter().any(|pattern| matches(pattern, &origin))
}

fn matches(pattern: &str, origin: &str) -> bool {
    let Some((scheme, rest)) = pattern.split_once("://") else {
        return false;
    };
    let Some(suffix) = rest.strip_prefix("*.") else {
        return pattern == origin;
    };
    // `https://*.example.com:8443` matches `https://a.b.example.com:8443`:
    // same scheme, then at least one label, then `.example.com:8443`.
    let Some(host) = origin
        .strip_prefix(scheme)
        .and_then(|o| o.strip_prefix("://"))
    else {
        return false;
    };
    host.len() > suffix.len() + 1
        && host.ends_with(suffix)
        && host.as_bytes()[host.len() - suffix.len() - 1] == b'.'
        && !host[..host.len() - suffix.len() - 1].contains([':', '/', '@'])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn an_empty_list_allows_every_page() {
        assert!(allows(&[], "https://anything.example"));
    }

    #[test]
    fn exact_origins_match_exactly_ignoring_case() {
        let allowed = list(&["https://shop.example.com", "http://localhost:3000"]);
        assert!(allows(&allowed, "https://shop.example.com"));
        assert!(allows(&allowed, "HTTPS://Shop.Example.com"));
        assert!(allows(&allowed, "http://localhost:3000"));
        assert!(!allows(&allowed, "http://shop.example.com"));
        assert!(!allows(&allowed, "https://shop.example.com:8443"));
        assert!(!allows(&allowed, "https://shop.example.com.evil.test"));
        assert!(!allows(&allowed, "http://localhost:30000"));
        assert!(!allows(&allowed, "null"));
    }

    #[test]
    fn a_wildcard_matches_subdomains_only_with_the_same_scheme_and_port() {
        let allowed = list(&["https://*.example.com"]);
        assert!(allows(&allowed, "https://www.example.com"));
        assert!(allows(&allowed, "https://a.b.example.com"));
        assert!(!allows(&allowed, "https://example.com"));
        assert!(!allows(&allowed, "https://evilexample.com"));
        assert!(!allows(&allowed, "http://www.example.com"));
        assert!(!allows(&allowed, "https://www.example.com:8443"));
        assert!(!allows(&allowed, "https://x:y@a.example.com"));
        let with_port = list(&["https://*.example.com:8443"]);
        assert!(allows(&with_port, "https://www.example.com:8443"));
        assert!(!allows(&with_port, "https://www.example.com"));
    }

    #[test]
    fn patterns_are_checked() {
        for good in [
            "https://www.example.com",
            "http://localhost:3000",
            "https://*.example.com",
            "http://[::1]:8080",
            "chrome-extension://abcdefghijklmnop",
        ] {
            assert_eq!(check_pattern(good), Ok(()), "{good}");
        }
        for bad in [
            "www.example.com",
            "https://www.example.com/",
            "https://www.example.com/path",
            "https://user@example.com",
            "https://Example.com",
            "https://*",
            "https://a.*.example.com",
            "https://example.com:99999",
            "*://example.com",
            "https://",
        ] {
            assert!(check_pattern(bad).is_err(), "{bad}");
        }
        assert!(check_pattern(&format!("https://{}.com", "a".repeat(300))).is_err());
    }
}
