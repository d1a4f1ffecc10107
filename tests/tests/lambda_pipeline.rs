//! The Lambda handlers in process, fed real API Gateway v2 and SQS event
//! JSON (the fixtures under each function), against DynamoDB Local and
//! ministack's SQS: ingest -> SQS -> identity -> Profile API, and a
//! poisoned message that is reported in `batchItemFailures`, redelivered
//! and finally moved to the dead-letter queue without blocking the others.

use std::time::{Duration, Instant};

use base64::Engine;
use kindred_aws::DynamoStore;
use kindred_tests::{aws_config, emulators, fresh_dynamo, fresh_queue, sqs_event};
use serde_json::Value;
use tower::ServiceExt;

fn basic(user: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(format!("{user}:"))
}

async fn body_json(response: lambda_http::http::Response<axum_body::Body>) -> Value {
    let bytes = axum_body::to_bytes(response.into_body()).await;
    serde_json::from_slice(&bytes).unwrap()
}

/// Minimal access to an axum response body without depending on axum.
mod axum_body {
    pub use kindred_http::Body;
    pub async fn to_bytes(body: Body) -> Vec<u8> {
        kindred_http::body_bytes(body).await.unwrap()
    }
}

async fn receive(sqs: &aws_sdk_sqs::Client, queue: &str) -> Vec<aws_sdk_sqs::types::Message> {
    sqs.receive_message()
        .queue_url(queue)
        .max_number_of_messages(10)
        .wait_time_seconds(1)
        .send()
        .await
        .unwrap()
        .messages()
        .to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_to_sqs_to_identity_to_profile_api_with_a_poisoned_message() {
    if !emulators("ingest_to_sqs_to_identity_to_profile_api_with_a_poisoned_message") {
        return;
    }
    let setup = fresh_dynamo().await;
    let space = setup.create_space("lambda").await.unwrap();
    let (sqs, queue, dlq) = fresh_queue(2).await;
    let sdk = aws_config().await;

    // ingest: an API Gateway v2 POST /v1/batch with one bad event.
    let ingest = kindred_ingest::app(
        &kindred_ingest::Config {
            table: setup.table().to_string(),
            events_queue_url: queue.clone(),
            ingest_rate: 1_000,
            public_url: None,
        },
        &sdk,
    );
    let fixture = include_str!("../../functions/ingest/fixtures/apigw-v2-batch.json")
        .replace("{{WRITE_KEY_BASIC}}", &basic(&space.write_key));
    let request = lambda_http::request::from_str(&fixture).unwrap();
    let response = ingest.clone().oneshot(request).await.unwrap();
    assert_eq!(response.status(), 200);
    let reply = body_json(response).await;
    assert_eq!(reply["accepted"], 2, "{reply}");
    assert_eq!(reply["rejected"][0]["index"], 2, "{reply}");

    // A wrong write key is refused before anything is queued.
    let forged = include_str!("../../functions/ingest/fixtures/apigw-v2-batch.json")
        .replace("{{WRITE_KEY_BASIC}}", &basic("wk_forgedforgedforged"));
    let response = ingest
        .clone()
        .oneshot(lambda_http::request::from_str(&forged).unwrap())
        .await
        .unwrap();
    assert_eq!(response.status(), 401);

    // A poisoned message lands in the same queue.
    sqs.send_message()
        .queue_url(&queue)
        .message_body("{\"not\": \"a queued event\"}")
        .send()
        .await
        .unwrap();

    // identity: drain the queue the way the event source mapping does.
    let identity = DynamoStore::new(aws_sdk_dynamodb::Client::new(&sdk), setup.table());
    let (_, compute_queue, _) = fresh_queue(3).await;
    let compute = kindred_aws::SqsQueue::new(sqs.clone(), &compute_queue);
    let deadline = Instant::now() + Duration::from_secs(30);
    let (mut applied, mut poison_failures) = (0, 0);
    let mut in_dlq = Vec::new();
    while Instant::now() < deadline && (applied < 2 || in_dlq.is_empty()) {
        let messages = receive(&sqs, &queue).await;
        if !messages.is_empty() {
            let response =
                kindred_identity::handle(&identity, &compute, None, sqs_event(&messages)).await;
            let failed: Vec<&str> = response
                .batch_item_failures
                .iter()
                .map(|f| f.item_identifier.as_str())
                .collect();
            for m in &messages {
                if failed.contains(&m.message_id().unwrap()) {
                    assert!(m.body().unwrap().contains("not"), "only the poison fails");
                    poison_failures += 1;
                } else {
                    applied += 1;
                    sqs.delete_message()
                        .queue_url(&queue)
                        .receipt_handle(m.receipt_handle().unwrap())
                        .send()
                        .await
                        .unwrap();
                }
            }
        }
        in_dlq = receive(&sqs, &dlq).await;
    }
    assert_eq!(applied, 2, "both good events applied");
    assert_eq!(
        poison_failures, 2,
        "the poison was retried up to maxReceiveCount"
    );
    assert_eq!(in_dlq.len(), 1, "the poison is in the dead-letter queue");
    assert!(in_dlq[0].body().unwrap().contains("a queued event"));

    // profile-api: an API Gateway v2 GET of the profile's traits.
    let profile_api = kindred_profile_api::app(
        &kindred_profile_api::Config {
            table: setup.table().to_string(),
            compute_queue_url: compute_queue.clone(),
            sync_queue_url: None,
            secrets_key: None,
            allow_private_destinations: false,
        },
        &sdk,
    );
    let fixture = include_str!("../../functions/profile-api/fixtures/apigw-v2-get-traits.json")
        .replace("{{SPACE}}", &space.space_id)
        .replace("{{ACCESS_TOKEN_BASIC}}", &basic(&space.access_token));
    let response = profile_api
        .clone()
        .oneshot(lambda_http::request::from_str(&fixture).unwrap())
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(response.headers().contains_key("request-id"));
    let traits = body_json(response).await;
    assert_eq!(traits["traits"]["plan"], "team", "{traits}");
    assert_eq!(traits["traits"]["email"], "Fixture@Example.com", "{traits}");

    // The write key does not read profiles.
    let wrong = include_str!("../../functions/profile-api/fixtures/apigw-v2-get-traits.json")
        .replace("{{SPACE}}", &space.space_id)
        .replace("{{ACCESS_TOKEN_BASIC}}", &basic(&space.write_key));
    let response = profile_api
        .oneshot(lambda_http::request::from_str(&wrong).unwrap())
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
}

/// What a web page needs from the ingest function behind API Gateway:
/// preflights answered without a write key, and source settings that
/// point the library at the API's own address (from API Gateway's request
/// context, never from the client's `Host` header).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ingest_function_serves_browsers() {
    if !emulators("the_ingest_function_serves_browsers") {
        return;
    }
    let setup = fresh_dynamo().await;
    let space = setup.create_space("browser").await.unwrap();
    let (_, queue, _) = fresh_queue(2).await;
    let sdk = aws_config().await;
    let ingest = kindred_ingest::app(
        &kindred_ingest::Config {
            table: setup.table().to_string(),
            events_queue_url: queue,
            ingest_rate: 1_000,
            public_url: None,
        },
        &sdk,
    );

    let preflight = include_str!("../../functions/ingest/fixtures/apigw-v2-preflight.json");
    let response = ingest
        .clone()
        .oneshot(lambda_http::request::from_str(preflight).unwrap())
        .await
        .unwrap();
    assert_eq!(response.status(), 204);
    let h = response.headers();
    assert_eq!(h["access-control-allow-origin"], "https://shop.example.com");
    assert_eq!(h["access-control-allow-methods"], "POST, GET, OPTIONS");
    assert!(h["access-control-allow-headers"]
        .to_str()
        .unwrap()
        .contains("x-retry-count"));

    let settings = include_str!("../../functions/ingest/fixtures/apigw-v2-settings.json")
        .replace("{{WRITE_KEY}}", &space.write_key);
    let response = ingest
        .clone()
        .oneshot(lambda_http::request::from_str(&settings).unwrap())
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()["access-control-allow-origin"],
        "https://shop.example.com"
    );
    let body = body_json(response).await;
    let io = &body["integrations"]["Segment.io"];
    assert_eq!(
        io["apiHost"], "abcdef1234.execute-api.us-east-1.amazonaws.com/v1",
        "{body}"
    );
    assert_eq!(io["protocol"], "https");

    // A configured public URL (a custom domain) wins.
    let custom = kindred_ingest::app(
        &kindred_ingest::Config {
            table: setup.table().to_string(),
            events_queue_url: "http://unused".into(),
            ingest_rate: 1_000,
            public_url: Some(kindred_http::PublicUrl::parse("https://events.example.com").unwrap()),
        },
        &sdk,
    );
    let response = custom
        .oneshot(lambda_http::request::from_str(&settings).unwrap())
        .await
        .unwrap();
    let body = body_json(response).await;
    assert_eq!(
        body["integrations"]["Segment.io"]["apiHost"],
        "events.example.com/v1"
    );
}
