//! The Profile API's query parameters and cursor, read as Segment
//! documents them: a bad parameter is a `validation_error` that names it,
//! and a list's cursor always carries `next` (`""` at the end).

use std::collections::HashMap;

use axum::http::{StatusCode, Uri};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use kindred_domain::event::parse_time;
use serde_json::{json, Value};

use crate::error::ApiError;

pub(crate) type Params = HashMap<String, String>;

/// A bad query parameter, named (Segment's `validation_error`).
pub(crate) fn invalid(name: &str, message: &str) -> ApiError {
    ApiError::new(
        StatusCode::BAD_REQUEST,
        "validation_error",
        format!("The parameter `{name}` {message}"),
    )
}

/// The largest `limit` of each list: 200 traits, 100 of anything else.
pub(crate) const MAX_TRAITS: usize = 200;
pub(crate) const MAX_ITEMS: usize = 100;

/// `limit`, 10 unless given, at most `max`.
pub(crate) fn limit(params: &Params, max: usize) -> Result<usize, ApiError> {
    match params.get("limit") {
        None => Ok(10),
        Some(l) => l
            .parse::<usize>()
            .ok()
            .filter(|l| (1..=max).contains(l))
            .ok_or_else(|| invalid("limit", &format!("must be a whole number from 1 to {max}"))),
    }
}

/// A comma-separated list (`include`, `exclude`).
pub(crate) fn list(params: &Params, name: &str) -> Vec<String> {
    params
        .get(name)
        .map(|v| {
            v.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

/// A `true`/`false` flag (`verbose`); present without a value is true.
pub(crate) fn flag(params: &Params, name: &str) -> Result<bool, ApiError> {
    match params.get(name).map(String::as_str) {
        None | Some("false") => Ok(false),
        Some("true") | Some("") => Ok(true),
        Some(_) => Err(invalid(name, "must be true or false")),
    }
}

/// An ISO-8601 time (`start`, `end`); a bare date is its midnight UTC.
pub(crate) fn time(params: &Params, name: &str) -> Result<Option<i64>, ApiError> {
    params
        .get(name)
        .map(|v| {
            parse_time(v)
                .or_else(|| parse_time(&format!("{v}T00:00:00Z")))
                .ok_or_else(|| invalid(name, "must be an ISO-8601 date or date-time"))
        })
        .transpose()
}

/// The cursor of a list: `next` is `""` when there is nothing more.
pub(crate) fn cursor(uri: &Uri, has_more: bool, next: Option<String>, limit: usize) -> Value {
    let next = if has_more {
        next.unwrap_or_default()
    } else {
        String::new()
    };
    json!({"url": uri.to_string(), "has_more": has_more, "next": next, "limit": limit})
}

/// An opaque cursor: the position, base64 so that callers do not build
/// their own.
pub(crate) fn encode_next(position: &str) -> String {
    URL_SAFE_NO_PAD.encode(position)
}

/// The position in a cursor of [`encode_next`], or a `validation_error`.
pub(crate) fn decode_next(params: &Params) -> Result<Option<String>, ApiError> {
    let bad = || invalid("next", "must be the cursor of a previous response");
    params
        .get("next")
        .filter(|n| !n.is_empty())
        .map(|n| {
            let bytes = URL_SAFE_NO_PAD.decode(n).map_err(|_| bad())?;
            String::from_utf8(bytes).map_err(|_| bad())
        })
        .transpose()
}

/// One page of `items` after the cursor's offset.
pub(crate) fn page<T>(
    items: Vec<T>,
    params: &Params,
    uri: &Uri,
    max: usize,
) -> Result<(Vec<T>, Value), ApiError> {
    let limit = limit(params, max)?;
    let start = match decode_next(params)? {
        None => 0,
        Some(n) => n
            .parse()
            .map_err(|_| invalid("next", "must be the cursor of a previous response"))?,
    };
    let total = items.len();
    let page: Vec<T> = items.into_iter().skip(start).take(limit).collect();
    let end = start + page.len();
    let next = encode_next(&end.to_string());
    Ok((page, cursor(uri, end < total, Some(next), limit)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(pairs: &[(&str, &str)]) -> Params {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn limits_follow_each_list() {
        assert_eq!(limit(&params(&[]), MAX_ITEMS), Ok(10));
        assert_eq!(limit(&params(&[("limit", "200")]), MAX_TRAITS), Ok(200));
        let e = limit(&params(&[("limit", "101")]), MAX_ITEMS).unwrap_err();
        assert_eq!(
            (e.code, e.status),
            ("validation_error", StatusCode::BAD_REQUEST)
        );
        assert!(e.message.contains("`limit`") && e.message.contains("1 to 100"));
    }

    #[test]
    fn cursors_round_trip_and_end_with_an_empty_next() {
        let uri: Uri = "/x".parse().unwrap();
        let (items, c) = page(vec![1, 2, 3], &params(&[("limit", "2")]), &uri, 100).unwrap();
        assert_eq!(items, [1, 2]);
        let next = c["next"].as_str().unwrap().to_string();
        let (items, c) = page(vec![1, 2, 3], &params(&[("next", &next)]), &uri, 100).unwrap();
        assert_eq!(
            (items, &c["next"], &c["has_more"]),
            (vec![3], &json!(""), &json!(false))
        );
        assert!(page(vec![1], &params(&[("next", "%%")]), &uri, 100).is_err());
    }

    #[test]
    fn a_date_is_its_midnight() {
        let p = params(&[("start", "2018-01-02")]);
        assert_eq!(
            time(&p, "start").unwrap(),
            parse_time("2018-01-02T00:00:00Z")
        );
        assert!(time(&params(&[("end", "soon")]), "end").is_err());
    }
}
