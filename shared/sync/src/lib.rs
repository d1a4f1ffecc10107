//! The delivery worker: one task per destination drains that
//! destination's outbox in order, a request at a time (so calls about a
//! profile arrive in the order they were logged), batching where the
//! destination allows. A failed request is retried with exponential
//! backoff and jitter, never sooner than the receiver's `Retry-After`;
//! after `max_attempts` its calls go to the dead-letter store. Each
//! destination waits only for itself: a failing one never delays another.
//!
//! The same worker runs in `kindred serve` (over the SQLite outbox) and
//! can run in a Lambda function over any [`Outbox`].

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kindred_domain::sync::{
    is_internal, outcome, parse_retry_after, retry_delay, Kind, Outcome, Unreachable,
    SIGNATURE_HEADER, TIMESTAMP_HEADER,
};
use kindred_store::{now_millis, Attempt, DeliveryError, Outbox, PendingCall, Target, Targets};
use tracing::warn;

/// How hard to try.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// The first retry waits about this long; each next one twice as long.
    pub base: Duration,
    /// No wait is longer (a `Retry-After` may ask for up to 4 times this).
    pub max: Duration,
    /// Attempts before calls go to the dead letters.
    pub max_attempts: u32,
    /// How long one request may take.
    pub timeout: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            base: Duration::from_secs(1),
            max: Duration::from_secs(300),
            // 1 s doubling to 5 min, then every 5 min: about an hour.
            max_attempts: 20,
            timeout: Duration::from_secs(10),
        }
    }
}

/// How often an idle destination looks for new calls, and the worker for
/// new or changed destinations.
const IDLE_POLL: Duration = Duration::from_millis(10);
const TARGETS_POLL: Duration = Duration::from_millis(250);

/// What one delivery step did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// The queue is empty.
    Idle,
    /// A request was made and recorded (delivered, or refused and dead).
    Sent,
    /// A request failed; the next may be made after this wait.
    Retry(Duration),
}

/// A delivery's calls in the AWS functions' embedded metrics (by
/// destination and outcome; `kindred serve` reads them from sync.db).
fn count_delivery(t: &Target, outcome: &'static str, calls: usize) {
    let counts = kindred_store::emf::counts();
    if counts.enabled() {
        counts.delivery(
            format!("{}/{}", t.space_id, t.destination_id),
            outcome,
            calls as u64,
        );
    }
}

/// Counters for benchmarks and tests.
#[derive(Debug, Default)]
pub struct DeliveryStats {
    pub requests: AtomicU64,
    pub delivered: AtomicU64,
    pub failed_requests: AtomicU64,
}

pub struct Deliverer {
    outbox: Arc<dyn Outbox>,
    client: reqwest::Client,
    policy: RetryPolicy,
    /// Whether destinations may be at internal addresses (the operator's
    /// `--allow-private-destinations`).
    allow_private: bool,
    pub stats: Arc<DeliveryStats>,
}

/// Most of a response body that is read (the rest is never downloaded).
pub const MAX_RESPONSE_BYTES: usize = 4096;
/// Most of a refusal's body kept with the error (shown to the admin).
const MAX_ERROR_CHARS: usize = 200;

/// Resolves destination host names and keeps only the addresses that may
/// be called. The client connects to exactly the addresses returned here
/// (there is no second lookup), so a name that resolves to a public
/// address when checked and to 127.0.0.1 a moment later (DNS rebinding)
/// is still never connected to 127.0.0.1.
struct CheckedResolver {
    allow_private: bool,
}

/// A host name that resolved only to internal addresses.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Refused(Unreachable);

impl reqwest::dns::Resolve for CheckedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let allow_private = self.allow_private;
        Box::pin(async move {
            let found: Vec<std::net::SocketAddr> =
                tokio::net::lookup_host((name.as_str(), 0)).await?.collect();
            let allowed: Vec<std::net::SocketAddr> = found
                .iter()
                .copied()
                .filter(|a| allow_private || !is_internal(a.ip()))
                .collect();
            if allowed.is_empty() && !found.is_empty() {
                return Err(Box::new(Refused(Unreachable(format!(
                    "the destination's host name resolves to a loopback, private or otherwise \
                     internal address; Kindred calls internal addresses only when started with {}",
                    kindred_domain::sync::OPT_IN
                ))))
                    as Box<dyn std::error::Error + Send + Sync>);
            }
            Ok(Box::new(allowed.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// Why a request got no answer.
enum NoAnswer {
    /// Worth trying again (timeout, connection refused).
    Transient(String),
    /// The destination may not be called from here: dead letters.
    Refused(String),
}

type Key = (String, String);

impl Deliverer {
    /// `allow_private`: destinations may be at internal addresses and
    /// Segment-compatible hosts may be `http` (off unless the operator
    /// opts in).
    pub fn new(outbox: Arc<dyn Outbox>, policy: RetryPolicy, allow_private: bool) -> Arc<Self> {
        let client = reqwest::Client::builder()
            .timeout(policy.timeout)
            // A redirected POST would be re-sent as a GET without its
            // body and look delivered: a 3xx is an error to see instead.
            .redirect(reqwest::redirect::Policy::none())
            .dns_resolver(Arc::new(CheckedResolver { allow_private }))
            // A proxy would make the connection, not us, to an address
            // that was never checked.
            .no_proxy()
            .user_agent(concat!("kindred/", env!("CARGO_PKG_VERSION")))
            .build()
            .expect("an HTTP client with default TLS settings");
        Arc::new(Self {
            outbox,
            client,
            policy,
            allow_private,
            stats: Arc::default(),
        })
    }

    /// Delivers until `stop` is set: keeps one task per enabled
    /// destination, started and stopped as destinations come and go.
    pub async fn run(self: Arc<Self>, destinations: Arc<dyn Targets>, stop: Arc<AtomicBool>) {
        let live: Arc<Mutex<HashMap<Key, Target>>> = Arc::default();
        let mut tasks: HashMap<Key, tokio::task::JoinHandle<()>> = HashMap::new();
        while !stop.load(Ordering::Relaxed) {
            match destinations.targets().await {
                Ok(targets) => {
                    let mut now: HashMap<Key, Target> = targets
                        .into_iter()
                        .map(|t| ((t.space_id.clone(), t.destination_id.clone()), t))
                        .collect();
                    let keys: Vec<Key> = now.keys().cloned().collect();
                    std::mem::swap(
                        &mut *live.lock().unwrap_or_else(|p| p.into_inner()),
                        &mut now,
                    );
                    // A removed or disabled destination's task stops now
                    // (an interrupted request is sent again later, with
                    // the same messageIds).
                    tasks.retain(|k, t| {
                        let keep = keys.contains(k) && !t.is_finished();
                        if !keep {
                            t.abort();
                        }
                        keep
                    });
                    for key in keys {
                        if let std::collections::hash_map::Entry::Vacant(slot) =
                            tasks.entry(key.clone())
                        {
                            let me = Arc::clone(&self);
                            let (live, stop) = (Arc::clone(&live), Arc::clone(&stop));
                            slot.insert(tokio::spawn(
                                async move { me.drain(key, live, stop).await },
                            ));
                        }
                    }
                }
                Err(e) => warn!(error = %e, "reading destinations failed; retrying"),
            }
            tokio::time::sleep(TARGETS_POLL).await;
        }
        // A task may be waiting out a long backoff: stop it where it is
        // (what it had not recorded is sent again, with the same ids).
        for (_, t) in tasks {
            t.abort();
        }
    }

    /// One destination's loop: the oldest calls, one request at a time.
    async fn drain(&self, key: Key, live: Arc<Mutex<HashMap<Key, Target>>>, stop: Arc<AtomicBool>) {
        while !stop.load(Ordering::Relaxed) {
            let Some(target) = live
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&key)
                .cloned()
            else {
                return;
            };
            match self.deliver_next(&target).await {
                Ok(Step::Idle) => tokio::time::sleep(IDLE_POLL).await,
                Ok(Step::Retry(wait)) => tokio::time::sleep(wait).await,
                Ok(Step::Sent) => {}
                Err(e) => {
                    warn!(space_id = %key.0, destination_id = %key.1, error = %e,
                          "the outbox failed; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
    }

    /// Sends the destination's next request, if any, and records how it
    /// went.
    pub async fn deliver_next(&self, t: &Target) -> kindred_store::Result<Step> {
        let calls = self
            .outbox
            .next_calls(&t.space_id, &t.destination_id, t.settings.batch_size)
            .await?;
        if calls.is_empty() {
            return Ok(Step::Idle);
        }
        let seqs: Vec<i64> = calls.iter().map(|c| c.seq).collect();
        let attempts = calls.iter().map(|c| c.attempts).max().unwrap_or(0) + 1;
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        let result = self.send(t, &calls).await;
        let (status, message, verdict) = match result {
            Ok((status, retry_after, message)) => {
                (Some(status), message, outcome(status, retry_after))
            }
            Err(NoAnswer::Transient(message)) => {
                (None, message, Outcome::Retry { retry_after: None })
            }
            // The destination may not be called from here: retrying
            // cannot help until its settings change.
            Err(NoAnswer::Refused(message)) => (None, message, Outcome::Rejected),
        };
        let at = now_millis();
        match verdict {
            Outcome::Delivered => {
                self.outbox
                    .record(
                        &t.space_id,
                        &t.destination_id,
                        &seqs,
                        Attempt::Delivered { at },
                    )
                    .await?;
                self.stats
                    .delivered
                    .fetch_add(seqs.len() as u64, Ordering::Relaxed);
                count_delivery(t, "delivered", seqs.len());
                Ok(Step::Sent)
            }
            Outcome::Retry { .. } | Outcome::Rejected => {
                self.stats.failed_requests.fetch_add(1, Ordering::Relaxed);
                // A refusal (4xx) cannot be helped by retrying.
                let (dead, retry_after) = match verdict {
                    Outcome::Retry { retry_after } => {
                        (attempts >= self.policy.max_attempts, retry_after)
                    }
                    _ => (true, None),
                };
                warn!(space_id = %t.space_id, destination_id = %t.destination_id,
                      status = ?status, attempts, calls = seqs.len(), dead, "delivery failed");
                self.outbox
                    .record(
                        &t.space_id,
                        &t.destination_id,
                        &seqs,
                        Attempt::Failed {
                            error: DeliveryError {
                                status,
                                message,
                                at,
                            },
                            dead,
                        },
                    )
                    .await?;
                count_delivery(t, if dead { "dead" } else { "retrying" }, seqs.len());
                if dead {
                    return Ok(Step::Sent);
                }
                let wait = retry_delay(
                    attempts,
                    self.policy.base.as_millis() as u64,
                    self.policy.max.as_millis() as u64,
                    rand::random::<f64>(),
                    retry_after,
                );
                Ok(Step::Retry(Duration::from_millis(wait)))
            }
        }
    }

    /// One HTTP request: `(status, Retry-After in ms, message)`, or why
    /// there was no answer.
    async fn send(
        &self,
        t: &Target,
        calls: &[PendingCall],
    ) -> Result<(u16, Option<u64>, String), NoAnswer> {
        // Host names are checked as they resolve; what the URL says alone
        // (an IP literal, `localhost`, http to a Segment host) is checked here.
        t.settings
            .check_reach(self.allow_private)
            .map_err(|e| NoAnswer::Refused(e.0))?;
        // The calls are stored as JSON text: the body is assembled, not
        // re-serialized.
        let body = if t.settings.kind == Kind::Webhook && t.settings.batch_size == 1 {
            calls[0].call.clone()
        } else {
            let mut b =
                String::with_capacity(calls.iter().map(|c| c.call.len() + 1).sum::<usize>() + 12);
            b.push_str("{\"batch\":[");
            for (i, c) in calls.iter().enumerate() {
                if i > 0 {
                    b.push(',');
                }
                b.push_str(&c.call);
            }
            b.push_str("]}");
            b
        };
        let mut req = self
            .client
            .post(t.settings.request_url())
            .header(reqwest::header::CONTENT_TYPE, "application/json");
        match t.settings.kind {
            Kind::Webhook => {
                if let Some(secret) = &t.secret {
                    let timestamp = now_millis() / 1000;
                    req = req.header(TIMESTAMP_HEADER, timestamp.to_string()).header(
                        SIGNATURE_HEADER,
                        kindred_domain::sync::sign(secret.expose(), timestamp, body.as_bytes()),
                    );
                }
            }
            Kind::Segment => {
                req = req.basic_auth(
                    t.secret.as_ref().map(|s| s.expose()).unwrap_or_default(),
                    Some(""),
                );
            }
        }
        let mut response = req.body(body).send().await.map_err(|e| {
            let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&e);
            while let Some(err) = source {
                if let Some(refused) = err.downcast_ref::<Refused>() {
                    return NoAnswer::Refused(refused.0 .0.clone());
                }
                source = err.source();
            }
            NoAnswer::Transient(if e.is_timeout() {
                "the request timed out".to_string()
            } else if e.is_connect() {
                "could not connect".to_string()
            } else {
                "the request failed".to_string()
            })
        })?;
        let status = response.status();
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| parse_retry_after(v, now_millis()));
        let text = if status.is_success() {
            String::new()
        } else {
            // At most 4 KiB of the answer is read, whatever it claims.
            let mut body = Vec::new();
            while body.len() < MAX_RESPONSE_BYTES {
                match response.chunk().await {
                    Ok(Some(chunk)) => {
                        let room = MAX_RESPONSE_BYTES - body.len();
                        body.extend_from_slice(&chunk[..chunk.len().min(room)]);
                    }
                    _ => break,
                }
            }
            let body = String::from_utf8_lossy(&body);
            let reason = status.canonical_reason().unwrap_or("");
            let mut m = format!("{reason}: {}", body.trim());
            if m.len() > MAX_ERROR_CHARS {
                let mut cut = MAX_ERROR_CHARS;
                while !m.is_char_boundary(cut) {
                    cut -= 1;
                }
                m.truncate(cut);
            }
            m
        };
        Ok((status.as_u16(), retry_after, text))
    }
}
