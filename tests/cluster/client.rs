//! The Rust client (raftmq-client) against a NameServer and a three-node group:
//! producers' routing, batching, redirects and failover, read back by a pull consumer;
//! and topic administration (a topic's message type in listings and routes).

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use raftmq_client::{Client, ClientConfig, MessageExt, Producer};
use raftmq_proto::v1 as pb;
use raftmq_proto::v1::admin_service_client::AdminServiceClient;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::fixtures::{
    Check, DEADLINE, GROUP, eventually, message, pull_everything, raft_index_of, seq_of, start_with_client,
    wait_for_known_route,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn producer_sends_two_thousand_and_pull_consumer_reads_each_once_in_key_order() -> anyhow::Result<()> {
    const TOPIC: &str = "client-orders";
    const COUNT: u64 = 2_000;
    const KEYS: u64 = 7;
    let (ns, cluster, client) = start_with_client().await?;
    let producer = client.producer();
    // The first send reaches a broker through a provisional route and
    // auto-creates the topic; keyed order is promised once the route is known.
    let first = producer.send(TOPIC, message(0, None)).await?;
    assert_eq!(first.broker_group, GROUP);
    let route = wait_for_known_route(&client, TOPIC).await?;
    assert_eq!(route.groups.len(), 1);
    assert_eq!(route.groups[0].queues, 4, "auto-created with the default queue count");

    let started = Instant::now();
    // Seven tasks each send one key's messages in order (a send returns after
    // the ack, so per-key order is the send order); three send unkeyed ones.
    let mut tasks = Vec::new();
    for t in 0..10u64 {
        let producer: Producer = producer.clone();
        tasks.push(tokio::spawn(async move {
            let mut receipts = Vec::new();
            for seq in (1..COUNT).filter(|s| s % 10 == t) {
                let receipt = if t < KEYS {
                    let key = format!("key-{t}");
                    producer.send_with_key(TOPIC, &key, message(seq, Some(&key))).await?
                } else {
                    producer.send(TOPIC, message(seq, None)).await?
                };
                receipts.push((seq, receipt));
            }
            anyhow::Ok(receipts)
        }));
    }
    let mut acked = BTreeMap::new();
    for t in tasks {
        for (seq, r) in t.await?? {
            acked.insert(seq, r);
        }
    }
    acked.insert(0, first);
    eprintln!("{COUNT} sends took {:?}", started.elapsed());
    assert_eq!(acked.len() as u64, COUNT);
    let used: std::collections::BTreeSet<u32> = acked.values().map(|r| r.queue_id).collect();
    assert_eq!(used.len(), 4, "round-robin and keys spread over every queue");

    let (pulled, _) = pull_everything(&client.pull_consumer(), &route, TOPIC).await?;
    let mut seen: HashMap<u64, (u32, u64)> = HashMap::new();
    let mut last_of_key: HashMap<String, (u32, u64)> = HashMap::new();
    for (_, q, m) in &pulled {
        let seq = seq_of(m)?;
        ensure!(seen.insert(seq, (*q, m.queue_offset)).is_none(), "seq {seq} read twice");
        let r = acked.get(&seq).context("read a message never acknowledged")?;
        assert_eq!(
            (r.queue_id, r.queue_offset, r.message_id.as_str()),
            (*q, m.queue_offset, m.message_id.as_str())
        );
        if let Some(key) = m.message.as_ref().and_then(|m| m.properties.get("key")) {
            // Queues are read in offset order: a key's messages must sit in one
            // queue with rising sequence numbers.
            if let Some((lq, lseq)) = last_of_key.insert(key.clone(), (*q, seq)) {
                ensure!(lq == *q, "key {key} moved from queue {lq} to {q}");
                ensure!(lseq < seq, "key {key}: seq {seq} stored after {lseq}");
            }
        }
    }
    assert_eq!(seen.len() as u64, COUNT, "every message read exactly once");
    assert_eq!(last_of_key.len() as u64, KEYS);
    cluster.shutdown().await?;
    ns.stop().await
}

/// Unkeyed sends rotate over the queues: awaited one at a time, each goes to the
/// next queue; many at once, they gather into large batches (one Raft entry
/// each, visible as shared indexes in the message ids) and still reach every queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unkeyed_sends_rotate_per_send_alone_and_per_batch_under_load() -> anyhow::Result<()> {
    use futures::{StreamExt, TryStreamExt};
    use std::collections::HashSet;
    const TOPIC: &str = "client-rotation";
    const CONCURRENT: u64 = 2_000;
    let (ns, cluster, client) = start_with_client().await?;
    let producer = client.producer();
    producer.send(TOPIC, message(0, None)).await?;
    let route = wait_for_known_route(&client, TOPIC).await?;
    let queues = route.groups[0].queues;

    let mut one_by_one = Vec::new();
    for seq in 1..=u64::from(2 * queues) {
        one_by_one.push(producer.send(TOPIC, message(seq, None)).await?.queue_id);
    }
    for w in one_by_one.windows(2) {
        ensure!(
            w[1] == (w[0] + 1) % queues,
            "one-at-a-time sends went to queues {one_by_one:?}"
        );
    }

    let receipts: Vec<_> = futures::stream::iter(0..CONCURRENT)
        .map(|i| producer.send(TOPIC, message(1_000 + i, None)))
        .buffer_unordered(512)
        .try_collect()
        .await?;
    let used: HashSet<u32> = receipts.iter().map(|r| r.queue_id).collect();
    ensure!(
        used.len() == queues as usize,
        "concurrent sends used only queues {used:?}"
    );
    // Message id: "01", group crc (8 hex), Raft index (16 hex), position (8 hex).
    let entries: HashSet<&str> = receipts
        .iter()
        .map(|r| r.message_id.get(10..26).context("message id too short"))
        .collect::<anyhow::Result<_>>()?;
    eprintln!("{CONCURRENT} concurrent sends stored in {} entries", entries.len());
    ensure!(
        (entries.len() as u64) * 8 <= CONCURRENT,
        "{CONCURRENT} concurrent sends made {} entries: sends were not combined",
        entries.len()
    );
    cluster.shutdown().await?;
    ns.stop().await
}

type Outcome = (u64, Instant, Result<raftmq_client::SendReceipt, raftmq_client::Error>);

#[derive(Default)]
struct Outcomes {
    acked: BTreeMap<u64, (Instant, raftmq_client::SendReceipt)>,
    /// seq, error, whether the message may have been stored anyway.
    failed: Vec<(u64, String, bool)>,
}

impl Outcomes {
    fn record(&mut self, (seq, at, outcome): Outcome) {
        match outcome {
            Ok(r) => {
                self.acked.insert(seq, (at, r));
            }
            Err(e) => self.failed.push((seq, e.to_string(), e.is_outcome_unknown())),
        }
    }
}

async fn next_outcome(rx: &mut tokio::sync::mpsc::UnboundedReceiver<Outcome>) -> Option<Outcome> {
    tokio::time::timeout(DEADLINE, rx.recv()).await.ok().flatten()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn producer_continues_through_a_killed_leader_and_every_ack_survives() -> anyhow::Result<()> {
    const TOPIC: &str = "client-failover";
    const BEFORE: usize = 200;
    const AFTER: usize = 200;
    let (ns, mut cluster, client) = start_with_client().await?;
    let old = cluster.wait_for_leader(DEADLINE).await?;
    client.admin().create_topic(TOPIC, 4, pb::Permission::ReadWrite).await?;
    wait_for_known_route(&client, TOPIC).await?;

    // One producer task sends seq 0, 1, 2, … and reports each outcome.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let stop = CancellationToken::new();
    let sender = {
        let (producer, stop) = (client.producer(), stop.clone());
        tokio::spawn(async move {
            let mut seq = 0u64;
            while !stop.is_cancelled() {
                let outcome = producer.send(TOPIC, message(seq, None)).await;
                if tx.send((seq, Instant::now(), outcome)).is_err() {
                    break;
                }
                seq += 1;
            }
        })
    };
    let mut outcomes = Outcomes::default();
    while outcomes.acked.len() < BEFORE {
        outcomes.record(
            next_outcome(&mut rx)
                .await
                .context("producer stalled before the kill")?,
        );
    }
    cluster.replica_mut(old).kill().await;
    let killed_at = Instant::now();
    let acked_before = outcomes.acked.len();
    while outcomes.acked.len() < acked_before + AFTER {
        outcomes.record(next_outcome(&mut rx).await.context("producer stalled after the kill")?);
    }
    stop.cancel();
    while let Some(event) = rx.recv().await {
        outcomes.record(event);
    }
    sender.await?;
    let Outcomes { acked, failed } = outcomes;
    let first_after = acked
        .values()
        .map(|(at, _)| *at)
        .filter(|at| *at > killed_at)
        .min()
        .context("no ack after the kill")?;
    eprintln!(
        "leader {old} killed: {} ack(s) before, {} after; first ack after the kill {:?} later; {} send(s) failed: {:?}",
        acked_before,
        acked.len() - acked_before,
        first_after - killed_at,
        failed.len(),
        failed
    );

    let new = cluster.wait_for_leader_other_than(Some(old), DEADLINE).await?;
    let new_addr = cluster.replica(new).addr.to_string();
    let route = client.route(TOPIC).await?;
    let (pulled, endpoints) = pull_everything(&client.pull_consumer(), &route, TOPIC).await?;
    ensure!(
        endpoints.iter().all(|e| *e == new_addr),
        "reads were served by {endpoints:?}, not the new leader {new_addr}"
    );
    let read: HashMap<u64, usize> = pulled.iter().try_fold(HashMap::new(), |mut m, (_, _, p)| {
        *m.entry(seq_of(p)?).or_default() += 1;
        anyhow::Ok(m)
    })?;
    for seq in acked.keys() {
        ensure!(
            read.contains_key(seq),
            "acknowledged seq {seq} is missing after the failover"
        );
    }
    let duplicated = read.values().filter(|n| **n > 1).count();
    eprintln!("duplicates stored by retries after unknown outcomes: {duplicated}");
    cluster.shutdown().await?;
    ns.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_sends_are_combined_into_fewer_entries_and_a_bad_one_fails_alone() -> anyhow::Result<()> {
    const TOPIC: &str = "combined";
    const COUNT: u64 = 3_000;
    let (ns, cluster, client) = start_with_client().await?;
    client.admin().create_topic(TOPIC, 2, pb::Permission::ReadWrite).await?;
    let route = wait_for_known_route(&client, TOPIC).await?;
    let producer = client.producer();
    // 256 sends in flight at a time, with one empty body (refused as invalid)
    // in the middle of the stream.
    let bad = COUNT / 2;
    let mut pending = futures::StreamExt::buffer_unordered(
        futures::StreamExt::map(futures::stream::iter(0..COUNT), |seq| {
            let producer = producer.clone();
            async move {
                let mut m = message(seq, None);
                if seq == bad {
                    m.body.clear();
                }
                (seq, producer.send(TOPIC, m).await)
            }
        }),
        256,
    );
    let mut receipts = BTreeMap::new();
    let mut refused = Vec::new();
    while let Some((seq, r)) = futures::StreamExt::next(&mut pending).await {
        match r {
            Ok(r) => {
                receipts.insert(seq, r);
            }
            Err(e) => refused.push((seq, e)),
        }
    }
    ensure!(
        refused.len() == 1 && refused[0].0 == bad,
        "only the empty body should fail: {:?}",
        refused.iter().map(|(s, e)| format!("{s}: {e}")).collect::<Vec<_>>()
    );
    ensure!(
        refused[0].1.code() == Some(tonic::Code::InvalidArgument),
        "{}",
        refused[0].1
    );
    // Fewer Raft entries than messages: sends were combined.
    let entries: std::collections::BTreeSet<u64> = receipts
        .values()
        .map(|r| raft_index_of(&r.message_id))
        .collect::<anyhow::Result<_>>()?;
    eprintln!("{} messages acknowledged in {} entries", receipts.len(), entries.len());
    ensure!(
        entries.len() * 2 < receipts.len(),
        "{} entries for {} messages: little was combined",
        entries.len(),
        receipts.len()
    );
    // Each acknowledged message is stored once, where its receipt says.
    let (pulled, _) = pull_everything(&client.pull_consumer(), &route, TOPIC).await?;
    ensure!(
        pulled.len() == receipts.len(),
        "{} stored, {} acknowledged",
        pulled.len(),
        receipts.len()
    );
    for (group, queue, m) in &pulled {
        let seq = seq_of(m)?;
        let r = receipts
            .get(&seq)
            .with_context(|| format!("seq {seq} stored but not acknowledged"))?;
        ensure!(
            (&r.broker_group, r.queue_id, r.queue_offset, &r.message_id)
                == (group, *queue, m.queue_offset, &m.message_id),
            "seq {seq}: receipt {r:?} but stored at {group}/{queue}@{}",
            m.queue_offset
        );
    }
    cluster.shutdown().await?;
    ns.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_through_a_route_naming_a_follower_redirects_to_the_leader() -> anyhow::Result<()> {
    const TOPIC: &str = "client-redirect";
    let (ns, cluster, client) = start_with_client().await?;
    let leader = cluster.wait_for_leader(DEADLINE).await?;
    let admin = client.admin();
    admin.create_topic(TOPIC, 2, pb::Permission::ReadWrite).await?;
    let topics = admin.list_topics().await?;
    ensure!(
        topics
            .iter()
            .any(|(g, t)| g == GROUP && t.name == TOPIC && t.queues_per_group == 2),
        "created topic not listed: {topics:?}"
    );
    let status = admin.cluster_status().await?;
    assert_eq!(status.len(), 1);
    assert_eq!(status[0].leader_id, Some(leader));

    let leader_addr = cluster.replica(leader).addr.to_string();
    let followers: Vec<String> = cluster
        .running()
        .filter(|r| r.id != leader)
        .map(|r| r.addr.to_string())
        .collect();
    // A stale cache: it calls a follower the leader.
    client.seed_route(pb::QueryRouteResponse {
        topic: TOPIC.into(),
        groups: vec![pb::GroupRoute {
            broker_group: GROUP.into(),
            leader_endpoint: followers[0].clone(),
            follower_endpoints: vec![leader_addr.clone(), followers[1].clone()],
            queues: 2,
            perm: pb::Permission::ReadWrite as i32,
            message_type: 0,
        }],
    });
    let receipt = client.producer().send(TOPIC, message(1, None)).await?;
    assert_eq!(receipt.broker_group, GROUP);
    let cached = client.route(TOPIC).await?;
    assert_eq!(
        cached.groups[0].leader_endpoint, leader_addr,
        "the redirect updated the cache"
    );
    assert!(cached.groups[0].follower_endpoints.contains(&followers[0]));

    let pulled = client
        .pull_consumer()
        .pull(
            TOPIC,
            GROUP,
            receipt.queue_id,
            receipt.queue_offset,
            1,
            Duration::ZERO,
            &raftmq_client::Filter::all(),
        )
        .await?;
    assert_eq!(pulled.endpoint, leader_addr);
    assert_eq!(pulled.messages.len(), 1);
    assert_eq!(pulled.messages[0].message_id, receipt.message_id);

    let chosen = client
        .producer()
        .send_to_queue(TOPIC, GROUP, 1, message(2, None))
        .await?;
    assert_eq!((chosen.broker_group.as_str(), chosen.queue_id), (GROUP, 1));

    // Errors that retrying cannot fix come back at once, with their code.
    let started = Instant::now();
    let err = client
        .producer()
        .send(TOPIC, pb::Message::new(Vec::new()))
        .await
        .expect_err("an empty body is refused");
    assert_eq!(err.code(), Some(tonic::Code::InvalidArgument), "{err}");
    assert!(started.elapsed() < Duration::from_secs(1), "not retried");
    if err.is_outcome_unknown() {
        bail!("an invalid argument is a definite failure");
    }
    cluster.shutdown().await?;
    ns.stop().await
}

/// A leader that goes silent (paused or cut off: no reset, no answer) is given
/// up on as soon as its replicas, asked while the request waits, name the real
/// leader: well before `request_timeout`. While the silent endpoint is
/// remembered as dead, later calls (a send, and a pull, whose followers are
/// asked with ClusterStatus) do not wait on it again even though the route
/// still names it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_leader_is_given_up_once_its_replicas_name_the_real_one() -> anyhow::Result<()> {
    const TOPIC: &str = "client-silent";
    // Long, so that a call that waited it out cannot pass for one that asked.
    const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);
    let (ns, cluster, admin_client) = start_with_client().await?;
    let leader = cluster.wait_for_leader(DEADLINE).await?;
    admin_client
        .admin()
        .create_topic(TOPIC, 2, pb::Permission::ReadWrite)
        .await?;
    wait_for_known_route(&admin_client, TOPIC).await?;
    // The kernel completes TCP handshakes into the backlog of a listener that
    // never accepts: a connection that opens and then hears nothing, as from
    // a stopped process.
    let silent = TcpListener::bind("127.0.0.1:0").await?;
    let silent_addr = silent.local_addr()?.to_string();
    let leader_addr = cluster.replica(leader).addr.to_string();
    let followers: Vec<String> = cluster
        .running()
        .filter(|r| r.id != leader)
        .map(|r| r.addr.to_string())
        .collect();
    let mut config = ClientConfig::new(vec![ns.addr.clone()]);
    config.request_timeout = REQUEST_TIMEOUT;
    config.send_deadline = REQUEST_TIMEOUT * 2;
    let client = Client::new(config)?;
    // A NameServer that still names the silent node as the leader.
    let stale = || pb::QueryRouteResponse {
        topic: TOPIC.into(),
        groups: vec![pb::GroupRoute {
            broker_group: GROUP.into(),
            leader_endpoint: silent_addr.clone(),
            follower_endpoints: followers.clone(),
            queues: 2,
            perm: pb::Permission::ReadWrite as i32,
            message_type: 0,
        }],
    };

    client.seed_route(stale());
    let started = Instant::now();
    let receipt = client.producer().send(TOPIC, message(1, None)).await?;
    let took = started.elapsed();
    assert_eq!(receipt.broker_group, GROUP);
    ensure!(
        took < REQUEST_TIMEOUT,
        "the first send took {took:?}: it waited out request_timeout instead of asking the replicas"
    );
    assert_eq!(
        client.route(TOPIC).await?.groups[0].leader_endpoint,
        leader_addr,
        "the redirect updated the cache"
    );

    client.seed_route(stale());
    let started = Instant::now();
    client.producer().send(TOPIC, message(2, None)).await?;
    let took = started.elapsed();
    ensure!(
        took < REQUEST_TIMEOUT,
        "the second send took {took:?}: it waited on the silent endpoint again"
    );

    client.seed_route(stale());
    let pulled = client
        .pull_consumer()
        .pull(
            TOPIC,
            GROUP,
            receipt.queue_id,
            receipt.queue_offset,
            1,
            Duration::ZERO,
            &raftmq_client::Filter::all(),
        )
        .await?;
    assert_eq!(pulled.endpoint, leader_addr, "pulls are served by the leader");
    assert_eq!(pulled.messages.len(), 1);
    assert_eq!(pulled.messages[0].message_id, receipt.message_id);
    drop(silent);
    cluster.shutdown().await?;
    ns.stop().await
}

/// `topic`'s config on the test group as the admin client lists it.
async fn listed_topic(client: &Client, topic: &str) -> anyhow::Result<pb::TopicConfig> {
    let topics = client.admin().list_topics().await?;
    topics
        .iter()
        .find(|(g, t)| g == GROUP && t.name == topic)
        .map(|(_, t)| t.clone())
        .with_context(|| format!("topic {topic} not listed: {topics:?}"))
}

/// Waits until a NameServer routes `topic` on the test group with message type `want`.
async fn wait_for_routed_type(client: &Client, topic: &str, want: pb::MessageType) -> anyhow::Result<()> {
    eventually(
        DEADLINE,
        &format!("the NameServer to route {topic} as {want:?}"),
        async || {
            Ok(match client.refresh_route(topic).await {
                Ok(r) if !r.provisional && r.group(GROUP).is_some_and(|g| g.message_type() == want) => Check::Done(()),
                Ok(r) => Check::Pending(format!("route {r:?}")),
                Err(e) => Check::Pending(format!("no route: {e}")),
            })
        },
    )
    .await
}

/// Topics carry their RocketMQ 5 message type: CreateTopic sets it, an update
/// that names none keeps it, ListTopics and DescribeTopic report it and the
/// NameServer routes it; a created topic with no type is NORMAL, an
/// auto-created one MIXED, and an unknown type is refused by its value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topics_carry_their_message_type_and_auto_created_ones_are_mixed() -> anyhow::Result<()> {
    const FIFO: &str = "client-typed-fifo";
    const UNTYPED: &str = "client-typed-default";
    const AUTO: &str = "client-typed-auto";
    let (ns, cluster, client) = start_with_client().await?;
    let leader = cluster.wait_for_leader(DEADLINE).await?;
    let admin = client.admin();

    admin
        .create_topic_with_type(FIFO, 2, pb::Permission::ReadWrite, pb::MessageType::Fifo)
        .await?;
    let fifo = listed_topic(&client, FIFO).await?;
    assert_eq!((fifo.queues_per_group, fifo.message_type()), (2, pb::MessageType::Fifo));
    wait_for_routed_type(&client, FIFO, pb::MessageType::Fifo).await?;

    // Changing only the queue count keeps the type.
    admin.create_topic(FIFO, 3, pb::Permission::ReadWrite).await?;
    let fifo = listed_topic(&client, FIFO).await?;
    assert_eq!((fifo.queues_per_group, fifo.message_type()), (3, pb::MessageType::Fifo));
    let mut leader_admin = AdminServiceClient::connect(format!("http://{}", cluster.replica(leader).addr)).await?;
    let described = leader_admin
        .describe_topic(pb::DescribeTopicRequest { name: FIFO.into() })
        .await?
        .into_inner();
    assert_eq!(
        described
            .topic
            .context("DescribeTopic without a config")?
            .message_type(),
        pb::MessageType::Fifo
    );
    assert_eq!(described.queues.len(), 3);

    // Naming a type changes it.
    admin
        .create_topic_with_type(FIFO, 3, pb::Permission::ReadWrite, pb::MessageType::Transaction)
        .await?;
    assert_eq!(
        listed_topic(&client, FIFO).await?.message_type(),
        pb::MessageType::Transaction
    );
    wait_for_routed_type(&client, FIFO, pb::MessageType::Transaction).await?;

    // A new topic created without a type is NORMAL, RocketMQ's default.
    admin.create_topic(UNTYPED, 1, pb::Permission::ReadWrite).await?;
    assert_eq!(
        listed_topic(&client, UNTYPED).await?.message_type(),
        pb::MessageType::Normal
    );

    let err = leader_admin
        .create_topic(pb::CreateTopicRequest {
            topic: Some(pb::TopicConfig {
                name: "client-typed-bad".into(),
                queues_per_group: 1,
                perm: pb::Permission::ReadWrite as i32,
                message_type: 42,
                trace: None,
            }),
            if_absent: false,
        })
        .await
        .expect_err("an unknown message type is refused");
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    ensure!(
        err.message().contains("42") && err.message().contains("FIFO"),
        "the refusal names the value and the accepted ones: {:?}",
        err.message()
    );

    // A send auto-creates a MIXED topic: it accepts every type.
    client.producer().send(AUTO, message(1, None)).await?;
    assert_eq!(
        listed_topic(&client, AUTO).await?.message_type(),
        pb::MessageType::Mixed
    );
    wait_for_routed_type(&client, AUTO, pb::MessageType::Mixed).await?;
    cluster.shutdown().await?;
    ns.stop().await
}
