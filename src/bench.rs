//! `raftmq bench`: produce, consume and end-to-end benchmarks against a cluster
//! found through NameServers, or against a local cluster (NameServer + three
//! replica processes on free ports) that the bench starts and stops itself.
//! Every run is bounded by a message count and a duration; latencies go into HDR
//! histograms and are reported as a table or one JSON object.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use hdrhistogram::Histogram;
use raftmq_client::{Client, ClientConfig, MessageExt, Producer, PullConsumer};
use raftmq_proto::v1 as pb;

use crate::local::{LocalCluster, LocalClusterOptions};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Workload {
    /// Send messages; latency is send -> acknowledgement (stored on a majority).
    Produce,
    /// Read messages back queue by queue (producing them first if the topic holds
    /// fewer than --count); latency is one pull's round trip.
    Consume,
    /// Send while consumers long-poll; latency is send -> delivery to a consumer.
    E2e,
    /// Route lookups at a NameServer, one at a time (no broker, no disk): this
    /// machine's gRPC round-trip floor, to read the other latencies against. A
    /// send needs two such round trips (client -> leader, leader -> follower) plus
    /// an fsync; --count bounds the lookups.
    Ping,
    /// Kill (or --fault pause) the leader of a local cluster --kills times under
    /// a load of --producers one-at-a-time senders; time each fault to the first
    /// acknowledged send started after it, and count elections.
    Failover,
    /// Delayed messages: --count due evenly over --spread seconds, pulled back;
    /// latency is lateness (receipt minus due time); early receipts are counted.
    Delay,
    /// POP: --consumers SimpleConsumers of one group receive --pull-batch at a
    /// time and ack each batch (producing --count first if the topic has fewer);
    /// latency is one receive + ack round.
    Pop,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SendMode {
    /// Each producer waits for one acknowledgement before the next send.
    Sync,
    /// Each producer keeps up to --inflight sends outstanding.
    Async,
    /// The sending loop never waits; completions are counted as they arrive. The
    /// broker still commits before it answers (raftmq has no unacknowledged send),
    /// so this measures how fast a client can hand messages over.
    Oneway,
}

#[derive(clap::Args, Debug, Clone)]
pub struct BenchArgs {
    pub workload: Workload,
    /// NameServer address(es), comma-separated. Without it the bench starts a local
    /// cluster (NameServer + 3 replica processes) on free loopback ports.
    #[arg(long, value_delimiter = ',')]
    pub namesrv: Option<Vec<String>>,
    /// Message body size in bytes.
    #[arg(long, default_value_t = 1024)]
    pub size: usize,
    /// Messages to send (produce, e2e) or to read (consume).
    #[arg(long, default_value_t = 100_000)]
    pub count: u64,
    /// Upper bound in seconds on the measured phase, whatever --count says.
    #[arg(long, default_value_t = 60.0)]
    pub duration: f64,
    /// Producers, each with its own client and connections.
    #[arg(long, default_value_t = 1)]
    pub producers: usize,
    /// Sends outstanding per producer in async mode.
    #[arg(long, default_value_t = 256)]
    pub inflight: usize,
    #[arg(long, value_enum, default_value_t = SendMode::Async)]
    pub mode: SendMode,
    #[arg(long, default_value = "BenchTopic")]
    pub topic: String,
    /// Queues of the topic per broker group (it is created or updated to this).
    #[arg(long, default_value_t = 8)]
    pub queues: u32,
    /// Consumers (consume, e2e), each with its own client; queues are split among them.
    #[arg(long, default_value_t = 2)]
    pub consumers: usize,
    /// Concurrent sends the client may combine into one RPC (1: none).
    #[arg(long, default_value_t = 128)]
    pub auto_batch: usize,
    /// Messages per pull.
    #[arg(long, default_value_t = 256)]
    pub pull_batch: u32,
    /// Flush mode of the local cluster (ignored with --namesrv).
    #[arg(long, default_value = "sync", value_parser = ["sync", "async"])]
    pub flush: String,
    /// Data directory of the local cluster (default: a temporary directory, removed
    /// afterwards).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Async worker threads per replica of the local cluster (default: the cores
    /// split among the three; ignored with --namesrv).
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub worker_threads: Option<u16>,
    /// Run the local cluster without metrics endpoints, so its replicas record
    /// no metrics (to measure what they cost; ignored with --namesrv).
    #[arg(long)]
    pub no_metrics: bool,
    /// Print the result as one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
    /// The local cluster serves TLS (throwaway certificates under its data dir);
    /// the bench's clients connect over it. Ignored with --namesrv (give
    /// --tls-ca-file instead).
    #[arg(long)]
    pub tls: bool,
    /// The local cluster requires signed requests (raftmq dev --auth); the
    /// bench's clients sign every call as its bootstrap admin: what the ACL costs.
    /// Ignored with --namesrv.
    #[arg(long)]
    pub auth: bool,
    /// With --namesrv: connect over TLS, trusting this PEM CA file.
    #[arg(long, env = "RAFTMQ_TLS_CA_FILE", requires = "namesrv")]
    pub tls_ca_file: Option<PathBuf>,
    /// failover: how many times the leader is hit.
    #[arg(long, default_value_t = 20)]
    pub kills: usize,
    /// failover: what happens to the leader.
    #[arg(long, value_enum, default_value_t = crate::failover_bench::LeaderFault::Kill)]
    pub fault: crate::failover_bench::LeaderFault,
    /// delay: seconds over which the messages fall due.
    #[arg(long, default_value_t = 60.0)]
    pub spread: f64,
    /// produce: store this many delayed messages (due in an hour) first, so the
    /// run measures sends with that many timers pending.
    #[arg(long, default_value_t = 0)]
    pub pending_timers: u64,
    /// Send without producer ids and sequence numbers (the client's default is
    /// idempotent sends), to measure what idempotence costs.
    #[arg(long)]
    pub no_idempotence: bool,
    /// Send with message trace on (RocketMQ's enableMsgTrace), to measure what
    /// tracing every message costs.
    #[arg(long)]
    pub trace: bool,
}

/// What a run measured; `--json` prints exactly this.
#[derive(Debug, serde::Serialize)]
pub struct Report {
    pub workload: Workload,
    pub mode: SendMode,
    pub cluster: String,
    pub size: usize,
    pub producers: usize,
    pub inflight: usize,
    pub auto_batch: usize,
    pub consumers: usize,
    pub messages: u64,
    pub errors: u64,
    pub elapsed_secs: f64,
    pub msgs_per_sec: f64,
    pub mb_per_sec: f64,
    /// What the latency figures time.
    pub latency_of: &'static str,
    pub latency_samples: u64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    /// Terms the broker groups advanced during the run: elections (none expected
    /// without faults). Absent when the cluster status could not be read.
    pub elections: Option<u64>,
    /// delay: messages received before their due time (must be 0).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub early: Option<u64>,
    /// delay: acknowledged delayed messages never received within the run.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub never: Option<u64>,
    /// produce: timers pending during the run.
    pub pending_timers: u64,
}

const SENT_AT_PROPERTY: &str = "bench-sent-us";
const MAX_BENCH_BODY: usize = 4 * 1024 * 1024;

impl BenchArgs {
    fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(self.count > 0, "--count must be positive");
        anyhow::ensure!(
            !(self.tls && self.workload == Workload::Failover),
            "bench failover runs plaintext only (its probes dial replicas directly)"
        );
        anyhow::ensure!(
            self.duration.is_finite() && self.duration > 0.0,
            "--duration must be a positive number of seconds"
        );
        anyhow::ensure!(
            self.size > 0 && self.size <= MAX_BENCH_BODY,
            "--size must be 1..={MAX_BENCH_BODY} bytes (the broker's default body limit)"
        );
        anyhow::ensure!(self.producers > 0, "--producers must be positive");
        anyhow::ensure!(self.inflight > 0, "--inflight must be positive");
        anyhow::ensure!(self.consumers > 0, "--consumers must be positive");
        anyhow::ensure!(self.queues > 0, "--queues must be positive");
        anyhow::ensure!(self.pull_batch > 0, "--pull-batch must be positive");
        anyhow::ensure!(
            self.workload != Workload::Failover || (self.namesrv.is_none() && self.kills > 0),
            "bench failover kills replica processes it started itself: give no --namesrv, and --kills > 0"
        );
        Ok(())
    }
}

pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    args.validate()?;
    let mut temp = None;
    let mut local = None;
    // What every client of the run starts from: the local cluster's own (its CA,
    // its admin's credentials), or --namesrv with --tls-ca-file.
    let mut base = None;
    let (namesrv, cluster_desc) = match &args.namesrv {
        Some(ns) => (ns.clone(), format!("namesrv {}", ns.join(","))),
        None => {
            let data_dir = match &args.data_dir {
                Some(d) => d.clone(),
                None => {
                    let t = tempfile::Builder::new()
                        .prefix("raftmq-bench-")
                        .tempdir()
                        .context("creating a temporary data directory")?;
                    let p = t.path().to_path_buf();
                    temp = Some(t);
                    p
                }
            };
            let cluster = LocalCluster::start(LocalClusterOptions {
                data_dir: data_dir.clone(),
                namesrv: "127.0.0.1:0".into(),
                groups: vec!["broker-a".into()],
                broker_ports: vec![0, 0, 0],
                flush: args.flush.clone(),
                auto_create_topics: false,
                restart_delay: Duration::from_secs(1),
                worker_threads: args.worker_threads.map(usize::from),
                broker_args: Vec::new(),
                tls: args.tls,
                auth: args.auth,
                metrics: !args.no_metrics,
            })
            .await?;
            let ns = cluster.namesrv.clone();
            let transport = if args.tls { ", TLS" } else { "" };
            let metrics: Vec<&str> = cluster.replicas.iter().filter_map(|r| r.metrics.as_deref()).collect();
            eprintln!(
                "bench: local cluster (NameServer {ns}, 3 replicas, flush {}{transport}, metrics {}) under {}",
                args.flush,
                if metrics.is_empty() {
                    "off".to_owned()
                } else {
                    metrics.join(",")
                },
                data_dir.display()
            );
            base = Some(cluster.client_config()?);
            local = Some(cluster);
            (vec![ns], format!("local 3 replicas, flush {}{transport}", args.flush))
        }
    };
    let result = async {
        if let Some(c) = &local {
            c.wait_for_leader(Duration::from_secs(30)).await?;
        }
        if args.workload == Workload::Failover {
            let cluster = local.as_ref().context("bench failover needs its own local cluster")?;
            let failover = crate::failover_bench::FailoverArgs {
                fault: args.fault,
                kills: args.kills,
                producers: args.producers,
                topic: args.topic.clone(),
                size: args.size,
            };
            let report = crate::failover_bench::run(cluster, namesrv, &failover).await?;
            if args.json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                crate::failover_bench::print_table(&report);
            }
            return Ok(None);
        }
        let base = match base {
            Some(b) => b,
            None => {
                let config = ClientConfig::new(namesrv);
                match &args.tls_ca_file {
                    Some(ca) => config.with_tls_ca_file(ca)?,
                    None => config,
                }
            }
        };
        measure(&args, base, cluster_desc).await.map(Some)
    }
    .await;
    if let Some(c) = local {
        c.stop().await.context("stopping the local cluster")?;
    }
    drop(temp);
    let Some(report) = result? else {
        return Ok(());
    };
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print_table(&report);
    }
    Ok(())
}

async fn measure(args: &BenchArgs, base: ClientConfig, cluster: String) -> anyhow::Result<Report> {
    let client = || {
        let mut config = base.clone();
        config.max_auto_batch = args.auto_batch;
        config.idempotent = !args.no_idempotence;
        Client::new(config).context("building a client")
    };
    let admin_client = client()?;
    let queues =
        crate::tools::create_topic_and_wait(&admin_client, &args.topic, args.queues, Duration::from_secs(15)).await?;
    let producers = (0..args.producers)
        .map(|_| {
            client().map(|c| {
                let p = c.producer();
                if args.trace { p.enable_msg_trace() } else { p }
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let consumers = (0..args.consumers)
        .map(|_| client().map(|c| c.pull_consumer()))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let bound = Duration::from_secs_f64(args.duration);
    let terms_before = terms(&admin_client).await;

    let mut delay_counts = None;
    let (outcome, latency_of) = match args.workload {
        Workload::Produce => {
            if args.pending_timers > 0 {
                crate::bench_lifecycle::prefill_timers(&producers, &args.topic, args.pending_timers, args.inflight)
                    .await?;
            }
            let p = produce(args, &producers, args.count, bound, false, "produce").await;
            (p, "send -> ack")
        }
        Workload::Consume => {
            fill(args, &producers, &consumers[0], &queues, bound).await?;
            (consume(args, &consumers, &queues, bound).await?, "pull round trip")
        }
        Workload::E2e => (
            e2e(args, &producers, &consumers, &queues, bound).await?,
            "send -> delivery",
        ),
        Workload::Ping => (ping(&admin_client, args, bound).await, "NameServer route lookup"),
        Workload::Failover => anyhow::bail!("bench failover is measured by failover_bench::run"),
        Workload::Delay => {
            let (o, counts) = crate::bench_lifecycle::delay(args, &producers, &consumers, &queues).await?;
            delay_counts = Some(counts);
            (o, "due time -> pulled (lateness)")
        }
        Workload::Pop => {
            fill(args, &producers, &consumers[0], &queues, bound).await?;
            let clients = (0..args.consumers)
                .map(|_| client())
                .collect::<anyhow::Result<Vec<_>>>()?;
            (
                crate::bench_lifecycle::pop(args, &clients).await?,
                "receive + ack of one batch",
            )
        }
    };
    let elections = match (terms_before, terms(&admin_client).await) {
        (Some(before), Some(after)) => Some(after.saturating_sub(before)),
        _ => None,
    };
    let secs = outcome.elapsed.as_secs_f64().max(1e-9);
    let ms = |q: f64| outcome.latency.value_at_quantile(q) as f64 / 1000.0;
    Ok(Report {
        workload: args.workload,
        mode: args.mode,
        cluster,
        size: args.size,
        producers: args.producers,
        inflight: if args.mode == SendMode::Sync { 1 } else { args.inflight },
        auto_batch: args.auto_batch,
        consumers: args.consumers,
        messages: outcome.ok,
        errors: outcome.errors,
        elapsed_secs: secs,
        msgs_per_sec: outcome.ok as f64 / secs,
        mb_per_sec: outcome.bytes as f64 / secs / (1024.0 * 1024.0),
        latency_of,
        latency_samples: outcome.latency.len(),
        p50_ms: ms(0.5),
        p90_ms: ms(0.9),
        p99_ms: ms(0.99),
        p999_ms: ms(0.999),
        max_ms: outcome.latency.max() as f64 / 1000.0,
        elections,
        early: delay_counts.as_ref().map(|c| c.early),
        never: delay_counts.as_ref().map(|c| c.never),
        pending_timers: args.pending_timers,
    })
}

/// Produces what the topic lacks of `--count` messages, for a read workload.
async fn fill(
    args: &BenchArgs,
    producers: &[Producer],
    consumer: &PullConsumer,
    queues: &[(String, u32)],
    bound: Duration,
) -> anyhow::Result<()> {
    let available = available(consumer, &args.topic, queues).await?;
    if available < args.count {
        let mut fill_args = args.clone();
        fill_args.mode = SendMode::Async;
        let fill = produce(&fill_args, producers, args.count - available, bound * 10, false, "fill").await;
        anyhow::ensure!(
            fill.ok >= args.count - available,
            "could only store {} of the {} messages to read ({} errors)",
            fill.ok,
            args.count - available,
            fill.errors
        );
    }
    Ok(())
}

/// The sum of the broker groups' terms, as their leaders report them.
async fn terms(client: &Client) -> Option<u64> {
    let groups = client.admin().cluster_status().await.ok()?;
    Some(groups.iter().map(|g| g.term).sum())
}

/// Counts, latencies and time of one measured phase.
pub(crate) struct Outcome {
    pub(crate) ok: u64,
    pub(crate) errors: u64,
    pub(crate) bytes: u64,
    pub(crate) elapsed: Duration,
    pub(crate) latency: Histogram<u64>,
}

pub(crate) fn histogram() -> Histogram<u64> {
    // Microseconds from 1 µs to one hour at 3 significant digits.
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("constant histogram bounds are valid")
}

pub(crate) fn record(h: &mut Histogram<u64>, d: Duration) {
    h.saturating_record(u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1));
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

/// Live counters shared by workers and the progress line.
#[derive(Default)]
pub(crate) struct Counters {
    pub(crate) ok: AtomicU64,
    pub(crate) errors: AtomicU64,
    pub(crate) bytes: AtomicU64,
    /// Ends the progress lines at once: a phase that waited for the next tick
    /// would make whatever it is part of (e2e's send phase) look up to a second
    /// slower.
    done: tokio::sync::Notify,
}

/// Ends a phase: its time is taken before the progress line is told to stop, so
/// waiting for the printer never counts.
pub(crate) async fn finish(
    counters: &Counters,
    progress: tokio::task::JoinHandle<()>,
    started: Instant,
    latency: Histogram<u64>,
) -> Outcome {
    let elapsed = started.elapsed();
    counters.done.notify_one();
    let _ = progress.await;
    Outcome {
        ok: counters.ok.load(Ordering::Relaxed),
        errors: counters.errors.load(Ordering::Relaxed),
        bytes: counters.bytes.load(Ordering::Relaxed),
        elapsed,
        latency,
    }
}

/// Prints one progress line per second on stderr until `done` is notified.
pub(crate) fn progress(label: &'static str, c: Arc<Counters>, started: Instant) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut last = 0u64;
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.tick().await;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = c.done.notified() => break,
            }
            let ok = c.ok.load(Ordering::Relaxed);
            eprintln!(
                "[{label} {:5.1}s] {ok:>10} ok  {:>9} msgs/s  {} errors",
                started.elapsed().as_secs_f64(),
                ok - last,
                c.errors.load(Ordering::Relaxed)
            );
            last = ok;
        }
    })
}

fn message(size: usize, stamp: bool) -> pb::Message {
    let mut m = pb::Message::new(vec![b'x'; size]);
    if stamp {
        m.properties.insert(SENT_AT_PROPERTY.into(), now_us().to_string());
    }
    m
}

/// Sends `count` messages (or until `bound` elapses) with every producer; tickets
/// from one shared counter keep the total exact however producers interleave.
async fn produce(
    args: &BenchArgs,
    producers: &[Producer],
    count: u64,
    bound: Duration,
    stamp: bool,
    label: &'static str,
) -> Outcome {
    let started = Instant::now();
    let stop_at = started + bound;
    let tickets = Arc::new(AtomicU64::new(0));
    let counters = Arc::new(Counters::default());
    let progress = progress(label, counters.clone(), started);
    let claim = {
        let tickets = tickets.clone();
        move || Instant::now() < stop_at && tickets.fetch_add(1, Ordering::Relaxed) < count
    };
    let mut workers = Vec::new();
    for producer in producers {
        let (producer, topic, claim, c) = (producer.clone(), args.topic.clone(), claim.clone(), counters.clone());
        let (size, mode, inflight) = (args.size, args.mode, args.inflight);
        workers.push(tokio::spawn(async move {
            let mut hist = histogram();
            let window = match mode {
                SendMode::Sync => 1,
                SendMode::Async => inflight,
                SendMode::Oneway => usize::MAX,
            };
            let mut pending = FuturesUnordered::new();
            loop {
                while pending.len() < window && claim() {
                    let (producer, topic) = (producer.clone(), topic.clone());
                    let sent = Instant::now();
                    let send = async move { (producer.send(&topic, message(size, stamp)).await, sent) };
                    if mode == SendMode::Oneway {
                        // Hand the send to the runtime and go on at once.
                        pending.push(futures::future::Either::Left(async move {
                            tokio::spawn(send)
                                .await
                                .unwrap_or_else(|e| (Err(join_error(e)), Instant::now()))
                        }));
                    } else {
                        pending.push(futures::future::Either::Right(send));
                    }
                }
                let Some((result, sent)) = pending.next().await else {
                    break;
                };
                match result {
                    Ok(_) => {
                        if mode != SendMode::Oneway {
                            record(&mut hist, sent.elapsed());
                        }
                        c.ok.fetch_add(1, Ordering::Relaxed);
                        c.bytes.fetch_add(size as u64, Ordering::Relaxed);
                    }
                    Err(e) => {
                        if c.errors.fetch_add(1, Ordering::Relaxed) < 5 {
                            eprintln!("bench: send failed: {e}");
                        }
                    }
                }
            }
            hist
        }));
    }
    let mut latency = histogram();
    for w in workers {
        match w.await {
            Ok(h) => latency.add(&h).expect("histograms share their bounds"),
            Err(e) => eprintln!("bench: a producer task failed: {e}"),
        }
    }
    finish(&counters, progress, started, latency).await
}

fn join_error(e: tokio::task::JoinError) -> raftmq_client::Error {
    raftmq_client::Error::Protocol {
        endpoint: String::new(),
        reason: format!("send task failed: {e}"),
    }
}

/// (min, next) offsets of one queue.
async fn offsets(consumer: &PullConsumer, topic: &str, group: &str, queue: u32) -> anyhow::Result<(u64, u64)> {
    let r = consumer
        .pull(topic, group, queue, 0, 1, Duration::ZERO, &raftmq_client::Filter::all())
        .await
        .with_context(|| format!("reading offsets of {group}/{queue}"))?;
    Ok((r.min_offset, r.max_offset))
}

async fn available(consumer: &PullConsumer, topic: &str, queues: &[(String, u32)]) -> anyhow::Result<u64> {
    let mut total = 0;
    for (g, q) in queues {
        let (min, max) = offsets(consumer, topic, g, *q).await?;
        total += max - min;
    }
    Ok(total)
}

/// Reads `args.count` messages from the queues' first offsets, queues split among
/// the consumers, each reading its queues in turn in batches of `pull_batch`.
async fn consume(
    args: &BenchArgs,
    consumers: &[PullConsumer],
    queues: &[(String, u32)],
    bound: Duration,
) -> anyhow::Result<Outcome> {
    let started = Instant::now();
    let stop_at = started + bound;
    let counters = Arc::new(Counters::default());
    let progress = progress("consume", counters.clone(), started);
    let mut workers = Vec::new();
    for (i, consumer) in consumers.iter().enumerate() {
        let mine: Vec<(String, u32)> = queues.iter().skip(i).step_by(consumers.len()).cloned().collect();
        let (consumer, topic, c) = (consumer.clone(), args.topic.clone(), counters.clone());
        let (count, batch) = (args.count, args.pull_batch);
        workers.push(tokio::spawn(async move {
            let mut hist = histogram();
            for (group, queue) in mine {
                let (mut offset, end) = offsets(&consumer, &topic, &group, queue).await?;
                while offset < end && Instant::now() < stop_at && c.ok.load(Ordering::Relaxed) < count {
                    let t = Instant::now();
                    let r = match consumer
                        .pull(
                            &topic,
                            &group,
                            queue,
                            offset,
                            batch,
                            Duration::ZERO,
                            &raftmq_client::Filter::all(),
                        )
                        .await
                    {
                        Ok(r) => r,
                        Err(e) => {
                            c.errors.fetch_add(1, Ordering::Relaxed);
                            eprintln!("bench: pull of {group}/{queue}@{offset} failed: {e}");
                            continue;
                        }
                    };
                    record(&mut hist, t.elapsed());
                    let bytes: usize = r
                        .messages
                        .iter()
                        .map(|m| m.message.as_ref().map_or(0, |m| m.body.len()))
                        .sum();
                    c.ok.fetch_add(r.messages.len() as u64, Ordering::Relaxed);
                    c.bytes.fetch_add(bytes as u64, Ordering::Relaxed);
                    anyhow::ensure!(
                        r.next_offset > offset,
                        "pull of {group}/{queue}@{offset} made no progress"
                    );
                    offset = r.next_offset;
                }
            }
            Ok::<_, anyhow::Error>(hist)
        }));
    }
    let mut latency = histogram();
    let mut failure = None;
    for w in workers {
        match w.await {
            Ok(Ok(h)) => latency.add(&h).expect("histograms share their bounds"),
            Ok(Err(e)) => failure = Some(e),
            Err(e) => failure = Some(e.into()),
        }
    }
    let outcome = finish(&counters, progress, started, latency).await;
    match failure {
        Some(e) => Err(e),
        None => Ok(outcome),
    }
}

/// One route lookup after another (each a fresh GetRoute RPC, not the client's
/// cache) until `--count` or `bound`; a failed lookup counts as an error.
async fn ping(client: &Client, args: &BenchArgs, bound: Duration) -> Outcome {
    let started = Instant::now();
    let stop_at = started + bound;
    let counters = Arc::new(Counters::default());
    let progress = progress("ping", counters.clone(), started);
    let mut latency = histogram();
    for _ in 0..args.count {
        if Instant::now() >= stop_at {
            break;
        }
        let t = Instant::now();
        match client.refresh_route(&args.topic).await {
            Ok(_) => {
                record(&mut latency, t.elapsed());
                counters.ok.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                if counters.errors.fetch_add(1, Ordering::Relaxed) == 0 {
                    eprintln!("bench: route lookup failed: {e}");
                }
            }
        }
    }
    finish(&counters, progress, started, latency).await
}

/// Consumers long-poll every queue from its current end while the producers send
/// stamped messages; latency is the stamp's age on delivery. Ends when every
/// acknowledged message was delivered, or 10 s after the producers stop.
async fn e2e(
    args: &BenchArgs,
    producers: &[Producer],
    consumers: &[PullConsumer],
    queues: &[(String, u32)],
    bound: Duration,
) -> anyhow::Result<Outcome> {
    let delivered = Arc::new(Counters::default());
    let stop = Arc::new(AtomicBool::new(false));
    let mut workers = Vec::new();
    for (i, consumer) in consumers.iter().enumerate() {
        let mine: Vec<(String, u32)> = queues.iter().skip(i).step_by(consumers.len()).cloned().collect();
        let mut positions = Vec::new();
        for (g, q) in &mine {
            positions.push(offsets(consumer, &args.topic, g, *q).await?.1);
        }
        let (consumer, topic, c, stop) = (consumer.clone(), args.topic.clone(), delivered.clone(), stop.clone());
        let batch = args.pull_batch;
        workers.push(tokio::spawn(async move {
            let mut hist = histogram();
            // One long poll per queue at a time, all of this consumer's queues at once.
            let mut polls = FuturesUnordered::new();
            let poll = |idx: usize, offset: u64| {
                let (consumer, topic, (group, queue)) = (consumer.clone(), topic.clone(), mine[idx].clone());
                async move {
                    let r = consumer
                        .pull(
                            &topic,
                            &group,
                            queue,
                            offset,
                            batch,
                            Duration::from_millis(500),
                            &raftmq_client::Filter::all(),
                        )
                        .await;
                    (idx, offset, r)
                }
            };
            for (idx, offset) in positions.iter().enumerate() {
                polls.push(poll(idx, *offset));
            }
            while let Some((idx, offset, r)) = polls.next().await {
                let next = match r {
                    Ok(r) => {
                        let now = now_us();
                        for m in r.messages.iter().filter_map(|m| m.message.as_ref()) {
                            if let Some(sent) = m.properties.get(SENT_AT_PROPERTY).and_then(|v| v.parse::<u64>().ok()) {
                                hist.saturating_record(now.saturating_sub(sent).max(1));
                            }
                            c.bytes.fetch_add(m.body.len() as u64, Ordering::Relaxed);
                        }
                        c.ok.fetch_add(r.messages.len() as u64, Ordering::Relaxed);
                        r.next_offset
                    }
                    Err(e) => {
                        c.errors.fetch_add(1, Ordering::Relaxed);
                        eprintln!("bench: pull failed: {e}");
                        offset
                    }
                };
                if !stop.load(Ordering::Relaxed) {
                    polls.push(poll(idx, next));
                }
            }
            hist
        }));
    }
    let started = Instant::now();
    let sent = produce(args, producers, args.count, bound, true, "e2e send").await;
    // Drain: every acknowledged message should arrive; give stragglers 10 s.
    let drain_until = Instant::now() + Duration::from_secs(10);
    while delivered.ok.load(Ordering::Relaxed) < sent.ok && Instant::now() < drain_until {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let elapsed = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    let mut latency = histogram();
    for w in workers {
        latency.add(&w.await?).expect("histograms share their bounds");
    }
    let got = delivered.ok.load(Ordering::Relaxed);
    if got < sent.ok {
        eprintln!(
            "bench: only {got} of {} acknowledged messages were delivered within 10 s",
            sent.ok
        );
    }
    Ok(Outcome {
        ok: got,
        errors: sent.errors + delivered.errors.load(Ordering::Relaxed),
        bytes: delivered.bytes.load(Ordering::Relaxed),
        elapsed,
        latency,
    })
}

fn print_table(r: &Report) {
    println!(
        "raftmq bench {:?}: {} B messages, {} producer(s), mode {:?}, {} in flight, auto-batch {}, {} consumer(s); cluster: {}",
        r.workload, r.size, r.producers, r.mode, r.inflight, r.auto_batch, r.consumers, r.cluster
    );
    println!("| messages | errors | seconds | msgs/s | MB/s | p50 ms | p90 ms | p99 ms | p99.9 ms | max ms |");
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    println!(
        "| {} | {} | {:.2} | {:.0} | {:.1} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} |",
        r.messages,
        r.errors,
        r.elapsed_secs,
        r.msgs_per_sec,
        r.mb_per_sec,
        r.p50_ms,
        r.p90_ms,
        r.p99_ms,
        r.p999_ms,
        r.max_ms
    );
    println!("latency: {} ({} samples)", r.latency_of, r.latency_samples);
    if let (Some(early), Some(never)) = (r.early, r.never) {
        println!("delivered early: {early}; never delivered: {never}");
    }
    if r.pending_timers > 0 {
        println!("timers pending during the run: {}", r.pending_timers);
    }
    match r.elections {
        Some(n) => println!("elections during the run: {n}"),
        None => println!("elections during the run: unknown (cluster status unreadable)"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The e2e phase awaits the send phase's progress printer; one that lingered
    /// until its next one-second tick added up to a second to e2e's elapsed time
    /// (every e2e run read a whole number of seconds).
    #[tokio::test]
    async fn progress_lines_stop_when_told_not_at_the_next_tick() {
        let counters = Arc::new(Counters::default());
        let printer = progress("test", counters.clone(), Instant::now());
        counters.done.notify_one();
        let ended = tokio::time::timeout(Duration::from_millis(500), printer).await;
        assert!(ended.is_ok(), "the progress task outlived `done` by 500 ms");
    }
}
