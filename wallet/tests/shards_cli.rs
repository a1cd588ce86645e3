//! The rebalancing CLI end to end, as an operator runs it: a `wallet dev`
//! cluster, `wallet dev spawn-shard`, and every `wallet shards` command with
//! `--json`, against the real servers `wallet dev` starts.

mod common;

use common::{json_of, ok, start_dev, wallet};
use serde_json::Value;

#[test]
fn every_shards_command_works_on_a_dev_cluster() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path().join("cluster");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("free port")
        .local_addr()
        .expect("addr")
        .port();
    let _dev = start_dev(&dir, port, &[]);
    let d = dir.to_str().expect("utf-8 path");

    let list = json_of(ok(&wallet(&["shards", "list", "--json", "--data-dir", d])));
    assert_eq!(list["shards"].as_array().map(Vec::len), Some(2), "{list}");
    assert!(list["epoch"].as_u64().is_some());
    let total: u64 = list["shards"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|s| s["buckets"].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(total, 4096);

    // Nothing to do yet: refused with exit code 2.
    let plan = wallet(&["shards", "plan", "--json", "--data-dir", d]);
    assert_eq!(plan.status.code(), Some(2));
    assert_eq!(json_of(&plan)["moves"].as_array().map(Vec::len), Some(0));

    // One more local server; its DSN is the last line.
    let spawned = ok(&wallet(&["dev", "spawn-shard", "extra", "--data-dir", d]))
        .stdout
        .clone();
    let text = String::from_utf8(spawned).expect("utf-8");
    let dsn = text.lines().last().expect("a last line").trim().to_owned();
    assert!(dsn.starts_with("postgres://"), "{text}");
    let description: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("cluster.json")).expect("read"))
            .expect("cluster.json");
    assert_eq!(description["spawned_shards"][0]["name"], "extra");

    // Refusals: an unreachable server, and removing a shard with buckets.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("port")
        .local_addr()
        .expect("addr")
        .port();
    let refused = wallet(&[
        "shards",
        "add",
        "ghost",
        "--yes",
        "--data-dir",
        d,
        "--dsn",
        &format!("postgres://postgres@127.0.0.1:{dead}/nothing?connect_timeout=1"),
    ]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("does not answer"));
    assert!(!wallet(&["shards", "remove", "shard0", "--data-dir", d])
        .status
        .success());

    let added = json_of(ok(&wallet(&[
        "shards",
        "add",
        "extra",
        "--dsn",
        &dsn,
        "--yes",
        "--json",
        "--data-dir",
        d,
    ])));
    assert_eq!(added["buckets"], 0);
    let plan = json_of(ok(&wallet(&["shards", "plan", "--json", "--data-dir", d])));
    let planned = plan["moves"].as_array().map(Vec::len).unwrap_or(0);
    assert!((1_100..1_650).contains(&planned), "{planned} moves planned");
    assert!(plan["moves"]
        .as_array()
        .into_iter()
        .flatten()
        .all(|m| m["to"] == "extra"));

    let moved = json_of(ok(&wallet(&[
        "shards",
        "rebalance",
        "--yes",
        "--json",
        "--max-moves",
        "6",
        "--max-parallel",
        "2",
        "--data-dir",
        d,
    ])));
    assert_eq!(moved["cleaned"], 6, "{moved}");
    let status = json_of(ok(&wallet(&[
        "shards",
        "status",
        "--json",
        "--data-dir",
        d,
    ])));
    assert_eq!(status["open"], 0);
    assert_eq!(status["moves"].as_array().map(Vec::len), Some(6));
    assert!(
        status["moves"][0]["pause_ms"].as_i64().is_some(),
        "{status}"
    );
    let verdict = json_of(ok(&wallet(&[
        "shards",
        "verify",
        "--json",
        "--data-dir",
        d,
    ])));
    assert_eq!(verdict["ok"], true, "{verdict}");

    // Drain the new shard again (its 6 buckets go back), then remove it.
    let drained = json_of(ok(&wallet(&[
        "shards",
        "drain",
        "extra",
        "--yes",
        "--json",
        "--data-dir",
        d,
    ])));
    assert_eq!(drained["cleaned"], 6, "{drained}");
    ok(&wallet(&[
        "shards",
        "remove",
        "extra",
        "--json",
        "--data-dir",
        d,
    ]));
    let list = json_of(ok(&wallet(&["shards", "list", "--json", "--data-dir", d])));
    assert_eq!(list["shards"].as_array().map(Vec::len), Some(2), "{list}");
    ok(&wallet(&["shards", "verify", "--data-dir", d]));
}
