//! The definitions of computed traits and audiences (SPEC 7, 8, 10): their
//! JSON form, validated on parse with errors that name the bad field.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{Map, Value};

use crate::event::parse_time;
use crate::Millis;

pub const HOUR_MS: Millis = 3_600_000;
/// Most expressions (conditions, counting every nested one) in an audience.
pub const MAX_EXPRESSIONS: usize = 50;
/// Most `where` filters on one event.
pub const MAX_WHERE_FILTERS: usize = 20;
/// Most computed traits and audiences (together) in one space.
pub const MAX_DEFINITIONS: usize = 200;
/// Longest lookback accepted: ten years.
const MAX_WINDOW_HOURS: i64 = 10 * 366 * 24;

/// A definition that does not validate: `field` is a path into the JSON
/// body (`condition.and[1].performed.count`).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct DefinitionError {
    pub field: String,
    pub message: String,
}

fn err<T>(field: &str, message: impl Into<String>) -> Result<T, DefinitionError> {
    Err(DefinitionError {
        field: field.to_string(),
        message: message.into(),
    })
}

/// Which kind of computation a key names; also the Profile API's `class`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Class {
    ComputedTrait,
    Audience,
}

impl Class {
    pub fn as_str(self) -> &'static str {
        match self {
            Class::ComputedTrait => "computed_trait",
            Class::Audience => "audience",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "computed_trait" => Some(Class::ComputedTrait),
            "audience" => Some(Class::Audience),
            _ => None,
        }
    }

    /// The class as Segment's outbound payloads name it
    /// (`context.personas.computation_class`): `trait` or `audience`.
    pub fn segment_name(self) -> &'static str {
        match self {
            Class::ComputedTrait => "trait",
            Class::Audience => "audience",
        }
    }
}

/// Which profiles a definition computes over: users (the default) or
/// accounts (Segment's account-level computed traits and audiences).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Collection {
    #[default]
    Users,
    Accounts,
}

impl Collection {
    pub fn as_str(self) -> &'static str {
        match self {
            Collection::Users => "users",
            Collection::Accounts => "accounts",
        }
    }

    /// The collection a definition's JSON body names (`users` when it
    /// names none); `None` when it names another.
    pub fn of_body(body: &Value) -> Option<Collection> {
        match body.get("collection") {
            None => Some(Collection::Users),
            Some(Value::String(c)) if c == "users" => Some(Collection::Users),
            Some(Value::String(c)) if c == "accounts" => Some(Collection::Accounts),
            Some(_) => None,
        }
    }
}

/// How many of an account's users a `users` condition asks to match.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Quantifier {
    /// At least one user matches (an account without users does not).
    Any,
    /// Every user matches, and there is at least one.
    All,
    /// No user matches (true for an account without users).
    None,
}

/// The stable id of a space's computed trait or audience, `tra_…` or
/// `aud_…` as Segment's: derived from the space, class and key (so both
/// stores and every function agree without storing it, and a key that is
/// deleted and defined again keeps its id).
pub fn computation_id(space_id: &str, class: Class, key: &str) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for part in [space_id, class.as_str(), key] {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part.as_bytes());
    }
    let digest = h.finalize();
    let hex: String = digest[..12].iter().map(|b| format!("{b:02x}")).collect();
    let prefix = match class {
        Class::ComputedTrait => "tra",
        Class::Audience => "aud",
    };
    format!("{prefix}_{hex}")
}

/// A lookback window, whole hours (SPEC 9: 90 days = the last 2,160 hours).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    pub hours: i64,
}

impl Window {
    pub fn millis(self) -> Millis {
        self.hours * HOUR_MS
    }
}

/// The `where` operators of SPEC 10.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
    Contains,
    NotContains,
    StartsWith,
    EndsWith,
    Exists,
    NotExists,
    Before,
    After,
    In,
    ContainsAny,
    /// A date within the last `span` (`now - span <= date <= now`).
    WithinLast,
    /// A date within the next `span` (`now <= date <= now + span`).
    WithinNext,
    /// A date before the last `span` (`date < now - span`).
    BeforeLast,
    /// A date after the next `span` (`date > now + span`).
    AfterNext,
}

impl Op {
    pub const ALL: [(&'static str, Op); 20] = [
        ("=", Op::Eq),
        ("!=", Op::Ne),
        ("<", Op::Lt),
        ("<=", Op::Le),
        (">", Op::Gt),
        (">=", Op::Ge),
        ("contains", Op::Contains),
        ("not_contains", Op::NotContains),
        ("starts_with", Op::StartsWith),
        ("ends_with", Op::EndsWith),
        ("exists", Op::Exists),
        ("not_exists", Op::NotExists),
        ("before", Op::Before),
        ("after", Op::After),
        ("in", Op::In),
        ("contains_any", Op::ContainsAny),
        ("within_last", Op::WithinLast),
        ("within_next", Op::WithinNext),
        ("before_last", Op::BeforeLast),
        ("after_next", Op::AfterNext),
    ];

    /// Whether the operator compares a date with the evaluation time
    /// (Segment's relative date conditions on traits).
    pub fn is_relative(self) -> bool {
        matches!(
            self,
            Op::WithinLast | Op::WithinNext | Op::BeforeLast | Op::AfterNext
        )
    }

    pub fn parse(s: &str) -> Option<Op> {
        Op::ALL.iter().find(|(n, _)| *n == s).map(|(_, op)| *op)
    }

    pub fn as_str(self) -> &'static str {
        Op::ALL
            .iter()
            .find(|(_, op)| *op == self)
            .map(|(n, _)| *n)
            .unwrap_or("?")
    }
}

/// `op` applied to a value, with the operand validated for the operator.
#[derive(Clone, Debug, PartialEq)]
pub struct Test {
    pub op: Op,
    pub value: Value,
    /// The operand of `before` / `after`, parsed once.
    pub instant: Option<Millis>,
    /// The span of a relative operator (`{"days": 30}`), in milliseconds.
    pub span: Option<Millis>,
}

/// One `where` entry: a property of the event and a test on it.
#[derive(Clone, Debug, PartialEq)]
pub struct Filter {
    pub property: String,
    pub test: Test,
}

/// Which events a computation looks at.
#[derive(Clone, Debug, PartialEq)]
pub struct EventMatch {
    pub event: String,
    pub filters: Vec<Filter>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Aggregate {
    Sum,
    Avg,
    Min,
    Max,
}

/// The computed trait types of SPEC 7.
#[derive(Clone, Debug, PartialEq)]
pub enum TraitKind {
    EventCounter,
    Aggregation(Aggregate, String),
    MostFrequent(String),
    First(String),
    Last(String),
    UniqueList(String),
    UniqueListCount(String),
}

#[derive(Clone, Debug, PartialEq)]
pub struct ComputedTrait {
    pub kind: TraitKind,
    pub matcher: EventMatch,
    /// `None`: all history.
    pub lookback: Option<Window>,
}

/// How many matching events a `performed` condition asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Count {
    AtLeast(u64),
    Exactly(u64),
    AtMost(u64),
}

impl Count {
    pub fn holds(self, n: u64) -> bool {
        match self {
            Count::AtLeast(k) => n >= k,
            Count::Exactly(k) => n == k,
            Count::AtMost(k) => n <= k,
        }
    }
}

/// Which events by time a condition counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Span {
    All,
    /// The last `hours` hours, to the hour.
    Within(Window),
    /// `[from, to)`, absolute.
    Between(Millis, Millis),
}

/// `then` / `then_not`: a child event within a window after each parent instance.
#[derive(Clone, Debug, PartialEq)]
pub struct Funnel {
    pub did: bool,
    pub matcher: EventMatch,
    pub within: Window,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Condition {
    /// Counts parent instances in the span (those completing the funnel,
    /// if there is one) and compares with `count`.
    Performed {
        matcher: EventMatch,
        count: Count,
        span: Span,
        funnel: Option<Funnel>,
    },
    NotPerformed {
        matcher: EventMatch,
        span: Span,
    },
    Trait {
        name: String,
        test: Test,
    },
    Audience(String),
    /// An account condition on its users: `of` is a user-level audience
    /// (its condition evaluated on each user, with that user's events,
    /// traits and computed values), `quantifier` how many must match.
    Users {
        quantifier: Quantifier,
        of: Box<Definition>,
    },
    And(Vec<Condition>),
    Or(Vec<Condition>),
    Not(Box<Condition>),
}

impl Condition {
    /// How many expressions this condition counts for the 50 limit.
    pub fn expressions(&self) -> usize {
        match self {
            Condition::And(cs) | Condition::Or(cs) => {
                1 + cs.iter().map(Condition::expressions).sum::<usize>()
            }
            Condition::Not(c) => 1 + c.expressions(),
            Condition::Users { of, .. } => match &of.body {
                Body::Audience(c) => 1 + c.expressions(),
                Body::Trait(_) => 1,
            },
            _ => 1,
        }
    }

    /// Keys of other definitions and traits this condition reads.
    pub fn references(&self, out: &mut BTreeSet<String>) {
        match self {
            Condition::Trait { name, .. } => {
                out.insert(name.clone());
            }
            Condition::Audience(key) => {
                out.insert(key.clone());
            }
            Condition::And(cs) | Condition::Or(cs) => cs.iter().for_each(|c| c.references(out)),
            Condition::Not(c) => c.references(out),
            _ => {}
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum Body {
    Trait(ComputedTrait),
    Audience(Condition),
}

/// One computed trait or audience of a space.
#[derive(Clone, Debug, PartialEq)]
pub struct Definition {
    pub key: String,
    /// Bumped on every replace; states of an older version are rebuilt.
    pub version: u64,
    pub body: Body,
    pub collection: Collection,
}

impl Definition {
    pub fn class(&self) -> Class {
        match self.body {
            Body::Trait(_) => Class::ComputedTrait,
            Body::Audience(_) => Class::Audience,
        }
    }

    /// Validates a definition's JSON body.
    pub fn parse(
        class: Class,
        key: &str,
        version: u64,
        json: &Value,
    ) -> Result<Definition, DefinitionError> {
        if !valid_key(key) {
            return err(
                "key",
                "must be 1-100 characters of letters, digits, '_', '-' or '.'",
            );
        }
        let Value::Object(obj) = json else {
            return err("body", "must be a JSON object");
        };
        let Some(collection) = Collection::of_body(json) else {
            return err("collection", "must be \"users\" or \"accounts\"");
        };
        let mut obj = obj.clone();
        obj.remove("collection");
        let obj = &obj;
        let body = match class {
            Class::ComputedTrait => Body::Trait(parse_trait(obj)?),
            Class::Audience => {
                check_fields(obj, "", &["condition", "description", "name"])?;
                let c = obj
                    .get("condition")
                    .map_or_else(|| err("condition", "is required"), Ok)?;
                let condition = parse_condition(c, "condition", collection)?;
                if condition.expressions() > MAX_EXPRESSIONS {
                    return err(
                        "condition",
                        format!("has more than {MAX_EXPRESSIONS} expressions"),
                    );
                }
                Body::Audience(condition)
            }
        };
        Ok(Definition {
            key: key.to_string(),
            version,
            body,
            collection,
        })
    }
}

/// A definition key: it becomes a trait name.
pub fn valid_key(key: &str) -> bool {
    !key.is_empty()
        && key.len() <= 100
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}

fn join(path: &str, field: &str) -> String {
    if path.is_empty() {
        field.to_string()
    } else {
        format!("{path}.{field}")
    }
}

fn check_fields(
    obj: &Map<String, Value>,
    path: &str,
    allowed: &[&str],
) -> Result<(), DefinitionError> {
    for k in obj.keys() {
        if !allowed.contains(&k.as_str()) {
            return err(&join(path, k), "is not a known field");
        }
    }
    Ok(())
}

fn string_field(
    obj: &Map<String, Value>,
    path: &str,
    field: &str,
) -> Result<String, DefinitionError> {
    match obj.get(field) {
        Some(Value::String(s)) if !s.is_empty() && s.len() <= 200 => Ok(s.clone()),
        Some(Value::String(_)) => err(&join(path, field), "must be 1-200 characters"),
        Some(_) => err(&join(path, field), "must be a string"),
        None => err(&join(path, field), "is required"),
    }
}

fn parse_trait(obj: &Map<String, Value>) -> Result<ComputedTrait, DefinitionError> {
    let ty = string_field(obj, "", "type")?;
    let property = || string_field(obj, "", "property");
    let (kind, fields): (TraitKind, &[&str]) = match ty.as_str() {
        "event_counter" => (TraitKind::EventCounter, &[]),
        "aggregation" => {
            let f = string_field(obj, "", "function")?;
            let agg = match f.as_str() {
                "sum" => Aggregate::Sum,
                "avg" => Aggregate::Avg,
                "min" => Aggregate::Min,
                "max" => Aggregate::Max,
                _ => return err("function", "must be one of sum, avg, min, max"),
            };
            (TraitKind::Aggregation(agg, property()?), &["function", "property"])
        }
        "most_frequent" => (TraitKind::MostFrequent(property()?), &["property"]),
        "first" => (TraitKind::First(property()?), &["property"]),
        "last" => (TraitKind::Last(property()?), &["property"]),
        "unique_list" => (TraitKind::UniqueList(property()?), &["property"]),
        "unique_list_count" => (TraitKind::UniqueListCount(property()?), &["property"]),
        _ => {
            return err(
                "type",
                "must be one of event_counter, aggregation, most_frequent, first, last, unique_list, unique_list_count",
            )
        }
    };
    let mut allowed = vec!["type", "event", "where", "lookback", "description", "name"];
    allowed.extend_from_slice(fields);
    check_fields(obj, "", &allowed)?;
    Ok(ComputedTrait {
        kind,
        matcher: parse_match(obj, "")?,
        lookback: obj
            .get("lookback")
            .map(|w| parse_window(w, "lookback"))
            .transpose()?,
    })
}

fn parse_match(obj: &Map<String, Value>, path: &str) -> Result<EventMatch, DefinitionError> {
    let event = string_field(obj, path, "event")?;
    let mut filters = Vec::new();
    match obj.get("where") {
        None => {}
        Some(Value::Array(items)) => {
            if items.len() > MAX_WHERE_FILTERS {
                return err(
                    &join(path, "where"),
                    format!("has more than {MAX_WHERE_FILTERS} filters"),
                );
            }
            for (i, item) in items.iter().enumerate() {
                let p = format!("{}[{i}]", join(path, "where"));
                let Value::Object(f) = item else {
                    return err(&p, "must be an object with property, op and value");
                };
                check_fields(f, &p, &["property", "op", "value"])?;
                let property = string_field(f, &p, "property")?;
                let test = parse_test(f, &p, false)?;
                filters.push(Filter { property, test });
            }
        }
        Some(_) => return err(&join(path, "where"), "must be an array"),
    }
    Ok(EventMatch { event, filters })
}

/// A test; `relative` allows the operators that compare with the
/// evaluation time (trait conditions only: an event's filters are
/// applied once, when it arrives).
fn parse_test(
    obj: &Map<String, Value>,
    path: &str,
    relative: bool,
) -> Result<Test, DefinitionError> {
    let op_name = string_field(obj, path, "op")?;
    let op = Op::parse(&op_name).map_or_else(
        || {
            err(
                &join(path, "op"),
                format!("must be one of {}", Op::ALL.map(|(n, _)| n).join(", ")),
            )
        },
        Ok,
    )?;
    if op.is_relative() && !relative {
        return err(
            &join(path, "op"),
            format!("{op_name} applies to trait conditions only"),
        );
    }
    let vpath = join(path, "value");
    let value = obj.get("value").cloned();
    let mut instant = None;
    let mut span = None;
    let value = match op {
        Op::Exists | Op::NotExists => value.unwrap_or(Value::Null),
        _ => {
            let Some(v) = value else {
                return err(&vpath, format!("is required for {op_name}"));
            };
            match op {
                Op::Lt | Op::Le | Op::Gt | Op::Ge if !v.is_number() => {
                    return err(&vpath, format!("must be a number for {op_name}"))
                }
                Op::Contains | Op::NotContains | Op::StartsWith | Op::EndsWith
                    if !v.is_string() =>
                {
                    return err(&vpath, format!("must be a string for {op_name}"))
                }
                Op::Before | Op::After => {
                    let t = v.as_str().and_then(parse_time);
                    if t.is_none() {
                        return err(&vpath, "must be an RFC 3339 date-time");
                    }
                    instant = t;
                }
                Op::WithinLast | Op::WithinNext | Op::BeforeLast | Op::AfterNext => {
                    span = Some(parse_window(&v, &vpath)?.millis());
                }
                Op::In | Op::ContainsAny => match &v {
                    Value::Array(a) if !a.is_empty() && a.len() <= 1000 => {}
                    _ => return err(&vpath, "must be a non-empty array of at most 1000 values"),
                },
                _ => {}
            }
            v
        }
    };
    Ok(Test {
        op,
        value,
        instant,
        span,
    })
}

fn parse_window(v: &Value, path: &str) -> Result<Window, DefinitionError> {
    let Value::Object(obj) = v else {
        return err(path, "must be {\"hours\": n} or {\"days\": n}");
    };
    let (unit, n) = match (obj.get("hours"), obj.get("days"), obj.len()) {
        (Some(h), None, 1) => ("hours", h),
        (None, Some(d), 1) => ("days", d),
        _ => return err(path, "must be {\"hours\": n} or {\"days\": n}"),
    };
    let field = join(path, unit);
    let Some(n) = n.as_i64().filter(|n| *n >= 1) else {
        return err(&field, "must be a positive whole number");
    };
    let hours = if unit == "days" {
        n.saturating_mul(24)
    } else {
        n
    };
    if hours > MAX_WINDOW_HOURS {
        return err(&field, "must be at most ten years");
    }
    Ok(Window { hours })
}

fn parse_count(v: &Value, path: &str) -> Result<Count, DefinitionError> {
    let Value::Object(obj) = v else {
        return err(
            path,
            "must be one of {\"at_least\": n}, {\"exactly\": n}, {\"at_most\": n}",
        );
    };
    let [(k, n)] = obj.iter().collect::<Vec<_>>()[..] else {
        return err(path, "must have exactly one of at_least, exactly, at_most");
    };
    let field = join(path, k);
    let Some(n) = n.as_u64() else {
        return err(&field, "must be a whole number >= 0");
    };
    Ok(match k.as_str() {
        "at_least" => Count::AtLeast(n),
        "exactly" => Count::Exactly(n),
        "at_most" => Count::AtMost(n),
        _ => return err(&field, "is not one of at_least, exactly, at_most"),
    })
}

fn parse_span(obj: &Map<String, Value>, path: &str) -> Result<Span, DefinitionError> {
    match (obj.get("within"), obj.get("between")) {
        (Some(_), Some(_)) => err(&join(path, "between"), "cannot be combined with within"),
        (Some(w), None) => Ok(Span::Within(parse_window(w, &join(path, "within"))?)),
        (None, Some(b)) => {
            let field = join(path, "between");
            let times: Option<Vec<Millis>> = b
                .as_array()
                .filter(|a| a.len() == 2)
                .map(|a| a.iter().map(|t| t.as_str().and_then(parse_time)).collect())
                .and_then(|t: Option<Vec<Millis>>| t);
            match times.as_deref() {
                Some(&[from, to]) if from < to => Ok(Span::Between(from, to)),
                Some(_) => err(&field, "the first date must be before the second"),
                None => err(&field, "must be two RFC 3339 date-times"),
            }
        }
        (None, None) => Ok(Span::All),
    }
}

/// A condition; `users` conditions only in account definitions
/// (`collection`), and not inside one another.
fn parse_condition(
    v: &Value,
    path: &str,
    collection: Collection,
) -> Result<Condition, DefinitionError> {
    let Value::Object(obj) = v else {
        return err(path, "must be an object with one condition");
    };
    let [(kind, inner)] = obj.iter().collect::<Vec<_>>()[..] else {
        return err(
            path,
            "must have exactly one of performed, not_performed, trait, audience, users, and, or, not",
        );
    };
    let p = join(path, kind);
    match kind.as_str() {
        "performed" | "not_performed" => {
            let Value::Object(o) = inner else {
                return err(&p, "must be an object");
            };
            let matcher = parse_match(o, &p)?;
            let span = parse_span(o, &p)?;
            if kind == "not_performed" {
                check_fields(o, &p, &["event", "where", "within", "between"])?;
                return Ok(Condition::NotPerformed { matcher, span });
            }
            check_fields(
                o,
                &p,
                &[
                    "event", "where", "within", "between", "count", "then", "then_not",
                ],
            )?;
            let count = o
                .get("count")
                .map(|c| parse_count(c, &join(&p, "count")))
                .transpose()?
                .unwrap_or(Count::AtLeast(1));
            let funnel = match (o.get("then"), o.get("then_not")) {
                (Some(_), Some(_)) => {
                    return err(&join(&p, "then_not"), "cannot be combined with then")
                }
                (Some(f), None) => Some(parse_funnel(f, &join(&p, "then"), true)?),
                (None, Some(f)) => Some(parse_funnel(f, &join(&p, "then_not"), false)?),
                (None, None) => None,
            };
            Ok(Condition::Performed {
                matcher,
                count,
                span,
                funnel,
            })
        }
        "trait" => {
            let Value::Object(o) = inner else {
                return err(&p, "must be an object with name, op and value");
            };
            check_fields(o, &p, &["name", "op", "value"])?;
            Ok(Condition::Trait {
                name: string_field(o, &p, "name")?,
                test: parse_test(o, &p, true)?,
            })
        }
        "audience" => match inner {
            Value::String(k) if valid_key(k) => Ok(Condition::Audience(k.clone())),
            _ => err(&p, "must be an audience key"),
        },
        "and" | "or" => {
            let Value::Array(items) = inner else {
                return err(&p, "must be an array of conditions");
            };
            if items.is_empty() {
                return err(&p, "must hold at least one condition");
            }
            if items.len() > MAX_EXPRESSIONS {
                return err(&p, format!("has more than {MAX_EXPRESSIONS} expressions"));
            }
            let cs = items
                .iter()
                .enumerate()
                .map(|(i, c)| parse_condition(c, &format!("{p}[{i}]"), collection))
                .collect::<Result<Vec<_>, _>>()?;
            Ok(if kind == "and" {
                Condition::And(cs)
            } else {
                Condition::Or(cs)
            })
        }
        "not" => Ok(Condition::Not(Box::new(parse_condition(
            inner, &p, collection,
        )?))),
        "users" if collection == Collection::Accounts => {
            let Value::Object(o) = inner else {
                return err(&p, "must be an object with one of any, all, none");
            };
            let [(q, c)] = o.iter().collect::<Vec<_>>()[..] else {
                return err(&p, "must have exactly one of any, all, none");
            };
            let quantifier = match q.as_str() {
                "any" => Quantifier::Any,
                "all" => Quantifier::All,
                "none" => Quantifier::None,
                _ => return err(&join(&p, q), "is not one of any, all, none"),
            };
            let condition = parse_condition(c, &join(&p, q), Collection::Users)?;
            Ok(Condition::Users {
                quantifier,
                of: Box::new(Definition {
                    key: p.clone(),
                    version: 0,
                    body: Body::Audience(condition),
                    collection: Collection::Users,
                }),
            })
        }
        "users" => err(
            &p,
            "applies to account audiences only (\"collection\": \"accounts\")",
        ),
        _ => err(
            &p,
            "is not one of performed, not_performed, trait, audience, users, and, or, not",
        ),
    }
}

fn parse_funnel(v: &Value, path: &str, did: bool) -> Result<Funnel, DefinitionError> {
    let Value::Object(o) = v else {
        return err(path, "must be an object with event and within");
    };
    check_fields(o, path, &["event", "where", "within"])?;
    let matcher = parse_match(o, path)?;
    let within = o
        .get("within")
        .map_or_else(|| err(&join(path, "within"), "is required"), Ok)?;
    Ok(Funnel {
        did,
        matcher,
        within: parse_window(within, &join(path, "within"))?,
    })
}

/// Checks that every `audience` reference names an audience and that
/// audiences do not reference each other in a cycle; returns the order in
/// which the definitions must be evaluated (everything a definition reads
/// comes before it).
pub fn evaluation_order(defs: &[Definition]) -> Result<Vec<usize>, DefinitionError> {
    let index: BTreeMap<&str, usize> = defs
        .iter()
        .enumerate()
        .map(|(i, d)| (d.key.as_str(), i))
        .collect();
    let mut deps: Vec<Vec<usize>> = Vec::with_capacity(defs.len());
    for d in defs {
        let mut refs = BTreeSet::new();
        if let Body::Audience(c) = &d.body {
            audience_refs(c, &mut refs);
            for r in &refs {
                match index.get(r.as_str()).map(|&i| &defs[i]) {
                    Some(t) if t.class() == Class::Audience => {}
                    _ => {
                        return err(
                            "condition",
                            format!("audience {r:?} referenced by {:?} does not exist", d.key),
                        )
                    }
                }
            }
            refs.clear();
            c.references(&mut refs);
        }
        deps.push(
            refs.iter()
                .filter_map(|r| index.get(r.as_str()).copied())
                .collect(),
        );
    }
    // Depth-first topological sort; grey = on the current path.
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        White,
        Grey,
        Black,
    }
    let mut mark = vec![Mark::White; defs.len()];
    let mut order = Vec::with_capacity(defs.len());
    fn visit(
        i: usize,
        defs: &[Definition],
        deps: &[Vec<usize>],
        mark: &mut [Mark],
        order: &mut Vec<usize>,
    ) -> Result<(), DefinitionError> {
        match mark[i] {
            Mark::Black => return Ok(()),
            Mark::Grey => {
                return err(
                    "condition",
                    format!("audience {:?} is part of a reference cycle", defs[i].key),
                )
            }
            Mark::White => {}
        }
        mark[i] = Mark::Grey;
        for &d in &deps[i] {
            visit(d, defs, deps, mark, order)?;
        }
        mark[i] = Mark::Black;
        order.push(i);
        Ok(())
    }
    for i in 0..defs.len() {
        visit(i, defs, &deps, &mut mark, &mut order)?;
    }
    Ok(order)
}

/// Checks that every `users` condition of the account definitions
/// `accounts` refers only to audiences among the user-level `users`.
pub fn check_user_conditions(
    accounts: &[Definition],
    users: &[Definition],
) -> Result<(), DefinitionError> {
    fn walk(c: &Condition, users: &[Definition], key: &str) -> Result<(), DefinitionError> {
        match c {
            Condition::Users { of, .. } => {
                let mut refs = BTreeSet::new();
                if let Body::Audience(inner) = &of.body {
                    audience_refs(inner, &mut refs);
                }
                for r in refs {
                    if !users
                        .iter()
                        .any(|u| u.key == r && u.class() == Class::Audience)
                    {
                        return err(
                            "condition",
                            format!("user audience {r:?} referenced by {key:?} does not exist"),
                        );
                    }
                }
                Ok(())
            }
            Condition::And(cs) | Condition::Or(cs) => {
                cs.iter().try_for_each(|c| walk(c, users, key))
            }
            Condition::Not(c) => walk(c, users, key),
            _ => Ok(()),
        }
    }
    for d in accounts {
        if let Body::Audience(c) = &d.body {
            walk(c, users, &d.key)?;
        }
    }
    Ok(())
}

fn audience_refs(c: &Condition, out: &mut BTreeSet<String>) {
    match c {
        Condition::Audience(k) => {
            out.insert(k.clone());
        }
        Condition::And(cs) | Condition::Or(cs) => cs.iter().for_each(|c| audience_refs(c, out)),
        Condition::Not(c) => audience_refs(c, out),
        _ => {}
    }
}
