//! A coordinator refuses to start against a shard whose SQL functions are not
//! its build's (shard_agent::functions).

use std::sync::Arc;

use coordinator::payments::Sandbox;
use coordinator::service::{Coordinator, StartError};
use shard_agent::functions::{Found, Stamp, VERSION};
use shard_agent::ShardError;
use testkit::{init_tracing, test_limits, TestCluster};

#[tokio::test]
async fn a_shard_with_newer_functions_stops_the_start() {
    init_tracing();
    let config = TestCluster::provision(2, test_limits()).await;
    // What a newer coordinator leaves on shard 1 once it has applied its functions.
    let (client, conn) = tokio_postgres::connect(&config.shards[1].dsn, tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(conn);
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

    match Coordinator::start(&config, Arc::new(Sandbox::default())).await {
        Err(StartError::Functions(ShardError::FunctionsMismatch {
            shard,
            expected,
            found,
        })) => {
            assert_eq!(shard, config.shards[1].id);
            assert_eq!(expected, Stamp::compiled());
            assert_eq!(found, Found::Other(newer));
        }
        Err(other) => panic!("expected a functions mismatch, got {other}"),
        Ok(_) => panic!("the coordinator started against another version's functions"),
    }
}
