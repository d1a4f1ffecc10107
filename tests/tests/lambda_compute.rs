//! Computed traits and audiences on AWS, against DynamoDB Local and
//! ministack's SQS, with the Lambda handlers in process: definitions
//! through the `profile-api` function, events through `ingest` ->
//! `identity` -> the compute queue -> `compute`, the Profile API serving
//! the results, lookback expiry through the due index, the change log,
//! backfill over stored history, SQS redelivery, and racing folds.

use std::time::{Duration, Instant};

use aws_lambda_events::sqs::SqsEvent;
use base64::Engine;
use kindred_aws::dynamo::compute::{ComputeMessage, CHANGES_SETTLE_MS};
use kindred_aws::{DynamoStore, SqsQueue};
use kindred_domain::event::format_millis;
use kindred_tests::{aws_config, emulators, fresh_dynamo, fresh_queue, sqs_event};
use serde_json::{json, Value};
use tower::ServiceExt;

const HOUR: i64 = 3_600_000;

fn basic(user: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(format!("{user}:"))
}

/// An API Gateway v2 request, built from the Profile API fixture.
fn apigw(method: &str, path: &str, query: &str, token: &str, body: Option<&Value>) -> String {
    let mut request: Value = serde_json::from_str(include_str!(
        "../../functions/profile-api/fixtures/apigw-v2-get-traits.json"
    ))
    .unwrap();
    request["rawPath"] = path.into();
    request["rawQueryString"] = query.into();
    request["queryStringParameters"] = query
        .split('&')
        .filter_map(|pair| pair.split_once('=').or(Some((pair, ""))))
        .filter(|(k, _)| !k.is_empty())
        .map(|(k, v)| (k.to_string(), Value::from(v.replace("%20", " "))))
        .collect::<serde_json::Map<_, _>>()
        .into();
    request["headers"]["authorization"] = format!("Basic {}", basic(token)).into();
    request["headers"]["content-type"] = "application/json".into();
    request["requestContext"]["http"]["method"] = method.into();
    request["requestContext"]["http"]["path"] = path.into();
    request["body"] = body.map_or(Value::Null, |b| b.to_string().into());
    request["isBase64Encoded"] = false.into();
    request.to_string()
}

async fn call(app: &kindred_http::Router, request: String) -> (u16, Value) {
    let response = app
        .clone()
        .oneshot(lambda_http::request::from_str(&request).unwrap())
        .await
        .unwrap();
    let status = response.status().as_u16();
    let bytes = kindred_http::body_bytes(response.into_body())
        .await
        .unwrap();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

pub(crate) struct Deployment {
    store: DynamoStore,
    sqs: aws_sdk_sqs::Client,
    events_queue: String,
    compute_queue: String,
    compute: SqsQueue,
    ingest: kindred_http::Router,
    profile_api: kindred_http::Router,
    /// The same function deployed reads-only (`profile-reads`).
    profile_reads: kindred_http::Router,
    space: kindred_store::NewSpace,
    /// The sync queue and step, in deployments with destinations.
    sync_queue: String,
    sync: SqsQueue,
    sync_step: kindred_aws::sync::SyncStep,
    /// Per queue URL: SQS batches handed to a function (its invocations)
    /// and messages, as the event source mapping would.
    pumped: std::sync::Mutex<std::collections::HashMap<String, (u64, u64)>>,
    /// Tracking API requests sent, and events in them.
    sent: std::sync::Mutex<(u64, u64)>,
}

impl Deployment {
    pub(crate) async fn start(name: &str) -> Self {
        // Warnings (ids and errors, never payloads) show with a failure.
        let _ = tracing_subscriber::fmt()
            .with_env_filter("warn")
            .with_test_writer()
            .try_init();
        let setup = fresh_dynamo().await;
        let space = setup.create_space(name).await.unwrap();
        let (sqs, events_queue, _) = fresh_queue(3).await;
        let (_, compute_queue, _) = fresh_queue(3).await;
        let (_, sync_queue, _) = fresh_queue(3).await;
        let sdk = aws_config().await;
        let lambda_config = kindred_profile_api::Config {
            table: setup.table().to_string(),
            compute_queue_url: compute_queue.clone(),
            sync_queue_url: Some(sync_queue.clone()),
            secrets_key: Some("test-secrets-key".into()),
            // The receivers of this test are on 127.0.0.1.
            allow_private_destinations: true,
        };
        let sync_step = kindred_sync_function::step(
            &lambda_config,
            &sdk,
            kindred_sync::RetryPolicy {
                base: Duration::from_millis(200),
                max: Duration::from_secs(2),
                max_attempts: 8,
                timeout: Duration::from_secs(5),
            },
        )
        .unwrap();
        let ingest = kindred_ingest::app(
            &kindred_ingest::Config {
                table: setup.table().to_string(),
                events_queue_url: events_queue.clone(),
                ingest_rate: 10_000,
                public_url: None,
            },
            &sdk,
        );
        let profile_api = kindred_profile_api::app(&lambda_config, &sdk);
        let profile_reads = kindred_profile_api::reads_app(&lambda_config, &sdk);
        let store = DynamoStore::new(aws_sdk_dynamodb::Client::new(&sdk), setup.table());
        let compute = SqsQueue::new(sqs.clone(), &compute_queue);
        let sync = SqsQueue::new(sqs.clone(), &sync_queue);
        Self {
            sync_queue,
            sync,
            sync_step,
            store,
            sqs,
            events_queue,
            compute_queue,
            compute,
            ingest,
            profile_api,
            profile_reads,
            space,
            pumped: Default::default(),
            sent: Default::default(),
        }
    }

    pub(crate) async fn admin(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> (u16, Value) {
        let (path, query) = path.split_once('?').unwrap_or((path, ""));
        let path = format!("/v1/spaces/{}{path}", self.space.space_id);
        let request = apigw(method, &path, query, &self.space.admin_token, body);
        call(&self.profile_api, request).await
    }

    pub(crate) async fn define(&self, collection: &str, key: &str, body: Value) -> Value {
        let (status, reply) = self
            .admin("PUT", &format!("/{collection}/{key}"), Some(&body))
            .await;
        assert!((200..300).contains(&status), "{key}: {status} {reply}");
        reply
    }

    /// A Profile API call (`resource` such as `traits`) about a user:
    /// status and body.
    pub(crate) async fn profile(&self, lookup: &str, resource: &str, query: &str) -> (u16, Value) {
        self.collection("users", lookup, resource, query).await
    }

    /// A Profile API call in `collection`: status and body.
    pub(crate) async fn collection(
        &self,
        collection: &str,
        lookup: &str,
        resource: &str,
        query: &str,
    ) -> (u16, Value) {
        let path = format!(
            "/v1/spaces/{}/collections/{collection}/profiles/{lookup}/{resource}",
            self.space.space_id
        );
        let request = apigw("GET", &path, query, &self.space.access_token, None);
        call(&self.profile_api, request).await
    }

    pub(crate) async fn traits(&self, lookup: &str, query: &str) -> Value {
        let (status, reply) = self.profile(lookup, "traits", query).await;
        assert_eq!(status, 200, "{reply}");
        reply
    }

    pub(crate) async fn batch(&self, events: Vec<Value>) {
        let mut request: Value = serde_json::from_str(include_str!(
            "../../functions/ingest/fixtures/apigw-v2-batch.json"
        ))
        .unwrap();
        request["headers"]["authorization"] =
            format!("Basic {}", basic(&self.space.write_key)).into();
        let events_len = events.len();
        request["body"] = json!({ "batch": events }).to_string().into();
        {
            let mut sent = self.sent.lock().unwrap();
            sent.0 += 1;
            sent.1 += events_len as u64;
        }
        let (status, reply) = call(&self.ingest, request.to_string()).await;
        assert_eq!(status, 200, "{reply}");
        assert_eq!(reply["rejected"], json!([]), "{reply}");
    }

    /// Receives from `queue` until it stays empty, handing each batch to
    /// `handler` and deleting what it did not report failed.
    pub(crate) async fn pump<F, Fut>(&self, queue: &str, handler: F) -> usize
    where
        F: Fn(SqsEvent) -> Fut,
        Fut: std::future::Future<Output = aws_lambda_events::sqs::SqsBatchResponse>,
    {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut handled = 0;
        let mut empty = 0;
        while empty < 2 {
            assert!(Instant::now() < deadline, "the queue did not drain");
            let messages = self
                .sqs
                .receive_message()
                .queue_url(queue)
                .max_number_of_messages(10)
                .wait_time_seconds(1)
                .send()
                .await
                .unwrap()
                .messages()
                .to_vec();
            if messages.is_empty() {
                empty += 1;
                continue;
            }
            empty = 0;
            {
                let mut pumped = self.pumped.lock().unwrap();
                let entry = pumped.entry(queue.to_string()).or_default();
                entry.0 += 1;
                entry.1 += messages.len() as u64;
            }
            let response = handler(sqs_event(&messages)).await;
            assert!(
                failed(&response).is_empty(),
                "messages failed: {response:?}"
            );
            self.delete(queue, &messages).await;
            handled += messages.len();
        }
        handled
    }

    /// Runs the identity step, then the compute step, until both queues drain.
    pub(crate) async fn settle(&self) {
        self.pump(&self.events_queue, |e| {
            kindred_identity::handle(&self.store, &self.compute, Some(&self.sync), e)
        })
        .await;
        self.pump_compute().await;
    }

    pub(crate) async fn pump_compute(&self) -> usize {
        self.pump(&self.compute_queue, |e| {
            kindred_compute::handle(&self.store, &self.compute, Some(&self.sync), e)
        })
        .await
    }

    /// Runs the sync step on what arrives in the sync queue (delayed
    /// messages included) until `done` holds.
    /// Runs the sync step on the sync queue until it stays empty.
    pub(crate) async fn pump_sync(&self) -> usize {
        self.pump(&self.sync_queue, |e| {
            kindred_sync_function::handle(&self.sync_step, e)
        })
        .await
    }

    pub(crate) async fn pump_sync_until(&self, what: &str, done: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !done() {
            assert!(Instant::now() < deadline, "{what}: not after 60 s");
            let messages = self
                .sqs
                .receive_message()
                .queue_url(&self.sync_queue)
                .max_number_of_messages(10)
                .wait_time_seconds(1)
                .send()
                .await
                .unwrap()
                .messages()
                .to_vec();
            if messages.is_empty() {
                continue;
            }
            let response =
                kindred_sync_function::handle(&self.sync_step, sqs_event(&messages)).await;
            assert!(
                failed(&response).is_empty(),
                "sync messages failed: {response:?}"
            );
            self.delete(&self.sync_queue, &messages).await;
        }
    }

    pub(crate) async fn changes(&self, since: i64) -> Vec<Value> {
        let (status, reply) = self
            .admin("GET", &format!("/changes?since={since}&limit=1000"), None)
            .await;
        assert_eq!(status, 200, "{reply}");
        reply["data"].as_array().unwrap().clone()
    }
}

fn order(user: &str, revenue: i64, at: i64) -> Value {
    json!({"type": "track", "userId": user, "event": "Order Completed",
           "properties": {"revenue": revenue}, "timestamp": format_millis(at)})
}

/// What SQS adds to the compute contract (`compute_contract`, which
/// runs the rules on these same handlers): a redelivered event message
/// is not folded twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redelivered_event_message_is_not_folded_twice() {
    if !emulators("a_redelivered_event_message_is_not_folded_twice") {
        return;
    }
    let d = Deployment::start("compute").await;
    d.define("computed_traits", "lifetime_value", json!({
        "type": "aggregation", "function": "sum", "event": "Order Completed", "property": "revenue"})).await;
    d.define(
        "computed_traits",
        "orders_total",
        json!({"type": "event_counter", "event": "Order Completed"}),
    )
    .await;
    d.pump_compute().await;
    let now = kindred_store::now_millis();
    let mut events = vec![
        order("big", 300, now - HOUR),
        order("big", 250, now),
        order("small", 20, now),
    ];
    let message_ids: Vec<String> = (0..events.len()).map(|i| format!("m-{i}")).collect();
    for (e, id) in events.iter_mut().zip(&message_ids) {
        e["messageId"] = id.as_str().into();
    }
    d.batch(events).await;
    d.settle().await;
    let again: Vec<ComputeMessage> = message_ids
        .iter()
        .map(|m| ComputeMessage::Event {
            space_id: d.space.space_id.clone(),
            message_id: m.clone(),
        })
        .collect();
    d.compute.send_json(&again).await.unwrap();
    assert_eq!(d.pump_compute().await, 3);
    let body = d
        .traits("user_id:big", "include=orders_total,lifetime_value")
        .await;
    assert_eq!(
        body["traits"],
        json!({"orders_total": 2, "lifetime_value": 550})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_folds_of_one_profile_fold_each_event_exactly_once() {
    if !emulators("racing_folds_of_one_profile_fold_each_event_exactly_once") {
        return;
    }
    let d = Deployment::start("compute-race").await;
    d.define(
        "computed_traits",
        "orders",
        json!({"type": "event_counter", "event": "Order Completed"}),
    )
    .await;
    d.pump_compute().await;
    let now = kindred_store::now_millis();
    let events: Vec<Value> = (0..24)
        .map(|i| order("racer", i, now - i * 1_000))
        .collect();
    d.batch(events).await;
    // The identity step only: the compute messages stay queued.
    d.pump(&d.events_queue, |e| {
        kindred_identity::handle(&d.store, &d.compute, None, e)
    })
    .await;
    let messages = d.receive_all(&d.compute_queue).await;
    assert_eq!(messages.len(), 24);
    // Four workers fold overlapping halves of the messages concurrently:
    // every event is offered twice, to different workers.
    let bodies: Vec<(String, String)> = messages
        .iter()
        .map(|m| {
            (
                m.message_id().unwrap().to_string(),
                m.body().unwrap().to_string(),
            )
        })
        .collect();
    let halves = [
        bodies[..12].to_vec(),
        bodies[12..].to_vec(),
        bodies[6..18].to_vec(),
        [&bodies[..6], &bodies[18..]].concat(),
    ];
    let results = futures::future::join_all(
        halves
            .into_iter()
            .map(|h| kindred_aws::compute::handle(&d.store, &d.compute, None, h)),
    )
    .await;
    assert!(results.iter().all(Vec::is_empty), "{results:?}");
    let body = d.traits("user_id:racer", "include=orders").await;
    assert_eq!(body["traits"], json!({"orders": 24}));
    // The member list and its size were written with the racing states:
    // one profile, counted once, with the last value.
    let (status, list) = d
        .admin("GET", "/computed_traits/orders/members", None)
        .await;
    assert_eq!(status, 200, "{list}");
    assert_eq!(list["data"].as_array().unwrap().len(), 1, "{list}");
    assert_eq!(list["data"][0]["value"], json!(24), "{list}");
    let (_, definition) = d.admin("GET", "/computed_traits/orders", None).await;
    assert_eq!(definition["size"], json!(1), "{definition}");
}

/// A profile that enters more member lists at once than one transaction
/// has room for (each list is a member item and a size update) is on
/// every list after its fold, counted once each; a regulation that
/// deletes the person takes them off every list again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn member_lists_beyond_one_transaction_are_all_written_and_left() {
    if !emulators("member_lists_beyond_one_transaction_are_all_written_and_left") {
        return;
    }
    let d = Deployment::start("wide-lists").await;
    let keys: Vec<String> = (0..55).map(|i| format!("list_{i:02}")).collect();
    for key in &keys {
        d.define(
            "audiences",
            key,
            json!({"condition": {"performed": {"event": "Order Completed"}}}),
        )
        .await;
    }
    d.settle().await;
    let now = kindred_store::now_millis();
    d.batch(vec![
        order("wide", 3, now),
        order("narrow-but-there", 4, now),
    ])
    .await;
    d.settle().await;
    let sizes = |list: Value| -> Vec<i64> {
        list["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|def| def["size"].as_i64().unwrap())
            .collect()
    };
    let (_, all) = d.admin("GET", "/audiences", None).await;
    assert_eq!(sizes(all), vec![2; 55]);
    for key in [&keys[0], &keys[30], &keys[54]] {
        let (_, list) = d
            .admin("GET", &format!("/audiences/{key}/members"), None)
            .await;
        assert_eq!(list["data"].as_array().unwrap().len(), 2, "{key}: {list}");
    }
    let done = d.regulate("SUPPRESS_WITH_DELETE", &["wide"]).await;
    assert_eq!(done["status"], "finished", "{done}");
    let (_, all) = d.admin("GET", "/audiences", None).await;
    assert_eq!(sizes(all), vec![1; 55]);
    let remaining = d.profile_id("user_id:narrow-but-there").await;
    let (_, list) = d
        .admin("GET", &format!("/audiences/{}/members", keys[54]), None)
        .await;
    assert_eq!(list["data"][0]["profile_id"], json!(remaining), "{list}");
    assert_eq!(list["data"].as_array().unwrap().len(), 1, "{list}");
}

/// What a `segment` destination adds to the fan-out contract
/// (`fan_out_contract`, which runs it on these same handlers): an initial
/// sync arrives at the host's `/v1/batch` with the write key as Basic auth.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_segment_destination_gets_its_initial_sync_as_a_batch_with_its_write_key() {
    if !emulators("a_segment_destination_gets_its_initial_sync_as_a_batch_with_its_write_key") {
        return;
    }
    let d = Deployment::start("sync").await;
    d.define(
        "audiences",
        "buyers",
        json!({"condition": {"performed": {"event": "Order Completed"}}}),
    )
    .await;
    let now = kindred_store::now_millis();
    d.batch(vec![
        json!({"type": "track", "userId": "u9", "event": "Order Completed", "timestamp": format_millis(now)}),
    ])
    .await;
    d.settle().await;
    let late = d.late_segment_destination().await;
    d.pump_sync_until("the initial sync", || late.accepted().len() >= 2)
        .await;
    let req = &late.requests()[0];
    assert_eq!(req.path, "/v1/batch");
    let auth = req.headers.get("authorization").unwrap().to_str().unwrap();
    assert_eq!(auth, format!("Basic {}", basic("wk_late")));
    let accepted = late.accepted();
    let members: Vec<&Value> = accepted
        .iter()
        .filter(|c| c["type"] == "identify")
        .map(|c| &c["traits"]["buyers"])
        .collect();
    assert_eq!(members, vec![&json!(true)], "{accepted:#?}");
}

/// Every place in the whole table where one of `needles` appears (any
/// attribute, nested ones included, case-insensitive).
async fn table_leftovers(store: &DynamoStore, needles: &[&str]) -> Vec<String> {
    use aws_sdk_dynamodb::types::AttributeValue;
    fn text(v: &AttributeValue, out: &mut String) {
        match v {
            AttributeValue::S(s) | AttributeValue::N(s) => out.push_str(s),
            AttributeValue::B(b) => out.push_str(&String::from_utf8_lossy(b.as_ref())),
            AttributeValue::Ss(list) | AttributeValue::Ns(list) => {
                list.iter().for_each(|s| out.push_str(s))
            }
            AttributeValue::L(list) => list.iter().for_each(|v| text(v, out)),
            AttributeValue::M(map) => map.iter().for_each(|(k, v)| {
                out.push_str(k);
                text(v, out);
            }),
            _ => {}
        }
        out.push('\n');
    }
    let client = aws_sdk_dynamodb::Client::new(&aws_config().await);
    let mut found = Vec::new();
    let mut start = None;
    loop {
        let page = client
            .scan()
            .table_name(store.table())
            .set_exclusive_start_key(start)
            .send()
            .await
            .unwrap();
        for item in page.items() {
            let mut all = String::new();
            for (k, v) in item {
                all.push_str(k);
                text(v, &mut all);
            }
            let all = all.to_lowercase();
            for needle in needles {
                if all.contains(&needle.to_lowercase()) {
                    let pk = item
                        .get("pk")
                        .and_then(|v| v.as_s().ok())
                        .cloned()
                        .unwrap_or_default();
                    found.push(format!("{pk}: {needle}"));
                }
            }
        }
        match page.last_evaluated_key() {
            Some(k) => start = Some(k.clone()),
            None => return found,
        }
    }
}

impl Deployment {
    /// The FAQ's shared device: Alice's tablet, Bob (by email, with an
    /// order, in the `buyers` audience) on his laptop, then Bob signed in
    /// on the tablet merges his profile into hers. `(alice, bob)`.
    async fn shared_tablet(&self) -> (String, String) {
        self.define(
            "audiences",
            "buyers",
            json!({"condition": {"performed": {"event": "Order Completed", "count": {"at_least": 1}}}}),
        )
        .await;
        self.batch(vec![
            json!({"type": "identify", "userId": "alice", "anonymousId": "tablet", "traits": {"name": "Alice"}}),
        ])
        .await;
        self.settle().await;
        self.batch(vec![
            json!({"type": "identify", "anonymousId": "laptop", "traits": {"email": "bob@x.io", "name": "Bob", "plan": "pro"}}),
            json!({"type": "track", "anonymousId": "laptop", "event": "Order Completed"}),
        ])
        .await;
        self.settle().await;
        let alice = self.profile_id("user_id:alice").await;
        let bob = self.profile_id("email:bob@x.io").await;
        assert_ne!(alice, bob);
        self.batch(vec![
            json!({"type": "track", "anonymousId": "tablet", "event": "Viewed",
                               "context": {"traits": {"email": "bob@x.io"}}}),
        ])
        .await;
        self.settle().await;
        assert_eq!(self.profile_id("email:bob@x.io").await, alice);
        assert_eq!(self.is_buyer("user_id:alice").await, true);
        (alice, bob)
    }

    /// A Profile API resource (with its query) read with the access token.
    async fn read(&self, lookup: &str, resource: &str) -> Value {
        let (resource, query) = resource.split_once('?').unwrap_or((resource, ""));
        let (status, reply) = self.profile(lookup, resource, query).await;
        assert_eq!(status, 200, "{lookup}/{resource}: {reply}");
        reply
    }

    async fn profile_id(&self, lookup: &str) -> String {
        let reply = self.read(lookup, "metadata").await;
        reply["metadata"]["profile_id"]
            .as_str()
            .unwrap()
            .to_string()
    }

    async fn is_buyer(&self, lookup: &str) -> Value {
        self.read(lookup, "traits?class=audience").await["traits"]["buyers"].clone()
    }

    /// `type:id` of each of the profile's identifiers, sorted.
    async fn external_ids(&self, lookup: &str) -> Vec<String> {
        let reply = self.read(lookup, "external_ids?limit=100").await;
        let mut ids: Vec<String> = reply["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                format!(
                    "{}:{}",
                    e["type"].as_str().unwrap(),
                    e["id"].as_str().unwrap()
                )
            })
            .collect();
        ids.sort();
        ids
    }

    async fn profile_status(&self, lookup: &str) -> u16 {
        let path = format!(
            "/v1/spaces/{}/collections/users/profiles/{lookup}/traits",
            self.space.space_id
        );
        let request = apigw("GET", &path, "", &self.space.access_token, None);
        call(&self.profile_api, request).await.0
    }

    /// Starts a regulation through the Admin API and runs the sync
    /// function until it is finished.
    async fn regulate(&self, kind: &str, ids: &[&str]) -> Value {
        let (status, created) = self
            .admin(
                "POST",
                "/regulations",
                Some(&json!({"regulation_type": kind, "subject_type": "USER_ID", "subject_ids": ids})),
            )
            .await;
        assert_eq!(status, 201, "{created}");
        let id = created["id"].as_str().unwrap().to_string();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let (_, body) = self.admin("GET", &format!("/regulations/{id}"), None).await;
            if body["status"] == "finished" {
                return body;
            }
            assert!(Instant::now() < deadline, "{body}");
            self.pump(&self.sync_queue, |e| {
                kindred_sync_function::handle(&self.sync_step, e)
            })
            .await;
        }
    }
}

/// A regulation through the deployed shape: the Admin API on the
/// profile-api function records it, the sync function runs it (suppress,
/// settle, tell destinations, delete), the identity function drops the
/// person's new events; afterwards no item of the table holds their
/// identifiers or trait values.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_regulation_deletes_a_person_from_the_whole_table_through_the_functions() {
    if !emulators("a_regulation_deletes_a_person_from_the_whole_table_through_the_functions") {
        return;
    }
    use crate::common::receiver::Receiver;
    let mut d = Deployment::start("privacy").await;
    d.sync_step.regulation_settle = Duration::from_secs(1);
    let r = Receiver::start().await;
    d.define(
        "audiences",
        "buyers",
        json!({"condition": {"performed": {"event": "Order Completed"}}}),
    )
    .await;
    let (status, created) = d
        .admin(
            "PUT",
            "/destinations/crm",
            Some(
                &json!({"kind": "webhook", "url": r.url("/crm"), "secret": "crm-secret",
                         "forward_deletes": true,
                         "id_sync": {"strategy": "all", "types": ["user_id", "email"]}}),
            ),
        )
        .await;
    assert_eq!(status, 201, "{created}");
    let now = format_millis(kindred_store::now_millis());
    d.batch(vec![
        json!({"type": "track", "userId": "gdpr-user-7f3", "event": "Order Completed",
               "properties": {"note": "Rue-des-Secrets-42"}, "timestamp": now}),
        json!({"type": "page", "anonymousId": "gdpr-anon-1c9", "name": "Home", "timestamp": now}),
        json!({"type": "identify", "anonymousId": "gdpr-anon-1c9", "userId": "gdpr-user-7f3",
               "traits": {"email": "GDPR.Subject@Example.com", "address": "Rue-des-Secrets-42"},
               "timestamp": now}),
        json!({"type": "group", "userId": "gdpr-user-7f3", "groupId": "acme", "timestamp": now}),
        json!({"type": "identify", "userId": "keep-user", "traits": {"email": "keep@example.com"}}),
    ])
    .await;
    d.settle().await;
    d.pump_sync_until("the person enters the audience", || {
        r.accepted()
            .iter()
            .any(|c| c["event"] == "Audience Entered" && c["userId"] == "gdpr-user-7f3")
    })
    .await;

    let (_, meta) = d.profile("user_id:gdpr-user-7f3", "metadata", "").await;
    let profile_id = meta["metadata"]["profile_id"].as_str().unwrap().to_string();
    let (_, users) = d.collection("accounts", "group_id:acme", "links", "").await;
    assert_eq!(
        users["data"][0]["profile_id"],
        profile_id.as_str(),
        "{users}"
    );

    let before = d.sync_step.store.usage();
    let done = d.regulate("SUPPRESS_WITH_DELETE", &["gdpr-user-7f3"]).await;
    assert_eq!(done["profiles_deleted"], 2, "{done}");
    // What the sync function's regulation steps cost (BENCHMARKS.md).
    let cost = d.sync_step.store.usage().since(before);
    println!(
        "regulation, one person of 2 profiles and 4 events: {} reads ({:.1} RCU), {} writes ({:.1} WCU)",
        cost.read_requests, cost.read_units, cost.write_requests, cost.write_units
    );
    d.pump_sync_until("an exit and a delete", || {
        let calls = r.accepted();
        calls
            .iter()
            .any(|c| c["event"] == "Audience Exited" && c["userId"] == "gdpr-user-7f3")
            && calls
                .iter()
                .any(|c| c["type"] == "delete" && c["userId"] == "gdpr-user-7f3")
    })
    .await;
    // The farewell calls leave the outbox once delivered.
    d.pump(&d.sync_queue, |e| {
        kindred_sync_function::handle(&d.sync_step, e)
    })
    .await;
    for lookup in [
        "user_id:gdpr-user-7f3",
        "anonymous_id:gdpr-anon-1c9",
        "email:gdpr.subject@example.com",
    ] {
        assert_eq!(d.profile_status(lookup).await, 404, "{lookup}");
    }
    let person = [
        "gdpr-user-7f3",
        "gdpr.subject@example.com",
        "gdpr-anon-1c9",
        "Rue-des-Secrets-42",
    ];
    assert_eq!(
        table_leftovers(&d.store, &person).await,
        Vec::<String>::new()
    );
    // Nor the profile's id: the account's link back to it went too.
    assert_eq!(
        table_leftovers(&d.store, &[profile_id.as_str()]).await,
        Vec::<String>::new()
    );
    assert!(!table_leftovers(&d.store, &["keep@example.com"])
        .await
        .is_empty());

    // Back with the same ids: dropped by the identity function.
    d.batch(vec![
        json!({"type": "identify", "userId": "gdpr-user-7f3", "traits": {"address": "Rue-des-Secrets-42"}}),
        json!({"type": "page", "anonymousId": "gdpr-anon-1c9"}),
    ])
    .await;
    d.settle().await;
    assert_eq!(d.profile_status("user_id:gdpr-user-7f3").await, 404);
    assert_eq!(
        table_leftovers(&d.store, &person).await,
        Vec::<String>::new()
    );
    let (_, list) = d.admin("GET", "/regulations", None).await;
    assert_eq!(list["suppressed_events"], 2, "{list}");

    d.regulate("UNSUPPRESS", &["gdpr-user-7f3"]).await;
    d.batch(vec![
        json!({"type": "identify", "userId": "gdpr-user-7f3", "traits": {"plan": "back"}}),
    ])
    .await;
    d.settle().await;
    let traits = d.traits("user_id:gdpr-user-7f3", "").await;
    assert_eq!(traits["traits"], json!({"plan": "back"}));
}

/// Identifier removal through the profile-api function on DynamoDB: the
/// identifier leaves the profile and is claimed by another one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_identifier_taken_off_a_profile_on_dynamodb_is_free_to_claim() {
    if !emulators("an_identifier_taken_off_a_profile_on_dynamodb_is_free_to_claim") {
        return;
    }
    let d = Deployment::start("removal").await;
    d.batch(vec![
        json!({"type": "identify", "userId": "u1", "anonymousId": "shared-tablet",
               "traits": {"email": "u1@x.io"}}),
    ])
    .await;
    d.settle().await;
    let (status, reply) = d
        .admin(
            "POST",
            "/collections/users/profiles/email:u1@x.io/external_ids/delete",
            Some(&json!({"external_ids": [{"type": "anonymous_id", "id": "shared-tablet"}]})),
        )
        .await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(
        reply["removed"],
        json!([{"type": "anonymous_id", "id": "shared-tablet"}])
    );
    assert_eq!(d.profile_status("anonymous_id:shared-tablet").await, 404);
    d.batch(vec![
        json!({"type": "identify", "userId": "u2", "anonymousId": "shared-tablet"}),
    ])
    .await;
    d.settle().await;
    let path = format!(
        "/v1/spaces/{}/collections/users/profiles/anonymous_id:shared-tablet/external_ids",
        d.space.space_id
    );
    let (status, ids) = call(
        &d.profile_api,
        apigw("GET", &path, "", &d.space.access_token, None),
    )
    .await;
    assert_eq!(status, 200, "{ids}");
    let users: Vec<&str> = ids["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["type"] == "user_id")
        .map(|e| e["id"].as_str().unwrap())
        .collect();
    assert_eq!(users, ["u2"], "the tablet joined u2, not u1: {ids}");
    let traits = d.traits("user_id:u1", "").await;
    assert_eq!(traits["traits"]["email"], "u1@x.io");
}

/// The FAQ's shared device on DynamoDB, through the functions: Bob's
/// profile is merged into Alice's through her tablet, split again, and
/// each is themselves (identifiers, traits, audiences); the identity
/// function's cached merge pointer is not trusted after the split, and
/// the next event carrying both identifiers does not merge them again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_merge_on_dynamodb_is_split_and_stays_apart() {
    if !emulators("a_wrong_merge_on_dynamodb_is_split_and_stays_apart") {
        return;
    }
    let d = Deployment::start("split").await;
    let (alice, bob) = d.shared_tablet().await;
    // The identity function now holds Bob's merge pointer in its cache.
    d.batch(vec![
        json!({"type": "page", "anonymousId": "laptop", "messageId": "m-before"}),
    ])
    .await;
    d.settle().await;

    let path = format!("/collections/users/profiles/user_id:alice/merges/{bob}/split");
    // The reads-only deployment refuses it (its role could not write it
    // anyway) and reads as the full one does.
    let full_path = format!("/v1/spaces/{}{path}", d.space.space_id);
    let request = apigw("POST", &full_path, "", &d.space.admin_token, None);
    let (status, reply) = call(&d.profile_reads, request).await;
    assert_eq!(
        (status, &reply["error"]["code"]),
        (405, &json!("read_only")),
        "{reply}"
    );
    let traits = format!(
        "/v1/spaces/{}/collections/users/profiles/user_id:alice/traits",
        d.space.space_id
    );
    let request = apigw("GET", &traits, "", &d.space.access_token, None);
    let (status, reply) = call(&d.profile_reads, request).await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(
        reply["traits"]["plan"], "pro",
        "Bob's traits are Alice's now: {reply}"
    );

    let (status, reply) = d.admin("POST", &path, None).await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["parent"], alice.as_str());
    assert_eq!(reply["child"], bob.as_str());
    let mut moved: Vec<String> = reply["moved_external_ids"]
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
    d.settle().await;

    assert_eq!(
        d.external_ids("user_id:alice").await,
        ["anonymous_id:tablet", "user_id:alice"]
    );
    assert_eq!(
        d.external_ids("email:bob@x.io").await,
        ["anonymous_id:laptop", "email:bob@x.io"]
    );
    let alice_traits = d.traits("user_id:alice", "").await["traits"].clone();
    assert_eq!(alice_traits["name"], "Alice", "{alice_traits}");
    assert!(
        alice_traits.get("plan").is_none() && alice_traits.get("email").is_none(),
        "{alice_traits}"
    );
    let bob_traits = d.traits("email:bob@x.io", "").await["traits"].clone();
    assert_eq!(
        (&bob_traits["name"], &bob_traits["plan"]),
        (&json!("Bob"), &json!("pro")),
        "{bob_traits}"
    );
    // Recomputed from each side's own events: the order is Bob's.
    assert_eq!(d.is_buyer("email:bob@x.io").await, true);
    assert_eq!(d.is_buyer("user_id:alice").await, false, "Alice leaves");
    tokio::time::sleep(Duration::from_millis(CHANGES_SETTLE_MS as u64 + 500)).await;
    let changes = d.changes(0).await;
    let count = |who: &str, value: bool| {
        changes
            .iter()
            .filter(|c| c["profile_id"] == who && c["key"] == "buyers" && c["new"] == value)
            .count()
    };
    // Alice leaves; Bob enters again (he had entered before the merge).
    assert_eq!(count(&alice, false), 1, "{changes:?}");
    assert_eq!(count(&bob, true), 2, "{changes:?}");
    let merges = d.read("user_id:alice", "merges").await;
    assert_eq!(merges["data"], json!([]), "{merges}");

    // The laptop alone lands on Bob now, though the identity function
    // had cached his pointer to Alice.
    d.batch(vec![
        json!({"type": "page", "anonymousId": "laptop", "messageId": "m-after"}),
    ])
    .await;
    d.settle().await;
    let events = d.read("email:bob@x.io", "events?limit=50").await;
    let ids: Vec<&str> = events["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["message_id"].as_str().unwrap())
        .collect();
    assert!(ids.contains(&"m-after"), "{ids:?}");

    // Both identifiers together again: no merge, and the refusal is logged.
    d.batch(vec![
        json!({"type": "track", "anonymousId": "tablet", "event": "Viewed",
                        "messageId": "m-again", "context": {"traits": {"email": "bob@x.io"}}}),
    ])
    .await;
    d.settle().await;
    assert_eq!(d.profile_id("email:bob@x.io").await, bob);
    assert_eq!(d.profile_id("anonymous_id:tablet").await, alice);
    let v = d.read("email:bob@x.io", "violations").await;
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
    let (status, reply) = d.admin("POST", &path, None).await;
    assert_eq!(status, 404, "{reply}");
}

/// A merge applied by an attempt whose announcement could not be sent
/// (the sync queue failed): SQS redelivers the event, which is now a
/// duplicate, and the redelivery still announces the merge, so the
/// destination gets its `alias`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_merge_whose_announcement_failed_still_gets_its_alias() {
    if !emulators("a_merge_whose_announcement_failed_still_gets_its_alias") {
        return;
    }
    use crate::common::receiver::Receiver;
    let d = Deployment::start("lost-alias").await;
    let r = Receiver::start().await;
    let (status, created) = d
        .admin(
            "PUT",
            "/destinations/ads",
            Some(&json!({"kind": "webhook", "url": r.url("/ads"), "alias_on_merge": true})),
        )
        .await;
    assert_eq!(status, 201, "{created}");
    d.batch(vec![
        json!({"type": "page", "anonymousId": "a1"}),
        json!({"type": "identify", "userId": "u9"}),
    ])
    .await;
    d.settle().await;
    d.batch(vec![
        json!({"type": "identify", "userId": "u9", "anonymousId": "a1", "messageId": "m-merge"}),
    ])
    .await;
    let messages = d
        .sqs
        .receive_message()
        .queue_url(&d.events_queue)
        .max_number_of_messages(10)
        .wait_time_seconds(2)
        .send()
        .await
        .unwrap()
        .messages()
        .to_vec();
    assert_eq!(messages.len(), 1);
    // The first attempt merges, but the sync queue is gone.
    let broken = SqsQueue::new(d.sqs.clone(), format!("{}-missing", d.sync_queue));
    let first =
        kindred_identity::handle(&d.store, &d.compute, Some(&broken), sqs_event(&messages)).await;
    assert_eq!(
        first.batch_item_failures.len(),
        1,
        "reported failed, for SQS to redeliver"
    );
    assert_eq!(
        d.read("user_id:u9", "merges").await["data"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    // SQS redelivers it: a duplicate now, announced all the same.
    let mut again = sqs_event(&messages);
    again.records[0]
        .attributes
        .insert("ApproximateReceiveCount".into(), "2".into());
    let second = kindred_identity::handle(&d.store, &d.compute, Some(&d.sync), again).await;
    assert!(second.batch_item_failures.is_empty());
    d.pump_sync_until("the alias", || {
        r.accepted().iter().any(|c| c["type"] == "alias")
    })
    .await;
    let aliases: Vec<Value> = r
        .accepted()
        .into_iter()
        .filter(|c| c["type"] == "alias")
        .collect();
    assert_eq!(aliases.len(), 1, "{aliases:?}");
    assert_eq!(
        (
            aliases[0]["previousId"].as_str(),
            aliases[0]["userId"].as_str()
        ),
        (Some("a1"), Some("u9"))
    );
}

/// A split racing the identity function's claims on the parent: the
/// split's transaction is conditioned on the parent's version, so no
/// identifier claimed meanwhile is lost from either list.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_split_racing_claims_on_dynamodb_loses_no_identifier() {
    if !emulators("a_split_racing_claims_on_dynamodb_loses_no_identifier") {
        return;
    }
    let d = Deployment::start("split-race").await;
    let (_, mut settings) = d.admin("GET", "/identity_settings", None).await;
    settings["types"]["anonymous_id"]["limit"] = json!({"count": 100, "frequency": "ever"});
    let (status, reply) = d.admin("PUT", "/identity_settings", Some(&settings)).await;
    assert_eq!(status, 200, "{reply}");
    let (_, bob) = d.shared_tablet().await;
    let devices: Vec<String> = (0..30).map(|i| format!("device-{i}")).collect();
    d.batch(
        devices
            .iter()
            .map(|a| json!({"type": "identify", "userId": "alice", "anonymousId": a}))
            .collect(),
    )
    .await;
    let path = format!("/collections/users/profiles/user_id:alice/merges/{bob}/split");
    let (_, (status, reply)) = tokio::join!(d.settle(), async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        d.admin("POST", &path, None).await
    });
    assert_eq!(status, 200, "{reply}");
    d.settle().await;
    let mut expected: Vec<String> = devices
        .iter()
        .map(|a| format!("anonymous_id:{a}"))
        .collect();
    expected.extend(["anonymous_id:tablet".into(), "user_id:alice".into()]);
    expected.sort();
    assert_eq!(d.external_ids("user_id:alice").await, expected);
    assert_eq!(
        d.external_ids("email:bob@x.io").await,
        ["anonymous_id:laptop", "email:bob@x.io"]
    );
    for a in &devices {
        assert_ne!(d.profile_id(&format!("anonymous_id:{a}")).await, bob);
    }
}

/// SPEC 5's merge-protection example on DynamoDB: the refused merge is in
/// the violations log of the profile and of the space.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn violations_are_logged_on_dynamodb() {
    if !emulators("violations_are_logged_on_dynamodb") {
        return;
    }
    let d = Deployment::start("violations").await;
    d.batch(vec![
        json!({"type": "identify", "anonymousId": "a1", "userId": "u1", "messageId": "m-u1"}),
    ])
    .await;
    d.settle().await;
    d.batch(vec![
        json!({"type": "identify", "anonymousId": "a1", "userId": "u2", "messageId": "m-u2"}),
    ])
    .await;
    d.settle().await;
    let path = format!(
        "/v1/spaces/{}/collections/users/profiles/user_id:u2/violations",
        d.space.space_id
    );
    let (status, body) = call(
        &d.profile_api,
        apigw("GET", &path, "", &d.space.access_token, None),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["data"][0]["message_id"], "m-u2", "{body}");
    assert_eq!(body["data"][0]["rule"], "limit");
    assert_eq!(body["data"][0]["identifier_type"], "anonymous_id");
    let (_, all) = d.admin("GET", "/violations", None).await;
    assert_eq!(all["data"].as_array().unwrap().len(), 1, "{all}");
}

/// DELETE_INTERNAL and SUPPRESS_ONLY through the functions on DynamoDB.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_internal_and_suppress_only_on_dynamodb() {
    if !emulators("delete_internal_and_suppress_only_on_dynamodb") {
        return;
    }
    let mut d = Deployment::start("regulation-types").await;
    d.sync_step.regulation_settle = Duration::from_secs(1);
    d.batch(vec![
        json!({"type": "identify", "userId": "di-user-91", "traits": {"address": "Secret-Street-91"}}),
        json!({"type": "identify", "userId": "so-user-37", "traits": {"plan": "kept"}}),
    ])
    .await;
    d.settle().await;

    let done = d.regulate("DELETE_INTERNAL", &["di-user-91"]).await;
    assert_eq!(done["profiles_deleted"], 1, "{done}");
    assert_eq!(d.profile_status("user_id:di-user-91").await, 404);
    assert_eq!(
        table_leftovers(&d.store, &["di-user-91", "Secret-Street-91"]).await,
        Vec::<String>::new()
    );
    // Events received after the delete are collected, as a new person.
    d.batch(vec![
        json!({"type": "identify", "userId": "di-user-91", "traits": {"plan": "new"}}),
    ])
    .await;
    d.settle().await;
    assert_eq!(
        d.traits("user_id:di-user-91", "").await["traits"],
        json!({"plan": "new"})
    );

    let done = d.regulate("SUPPRESS_ONLY", &["so-user-37"]).await;
    assert_eq!(done["profiles_deleted"], 0, "{done}");
    d.batch(vec![
        json!({"type": "identify", "userId": "so-user-37", "traits": {"plan": "changed"}}),
    ])
    .await;
    d.settle().await;
    assert_eq!(
        d.traits("user_id:so-user-37", "").await["traits"],
        json!({"plan": "kept"})
    );
    let (_, list) = d.admin("GET", "/regulations", None).await;
    assert_eq!(list["suppressed_events"], 1, "{list}");
    assert_eq!(list["data"].as_array().unwrap().len(), 2, "{list}");
}

/// A delete on DynamoDB while the same person's events keep arriving
/// through ingest and the identity function: with the settle wait longer
/// than the identity function's rules cache, nothing of the person
/// remains afterwards (SUPPRESS_WITH_DELETE).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delete_racing_ingest_on_dynamodb_leaves_nothing() {
    if !emulators("a_delete_racing_ingest_on_dynamodb_leaves_nothing") {
        return;
    }
    let mut d = Deployment::start("race").await;
    // Past the identity rules' 10 s cache, as in production (30 s).
    d.sync_step.regulation_settle = Duration::from_secs(12);
    let event = |i: usize| {
        json!({"type": "identify", "userId": "race-user-55", "anonymousId": format!("race-device-{i}"),
               "traits": {"address": "Race-Street-55"}})
    };
    d.batch(vec![event(0)]).await;
    d.settle().await;
    let stop = std::sync::atomic::AtomicBool::new(false);
    let sender = async {
        let mut sent = 0;
        while !stop.load(std::sync::atomic::Ordering::SeqCst) {
            sent += 1;
            d.batch(vec![event(sent)]).await;
            d.settle().await;
        }
        sent
    };
    let regulator = async {
        let done = d.regulate("SUPPRESS_WITH_DELETE", &["race-user-55"]).await;
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        done
    };
    let (sent, done) = tokio::join!(sender, regulator);
    assert!(sent > 2, "events kept arriving during the delete ({sent})");
    assert_eq!(done["status"], "finished", "{done}");
    d.settle().await;
    assert_eq!(d.profile_status("user_id:race-user-55").await, 404);
    assert_eq!(
        table_leftovers(
            &d.store,
            &["race-user-55", "Race-Street-55", "race-device-"]
        )
        .await,
        Vec::<String>::new()
    );
}

impl Deployment {
    /// A receiver and a Segment destination `late` that sends to it, added
    /// now (its initial sync is pending).
    async fn late_segment_destination(&self) -> crate::common::receiver::Receiver {
        let late = crate::common::receiver::Receiver::start().await;
        let (status, reply) = self
            .admin(
                "PUT",
                "/destinations/late",
                Some(&json!({"kind": "segment", "host": late.url(""), "write_key": "wk_late"})),
            )
            .await;
        assert_eq!(status, 201, "{reply}");
        late
    }

    /// Every root the roots index holds for the space, walked `limit` at a
    /// time (each walk goes on from the cursor the last one returned).
    async fn walk_roots(&self, limit: usize) -> Vec<String> {
        let mut roots = Vec::new();
        let mut cursor = None;
        loop {
            let (page, next) = self
                .store
                .root_profiles(&self.space.space_id, cursor, limit)
                .await
                .unwrap();
            assert!(page.len() <= limit, "{} > {limit}", page.len());
            roots.extend(page);
            match next {
                Some(next) => cursor = Some(next),
                None => break,
            }
        }
        roots.sort();
        roots
    }
}

#[tokio::test]
async fn the_roots_index_holds_each_root_once_through_merges_splits_and_the_migration() {
    if !emulators("the_roots_index_holds_each_root_once_through_merges_splits_and_the_migration") {
        return;
    }
    let d = Deployment::start("roots").await;
    let (alice, bob) = d.shared_tablet().await;
    d.batch(
        (0..40)
            .map(|i| json!({"type": "identify", "userId": format!("u{i}")}))
            .collect(),
    )
    .await;
    d.settle().await;
    let mut users = Vec::new();
    for i in 0..40 {
        users.push(d.profile_id(&format!("user_id:u{i}")).await);
    }
    let mut expected = users.clone();
    expected.push(alice.clone());
    expected.sort();
    // Bob merged into Alice: he is not a root. Pages of 7 cross shards.
    assert_eq!(d.walk_roots(7).await, expected);
    assert_eq!(d.walk_roots(1_000).await, expected);

    // Split off again, Bob is a root again.
    let path = format!("/collections/users/profiles/user_id:alice/merges/{bob}/split");
    let (status, reply) = d.admin("POST", &path, None).await;
    assert_eq!(status, 200, "{reply}");
    let mut with_bob = expected.clone();
    with_bob.push(bob.clone());
    with_bob.sort();
    assert_eq!(d.walk_roots(5).await, with_bob);

    // A table written before the index: its roots are found again by the
    // migration, and only its roots.
    for p in users.iter().take(10).chain([&bob]) {
        d.store.unindex_root(&d.space.space_id, p).await.unwrap();
    }
    assert_eq!(d.walk_roots(1_000).await.len(), with_bob.len() - 11);
    assert_eq!(d.store.index_roots().await.unwrap(), 11);
    assert_eq!(d.walk_roots(3).await, with_bob);
    assert_eq!(
        d.store.index_roots().await.unwrap(),
        0,
        "run again: nothing to do"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_initial_sync_of_many_roots_goes_on_across_messages_and_misses_no_one() {
    if !emulators("an_initial_sync_of_many_roots_goes_on_across_messages_and_misses_no_one") {
        return;
    }
    let mut d = Deployment::start("initial").await;
    // Three roots per sync message: twelve buyers take several.
    d.sync_step.initial_sync_roots = 3;
    d.define(
        "audiences",
        "buyers",
        json!({"condition": {"performed": {"event": "Order Completed"}}}),
    )
    .await;
    let now = kindred_store::now_millis();
    let order = |user: String| {
        json!({"type": "track", "userId": user, "event": "Order Completed",
               "timestamp": format_millis(now)})
    };
    d.batch((0..12).map(|i| order(format!("b{i}"))).collect())
        .await;
    d.batch(vec![json!({"type": "identify", "userId": "not-a-buyer"})])
        .await;
    d.settle().await;

    let late = d.late_segment_destination().await;
    // A buyer arriving while the initial sync is under way gets there too
    // (as a current value or as a change).
    d.batch(vec![order("b12".into())]).await;
    d.settle().await;
    let members = || {
        let mut users: Vec<String> = late
            .accepted()
            .iter()
            .filter(|c| c["type"] == "identify" && c["traits"]["buyers"] == json!(true))
            .map(|c| c["userId"].as_str().unwrap_or_default().to_string())
            .collect();
        users.sort();
        users.dedup();
        users
    };
    d.pump_sync_until("every buyer", || members().len() == 13)
        .await;
    let mut expected: Vec<String> = (0..13).map(|i| format!("b{i}")).collect();
    expected.sort();
    assert_eq!(members(), expected);
    let (_, st) = d.admin("GET", "/destinations/late", None).await;
    assert_eq!(st["initial_sync"], "done", "{st}");
    assert!(
        !late.accepted().iter().any(|c| c["userId"] == "not-a-buyer"),
        "a root outside the audience sends nothing"
    );
}

/// Requests per service counted while a stretch of events goes through
/// the functions (in process, on DynamoDB Local and the emulator's SQS).
#[derive(Clone, Copy, Default)]
struct Meter {
    api_requests: u64,
    events: u64,
    dynamo: kindred_aws::UsageSnapshot,
    /// Messages and batches (invocations) per function's queue.
    identity: (u64, u64),
    compute: (u64, u64),
    sync: (u64, u64),
    /// SQS sends by the functions (ingest's are counted from its batches).
    sends: u64,
    /// What the identity, compute and sync steps wrote.
    steps: [kindred_aws::UsageSnapshot; 3],
}

impl Deployment {
    fn meter(&self) -> Meter {
        let pumped = self.pumped.lock().unwrap();
        // (messages, batches)
        let of = |q: &str| pumped.get(q).map_or((0, 0), |&(b, m)| (m, b));
        let sent = *self.sent.lock().unwrap();
        let a = self.store.usage();
        let b = self.sync_step.store.usage();
        Meter {
            api_requests: sent.0,
            events: sent.1,
            dynamo: kindred_aws::UsageSnapshot {
                read_requests: a.read_requests + b.read_requests,
                write_requests: a.write_requests + b.write_requests,
                read_units: a.read_units + b.read_units,
                write_units: a.write_units + b.write_units,
                transaction_write_units: a.transaction_write_units + b.transaction_write_units,
            },
            identity: of(&self.events_queue),
            compute: of(&self.compute_queue),
            sync: of(&self.sync_queue),
            sends: self.compute.requests() + self.sync.requests() + self.sync_step.queue.requests(),
            steps: Default::default(),
        }
    }

    /// Sends `events` `per_request` at a time and runs every function until
    /// the queues drain (the sync queue after its 6 s delay); what it cost.
    async fn bill(&self, events: Vec<Value>, per_request: usize) -> Meter {
        let before = self.meter();
        let sync_sends = self.sync.requests();
        for chunk in events.chunks(per_request) {
            self.batch(chunk.to_vec()).await;
        }
        let w0 = self.store.usage();
        self.pump(&self.events_queue, |e| {
            kindred_identity::handle(&self.store, &self.compute, Some(&self.sync), e)
        })
        .await;
        let w1 = self.store.usage();
        self.pump_compute().await;
        let w2 = self.store.usage();
        let s0 = self.sync_step.store.usage();
        if self.sync.requests() > sync_sends {
            // Changes wait 6 s in the sync queue (the change log's settle
            // window).
            tokio::time::sleep(Duration::from_millis(6_500)).await;
        }
        self.pump(&self.sync_queue, |e| {
            kindred_sync_function::handle(&self.sync_step, e)
        })
        .await;
        let s1 = self.sync_step.store.usage();
        let after = self.meter();
        let minus = |a: (u64, u64), b: (u64, u64)| (a.0 - b.0, a.1 - b.1);
        Meter {
            api_requests: after.api_requests - before.api_requests,
            events: after.events - before.events,
            dynamo: after.dynamo.since(before.dynamo),
            identity: minus(after.identity, before.identity),
            compute: minus(after.compute, before.compute),
            sync: minus(after.sync, before.sync),
            sends: after.sends - before.sends,
            steps: [w1.since(w0), w2.since(w1), s1.since(s0)],
        }
    }
}

/// us-east-1 on-demand list prices (2026): DynamoDB per write and read
/// request unit, SQS per request, Lambda per invocation, API Gateway REST
/// per request.
const DYNAMO_WRU: f64 = 0.625e-6;
const DYNAMO_RRU: f64 = 0.125e-6;
const SQS_REQUEST: f64 = 0.40e-6;
const LAMBDA_INVOCATION: f64 = 0.20e-6;
const REST_REQUEST: f64 = 3.50e-6;

/// Write units as DynamoDB bills them: DynamoDB Local reports each item
/// of a transaction at `local_ratio` times the 2 units per KB that AWS
/// documents (a prepare and a commit write), so transactions are scaled
/// back by it.
fn billed(u: &kindred_aws::UsageSnapshot, local_ratio: f64) -> f64 {
    u.write_units - u.transaction_write_units + u.transaction_write_units / local_ratio
}

/// Per event: (dollars per million events, the line printed).
fn priced(label: &str, m: &Meter, local_ratio: f64) -> (f64, String) {
    let e = m.events as f64;
    let wru = billed(&m.dynamo, local_ratio);
    // Ingest sends its events 10 per SendMessageBatch per request; each
    // function's event source mapping receives a batch and deletes it
    // with one DeleteMessageBatch (empty polls left out).
    let per_request = (m.events as f64 / m.api_requests as f64 / 10.0).ceil();
    let ingest_sends = per_request * m.api_requests as f64;
    let batches = m.identity.1 + m.compute.1 + m.sync.1;
    let sqs = ingest_sends + m.sends as f64 + 2.0 * batches as f64;
    let invocations = m.api_requests as f64 + batches as f64;
    let dollars = wru * DYNAMO_WRU
        + m.dynamo.read_units * DYNAMO_RRU
        + sqs * SQS_REQUEST
        + invocations * LAMBDA_INVOCATION
        + m.api_requests as f64 * REST_REQUEST;
    let per_million = dollars / e * 1e6;
    let line = format!(
        "| {label} | {:.2} | {:.2} ({:.1} + {:.1} + {:.1}) | {:.2} | {:.2} | {:.2} | {:.2} | {:.3} | {:.2} |",
        m.dynamo.read_units / e,
        wru / e,
        billed(&m.steps[0], local_ratio) / e,
        billed(&m.steps[1], local_ratio) / e,
        billed(&m.steps[2], local_ratio) / e,
        m.dynamo.write_units / e,
        sqs / e,
        invocations / e,
        m.api_requests as f64 / e,
        (m.identity.1 + m.compute.1) as f64 / e,
        per_million,
    );
    (per_million, line)
}

/// The cost of an event through every service (issue 16): a known
/// identity, a new identity and a merge, in batches of 30 and one by one,
/// with no definitions and with 20. Prints the table BENCHMARKS.md quotes
/// (capacity units as DynamoDB Local reports them; requests and
/// invocations counted; Lambda GB-seconds are not measured here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cost_of_an_event_through_every_service() {
    if !emulators("the_cost_of_an_event_through_every_service") {
        return;
    }
    let mut table = vec![
        "| scenario | DynamoDB RRU | DynamoDB WRU billed (identity + compute + sync) | WRU as DynamoDB Local reports | SQS requests | Lambda invocations | API requests | identity + compute batches | $ per million events (without GB-s) |".to_string(),
        "|---|---|---|---|---|---|---|---|---|".to_string(),
    ];
    let mut local_ratio = 0.0;
    for definitions in [0, 20] {
        let d = Deployment::start(&format!("cost{definitions}")).await;
        if local_ratio == 0.0 {
            local_ratio = transaction_ratio(&d).await;
        }
        for i in 0..definitions / 2 {
            d.define(
                "computed_traits",
                &format!("count_{i}"),
                json!({"type": "event_counter", "event": format!("Event {i}"), "lookback": {"days": 30}}),
            )
            .await;
            d.define(
                "audiences",
                &format!("did_{i}"),
                json!({"condition": {"performed": {"event": format!("Event {i}"), "within": {"days": 7}}}}),
            )
            .await;
        }
        // Known users, and pairs of profiles (a device, a user) to merge.
        let n = 40;
        let mut setup: Vec<Value> = Vec::new();
        for i in 0..n {
            setup.push(json!({"type": "identify", "userId": format!("u{i}")}));
            setup
                .push(json!({"type": "track", "anonymousId": format!("a{i}"), "event": "Event 9"}));
            setup.push(json!({"type": "identify", "userId": format!("m{i}")}));
        }
        d.bill(setup, 50).await;
        let track = |i: usize| {
            json!({"type": "track", "userId": format!("u{i}"), "event": format!("Event {}", i % 10),
                   "properties": {"sku": "A-1", "price": 19.5}})
        };
        let new = |i: usize| {
            json!({"type": "identify", "userId": format!("n{i}"), "anonymousId": format!("na{i}"),
                   "traits": {"email": format!("n{i}@example.com")}})
        };
        let merge = |i: usize| json!({"type": "identify", "userId": format!("m{i}"), "anonymousId": format!("a{i}")});
        let scenarios: [(&str, &dyn Fn(usize) -> Value); 3] = [
            ("known identity", &track),
            ("new identity", &new),
            ("merge", &merge),
        ];
        for (name, make) in scenarios {
            let batched = d.bill((0..30).map(make).collect(), 30).await;
            let single = d.bill((30..n).map(make).collect(), 1).await;
            for (how, m) in [("batches of 30", batched), ("one by one", single)] {
                assert!(m.dynamo.write_units > 0.0, "no consumed capacity reported");
                assert_eq!(m.identity.0, m.events, "one identity message per event");
                let label = format!("{name}, {definitions} definitions, {how}");
                let (_, line) = priced(&label, &m, local_ratio);
                table.push(line);
            }
        }
    }
    println!(
        "\nDynamoDB Local reports a one-item transaction of a small item as {:.1} write units; AWS bills 2.0",
        local_ratio * 2.0
    );
    println!("\n{}", table.join("\n"));
}

/// How many times AWS's documented 2 write units DynamoDB Local reports
/// for a transaction that puts one small item (no index keys).
async fn transaction_ratio(d: &Deployment) -> f64 {
    use aws_sdk_dynamodb::types::{AttributeValue, Put, ReturnConsumedCapacity, TransactWriteItem};
    let client = aws_sdk_dynamodb::Client::new(&aws_config().await);
    let item = std::collections::HashMap::from([
        ("pk".to_string(), AttributeValue::S("CALIBRATION".into())),
        ("sk".to_string(), AttributeValue::S("META".into())),
        ("body".to_string(), AttributeValue::S("x".repeat(500))),
    ]);
    let put = Put::builder()
        .table_name(d.store.table())
        .set_item(Some(item))
        .build()
        .unwrap();
    let out = client
        .transact_write_items()
        .transact_items(TransactWriteItem::builder().put(put).build())
        .return_consumed_capacity(ReturnConsumedCapacity::Total)
        .send()
        .await
        .unwrap();
    let reported: f64 = out
        .consumed_capacity()
        .iter()
        .map(|c| {
            c.write_capacity_units()
                .or(c.capacity_units())
                .unwrap_or(0.0)
        })
        .sum();
    assert!(
        reported >= 2.0,
        "a transaction reported {reported} write units"
    );
    reported / 2.0
}

impl Deployment {
    /// Every message `queue` holds now, received (hidden for a minute) but
    /// not deleted.
    async fn receive_all(&self, queue: &str) -> Vec<aws_sdk_sqs::types::Message> {
        let mut all = Vec::new();
        loop {
            let batch = self
                .sqs
                .receive_message()
                .queue_url(queue)
                .max_number_of_messages(10)
                .visibility_timeout(60)
                .wait_time_seconds(1)
                .send()
                .await
                .unwrap()
                .messages()
                .to_vec();
            if batch.is_empty() {
                return all;
            }
            all.extend(batch);
        }
    }

    async fn delete(&self, queue: &str, messages: &[aws_sdk_sqs::types::Message]) {
        for m in messages {
            self.sqs
                .delete_message()
                .queue_url(queue)
                .receipt_handle(m.receipt_handle().unwrap())
                .send()
                .await
                .unwrap();
        }
    }
}

/// `messages` with a record that is not any step's message in the middle.
fn with_poison(
    mut messages: Vec<aws_sdk_sqs::types::Message>,
    id: &str,
) -> Vec<aws_sdk_sqs::types::Message> {
    let poison = aws_sdk_sqs::types::Message::builder()
        .message_id(id)
        .receipt_handle("never-deleted")
        .body("{\"not\": \"a message of any step\"}")
        .build();
    messages.insert(messages.len() / 2, poison);
    messages
}

fn failed(response: &aws_lambda_events::sqs::SqsBatchResponse) -> Vec<&str> {
    response
        .batch_item_failures
        .iter()
        .map(|f| f.item_identifier.as_str())
        .collect()
}

/// Each queue function, handed one batch of several records with a
/// poisoned one in the middle, reports exactly that one failed and
/// processes the others (what lets SQS retry only the poison).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_queue_function_reports_only_the_poisoned_record_of_a_batch() {
    if !emulators("each_queue_function_reports_only_the_poisoned_record_of_a_batch") {
        return;
    }
    use crate::common::receiver::Receiver;
    let d = Deployment::start("poison").await;
    let r = Receiver::start().await;
    d.define(
        "audiences",
        "buyers",
        json!({"condition": {"performed": {"event": "Order Completed"}}}),
    )
    .await;
    d.pump_compute().await;
    let (status, reply) = d
        .admin(
            "PUT",
            "/destinations/crm",
            Some(&json!({"kind": "webhook", "url": r.url("/crm"), "secret": "s", "calls": ["track"]})),
        )
        .await;
    assert_eq!(status, 201, "{reply}");
    // The (empty) initial sync: the destination takes changes from now on.
    d.pump_sync().await;
    let now = kindred_store::now_millis();
    d.batch(vec![
        order("u1", 1, now),
        order("u2", 1, now),
        order("u3", 1, now),
    ])
    .await;

    let events = d.receive_all(&d.events_queue).await;
    assert_eq!(events.len(), 3);
    let response = kindred_identity::handle(
        &d.store,
        &d.compute,
        Some(&d.sync),
        sqs_event(&with_poison(events.clone(), "identity-poison")),
    )
    .await;
    assert_eq!(failed(&response), ["identity-poison"]);
    d.delete(&d.events_queue, &events).await;

    let folds = d.receive_all(&d.compute_queue).await;
    assert_eq!(folds.len(), 3, "one compute message per recorded event");
    let response = kindred_compute::handle(
        &d.store,
        &d.compute,
        Some(&d.sync),
        sqs_event(&with_poison(folds.clone(), "compute-poison")),
    )
    .await;
    assert_eq!(failed(&response), ["compute-poison"]);
    d.delete(&d.compute_queue, &folds).await;
    for user in ["u1", "u2", "u3"] {
        let body = d.traits(&format!("user_id:{user}"), "include=buyers").await;
        assert_eq!(body["traits"], json!({"buyers": true}), "{user}: {body}");
    }

    // (The compute step announces changes once they settle: delayed.)
    let deadline = Instant::now() + Duration::from_secs(30);
    let syncs = loop {
        let syncs = d.receive_all(&d.sync_queue).await;
        if !syncs.is_empty() {
            break syncs;
        }
        assert!(
            Instant::now() < deadline,
            "the changes were never announced"
        );
    };
    let response = kindred_sync_function::handle(
        &d.sync_step,
        sqs_event(&with_poison(syncs.clone(), "sync-poison")),
    )
    .await;
    assert_eq!(failed(&response), ["sync-poison"]);
    d.delete(&d.sync_queue, &syncs).await;
    d.pump_sync_until("three entries", || {
        r.accepted()
            .iter()
            .filter(|c| c["event"] == "Audience Entered")
            .count()
            == 3
    })
    .await;
}
