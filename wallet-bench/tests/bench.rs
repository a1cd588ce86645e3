//! `wallet bench` end to end, small: its own servers, a bulk load, every kind of
//! scenario (baselines, in-process, HTTP, both lock modes), the checker after
//! each, and the JSON and SVG it promises. Figures are printed, never asserted.

use std::time::Duration;

use wallet_bench::{run, BenchOptions};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_bench_run_reports_every_scenario_and_passes_the_checker() {
    let dir = tempfile::tempdir().expect("temp dir");
    let json = dir.path().join("bench.json");
    let svg = dir.path().join("bench.svg");
    let only: Vec<String> = [
        "single-node/uniform",
        "single-node/hot",
        "pgbench",
        "same-shard/uniform/in-process",
        "2pc/uniform/in-process",
        "2pc/hot/in-process",
        "redis/zipf/in-process",
        "2pc/uniform/http",
    ]
    .map(String::from)
    .to_vec();
    let passed = run(BenchOptions {
        shards: 2,
        users: 400,
        clients: 4,
        // Long enough that a debug build on a loaded CI machine completes
        // transfers in every window.
        warmup: Duration::from_secs(1),
        duration: Duration::from_secs(2),
        seed: 7,
        batch_max: 32,
        batch_workers: 2,
        batch_linger_us: 2_000,
        rounds: 2,
        only: only.clone(),
        json: Some(json.clone()),
        svg: Some(svg.clone()),
        data_dir: Some(dir.path().join("data")),
        command: "test".into(),
        move_parallel: 2,
        move_rate: None,
    })
    .await
    .expect("bench runs");
    assert!(passed, "the invariant checker passed after every scenario");

    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).expect("JSON written"))
            .expect("JSON parses");
    let scenarios = report["scenarios"].as_array().expect("scenarios");
    // Selected, plus single-node/zipf (the baseline redis/zipf is measured
    // against), plus the `+rules` and `+events` twins of the two in-process
    // uniform names (`--only` matches by substring).
    assert_eq!(
        scenarios.len(),
        only.len() + 5,
        "one entry per scenario run"
    );
    for twin in [
        "same-shard/uniform/in-process+events",
        "2pc/uniform/in-process+events",
    ] {
        let s = scenarios
            .iter()
            .find(|s| s["name"] == twin)
            .unwrap_or_else(|| panic!("{twin} ran"));
        assert!(
            s["ratio_to_without_events"]
                .as_f64()
                .is_some_and(|r| r > 0.0),
            "{twin} is compared with its twin without events: {s}"
        );
        assert!(
            s["relay"]["published"].as_u64().is_some_and(|n| n > 0),
            "{twin} reports what its relay published: {s}"
        );
    }
    for twin in [
        "same-shard/uniform/in-process+rules",
        "2pc/uniform/in-process+rules",
    ] {
        let s = scenarios
            .iter()
            .find(|s| s["name"] == twin)
            .unwrap_or_else(|| panic!("{twin} ran"));
        assert!(
            s["ratio_to_without_rules"]
                .as_f64()
                .is_some_and(|r| r > 0.0),
            "{twin} is compared with its twin without rules: {s}"
        );
    }
    assert!(scenarios
        .iter()
        .any(|s| s["name"] == "single-node/zipf/sql"));
    for s in scenarios {
        let name = s["name"].as_str().expect("name");
        assert!(
            s["transfers_per_s"].as_f64().expect("transfers_per_s") > 0.0,
            "{name} moved money"
        );
        for field in ["p50_ms", "p99_ms", "p999_ms", "max_ms"] {
            assert!(s[field].as_f64().is_some(), "{name} has {field}");
        }
        assert!(
            s["p50_ms"].as_f64() <= s["p99_ms"].as_f64(),
            "{name}: percentiles are ordered"
        );
        assert!(
            s["ratio_to_baseline"].as_f64().is_some(),
            "{name} has a ratio to the single-node baseline"
        );
        assert_eq!(s["invariants_ok"], serde_json::json!(true), "{name}");
        // Two rounds, merged: the scenario's figure lies between its rounds'.
        let rounds: Vec<f64> = s["round_transfers_per_s"]
            .as_array()
            .expect("round_transfers_per_s")
            .iter()
            .map(|r| r.as_f64().expect("a number"))
            .collect();
        assert_eq!(rounds.len(), 2, "{name}: one figure per round");
        let tps = s["transfers_per_s"].as_f64().expect("transfers_per_s");
        let (lo, hi) = (rounds[0].min(rounds[1]), rounds[0].max(rounds[1]));
        assert!(
            lo * 0.999 <= tps && tps <= hi * 1.001,
            "{name}: {tps} transfers/s over rounds {rounds:?}"
        );
        if s["protocol"] != "single-node" {
            assert_eq!(
                s["round_ratios_to_baseline"].as_array().map(Vec::len),
                Some(2),
                "{name}: a ratio per round"
            );
        }
        // Every committed transfer costs CPU and at least a share of a WAL flush.
        assert!(
            s["wal_syncs_per_transfer"]
                .as_f64()
                .expect("fsyncs per transfer")
                > 0.0,
            "{name}"
        );
        // The wallet's scenarios (every transfer runs in a group, in either
        // mode) report their mean group size; the baselines report none.
        let batched =
            ["same-shard", "2pc", "redis"].contains(&s["protocol"].as_str().unwrap_or(""));
        match s["transfers_per_group"].as_f64() {
            Some(g) => assert!(batched && g >= 1.0, "{name}: {g} transfers per group"),
            None => assert!(!batched, "{name} reports its group size"),
        }
        if s["protocol"] != "pgbench" && cfg!(target_os = "linux") {
            assert!(
                s["cpu_us_per_transfer"].as_f64().expect("CPU per transfer") > 0.0,
                "{name}"
            );
        }
    }
    // A cross-shard group flushes at least its prepare on one server and its
    // decision on another (then COMMIT PREPARED): at least two flushes per
    // group, however many transfers share it. (Per transfer, a batched group
    // can flush less often than single-node's group commit does.)
    let figure = |n: &str, field: &str| {
        scenarios
            .iter()
            .find(|s| s["name"] == n)
            .and_then(|s| s[field].as_f64())
            .expect("scenario ran")
    };
    let cross = "2pc/uniform/in-process";
    let per_group = figure(cross, "wal_syncs_per_transfer") * figure(cross, "transfers_per_group");
    assert!(
        per_group >= 2.0,
        "{per_group} flushes per cross-shard group"
    );
    let http = scenarios
        .iter()
        .find(|s| s["via"] == "http")
        .expect("an HTTP scenario");
    assert!(http["ratio_to_in_process"].as_f64().is_some());
    assert_eq!(
        http["round_ratios_to_in_process"].as_array().map(Vec::len),
        Some(2)
    );
    assert_eq!(report["parameters"]["rounds"], 2);
    assert!(report["machine"]["cores"].as_u64().unwrap_or(0) >= 1);
    assert_eq!(report["machine"]["postgres"]["fsync"], "on");
    assert_eq!(report["machine"]["postgres"]["synchronous_commit"], "on");
    assert!(!report["goals"].as_array().expect("goals").is_empty());

    let plot = std::fs::read_to_string(&svg).expect("SVG written");
    assert!(plot.contains("<svg"), "an SVG document");
    assert!(
        plot.contains("2pc/uniform/in-process"),
        "the plot labels its scenarios"
    );
}
