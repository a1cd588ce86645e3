//! Redis mode's group statements against real PostgreSQL: the debits on a
//! payer shard (`wallet_redis_debit`, the commit point) and the credits on a
//! payee shard (`wallet_redis_credit`), fenced and idempotent.

mod common;

use common::{balance, order, pair, user};
use router::UserId;
use rust_decimal::Decimal;
use shard_agent::batch::{Answer, BatchLeg, GroupAnswer, Verdict};
use shard_agent::redis_legs::{Credited, PendingCredit};
use shard_agent::{Currency, FailureCode, ShardAgent, TransferId, TransferState};

/// How long a debit here waits for a row lock.
const LOCK_WAIT_MS: u64 = 2_000;

/// The debit leg of a transfer of `amount` USD under key `k`.
fn debit(tid: TransferId, from: UserId, to: UserId, amount: &str, k: &str) -> BatchLeg {
    let [debit, _] = BatchLeg::both(tid, &order(from, to, amount, k), None);
    debit
}

fn credit(tid: TransferId, to: UserId, amount: &str) -> PendingCredit {
    PendingCredit {
        transfer_id: tid,
        to_user: to,
        to_username: "payee".into(),
        from_username: "payer".into(),
        amount: common::usd(amount).value(),
        currency: Currency::Usd,
        refund_of: None,
        dispute: None,
    }
}

fn d(text: &str) -> Decimal {
    text.parse().expect("a decimal")
}

fn answer(answers: &[GroupAnswer], tid: TransferId) -> &GroupAnswer {
    answers
        .iter()
        .find(|a| a.tid == tid)
        .expect("every transfer is answered")
}

fn state(answers: &[GroupAnswer], tid: TransferId) -> (TransferState, Option<FailureCode>) {
    let r = answer(answers, tid)
        .record
        .as_ref()
        .expect("a record for this transfer");
    (r.state, r.failure_code)
}

async fn pending(agent: &ShardAgent) -> i64 {
    agent
        .audit()
        .await
        .expect("audit the shard")
        .pending_credits
}

#[tokio::test]
async fn a_debit_group_commits_records_and_leaves_a_pending_credit_per_transfer() {
    let p = pair().await;
    let rich = user(&p.a, "r_rich", "100").await;
    let poor = user(&p.a, "r_poor", "1").await;
    let other = user(&p.a, "r_other", "10").await;
    let payee = user(&p.b, "r_payee", "0").await;
    let (ok, unfunded, nobody) = (
        TransferId::generate(),
        TransferId::generate(),
        TransferId::generate(),
    );
    let legs = [
        debit(ok, rich, payee, "30", "a"),
        debit(unfunded, poor, payee, "5", "b"),
        debit(nobody, other, UserId::for_username("ghost"), "1", "c"),
    ];
    // The payee's side found nobody for the third.
    let prior = [
        Verdict::Pass,
        Verdict::Pass,
        Verdict::Refused(FailureCode::RecipientNotFound),
    ];
    let answers =
        p.a.redis_debit_group(&legs, &prior, 100, LOCK_WAIT_MS)
            .await
            .expect("debits");
    assert_eq!(state(&answers, ok), (TransferState::Committed, None));
    assert_eq!(
        state(&answers, unfunded),
        (TransferState::Aborted, Some(FailureCode::InsufficientFunds))
    );
    assert_eq!(
        state(&answers, nobody),
        (TransferState::Aborted, Some(FailureCode::RecipientNotFound))
    );
    assert_eq!(balance(&p.a, rich).await, d("70.00"));
    assert_eq!(balance(&p.a, poor).await, d("1.00"));
    assert_eq!(pending(&p.a).await, 1, "one pending credit, for the debit");
    assert_eq!(
        p.a.max_fence().await.expect("fences"),
        100,
        "the debit stored its token"
    );

    // The same key again: replayed by the group's check, nothing written.
    let again = TransferId::generate();
    let answers =
        p.a.redis_debit_group(
            &[debit(again, rich, payee, "30", "a")],
            &[Verdict::Pass],
            101,
            LOCK_WAIT_MS,
        )
        .await
        .expect("replay");
    assert_eq!(
        answer(&answers, again).verdict,
        Verdict::Answered(Answer::Replay(ok))
    );
    assert_eq!(balance(&p.a, rich).await, d("70.00"));
    assert_eq!(pending(&p.a).await, 1);
}

#[tokio::test]
async fn a_debit_under_an_older_token_is_aborted_as_lock_unavailable_and_moves_nothing() {
    let p = pair().await;
    let payer = user(&p.a, "f_payer", "50").await;
    let payee = user(&p.b, "f_payee", "0").await;
    let first = TransferId::generate();
    p.a.redis_debit_group(
        &[debit(first, payer, payee, "10", "first")],
        &[Verdict::Pass],
        500,
        LOCK_WAIT_MS,
    )
    .await
    .expect("first debit");
    // A holder whose lock expired comes back with its older token.
    let stale = TransferId::generate();
    let answers =
        p.a.redis_debit_group(
            &[debit(stale, payer, payee, "10", "stale")],
            &[Verdict::Pass],
            400,
            LOCK_WAIT_MS,
        )
        .await
        .expect("stale debit");
    assert_eq!(
        state(&answers, stale),
        (TransferState::Aborted, Some(FailureCode::LockUnavailable))
    );
    assert_eq!(balance(&p.a, payer).await, d("40.00"));
    assert_eq!(pending(&p.a).await, 1, "only the first transfer's");
    // A fault: the same key runs afresh under a newer token.
    let retry = TransferId::generate();
    let answers =
        p.a.redis_debit_group(
            &[debit(retry, payer, payee, "10", "stale")],
            &[Verdict::Pass],
            600,
            LOCK_WAIT_MS,
        )
        .await
        .expect("retry");
    assert_eq!(state(&answers, retry), (TransferState::Committed, None));
    assert_eq!(balance(&p.a, payer).await, d("30.00"));
}

#[tokio::test]
async fn credits_apply_once_in_one_statement_and_an_older_token_is_refused() {
    let p = pair().await;
    let payee = user(&p.b, "c_payee", "0").await;
    let (one, two) = (TransferId::generate(), TransferId::generate());
    // Two credits to one payee in one group share its token.
    let credited =
        p.b.credit_group(&[credit(one, payee, "3"), credit(two, payee, "4")], 700)
            .await
            .expect("credits");
    assert_eq!(credited, vec![Credited::Yes, Credited::Yes]);
    assert_eq!(balance(&p.b, payee).await, d("7.00"));
    // Recovery applying the same credit again: reported, not repeated.
    let again =
        p.b.credit_group(&[credit(one, payee, "3")], 800)
            .await
            .expect("again");
    assert_eq!(again, vec![Credited::AlreadyApplied]);
    assert_eq!(balance(&p.b, payee).await, d("7.00"));
    // An older token is refused and told the account's.
    let three = TransferId::generate();
    let refused =
        p.b.credit_group(&[credit(three, payee, "5")], 600)
            .await
            .expect("refused");
    assert_eq!(refused, vec![Credited::FenceRejected { last_fence: 700 }]);
    assert_eq!(balance(&p.b, payee).await, d("7.00"));
    let audit = p.b.audit().await.expect("audit");
    assert_eq!(audit.fence_regressions, 0);
    assert_eq!(audit.ledger_mismatches, 0);
}

#[tokio::test]
async fn payees_are_read_for_the_refusals_of_the_payee_side() {
    let p = pair().await;
    let usd = user(&p.b, "p_usd", "0").await;
    let refusals =
        p.b.payee_refusals(&[
            (usd, Currency::Usd),
            (usd, Currency::Eur),
            (UserId::for_username("p_nobody"), Currency::Usd),
        ])
        .await
        .expect("payees");
    assert_eq!(
        refusals,
        vec![
            None,
            Some(FailureCode::CurrencyMismatch),
            Some(FailureCode::RecipientNotFound)
        ]
    );
}
