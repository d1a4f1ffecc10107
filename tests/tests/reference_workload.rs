//! Kindred's graph against an independent reference: `gen.py` (in
//! `tests/reference`, a copy of the project's bench generator) writes a
//! deterministic 20,000-event Segment workload with shared devices, group
//! emails, blocked ids, retries and mixed-case emails; the batches go
//! through `POST /v1/batch` in file order; the graph the server builds
//! must have exactly the counts that `ceiling` (the in-memory reference
//! resolution of `../shared/bench`) printed for the same workload, kept
//! in `tests/reference/seed1-users2000-events20000.txt` (see the README
//! there to regenerate it).

use std::path::Path;
use std::process::Command;

use crate::common::Server;

const REFERENCE: &str = "seed1-users2000-events20000.txt";

/// Every number in a line, in order.
fn numbers(line: &str) -> Vec<u64> {
    line.split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().unwrap())
        .collect()
}

/// The reference's line that starts with `label`, as numbers.
fn reference(text: &str, label: &str) -> Vec<u64> {
    let line = text
        .lines()
        .find(|l| l.starts_with(label))
        .unwrap_or_else(|| panic!("the reference has no `{label}` line"));
    numbers(line.trim_start_matches(label))
}

fn count(db: &rusqlite::Connection, space_id: &str, sql: &str) -> u64 {
    db.query_row(sql, [space_id], |r| r.get::<_, i64>(0))
        .unwrap_or_else(|e| panic!("{sql}: {e}")) as u64
}

/// Every profile with its root, for counting per person.
const ROOTS: &str = "WITH RECURSIVE up(profile_id, root) AS (
        SELECT profile_id, profile_id FROM profiles WHERE space_id = ?1 AND parent_id IS NULL
        UNION ALL
        SELECT p.profile_id, up.root FROM profiles p JOIN up ON p.parent_id = up.profile_id
        WHERE p.space_id = ?1)";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_graph_has_the_reference_counts_of_a_generated_workload() {
    let here = Path::new(env!("CARGO_MANIFEST_DIR")).join("reference");
    let expected = std::fs::read_to_string(here.join(REFERENCE)).unwrap();
    let work = tempfile::tempdir().unwrap();
    let batches = work.path().join("batches");
    let out = Command::new("python3")
        .arg(here.join("gen.py"))
        .args(["--users", "2000", "--events", "20000", "--seed", "1"])
        .arg("--out")
        .arg(work.path().join("events.jsonl"))
        .arg("--batch-out")
        .arg(&batches)
        .output()
        .expect("python3 runs gen.py");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let server = Server::start().await;
    let mut files: Vec<_> = std::fs::read_dir(&batches)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert_eq!(files.len(), 200, "100 events a batch");
    for file in &files {
        let reply = server
            .post_raw(
                "/v1/batch",
                std::fs::read(file).unwrap(),
                &[("content-type", "application/json")],
            )
            .await;
        assert_eq!(reply.status, 200, "{file:?}: {}", reply.body);
    }
    server.settle().await;

    let db = rusqlite::Connection::open_with_flags(
        server.dir.path().join("store.db"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .unwrap();
    let space = server.space.space_id.as_str();
    let q = |sql: &str| count(&db, space, sql);

    let input = reference(&expected, "input");
    let messages = q("SELECT count(*) FROM messages WHERE space_id = ?1");
    let unattached = q("SELECT count(*) FROM events WHERE space_id = ?1 AND profile_id IS NULL");
    assert_eq!(
        vec![input[0] - messages, unattached],
        reference(&expected, "dedups"),
        "duplicates dropped; events without a usable identifier"
    );

    let roots = q("SELECT count(*) FROM profiles WHERE space_id = ?1 AND parent_id IS NULL");
    let created = q("SELECT count(*) FROM profiles WHERE space_id = ?1");
    let with_user_id = q(&format!(
        "{ROOTS} SELECT count(DISTINCT up.root) FROM identifiers i
         JOIN up ON i.profile_id = up.profile_id
         WHERE i.space_id = ?1 AND i.id_type = 'user_id'"
    ));
    let largest = q(&format!(
        "{ROOTS} SELECT max(n) FROM (SELECT count(*) AS n FROM events e
         JOIN up ON e.profile_id = up.profile_id WHERE e.space_id = ?1 GROUP BY up.root)"
    ));
    assert_eq!(
        vec![roots, created, with_user_id, largest],
        reference(&expected, "profiles"),
        "root profiles (created, with a user_id, most events)"
    );

    let merged = q("SELECT count(*) FROM profiles WHERE space_id = ?1 AND parent_id IS NOT NULL");
    let refused_events = q(
        "SELECT count(DISTINCT message_id) FROM violations WHERE space_id = ?1 AND rule = 'limit'",
    );
    let refused_ids = q("SELECT count(*) FROM violations WHERE space_id = ?1 AND rule = 'limit'");
    assert_eq!(
        vec![merged, refused_events, refused_ids],
        reference(&expected, "merges"),
        "merges; events and identifiers refused by merge protection"
    );

    let of_type = |t: &str| {
        q(&format!(
            "SELECT count(*) FROM identifiers WHERE space_id = ?1 AND id_type = '{t}'"
        ))
    };
    assert_eq!(
        vec![
            of_type("user_id"),
            of_type("email"),
            of_type("anonymous_id")
        ],
        reference(&expected, "identifiers"),
        "identifiers per type"
    );

    // The reference's invariants line: identifiers, the most of each type
    // on one profile (then its limits, 1/5/5), and the events on roots.
    let invariants = reference(&expected, "invariants  OK");
    let most = |t: &str| {
        q(&format!(
            "{ROOTS} SELECT max(n) FROM (SELECT count(*) AS n FROM identifiers i
             JOIN up ON i.profile_id = up.profile_id
             WHERE i.space_id = ?1 AND i.id_type = '{t}' GROUP BY up.root)"
        ))
    };
    let attached = q(&format!(
        "{ROOTS} SELECT count(*) FROM events e JOIN up ON e.profile_id = up.profile_id
         WHERE e.space_id = ?1"
    ));
    assert_eq!(
        vec![
            q("SELECT count(*) FROM identifiers WHERE space_id = ?1"),
            most("user_id"),
            most("email"),
            most("anonymous_id"),
            attached
        ],
        [&invariants[..4], &invariants[7..8]].concat(),
        "identifiers, most per profile of each type, events on profiles"
    );
    let younger_parents = q("SELECT count(*) FROM profiles c JOIN profiles p
         ON p.space_id = c.space_id AND p.profile_id = c.parent_id
         WHERE c.space_id = ?1 AND p.created_at > c.created_at");
    assert_eq!(younger_parents, 0, "every parent older than its child");
}
