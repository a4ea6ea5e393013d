//! Transactional messages end to end, through the Rust client's
//! TransactionProducer against a three-replica group: a half message is invisible
//! until committed and never visible once rolled back; an unknown outcome is
//! settled by a check-back, answered by any live producer of the group; with none
//! left the broker rolls back after its maximum checks and counts it; and a leader
//! kill between the half message and its end changes none of that, while a check
//! in flight at the kill is issued again by the new leader.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure};
use raftmq_broker::MessagingConfig;
use raftmq_client::{Client, SendReceipt, TransactionCheck, TransactionResolution};
use raftmq_proto::v1 as pb;

use super::fixtures::Cluster;
use super::fixtures::{
    Check, DEADLINE, NameServer, ONE_AT_A_TIME, eventually, message, pull_everything, seq_of, start_with_client_using,
    wait_for_known_route,
};

/// Brokers that check early and often, so a test sees several checks in seconds.
fn quick_checks(max_checks: u32, interval: Duration) -> MessagingConfig {
    MessagingConfig {
        auto_create_topics: true,
        transaction_first_check: Duration::from_millis(300),
        transaction_check_interval: interval,
        transaction_max_checks: max_checks,
        ..MessagingConfig::default()
    }
}

async fn setup(config: MessagingConfig, topic: &str) -> anyhow::Result<(NameServer, Cluster, Client)> {
    let (ns, cluster, client) = start_with_client_using(config).await?;
    client.admin().create_topic(topic, 2, pb::Permission::ReadWrite).await?;
    wait_for_known_route(&client, topic).await?;
    Ok((ns, cluster, client))
}

/// Every message of the topic, as (sequence number, message id).
async fn visible(client: &Client, topic: &str) -> anyhow::Result<Vec<(u64, String)>> {
    let route = client.route(topic).await?;
    let (all, _) = pull_everything(&client.pull_consumer(), &route, topic).await?;
    all.iter()
        .map(|(_, _, m)| Ok((seq_of(m)?, m.message_id.clone())))
        .collect()
}

/// Totals and pending count summed over the broker groups.
async fn txn_totals(client: &Client) -> anyhow::Result<(u64, u64, u64, u64)> {
    let mut t = (0, 0, 0, 0);
    for r in client.admin().list_transactions("", 100).await? {
        t.0 += r.pending;
        t.1 += r.committed;
        t.2 += r.rolled_back;
        t.3 += r.rolled_back_unresolved;
    }
    Ok(t)
}

async fn wait_visible(client: &Client, topic: &str, seq: u64, what: &str) -> anyhow::Result<Vec<(u64, String)>> {
    eventually(DEADLINE, what, async || {
        let v = visible(client, topic).await?;
        Ok(if v.iter().any(|(s, _)| *s == seq) {
            Check::Done(v)
        } else {
            Check::Pending(format!("visible: {v:?}"))
        })
    })
    .await
}

fn never_checked(_: &TransactionCheck) -> TransactionResolution {
    TransactionResolution::Unknown
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_committed_message_is_visible_once_and_a_rolled_back_one_never() -> anyhow::Result<()> {
    let _turn = ONE_AT_A_TIME.lock().await;
    let topic = "txn-basic";
    let (ns, cluster, client) = setup(quick_checks(15, Duration::from_secs(30)), topic).await?;
    let producer = client.transaction_producer("txn-basic-producers", never_checked)?;

    let committed = producer.begin(topic, message(1, Some("order-1"))).await?;
    ensure!(committed.transaction_id == committed.message_id, "{committed:?}");
    ensure!(
        committed.queue_offset == 0,
        "a half message has no offset yet: {committed:?}"
    );
    ensure!(
        visible(&client, topic).await?.is_empty(),
        "a half message must be invisible before its commit"
    );
    let listed = client.admin().list_transactions("txn-basic-producers", 10).await?;
    let pending: Vec<_> = listed.iter().flat_map(|r| r.transactions.iter()).collect();
    ensure!(
        pending.len() == 1 && pending[0].transaction_id == committed.transaction_id && pending[0].keys == ["order-1"],
        "admin list: {listed:?}"
    );

    let end = producer.commit(&committed).await?;
    ensure!(!end.already_ended, "{end:?}");
    let again = producer.commit(&committed).await?;
    ensure!(again.already_ended, "a repeated commit is a harmless retry: {again:?}");

    let rolled = producer
        .send(topic, message(2, None), async |_: &SendReceipt| {
            TransactionResolution::Rollback
        })
        .await?;
    ensure!(rolled.resolution == TransactionResolution::Rollback);
    let err = producer
        .commit(&rolled.receipt)
        .await
        .expect_err("commit after rollback");
    ensure!(
        err.code() == Some(tonic::Code::FailedPrecondition) && err.to_string().contains("already rolled back"),
        "{err}"
    );
    // A later commit proves the rollback is not merely slow to show.
    producer
        .send(topic, message(3, None), async |_: &SendReceipt| {
            TransactionResolution::Commit
        })
        .await?;
    let v = wait_visible(&client, topic, 3, "the third transaction to be visible").await?;
    let seqs: Vec<u64> = v.iter().map(|(s, _)| *s).collect();
    ensure!(seqs.iter().filter(|s| **s == 1).count() == 1, "committed once: {v:?}");
    ensure!(!seqs.contains(&2), "rolled back but visible: {v:?}");
    ensure!(
        v.iter().any(|(s, id)| *s == 1 && *id == committed.message_id),
        "the committed message keeps the id its send returned: {v:?}"
    );
    // Findable by its key and id once committed, like any message.
    let by_key = client.admin().query_messages_by_key(topic, "order-1", 10).await?;
    ensure!(by_key.len() == 1, "by key: {by_key:?}");
    let by_id = client.admin().query_message_by_id(&committed.message_id).await?;
    ensure!(by_id.is_some_and(|m| m.queue_offset == end.queue_offset), "by id");
    let totals = txn_totals(&client).await?;
    ensure!(
        totals == (0, 2, 1, 0),
        "pending/committed/rolled back/unresolved: {totals:?}"
    );

    producer.shutdown();
    cluster.shutdown().await?;
    ns.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_unknown_outcome_is_settled_by_a_check_back_to_the_producer() -> anyhow::Result<()> {
    let _turn = ONE_AT_A_TIME.lock().await;
    let topic = "txn-check";
    let (ns, cluster, client) = setup(quick_checks(15, Duration::from_millis(300)), topic).await?;
    let checks = Arc::new(AtomicUsize::new(0));
    let seen = checks.clone();
    let producer = client.transaction_producer("txn-check-producers", move |c: &TransactionCheck| {
        // Unknown at first, then commit: the broker must keep asking.
        if seen.fetch_add(1, Ordering::SeqCst) == 0 {
            TransactionResolution::Unknown
        } else if c.message.message.as_ref().is_some_and(|m| m.body == b"body-7") {
            TransactionResolution::Commit
        } else {
            TransactionResolution::Rollback
        }
    })?;
    let started = Instant::now();
    let sent = producer
        .send(topic, message(7, None), async |_: &SendReceipt| {
            TransactionResolution::Unknown
        })
        .await?;
    ensure!(sent.resolution == TransactionResolution::Unknown);
    let v = wait_visible(&client, topic, 7, "the check-back to commit the transaction").await?;
    ensure!(v.len() == 1, "{v:?}");
    ensure!(checks.load(Ordering::SeqCst) >= 2, "answered after a second check");
    // Never before the first check time.
    ensure!(
        started.elapsed() >= Duration::from_millis(300),
        "committed before any check was due"
    );
    let totals = txn_totals(&client).await?;
    ensure!(totals == (0, 1, 0, 0), "{totals:?}");
    producer.shutdown();
    cluster.shutdown().await?;
    ns.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_crashed_producers_transaction_is_answered_by_another_producer_of_the_group() -> anyhow::Result<()> {
    let _turn = ONE_AT_A_TIME.lock().await;
    let topic = "txn-takeover";
    let (ns, cluster, client) = setup(quick_checks(15, Duration::from_millis(300)), topic).await?;
    let crashed_checks = Arc::new(AtomicUsize::new(0));
    let c = crashed_checks.clone();
    let crashed = client.transaction_producer("txn-takeover-producers", move |_: &TransactionCheck| {
        c.fetch_add(1, Ordering::SeqCst);
        TransactionResolution::Rollback
    })?;
    let half = crashed.begin(topic, message(11, None)).await?;
    // The producer dies before ending its transaction: its streams close.
    crashed.shutdown();
    let other_checks = Arc::new(AtomicUsize::new(0));
    let o = other_checks.clone();
    let other_client = Client::new(raftmq_client::ClientConfig::new(vec![ns.addr.clone()]))?;
    let other = other_client.transaction_producer("txn-takeover-producers", move |c: &TransactionCheck| {
        o.fetch_add(1, Ordering::SeqCst);
        if c.message
            .message
            .as_ref()
            .is_some_and(|m| m.properties.get("seq").is_some_and(|s| s == "11"))
        {
            TransactionResolution::Commit
        } else {
            TransactionResolution::Unknown
        }
    })?;
    other.add_topic(topic).await;
    let v = wait_visible(&client, topic, 11, "the other producer's answer to commit it").await?;
    ensure!(v == vec![(11, half.message_id.clone())], "{v:?}");
    ensure!(other_checks.load(Ordering::SeqCst) >= 1);
    ensure!(
        crashed_checks.load(Ordering::SeqCst) == 0,
        "a closed producer must not be asked"
    );
    other.shutdown();
    cluster.shutdown().await?;
    ns.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_no_producer_left_the_broker_rolls_back_after_the_maximum_checks_and_counts_it() -> anyhow::Result<()> {
    let _turn = ONE_AT_A_TIME.lock().await;
    let topic = "txn-orphan";
    let (ns, cluster, client) = setup(quick_checks(3, Duration::from_millis(200)), topic).await?;
    let producer = client.transaction_producer("txn-orphan-producers", never_checked)?;
    let half = producer.begin(topic, message(21, None)).await?;
    producer.shutdown();
    let totals = eventually(DEADLINE, "the broker to give up on the transaction", async || {
        let t = txn_totals(&client).await?;
        Ok(if t.0 == 0 {
            Check::Done(t)
        } else {
            Check::Pending(format!("{t:?}"))
        })
    })
    .await?;
    ensure!(
        totals == (0, 0, 1, 1),
        "pending/committed/rolled back/unresolved: {totals:?}"
    );
    ensure!(
        visible(&client, topic).await?.is_empty(),
        "an unresolved transaction must never show"
    );
    let late = client.transaction_producer("txn-orphan-producers", never_checked)?;
    let err = late.commit(&half).await.expect_err("commit after the broker gave up");
    ensure!(
        err.code() == Some(tonic::Code::FailedPrecondition) && err.to_string().contains("maximum checks"),
        "{err}"
    );
    late.shutdown();
    cluster.shutdown().await?;
    ns.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_leader_kill_between_half_and_end_exposes_no_rollback_loses_no_commit_and_reissues_checks()
-> anyhow::Result<()> {
    let _turn = ONE_AT_A_TIME.lock().await;
    let topic = "txn-kill";
    // Checks after 300 ms, then not again for a minute: only a new leader's
    // re-issue can settle the checked transaction within the test's deadline.
    let (ns, mut cluster, client) = setup(quick_checks(15, Duration::from_secs(60)), topic).await?;
    let answer_commit = Arc::new(AtomicU32::new(0));
    let flag = answer_commit.clone();
    let checks = Arc::new(AtomicUsize::new(0));
    let counted = checks.clone();
    let producer = client.transaction_producer("txn-kill-producers", move |c: &TransactionCheck| {
        counted.fetch_add(1, Ordering::SeqCst);
        let seq = c
            .message
            .message
            .as_ref()
            .and_then(|m| m.properties.get("seq"))
            .cloned();
        if seq.as_deref() == Some("33") && flag.load(Ordering::SeqCst) == 1 {
            TransactionResolution::Commit
        } else {
            TransactionResolution::Unknown
        }
    })?;
    let to_commit = producer.begin(topic, message(31, None)).await?;
    let to_roll_back = producer.begin(topic, message(32, None)).await?;
    let checked = producer.begin(topic, message(33, None)).await?;
    // Wait until the first check of each was made (and answered "unknown").
    eventually(DEADLINE, "the first checks", async || {
        let listed = client.admin().list_transactions("txn-kill-producers", 10).await?;
        let all: Vec<_> = listed.iter().flat_map(|r| r.transactions.iter()).collect();
        Ok(if all.len() == 3 && all.iter().all(|t| t.check_times >= 1) {
            Check::Done(())
        } else {
            Check::Pending(format!("{all:?}"))
        })
    })
    .await?;
    answer_commit.store(1, Ordering::SeqCst);
    let asked_before = checks.load(Ordering::SeqCst);

    let old = cluster.wait_for_leader(DEADLINE).await?;
    cluster.replica_mut(old).kill().await;
    let new = cluster.wait_for_leader_other_than(Some(old), DEADLINE).await?;
    tracing::info!(old, new, "leader killed between half messages and their ends");

    producer.commit(&to_commit).await?;
    producer.rollback(&to_roll_back).await?;
    let v = wait_visible(&client, topic, 33, "the new leader to re-issue the in-flight check").await?;
    ensure!(
        checks.load(Ordering::SeqCst) > asked_before,
        "the new leader asked again"
    );
    let mut seqs: Vec<u64> = v.iter().map(|(s, _)| *s).collect();
    seqs.sort();
    ensure!(seqs == [31, 33], "committed once each, the rolled-back never: {v:?}");
    ensure!(v.iter().any(|(s, id)| *s == 33 && *id == checked.message_id), "{v:?}");

    // The killed replica comes back with the same transaction state.
    cluster.replica_mut(old).restart().await?;
    let expected = cluster
        .replica(new)
        .store()
        .with_txn(|t| (t.pending_count(), t.totals()));
    ensure!(
        expected.0 == 0 && expected.1.committed == 2 && expected.1.rolled_back == 1,
        "{expected:?}"
    );
    eventually(DEADLINE, "the restarted replica to agree", async || {
        let got = cluster
            .replica(old)
            .store()
            .with_txn(|t| (t.pending_count(), t.totals()));
        Ok(if got == expected {
            Check::Done(())
        } else {
            Check::Pending(format!("{got:?}"))
        })
    })
    .await?;
    if visible(&client, topic).await?.len() != 2 {
        bail!("a message appeared twice after the restart");
    }
    producer.shutdown();
    cluster.shutdown().await?;
    ns.stop().await
}
