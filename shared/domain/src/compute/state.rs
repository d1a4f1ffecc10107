//! Incremental state: per profile and definition, the smallest summary of
//! the matching events that lets a new event update the value without
//! rescanning history, and lets time alone move it (events ageing out of a
//! lookback, funnel windows closing).
//!
//! Every summary is a commutative merge of per-event contributions, so the
//! order events arrive in does not matter and merging two profiles merges
//! their states exactly.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::definition::{
    Aggregate, Body, ComputedTrait, Condition, Definition, EventMatch, Funnel, Span, TraitKind,
    Window, HOUR_MS,
};
use super::ops::{property, test};
use crate::Millis;

/// What the engine needs from an event.
#[derive(Clone, Copy, Debug)]
pub struct EventFacts<'a> {
    /// `event` of a track; `Page Viewed` / `Screen Viewed` for page and screen calls.
    pub name: &'a str,
    pub timestamp: Millis,
    pub properties: Option<&'a Map<String, Value>>,
}

pub fn hour(ts: Millis) -> i64 {
    ts.div_euclid(HOUR_MS)
}

/// Buckets (or values) at or after this hour are inside a window at `now`.
fn first_hour_in(window: Window, now: Millis) -> i64 {
    hour(now) - window.hours + 1
}

/// Per-hour aggregate of a numeric property.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Cell {
    pub s: f64,
    pub n: u64,
    pub lo: f64,
    pub hi: f64,
}

impl Cell {
    fn add(&mut self, o: &Cell) {
        self.s += o.s;
        self.n += o.n;
        self.lo = self.lo.min(o.lo);
        self.hi = self.hi.max(o.hi);
    }
}

/// One accumulator. Bucket keys are hours for windowed computations and
/// `0` for all-history ones.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Acc {
    Count {
        b: BTreeMap<i64, u64>,
    },
    Agg {
        b: BTreeMap<i64, Cell>,
    },
    /// Value (canonical JSON text) counts per bucket.
    Freq {
        b: BTreeMap<i64, BTreeMap<String, u64>>,
    },
    /// The earliest (`f`: `first`) or latest (`last`) `(timestamp, value)` per bucket.
    Pick {
        f: bool,
        b: BTreeMap<i64, (Millis, String)>,
    },
    /// Each distinct value and the newest hour it was seen.
    Unique {
        v: BTreeMap<String, i64>,
    },
    /// Timestamps of parent and child events of a funnel, sorted.
    Funnel {
        p: Vec<Millis>,
        c: Vec<Millis>,
    },
}

/// The state of one definition for one profile.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DefState {
    /// The definition version this state was built for.
    pub v: u64,
    pub l: Vec<Acc>,
}

/// A leaf of a definition that reads events.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Leaf<'a> {
    Trait(&'a ComputedTrait),
    Performed {
        matcher: &'a EventMatch,
        span: Span,
        funnel: Option<&'a Funnel>,
    },
}

fn leaves_of<'a>(c: &'a Condition, out: &mut Vec<Leaf<'a>>) {
    match c {
        Condition::Performed {
            matcher,
            span,
            funnel,
            ..
        } => out.push(Leaf::Performed {
            matcher,
            span: *span,
            funnel: funnel.as_ref(),
        }),
        Condition::NotPerformed { matcher, span } => out.push(Leaf::Performed {
            matcher,
            span: *span,
            funnel: None,
        }),
        Condition::And(cs) | Condition::Or(cs) => cs.iter().for_each(|c| leaves_of(c, out)),
        Condition::Not(c) => leaves_of(c, out),
        // (A `users` condition's events are each user's, folded when it
        // is evaluated.)
        Condition::Trait { .. } | Condition::Audience(_) | Condition::Users { .. } => {}
    }
}

pub(crate) fn leaves(def: &Definition) -> Vec<Leaf<'_>> {
    let mut out = Vec::new();
    match &def.body {
        Body::Trait(t) => out.push(Leaf::Trait(t)),
        Body::Audience(c) => leaves_of(c, &mut out),
    }
    out
}

fn matches(m: &EventMatch, e: &EventFacts<'_>) -> bool {
    m.event == e.name
        && m.filters
            .iter()
            .all(|f| test(&f.test, property(e.properties, &f.property)))
}

/// Canonical text of a JSON value: the key of `Freq`, `Pick` and `Unique`.
fn text(v: &Value) -> String {
    serde_json::to_string(v).unwrap_or_default()
}

impl Leaf<'_> {
    fn window(&self) -> Option<Window> {
        match self {
            Leaf::Trait(t) => t.lookback,
            Leaf::Performed { span, .. } => match span {
                Span::Within(w) => Some(*w),
                _ => None,
            },
        }
    }

    fn bucket(&self, ts: Millis) -> i64 {
        if self.window().is_some() {
            hour(ts)
        } else {
            0
        }
    }

    pub(crate) fn empty(&self) -> Acc {
        match self {
            Leaf::Trait(t) => match t.kind {
                TraitKind::EventCounter => Acc::Count { b: BTreeMap::new() },
                TraitKind::Aggregation(..) => Acc::Agg { b: BTreeMap::new() },
                TraitKind::MostFrequent(_) => Acc::Freq { b: BTreeMap::new() },
                TraitKind::First(_) => Acc::Pick {
                    f: true,
                    b: BTreeMap::new(),
                },
                TraitKind::Last(_) => Acc::Pick {
                    f: false,
                    b: BTreeMap::new(),
                },
                TraitKind::UniqueList(_) | TraitKind::UniqueListCount(_) => {
                    Acc::Unique { v: BTreeMap::new() }
                }
            },
            Leaf::Performed { funnel: None, .. } => Acc::Count { b: BTreeMap::new() },
            Leaf::Performed {
                funnel: Some(_), ..
            } => Acc::Funnel {
                p: Vec::new(),
                c: Vec::new(),
            },
        }
    }

    /// Folds one event in.
    pub(crate) fn apply(&self, acc: &mut Acc, e: &EventFacts<'_>) {
        match (self, acc) {
            (Leaf::Trait(t), acc) => {
                if !matches(&t.matcher, e) {
                    return;
                }
                let k = self.bucket(e.timestamp);
                match (&t.kind, acc) {
                    (TraitKind::EventCounter, Acc::Count { b }) => *b.entry(k).or_default() += 1,
                    (TraitKind::Aggregation(_, p), Acc::Agg { b }) => {
                        let Some(x) = property(e.properties, p).and_then(number) else {
                            return;
                        };
                        let cell = Cell {
                            s: x,
                            n: 1,
                            lo: x,
                            hi: x,
                        };
                        b.entry(k).and_modify(|c| c.add(&cell)).or_insert(cell);
                    }
                    (TraitKind::MostFrequent(p), Acc::Freq { b }) => {
                        if let Some(v) = property(e.properties, p).filter(|v| !v.is_null()) {
                            *b.entry(k).or_default().entry(text(v)).or_default() += 1;
                        }
                    }
                    (TraitKind::First(p) | TraitKind::Last(p), Acc::Pick { f, b }) => {
                        if let Some(v) = property(e.properties, p).filter(|v| !v.is_null()) {
                            pick(b, k, (e.timestamp, text(v)), *f);
                        }
                    }
                    (TraitKind::UniqueList(p), Acc::Unique { v })
                    | (TraitKind::UniqueListCount(p), Acc::Unique { v }) => {
                        if let Some(x) = property(e.properties, p).filter(|v| !v.is_null()) {
                            let h = hour(e.timestamp);
                            v.entry(text(x))
                                .and_modify(|old| *old = (*old).max(h))
                                .or_insert(h);
                        }
                    }
                    _ => debug_assert!(false, "state does not fit the definition"),
                }
            }
            (
                Leaf::Performed {
                    matcher,
                    span,
                    funnel,
                },
                acc,
            ) => {
                let in_span = match span {
                    Span::Between(from, to) => (*from..*to).contains(&e.timestamp),
                    _ => true,
                };
                match (funnel, acc) {
                    (None, Acc::Count { b }) => {
                        if in_span && matches(matcher, e) {
                            *b.entry(self.bucket(e.timestamp)).or_default() += 1;
                        }
                    }
                    (Some(f), Acc::Funnel { p, c }) => {
                        if in_span && matches(matcher, e) {
                            insert_sorted(p, e.timestamp);
                        }
                        if matches(&f.matcher, e) {
                            insert_sorted(c, e.timestamp);
                        }
                    }
                    _ => debug_assert!(false, "state does not fit the definition"),
                }
            }
        }
    }

    /// Drops what can no longer count at `now` or later.
    pub(crate) fn prune(&self, acc: &mut Acc, now: Millis) {
        let Some(w) = self.window() else {
            return;
        };
        let from = first_hour_in(w, now);
        match acc {
            Acc::Count { b } => *b = b.split_off(&from),
            Acc::Agg { b } => *b = b.split_off(&from),
            Acc::Freq { b } => *b = b.split_off(&from),
            Acc::Pick { b, .. } => *b = b.split_off(&from),
            Acc::Unique { v } => v.retain(|_, h| *h >= from),
            Acc::Funnel { p, c } => {
                // A child only pairs with a parent at or before it.
                let from_ms = from * HOUR_MS;
                p.retain(|t| *t >= from_ms);
                c.retain(|t| *t >= from_ms);
            }
        }
    }

    /// Moments after `now` at which time alone may change what this leaf
    /// reads: a bucket leaving the window, a funnel window closing.
    pub(crate) fn moments(&self, acc: &Acc, now: Millis, out: &mut Vec<Millis>) {
        if let Some(w) = self.window() {
            let from = first_hour_in(w, now);
            let leave = |h: i64| (h + w.hours) * HOUR_MS;
            match acc {
                Acc::Count { b } => out.extend(b.range(from..).map(|(h, _)| leave(*h))),
                Acc::Agg { b } => out.extend(b.range(from..).map(|(h, _)| leave(*h))),
                Acc::Freq { b } => out.extend(b.range(from..).map(|(h, _)| leave(*h))),
                Acc::Pick { b, .. } => out.extend(b.range(from..).map(|(h, _)| leave(*h))),
                Acc::Unique { v } => {
                    out.extend(v.values().filter(|h| **h >= from).map(|h| leave(*h)))
                }
                Acc::Funnel { p, .. } => {
                    out.extend(p.iter().map(|t| hour(*t)).filter(|h| *h >= from).map(leave))
                }
            }
        }
        if let (
            Leaf::Performed {
                funnel: Some(f), ..
            },
            Acc::Funnel { p, .. },
        ) = (self, acc)
        {
            if !f.did {
                out.extend(p.iter().map(|t| t + f.within.millis()).filter(|t| *t > now));
            }
        }
    }

    /// How many instances a `performed` leaf counts at `now`.
    pub(crate) fn count(&self, acc: &Acc, now: Millis) -> u64 {
        let from = self.window().map(|w| first_hour_in(w, now));
        match (self, acc) {
            (_, Acc::Count { b }) => match from {
                Some(from) => b.range(from..).map(|(_, n)| n).sum(),
                None => b.values().sum(),
            },
            (
                Leaf::Performed {
                    funnel: Some(f), ..
                },
                Acc::Funnel { p, c },
            ) => {
                let d = f.within.millis();
                p.iter()
                    .filter(|t| from.is_none_or(|from| hour(**t) >= from))
                    .filter(|t| {
                        // A child at or after the parent, within the window.
                        let i = c.partition_point(|x| x < t);
                        let followed = c.get(i).is_some_and(|x| *x <= **t + d);
                        if f.did {
                            followed
                        } else {
                            now >= **t + d && !followed
                        }
                    })
                    .count() as u64
            }
            _ => 0,
        }
    }

    /// The value of a computed trait leaf at `now`; `None`: no value.
    pub(crate) fn value(&self, acc: &Acc, now: Millis) -> Option<Value> {
        let Leaf::Trait(t) = self else {
            return None;
        };
        let from = self.window().map_or(i64::MIN, |w| first_hour_in(w, now));
        match (&t.kind, acc) {
            (TraitKind::EventCounter, Acc::Count { .. }) => Some(Value::from(self.count(acc, now))),
            (TraitKind::Aggregation(f, _), Acc::Agg { b }) => {
                let mut cells = b.range(from..).map(|(_, c)| *c);
                let mut total = cells.next()?;
                cells.for_each(|c| total.add(&c));
                Some(number_value(match f {
                    Aggregate::Sum => total.s,
                    Aggregate::Avg => total.s / total.n as f64,
                    Aggregate::Min => total.lo,
                    Aggregate::Max => total.hi,
                }))
            }
            (TraitKind::MostFrequent(_), Acc::Freq { b }) => {
                let mut counts: BTreeMap<&str, u64> = BTreeMap::new();
                for (_, m) in b.range(from..) {
                    for (v, n) in m {
                        *counts.entry(v).or_default() += n;
                    }
                }
                let mut best: Option<(u64, String, &str)> = None;
                for (v, n) in counts.into_iter().filter(|(_, n)| *n >= 2) {
                    let shown = display(v);
                    let better = match &best {
                        None => true,
                        Some((bn, bs, _)) => n > *bn || (n == *bn && shown < *bs),
                    };
                    if better {
                        best = Some((n, shown, v));
                    }
                }
                best.and_then(|(_, _, v)| serde_json::from_str(v).ok())
            }
            (TraitKind::First(_), Acc::Pick { b, .. }) => b
                .range(from..)
                .next()
                .and_then(|(_, (_, v))| serde_json::from_str(v).ok()),
            (TraitKind::Last(_), Acc::Pick { b, .. }) => b
                .range(from..)
                .next_back()
                .and_then(|(_, (_, v))| serde_json::from_str(v).ok()),
            (TraitKind::UniqueList(_), Acc::Unique { v }) => {
                let mut values: Vec<(String, &str)> = v
                    .iter()
                    .filter(|(_, h)| **h >= from)
                    .map(|(v, _)| (display(v), v.as_str()))
                    .collect();
                values.sort();
                Some(Value::Array(
                    values
                        .into_iter()
                        .filter_map(|(_, v)| serde_json::from_str(v).ok())
                        .collect(),
                ))
            }
            (TraitKind::UniqueListCount(_), Acc::Unique { v }) => {
                Some(Value::from(v.values().filter(|h| **h >= from).count()))
            }
            _ => None,
        }
    }
}

impl Acc {
    /// Folds another profile's state of the same leaf in.
    pub fn merge(&mut self, other: Acc) {
        match (self, other) {
            (Acc::Count { b }, Acc::Count { b: o }) => {
                for (k, n) in o {
                    *b.entry(k).or_default() += n;
                }
            }
            (Acc::Agg { b }, Acc::Agg { b: o }) => {
                for (k, c) in o {
                    b.entry(k).and_modify(|x| x.add(&c)).or_insert(c);
                }
            }
            (Acc::Freq { b }, Acc::Freq { b: o }) => {
                for (k, m) in o {
                    let into = b.entry(k).or_default();
                    for (v, n) in m {
                        *into.entry(v).or_default() += n;
                    }
                }
            }
            (Acc::Pick { f, b }, Acc::Pick { b: o, .. }) => {
                for (k, x) in o {
                    pick(b, k, x, *f);
                }
            }
            (Acc::Unique { v }, Acc::Unique { v: o }) => {
                for (k, h) in o {
                    v.entry(k).and_modify(|x| *x = (*x).max(h)).or_insert(h);
                }
            }
            (Acc::Funnel { p, c }, Acc::Funnel { p: op, c: oc }) => {
                p.extend(op);
                p.sort_unstable();
                c.extend(oc);
                c.sort_unstable();
            }
            _ => debug_assert!(false, "merging states of different leaves"),
        }
    }
}

impl DefState {
    pub fn empty(def: &Definition) -> DefState {
        DefState {
            v: def.version,
            l: leaves(def).iter().map(Leaf::empty).collect(),
        }
    }

    /// Folds the state of a merged-away profile in (same definition version).
    pub fn merge(&mut self, other: DefState) {
        for (acc, o) in self.l.iter_mut().zip(other.l) {
            acc.merge(o);
        }
    }
}

fn pick(b: &mut BTreeMap<i64, (Millis, String)>, k: i64, x: (Millis, String), first: bool) {
    match b.get_mut(&k) {
        Some(y) => {
            if (first && x < *y) || (!first && x > *y) {
                *y = x;
            }
        }
        None => {
            b.insert(k, x);
        }
    }
}

fn insert_sorted(v: &mut Vec<Millis>, t: Millis) {
    let i = v.partition_point(|x| *x <= t);
    v.insert(i, t);
}

/// A property as a number: JSON numbers and numeric strings.
pub(crate) fn number(v: &Value) -> Option<f64> {
    match v {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse::<f64>().ok().filter(|x| x.is_finite()),
        _ => None,
    }
}

/// Whole numbers are shown without a fraction.
fn number_value(x: f64) -> Value {
    if x.fract() == 0.0 && x.abs() < 9.0e15 {
        Value::from(x as i64)
    } else {
        serde_json::Number::from_f64(x).map_or(Value::Null, Value::Number)
    }
}

/// How a canonical value sorts for people: strings without their quotes.
fn display(text: &str) -> String {
    match serde_json::from_str::<Value>(text) {
        Ok(Value::String(s)) => s,
        _ => text.to_string(),
    }
}
