//! `raftmq chaos`: a Jepsen-style check of a docker-compose cluster. Producers
//! (plain and ordered by sharding key) and consumers run against the cluster and
//! record a history while a nemesis kills, pauses and isolates leaders and
//! followers through the Docker CLI; after healing and a final drain, a checker
//! counts lost, unexpected, duplicated and out-of-order messages and measures how
//! long each fault kept writes from succeeding.
//!
//! Beside them, under the same faults, run delayed messages and a POP
//! (SimpleConsumer) group, checked for timers fired early, late, never or twice
//! and for POP messages lost or handed out again after a confirmed ack: see
//! `chaos_lifecycle`; and transactions (half messages committed or rolled back,
//! some left to the brokers' check-backs), checked for a commit missing or a
//! rollback visible: see `chaos_txn`.
//!
//! Consumers read every queue by offset (pull) rather than through a consumer
//! group, so what is checked is the broker's log itself, not a rebalance.
//!
//! With several broker groups (the compose cluster runs broker-a and broker-b) the
//! topics have queues on each, and the faults take turns over the groups: the
//! k-th fault of a kind hits group (k + the kind's first position in `--faults`)
//! mod the number of groups, so even a short schedule kills, pauses and cuts off
//! leaders of every group; `kill-all` kills every broker of every group. Lost
//! messages are counted across all groups.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use raftmq_client::{Client, ClientConfig, MessageExt};
use raftmq_proto::v1 as pb;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Fault {
    /// SIGKILL the leader's container; start it again after --hold.
    KillLeader,
    /// Freeze the leader's container (SIGSTOP) for --hold.
    PauseLeader,
    /// Disconnect the leader's container from the network for --hold.
    IsolateLeader,
    /// SIGKILL a follower's container; start it again after --hold.
    KillFollower,
    /// SIGKILL every broker container; start them all again after --hold.
    KillAll,
}

#[derive(clap::Args, Debug)]
pub struct ChaosArgs {
    /// NameServer address(es) of the cluster under test, comma-separated.
    #[arg(long, value_delimiter = ',', required = true)]
    pub namesrv: Vec<String>,
    /// docker compose project whose broker containers the nemesis may hit.
    #[arg(long, default_value = "raftmq")]
    pub project: String,
    /// Seconds of fault injection (the run also has a warm-up and a final drain).
    #[arg(long, default_value_t = 150)]
    pub duration: u64,
    /// Seconds from one fault to the next (fault held, then healthy).
    #[arg(long, default_value_t = 20)]
    pub interval: u64,
    /// Seconds a fault is held before it is healed.
    #[arg(long, default_value_t = 4.0)]
    pub hold: f64,
    /// Faults, applied in this order round-robin.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "kill-leader,pause-leader,kill-leader,isolate-leader,kill-leader,kill-follower,kill-all"
    )]
    pub faults: Vec<Fault>,
    /// Producers sending unkeyed messages one at a time.
    #[arg(long, default_value_t = 2)]
    pub producers: usize,
    /// Sharding keys, each with its own producer sending in order.
    #[arg(long, default_value_t = 6)]
    pub keys: usize,
    #[arg(long, default_value = "ChaosTopic")]
    pub topic: String,
    #[arg(long, default_value_t = 4)]
    pub queues: u32,
    /// Where the JSON history summary is written.
    #[arg(long, default_value = "chaos-report.json")]
    pub out: PathBuf,
    /// How messages are read back: `group` (two orderly PushConsumer members of
    /// consumer group `chaos`, offsets committed through Raft, so the group's own
    /// failover is under test too) or `offset` (one pull loop per queue).
    #[arg(long, value_enum, default_value = "group")]
    pub consumers: ConsumerMode,
    /// Topic of the delayed-message workload.
    #[arg(long, default_value = "ChaosTimerTopic")]
    pub timer_topic: String,
    /// Topic of the POP (SimpleConsumer) workload.
    #[arg(long, default_value = "ChaosPopTopic")]
    pub pop_topic: String,
    /// Consumer group of the POP workload.
    #[arg(long, default_value = "chaos-pop")]
    pub pop_group: String,
    /// Run without the delayed-message and POP workloads.
    #[arg(long)]
    pub no_lifecycle: bool,
    /// Topic of the transactional workload.
    #[arg(long, default_value = "ChaosTxnTopic")]
    pub txn_topic: String,
    /// Producer group of the transactional workload.
    #[arg(long, default_value = "chaos-txn")]
    pub txn_producer_group: String,
    /// Run without the transactional workload.
    #[arg(long)]
    pub no_transactions: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ConsumerMode {
    Group,
    Offset,
}

/// The consumer group of `--consumers group`.
const CHAOS_GROUP: &str = "chaos";

const VALUE: &str = "chaos-value";
const KEY: &str = "chaos-key";
const SEQ: &str = "chaos-seq";

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
enum Outcome {
    Ok,
    /// The broker said no: not stored.
    Failed,
    /// Timed out or lost the connection: maybe stored.
    Unknown,
}

#[derive(Clone, Debug, serde::Serialize)]
struct SendOp {
    value: u64,
    key: Option<u32>,
    seq: u64,
    outcome: Outcome,
    /// The broker group that acknowledged it (empty unless acknowledged).
    group: String,
    /// Milliseconds since the run started.
    start_ms: u64,
    end_ms: u64,
}

#[derive(Clone, Debug)]
struct Consumed {
    value: u64,
    key: Option<u32>,
    seq: u64,
    /// Tells a value stored twice (two ids) from one delivered twice (one id).
    message_id: String,
}

#[derive(Clone, Debug, serde::Serialize)]
struct FaultEvent {
    fault: Fault,
    /// The broker group hit (empty for `kill-all`, which hits every group).
    group: String,
    targets: Vec<String>,
    injected_ms: u64,
    healed_ms: u64,
    /// From the fault being in force to the first acknowledgement after it.
    recovery_ms: Option<u64>,
}

#[derive(Debug, serde::Serialize)]
struct Summary {
    sends: u64,
    acknowledged: u64,
    /// Acknowledged sends per broker group: every group must have carried traffic.
    acknowledged_per_group: BTreeMap<String, u64>,
    failed: u64,
    unknown: u64,
    consumed: u64,
    lost: u64,
    lost_values: Vec<u64>,
    unexpected: u64,
    /// Values stored twice: consumed under two or more message ids (a retried
    /// send the broker did not recognise).
    duplicates: u64,
    /// Extra deliveries of one stored message (same id): the consumer group's
    /// at-least-once redelivery after a failover, not a second copy.
    redelivered: u64,
    unknown_then_present: u64,
    order_violations: u64,
    order_examples: Vec<String>,
    faults: Vec<FaultEvent>,
    kill_leader_recovery_ms_median: Option<u64>,
    kill_leader_recovery_ms_max: Option<u64>,
    /// The delayed-message and POP workloads (`timers_*`, `pop_*`).
    #[serde(flatten)]
    lifecycle: Option<crate::chaos_lifecycle::Summary>,
    /// The transactional workload (`txn_*`).
    #[serde(flatten)]
    transactions: Option<crate::chaos_txn::Summary>,
}

/// Shared state of one run.
struct Run {
    started: Instant,
    /// `started` on the wall clock, to place Docker's timestamps on the run's.
    started_wall: std::time::SystemTime,
    stop_sending: AtomicBool,
    stop_consuming: AtomicBool,
    next_value: AtomicU64,
    sends: Mutex<Vec<SendOp>>,
    consumed: Mutex<Vec<Consumed>>,
}

impl Run {
    fn ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }
}

pub async fn run(args: ChaosArgs) -> anyhow::Result<bool> {
    anyhow::ensure!(!args.faults.is_empty(), "--faults is empty");
    anyhow::ensure!(args.interval as f64 > args.hold, "--interval must exceed --hold");
    let docker = Docker::new(&args.project).await?;
    let client = Client::new(ClientConfig::new(args.namesrv.clone()))?;
    let queues =
        crate::tools::create_topic_and_wait(&client, &args.topic, args.queues, Duration::from_secs(30)).await?;
    // The delayed-message and POP workloads; the faults end after the 5 s
    // warm-up and --duration.
    let lifecycle = if args.no_lifecycle {
        None
    } else {
        let cfg = crate::chaos_lifecycle::Config {
            timer_topic: args.timer_topic.clone(),
            pop_topic: args.pop_topic.clone(),
            pop_group: args.pop_group.clone(),
            queues: args.queues,
            faults_end: Instant::now() + Duration::from_secs(5 + args.duration),
        };
        Some(crate::chaos_lifecycle::Workloads::start(&client, cfg).await?)
    };
    let transactions = if args.no_transactions {
        None
    } else {
        let cfg = crate::chaos_txn::Config {
            topic: args.txn_topic.clone(),
            producer_group: args.txn_producer_group.clone(),
            queues: args.queues,
        };
        Some(crate::chaos_txn::Workload::start(&client, cfg).await?)
    };
    let run = Arc::new(Run {
        started: Instant::now(),
        started_wall: std::time::SystemTime::now(),
        stop_sending: AtomicBool::new(false),
        stop_consuming: AtomicBool::new(false),
        next_value: AtomicU64::new(1),
        sends: Mutex::new(Vec::new()),
        consumed: Mutex::new(Vec::new()),
    });

    let mut consumers = Vec::new();
    let mut members = Vec::new();
    match args.consumers {
        ConsumerMode::Offset => {
            for (group, queue) in queues.clone() {
                consumers.push(tokio::spawn(consume(
                    client.clone(),
                    args.topic.clone(),
                    group,
                    queue,
                    run.clone(),
                )));
            }
        }
        ConsumerMode::Group => {
            for i in 0..2 {
                members.push(group_member(&client, &args.topic, i, run.clone())?);
            }
        }
    }
    let mut producers = Vec::new();
    for _ in 0..args.producers {
        producers.push(tokio::spawn(produce(
            client.clone(),
            args.topic.clone(),
            None,
            run.clone(),
        )));
    }
    for k in 0..args.keys {
        let key = u32::try_from(k)?;
        producers.push(tokio::spawn(produce(
            client.clone(),
            args.topic.clone(),
            Some(key),
            run.clone(),
        )));
    }

    // Warm up healthy, then the nemesis schedule, then heal and drain.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let mut events = Vec::new();
    let end = Instant::now() + Duration::from_secs(args.duration);
    let hold = Duration::from_secs_f64(args.hold);
    let mut i = 0usize;
    let mut per_kind: HashMap<Fault, usize> = HashMap::new();
    while Instant::now() < end {
        let fault = args.faults[i % args.faults.len()];
        i += 1;
        let kth = per_kind.entry(fault).or_default();
        let first = args.faults.iter().position(|f| *f == fault).unwrap_or(0);
        let group_turn = *kth + first;
        *kth += 1;
        let next = Instant::now() + Duration::from_secs(args.interval);
        match inject(&docker, &client, fault, group_turn, hold, &run).await {
            Ok(e) => {
                eprintln!(
                    "chaos: {:?} on {} {:?} at {:.1}s, held {:.1}s",
                    e.fault,
                    if e.group.is_empty() { "every group" } else { &e.group },
                    e.targets,
                    e.injected_ms as f64 / 1000.0,
                    (e.healed_ms - e.injected_ms) as f64 / 1000.0
                );
                events.push(e);
            }
            Err(e) => eprintln!("chaos: could not inject {fault:?}: {e:#}"),
        }
        tokio::time::sleep_until(next.into()).await;
    }
    docker.heal_all().await;
    // Let sends continue a little on the healed cluster, then stop them.
    tokio::time::sleep(Duration::from_secs(5)).await;
    run.stop_sending.store(true, Ordering::Relaxed);
    if let Some(w) = &lifecycle {
        w.stop_sending();
    }
    if let Some(w) = &transactions {
        w.stop_sending();
    }
    for p in producers {
        p.await?;
    }
    // Final drain: consumers stop once every queue is read to its end; the
    // lifecycle workloads drain (bounded) meanwhile and are checked.
    let drain_main = async {
        match args.consumers {
            ConsumerMode::Offset => drain(&client, &args.topic, &queues, &run).await,
            ConsumerMode::Group => drain_group(&client).await,
        }
    };
    let finish_lifecycle = async {
        match lifecycle {
            Some(w) => Some(w.finish().await),
            None => None,
        }
    };
    let finish_transactions = async {
        match transactions {
            Some(w) => Some(w.finish().await),
            None => None,
        }
    };
    let (drained, lifecycle, transactions) = tokio::join!(drain_main, finish_lifecycle, finish_transactions);
    run.stop_consuming.store(true, Ordering::Relaxed);
    for c in consumers {
        c.await?;
    }
    for m in members {
        if let Err(e) = m.shutdown().await {
            eprintln!("chaos: a group member did not leave cleanly: {e}");
        }
    }
    if let Err(e) = drained {
        eprintln!("chaos: final drain incomplete: {e:#}");
    }

    let mut summary = check(&run, events);
    summary.lifecycle = lifecycle;
    summary.transactions = transactions;
    std::fs::write(&args.out, serde_json::to_string_pretty(&summary)?)
        .with_context(|| format!("writing {}", args.out.display()))?;
    print_summary(&summary, &args);
    Ok(summary.lost == 0
        && summary.unexpected == 0
        && summary.order_violations == 0
        && summary.lifecycle.as_ref().is_none_or(|l| l.passed())
        && summary.transactions.as_ref().is_none_or(|t| t.passed()))
}

/// One producer: sends one message at a time until told to stop. A keyed producer
/// numbers its messages so the checker can see their order.
async fn produce(client: Client, topic: String, key: Option<u32>, run: Arc<Run>) {
    let producer = client.producer();
    let mut seq = 0u64;
    while !run.stop_sending.load(Ordering::Relaxed) {
        let value = run.next_value.fetch_add(1, Ordering::Relaxed);
        let mut m = pb::Message::new(format!("v{value}").into_bytes());
        m.properties.insert(VALUE.into(), value.to_string());
        m.properties.insert(SEQ.into(), seq.to_string());
        let start_ms = run.ms();
        let result = match key {
            Some(k) => {
                let key = format!("key-{k}");
                m.properties.insert(KEY.into(), k.to_string());
                m.keys.push(key.clone());
                producer.send_with_key(&topic, &key, m).await
            }
            None => producer.send(&topic, m).await,
        };
        let outcome = match &result {
            Ok(_) => Outcome::Ok,
            Err(e) if e.is_outcome_unknown() => Outcome::Unknown,
            Err(_) => Outcome::Failed,
        };
        run.sends.lock().unwrap_or_else(|p| p.into_inner()).push(SendOp {
            value,
            key,
            seq,
            outcome,
            group: result.as_ref().map(|r| r.broker_group.clone()).unwrap_or_default(),
            start_ms,
            end_ms: run.ms(),
        });
        seq += 1;
        if result.is_err() {
            // The client already retried within its deadline; do not spin.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Reads one queue from offset 0 in order, long polling, until told to stop.
async fn consume(client: Client, topic: String, group: String, queue: u32, run: Arc<Run>) -> (u64, u64) {
    let consumer = client.pull_consumer();
    let mut offset = 0u64;
    let mut max = 0u64;
    while !run.stop_consuming.load(Ordering::Relaxed) {
        match consumer
            .pull(
                &topic,
                &group,
                queue,
                offset,
                256,
                Duration::from_millis(500),
                &raftmq_client::Filter::all(),
            )
            .await
        {
            Ok(r) => {
                let mut got = Vec::with_capacity(r.messages.len());
                for p in &r.messages {
                    let Some(m) = p.message.as_ref() else { continue };
                    let prop = |k: &str| m.properties.get(k).and_then(|v| v.parse::<u64>().ok());
                    got.push(Consumed {
                        value: prop(VALUE).unwrap_or(0),
                        key: prop(KEY).and_then(|k| u32::try_from(k).ok()),
                        seq: prop(SEQ).unwrap_or(0),
                        message_id: p.message_id.clone(),
                    });
                }
                run.consumed.lock().unwrap_or_else(|p| p.into_inner()).extend(got);
                offset = r.next_offset;
                max = r.max_offset;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    (offset, max)
}

/// One orderly member of consumer group `chaos`, recording what it is given.
fn group_member(
    client: &Client,
    topic: &str,
    index: usize,
    run: Arc<Run>,
) -> anyhow::Result<raftmq_client::PushConsumer> {
    Ok(client
        .push_consumer(CHAOS_GROUP, topic)
        .client_id(&format!("chaos-member-{index}"))
        .start_from(raftmq_client::StartFrom::First)
        .mode(raftmq_client::ConsumeMode::Orderly)
        .pull_batch(256)
        .start(move |pulled| {
            if let Some(m) = pulled.message.as_ref() {
                let prop = |k: &str| m.properties.get(k).and_then(|v| v.parse::<u64>().ok());
                run.consumed.lock().unwrap_or_else(|p| p.into_inner()).push(Consumed {
                    value: prop(VALUE).unwrap_or(0),
                    key: prop(KEY).and_then(|k| u32::try_from(k).ok()),
                    seq: prop(SEQ).unwrap_or(0),
                    message_id: pulled.message_id.clone(),
                });
            }
            std::future::ready(raftmq_client::ConsumeResult::Success)
        })?)
}

/// Waits until group `chaos` has committed every queue to its end (lag 0 on
/// every broker group), which needs every message consumed.
async fn drain_group(client: &Client) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let last = match client.admin().describe_consumer_group(CHAOS_GROUP).await {
            Ok(groups) => {
                let lag: u64 = groups.iter().flat_map(|g| &g.queues).map(|q| q.lag).sum();
                if !groups.is_empty() && lag == 0 {
                    return Ok(());
                }
                format!("lag {lag}")
            }
            Err(e) => e.to_string(),
        };
        if Instant::now() >= deadline {
            bail!("after 60 s consumer group {CHAOS_GROUP} is not drained: {last}");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Waits until the consumed count stops growing and every queue's end has been
/// reached (the consumers' positions are not shared, so compare counts: the sum
/// of queue lengths against what was consumed).
async fn drain(client: &Client, topic: &str, queues: &[(String, u32)], run: &Run) -> anyhow::Result<()> {
    let consumer = client.pull_consumer();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut stored = 0u64;
        let mut complete = true;
        for (g, q) in queues {
            match consumer
                .pull(topic, g, *q, 0, 1, Duration::ZERO, &raftmq_client::Filter::all())
                .await
            {
                Ok(r) => stored += r.max_offset - r.min_offset,
                Err(_) => complete = false,
            }
        }
        let consumed = run.consumed.lock().unwrap_or_else(|p| p.into_inner()).len() as u64;
        if complete && consumed >= stored {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("after 60 s: {consumed} consumed of {stored} stored");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Applies `fault` to broker group `group_turn` (mod the number of groups, in name
/// order), holds it, heals it.
async fn inject(
    docker: &Docker,
    client: &Client,
    fault: Fault,
    group_turn: usize,
    hold: Duration,
    run: &Run,
) -> anyhow::Result<FaultEvent> {
    let mut status = client
        .admin()
        .cluster_status()
        .await
        .context("reading the cluster status")?;
    anyhow::ensure!(!status.is_empty(), "no broker group");
    status.sort_by(|a, b| a.broker_group.cmp(&b.broker_group));
    let group = &status[group_turn % status.len()];
    let leader_ep = group.leader_endpoint.clone();
    let followers: Vec<String> = group
        .replicas
        .iter()
        .map(|r| r.endpoint.clone())
        .filter(|e| *e != leader_ep)
        .collect();
    let leader = || {
        docker
            .container_for(&leader_ep)
            .context("no container holds the leader's endpoint")
    };
    let targets = match fault {
        Fault::KillLeader => vec![leader()?],
        Fault::PauseLeader => vec![leader()?],
        Fault::IsolateLeader => vec![leader()?],
        Fault::KillFollower => {
            let pick = followers
                .get(usize::try_from(run.ms() % 2).unwrap_or(0))
                .or(followers.first())
                .context("no follower")?;
            vec![
                docker
                    .container_for(pick)
                    .context("no container holds the follower's endpoint")?,
            ]
        }
        Fault::KillAll => docker.brokers.keys().cloned().collect(),
    };
    for t in &targets {
        match fault {
            Fault::KillLeader | Fault::KillFollower | Fault::KillAll => docker.run(&["kill", t]).await?,
            Fault::PauseLeader => docker.run(&["pause", t]).await?,
            Fault::IsolateLeader => {
                docker
                    .run(&["network", "disconnect", &docker.network_of(t)?, t])
                    .await?
            }
        };
    }
    // The fault is in force once the docker command has returned (a kill takes
    // ~0.2 s to issue; sends acknowledged meanwhile came from the old leader)...
    let mut injected_ms = run.ms();
    // ...except that a killed process is dead before `docker kill` returns, and a
    // failover can complete inside that window: for a kill, the time is when the
    // (last) container exited, as Docker recorded it.
    if matches!(fault, Fault::KillLeader | Fault::KillFollower | Fault::KillAll) {
        let mut last_exit = None;
        for t in &targets {
            if let Some(died) = docker.finished_at(t).await
                && let Ok(since) = died.duration_since(run.started_wall)
            {
                last_exit = last_exit.max(Some(u64::try_from(since.as_millis()).unwrap_or(u64::MAX)));
            }
        }
        if let Some(exited) = last_exit {
            injected_ms = injected_ms.min(exited);
        }
    }
    tokio::time::sleep(hold).await;
    for t in &targets {
        match fault {
            Fault::KillLeader | Fault::KillFollower | Fault::KillAll => docker.run(&["start", t]).await?,
            Fault::PauseLeader => docker.run(&["unpause", t]).await?,
            Fault::IsolateLeader => docker.reconnect(t).await?,
        };
    }
    let healed_ms = run.ms();
    Ok(FaultEvent {
        fault,
        group: if fault == Fault::KillAll {
            String::new()
        } else {
            group.broker_group.clone()
        },
        targets,
        injected_ms,
        healed_ms,
        recovery_ms: None,
    })
}

/// The Docker CLI, scoped to one compose project's broker containers.
struct Docker {
    /// container name -> (network, static IPv4 address to reconnect with)
    brokers: BTreeMap<String, (String, String)>,
}

impl Docker {
    async fn new(project: &str) -> anyhow::Result<Docker> {
        let filter = format!("label=com.docker.compose.project={project}");
        let names = run_docker(&["ps", "-a", "--filter", &filter, "--format", "{{.Names}}"]).await?;
        let mut brokers = BTreeMap::new();
        for name in names.lines().map(str::trim).filter(|n| !n.is_empty()) {
            let cmd = run_docker(&["inspect", "-f", "{{join .Config.Cmd \" \"}}", name]).await?;
            let env = run_docker(&["inspect", "-f", "{{join .Config.Env \" \"}}", name]).await?;
            if !(cmd.contains("broker") || env.contains("RAFTMQ_NODE_ID")) {
                continue;
            }
            let nets = run_docker(&[
                "inspect",
                "-f",
                "{{range $k, $v := .NetworkSettings.Networks}}{{$k}} {{$v.IPAMConfig.IPv4Address}}{{println}}{{end}}",
                name,
            ])
            .await?;
            let mut line = nets.lines().next().unwrap_or_default().split_whitespace();
            let (Some(net), Some(ip)) = (line.next(), line.next()) else {
                bail!("container {name} has no static IPv4 address on a network");
            };
            brokers.insert(name.to_owned(), (net.to_owned(), ip.to_owned()));
        }
        anyhow::ensure!(!brokers.is_empty(), "no broker containers in compose project {project}");
        eprintln!("chaos: broker containers {:?}", brokers);
        Ok(Docker { brokers })
    }

    fn container_for(&self, endpoint: &str) -> Option<String> {
        let host = endpoint.rsplit_once(':').map_or(endpoint, |(h, _)| h);
        self.brokers
            .iter()
            .find(|(name, (_, ip))| ip == host || name.as_str() == host)
            .map(|(name, _)| name.clone())
    }

    fn network_of(&self, container: &str) -> anyhow::Result<String> {
        Ok(self.brokers.get(container).context("unknown container")?.0.clone())
    }

    async fn reconnect(&self, container: &str) -> anyhow::Result<String> {
        let (net, ip) = self.brokers.get(container).context("unknown container")?;
        self.run(&["network", "connect", "--ip", ip, net, container]).await
    }

    async fn run(&self, args: &[&str]) -> anyhow::Result<String> {
        run_docker(args).await
    }

    /// When `container`'s process last exited (Docker's `State.FinishedAt`).
    async fn finished_at(&self, container: &str) -> Option<std::time::SystemTime> {
        let text = run_docker(&["inspect", "-f", "{{.State.FinishedAt}}", container])
            .await
            .ok()?;
        let at = chrono::DateTime::parse_from_rfc3339(text.trim()).ok()?;
        Some(std::time::SystemTime::from(at))
    }

    /// Undoes whatever a fault may have left behind: every broker running,
    /// unpaused and connected.
    async fn heal_all(&self) {
        for name in self.brokers.keys() {
            let _ = run_docker(&["unpause", name]).await;
            let _ = self.reconnect(name).await;
            let _ = run_docker(&["start", name]).await;
        }
    }
}

async fn run_docker(args: &[&str]) -> anyhow::Result<String> {
    let args: Vec<String> = args.iter().map(|s| (*s).to_owned()).collect();
    let shown = args.join(" ");
    let out = tokio::task::spawn_blocking(move || std::process::Command::new("docker").args(&args).output())
        .await?
        .context("running docker")?;
    if !out.status.success() {
        bail!("docker {shown} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn check(run: &Run, mut events: Vec<FaultEvent>) -> Summary {
    let sends = run.sends.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let consumed = run.consumed.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let by_value: HashMap<u64, &SendOp> = sends.iter().map(|s| (s.value, s)).collect();
    let mut times: HashMap<u64, u64> = HashMap::new();
    for c in &consumed {
        *times.entry(c.value).or_default() += 1;
    }
    let mut lost_values: Vec<u64> = sends
        .iter()
        .filter(|s| s.outcome == Outcome::Ok && !times.contains_key(&s.value))
        .map(|s| s.value)
        .collect();
    lost_values.sort_unstable();
    let unexpected = times.keys().filter(|v| !by_value.contains_key(v)).count() as u64;
    let mut ids: HashMap<u64, std::collections::HashSet<&str>> = HashMap::new();
    for c in &consumed {
        ids.entry(c.value).or_default().insert(c.message_id.as_str());
    }
    let duplicates: u64 = ids.values().map(|s| s.len().saturating_sub(1) as u64).sum();
    let redelivered = times.values().map(|n| n.saturating_sub(1)).sum::<u64>() - duplicates;
    let unknown_then_present = sends
        .iter()
        .filter(|s| s.outcome != Outcome::Ok && times.contains_key(&s.value))
        .count() as u64;

    // Per key, acknowledged messages must be consumed in send order. Messages of
    // one key live in one queue and consumers read a queue in order, so the first
    // occurrence of each value, filtered to one key, is that queue's order.
    let mut last_seq: HashMap<u32, u64> = HashMap::new();
    let mut seen = std::collections::HashSet::new();
    let mut order_violations = 0u64;
    let mut order_examples = Vec::new();
    for c in &consumed {
        let Some(k) = c.key else { continue };
        let acked = by_value.get(&c.value).is_some_and(|s| s.outcome == Outcome::Ok);
        if !acked || !seen.insert(c.value) {
            continue;
        }
        if let Some(prev) = last_seq.get(&k)
            && c.seq < *prev
        {
            order_violations += 1;
            if order_examples.len() < 10 {
                order_examples.push(format!("key-{k}: seq {} after {prev}", c.seq));
            }
        }
        last_seq.insert(k, c.seq.max(last_seq.get(&k).copied().unwrap_or(0)));
    }

    // Recovery: the first acknowledgement after the fault was in force. A killed,
    // paused or cut-off leader can acknowledge nothing after that point, so the ack
    // came from the new leader, whether its send started before or after the fault.
    // With several groups it is the faulted group's own first ack: the others
    // acknowledge all along.
    let mut acks: Vec<(u64, &str)> = sends
        .iter()
        .filter(|s| s.outcome == Outcome::Ok)
        .map(|s| (s.end_ms, s.group.as_str()))
        .collect();
    acks.sort_unstable();
    for e in &mut events {
        e.recovery_ms = acks
            .iter()
            .find(|(end, g)| *end > e.injected_ms && (e.group.is_empty() || *g == e.group))
            .map(|(end, _)| end - e.injected_ms);
    }
    let mut kills: Vec<u64> = events
        .iter()
        .filter(|e| e.fault == Fault::KillLeader)
        .filter_map(|e| e.recovery_ms)
        .collect();
    kills.sort_unstable();
    let count = |o: Outcome| sends.iter().filter(|s| s.outcome == o).count() as u64;
    let mut acknowledged_per_group = BTreeMap::new();
    for s in sends.iter().filter(|s| s.outcome == Outcome::Ok) {
        *acknowledged_per_group.entry(s.group.clone()).or_default() += 1;
    }
    Summary {
        sends: sends.len() as u64,
        acknowledged: count(Outcome::Ok),
        acknowledged_per_group,
        failed: count(Outcome::Failed),
        unknown: count(Outcome::Unknown),
        consumed: consumed.len() as u64,
        lost: lost_values.len() as u64,
        lost_values: lost_values.into_iter().take(50).collect(),
        unexpected,
        duplicates,
        redelivered,
        unknown_then_present,
        order_violations,
        order_examples,
        kill_leader_recovery_ms_median: kills.get(kills.len() / 2).copied(),
        kill_leader_recovery_ms_max: kills.last().copied(),
        faults: events,
        lifecycle: None,
        transactions: None,
    }
}

fn print_summary(s: &Summary, args: &ChaosArgs) {
    println!(
        "raftmq chaos: {} s of faults every {} s (held {} s); consumers: {}",
        args.duration,
        args.interval,
        args.hold,
        match args.consumers {
            ConsumerMode::Group => "consumer group (2 orderly members)",
            ConsumerMode::Offset => "pull by offset",
        }
    );
    println!("| fault | group | targets | at s | recovery ms |");
    println!("| --- | --- | --- | --- | --- |");
    for e in &s.faults {
        println!(
            "| {:?} | {} | {} | {:.1} | {} |",
            e.fault,
            if e.group.is_empty() { "all" } else { &e.group },
            e.targets.join(" "),
            e.injected_ms as f64 / 1000.0,
            e.recovery_ms.map_or("none".to_owned(), |r| r.to_string())
        );
    }
    println!();
    println!(
        "| sends | acked | failed | unknown | consumed | lost | unexpected | duplicates (stored twice) | redelivered (same id) | unknown→present | order violations | kill-leader recovery median / max ms |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    println!(
        "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} / {} |",
        s.sends,
        s.acknowledged,
        s.failed,
        s.unknown,
        s.consumed,
        s.lost,
        s.unexpected,
        s.duplicates,
        s.redelivered,
        s.unknown_then_present,
        s.order_violations,
        s.kill_leader_recovery_ms_median.map_or("-".into(), |v| v.to_string()),
        s.kill_leader_recovery_ms_max.map_or("-".into(), |v| v.to_string())
    );
    println!("acknowledged per broker group: {:?}", s.acknowledged_per_group);
    if !s.lost_values.is_empty() {
        println!("lost values (first 50): {:?}", s.lost_values);
    }
    for ex in &s.order_examples {
        println!("order violation: {ex}");
    }
    if let Some(l) = &s.lifecycle {
        println!();
        l.print();
    }
    if let Some(t) = &s.transactions {
        println!();
        t.print();
    }
    println!("history summary written to {}", args.out.display());
}
