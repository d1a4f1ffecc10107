//! Process-wide counters and histograms, and their rendering in the
//! Prometheus text format (0.0.4) that `kindred serve --metrics-listen`
//! serves at `/metrics`.
//!
//! What the handlers and workers count as they go lives in [`global`];
//! what is read when scraped (worker counters, lags, file sizes) is added
//! by the composition through [`Exposition`]. Label values come from
//! closed sets (route templates, error codes, outcomes), never from a
//! request, so a client cannot grow the series or put its data in them.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{LazyLock, Mutex, RwLock};
use std::time::Duration;

/// Upper bounds (seconds) of the latency histograms' buckets.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// A histogram of durations with fixed buckets.
pub struct Histogram {
    bounds: &'static [f64],
    /// Per bucket (not cumulative), the last one for above every bound.
    counts: Vec<AtomicU64>,
    sum_nanos: AtomicU64,
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_nanos: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, took: Duration) {
        let seconds = took.as_secs_f64();
        let bucket = self
            .bounds
            .iter()
            .position(|b| seconds <= *b)
            .unwrap_or(self.bounds.len());
        self.counts[bucket].fetch_add(1, Ordering::Relaxed);
        let nanos = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
        self.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let mut cumulative = 0;
        let sep = if labels.is_empty() { "" } else { "," };
        for (i, count) in self.counts.iter().enumerate() {
            cumulative += count.load(Ordering::Relaxed);
            let le = match self.bounds.get(i) {
                Some(b) => b.to_string(),
                None => "+Inf".to_string(),
            };
            let _ = writeln!(
                out,
                "{name}_bucket{{{labels}{sep}le=\"{le}\"}} {cumulative}"
            );
        }
        let sum = self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        let braces = |s: &str| {
            if s.is_empty() {
                String::new()
            } else {
                format!("{{{s}}}")
            }
        };
        let _ = writeln!(out, "{name}_sum{} {sum}", braces(labels));
        let _ = writeln!(out, "{name}_count{} {cumulative}", braces(labels));
    }
}

/// What this process counts as it goes.
pub struct Metrics {
    /// Events accepted by the Tracking API (queued, durable).
    pub events_accepted: AtomicU64,
    /// Events refused by the Tracking API, by reason (a batch's invalid
    /// items, a single call that does not parse).
    events_refused: Mutex<BTreeMap<&'static str, u64>>,
    /// Tracking API requests refused whole, by error code.
    tracking_refused: Mutex<BTreeMap<&'static str, u64>>,
    /// HTTP requests by method, route template and status class. Read-
    /// locked on every request (the series exist after the first few),
    /// so a request thread preempted while holding it holds no one up.
    http: RwLock<BTreeMap<(String, String, &'static str), Histogram>>,
    /// How long each identity batch took to apply and commit.
    pub identity_batch: Histogram,
}

static GLOBAL: LazyLock<Metrics> = LazyLock::new(Metrics::new);

/// This process's metrics.
pub fn global() -> &'static Metrics {
    &GLOBAL
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn status_class(status: u16) -> &'static str {
    match status {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

impl Metrics {
    fn new() -> Self {
        Self {
            events_accepted: AtomicU64::new(0),
            events_refused: Mutex::new(BTreeMap::new()),
            tracking_refused: Mutex::new(BTreeMap::new()),
            http: RwLock::new(BTreeMap::new()),
            identity_batch: Histogram::new(&[
                0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            ]),
        }
    }

    pub fn event_refused(&self, reason: &'static str) {
        *lock(&self.events_refused).entry(reason).or_default() += 1;
    }

    pub fn tracking_request_refused(&self, code: &'static str) {
        *lock(&self.tracking_refused).entry(code).or_default() += 1;
    }

    /// Events refused so far, by reason.
    pub fn refused_by_reason(&self) -> Vec<(&'static str, u64)> {
        lock(&self.events_refused)
            .iter()
            .map(|(k, n)| (*k, *n))
            .collect()
    }

    /// Tracking API requests refused whole so far, by code.
    pub fn tracking_refused_by_code(&self) -> Vec<(&'static str, u64)> {
        lock(&self.tracking_refused)
            .iter()
            .map(|(k, n)| (*k, *n))
            .collect()
    }

    /// One HTTP request: `route` is the matched route template (or
    /// `unmatched`), never the path itself. Its parameters are written
    /// `:name` rather than `{name}`: some Prometheus text parsers stop a
    /// label set at the first `}`, even inside a quoted value.
    pub fn request(&self, method: &str, route: &str, status: u16, took: Duration) {
        let route: String = route
            .chars()
            .filter(|c| *c != '}')
            .map(|c| if c == '{' { ':' } else { c })
            .collect();
        // A client may send any method name: the others share one series.
        let method = match method {
            "GET" | "POST" | "PUT" | "PATCH" | "DELETE" | "HEAD" | "OPTIONS" => method,
            _ => "other",
        };
        let emf = crate::emf::counts();
        if emf.enabled() {
            let dimensions = vec![
                ("Route", route.clone()),
                ("Status", status_class(status).to_string()),
            ];
            emf.value("RequestLatency", dimensions, took);
        }
        let key = (method.to_string(), route, status_class(status));
        let series = self.http.read().unwrap_or_else(|p| p.into_inner());
        if let Some(h) = series.get(&key) {
            h.observe(took);
            return;
        }
        drop(series);
        self.http
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .entry(key)
            .or_insert_with(|| Histogram::new(LATENCY_BUCKETS))
            .observe(took);
    }

    /// Writes everything counted here.
    pub fn render(&self, out: &mut Exposition) {
        out.counter(
            "kindred_events_accepted_total",
            "Events accepted by the Tracking API (durable when counted).",
            &[(vec![], self.events_accepted.load(Ordering::Relaxed) as f64)],
        );
        out.counter(
            "kindred_events_refused_total",
            "Events the Tracking API refused, by reason.",
            &by_label("reason", &self.events_refused),
        );
        out.counter(
            "kindred_tracking_requests_refused_total",
            "Tracking API requests refused whole (nothing in them accepted), by error code.",
            &by_label("code", &self.tracking_refused),
        );
        out.help(
            "kindred_http_request_duration_seconds",
            "HTTP requests by method, route template and status class.",
            "histogram",
        );
        let series = self.http.read().unwrap_or_else(|p| p.into_inner());
        for ((method, route, class), h) in series.iter() {
            let labels = format!(
                "method=\"{}\",route=\"{}\",status=\"{class}\"",
                escape(method),
                escape(route)
            );
            h.render(
                &mut out.text,
                "kindred_http_request_duration_seconds",
                &labels,
            );
        }
        out.help(
            "kindred_identity_batch_duration_seconds",
            "How long the identity worker took to apply and commit a batch.",
            "histogram",
        );
        self.identity_batch
            .render(&mut out.text, "kindred_identity_batch_duration_seconds", "");
    }
}

/// One sample per key of `counts`, labelled `label`.
fn by_label(label: &'static str, counts: &Mutex<BTreeMap<&'static str, u64>>) -> Vec<Sample> {
    lock(counts)
        .iter()
        .map(|(value, n)| (vec![(label, value.to_string())], *n as f64))
        .collect()
}

/// A Prometheus text exposition being written.
#[derive(Default)]
pub struct Exposition {
    pub text: String,
}

/// A sample's labels and value.
pub type Sample = (Vec<(&'static str, String)>, f64);

impl Exposition {
    fn help(&mut self, name: &str, help: &str, kind: &str) {
        let _ = writeln!(self.text, "# HELP {name} {help}");
        let _ = writeln!(self.text, "# TYPE {name} {kind}");
    }

    fn samples(&mut self, name: &str, help: &str, kind: &str, samples: &[Sample]) {
        self.help(name, help, kind);
        for (labels, value) in samples {
            let labels: Vec<String> = labels
                .iter()
                .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
                .collect();
            let labels = if labels.is_empty() {
                String::new()
            } else {
                format!("{{{}}}", labels.join(","))
            };
            let _ = writeln!(self.text, "{name}{labels} {value}");
        }
    }

    pub fn counter(&mut self, name: &str, help: &str, samples: &[Sample]) {
        self.samples(name, help, "counter", samples);
    }

    pub fn gauge(&mut self, name: &str, help: &str, samples: &[Sample]) {
        self.samples(name, help, "gauge", samples);
    }
}

/// A label value as the text format writes it.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_histogram_counts_cumulatively_with_sum_and_count() {
        let h = Histogram::new(&[0.01, 0.1]);
        h.observe(Duration::from_millis(5));
        h.observe(Duration::from_millis(50));
        h.observe(Duration::from_secs(1));
        let mut out = String::new();
        h.render(&mut out, "x", "a=\"b\"");
        assert_eq!(
            out,
            "x_bucket{a=\"b\",le=\"0.01\"} 1\nx_bucket{a=\"b\",le=\"0.1\"} 2\n\
             x_bucket{a=\"b\",le=\"+Inf\"} 3\nx_sum{a=\"b\"} 1.055\nx_count{a=\"b\"} 3\n"
        );
    }

    #[test]
    fn a_client_cannot_add_series_with_made_up_methods() {
        let m = Metrics::new();
        for method in ["GET", "BREW", "PROPFIND", "X-1"] {
            m.request(method, "unmatched", 404, Duration::from_millis(1));
        }
        m.request("GET", "/v1/spaces/{space_id}/tokens", 200, Duration::ZERO);
        let keys: Vec<_> = m.http.read().unwrap().keys().cloned().collect();
        assert_eq!(
            keys,
            [
                (
                    "GET".to_string(),
                    "/v1/spaces/:space_id/tokens".to_string(),
                    "2xx"
                ),
                ("GET".to_string(), "unmatched".to_string(), "4xx"),
                ("other".to_string(), "unmatched".to_string(), "4xx"),
            ]
        );
    }

    #[test]
    fn label_values_are_escaped() {
        let mut out = Exposition::default();
        out.gauge("g", "h", &[(vec![("l", "a\"b\\c\nd".to_string())], 1.0)]);
        assert!(
            out.text.ends_with("g{l=\"a\\\"b\\\\c\\nd\"} 1\n"),
            "{}",
            out.text
        );
    }
}
