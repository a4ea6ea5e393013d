//! The small client-side subcommands: `produce`, `pull`, `consume`, `admin`, and
//! `store verify`. Each is a thin shell over the client library or raft-store.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;

use crate::{AdminCommand, ConsumeArgs, DlqCommand, GroupCommand, NamesrvAddr, ProduceArgs, PullArgs, TopicCommand};

/// The filter a `--tag` / `--sql` pair asks for.
fn filter(tag: &str, sql: &Option<String>) -> raftmq_client::Filter {
    match sql {
        Some(expr) => raftmq_client::Filter::Sql92(expr.clone()),
        None => raftmq_client::Filter::Tag(tag.to_owned()),
    }
}

pub fn client(namesrv: NamesrvAddr) -> anyhow::Result<raftmq_client::Client> {
    Ok(raftmq_client::Client::new(raftmq_client::ClientConfig::new(
        namesrv.namesrv,
    ))?)
}

pub async fn run_produce(args: ProduceArgs) -> anyhow::Result<ExitCode> {
    use raftmq_client::MessageExt;
    let producer = client(args.namesrv)?.producer();
    let mut properties = std::collections::HashMap::new();
    for p in &args.properties {
        let (k, v) = p
            .split_once('=')
            .with_context(|| format!("--property {p:?} is not NAME=VALUE"))?;
        properties.insert(k.to_owned(), v.to_owned());
    }
    let started = std::time::Instant::now();
    let (mut ok, mut failed) = (0u64, 0u64);
    for i in 0..args.count {
        let mut msg = raftmq_proto::v1::Message::new(vec![b'x'; args.size]);
        msg.tag = args.tag.clone();
        msg.properties.clone_from(&properties);
        msg.properties.insert("seq".into(), i.to_string());
        msg.deliver_at_ms = args.deliver_at.unwrap_or(0);
        msg.delay_ms = args.delay_ms.unwrap_or(0);
        msg.delay_level = args.delay_level.unwrap_or(0);
        let sent = match &args.key {
            Some(k) => {
                msg.keys = vec![k.clone()];
                producer.send_with_key(&args.topic, k, msg).await
            }
            None => producer.send(&args.topic, msg).await,
        };
        match sent {
            Ok(r) => {
                ok += 1;
                if ok == 1 || i + 1 == args.count {
                    if r.deliver_at_ms != 0 {
                        println!(
                            "sent {} to {}/{} id {}, delivered at {} ms",
                            i, r.broker_group, r.queue_id, r.message_id, r.deliver_at_ms
                        );
                    } else {
                        println!(
                            "sent {} to {}/{}@{} id {}",
                            i, r.broker_group, r.queue_id, r.queue_offset, r.message_id
                        );
                    }
                }
            }
            Err(e) => {
                failed += 1;
                eprintln!("message {i}: {e}");
            }
        }
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "{ok} sent, {failed} failed in {secs:.2}s ({:.0} msgs/s)",
        ok as f64 / secs.max(1e-9)
    );
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

pub async fn run_admin(cmd: AdminCommand) -> anyhow::Result<()> {
    match cmd {
        AdminCommand::Cluster(ns) => {
            for g in client(ns)?.admin().cluster_status().await? {
                println!(
                    "{}  term {}  leader {} ({})",
                    g.broker_group,
                    g.term,
                    g.leader_id.map_or("-".to_owned(), |l| l.to_string()),
                    g.leader_endpoint
                );
                for r in g.replicas {
                    let role = raftmq_proto::v1::ReplicaRole::try_from(r.role).unwrap_or_default();
                    // The reporting node knows its own log and applied index, and as
                    // leader how far each follower's log is known to match its own.
                    let progress = match (r.last_log_index, r.applied_index, r.matched_index) {
                        (Some(log), applied, _) => format!(
                            "last log {log}  applied {}",
                            applied.map_or("-".to_owned(), |a| a.to_string())
                        ),
                        (None, _, Some(matched)) => match r.last_ack_ms {
                            // Well past any election timeout: the leader cannot reach it.
                            Some(ms) if ms > 1000 => {
                                format!("replicated through {matched}, UNREACHABLE (last ack {ms} ms ago)")
                            }
                            Some(ms) => format!("replicated through {matched}, last ack {ms} ms ago"),
                            None => format!("replicated through {matched}, never acknowledged this leader"),
                        },
                        _ => "progress unknown".to_owned(),
                    };
                    println!("  node {}  {}  {:?}  {progress}", r.node_id, r.endpoint, role);
                }
                if let Some(c) = g.committed_index {
                    println!("  committed through {c} (reported by node {})", g.reported_by);
                }
            }
        }
        AdminCommand::Health {
            broker,
            namesrv,
            timeout_ms,
        } => health(broker, namesrv, Duration::from_millis(timeout_ms)).await?,
        AdminCommand::Topic(TopicCommand::Create { namesrv, topic, queues }) => {
            client(namesrv)?
                .admin()
                .create_topic(&topic, queues, raftmq_proto::v1::Permission::ReadWrite)
                .await?;
            println!("topic {topic} created with {queues} queue(s) per broker group");
        }
        AdminCommand::Group(cmd) => run_group(cmd).await?,
        AdminCommand::Dlq(cmd) => run_dlq(cmd).await?,
        AdminCommand::Message {
            namesrv,
            id,
            topic,
            key,
        } => {
            let admin = client(namesrv)?.admin();
            let found = match (id, topic, key) {
                (Some(id), _, _) => admin.query_message_by_id(&id).await?.into_iter().collect(),
                (None, Some(topic), Some(key)) => admin.query_messages_by_key(&topic, &key, 32).await?,
                _ => anyhow::bail!("give --id, or --topic and --key"),
            };
            anyhow::ensure!(!found.is_empty(), "no such message");
            for m in &found {
                print_message(m.message.as_ref().map_or("", |x| x.topic.as_str()), m);
            }
        }
        AdminCommand::Topic(TopicCommand::List(ns)) => {
            for (group, t) in client(ns)?.admin().list_topics().await? {
                println!("{group}  {}  queues {}  perm {}", t.name, t.queues_per_group, t.perm);
            }
        }
    }
    Ok(())
}

/// `first`, `last` or a time in ms since the epoch, as `--from` / `--to` take it.
fn start_from(s: &str) -> anyhow::Result<raftmq_client::StartFrom> {
    use raftmq_client::StartFrom;
    Ok(match s {
        "first" => StartFrom::First,
        "last" => StartFrom::Last,
        ms => StartFrom::Timestamp(
            ms.parse()
                .with_context(|| format!("{ms:?} is not first, last or a time in ms since the epoch"))?,
        ),
    })
}

pub async fn run_dlq(cmd: DlqCommand) -> anyhow::Result<()> {
    match cmd {
        DlqCommand::List { namesrv, group, count } => {
            let letters = client(namesrv)?.admin().dead_letters(&group, count).await?;
            for (broker_group, m) in &letters {
                print_message(broker_group, m);
                println!("    reconsumed {} times", m.reconsume_times);
            }
            eprintln!("{} dead letter(s) in %DLQ%{group}", letters.len());
        }
        DlqCommand::Resend { namesrv, group, id } => {
            let r = client(namesrv)?.admin().resend_dead_letter(&group, &id).await?;
            println!(
                "resent {id} as {} to {}/{}@{}",
                r.message_id, r.broker_group, r.queue_id, r.queue_offset
            );
        }
    }
    Ok(())
}

async fn run_group(cmd: GroupCommand) -> anyhow::Result<()> {
    match cmd {
        GroupCommand::Config {
            namesrv,
            group,
            fifo,
            max_retries,
            retry_delays_ms,
        } => {
            client(namesrv)?
                .admin()
                .update_consumer_group(raftmq_proto::v1::ConsumerGroupConfig {
                    name: group.clone(),
                    fifo,
                    max_reconsume_times: max_retries,
                    retry_delays_ms,
                })
                .await?;
            println!("consumer group {group} configured");
        }
        GroupCommand::List(ns) => {
            for broker in client(ns)?.admin().list_consumer_groups().await? {
                for g in broker.groups {
                    println!(
                        "{}  {}  topics {}  live members {}  lag {}",
                        broker.broker_group,
                        g.consumer_group,
                        g.topics.join(","),
                        g.live_members,
                        g.total_lag
                    );
                }
            }
        }
        GroupCommand::Describe { namesrv, group } => {
            let found = client(namesrv)?.admin().describe_consumer_group(&group).await?;
            anyhow::ensure!(
                !found.is_empty(),
                "consumer group {group} is unknown to every broker group"
            );
            for d in found {
                println!("{}  consumer group {}", d.broker_group, d.consumer_group);
                for m in &d.members {
                    println!(
                        "  member {}  topic {}  tags {:?}  queues {:?}  last heartbeat {} ms ago",
                        m.client_id, m.topic, m.tag_expression, m.queue_ids, m.last_heartbeat_ms_ago
                    );
                }
                let mut total = 0;
                for q in &d.queues {
                    total += q.lag;
                    println!(
                        "  {}/{}  committed {}  max {}  lag {}  {}",
                        q.topic,
                        q.queue_id,
                        q.committed_offset.map_or("-".to_owned(), |o| o.to_string()),
                        q.max_offset,
                        q.lag,
                        if q.client_id.is_empty() { "-" } else { &q.client_id }
                    );
                }
                println!("  total lag {total}");
            }
        }
        GroupCommand::ResetOffset {
            namesrv,
            group,
            topic,
            to,
        } => {
            use raftmq_proto::v1::StartFrom as Pb;
            let (to, ts) = match start_from(&to)? {
                raftmq_client::StartFrom::First => (Pb::First, 0),
                raftmq_client::StartFrom::Last => (Pb::Last, 0),
                raftmq_client::StartFrom::Timestamp(t) => (Pb::Timestamp, t),
            };
            for q in client(namesrv)?
                .admin()
                .reset_consumer_offset(&group, &topic, to, ts)
                .await?
            {
                println!(
                    "{}/{}  now {}  max {}  lag {}",
                    q.topic,
                    q.queue_id,
                    q.committed_offset.unwrap_or_default(),
                    q.max_offset,
                    q.lag
                );
            }
        }
    }
    Ok(())
}

/// One line per message, headed `place/queue@offset` (`place`: the broker group
/// for `pull`, the topic otherwise). A closed stdout (`| head`) is not an error worth a
/// panic: the line is dropped and the command goes on to its clean exit.
fn print_message(place: &str, pulled: &raftmq_proto::v1::PulledMessage) {
    use std::io::Write;
    let m = pulled.message.clone().unwrap_or_default();
    let body = String::from_utf8_lossy(&m.body[..m.body.len().min(32)]).into_owned();
    let _ = writeln!(
        std::io::stdout().lock(),
        "{place}/{}@{}  id {}  tag {:?}  keys {:?}  props {:?}  body {} bytes {:?}{}",
        pulled.queue_id,
        pulled.queue_offset,
        pulled.message_id,
        m.tag,
        m.keys,
        m.properties,
        m.body.len(),
        body,
        if m.body.len() > 32 { "…" } else { "" }
    );
}

/// Runs one consumer-group member until `--count` messages, `--idle-exit-ms` of
/// silence, or Ctrl-C; then shuts it down cleanly (final offsets committed).
pub async fn run_consume(args: ConsumeArgs) -> anyhow::Result<()> {
    if args.pop {
        return run_pop(args).await;
    }
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};

    use raftmq_client::{ConsumeMode, ConsumeResult, MessageModel};
    let client = client(args.namesrv)?;
    let received = Arc::new(AtomicU64::new(0));
    let limit = args.count.unwrap_or(u64::MAX);
    let done = tokio_util::sync::CancellationToken::new();
    let arrived = Arc::new(tokio::sync::Notify::new());
    let consumer = client
        .push_consumer(&args.group, &args.topic)
        .filter(filter(&args.tag, &args.sql))
        .start_from(start_from(&args.from)?)
        .model(if args.broadcast {
            MessageModel::Broadcasting
        } else {
            MessageModel::Clustering
        })
        .mode(if args.orderly {
            ConsumeMode::Orderly
        } else {
            ConsumeMode::Concurrent { workers: 4 }
        })
        .offset_dir(&args.offset_dir)
        .start({
            let (received, done, arrived, quiet) = (received.clone(), done.clone(), arrived.clone(), args.quiet);
            move |m| {
                let (received, done, arrived) = (received.clone(), done.clone(), arrived.clone());
                async move {
                    let n = received.fetch_add(1, Ordering::SeqCst) + 1;
                    if n > limit {
                        // Past the limit: a retry leaves it uncommitted, and the
                        // shutdown under way ends the retry wait, so the next
                        // member of the group gets it.
                        received.fetch_sub(1, Ordering::SeqCst);
                        done.cancel();
                        return ConsumeResult::RetryLater;
                    }
                    if !quiet {
                        print_message(m.message.as_ref().map_or("", |x| x.topic.as_str()), &m);
                    }
                    arrived.notify_one();
                    if n == limit {
                        done.cancel();
                    }
                    ConsumeResult::Success
                }
            }
        })?;
    let token = done.clone();
    crate::cancel_on_signal(token.clone());
    let idle = Duration::from_millis(args.idle_exit_ms);
    loop {
        tokio::select! {
            _ = token.cancelled() => break,
            _ = arrived.notified() => {}
            _ = tokio::time::sleep(idle), if !idle.is_zero() => break,
        }
    }
    consumer.shutdown().await?;
    eprintln!("consumed {} message(s)", received.load(Ordering::SeqCst).min(limit));
    Ok(())
}

/// A POP member: receive, print, ack, until `--count`, `--idle-exit-ms` of
/// silence, or Ctrl-C. A message is acked after it is printed, so one lost to a
/// crash comes back to the group after its invisible time.
async fn run_pop(args: ConsumeArgs) -> anyhow::Result<()> {
    let consumer = client(args.namesrv)?
        .simple_consumer(&args.group, &args.topic)
        .filter(filter(&args.tag, &args.sql))
        .invisible_duration(Duration::from_millis(args.invisible_ms));
    let stop = tokio_util::sync::CancellationToken::new();
    crate::cancel_on_signal(stop.clone());
    let limit = args.count.unwrap_or(u64::MAX);
    let idle = Duration::from_millis(args.idle_exit_ms);
    let mut last = std::time::Instant::now();
    let mut consumed = 0u64;
    while consumed < limit && !stop.is_cancelled() {
        if !idle.is_zero() && last.elapsed() >= idle {
            break;
        }
        let want = u32::try_from(limit - consumed).unwrap_or(u32::MAX).min(32);
        let got = tokio::select! {
            r = consumer.receive(want, Duration::from_millis(1000)) => r?,
            _ = stop.cancelled() => break,
        };
        if !got.is_empty() {
            last = std::time::Instant::now();
        }
        for m in got {
            if !args.quiet {
                print_message(&args.topic, &m.message);
                println!("    delivery attempt {}", m.delivery_attempt);
            }
            consumer.ack(&m).await?;
            consumed += 1;
        }
    }
    eprintln!("consumed {consumed} message(s)");
    Ok(())
}

pub async fn verify_store(dir: PathBuf) -> anyhow::Result<()> {
    use raftmq_raft_store as store;
    let (log, sm) = store::open(&dir, store::StoreConfig::default())
        .await
        .with_context(|| format!("opening store at {}", dir.display()))?;
    let reader = log.reader();
    let mut records = 0u64;
    let mut bytes = 0u64;
    if let Some((first, last)) = reader.physical_range() {
        let mut next = first;
        while next <= last {
            let end = (next + 4096).min(last + 1);
            for (_, payload) in reader.read_records(next, end)? {
                records += 1;
                bytes += payload.len() as u64;
            }
            next = end;
        }
    }
    let sm_reader = sm.reader();
    println!("data dir:        {}", dir.display());
    println!("log range:       {:?}", reader.physical_range());
    println!("purged through:  {:?}", reader.purged());
    println!("records read:    {records} ({bytes} payload bytes), all checksums valid");
    println!("applied:         {:?}", sm_reader.applied()?);
    println!("topics:          {}", sm_reader.topics()?.len());
    println!("queue rows:      {}", sm_reader.consume_queue_rows()?);
    log.shutdown().await?;
    Ok(())
}

/// Prints up to `--count` messages of one queue from `--offset`, following
/// `next_offset` across pulls.
pub async fn run_pull(args: PullArgs) -> anyhow::Result<()> {
    let client = client(args.namesrv)?;
    let group = match args.group {
        Some(g) => g,
        None => client
            .route(&args.topic)
            .await?
            .groups
            .first()
            .map(|g| g.broker_group.clone())
            .with_context(|| format!("topic {} has no broker group", args.topic))?,
    };
    let consumer = client.pull_consumer();
    let mut offset = args.offset;
    let mut printed = 0u64;
    while printed < args.count {
        let want = u32::try_from(args.count - printed).unwrap_or(u32::MAX).min(256);
        let r = consumer
            .pull(
                &args.topic,
                &group,
                args.queue,
                offset,
                want,
                Duration::from_millis(args.wait_ms),
                &filter(&args.tag, &args.sql),
            )
            .await?;
        for pulled in &r.messages {
            print_message(&group, pulled);
            printed += 1;
        }
        if r.messages.is_empty() && r.next_offset == offset {
            println!(
                "end of {group}/{} at offset {} (queue holds {}..{})",
                args.queue, offset, r.min_offset, r.max_offset
            );
            break;
        }
        offset = r.next_offset;
    }
    Ok(())
}

/// One RPC to one endpoint, no retries: the answer a health check wants.
async fn health(broker: Option<String>, namesrv: Option<String>, timeout: Duration) -> anyhow::Result<()> {
    use raftmq_proto::v1::admin_service_client::AdminServiceClient;
    use raftmq_proto::v1::name_server_service_client::NameServerServiceClient;
    let (addr, what) = match (&broker, &namesrv) {
        (Some(b), _) => (b.as_str(), "broker node"),
        (None, Some(n)) => (n.as_str(), "NameServer"),
        (None, None) => anyhow::bail!("give --broker or --namesrv"),
    };
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .with_context(|| format!("{addr:?} is not host:port"))?
        .connect_timeout(timeout)
        .timeout(timeout);
    let check = async {
        let channel = endpoint.connect().await?;
        if broker.is_some() {
            let s = AdminServiceClient::new(channel)
                .cluster_status(raftmq_proto::v1::ClusterStatusRequest::default())
                .await?
                .into_inner();
            let g = s.groups.first();
            println!(
                "{what} {addr} is serving: group {} term {} leader {}",
                g.map_or("-", |g| g.broker_group.as_str()),
                g.map_or(0, |g| g.term),
                g.and_then(|g| g.leader_id).map_or("none".to_owned(), |l| l.to_string())
            );
        } else {
            let c = NameServerServiceClient::new(channel)
                .list_cluster(raftmq_proto::v1::ListClusterRequest::default())
                .await?
                .into_inner();
            println!(
                "{what} {addr} is serving: {} broker group(s) registered",
                c.groups.len()
            );
        }
        Ok::<_, anyhow::Error>(())
    };
    tokio::time::timeout(timeout, check)
        .await
        .map_err(|_| anyhow::anyhow!("{what} {addr} did not answer within {timeout:?}"))?
        .with_context(|| format!("{what} {addr} is not healthy"))
}

/// Creates (or updates) `topic` with `queues` queues on every broker group, then
/// waits until a NameServer routes it that way (brokers register a topic change at
/// once, but the route is only as fresh as the last registration) and returns every
/// (group, queue) pair. For tools that need a known topic before they start.
pub async fn create_topic_and_wait(
    client: &raftmq_client::Client,
    topic: &str,
    queues: u32,
    within: Duration,
) -> anyhow::Result<Vec<(String, u32)>> {
    client
        .admin()
        .create_topic(topic, queues, raftmq_proto::v1::Permission::ReadWrite)
        .await
        .with_context(|| format!("creating topic {topic}"))?;
    let deadline = std::time::Instant::now() + within;
    loop {
        let last = match client.refresh_route(topic).await {
            Ok(r) if !r.provisional && !r.groups.is_empty() && r.groups.iter().all(|g| g.queues == queues) => {
                return Ok(r
                    .groups
                    .iter()
                    .flat_map(|g| (0..g.queues).map(|q| (g.broker_group.clone(), q)))
                    .collect());
            }
            Ok(r) => format!(
                "routed with queue counts {:?}",
                r.groups.iter().map(|g| g.queues).collect::<Vec<_>>()
            ),
            Err(e) => e.to_string(),
        };
        if std::time::Instant::now() >= deadline {
            anyhow::bail!("topic {topic} is not routed with {queues} queues after {within:?}: {last}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
