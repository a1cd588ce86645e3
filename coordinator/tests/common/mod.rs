//! HTTP helpers shared by the API tests.
#![allow(dead_code)]

use reqwest::header::HeaderMap;
use reqwest::StatusCode;
use serde_json::{json, Value};
use shard_agent::rules::WalletRules;
use testkit::{test_limits, with_redis, TestCluster};

pub const PASSWORD: &str = "correct horse battery";

pub struct Api {
    pub http: reqwest::Client,
    pub base: String,
}

pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Value,
}

impl Reply {
    pub fn code(&self) -> &str {
        self.body["code"].as_str().unwrap_or("")
    }

    pub fn is_problem(&self) -> bool {
        self.headers
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            == Some("application/problem+json")
    }
}

impl Api {
    pub fn new(cluster: &TestCluster) -> Api {
        Api {
            http: reqwest::Client::new(),
            base: cluster.url(""),
        }
    }

    pub async fn send(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        key: Option<&str>,
        body: Option<Value>,
    ) -> Reply {
        let method = reqwest::Method::from_bytes(method.as_bytes()).expect("valid method");
        let mut req = self.http.request(method, format!("{}{}", self.base, path));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(k) = key {
            req = req.header("idempotency-key", k);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.expect("request reaches the test server");
        let status = resp.status();
        let headers = resp.headers().clone();
        let text = resp.text().await.expect("read body");
        let body = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        Reply {
            status,
            headers,
            body,
        }
    }

    pub async fn post(
        &self,
        path: &str,
        token: Option<&str>,
        key: Option<&str>,
        body: Value,
    ) -> Reply {
        self.send("POST", path, token, key, Some(body)).await
    }

    pub async fn get(&self, path: &str, token: Option<&str>) -> Reply {
        self.send("GET", path, token, None, None).await
    }

    pub async fn sign_up(&self, name: &str, currency: &str) -> Reply {
        self.post(
            "/v1/user",
            None,
            None,
            json!({"username": name, "email": format!("{name}@example.com"), "password": PASSWORD, "currency": currency}),
        )
        .await
    }

    pub async fn login(&self, name: &str) -> String {
        let r = self
            .post(
                "/v1/login",
                None,
                None,
                json!({"username": name, "password": PASSWORD}),
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "login {name}: {:?}", r.body);
        r.body["token"]
            .as_str()
            .expect("token in login body")
            .to_owned()
    }

    /// Signs up and logs in; returns the token.
    pub async fn user(&self, name: &str, currency: &str) -> String {
        let r = self.sign_up(name, currency).await;
        assert_eq!(
            r.status,
            StatusCode::CREATED,
            "sign up {name}: {:?}",
            r.body
        );
        self.login(name).await
    }

    pub async fn deposit(&self, token: &str, amount: &str, currency: &str) {
        let key = uuid::Uuid::new_v4().to_string();
        let r = self
            .post(
                "/v1/deposit",
                Some(token),
                Some(&key),
                json!({"amount": amount, "currency": currency, "payment_token": "sandbox_ok"}),
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "deposit: {:?}", r.body);
    }

    pub async fn transfer(
        &self,
        token: &str,
        key: &str,
        to: &str,
        amount: &str,
        currency: &str,
    ) -> Reply {
        self.post(
            "/v1/transfer",
            Some(token),
            Some(key),
            json!({"to": to, "amount": amount, "currency": currency}),
        )
        .await
    }

    pub async fn balance(&self, token: &str) -> String {
        let r = self.get("/v1/account", Some(token)).await;
        assert_eq!(r.status, StatusCode::OK, "account: {:?}", r.body);
        r.body["balance"].as_str().expect("balance").to_owned()
    }
}

/// Two fresh usernames, on the same shard or on different shards.
pub fn pair(cluster: &TestCluster, prefix: &str, same_shard: bool) -> (String, String) {
    let routing = cluster.coordinator.cluster().routing();
    let shard = |n: &str| routing.map.shard_of(&router::UserId::for_username(n));
    let a = format!("{prefix}_a");
    let b = (0..10_000)
        .map(|i| format!("{prefix}_b{i}"))
        .find(|b| (shard(b) == shard(&a)) == same_shard)
        .expect("some name lands where we want among 10k");
    (a, b)
}

/// The admin token of every test cluster (`testkit`).
pub const ADMIN: &str = "test-admin-token";

/// A 2-shard cluster with the wallet's rules as JSON (`WalletRules`), in
/// Redis-lock mode when `redis`.
pub async fn cluster_with(rules: &str, redis: bool) -> (TestCluster, Api) {
    testkit::init_tracing();
    let mut config = TestCluster::provision(2, test_limits()).await;
    config.rules = serde_json::from_str::<WalletRules>(rules).expect("test rules parse");
    config.rules.validate().expect("test rules are valid");
    if redis {
        config = with_redis(config).await;
    }
    let cluster = TestCluster::serve(config).await;
    let api = Api::new(&cluster);
    (cluster, api)
}

/// A fresh Idempotency-Key.
pub fn key() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// `GET /v1/account`, which must answer 200.
pub async fn account(api: &Api, token: &str) -> Value {
    let r = api.get("/v1/account", Some(token)).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    r.body
}
