//! The real SAM stack (`infra/template.yaml`), deployed by
//! `infra/deploy.sh --emulated` on the ministack emulator (the test
//! command deploys it once and hands its outputs in `KINDRED_DEPLOYED`),
//! driven only over HTTP through its API URL: events with Segment's own
//! Python client (gzip on), reads and definitions with plain HTTP. The
//! functions run as their `bootstrap` binaries under the emulator's
//! Lambda, fed by its SQS event source mappings.

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::common::receiver::Receiver;

#[derive(Clone)]
struct Deployed {
    api_url: String,
    /// Where a browser opens the API (under `/prod`, as on AWS).
    browser_url: String,
    table: String,
    endpoint_url: String,
    expiry_function: String,
    events_queue: String,
    events_dlq: String,
    ingest_logs: String,
    identity_logs: String,
}

/// The deployment the test command made, or `None` (skipped) outside it.
fn deployed(test: &str) -> Option<Deployed> {
    let Ok(line) = std::env::var("KINDRED_DEPLOYED") else {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "{test}: the emulated deployment must run in CI (tests/run-all.sh makes it)"
        );
        eprintln!("SKIPPED {test}: no emulated deployment (tests/run-all.sh runs infra/deploy.sh --emulated)");
        return None;
    };
    let v: Value = serde_json::from_str(&line).expect("KINDRED_DEPLOYED is deploy.sh's JSON line");
    Some(Deployed {
        api_url: v["api_url"].as_str().unwrap().to_string(),
        browser_url: v["browser_url"].as_str().unwrap().to_string(),
        table: v["table"].as_str().unwrap().to_string(),
        endpoint_url: v["endpoint_url"].as_str().unwrap().to_string(),
        expiry_function: v["expiry_function"].as_str().unwrap().to_string(),
        events_queue: v["queues"]["EventsQueueUrl"].as_str().unwrap().to_string(),
        events_dlq: v["queues"]["EventsDeadLetterQueueUrl"]
            .as_str()
            .unwrap()
            .to_string(),
        ingest_logs: v["log_groups"]["IngestLogGroup"]
            .as_str()
            .unwrap()
            .to_string(),
        identity_logs: v["log_groups"]["IdentityLogGroup"]
            .as_str()
            .unwrap()
            .to_string(),
    })
}

fn workspace() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// A command whose AWS SDK talks to the emulated account (and not to the
/// test command's separate DynamoDB Local and SQS emulators).
fn on_emulator(d: &Deployed, program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut command = Command::new(program);
    command
        .env("AWS_ENDPOINT_URL", &d.endpoint_url)
        .env_remove("AWS_ENDPOINT_URL_DYNAMODB")
        .env_remove("AWS_ENDPOINT_URL_SQS")
        .env("AWS_ACCESS_KEY_ID", "test")
        .env("AWS_SECRET_ACCESS_KEY", "test")
        .env("AWS_REGION", "us-east-1")
        .env("AWS_DEFAULT_REGION", "us-east-1");
    command
}

/// Runs `program` with `args` against the emulated account; what it
/// printed, once it has succeeded.
fn stdout_on_emulator(
    d: &Deployed,
    program: impl AsRef<std::ffi::OsStr>,
    args: &[&str],
) -> Vec<u8> {
    let out = on_emulator(d, program).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// Runs the `kindred` command with the emulator's endpoint, as the
/// README says; the JSON line it prints.
fn kindred(d: &Deployed, args: &[&str]) -> Value {
    let out = stdout_on_emulator(d, workspace().join("target/debug/kindred"), args);
    serde_json::from_slice(&out).unwrap()
}

/// A space in the deployed table, made as the README says: `kindred
/// space create` with the emulator's endpoint.
fn create_space(d: &Deployed, id: &str) -> Value {
    kindred(d, &["space", "create", id, "--dynamodb-table", &d.table])
}

/// Invokes the deployed expiry function as its hourly EventBridge rule
/// does, with the rule's `time` (the sweep runs as of then).
fn invoke_expiry(d: &Deployed, time: &str) -> Value {
    let python = workspace().join("target/infra-venv/bin/python");
    let script = r#"
import json, sys, boto3
out = boto3.client("lambda").invoke(FunctionName=sys.argv[1], Payload=json.dumps(
    {"source": "aws.events", "detail-type": "Scheduled Event", "time": sys.argv[2], "detail": {}}))
print(out["Payload"].read().decode())
"#;
    let out = stdout_on_emulator(d, python, &["-c", script, &d.expiry_function, time]);
    serde_json::from_slice(&out).unwrap()
}

/// Puts a message that is not an event on the deployed events queue and
/// waits (at most two minutes) until SQS has moved it to the dead-letter
/// queue. The queue's visibility timeout is shortened meanwhile (through
/// the SQS API, as an operator could), so that its five receives take
/// seconds instead of the 15 minutes of the template's 180 s.
fn poison_reaches_the_dead_letter_queue(d: &Deployed) -> bool {
    let python = workspace().join("target/infra-venv/bin/python");
    let script = r#"
import sys, time, boto3
sqs = boto3.client("sqs")
queue, dlq = sys.argv[1], sys.argv[2]
poison = "this is not a queued event"
sqs.set_queue_attributes(QueueUrl=queue, Attributes={"VisibilityTimeout": "2"})
sqs.send_message(QueueUrl=queue, MessageBody=poison)
found, deadline = False, time.time() + 120
while not found and time.time() < deadline:
    for m in sqs.receive_message(QueueUrl=dlq, MaxNumberOfMessages=10, WaitTimeSeconds=1).get("Messages", []):
        found = found or m["Body"] == poison
sqs.set_queue_attributes(QueueUrl=queue, Attributes={"VisibilityTimeout": "180"})
print("dead" if found else "not dead")
"#;
    let out = stdout_on_emulator(d, python, &["-c", script, &d.events_queue, &d.events_dlq]);
    String::from_utf8_lossy(&out).trim() == "dead"
}

struct Client {
    http: reqwest::Client,
    api: String,
    space: Value,
}

impl Client {
    fn space_id(&self) -> &str {
        self.space["space_id"].as_str().unwrap()
    }

    fn token(&self, kind: &str) -> String {
        self.space[kind].as_str().unwrap().to_string()
    }

    /// Segment's Python client, gzip on, sending `calls` (`[method,
    /// args, kwargs]`) to the API URL.
    async fn send(&self, calls: Value) {
        let python = std::env::var("KINDRED_PYTHON").unwrap_or_else(|_| "python3".into());
        let args = vec![self.token("write_key"), self.api.clone(), calls.to_string()];
        crate::common::clients::run(python, "python/send_deployed.py", args).await;
    }

    async fn call(
        &self,
        method: &str,
        path: &str,
        token: &str,
        body: Option<&Value>,
    ) -> (u16, Value) {
        let url = format!("{}{path}", self.api);
        let mut request = self
            .http
            .request(method.parse().unwrap(), &url)
            .basic_auth(token, Some(""));
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let text = response.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    async fn admin(&self, method: &str, path: &str, body: Option<&Value>) -> (u16, Value) {
        let path = format!("/v1/spaces/{}{path}", self.space_id());
        self.call(method, &path, &self.token("admin_token"), body)
            .await
    }

    /// A Profile API resource under `prefix` (`spaces` or `namespaces`).
    async fn profile(&self, prefix: &str, lookup: &str, resource: &str) -> (u16, Value) {
        let path = format!(
            "/v1/{prefix}/{}/collections/users/profiles/{lookup}/{resource}",
            self.space_id()
        );
        self.call("GET", &path, &self.token("access_token"), None)
            .await
    }

    /// Reads a Profile API resource until `done` holds (the pipeline runs
    /// behind queues), at most two minutes.
    async fn until(
        &self,
        what: &str,
        lookup: &str,
        resource: &str,
        done: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let (status, body) = self.profile("spaces", lookup, resource).await;
            if status == 200 && done(&body) {
                return body;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: not after 120 s (last answer {status} {body})"
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// Waits until the profile's events include one whose `field` is
    /// `value`.
    async fn until_event(&self, what: &str, lookup: &str, field: &str, value: &str) {
        self.until(what, lookup, "events?limit=50", |b| {
            b["data"]
                .as_array()
                .is_some_and(|a| a.iter().any(|e| e[field] == value))
        })
        .await;
    }
}

fn ids(body: &Value) -> Vec<String> {
    let mut ids: Vec<String> = body["data"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|e| {
                    format!(
                        "{}:{}",
                        e["type"].as_str().unwrap(),
                        e["id"].as_str().unwrap()
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    ids.sort();
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_deployed_stack_serves_segment_clients_end_to_end() {
    let Some(d) = deployed("the_deployed_stack_serves_segment_clients_end_to_end") else {
        return;
    };
    let space = create_space(&d, &format!("deployed-{:x}", rand::random::<u32>()));
    let c = Client {
        http: reqwest::Client::new(),
        api: d.api_url.clone(),
        space,
    };
    let (status, health) = c.call("GET", "/healthz", "", None).await;
    assert_eq!(status, 200, "{health}");
    let (status, doc) = c.call("GET", "/openapi.json", "", None).await;
    assert_eq!((status, &doc["openapi"]), (200, &json!("3.1.0")), "{doc}");

    // Definitions and a webhook destination through the admin API.
    let (status, reply) = c
        .admin(
            "PUT",
            "/computed_traits/lifetime_value",
            Some(&json!({"type": "aggregation", "function": "sum", "event": "Order Completed", "property": "revenue"})),
        )
        .await;
    assert!((200..300).contains(&status), "{reply}");
    let (status, reply) = c
        .admin(
            "PUT",
            "/audiences/high_value",
            Some(&json!({"condition": {"trait": {"name": "lifetime_value", "op": ">", "value": 100}}})),
        )
        .await;
    assert!((200..300).contains(&status), "{reply}");
    let (status, reply) = c
        .admin(
            "PUT",
            "/audiences/ordered_90d",
            Some(&json!({"condition": {"performed": {"event": "Order Completed", "within": {"days": 90}}}})),
        )
        .await;
    assert!((200..300).contains(&status), "{reply}");
    let hook = Receiver::start().await;
    let (status, reply) = c
        .admin(
            "PUT",
            "/destinations/hook",
            Some(
                &json!({"kind": "webhook", "url": hook.url("/hook"), "secret": "hook-secret",
                         "alias_on_merge": true}),
            ),
        )
        .await;
    assert_eq!(status, 201, "{reply}");

    // A visitor browses anonymously, then signs in: the two profiles merge.
    c.send(json!([
        ["page", [], {"anonymous_id": "visitor-1", "name": "Pricing"}],
        ["identify", ["dep-user"], {"traits": {"email": "Dep.User@Example.com", "plan": "pro"}}],
    ]))
    .await;
    c.until("both profiles", "anonymous_id:visitor-1", "traits", |_| {
        true
    })
    .await;
    c.until("the user", "user_id:dep-user", "traits", |b| {
        b["traits"]["plan"] == "pro"
    })
    .await;
    c.send(json!([
        ["identify", ["dep-user"], {"anonymous_id": "visitor-1"}],
        ["track", ["dep-user", "Order Completed", {"revenue": 150}], {}],
    ]))
    .await;
    let merged = c
        .until("the merge", "user_id:dep-user", "external_ids", |b| {
            ids(b).contains(&"anonymous_id:visitor-1".to_string())
        })
        .await;
    assert_eq!(
        ids(&merged),
        [
            "anonymous_id:visitor-1",
            "email:dep.user@example.com",
            "user_id:dep-user"
        ]
    );
    // The same profile under Segment's `namespaces` prefix.
    let (status, by_namespace) = c
        .profile("namespaces", "email:dep.user@example.com", "traits")
        .await;
    assert_eq!(status, 200, "{by_namespace}");
    assert_eq!(by_namespace["traits"]["plan"], "pro");

    // Merge protection: a second user id on the same device is refused.
    c.send(json!([["identify", ["dep-other"], {"anonymous_id": "visitor-1"}]]))
        .await;
    c.until(
        "the other user",
        "user_id:dep-other",
        "external_ids",
        |_| true,
    )
    .await;
    let (_, still) = c
        .profile("spaces", "user_id:dep-user", "external_ids")
        .await;
    assert!(
        !ids(&still).contains(&"user_id:dep-other".to_string()),
        "{still}"
    );

    // The computed trait and the audience, and the destination told.
    c.until(
        "the audience",
        "user_id:dep-user",
        "traits?class=audience",
        |b| b["traits"]["high_value"] == true,
    )
    .await;
    let (_, traits) = c
        .profile("spaces", "user_id:dep-user", "traits?class=computed_trait")
        .await;
    assert_eq!(traits["traits"]["lifetime_value"], 150.0, "{traits}");
    hook.wait_for(Duration::from_secs(120), "Audience Entered", |calls| {
        calls
            .iter()
            .any(|c| c["event"] == "Audience Entered" && c["userId"] == "dep-user")
    })
    .await;
    hook.wait_for(Duration::from_secs(120), "the merge's alias", |calls| {
        calls
            .iter()
            .any(|c| c["type"] == "alias" && c["previousId"] == "visitor-1")
    })
    .await;
    for request in hook.requests() {
        assert!(
            request.signed_by("hook-secret"),
            "signed with the sealed secret"
        );
    }

    // Lookback: an order 2,159 hours old ages out of the 90-day window
    // within hours; the expiry function's sweep (as EventBridge invokes
    // it, three hours on) takes the profile out of the audience.
    let now = kindred_store::now_millis();
    let old_order = kindred_domain::event::format_millis(now - 2_159 * 3_600_000);
    c.send(json!([["track", ["dep-old", "Order Completed", {"revenue": 5}], {"timestamp": old_order}]]))
        .await;
    c.until(
        "the old order",
        "user_id:dep-old",
        "traits?class=audience",
        |b| b["traits"]["ordered_90d"] == true,
    )
    .await;
    let later = kindred_domain::event::format_millis(now + 3 * 3_600_000);
    let swept = invoke_expiry(&d, &later);
    assert!(swept["profiles_enqueued"].as_u64() >= Some(1), "{swept}");
    c.until(
        "the expiry",
        "user_id:dep-old",
        "traits?class=audience",
        |b| b["traits"]["ordered_90d"] == false,
    )
    .await;
    hook.wait_for(Duration::from_secs(120), "Audience Exited", |calls| {
        calls.iter().any(|c| {
            c["event"] == "Audience Exited"
                && c["userId"] == "dep-old"
                && c["properties"]["audience_key"] == "ordered_90d"
        })
    })
    .await;

    // A gzip body sent as JSON by hand, as other libraries do.
    let body = json!({"batch": [{"type": "track", "userId": "dep-user", "event": "Gzipped", "messageId": "m-gzip"}]});
    let mut z = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    std::io::Write::write_all(&mut z, body.to_string().as_bytes()).unwrap();
    let response = c
        .http
        .post(format!("{}/v1/batch", c.api))
        .basic_auth(c.token("write_key"), Some(""))
        .header("content-type", "application/json")
        .header("content-encoding", "gzip")
        .body(z.finish().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(
        response.status().as_u16(),
        200,
        "{}",
        response.text().await.unwrap()
    );
    c.until_event(
        "the gzipped event",
        "user_id:dep-user",
        "message_id",
        "m-gzip",
    )
    .await;

    // A poison message goes to the dead-letter queue while good events
    // around it are applied.
    let poison = tokio::task::spawn_blocking({
        let d = d.clone();
        move || poison_reaches_the_dead_letter_queue(&d)
    });
    c.send(json!([["track", ["dep-user", "Beside The Poison"], {}]]))
        .await;
    c.until_event(
        "the event beside the poison",
        "user_id:dep-user",
        "event",
        "Beside The Poison",
    )
    .await;
    assert!(
        poison.await.unwrap(),
        "the poison message reached the dead-letter queue"
    );

    // A stack update (a parameter changed) keeps the data and the space.
    let out = tokio::task::spawn_blocking(|| {
        Command::new(workspace().join("infra/deploy.sh"))
            .args(["--emulated", "--param", "LogLevel=debug"])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "the update failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let updated: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        updated["api_url"],
        d.api_url.as_str(),
        "the API keeps its URL"
    );
    assert_eq!(updated["table"], d.table.as_str(), "the table is kept");
    let (status, traits) = c.profile("spaces", "user_id:dep-user", "traits").await;
    assert_eq!(
        (status, &traits["traits"]["plan"]),
        (200, &json!("pro")),
        "{traits}"
    );
    c.send(json!([["track", ["dep-user", "After Update"], {}]]))
        .await;
    c.until_event(
        "an event after the update",
        "user_id:dep-user",
        "event",
        "After Update",
    )
    .await;

    // Under /collections, GET goes to the read-only function and POST to
    // the admin one: a split of a merge that never happened is the admin
    // API's 404, not the reads function's 405.
    let (status, reply) = c
        .admin(
            "POST",
            "/collections/users/profiles/user_id:dep-user/merges/no-such-profile/split",
            None,
        )
        .await;
    assert_eq!(status, 404, "{reply}");

    // The upgrade step of an older table (README): every root this
    // version wrote is in the roots index already.
    let migrated = kindred(&d, &["migrate", "--dynamodb-table", &d.table]);
    assert_eq!(migrated, json!({"roots_indexed": 0}));
}

/// The embedded-metric lines (CloudWatch EMF) of a function's log group:
/// every JSON line with an `_aws` member, read back with boto3 (from the
/// SAM CLI's venv) as CloudWatch Logs holds them.
fn emf_lines(d: &Deployed, log_group: &str) -> Vec<Value> {
    let python = workspace().join("target/infra-venv/bin/python");
    let script = r#"
import json, sys, boto3
logs = boto3.client("logs")
out, token = [], None
while True:
    kw = {"logGroupName": sys.argv[1]}
    if token:
        kw["nextToken"] = token
    page = logs.filter_log_events(**kw)
    out += [e["message"] for e in page.get("events", [])]
    token = page.get("nextToken")
    if not token or not page.get("events"):
        break
print(json.dumps(out))
"#;
    let out = stdout_on_emulator(d, python, &["-c", script, log_group]);
    let messages: Vec<String> = serde_json::from_slice(&out).unwrap();
    messages
        .iter()
        .flat_map(|m| m.lines())
        .filter_map(|l| serde_json::from_str::<Value>(l.trim()).ok())
        .filter(|v| v.get("_aws").is_some())
        .collect()
}

/// On AWS the functions report what `kindred serve`'s `/metrics` does as
/// CloudWatch embedded-metric lines: the deployed ingest and identity
/// functions' logs hold them after a batch with one bad event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_deployed_functions_report_their_figures_as_embedded_metrics() {
    let Some(d) = deployed("the_deployed_functions_report_their_figures_as_embedded_metrics")
    else {
        return;
    };
    let space = create_space(&d, &format!("emf-{:x}", rand::random::<u32>()));
    let c = Client {
        http: reqwest::Client::new(),
        api: d.api_url.clone(),
        space,
    };
    let batch = json!({"batch": [
        {"type": "identify", "userId": "emf-1", "traits": {"plan": "pro"}},
        {"type": "track", "userId": "emf-1", "event": "Old", "timestamp": "1999-01-01T00:00:00Z"},
    ]});
    let (status, reply) = c
        .call("POST", "/v1/batch", &c.token("write_key"), Some(&batch))
        .await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["accepted"], 1, "{reply}");
    let found = |lines: &[Value], metric: &str, dimension: Option<(&str, &str)>| {
        lines.iter().any(|l| {
            l.get(metric).is_some()
                && l["_aws"]["CloudWatchMetrics"][0]["Namespace"] == "Kindred"
                && dimension.is_none_or(|(k, v)| l[k] == v)
        })
    };
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let ingest = emf_lines(&d, &d.ingest_logs);
        let identity = emf_lines(&d, &d.identity_logs);
        let done = found(&ingest, "EventsAccepted", Some(("Function", "ingest")))
            && found(
                &ingest,
                "EventsRefused",
                Some(("Reason", "invalid_timestamp")),
            )
            && found(&ingest, "RequestLatency", Some(("Route", "/v1/batch")))
            && found(&identity, "EventsApplied", Some(("Outcome", "recorded")))
            && found(&identity, "IdentityBatchDuration", None);
        if done {
            // Counts, ids and routes only: never an event's content.
            for line in ingest.iter().chain(&identity) {
                assert!(!line.to_string().contains("emf-1"), "{line}");
            }
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no embedded metrics yet:\ningest {ingest:?}\nidentity {identity:?}"
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

/// The operator's explorer as the deployed `profile-api` function serves
/// it, opened in headless Chromium at the API's own address, where every
/// page lives under the stage (`/prod/ui`, as on AWS): the same walk as
/// `ui::the_explorer_in_a_browser_…` (sign in, the merged profile found by
/// its mixed-case email, its graph with both devices and the refused one,
/// markup shown as text, the audience's member list read from DynamoDB,
/// settings read-only then editable), every link, redirect and the
/// cookie under `/prod`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_deployed_explorer_works_under_the_stage_in_a_browser() {
    let Some(d) = deployed("the_deployed_explorer_works_under_the_stage_in_a_browser") else {
        return;
    };
    if crate::browser::browser_tools().is_none() {
        return;
    }
    let space = create_space(&d, &format!("ui-{:x}", rand::random::<u32>()));
    let c = Client {
        http: reqwest::Client::new(),
        api: d.api_url.clone(),
        space,
    };
    let buyers =
        json!({"condition": {"performed": {"event": "Order Completed", "count": {"at_least": 1}}}});
    let (status, reply) = c.admin("PUT", "/audiences/buyers", Some(&buyers)).await;
    assert!((200..300).contains(&status), "{reply}");
    // Each batch once the one before is in the profiles.
    type Wait = (&'static str, &'static str, fn(&Value) -> bool);
    let waits: [Wait; 5] = [
        ("ann", "user_id:ann", |_| true),
        ("the laptop", "anonymous_id:laptop", |_| true),
        ("the laptop merged", "anonymous_id:laptop", |b| {
            ids(b).contains(&"user_id:ann".to_string())
        }),
        ("bob", "user_id:bob", |_| true),
        ("ann's account", "user_id:ann", |_| true),
    ];
    for (event, (what, lookup, done)) in crate::ui::scenario_batches().into_iter().zip(waits) {
        let batch = json!({"batch": [event]});
        let (status, reply) = c
            .call("POST", "/v1/batch", &c.token("write_key"), Some(&batch))
            .await;
        assert_eq!(status, 200, "{reply}");
        c.until(what, lookup, "external_ids", done).await;
    }
    c.until("ann's account", "user_id:ann", "links", |b| {
        b.to_string().contains("\"acme\"")
    })
    .await;
    c.until("ann a buyer", "user_id:ann", "traits?class=audience", |b| {
        b["traits"]["buyers"] == true
    })
    .await;
    let profile_id = |body: Value| body["metadata"]["profile_id"].as_str().unwrap().to_string();
    let ann = profile_id(c.profile("spaces", "user_id:ann", "metadata").await.1);
    let bob = profile_id(c.profile("spaces", "user_id:bob", "metadata").await.1);
    let shots = std::path::PathBuf::from(concat!(
        env!("CARGO_TARGET_TMPDIR"),
        "/ui-screenshots/deployed"
    ));
    let (access, admin) = (c.token("access_token"), c.token("admin_token"));
    let report = crate::ui::walk(&d.browser_url, &access, &admin, &shots).await;
    let stage = d.browser_url.rsplit_once('/').map(|(_, s)| s).unwrap();
    crate::ui::check_walk(
        &report,
        &d.browser_url,
        &format!("/{stage}/ui"),
        (&access, &admin),
        (&ann, &bob),
        &shots,
    );
}
