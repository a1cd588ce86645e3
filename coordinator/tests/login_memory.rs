//! 500 concurrent logins against real argon2 parameters (19 MiB each) keep the
//! process small: password work runs on a bounded pool, and what does not fit
//! its queue is refused at once. Its own test binary, so the peak it reads is
//! this test's alone.

mod common;

use std::time::Instant;

use common::Api;
use coordinator::config::Limits;
use reqwest::StatusCode;
use serde_json::json;
use testkit::{test_limits, TestCluster};

fn peak_rss_mib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("procfs");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .expect("VmHWM in /proc/self/status")
        / 1024
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn five_hundred_concurrent_logins_stay_under_300_mib() {
    let defaults = Limits::default();
    let limits = Limits {
        argon2_memory_kib: defaults.argon2_memory_kib,
        argon2_iterations: defaults.argon2_iterations,
        password_workers: defaults.password_workers,
        password_queue_max: defaults.password_queue_max,
        ..test_limits()
    };
    let cluster = TestCluster::start(2, limits).await;
    let api = Api::new(&cluster);
    api.user("memory_user", "USD").await;
    let before = peak_rss_mib();
    let started = Instant::now();
    let logins = (0..500).map(|i| {
        let name = if i % 2 == 0 {
            "memory_user".to_owned()
        } else {
            format!("no_such_user{i}")
        };
        api.post(
            "/v1/login",
            None,
            None,
            json!({"username": name, "password": "wrong password"}),
        )
    });
    let replies = futures::future::join_all(logins).await;
    let took = started.elapsed();
    let after = peak_rss_mib();
    let refused = replies
        .iter()
        .filter(|r| r.status == StatusCode::SERVICE_UNAVAILABLE)
        .count();
    let checked = replies
        .iter()
        .filter(|r| r.status == StatusCode::UNAUTHORIZED)
        .count();
    println!(
        "500 concurrent logins: {checked} checked (401), {refused} refused (503 overloaded) in {took:?}; \
         peak RSS {before} MiB before, {after} MiB after"
    );
    assert_eq!(checked + refused, 500, "every login is answered 401 or 503");
    assert!(checked >= 1);
    assert!(after < 300, "peak RSS {after} MiB");
}
