//! CloudWatch embedded metric format (EMF): how the AWS functions report
//! the figures `kindred serve` serves at `/metrics`. After each invocation
//! a function prints, as JSON lines on stdout (which Lambda sends to
//! CloudWatch Logs, where CloudWatch turns them into metrics of the
//! `Kindred` namespace), what it counted during that invocation:
//!
//! - the counters of [`crate::metrics::global`] (events accepted and
//!   refused, Tracking API requests refused), as differences since the
//!   last flush;
//! - the counts only the functions keep here ([`counts`]: events applied by
//!   outcome, profiles created, merges, identifiers refused, deliveries;
//!   `kindred serve` reads the same from its workers' committed figures);
//! - each request's latency by route template, and each identity batch's
//!   time, as values.
//!
//! Dimensions come from closed sets (routes, codes, outcomes, rules) or
//! the operator's own ids (a destination), never from an event.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{LazyLock, Mutex};
use std::time::Duration;

use serde_json::{json, Map, Value};

use crate::metrics::global;

/// Values kept between flushes at most (a flush follows each invocation).
const MAX_VALUES: usize = 100;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A metric's name and dimensions.
type Key = (&'static str, Vec<(&'static str, String)>);

/// What the AWS functions count as they go.
#[derive(Default)]
pub struct Counts {
    applied: Mutex<BTreeMap<&'static str, u64>>,
    created: AtomicU64,
    merges: AtomicU64,
    refused: Mutex<BTreeMap<String, u64>>,
    deliveries: Mutex<BTreeMap<(String, &'static str), u64>>,
    /// Values since the last flush: (metric, dimensions) -> values.
    values: Mutex<BTreeMap<Key, Vec<f64>>>,
    enabled: AtomicBool,
}

static COUNTS: LazyLock<Counts> = LazyLock::new(Counts::default);

/// This process's function-side counts.
pub fn counts() -> &'static Counts {
    &COUNTS
}

impl Counts {
    /// Starts keeping values (latencies, batch times) for the flushes:
    /// only the AWS functions do, so `kindred serve` keeps none.
    pub fn enable(&self) {
        self.enabled.store(true, Ordering::Relaxed);
    }

    pub fn enabled(&self) -> bool {
        self.enabled.load(Ordering::Relaxed)
    }

    /// An event applied by the identity step: `recorded`, `duplicate`,
    /// `unresolved` or `suppressed`, with what it created, merged and
    /// refused.
    pub fn applied(&self, outcome: &'static str, created: bool, merged: usize, refused: &[String]) {
        *lock(&self.applied).entry(outcome).or_default() += 1;
        self.created
            .fetch_add(u64::from(created), Ordering::Relaxed);
        self.merges.fetch_add(merged as u64, Ordering::Relaxed);
        let mut by_rule = lock(&self.refused);
        for rule in refused {
            *by_rule.entry(rule.clone()).or_default() += 1;
        }
    }

    /// A delivery to a destination (`space/destination`): `delivered`,
    /// `retrying` or `dead`.
    pub fn delivery(&self, destination: String, outcome: &'static str, calls: u64) {
        *lock(&self.deliveries)
            .entry((destination, outcome))
            .or_default() += calls;
    }

    /// A value of `metric` (milliseconds), when enabled.
    pub fn value(
        &self,
        metric: &'static str,
        dimensions: Vec<(&'static str, String)>,
        took: Duration,
    ) {
        if !self.enabled() {
            return;
        }
        let mut values = lock(&self.values);
        let list = values.entry((metric, dimensions)).or_default();
        if list.len() < MAX_VALUES {
            list.push(took.as_secs_f64() * 1000.0);
        }
    }
}

/// A counter series: CloudWatch metric name, dimensions, running total.
type Series = (&'static str, Vec<(&'static str, String)>, u64);

fn series() -> Vec<Series> {
    let g = global();
    let c = counts();
    let mut out: Vec<Series> = vec![(
        "EventsAccepted",
        vec![],
        g.events_accepted.load(Ordering::Relaxed),
    )];
    for (reason, n) in g.refused_by_reason() {
        out.push(("EventsRefused", vec![("Reason", reason.to_string())], n));
    }
    for (code, n) in g.tracking_refused_by_code() {
        out.push((
            "TrackingRequestsRefused",
            vec![("Code", code.to_string())],
            n,
        ));
    }
    for (outcome, n) in lock(&c.applied).iter() {
        out.push(("EventsApplied", vec![("Outcome", outcome.to_string())], *n));
    }
    out.push(("ProfilesCreated", vec![], c.created.load(Ordering::Relaxed)));
    out.push(("Merges", vec![], c.merges.load(Ordering::Relaxed)));
    for (rule, n) in lock(&c.refused).iter() {
        out.push(("IdentifiersRefused", vec![("Rule", rule.clone())], *n));
    }
    for ((destination, outcome), n) in lock(&c.deliveries).iter() {
        out.push((
            "Deliveries",
            vec![
                ("Destination", destination.clone()),
                ("Outcome", outcome.to_string()),
            ],
            *n,
        ));
    }
    out
}

/// One EMF document: `metric` with `value` (a number or a list) under
/// the dimensions `Function` and `dimensions`.
pub fn document(
    function: &str,
    metric: &str,
    unit: &str,
    dimensions: &[(&'static str, String)],
    value: Value,
    timestamp: i64,
) -> Value {
    let mut names = vec!["Function"];
    names.extend(dimensions.iter().map(|(k, _)| *k));
    let mut out = Map::new();
    out.insert(
        "_aws".into(),
        json!({
            "Timestamp": timestamp,
            "CloudWatchMetrics": [{
                "Namespace": "Kindred",
                "Dimensions": [names],
                "Metrics": [{"Name": metric, "Unit": unit}],
            }],
        }),
    );
    out.insert("Function".into(), json!(function));
    for (k, v) in dimensions {
        out.insert((*k).into(), json!(v));
    }
    out.insert(metric.into(), value);
    Value::Object(out)
}

/// Flushes a function's figures as EMF lines.
pub struct Emf {
    function: &'static str,
    last: Mutex<HashMap<Key, u64>>,
}

impl Emf {
    /// For the function `function` (its `Function` dimension); turns the
    /// keeping of values on.
    pub fn new(function: &'static str) -> Self {
        counts().enable();
        Self {
            function,
            last: Mutex::new(HashMap::new()),
        }
    }

    /// The lines of what was counted since the last flush (none when
    /// nothing was).
    pub fn lines(&self) -> Vec<String> {
        let now = crate::now_millis();
        let mut out = Vec::new();
        let mut last = lock(&self.last);
        for (metric, dims, total) in series() {
            let seen = last.entry((metric, dims.clone())).or_insert(0);
            let delta = total.saturating_sub(*seen);
            *seen = total;
            if delta > 0 {
                out.push(
                    document(self.function, metric, "Count", &dims, json!(delta), now).to_string(),
                );
            }
        }
        let values = std::mem::take(&mut *lock(&counts().values));
        for ((metric, dims), list) in values {
            out.push(
                document(
                    self.function,
                    metric,
                    "Milliseconds",
                    &dims,
                    json!(list),
                    now,
                )
                .to_string(),
            );
        }
        out
    }

    /// Prints the lines on stdout, where Lambda sends them to CloudWatch.
    pub fn flush(&self) {
        use std::io::Write;
        let lines = self.lines();
        if lines.is_empty() {
            return;
        }
        let mut stdout = std::io::stdout().lock();
        for line in lines {
            let _ = writeln!(stdout, "{line}");
        }
        let _ = stdout.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_document_is_cloudwatch_embedded_metric_format() {
        let d = document(
            "ingest",
            "EventsRefused",
            "Count",
            &[("Reason", "invalid_timestamp".into())],
            json!(2),
            1_700_000_000_000,
        );
        assert_eq!(
            d,
            json!({
                "_aws": {"Timestamp": 1_700_000_000_000i64, "CloudWatchMetrics": [{
                    "Namespace": "Kindred",
                    "Dimensions": [["Function", "Reason"]],
                    "Metrics": [{"Name": "EventsRefused", "Unit": "Count"}]}]},
                "Function": "ingest",
                "Reason": "invalid_timestamp",
                "EventsRefused": 2,
            })
        );
    }

    #[test]
    fn each_flush_has_what_was_counted_since_the_last() {
        let emf = Emf::new("identity");
        // Whatever other tests of this process counted before.
        let _ = emf.lines();
        counts().applied("recorded", true, 0, &[]);
        counts().applied("recorded", false, 2, &["limit".to_string()]);
        counts().value("IdentityBatchDuration", vec![], Duration::from_millis(12));
        let lines: Vec<Value> = emf
            .lines()
            .iter()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let find = |metric: &str| {
            lines
                .iter()
                .find(|l| l.get(metric).is_some())
                .unwrap_or_else(|| panic!("{metric} in {lines:?}"))[metric]
                .clone()
        };
        assert_eq!(find("EventsApplied"), json!(2));
        assert_eq!(find("ProfilesCreated"), json!(1));
        assert_eq!(find("Merges"), json!(2));
        assert_eq!(find("IdentifiersRefused"), json!(1));
        assert_eq!(find("IdentityBatchDuration"), json!([12.0]));
        // Nothing new: nothing to say.
        assert!(emf.lines().is_empty());
    }
}
