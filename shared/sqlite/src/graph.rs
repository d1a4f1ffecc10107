//! The identity graph inside one SQLite write transaction. Every write is
//! conditional, as it will be on DynamoDB: a profile row is updated only at
//! the version read and while it is a root, an identifier is claimed by a
//! primary-key insert, a message id is recorded once. A failed condition
//! rolls the event's savepoint back and reports a conflict.

use std::collections::{HashMap, HashSet};

use kindred_domain::account::{Account, AccountUpdate};
use kindred_domain::{Condition, Facts, Identifier, IdentifierEntry, Plan, ProfileFacts, Traits};
use rusqlite::{params, Connection, OptionalExtension, Transaction};

use super::SqliteStore;

use kindred_store::identity::complete_now;
use kindred_store::ports::{Applied, EventRecord, IdentityGraph};
use kindred_store::{now_millis, Result, StoreError};

pub struct TxGraph<'a> {
    tx: &'a Transaction<'a>,
    observed: Observed,
    /// Which spaces have a suppression list, read once per transaction.
    suppressing: super::privacy::SuppressionCache,
    /// The event being applied as its queue entry holds it: where its
    /// JSON is (address and length) and that JSON already compressed
    /// ([`TxGraph::queued`]).
    queued: Option<((usize, usize), &'a [u8])>,
    /// The message id (space, id) this transaction claimed for the event
    /// being applied: [`IdentityGraph::is_duplicate`] inserts it as it
    /// checks (one B-tree descent instead of a read and then an insert),
    /// and the event's writes then leave it out.
    claimed: Option<(String, String)>,
}

/// What reads in this transaction established since its last write. In
/// one write transaction nothing else can change the graph, so a plan
/// whose every condition was observed here needs no second read.
#[derive(Default)]
struct Observed {
    space_id: String,
    unique_message: Option<String>,
    roots: HashMap<String, u64>,
    unowned: HashSet<Identifier>,
}

impl Observed {
    /// Whether every condition of `plan` (but a new profile id's
    /// freshness) was read in this transaction since its last write.
    fn vouches_for(&self, space_id: &str, message_id: &str, plan: &Plan) -> bool {
        if self.space_id != space_id || self.unique_message.as_deref() != Some(message_id) {
            return false;
        }
        let root_at = |id: &str, v: u64| self.roots.get(id) == Some(&v);
        match plan {
            Plan::Unresolved | Plan::Create(_) => false,
            Plan::Attach(a) => {
                self.roots.contains_key(&a.profile_id)
                    && (root_at(&a.profile_id, a.expected_version) || !plan.writes_root())
                    && a.children.iter().all(|(c, v)| root_at(c, *v))
                    && a.claims.iter().all(|e| self.unowned.contains(&e.id))
            }
        }
    }
}

impl<'a> TxGraph<'a> {
    pub fn new(tx: &'a Transaction<'a>) -> Self {
        Self {
            tx,
            observed: Observed::default(),
            suppressing: Default::default(),
            queued: None,
            claimed: None,
        }
    }

    fn claimed(&self, space_id: &str, message_id: &str) -> bool {
        self.claimed
            .as_ref()
            .is_some_and(|(s, m)| s == space_id && m == message_id)
    }

    /// Names the body of the event about to be applied, and its stored
    /// form as the queue already compressed it (`None`: not at hand): an
    /// event recorded with exactly that body (the same string, not an
    /// equal one) is stored with those bytes instead of being compressed
    /// again; one annotated on the way, with the traits a profile
    /// dropped, is a new string and is compressed afresh.
    pub fn queued(&mut self, body_json: &str, compressed: Option<&'a [u8]>) {
        self.queued = compressed.map(|c| (address(body_json), c));
    }

    /// The stored form of `body_json`, if it is the queued body.
    fn compressed(&self, body_json: &str) -> Option<&'a [u8]> {
        self.queued
            .filter(|(at, _)| *at == address(body_json))
            .map(|(_, compressed)| compressed)
    }
}

/// Where a string is: compared, never followed (the queued body is
/// alive for as long as its event is applied, so no other string can be
/// at its address then).
fn address(s: &str) -> (usize, usize) {
    (s.as_ptr() as usize, s.len())
}

/// Turns "no row matched" or a key collision into a conflict.
fn expect_one(changed: usize) -> Result<()> {
    if changed == 1 {
        Ok(())
    } else {
        Err(StoreError::Conflict)
    }
}

fn claim_error(e: rusqlite::Error) -> StoreError {
    match e {
        rusqlite::Error::SqliteFailure(f, _)
            if f.code == rusqlite::ErrorCode::ConstraintViolation =>
        {
            StoreError::Conflict
        }
        other => other.into(),
    }
}

fn is_duplicate(conn: &Connection, space_id: &str, message_id: &str) -> Result<bool> {
    let mut stmt =
        conn.prepare_cached("SELECT 1 FROM messages WHERE space_id = ?1 AND message_id = ?2")?;
    Ok(stmt.exists(params![space_id, message_id])?)
}

/// Records a message id as seen; `false` if it already was.
fn claim_message(conn: &Connection, space_id: &str, message_id: &str, now: i64) -> Result<bool> {
    let inserted = conn
        .prepare_cached(
            "INSERT INTO messages (space_id, message_id, seen_at) VALUES (?1, ?2, ?3)
             ON CONFLICT DO NOTHING",
        )?
        .execute(params![space_id, message_id, now])?;
    Ok(inserted == 1)
}

fn read_facts(conn: &Connection, space_id: &str, ids: &[Identifier]) -> Result<Facts> {
    let mut facts = Facts::default();
    let mut owner_stmt = conn.prepare_cached(
        "SELECT profile_id FROM identifiers WHERE space_id = ?1 AND id_type = ?2 AND id_value = ?3",
    )?;
    let mut profile_stmt = conn.prepare_cached(
        "SELECT parent_id, version, created_at, merges, identifiers, traits
             FROM profiles WHERE space_id = ?1 AND profile_id = ?2",
    )?;
    let mut roots: HashMap<String, String> = HashMap::new();
    for id in ids {
        let owner: Option<String> = owner_stmt
            .query_row(params![space_id, id.kind, id.value], |r| r.get(0))
            .optional()?;
        let Some(mut current) = owner else { continue };
        if let Some(root) = roots.get(&current) {
            facts.owners.insert(id.clone(), root.clone());
            continue;
        }
        let start = current.clone();
        // Follow merge pointers to the root.
        loop {
            let row = profile_stmt
                .query_row(params![space_id, current], |r| {
                    Ok((
                        r.get::<_, Option<String>>(0)?,
                        r.get::<_, i64>(1)?,
                        r.get::<_, i64>(2)?,
                        r.get::<_, i64>(3)?,
                        r.get::<_, String>(4)?,
                        r.get::<_, String>(5)?,
                    ))
                })
                .optional()?;
            let Some((parent, version, created_at, merges, identifiers, traits)) = row else {
                return Err(StoreError::NotFound);
            };
            match parent {
                Some(p) => current = p,
                None => {
                    if !facts.profiles.contains_key(&current) {
                        let identifiers: Vec<IdentifierEntry> = serde_json::from_str(&identifiers)?;
                        let traits: Traits = serde_json::from_str(&traits)?;
                        facts.profiles.insert(
                            current.clone(),
                            ProfileFacts {
                                id: current.clone(),
                                version: version as u64,
                                created_at,
                                merges: merges as u32,
                                identifiers,
                                traits,
                            },
                        );
                    }
                    break;
                }
            }
        }
        roots.insert(start, current.clone());
        facts.owners.insert(id.clone(), current);
    }
    // Profiles split apart must not merge again: only an event naming two
    // or more profiles needs to know.
    if facts.profiles.len() > 1 {
        let mut stmt = conn.prepare_cached(
            "SELECT 1 FROM split_blocks WHERE space_id = ?1 AND a = ?2 AND b = ?3",
        )?;
        let ids: Vec<&String> = facts.profiles.keys().collect();
        let mut apart = Vec::new();
        for a in &ids {
            for b in &ids {
                if a != b && stmt.exists(params![space_id, a, b])? {
                    apart.push(((*a).clone(), (*b).clone()));
                }
            }
        }
        facts.apart.extend(apart);
    }
    Ok(facts)
}

impl IdentityGraph for TxGraph<'_> {
    async fn drop_if_suppressed(
        &mut self,
        space_id: &str,
        ids: &[Identifier],
        received_at: kindred_domain::Millis,
    ) -> Result<Option<Identifier>> {
        super::privacy::drop_if_suppressed(
            self.tx,
            &mut self.suppressing,
            space_id,
            ids,
            received_at,
        )
    }

    async fn record_violations(
        &mut self,
        space_id: &str,
        violations: &[kindred_store::privacy::Violation],
    ) -> Result<()> {
        super::privacy::record_violations(self.tx, space_id, violations)
    }

    async fn is_duplicate(&mut self, space_id: &str, message_id: &str) -> Result<bool> {
        // Asked again after a conflict: the claim is this event's.
        if self.claimed(space_id, message_id) {
            return Ok(false);
        }
        // The claim is the check. Every way on from a "not seen" either
        // records the event (the claim is then its message row) or fails
        // the transaction, which takes the claim back with it.
        let seen = !claim_message(self.tx, space_id, message_id, now_millis())?;
        if !seen {
            self.claimed = Some((space_id.to_string(), message_id.to_string()));
            if self.observed.space_id != space_id {
                self.observed = Observed {
                    space_id: space_id.to_string(),
                    ..Observed::default()
                };
            }
            self.observed.unique_message = Some(message_id.to_string());
        }
        Ok(seen)
    }

    async fn facts(&mut self, space_id: &str, ids: &[Identifier]) -> Result<Facts> {
        let facts = read_facts(self.tx, space_id, ids)?;
        if self.observed.space_id == space_id {
            self.observed.roots = facts
                .profiles
                .values()
                .map(|p| (p.id.clone(), p.version))
                .collect();
            self.observed.unowned = ids
                .iter()
                .filter(|i| !facts.owners.contains_key(*i))
                .cloned()
                .collect();
        }
        Ok(facts)
    }

    async fn apply(
        &mut self,
        space_id: &str,
        plan: &Plan,
        record: &EventRecord<'_>,
    ) -> Result<Applied> {
        // Conditions are checked before anything is written, inside the
        // write transaction, so a refused plan leaves no trace. The writes
        // repeat the conditions; one failing now means the store broke an
        // invariant, and the error aborts the whole transaction.
        let message_id = &record.event.message_id;
        let claimed = self.claimed(space_id, message_id);
        if !self.observed.vouches_for(space_id, message_id, plan) {
            if !claimed && is_duplicate(self.tx, space_id, message_id)? {
                return Ok(Applied::Duplicate);
            }
            check_conditions(self.tx, space_id, plan)?;
        }
        self.observed = Observed::default();
        let compressed = self.compressed(record.body_json);
        let applied = apply_writes(self.tx, space_id, plan, record, claimed, compressed).map_err(
            |e| match e {
                StoreError::Conflict => {
                    StoreError::Invariant("a checked condition failed on write")
                }
                other => other,
            },
        )?;
        self.claimed = None;
        Ok(applied)
    }

    async fn backoff(&mut self, wait: std::time::Duration) {
        // One writer owns the transaction: nothing else can be racing it,
        // but waiting keeps the behaviour the same as other adapters.
        std::thread::sleep(wait);
    }

    // (`record_account`: the trait's no-op; accounts are written with
    // the event, in [`write_account`].)
}

/// Fails with a conflict unless every condition of the plan holds.
fn check_conditions(conn: &Connection, space_id: &str, plan: &Plan) -> Result<()> {
    let mut owned = conn.prepare_cached(
        "SELECT 1 FROM identifiers WHERE space_id = ?1 AND id_type = ?2 AND id_value = ?3",
    )?;
    let mut profile = conn.prepare_cached(
        "SELECT version, parent_id IS NULL FROM profiles WHERE space_id = ?1 AND profile_id = ?2",
    )?;
    let mut state = |id: &str| -> Result<Option<(u64, bool)>> {
        Ok(profile
            .query_row(params![space_id, id], |r| {
                Ok((r.get::<_, i64>(0)? as u64, r.get::<_, bool>(1)?))
            })
            .optional()?)
    };
    for condition in plan.conditions() {
        let holds = match condition {
            Condition::Absent(id) => state(id)?.is_none(),
            Condition::Exists(id) => state(id)?.is_some(),
            Condition::RootAt(id, version) => state(id)? == Some((version, true)),
            Condition::Unclaimed(id) => !owned.exists(params![space_id, id.kind, id.value])?,
        };
        if !holds {
            return Err(StoreError::Conflict);
        }
    }
    Ok(())
}

/// The conditional writes of one plan.
fn apply_writes(
    sp: &Transaction<'_>,
    space_id: &str,
    plan: &Plan,
    record: &EventRecord<'_>,
    message_claimed: bool,
    compressed: Option<&[u8]>,
) -> Result<Applied> {
    let event = record.event;
    if !message_claimed && !claim_message(sp, space_id, &event.message_id, record.now)? {
        return Err(StoreError::Conflict);
    }
    let claim = |entries: &[IdentifierEntry], profile_id: &str| -> Result<()> {
        let mut stmt = sp.prepare_cached(
            "INSERT INTO identifiers (space_id, id_type, id_value, profile_id, created_at,
                     first_message_id, source_id, encoding)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        )?;
        for e in entries {
            stmt.execute(params![
                space_id,
                e.id.kind,
                e.id.value,
                profile_id,
                e.added_at,
                event.message_id,
                record.source_id,
                record.encoding_of(&e.id),
            ])
            .map_err(claim_error)?;
        }
        Ok(())
    };
    let profile_id = match plan {
        Plan::Unresolved => None,
        Plan::Create(c) => {
            sp.prepare_cached(
                "INSERT INTO profiles (space_id, profile_id, parent_id, version, created_at,
                         updated_at, first_message_id, last_message_id, merges, identifiers, traits)
                     VALUES (?1, ?2, NULL, 1, ?3, ?3, ?4, ?4, 0, ?5, ?6)",
            )?
            .execute(params![
                space_id,
                c.profile_id,
                c.created_at,
                event.message_id,
                serde_json::to_string(&c.identifiers)?,
                serde_json::to_string(&c.traits)?,
            ])
            .map_err(claim_error)?;
            claim(&c.identifiers, &c.profile_id)?;
            Some(c.profile_id.as_str())
        }
        Plan::Attach(a) => {
            merge_children(sp, space_id, a, record)?;
            if plan.writes_root() {
                update_root(sp, space_id, a, record)?;
            }
            // Otherwise nothing about identity or traits changes: only the
            // event is written (the profile's last activity is read from
            // its events).
            claim(&a.claims, &a.profile_id)?;
            Some(a.profile_id.as_str())
        }
    };
    insert_event(sp, space_id, profile_id, record, compressed)?;
    Ok(Applied::Recorded)
}

/// The profiles merged by an attach: each pointed at its new parent (at
/// the version read), with its merge record and log entry.
fn merge_children(
    sp: &Transaction<'_>,
    space_id: &str,
    a: &kindred_domain::Attach,
    record: &EventRecord<'_>,
) -> Result<()> {
    let event = record.event;
    for (child, version) in &a.children {
        let changed = sp
            .prepare_cached(
                "UPDATE profiles SET parent_id = ?3, version = version + 1
                     WHERE space_id = ?1 AND profile_id = ?2 AND version = ?4
                       AND parent_id IS NULL",
            )?
            .execute(params![space_id, child, a.profile_id, *version as i64])?;
        expect_one(changed)?;
        sp.prepare_cached(
            "INSERT INTO merges (space_id, child_id, parent_id, message_id, merged_at)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
        )?
        .execute(params![
            space_id,
            child,
            a.profile_id,
            event.message_id,
            record.now
        ])
        .map_err(claim_error)?;
        sp.prepare_cached(
            "INSERT INTO merge_log (space_id, child_id, parent_id, merged_at)
                 VALUES (?1, ?2, ?3, ?4)",
        )?
        .execute(params![space_id, child, a.profile_id, record.now])?;
    }
    Ok(())
}

/// The root an attach writes, at the version read.
fn update_root(
    sp: &Transaction<'_>,
    space_id: &str,
    a: &kindred_domain::Attach,
    record: &EventRecord<'_>,
) -> Result<()> {
    let event = record.event;
    let identifiers = a
        .identifiers
        .as_ref()
        .map(serde_json::to_string)
        .transpose()?;
    let traits = a.traits.as_ref().map(serde_json::to_string).transpose()?;
    let changed = sp
        .prepare_cached(
            "UPDATE profiles SET version = version + 1,
                         identifiers = COALESCE(?4, identifiers),
                         traits = COALESCE(?5, traits),
                         merges = ?6,
                         updated_at = MAX(updated_at, ?7),
                         last_message_id = ?8
                     WHERE space_id = ?1 AND profile_id = ?2 AND version = ?3
                       AND parent_id IS NULL",
        )?
        .execute(params![
            space_id,
            a.profile_id,
            a.expected_version as i64,
            identifiers,
            traits,
            a.merges,
            event.timestamp,
            event.message_id,
        ])?;
    expect_one(changed)?;
    Ok(())
}

/// The event itself, on its profile, and the group it links to;
/// `compressed` is its body already compressed, if it is at hand.
fn insert_event(
    sp: &Transaction<'_>,
    space_id: &str,
    profile_id: Option<&str>,
    record: &EventRecord<'_>,
    compressed: Option<&[u8]>,
) -> Result<()> {
    let event = record.event;
    let body = match compressed {
        Some(bytes) => std::borrow::Cow::Borrowed(bytes),
        None => std::borrow::Cow::Owned(super::body::encode(record.body_json)?),
    };
    sp.prepare_cached(
        "INSERT INTO events (space_id, profile_id, ts, message_id, name, body)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?
    .execute(params![
        space_id,
        profile_id,
        event.timestamp,
        event.message_id,
        event.name,
        body,
    ])?;
    if let (Some(profile_id), Some(group_id)) = (profile_id, record.group_id) {
        sp.prepare_cached(
            "INSERT INTO links (space_id, profile_id, group_id, linked_at, message_id)
                 VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT DO NOTHING",
        )?
        .execute(params![
            space_id,
            profile_id,
            group_id,
            event.timestamp,
            event.message_id
        ])?;
    }
    if let Some(update) = &record.account {
        // A group call links its user to the account.
        let user = profile_id.filter(|_| record.group_id.is_some());
        write_account(sp, space_id, user, update, sp.last_insert_rowid())?;
    }
    Ok(())
}

/// The event's account, its event index row and its link to the user, in
/// the event's own transaction (so [`IdentityGraph::record_account`] has
/// nothing left to do here).
fn write_account(
    sp: &Transaction<'_>,
    space_id: &str,
    profile_id: Option<&str>,
    update: &AccountUpdate<'_>,
    event_seq: i64,
) -> Result<()> {
    let stored: Option<String> = sp
        .prepare_cached("SELECT account FROM accounts WHERE space_id = ?1 AND group_id = ?2")?
        .query_row(params![space_id, update.group_id], |r| r.get(0))
        .optional()?;
    let account = match stored {
        None => Some(Account::new(update)),
        Some(json) => {
            let mut account: Account = serde_json::from_str(&json)?;
            account.apply(update).then_some(account)
        }
    };
    if let Some(account) = account {
        sp.prepare_cached(
            "INSERT INTO accounts (space_id, group_id, account) VALUES (?1, ?2, ?3)
             ON CONFLICT (space_id, group_id) DO UPDATE SET account = excluded.account",
        )?
        .execute(params![
            space_id,
            update.group_id,
            serde_json::to_string(&account)?
        ])?;
    }
    sp.prepare_cached(
        "INSERT INTO account_events (space_id, group_id, ts, seq) VALUES (?1, ?2, ?3, ?4)",
    )?
    .execute(params![
        space_id,
        update.group_id,
        update.timestamp,
        event_seq
    ])?;
    if let Some(profile_id) = profile_id {
        sp.prepare_cached(
            "INSERT INTO account_users (space_id, group_id, profile_id) VALUES (?1, ?2, ?3)
             ON CONFLICT DO NOTHING",
        )?
        .execute(params![space_id, update.group_id, profile_id])?;
    }
    Ok(())
}

/// The identity graph as a fleet of DynamoDB workers sees it: facts come
/// from a read snapshot outside any write transaction, and each apply is a
/// conditional transaction of its own that fails if the snapshot went
/// stale. Races between workers are real here, and so are conflicts.
pub struct OptimisticGraph<'a> {
    store: &'a SqliteStore,
    /// Applies refused because a condition no longer held.
    pub conflicts: u64,
}

impl<'a> OptimisticGraph<'a> {
    pub fn new(store: &'a SqliteStore) -> Self {
        Self {
            store,
            conflicts: 0,
        }
    }
}

impl IdentityGraph for OptimisticGraph<'_> {
    async fn drop_if_suppressed(
        &mut self,
        space_id: &str,
        ids: &[Identifier],
        received_at: kindred_domain::Millis,
    ) -> Result<Option<Identifier>> {
        self.store
            .with_graph(|g| complete_now(g.drop_if_suppressed(space_id, ids, received_at)))
    }

    async fn record_violations(
        &mut self,
        space_id: &str,
        violations: &[kindred_store::privacy::Violation],
    ) -> Result<()> {
        self.store
            .with_graph(|g| complete_now(g.record_violations(space_id, violations)))
    }

    async fn is_duplicate(&mut self, space_id: &str, message_id: &str) -> Result<bool> {
        is_duplicate(&*self.store.reader()?, space_id, message_id)
    }

    async fn facts(&mut self, space_id: &str, ids: &[Identifier]) -> Result<Facts> {
        let reader = self.store.reader()?;
        let tx = reader.unchecked_transaction()?;
        read_facts(&tx, space_id, ids)
    }

    async fn apply(
        &mut self,
        space_id: &str,
        plan: &Plan,
        record: &EventRecord<'_>,
    ) -> Result<Applied> {
        let outcome = self
            .store
            .with_graph(|g| complete_now(g.apply(space_id, plan, record)));
        if matches!(outcome, Err(StoreError::Conflict)) {
            self.conflicts += 1;
        }
        outcome
    }

    async fn backoff(&mut self, wait: std::time::Duration) {
        std::thread::sleep(wait);
    }

    // (`record_account`: the trait's no-op; accounts are written with
    // the event, in [`write_account`].)
}
