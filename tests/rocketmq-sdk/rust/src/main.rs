//! raftmq-rocketmq-rust-sdk-test: one end-to-end run of the official RocketMQ 5 Rust SDK
//! (crates.io `rocketmq` 5.0.0) against a RocketMQ 5 gRPC access point (raftmq's gateway).
//!
//! It uses only the SDK's public API, the way the crate's own examples/producer.rs and
//! examples/simple_consumer.rs do: a Producer sends `--count` normal messages (tag, key and
//! user properties set), then a SimpleConsumer of `--group` receives, checks and acks them
//! all, and both are shut down. Exit 0 and one summary line on success; otherwise exit 1 with
//! a line naming the step that failed (and the SDK's own error, which names the RPC).
//!
//! Every SDK call is bounded by a timeout of our own: the SDK itself has none on Telemetry
//! (a server that never answers its headers hangs `start()` forever), and a CI job must end.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use rocketmq::conf::{ClientOption, ProducerOption, SimpleConsumerOption};
use rocketmq::model::common::{FilterExpression, FilterType};
use rocketmq::model::message::{Message, MessageBuilder};
use rocketmq::{Producer, SimpleConsumer};

/// Every message carries this tag; the consumer filters with "*" and still checks it comes back.
const TAG: &str = "raftmq-rust-sdk";
/// User properties: the run id tells our messages from a previous run's leftovers in a
/// reused topic; the sequence number ties a received message back to what was sent.
const PROP_RUN: &str = "raftmq-run";
const PROP_SEQ: &str = "raftmq-seq";
/// Bound on one start / send / ack / shutdown (the SDK's own per-RPC timeout is 3 s, but
/// start() also waits for Telemetry response headers without any timeout).
const STEP_TIMEOUT: Duration = Duration::from_secs(30);
/// Receive batch and invisible time. 20 s is above Apache's 10 s minimum for receive and long
/// enough that nothing we are about to ack becomes visible again during the run.
const RECEIVE_BATCH: i32 = 32;
const INVISIBLE: Duration = Duration::from_secs(20);

struct Args {
    access_point: String,
    topic: String,
    group: String,
    count: usize,
    timeout: Duration,
}

const USAGE: &str = "usage: raftmq-rocketmq-rust-sdk-test --access-point HOST:PORT --topic T --group G \
                     [--count N (default 64)] [--timeout-secs S (receive deadline, default 60)]";

// Hand-rolled: five flags do not justify clap's compile time in a crate whose cold build is measured.
fn parse_args() -> Result<Args> {
    let mut access_point = None;
    let mut topic = None;
    let mut group = None;
    let mut count = 64usize;
    let mut timeout_secs = 60u64;
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "-h" || flag == "--help" {
            println!("{USAGE}");
            std::process::exit(0);
        }
        let value = it.next().ok_or_else(|| anyhow!("{flag} needs a value\n{USAGE}"))?;
        match flag.as_str() {
            "--access-point" => access_point = Some(value),
            "--topic" => topic = Some(value),
            "--group" => group = Some(value),
            "--count" => count = value.parse().with_context(|| format!("--count {value}"))?,
            "--timeout-secs" => timeout_secs = value.parse().with_context(|| format!("--timeout-secs {value}"))?,
            _ => bail!("unknown flag {flag}\n{USAGE}"),
        }
    }
    let args = Args {
        access_point: access_point.ok_or_else(|| anyhow!("--access-point is required\n{USAGE}"))?,
        topic: topic.ok_or_else(|| anyhow!("--topic is required\n{USAGE}"))?,
        group: group.ok_or_else(|| anyhow!("--group is required\n{USAGE}"))?,
        count,
        timeout: Duration::from_secs(timeout_secs),
    };
    if args.count == 0 {
        bail!("--count must be at least 1");
    }
    Ok(args)
}

/// What was sent, keyed by the message id the send returned.
struct Sent {
    seq: usize,
    body: Vec<u8>,
    key: String,
}

/// Runs one SDK future under a timeout; both the timeout and the SDK's error name `what`.
async fn step<T, E: std::fmt::Display>(
    what: &str,
    limit: Duration,
    fut: impl Future<Output = std::result::Result<T, E>>,
) -> Result<T> {
    match tokio::time::timeout(limit, fut).await {
        Ok(Ok(v)) => Ok(v),
        // ClientError's Display carries kind, operation, context and the tonic status.
        Ok(Err(e)) => Err(anyhow!("{what} failed: {e}")),
        Err(_) => Err(anyhow!("{what} did not finish within {} s", limit.as_secs())),
    }
}

fn client_option(access_point: &str) -> ClientOption {
    let mut option = ClientOption::default();
    option.set_access_url(access_point);
    // Plaintext h2c, as raftmq's gateway serves it (the SDK's default too; set for clarity).
    option.set_enable_tls(false);
    option
}

struct Summary {
    sent: usize,
    received: usize,
    acked: usize,
    redelivered: usize,
    stale: usize,
    send_elapsed: Duration,
}

async fn run(args: &Args) -> Result<Summary> {
    let run_id = format!(
        "{}-{}",
        std::process::id(),
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0)
    );

    // (a) Producer with the topic set, so start() fetches its route and fails fast without one.
    let mut producer_option = ProducerOption::default();
    producer_option.set_topics(vec![args.topic.clone()]);
    let mut producer = Producer::new(producer_option, client_option(&args.access_point))
        .map_err(|e| anyhow!("producer new failed: {e}"))?;
    step(
        "producer start (Telemetry + QueryRoute)",
        STEP_TIMEOUT,
        producer.start(),
    )
    .await?;

    let mut sent: HashMap<String, Sent> = HashMap::with_capacity(args.count);
    let send_start = Instant::now();
    for seq in 0..args.count {
        let body = format!("raftmq rust sdk test run {run_id} message {seq}").into_bytes();
        let key = format!("key-{run_id}-{seq}");
        let mut props = HashMap::new();
        props.insert(PROP_RUN.to_string(), run_id.clone());
        props.insert(PROP_SEQ.to_string(), seq.to_string());
        let mut message = MessageBuilder::builder()
            .set_topic(args.topic.clone())
            .set_tag(TAG)
            .set_keys(vec![key.clone()])
            .set_properties(props)
            .set_body(body.clone())
            .build()
            .map_err(|e| anyhow!("building message {seq} failed: {e}"))?;
        // The id the client generated and puts in system_properties.message_id; the server
        // must echo it in the send result (ROCKETMQ5.md, SendMessage).
        let client_id = message.take_message_id();
        let receipt = step(&format!("send of message {seq}"), STEP_TIMEOUT, producer.send(message)).await?;
        let id = receipt.message_id().to_string();
        if id.is_empty() {
            bail!("send of message {seq} returned an empty message id");
        }
        if id != client_id {
            bail!("send of message {seq} returned message id {id}, not the client's {client_id}");
        }
        if sent.insert(id.clone(), Sent { seq, body, key }).is_some() {
            bail!("send of message {seq} returned message id {id}, already returned for an earlier send");
        }
    }
    let send_elapsed = send_start.elapsed();

    // (b) SimpleConsumer of the group, subscribed by the receive calls' own filter.
    let mut consumer_option = SimpleConsumerOption::default();
    consumer_option.set_topics(vec![args.topic.clone()]);
    consumer_option.set_consumer_group(args.group.clone());
    let mut consumer = SimpleConsumer::new(consumer_option, client_option(&args.access_point))
        .map_err(|e| anyhow!("simple consumer new failed: {e}"))?;
    step(
        "simple consumer start (Telemetry + QueryRoute)",
        STEP_TIMEOUT,
        consumer.start(),
    )
    .await?;

    let filter = FilterExpression::new(FilterType::Tag, "*");
    let deadline = Instant::now() + args.timeout;
    let mut acked: HashSet<String> = HashSet::with_capacity(args.count);
    let (mut received, mut redelivered, mut stale) = (0usize, 0usize, 0usize);
    while acked.len() < sent.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            let mut missing: Vec<usize> = sent
                .iter()
                .filter(|(id, _)| !acked.contains(*id))
                .map(|(_, s)| s.seq)
                .collect();
            missing.sort_unstable();
            bail!(
                "receive: only {} of {} messages arrived within {} s; missing seq {:?}",
                acked.len(),
                sent.len(),
                args.timeout.as_secs(),
                &missing[..missing.len().min(20)]
            );
        }
        // The SDK's receive deadline is its long polling timeout (40 s); ours caps it at the
        // run's deadline so a server that holds the stream cannot stretch the run.
        let messages = step(
            "receive",
            left,
            consumer.receive_with(args.topic.clone(), &filter, RECEIVE_BATCH, INVISIBLE),
        )
        .await?;
        for message in messages {
            received += 1;
            let id = message.message_id().to_string();
            let run = message.properties().get(PROP_RUN).cloned().unwrap_or_default();
            if run != run_id {
                // A leftover of an earlier run in a reused topic: ack it out of the way.
                stale += 1;
                step(
                    &format!("ack of stale message {id}"),
                    STEP_TIMEOUT,
                    consumer.ack(&message),
                )
                .await?;
                continue;
            }
            let Some(expected) = sent.get(&id) else {
                bail!(
                    "received message id {id} (seq {}) that no send of this run returned",
                    message.properties().get(PROP_SEQ).map(String::as_str).unwrap_or("?")
                );
            };
            let seq = expected.seq;
            if acked.contains(&id) {
                bail!("message {id} (seq {seq}) delivered again after it was acked");
            }
            if message.topic() != args.topic {
                bail!(
                    "message {id} (seq {seq}): topic {:?}, sent to {:?}",
                    message.topic(),
                    args.topic
                );
            }
            if message.body() != expected.body.as_slice() {
                bail!(
                    "message {id} (seq {seq}): body {:?}, sent {:?}",
                    String::from_utf8_lossy(message.body()),
                    String::from_utf8_lossy(&expected.body)
                );
            }
            if message.tag() != Some(TAG) {
                bail!("message {id} (seq {seq}): tag {:?}, sent {TAG:?}", message.tag());
            }
            if message.keys() != std::slice::from_ref(&expected.key) {
                bail!(
                    "message {id} (seq {seq}): keys {:?}, sent [{:?}]",
                    message.keys(),
                    expected.key
                );
            }
            let seq_prop = message.properties().get(PROP_SEQ).map(String::as_str);
            if seq_prop != Some(seq.to_string().as_str()) {
                bail!("message {id} (seq {seq}): property {PROP_SEQ} = {seq_prop:?}");
            }
            // The SDK reads an absent delivery_attempt as 0; the server must send 1 on first delivery.
            if message.delivery_attempt() < 1 {
                bail!(
                    "message {id} (seq {seq}): delivery attempt {} (must be >= 1)",
                    message.delivery_attempt()
                );
            }
            if message.delivery_attempt() > 1 {
                redelivered += 1;
            }
            step(
                &format!("ack of message {id} (seq {seq})"),
                STEP_TIMEOUT,
                consumer.ack(&message),
            )
            .await?;
            acked.insert(id);
        }
    }

    // (c) Both must shut down cleanly: NotifyClientTermination must answer OK.
    step(
        "simple consumer shutdown (NotifyClientTermination)",
        STEP_TIMEOUT,
        consumer.shutdown(),
    )
    .await?;
    step(
        "producer shutdown (NotifyClientTermination)",
        STEP_TIMEOUT,
        producer.shutdown(),
    )
    .await?;

    Ok(Summary {
        sent: sent.len(),
        received,
        acked: acked.len(),
        redelivered,
        stale,
        send_elapsed,
    })
}

#[tokio::main]
async fn main() -> ExitCode {
    // The SDK unwraps server answers in several places (ROCKETMQ5.md, gotcha 4); say so plainly
    // before the default hook prints the panic itself.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        eprintln!("rocketmq-rust-sdk-test: FAILED: the rocketmq SDK panicked (a server answer it cannot handle?)");
        default_hook(info);
    }));

    let args = match parse_args() {
        Ok(args) => args,
        Err(e) => {
            eprintln!("rocketmq-rust-sdk-test: {e:#}");
            return ExitCode::from(2);
        }
    };
    let start = Instant::now();
    // A panic inside run() is caught here (spawned) so it exits 1 like any other failure.
    let task = tokio::spawn(async move { run(&args).await });
    let outcome = match task.await {
        Ok(result) => result,
        Err(e) if e.is_panic() => Err(anyhow!("the SDK panicked (see above)")),
        Err(e) => Err(anyhow!("test task failed: {e}")),
    };
    match outcome {
        Ok(s) => {
            let elapsed = start.elapsed();
            let rate = s.sent as f64 / s.send_elapsed.as_secs_f64().max(1e-9);
            println!(
                "rocketmq-rust-sdk-test: OK sent={} received={} acked={} redelivered={} stale={} elapsed={:.2}s sends/s={:.1}",
                s.sent,
                s.received,
                s.acked,
                s.redelivered,
                s.stale,
                elapsed.as_secs_f64(),
                rate
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!(
                "rocketmq-rust-sdk-test: FAILED after {:.2}s: {e:#}",
                start.elapsed().as_secs_f64()
            );
            ExitCode::FAILURE
        }
    }
}
