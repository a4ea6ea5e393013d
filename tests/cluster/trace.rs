//! Message traces (issue #19): a traced message followed from its send to its
//! ack, and through retries to the dead-letter queue, by POP and by a push
//! consumer; the trace read through a new leader after the old one was killed;
//! and an untraced topic leaving no trace at all. Everything is read back as a
//! user would, with `Admin::trace` (the `QueryTrace` RPC behind
//! `raftmq admin trace`).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, ensure};
use raftmq_client::push::dlq_topic;
use raftmq_client::{Client, ConsumeMode, ConsumeResult, PushConsumer, StartFrom};
use raftmq_proto::v1 as pb;
use raftmq_proto::v1::TraceEventKind as Kind;

use super::fixtures::{
    Check, DEADLINE, GROUP, ONE_AT_A_TIME, eventually, message, pull_everything, raft_index_of, start_with_client,
    wait_for_known_route,
};

/// The trace topic's name (RocketMQ's default).
const TRACE_TOPIC: &str = "RMQ_SYS_TRACE_TOPIC";

/// Creates `topic` with one queue, message trace on or off.
async fn create_topic(client: &Client, topic: &str, trace: bool) -> anyhow::Result<()> {
    client
        .admin()
        .create_topic_with(
            pb::TopicConfig {
                name: topic.into(),
                queues_per_group: 1,
                perm: pb::Permission::ReadWrite as i32,
                message_type: pb::MessageType::Normal as i32,
                trace: Some(trace),
            },
            &[],
        )
        .await?;
    wait_for_known_route(client, topic).await?;
    Ok(())
}

/// `(kind, attempt)` of each event: the shape of a timeline.
fn shape(events: &[pb::TraceEvent]) -> Vec<(Kind, u32)> {
    events.iter().map(|e| (e.kind(), e.attempt)).collect()
}

/// Waits until `id`'s trace has `want` events, and returns them.
async fn trace_of(client: &Client, id: &str, want: usize) -> anyhow::Result<Vec<pb::TraceEvent>> {
    eventually(
        Duration::from_secs(20),
        &format!("{want} trace events of {id}"),
        async || {
            let events = client.admin().trace(id).await?;
            Ok(if events.len() >= want {
                Check::Done(events)
            } else {
                Check::Pending(format!("{:?}", shape(&events)))
            })
        },
    )
    .await
}

/// The checks every timeline passes: one message, sorted by time, recorded by
/// this group, and a PRODUCED first that names the entry that stored it.
fn check_timeline(events: &[pb::TraceEvent], id: &str, topic: &str) -> anyhow::Result<()> {
    ensure!(
        events.windows(2).all(|w| w[0].time_ms <= w[1].time_ms),
        "not sorted by time: {events:?}"
    );
    ensure!(
        events
            .iter()
            .all(|e| e.message_id == id && e.topic == topic && e.broker_group == GROUP && e.node_id > 0),
        "{events:?}"
    );
    let produced = events.first().context("no events")?;
    ensure!(produced.kind() == Kind::Produced, "first event {produced:?}");
    ensure!(
        produced.raft_index > 0 && produced.raft_index == raft_index_of(id)?,
        "PRODUCED names Raft index {}, the id {}",
        produced.raft_index,
        raft_index_of(id)?
    );
    Ok(())
}

/// Waits for `id`'s timeline to have `want`'s shape, checks it as
/// [`check_timeline`] does, and returns it.
async fn followed(
    client: &Client,
    (id, topic): (&str, &str),
    want: &[(Kind, u32)],
) -> anyhow::Result<Vec<pb::TraceEvent>> {
    let events = trace_of(client, id, want.len()).await?;
    check_timeline(&events, id, topic)?;
    ensure!(shape(&events) == want, "want {want:?}, got {events:?}");
    Ok(events)
}

/// A life of `deliveries` failed deliveries, each retried but the last, which
/// is dead-lettered.
fn through_the_dlq(deliveries: u32) -> Vec<(Kind, u32)> {
    let mut life = vec![(Kind::Produced, 0)];
    for a in 1..=deliveries {
        life.push((Kind::Delivered, a));
        life.push((
            if a < deliveries {
                Kind::Retried
            } else {
                Kind::DeadLettered
            },
            a,
        ));
    }
    life
}

/// Sent, delivered once, acked.
const ACKED: [(Kind, u32); 3] = [(Kind::Produced, 0), (Kind::Delivered, 1), (Kind::Acked, 1)];

/// A push consumer of `topic` in group `cg` answering every message with `answer`.
fn push_consumer(client: &Client, cg: &str, topic: &str, answer: ConsumeResult) -> anyhow::Result<PushConsumer> {
    Ok(client
        .push_consumer(cg, topic)
        .start_from(StartFrom::First)
        .mode(ConsumeMode::Concurrent { workers: 2 })
        .start(move |_m: pb::PulledMessage| async move { answer })?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_message_of_a_traced_topic_is_followed_from_send_through_pop_to_ack() -> anyhow::Result<()> {
    let _turn = ONE_AT_A_TIME.lock().await;
    let (ns, cluster, client) = start_with_client().await?;
    create_topic(&client, "trace-pop", true).await?;
    // An untraced producer: the topic's setting is enough.
    let sent = client.producer().send("trace-pop", message(1, None)).await?;
    let consumer = client
        .simple_consumer("tp-group", "trace-pop")
        .client_id("pop-member-1")
        .invisible_duration(Duration::from_secs(30));
    let got = consumer.receive(1, Duration::from_secs(5)).await?;
    let m = got.first().context("nothing received")?;
    ensure!(m.message.message_id == sent.message_id, "{m:?}");
    consumer.ack(m).await?;

    let events = followed(&client, (&sent.message_id, "trace-pop"), &ACKED).await?;
    let (produced, delivered, acked) = (&events[0], &events[1], &events[2]);
    ensure!(
        produced.queue_id == sent.queue_id && produced.queue_offset == Some(sent.queue_offset),
        "{produced:?} for {sent:?}"
    );
    ensure!(!produced.producer.is_empty(), "no producer id: {produced:?}");
    ensure!(
        delivered.consumer_group == "tp-group" && delivered.client_id == "pop-member-1",
        "{delivered:?}"
    );
    ensure!(acked.consumer_group == "tp-group", "{acked:?}");
    // Nothing more is recorded for it.
    ensure!(client.admin().trace(&sent.message_id).await?.len() == 3);
    cluster.shutdown().await?;
    ns.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_message_traced_by_its_producer_is_followed_through_a_push_consumer_to_its_commit() -> anyhow::Result<()> {
    let _turn = ONE_AT_A_TIME.lock().await;
    let (ns, cluster, client) = start_with_client().await?;
    // An untraced topic: the producer asks (RocketMQ's enableMsgTrace).
    create_topic(&client, "trace-push", false).await?;
    let sent = client
        .producer()
        .enable_msg_trace()
        .send("trace-push", message(1, None))
        .await?;
    let consumer = push_consumer(&client, "tpush-group", "trace-push", ConsumeResult::Success)?;
    // Acked once the member's heartbeat commits the offset past it.
    let events = followed(&client, (&sent.message_id, "trace-push"), &ACKED).await?;
    for e in &events[1..] {
        ensure!(
            e.consumer_group == "tpush-group" && e.client_id == consumer.client_id(),
            "{e:?}"
        );
    }
    consumer.shutdown().await?;
    cluster.shutdown().await?;
    ns.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_traced_message_failing_every_push_delivery_is_followed_through_its_retries_to_the_dlq() -> anyhow::Result<()>
{
    const CG: &str = "tretry";
    let _turn = ONE_AT_A_TIME.lock().await;
    let (ns, cluster, client) = start_with_client().await?;
    create_topic(&client, "trace-retry", true).await?;
    client
        .admin()
        .update_consumer_group(pb::ConsumerGroupConfig {
            name: CG.into(),
            fifo: false,
            max_reconsume_times: Some(2),
            retry_delays_ms: vec![100, 200],
        })
        .await?;
    let sent = client.producer().send("trace-retry", message(1, None)).await?;
    let consumer = push_consumer(&client, CG, "trace-retry", ConsumeResult::RetryLater)?;
    // Delivered 3 times (reconsume 0, 1, 2): twice sent back to the retry
    // topic, the third time past max_reconsume_times to the DLQ.
    let events = followed(&client, (&sent.message_id, "trace-retry"), &through_the_dlq(3)).await?;
    ensure!(
        events[1].from_topic.is_empty() && events[3].from_topic == format!("%RETRY%{CG}"),
        "redeliveries come from the retry topic: {events:?}"
    );
    ensure!(
        events[2].next_delivery_ms >= events[2].time_ms + 100,
        "the retry is due after the group's first backoff: {:?}",
        events[2]
    );
    ensure!(events[1..].iter().all(|e| e.consumer_group == CG), "{events:?}");
    // And it is in the dead-letter queue, with the same id.
    let dlq = dlq_topic(CG);
    let route = wait_for_known_route(&client, &dlq).await?;
    let (dead, _) = pull_everything(&client.pull_consumer(), &route, &dlq).await?;
    ensure!(dead.len() == 1 && dead[0].2.message_id == sent.message_id, "{dead:?}");
    // Nothing was acked: a sent-back delivery is not an ack, though the group's
    // offsets move past it.
    ensure!(
        client
            .admin()
            .trace(&sent.message_id)
            .await?
            .iter()
            .all(|e| e.kind() != Kind::Acked)
    );
    consumer.shutdown().await?;
    cluster.shutdown().await?;
    ns.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_traced_message_never_acked_by_pop_is_followed_through_its_redeliveries_to_the_dlq() -> anyhow::Result<()> {
    const CG: &str = "tpop-dlq";
    let _turn = ONE_AT_A_TIME.lock().await;
    let (ns, cluster, client) = start_with_client().await?;
    create_topic(&client, "trace-pop-dlq", false).await?;
    client
        .admin()
        .update_consumer_group(pb::ConsumerGroupConfig {
            name: CG.into(),
            fifo: false,
            max_reconsume_times: Some(1),
            retry_delays_ms: vec![],
        })
        .await?;
    let sent = client
        .producer()
        .enable_msg_trace()
        .send("trace-pop-dlq", message(1, None))
        .await?;
    let consumer = client
        .simple_consumer(CG, "trace-pop-dlq")
        .client_id("pop-dlq-member")
        .invisible_duration(Duration::from_secs(1));
    // Received and never acked: handed out twice, then (the second invisible
    // time expired past max_reconsume_times = 1) dead-lettered by a receive.
    let mut attempts = Vec::new();
    eventually(Duration::from_secs(20), "the message dead-lettered", async || {
        for m in consumer.receive(1, Duration::from_millis(500)).await? {
            attempts.push(m.delivery_attempt);
        }
        let events = client.admin().trace(&sent.message_id).await?;
        Ok(if events.iter().any(|e| e.kind() == Kind::DeadLettered) {
            Check::Done(())
        } else {
            Check::Pending(format!("attempts {attempts:?}, trace {:?}", shape(&events)))
        })
    })
    .await?;
    ensure!(attempts == [1, 2], "delivery attempts {attempts:?}");
    let events = followed(&client, (&sent.message_id, "trace-pop-dlq"), &through_the_dlq(2)).await?;
    ensure!(
        events[1].client_id == "pop-dlq-member" && events[3].client_id == "pop-dlq-member",
        "{events:?}"
    );
    ensure!(events[1..].iter().all(|e| e.consumer_group == CG), "{events:?}");
    cluster.shutdown().await?;
    ns.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_trace_survives_the_leader_that_wrote_it() -> anyhow::Result<()> {
    let _turn = ONE_AT_A_TIME.lock().await;
    let (ns, mut cluster, client) = start_with_client().await?;
    create_topic(&client, "trace-kill", true).await?;
    let sent = client.producer().send("trace-kill", message(1, None)).await?;
    let consumer = client
        .simple_consumer("tk-group", "trace-kill")
        .invisible_duration(Duration::from_secs(30));
    let got = consumer.receive(1, Duration::from_secs(5)).await?;
    consumer.ack(got.first().context("nothing received")?).await?;
    let before = followed(&client, (&sent.message_id, "trace-kill"), &ACKED).await?;
    let old = cluster.wait_for_leader(DEADLINE).await?;
    ensure!(
        before.iter().all(|e| e.node_id == old),
        "recorded by the leader: {before:?}"
    );
    cluster.replica_mut(old).kill().await;
    let new = cluster.wait_for_leader_other_than(Some(old), DEADLINE).await?;
    // Asked through the new leader (the admin client follows it), the trace is whole.
    let after = eventually(DEADLINE, "the trace through the new leader", async || {
        Ok(match client.admin().trace(&sent.message_id).await {
            Ok(events) => Check::Done(events),
            Err(e) => Check::Pending(e.to_string()),
        })
    })
    .await?;
    ensure!(after == before, "before the kill {before:?}, after {after:?}");
    // The records are in the new leader's own applied state.
    let held = cluster
        .replica(new)
        .store()
        .messages_by_key(TRACE_TOPIC, &sent.message_id, 10)?;
    ensure!(held.len() == 3, "node {new} holds {} trace records", held.len());
    // And the new leader records new steps: the same message, delivered to another group.
    let other = client
        .simple_consumer("tk-other", "trace-kill")
        .invisible_duration(Duration::from_secs(30));
    eventually(DEADLINE, "a delivery after the failover", async || {
        Ok(match other.receive(1, Duration::from_millis(500)).await {
            Ok(got) if !got.is_empty() => Check::Done(()),
            Ok(_) => Check::Pending("nothing received".into()),
            Err(e) => Check::Pending(e.to_string()),
        })
    })
    .await?;
    let events = trace_of(&client, &sent.message_id, 4).await?;
    let last = events.last().context("no events")?;
    ensure!(
        last.kind() == Kind::Delivered && last.consumer_group == "tk-other" && last.node_id == new,
        "{events:?}"
    );
    cluster.shutdown().await?;
    ns.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_untraced_topic_leaves_no_trace() -> anyhow::Result<()> {
    let _turn = ONE_AT_A_TIME.lock().await;
    let (ns, cluster, client) = start_with_client().await?;
    create_topic(&client, "plain", false).await?;
    create_topic(&client, "traced", true).await?;
    client
        .admin()
        .update_consumer_group(pb::ConsumerGroupConfig {
            name: "plain-push".into(),
            fifo: false,
            max_reconsume_times: None,
            retry_delays_ms: vec![100],
        })
        .await?;
    // A whole life on the untraced topic: sent, received, acked, pushed, retried.
    let plain = client.producer().send("plain", message(1, None)).await?;
    let pop = client.simple_consumer("plain-pop", "plain");
    let got = pop.receive(1, Duration::from_secs(5)).await?;
    let m = got.first().context("nothing received")?;
    ensure!(
        !m.message
            .message
            .as_ref()
            .is_some_and(|x| x.properties.contains_key("TRACE_ON")),
        "an untraced message carries the trace mark: {m:?}"
    );
    pop.ack(m).await?;
    let seen: Arc<Mutex<u32>> = Arc::default();
    let push = {
        let seen = seen.clone();
        client
            .push_consumer("plain-push", "plain")
            .start_from(StartFrom::First)
            .start(move |m: pb::PulledMessage| {
                let seen = seen.clone();
                async move {
                    *seen.lock().unwrap_or_else(std::sync::PoisonError::into_inner) += 1;
                    if m.reconsume_times == 0 {
                        ConsumeResult::RetryLater
                    } else {
                        ConsumeResult::Success
                    }
                }
            })?
    };
    eventually(Duration::from_secs(30), "the retry consumed", async || {
        let n = *seen.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        Ok(if n >= 2 {
            Check::Done(())
        } else {
            Check::Pending(format!("{n} deliveries"))
        })
    })
    .await?;
    push.shutdown().await?;
    // Then a traced message, whose records queue behind anything the untraced
    // life could have queued: once they are written, nothing else is coming.
    let traced = client.producer().send("traced", message(2, None)).await?;
    trace_of(&client, &traced.message_id, 1).await?;
    ensure!(
        client.admin().trace(&plain.message_id).await?.is_empty(),
        "the untraced message has a trace"
    );
    let route = wait_for_known_route(&client, TRACE_TOPIC).await?;
    let (records, _) = pull_everything(&client.pull_consumer(), &route, TRACE_TOPIC).await?;
    ensure!(
        !records.is_empty()
            && records.iter().all(|(_, _, r)| r
                .message
                .as_ref()
                .is_some_and(|x| x.keys == [traced.message_id.clone()])),
        "the trace topic holds records of other messages: {records:?}"
    );
    cluster.shutdown().await?;
    ns.stop().await
}
