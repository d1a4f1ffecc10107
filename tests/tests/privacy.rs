//! Regulations on `kindred serve`, over HTTP: delete and suppress people,
//! lift a suppression, and check after a delete that no table of any of
//! the data directory's databases still holds the person's identifiers or
//! trait values.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::common::receiver::Receiver;
use crate::common::Server;
use kindred_domain::event::{format_millis, parse_time};
use reqwest::StatusCode;
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(30);

/// What the deleted person is known by: identifiers and a trait value.
const PERSON: [&str; 4] = [
    "gdpr-user-7f3",
    "gdpr.subject@example.com",
    "gdpr-anon-1c9",
    "Rue-des-Secrets-42",
];

fn events_of_the_person() -> Vec<Value> {
    let now = format_millis(kindred_store::now_millis());
    // Two profiles (the user's, the device's) that the identify merges.
    vec![
        json!({"type": "track", "userId": "gdpr-user-7f3", "event": "Order Completed",
               "properties": {"revenue": 10, "note": "Rue-des-Secrets-42"}, "timestamp": now}),
        json!({"type": "page", "anonymousId": "gdpr-anon-1c9", "name": "Home", "timestamp": now}),
        json!({"type": "identify", "anonymousId": "gdpr-anon-1c9", "userId": "gdpr-user-7f3",
               "traits": {"email": "GDPR.Subject@Example.com", "address": "Rue-des-Secrets-42"},
               "timestamp": now}),
        json!({"type": "group", "userId": "gdpr-user-7f3", "groupId": "acme", "timestamp": now}),
    ]
}

fn events_of_someone_else() -> Vec<Value> {
    vec![
        json!({"type": "identify", "userId": "keep-user", "traits": {"email": "keep@example.com"}}),
        json!({"type": "track", "userId": "keep-user", "event": "Order Completed"}),
    ]
}

async fn send(s: &Server, events: Vec<Value>) {
    let r = s.track("/v1/batch", &json!({ "batch": events })).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    s.settle().await;
}

/// Starts a regulation and waits until every subject is done.
async fn regulate(s: &Server, kind: &str, subject_type: &str, ids: &[&str]) -> Value {
    let r = s
        .admin(
            "POST",
            "/regulations",
            Some(
                &json!({"regulation_type": kind, "subject_type": subject_type, "subject_ids": ids}),
            ),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    let id = r.body["id"].as_str().unwrap().to_string();
    assert!(id.starts_with("reg_"), "{}", r.body);
    let start = Instant::now();
    loop {
        let r = s.admin("GET", &format!("/regulations/{id}"), None).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
        if r.body["status"] == "finished" {
            return r.body;
        }
        assert_ne!(r.body["status"], "failed", "{}", r.body);
        assert!(start.elapsed() < WAIT, "{}", r.body);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Every place in the data directory's databases where one of `needles`
/// appears (any table, any column, text or blob, case-insensitive).
fn leftovers(dir: &Path, needles: &[&str], skip: &[&str]) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let file = path.file_name().unwrap().to_string_lossy().to_string();
        if !file.ends_with(".db") || skip.contains(&file.as_str()) {
            continue;
        }
        let conn = rusqlite::Connection::open_with_flags(
            &path,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
        )
        .unwrap();
        let tables: Vec<String> = conn
            .prepare("SELECT name FROM sqlite_master WHERE type = 'table'")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        for table in tables {
            let mut stmt = conn.prepare(&format!("SELECT * FROM \"{table}\"")).unwrap();
            let columns = stmt.column_count();
            let mut rows = stmt.query([]).unwrap();
            while let Some(row) = rows.next().unwrap() {
                for c in 0..columns {
                    let text = match row.get_ref(c).unwrap() {
                        rusqlite::types::ValueRef::Text(t) => {
                            String::from_utf8_lossy(t).to_lowercase()
                        }
                        rusqlite::types::ValueRef::Blob(b) => {
                            String::from_utf8_lossy(b).to_lowercase()
                        }
                        _ => continue,
                    };
                    for needle in needles {
                        if text.contains(&needle.to_lowercase()) {
                            found.push(format!("{file} {table}: {needle}"));
                        }
                    }
                }
            }
        }
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_person_leaves_no_trace_and_is_not_collected_again_until_unsuppressed() {
    let s = Server::start_for_local_receivers().await;
    let receiver = Receiver::start().await;
    s.buyers_audience().await;
    let r = s
        .admin(
            "PUT",
            "/destinations/crm",
            Some(
                &json!({"kind": "webhook", "url": receiver.url("/hook"), "forward_deletes": true,
                         "id_sync": {"strategy": "all", "types": ["user_id", "email"]}}),
            ),
        )
        .await;
    assert!(r.status.is_success(), "{}", r.body);
    assert_eq!(r.body["forward_deletes"], true, "{}", r.body);

    send(&s, events_of_the_person()).await;
    send(&s, events_of_someone_else()).await;
    receiver
        .wait_for(WAIT, "the person enters the audience", |calls| {
            calls
                .iter()
                .any(|c| c["event"] == "Audience Entered" && c["userId"] == "gdpr-user-7f3")
        })
        .await;
    let before = s.profile("user_id:gdpr-user-7f3", "traits").await;
    assert_eq!(before.body["traits"]["address"], "Rue-des-Secrets-42");

    let done = regulate(&s, "SUPPRESS_WITH_DELETE", "USER_ID", &["gdpr-user-7f3"]).await;
    assert_eq!(
        done["profiles_deleted"], 2,
        "the anonymous profile merged in, too: {done}"
    );
    assert_eq!(done["subjects"][0]["status"], "finished");

    // Destinations hear of it: an exit from the audience, and a delete.
    receiver
        .wait_for(WAIT, "an exit and a delete", |calls| {
            calls
                .iter()
                .any(|c| c["event"] == "Audience Exited" && c["userId"] == "gdpr-user-7f3")
                && calls
                    .iter()
                    .any(|c| c["type"] == "delete" && c["userId"] == "gdpr-user-7f3")
        })
        .await;
    let start = Instant::now();
    loop {
        let status = s.admin("GET", "/destinations/crm/status", None).await.body;
        if status["pending"] == 0 && status["retrying"] == 0 {
            break;
        }
        assert!(start.elapsed() < WAIT, "{status}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    for lookup in [
        "user_id:gdpr-user-7f3",
        "email:gdpr.subject@example.com",
        "anonymous_id:gdpr-anon-1c9",
    ] {
        let r = s.profile(lookup, "traits").await;
        assert_eq!(r.status, StatusCode::NOT_FOUND, "{lookup}: {}", r.body);
    }
    let changes = s.admin("GET", "/changes?since=0", None).await;
    assert!(
        !changes.body.to_string().to_lowercase().contains("gdpr"),
        "{}",
        changes.body
    );
    // Nothing of the person in any table; the scan does see other people.
    let dir = s.dir.path();
    assert_eq!(leftovers(dir, &PERSON, &[]), Vec::<String>::new());
    assert!(!leftovers(dir, &["keep@example.com"], &[]).is_empty());
    assert_eq!(
        s.profile("user_id:keep-user", "traits").await.body["traits"]["email"],
        "keep@example.com"
    );

    // The person comes back (same user id, same device): not collected.
    send(
        &s,
        vec![
            json!({"type": "identify", "userId": "gdpr-user-7f3", "traits": {"address": "Rue-des-Secrets-42"}}),
            json!({"type": "page", "anonymousId": "gdpr-anon-1c9"}),
            json!({"type": "track", "userId": "gdpr-user-7f3", "anonymousId": "new-device", "event": "Order Completed"}),
        ],
    )
    .await;
    for lookup in [
        "user_id:gdpr-user-7f3",
        "anonymous_id:gdpr-anon-1c9",
        "anonymous_id:new-device",
    ] {
        let r = s.profile(lookup, "traits").await;
        assert_eq!(r.status, StatusCode::NOT_FOUND, "{lookup}: {}", r.body);
    }
    // (The queue keeps accepted events until they are applied and the
    // queue is truncated; the stores never see them.)
    assert_eq!(leftovers(dir, &PERSON, &["queue.db"]), Vec::<String>::new());
    let list = s.admin("GET", "/regulations", None).await;
    assert_eq!(list.status, StatusCode::OK, "{}", list.body);
    assert_eq!(list.body["suppressed_events"], 3, "{}", list.body);
    assert_eq!(list.body["data"][0]["status"], "finished");

    // UNSUPPRESS: collected again, as a new person.
    regulate(&s, "UNSUPPRESS", "USER_ID", &["gdpr-user-7f3"]).await;
    send(
        &s,
        vec![
            json!({"type": "identify", "userId": "gdpr-user-7f3", "anonymousId": "gdpr-anon-1c9",
                     "traits": {"plan": "back"}}),
        ],
    )
    .await;
    let traits = s.profile("user_id:gdpr-user-7f3", "traits").await;
    assert_eq!(traits.status, StatusCode::OK, "{}", traits.body);
    assert_eq!(traits.body["traits"], json!({"plan": "back"}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_internal_forgets_the_person_but_collects_later_events() {
    let s = Server::start().await;
    send(&s, events_of_the_person()).await;
    let done = regulate(
        &s,
        "DELETE_INTERNAL",
        "email",
        &["GDPR.Subject@example.com"],
    )
    .await;
    assert_eq!(done["profiles_deleted"], 2, "{done}");
    assert_eq!(leftovers(s.dir.path(), &PERSON, &[]), Vec::<String>::new());

    send(
        &s,
        vec![json!({"type": "identify", "userId": "gdpr-user-7f3", "traits": {"plan": "new"}})],
    )
    .await;
    let traits = s.profile("user_id:gdpr-user-7f3", "traits").await;
    assert_eq!(traits.status, StatusCode::OK, "{}", traits.body);
    assert_eq!(
        traits.body["traits"],
        json!({"plan": "new"}),
        "nothing old comes back"
    );
    let list = s.admin("GET", "/regulations", None).await;
    assert_eq!(list.body["suppressed_events"], 0, "{}", list.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suppress_only_keeps_what_is_stored_and_drops_what_comes() {
    let s = Server::start().await;
    send(&s, events_of_the_person()).await;
    let done = regulate(&s, "SUPPRESS_ONLY", "USER_ID", &["gdpr-user-7f3"]).await;
    assert_eq!(done["profiles_deleted"], 0, "{done}");
    send(
        &s,
        vec![
            json!({"type": "identify", "userId": "gdpr-user-7f3", "traits": {"plan": "suppressed"}}),
            json!({"type": "track", "anonymousId": "gdpr-anon-1c9", "event": "Viewed"}),
        ],
    )
    .await;
    let traits = s.profile("user_id:gdpr-user-7f3", "traits").await;
    assert_eq!(traits.body["traits"]["address"], "Rue-des-Secrets-42");
    assert!(
        traits.body["traits"].get("plan").is_none(),
        "{}",
        traits.body
    );
    let events = s.profile("user_id:gdpr-user-7f3", "events?limit=50").await;
    assert_eq!(
        events.body["data"].as_array().unwrap().len(),
        4,
        "{}",
        events.body
    );
    let list = s.admin("GET", "/regulations", None).await;
    assert_eq!(list.body["suppressed_events"], 2, "{}", list.body);
}

/// Events of the person keep arriving while the delete runs. Afterwards
/// (SUPPRESS_WITH_DELETE) nothing of theirs is stored; with
/// DELETE_INTERNAL, only events received after the regulation was made.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delete_racing_ingest_of_the_same_person() {
    for kind in ["SUPPRESS_WITH_DELETE", "DELETE_INTERNAL"] {
        let s = Server::start().await;
        send(&s, events_of_the_person()).await;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let sender = {
            let (client, base, key, stop) = (
                s.client.clone(),
                s.base.clone(),
                s.space.write_key.clone(),
                stop.clone(),
            );
            tokio::spawn(async move {
                let mut i = 0;
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    let batch: Vec<Value> = (0..10)
                        .map(|j| {
                            json!({"type": "identify", "userId": "gdpr-user-7f3",
                                   "anonymousId": format!("race-{i}-{j}"),
                                   "traits": {"address": "Rue-des-Secrets-42"}})
                        })
                        .collect();
                    let r = client
                        .post(format!("{base}/v1/batch"))
                        .basic_auth(&key, Some(""))
                        .json(&json!({ "batch": batch }))
                        .send()
                        .await
                        .unwrap();
                    assert_eq!(r.status(), 200);
                    i += 1;
                }
                i
            })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        let done = regulate(&s, kind, "USER_ID", &["gdpr-user-7f3"]).await;
        let made = parse_time(done["created_at"].as_str().unwrap()).unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let batches = sender.await.unwrap();
        assert!(
            batches > 2,
            "{kind}: the sender ran during the delete ({batches} batches)"
        );
        s.settle().await;

        let events = s.profile("user_id:gdpr-user-7f3", "events?limit=100").await;
        if kind == "SUPPRESS_WITH_DELETE" {
            assert_eq!(
                events.status,
                StatusCode::NOT_FOUND,
                "{kind}: {}",
                events.body
            );
            assert_eq!(
                leftovers(s.dir.path(), &PERSON, &["queue.db"]),
                Vec::<String>::new(),
                "{kind}"
            );
        } else {
            // Whatever remains was received after the regulation was made.
            if events.status == StatusCode::OK {
                for e in events.body["data"].as_array().unwrap() {
                    let received = parse_time(e["received_at"].as_str().unwrap()).unwrap();
                    assert!(
                        received >= made,
                        "{kind}: an event received before the delete survived: {e}"
                    );
                }
            }
            assert!(
                leftovers(
                    s.dir.path(),
                    &["gdpr.subject@example.com", "gdpr-anon-1c9"],
                    &[]
                )
                .is_empty(),
                "{kind}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regulations_are_validated_listed_and_admin_only() {
    let s = Server::start().await;
    for (body, field) in [
        (
            json!({"regulation_type": "FORGET", "subject_type": "USER_ID", "subject_ids": ["a"]}),
            "regulation_type",
        ),
        (
            json!({"regulation_type": "SUPPRESS_ONLY", "subject_type": "USER_ID", "subject_ids": []}),
            "subject_ids",
        ),
        (
            json!({"regulation_type": "SUPPRESS_ONLY", "subject_type": "USER_ID", "subject_ids": [""]}),
            "subject_ids[0]",
        ),
    ] {
        let r = s.admin("POST", "/regulations", Some(&body)).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.body);
        assert!(
            r.body["error"]["message"]
                .as_str()
                .unwrap()
                .starts_with(field),
            "{}",
            r.body
        );
    }
    let path = format!("/v1/spaces/{}/regulations", s.space.space_id);
    let r = s.get_as(&path, Some(&s.space.access_token)).await;
    assert_eq!(
        r.status,
        StatusCode::UNAUTHORIZED,
        "an access token may not: {}",
        r.body
    );
    let r = s
        .admin("GET", "/regulations/reg_nosuchregulation00", None)
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);

    let mut ids = Vec::new();
    for i in 0..3 {
        let done = regulate(&s, "SUPPRESS_ONLY", "USER_ID", &[&format!("nobody-{i}")]).await;
        ids.push(done["id"].as_str().unwrap().to_string());
    }
    let first = s.admin("GET", "/regulations?limit=2", None).await;
    assert_eq!(first.body["cursor"]["has_more"], true, "{}", first.body);
    let page: Vec<&str> = first.body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_str().unwrap())
        .collect();
    assert_eq!(page, [ids[2].as_str(), ids[1].as_str()], "newest first");
    let next = first.body["cursor"]["next"].as_str().unwrap();
    let second = s
        .admin("GET", &format!("/regulations?limit=2&next={next}"), None)
        .await;
    assert_eq!(second.body["data"][0]["id"], ids[0].as_str());
    assert_eq!(second.body["cursor"]["has_more"], false);
    assert_eq!(second.body["cursor"]["next"], "");
    // A finished regulation keeps no subject id.
    assert_eq!(
        leftovers(s.dir.path(), &["nobody-0"], &[]),
        Vec::<String>::new()
    );
}

async fn external_ids(s: &Server, lookup: &str) -> Vec<(String, String)> {
    let r = s.profile(lookup, "external_ids?limit=100").await;
    assert_eq!(r.status, StatusCode::OK, "{lookup}: {}", r.body);
    let mut ids: Vec<(String, String)> = r.body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["type"].as_str().unwrap().to_string(),
                e["id"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    ids.sort();
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_identifier_taken_off_a_profile_is_free_to_claim_and_stops_counting() {
    let s = Server::start().await;
    // One email per profile, ever.
    let mut settings = s.admin("GET", "/identity_settings", None).await.body;
    settings["types"]["email"]["limit"] = json!({"count": 1, "frequency": "ever"});
    let r = s.admin("PUT", "/identity_settings", Some(&settings)).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    send(
        &s,
        vec![json!({"type": "identify", "userId": "u1", "traits": {"email": "A@x.io"}})],
    )
    .await;
    send(
        &s,
        vec![json!({"type": "identify", "userId": "u1", "traits": {"email": "b@x.io"}})],
    )
    .await;
    let pair = |t: &str, v: &str| (t.to_string(), v.to_string());
    assert_eq!(
        external_ids(&s, "user_id:u1").await,
        [pair("email", "a@x.io"), pair("user_id", "u1")],
        "the second email is over the limit"
    );

    let path = "/collections/users/profiles/user_id:u1/external_ids/delete";
    let r = s
        .admin("POST", path, Some(&json!({"external_ids": [{"type": "email", "id": "a@X.io"},
                                                            {"type": "email", "id": "never@x.io"}]})))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(
        r.body["removed"],
        json!([{"type": "email", "id": "a@x.io"}])
    );
    assert_eq!(
        external_ids(&s, "user_id:u1").await,
        [pair("user_id", "u1")]
    );
    assert_eq!(
        s.profile("email:a@x.io", "traits").await.status,
        StatusCode::NOT_FOUND
    );

    // Re-claimed by another profile, by the normal rules (no merge).
    send(
        &s,
        vec![json!({"type": "identify", "userId": "u2", "traits": {"email": "a@x.io"}})],
    )
    .await;
    assert_eq!(
        external_ids(&s, "email:a@x.io").await,
        [pair("email", "a@x.io"), pair("user_id", "u2")]
    );
    // And u1 may have an email again: the removed one no longer counts.
    send(
        &s,
        vec![json!({"type": "identify", "userId": "u1", "traits": {"email": "c@x.io"}})],
    )
    .await;
    assert_eq!(
        external_ids(&s, "user_id:u1").await,
        [pair("email", "c@x.io"), pair("user_id", "u1")]
    );

    let r = s
        .admin(
            "POST",
            "/collections/users/profiles/user_id:nobody/external_ids/delete",
            Some(&json!({"external_ids": [{"type": "email", "id": "a@x.io"}]})),
        )
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "{}", r.body);
    let r = s
        .admin(
            "POST",
            path,
            Some(&json!({"external_ids": [{"type": "email"}]})),
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.body);
    assert!(r.body["error"]["message"]
        .as_str()
        .unwrap()
        .starts_with("external_ids[0].id"));
    let r = s
        .post_as(
            &format!("/v1/spaces/{}{path}", s.space.space_id),
            &json!({"external_ids": [{"type": "user_id", "id": "u1"}]}),
            &s.space.access_token,
        )
        .await;
    assert_eq!(
        r.status,
        StatusCode::UNAUTHORIZED,
        "an access token may not: {}",
        r.body
    );
}

/// SPEC 5's example: `a1` identifies as `u1`, then as `u2`. The refused
/// merge is in the violations log of both profiles and of the space, with
/// the rule and the identifier's hash, never its value; a blocked value
/// and a suppressed person's event are logged too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn violations_are_logged_for_the_merge_protection_example() {
    let s = Server::start().await;
    send(
        &s,
        vec![json!({"type": "identify", "anonymousId": "a1", "userId": "u1", "messageId": "m-u1"})],
    )
    .await;
    send(
        &s,
        vec![json!({"type": "identify", "anonymousId": "a1", "userId": "u2", "messageId": "m-u2"})],
    )
    .await;
    send(&s, vec![json!({"type": "identify", "anonymousId": "null", "userId": "u3", "messageId": "m-blocked"})]).await;

    let u2 = s.profile("user_id:u2", "violations").await;
    assert_eq!(u2.status, StatusCode::OK, "{}", u2.body);
    let entries = u2.body["data"].as_array().unwrap();
    assert_eq!(entries.len(), 1, "{}", u2.body);
    let v = &entries[0];
    assert_eq!(v["message_id"], "m-u2");
    assert_eq!(v["rule"], "limit");
    assert_eq!(
        v["detail"],
        json!({"type": "user_id", "count": 1, "frequency": "ever"})
    );
    // The identifier left out is a1 (lower priority than user_id),
    // owned by u1's profile.
    assert_eq!(v["identifier_type"], "anonymous_id");
    assert!(v["identifier_hash"]
        .as_str()
        .unwrap()
        .starts_with("sha256:"));
    assert!(
        !u2.body.to_string().contains("\"a1\""),
        "no value in clear: {}",
        u2.body
    );
    let u1_id = s.profile("user_id:u1", "metadata").await.body["metadata"]["profile_id"].clone();
    assert_eq!(v["other_profile_id"], u1_id);
    // u1's profile lists the merge refused with it.
    let u1 = s.profile("user_id:u1", "violations").await;
    assert_eq!(u1.body["data"][0]["message_id"], "m-u2", "{}", u1.body);

    let all = s.admin("GET", "/violations", None).await;
    assert_eq!(all.status, StatusCode::OK, "{}", all.body);
    let rules: Vec<&str> = all.body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["rule"].as_str().unwrap())
        .collect();
    assert_eq!(rules, ["limit", "blocked_value"], "{}", all.body);

    regulate(&s, "SUPPRESS_ONLY", "USER_ID", &["u3"]).await;
    send(
        &s,
        vec![json!({"type": "track", "userId": "u3", "event": "E", "messageId": "m-sup"})],
    )
    .await;
    let page = s.admin("GET", "/violations?limit=2", None).await;
    assert_eq!(page.body["cursor"]["has_more"], true, "{}", page.body);
    let next = page.body["cursor"]["next"].as_str().unwrap();
    let rest = s
        .admin("GET", &format!("/violations?limit=2&next={next}"), None)
        .await;
    assert_eq!(rest.body["data"][0]["rule"], "suppressed", "{}", rest.body);
    assert_eq!(rest.body["data"][0]["message_id"], "m-sup");
    assert_eq!(rest.body["cursor"]["has_more"], false);

    let later = format_millis(kindred_store::now_millis() + 60_000);
    let none = s
        .admin("GET", &format!("/violations?since={later}"), None)
        .await;
    assert_eq!(none.body["data"], json!([]), "{}", none.body);
    assert_eq!(
        s.profile("user_id:nobody", "violations").await.status,
        StatusCode::NOT_FOUND
    );
    let r = s
        .get_as(
            &format!("/v1/spaces/{}/violations", s.space.space_id),
            Some(&s.space.access_token),
        )
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
}

async fn profile_id(s: &Server, lookup: &str) -> String {
    let r = s.profile(lookup, "metadata").await;
    assert_eq!(r.status, StatusCode::OK, "{lookup}: {}", r.body);
    r.body["metadata"]["profile_id"]
        .as_str()
        .unwrap()
        .to_string()
}

async fn is_buyer(s: &Server, lookup: &str) -> Value {
    let r = s.profile(lookup, "traits?class=audience").await;
    assert_eq!(r.status, StatusCode::OK, "{lookup}: {}", r.body);
    r.body["traits"]["buyers"].clone()
}

/// The FAQ's shared device: Alice's tablet, Bob (by email, with an
/// order, in the `buyers` audience) on his laptop, then Bob signed in on
/// the tablet merges his profile into hers. `(alice, bob)`.
async fn shared_tablet(s: &Server) -> (String, String) {
    s.buyers_audience().await;
    send(s, vec![
        json!({"type": "identify", "userId": "alice", "anonymousId": "tablet", "traits": {"name": "Alice"}}),
    ]).await;
    send(s, vec![
        json!({"type": "identify", "anonymousId": "laptop", "traits": {"email": "bob@x.io", "name": "Bob", "plan": "pro"}}),
        json!({"type": "track", "anonymousId": "laptop", "event": "Order Completed"}),
    ]).await;
    let alice = profile_id(s, "user_id:alice").await;
    let bob = profile_id(s, "email:bob@x.io").await;
    assert_ne!(alice, bob);
    assert_eq!(is_buyer(s, "user_id:alice").await, Value::Null);
    // Bob, signed in by email, browses on the tablet: the merge.
    send(
        s,
        vec![
            json!({"type": "track", "anonymousId": "tablet", "event": "Viewed",
               "context": {"traits": {"email": "bob@x.io"}}}),
        ],
    )
    .await;
    assert_eq!(
        profile_id(s, "email:bob@x.io").await,
        alice,
        "merged into the older profile"
    );
    assert_eq!(
        is_buyer(s, "user_id:alice").await,
        true,
        "Bob's order counts for the merged profile"
    );
    (alice, bob)
}

/// The FAQ's shared device: Bob signs in on Alice's tablet and the
/// tablet's anonymous id merges his profile into hers. Split, each is
/// themselves again (identifiers, traits, audiences), and the next event
/// carrying both identifiers does not merge them again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_merge_through_a_shared_device_is_split_and_stays_apart() {
    let s = Server::start().await;
    let (alice, bob) = shared_tablet(&s).await;
    let merged = s.profile("user_id:alice", "traits").await.body;
    assert_eq!(merged["traits"]["name"], "Bob", "{merged}");

    let r = s
        .admin(
            "POST",
            &format!("/collections/users/profiles/user_id:alice/merges/{bob}/split"),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.body["parent"], alice.as_str());
    let mut moved: Vec<String> = r.body["moved_external_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            format!(
                "{}:{}",
                i["type"].as_str().unwrap(),
                i["id"].as_str().unwrap()
            )
        })
        .collect();
    moved.sort();
    assert_eq!(moved, ["anonymous_id:laptop", "email:bob@x.io"]);
    s.settle().await;

    let pair = |t: &str, v: &str| (t.to_string(), v.to_string());
    assert_eq!(
        external_ids(&s, "user_id:alice").await,
        [pair("anonymous_id", "tablet"), pair("user_id", "alice")]
    );
    assert_eq!(
        external_ids(&s, "email:bob@x.io").await,
        [pair("anonymous_id", "laptop"), pair("email", "bob@x.io")]
    );
    // (The traits resource also lists computed values such as `buyers`.)
    let alice_traits = s.profile("user_id:alice", "traits").await.body["traits"].clone();
    assert_eq!(alice_traits["name"], "Alice", "{alice_traits}");
    assert!(
        alice_traits.get("plan").is_none() && alice_traits.get("email").is_none(),
        "{alice_traits}"
    );
    let bob_traits = s.profile("email:bob@x.io", "traits").await.body["traits"].clone();
    assert_eq!(
        (
            &bob_traits["name"],
            &bob_traits["plan"],
            &bob_traits["email"]
        ),
        (&json!("Bob"), &json!("pro"), &json!("bob@x.io")),
        "{bob_traits}"
    );
    // Computed again from each side's own events: the order is Bob's.
    assert_eq!(is_buyer(&s, "email:bob@x.io").await, true);
    assert_eq!(
        is_buyer(&s, "user_id:alice").await,
        false,
        "Alice leaves the audience"
    );
    let changes = s
        .admin("GET", "/changes?since=0&limit=100", None)
        .await
        .body;
    assert!(
        changes["data"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["profile_id"] == alice.as_str() && c["new"] == false),
        "{changes}"
    );
    assert!(s.profile("user_id:alice", "merges").await.body["data"]
        .as_array()
        .unwrap()
        .is_empty());

    // Both identifiers together again: no merge; the event lands on Bob
    // (email outranks the tablet's id), and the refusal is logged.
    send(&s, vec![
        json!({"type": "track", "anonymousId": "tablet", "event": "Viewed", "messageId": "m-again",
               "context": {"traits": {"email": "bob@x.io"}}}),
    ]).await;
    assert_eq!(profile_id(&s, "email:bob@x.io").await, bob);
    assert_eq!(profile_id(&s, "anonymous_id:tablet").await, alice);
    let v = s.profile("email:bob@x.io", "violations").await.body;
    let again: Vec<&Value> = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["message_id"] == "m-again")
        .collect();
    assert_eq!(again.len(), 1, "{v}");
    assert_eq!(again[0]["rule"], "split_block");
    assert_eq!(again[0]["other_profile_id"], alice.as_str());

    // Split again: not a merge of that profile any more.
    let r = s
        .admin(
            "POST",
            &format!("/collections/users/profiles/user_id:alice/merges/{bob}/split"),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "{}", r.body);
}

/// A split racing ingest of claims on the parent: the split and each
/// event are transactions of the one writer, so no identifier claimed
/// meanwhile is lost from either list.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_split_racing_claims_loses_no_identifier() {
    let s = Server::start().await;
    let mut settings = s.admin("GET", "/identity_settings", None).await.body;
    settings["types"]["anonymous_id"]["limit"] = json!({"count": 500, "frequency": "ever"});
    let r = s.admin("PUT", "/identity_settings", Some(&settings)).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let (_, bob) = shared_tablet(&s).await;
    let devices: Vec<String> = (0..300).map(|i| format!("device-{i}")).collect();
    let path = format!("/collections/users/profiles/user_id:alice/merges/{bob}/split");
    let claims = async {
        for chunk in devices.chunks(10) {
            let batch: Vec<Value> = chunk
                .iter()
                .map(|a| json!({"type": "identify", "userId": "alice", "anonymousId": a}))
                .collect();
            let r = s.track("/v1/batch", &json!({ "batch": batch })).await;
            assert_eq!(r.status, StatusCode::OK, "{}", r.body);
        }
    };
    let split = async {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        s.admin("POST", &path, None).await
    };
    let (_, r) = tokio::join!(claims, split);
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    s.settle().await;
    let pair = |t: &str, v: &str| (t.to_string(), v.to_string());
    let mut expected: Vec<(String, String)> =
        devices.iter().map(|a| pair("anonymous_id", a)).collect();
    expected.extend([pair("anonymous_id", "tablet"), pair("user_id", "alice")]);
    expected.sort();
    let mut alice_ids = Vec::new();
    let mut next = String::new();
    loop {
        let query = match next.as_str() {
            "" => "external_ids?limit=100".to_string(),
            n => format!("external_ids?limit=100&next={n}"),
        };
        let r = s.profile("user_id:alice", &query).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
        for e in r.body["data"].as_array().unwrap() {
            alice_ids.push(pair(e["type"].as_str().unwrap(), e["id"].as_str().unwrap()));
        }
        match r.body["cursor"]["next"].as_str() {
            Some(n) if !n.is_empty() && r.body["cursor"]["has_more"] == true => {
                next = n.to_string()
            }
            _ => break,
        }
    }
    alice_ids.sort();
    assert_eq!(alice_ids, expected);
    assert_eq!(
        external_ids(&s, "email:bob@x.io").await,
        [pair("anonymous_id", "laptop"), pair("email", "bob@x.io")]
    );
}
