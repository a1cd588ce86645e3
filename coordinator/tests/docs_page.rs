//! `/docs` renders the API in a real browser (Debian's chromium, headless): the
//! Swagger UI assets are served from the binary and the page lists the routes
//! of `/openapi.json`.

use std::process::Command;

use testkit::{test_limits, TestCluster};

fn chromium() -> Option<&'static str> {
    ["chromium", "chromium-browser", "google-chrome"]
        .into_iter()
        .find(|c| {
            Command::new(c)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
        })
}

#[tokio::test]
async fn the_docs_page_renders_the_transfer_route() {
    let Some(browser) = chromium() else {
        // CI installs chromium (.ci/run), so there this cannot be skipped.
        assert!(
            std::env::var_os("CI").is_none(),
            "chromium is missing on CI"
        );
        eprintln!("skipped: no chromium on this machine (apt install chromium)");
        return;
    };
    let cluster = TestCluster::start(1, test_limits()).await;
    let url = cluster.url("/docs/");
    let profile = tempfile::tempdir().expect("temp profile");
    let output = tokio::task::spawn_blocking(move || {
        Command::new(browser)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--virtual-time-budget=15000",
                "--dump-dom",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg(&url)
            .output()
    })
    .await
    .expect("task")
    .expect("run chromium");
    let dom = String::from_utf8_lossy(&output.stdout);
    assert!(
        dom.contains("swagger-ui"),
        "not the Swagger UI page: {}",
        &dom[..dom.len().min(2000)]
    );
    assert!(
        dom.contains("/v1/transfer"),
        "the rendered page does not list POST /v1/transfer: {}\nstderr: {}",
        &dom[..dom.len().min(4000)],
        String::from_utf8_lossy(&output.stderr)
    );
}
