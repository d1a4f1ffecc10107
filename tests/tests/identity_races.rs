//! Concurrency: 8 workers, each with its own connections and caches (like
//! separate processes or Lambda instances), race overlapping events
//! (shared devices, group emails, logouts without reset) against each
//! store. One scenario body for both: conflicts must really happen, and
//! the graph must be exactly what a serial replay in commit order gives
//! (grouping, events, merge counts and traits; no limit exceeded, no
//! identifier owned twice, every event attached exactly once).

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use kindred::bench::workload::Workload;
use kindred_aws::DynamoStore;
use kindred_domain::account::{account_update, Account};
use kindred_domain::event::Envelope;
use kindred_domain::{Event, Facts, Identifier, IdentityRules, Plan};
use kindred_sqlite::{GraphAudit, OptimisticGraph, SqliteStore};
use kindred_store::identity::{complete_now, process_event, Job, Outcome, SpaceRules};
use kindred_store::ports::{AccountDoc, Applied, EventRecord, IdentityGraph, Profiles};
use kindred_store::token::new_profile_id;
use kindred_store::Result;
use kindred_tests::{assert_serializable, emulators, fresh_dynamo};

const WORKERS: usize = 8;
const SOURCE: &str = "src_race";
const NOW: i64 = 1_767_225_600_000;

/// What one worker did: events recorded, duplicates, conflicts re-planned.
#[derive(Default)]
struct Tally {
    recorded: usize,
    duplicates: usize,
    conflicts: usize,
}

/// A store the scenario races on.
trait Racer: Send + Sync + 'static {
    /// Applies the events through a worker's own connections.
    async fn work(self: Arc<Self>, events: Vec<Event>) -> Tally;
    /// The space's graph, its events in commit order.
    async fn audit(&self) -> GraphAudit;
    /// One account of the space.
    async fn account(&self, group_id: &str) -> AccountDoc;
}

fn job<'a>(space_id: &'a str, event: &'a Event, body: &'a str) -> Job<'a> {
    Job {
        space_id,
        source_id: SOURCE,
        event,
        body_json: body,
        now: NOW,
    }
}

fn count(tally: &mut Tally, outcome: Outcome) {
    match outcome {
        Outcome::Duplicate => tally.duplicates += 1,
        _ => tally.recorded += 1,
    }
}

/// The scenario: `events` from a workload of `users` people, dealt out to
/// the workers round-robin and applied at once.
async fn race<R: Racer>(racer: Arc<R>, seed: u64, users: usize, events: usize) {
    let rules = IdentityRules::default();
    let mut workload = Workload::new(seed, users);
    let all: Vec<Event> = (0..events).map(|_| parse(workload.next_event())).collect();
    let sent: BTreeSet<String> = all.iter().map(|e| e.message_id.clone()).collect();
    let workers = (0..WORKERS).map(|w| {
        let share = all.iter().skip(w).step_by(WORKERS).cloned().collect();
        Arc::clone(&racer).work(share)
    });
    let mut total = Tally::default();
    for t in futures::future::join_all(workers).await {
        total.recorded += t.recorded;
        total.duplicates += t.duplicates;
        total.conflicts += t.conflicts;
    }
    println!(
        "recorded {}, duplicates {}, conflicts re-planned {}",
        total.recorded, total.duplicates, total.conflicts
    );
    assert!(total.conflicts > 0, "the workers never actually raced");
    assert_eq!(
        total.recorded,
        sent.len(),
        "every distinct event recorded once"
    );
    assert_eq!(total.duplicates, events - sent.len());
    let audit = racer.audit().await;
    assert_serializable(&audit, &rules, &sent);
    assert!(
        audit.roots.len() > users / 4,
        "the workload makes many profiles"
    );
    assert!(
        audit.merges.values().any(|m| *m > 0),
        "the workload merges profiles"
    );
}

fn rules() -> SpaceRules {
    SpaceRules {
        rules: IdentityRules::default(),
    }
}

struct Sqlite {
    dir: tempfile::TempDir,
    space_id: String,
    barrier: Arc<std::sync::Barrier>,
    /// How many of each worker's reads wait for all the others'.
    lockstep: usize,
}

impl Sqlite {
    fn new(dir: tempfile::TempDir, space_id: String, lockstep: usize) -> Self {
        Self {
            dir,
            space_id,
            barrier: Arc::new(std::sync::Barrier::new(WORKERS)),
            lockstep,
        }
    }
}

impl Racer for Sqlite {
    async fn work(self: Arc<Self>, events: Vec<Event>) -> Tally {
        tokio::task::spawn_blocking(move || {
            let store = SqliteStore::open(self.dir.path()).unwrap();
            let mut graph = Watched {
                lockstep: Some((Arc::clone(&self.barrier), self.lockstep)),
                ..Watched::new(OptimisticGraph::new(&store))
            };
            let mut tally = Tally::default();
            for event in &events {
                let body = serde_json::Value::Object(event.body.clone()).to_string();
                let job = job(&self.space_id, event, &body);
                let outcome =
                    complete_now(process_event(&mut graph, &rules(), &job, new_profile_id))
                        .unwrap();
                count(&mut tally, outcome);
            }
            tally.conflicts = graph.conflicts;
            tally
        })
        .await
        .unwrap()
    }

    async fn audit(&self) -> GraphAudit {
        // Events in `seq` order: the order their transactions committed.
        SqliteStore::open(self.dir.path())
            .unwrap()
            .audit(&self.space_id)
            .unwrap()
    }

    async fn account(&self, group_id: &str) -> AccountDoc {
        let store = SqliteStore::open(self.dir.path()).unwrap();
        store
            .account(&self.space_id, group_id)
            .await
            .unwrap()
            .unwrap()
    }
}

/// A worker's graph as the scenario watches it: counts the applies
/// refused by a condition, notes the order in which applies succeed (for
/// a store without a commit sequence), and can hold reads in lockstep.
///
/// Lockstep: on two cores the SQLite workers' threads may, by chance,
/// never be switched between a read of the graph and its apply, and then
/// nothing races. So each worker's first `rounds` reads wait for all the
/// others' at a barrier: the workers plan from one snapshot and apply
/// together, as Lambda instances do. Every worker waits exactly that many
/// times (re-plans included), so none waits forever.
struct Watched<G> {
    inner: G,
    conflicts: usize,
    order: Option<Arc<tokio::sync::Mutex<Vec<String>>>>,
    lockstep: Option<(Arc<std::sync::Barrier>, usize)>,
}

impl<G> Watched<G> {
    fn new(inner: G) -> Self {
        Self {
            inner,
            conflicts: 0,
            order: None,
            lockstep: None,
        }
    }
}

impl<G: IdentityGraph> IdentityGraph for Watched<G> {
    async fn drop_if_suppressed(
        &mut self,
        space_id: &str,
        ids: &[Identifier],
        received_at: kindred_domain::Millis,
    ) -> Result<Option<Identifier>> {
        self.inner
            .drop_if_suppressed(space_id, ids, received_at)
            .await
    }
    async fn record_violations(
        &mut self,
        space_id: &str,
        violations: &[kindred_store::privacy::Violation],
    ) -> Result<()> {
        self.inner.record_violations(space_id, violations).await
    }
    async fn is_duplicate(&mut self, space_id: &str, message_id: &str) -> Result<bool> {
        self.inner.is_duplicate(space_id, message_id).await
    }
    async fn facts(&mut self, space_id: &str, ids: &[Identifier]) -> Result<Facts> {
        let facts = self.inner.facts(space_id, ids).await;
        if let Some((barrier, rounds)) = &mut self.lockstep {
            if *rounds > 0 {
                *rounds -= 1;
                barrier.wait();
            }
        }
        facts
    }
    async fn apply(
        &mut self,
        space_id: &str,
        plan: &Plan,
        record: &EventRecord<'_>,
    ) -> Result<Applied> {
        // Where the store has no commit sequence (DynamoDB), the order of
        // commits is taken as the order of the applies, one at a time:
        // two applies in flight could commit in one order and return in
        // the other. Facts are still read and plans still made
        // concurrently, so a plan from a stale read is still refused by
        // its conditions.
        let mut order = match &self.order {
            Some(order) => Some(order.lock().await),
            None => None,
        };
        let outcome = self.inner.apply(space_id, plan, record).await;
        match (&outcome, order.as_mut()) {
            (Ok(Applied::Recorded), Some(order)) => order.push(record.event.message_id.clone()),
            (Err(kindred_store::StoreError::Conflict), _) => self.conflicts += 1,
            _ => {}
        }
        outcome
    }
    async fn backoff(&mut self, wait: std::time::Duration) {
        self.inner.backoff(wait).await;
    }
    async fn record_account(
        &mut self,
        space_id: &str,
        record: &EventRecord<'_>,
        profile_id: Option<&str>,
    ) -> Result<()> {
        self.inner
            .record_account(space_id, record, profile_id)
            .await
    }
}

struct Dynamo {
    table: String,
    space_id: String,
    order: Arc<tokio::sync::Mutex<Vec<String>>>,
}

impl Racer for Dynamo {
    async fn work(self: Arc<Self>, events: Vec<Event>) -> Tally {
        let config = kindred_tests::aws_config().await;
        let store = DynamoStore::new(aws_sdk_dynamodb::Client::new(&config), &self.table);
        let mut graph = Watched {
            order: Some(Arc::clone(&self.order)),
            ..Watched::new(store.graph())
        };
        let mut tally = Tally::default();
        for event in &events {
            let body = serde_json::Value::Object(event.body.clone()).to_string();
            let job = job(&self.space_id, event, &body);
            let outcome = process_event(&mut graph, &rules(), &job, new_profile_id)
                .await
                .unwrap();
            count(&mut tally, outcome);
        }
        tally.conflicts = graph.conflicts;
        tally
    }

    async fn audit(&self) -> GraphAudit {
        let config = kindred_tests::aws_config().await;
        let store = DynamoStore::new(aws_sdk_dynamodb::Client::new(&config), &self.table);
        let mut audit = store.audit(&self.space_id).await.unwrap();
        // In the order the applies succeeded (DynamoDB has no commit sequence).
        let position: HashMap<String, usize> = self
            .order
            .lock()
            .await
            .iter()
            .enumerate()
            .map(|(i, m)| (m.clone(), i))
            .collect();
        audit.events.sort_by_key(|e| position[&e.message_id]);
        audit
    }

    async fn account(&self, group_id: &str) -> AccountDoc {
        let config = kindred_tests::aws_config().await;
        let store = DynamoStore::new(aws_sdk_dynamodb::Client::new(&config), &self.table);
        store
            .account(&self.space_id, group_id)
            .await
            .unwrap()
            .unwrap()
    }
}

/// Group calls of 24 people for one account, with overlapping trait keys
/// and shuffled times, dealt out to the workers and applied at once: the
/// account ends as the serial application of every call gives (newest
/// value per key, earliest and latest event), with every user linked.
async fn race_accounts<R: Racer>(racer: Arc<R>, seed: u64, calls: usize) {
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(seed);
    let all: Vec<Event> = (0..calls)
        .map(|i| {
            let at = NOW - rand::Rng::random_range(&mut rng, 0..1_000_000i64);
            parse(serde_json::json!({
                "type": "group", "userId": format!("member-{}", i % 24), "groupId": "acme",
                "messageId": format!("grp-{i}"),
                "timestamp": kindred_domain::event::format_millis(at),
                "traits": {format!("k{}", i % 5): i, "seats": i}
            }))
        })
        .collect();
    let updates: Vec<_> = all
        .iter()
        .map(|e| account_update(e, SOURCE).unwrap())
        .collect();
    let mut serial = Account::new(&updates[0]);
    for u in &updates {
        serial.apply(u);
    }
    let workers = (0..WORKERS).map(|w| {
        let share = all.iter().skip(w).step_by(WORKERS).cloned().collect();
        Arc::clone(&racer).work(share)
    });
    futures::future::join_all(workers).await;
    let stored = racer.account("acme").await;
    assert_eq!(
        stored.account, serial,
        "the account of a serial application"
    );
    assert_eq!(stored.users.len(), 24, "every member linked once");
}

fn parse(value: serde_json::Value) -> Event {
    Event::parse(
        value,
        Envelope {
            kind: None,
            received_at: NOW,
            batch_sent_at: None,
            generated_message_id: "unused",
            future_tolerance: kindred_domain::event::DEFAULT_FUTURE_TOLERANCE,
        },
    )
    .expect("the workload only makes valid events")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn eight_workers_racing_on_sqlite_equal_a_serial_replay() {
    let dir = tempfile::tempdir().unwrap();
    let space_id = SqliteStore::open(dir.path())
        .unwrap()
        .create_space("race")
        .unwrap()
        .space_id;
    // Few people, many events: identifiers overlap heavily.
    // Every worker makes far more than 64 reads: 2,500 events each.
    race(Arc::new(Sqlite::new(dir, space_id, 64)), 42, 16, 20_000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_workers_racing_on_dynamodb_equal_a_serial_replay() {
    if !emulators("eight_workers_racing_on_dynamodb_equal_a_serial_replay") {
        return;
    }
    let setup = fresh_dynamo().await;
    let space_id = setup.create_space("race").await.unwrap().space_id;
    let racer = Dynamo {
        table: setup.table().to_string(),
        space_id,
        order: Arc::default(),
    };
    race(Arc::new(racer), 7, 60, 2_400).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn eight_workers_updating_one_account_on_sqlite_equal_a_serial_application() {
    let dir = tempfile::tempdir().unwrap();
    let space_id = SqliteStore::open(dir.path())
        .unwrap()
        .create_space("race")
        .unwrap()
        .space_id;
    race_accounts(Arc::new(Sqlite::new(dir, space_id, 0)), 3, 800).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_workers_updating_one_account_on_dynamodb_equal_a_serial_application() {
    let name = "eight_workers_updating_one_account_on_dynamodb_equal_a_serial_application";
    if !emulators(name) {
        return;
    }
    let setup = fresh_dynamo().await;
    let space_id = setup.create_space("race").await.unwrap().space_id;
    let racer = Dynamo {
        table: setup.table().to_string(),
        space_id,
        order: Arc::default(),
    };
    race_accounts(Arc::new(racer), 5, 400).await;
}
