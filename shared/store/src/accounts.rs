//! Account-level computed traits and audiences (Segment's account-level
//! audiences), computed the same way on every store: a pass over a
//! space's accounts reads each account's traits and users through the
//! [`Profiles`] port, evaluates the account definitions
//! ([`Ruleset::evaluate_account`]), and stores the values with their
//! changes through [`Computations::write_account_values`], conditionally
//! on the version it read.
//!
//! Like Segment's (computed "roughly every hour"), the pass runs as a
//! batch: with every lookback run (hourly, and on request) rather than
//! per event. Its cost is one read of each account and of its users, and
//! of their events when a definition reads events.

use kindred_domain::compute::{settle_account, Class, Definition, EventFacts, Member, Ruleset};
use kindred_domain::{Event, Millis};

use crate::compute::{parse_stored_event, plain, stamp};
use crate::ports::{Computations, EventQuery, ProfileLookup, ProfileParts, Profiles};
use crate::Result;

/// Accounts read per page of the pass.
const PAGE: usize = 500;
/// Events read per page of a user's history.
const EVENTS_PAGE: usize = 1_000;
/// How often an account's write is tried again after another pass
/// changed its values first.
const ATTEMPTS: usize = 3;

/// What one pass did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AccountPass {
    pub accounts: u64,
    pub changes: u64,
}

/// The space's definitions as a ruleset (user- and account-level).
pub async fn ruleset(store: &(impl Computations + ?Sized), space_id: &str) -> Result<Ruleset> {
    let mut defs = Vec::new();
    for class in [Class::ComputedTrait, Class::Audience] {
        for r in store.definitions(space_id, class).await? {
            defs.push(Definition::parse(class, &r.key, r.version, &r.body)?);
        }
    }
    Ok(Ruleset::new(defs)?)
}

/// Evaluates every account of the space at `now` and stores what changed.
pub async fn run(
    profiles: &(impl Profiles + ?Sized),
    store: &(impl Computations + ?Sized),
    space_id: &str,
    now: Millis,
) -> Result<AccountPass> {
    let ruleset = ruleset(store, space_id).await?;
    let mut pass = AccountPass::default();
    if ruleset.account_definitions().is_empty() {
        return Ok(pass);
    }
    let mut after = String::new();
    loop {
        let ids = store.account_ids(space_id, &after, PAGE).await?;
        for group_id in &ids {
            pass.changes += evaluate(profiles, store, &ruleset, space_id, group_id, now).await?;
            pass.accounts += 1;
        }
        match ids.last() {
            Some(last) if ids.len() == PAGE => after = last.clone(),
            _ => return Ok(pass),
        }
    }
}

/// One user of an account, as read.
struct User {
    traits: kindred_domain::Traits,
    values: kindred_domain::compute::Values,
    events: Vec<Event>,
}

/// Evaluates one account and stores its values; returns how many changes
/// it logged.
async fn evaluate(
    profiles: &(impl Profiles + ?Sized),
    store: &(impl Computations + ?Sized),
    ruleset: &Ruleset,
    space_id: &str,
    group_id: &str,
    now: Millis,
) -> Result<u64> {
    for _ in 0..ATTEMPTS {
        let (stored, version) = store.account_values(space_id, group_id).await?;
        let Some(doc) = profiles.account(space_id, group_id).await? else {
            return Ok(0);
        };
        let users = users(profiles, ruleset, space_id, &doc.users).await?;
        let facts: Vec<Vec<EventFacts<'_>>> = users
            .iter()
            .map(|u| u.events.iter().filter_map(Event::facts).collect())
            .collect();
        let members: Vec<Member<'_>> = users
            .iter()
            .zip(&facts)
            .map(|(u, f)| Member {
                traits: &u.traits,
                values: &u.values,
                events: f,
            })
            .collect();
        let computed = ruleset.evaluate_account(&doc.account.traits, &members, now);
        let (settled, changes) = settle_account(ruleset, &plain(&stored), &computed);
        if changes.is_empty() && settled == plain(&stored) {
            return Ok(0);
        }
        let values = stamp(settled, stored, now, |k| {
            (ruleset.account_definitions().iter())
                .find(|d| d.key == k)
                .map(Definition::class)
        });
        if store
            .write_account_values(space_id, group_id, version, &values, &changes, now)
            .await?
        {
            return Ok(changes.len() as u64);
        }
    }
    // Another pass keeps moving it: it has the newer reading.
    Ok(0)
}

/// The account's users as root profiles (each once, however many of
/// its linked profiles merged into it), with their history when some
/// definition reads events.
async fn users(
    store: &(impl Profiles + ?Sized),
    ruleset: &Ruleset,
    space_id: &str,
    linked: &[String],
) -> Result<Vec<User>> {
    let parts = ProfileParts {
        computed: true,
        ..ProfileParts::default()
    };
    let mut seen = std::collections::BTreeSet::new();
    let mut out = Vec::new();
    for id in linked {
        let lookup = ProfileLookup::ProfileId(id.clone());
        let Some(doc) = store.profile(space_id, &lookup, parts).await? else {
            continue;
        };
        if !seen.insert(doc.profile_id.clone()) {
            continue;
        }
        let mut events = Vec::new();
        if ruleset.accounts_read_events() {
            let mut query = EventQuery {
                limit: EVENTS_PAGE,
                ..EventQuery::default()
            };
            loop {
                let page = store.events(space_id, &doc.tree, &query).await?;
                for e in &page {
                    events.push(parse_stored_event(&e.body)?);
                }
                match page.last() {
                    Some(last) if page.len() == EVENTS_PAGE => {
                        query.after = Some((last.timestamp, last.seq))
                    }
                    _ => break,
                }
            }
        }
        out.push(User {
            traits: doc.traits,
            values: plain(&doc.computed),
            events,
        });
    }
    Ok(out)
}
