//! Batched transfers against real PostgreSQL (`wallet_batch_*`): one transaction
//! per shard for a whole group, each transfer decided on its own, a cross-shard
//! group that recovery commits or rolls back as a whole from its decision row,
//! and payers whose session the group's check reads.

mod common;

use common::{balance, key, pair, usd, user};
use router::UserId;
use rust_decimal::Decimal;
use shard_agent::batch::{Answer, BatchLeg, GroupAnswer, OpenBatch, Verdict};
use shard_agent::idempotency::IdempotencyKey;
use shard_agent::two_pc::recover::{resolve_leg, Resolution, Tombstone};
use shard_agent::ShardResult;
use shard_agent::{Amount, Currency, FailureCode, Gid, TransferId, TransferState};
use uuid::Uuid;

/// The debit and the credit leg of one transfer.
fn legs(tid: TransferId, from: UserId, to: UserId, amount: &str, k: &str) -> [BatchLeg; 2] {
    [
        BatchLeg {
            tid,
            debit: true,
            user: from,
            user_name: "payer".into(),
            party: to,
            party_name: "payee".into(),
            amount: usd(amount),
            key: Some(key(from, k)),
            session: None,
            refund_of: None,
            reason: None,
            dispute: None,
            release: false,
        },
        BatchLeg {
            tid,
            debit: false,
            user: to,
            user_name: "payee".into(),
            party: from,
            party_name: "payer".into(),
            amount: usd(amount),
            key: None,
            session: None,
            refund_of: None,
            reason: None,
            dispute: None,
            release: false,
        },
    ]
}

/// Steps 2 and 3 on the deciding shard: apply its legs, then decide.
async fn decide(
    mut txn: OpenBatch<'_>,
    batch: Uuid,
    participants: &[String],
    legs: &[BatchLeg],
    outcome: &[Verdict],
) -> ShardResult<Vec<GroupAnswer>> {
    let records = txn
        .apply_undecided(batch, participants, legs, outcome)
        .await?;
    txn.decide(batch).await?;
    Ok(records)
}

/// How long a same-shard group here waits for a row lock.
const LOCK_WAIT_MS: u64 = 2_000;

/// The state of the record the group wrote for `tid`, if it wrote one.
fn state(answers: &[GroupAnswer], tid: TransferId) -> Option<(TransferState, Option<FailureCode>)> {
    answers
        .iter()
        .find(|a| a.tid == tid)
        .and_then(|a| a.record.as_ref())
        .filter(|r| r.transfer_id == tid)
        .map(|r| (r.state, r.failure_code))
}

/// The group's verdict on `tid`.
fn verdict(answers: &[GroupAnswer], tid: TransferId) -> Option<Verdict> {
    answers.iter().find(|a| a.tid == tid).map(|a| a.verdict)
}

#[tokio::test]
async fn a_same_shard_group_decides_each_transfer_on_its_own_in_one_statement() {
    let p = pair().await;
    let rich = user(&p.a, "rich", "100").await;
    let poor = user(&p.a, "poor", "1").await;
    let merchant = user(&p.a, "merchant", "0").await;
    let replayer = user(&p.a, "replayer", "50").await;
    let ghost = UserId::for_username("ghost");
    // The replayer's key is taken by an earlier transfer.
    let first = TransferId::generate();
    let done =
        p.a.transfer_local_batch(&legs(first, replayer, merchant, "5", "taken"), LOCK_WAIT_MS)
            .await
            .expect("first batch");
    assert_eq!(state(&done, first), Some((TransferState::Committed, None)));

    let (ok, refused, missing, replay) = (
        TransferId::generate(),
        TransferId::generate(),
        TransferId::generate(),
        TransferId::generate(),
    );
    let mut group = Vec::new();
    group.extend(legs(ok, rich, merchant, "30", "a"));
    group.extend(legs(refused, poor, merchant, "2", "b"));
    group.extend(legs(missing, rich, ghost, "1", "c"));
    group.extend(legs(replay, replayer, merchant, "5", "taken"));
    let records =
        p.a.transfer_local_batch(&group, LOCK_WAIT_MS)
            .await
            .expect("batch");

    assert_eq!(state(&records, ok), Some((TransferState::Committed, None)));
    assert_eq!(
        state(&records, refused),
        Some((TransferState::Aborted, Some(FailureCode::InsufficientFunds)))
    );
    assert_eq!(
        state(&records, missing),
        Some((TransferState::Aborted, Some(FailureCode::RecipientNotFound)))
    );
    assert_eq!(
        state(&records, replay),
        None,
        "a key that exists writes nothing"
    );
    assert_eq!(
        verdict(&records, replay),
        Some(Verdict::Answered(Answer::Replay(first))),
        "the group answers the replay itself"
    );
    let replayed = records.iter().find(|a| a.tid == replay).expect("answered");
    assert_eq!(
        replayed.record.as_ref().map(|r| r.transfer_id),
        Some(first),
        "with the record its key points at"
    );
    assert_eq!(balance(&p.a, rich).await, Decimal::from(70));
    assert_eq!(balance(&p.a, poor).await, Decimal::from(1));
    assert_eq!(balance(&p.a, merchant).await, Decimal::from(35));
    assert_eq!(balance(&p.a, replayer).await, Decimal::from(45));
    assert!(p.a.transfer(replay).await.expect("read").is_none());
    // The refusals are recorded with their keys, so a retry replays them.
    let again = TransferId::generate();
    let records =
        p.a.transfer_local_batch(&legs(again, poor, merchant, "2", "b"), LOCK_WAIT_MS)
            .await
            .expect("retry");
    assert_eq!(
        verdict(&records, again),
        Some(Verdict::Answered(Answer::Replay(refused))),
        "the key exists: the refusal is replayed by the group"
    );
}

/// A cross-shard group of three transfers from shard a to shard b: one that
/// passes, one the payer cannot afford, one to nobody. Shard a prepares, shard b
/// (the higher) decides.
struct Cross {
    ok: TransferId,
    refused: TransferId,
    missing: TransferId,
    batch: Uuid,
    gid: Gid,
    payer: UserId,
    poor: UserId,
    payer2: UserId,
    payee: UserId,
}

async fn cross_group(p: &common::Pair) -> (Cross, Vec<BatchLeg>, Vec<BatchLeg>) {
    let payer = user(&p.a, "payer", "10").await;
    let poor = user(&p.a, "poor", "1").await;
    let payer2 = user(&p.a, "payer2", "10").await;
    let payee = user(&p.b, "payee", "0").await;
    let ghost = UserId::for_username("ghost");
    let (ok, refused, missing) = (
        TransferId::generate(),
        TransferId::generate(),
        TransferId::generate(),
    );
    let (mut on_a, mut on_b) = (Vec::new(), Vec::new());
    for (tid, from, to, amount, k) in [
        (ok, payer, payee, "4", "ok"),
        (refused, poor, payee, "2", "refused"),
        (missing, payer2, ghost, "3", "missing"),
    ] {
        let [d, c] = legs(tid, from, to, amount, k);
        on_a.push(d);
        on_b.push(c);
    }
    let batch = Uuid::new_v4();
    let gid = Gid::new(TransferId(batch), p.b.id(), p.a.id());
    (
        Cross {
            ok,
            refused,
            missing,
            batch,
            gid,
            payer,
            poor,
            payer2,
            payee,
        },
        on_a,
        on_b,
    )
}

#[tokio::test]
async fn a_cross_shard_group_commits_by_its_decision_row_and_records_every_refusal() {
    let p = pair().await;
    let (g, on_a, on_b) = cross_group(&p).await;

    let (txn_a, found_a) =
        p.a.open_batch(&on_a, &[Verdict::Pass; 3], None)
            .await
            .expect("check a");
    assert_eq!(
        found_a,
        vec![
            Verdict::Pass,
            Verdict::Refused(FailureCode::InsufficientFunds),
            Verdict::Pass
        ]
    );
    let (txn_b, found_b) =
        p.b.open_batch(&on_b, &found_a, None)
            .await
            .expect("check b");
    let outcome: Vec<Verdict> = found_a
        .iter()
        .zip(&found_b)
        .map(|(a, b)| a.merge(*b))
        .collect();
    assert_eq!(
        outcome,
        vec![
            Verdict::Pass,
            Verdict::Refused(FailureCode::InsufficientFunds),
            Verdict::Refused(FailureCode::RecipientNotFound)
        ]
    );
    let participants = vec![g.gid.to_string()];
    let records_a = txn_a
        .prepare(g.batch, g.gid, &participants, &on_a, &outcome)
        .await
        .expect("prepare a");
    assert_eq!(records_a.len(), 3, "every payer's transfer is recorded");
    assert_eq!(p.a.prepared_stats().await.expect("stats").count, 1);
    // Prepared, not decided: recovery would find no decision yet.
    assert!(p.a.transfer(g.ok).await.expect("read").is_none());
    let records_b = decide(txn_b, g.batch, &participants, &on_b, &outcome)
        .await
        .expect("decide on b");
    assert!(records_b.is_empty(), "no payer lives on b");
    // The decision row answers recovery: the prepared transaction commits.
    assert_eq!(
        p.b.tombstone(TransferId(g.batch)).await.expect("tombstone"),
        Tombstone::Record(TransferState::Committed)
    );
    assert_eq!(
        resolve_leg(&p.a, &p.b, &g.gid).await.expect("resolve"),
        Resolution::Committed
    );
    let a = &p.a;
    let read = |tid| async move { a.transfer(tid).await.expect("read").expect("recorded") };
    let ok = read(g.ok).await;
    assert_eq!(
        (ok.state, ok.participants),
        (TransferState::Committed, participants)
    );
    assert_eq!(
        read(g.refused).await.failure_code,
        Some(FailureCode::InsufficientFunds)
    );
    assert_eq!(
        read(g.missing).await.failure_code,
        Some(FailureCode::RecipientNotFound)
    );
    assert_eq!(balance(&p.a, g.payer).await, Decimal::from(6));
    assert_eq!(balance(&p.a, g.poor).await, Decimal::from(1));
    assert_eq!(balance(&p.b, g.payee).await, Decimal::from(4));
}

#[tokio::test]
async fn a_group_prepared_without_a_decision_is_tombstoned_and_its_decision_refused() {
    let p = pair().await;
    let (g, on_a, on_b) = cross_group(&p).await;
    let (txn_a, found_a) =
        p.a.open_batch(&on_a, &[Verdict::Pass; 3], None)
            .await
            .expect("check a");
    let (mut txn_b, found_b) =
        p.b.open_batch(&on_b, &found_a, None)
            .await
            .expect("check b");
    let outcome: Vec<Verdict> = found_a
        .iter()
        .zip(&found_b)
        .map(|(a, b)| a.merge(*b))
        .collect();
    let participants = vec![g.gid.to_string()];
    txn_a
        .prepare(g.batch, g.gid, &participants, &on_a, &outcome)
        .await
        .expect("prepare a");
    // b has applied its legs and not decided yet (it holds the payee's row):
    // recovery, on another connection, finds no decision and tombstones the
    // group.
    txn_b
        .apply_undecided(g.batch, &participants, &on_b, &outcome)
        .await
        .expect("apply on b");
    assert_eq!(
        resolve_leg(&p.a, &p.b, &g.gid).await.expect("resolve"),
        Resolution::RolledBack
    );
    let refused = txn_b
        .decide(g.batch)
        .await
        .expect_err("the tombstone refuses the decision");
    assert!(refused.to_string().contains("WL010"), "{refused}");
    for tid in [g.ok, g.refused, g.missing] {
        assert!(p.a.transfer(tid).await.expect("read").is_none());
    }
    assert_eq!(balance(&p.a, g.payer).await, Decimal::from(10));
    assert_eq!(balance(&p.b, g.payee).await, Decimal::ZERO);
    assert_eq!(p.a.prepared_stats().await.expect("stats").count, 0);
    // The keys are free again: the same transfers can run.
    let (txn, found) =
        p.a.open_batch(&on_a, &[Verdict::Pass; 3], None)
            .await
            .expect("check again");
    assert_eq!(found[0], Verdict::Pass);
    txn.rollback().await;
}

#[tokio::test]
async fn a_key_that_exists_is_replayed_by_the_group_and_the_rest_of_the_group_runs() {
    let p = pair().await;
    let (g, on_a, on_b) = cross_group(&p).await;
    // Someone else holds the "ok" transfer's key already.
    let earlier = TransferId::generate();
    let mut taken = legs(earlier, g.payer, g.payee, "1", "ok").to_vec();
    taken[1].user = g.payer2; // a same-shard transfer on a, with the same key
    taken[1].party = g.payer;
    let done =
        p.a.transfer_local_batch(&taken, LOCK_WAIT_MS)
            .await
            .expect("earlier");
    assert_eq!(done.len(), 1);

    let (txn_a, found_a) =
        p.a.open_batch(&on_a, &[Verdict::Pass; 3], None)
            .await
            .expect("check a");
    assert_eq!(found_a[0], Verdict::Answered(Answer::Replay(earlier)));
    let (txn_b, found_b) =
        p.b.open_batch(&on_b, &found_a, None)
            .await
            .expect("check b");
    assert_eq!(
        found_b[0],
        Verdict::Answered(Answer::Replay(earlier)),
        "not checked again"
    );
    let outcome: Vec<Verdict> = found_a
        .iter()
        .zip(&found_b)
        .map(|(a, b)| a.merge(*b))
        .collect();
    let participants = vec![g.gid.to_string()];
    let records = txn_a
        .prepare(g.batch, g.gid, &participants, &on_a, &outcome)
        .await
        .expect("prepare a");
    decide(txn_b, g.batch, &participants, &on_b, &outcome)
        .await
        .expect("decide");
    p.a.commit_prepared(&g.gid).await.expect("commit prepared");
    assert_eq!(state(&records, g.ok), None);
    assert!(p.a.transfer(g.ok).await.expect("read").is_none());
    assert_eq!(
        balance(&p.b, g.payee).await,
        Decimal::ZERO,
        "no credit for it"
    );
    assert_eq!(
        balance(&p.a, g.payer).await,
        Decimal::from(9),
        "the earlier transfer only"
    );
}

/// A session for `user` on `agent`, live for an hour, or already expired;
/// returns its token hash.
async fn session(agent: &shard_agent::ShardAgent, user: UserId, live: bool) -> Vec<u8> {
    let hash = Uuid::new_v4().as_bytes().to_vec();
    let expires_at = chrono::Utc::now() + chrono::Duration::hours(if live { 1 } else { -1 });
    agent
        .create_session(user, &hash, expires_at)
        .await
        .expect("create session");
    hash
}

#[tokio::test]
async fn a_payer_whose_session_is_not_live_gets_nothing_written_and_the_group_runs_on() {
    let p = pair().await;
    let merchant = user(&p.a, "merchant", "0").await;
    let names = ["live", "trusted", "forged", "revoked", "expired", "euros"];
    let mut payers = Vec::new();
    for name in names {
        payers.push(user(&p.a, name, "10").await);
    }
    let [live, trusted, forged, revoked, expired, euros] = payers[..] else {
        unreachable!("six payers")
    };
    let live_hash = session(&p.a, live, true).await;
    let revoked_hash = session(&p.a, revoked, true).await;
    assert!(p
        .a
        .revoke_session(revoked, &revoked_hash)
        .await
        .expect("revoke"));
    let expired_hash = session(&p.a, expired, false).await;
    let euros_hash = session(&p.a, euros, true).await;
    // The forged token is live, but another user's session.
    let sessions = [
        (live, Some(live_hash.clone())),
        (trusted, None),
        (forged, Some(live_hash.clone())),
        (revoked, Some(revoked_hash)),
        (expired, Some(expired_hash)),
        (euros, Some(euros_hash.clone())),
    ];
    let mut group = Vec::new();
    let mut tids = Vec::new();
    for (payer, session) in sessions {
        let tid = TransferId::generate();
        let mut l = legs(tid, payer, merchant, "3", "k");
        if payer == euros {
            // USD accounts, a EUR transfer: the payer's currency is checked too.
            let eur = Amount::parse("3", Currency::Eur).expect("valid amount");
            l[0].amount = eur;
            l[1].amount = eur;
        }
        l[0].session = session;
        group.extend(l);
        tids.push(tid);
    }
    let records =
        p.a.transfer_local_batch(&group, LOCK_WAIT_MS)
            .await
            .expect("batch");

    assert_eq!(
        state(&records, tids[0]),
        Some((TransferState::Committed, None))
    );
    assert_eq!(
        state(&records, tids[1]),
        Some((TransferState::Committed, None))
    );
    for (i, name) in names.iter().enumerate().skip(2) {
        assert_eq!(state(&records, tids[i]), None, "{name}: nothing recorded");
        assert!(
            p.a.transfer(tids[i]).await.expect("read").is_none(),
            "{name}"
        );
        assert_eq!(balance(&p.a, payers[i]).await, Decimal::from(10), "{name}");
    }
    assert_eq!(balance(&p.a, merchant).await, Decimal::from(6));
    // No key was claimed for them: with a live session the same key runs.
    let again = TransferId::generate();
    let mut retry = legs(again, revoked, merchant, "3", "k").to_vec();
    retry[0].session = Some(session(&p.a, revoked, true).await);
    let records =
        p.a.transfer_local_batch(&retry, LOCK_WAIT_MS)
            .await
            .expect("retry");
    assert_eq!(
        state(&records, again),
        Some((TransferState::Committed, None))
    );
}

#[tokio::test]
async fn an_unverified_payer_in_a_cross_shard_group_credits_nobody() {
    let p = pair().await;
    let (g, mut on_a, on_b) = cross_group(&p).await;
    // The "ok" transfer's payer shows a token hash with no session behind it.
    on_a[0].session = Some(vec![7; 32]);
    let (txn_a, found_a) =
        p.a.open_batch(&on_a, &[Verdict::Pass; 3], None)
            .await
            .expect("check a");
    assert_eq!(found_a[0], Verdict::Answered(Answer::Unauthorized));
    let (txn_b, found_b) =
        p.b.open_batch(&on_b, &found_a, None)
            .await
            .expect("check b");
    let outcome: Vec<Verdict> = found_a
        .iter()
        .zip(&found_b)
        .map(|(a, b)| a.merge(*b))
        .collect();
    assert_eq!(outcome[0], Verdict::Answered(Answer::Unauthorized));
    let participants = vec![g.gid.to_string()];
    let records = txn_a
        .prepare(g.batch, g.gid, &participants, &on_a, &outcome)
        .await
        .expect("prepare a");
    decide(txn_b, g.batch, &participants, &on_b, &outcome)
        .await
        .expect("decide");
    p.a.commit_prepared(&g.gid).await.expect("commit prepared");
    assert_eq!(state(&records, g.ok), None, "not recorded");
    assert_eq!(
        records.iter().filter(|a| a.record.is_some()).count(),
        2,
        "the other two transfers are"
    );
    assert_eq!(balance(&p.a, g.payer).await, Decimal::from(10));
    assert_eq!(balance(&p.b, g.payee).await, Decimal::ZERO);
}

/// In the ordered check the payee's shard may go first and refuse; the payer's
/// shard then still reads the session first, and an unverified payer's refusal
/// is neither claimed nor recorded. A key that exists is not replayed to them.
#[tokio::test]
async fn an_unverified_payer_wins_over_a_refusal_found_first_and_over_a_key_that_exists() {
    let p = pair().await;
    let (g, mut on_a, on_b) = cross_group(&p).await;
    // "ok" has a key taken earlier; "missing" pays a nobody on b. Both payers
    // show token hashes with no session behind them.
    let earlier = TransferId::generate();
    let mut taken = legs(earlier, g.payer, g.payee, "1", "ok").to_vec();
    taken[1].user = g.payer2;
    taken[1].party = g.payer;
    assert_eq!(
        p.a.transfer_local_batch(&taken, LOCK_WAIT_MS)
            .await
            .expect("earlier")
            .len(),
        1
    );
    on_a[0].session = Some(vec![1; 32]);
    on_a[2].session = Some(vec![2; 32]);

    let (txn_b, found_b) =
        p.b.open_batch(&on_b, &[Verdict::Pass; 3], None)
            .await
            .expect("check b first");
    assert_eq!(found_b[2], Verdict::Refused(FailureCode::RecipientNotFound));
    let (txn_a, found_a) =
        p.a.open_batch(&on_a, &found_b, None)
            .await
            .expect("check a");
    assert_eq!(
        found_a,
        vec![
            Verdict::Answered(Answer::Unauthorized),
            Verdict::Refused(FailureCode::InsufficientFunds),
            Verdict::Answered(Answer::Unauthorized)
        ]
    );
    txn_a.rollback().await;
    txn_b.rollback().await;
    // Nothing was claimed for the unverified "missing": its key is still free.
    let (txn, found) =
        p.a.open_batch(&on_a[2..], &[Verdict::Pass], None)
            .await
            .expect("again");
    assert_eq!(found, vec![Verdict::Answered(Answer::Unauthorized)]);
    txn.rollback().await;
    let mut live = on_a[2].clone();
    live.session = None;
    let (txn, found) =
        p.a.open_batch(&[live], &[Verdict::Pass], None)
            .await
            .expect("verified");
    assert_eq!(found, vec![Verdict::Pass], "the key was free");
    txn.rollback().await;
}

/// A payee credited several times in one group gets one entry per credit, in
/// the group's order, each with the balance right after it.
#[tokio::test]
async fn several_credits_in_one_group_each_record_their_running_balance() {
    let p = pair().await;
    let merchant = user(&p.a, "merchant", "0").await;
    let mut group = Vec::new();
    for (i, amount) in ["1", "2", "3"].iter().enumerate() {
        let payer = user(&p.a, &format!("payer{i}"), "10").await;
        group.extend(legs(TransferId::generate(), payer, merchant, amount, "k"));
    }
    let records =
        p.a.transfer_local_batch(&group, LOCK_WAIT_MS)
            .await
            .expect("batch");
    assert!(records.iter().all(|a| a
        .record
        .as_ref()
        .is_some_and(|r| r.state == TransferState::Committed)));
    let view =
        p.a.account_view(merchant, 10, None)
            .await
            .expect("read")
            .expect("account");
    let after: Vec<Decimal> = view.entries.iter().rev().map(|e| e.balance_after).collect();
    assert_eq!(
        after,
        ["1", "3", "6"].map(|d| d.parse::<Decimal>().expect("decimal"))
    );
    assert_eq!(view.balance, Decimal::from(6));
}

/// The order of refusals is written twice, once per side of the wire: in SQL
/// for legs on one shard (`wallet_first_failure`) and in Rust for legs on two
/// (`FailureCode::precedence`). They must agree on every pair.
#[tokio::test]
async fn sql_and_rust_order_refusals_alike() {
    let shards = pair().await;
    let (client, conn) = tokio_postgres::connect(&shards.dsn_a, tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(conn);
    // Every business refusal a check can find.
    let codes = [
        FailureCode::RecipientNotFound,
        FailureCode::CurrencyMismatch,
        FailureCode::TransferNotFound,
        FailureCode::DisputeNotOpen,
        FailureCode::NotHeld,
        FailureCode::RefundExceedsOriginal,
        FailureCode::TransferBlocked,
        FailureCode::LimitExceeded,
        FailureCode::InsufficientFunds,
        FailureCode::Held,
    ];
    for a in codes {
        for b in codes {
            let row = client
                .query_one(
                    "SELECT wallet_first_failure($1, $2)",
                    &[&a.as_str(), &b.as_str()],
                )
                .await
                .expect("wallet_first_failure");
            let sql: String = row.get(0);
            let rust = match Verdict::Refused(a).merge(Verdict::Refused(b)) {
                Verdict::Refused(c) => c,
                other => panic!("two refusals merged into {other:?}"),
            };
            assert_eq!(sql, rust.as_str(), "{a:?} vs {b:?}");
        }
    }
}

/// Shard after shard: a transfer the payer's shard refused for its funds is
/// refused for its missing payee on the payee's shard, which outranks it, so
/// the order of the shards does not change the answer.
#[tokio::test]
async fn a_later_shard_outranks_an_earlier_lower_refusal() {
    let p = pair().await;
    let poor = user(&p.a, "rank_poor", "0").await;
    let nobody = UserId::for_username("rank_nobody");
    let tid = TransferId::generate();
    let [debit, credit] = legs(tid, poor, nobody, "5", "rank-1");
    let (txn_a, found_a) =
        p.a.open_batch(std::slice::from_ref(&debit), &[Verdict::Pass], Some(200))
            .await
            .expect("check the payer's shard");
    assert_eq!(
        found_a,
        vec![Verdict::Refused(FailureCode::InsufficientFunds)]
    );
    let (txn_b, found_b) =
        p.b.open_batch(std::slice::from_ref(&credit), &found_a, Some(200))
            .await
            .expect("check the payee's shard");
    assert_eq!(
        found_b,
        vec![Verdict::Refused(FailureCode::RecipientNotFound)]
    );
    assert_eq!(
        found_a[0].merge(found_b[0]),
        Verdict::Refused(FailureCode::RecipientNotFound)
    );
    drop((txn_a, txn_b));
}

/// A key whose transfer was aborted by a fault starts a fresh attempt inside
/// the group's check (`wallet_key_answer`), any other outcome is replayed: the
/// SQL's list of retryable codes is `FailureCode::is_retryable`'s.
#[tokio::test]
async fn a_fault_abort_is_retried_afresh_in_the_group_and_any_other_outcome_replayed() {
    let p = pair().await;
    let payee = user(&p.a, "fresh_payee", "0").await;
    let codes = FailureCode::ALL;
    for (i, code) in codes.into_iter().enumerate() {
        let payer = user(&p.a, &format!("fresh_payer{i}"), "10").await;
        let k = format!("fresh-{i}");
        // An earlier attempt under the same key, aborted with `code`.
        let earlier = claim_outside_a_group(&p.a, payer, payee, &k).await;
        p.a.decide(earlier, shard_agent::two_pc::decide::Decision::Abort(code))
            .await
            .expect("abort");
        let retry = TransferId::generate();
        let answers =
            p.a.transfer_local_batch(&legs(retry, payer, payee, "1", &k), LOCK_WAIT_MS)
                .await
                .expect("group");
        if code.is_retryable() {
            assert_eq!(
                state(&answers, retry),
                Some((TransferState::Committed, None)),
                "{code:?}: a fresh attempt"
            );
            assert_eq!(balance(&p.a, payer).await, Decimal::from(9), "{code:?}");
        } else {
            assert_eq!(
                verdict(&answers, retry),
                Some(Verdict::Answered(Answer::Replay(earlier))),
                "{code:?}: replayed"
            );
            assert_eq!(balance(&p.a, payer).await, Decimal::from(10), "{code:?}");
        }
    }
}

/// A key used for another request is answered `key_reused`, and one whose
/// transfer is still `preparing` in progress, by the group, writing nothing.
#[tokio::test]
async fn a_reused_key_and_a_key_in_progress_are_answered_by_the_group() {
    let p = pair().await;
    let payer = user(&p.a, "kr_payer", "10").await;
    let payee = user(&p.a, "kr_payee", "0").await;
    let first = TransferId::generate();
    p.a.transfer_local_batch(&legs(first, payer, payee, "1", "kr"), LOCK_WAIT_MS)
        .await
        .expect("first");
    let mut other_body = legs(TransferId::generate(), payer, payee, "2", "kr");
    other_body[0].key = Some(IdempotencyKey {
        fingerprint: vec![9; 32],
        ..key(payer, "kr")
    });
    let tid = other_body[0].tid;
    let answers =
        p.a.transfer_local_batch(&other_body, LOCK_WAIT_MS)
            .await
            .expect("reused");
    assert_eq!(
        verdict(&answers, tid),
        Some(Verdict::Answered(Answer::KeyReused))
    );
    // A transfer still being decided (a Redis-mode claim, say).
    let pending = claim_outside_a_group(&p.a, payer, payee, "ip").await;
    let tid = TransferId::generate();
    let answers =
        p.a.transfer_local_batch(&legs(tid, payer, payee, "1", "ip"), LOCK_WAIT_MS)
            .await
            .expect("in progress");
    assert_eq!(
        verdict(&answers, tid),
        Some(Verdict::Answered(Answer::InProgress(pending)))
    );
    assert_eq!(balance(&p.a, payer).await, Decimal::from(9));
}

/// A transfer under key `k` claimed outside a group (as a Redis-mode transfer
/// is), still `preparing`; returns its ID.
async fn claim_outside_a_group(
    agent: &shard_agent::ShardAgent,
    payer: UserId,
    payee: UserId,
    k: &str,
) -> TransferId {
    let new = shard_agent::idempotency::NewTransfer {
        kind: shard_agent::TransferKind::Transfer,
        mode: shard_agent::Mode::Redis,
        from_user: Some(payer),
        from_username: Some("payer".into()),
        to_user: Some(payee),
        to_username: Some("payee".into()),
        amount: usd("1").value(),
        currency: Currency::Usd,
        legs: None,
        payment_token: None,
    };
    match agent.claim(&key(payer, k), &new).await.expect("claim") {
        shard_agent::idempotency::Claim::Started(r) => r.transfer_id,
        other => panic!("a new key: {other:?}"),
    }
}
