//! The identity pipeline: one event through dedup, resolution and a
//! conditional apply, re-planned on conflict. Adapter-agnostic; the rules
//! live in the domain.

use kindred_domain::account::account_update;
use kindred_domain::identifier::{extract_identifiers_with, group_link};
use kindred_domain::{resolve, Event, Identifier, IdentityRules, Incoming, Plan};
use tracing::{debug, warn};

use crate::ports::{Applied, EventRecord, IdentityGraph};
use crate::privacy::Violation;
use crate::{Result, StoreError};

/// The space-level inputs of resolution.
#[derive(Clone, Debug)]
pub struct SpaceRules {
    pub rules: IdentityRules,
}

/// What happened to one event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Recorded on this (root) profile; `created` if the event made it,
    /// `merged` how many profiles it merged into it.
    Recorded {
        profile_id: String,
        created: bool,
        merged: usize,
        /// Identifiers new to Kindred that an existing profile gained
        /// (a member's second email): destinations send them the
        /// profile's current values.
        claimed: Vec<Identifier>,
        /// The rule of each identifier merge protection refused
        /// (`limit`, `merge_cap`, ...: the violations log has them).
        refused: Vec<String>,
    },
    /// Recorded, but every identifier was blocked: attached to no profile.
    Unresolved {
        /// The rule of each identifier refused (`blocked_value`, ...).
        refused: Vec<String>,
    },
    /// Seen before (same space and message id): nothing written.
    Duplicate,
    /// It names a suppressed person (a regulation): dropped, counted,
    /// nothing of it stored.
    Suppressed,
}

/// How often a plan is re-made after conflicts before giving up.
const MAX_ATTEMPTS: usize = 64;

/// One event to resolve, with where it came from.
#[derive(Clone, Copy, Debug)]
pub struct Job<'a> {
    pub space_id: &'a str,
    pub source_id: &'a str,
    pub event: &'a Event,
    /// The event's stored form.
    pub body_json: &'a str,
    /// Processing time.
    pub now: i64,
}

pub async fn process_event<G: IdentityGraph>(
    graph: &mut G,
    rules: &SpaceRules,
    job: &Job<'_>,
    mut new_profile_id: impl FnMut() -> String,
) -> Result<Outcome> {
    let Job {
        space_id,
        source_id,
        event,
        body_json,
        now,
    } = *job;
    let external_ids = extract_identifiers_with(event, rules.rules.sources());
    let ids: Vec<_> = external_ids.iter().map(|e| e.id.clone()).collect();
    // Before anything is read or written: a suppressed person's event
    // leaves no trace, not even its message id.
    if let Some(id) = graph
        .drop_if_suppressed(space_id, &ids, event.received_at)
        .await?
    {
        let violation = Violation::suppressed(space_id, &event.message_id, &id, event.received_at);
        graph.record_violations(space_id, &[violation]).await?;
        return Ok(Outcome::Suppressed);
    }
    let record = EventRecord {
        event,
        body_json,
        source_id,
        external_ids: &external_ids,
        group_id: group_link(event),
        account: account_update(event, source_id),
        now,
    };
    for attempt in 0..MAX_ATTEMPTS {
        if graph.is_duplicate(space_id, &event.message_id).await? {
            graph.record_account(space_id, &record, None).await?;
            return Ok(Outcome::Duplicate);
        }
        let facts = graph.facts(space_id, &ids).await?;
        let candidate = new_profile_id();
        let incoming = Incoming {
            identifiers: &ids,
            traits: event.profile_traits(),
            timestamp: event.timestamp,
            received_at: event.received_at,
            source_id,
        };
        let resolution = resolve(&incoming, &facts, &rules.rules, &candidate);
        // The event that made a profile drop traits records which (in
        // its stored body, shown by the Profile API's `events`).
        let annotated;
        let record = if resolution.dropped_traits.is_empty() {
            record
        } else {
            annotated = with_dropped_traits(body_json, &resolution.dropped_traits)?;
            EventRecord {
                body_json: &annotated,
                ..record
            }
        };
        match graph.apply(space_id, &resolution.plan, &record).await {
            Ok(Applied::Duplicate) => {
                graph.record_account(space_id, &record, None).await?;
                return Ok(Outcome::Duplicate);
            }
            Ok(Applied::Recorded) => {
                graph
                    .record_account(space_id, &record, resolution.plan.profile_id())
                    .await?;
                if !resolution.refusals.is_empty() {
                    let profile_id = resolution.plan.profile_id();
                    let violations: Vec<Violation> = resolution
                        .refusals
                        .iter()
                        .map(|r| {
                            Violation::refused(
                                space_id,
                                &event.message_id,
                                profile_id,
                                r,
                                event.received_at,
                            )
                        })
                        .collect();
                    graph.record_violations(space_id, &violations).await?;
                }
                if !resolution.dropped_traits.is_empty() {
                    // Trait keys are the customer's schema, not their values.
                    warn!(space_id, message_id = %event.message_id,
                  profile_id = resolution.plan.profile_id().unwrap_or_default(),
                  dropped = ?resolution.dropped_traits,
                  "a profile's traits are over 64 KiB: the oldest values were dropped");
                }
                let refused = resolution
                    .refusals
                    .iter()
                    .map(|r| r.rule.name().to_string())
                    .collect();
                return Ok(match &resolution.plan {
                    Plan::Unresolved => Outcome::Unresolved { refused },
                    Plan::Create(c) => Outcome::Recorded {
                        profile_id: c.profile_id.clone(),
                        created: true,
                        merged: 0,
                        claimed: Vec::new(),
                        refused,
                    },
                    Plan::Attach(a) => Outcome::Recorded {
                        profile_id: a.profile_id.clone(),
                        created: false,
                        merged: a.children.len(),
                        claimed: a.claims.iter().map(|c| c.id.clone()).collect(),
                        refused,
                    },
                });
            }
            Err(StoreError::Conflict) => {
                debug!(space_id, attempt, "identity plan conflicted; re-planning");
                if attempt >= 2 {
                    // Workers that keep colliding spread out (jittered backoff).
                    let ms = rand::random_range(0..=attempt.min(20) as u64);
                    graph.backoff(std::time::Duration::from_millis(ms)).await;
                }
                continue;
            }
            Err(e) => return Err(e),
        }
    }
    Err(StoreError::Conflict)
}

/// The stored body with `droppedTraits`: the trait keys the profile
/// dropped to stay within 64 KiB when this event was applied.
fn with_dropped_traits(body_json: &str, dropped: &[String]) -> Result<String> {
    let mut body: serde_json::Map<String, serde_json::Value> = serde_json::from_str(body_json)?;
    body.insert("droppedTraits".into(), serde_json::json!(dropped));
    Ok(serde_json::Value::Object(body).to_string())
}

/// Runs a future that never waits (a pipeline over a synchronous adapter
/// such as SQLite) to completion on the current thread.
///
/// # Panics
/// If the future is not ready on its first poll: only adapters whose
/// operations complete synchronously may be driven this way.
pub fn complete_now<F: std::future::Future>(future: F) -> F::Output {
    let mut future = std::pin::pin!(future);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match future.as_mut().poll(&mut cx) {
        std::task::Poll::Ready(out) => out,
        std::task::Poll::Pending => panic!("a synchronous adapter's future waited"),
    }
}
