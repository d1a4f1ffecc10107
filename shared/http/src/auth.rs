//! HTTP Basic credentials: the token is the user name, the password empty.

use axum::http::HeaderMap;
use base64::Engine;

/// The user name of an `Authorization: Basic` header, if there is one.
pub fn basic_user(headers: &HeaderMap) -> Option<String> {
    let value = headers
        .get(axum::http::header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    let (scheme, encoded) = value.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let decoded = String::from_utf8(decoded).ok()?;
    let user = decoded.split_once(':').map_or(decoded.as_str(), |(u, _)| u);
    (!user.is_empty()).then(|| user.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_user_name_of_basic_auth() {
        let mut h = HeaderMap::new();
        h.insert("authorization", "Basic d2tfYWJjOg==".parse().unwrap()); // "wk_abc:"
        assert_eq!(basic_user(&h).as_deref(), Some("wk_abc"));
        h.insert("authorization", "Bearer x".parse().unwrap());
        assert_eq!(basic_user(&h), None);
        h.insert("authorization", "Basic !!!".parse().unwrap());
        assert_eq!(basic_user(&h), None);
    }
}
