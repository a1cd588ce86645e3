//! TLS to a real PostgreSQL that accepts TLS connections only, with a CA and a
//! server certificate made at test time: which `sslmode`s connect, which are
//! refused and how clearly, and that a shard agent works over TLS.

mod common;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use local_cluster::testing::{create_database, scratch_dir, start_tls_server, unique_prefix};
use local_cluster::{PgServer, ServerTls};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
use router::ShardId;
use shard_agent::migrate::migrate_shard;
use shard_agent::tls::{connect, ConnectError, Connector};
use shard_agent::{AgentConfig, ShardAgent};

struct Fixture {
    server: PgServer,
    ca: PathBuf,
    /// A CA that did not sign the server's certificate.
    wrong_ca: PathBuf,
}

/// A self-signed CA: its certificate (PEM) and the key and certificate to sign with.
fn make_ca(name: &str) -> (String, rcgen::Certificate, KeyPair) {
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    let key = KeyPair::generate().expect("CA key");
    let cert = params.self_signed(&key).expect("self-sign the CA");
    (cert.pem(), cert, key)
}

/// One TLS-only server for this file's tests (it dies with the test process).
fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let dir = scratch_dir();
        let (ca_pem, ca_cert, ca_key) = make_ca("wallet test CA");
        let (wrong_pem, _, _) = make_ca("some other CA");
        // Names the tests connect by: the IP address, and localhost.
        let mut params = CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()])
            .expect("server params");
        params
            .distinguished_name
            .push(DnType::CommonName, "localhost");
        let key = KeyPair::generate().expect("server key");
        let cert = params
            .signed_by(&key, &ca_cert, &ca_key)
            .expect("sign the server certificate");
        let write = |name: &str, text: &str| {
            let path = dir.join(name);
            std::fs::write(&path, text).expect("write a test certificate file");
            path
        };
        let tls = ServerTls {
            cert_file: write("server.crt", &cert.pem()),
            key_file: write("server.key", &key.serialize_pem()),
            ca_file: write("ca.pem", &ca_pem),
        };
        let wrong_ca = write("wrong-ca.pem", &wrong_pem);
        Fixture {
            ca: tls.ca_file.clone(),
            server: start_tls_server(tls),
            wrong_ca,
        }
    })
}

async fn fixture_async() -> &'static Fixture {
    tokio::task::spawn_blocking(fixture)
        .await
        .expect("start the TLS server")
}

fn plain_dsn(f: &Fixture, db: &str) -> String {
    format!(
        "host=127.0.0.1 port={} user=postgres dbname={db}",
        f.server.port()
    )
}

fn with_ca(dsn: &str, mode: &str, ca: &Path) -> String {
    format!("{dsn} sslmode={mode} sslrootcert={}", ca.display())
}

async fn ssl_in_use(dsn: &str) -> Result<bool, ConnectError> {
    let (client, connection) = connect(dsn).await?;
    tokio::spawn(connection);
    let row = client
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await?;
    Ok(row.get(0))
}

#[tokio::test]
async fn a_plaintext_connection_is_refused() {
    let f = fixture_async().await;
    for dsn in [
        plain_dsn(f, "postgres"),
        format!("{} sslmode=disable", plain_dsn(f, "postgres")),
    ] {
        let err = ssl_in_use(&dsn).await.expect_err("the server is TLS-only");
        let text = format!("{err:?}");
        assert!(text.contains("no pg_hba.conf entry"), "{text}");
        assert!(text.contains("no encryption"), "{text}");
    }
}

#[tokio::test]
async fn verify_full_against_the_right_ca_connects_over_tls() {
    let f = fixture_async().await;
    // The launcher's own DSN is verify-full against the test CA.
    assert!(f.server.dsn("postgres").contains("sslmode=verify-full"));
    assert!(ssl_in_use(&f.server.dsn("postgres"))
        .await
        .expect("connect"));
    let by_name = format!(
        "host=localhost port={} user=postgres dbname=postgres",
        f.server.port()
    );
    assert!(ssl_in_use(&with_ca(&by_name, "verify-full", &f.ca))
        .await
        .expect("the certificate names localhost too"));
    let url = format!(
        "postgres://postgres@127.0.0.1:{}/postgres?sslmode=verify-full&sslrootcert={}",
        f.server.port(),
        f.ca.display()
    );
    assert!(ssl_in_use(&url).await.expect("URL-style DSN"));
}

#[tokio::test]
async fn verify_full_against_a_wrong_ca_is_refused_with_a_clear_error() {
    let f = fixture_async().await;
    for mode in ["verify-full", "verify-ca", "require"] {
        let dsn = with_ca(&plain_dsn(f, "postgres"), mode, &f.wrong_ca);
        let err = ssl_in_use(&dsn).await.expect_err("the CA did not sign it");
        let text = err.to_string();
        assert!(
            text.contains("TLS handshake") && text.contains("UnknownIssuer"),
            "{mode}: {text}"
        );
    }
}

#[tokio::test]
async fn the_host_name_is_checked_by_verify_full_only() {
    let f = fixture_async().await;
    // Connects to 127.0.0.1 but expects a certificate for another name.
    let dsn = format!(
        "host=db.invalid hostaddr=127.0.0.1 port={} user=postgres dbname=postgres",
        f.server.port()
    );
    let err = ssl_in_use(&with_ca(&dsn, "verify-full", &f.ca))
        .await
        .expect_err("the certificate is not for db.invalid");
    assert!(err.to_string().contains("not valid for name"), "{err}");
    assert!(ssl_in_use(&with_ca(&dsn, "verify-ca", &f.ca))
        .await
        .expect("verify-ca checks the chain only"));
    assert!(ssl_in_use(&with_ca(&dsn, "require", &f.ca))
        .await
        .expect("require with a CA file checks the chain only"));
}

#[tokio::test]
async fn require_and_prefer_without_a_ca_encrypt_without_verifying() {
    let f = fixture_async().await;
    for mode in ["require", "prefer"] {
        let dsn = format!("{} sslmode={mode}", plain_dsn(f, "postgres"));
        assert!(ssl_in_use(&dsn).await.expect("connect"), "{mode}");
    }
}

#[tokio::test]
async fn a_shard_agent_migrates_and_moves_money_over_tls() {
    let f = fixture_async().await;
    let prefix = unique_prefix();
    let mut agents = Vec::new();
    for i in 0..2u16 {
        let db = format!("{prefix}_tls{i}");
        create_database(&f.server, &db)
            .await
            .expect("create a database over TLS");
        let dsn = f.server.dsn(&db);
        migrate_shard(&dsn).await.expect("migrate over TLS");
        let agent = ShardAgent::new(ShardId(i), &dsn, AgentConfig::default()).expect("agent");
        assert!(agent.uses_tls());
        agent.ping().await.expect("ping over TLS");
        agents.push(agent);
    }
    let payer = common::user(&agents[0], "tls_payer", "100").await;
    let payee = common::user(&agents[0], "tls_payee", "0").await;
    common::transfer_alone(&agents[0], &common::order(payer, payee, "25.50", "tls-1")).await;
    assert_eq!(
        common::balance(&agents[0], payer).await.to_string(),
        "74.50"
    );
    assert_eq!(
        common::balance(&agents[0], payee).await.to_string(),
        "25.50"
    );
}

#[test]
fn a_connector_shows_its_dsn_without_the_password() {
    let c = Connector::from_dsn("host=h user=u password=hunter2 sslmode=require").expect("valid");
    let shown = format!("{c:?} {}", c.redacted());
    assert!(!shown.contains("hunter2"), "{shown}");
    assert!(shown.contains("password=***"), "{shown}");
}
