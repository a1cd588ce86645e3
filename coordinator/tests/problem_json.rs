//! Property: whatever a client sends (method, path, query, headers, body), the
//! answer is never a server error, and every error is problem+json whose
//! `status` is the HTTP status and whose `code` is one of the documented codes.

mod common;

use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use testkit::{test_limits, TestCluster};

#[derive(Debug, Clone)]
struct Case {
    method: &'static str,
    path: String,
    query: Option<String>,
    token: u8,
    key: Option<String>,
    content_type: Option<&'static str>,
    body: Option<Vec<u8>>,
}

fn case() -> impl Strategy<Value = Case> {
    let method = prop::sample::select(vec!["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD"]);
    let path = prop_oneof![
        prop::sample::select(vec![
            "/v1/user",
            "/v1/login",
            "/v1/logout",
            "/v1/account",
            "/v1/transfer",
            "/v1/deposit",
            "/v1/withdrawal",
            "/v1/admin/in-doubt",
            "/healthz",
            "/openapi.json",
            "/metrics",
            "/nope",
            "/v1",
            "/v1/transfer/",
        ])
        .prop_map(str::to_owned),
        "/v1/transfer/(%[0-9A-F]{2}|[a-z0-9-]){0,40}",
        "/(%[0-9A-F]{2}|[a-zA-Z0-9._~-]){0,16}(/[a-z0-9]{0,8}){0,3}",
    ];
    let query = prop::option::of(
        "(limit|cursor|x)=(%[0-9A-F]{2}|[a-z0-9-]|9{20}){0,12}(&(limit|cursor)=[0-9a-z-]{0,30})?",
    );
    let body = prop::option::of(prop_oneof![
        prop::collection::vec(any::<u8>(), 0..64),
        r#"\{"(to|amount|currency|username|password|email|payment_token)": ?("[ -~]{0,20}"|-?[0-9]{1,25}(\.[0-9]{1,30})?|null|true|\[\]|\{\})\}"#
            .prop_map(String::into_bytes),
        (
            "[a-z0-9_]{0,40}",
            "-?[0-9]{0,12}(\\.[0-9]{0,12})?(e[0-9]{1,3})?",
            prop::sample::select(vec!["USD", "JPY", "usd", "XXX", ""])
        )
            .prop_map(|(to, amount, cur)| {
                format!(r#"{{"to":"{to}","amount":"{amount}","currency":"{cur}"}}"#).into_bytes()
            }),
    ]);
    (
        method,
        path,
        query,
        0u8..3,
        prop::option::of("[ -~]{0,80}"),
        prop::option::of(prop::sample::select(vec![
            "application/json",
            "text/plain",
            "application/json; charset=utf-8",
        ])),
        body,
    )
        .prop_map(
            |(method, path, query, token, key, content_type, body)| Case {
                method,
                path,
                query,
                token,
                key,
                content_type,
                body,
            },
        )
}

fn documented_codes() -> Vec<String> {
    let doc = serde_json::to_value(coordinator::api::ops::openapi_doc()).expect("serializable");
    doc["components"]["schemas"]["ErrorCode"]["enum"]
        .as_array()
        .expect("ErrorCode is an enum in the OpenAPI document")
        .iter()
        .filter_map(|c| c.as_str().map(str::to_owned))
        .collect()
}

#[test]
fn any_request_gets_no_server_error_and_every_error_is_problem_json() {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let (cluster, token) = runtime.block_on(async {
        let cluster = TestCluster::start(2, test_limits()).await;
        let token = common::Api::new(&cluster).user("fuzzer", "USD").await;
        (cluster, token)
    });
    let codes = documented_codes();
    let http = reqwest::Client::new();
    let mut runner = TestRunner::new(Config {
        cases: 300,
        failure_persistence: None,
        ..Config::default()
    });
    runner
        .run(&case(), |c| {
            let url = match &c.query {
                Some(q) => format!("{}?{q}", cluster.url(&c.path)),
                None => cluster.url(&c.path),
            };
            let Ok(url) = reqwest::Url::parse(&url) else {
                return Ok(());
            };
            let method = reqwest::Method::from_bytes(c.method.as_bytes()).expect("valid");
            let mut req = http.request(method, url);
            match c.token {
                1 => req = req.bearer_auth(&token),
                2 => req = req.bearer_auth("fuzzer~forged"),
                _ => {}
            }
            if let Some(k) = &c.key {
                req = req.header("idempotency-key", k);
            }
            if let Some(ct) = c.content_type {
                req = req.header("content-type", ct);
            }
            if let Some(b) = &c.body {
                req = req.body(b.clone());
            }
            let (status, content_type, body) = runtime.block_on(async {
                let r = req.send().await.expect("the server answers");
                let status = r.status();
                let ct = r
                    .headers()
                    .get("content-type")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_owned();
                (status, ct, r.bytes().await.expect("body"))
            });
            prop_assert!(
                !status.is_server_error() || status.as_u16() == 503,
                "{status} for {c:?}"
            );
            if status.is_client_error() || status.is_server_error() {
                prop_assert_eq!(
                    &content_type,
                    "application/problem+json",
                    "{} for {:?}",
                    status,
                    c
                );
                if c.method != "HEAD" {
                    let problem: serde_json::Value =
                        serde_json::from_slice(&body).expect("problem+json parses");
                    prop_assert_eq!(problem["status"].as_u64(), Some(u64::from(status.as_u16())));
                    let code = problem["code"].as_str().unwrap_or("");
                    prop_assert!(
                        codes.iter().any(|d| d == code),
                        "undocumented code {code:?}"
                    );
                }
            }
            Ok(())
        })
        .expect("every request gets a documented problem+json or a success");
    drop(cluster);
}
