//! The client API (raftmq.v1 MessagingService / AdminService) over real gRPC:
//! send and pull end to end, redirects from followers, per-input error statuses,
//! tag filters, long polls, and how a leader without a quorum answers.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use futures::{StreamExt, TryStreamExt};
use openraft::ServerState;
use openraft::async_runtime::WatchReceiver;
use raftmq_broker::{LEADER_METADATA_KEY, MessagingConfig};
use raftmq_proto::v1 as pb;
use raftmq_proto::v1::admin_service_client::AdminServiceClient;
use raftmq_proto::v1::messaging_service_client::MessagingServiceClient;
use tonic::Code;
use tonic::transport::Channel;

use super::fixtures::{Check, Cluster, DEADLINE, QUEUES, Replica, TOPIC, eventually, raft_index_of};

async fn messaging(r: &Replica) -> anyhow::Result<MessagingServiceClient<Channel>> {
    Ok(MessagingServiceClient::connect(format!("http://{}", r.addr))
        .await?
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20))
}

async fn admin(r: &Replica) -> anyhow::Result<AdminServiceClient<Channel>> {
    Ok(AdminServiceClient::connect(format!("http://{}", r.addr)).await?)
}

async fn create_topic(r: &Replica, name: &str, queues: u32) -> anyhow::Result<()> {
    admin(r)
        .await?
        .create_topic(pb::CreateTopicRequest {
            topic: Some(pb::TopicConfig {
                name: name.into(),
                queues_per_group: queues,
                perm: pb::Permission::ReadWrite as i32,
                message_type: 0,
                trace: None,
            }),
            if_absent: false,
        })
        .await
        .context("create topic")?;
    Ok(())
}

/// Message `i`: tag, keys, properties and a body whose size varies with `i`.
fn message(i: u64) -> pb::Message {
    pb::Message {
        topic: if i.is_multiple_of(2) {
            TOPIC.into()
        } else {
            String::new()
        },
        tag: format!("Tag{}", i % 3),
        keys: vec![format!("key-{i}"), format!("order-{}", i / 10)],
        properties: HashMap::from([("seq".into(), i.to_string()), ("origin".into(), "test".into())]),
        body: format!("body-{i:05}-{}", "x".repeat((i % 97) as usize)).into_bytes(),
        born_timestamp_ms: 1_700_000_000_000 + i,
        ..Default::default()
    }
}

fn seq_of(m: &pb::Message) -> anyhow::Result<u64> {
    m.properties
        .get("seq")
        .context("seq property missing")?
        .parse()
        .context("seq property not a number")
}

fn send_request(topic: &str, queue_id: Option<u32>, messages: Vec<pb::Message>) -> pb::SendRequest {
    pb::SendRequest {
        topic: topic.into(),
        queue_id,
        messages,
        ..Default::default()
    }
}

fn pull_request(topic: &str, queue_id: u32, offset: u64, max: u32, wait_ms: u32, tags: &str) -> pb::PullRequest {
    pb::PullRequest {
        topic: topic.into(),
        queue_id,
        offset,
        max_messages: max,
        max_wait_ms: wait_ms,
        tag_expression: tags.into(),
        filter_type: 0,
        ..Default::default()
    }
}

/// Pulls a queue from `offset` to its end, as a consumer would.
async fn pull_all(
    client: &mut MessagingServiceClient<Channel>,
    topic: &str,
    queue_id: u32,
    tags: &str,
) -> anyhow::Result<Vec<pb::PulledMessage>> {
    let mut out = Vec::new();
    let mut offset = 0;
    loop {
        let resp = client
            .pull(pull_request(topic, queue_id, offset, 1024, 0, tags))
            .await?
            .into_inner();
        ensure!(resp.next_offset >= offset, "next_offset went backwards");
        out.extend(resp.messages);
        if resp.next_offset == resp.max_offset {
            return Ok(out);
        }
        ensure!(resp.next_offset > offset, "pull made no progress at {offset}");
        offset = resp.next_offset;
    }
}

fn leader_of(status: &tonic::Status) -> Option<&str> {
    status.metadata().get(LEADER_METADATA_KEY).and_then(|v| v.to_str().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_sent_messages_pull_back_exactly_once_in_queue_order() -> anyhow::Result<()> {
    const COUNT: u64 = 10_000;
    const BATCH: u64 = 50;
    let cluster = Cluster::start(3).await?;
    let leader = cluster.wait_for_leader(DEADLINE).await?;
    let leader = cluster.replica(leader);
    create_topic(leader, TOPIC, QUEUES).await?;
    let client = messaging(leader).await?;
    let started = Instant::now();

    // Every third batch names its queue (as a producer ordering by sharding
    // key would); the rest let the broker choose.
    let acks: Vec<(u64, Option<u32>, pb::SendResponse)> = futures::stream::iter(0..COUNT / BATCH)
        .map(|b| {
            let mut client = client.clone();
            async move {
                let chosen = (b % 3 == 0).then(|| (b % u64::from(QUEUES)) as u32);
                let msgs = (b * BATCH..(b + 1) * BATCH).map(message).collect();
                let resp = client
                    .send(send_request(TOPIC, chosen, msgs))
                    .await
                    .with_context(|| format!("batch {b}"))?;
                anyhow::Ok((b, chosen, resp.into_inner()))
            }
        })
        .buffer_unordered(8)
        .try_collect()
        .await?;
    eprintln!("sent {COUNT} messages in {:?}", started.elapsed());

    // What the broker acknowledged: (queue, offset) -> (message, id).
    let mut acked: HashMap<(u32, u64), (u64, String)> = HashMap::new();
    let mut ids = HashSet::new();
    for (b, chosen, resp) in &acks {
        ensure!(
            resp.results.len() == BATCH as usize,
            "batch {b}: {} results",
            resp.results.len()
        );
        let queue = resp.results[0].queue_id;
        if let Some(q) = chosen {
            ensure!(queue == *q, "batch {b} asked for queue {q}, got {queue}");
        }
        for (pos, r) in resp.results.iter().enumerate() {
            // A batch is one entry: one queue, contiguous offsets, request order.
            ensure!(r.queue_id == queue && r.queue_offset == resp.results[0].queue_offset + pos as u64);
            ensure!(
                r.message_id.len() == 34 && ids.insert(r.message_id.clone()),
                "bad or duplicate id {}",
                r.message_id
            );
            let i = b * BATCH + pos as u64;
            ensure!(
                acked
                    .insert((queue, r.queue_offset), (i, r.message_id.clone()))
                    .is_none()
            );
        }
    }
    let queues_used: HashSet<u32> = acked.keys().map(|(q, _)| *q).collect();
    ensure!(
        queues_used.len() == QUEUES as usize,
        "round-robin used only {queues_used:?}"
    );

    let mut client = messaging(leader).await?;
    let mut seen = 0;
    for q in 0..QUEUES {
        let pulled = pull_all(&mut client, TOPIC, q, "*").await?;
        for (n, p) in pulled.iter().enumerate() {
            ensure!(
                p.queue_id == q && p.queue_offset == n as u64,
                "queue {q} out of order at {n}"
            );
            let (i, id) = acked
                .get(&(q, p.queue_offset))
                .context("pulled an unacknowledged offset")?;
            ensure!(&p.message_id == id, "message id differs between send and pull");
            let got = p.message.as_ref().context("no message")?;
            let want = message(*i);
            ensure!(seq_of(got)? == *i);
            ensure!(
                got.topic == TOPIC && got.body == want.body && got.tag == want.tag,
                "message {i} altered"
            );
            ensure!(
                got.keys == want.keys && got.properties == want.properties,
                "message {i} metadata altered"
            );
            ensure!(got.born_timestamp_ms == want.born_timestamp_ms && p.store_timestamp_ms > 0);
        }
        seen += pulled.len();
    }
    ensure!(seen as u64 == COUNT, "pulled {seen} of {COUNT}");
    eprintln!("sent and pulled {COUNT} messages in {:?}", started.elapsed());
    cluster.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follower_redirects_writes_to_the_leader_and_serves_applied_reads() -> anyhow::Result<()> {
    let cluster = Cluster::start(3).await?;
    let leader_id = cluster.wait_for_leader(DEADLINE).await?;
    let leader = cluster.replica(leader_id);
    let follower = cluster.running().find(|r| r.id != leader_id).context("a follower")?;
    create_topic(leader, TOPIC, QUEUES).await?;
    let sent = messaging(leader)
        .await?
        .send(send_request(TOPIC, Some(1), (0..20).map(message).collect()))
        .await?
        .into_inner();

    let mut to_follower = messaging(follower).await?;
    let err = to_follower
        .send(send_request(TOPIC, None, vec![message(99)]))
        .await
        .expect_err("a follower refuses writes");
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert_eq!(err.message(), "not leader");
    assert_eq!(leader_of(&err), Some(leader.addr.to_string().as_str()));
    let err = admin(follower)
        .await?
        .delete_topic(pb::DeleteTopicRequest { name: TOPIC.into() })
        .await
        .expect_err("admin writes too");
    assert_eq!(
        (err.code(), leader_of(&err)),
        (Code::FailedPrecondition, Some(leader.addr.to_string().as_str()))
    );

    // Once applied there, the follower serves the data, with the same ids. The
    // id names the Raft entry (the leader's metrics may not show it applied
    // yet when the answer arrives: the reply is sent from inside apply).
    let applied = raft_index_of(&sent.results[0].message_id)?;
    cluster.wait_applied(applied).await?;
    let pulled = to_follower
        .pull(pull_request(TOPIC, 1, 0, 100, 0, ""))
        .await?
        .into_inner();
    assert_eq!((pulled.min_offset, pulled.max_offset, pulled.next_offset), (0, 20, 20));
    let ids: Vec<_> = pulled.messages.iter().map(|m| m.message_id.clone()).collect();
    let sent_ids: Vec<_> = sent.results.iter().map(|r| r.message_id.clone()).collect();
    assert_eq!(ids, sent_ids);
    // Past the follower's end it cannot tell a consumer ahead of it (it may be
    // behind the group) from a stale one, so it never pulls the offset back: a
    // rewind there made the chaos run read delayed messages twice.
    let ahead = to_follower
        .pull(pull_request(TOPIC, 1, 25, 100, 0, ""))
        .await?
        .into_inner();
    assert!(ahead.messages.is_empty());
    assert_eq!((ahead.next_offset, ahead.max_offset), (25, 20));

    let status = admin(follower)
        .await?
        .cluster_status(pb::ClusterStatusRequest {})
        .await?
        .into_inner();
    let g = &status.groups[0];
    assert_eq!(
        (g.leader_id, g.leader_endpoint.as_str()),
        (Some(leader_id), leader.addr.to_string().as_str())
    );
    assert_eq!(g.replicas.len(), 3);
    let me = g
        .replicas
        .iter()
        .find(|r| r.node_id == follower.id)
        .context("self in status")?;
    assert_eq!(me.role, pb::ReplicaRole::Follower as i32);
    assert!(me.applied_index >= Some(applied));
    // The leader's replication progress is reported asynchronously; wait for
    // it to show what every replica has applied.
    leader
        .node()
        .raft()
        .wait(Some(DEADLINE))
        .metrics(
            |m| {
                m.replication
                    .as_ref()
                    .is_some_and(|r| r.values().all(|l| l.is_some_and(|l| l.index >= applied)))
            },
            "replication progress reaches the send",
        )
        .await?;
    let status = admin(leader)
        .await?
        .cluster_status(pb::ClusterStatusRequest {})
        .await?
        .into_inner();
    let g = &status.groups[0];
    assert!(g.term >= 1 && g.reported_by == leader_id);
    for r in &g.replicas {
        let want = if r.node_id == leader_id {
            pb::ReplicaRole::Leader
        } else {
            pb::ReplicaRole::Follower
        };
        assert_eq!(r.role, want as i32, "role of {}", r.node_id);
        // The leader knows how far each replica's log matches its own.
        assert!(
            r.matched_index >= Some(applied),
            "replica {} matched {:?}",
            r.node_id,
            r.matched_index
        );
    }
    cluster.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_bad_input_gets_its_own_status_and_nothing_partial_is_written() -> anyhow::Result<()> {
    let cluster = Cluster::start(3).await?;
    let leader = cluster.replica(cluster.wait_for_leader(DEADLINE).await?);
    create_topic(leader, TOPIC, QUEUES).await?;
    let mut client = messaging(leader).await?;
    let limits = MessagingConfig::default();

    let big_props = {
        let mut m = message(1);
        m.properties
            .insert("blob".into(), "p".repeat(limits.max_properties_bytes));
        m
    };
    let empty_body = pb::Message {
        body: vec![],
        ..message(2)
    };
    let huge_body = pb::Message {
        body: vec![7; limits.max_body_bytes + 1],
        ..message(3)
    };
    let other_topic = pb::Message {
        topic: "elsewhere".into(),
        ..message(4)
    };
    let bad_tag = pb::Message {
        tag: "A || B".into(),
        ..message(5)
    };
    let good = || (0..5).map(message).collect::<Vec<_>>();
    // For requests to other topics: messages that leave their topic to the request.
    let anonymous = || {
        (0..5)
            .map(|i| pb::Message {
                topic: String::new(),
                ..message(i)
            })
            .collect::<Vec<_>>()
    };
    let with_last = |bad: pb::Message| {
        let mut v = good();
        v.push(bad);
        v
    };
    let cases: Vec<(&str, pb::SendRequest, Code, &str)> = vec![
        (
            "unknown topic",
            send_request("nope", None, anonymous()),
            Code::NotFound,
            "\"nope\" does not exist",
        ),
        (
            "bad topic char",
            send_request("a/b", None, anonymous()),
            Code::InvalidArgument,
            "'/'",
        ),
        (
            "long topic",
            send_request(&"t".repeat(128), None, anonymous()),
            Code::InvalidArgument,
            "128 characters",
        ),
        (
            "no messages",
            send_request(TOPIC, None, vec![]),
            Code::InvalidArgument,
            "no messages",
        ),
        (
            "empty body",
            send_request(TOPIC, None, with_last(empty_body)),
            Code::InvalidArgument,
            "message 5: body is empty",
        ),
        (
            "huge body",
            send_request(TOPIC, None, with_last(huge_body)),
            Code::ResourceExhausted,
            "message 5: body of 4194305 bytes",
        ),
        (
            "properties",
            send_request(TOPIC, None, with_last(big_props)),
            Code::ResourceExhausted,
            "message 5: properties",
        ),
        (
            "topic mismatch",
            send_request(TOPIC, None, with_last(other_topic)),
            Code::InvalidArgument,
            "\"elsewhere\" differs",
        ),
        (
            "bad tag",
            send_request(TOPIC, None, with_last(bad_tag)),
            Code::InvalidArgument,
            "message 5: tag",
        ),
        (
            "queue range",
            send_request(TOPIC, Some(QUEUES), good()),
            Code::InvalidArgument,
            "queue_id 4 is out of range",
        ),
        (
            "batch count",
            send_request(
                TOPIC,
                None,
                (0..limits.max_batch_messages as u64 + 1).map(message).collect(),
            ),
            Code::ResourceExhausted,
            "1025 messages",
        ),
    ];
    for (what, req, code, text) in cases {
        let err = client.send(req).await.expect_err(what);
        assert_eq!(err.code(), code, "{what}: {err}");
        assert!(
            err.message().contains(text),
            "{what}: {:?} lacks {text:?}",
            err.message()
        );
    }

    let pulls: Vec<(&str, pb::PullRequest, Code, &str)> = vec![
        (
            "pull unknown topic",
            pull_request("nope", 0, 0, 1, 0, ""),
            Code::NotFound,
            "does not exist",
        ),
        (
            "pull queue range",
            pull_request(TOPIC, 9, 0, 1, 0, ""),
            Code::InvalidArgument,
            "queue_id 9",
        ),
        (
            "pull bad tags",
            pull_request(TOPIC, 0, 0, 1, 0, "A ||"),
            Code::InvalidArgument,
            "tag expression",
        ),
        (
            "pull bad topic",
            pull_request("a b", 0, 0, 1, 0, ""),
            Code::InvalidArgument,
            "' '",
        ),
    ];
    for (what, req, code, text) in pulls {
        let err = client.pull(req).await.expect_err(what);
        assert_eq!(err.code(), code, "{what}: {err}");
        assert!(
            err.message().contains(text),
            "{what}: {:?} lacks {text:?}",
            err.message()
        );
    }

    let mut admin = admin(leader).await?;
    let topic = |name: &str, queues: u32, perm: i32| pb::CreateTopicRequest {
        topic: Some(pb::TopicConfig {
            name: name.into(),
            queues_per_group: queues,
            perm,
            message_type: 0,
            trace: None,
        }),
        if_absent: false,
    };
    for (what, req, text) in [
        ("zero queues", topic("t1", 0, 6), "queues_per_group 0"),
        ("too many queues", topic("t1", 1025, 6), "queues_per_group 1025"),
        ("bad perm", topic("t1", 4, 99), "permission 99"),
        ("bad name", topic("t.1", 4, 6), "'.'"),
    ] {
        let err = admin.create_topic(req).await.expect_err(what);
        assert_eq!(err.code(), Code::InvalidArgument, "{what}: {err}");
        assert!(
            err.message().contains(text),
            "{what}: {:?} lacks {text:?}",
            err.message()
        );
    }

    // Nothing was written: no queue holds a message, no stray topic exists.
    let described = admin
        .describe_topic(pb::DescribeTopicRequest { name: TOPIC.into() })
        .await?
        .into_inner();
    assert!(described.queues.iter().all(|q| q.max_offset == 0), "{described:?}");
    let names: Vec<_> = admin
        .list_topics(pb::ListTopicsRequest {})
        .await?
        .into_inner()
        .topics
        .into_iter()
        .map(|t| t.name)
        .collect();
    assert_eq!(names, vec![TOPIC.to_owned()]);

    // And the group still serves.
    let ok = client.send(send_request(TOPIC, Some(2), good())).await?.into_inner();
    assert_eq!(
        ok.results.iter().map(|r| r.queue_offset).collect::<Vec<_>>(),
        vec![0, 1, 2, 3, 4]
    );
    let described = admin
        .describe_topic(pb::DescribeTopicRequest { name: TOPIC.into() })
        .await?
        .into_inner();
    let maxes: Vec<_> = described.queues.iter().map(|q| q.max_offset).collect();
    assert_eq!(maxes, vec![0, 0, 5, 0]);
    cluster.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tag_filter_returns_exactly_the_matching_messages_and_auto_creates_topics() -> anyhow::Result<()> {
    let cluster = Cluster::start_with(
        1,
        MessagingConfig {
            auto_create_topics: true,
            default_queues: 2,
            ..Default::default()
        },
    )
    .await?;
    let node = cluster.replica(cluster.wait_for_leader(DEADLINE).await?);
    let mut client = messaging(node).await?;
    let tags = ["TagA", "TagB", "TagC", ""];
    let msgs: Vec<pb::Message> = (0..300u64)
        .map(|i| pb::Message {
            topic: String::new(),
            tag: tags[(i % 4) as usize].into(),
            ..message(i)
        })
        .collect();
    for chunk in msgs.chunks(100) {
        client.send(send_request("auto-topic", Some(1), chunk.to_vec())).await?;
    }
    let described = admin(node)
        .await?
        .describe_topic(pb::DescribeTopicRequest {
            name: "auto-topic".into(),
        })
        .await?
        .into_inner();
    assert_eq!(
        described.topic.map(|t| t.queues_per_group),
        Some(2),
        "auto-created with default_queues"
    );

    let seqs = |ms: &[pb::PulledMessage]| -> anyhow::Result<Vec<u64>> {
        ms.iter()
            .map(|m| seq_of(m.message.as_ref().context("no message")?))
            .collect()
    };
    let a_or_c = pull_all(&mut client, "auto-topic", 1, "TagA || TagC").await?;
    let want: Vec<u64> = (0..300).filter(|i| i % 4 == 0 || i % 4 == 2).collect();
    assert_eq!(seqs(&a_or_c)?, want);
    assert_eq!(
        seqs(&pull_all(&mut client, "auto-topic", 1, "*").await?)?,
        (0..300).collect::<Vec<_>>()
    );

    // A short page stops right after its last match; skipped messages advance it.
    let page = client
        .pull(pull_request("auto-topic", 1, 0, 5, 0, " TagB "))
        .await?
        .into_inner();
    assert_eq!(seqs(&page.messages)?, vec![1, 5, 9, 13, 17]);
    assert_eq!(page.next_offset, 18);
    let none = client
        .pull(pull_request("auto-topic", 1, 0, 10, 0, "TagZ"))
        .await?
        .into_inner();
    assert!(none.messages.is_empty());
    assert_eq!(none.next_offset, 300, "filtered-out messages still advance next_offset");
    // Past the end: empty, and next_offset is the queue's max (documented).
    let past = client
        .pull(pull_request("auto-topic", 1, 1_000, 10, 0, ""))
        .await?
        .into_inner();
    assert!(past.messages.is_empty());
    assert_eq!((past.next_offset, past.max_offset), (300, 300));
    cluster.shutdown().await
}

/// (follower id, ms since it last acknowledged the leader) from the leader's
/// ClusterStatus: what `raftmq admin cluster` prints.
async fn follower_ack_ages(cluster: &Cluster, leader: u64) -> anyhow::Result<Vec<(u64, Option<u64>)>> {
    let status = admin(cluster.replica(leader))
        .await?
        .cluster_status(pb::ClusterStatusRequest::default())
        .await?
        .into_inner();
    let group = status.groups.first().context("no group in the status")?;
    Ok(group
        .replicas
        .iter()
        .filter(|r| r.node_id != leader)
        .map(|r| (r.node_id, r.last_ack_ms))
        .collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_that_lost_its_quorum_refuses_writes_at_once_instead_of_holding_them() -> anyhow::Result<()> {
    let mut cluster = Cluster::start(3).await?;
    let leader = cluster.wait_for_leader(DEADLINE).await?;
    create_topic(cluster.replica(leader), TOPIC, QUEUES).await?;
    let mut client = messaging(cluster.replica(leader)).await?;
    client.send(send_request(TOPIC, Some(0), vec![message(0)])).await?;
    for (id, ack) in follower_ack_ages(&cluster, leader).await? {
        ensure!(
            ack.is_some_and(|ms| ms < 1000),
            "follower {id} of a healthy group looks silent: {ack:?}"
        );
    }

    // Both followers crash: the leader is alone, and openraft keeps it Leader.
    let followers: Vec<_> = cluster.running().map(|r| r.id).filter(|&id| id != leader).collect();
    let lost_at = Instant::now();
    for id in followers {
        cluster.replica_mut(id).kill().await;
    }
    // Once a quorum has been silent for an election timeout (400 ms here), a send
    // is refused with UNAVAILABLE at once, rather than waiting out the client's
    // deadline. Until then a send may wait; bound each by a timeout. The test's
    // own deadline counts from the quorum's loss, not from the last kill.
    let within = DEADLINE.saturating_sub(lost_at.elapsed());
    let refused = eventually(within, "the isolated leader to refuse a write", async || {
        let started = Instant::now();
        let sent = tokio::time::timeout(
            Duration::from_secs(3),
            client.send(send_request(TOPIC, Some(0), vec![message(1)])),
        )
        .await;
        match sent {
            Ok(Err(status)) if status.code() == Code::Unavailable => Ok(Check::Done((status, started.elapsed()))),
            Ok(Ok(_)) => anyhow::bail!("a leader without a quorum acknowledged a write"),
            Ok(Err(other)) => anyhow::bail!("unexpected refusal: {other}"),
            Err(_) => Ok(Check::Pending(format!(
                "a send still unanswered after 3 s, {:?} after the quorum was lost",
                lost_at.elapsed()
            ))),
        }
    })
    .await?;
    eprintln!(
        "isolated leader refused after {:?} (that send answered in {:?}): {}",
        lost_at.elapsed(),
        refused.1,
        refused.0.message()
    );
    ensure!(
        refused.1 < Duration::from_millis(500),
        "the refusal itself took {:?}",
        refused.1
    );
    ensure!(refused.0.message().contains("no quorum"), "{}", refused.0.message());
    assert_eq!(cluster.replica(leader).metrics().state, ServerState::Leader);
    // Its cluster status says the followers are silent (what `admin cluster`
    // prints as UNREACHABLE).
    for (id, ack) in follower_ack_ages(&cluster, leader).await? {
        ensure!(
            ack.is_some_and(|ms| ms >= 400),
            "follower {id} should look silent: {ack:?}"
        );
    }
    cluster.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_to_a_just_elected_leader_succeeds_and_the_old_one_redirects_to_it() -> anyhow::Result<()> {
    let cluster = Cluster::start(3).await?;
    let old = cluster.wait_for_leader(DEADLINE).await?;
    create_topic(cluster.replica(old), TOPIC, QUEUES).await?;
    let new = if old == 3 { 2 } else { 3 };
    cluster
        .replica(old)
        .node()
        .raft()
        .trigger()
        .transfer_leader(new)
        .await?;
    // Send the moment the new node calls itself leader, before a quorum has
    // necessarily confirmed it: the broker retries internally rather than
    // bouncing the producer with "not leader" pointing at itself.
    let target = cluster.replica(new);
    let mut metrics = target.node().raft().metrics();
    while metrics.borrow_watched().state != ServerState::Leader {
        tokio::time::timeout(DEADLINE, metrics.changed()).await??;
    }
    let started = Instant::now();
    let sent = messaging(target)
        .await?
        .send(send_request(TOPIC, Some(0), vec![message(0)]))
        .await?
        .into_inner();
    eprintln!("send to the new leader answered in {:?}", started.elapsed());
    assert_eq!(sent.results[0].queue_offset, 0);

    // The old leader, once it knows the new one, redirects there.
    let mut old_metrics = cluster.replica(old).node().raft().metrics();
    while old_metrics.borrow_watched().current_leader != Some(new) {
        tokio::time::timeout(DEADLINE, old_metrics.changed()).await??;
    }
    let err = messaging(cluster.replica(old))
        .await?
        .send(send_request(TOPIC, None, vec![message(1)]))
        .await
        .expect_err("old leader refuses");
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert_eq!(leader_of(&err), Some(target.addr.to_string().as_str()));
    cluster.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_poll_wakes_when_a_message_arrives_and_times_out_empty() -> anyhow::Result<()> {
    let cluster = Cluster::start(3).await?;
    let leader_id = cluster.wait_for_leader(DEADLINE).await?;
    let leader = cluster.replica(leader_id);
    let follower = cluster.running().find(|r| r.id != leader_id).context("a follower")?;
    create_topic(leader, TOPIC, QUEUES).await?;
    // The follower must know the topic before it can long-poll it; the topic
    // is the leader's last log entry by now.
    let created = leader.metrics().last_log_index.context("empty log")?;
    cluster.wait_applied(created).await?;

    // Nothing arrives: empty after max_wait, not before, not much after.
    let mut on_follower = messaging(follower).await?;
    let started = Instant::now();
    let empty = on_follower
        .pull(pull_request(TOPIC, 0, 0, 10, 300, ""))
        .await?
        .into_inner();
    let waited = started.elapsed();
    assert!(empty.messages.is_empty() && empty.next_offset == 0);
    assert!(
        waited >= Duration::from_millis(300) && waited < Duration::from_secs(3),
        "waited {waited:?}"
    );

    // A message sent during the wait ends it at once, on a follower too. The
    // follower's apply notification is what wakes it.
    let mut leader_metrics = leader.node().raft().metrics();
    let poll = tokio::spawn(async move {
        let started = Instant::now();
        let resp = on_follower.pull(pull_request(TOPIC, 0, 0, 10, 20_000, "")).await;
        (resp, started.elapsed())
    });
    // Send only once the poll is surely parked on the server: wait until the
    // follower has acknowledged a heartbeat sent after the poll was spawned (a
    // round trip over the same loopback, on the follower's server), and check
    // the poll has not answered.
    let spawned = <openraft::alias::InstantOf<raftmq_raft_store::TypeConfig> as openraft::Instant>::now();
    loop {
        let acked = leader_metrics
            .borrow_watched()
            .heartbeat
            .as_ref()
            .and_then(|h| h.get(&follower.id).cloned().flatten())
            .map(|at| *at);
        if acked.is_some_and(|at| at > spawned) {
            break;
        }
        tokio::time::timeout(DEADLINE, leader_metrics.changed()).await??;
    }
    ensure!(!poll.is_finished(), "the long poll answered before anything was sent");
    messaging(leader)
        .await?
        .send(send_request(TOPIC, Some(0), vec![message(42)]))
        .await?;
    let (resp, took) = poll.await?;
    let resp = resp?.into_inner();
    ensure!(
        resp.messages.len() == 1,
        "long poll answered {:?} after {took:?}; the follower now holds {} message(s) in queue 0 and its metrics say {}",
        resp,
        follower.store().queue_next_offset(TOPIC, 0)?,
        follower.metrics()
    );
    assert_eq!(seq_of(resp.messages[0].message.as_ref().context("no message")?)?, 42);
    assert!(
        took < Duration::from_secs(5),
        "long poll took {took:?} for a message that arrived"
    );
    eprintln!("long poll answered {took:?} after it started (empty poll waited {waited:?})");
    cluster.shutdown().await
}
