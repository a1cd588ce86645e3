//! HTTP helpers shared by the chaos-tests integration tests.
#![allow(dead_code)]

use reqwest::StatusCode;
use serde_json::{json, Value};
use testkit::TestCluster;

pub struct Http {
    pub client: reqwest::Client,
    pub base: String,
}

impl Http {
    pub fn new(cluster: &TestCluster) -> Http {
        Http {
            client: reqwest::Client::new(),
            base: cluster.url(""),
        }
    }

    pub async fn post(
        &self,
        path: &str,
        token: Option<&str>,
        key: Option<&str>,
        body: Value,
    ) -> (StatusCode, reqwest::header::HeaderMap, Value) {
        let mut req = self.client.post(format!("{}{path}", self.base)).json(&body);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(k) = key {
            req = req.header("idempotency-key", k);
        }
        let resp = req.send().await.expect("test server answers");
        let (status, headers) = (resp.status(), resp.headers().clone());
        (status, headers, resp.json().await.unwrap_or(Value::Null))
    }

    pub async fn user(&self, name: &str, funds: Option<&str>) -> String {
        let pw = "redis test password";
        let (s, _, b) = self.post("/v1/user", None, None, json!({"username": name, "email": "r@example.com", "password": pw, "currency": "USD"})).await;
        assert_eq!(s, StatusCode::CREATED, "{b}");
        let (_, _, b) = self
            .post(
                "/v1/login",
                None,
                None,
                json!({"username": name, "password": pw}),
            )
            .await;
        let token = b["token"].as_str().expect("token").to_owned();
        if let Some(amount) = funds {
            let (s, _, b) = self
                .post(
                    "/v1/deposit",
                    Some(&token),
                    Some("fund"),
                    json!({"amount": amount, "currency": "USD", "payment_token": "sandbox_ok"}),
                )
                .await;
            assert_eq!(s, StatusCode::CREATED, "{b}");
        }
        token
    }

    pub async fn transfer(
        &self,
        token: &str,
        key: &str,
        to: &str,
        amount: &str,
    ) -> (StatusCode, reqwest::header::HeaderMap, Value) {
        self.post(
            "/v1/transfer",
            Some(token),
            Some(key),
            json!({"to": to, "amount": amount, "currency": "USD"}),
        )
        .await
    }

    pub async fn get(&self, path: &str, token: Option<&str>) -> Value {
        let mut req = self.client.get(format!("{}{path}", self.base));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        req.send()
            .await
            .expect("answers")
            .json()
            .await
            .expect("json")
    }

    pub async fn balance(&self, token: &str) -> String {
        self.get("/v1/account", Some(token)).await["balance"]
            .as_str()
            .expect("balance")
            .to_owned()
    }
}
