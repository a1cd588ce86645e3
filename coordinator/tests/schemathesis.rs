//! schemathesis against `/openapi.json`: generated requests for every route
//! (as a signed-in user), checked for no server error, answers that match the
//! documented schemas, status codes and content types. CI installs schemathesis
//! (.ci/run); a machine without it skips, with a message.

mod common;

use std::process::Command;

use testkit::{test_limits, TestCluster};

fn schemathesis() -> Option<&'static str> {
    ["schemathesis", "st"].into_iter().find(|c| {
        Command::new(c)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    })
}

#[tokio::test]
async fn schemathesis_finds_no_failure() {
    let Some(tool) = schemathesis() else {
        assert!(
            std::env::var_os("CI").is_none(),
            "schemathesis is missing on CI"
        );
        eprintln!("skipped: schemathesis is not installed (pip install schemathesis)");
        return;
    };
    let cluster = TestCluster::start(2, test_limits()).await;
    let token = common::Api::new(&cluster).user("schema_user", "USD").await;
    let url = cluster.url("/openapi.json");
    let output = tokio::task::spawn_blocking(move || {
        Command::new(tool)
            .args(["run", &url])
            .args(["--checks", "not_a_server_error,response_schema_conformance,status_code_conformance,content_type_conformance"])
            .args(["--max-examples", "25", "--seed", "1"])
            // Logging out would revoke the token the other routes use.
            .args(["--exclude-path", "/v1/logout"])
            .arg("-H")
            .arg(format!("Authorization: Bearer {token}"))
            .env("NO_COLOR", "1")
            .output()
    })
    .await
    .expect("task")
    .expect("run schemathesis");
    let stdout = String::from_utf8_lossy(&output.stdout);
    println!("{stdout}");
    assert!(
        output.status.success(),
        "schemathesis failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
}
