//! The wallet's rules at the shard: how a limit's usage follows the UTC day,
//! and that a refusal's detail is recorded only with its own refusal.

mod common;

use std::sync::Arc;

use common::{order, pair, sql, transfer_alone, user};
use router::{ShardId, UserId};
use rust_decimal::Decimal;
use shard_agent::rules::WalletRules;
use shard_agent::transfer::Submitted;
use shard_agent::{AgentConfig, Currency, FailureCode, ShardAgent, TransferState};

fn d(text: &str) -> Decimal {
    text.parse().expect("a decimal")
}

/// The account's usage, and its day relative to today (UTC): -1, 0 or 1.
async fn usage(dsn: &str, user: UserId) -> (Decimal, i32) {
    let client = common::raw(dsn).await;
    let row = client
        .query_one(
            "SELECT used_today, sign(used_day - (now() AT TIME ZONE 'UTC')::date)::int
               FROM accounts WHERE user_id = $1",
            &[user.as_uuid()],
        )
        .await
        .expect("read usage");
    (row.get(0), row.get(1))
}

/// A row already on a later day (a transaction that began before midnight
/// reaches it after another moved it on) keeps that day's usage; a row on an
/// earlier day starts the day afresh.
#[tokio::test]
async fn usage_follows_the_utc_day_and_never_moves_back() {
    let p = pair().await;
    let ahead = user(&p.a, "day_ahead", "100").await;
    let behind = user(&p.a, "day_behind", "100").await;
    let payee = user(&p.a, "day_payee", "0").await;
    let today = "(now() AT TIME ZONE 'UTC')::date";
    sql(
        &p.dsn_a,
        &format!(
            "UPDATE accounts SET used_day = {today} + 1, used_today = 5 WHERE user_id = '{}';
             UPDATE accounts SET used_day = {today} - 1, used_today = 7 WHERE user_id = '{}';",
            ahead.as_uuid(),
            behind.as_uuid()
        ),
    )
    .await;
    for (payer, k) in [(ahead, "a"), (behind, "b")] {
        let done = transfer_alone(&p.a, &order(payer, payee, "3", k)).await;
        assert!(matches!(done, Submitted::New(ref r) if r.state == TransferState::Committed));
    }
    assert_eq!(
        usage(&p.dsn_a, ahead).await,
        (d("5"), 1),
        "the later day and its usage are left alone"
    );
    assert_eq!(
        usage(&p.dsn_a, behind).await,
        (d("3"), 0),
        "a new day counts only its own transfers"
    );
}

/// A transfer refused on two counts ends with the higher-ranked one; the
/// lower one's detail (what is left of the limit) is not recorded with it.
#[tokio::test]
async fn a_refusal_detail_is_recorded_only_with_its_own_code() {
    let p = pair().await;
    let rules = WalletRules {
        daily_limits: [(Currency::Usd, d("1.00"))].into(),
        ..WalletRules::default()
    };
    let limited = ShardAgent::new(
        ShardId(0),
        &p.dsn_a,
        AgentConfig {
            rules: Arc::new(rules),
            ..AgentConfig::default()
        },
    )
    .expect("agent with rules");
    let payer = user(&limited, "detail_payer", "100").await;
    let payee = user(&limited, "detail_payee", "0").await;
    let nobody = UserId::for_username("detail_nobody");
    let record = |s: Submitted| match s {
        Submitted::New(r) => r,
        other => panic!("expected a new record, got {other:?}"),
    };
    let over = record(transfer_alone(&limited, &order(payer, payee, "5", "over")).await);
    assert_eq!(over.failure_code, Some(FailureCode::LimitExceeded));
    assert_eq!(over.failure_detail.as_deref(), Some("1.00"));
    let both = record(transfer_alone(&limited, &order(payer, nobody, "5", "both")).await);
    assert_eq!(both.failure_code, Some(FailureCode::RecipientNotFound));
    assert_eq!(both.failure_detail, None);
}
