//! A Kindred server in the test process, on a fresh data dir and a free
//! port, driven over real HTTP.
#![allow(dead_code)]

pub mod clients;
pub mod receiver;

use kindred::config::Config;
use kindred::server::{start, Running};
use kindred_store::NewSpace;
use reqwest::{Client, StatusCode};
use serde_json::Value;

pub struct Server {
    pub running: Running,
    pub base: String,
    pub space: NewSpace,
    pub client: Client,
    pub dir: tempfile::TempDir,
}

pub struct Reply {
    pub status: StatusCode,
    pub body: Value,
    pub headers: reqwest::header::HeaderMap,
}

impl Server {
    /// A server as `kindred serve` starts by default: destinations may not
    /// reach internal addresses.
    pub async fn start() -> Self {
        Self::start_with(1_000_000, false).await
    }

    /// A server started with `--allow-private-destinations`, as an operator
    /// whose receivers are on their own network would: for the tests whose
    /// receivers listen on 127.0.0.1.
    pub async fn start_for_local_receivers() -> Self {
        Self::start_with(1_000_000, true).await
    }

    pub async fn start_with_rate(ingest_rate: u32) -> Self {
        Self::start_with(ingest_rate, false).await
    }

    /// `allow_private_destinations`: the operator's opt-in.
    pub async fn start_with(ingest_rate: u32, allow_private_destinations: bool) -> Self {
        Self::start_limited(
            ingest_rate,
            allow_private_destinations,
            kindred::config::ServerLimits::default(),
        )
        .await
    }

    /// A server with its own connection cap and timeouts.
    pub async fn start_limited(
        ingest_rate: u32,
        allow_private_destinations: bool,
        limits: kindred::config::ServerLimits,
    ) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let config = Config {
            data_dir: dir.path().to_path_buf(),
            listen: "127.0.0.1:0".parse().unwrap(),
            ingest_rate,
            sync: kindred_sync::RetryPolicy {
                base: std::time::Duration::from_millis(50),
                max: std::time::Duration::from_secs(1),
                max_attempts: 12,
                timeout: std::time::Duration::from_secs(5),
            },
            allow_private_destinations,
            limits,
            public_url: None,
            metrics_listen: Some("127.0.0.1:0".parse().unwrap()),
        };
        let (running, created) = start(&config).await.unwrap();
        let base = format!("http://{}", running.addr);
        Self {
            running,
            base,
            space: created.expect("a fresh data dir gets the default space"),
            client: Client::new(),
            dir,
        }
    }

    pub async fn reply(response: reqwest::Response) -> Reply {
        let status = response.status();
        let headers = response.headers().clone();
        let text = response.text().await.unwrap();
        let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
        Reply {
            status,
            body,
            headers,
        }
    }

    /// POSTs a Tracking API call with the space's write key.
    pub async fn track(&self, path: &str, body: &Value) -> Reply {
        self.track_as(path, body, Some(&self.space.write_key)).await
    }

    pub async fn track_as(&self, path: &str, body: &Value, key: Option<&str>) -> Reply {
        let mut req = self.client.post(format!("{}{path}", self.base)).json(body);
        if let Some(key) = key {
            req = req.basic_auth(key, Some(""));
        }
        Self::reply(req.send().await.unwrap()).await
    }

    pub async fn post_raw(&self, path: &str, body: Vec<u8>, headers: &[(&str, &str)]) -> Reply {
        let mut req = self
            .client
            .post(format!("{}{path}", self.base))
            .basic_auth(&self.space.write_key, Some(""))
            .body(body);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        Self::reply(req.send().await.unwrap()).await
    }

    /// GETs a path with a token as the Basic user name.
    pub async fn get_as(&self, path: &str, token: Option<&str>) -> Reply {
        let mut req = self.client.get(format!("{}{path}", self.base));
        if let Some(token) = token {
            req = req.basic_auth(token, Some(""));
        }
        Self::reply(req.send().await.unwrap()).await
    }

    /// GETs a Profile API resource of the default space with its access token.
    pub async fn profile(&self, lookup: &str, resource: &str) -> Reply {
        let path = format!(
            "/v1/spaces/{}/collections/users/profiles/{lookup}/{resource}",
            self.space.space_id
        );
        self.get_as(&path, Some(&self.space.access_token)).await
    }

    pub async fn put_as(&self, path: &str, body: &Value, token: &str) -> Reply {
        let req = self
            .client
            .put(format!("{}{path}", self.base))
            .basic_auth(token, Some(""))
            .json(body);
        Self::reply(req.send().await.unwrap()).await
    }

    pub async fn post_as(&self, path: &str, body: &Value, token: &str) -> Reply {
        let req = self
            .client
            .post(format!("{}{path}", self.base))
            .basic_auth(token, Some(""))
            .json(body);
        Self::reply(req.send().await.unwrap()).await
    }

    pub async fn delete_as(&self, path: &str, token: &str) -> Reply {
        let req = self
            .client
            .delete(format!("{}{path}", self.base))
            .basic_auth(token, Some(""));
        Self::reply(req.send().await.unwrap()).await
    }

    /// An admin call on a path under the default space (`/v1/spaces/{id}`).
    pub async fn admin(&self, method: &str, path: &str, body: Option<&Value>) -> Reply {
        let full = format!("/v1/spaces/{}{path}", self.space.space_id);
        let token = &self.space.admin_token;
        let none = Value::Null;
        match method {
            "GET" => self.get_as(&full, Some(token)).await,
            "PUT" => self.put_as(&full, body.unwrap_or(&none), token).await,
            "POST" => self.post_as(&full, body.unwrap_or(&none), token).await,
            "DELETE" => self.delete_as(&full, token).await,
            other => panic!("unknown method {other}"),
        }
    }

    /// Defines the audience `buyers`: profiles with an `Order Completed`.
    pub async fn buyers_audience(&self) {
        let definition = serde_json::json!({"condition": {"performed": {
            "event": "Order Completed", "count": {"at_least": 1}}}});
        let r = self
            .admin("PUT", "/audiences/buyers", Some(&definition))
            .await;
        assert!(r.status.is_success(), "{}", r.body);
    }

    /// Waits until everything accepted so far is in the profiles.
    pub async fn settle(&self) {
        self.running.wait_idle().await.unwrap();
    }
}

/// One `#[tokio::test]` per case of a contract and store: `sqlite::case`
/// runs the case on `kindred serve` started by `$server`, and
/// `dynamodb::case` on the AWS functions' handlers over the emulators (a
/// `lambda_compute::Deployment`). `$contract` names the module in the
/// message of a test skipped without the emulators.
macro_rules! on_both_stores {
    ($contract:literal, $server:expr; $($case:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let server = $server.await;
                    super::$case(&server).await;
                }
            )*
        }
        mod dynamodb {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let name = concat!($contract, "::dynamodb::", stringify!($case));
                    if !kindred_tests::emulators(name) {
                        return;
                    }
                    let deployment =
                        crate::lambda_compute::Deployment::start(stringify!($case)).await;
                    super::$case(&deployment).await;
                }
            )*
        }
    };
}
pub(crate) use on_both_stores;
