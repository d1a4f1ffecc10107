//! The `where` and trait-condition operators (SPEC 7, 10) over JSON values.
//!
//! A missing (or `null`) value satisfies only `not_exists`. Numbers compare
//! numerically, numeric strings included; strings compare as written.

use serde_json::{Map, Value};

use super::definition::{Op, Test};
use super::state::number;
use crate::event::parse_time;
use crate::Millis;

/// A property of an event: `a.b` walks into objects unless a property is
/// literally named `a.b`.
pub(crate) fn property<'a>(props: Option<&'a Map<String, Value>>, path: &str) -> Option<&'a Value> {
    let props = props?;
    if let Some(v) = props.get(path) {
        return Some(v);
    }
    let mut parts = path.split('.');
    let mut v = props.get(parts.next()?)?;
    for p in parts {
        v = v.as_object()?.get(p)?;
    }
    Some(v)
}

fn equal(a: &Value, b: &Value) -> bool {
    match (number(a), number(b)) {
        (Some(x), Some(y)) if a.is_number() || b.is_number() => x == y,
        _ => a == b,
    }
}

fn instant(v: &Value) -> Option<i64> {
    match v {
        Value::String(s) => parse_time(s),
        // Epoch milliseconds.
        Value::Number(n) => n.as_i64(),
        _ => None,
    }
}

/// [`test`] at the evaluation time `now`, for the relative operators.
pub(crate) fn test_at(t: &Test, actual: Option<&Value>, now: Millis) -> bool {
    let (Some(span), true) = (t.span, t.op.is_relative()) else {
        return test(t, actual);
    };
    let Some(date) = actual.and_then(instant) else {
        return false;
    };
    match t.op {
        Op::WithinLast => now.saturating_sub(span) <= date && date <= now,
        Op::WithinNext => now <= date && date <= now.saturating_add(span),
        Op::BeforeLast => date < now.saturating_sub(span),
        _ => date > now.saturating_add(span),
    }
}

/// The moments after which [`test_at`] of a relative operator may answer
/// differently for `actual`: the date, and the date a span away on
/// either side (each boundary and the millisecond after it).
pub(crate) fn relative_moments(t: &Test, actual: Option<&Value>, out: &mut Vec<Millis>) {
    let (Some(span), true, Some(date)) = (t.span, t.op.is_relative(), actual.and_then(instant))
    else {
        return;
    };
    for edge in [date.saturating_sub(span), date, date.saturating_add(span)] {
        out.extend([edge, edge.saturating_add(1)]);
    }
}

pub(crate) fn test(t: &Test, actual: Option<&Value>) -> bool {
    let actual = actual.filter(|v| !v.is_null());
    let Some(a) = actual else {
        return t.op == Op::NotExists;
    };
    let e = &t.value;
    match t.op {
        Op::Exists => true,
        Op::NotExists => false,
        Op::Eq => equal(a, e),
        Op::Ne => !equal(a, e),
        Op::Lt | Op::Le | Op::Gt | Op::Ge => match (number(a), number(e)) {
            (Some(x), Some(y)) => match t.op {
                Op::Lt => x < y,
                Op::Le => x <= y,
                Op::Gt => x > y,
                _ => x >= y,
            },
            _ => false,
        },
        Op::Contains | Op::NotContains => {
            let found = match (a, e.as_str()) {
                (Value::String(s), Some(needle)) => s.contains(needle),
                (Value::Array(items), _) => items.iter().any(|i| equal(i, e)),
                _ => false,
            };
            found == (t.op == Op::Contains)
        }
        Op::StartsWith => {
            matches!((a, e.as_str()), (Value::String(s), Some(p)) if s.starts_with(p))
        }
        Op::EndsWith => matches!((a, e.as_str()), (Value::String(s), Some(p)) if s.ends_with(p)),
        Op::Before | Op::After => match (instant(a), t.instant) {
            (Some(x), Some(y)) => {
                if t.op == Op::Before {
                    x < y
                } else {
                    x > y
                }
            }
            _ => false,
        },
        Op::In => e
            .as_array()
            .is_some_and(|opts| opts.iter().any(|o| equal(a, o))),
        Op::ContainsAny => {
            let opts = e.as_array().map(Vec::as_slice).unwrap_or_default();
            match a {
                Value::String(s) => opts
                    .iter()
                    .any(|o| o.as_str().is_some_and(|needle| s.contains(needle))),
                Value::Array(items) => items.iter().any(|i| opts.iter().any(|o| equal(i, o))),
                _ => false,
            }
        }
        // Relative to a moment: [`test_at`].
        Op::WithinLast | Op::WithinNext | Op::BeforeLast | Op::AfterNext => false,
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn t(op: &str, value: Value) -> Test {
        Test {
            op: Op::parse(op).unwrap(),
            instant: value.as_str().and_then(parse_time),
            span: None,
            value,
        }
    }

    #[test]
    fn every_operator() {
        let cases: Vec<(&str, Value, Value, bool)> = vec![
            ("=", json!(100), json!(100.0), true),
            ("=", json!("100"), json!(100), true),
            ("=", json!("a"), json!("a"), true),
            ("=", json!("a"), json!("b"), false),
            ("!=", json!("a"), json!("b"), true),
            ("!=", json!(1), json!(1), false),
            ("<", json!(1), json!(2), true),
            ("<", json!(2), json!(2), false),
            ("<=", json!(2), json!(2), true),
            (">", json!(3), json!(2), true),
            (">", json!("x"), json!(2), false),
            (">=", json!("2"), json!(2), true),
            ("contains", json!("shoes and socks"), json!("socks"), true),
            ("contains", json!(["a", "b"]), json!("b"), true),
            ("contains", json!("shoes"), json!("hat"), false),
            ("not_contains", json!("shoes"), json!("hat"), true),
            ("not_contains", json!("a hat"), json!("hat"), false),
            ("starts_with", json!("/docs/a"), json!("/docs"), true),
            ("starts_with", json!("/blog"), json!("/docs"), false),
            ("ends_with", json!("a.pdf"), json!(".pdf"), true),
            ("ends_with", json!("a.doc"), json!(".pdf"), false),
            ("exists", json!(0), Value::Null, true),
            ("not_exists", json!(0), Value::Null, false),
            (
                "before",
                json!("2026-01-01T00:00:00Z"),
                json!("2026-02-01T00:00:00Z"),
                true,
            ),
            (
                "before",
                json!("2026-03-01T00:00:00Z"),
                json!("2026-02-01T00:00:00Z"),
                false,
            ),
            (
                "after",
                json!("2026-03-01T00:00:00Z"),
                json!("2026-02-01T00:00:00Z"),
                true,
            ),
            (
                "after",
                json!("not a date"),
                json!("2026-02-01T00:00:00Z"),
                false,
            ),
            ("in", json!("b"), json!(["a", "b"]), true),
            ("in", json!(2), json!([1, 2]), true),
            ("in", json!("c"), json!(["a", "b"]), false),
            (
                "contains_any",
                json!("red shoes"),
                json!(["blue", "red"]),
                true,
            ),
            ("contains_any", json!(["x", "y"]), json!(["y", "z"]), true),
            (
                "contains_any",
                json!("green"),
                json!(["blue", "red"]),
                false,
            ),
        ];
        for (op, actual, expected, want) in cases {
            assert_eq!(
                test(&t(op, expected.clone()), Some(&actual)),
                want,
                "{actual} {op} {expected}"
            );
        }
    }

    #[test]
    fn a_missing_value_only_satisfies_not_exists() {
        for (op, _) in Op::ALL {
            let want = op == "not_exists";
            assert_eq!(test(&t(op, json!(["a"])), None), want, "{op}");
            assert_eq!(test(&t(op, json!(["a"])), Some(&Value::Null)), want, "{op}");
        }
    }

    #[test]
    fn nested_properties() {
        let props = json!({"product": {"price": 5}, "a.b": 1});
        let props = props.as_object();
        assert_eq!(property(props, "product.price"), Some(&json!(5)));
        assert_eq!(property(props, "a.b"), Some(&json!(1)));
        assert_eq!(property(props, "product.none"), None);
    }
}
