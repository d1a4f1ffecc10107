//! The compute phases of `kindred bench`: 20 computed traits and audiences
//! over the benchmark's profiles (recompute and backfill rates), and the
//! lookback sweep over a million profile states.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use kindred_domain::compute::Class;
use kindred_sqlite::SqliteStore;
use kindred_store::{now_millis, Computations, DefinitionStatus};
use serde_json::{json, Value};

use crate::server::Running;

const HOUR: i64 = 3_600_000;

/// Twenty definitions over the benchmark workload's events, covering every
/// trait type and condition kind. The workload's events are from 2026, so
/// the windows are long enough to hold them.
pub fn definitions() -> Vec<(Class, &'static str, Value)> {
    let year = json!({"days": 400});
    let t = Class::ComputedTrait;
    let a = Class::Audience;
    vec![
        (
            t,
            "orders",
            json!({"type": "event_counter", "event": "Order Completed", "lookback": year}),
        ),
        (
            t,
            "revenue",
            json!({"type": "aggregation", "function": "sum", "event": "Order Completed", "property": "revenue"}),
        ),
        (
            t,
            "revenue_avg",
            json!({"type": "aggregation", "function": "avg", "event": "Order Completed", "property": "revenue", "lookback": year}),
        ),
        (
            t,
            "revenue_max",
            json!({"type": "aggregation", "function": "max", "event": "Order Completed", "property": "revenue", "lookback": year}),
        ),
        (
            t,
            "revenue_min",
            json!({"type": "aggregation", "function": "min", "event": "Product Added", "property": "revenue"}),
        ),
        (
            t,
            "favourite_event",
            json!({"type": "most_frequent", "event": "Product Viewed", "property": "currency", "lookback": year}),
        ),
        (
            t,
            "first_revenue",
            json!({"type": "first", "event": "Product Viewed", "property": "revenue"}),
        ),
        (
            t,
            "last_revenue",
            json!({"type": "last", "event": "Product Added", "property": "revenue", "lookback": year}),
        ),
        (
            t,
            "currencies",
            json!({"type": "unique_list", "event": "Order Completed", "property": "currency", "lookback": year}),
        ),
        (
            t,
            "currency_count",
            json!({"type": "unique_list_count", "event": "Product Viewed", "property": "currency"}),
        ),
        (
            t,
            "big_orders",
            json!({"type": "event_counter", "event": "Order Completed", "where": [{"property": "revenue", "op": ">=", "value": 250}]}),
        ),
        (
            t,
            "pricing_views",
            json!({"type": "event_counter", "event": "Page Viewed", "lookback": year}),
        ),
        (
            a,
            "high_value_users",
            json!({"condition": {"trait": {"name": "revenue", "op": ">", "value": 1000}}}),
        ),
        (
            a,
            "buyers",
            json!({"condition": {"performed": {"event": "Order Completed", "within": year}}}),
        ),
        (
            a,
            "repeat_buyers",
            json!({"condition": {"performed": {"event": "Order Completed", "count": {"at_least": 3}, "within": year}}}),
        ),
        (
            a,
            "cart_abandoners",
            json!({"condition": {"performed": {"event": "Product Added", "within": year, "then_not": {"event": "Order Completed", "within": {"hours": 1}}}}}),
        ),
        (
            a,
            "browsers",
            json!({"condition": {"and": [{"performed": {"event": "Product Viewed", "count": {"at_least": 2}}}, {"not_performed": {"event": "Product Added", "within": year}}]}}),
        ),
        (
            a,
            "pro_plan",
            json!({"condition": {"trait": {"name": "plan", "op": "=", "value": "pro"}}}),
        ),
        (
            a,
            "vip",
            json!({"condition": {"and": [{"audience": "high_value_users"}, {"audience": "repeat_buyers"}]}}),
        ),
        (
            a,
            "lapsed",
            json!({"condition": {"or": [{"not": {"audience": "buyers"}}, {"performed": {"event": "Product Added", "then": {"event": "Order Completed", "within": {"hours": 2}}, "count": {"exactly": 0}}}]}}),
        ),
    ]
}

/// Recomputes every profile of the space and prints the rate.
async fn recompute_all(running: &Running, space_id: &str, label: &str) -> anyhow::Result<()> {
    let compute = &running.local.compute;
    let defs = definitions().len() as f64;
    let before = compute.stats();
    let started = Instant::now();
    let profiles = running.local.store.recompute_all(space_id, now_millis())?;
    running.wait_compute().await?;
    let took = started.elapsed().as_secs_f64();
    let after = compute.stats();
    println!(
        "  {label}: profiles {profiles}, {:.2} s: {:.0} profiles/s, {:.0} profile-definitions/s ({} states rewritten, {} changes)",
        took,
        profiles as f64 / took,
        profiles as f64 * defs / took,
        after.written - before.written,
        after.changes - before.changes
    );
    Ok(())
}

pub async fn define(running: &Running, space_id: &str) -> anyhow::Result<()> {
    for (class, key, body) in definitions() {
        running
            .local
            .store
            .put_definition(space_id, class, key, &body)
            .await
            .with_context(|| format!("defining {key}"))?;
    }
    Ok(())
}

/// After ingest: every profile recomputed on request (twice: as they are,
/// then with every state's next-change time cleared, as a sweep does for
/// the due ones, so that every state is rewritten), then one definition
/// backfilled from history.
pub async fn recompute_and_backfill(
    running: &Running,
    data_dir: &Path,
    space_id: &str,
    events: u64,
) -> anyhow::Result<()> {
    let store = &running.local.store;
    let compute = &running.local.compute;
    let defs = definitions().len() as f64;
    println!();
    println!(
        "recompute of every profile (load state, evaluate {defs} definitions, next change, write)"
    );
    recompute_all(running, space_id, "as stored").await?;
    {
        let conn = rusqlite::Connection::open(data_dir.join("compute.db"))?;
        conn.busy_timeout(Duration::from_secs(30))?;
        conn.execute(
            "UPDATE compute_states SET due = NULL WHERE space_id = ?1",
            [space_id],
        )?;
    }
    recompute_all(running, space_id, "next change cleared").await?;
    let after = compute.stats();

    let started = Instant::now();
    store
        .rebackfill(space_id, Class::ComputedTrait, "revenue")
        .await?
        .context("the revenue definition exists")?;
    running.wait_compute().await?;
    let took = started.elapsed().as_secs_f64();
    let record = store
        .definition(space_id, Class::ComputedTrait, "revenue")
        .await?
        .context("the revenue definition exists")?;
    anyhow::ensure!(
        record.status == DefinitionStatus::Ready,
        "backfill ended {:?}",
        record.status
    );
    let rebuilt = compute.stats().rebuilt - after.rebuilt;
    println!();
    println!("backfill of one definition over the stored history");
    println!(
        "  {rebuilt} profiles rebuilt from {events} events in {took:.2} s: {:.0} profiles/s, {:.0} history events/s",
        rebuilt as f64 / took,
        events as f64 / took
    );
    Ok(())
}

/// Times the lookback sweep over `n` profile states, `due_percent` of them due.
pub fn sweep(n: u64, due_percent: f64) -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("kindred-sweep-bench-{}", std::process::id()));
    let store = SqliteStore::open(&dir)?;
    store.create_space("bench")?;
    let as_of = now_millis();
    let every = (100.0 / due_percent.max(0.0001)).round().max(1.0) as u64;
    let started = Instant::now();
    {
        let mut conn = rusqlite::Connection::open(dir.join("compute.db"))?;
        let tx = conn.transaction()?;
        {
            let mut insert = tx.prepare(
                "INSERT INTO compute_states (space_id, profile_id, state, computed, due) VALUES ('bench', ?1, '{\"defs\":{}}', '{}', ?2)",
            )?;
            for i in 0..n {
                let due = if i % every == 0 {
                    as_of - (i as i64 % 100) * 1000
                } else {
                    as_of + (1 + i as i64 % 2000) * HOUR
                };
                insert.execute(rusqlite::params![format!("prf_{i:012}"), due])?;
            }
        }
        tx.commit()?;
    }
    println!(
        "lookback sweep: {n} profile states, {due_percent}% due (seeded in {:.1} s)",
        started.elapsed().as_secs_f64()
    );
    let started = Instant::now();
    let enqueued = store.sweep("bench", as_of)?;
    let first = started.elapsed();
    let started = Instant::now();
    let again = store.sweep("bench", as_of)?;
    let second = started.elapsed();
    println!(
        "  sweep as of now: {enqueued} profiles enqueued in {:.1} ms; again (none due): {again} in {:.2} ms",
        first.as_secs_f64() * 1000.0,
        second.as_secs_f64() * 1000.0
    );
    println!(
        "{}",
        json!({"sweep_profiles": n, "due": enqueued, "sweep_ms": first.as_secs_f64() * 1000.0})
    );
    drop(store);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
