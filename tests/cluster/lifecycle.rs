//! Message lifecycle end to end: POP (SimpleConsumer) receive, ack and invisible
//! time; FIFO POP groups; retries with backoff and the dead-letter queue; delayed
//! messages; SQL92 filters; and all of it across a leader kill. What a RocketMQ
//! user relies on: an acked message never comes back, an unacked one comes back
//! once its invisible time has passed (never before), a timer fires once and
//! never early, and a failover changes none of that.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail, ensure};
use raftmq_client::{Client, Filter, MessageExt, Received};
use raftmq_proto::v1 as pb;
use raftmq_proto::v1::consumer_service_client::ConsumerServiceClient;
use raftmq_proto::v1::messaging_service_client::MessagingServiceClient;

use super::fixtures::{
    Check, DEADLINE, ONE_AT_A_TIME, eventually, message, seq_of, start_with_client, wait_for_known_route,
};

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

async fn create_topic(client: &Client, topic: &str, queues: u32) -> anyhow::Result<()> {
    client
        .admin()
        .create_topic(topic, queues, pb::Permission::ReadWrite)
        .await?;
    wait_for_known_route(client, topic).await?;
    Ok(())
}

/// Sends `range` as messages carrying their sequence number, in batches.
async fn send_seqs(client: &Client, topic: &str, range: std::ops::Range<u64>) -> anyhow::Result<()> {
    let producer = client.producer();
    let seqs: Vec<u64> = range.collect();
    for chunk in seqs.chunks(100) {
        producer
            .send_batch(topic, chunk.iter().map(|&s| message(s, None)).collect())
            .await?;
    }
    Ok(())
}

fn seq(r: &Received) -> anyhow::Result<u64> {
    seq_of(&r.message)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_pop_group_of_three_members_gets_each_of_10000_messages_once_and_acks_it_once() -> anyhow::Result<()> {
    let _turn = ONE_AT_A_TIME.lock().await;
    let (ns, cluster, client) = start_with_client().await?;
    let topic = "pop-many";
    create_topic(&client, topic, 4).await?;
    const N: u64 = 10_000;
    send_seqs(&client, topic, 0..N).await?;
    let received: Arc<Mutex<BTreeMap<u64, u32>>> = Arc::default();
    let acked: Arc<Mutex<BTreeMap<u64, u32>>> = Arc::default();
    let mut members = Vec::new();
    for _ in 0..3 {
        let consumer = client
            .simple_consumer("pop-three", topic)
            .invisible_duration(Duration::from_secs(60));
        let (received, acked) = (received.clone(), acked.clone());
        members.push(tokio::spawn(async move {
            let give_up = Instant::now() + Duration::from_secs(120);
            while lock(&acked).len() < N as usize && Instant::now() < give_up {
                for m in consumer.receive(64, Duration::from_millis(500)).await? {
                    let s = seq(&m)?;
                    *lock(&received).entry(s).or_default() += 1;
                    consumer.ack(&m).await?;
                    *lock(&acked).entry(s).or_default() += 1;
                }
            }
            anyhow::Ok(())
        }));
    }
    for m in members {
        m.await??;
    }
    let received = lock(&received).clone();
    let acked = lock(&acked).clone();
    ensure!(acked.len() == N as usize, "{} of {N} messages acked", acked.len());
    let twice: Vec<_> = received.iter().filter(|(_, n)| **n != 1).take(10).collect();
    ensure!(twice.is_empty(), "messages handed out more than once: {twice:?}");
    ensure!(acked.values().all(|n| *n == 1), "a message was acked twice");
    // Nothing is left in flight, and nothing more is handed out.
    let more = client
        .simple_consumer("pop-three", topic)
        .receive(32, Duration::ZERO)
        .await?;
    ensure!(more.is_empty(), "handed out after every message was acked: {more:?}");
    cluster.shutdown().await?;
    ns.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unacked_messages_come_back_after_their_invisible_time_and_a_changed_handle_replaces_the_old()
-> anyhow::Result<()> {
    let _turn = ONE_AT_A_TIME.lock().await;
    let (ns, cluster, client) = start_with_client().await?;
    let topic = "pop-invisible";
    create_topic(&client, topic, 1).await?;
    send_seqs(&client, topic, 0..3).await?;
    let consumer = client
        .simple_consumer("pop-inv", topic)
        .invisible_duration(Duration::from_secs(1));
    let first = consumer.receive(3, Duration::from_secs(2)).await?;
    ensure!(first.len() == 3, "received {first:?}");
    let by_seq: HashMap<u64, Received> = first
        .into_iter()
        .map(|m| Ok((seq(&m)?, m)))
        .collect::<anyhow::Result<_>>()?;
    ensure!(by_seq.values().all(|m| m.delivery_attempt == 1));
    // 0: left alone. 1: invisible for 3 s more. 2: acked.
    let changed = consumer
        .change_invisible_duration(&by_seq[&1], Duration::from_secs(3))
        .await?;
    ensure!(changed.receipt_handle != by_seq[&1].receipt_handle);
    let stale = consumer.ack(&by_seq[&1]).await;
    ensure!(
        matches!(&stale, Err(raftmq_client::Error::Rpc { code: tonic::Code::FailedPrecondition, message, .. }) if message.contains("stale")),
        "the replaced handle still acked: {stale:?}"
    );
    consumer.ack(&by_seq[&2]).await?;
    let again = consumer.ack(&by_seq[&2]).await;
    ensure!(again.is_err(), "a second ack of one delivery succeeded");

    // 0 comes back with attempt 2, not before its invisible time.
    let back = eventually(Duration::from_secs(10), "message 0 to come back", async || {
        let got = consumer.receive(3, Duration::from_millis(500)).await?;
        let at = now_ms();
        for m in &got {
            ensure!(seq(m)? == 0, "only message 0 may be visible yet, got {m:?}");
            ensure!(
                at + 50 >= by_seq[&0].invisible_until_ms,
                "message 0 came back {} ms before its invisible time",
                by_seq[&0].invisible_until_ms - at
            );
        }
        Ok(match got.into_iter().next() {
            Some(m) => Check::Done(m),
            None => Check::Pending("nothing yet".into()),
        })
    })
    .await?;
    ensure!(back.delivery_attempt == 2, "attempt {}", back.delivery_attempt);
    ensure!(back.message.reconsume_times == 1);
    consumer.ack(&back).await?;
    // 1 comes back after its changed time, and the new handle was the live one.
    let back1 = eventually(Duration::from_secs(10), "message 1 to come back", async || {
        let got = consumer.receive(3, Duration::from_millis(500)).await?;
        Ok(match got.into_iter().next() {
            Some(m) => Check::Done(m),
            None => Check::Pending("nothing yet".into()),
        })
    })
    .await?;
    ensure!(seq(&back1)? == 1 && back1.delivery_attempt == 2, "{back1:?}");
    ensure!(now_ms() + 50 >= changed.invisible_until_ms, "message 1 came back early");
    consumer.ack(&back1).await?;
    ensure!(
        consumer.receive(3, Duration::from_millis(1500)).await?.is_empty(),
        "an acked message came back"
    );
    cluster.shutdown().await?;
    ns.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_fifo_pop_group_gets_each_queue_in_order_one_delivery_at_a_time() -> anyhow::Result<()> {
    let _turn = ONE_AT_A_TIME.lock().await;
    let (ns, cluster, client) = start_with_client().await?;
    let topic = "pop-fifo";
    create_topic(&client, topic, 2).await?;
    client
        .admin()
        .update_consumer_group(pb::ConsumerGroupConfig {
            name: "fifo".into(),
            fifo: true,
            ..Default::default()
        })
        .await?;
    let producer = client.producer();
    for s in 0..200u64 {
        producer
            .send_to_queue(
                topic,
                cluster_group(&client, topic).await?.as_str(),
                (s % 2) as u32,
                message(s, None),
            )
            .await?;
    }
    // Two members; each handed-out batch must follow the last acked offset of
    // its queue, and no queue may be handed out while a batch of it is out.
    let out: Arc<Mutex<HashMap<u32, u64>>> = Arc::default(); // queue -> messages out
    let last: Arc<Mutex<HashMap<u32, u64>>> = Arc::default(); // queue -> last acked seq
    let done: Arc<Mutex<BTreeSet<u64>>> = Arc::default();
    let mut members = Vec::new();
    for _ in 0..2 {
        let consumer = client
            .simple_consumer("fifo", topic)
            .invisible_duration(Duration::from_secs(30));
        let (out, last, done) = (out.clone(), last.clone(), done.clone());
        members.push(tokio::spawn(async move {
            let give_up = Instant::now() + Duration::from_secs(60);
            while lock(&done).len() < 200 && Instant::now() < give_up {
                let got = consumer.receive(8, Duration::from_millis(300)).await?;
                for m in &got {
                    let q = m.message.queue_id;
                    let mut o = lock(&out);
                    let n = o.entry(q).or_default();
                    ensure!(
                        *n == 0 || got.iter().filter(|x| x.message.queue_id == q).count() as u64 >= *n,
                        "queue {q} handed out while a batch of it is in flight"
                    );
                }
                for m in &got {
                    *lock(&out).entry(m.message.queue_id).or_default() += 1;
                }
                for m in got {
                    let (q, s) = (m.message.queue_id, seq(&m)?);
                    {
                        let mut l = lock(&last);
                        if let Some(prev) = l.get(&q) {
                            ensure!(s == prev + 2, "queue {q}: {s} after {prev}");
                        } else {
                            ensure!(s == u64::from(q), "queue {q} started at {s}");
                        }
                        l.insert(q, s);
                    }
                    *lock(&out).entry(q).or_default() -= 1;
                    consumer.ack(&m).await?;
                    lock(&done).insert(s);
                }
            }
            anyhow::Ok(())
        }));
    }
    for m in members {
        m.await??;
    }
    ensure!(lock(&done).len() == 200, "{} of 200 consumed", lock(&done).len());
    cluster.shutdown().await?;
    ns.stop().await
}

async fn cluster_group(client: &Client, topic: &str) -> anyhow::Result<String> {
    Ok(client
        .route(topic)
        .await?
        .groups
        .first()
        .context("no group")?
        .broker_group
        .clone())
}

/// A raw ConsumerService client on the current leader.
async fn leader_consumer_service(
    cluster: &super::fixtures::Cluster,
) -> anyhow::Result<ConsumerServiceClient<tonic::transport::Channel>> {
    let leader = cluster.wait_for_leader(DEADLINE).await?;
    Ok(ConsumerServiceClient::connect(format!("http://{}", cluster.replica(leader).addr)).await?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn retries_follow_the_groups_schedule_then_dead_letter_and_resend_brings_it_back() -> anyhow::Result<()> {
    let _turn = ONE_AT_A_TIME.lock().await;
    let (ns, cluster, client) = start_with_client().await?;
    let topic = "retry-me";
    create_topic(&client, topic, 1).await?;
    client
        .admin()
        .update_consumer_group(pb::ConsumerGroupConfig {
            name: "retrier".into(),
            fifo: false,
            max_reconsume_times: Some(2),
            retry_delays_ms: vec![400, 800],
        })
        .await?;
    let sent = client.producer().send(topic, message(7, None)).await?;
    let mut svc = leader_consumer_service(&cluster).await?;
    let pull = client.pull_consumer();
    let mut retry_offset = 0;
    for (reconsume, delay) in [(0u32, 400u64), (1, 800)] {
        let asked = now_ms();
        let r = svc
            .send_back(pb::SendBackRequest {
                consumer_group: "retrier".into(),
                message_id: sent.message_id.clone(),
                reconsume_times: reconsume,
                delay_ms: 0,
            })
            .await?
            .into_inner();
        ensure!(!r.dead_lettered && r.deliver_at_ms >= asked + delay, "{r:?}");
        let m = eventually(Duration::from_secs(10), "the retry to be delivered", async || {
            let route = match client.route("%RETRY%retrier").await {
                Ok(r) => r,
                Err(e) => return Ok(Check::Pending(format!("no route yet: {e}"))),
            };
            let g = route.groups.first().context("no group")?.broker_group.clone();
            let got = match pull
                .pull(
                    "%RETRY%retrier",
                    &g,
                    0,
                    retry_offset,
                    8,
                    Duration::from_millis(200),
                    &Filter::all(),
                )
                .await
            {
                Ok(got) => got,
                Err(e) => return Ok(Check::Pending(format!("pull: {e}"))),
            };
            Ok(match got.messages.into_iter().next() {
                Some(m) => Check::Done(m),
                None => Check::Pending("not yet".into()),
            })
        })
        .await?;
        let seen = now_ms();
        ensure!(
            seen >= asked + delay,
            "retry {reconsume} delivered after {} ms, before its {delay} ms",
            seen - asked
        );
        ensure!(
            m.store_timestamp_ms >= r.deliver_at_ms,
            "made visible before it was due"
        );
        ensure!(m.reconsume_times == reconsume + 1, "{m:?}");
        ensure!(m.message_id == sent.message_id, "a retry keeps its id");
        let body = m.message.as_ref().context("no message")?;
        ensure!(body.topic == topic && body.properties.get("ORIGIN_TOPIC").map(String::as_str) == Some(topic));
        ensure!(
            body.properties.get("ORIGIN_QUEUE_OFFSET").map(String::as_str) == Some(&*sent.queue_offset.to_string())
        );
        ensure!(seq_of(&m)? == 7);
        retry_offset = m.queue_offset + 1;
    }
    let r = svc
        .send_back(pb::SendBackRequest {
            consumer_group: "retrier".into(),
            message_id: sent.message_id.clone(),
            reconsume_times: 2,
            delay_ms: 0,
        })
        .await?
        .into_inner();
    ensure!(r.dead_lettered, "past max_reconsume_times it must go to the DLQ: {r:?}");
    let dlq = eventually(DEADLINE, "the dead letter to be listed", async || {
        let d = client.admin().dead_letters("retrier", 10).await.unwrap_or_default();
        Ok(if d.is_empty() {
            Check::Pending("empty".into())
        } else {
            Check::Done(d)
        })
    })
    .await?;
    ensure!(
        dlq.len() == 1 && dlq[0].1.message_id == sent.message_id && dlq[0].1.reconsume_times == 3,
        "{dlq:?}"
    );
    let resent = client.admin().resend_dead_letter("retrier", &sent.message_id).await?;
    let back = pull
        .pull(
            topic,
            &resent.broker_group,
            resent.queue_id,
            resent.queue_offset,
            1,
            Duration::ZERO,
            &Filter::all(),
        )
        .await?;
    let m = back
        .messages
        .first()
        .context("the resent message is not in its topic")?;
    ensure!(
        seq_of(m)? == 7
            && m.message
                .as_ref()
                .is_some_and(|b| !b.properties.contains_key("ORIGIN_TOPIC"))
    );
    cluster.shutdown().await?;
    ns.stop().await
}

/// Pulls every new message of every queue of `topic`, from `offsets` on.
async fn pull_new(
    client: &Client,
    topic: &str,
    offsets: &mut HashMap<(String, u32), u64>,
) -> anyhow::Result<Vec<pb::PulledMessage>> {
    let route = client.route(topic).await?;
    let pull = client.pull_consumer();
    let mut out = Vec::new();
    for g in &route.groups {
        for q in 0..g.queues {
            let at = offsets.entry((g.broker_group.clone(), q)).or_default();
            let r = pull
                .pull(topic, &g.broker_group, q, *at, 1024, Duration::ZERO, &Filter::all())
                .await?;
            *at = r.next_offset;
            out.extend(r.messages);
        }
    }
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_thousand_timers_due_over_ten_seconds_each_fire_once_and_never_early() -> anyhow::Result<()> {
    let _turn = ONE_AT_A_TIME.lock().await;
    let (ns, cluster, client) = start_with_client().await?;
    let topic = "timers";
    create_topic(&client, topic, 4).await?;
    let base = now_ms() + 2_000;
    let producer = client.producer();
    let mut due = HashMap::new();
    // 32 sends in flight: one at a time, a loaded machine (a CI run beside a
    // release build) took over 10 ms a send, so the last timers were already
    // due when sent and were stored as plain messages.
    use futures::StreamExt;
    let sends = futures::stream::iter(0..1000u64).map(|s| {
        let at = base + s * 10;
        let producer = &producer;
        async move { (s, at, producer.send(topic, message(s, None).with_deliver_at(at)).await) }
    });
    let mut sends = std::pin::pin!(sends.buffer_unordered(32));
    while let Some((s, at, r)) = sends.next().await {
        let r = r?;
        ensure!(
            r.deliver_at_ms == at && r.queue_offset == 0,
            "timer {s} due at {at} (sent by {}): {r:?}",
            now_ms()
        );
        due.insert(s, at);
    }
    let mut offsets = HashMap::new();
    let mut seen: HashMap<u64, u32> = HashMap::new();
    let give_up = Instant::now() + Duration::from_secs(40);
    while seen.len() < 1000 && Instant::now() < give_up {
        let got = pull_new(&client, topic, &mut offsets).await?;
        let at = now_ms();
        for m in got {
            let s = seq_of(&m)?;
            ensure!(at >= due[&s], "message {s} visible {} ms early", due[&s] - at);
            ensure!(m.store_timestamp_ms >= due[&s], "message {s} fired before its time");
            ensure!(m.message.as_ref().is_some_and(|b| b.deliver_at_ms == due[&s]));
            *seen.entry(s).or_default() += 1;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    ensure!(seen.len() == 1000, "{} of 1000 timers fired", seen.len());
    ensure!(seen.values().all(|n| *n == 1), "a timer fired twice");
    // Query by id finds a delayed message at the offset it landed on.
    cluster.shutdown().await?;
    ns.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_leader_kill_loses_no_timer_and_no_in_flight_message_and_brings_back_no_acked_one() -> anyhow::Result<()> {
    let _turn = ONE_AT_A_TIME.lock().await;
    let (ns, mut cluster, client) = start_with_client().await?;
    let (timers, popped) = ("kill-timers", "kill-pop");
    create_topic(&client, timers, 2).await?;
    create_topic(&client, popped, 2).await?;
    let base = now_ms() + 3_000;
    let producer = client.producer();
    let mut due = HashMap::new();
    for s in 0..200u64 {
        let at = base + s * 15;
        producer.send(timers, message(s, None).with_deliver_at(at)).await?;
        due.insert(s, at);
    }
    send_seqs(&client, popped, 0..300).await?;
    let consumer = client
        .simple_consumer("survivor", popped)
        .invisible_duration(Duration::from_secs(3));
    let mut taken: Vec<Received> = Vec::new();
    while taken.len() < 100 {
        taken.extend(
            consumer
                .receive((100 - taken.len()) as u32, Duration::from_secs(1))
                .await?,
        );
    }
    let mut acked = BTreeSet::new();
    for m in taken.iter().step_by(2) {
        consumer.ack(m).await?;
        acked.insert(seq(m)?);
    }
    let in_flight: BTreeMap<u64, u64> = taken
        .iter()
        .filter(|m| !acked.contains(&seq(m).unwrap_or(u64::MAX)))
        .map(|m| Ok((seq(m)?, m.invisible_until_ms)))
        .collect::<anyhow::Result<_>>()?;

    let old = cluster.wait_for_leader(DEADLINE).await?;
    cluster.replica_mut(old).kill().await;
    let new = cluster.wait_for_leader_other_than(Some(old), DEADLINE).await?;
    eprintln!(
        "leader {old} killed, {new} leads; {} in flight, {} acked",
        in_flight.len(),
        acked.len()
    );

    // Every POP message reaches an ack; none acked before comes back; each
    // in-flight one comes back once and not before its deadline.
    let mut delivered_after: BTreeMap<u64, u32> = BTreeMap::new();
    let give_up = Instant::now() + Duration::from_secs(60);
    while acked.len() < 300 && Instant::now() < give_up {
        let got = match consumer.receive(64, Duration::from_millis(500)).await {
            Ok(g) => g,
            Err(e) => {
                eprintln!("receive during failover: {e}");
                continue;
            }
        };
        let at = now_ms();
        for m in got {
            let s = seq(&m)?;
            ensure!(!acked.contains(&s), "message {s} came back after its ack");
            if let Some(deadline) = in_flight.get(&s) {
                ensure!(
                    at + 50 >= *deadline,
                    "in-flight message {s} came back {} ms early",
                    deadline - at
                );
                ensure!(
                    m.delivery_attempt == 2,
                    "in-flight message {s} attempt {}",
                    m.delivery_attempt
                );
            }
            *delivered_after.entry(s).or_default() += 1;
            consumer.ack(&m).await?;
            acked.insert(s);
        }
    }
    ensure!(acked.len() == 300, "{} of 300 POP messages acked", acked.len());
    let twice: Vec<_> = delivered_after.iter().filter(|(_, n)| **n > 1).collect();
    ensure!(twice.is_empty(), "delivered twice after the kill: {twice:?}");

    let mut offsets = HashMap::new();
    let mut fired: HashMap<u64, u32> = HashMap::new();
    let give_up = Instant::now() + Duration::from_secs(30);
    while fired.len() < 200 && Instant::now() < give_up {
        let got = match pull_new(&client, timers, &mut offsets).await {
            Ok(g) => g,
            Err(e) => {
                eprintln!("pull during failover: {e}");
                continue;
            }
        };
        for m in got {
            let s = seq_of(&m)?;
            ensure!(m.store_timestamp_ms >= due[&s], "timer {s} fired early");
            *fired.entry(s).or_default() += 1;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    ensure!(fired.len() == 200, "{} of 200 timers fired", fired.len());
    ensure!(fired.values().all(|n| *n == 1), "a timer fired twice");
    cluster.shutdown().await?;
    ns.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sql92_filters_select_by_properties_on_the_broker_and_bad_ones_name_the_position() -> anyhow::Result<()> {
    let _turn = ONE_AT_A_TIME.lock().await;
    let (ns, cluster, client) = start_with_client().await?;
    let topic = "sql";
    create_topic(&client, topic, 1).await?;
    let producer = client.producer();
    // seq 0..20: tag even/odd, n = seq, region alternates eu/us/none.
    for s in 0..20u64 {
        let mut m = message(s, None);
        m.tag = if s % 2 == 0 { "even".into() } else { "odd".into() };
        m.properties.insert("n".into(), s.to_string());
        match s % 3 {
            0 => m.properties.insert("region".into(), "eu".into()),
            1 => m.properties.insert("region".into(), "us".into()),
            _ => None,
        };
        if s == 19 {
            m.properties.insert("n".into(), "not-a-number".into());
        }
        producer.send(topic, m).await?;
    }
    let table: Vec<(&str, Vec<u64>)> = vec![
        ("n > 15", vec![16, 17, 18]),
        ("n BETWEEN 3 AND 5", vec![3, 4, 5]),
        ("region = 'eu' AND n < 7", vec![0, 3, 6]),
        ("region IN ('us') OR n = 2", vec![1, 2, 4, 7, 10, 13, 16, 19]),
        ("region IS NULL AND n <= 8", vec![2, 5, 8]),
        ("TAGS = 'odd' AND NOT (n < 15)", vec![15, 17]),
        ("(TAGS = 'even' OR n = 1) AND n < 3", vec![0, 1, 2]),
        ("region IS NOT NULL AND n >= 17", vec![18]),
    ];
    let group = cluster_group(&client, topic).await?;
    let pull = client.pull_consumer();
    for (expr, want) in table {
        let r = pull
            .pull(topic, &group, 0, 0, 100, Duration::ZERO, &Filter::Sql92(expr.into()))
            .await?;
        let got: Vec<u64> = r.messages.iter().map(seq_of).collect::<anyhow::Result<_>>()?;
        ensure!(got == want, "{expr}: got {got:?}, want {want:?}");
    }
    for (bad, position) in [("n > ", "position 4"), ("n = 'x", "position"), ("AND n", "position 0")] {
        match pull
            .pull(topic, &group, 0, 0, 100, Duration::ZERO, &Filter::Sql92(bad.into()))
            .await
        {
            Err(raftmq_client::Error::Rpc {
                code: tonic::Code::InvalidArgument,
                message,
                ..
            }) if message.contains(position) => {}
            other => bail!("{bad:?} answered {other:?}, not INVALID_ARGUMENT at {position}"),
        }
    }
    cluster.shutdown().await?;
    ns.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pop_state_is_bounded_and_a_group_is_pop_or_clustering_not_both() -> anyhow::Result<()> {
    let _turn = ONE_AT_A_TIME.lock().await;
    let (ns, cluster, client) = start_with_client().await?;
    let topic = "pop-bounds";
    create_topic(&client, topic, 1).await?;
    send_seqs(&client, topic, 0..5).await?;
    let consumer = client.simple_consumer("popper", topic);
    ensure!(!consumer.receive(5, Duration::from_secs(1)).await?.is_empty());
    let mut svc = leader_consumer_service(&cluster).await?;
    let hb = svc
        .heartbeat(pb::HeartbeatRequest {
            consumer_group: "popper".into(),
            client_id: "c1".into(),
            topic: topic.into(),
            tag_expression: "*".into(),
            ..Default::default()
        })
        .await;
    ensure!(
        matches!(&hb, Err(s) if s.code() == tonic::Code::FailedPrecondition && s.message().contains("POP")),
        "{hb:?}"
    );
    // Bad handles and bad durations are refused with what is wrong.
    let bad = svc
        .ack(pb::AckRequest {
            consumer_group: "popper".into(),
            topic: topic.into(),
            receipt_handles: vec!["nonsense".into()],
        })
        .await;
    ensure!(
        matches!(&bad, Err(s) if s.code() == tonic::Code::InvalidArgument && s.message().contains("receipt handle")),
        "{bad:?}"
    );
    let bad = svc
        .receive(pb::ReceiveRequest {
            consumer_group: "popper".into(),
            topic: topic.into(),
            invisible_duration_ms: 5,
            ..Default::default()
        })
        .await;
    ensure!(
        matches!(&bad, Err(s) if s.code() == tonic::Code::InvalidArgument),
        "{bad:?}"
    );
    // Delayed sends past the maximum, and a mixed batch, are refused whole.
    let leader = cluster.wait_for_leader(DEADLINE).await?;
    let mut messaging = MessagingServiceClient::connect(format!("http://{}", cluster.replica(leader).addr)).await?;
    let far = messaging
        .send(pb::SendRequest {
            topic: topic.into(),
            queue_id: None,
            messages: vec![message(1, None).with_delay(Duration::from_secs(4 * 24 * 3600))],
            ..Default::default()
        })
        .await;
    ensure!(
        matches!(&far, Err(s) if s.code() == tonic::Code::InvalidArgument && s.message().contains("maximum delay")),
        "{far:?}"
    );
    let mixed = messaging
        .send(pb::SendRequest {
            topic: topic.into(),
            queue_id: None,
            messages: vec![message(1, None).with_delay(Duration::from_secs(5)), message(2, None)],
            ..Default::default()
        })
        .await;
    ensure!(
        matches!(&mixed, Err(s) if s.code() == tonic::Code::InvalidArgument),
        "{mixed:?}"
    );
    cluster.shutdown().await?;
    ns.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_push_consumer_retries_through_the_retry_topic_on_schedule_then_dead_letters() -> anyhow::Result<()> {
    use std::sync::atomic::Ordering;

    use raftmq_client::push::{dlq_topic, retry_topic};
    use raftmq_client::{ConsumeMode, ConsumeResult, StartFrom};

    use super::fixtures::pull_everything;
    const TOPIC: &str = "retry-orders";
    const CG: &str = "rg";
    let _turn = ONE_AT_A_TIME.lock().await;
    let (ns, cluster, client) = start_with_client().await?;
    create_topic(&client, TOPIC, 2).await?;
    client
        .admin()
        .update_consumer_group(pb::ConsumerGroupConfig {
            name: CG.into(),
            fifo: false,
            max_reconsume_times: Some(2),
            retry_delays_ms: vec![200, 400],
        })
        .await?;
    // seq 0 fails on its first two deliveries, seq 1 always, seq 2 never.
    type Seen = Arc<Mutex<Vec<(u64, u32, String, String, Instant)>>>;
    let seen: Seen = Arc::default();
    let consumer = {
        let seen = seen.clone();
        client
            .push_consumer(CG, TOPIC)
            .start_from(StartFrom::First)
            .mode(ConsumeMode::Concurrent { workers: 4 })
            .start(move |m: pb::PulledMessage| {
                let seen = seen.clone();
                async move {
                    let seq = seq_of(&m).unwrap_or(u64::MAX);
                    let topic = m.message.as_ref().map(|m| m.topic.clone()).unwrap_or_default();
                    lock(&seen).push((seq, m.reconsume_times, topic, m.message_id.clone(), Instant::now()));
                    match (seq, m.reconsume_times) {
                        (0, r) if r < 2 => ConsumeResult::RetryLater,
                        (1, _) => ConsumeResult::RetryLater,
                        _ => ConsumeResult::Success,
                    }
                }
            })?
    };
    let producer = client.producer();
    let mut ids = BTreeMap::new();
    for seq in 0..3 {
        ids.insert(seq, producer.send(TOPIC, message(seq, None)).await?.message_id);
    }
    let stats = consumer.stats();
    eventually(
        Duration::from_secs(30),
        "seq 0 consumed on its second retry and seq 1 dead-lettered",
        async || {
            let seen = lock(&seen).clone();
            let done = seen.iter().any(|(s, r, ..)| *s == 0 && *r == 2)
                && seen.iter().any(|(s, ..)| *s == 2)
                && stats.dead_lettered.load(Ordering::Relaxed) == 1;
            Ok(if done {
                Check::Done(())
            } else {
                Check::Pending(format!("{seen:?}"))
            })
        },
    )
    .await?;
    let seen = lock(&seen).clone();
    let of = |seq: u64| -> Vec<_> { seen.iter().filter(|(s, ..)| *s == seq).cloned().collect() };
    for seq in [0, 1] {
        let d = of(seq);
        let times: Vec<u32> = d.iter().map(|(_, r, ..)| *r).collect();
        ensure!(times == [0, 1, 2], "seq {seq} delivered with reconsume_times {times:?}");
        ensure!(
            d.iter().all(|(_, _, t, id, _)| t == TOPIC && *id == ids[&seq]),
            "seq {seq}: {d:?}"
        );
        let gaps: Vec<Duration> = d.windows(2).map(|w| w[1].4 - w[0].4).collect();
        ensure!(
            gaps[0] >= Duration::from_millis(190) && gaps[1] >= Duration::from_millis(390),
            "seq {seq}: retries came after {gaps:?}, sooner than the 200/400 ms schedule"
        );
        ensure!(
            gaps.iter().all(|g| *g < Duration::from_secs(10)),
            "seq {seq}: gaps {gaps:?}"
        );
    }
    ensure!(of(2).len() == 1, "seq 2 delivered {} times", of(2).len());
    ensure!(
        (
            stats.sent_back.load(Ordering::Relaxed),
            stats.skipped.load(Ordering::Relaxed)
        ) == (4, 0),
        "sent back {} and skipped {}",
        stats.sent_back.load(Ordering::Relaxed),
        stats.skipped.load(Ordering::Relaxed)
    );
    ensure!(
        consumer.held_queues().iter().any(|(t, ..)| *t == retry_topic(CG)),
        "the retry topic is not consumed: {:?}",
        consumer.held_queues()
    );
    let dlq = dlq_topic(CG);
    let route = wait_for_known_route(&client, &dlq).await?;
    let (dead, _) = pull_everything(&client.pull_consumer(), &route, &dlq).await?;
    ensure!(dead.len() == 1, "dead-letter topic holds {dead:?}");
    let m = &dead[0].2;
    let props = &m.message.as_ref().context("no message")?.properties;
    ensure!(seq_of(m)? == 1 && m.message_id == ids[&1], "{m:?}");
    ensure!(
        props.get("ORIGIN_TOPIC").map(String::as_str) == Some(TOPIC)
            && props.get("ORIGIN_MESSAGE_ID") == Some(&ids[&1])
            && m.reconsume_times == 3,
        "{m:?}"
    );
    // Sent back counts as consumed: the group's offsets reach the end of the topic.
    eventually(DEADLINE, "no lag on the topic", async || {
        let d = client.admin().describe_consumer_group(CG).await?;
        let lag: u64 = d
            .iter()
            .flat_map(|g| &g.queues)
            .filter(|q| q.topic == TOPIC)
            .map(|q| q.lag)
            .sum();
        Ok(if lag == 0 {
            Check::Done(())
        } else {
            Check::Pending(format!("lag {lag}: {d:?}"))
        })
    })
    .await?;
    consumer.shutdown().await?;
    cluster.shutdown().await?;
    ns.stop().await
}
