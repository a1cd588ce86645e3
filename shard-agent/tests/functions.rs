//! The shard's SQL functions against real PostgreSQL: applied once and only
//! once, exactly the files' definitions, repaired after a hand edit, never
//! downgraded under a newer build, and never used by an agent of another
//! version.

use local_cluster::testing::{create_database, servers_async, unique_prefix};
use shard_agent::functions::{self, Applied, ApplyError, Found, Stamp, FILES, VERSION};
use shard_agent::migrate::{migrate_shard, MigrateError};
use shard_agent::{AgentConfig, ShardAgent, ShardError};
use tokio_postgres::Client;

/// A fresh, empty database; its DSN.
async fn fresh_database(tag: &str) -> String {
    let server = &servers_async().await[0];
    let db = format!("{}_{tag}", unique_prefix());
    create_database(server, &db)
        .await
        .expect("create test database");
    server.dsn(&db)
}

async fn connect(dsn: &str) -> Client {
    let (client, conn) = tokio_postgres::connect(dsn, tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(conn);
    client
}

/// The stamp row: (version, checksum, applied_at as text).
async fn stamp_row(client: &Client) -> (i32, String, String) {
    let row = client
        .query_one(
            "SELECT version, checksum, applied_at::text FROM wallet_functions",
            &[],
        )
        .await
        .expect("read the stamp");
    (row.get(0), row.get(1), row.get(2))
}

/// The text between a file's dollar quotes: what PostgreSQL keeps as `prosrc`.
fn body(sql: &str) -> &str {
    let start = sql.find("$$").expect("a dollar-quoted body") + 2;
    let end = sql.rfind("$$").expect("a dollar-quoted body");
    &sql[start..end]
}

#[tokio::test]
async fn a_second_migrate_changes_nothing() {
    let dsn = fresh_database("fn_twice").await;
    let first = migrate_shard(&dsn).await.expect("first migrate");
    assert_eq!(first, Applied::Installed { previous: None });
    let client = connect(&dsn).await;
    let before = stamp_row(&client).await;
    assert_eq!(
        (before.0, before.1.as_str()),
        (VERSION, functions::checksum())
    );

    let second = migrate_shard(&dsn).await.expect("second migrate");
    assert_eq!(second, Applied::Unchanged);
    assert_eq!(stamp_row(&client).await, before, "the stamp is untouched");
    assert_eq!(functions::check(&client).await.expect("check"), None);
}

#[tokio::test]
async fn the_shard_holds_exactly_the_files_functions() {
    let dsn = fresh_database("fn_exact").await;
    migrate_shard(&dsn).await.expect("migrate");
    let client = connect(&dsn).await;
    let rows = client
        .query(
            "SELECT p.proname::text, p.prosrc FROM pg_proc p
              WHERE p.pronamespace = 'public'::regnamespace ORDER BY p.proname",
            &[],
        )
        .await
        .expect("read pg_proc");
    let mut expected: Vec<&str> = FILES.iter().map(|f| f.name).collect();
    expected.sort_unstable();
    let names: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    assert_eq!(
        names, expected,
        "one overload of each function, nothing else"
    );
    for row in &rows {
        let name: String = row.get(0);
        let prosrc: String = row.get(1);
        let file = FILES.iter().find(|f| f.name == name).expect("a file");
        assert_eq!(prosrc, body(file.sql), "{name}'s body is its file's");
    }
    // The same-shard group's settings are part of its definition.
    let config: Vec<String> = client
        .query_one(
            "SELECT proconfig FROM pg_proc WHERE proname = 'wallet_batch_local'",
            &[],
        )
        .await
        .expect("read proconfig")
        .get(0);
    assert_eq!(config, ["plan_cache_mode=force_generic_plan"]);
}

#[tokio::test]
async fn a_hand_edit_is_seen_and_repaired() {
    let dsn = fresh_database("fn_edit").await;
    migrate_shard(&dsn).await.expect("migrate");
    let client = connect(&dsn).await;
    let ours = Stamp::compiled();

    // A body replaced by hand.
    client
        .batch_execute(
            "CREATE OR REPLACE FUNCTION wallet_tombstone(p_transfer uuid) RETURNS text
             LANGUAGE sql AS $$ SELECT 'committed' $$",
        )
        .await
        .expect("replace a function by hand");
    assert_eq!(
        functions::check(&client).await.expect("check"),
        Some(Found::Edited(ours.clone()))
    );
    assert_eq!(
        migrate_shard(&dsn).await.expect("repair"),
        Applied::Repaired
    );
    assert_eq!(functions::check(&client).await.expect("check"), None);
    let prosrc: String = client
        .query_one(
            "SELECT prosrc FROM pg_proc WHERE proname = 'wallet_tombstone'",
            &[],
        )
        .await
        .expect("read prosrc")
        .get(0);
    let file = FILES
        .iter()
        .find(|f| f.name == "wallet_tombstone")
        .expect("a file");
    assert_eq!(prosrc, body(file.sql));

    // An extra overload added by hand is dropped by the repair.
    client
        .batch_execute(
            "CREATE FUNCTION wallet_tombstone(p_transfer text) RETURNS text
             LANGUAGE sql AS $$ SELECT 'tombstoned' $$",
        )
        .await
        .expect("add an overload by hand");
    assert_eq!(
        functions::check(&client).await.expect("check"),
        Some(Found::Edited(ours))
    );
    assert_eq!(
        migrate_shard(&dsn).await.expect("repair"),
        Applied::Repaired
    );
    let overloads: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_proc WHERE proname = 'wallet_tombstone'",
            &[],
        )
        .await
        .expect("count overloads")
        .get(0);
    assert_eq!(overloads, 1);
}

#[tokio::test]
async fn another_checksum_under_this_version_is_refused() {
    let dsn = fresh_database("fn_same_version").await;
    migrate_shard(&dsn).await.expect("migrate");
    let client = connect(&dsn).await;
    client
        .batch_execute("UPDATE wallet_functions SET checksum = 'another build'")
        .await
        .expect("tamper with the stamp");
    let theirs = Stamp {
        version: VERSION,
        checksum: "another build".into(),
    };
    assert_eq!(
        functions::check(&client).await.expect("check"),
        Some(Found::Other(theirs.clone()))
    );
    match migrate_shard(&dsn).await {
        Err(MigrateError::Functions(ApplyError::SameVersion { applied, ours })) => {
            assert_eq!(applied, theirs);
            assert_eq!(ours, Stamp::compiled());
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test]
async fn an_older_build_never_replaces_newer_functions() {
    let dsn = fresh_database("fn_newer").await;
    migrate_shard(&dsn).await.expect("migrate");
    let client = connect(&dsn).await;
    // What a newer build leaves behind: a higher version, other functions.
    let newer = Stamp {
        version: VERSION + 1,
        checksum: "a newer build".into(),
    };
    client
        .execute(
            "UPDATE wallet_functions SET version = $1, checksum = $2",
            &[&newer.version, &newer.checksum],
        )
        .await
        .expect("stamp a newer version");
    client
        .batch_execute(
            "CREATE FUNCTION wallet_newer_only() RETURNS int LANGUAGE sql AS $$ SELECT 1 $$",
        )
        .await
        .expect("a function of the newer build");
    let before = stamp_row(&client).await;

    match migrate_shard(&dsn).await {
        Err(MigrateError::Functions(ApplyError::Newer { applied, ours })) => {
            assert_eq!(applied, newer);
            assert_eq!(ours, Stamp::compiled());
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert_eq!(stamp_row(&client).await, before, "the stamp is untouched");
    let kept: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_proc WHERE proname = 'wallet_newer_only'",
            &[],
        )
        .await
        .expect("look for the newer function")
        .get(0);
    assert_eq!(kept, 1, "the newer build's functions are untouched");
    assert_eq!(
        functions::check(&client).await.expect("check"),
        Some(Found::Other(newer))
    );
}

#[tokio::test]
async fn a_newer_build_replaces_older_functions() {
    if VERSION == 1 {
        // Version 0 is below the stamp's CHECK: there is no older build yet.
        return;
    }
    let dsn = fresh_database("fn_older").await;
    migrate_shard(&dsn).await.expect("migrate");
    let client = connect(&dsn).await;
    let older = Stamp {
        version: VERSION - 1,
        checksum: "an older build".into(),
    };
    // An older build's stamp, and a function only it had.
    client
        .execute(
            "UPDATE wallet_functions SET version = $1, checksum = $2",
            &[&older.version, &older.checksum],
        )
        .await
        .expect("stamp an older version");
    client
        .batch_execute(
            "CREATE FUNCTION wallet_older_only() RETURNS int LANGUAGE sql AS $$ SELECT 1 $$",
        )
        .await
        .expect("a function of the older build");
    assert_eq!(
        migrate_shard(&dsn).await.expect("upgrade"),
        Applied::Installed {
            previous: Some(older)
        }
    );
    assert_eq!(functions::check(&client).await.expect("check"), None);
    let gone: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_proc WHERE proname = 'wallet_older_only'",
            &[],
        )
        .await
        .expect("look for the older function")
        .get(0);
    assert_eq!(gone, 0, "a function the new set lacks is dropped");
}

#[tokio::test]
async fn two_applies_at_once_apply_once() {
    let dsn = fresh_database("fn_race").await;
    migrate_shard(&dsn).await.expect("migrate");
    // As if the functions had never been applied.
    connect(&dsn)
        .await
        .batch_execute("DELETE FROM wallet_functions")
        .await
        .expect("forget the stamp");
    let (mut a, mut b) = (connect(&dsn).await, connect(&dsn).await);
    let (a, b) = tokio::join!(functions::apply(&mut a), functions::apply(&mut b));
    let mut outcomes = [a.expect("first"), b.expect("second")];
    outcomes.sort_by_key(|o| matches!(o, Applied::Unchanged));
    assert_eq!(
        outcomes,
        [Applied::Installed { previous: None }, Applied::Unchanged]
    );
}

fn agent(dsn: &str) -> ShardAgent {
    ShardAgent::new(router::ShardId(0), dsn, AgentConfig::default()).expect("agent")
}

/// What the agent's calls found instead of this build's functions.
fn mismatch(result: Result<(), ShardError>) -> Found {
    match result {
        Err(ShardError::FunctionsMismatch {
            expected, found, ..
        }) => {
            assert_eq!(expected, Stamp::compiled());
            found
        }
        other => panic!("expected a functions mismatch, got {other:?}"),
    }
}

#[tokio::test]
async fn an_agent_refuses_a_shard_of_another_version() {
    let dsn = fresh_database("fn_agent_version").await;
    migrate_shard(&dsn).await.expect("migrate");
    let running = agent(&dsn);
    running.ping().await.expect("this build's functions");
    running
        .check_functions()
        .await
        .expect("this build's functions");

    let newer = Stamp {
        version: VERSION + 1,
        checksum: "a newer build".into(),
    };
    connect(&dsn)
        .await
        .execute(
            "UPDATE wallet_functions SET version = $1, checksum = $2",
            &[&newer.version, &newer.checksum],
        )
        .await
        .expect("stamp a newer version");

    // A new agent's first connection is refused, naming both stamps.
    let started = agent(&dsn);
    let err = started.ping().await.expect_err("another version");
    let text = err.to_string();
    assert!(
        text.contains(&newer.checksum) && text.contains(functions::checksum()),
        "{text}"
    );
    assert!(!err.is_retryable());
    assert_eq!(mismatch(started.ping().await), Found::Other(newer.clone()));
    // A running agent is refused as soon as it checks again.
    assert_eq!(
        mismatch(running.check_functions().await),
        Found::Other(newer)
    );
}

#[tokio::test]
async fn an_agent_refuses_edited_functions_until_they_are_repaired() {
    let dsn = fresh_database("fn_agent_edit").await;
    migrate_shard(&dsn).await.expect("migrate");
    connect(&dsn)
        .await
        .batch_execute(
            "CREATE OR REPLACE FUNCTION wallet_batch_decide(p_batch uuid) RETURNS void
             LANGUAGE sql AS $$ SELECT $$",
        )
        .await
        .expect("replace a function by hand");
    let a = agent(&dsn);
    assert_eq!(mismatch(a.ping().await), Found::Edited(Stamp::compiled()));
    assert_eq!(
        migrate_shard(&dsn).await.expect("repair"),
        Applied::Repaired
    );
    a.ping().await.expect("repaired");
}

#[tokio::test]
async fn an_agent_refuses_a_shard_without_functions() {
    let dsn = fresh_database("fn_agent_none").await;
    assert_eq!(mismatch(agent(&dsn).ping().await), Found::Nothing);
}

/// Every balance and every ledger entry is written by one function,
/// `wallet_post`: no other function file and no SQL in the shard agent
/// writes them (the bulk import's opening balances aside, which move no money
/// between accounts).
#[test]
fn money_is_posted_in_one_place() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut sources: Vec<(String, String)> = FILES
        .iter()
        .map(|f| (format!("{}.sql", f.name), f.sql.to_owned()))
        .collect();
    let mut dirs = vec![root.join("src")];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).expect("read the agent's sources") {
            let path = entry.expect("a directory entry").path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let text = std::fs::read_to_string(&path).expect("read a source file");
                sources.push((path.display().to_string(), text));
            }
        }
    }
    let writers = |needle: &str| -> Vec<String> {
        let mut found: Vec<String> = sources
            .iter()
            .filter(|(_, text)| text.to_lowercase().contains(needle))
            .map(|(name, _)| {
                std::path::Path::new(name)
                    .file_name()
                    .expect("a file name")
                    .to_string_lossy()
                    .into_owned()
            })
            .collect();
        found.sort();
        found
    };
    assert_eq!(writers("insert into ledger_entries"), ["wallet_post.sql"]);
    assert_eq!(writers("set balance"), ["bulk.rs", "wallet_post.sql"]);
}
