//! Several broker groups under one NameServer, as a RocketMQ user runs them: a
//! topic's queues spread over the groups, unkeyed sends move to a live group when
//! one has no leader (and come back when it returns), keyed sends stay on their
//! queue's group and fail naming it, consumers keep consuming the live groups, and
//! a topic can be created on chosen groups and extended to another later, including
//! a group that joins the running cluster, whose queues a running consumer picks up.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use raftmq_broker::MessagingConfig;
use raftmq_client::{Client, ClientConfig, ConsumeResult, Error, SendReceipt, StartFrom};
use raftmq_proto::v1 as pb;

use super::fixtures::{Check, Cluster, DEADLINE, NameServer, ONE_AT_A_TIME, Settings, eventually, message, seq_of};

const A: &str = "broker-a";
const B: &str = "broker-b";
const C: &str = "broker-c";

/// A NameServer, groups broker-a and broker-b (three replicas each, topics created
/// explicitly) registered with it, and a client; returns once the NameServer
/// names both groups' leaders.
async fn two_groups() -> anyhow::Result<(NameServer, Cluster, Cluster, Client)> {
    let ns = NameServer::start().await?;
    let settings = Settings {
        messaging: MessagingConfig::default(),
        nameservers: vec![ns.addr.clone()],
        ..Settings::default()
    };
    let a = Cluster::start_group(A, 3, settings.clone()).await?;
    let b = Cluster::start_group(B, 3, settings).await?;
    let leaders = [
        a.replica(a.wait_for_leader(DEADLINE).await?).addr.to_string(),
        b.replica(b.wait_for_leader(DEADLINE).await?).addr.to_string(),
    ];
    let client = Client::new(ClientConfig::new(vec![ns.addr.clone()]))?;
    eventually(DEADLINE, "the NameServer to name both groups' leaders", async || {
        let groups = client.admin().list_cluster().await.unwrap_or_default();
        let named: Vec<&str> = groups.iter().map(|g| g.leader_endpoint.as_str()).collect();
        Ok(if leaders.iter().all(|l| named.contains(&l.as_str())) {
            Check::Done(())
        } else {
            Check::Pending(format!("groups {groups:?}"))
        })
    })
    .await?;
    Ok((ns, a, b, client))
}

/// Waits until the NameServer routes `topic` to exactly `groups`, each with
/// `queues` queues.
async fn wait_for_groups(client: &Client, topic: &str, groups: &[&str], queues: u32) -> anyhow::Result<()> {
    eventually(
        DEADLINE,
        &format!("topic {topic} routed to {groups:?} with {queues} queues each"),
        async || {
            Ok(match client.refresh_route(topic).await {
                Ok(r)
                    if !r.provisional
                        && r.groups.iter().map(|g| g.broker_group.as_str()).collect::<Vec<_>>() == groups
                        && r.groups.iter().all(|g| g.queues == queues) =>
                {
                    Check::Done(())
                }
                Ok(r) => Check::Pending(format!("{:?}", r.groups)),
                Err(e) => Check::Pending(e.to_string()),
            })
        },
    )
    .await
}

fn per_group(receipts: &[SendReceipt]) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for r in receipts {
        *out.entry(r.broker_group.clone()).or_insert(0) += 1;
    }
    out
}

/// A sharding key whose queue is on broker group `group`, found by sending with
/// keys until one lands there (the key-to-queue hash is the producer's business).
async fn key_on(client: &Client, topic: &str, group: &str) -> anyhow::Result<String> {
    let producer = client.producer();
    for i in 0..64 {
        let key = format!("key-{i}");
        let r = producer
            .send_with_key(topic, &key, message(1_000_000 + i, Some(&key)))
            .await?;
        if r.broker_group == group {
            return Ok(key);
        }
    }
    bail!("no key of 64 maps to a queue of {group}")
}

/// A push-consumer member of `group` on `topic`, from the first message, and
/// the sequence numbers it has consumed so far.
#[allow(clippy::type_complexity)]
fn consume_seqs(
    client: &Client,
    group: &str,
    topic: &str,
) -> anyhow::Result<(raftmq_client::PushConsumer, Arc<Mutex<BTreeSet<u64>>>)> {
    let consumed: Arc<Mutex<BTreeSet<u64>>> = Arc::default();
    let log = consumed.clone();
    let consumer =
        client
            .push_consumer(group, topic)
            .start_from(StartFrom::First)
            .start(move |m: pb::PulledMessage| {
                let log = log.clone();
                async move {
                    if let Ok(seq) = seq_of(&m) {
                        log.lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner)
                            .insert(seq);
                    }
                    ConsumeResult::Success
                }
            })?;
    Ok((consumer, consumed))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_spread_over_two_groups_takes_unkeyed_sends_on_both() -> anyhow::Result<()> {
    let _turn = ONE_AT_A_TIME.lock().await;
    let (ns, a, b, client) = two_groups().await?;
    client
        .admin()
        .create_topic("spread", 4, pb::Permission::ReadWrite)
        .await?;
    wait_for_groups(&client, "spread", &[A, B], 4).await?;

    let producer = client.producer();
    let mut receipts = Vec::new();
    for seq in 0..40 {
        receipts.push(producer.send("spread", message(seq, None)).await?);
    }
    let spread = per_group(&receipts);
    ensure!(
        spread.get(A).copied().unwrap_or(0) >= 10 && spread.get(B).copied().unwrap_or(0) >= 10,
        "40 unkeyed sends should spread over both groups' 8 queues, got {spread:?}"
    );
    let queues: BTreeSet<(String, u32)> = receipts.iter().map(|r| (r.broker_group.clone(), r.queue_id)).collect();
    ensure!(
        queues.len() == 8,
        "every queue of both groups gets messages: {queues:?}"
    );

    // Everything reads back, each message from the group its receipt names.
    let route = client.refresh_route("spread").await?;
    let (pulled, _) = super::fixtures::pull_everything(&client.pull_consumer(), &route, "spread").await?;
    let mut read: BTreeMap<u64, String> = BTreeMap::new();
    for (group, _, m) in &pulled {
        read.insert(seq_of(m)?, group.clone());
    }
    for (seq, r) in receipts.iter().enumerate() {
        ensure!(
            read.get(&(seq as u64)) == Some(&r.broker_group),
            "message {seq} acknowledged by {} reads back from {:?}",
            r.broker_group,
            read.get(&(seq as u64))
        );
    }
    a.shutdown().await?;
    b.shutdown().await?;
    ns.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_one_group_down_unkeyed_sends_move_keyed_fail_naming_it_and_consumers_go_on() -> anyhow::Result<()> {
    let _turn = ONE_AT_A_TIME.lock().await;
    let (ns, a, mut b, client) = two_groups().await?;
    let topic = "two-groups";
    client.admin().create_topic(topic, 4, pb::Permission::ReadWrite).await?;
    wait_for_groups(&client, topic, &[A, B], 4).await?;
    let key_a = key_on(&client, topic, A).await?;
    let key_b = key_on(&client, topic, B).await?;

    // A consumer group member, consuming from the start.
    let (consumer, consumed) = consume_seqs(&client, "two-groups-consumers", topic)?;

    // Producers send unkeyed messages one at a time, before, during and after
    // the fault; no send may fail.
    let stop = Arc::new(AtomicBool::new(false));
    let mut producers = Vec::new();
    for p in 0..4u64 {
        let (producer, stop) = (client.producer(), stop.clone());
        producers.push(tokio::spawn(async move {
            let mut done: Vec<(u64, SendReceipt, Instant, Duration)> = Vec::new();
            let mut seq = p * 100_000;
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                let r = producer
                    .send(topic, message(seq, None))
                    .await
                    .with_context(|| format!("unkeyed send {seq}"))?;
                done.push((seq, r, t, t.elapsed()));
                seq += 1;
            }
            anyhow::Ok(done)
        }));
    }
    let before = consumed_after_sends(&consumed, Duration::from_millis(500)).await;
    ensure!(before > 0, "the consumer consumes before the fault");

    // Kill broker-b's leader and one follower: no majority, no leader; the
    // survivor keeps the group in the NameServer's routes, leaderless.
    let leader = b.wait_for_leader(DEADLINE).await?;
    let follower = (1..=3).find(|id| *id != leader).context("a follower")?;
    let killed_at = Instant::now();
    b.replica_mut(leader).kill().await;
    b.replica_mut(follower).kill().await;

    // Keyed sends whose queue is on broker-b fail, naming it; broker-a's go on.
    let e = client
        .producer()
        .send_with_key(topic, &key_b, message(2_000_000, Some(&key_b)))
        .await
        .err()
        .context("a keyed send to the leaderless group's queue succeeded")?;
    ensure!(
        matches!(&e, Error::GroupUnavailable { group, key: Some(k), .. } if group == B && *k == key_b),
        "keyed send to the down group: want GroupUnavailable naming {B}, got {e}"
    );
    let text = e.to_string();
    ensure!(
        text.contains(B) && text.contains("sharding key") && text.contains("not moved"),
        "the error should say the key's queue is on {B} and the send was not moved: {text}"
    );
    let ok = client
        .producer()
        .send_with_key(topic, &key_a, message(2_000_001, Some(&key_a)))
        .await?;
    ensure!(ok.broker_group == A, "key {key_a} stays on {A}");

    // A POP (SimpleConsumer) member's receives, which take the groups in turn,
    // skip the leaderless group instead of failing every other call.
    let pop = client.simple_consumer("two-groups-pop", topic);
    for i in 0..6 {
        pop.receive(16, Duration::from_millis(50))
            .await
            .with_context(|| format!("POP receive {i} while {B} has no leader"))?;
    }

    // Unkeyed traffic carried on meanwhile (the keyed send above took the whole
    // send deadline), on broker-a only once the fault was seen.
    stop.store(true, Ordering::Relaxed);
    let mut sent = Vec::new();
    for p in producers {
        sent.extend(p.await??);
    }
    let after: Vec<&(u64, SendReceipt, Instant, Duration)> =
        sent.iter().filter(|(_, _, t, _)| *t > killed_at).collect();
    ensure!(after.len() > 20, "only {} unkeyed sends after the fault", after.len());
    let slow: Vec<Duration> = after
        .iter()
        .map(|s| s.3)
        .filter(|d| *d > Duration::from_millis(500))
        .collect();
    println!(
        "{} unkeyed sends after the fault, none failed; {} took over 500 ms: {slow:?}; per group {:?}",
        after.len(),
        slow.len(),
        per_group(&after.iter().map(|s| s.1.clone()).collect::<Vec<_>>())
    );
    // Isolation: after the first sends meet the dead group, the rest skip it
    // instead of each waiting out the fault.
    ensure!(
        slow.len() <= 8,
        "{} of {} sends after the fault took over 500 ms: the down group is not skipped",
        slow.len(),
        after.len()
    );
    let on_b_late = after
        .iter()
        .filter(|s| s.1.broker_group == B && s.2 > killed_at + Duration::from_secs(2))
        .count();
    ensure!(
        on_b_late == 0,
        "{on_b_late} sends acknowledged by {B} while it had no majority"
    );

    // The consumer keeps consuming from the live group: every message broker-a
    // acknowledged after the fault is delivered.
    let want: BTreeSet<u64> = after.iter().filter(|s| s.1.broker_group == A).map(|s| s.0).collect();
    eventually(
        Duration::from_secs(30),
        "the consumer to get broker-a's messages sent after the fault",
        async || {
            let got = consumed.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let missing = want.difference(&got).count();
            Ok(if missing == 0 {
                Check::Done(())
            } else {
                Check::Pending(format!("{missing} of {} missing", want.len()))
            })
        },
    )
    .await?;

    // broker-b comes back: it gets unkeyed traffic again, and the consumer its messages.
    b.replica_mut(leader).restart().await?;
    b.replica_mut(follower).restart().await?;
    b.wait_for_leader(DEADLINE).await?;
    let producer = client.producer();
    let mut seq = 3_000_000;
    let back = eventually(
        Duration::from_secs(20),
        "an unkeyed send to reach broker-b again",
        async || {
            let r = producer.send(topic, message(seq, None)).await?;
            seq += 1;
            Ok(if r.broker_group == B {
                Check::Done(seq - 1)
            } else {
                Check::Pending(format!("sent to {}", r.broker_group))
            })
        },
    )
    .await?;
    eventually(
        Duration::from_secs(30),
        "the consumer to get broker-b's message after its return",
        async || {
            let got = consumed.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            Ok(if got.contains(&back) {
                Check::Done(())
            } else {
                Check::Pending(format!("{} consumed", got.len()))
            })
        },
    )
    .await?;
    let ok = client
        .producer()
        .send_with_key(topic, &key_b, message(3_500_000, Some(&key_b)))
        .await?;
    ensure!(ok.broker_group == B, "key {key_b} is served by {B} again");

    consumer.shutdown().await?;
    a.shutdown().await?;
    b.shutdown().await?;
    ns.stop().await
}

/// Waits `for_at_least`, then returns how many messages were consumed.
async fn consumed_after_sends(consumed: &Mutex<BTreeSet<u64>>, for_at_least: Duration) -> usize {
    let until = Instant::now() + for_at_least;
    eventually(DEADLINE, "the consumer to consume something", async || {
        let n = consumed.lock().unwrap_or_else(std::sync::PoisonError::into_inner).len();
        Ok(if n > 0 && Instant::now() >= until {
            Check::Done(n)
        } else {
            Check::Pending(format!("{n} consumed"))
        })
    })
    .await
    .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_on_a_chosen_group_is_routed_there_only_and_extends_to_another() -> anyhow::Result<()> {
    let _turn = ONE_AT_A_TIME.lock().await;
    let (ns, a, b, client) = two_groups().await?;
    let admin = client.admin();
    let topic = "chosen";
    let unspecified = pb::MessageType::Unspecified;
    admin
        .create_topic_on(topic, 2, pb::Permission::ReadWrite, unspecified, &[A.to_owned()])
        .await?;
    wait_for_groups(&client, topic, &[A], 2).await?;
    let producer = client.producer();
    for seq in 0..10 {
        let r = producer.send(topic, message(seq, None)).await?;
        ensure!(
            r.broker_group == A,
            "send {seq} went to {} though the topic is only on {A}",
            r.broker_group
        );
    }
    let on_b = admin.list_topics().await?;
    ensure!(
        !on_b.iter().any(|(g, t)| g == B && t.name == topic),
        "{B} has the topic though it was created on {A} only"
    );

    // An unknown group is refused, naming it, and nothing changes.
    let e = admin
        .create_topic_on(
            topic,
            2,
            pb::Permission::ReadWrite,
            unspecified,
            &["broker-z".to_owned()],
        )
        .await
        .err()
        .context("creating a topic on an unknown group succeeded")?;
    ensure!(
        e.to_string().contains("broker-z"),
        "the error should name broker-z: {e}"
    );

    // Extended onto broker-b: after a route refresh, sends reach it.
    admin
        .create_topic_on(topic, 2, pb::Permission::ReadWrite, unspecified, &[B.to_owned()])
        .await?;
    wait_for_groups(&client, topic, &[A, B], 2).await?;
    let mut receipts = Vec::new();
    for seq in 10..30 {
        receipts.push(producer.send(topic, message(seq, None)).await?);
    }
    let spread = per_group(&receipts);
    ensure!(
        spread.get(B).copied().unwrap_or(0) >= 5 && spread.get(A).copied().unwrap_or(0) >= 5,
        "after extending the topic to {B}, sends should spread over both: {spread:?}"
    );

    // A consumer group consuming the topic while a third group joins the
    // running cluster and the topic is extended onto it: the member picks up
    // the new group's queues with no restart.
    let (consumer, consumed) = consume_seqs(&client, "chosen-consumers", topic)?;
    let c = Cluster::start_group(
        C,
        3,
        Settings {
            nameservers: vec![ns.addr.clone()],
            ..Settings::default()
        },
    )
    .await?;
    c.wait_for_leader(DEADLINE).await?;
    admin
        .create_topic_on(topic, 2, pb::Permission::ReadWrite, unspecified, &[C.to_owned()])
        .await?;
    wait_for_groups(&client, topic, &[A, B, C], 2).await?;
    let mut receipts = Vec::new();
    for seq in 30..60 {
        receipts.push(producer.send(topic, message(seq, None)).await?);
    }
    let spread = per_group(&receipts);
    ensure!(
        [A, B, C].iter().all(|g| spread.get(*g).copied().unwrap_or(0) >= 3),
        "after a third group joined, sends should spread over all three: {spread:?}"
    );
    let on_c: BTreeSet<u64> = receipts
        .iter()
        .zip(30..60)
        .filter(|(r, _)| r.broker_group == C)
        .map(|(_, seq)| seq)
        .collect();
    eventually(DEADLINE, "the running consumer to consume every message", async || {
        let got = consumed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        let missing: Vec<u64> = (0..60).filter(|s| !got.contains(s)).collect();
        Ok(if missing.is_empty() {
            Check::Done(())
        } else {
            Check::Pending(format!("missing {missing:?} (sent to {C}: {on_c:?})"))
        })
    })
    .await?;
    consumer.shutdown().await?;
    a.shutdown().await?;
    b.shutdown().await?;
    c.shutdown().await?;
    ns.stop().await
}
