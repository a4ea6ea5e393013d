//! Consumer groups end to end: PushConsumer members against a NameServer and a
//! three-node broker group. What a RocketMQ user relies on: every message of a
//! clustering group reaches exactly one member while membership is stable, a
//! rebalance loses nothing, broadcasting gives everyone everything, orderly
//! consumption keeps per-key order, a leader failover neither rewinds nor skips a
//! group, tag filters hold, and a message can be found by id and by key.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use raftmq_client::{Client, ConsumeMode, ConsumeResult, MessageModel, PushConsumer, StartFrom};
use raftmq_proto::v1 as pb;

use super::fixtures::{
    Check, DEADLINE, GROUP, ONE_AT_A_TIME, eventually, message, seq_of, start_with_client, wait_for_known_route,
};

/// Longest a test waits for consumers to catch up.
const CONSUME_DEADLINE: Duration = Duration::from_secs(60);

/// One delivery as a callback saw it.
#[derive(Debug, Clone)]
struct Delivery {
    member: usize,
    seq: u64,
    queue_id: u32,
    offset: u64,
    key: Option<String>,
    at: Instant,
}

type Log = Arc<Mutex<Vec<Delivery>>>;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Starts member `member` of `group`, logging every delivery into `log`.
fn member(
    client: &Client,
    group: &str,
    topic: &str,
    member: usize,
    log: &Log,
    configure: impl FnOnce(raftmq_client::PushConsumerBuilder) -> raftmq_client::PushConsumerBuilder,
) -> anyhow::Result<PushConsumer> {
    let log = log.clone();
    let builder = client
        .push_consumer(group, topic)
        .client_id(&format!("member-{member}"))
        .start_from(StartFrom::First);
    Ok(configure(builder).start(move |m: pb::PulledMessage| {
        let log = log.clone();
        async move {
            let d = Delivery {
                member,
                seq: seq_of(&m).unwrap_or(u64::MAX),
                queue_id: m.queue_id,
                offset: m.queue_offset,
                key: m.message.as_ref().and_then(|m| m.properties.get("key").cloned()),
                at: Instant::now(),
            };
            lock(&log).push(d);
            ConsumeResult::Success
        }
    })?)
}

/// Waits until `log` holds every seq in `expected` (at least once).
async fn wait_for_all(log: &Log, expected: &BTreeSet<u64>, what: &str) -> anyhow::Result<()> {
    eventually(
        CONSUME_DEADLINE,
        &format!("{what}: every message delivered"),
        async || {
            let seen: BTreeSet<u64> = lock(log).iter().map(|d| d.seq).collect();
            let missing = expected.difference(&seen).count();
            Ok(if missing == 0 {
                Check::Done(())
            } else {
                Check::Pending(format!(
                    "{missing} of {} message(s) never delivered (first missing: {:?})",
                    expected.len(),
                    expected.difference(&seen).next()
                ))
            })
        },
    )
    .await
}

/// Waits until the members' assignments are disjoint and cover `queues` queues.
async fn wait_for_settled(members: &[&PushConsumer], queues: u32) -> anyhow::Result<Vec<Vec<u32>>> {
    eventually(
        DEADLINE * 2,
        &format!("an assignment settled over {queues} queues"),
        async || {
            let held: Vec<Vec<u32>> = members
                .iter()
                .map(|m| m.assigned_queues().into_iter().map(|(_, q)| q).collect())
                .collect();
            let all: Vec<u32> = held.iter().flatten().copied().collect();
            let distinct: BTreeSet<u32> = all.iter().copied().collect();
            let sizes: Vec<usize> = held.iter().map(Vec::len).collect();
            let balanced = sizes.iter().max().unwrap_or(&0) - sizes.iter().min().unwrap_or(&0) <= 1;
            Ok(
                if all.len() == queues as usize && distinct.len() == queues as usize && balanced {
                    Check::Done(held)
                } else {
                    Check::Pending(format!("{held:?}"))
                },
            )
        },
    )
    .await
}

/// Sends `seqs` in batches of 100 (each batch one Raft entry in one queue).
async fn send_batches(client: &Client, topic: &str, seqs: std::ops::Range<u64>) -> anyhow::Result<()> {
    let producer = client.producer();
    let seqs: Vec<u64> = seqs.collect();
    for chunk in seqs.chunks(100) {
        producer
            .send_batch(topic, chunk.iter().map(|s| message(*s, None)).collect())
            .await?;
    }
    Ok(())
}

fn counts(log: &Log) -> HashMap<u64, usize> {
    let mut n = HashMap::new();
    for d in lock(log).iter() {
        *n.entry(d.seq).or_default() += 1;
    }
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clustering_group_delivers_each_message_once_and_loses_none_through_a_rebalance() -> anyhow::Result<()> {
    const TOPIC: &str = "cg-orders";
    const QUEUES: u32 = 8;
    const HALF: u64 = 10_000;
    let _turn = ONE_AT_A_TIME.lock().await;
    let (ns, cluster, client) = start_with_client().await?;
    client
        .admin()
        .create_topic(TOPIC, QUEUES, pb::Permission::ReadWrite)
        .await?;
    wait_for_known_route(&client, TOPIC).await?;
    let log: Log = Arc::default();
    let concurrent = |b: raftmq_client::PushConsumerBuilder| b.mode(ConsumeMode::Concurrent { workers: 4 });
    let mut members = vec![
        member(&client, "cg", TOPIC, 0, &log, concurrent)?,
        member(&client, "cg", TOPIC, 1, &log, concurrent)?,
        member(&client, "cg", TOPIC, 2, &log, concurrent)?,
    ];
    let held = wait_for_settled(&members.iter().collect::<Vec<_>>(), QUEUES).await?;
    eprintln!("three members settled on {held:?}");

    // Stable membership: every message exactly once.
    send_batches(&client, TOPIC, 0..HALF).await?;
    wait_for_all(&log, &(0..HALF).collect(), "stable group").await?;
    let n = counts(&log);
    let dup: Vec<_> = n.iter().filter(|(_, c)| **c > 1).map(|(s, _)| *s).collect();
    ensure!(
        dup.is_empty(),
        "{} message(s) delivered twice with no member change: {:?}",
        dup.len(),
        &dup[..dup.len().min(10)]
    );
    let per_member: BTreeMap<usize, usize> = lock(&log).iter().fold(BTreeMap::new(), |mut m, d| {
        *m.entry(d.member).or_default() += 1;
        m
    });
    ensure!(per_member.len() == 3, "not every member consumed: {per_member:?}");
    let delivered_stable = lock(&log).len();

    // A fourth member joins and member 0 leaves while the second half flows.
    let sender = {
        let client = client.clone();
        tokio::spawn(async move { send_batches(&client, TOPIC, HALF..2 * HALF).await })
    };
    members.push(member(&client, "cg", TOPIC, 3, &log, concurrent)?);
    // Member 0 leaves once the leader counts member 3 in.
    eventually(DEADLINE, "member 3 to join the group", async || {
        let d = client.admin().describe_consumer_group("cg").await?;
        let ids: Vec<&str> = d
            .iter()
            .flat_map(|g| &g.members)
            .map(|m| m.client_id.as_str())
            .collect();
        Ok(if ids.contains(&"member-3") {
            Check::Done(())
        } else {
            Check::Pending(format!("members {ids:?}"))
        })
    })
    .await?;
    members.remove(0).shutdown().await?;
    sender.await??;
    wait_for_all(&log, &(0..2 * HALF).collect(), "through the rebalance").await?;
    let held = wait_for_settled(&members.iter().collect::<Vec<_>>(), QUEUES).await?;
    let n = counts(&log);
    let duplicates: usize = n.values().map(|c| c - 1).sum();
    eprintln!(
        "after member 3 joined and member 0 left: assignment {held:?}; {} deliveries for {} messages, {duplicates} duplicate(s), all after the membership change",
        lock(&log).len(),
        2 * HALF
    );
    ensure!(lock(&log).len() >= delivered_stable + HALF as usize);

    // Committed offsets reach the end of every queue once the members are done.
    eventually(DEADLINE, "the group to catch up", async || {
        let d = client.admin().describe_consumer_group("cg").await?;
        let lag: u64 = d.iter().flat_map(|g| &g.queues).map(|q| q.lag).sum();
        let members_seen = d.iter().flat_map(|g| &g.members).count();
        Ok(if lag == 0 && members_seen == 3 {
            Check::Done(())
        } else {
            Check::Pending(format!("lag {lag}, {members_seen} member(s) listed: {d:?}"))
        })
    })
    .await?;
    for m in members {
        m.shutdown().await?;
    }
    let d = client.admin().describe_consumer_group("cg").await?;
    ensure!(
        d.iter().all(|g| g.members.is_empty()),
        "members still listed after leaving: {d:?}"
    );
    cluster.shutdown().await?;
    ns.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broadcasting_members_each_receive_everything_and_keep_offsets_locally() -> anyhow::Result<()> {
    const TOPIC: &str = "cg-broadcast";
    const COUNT: u64 = 1_000;
    let _turn = ONE_AT_A_TIME.lock().await;
    let (ns, cluster, client) = start_with_client().await?;
    client.admin().create_topic(TOPIC, 4, pb::Permission::ReadWrite).await?;
    wait_for_known_route(&client, TOPIC).await?;
    send_batches(&client, TOPIC, 0..COUNT).await?;
    let dirs = [tempfile::tempdir()?, tempfile::tempdir()?];
    let logs: [Log; 2] = [Arc::default(), Arc::default()];
    let mut members = Vec::new();
    for (i, (dir, log)) in dirs.iter().zip(&logs).enumerate() {
        let path = dir.path().to_path_buf();
        members.push(member(&client, "bc", TOPIC, i, log, move |b| {
            b.model(MessageModel::Broadcasting).offset_dir(path)
        })?);
    }
    for (i, log) in logs.iter().enumerate() {
        wait_for_all(log, &(0..COUNT).collect(), &format!("broadcast member {i}")).await?;
        let n = counts(log);
        ensure!(n.values().all(|c| *c == 1), "member {i} got duplicates");
    }
    for m in members {
        m.shutdown().await?;
    }
    for dir in &dirs {
        let text = std::fs::read_to_string(dir.path().join(format!("bc@{TOPIC}.json")))?;
        let offsets: BTreeMap<String, u64> = serde_json::from_str(&text)?;
        ensure!(offsets.values().sum::<u64>() == COUNT, "offset file says {offsets:?}");
    }
    // A broadcasting group commits nothing on the brokers.
    let listed = client.admin().list_consumer_groups().await?;
    ensure!(
        listed.iter().flat_map(|b| &b.groups).all(|g| g.consumer_group != "bc"),
        "{listed:?}"
    );
    cluster.shutdown().await?;
    ns.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orderly_consumers_keep_per_key_order_end_to_end() -> anyhow::Result<()> {
    const TOPIC: &str = "cg-ordered";
    const KEYS: u64 = 8;
    const PER_KEY: u64 = 150;
    let _turn = ONE_AT_A_TIME.lock().await;
    let (ns, cluster, client) = start_with_client().await?;
    client.admin().create_topic(TOPIC, 4, pb::Permission::ReadWrite).await?;
    wait_for_known_route(&client, TOPIC).await?;
    let log: Log = Arc::default();
    let orderly = |b: raftmq_client::PushConsumerBuilder| b.mode(ConsumeMode::Orderly);
    let members = [
        member(&client, "ordered", TOPIC, 0, &log, orderly)?,
        member(&client, "ordered", TOPIC, 1, &log, orderly)?,
    ];
    wait_for_settled(&members.iter().collect::<Vec<_>>(), 4).await?;
    // One sequential sender per key: each key's messages are stored in send order.
    let mut senders = Vec::new();
    for k in 0..KEYS {
        let producer = client.producer();
        senders.push(tokio::spawn(async move {
            let key = format!("key-{k}");
            for i in 0..PER_KEY {
                producer
                    .send_with_key(TOPIC, &key, message(k * 1000 + i, Some(&key)))
                    .await?;
            }
            anyhow::Ok(())
        }));
    }
    for s in senders {
        s.await??;
    }
    let expected: BTreeSet<u64> = (0..KEYS)
        .flat_map(|k| (0..PER_KEY).map(move |i| k * 1000 + i))
        .collect();
    wait_for_all(&log, &expected, "orderly").await?;
    let mut by_key: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for d in lock(&log).iter() {
        by_key
            .entry(d.key.clone().context("key missing")?)
            .or_default()
            .push(d.seq);
    }
    for (key, seqs) in &by_key {
        let k: u64 = key.trim_start_matches("key-").parse()?;
        let want: Vec<u64> = (0..PER_KEY).map(|i| k * 1000 + i).collect();
        ensure!(*seqs == want, "{key} delivered out of order or twice: {seqs:?}");
    }
    for m in members {
        m.shutdown().await?;
    }
    cluster.shutdown().await?;
    ns.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumers_resume_from_committed_offsets_on_a_new_leader() -> anyhow::Result<()> {
    const TOPIC: &str = "cg-failover";
    const QUEUES: u32 = 4;
    const COUNT: u64 = 1_500;
    let _turn = ONE_AT_A_TIME.lock().await;
    let (ns, mut cluster, client) = start_with_client().await?;
    client
        .admin()
        .create_topic(TOPIC, QUEUES, pb::Permission::ReadWrite)
        .await?;
    wait_for_known_route(&client, TOPIC).await?;
    let log: Log = Arc::default();
    let members = [
        member(&client, "fo", TOPIC, 0, &log, |b| b)?,
        member(&client, "fo", TOPIC, 1, &log, |b| b)?,
    ];
    wait_for_settled(&members.iter().collect::<Vec<_>>(), QUEUES).await?;
    // A producer that keeps going through the failover (it retries on its own).
    let acked: Arc<Mutex<BTreeSet<u64>>> = Arc::default();
    let sender = {
        let (producer, acked) = (client.producer(), acked.clone());
        tokio::spawn(async move {
            for seq in 0..COUNT {
                if producer.send(TOPIC, message(seq, None)).await.is_ok() {
                    lock(&acked).insert(seq);
                }
            }
        })
    };
    // Kill the leader once consumers have committed progress.
    let old = cluster.wait_for_leader(DEADLINE).await?;
    let follower = (1..=3).find(|id| *id != old).context("no follower")?;
    eventually(CONSUME_DEADLINE, "500 deliveries before the kill", async || {
        let delivered = lock(&log).len();
        Ok(if delivered >= 500 {
            Check::Done(())
        } else {
            Check::Pending(format!("{delivered} delivered"))
        })
    })
    .await?;
    // Offsets commit with the once-a-second heartbeats: wait until the follower
    // has applied a commit in every queue.
    let committed_at_kill: Vec<u64> = eventually(DEADLINE, "a commit in every queue on the follower", async || {
        let store = cluster.replica(follower).store();
        let committed: Vec<u64> = (0..QUEUES)
            .map(|q| Ok(store.consumer_offset("fo", TOPIC, q)?.unwrap_or_default()))
            .collect::<anyhow::Result<_>>()?;
        Ok(if committed.iter().all(|o| *o > 0) {
            Check::Done(committed)
        } else {
            Check::Pending(format!("committed {committed:?}"))
        })
    })
    .await?;
    cluster.replica_mut(old).kill().await;
    let killed_at = Instant::now();
    eprintln!("leader {old} killed; committed offsets then: {committed_at_kill:?}");
    ensure!(
        committed_at_kill.iter().sum::<u64>() > 0,
        "nothing committed before the kill"
    );
    sender.await?;
    let acked = lock(&acked).clone();
    wait_for_all(&log, &acked, "after the failover").await?;
    let new = cluster.wait_for_leader_other_than(Some(old), DEADLINE).await?;
    let store = cluster.replica(new).store();

    let deliveries = lock(&log).clone();
    for q in 0..QUEUES {
        let max = store.queue_next_offset(TOPIC, q)?;
        let seen: BTreeSet<u64> = deliveries
            .iter()
            .filter(|d| d.queue_id == q)
            .map(|d| d.offset)
            .collect();
        // No skip: every stored offset of the queue was delivered.
        ensure!(
            seen.len() as u64 == max && seen.iter().copied().eq(0..max),
            "queue {q}: delivered {} distinct offsets of {max}",
            seen.len()
        );
        // No rewind past the last commit: nothing below it was delivered again.
        let rewound: Vec<u64> = deliveries
            .iter()
            .filter(|d| d.queue_id == q && d.at > killed_at && d.offset < committed_at_kill[q as usize])
            .map(|d| d.offset)
            .collect();
        ensure!(
            rewound.is_empty(),
            "queue {q} rewound below its committed offset {}: {rewound:?}",
            committed_at_kill[q as usize]
        );
    }
    let duplicates = deliveries.len()
        - deliveries
            .iter()
            .map(|d| (d.queue_id, d.offset))
            .collect::<BTreeSet<_>>()
            .len();
    eprintln!(
        "{} deliveries, {duplicates} duplicate(s) across the failover",
        deliveries.len()
    );
    // And the new leader ends with every queue fully committed.
    eventually(DEADLINE, "every queue committed on the new leader", async || {
        let lag: Vec<u64> = (0..QUEUES)
            .map(|q| {
                let max = store.queue_next_offset(TOPIC, q)?;
                Ok(max - store.consumer_offset("fo", TOPIC, q)?.unwrap_or(0).min(max))
            })
            .collect::<anyhow::Result<_>>()?;
        Ok(if lag.iter().all(|l| *l == 0) {
            Check::Done(())
        } else {
            Check::Pending(format!("{lag:?}"))
        })
    })
    .await?;
    for m in members {
        m.shutdown().await?;
    }
    cluster.shutdown().await?;
    ns.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tag_filter_reset_and_lookup_by_id_and_key() -> anyhow::Result<()> {
    const TOPIC: &str = "cg-tags";
    let _turn = ONE_AT_A_TIME.lock().await;
    let (ns, cluster, client) = start_with_client().await?;
    client.admin().create_topic(TOPIC, 2, pb::Permission::ReadWrite).await?;
    wait_for_known_route(&client, TOPIC).await?;
    let producer = client.producer();
    let mut matching = BTreeSet::new();
    let mut receipts = Vec::new();
    for seq in 0..300u64 {
        let mut m = message(seq, Some(&format!("order-{}", seq % 50)));
        m.tag = ["TagA", "TagB", "TagC"][(seq % 3) as usize].into();
        if m.tag != "TagB" {
            matching.insert(seq);
        }
        receipts.push(producer.send(TOPIC, m).await?);
    }
    let log: Log = Arc::default();
    let consumer = member(&client, "tags", TOPIC, 0, &log, |b| b.tag_expression("TagA || TagC"))?;
    wait_for_all(&log, &matching, "tag filter").await?;
    // Let any stray delivery of a TagB message arrive before judging.
    let seen: BTreeSet<u64> = lock(&log).iter().map(|d| d.seq).collect();
    ensure!(
        seen == matching,
        "delivered {} messages, {} match",
        seen.len(),
        matching.len()
    );
    ensure!(counts(&log).values().all(|c| *c == 1), "a filtered message came twice");

    // Reset to the first offset while the member runs: it starts over.
    let before = lock(&log).len();
    client
        .admin()
        .reset_consumer_offset("tags", TOPIC, pb::StartFrom::First, 0)
        .await?;
    eventually(
        CONSUME_DEADLINE,
        "every matching message redelivered after the reset",
        async || {
            let redelivered = lock(&log).len() - before;
            Ok(if redelivered >= matching.len() {
                Check::Done(())
            } else {
                Check::Pending(format!("{redelivered} of {} redelivered", matching.len()))
            })
        },
    )
    .await?;
    consumer.shutdown().await?;

    // Lookup by id returns the very message; by key every message with the key.
    let admin = client.admin();
    let r = &receipts[123];
    let found = admin
        .query_message_by_id(&r.message_id)
        .await?
        .context("id not found")?;
    ensure!(found.message_id == r.message_id && found.queue_offset == r.queue_offset);
    ensure!(seq_of(&found)? == 123);
    let by_key = admin.query_messages_by_key(TOPIC, "order-7", 100).await?;
    let seqs: BTreeSet<u64> = by_key.iter().map(seq_of).collect::<anyhow::Result<_>>()?;
    ensure!(seqs == (0..300).filter(|s| s % 50 == 7).collect(), "by key: {seqs:?}");
    let bogus = format!("01{:08X}{:016X}{:08X}", crc32c::crc32c(GROUP.as_bytes()), 999_999u64, 0);
    ensure!(admin.query_message_by_id(&bogus).await?.is_none());
    let err = admin.query_message_by_id("nonsense").await.expect_err("malformed id");
    ensure!(err.code() == Some(tonic::Code::InvalidArgument), "{err}");
    cluster.shutdown().await?;
    ns.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_consumer_requests_get_a_status_that_names_the_problem() -> anyhow::Result<()> {
    use pb::consumer_service_client::ConsumerServiceClient;
    const TOPIC: &str = "cg-bad";
    let _turn = ONE_AT_A_TIME.lock().await;
    let (ns, cluster, client) = start_with_client().await?;
    client.admin().create_topic(TOPIC, 2, pb::Permission::ReadWrite).await?;
    let leader = cluster.wait_for_leader(DEADLINE).await?;
    let follower = (1..=3).find(|id| *id != leader).context("no follower")?;
    let connect = |id: u64| ConsumerServiceClient::connect(format!("http://{}", cluster.replica(id).addr));
    let mut on_leader = connect(leader).await?;
    let good = pb::HeartbeatRequest {
        consumer_group: "g".into(),
        client_id: "c1".into(),
        topic: TOPIC.into(),
        tag_expression: "*".into(),
        ..Default::default()
    };
    let cases: Vec<(pb::HeartbeatRequest, tonic::Code, &str)> = vec![
        (
            pb::HeartbeatRequest {
                consumer_group: String::new(),
                ..good.clone()
            },
            tonic::Code::InvalidArgument,
            "consumer group name is empty",
        ),
        (
            pb::HeartbeatRequest {
                consumer_group: "bad group!".into(),
                ..good.clone()
            },
            tonic::Code::InvalidArgument,
            "contains ' '",
        ),
        (
            pb::HeartbeatRequest {
                client_id: "has space".into(),
                ..good.clone()
            },
            tonic::Code::InvalidArgument,
            "client_id",
        ),
        (
            pb::HeartbeatRequest {
                tag_expression: "A ||".into(),
                ..good.clone()
            },
            tonic::Code::InvalidArgument,
            "tag expression",
        ),
        (
            pb::HeartbeatRequest {
                start_from: 42,
                ..good.clone()
            },
            tonic::Code::InvalidArgument,
            "StartFrom",
        ),
        (
            pb::HeartbeatRequest {
                queues: vec![
                    pb::HeldQueue {
                        queue_id: 1,
                        offset: 0,
                        held: true,
                    };
                    2
                ],
                ..good.clone()
            },
            tonic::Code::InvalidArgument,
            "reported twice",
        ),
        (
            pb::HeartbeatRequest {
                topic: "no-such-topic".into(),
                ..good.clone()
            },
            tonic::Code::NotFound,
            "no-such-topic",
        ),
    ];
    for (req, code, says) in cases {
        let status = on_leader.heartbeat(req.clone()).await.expect_err("refused");
        ensure!(
            status.code() == code && status.message().contains(says),
            "{req:?} was answered {:?} {:?}; wanted {code:?} mentioning {says:?}",
            status.code(),
            status.message()
        );
    }
    // A follower sends the member to the leader, as for Send.
    let status = connect(follower)
        .await?
        .heartbeat(good.clone())
        .await
        .expect_err("not leader");
    ensure!(status.code() == tonic::Code::FailedPrecondition, "{status:?}");
    let named = status
        .metadata()
        .get(raftmq_client::LEADER_METADATA_KEY)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    ensure!(
        named == cluster.replica(leader).addr.to_string(),
        "follower named {named:?}"
    );
    // A valid heartbeat is answered with the timing the member must keep.
    let ok = on_leader.heartbeat(good).await?.into_inner();
    ensure!(
        ok.heartbeat_interval_ms == 1000 && ok.session_timeout_ms == 5000,
        "{ok:?}"
    );
    // Resets need an explicit position.
    let err = client
        .admin()
        .reset_consumer_offset("g", TOPIC, pb::StartFrom::Unspecified, 0)
        .await
        .expect_err("unspecified position");
    ensure!(err.code() == Some(tonic::Code::InvalidArgument), "{err}");
    let described = client.admin().describe_consumer_group("never-seen").await?;
    ensure!(described.is_empty(), "an unknown group is described as {described:?}");
    cluster.shutdown().await?;
    ns.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_heartbeat_may_report_no_more_queues_than_the_topic_has() -> anyhow::Result<()> {
    use pb::consumer_service_client::ConsumerServiceClient;
    const TOPIC: &str = "cg-bound";
    let _turn = ONE_AT_A_TIME.lock().await;
    let (ns, cluster, client) = start_with_client().await?;
    client.admin().create_topic(TOPIC, 4, pb::Permission::ReadWrite).await?;
    let leader = cluster.wait_for_leader(DEADLINE).await?;
    let mut on_leader = ConsumerServiceClient::connect(format!("http://{}", cluster.replica(leader).addr)).await?;
    let claiming = |ids: std::ops::Range<u32>| pb::HeartbeatRequest {
        consumer_group: "g-bound".into(),
        client_id: "c1".into(),
        topic: TOPIC.into(),
        tag_expression: "*".into(),
        queues: ids
            .map(|queue_id| pb::HeldQueue {
                queue_id,
                offset: 0,
                held: true,
            })
            .collect(),
        ..Default::default()
    };
    let cases = [
        (claiming(0..20_000), "20000 queues"),
        (claiming(0..5), "5 queues"),
        (claiming(3..5), "queue_id 4"),
    ];
    for (req, says) in cases {
        let status = on_leader.heartbeat(req).await.expect_err("refused");
        ensure!(
            status.code() == tonic::Code::InvalidArgument && status.message().contains(says),
            "answered {:?} {:?}; wanted InvalidArgument mentioning {says:?}",
            status.code(),
            status.message()
        );
    }
    // Nothing was taken from those: the group has no member, and a member
    // reporting within the topic's queues is answered.
    let described = client.admin().describe_consumer_group("g-bound").await?;
    ensure!(described.is_empty(), "refused heartbeats left {described:?}");
    let ok = on_leader.heartbeat(claiming(0..4)).await?.into_inner();
    ensure!(ok.assigned.len() <= 4, "{ok:?}");
    cluster.shutdown().await?;
    ns.stop().await
}
