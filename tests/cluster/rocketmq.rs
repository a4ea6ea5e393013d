//! RocketMQ 5's gRPC API (`apache.rocketmq.v2.MessagingService`) against a
//! three-replica group, spoken as the official SDKs speak it (tonic client from
//! our copy of the upstream protos, `x-mq-client-id` on every call), always to
//! a node that does not lead, because SDKs keep whatever endpoint their route
//! named: routes, a send retried with the same message id stored once, the
//! receive stream's order and fields, acks, FIFO, the type check, Settings over
//! Telemetry and a transaction check-back, a leader kill mid-way that loses
//! no acknowledged message, and a message traced at the SDK's request.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use raftmq_broker::MessagingConfig;
use raftmq_proto::rocketmq::v2;
use raftmq_proto::rocketmq::v2::messaging_service_client::MessagingServiceClient;
use raftmq_proto::v1 as pb;
use tonic::transport::Channel;
use v2::Code;

use raftmq_client::Client;

use super::fixtures::{Check, Cluster, DEADLINE, NameServer, eventually, start_with_client_using};

const CLIENT_ID: &str = "test-host@1@0@rmq5";

fn req<T>(msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut()
        .insert("x-mq-client-id", CLIENT_ID.parse().expect("ascii"));
    // Sent by the Python SDK even without credentials; must be accepted.
    r.metadata_mut().insert(
        "authorization",
        "MQv2-HMAC-SHA1 Credential=, SignedHeaders=x-mq-date-time, Signature=00"
            .parse()
            .expect("ascii"),
    );
    r
}

fn res(name: &str) -> Option<v2::Resource> {
    Some(v2::Resource {
        resource_namespace: String::new(),
        name: name.to_owned(),
    })
}

fn code(s: &Option<v2::Status>) -> i32 {
    s.as_ref().map_or(0, |s| s.code)
}

async fn connect(cluster: &Cluster, node: u64) -> anyhow::Result<MessagingServiceClient<Channel>> {
    let addr = cluster.replica(node).addr;
    Ok(MessagingServiceClient::connect(format!("http://{addr}")).await?)
}

/// An SDK-made id: 34 hex characters, unique per `n`.
fn sdk_id(n: u64) -> String {
    format!("01{:032X}", 0xABCD_0000_0000_0000u64 + n)
}

fn message(topic: &str, n: u64, kind: v2::MessageType, group: Option<&str>) -> v2::Message {
    v2::Message {
        topic: res(topic),
        user_properties: [("n".to_owned(), n.to_string())].into(),
        system_properties: Some(v2::SystemProperties {
            tag: Some("tagA".into()),
            keys: vec![format!("key-{n}")],
            message_id: sdk_id(n),
            message_type: kind as i32,
            body_encoding: v2::Encoding::Identity as i32,
            born_timestamp: Some(prost_types::Timestamp { seconds: 1, nanos: 0 }),
            message_group: group.map(str::to_owned),
            ..Default::default()
        }),
        body: format!("body-{n}").into_bytes(),
    }
}

async fn send(client: &mut MessagingServiceClient<Channel>, m: v2::Message) -> anyhow::Result<v2::SendMessageResponse> {
    Ok(client
        .send_message(req(v2::SendMessageRequest { messages: vec![m] }))
        .await?
        .into_inner())
}

/// One ReceiveMessage, checked for the stream shape SDKs rely on: a status
/// first, then messages, then the delivery timestamp last.
async fn receive(
    client: &mut MessagingServiceClient<Channel>,
    topic: &str,
    group: &str,
    invisible: Duration,
    poll: Duration,
) -> anyhow::Result<(i32, Vec<v2::Message>)> {
    let mut r = req(v2::ReceiveMessageRequest {
        group: res(group),
        message_queue: Some(v2::MessageQueue {
            topic: res(topic),
            id: 0,
            ..Default::default()
        }),
        filter_expression: Some(v2::FilterExpression {
            r#type: v2::FilterType::Tag as i32,
            expression: "*".into(),
        }),
        batch_size: 32,
        invisible_duration: Some(prost_types::Duration {
            seconds: invisible.as_secs() as i64,
            nanos: 0,
        }),
        auto_renew: false,
        long_polling_timeout: Some(prost_types::Duration {
            seconds: poll.as_secs() as i64,
            nanos: 0,
        }),
        attempt_id: None,
    });
    r.set_timeout(poll + Duration::from_secs(3));
    let mut stream = client.receive_message(r).await?.into_inner();
    let mut parts = Vec::new();
    while let Some(m) = stream.message().await? {
        parts.push(
            m.content
                .context("a response without content (the Rust SDK unwraps it)")?,
        );
    }
    use v2::receive_message_response::Content;
    let Some(Content::Status(status)) = parts.first() else {
        bail!("the stream does not start with a status: {parts:?}");
    };
    let status = status.code;
    ensure!(
        matches!(parts.last(), Some(Content::DeliveryTimestamp(_))),
        "the stream does not end with the delivery timestamp"
    );
    let messages = parts
        .into_iter()
        .filter_map(|c| match c {
            Content::Message(m) => Some(m),
            _ => None,
        })
        .collect();
    Ok((status, messages))
}

async fn ack(
    client: &mut MessagingServiceClient<Channel>,
    topic: &str,
    group: &str,
    m: &v2::Message,
) -> anyhow::Result<i32> {
    let sys = m.system_properties.as_ref().context("system properties")?;
    let resp = client
        .ack_message(req(v2::AckMessageRequest {
            group: res(group),
            topic: res(topic),
            entries: vec![v2::AckMessageEntry {
                message_id: sys.message_id.clone(),
                receipt_handle: sys.receipt_handle.clone().context("receipt handle")?,
                lite_topic: None,
            }],
        }))
        .await?
        .into_inner();
    ensure!(
        resp.entries.len() == 1,
        "an ack answer without its entry (the Rust SDK panics)"
    );
    Ok(code(&resp.status))
}

fn follower_of(cluster: &Cluster, leader: u64) -> u64 {
    cluster
        .running()
        .map(|r| r.id)
        .find(|&id| id != leader)
        .expect("a follower")
}

async fn query_route(c: &mut MessagingServiceClient<Channel>, topic: &str) -> anyhow::Result<v2::QueryRouteResponse> {
    Ok(c.query_route(req(v2::QueryRouteRequest {
        topic: res(topic),
        endpoints: None,
    }))
    .await?
    .into_inner())
}

/// A NameServer, three replicas and an admin client, and an SDK-like client
/// connected to a follower (returned with its node id).
async fn setup() -> anyhow::Result<(NameServer, Cluster, Client, u64, MessagingServiceClient<Channel>)> {
    let (ns, cluster, admin) = start_with_client_using(quick()).await?;
    let leader = cluster.wait_for_leader(DEADLINE).await?;
    let follower = follower_of(&cluster, leader);
    let c = connect(&cluster, follower).await?;
    Ok((ns, cluster, admin, follower, c))
}

fn quick() -> MessagingConfig {
    MessagingConfig {
        auto_create_topics: true,
        transaction_first_check: Duration::from_millis(300),
        transaction_check_interval: Duration::from_millis(500),
        ..MessagingConfig::default()
    }
}

#[tokio::test]
async fn rocketmq5_sdk_calls_work_through_a_follower() -> anyhow::Result<()> {
    let (ns, cluster, admin, follower, mut c) = setup().await?;
    let topic = "rmq5-normal";

    // A route for a new topic (auto-created, MIXED): every queue on broker id 0,
    // every message type accepted.
    let route = query_route(&mut c, topic).await?;
    ensure!(code(&route.status) == Code::Ok as i32, "route: {:?}", route.status);
    ensure!(!route.message_queues.is_empty(), "no queues");
    for q in &route.message_queues {
        let b = q.broker.as_ref().context("broker")?;
        let e = b.endpoints.as_ref().context("endpoints")?;
        ensure!(
            b.id == 0 && q.permission == v2::Permission::ReadWrite as i32,
            "queue {q:?}"
        );
        // One address (Python's grpcio cannot dial a list against our HTTP/2
        // server): the node that answered, which forwards to the leader.
        let me = cluster.replica(follower).addr;
        ensure!(e.scheme == v2::AddressScheme::IPv4 as i32, "endpoints {e:?}");
        ensure!(
            e.addresses
                == vec![v2::Address {
                    host: me.ip().to_string(),
                    port: i32::from(me.port())
                }],
            "endpoints {e:?}, expected this node {me}"
        );
        ensure!(
            q.accept_message_types.len() == 4,
            "accepts {:?}",
            q.accept_message_types
        );
    }
    // The Rust SDK balances over a list and never re-queries: every replica.
    let mut rust = req(v2::QueryRouteRequest {
        topic: res(topic),
        endpoints: None,
    });
    rust.metadata_mut().insert("x-mq-language", "RUST".parse()?);
    let route = c.query_route(rust).await?.into_inner();
    for q in &route.message_queues {
        let e = q
            .broker
            .as_ref()
            .and_then(|b| b.endpoints.as_ref())
            .context("endpoints")?;
        ensure!(e.addresses.len() == 3, "a Rust SDK's endpoints {e:?}");
    }

    // Sends, each retried once with the same id as the Python SDK does: the
    // retry is answered OK and stored once.
    for n in 0..10 {
        for _ in 0..2 {
            let r = send(&mut c, message(topic, n, v2::MessageType::Normal, None)).await?;
            ensure!(code(&r.status) == Code::Ok as i32, "send {n}: {:?}", r.status);
            ensure!(
                r.entries.len() == 1 && r.entries[0].message_id == sdk_id(n),
                "entries {:?}",
                r.entries
            );
        }
    }

    // Received with everything an SDK checks, each id once, then acked.
    let group = "rmq5-group";
    let mut seen = BTreeMap::new();
    let got = eventually(DEADLINE, "all ten messages received", async || {
        let (status, messages) = receive(&mut c, topic, group, Duration::from_secs(30), Duration::from_secs(1)).await?;
        ensure!(
            status == Code::Ok as i32 || status == Code::MessageNotFound as i32,
            "receive status {status}"
        );
        for m in messages {
            let sys = m.system_properties.clone().context("system properties")?;
            ensure!(
                sys.body_encoding == v2::Encoding::Identity as i32,
                "encoding {:?}",
                sys.body_encoding
            );
            ensure!(sys.delivery_attempt == Some(1), "attempt {:?}", sys.delivery_attempt);
            let digest = sys.body_digest.clone().context("digest")?;
            ensure!(
                digest.checksum == format!("{:08X}", crc32fast::hash(&m.body)),
                "digest {digest:?}"
            );
            ensure!(!m.user_properties.contains_key("UNIQ_KEY"), "internal property leaked");
            ensure!(sys.tag.as_deref() == Some("tagA"), "tag {:?}", sys.tag);
            ensure!(
                seen.insert(sys.message_id.clone(), m).is_none(),
                "{} delivered twice",
                sys.message_id
            );
        }
        Ok(if seen.len() >= 10 {
            Check::Done(seen.len())
        } else {
            Check::Pending(format!("{} received", seen.len()))
        })
    })
    .await?;
    ensure!(
        got == 10,
        "received {got}, expected exactly the 10 sent (retries stored once)"
    );
    for (id, m) in &seen {
        ensure!((0..10).any(|n| sdk_id(n) == *id), "id {id} is not one the SDK made");
        ensure!(ack(&mut c, topic, group, m).await? == Code::Ok as i32, "ack of {id}");
    }
    let (status, again) = receive(&mut c, topic, group, Duration::from_secs(30), Duration::from_secs(1)).await?;
    ensure!(
        again.is_empty() && status == Code::MessageNotFound as i32,
        "acked messages came back: {again:?}"
    );
    // A long poll longer than the client's deadline (the Rust SDK's deadline
    // equals its long-polling timeout) ends in time, as "no message".
    let started = std::time::Instant::now();
    let mut r = req(v2::ReceiveMessageRequest {
        group: res(group),
        message_queue: Some(v2::MessageQueue {
            topic: res(topic),
            ..Default::default()
        }),
        long_polling_timeout: Some(prost_types::Duration { seconds: 30, nanos: 0 }),
        ..Default::default()
    });
    r.set_timeout(Duration::from_secs(4));
    let mut stream = c.receive_message(r).await?.into_inner();
    let mut first = None;
    while let Some(m) = stream.message().await? {
        first = first.or(m.content);
    }
    ensure!(
        matches!(first, Some(v2::receive_message_response::Content::Status(ref s)) if s.code == Code::MessageNotFound as i32),
        "a long poll past the deadline answered {first:?}"
    );
    ensure!(
        started.elapsed() < Duration::from_secs(4),
        "the long poll outlived the client's deadline"
    );
    // A second ack of the same handle is a stale handle, by its RocketMQ code.
    let first = seen.values().next().context("a message")?;
    ensure!(
        ack(&mut c, topic, group, first).await? == Code::InvalidReceiptHandle as i32,
        "stale ack accepted"
    );

    // Bad input gets its own code.
    let mut no_id = tonic::Request::new(v2::SendMessageRequest {
        messages: vec![message(topic, 99, v2::MessageType::Normal, None)],
    });
    no_id.metadata_mut().remove("x-mq-client-id");
    let r = c.send_message(no_id).await?.into_inner();
    ensure!(
        code(&r.status) == Code::ClientIdRequired as i32,
        "no client id: {:?}",
        r.status
    );
    let r = send(&mut c, message(topic, 98, v2::MessageType::Fifo, None)).await?;
    ensure!(
        code(&r.status) == Code::MessagePropertyConflictWithType as i32,
        "FIFO without group: {:?}",
        r.status
    );
    let mut far = message(topic, 97, v2::MessageType::Delay, None);
    if let Some(s) = far.system_properties.as_mut() {
        // A millisecond value where the SDK means seconds: year ~58000.
        s.delivery_timestamp = Some(prost_types::Timestamp {
            seconds: 1_800_000_000_000,
            nanos: 0,
        });
    }
    let r = send(&mut c, far).await?;
    ensure!(
        code(&r.status) == Code::IllegalDeliveryTime as i32,
        "far delivery: {:?}",
        r.status
    );

    // A FIFO topic refuses NORMAL messages; its groups are delivered in order.
    admin
        .admin()
        .create_topic_with_type("rmq5-fifo", 4, pb::Permission::ReadWrite, pb::MessageType::Fifo)
        .await?;
    eventually(DEADLINE, "the FIFO topic on the follower", async || {
        let r = query_route(&mut c, "rmq5-fifo").await?;
        Ok(match r.message_queues.first() {
            Some(q) if q.accept_message_types == vec![v2::MessageType::Fifo as i32] => Check::Done(()),
            other => Check::Pending(format!("{other:?}")),
        })
    })
    .await?;
    let r = send(&mut c, message("rmq5-fifo", 1, v2::MessageType::Normal, None)).await?;
    ensure!(
        code(&r.status) == Code::MessagePropertyConflictWithType as i32,
        "NORMAL on FIFO: {:?}",
        r.status
    );
    for n in 0..6 {
        let g = if n % 2 == 0 { "even" } else { "odd" };
        let r = send(&mut c, message("rmq5-fifo", 100 + n, v2::MessageType::Fifo, Some(g))).await?;
        ensure!(code(&r.status) == Code::Ok as i32, "FIFO send: {:?}", r.status);
    }
    let mut order: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    eventually(DEADLINE, "six FIFO messages in order", async || {
        let (_, messages) = receive(
            &mut c,
            "rmq5-fifo",
            "rmq5-fifo-group",
            Duration::from_secs(30),
            Duration::from_secs(1),
        )
        .await?;
        for m in messages {
            let sys = m.system_properties.clone().context("system properties")?;
            ensure!(
                sys.message_type == v2::MessageType::Fifo as i32,
                "type {:?}",
                sys.message_type
            );
            let n: u64 = m.user_properties.get("n").context("n")?.parse()?;
            order
                .entry(sys.message_group.clone().context("group")?)
                .or_default()
                .push(n);
            ensure!(
                ack(&mut c, "rmq5-fifo", "rmq5-fifo-group", &m).await? == Code::Ok as i32,
                "FIFO ack"
            );
        }
        let total: usize = order.values().map(Vec::len).sum();
        Ok(if total >= 6 {
            Check::Done(())
        } else {
            Check::Pending(format!("{order:?}"))
        })
    })
    .await?;
    ensure!(
        order.get("even") == Some(&vec![100, 102, 104]) && order.get("odd") == Some(&vec![101, 103, 105]),
        "order {order:?}"
    );

    drop(c);
    cluster.shutdown().await?;
    ns.stop().await
}

#[tokio::test]
async fn rocketmq5_telemetry_settings_and_a_transaction_check_back() -> anyhow::Result<()> {
    let (ns, cluster, _admin, _, mut c) = setup().await?;
    let topic = "rmq5-txn";
    let route = query_route(&mut c, topic).await?;
    ensure!(code(&route.status) == Code::Ok as i32, "route: {:?}", route.status);

    // A producer's Settings: the answer has status OK and a max body size, or
    // the Python SDK ignores it and refuses every send.
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    let settings = v2::Settings {
        client_type: Some(v2::ClientType::Producer as i32),
        pub_sub: Some(v2::settings::PubSub::Publishing(v2::Publishing {
            topics: vec![v2::Resource {
                resource_namespace: String::new(),
                name: topic.into(),
            }],
            max_body_size: 0,
            validate_message_type: false,
        })),
        ..Default::default()
    };
    tx.send(v2::TelemetryCommand {
        status: None,
        command: Some(v2::telemetry_command::Command::Settings(settings)),
    })
    .await?;
    let mut telemetry = c
        .telemetry(req(tokio_stream::wrappers::ReceiverStream::new(rx)))
        .await?
        .into_inner();
    let reply = tokio::time::timeout(DEADLINE, telemetry.message())
        .await
        .context("no Settings reply")??
        .context("stream ended")?;
    ensure!(
        code(&reply.status) == Code::Ok as i32,
        "settings status {:?}",
        reply.status
    );
    let Some(v2::telemetry_command::Command::Settings(s)) = reply.command else {
        bail!("the reply is not Settings: {reply:?}");
    };
    let Some(v2::settings::PubSub::Publishing(p)) = s.pub_sub else {
        bail!("no publishing settings");
    };
    ensure!(p.max_body_size > 0, "max_body_size {}", p.max_body_size);

    // A transactional send left unresolved: the leader checks back through the
    // follower's Telemetry stream; the answer commits it, and it is delivered.
    let r = send(&mut c, message(topic, 7, v2::MessageType::Transaction, None)).await?;
    ensure!(code(&r.status) == Code::Ok as i32, "transactional send: {:?}", r.status);
    let txn = r.entries[0].transaction_id.clone();
    ensure!(!txn.is_empty(), "no transaction id");
    let (_, none) = receive(
        &mut c,
        topic,
        "rmq5-txn-group",
        Duration::from_secs(30),
        Duration::from_secs(0),
    )
    .await?;
    ensure!(none.is_empty(), "a half message was delivered");
    let check = tokio::time::timeout(DEADLINE, async {
        loop {
            match telemetry.message().await? {
                Some(v2::TelemetryCommand {
                    command: Some(v2::telemetry_command::Command::RecoverOrphanedTransactionCommand(c)),
                    ..
                }) => return anyhow::Ok(c),
                Some(_) => continue,
                None => bail!("telemetry ended before a check-back"),
            }
        }
    })
    .await
    .context("no check-back within the deadline")??;
    ensure!(
        check.transaction_id == txn,
        "check of {} for {txn}",
        check.transaction_id
    );
    let checked = check.message.and_then(|m| m.system_properties).map(|s| s.message_id);
    ensure!(
        checked.as_deref() == Some(sdk_id(7).as_str()),
        "checked message id {checked:?}"
    );
    let end = c
        .end_transaction(req(v2::EndTransactionRequest {
            topic: res(topic),
            message_id: sdk_id(7),
            transaction_id: txn,
            resolution: v2::TransactionResolution::Commit as i32,
            source: v2::TransactionSource::SourceServerCheck as i32,
            trace_context: String::new(),
        }))
        .await?
        .into_inner();
    ensure!(code(&end.status) == Code::Ok as i32, "end: {:?}", end.status);
    let (_, got) = receive(
        &mut c,
        topic,
        "rmq5-txn-group",
        Duration::from_secs(30),
        Duration::from_secs(5),
    )
    .await?;
    let ids: Vec<_> = got
        .iter()
        .filter_map(|m| m.system_properties.as_ref().map(|s| s.message_id.clone()))
        .collect();
    ensure!(ids == vec![sdk_id(7)], "after commit got {ids:?}");
    ensure!(
        got[0].system_properties.as_ref().map(|s| s.message_type) == Some(v2::MessageType::Transaction as i32),
        "committed message type"
    );
    drop(tx);
    drop(c);
    cluster.shutdown().await?;
    ns.stop().await
}

/// The leader is killed while a follower keeps serving an SDK-like producer
/// (three attempts per message, same id) and consumer: every acknowledged send
/// is delivered, once, and a handle received before the kill acks after it.
#[tokio::test]
async fn rocketmq5_a_leader_kill_loses_no_acknowledged_message() -> anyhow::Result<()> {
    let (ns, mut cluster, _admin, _, mut c) = setup().await?;
    let leader = cluster.wait_for_leader(DEADLINE).await?;
    let (topic, group) = ("rmq5-kill", "rmq5-kill-group");
    let mut acked = BTreeSet::new();
    let send_sdk_like = async |c: &mut MessagingServiceClient<Channel>, n: u64| -> anyhow::Result<bool> {
        for _ in 0..3 {
            if let Ok(r) = send(c, message(topic, n, v2::MessageType::Normal, None)).await
                && code(&r.status) == Code::Ok as i32
            {
                return Ok(true);
            }
        }
        Ok(false)
    };
    for n in 0..20 {
        if send_sdk_like(&mut c, n).await? {
            acked.insert(sdk_id(n));
        }
    }
    ensure!(acked.len() == 20, "sends before the kill failed");
    // One message received (invisible for a while) before the kill, acked after.
    let (_, before) = eventually(DEADLINE, "a first receive", async || {
        let r = receive(&mut c, topic, group, Duration::from_secs(60), Duration::from_secs(1)).await?;
        Ok(if r.1.is_empty() {
            Check::Pending("nothing yet".into())
        } else {
            Check::Done(r)
        })
    })
    .await?;
    cluster.replica_mut(leader).kill().await;
    for n in 20..40 {
        if send_sdk_like(&mut c, n).await? {
            acked.insert(sdk_id(n));
        }
    }
    let new_leader = cluster.wait_for_leader_other_than(Some(leader), DEADLINE).await?;
    ensure!(new_leader != leader, "no new leader");
    for m in &before {
        ensure!(
            ack(&mut c, topic, group, m).await? == Code::Ok as i32,
            "ack across the failover"
        );
    }
    let mut delivered: BTreeSet<String> = before
        .iter()
        .filter_map(|m| m.system_properties.as_ref().map(|s| s.message_id.clone()))
        .collect();
    eventually(
        Duration::from_secs(30),
        "every acknowledged message delivered",
        async || {
            let (_, messages) = receive(&mut c, topic, group, Duration::from_secs(60), Duration::from_secs(1)).await?;
            for m in messages {
                let id = m
                    .system_properties
                    .as_ref()
                    .map(|s| s.message_id.clone())
                    .unwrap_or_default();
                ensure!(delivered.insert(id.clone()), "{id} delivered again after its ack");
                ensure!(ack(&mut c, topic, group, &m).await? == Code::Ok as i32, "ack of {id}");
            }
            let missing: Vec<_> = acked.difference(&delivered).collect();
            Ok(if missing.is_empty() {
                Check::Done(())
            } else {
                Check::Pending(format!("missing {missing:?}"))
            })
        },
    )
    .await?;
    ensure!(
        acked.len() >= 35,
        "only {} of 40 sends succeeded across one failover",
        acked.len()
    );
    drop(c);
    cluster.shutdown().await?;
    ns.stop().await
}

/// An SDK asks for a message trace with the user property `TRACE_ON=true`: the
/// message's send, receive and ack through a follower are in its trace, keyed by
/// raftmq's id (found by the SDK's key), naming the SDK's client id.
#[tokio::test]
async fn rocketmq5_a_message_with_trace_on_is_traced_from_send_to_ack() -> anyhow::Result<()> {
    use raftmq_proto::v1::TraceEventKind as Kind;
    let (ns, cluster, admin, _, mut c) = setup().await?;
    let (topic, group) = ("rmq5-traced", "rmq5-trace-group");
    query_route(&mut c, topic).await?;
    let mut m = message(topic, 1, v2::MessageType::Normal, None);
    m.user_properties.insert("TRACE_ON".into(), "true".into());
    let sent = send(&mut c, m).await?;
    ensure!(code(&sent.status) == Code::Ok as i32, "send: {:?}", sent.status);
    let messages = eventually(DEADLINE, "the traced message received", async || {
        let (_, messages) = receive(&mut c, topic, group, Duration::from_secs(30), Duration::from_secs(1)).await?;
        Ok(if messages.is_empty() {
            Check::Pending("nothing received".into())
        } else {
            Check::Done(messages)
        })
    })
    .await?;
    ensure!(ack(&mut c, topic, group, &messages[0]).await? == Code::Ok as i32, "ack");
    let stored = admin.admin().query_messages_by_key(topic, "key-1", 1).await?;
    let id = &stored.first().context("the message by its key")?.message_id;
    let events = eventually(DEADLINE, "three trace events", async || {
        let events = admin.admin().trace(id).await?;
        Ok(if events.len() >= 3 {
            Check::Done(events)
        } else {
            Check::Pending(format!("{events:?}"))
        })
    })
    .await?;
    let shape: Vec<_> = events.iter().map(|e| (e.kind(), e.attempt)).collect();
    ensure!(
        shape == [(Kind::Produced, 0), (Kind::Delivered, 1), (Kind::Acked, 1)],
        "{events:?}"
    );
    ensure!(
        events[0].producer == format!("rmq5:{CLIENT_ID}") && events[1].client_id == CLIENT_ID,
        "{events:?}"
    );
    ensure!(events[1..].iter().all(|e| e.consumer_group == group), "{events:?}");
    drop(c);
    cluster.shutdown().await?;
    ns.stop().await
}
