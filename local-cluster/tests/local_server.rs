//! Real local PostgreSQL servers: start, crash, restart, stop, adopt.
//!
//! Every test makes its own cluster in a temp dir on a free port, so they can
//! run in parallel; `die_with_parent` makes sure a failing test leaves no
//! server behind.

use std::path::Path;
use std::time::{Duration, Instant};

use local_cluster::{free_port, pg_bindir, pg_bindir_in, LocalError, PgServer, PgServerConfig};
use tokio_postgres::{Client, NoTls};

/// A small config: tests need a few connections, not the dev defaults.
fn test_config(name: &str, root: &Path) -> PgServerConfig {
    let mut config =
        PgServerConfig::new(name, root.join("data"), free_port().expect("a free port"));
    config.max_connections = 20;
    config.max_prepared_transactions = 20;
    config.shared_buffers_mb = 16;
    config.die_with_parent = true;
    config
}

async fn start(config: PgServerConfig) -> PgServer {
    tokio::task::spawn_blocking(move || PgServer::start(config))
        .await
        .expect("start does not panic")
        .expect("server starts")
}

async fn connect(server: &PgServer) -> Client {
    let (client, connection) = tokio_postgres::connect(&server.dsn("postgres"), NoTls)
        .await
        .expect("connects to the local server");
    tokio::spawn(connection);
    client
}

async fn prepared_gids(client: &Client) -> Vec<String> {
    client
        .query("SELECT gid FROM pg_prepared_xacts ORDER BY gid", &[])
        .await
        .expect("pg_prepared_xacts is readable")
        .iter()
        .map(|row| row.get(0))
        .collect()
}

#[tokio::test]
async fn a_fresh_server_accepts_connections_and_prepared_transactions() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let config = PgServerConfig {
        die_with_parent: true,
        ..PgServerConfig::new(
            "fresh",
            dir.path().join("data"),
            free_port().expect("a free port"),
        )
    };
    let server = start(config).await;
    assert!(server.is_running());
    assert!(server.pid().is_some());
    assert!(server.data_dir().join("PG_VERSION").exists());
    let client = connect(&server).await;

    let max_prepared: String = client
        .query_one("SHOW max_prepared_transactions", &[])
        .await
        .expect("SHOW works")
        .get(0);
    assert_eq!(max_prepared, "200", "defaults to max_connections");
    let user: String = client
        .query_one("SELECT current_user::text", &[])
        .await
        .expect("SELECT works")
        .get(0);
    assert_eq!(user, "postgres");

    client
        .batch_execute("CREATE TABLE t (x int); BEGIN; INSERT INTO t VALUES (1); PREPARE TRANSACTION 'fresh-1'")
        .await
        .expect("PREPARE TRANSACTION works");
    assert_eq!(prepared_gids(&client).await, ["fresh-1"]);
    client
        .batch_execute("COMMIT PREPARED 'fresh-1'")
        .await
        .expect("COMMIT PREPARED works");
    let count: i64 = client
        .query_one("SELECT count(*) FROM t", &[])
        .await
        .expect("count works")
        .get(0);
    assert_eq!(count, 1);
}

#[tokio::test]
async fn a_prepared_transaction_survives_kill9_and_restart() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let mut server = start(test_config("crashy", dir.path())).await;
    let port = server.port();
    let client = connect(&server).await;
    client
        .batch_execute(
            "CREATE TABLE t (x int); BEGIN; INSERT INTO t VALUES (7); PREPARE TRANSACTION 'leg-1'",
        )
        .await
        .expect("prepares a transaction");
    let old_pid = server.pid().expect("running server has a pid");

    let mut server = tokio::task::spawn_blocking(move || {
        server.kill9().expect("kill -9 works");
        assert!(!server.is_running());
        assert_eq!(server.pid(), None);
        server.restart().expect("restarts after a crash");
        server
    })
    .await
    .expect("kill9 and restart do not panic");
    assert_eq!(server.port(), port, "restart keeps the port");
    assert_ne!(server.pid(), Some(old_pid));
    assert!(client.is_closed() || client.simple_query("SELECT 1").await.is_err());

    let client = connect(&server).await;
    assert_eq!(prepared_gids(&client).await, ["leg-1"]);
    client
        .batch_execute("COMMIT PREPARED 'leg-1'")
        .await
        .expect("the surviving leg commits");
    let x: i32 = client
        .query_one("SELECT x FROM t", &[])
        .await
        .expect("the committed row is visible")
        .get(0);
    assert_eq!(x, 7);
    tokio::task::spawn_blocking(move || server.stop().expect("stops"))
        .await
        .expect("stop does not panic");
}

#[tokio::test]
async fn stopping_and_starting_again_reuses_the_data_dir() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let config = test_config("reuse", dir.path());
    let mut server = start(config.clone()).await;
    connect(&server)
        .await
        .batch_execute("CREATE TABLE kept (x int); INSERT INTO kept VALUES (42)")
        .await
        .expect("creates a table");
    let server = tokio::task::spawn_blocking(move || {
        server.stop().expect("fast shutdown works");
        assert!(!server.is_running());
        server
    })
    .await
    .expect("stop does not panic");
    drop(server);
    assert!(!dir.path().join("data/postmaster.pid").exists());

    let server = start(config).await;
    let x: i32 = connect(&server)
        .await
        .query_one("SELECT x FROM kept", &[])
        .await
        .expect("the table is still there")
        .get(0);
    assert_eq!(x, 42);
}

#[tokio::test]
async fn a_paused_server_answers_nothing_until_resumed() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let server = start(test_config("sleepy", dir.path())).await;
    let client = connect(&server).await;
    server.pause().expect("SIGSTOP works");

    let query = tokio::time::timeout(Duration::from_millis(500), client.simple_query("SELECT 1"));
    assert!(query.await.is_err(), "an existing connection hangs");
    let dsn = server.dsn("postgres");
    let fresh = tokio::time::timeout(
        Duration::from_millis(500),
        tokio_postgres::connect(&dsn, NoTls),
    );
    assert!(fresh.await.is_err(), "a new connection hangs");

    server.resume().expect("SIGCONT works");
    client
        .simple_query("SELECT 1")
        .await
        .expect("the old connection works again");
    connect(&server).await;
}

#[tokio::test]
async fn starting_on_the_data_dir_of_a_detached_server_adopts_it() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let config = test_config("adoptee", dir.path());
    let first = start(config.clone()).await;
    let pid = first.pid();
    first.detach();

    let mut adopted = start(config).await;
    assert_eq!(adopted.pid(), pid, "no second postmaster was started");
    assert!(adopted.is_running());
    connect(&adopted)
        .await
        .simple_query("SELECT 1")
        .await
        .expect("the adopted server answers");

    let adopted = tokio::task::spawn_blocking(move || {
        adopted.stop().expect("stops an adopted server");
        adopted
    })
    .await
    .expect("stop does not panic");
    assert!(!adopted.is_running());
    assert!(!dir.path().join("data/postmaster.pid").exists());
}

#[test]
fn a_missing_bindir_is_reported_with_an_install_hint() {
    let empty = tempfile::tempdir().expect("a temp dir");
    let err = pg_bindir_in(Some(empty.path())).expect_err("an empty PG_BINDIR has no binaries");
    assert!(matches!(err, LocalError::BinariesNotFound), "{err:?}");
    let message = err.to_string();
    assert!(message.contains("apt-get install postgresql"), "{message}");
    assert!(message.contains("PG_BINDIR"), "{message}");
}

#[test]
fn the_bindir_is_found_without_configuration() {
    let bindir = pg_bindir_in(None).expect("PostgreSQL is installed on this machine");
    assert!(bindir.join("initdb").exists() && bindir.join("postgres").exists());
    if std::env::var_os("PG_BINDIR").is_none() {
        assert_eq!(pg_bindir().expect("found"), bindir);
    }
}

#[test]
fn a_server_that_cannot_start_reports_its_log() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let mut config = test_config("broken", dir.path());
    config
        .extra_settings
        .push(("no_such_setting".into(), "1".into()));
    let err = PgServer::start(config).expect_err("an unknown setting stops startup");
    assert!(matches!(err, LocalError::StartFailed { .. }), "{err:?}");
    assert!(err.to_string().contains("no_such_setting"), "{err}");
}

/// Set (to a temp dir) only in the child process run by
/// `a_server_dies_with_the_process_that_started_it`.
const ORPHAN_DIR_ENV: &str = "LOCAL_SERVER_TEST_ORPHAN_DIR";

#[test]
#[ignore = "run in a child process by a_server_dies_with_the_process_that_started_it"]
fn helper_starts_a_server_from_a_short_lived_thread_and_exits_abruptly() {
    let Some(dir) = std::env::var_os(ORPHAN_DIR_ENV) else {
        return;
    };
    let config = test_config("orphan", Path::new(&dir));
    let server = std::thread::spawn(move || PgServer::start(config))
        .join()
        .expect("start does not panic")
        .expect("server starts");
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        server.is_running(),
        "the server outlives the thread that started it"
    );
    println!("PID={}", server.pid().expect("a running server has a pid"));
    // No Drop runs: only the parent-death signal can stop the server now.
    std::process::exit(0);
}

#[test]
fn a_server_dies_with_the_process_that_started_it() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let output = std::process::Command::new(std::env::current_exe().expect("the test binary"))
        .args([
            "--exact",
            "helper_starts_a_server_from_a_short_lived_thread_and_exits_abruptly",
            "--ignored",
            "--nocapture",
        ])
        .env(ORPHAN_DIR_ENV, dir.path())
        .output()
        .expect("the helper runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let pid: u32 = stdout
        .lines()
        .find_map(|l| l.strip_prefix("PID="))
        .and_then(|p| p.trim().parse().ok())
        .unwrap_or_else(|| panic!("the helper prints the pid: {stdout}"));

    let pid_file = dir.path().join("data/postmaster.pid");
    let began = Instant::now();
    while pid_file.exists() || postmaster_lives(pid) {
        assert!(
            began.elapsed() < Duration::from_secs(10),
            "postmaster {pid} outlived its parent"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Whether `pid` exists and is not a zombie (its new parent may never reap it).
fn postmaster_lives(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        let state = stat.rsplit_once(')').map(|(_, rest)| rest.trim_start());
        !state.is_some_and(|s| s.starts_with('Z'))
    })
}
