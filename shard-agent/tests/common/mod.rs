//! Two fresh, migrated shard databases on two of the shared test servers.
#![allow(dead_code)]

use local_cluster::testing::{create_database, servers_async, unique_prefix};
use router::{bucket_of, ShardId, UserId};
use rust_decimal::Decimal;
use shard_agent::batch::{BatchLeg, GroupAnswer};
use shard_agent::external::{Direction, ExternalOrder, ProviderVerdict};
use shard_agent::idempotency::IdempotencyKey;
use shard_agent::migrate::migrate_shard;
use shard_agent::transfer::{Submitted, TransferOrder};
use shard_agent::users::NewUser;
use shard_agent::{AgentConfig, Amount, Currency, ShardAgent, TransferId};

pub struct Pair {
    pub a: ShardAgent,
    pub b: ShardAgent,
    pub dsn_a: String,
    pub dsn_b: String,
}

pub async fn pair() -> Pair {
    pair_with(None).await
}

/// A pair whose databases default to `repeatable read` (`ALTER DATABASE … SET`),
/// as an operator's server might: the protocol must not depend on the default.
pub async fn pair_repeatable_read() -> Pair {
    pair_with(Some("repeatable read")).await
}

async fn pair_with(default_isolation: Option<&str>) -> Pair {
    let servers = servers_async().await;
    let prefix = unique_prefix();
    let mut dsns = Vec::new();
    for (i, server) in servers.iter().take(2).enumerate() {
        let db = format!("{prefix}_s{i}");
        create_database(server, &db)
            .await
            .expect("create test database");
        let dsn = server.dsn(&db);
        migrate_shard(&dsn).await.expect("migrate test shard");
        if let Some(level) = default_isolation {
            sql(
                &dsn,
                &format!("ALTER DATABASE {db} SET default_transaction_isolation = '{level}'"),
            )
            .await;
        }
        dsns.push(dsn);
    }
    let config = AgentConfig {
        lock_timeout_ms: 500,
        ..AgentConfig::default()
    };
    Pair {
        a: ShardAgent::new(ShardId(0), &dsns[0], config.clone()).expect("agent a"),
        b: ShardAgent::new(ShardId(1), &dsns[1], config).expect("agent b"),
        dsn_a: dsns[0].clone(),
        dsn_b: dsns[1].clone(),
    }
}

/// Creates `name` (USD) on `agent` and deposits `funds` through the clearing account.
pub async fn user(agent: &ShardAgent, name: &str, funds: &str) -> UserId {
    let user_id = UserId::for_username(name);
    agent
        .create_user(&NewUser {
            user_id,
            bucket: bucket_of(&user_id),
            username: name.into(),
            email: format!("{name}@example.com"),
            password_hash: "not-a-real-hash".into(),
            currency: Currency::Usd,
        })
        .await
        .expect("create user");
    if funds != "0" {
        let order = ExternalOrder {
            user: user_id,
            username: name.into(),
            direction: Direction::Deposit,
            amount: usd(funds),
            key: key(user_id, &format!("fund-{name}")),
            provider: "test".into(),
            payment_token: "test".into(),
        };
        agent
            .run_external(&order, |_| async { ProviderVerdict::Approved })
            .await
            .expect("fund user");
    }
    user_id
}

/// A same-shard transfer as a group of one (`wallet_batch_local`), answered
/// as the coordinator answers it; panics on an answer without a record.
pub async fn transfer_alone(agent: &ShardAgent, o: &TransferOrder) -> Submitted {
    let tid = TransferId::generate();
    let legs = BatchLeg::both(tid, o, None);
    let answers = agent
        .transfer_local_batch(&legs, 2_000)
        .await
        .expect("group of one");
    let [answer]: [GroupAnswer; 1] = answers.try_into().expect("one answer per transfer");
    answer
        .submitted(agent.id())
        .expect("a record where one is due")
        .expect("an answer with a record")
}

/// A credit of `amount` USD to `payee` left in doubt on `agent`
/// (`local_cluster::testing::in_doubt_credit`).
pub async fn prepare_credit(
    agent: &ShardAgent,
    decider: router::ShardId,
    payee: UserId,
    amount: &str,
) -> shard_agent::Gid {
    local_cluster::testing::in_doubt_credit(agent, decider, payee, usd(amount))
        .await
        .expect("an in-doubt credit")
}

/// A transfer of `amount` USD from `payer` to `payee` under Idempotency-Key `k`.
pub fn order(payer: UserId, payee: UserId, amount: &str, k: &str) -> TransferOrder {
    TransferOrder {
        from: payer,
        from_username: "payer".into(),
        to: payee,
        to_username: "payee".into(),
        amount: usd(amount),
        key: key(payer, k),
        refund_of: None,
        reason: None,
        dispute: None,
        release_of: None,
    }
}

pub fn usd(text: &str) -> Amount {
    Amount::parse(text, Currency::Usd).expect("valid test amount")
}

pub fn key(user: UserId, key: &str) -> IdempotencyKey {
    IdempotencyKey {
        user,
        key: key.into(),
        fingerprint: key.as_bytes().to_vec(),
    }
}

pub async fn balance(agent: &ShardAgent, user: UserId) -> Decimal {
    agent
        .account_view(user, 1, None)
        .await
        .expect("read account")
        .expect("account exists")
        .balance
}

/// A plain connection to a shard's database, outside any agent (test setup
/// and inspection only).
pub async fn raw(dsn: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(dsn, tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(conn);
    client
}

/// Runs raw SQL on a shard (test setup only).
pub async fn sql(dsn: &str, statement: &str) {
    let client = raw(dsn).await;
    client.batch_execute(statement).await.expect("run test SQL");
}

/// Locks the accounts of `users` in an open transaction on its own connection, as
/// a prepared leg or a busy payee would; `COMMIT` or `ROLLBACK` on it releases them.
pub async fn hold_rows(dsn: &str, users: &[UserId]) -> tokio_postgres::Client {
    let client = raw(dsn).await;
    let ids: Vec<String> = users.iter().map(|u| format!("'{}'", u.as_uuid())).collect();
    client
        .batch_execute(&format!(
            "BEGIN; SELECT 1 FROM accounts WHERE user_id IN ({}) FOR UPDATE",
            ids.join(", ")
        ))
        .await
        .expect("hold the rows");
    client
}
