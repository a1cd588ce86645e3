//! The whole coordinator over TLS: a catalog and two shards on a PostgreSQL
//! that accepts TLS connections only (`hostssl` alone in its pg_hba.conf), a
//! CA and a server certificate made at test time, every DSN with
//! `sslmode=verify-full`, and real transfers through the HTTP API.

mod common;

use std::path::PathBuf;
use std::sync::Arc;

use common::{pair, Api};
use coordinator::config::Config;
use coordinator::payments::Sandbox;
use coordinator::service::Coordinator;
use local_cluster::testing::{scratch_dir, start_tls_server, unique_prefix};
use local_cluster::{PgServer, ServerTls};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
use reqwest::StatusCode;
use testkit::{test_limits, TestCluster};

/// A CA and a server certificate for 127.0.0.1 and localhost, written to a
/// scratch directory; plus the certificate of a CA that signed nothing.
fn certificates() -> (ServerTls, PathBuf) {
    let ca = |name: &str| {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let key = KeyPair::generate().expect("CA key");
        let cert = params.self_signed(&key).expect("self-sign the CA");
        (cert, key)
    };
    let (ca_cert, ca_key) = ca("wallet test CA");
    let (wrong_ca, _) = ca("some other CA");
    let params = CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()])
        .expect("server params");
    let key = KeyPair::generate().expect("server key");
    let cert = params
        .signed_by(&key, &ca_cert, &ca_key)
        .expect("sign the server certificate");
    let dir = scratch_dir();
    let write = |name: &str, text: String| {
        let path = dir.join(name);
        std::fs::write(&path, text).expect("write a test certificate file");
        path
    };
    (
        ServerTls {
            cert_file: write("server.crt", cert.pem()),
            key_file: write("server.key", key.serialize_pem()),
            ca_file: write("ca.pem", ca_cert.pem()),
        },
        write("wrong-ca.pem", wrong_ca.pem()),
    )
}

async fn tls_server() -> (PgServer, PathBuf) {
    tokio::task::spawn_blocking(|| {
        let (tls, wrong_ca) = certificates();
        (start_tls_server(tls), wrong_ca)
    })
    .await
    .expect("start the TLS server")
}

#[tokio::test]
async fn transfers_run_over_tls_with_verify_full() {
    let (server, wrong_ca) = tls_server().await;
    let prefix = unique_prefix();
    // Creates and migrates the catalog and both shards, over TLS.
    let (catalog_dsn, mut shards) = local_cluster::provision(&[&server], 2, &prefix)
        .await
        .expect("provision over TLS");
    assert!(catalog_dsn.contains("sslmode=verify-full"));
    // One shard's DSN comes from the environment: the catalog records the
    // reference and the agent resolves it when it connects.
    let var = format!("WALLET_TLS_TEST_SHARD1_DSN_{prefix}");
    std::env::set_var(&var, &shards[1].dsn);
    shards[1].dsn = format!("env:{var}");
    let config = Config {
        listen: "127.0.0.1:0".parse().expect("static address"),
        catalog_dsn: catalog_dsn.clone().into(),
        shards,
        agent: Default::default(),
        limits: test_limits(),
        admin_token: None,
        lock_mode: Default::default(),
        redis: None,
        payment_provider: Some(coordinator::payments::ProviderConfig::Sandbox),
        http: Default::default(),
        rate_limits: coordinator::config::RateLimits::off(),
        rules: Default::default(),
        events: Default::default(),
    };

    // A wrong CA for the catalog stops the start, and says why.
    let mut wrong = config.clone();
    wrong.catalog_dsn = catalog_dsn
        .replace(
            &format!(
                "{}",
                server.config().tls.as_ref().expect("TLS").ca_file.display()
            ),
            &wrong_ca.display().to_string(),
        )
        .into();
    let err = Coordinator::start(&wrong, Arc::new(Sandbox::default()))
        .await
        .err()
        .expect("the catalog's certificate is not from the wrong CA");
    let text = format!("{err:#}");
    assert!(text.contains("UnknownIssuer"), "{text}");

    let cluster = TestCluster::serve(config).await;
    assert!(
        cluster.agents().iter().all(|a| a.uses_tls()),
        "every shard agent connects with TLS"
    );
    let api = Api::new(&cluster);
    for (same, name) in [(true, "same"), (false, "cross")] {
        let (a, b) = pair(&cluster, &format!("{prefix}{name}"), same);
        let ta = api.user(&a, "USD").await;
        let tb = api.user(&b, "USD").await;
        api.deposit(&ta, "100.00", "USD").await;
        let r = api
            .transfer(&ta, &format!("{name}-1"), &b, "40.00", "USD")
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{name}: {:?}", r.body);
        assert_eq!(api.balance(&ta).await, "60.00", "{name}");
        assert_eq!(api.balance(&tb).await, "40.00", "{name}");
    }

    // The catalog holds the reference, not the DSN it stands for.
    let (client, connection) = shard_agent::tls::connect(&catalog_dsn)
        .await
        .expect("catalog over TLS");
    tokio::spawn(connection);
    let recorded: String = client
        .query_one("SELECT dsn FROM shards WHERE shard_id = 1", &[])
        .await
        .expect("read the catalog")
        .get(0);
    assert_eq!(recorded, format!("env:{var}"));
}
