//! The small client-side subcommands: `produce`, `pull`, `consume`, `admin`, and
//! `store verify`. Each is a thin shell over the client library or raft-store.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;

use crate::{
    AdminCommand, ConsumeArgs, DlqCommand, GroupCommand, NamesrvAddr, ProduceArgs, PullArgs, TopicCommand,
    TransactionCommand,
};

/// The filter a `--tag` / `--sql` pair asks for.
fn filter(tag: &str, sql: &Option<String>) -> raftmq_client::Filter {
    match sql {
        Some(expr) => raftmq_client::Filter::Sql92(expr.clone()),
        None => raftmq_client::Filter::Tag(tag.to_owned()),
    }
}

pub fn client(namesrv: NamesrvAddr) -> anyhow::Result<raftmq_client::Client> {
    Ok(raftmq_client::Client::new(client_config(namesrv)?)?)
}

/// The client settings the CLI's `--namesrv` and `--tls-ca-file` describe.
pub fn client_config(namesrv: NamesrvAddr) -> anyhow::Result<raftmq_client::ClientConfig> {
    let mut config = raftmq_client::ClientConfig::new(namesrv.namesrv);
    if let (Some(access_key), Some(file)) = (namesrv.access_key, namesrv.secret_file) {
        let secret = raftmq_broker::auth::read_secret(&file).map_err(|e| anyhow::anyhow!("--secret-file: {e}"))?;
        config = config.with_credentials(access_key, secret);
    }
    Ok(match namesrv.tls_ca_file {
        Some(ca) => config.with_tls_ca_file(&ca)?,
        None => config,
    })
}

pub async fn run_produce(args: ProduceArgs) -> anyhow::Result<ExitCode> {
    use raftmq_client::MessageExt;
    let mut properties = std::collections::HashMap::new();
    for p in &args.properties {
        let (k, v) = p
            .split_once('=')
            .with_context(|| format!("--property {p:?} is not NAME=VALUE"))?;
        properties.insert(k.to_owned(), v.to_owned());
    }
    if args.transactional {
        return run_produce_transactional(args, properties).await;
    }
    let mut producer = client(args.namesrv)?.producer();
    if args.trace {
        producer = producer.enable_msg_trace();
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

/// What `produce --transactional` knows about its transactions, shared with
/// its checker (which runs on Tokio's blocking pool).
#[derive(Default)]
struct TxnDemo {
    /// Transaction ids this run began.
    ours: std::collections::HashSet<String>,
    /// Decisions whose EndTransaction failed: a check-back is answered with them.
    decided: std::collections::HashMap<String, raftmq_client::TransactionResolution>,
    /// The last answer given to a check-back, per transaction id.
    answered: std::collections::HashMap<String, raftmq_client::TransactionResolution>,
}

fn resolution_word(r: raftmq_client::TransactionResolution) -> &'static str {
    match r {
        raftmq_client::TransactionResolution::Commit => "commit",
        raftmq_client::TransactionResolution::Rollback => "rollback",
        raftmq_client::TransactionResolution::Unknown => "unknown",
    }
}

fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// `produce --transactional`: each message is a half message of
/// `--producer-group`, ended as `--outcome` says. Transactions left unknown, or
/// whose end failed, are left to the brokers' check-backs, which this command
/// answers (printing each) until they are all resolved or `--wait-secs` passed;
/// then it prints how each ended.
async fn run_produce_transactional(
    args: ProduceArgs,
    properties: std::collections::HashMap<String, String>,
) -> anyhow::Result<ExitCode> {
    use std::sync::{Arc, Mutex};

    use raftmq_client::{MessageExt, TransactionResolution as R};
    let group = args
        .producer_group
        .clone()
        .context("--transactional needs --producer-group")?;
    let client = client(args.namesrv)?;
    let demo = Arc::new(Mutex::new(TxnDemo::default()));
    let check_answer = R::from(args.check_answer);
    let producer = client.transaction_producer(&group, {
        let demo = demo.clone();
        move |c| {
            let m = c.message.message.as_ref();
            let seq = m.and_then(|m| m.properties.get("seq")).map_or("?", String::as_str);
            let topic = m.map_or("?", |m| m.topic.as_str());
            let mut d = demo.lock().unwrap_or_else(|p| p.into_inner());
            let (answer, why) = match d.decided.get(&c.transaction_id) {
                Some(r) => (*r, "its local transaction's decision, whose end failed"),
                None if d.ours.contains(&c.transaction_id) => (check_answer, "--check-answer"),
                None => (check_answer, "--check-answer; not sent by this run"),
            };
            d.answered.insert(c.transaction_id.clone(), answer);
            println!(
                "check #{} of transaction {} ({}/{}/{} message {seq}): answering {} ({why})",
                c.check_times,
                c.transaction_id,
                c.broker_group,
                topic,
                c.message.queue_id,
                resolution_word(answer),
            );
            answer
        }
    })?;
    let outcome = R::from(args.outcome);
    let started = std::time::Instant::now();
    let (mut ended, mut failed) = (0u64, 0u64);
    // Transactions the check-backs are to settle: (message number, half receipt).
    let mut waiting = Vec::new();
    for i in 0..args.count {
        let mut msg = raftmq_proto::v1::Message::new(vec![b'x'; args.size]);
        msg.tag = args.tag.clone();
        msg.properties.clone_from(&properties);
        msg.properties.insert("seq".into(), i.to_string());
        if let Some(k) = &args.key {
            msg.keys = vec![k.clone()];
        }
        let half = match producer.begin(&args.topic, msg).await {
            Ok(r) => r,
            Err(e) => {
                failed += 1;
                if e.is_outcome_unknown() {
                    eprintln!(
                        "message {i}: half message maybe stored ({e}); if it was, the broker checks back and gets {}",
                        resolution_word(check_answer)
                    );
                } else {
                    eprintln!("message {i}: {e}");
                }
                continue;
            }
        };
        let id = half.transaction_id.clone();
        demo.lock().unwrap_or_else(|p| p.into_inner()).ours.insert(id.clone());
        let at = format!("{}/{}", half.broker_group, half.queue_id);
        let end = match outcome {
            R::Commit => Some(producer.commit(&half).await),
            R::Rollback => Some(producer.rollback(&half).await),
            R::Unknown => None,
        };
        match end {
            Some(Ok(r)) => {
                ended += 1;
                let again = if r.already_ended { " (already ended)" } else { "" };
                if outcome == R::Commit {
                    println!(
                        "message {i}: transaction {id} committed at {}/{}@{}{again}",
                        half.broker_group, r.queue_id, r.queue_offset
                    );
                } else {
                    println!("message {i}: transaction {id} on {at} rolled back{again}");
                }
            }
            Some(Err(e)) => {
                println!(
                    "message {i}: transaction {id} on {at}: {} failed ({e}); left to the check-backs",
                    resolution_word(outcome)
                );
                demo.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .decided
                    .insert(id, outcome);
                waiting.push((i, half));
            }
            None => {
                println!("message {i}: transaction {id} on {at} left unknown; the broker will check back");
                waiting.push((i, half));
            }
        }
    }
    let secs = started.elapsed().as_secs_f64();
    let ended = match outcome {
        R::Commit => format!("{ended} committed, "),
        R::Rollback => format!("{ended} rolled back, "),
        R::Unknown => String::new(),
    };
    println!(
        "{} half message(s) stored, {ended}{} left to check-backs, {failed} failed in {secs:.2}s",
        args.count - failed,
        waiting.len()
    );
    let mut unresolved = 0u64;
    if !waiting.is_empty() {
        unresolved = settle_transactions(&client, &group, &waiting, &demo, args.wait_secs).await?;
    }
    producer.shutdown();
    Ok(if failed == 0 && unresolved == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Answers check-backs (the producer's checker does) until none of `waiting`
/// is pending on its broker group or `wait_secs` passed; then prints how each
/// ended (a committed message can be looked up by its id; a rolled-back one
/// cannot). Returns how many are still pending.
async fn settle_transactions(
    client: &raftmq_client::Client,
    group: &str,
    waiting: &[(u64, raftmq_client::SendReceipt)],
    demo: &std::sync::Mutex<TxnDemo>,
    wait_secs: u64,
) -> anyhow::Result<u64> {
    use raftmq_client::TransactionResolution as R;
    println!(
        "waiting up to {wait_secs} s for the brokers to check back on {} transaction(s)",
        waiting.len()
    );
    let admin = client.admin();
    let started = std::time::Instant::now();
    let deadline = started + Duration::from_secs(wait_secs);
    let mut pending: std::collections::HashSet<String>;
    loop {
        pending = match admin.list_transactions(group, 10_000).await {
            Ok(groups) => groups
                .into_iter()
                .flat_map(|g| g.transactions)
                .map(|t| t.transaction_id)
                .filter(|id| waiting.iter().any(|(_, h)| h.transaction_id == *id))
                .collect(),
            Err(e) => {
                eprintln!("listing pending transactions failed: {e}");
                waiting.iter().map(|(_, h)| h.transaction_id.clone()).collect()
            }
        };
        if pending.is_empty() || std::time::Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let (mut committed, mut rolled_back) = (0u64, 0u64);
    for (i, half) in waiting {
        let id = &half.transaction_id;
        if pending.contains(id) {
            println!("message {i}: transaction {id} still pending after {wait_secs} s");
            continue;
        }
        let answered = demo.lock().unwrap_or_else(|p| p.into_inner()).answered.get(id).copied();
        match admin.query_message_by_id(id).await {
            Ok(Some(m)) => {
                committed += 1;
                let how = if answered == Some(R::Commit) {
                    "by a check-back answer"
                } else {
                    "(not by this producer's check-back answer)"
                };
                println!(
                    "message {i}: transaction {id} committed {how}, at {}/{}@{}",
                    half.broker_group, m.queue_id, m.queue_offset
                );
            }
            Ok(None) => {
                rolled_back += 1;
                let how = match answered {
                    Some(R::Rollback) => "by a check-back answer",
                    Some(R::Unknown) | None => "by the broker after its maximum checks went unanswered",
                    Some(R::Commit) => "though this producer answered commit",
                };
                println!("message {i}: transaction {id} rolled back {how}");
            }
            Err(e) => println!("message {i}: transaction {id} resolved, but looking it up failed: {e}"),
        }
    }
    println!(
        "check-backs: {committed} committed, {rolled_back} rolled back, {} still pending after {:.1}s",
        pending.len(),
        started.elapsed().as_secs_f64()
    );
    Ok(pending.len() as u64)
}

/// `admin transaction list`: per broker group, its totals and pending half messages.
async fn run_transaction(cmd: TransactionCommand) -> anyhow::Result<()> {
    let TransactionCommand::List {
        namesrv,
        producer_group,
        max,
    } = cmd;
    let filter = producer_group.unwrap_or_default();
    let groups = client(namesrv)?.admin().list_transactions(&filter, max).await?;
    let now = wall_ms();
    let secs = |ms: u64| format!("{:.1}s", ms as f64 / 1000.0);
    let (mut pending, mut committed, mut rolled_back, mut unresolved) = (0u64, 0u64, 0u64, 0u64);
    for g in &groups {
        println!(
            "{}  pending {}  committed {}  rolled back {} (unresolved after max checks {})",
            g.broker_group, g.pending, g.committed, g.rolled_back, g.rolled_back_unresolved
        );
        pending += g.pending;
        committed += g.committed;
        rolled_back += g.rolled_back;
        unresolved += g.rolled_back_unresolved;
        for t in &g.transactions {
            let next = if t.next_check_ms > now {
                format!("in {}", secs(t.next_check_ms - now))
            } else {
                format!("due ({} ago)", secs(now - t.next_check_ms))
            };
            println!(
                "  {}  producer group {}  {}/{}  age {}  checks {}  next check {}{}",
                t.transaction_id,
                t.producer_group,
                t.topic,
                t.queue_id,
                secs(now.saturating_sub(t.store_timestamp_ms)),
                t.check_times,
                next,
                if t.keys.is_empty() {
                    String::new()
                } else {
                    format!("  keys {:?}", t.keys)
                }
            );
        }
        let listed = g.transactions.len() as u64;
        if filter.is_empty() && listed < g.pending {
            println!("  ... {} more not listed (--max {max})", g.pending - listed);
        } else if !filter.is_empty() {
            println!("  {listed} of producer group {filter} listed (at most --max {max})");
        }
    }
    if groups.len() > 1 {
        println!(
            "all {} broker groups  pending {pending}  committed {committed}  rolled back {rolled_back} (unresolved after max checks {unresolved})",
            groups.len()
        );
    }
    Ok(())
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
                let storage = storage_line(&g);
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
                            Some(ms) if ms > UNREACHABLE_AFTER_MS => {
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
                println!("  storage (node {}): {storage}", g.reported_by);
            }
        }
        AdminCommand::Health {
            broker,
            namesrv,
            timeout_ms,
            tls_ca_file,
        } => health(broker, namesrv, Duration::from_millis(timeout_ms), tls_ca_file).await?,
        AdminCommand::Topic(TopicCommand::Create {
            namesrv,
            topic,
            queues,
            groups,
            message_type,
            trace,
        }) => {
            // Not given: UNSPECIFIED, which the broker makes NORMAL for a new
            // topic and leaves alone on an existing one (and likewise the trace).
            let message_type = message_type.map_or(raftmq_proto::v1::MessageType::Unspecified, Into::into);
            let config = raftmq_proto::v1::TopicConfig {
                name: topic.clone(),
                queues_per_group: queues,
                perm: raftmq_proto::v1::Permission::ReadWrite as i32,
                message_type: message_type as i32,
                trace,
            };
            client(namesrv)?.admin().create_topic_with(config, &groups).await?;
            let on = if groups.is_empty() {
                "per broker group".to_owned()
            } else {
                format!("per broker group on {}", groups.join(", "))
            };
            match message_type {
                raftmq_proto::v1::MessageType::Unspecified => {
                    println!("topic {topic} created with {queues} queue(s) {on}")
                }
                t => println!(
                    "topic {topic} created with {queues} queue(s) {on}, message type {}",
                    message_type_name(t)
                ),
            }
            if let Some(on) = trace {
                println!("message trace {}", if on { "on" } else { "off" });
            }
        }
        AdminCommand::Group(cmd) => run_group(cmd).await?,
        AdminCommand::Dlq(cmd) => run_dlq(cmd).await?,
        AdminCommand::Transaction(cmd) => run_transaction(cmd).await?,
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
                println!(
                    "{group}  {}  queues {}  perm {}  type {}{}",
                    t.name,
                    t.queues_per_group,
                    t.perm,
                    message_type_name(t.message_type()),
                    if t.trace == Some(true) { "  traced" } else { "" }
                );
            }
        }
        AdminCommand::Trace { namesrv, id } => {
            let events = client(namesrv)?.admin().trace(&id).await?;
            anyhow::ensure!(
                !events.is_empty(),
                "no trace of message {id} (not traced, not stored, or its trace records were trimmed)"
            );
            println!("message {id}");
            let start = events[0].time_ms;
            for e in &events {
                println!("{}", trace_line(e, start));
            }
        }
    }
    Ok(())
}

/// One step of a message's trace: time since the first step, the time, the
/// kind, and what the kind records.
fn trace_line(e: &raftmq_proto::v1::TraceEvent, start_ms: u64) -> String {
    use raftmq_proto::v1::TraceEventKind as K;
    let at = match e.queue_offset {
        Some(o) => format!("{}/{}@{o}", e.topic, e.queue_id),
        None => format!("{}/{}", e.topic, e.queue_id),
    };
    // "  due at T" when the step names a time the message is due.
    let due = |what: &str| match e.next_delivery_ms {
        0 => String::new(),
        ms => format!("  {what} {ms}"),
    };
    let what = match e.kind() {
        K::Produced => format!(
            "{at}  Raft index {}  producer {:?}{}",
            e.raft_index,
            e.producer,
            due("due at")
        ),
        K::Delivered => format!(
            "group {}  client {:?}  attempt {}  {at}{}",
            e.consumer_group,
            e.client_id,
            e.attempt,
            if e.from_topic.is_empty() {
                String::new()
            } else {
                format!(" (read from {})", e.from_topic)
            }
        ),
        K::Retried => format!(
            "group {}  attempt {} failed{}",
            e.consumer_group,
            e.attempt,
            due("due again at")
        ),
        K::Acked | K::DeadLettered => {
            let client = if e.client_id.is_empty() {
                String::new()
            } else {
                format!("  client {:?}", e.client_id)
            };
            format!("group {}{client}  attempt {}", e.consumer_group, e.attempt)
        }
        K::Unspecified => String::new(),
    };
    let kind = e.kind().as_str_name().trim_start_matches("TRACE_EVENT_KIND_");
    let detail = if e.detail.is_empty() {
        String::new()
    } else {
        format!("  ({})", e.detail)
    };
    format!(
        "+{:>9.3}s  {}  {kind:<13}  {what}{detail}  [{} node {}]",
        e.time_ms.saturating_sub(start_ms) as f64 / 1000.0,
        e.time_ms,
        e.broker_group,
        e.node_id
    )
}

/// A follower whose last acknowledgement is older than this is reported
/// unreachable (`admin cluster`, the console): well past any election timeout,
/// the leader cannot reach it.
pub const UNREACHABLE_AFTER_MS: u64 = 1000;

/// A topic message type as RocketMQ names it ("FIFO"); UNSPECIFIED (a broker
/// built before topics had a type, whose topics accept every type) as MIXED.
pub fn message_type_name(t: raftmq_proto::v1::MessageType) -> &'static str {
    use raftmq_proto::v1::MessageType;
    match t {
        MessageType::Normal => "NORMAL",
        MessageType::Fifo => "FIFO",
        MessageType::Delay => "DELAY",
        MessageType::Transaction => "TRANSACTION",
        MessageType::Mixed | MessageType::Unspecified => "MIXED",
    }
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

/// Where `admin group reset-offset --to` (and the console's reset) moves a
/// group: `first`, `last` or ms since the epoch, as the ResetConsumerOffset
/// request takes it.
pub fn reset_target(to: &str) -> anyhow::Result<(raftmq_proto::v1::StartFrom, u64)> {
    use raftmq_proto::v1::StartFrom as Pb;
    Ok(match start_from(to)? {
        raftmq_client::StartFrom::First => (Pb::First, 0),
        raftmq_client::StartFrom::Last => (Pb::Last, 0),
        raftmq_client::StartFrom::Timestamp(t) => (Pb::Timestamp, t),
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
                    // Retention removed messages the group had not consumed yet.
                    let skipped = if q.skipped > 0 {
                        format!("  SKIPPED {} (retention; resumes at min {})", q.skipped, q.min_offset)
                    } else {
                        String::new()
                    };
                    println!(
                        "  {}/{}  committed {}  min {}  max {}  lag {}  {}{skipped}",
                        q.topic,
                        q.queue_id,
                        q.committed_offset.map_or("-".to_owned(), |o| o.to_string()),
                        q.min_offset,
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
            let (to, ts) = reset_target(&to)?;
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

/// A node's retained data and disk, from its ClusterStatus: what `admin
/// cluster` and `admin health` print.
fn storage_line(g: &raftmq_proto::v1::GroupStatus) -> String {
    let oldest = match g.oldest_message_ms {
        Some(ms) => chrono::DateTime::<chrono::Utc>::from_timestamp_millis(i64::try_from(ms).unwrap_or(i64::MAX))
            .map_or_else(|| format!("{ms} ms"), |t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string()),
        None => "none".to_owned(),
    };
    let disk = match (g.disk_used_ratio, g.disk_full) {
        (Some(r), true) => format!("disk {:.1}% used, FULL: sends refused", r * 100.0),
        (Some(r), false) => format!("disk {:.1}% used", r * 100.0),
        (None, _) => "disk not measured yet".to_owned(),
    };
    format!(
        "{} bytes in {} segment(s), oldest message {oldest}, retention horizon {}, {disk}",
        g.log_bytes, g.log_segments, g.retention_horizon
    )
}

/// One RPC to one endpoint, no retries: the answer a health check wants.
async fn health(
    broker: Option<String>,
    namesrv: Option<String>,
    timeout: Duration,
    tls_ca_file: Option<std::path::PathBuf>,
) -> anyhow::Result<()> {
    use raftmq_proto::v1::admin_service_client::AdminServiceClient;
    use raftmq_proto::v1::name_server_service_client::NameServerServiceClient;
    let (addr, what) = match (&broker, &namesrv) {
        (Some(b), _) => (b.as_str(), "broker node"),
        (None, Some(n)) => (n.as_str(), "NameServer"),
        (None, None) => anyhow::bail!("give --broker or --namesrv"),
    };
    let tls = match &tls_ca_file {
        Some(ca) => Some(raftmq_tls::ClientTls::from_ca_file("--tls-ca-file", ca)?.config()),
        None => None,
    };
    let endpoint = raftmq_tls::endpoint(addr, tls.as_ref())?
        .connect_timeout(timeout)
        .timeout(timeout);
    let check = async {
        let channel = endpoint.connect().await?;
        if broker.is_some() {
            let s = match AdminServiceClient::new(channel)
                .cluster_status(raftmq_proto::v1::ClusterStatusRequest::default())
                .await
            {
                Ok(s) => s.into_inner(),
                // It answered: serving. A health check holds no credentials.
                Err(s) if s.code() == tonic::Code::Unauthenticated => {
                    println!("{what} {addr} is serving (it requires signed requests)");
                    return Ok(());
                }
                Err(s) => return Err(s.into()),
            };
            let g = s.groups.first();
            println!(
                "{what} {addr} is serving: group {} term {} leader {}",
                g.map_or("-", |g| g.broker_group.as_str()),
                g.map_or(0, |g| g.term),
                g.and_then(|g| g.leader_id).map_or("none".to_owned(), |l| l.to_string())
            );
            if let Some(g) = g {
                // Serving reads still, so not a failed check: but say it loudly.
                println!("  storage: {}", storage_line(g));
            }
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
    // Every live group gets the topic; wait until the route lists each of them,
    // not just the first to register it: a reader that took a one-group route
    // would never read what producers send to the other groups.
    let live: Vec<String> = client
        .admin()
        .list_cluster()
        .await
        .context("listing the broker groups")?
        .into_iter()
        .map(|g| g.broker_group)
        .collect();
    client
        .admin()
        .create_topic(topic, queues, raftmq_proto::v1::Permission::ReadWrite)
        .await
        .with_context(|| format!("creating topic {topic}"))?;
    let deadline = std::time::Instant::now() + within;
    loop {
        let complete = |r: &raftmq_client::TopicRoute| {
            !r.provisional
                && !r.groups.is_empty()
                && r.groups.iter().all(|g| g.queues == queues)
                && live.iter().all(|name| r.groups.iter().any(|g| &g.broker_group == name))
        };
        let last = match client.refresh_route(topic).await {
            Ok(r) if complete(&r) => {
                return Ok(r
                    .groups
                    .iter()
                    .flat_map(|g| (0..g.queues).map(|q| (g.broker_group.clone(), q)))
                    .collect());
            }
            Ok(r) => format!(
                "routed on {:?} with queue counts {:?} (live groups {live:?})",
                r.groups.iter().map(|g| g.broker_group.as_str()).collect::<Vec<_>>(),
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
