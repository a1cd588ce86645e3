//! Bucket moves against real PostgreSQL (and Redis): adding, draining and
//! removing shards while transfers run, the refusals, and a crash at every
//! move failpoint in both lock modes, resumed.

use std::sync::Arc;
use std::time::Duration;

use local_cluster::testing;
use rebalance::mover::{MoveOptions, Quiet};
use rebalance::{Admin, RebalanceError};
use reqwest::StatusCode;
use serde_json::{json, Value};
use testkit::{test_limits, TestCluster};

/// Failpoints are global to the process: the tests that arm them, and the
/// tests that move buckets (which would stop at an armed one), run one at a
/// time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

struct Http {
    client: reqwest::Client,
    base: String,
}

impl Http {
    fn new(c: &TestCluster) -> Http {
        Http {
            client: reqwest::Client::new(),
            base: c.url(""),
        }
    }

    async fn post(
        &self,
        path: &str,
        token: Option<&str>,
        key: Option<&str>,
        body: Value,
    ) -> (StatusCode, Value) {
        let (s, _, b) = self.post_full(path, token, key, body).await;
        (s, b)
    }

    async fn post_full(
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

    async fn user(&self, name: &str, funds: &str) -> String {
        let pw = "rebalance test password";
        let (s, b) = self
            .post("/v1/user", None, None, json!({"username": name, "email": "r@example.com", "password": pw, "currency": "USD"}))
            .await;
        assert_eq!(s, StatusCode::CREATED, "{b}");
        let (_, b) = self
            .post(
                "/v1/login",
                None,
                None,
                json!({"username": name, "password": pw}),
            )
            .await;
        let token = b["token"].as_str().expect("token").to_owned();
        let (s, b) = self
            .post(
                "/v1/deposit",
                Some(&token),
                Some("fund"),
                json!({"amount": funds, "currency": "USD", "payment_token": "sandbox_ok"}),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED, "{b}");
        token
    }

    /// Every notification of the token's user (event IDs by seq), which
    /// must be numbered 1, 2, 3… without gaps.
    async fn notifications(&self, token: &str) -> Vec<(i64, String)> {
        let resp = self
            .client
            .get(format!("{}/v1/notifications?limit=200", self.base))
            .bearer_auth(token)
            .send()
            .await
            .expect("test server answers");
        assert_eq!(resp.status(), StatusCode::OK);
        let body: Value = resp.json().await.expect("json");
        let list: Vec<(i64, String)> = body["notifications"]
            .as_array()
            .expect("a list")
            .iter()
            .map(|n| {
                (
                    n["seq"].as_i64().expect("seq"),
                    n["event_id"].as_str().expect("id").to_owned(),
                )
            })
            .collect();
        let seqs: Vec<i64> = list.iter().map(|(s, _)| *s).collect();
        assert_eq!(seqs, (1..=list.len() as i64).collect::<Vec<_>>());
        list
    }

    async fn transfer(
        &self,
        token: &str,
        key: &str,
        to: &str,
        amount: &str,
    ) -> (StatusCode, Value) {
        self.post(
            "/v1/transfer",
            Some(token),
            Some(key),
            json!({"to": to, "amount": amount, "currency": "USD"}),
        )
        .await
    }
}

/// A fresh migrated database on the shared test server, for a new shard.
async fn new_database(tag: &str) -> String {
    let servers = testing::servers_async().await;
    let server = &servers[0];
    let name = format!("{}_{tag}", testing::unique_prefix());
    local_cluster::create_database(server, &name)
        .await
        .expect("create database");
    server.dsn(&name)
}

struct World {
    cluster: TestCluster,
    http: Http,
    users: Vec<(String, String)>,
}

async fn world(redis: bool, users: usize) -> World {
    let config = TestCluster::provision(2, test_limits()).await;
    let config = if redis {
        testkit::with_redis(config).await
    } else {
        config
    };
    let cluster = TestCluster::serve(config).await;
    let http = Http::new(&cluster);
    let mut out = Vec::new();
    for i in 0..users {
        let name = format!("mover{i}");
        let token = http.user(&name, "100.00").await;
        out.push((name, token));
    }
    World {
        cluster,
        http,
        users: out,
    }
}

async fn admin(w: &World) -> Arc<Admin> {
    Admin::open(
        &w.cluster.config.catalog_dsn,
        w.cluster.config.agent.clone(),
    )
    .await
    .expect("open admin")
}

/// Transfers in a ring of users until `stop`; returns the statuses seen.
async fn traffic(w: &World, rounds: usize, tag: &str) -> Vec<StatusCode> {
    let mut seen = Vec::new();
    let n = w.users.len();
    for r in 0..rounds {
        let i = r % n;
        let (_, token) = &w.users[i];
        let (to, _) = &w.users[(i + 1) % n];
        let (s, b) = w
            .http
            .transfer(token, &format!("{tag}-{r}"), to, "0.01")
            .await;
        assert!(
            !s.is_server_error(),
            "a transfer during a move got {s}: {b}"
        );
        seen.push(s);
    }
    seen
}

/// Every invariant holds once the cluster is quiet, on every shard the
/// coordinator now routes to.
async fn check_quiet(w: &World) {
    w.cluster
        .coordinator
        .cluster()
        .refresh()
        .await
        .expect("refresh map");
    let agents = w.cluster.agents();
    let snap = checker::wait_quiescent(&agents, Duration::from_secs(30))
        .await
        .expect("snapshot");
    let v = snap.violations(true);
    assert!(v.is_empty(), "violations: {v:?}");
    let users: i64 = snap
        .audits
        .iter()
        .map(|(_, a)| a.balances_by_user.len() as i64)
        .sum();
    assert_eq!(
        users as usize,
        w.users.len(),
        "every user on exactly one shard"
    );
}

fn some(n: usize) -> MoveOptions {
    MoveOptions {
        max_moves: Some(n),
        max_parallel: 2,
        ..MoveOptions::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn adding_a_shard_moves_about_a_third_of_the_buckets_onto_it_while_transfers_run() {
    let _serial = SERIAL.lock().await;
    let w = world(false, 12).await;
    let admin = admin(&w).await;
    let dsn = new_database("added").await;
    admin.add("added", &dsn, 1).await.expect("add shard");
    let plan = admin.plan().await.expect("plan");
    // A third shard of equal weight takes about a third, only from the others.
    assert!(
        (1_100..1_650).contains(&plan.moves.len()),
        "{} buckets planned",
        plan.moves.len()
    );
    assert!(plan.moves.iter().all(|m| m.to == "added"));
    assert_eq!(
        plan.users,
        plan.moves.iter().map(|m| m.users).sum::<i64>(),
        "the plan counts its users"
    );
    // Move a slice of it while transfers run: the plan lists the buckets
    // that carry users first, so the slice moves every user the plan moves.
    let with_users = plan.moves.iter().filter(|m| m.users > 0).count();
    assert!(with_users > 0 && plan.moves[..with_users].iter().all(|m| m.users > 0));
    // Each user's events, to compare after the move.
    let mut events_before = Vec::new();
    for (_, token) in &w.users {
        events_before.push(w.http.notifications(token).await);
    }
    let opts = some(with_users + 8);
    let moving = {
        let admin = admin.clone();
        tokio::spawn(async move { admin.rebalance(&opts, &Quiet).await })
    };
    let statuses = traffic(&w, 150, "during").await;
    let report = moving.await.expect("join").expect("rebalance");
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert_eq!(report.cleaned, with_users + 8);
    assert_eq!(report.users, plan.users);
    assert!(
        statuses.iter().all(|s| *s == StatusCode::CREATED),
        "{statuses:?}"
    );
    let left = admin.plan().await.expect("plan");
    assert_eq!(left.moves.len(), plan.moves.len() - with_users - 8);
    assert_eq!(left.users, 0);
    let verdict = admin.verify().await.expect("verify");
    assert!(verdict.ok, "{:?}", verdict.problems);
    // Every move left an audit row with its figures.
    let moves = admin.catalog().recent_moves(10_000).await.expect("moves");
    assert_eq!(moves.len(), with_users + 8);
    assert!(moves.iter().all(|m| m.step == "cleaned"
        && m.verifier.is_some()
        && m.pause_ms.is_some()
        && m.epoch_after > m.epoch_before
        && m.rows.is_some()));
    let list = admin.list().await.expect("list");
    let added = list
        .shards
        .iter()
        .find(|s| s.name == "added")
        .expect("listed");
    assert_eq!(added.users, Some(plan.users));
    assert_eq!(added.buckets, with_users + 8);
    // A retry with a key used before the move replays from the new shard.
    let (_, token) = &w.users[0];
    let (to, _) = &w.users[1];
    let (s, headers, first) = w
        .http
        .post_full(
            "/v1/transfer",
            Some(token),
            Some("during-0"),
            json!({"to": to, "amount": "0.01", "currency": "USD"}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{first}");
    assert_eq!(
        headers
            .get("idempotent-replayed")
            .map(|v| v.to_str().unwrap_or("")),
        Some("true")
    );
    // Events moved with their users: each user's feed, now read from
    // wherever the user lives, still starts with the same events, numbered
    // without gaps.
    for ((_, token), before) in w.users.iter().zip(&events_before) {
        let after = w.http.notifications(token).await;
        assert!(after.len() > before.len(), "the traffic since wrote events");
        assert_eq!(&after[..before.len()], &before[..]);
    }
    traffic(&w, 30, "after").await;
    check_quiet(&w).await;
}

async fn drain_and_remove(redis: bool) {
    let _serial = SERIAL.lock().await;
    let w = world(redis, 8).await;
    let admin = admin(&w).await;
    let dsn = new_database("spare").await;
    admin.add("spare", &dsn, 1).await.expect("add");
    let given = admin
        .rebalance(&some(20), &Quiet)
        .await
        .expect("give spare 20 buckets");
    assert!(given.errors.is_empty() && given.cleaned == 20, "{given:?}");
    // Refused: a shard that owns buckets.
    let err = admin.remove("spare").await.expect_err("remove refused");
    assert!(
        matches!(err, RebalanceError::Refused(ref m) if m.contains("owns")),
        "{err}"
    );
    // Move everything off spare, traffic running.
    admin.drain("spare").await.expect("drain");
    let plan = admin.plan().await.expect("plan");
    assert_eq!(plan.moves.len(), 20);
    assert!(plan.moves.iter().all(|m| m.from == "spare"));
    let opts = MoveOptions {
        max_parallel: 4,
        ..MoveOptions::default()
    };
    let moving = {
        let admin = admin.clone();
        tokio::spawn(async move { admin.rebalance(&opts, &Quiet).await })
    };
    traffic(&w, 100, "drain").await;
    let report = moving.await.expect("join").expect("rebalance");
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    let list = admin.list().await.expect("list");
    let spare = list
        .shards
        .iter()
        .find(|s| s.name == "spare")
        .expect("listed");
    assert_eq!((spare.buckets, spare.users), (0, Some(0)));
    assert_eq!(spare.state, "draining");
    admin.remove("spare").await.expect("remove a drained shard");
    let list = admin.list().await.expect("list");
    assert!(list.shards.iter().all(|s| s.name != "spare"));
    traffic(&w, 30, "after").await;
    let verdict = admin.verify().await.expect("verify");
    assert!(verdict.ok, "{:?}", verdict.problems);
    check_quiet(&w).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_drained_shard_owns_nothing_and_can_be_removed() {
    drain_and_remove(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_mode_a_drained_shard_owns_nothing_and_can_be_removed() {
    drain_and_remove(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn refusals_say_why_and_change_nothing() {
    let _serial = SERIAL.lock().await;
    let w = world(false, 2).await;
    let admin = admin(&w).await;
    // Nothing to do on a balanced cluster.
    assert!(admin.plan().await.expect("plan").moves.is_empty());
    // An unreachable server.
    let port = local_cluster::free_port().expect("port");
    let err = admin
        .add(
            "ghost",
            &format!("host=127.0.0.1 port={port} user=postgres dbname=x connect_timeout=1"),
            1,
        )
        .await
        .expect_err("unreachable refused");
    assert!(
        matches!(err, RebalanceError::Refused(ref m) if m.contains("does not answer")),
        "{err}"
    );
    // A database that already belongs to a cluster (holds users).
    let taken = w.cluster.config.shards[0].dsn.clone();
    let err = admin
        .add("again", &taken, 1)
        .await
        .expect_err("taken refused");
    assert!(
        matches!(err, RebalanceError::Refused(ref m) if m.contains("already holds")),
        "{err}"
    );
    // A name in use, a bad name, a bad weight.
    let dsn = new_database("named").await;
    for (name, weight) in [("shard1", 1), ("bad name", 1), ("ok", 0)] {
        assert!(matches!(
            admin.add(name, &dsn, weight).await,
            Err(RebalanceError::Refused(_))
        ));
    }
    // Draining the last active shard would strand its buckets.
    admin.drain("shard0").await.expect("drain one of two");
    let err = admin.drain("shard1").await.expect_err("last shard");
    assert!(
        matches!(err, RebalanceError::Refused(ref m) if m.contains("last active")),
        "{err}"
    );
    assert!(matches!(
        admin.remove("nobody").await,
        Err(RebalanceError::UnknownShard(_))
    ));
    let list = admin.list().await.expect("list");
    assert_eq!(list.shards.len(), 2);
    assert!(admin.verify().await.expect("verify").ok);
    // Two movers never drive one journal: the second is refused.
    admin
        .rebalance(&some(1), &Quiet)
        .await
        .expect("first mover");
    let second = Admin::open(
        &w.cluster.config.catalog_dsn,
        w.cluster.config.agent.clone(),
    )
    .await
    .expect("open");
    let err = second
        .rebalance(&some(1), &Quiet)
        .await
        .expect_err("second mover");
    assert!(
        matches!(err, RebalanceError::Refused(ref m) if m.contains("another rebalance")),
        "{err}"
    );
}

/// Each move failpoint, in the order a move passes them.
const POINTS: [&str; 6] = [
    "move-planned",
    "move-fenced",
    "move-copied",
    "move-verified",
    "move-switched",
    "move-cleaned",
];

async fn crash_every_step(redis: bool) {
    let _serial = SERIAL.lock().await;
    let w = world(redis, 10).await;
    let admin = admin(&w).await;
    let dsn = new_database("crashed").await;
    admin.add("crashed", &dsn, 1).await.expect("add");
    // Moves that carry users first, so each crash strands real rows.
    let plan = admin.plan().await.expect("plan");
    assert!(plan.moves.iter().filter(|m| m.users > 0).count() >= 2);
    drop(admin);
    for (i, point) in POINTS.iter().enumerate() {
        fail::cfg(*point, "return").expect("arm failpoint");
        // Each run its own admin (its own catalog session), dropped at the
        // crash as a killed CLI's would be.
        let crashed = Admin::open(
            &w.cluster.config.catalog_dsn,
            w.cluster.config.agent.clone(),
        )
        .await
        .expect("open")
        .rebalance(&some(2), &Quiet)
        .await;
        fail::remove(*point);
        assert!(
            matches!(crashed, Err(RebalanceError::Crashed(at)) if at == *point),
            "{point}: {crashed:?}"
        );
        // Money keeps moving while the move is stuck mid-way, and after.
        traffic(&w, 20, &format!("crash{i}")).await;
        // A fresh admin, as after a kill -9 of the CLI, resumes the journal.
        let admin = Admin::open(
            &w.cluster.config.catalog_dsn,
            w.cluster.config.agent.clone(),
        )
        .await
        .expect("reopen");
        let report = admin.rebalance(&some(2), &Quiet).await.expect("resume");
        assert!(report.errors.is_empty(), "{point}: {:?}", report.errors);
        assert!(
            admin.catalog().open_moves().await.expect("open").is_empty(),
            "{point}: moves left open"
        );
        let verdict = admin.verify().await.expect("verify");
        assert!(verdict.ok, "{point}: {:?}", verdict.problems);
        traffic(&w, 10, &format!("resumed{i}")).await;
    }
    check_quiet(&w).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_move_killed_at_any_step_finishes_or_rolls_back_when_run_again() {
    crash_every_step(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_mode_a_move_killed_at_any_step_finishes_or_rolls_back_when_run_again() {
    crash_every_step(true).await;
}
