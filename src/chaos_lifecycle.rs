//! `raftmq chaos`'s message-lifecycle workloads, run beside its producers and
//! consumers and under the same faults:
//!
//! * **Delayed messages**: one producer sends messages due 1–20 s after sending
//!   (`deliver_at_ms`) to their own topic, at most one every 50 ms (one send
//!   at a time), and stops 25 s before the faults end so that all are due
//!   before the check. One pull loop per queue reads the topic by offset (the
//!   log itself, so a message read twice was stored twice). The checker counts, over acknowledged sends: fired early
//!   (visible, by `store_timestamp_ms` or the reader's clock, before the due
//!   time: a failure), late (made visible more than 1 s after it: a warning),
//!   never read (a failure) and fired twice (one message id read twice: a
//!   failure).
//! * **A POP group**: two members of a SimpleConsumer group on a topic that one
//!   producer fills with plain sends (at most one every 20 ms). Messages stay
//!   invisible 5 s; the members ack at once except that they leave every
//!   message whose number is a multiple of 20 unacked on its first delivery, so
//!   it comes back. Failures: a message
//!   handed out again after an ack of it returned Ok, an Ok ack of a delivery a
//!   later delivery had superseded, a redelivery before the invisible time of the
//!   delivery before it, and an acknowledged send the group never acked.
//!   Redeliveries (the deliberate ones, and those from failovers) are counted.
//!
//! Machines share the host clock (compose containers), so the broker's
//! timestamps and this process's wall clock are comparable.
//!
//! Messages are identified by a number property and a run id (messages of an
//! earlier run on the same cluster are skipped, and acked out of the POP group);
//! a stored message by its message id, since a send retried after an ambiguous
//! failure may store the same number twice.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use raftmq_client::{Client, MessageExt, Received, SimpleConsumer};
use raftmq_proto::v1 as pb;

/// The number of a message within its workload.
const NUMBER: &str = "chaos-n";
/// The run a message belongs to.
const RUN: &str = "chaos-run";
/// A delayed message's due time as sent (ms since the epoch).
const DUE: &str = "chaos-due";

const TIMER_EVERY: Duration = Duration::from_millis(50);
const TIMER_MIN_DELAY_MS: u64 = 1_000;
const TIMER_MAX_DELAY_MS: u64 = 20_000;
/// Delayed sends stop this long before the faults end, so all are due by then.
const TIMER_STOP_BEFORE_END: Duration = Duration::from_secs(25);
/// A delayed message made visible later than this after its due time is late.
const TIMER_LATE_MS: u64 = 1_000;
const POP_EVERY: Duration = Duration::from_millis(20);
const POP_MEMBERS: usize = 2;
const POP_INVISIBLE: Duration = Duration::from_secs(5);
/// Messages whose number is a multiple of this are left unacked on their first delivery.
const POP_SKIP_EVERY: u64 = 20;
/// Longest the final drains wait for the workloads to settle.
const DRAIN_LIMIT: Duration = Duration::from_secs(60);
const EXAMPLES: usize = 10;

#[derive(Clone, Debug)]
pub struct Config {
    pub timer_topic: String,
    pub pop_topic: String,
    pub pop_group: String,
    pub queues: u32,
    /// When the fault schedule ends (delayed sends stop 25 s before).
    pub faults_end: Instant,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    Ok,
    Failed,
    Unknown,
}

fn outcome<T>(r: &Result<T, raftmq_client::Error>) -> Outcome {
    match r {
        Ok(_) => Outcome::Ok,
        Err(e) if e.is_outcome_unknown() => Outcome::Unknown,
        Err(_) => Outcome::Failed,
    }
}

#[derive(Clone, Debug)]
struct TimerSend {
    n: u64,
    due_ms: u64,
    outcome: Outcome,
    /// Wall clock when the send returned.
    end_wall_ms: u64,
    /// The receipt's due time and queue offset, when acknowledged.
    receipt: Option<(u64, u64)>,
}

#[derive(Clone, Debug)]
struct TimerRead {
    n: u64,
    message_id: String,
    due_ms: u64,
    deliver_at_ms: u64,
    store_ms: u64,
    /// Wall clock when the pull that returned it came back.
    read_wall_ms: u64,
    queue: u32,
    offset: u64,
}

#[derive(Clone, Debug)]
struct PopSend {
    n: u64,
    outcome: Outcome,
}

#[derive(Clone, Debug)]
struct Delivery {
    n: u64,
    message_id: String,
    attempt: u32,
    member: usize,
    invisible_until_ms: u64,
    /// Monotonic µs since the workloads started: the receive call's start and end.
    start_us: u64,
    end_us: u64,
    end_wall_ms: u64,
    /// Left unacked on purpose.
    skipped: bool,
}

#[derive(Clone, Debug)]
struct AckCall {
    message_id: String,
    attempt: u32,
    ok: bool,
    error: Option<String>,
    end_us: u64,
    end_wall_ms: u64,
}

struct State {
    run_id: String,
    started: Instant,
    stop_sending: AtomicBool,
    stop_timer_reads: AtomicBool,
    stop_pop: AtomicBool,
    timer_sends: Mutex<Vec<TimerSend>>,
    timer_reads: Mutex<Vec<TimerRead>>,
    pop_sends: Mutex<Vec<PopSend>>,
    deliveries: Mutex<Vec<Delivery>>,
    acks: Mutex<Vec<AckCall>>,
    /// Messages of other runs handed out or read (skipped).
    foreign: Mutex<u64>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl State {
    fn new(run_id: String) -> State {
        State {
            run_id,
            started: Instant::now(),
            stop_sending: AtomicBool::new(false),
            stop_timer_reads: AtomicBool::new(false),
            stop_pop: AtomicBool::new(false),
            timer_sends: Mutex::new(Vec::new()),
            timer_reads: Mutex::new(Vec::new()),
            pop_sends: Mutex::new(Vec::new()),
            deliveries: Mutex::new(Vec::new()),
            acks: Mutex::new(Vec::new()),
            foreign: Mutex::new(0),
        }
    }

    fn us(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_micros()).unwrap_or(u64::MAX)
    }
}

fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The workloads of one run, started; [`Workloads::finish`] drains and checks them.
pub struct Workloads {
    state: Arc<State>,
    producers: Vec<tokio::task::JoinHandle<()>>,
    readers: Vec<tokio::task::JoinHandle<()>>,
    members: Vec<tokio::task::JoinHandle<()>>,
}

impl Workloads {
    /// Creates both topics and starts the producers, the timer readers and the
    /// POP members.
    pub async fn start(client: &Client, cfg: Config) -> anyhow::Result<Workloads> {
        let within = Duration::from_secs(30);
        let timer_queues = crate::tools::create_topic_and_wait(client, &cfg.timer_topic, cfg.queues, within).await?;
        crate::tools::create_topic_and_wait(client, &cfg.pop_topic, cfg.queues, within).await?;
        let state = Arc::new(State::new(format!("{}-{}", wall_ms(), std::process::id())));
        let timers_until = cfg
            .faults_end
            .checked_sub(TIMER_STOP_BEFORE_END)
            .unwrap_or_else(Instant::now);
        let producers = vec![
            tokio::spawn(send_timers(
                client.clone(),
                cfg.timer_topic.clone(),
                timers_until,
                state.clone(),
            )),
            tokio::spawn(send_pop(client.clone(), cfg.pop_topic.clone(), state.clone())),
        ];
        let readers = timer_queues
            .into_iter()
            .map(|(group, queue)| {
                tokio::spawn(read_timers(
                    client.clone(),
                    cfg.timer_topic.clone(),
                    group,
                    queue,
                    state.clone(),
                ))
            })
            .collect();
        let members = (0..POP_MEMBERS)
            .map(|i| {
                let consumer = client
                    .simple_consumer(&cfg.pop_group, &cfg.pop_topic)
                    .invisible_duration(POP_INVISIBLE);
                tokio::spawn(pop_member(consumer, i, state.clone()))
            })
            .collect();
        Ok(Workloads {
            state,
            producers,
            readers,
            members,
        })
    }

    pub fn stop_sending(&self) {
        self.state.stop_sending.store(true, Ordering::Relaxed);
    }

    /// Stops sending, waits (bounded) until every acknowledged delayed message
    /// has been read and the POP group has settled, stops the readers and
    /// members, and checks the history.
    pub async fn finish(self) -> Summary {
        self.stop_sending();
        for p in self.producers {
            let _ = p.await;
        }
        let (timers, pop) = tokio::join!(drain_timers(&self.state), drain_pop(&self.state));
        if let Err(e) = timers {
            eprintln!("chaos: delayed messages not all read: {e}");
        }
        if let Err(e) = pop {
            eprintln!("chaos: POP group not settled: {e}");
        }
        self.state.stop_timer_reads.store(true, Ordering::Relaxed);
        self.state.stop_pop.store(true, Ordering::Relaxed);
        for t in self.readers.into_iter().chain(self.members) {
            let _ = t.await;
        }
        check(&self.state)
    }
}

/// Sends a delayed message at most every 50 ms (one at a time) until `until` or
/// until told to stop, each due 1–20 s after it is sent.
async fn send_timers(client: Client, topic: String, until: Instant, state: Arc<State>) {
    let producer = client.producer();
    let mut tick = tokio::time::interval(TIMER_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut n = 0u64;
    while !state.stop_sending.load(Ordering::Relaxed) && Instant::now() < until {
        tick.tick().await;
        n += 1;
        // Spread over the range without a random source: a stride coprime to it.
        let span = TIMER_MAX_DELAY_MS - TIMER_MIN_DELAY_MS + 1;
        let due_ms = wall_ms() + TIMER_MIN_DELAY_MS + (n * 7_919) % span;
        let mut m = pb::Message::new(format!("t{n}").into_bytes()).with_deliver_at(due_ms);
        m.properties.insert(NUMBER.into(), n.to_string());
        m.properties.insert(RUN.into(), state.run_id.clone());
        m.properties.insert(DUE.into(), due_ms.to_string());
        let r = producer.send(&topic, m).await;
        lock(&state.timer_sends).push(TimerSend {
            n,
            due_ms,
            outcome: outcome(&r),
            end_wall_ms: wall_ms(),
            receipt: r.as_ref().ok().map(|r| (r.deliver_at_ms, r.queue_offset)),
        });
    }
}

/// Reads one queue of the delayed topic from offset 0, in order, long polling.
async fn read_timers(client: Client, topic: String, group: String, queue: u32, state: Arc<State>) {
    let consumer = client.pull_consumer();
    let mut offset = 0u64;
    while !state.stop_timer_reads.load(Ordering::Relaxed) {
        let r = consumer
            .pull(
                &topic,
                &group,
                queue,
                offset,
                256,
                Duration::from_millis(500),
                &raftmq_client::Filter::all(),
            )
            .await;
        let read_wall_ms = wall_ms();
        let Ok(r) = r else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let mut got = Vec::with_capacity(r.messages.len());
        for p in &r.messages {
            let Some(m) = p.message.as_ref() else { continue };
            let prop = |k: &str| m.properties.get(k).and_then(|v| v.parse::<u64>().ok());
            if m.properties.get(RUN) != Some(&state.run_id) {
                *lock(&state.foreign) += 1;
                continue;
            }
            got.push(TimerRead {
                n: prop(NUMBER).unwrap_or(0),
                message_id: p.message_id.clone(),
                due_ms: prop(DUE).unwrap_or(0),
                deliver_at_ms: m.deliver_at_ms,
                store_ms: p.store_timestamp_ms,
                read_wall_ms,
                queue,
                offset: p.queue_offset,
            });
        }
        lock(&state.timer_reads).extend(got);
        offset = r.next_offset;
    }
}

/// Sends a plain message to the POP topic at most every 20 ms (one at a time).
async fn send_pop(client: Client, topic: String, state: Arc<State>) {
    let producer = client.producer();
    let mut tick = tokio::time::interval(POP_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut n = 0u64;
    while !state.stop_sending.load(Ordering::Relaxed) {
        tick.tick().await;
        n += 1;
        let mut m = pb::Message::new(format!("p{n}").into_bytes());
        m.properties.insert(NUMBER.into(), n.to_string());
        m.properties.insert(RUN.into(), state.run_id.clone());
        let r = producer.send(&topic, m).await;
        lock(&state.pop_sends).push(PopSend {
            n,
            outcome: outcome(&r),
        });
    }
}

/// One member of the POP group: receives, and acks every message at once
/// except the deliberately skipped first deliveries. A failed ack is retried
/// (bounded) unless the broker refused the handle.
async fn pop_member(consumer: SimpleConsumer, member: usize, state: Arc<State>) {
    while !state.stop_pop.load(Ordering::Relaxed) {
        let start_us = state.us();
        let got = match consumer.receive(16, Duration::from_millis(500)).await {
            Ok(got) => got,
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let end_us = state.us();
        let end_wall_ms = wall_ms();
        for r in got {
            let props = r.message.message.as_ref().map(|m| &m.properties);
            let run = props.and_then(|p| p.get(RUN));
            if run != Some(&state.run_id) {
                // An earlier run's message: out of the way, unchecked.
                *lock(&state.foreign) += 1;
                let _ = consumer.ack(&r).await;
                continue;
            }
            let n = props
                .and_then(|p| p.get(NUMBER))
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0);
            let skipped = r.delivery_attempt == 1 && n % POP_SKIP_EVERY == 0;
            lock(&state.deliveries).push(Delivery {
                n,
                message_id: r.message.message_id.clone(),
                attempt: r.delivery_attempt,
                member,
                invisible_until_ms: r.invisible_until_ms,
                start_us,
                end_us,
                end_wall_ms,
                skipped,
            });
            if !skipped {
                ack(&consumer, &r, &state).await;
            }
        }
    }
}

async fn ack(consumer: &SimpleConsumer, r: &Received, state: &State) {
    let give_up = Instant::now() + Duration::from_secs(15);
    loop {
        let result = consumer.ack(r).await;
        lock(&state.acks).push(AckCall {
            message_id: r.message.message_id.clone(),
            attempt: r.delivery_attempt,
            ok: result.is_ok(),
            error: result.as_ref().err().map(|e| e.to_string()),
            end_us: state.us(),
            end_wall_ms: wall_ms(),
        });
        match result {
            Ok(()) => return,
            // The handle no longer names the current delivery: acked (by an
            // earlier call whose answer was lost) or handed out again.
            Err(e) if e.code() == Some(tonic::Code::FailedPrecondition) => return,
            Err(_) if Instant::now() < give_up => tokio::time::sleep(Duration::from_millis(200)).await,
            Err(_) => return,
        }
    }
}

/// Waits until every acknowledged delayed message has been read, or (bounded)
/// 30 s past the last due time.
async fn drain_timers(state: &State) -> Result<(), String> {
    let last_due = lock(&state.timer_sends).iter().map(|s| s.due_ms).max().unwrap_or(0);
    let grace = Duration::from_millis(last_due.saturating_sub(wall_ms()) + 30_000);
    let deadline = Instant::now() + grace.clamp(Duration::from_secs(10), DRAIN_LIMIT);
    loop {
        let missing = {
            let read: HashSet<u64> = lock(&state.timer_reads).iter().map(|r| r.n).collect();
            lock(&state.timer_sends)
                .iter()
                .filter(|s| s.outcome == Outcome::Ok && !read.contains(&s.n))
                .count()
        };
        if missing == 0 {
            // A little longer, for a message stored (fired) twice.
            tokio::time::sleep(Duration::from_secs(2)).await;
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(format!("{missing} acknowledged delayed message(s) never read"));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Waits until the POP group has settled: every acknowledged send handed out,
/// and every message handed out either acked (Ok) or, after an ack that
/// failed, not back for an invisible time and more (so that ack applied). Then
/// keeps the members receiving for another invisible time and more, so that
/// whatever comes back after its ack is seen.
async fn drain_pop(state: &State) -> Result<(), String> {
    let deadline = Instant::now() + DRAIN_LIMIT;
    let settle_ms = u64::try_from(POP_INVISIBLE.as_millis()).unwrap_or(0) + 2_000;
    let result = loop {
        let unsettled = {
            let sends = lock(&state.pop_sends);
            let deliveries = lock(&state.deliveries);
            let acks = lock(&state.acks);
            let handed: HashSet<u64> = deliveries.iter().map(|d| d.n).collect();
            let not_handed = sends
                .iter()
                .filter(|s| s.outcome == Outcome::Ok && !handed.contains(&s.n))
                .count();
            let mut last_delivery: HashMap<&str, u64> = HashMap::new();
            for d in deliveries.iter() {
                let e = last_delivery.entry(d.message_id.as_str()).or_default();
                *e = (*e).max(d.end_wall_ms);
            }
            let mut acked_ok: HashSet<&str> = HashSet::new();
            let mut last_failed_ack: HashMap<&str, u64> = HashMap::new();
            for a in acks.iter() {
                if a.ok {
                    acked_ok.insert(a.message_id.as_str());
                } else {
                    let e = last_failed_ack.entry(a.message_id.as_str()).or_default();
                    *e = (*e).max(a.end_wall_ms);
                }
            }
            let now = wall_ms();
            let open = last_delivery
                .iter()
                .filter(|(id, delivered)| {
                    !acked_ok.contains(*id)
                        && !last_failed_ack
                            .get(*id)
                            .is_some_and(|failed| failed >= *delivered && now >= failed + settle_ms)
                })
                .count();
            not_handed + open
        };
        if unsettled == 0 {
            break Ok(());
        }
        if Instant::now() >= deadline {
            break Err(format!("{unsettled} message(s) not handed out or not acked"));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    tokio::time::sleep(Duration::from_millis(settle_ms)).await;
    result
}

#[derive(Debug, Default, serde::Serialize)]
pub struct Summary {
    pub timers_sent: u64,
    pub timers_acknowledged: u64,
    pub timers_failed: u64,
    pub timers_unknown: u64,
    /// Receipts whose `deliver_at_ms` is not the time sent, or with a queue offset.
    pub timers_bad_receipts: u64,
    /// Stored messages read (distinct message ids).
    pub timers_received: u64,
    /// Visible before their due time (store timestamp or the reader's clock): failure.
    pub timers_early: u64,
    /// Made visible more than 1 s after their due time: a warning.
    pub timers_late: u64,
    /// Of the late ones, those whose send was acknowledged only after their due time.
    pub timers_late_sent_after_due: u64,
    /// Acknowledged but never read: failure.
    pub timers_never: u64,
    /// Message ids read more than once (a timer fired twice): failure.
    pub timers_twice: u64,
    /// Read, but not from a send of this run: failure.
    pub timers_unexpected: u64,
    /// Read with a `deliver_at_ms` other than the time sent: failure.
    pub timers_wrong_due: u64,
    /// Numbers stored under two message ids (a send retried after an ambiguous failure).
    pub timers_duplicate_sends: u64,
    /// From the due time to the store timestamp.
    pub timers_fire_delay_ms_median: Option<u64>,
    pub timers_fire_delay_ms_p99: Option<u64>,
    pub timers_fire_delay_ms_max: Option<u64>,
    pub timers_examples: Vec<String>,

    pub pop_sent: u64,
    pub pop_acknowledged: u64,
    pub pop_failed: u64,
    pub pop_unknown: u64,
    /// Deliveries handed to the members (this run's messages).
    pub pop_deliveries: u64,
    /// Distinct messages (message ids) handed out.
    pub pop_messages: u64,
    /// First deliveries left unacked on purpose.
    pub pop_deliberately_unacked: u64,
    /// Deliveries after a message's first (attempt > 1 or a repeat).
    pub pop_redeliveries: u64,
    /// Of those, of messages left unacked on purpose.
    pub pop_redeliveries_deliberate: u64,
    pub pop_acks_ok: u64,
    pub pop_ack_errors: u64,
    /// Handed out again by a receive that started after an ack of it returned Ok: failure.
    pub pop_redelivered_after_ack: u64,
    /// An Ok ack of a delivery that a later delivery had already superseded: failure.
    pub pop_stale_ack_ok: u64,
    /// Handed out again before the previous delivery's invisible time: failure.
    pub pop_redelivered_early: u64,
    /// Acknowledged sends the group never acked: failure.
    pub pop_lost: u64,
    /// Messages whose every ack failed and which never came back (the ack
    /// presumably applied; its answer was lost).
    pub pop_ack_unconfirmed: u64,
    /// Handed out, but not from a send of this run: failure.
    pub pop_unexpected: u64,
    /// Numbers stored under two message ids (a send retried after an ambiguous failure).
    pub pop_duplicate_sends: u64,
    pub pop_examples: Vec<String>,
    /// Messages of earlier runs on the same cluster, skipped.
    pub foreign_messages: u64,
}

impl Summary {
    /// Whether nothing that must not happen happened (late timers and
    /// redeliveries are reported, not failures).
    pub fn passed(&self) -> bool {
        self.timers_early == 0
            && self.timers_never == 0
            && self.timers_twice == 0
            && self.timers_unexpected == 0
            && self.timers_wrong_due == 0
            && self.pop_redelivered_after_ack == 0
            && self.pop_stale_ack_ok == 0
            && self.pop_redelivered_early == 0
            && self.pop_lost == 0
            && self.pop_unexpected == 0
    }

    pub fn print(&self) {
        println!(
            "| timers sent | acked | failed | unknown | read | early | late (>1 s; send acked after due) | never | twice | unexpected | wrong due | fire delay median / p99 / max ms |"
        );
        println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |");
        let ms = |v: Option<u64>| v.map_or("-".to_owned(), |v| v.to_string());
        println!(
            "| {} | {} | {} | {} | {} | {} | {} ({}) | {} | {} | {} | {} | {} / {} / {} |",
            self.timers_sent,
            self.timers_acknowledged,
            self.timers_failed,
            self.timers_unknown,
            self.timers_received,
            self.timers_early,
            self.timers_late,
            self.timers_late_sent_after_due,
            self.timers_never,
            self.timers_twice,
            self.timers_unexpected,
            self.timers_wrong_due,
            ms(self.timers_fire_delay_ms_median),
            ms(self.timers_fire_delay_ms_p99),
            ms(self.timers_fire_delay_ms_max),
        );
        println!();
        println!(
            "| POP sent | acked sends | deliveries | redeliveries (deliberate) | unacked on purpose | acks ok / errors | redelivered after ack | stale ack ok | redelivered early | lost | ack unconfirmed | unexpected |"
        );
        println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |");
        println!(
            "| {} | {} | {} | {} ({}) | {} | {} / {} | {} | {} | {} | {} | {} | {} |",
            self.pop_sent,
            self.pop_acknowledged,
            self.pop_deliveries,
            self.pop_redeliveries,
            self.pop_redeliveries_deliberate,
            self.pop_deliberately_unacked,
            self.pop_acks_ok,
            self.pop_ack_errors,
            self.pop_redelivered_after_ack,
            self.pop_stale_ack_ok,
            self.pop_redelivered_early,
            self.pop_lost,
            self.pop_ack_unconfirmed,
            self.pop_unexpected,
        );
        if self.timers_late > 0 {
            println!(
                "warning: {} delayed message(s) made visible more than 1 s after their due time ({} of them sent while a fault held the send past its due time)",
                self.timers_late, self.timers_late_sent_after_due
            );
        }
        for ex in &self.timers_examples {
            println!("timers: {ex}");
        }
        for ex in &self.pop_examples {
            println!("pop: {ex}");
        }
    }
}

fn percentile(sorted: &[u64], p: f64) -> Option<u64> {
    if sorted.is_empty() {
        return None;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted.get(i).copied()
}

fn check(state: &State) -> Summary {
    let mut s = Summary {
        foreign_messages: *lock(&state.foreign),
        ..Summary::default()
    };
    check_timers(state, &mut s);
    check_pop(state, &mut s);
    s
}

fn check_timers(state: &State, s: &mut Summary) {
    let sends = lock(&state.timer_sends).clone();
    let reads = lock(&state.timer_reads).clone();
    let by_n: HashMap<u64, &TimerSend> = sends.iter().map(|t| (t.n, t)).collect();
    let count = |o: Outcome| sends.iter().filter(|t| t.outcome == o).count() as u64;
    s.timers_sent = sends.len() as u64;
    s.timers_acknowledged = count(Outcome::Ok);
    s.timers_failed = count(Outcome::Failed);
    s.timers_unknown = count(Outcome::Unknown);
    s.timers_bad_receipts = sends
        .iter()
        .filter(|t| t.receipt.is_some_and(|(at, off)| at != t.due_ms || off != 0))
        .count() as u64;

    let mut ex = Vec::new();
    let mut by_id: BTreeMap<&str, Vec<&TimerRead>> = BTreeMap::new();
    for r in &reads {
        by_id.entry(r.message_id.as_str()).or_default().push(r);
    }
    s.timers_received = by_id.len() as u64;
    let mut ids_of_n: HashMap<u64, u64> = HashMap::new();
    let mut delays = Vec::new();
    for (id, rs) in &by_id {
        let r = rs[0];
        *ids_of_n.entry(r.n).or_default() += 1;
        if rs.len() > 1 {
            s.timers_twice += 1;
            if ex.len() < EXAMPLES {
                let at: Vec<String> = rs
                    .iter()
                    .map(|r| format!("queue {} offset {}", r.queue, r.offset))
                    .collect();
                ex.push(format!(
                    "twice: #{} id {id} read {} times, at {}",
                    r.n,
                    rs.len(),
                    at.join(", ")
                ));
            }
        }
        let Some(sent) = by_n.get(&r.n) else {
            s.timers_unexpected += 1;
            if ex.len() < EXAMPLES {
                ex.push(format!("unexpected: #{} id {id}", r.n));
            }
            continue;
        };
        if r.deliver_at_ms != sent.due_ms || r.due_ms != sent.due_ms {
            s.timers_wrong_due += 1;
            if ex.len() < EXAMPLES {
                ex.push(format!(
                    "wrong due: #{} id {id} sent due {} read with deliver_at {} (property {})",
                    r.n, sent.due_ms, r.deliver_at_ms, r.due_ms
                ));
            }
        }
        let earliest = rs.iter().map(|r| r.read_wall_ms).min().unwrap_or(r.read_wall_ms);
        if r.store_ms < sent.due_ms || earliest < sent.due_ms {
            s.timers_early += 1;
            if ex.len() < EXAMPLES {
                ex.push(format!(
                    "early: #{} id {id} due {} stored {} ({} ms early) read {} (queue {} offset {})",
                    r.n,
                    sent.due_ms,
                    r.store_ms,
                    sent.due_ms.saturating_sub(r.store_ms),
                    earliest,
                    r.queue,
                    r.offset
                ));
            }
        }
        let delay = r.store_ms.saturating_sub(sent.due_ms);
        delays.push(delay);
        if delay > TIMER_LATE_MS {
            s.timers_late += 1;
            if sent.end_wall_ms > sent.due_ms {
                s.timers_late_sent_after_due += 1;
            }
        }
    }
    s.timers_duplicate_sends = ids_of_n.values().filter(|c| **c > 1).count() as u64;
    let mut never: Vec<&TimerSend> = sends
        .iter()
        .filter(|t| t.outcome == Outcome::Ok && !ids_of_n.contains_key(&t.n))
        .collect();
    never.sort_by_key(|t| t.n);
    s.timers_never = never.len() as u64;
    for t in never.iter().take(EXAMPLES.saturating_sub(ex.len())) {
        ex.push(format!(
            "never: #{} due {} acked at {} (receipt {:?})",
            t.n, t.due_ms, t.end_wall_ms, t.receipt
        ));
    }
    delays.sort_unstable();
    s.timers_fire_delay_ms_median = percentile(&delays, 0.5);
    s.timers_fire_delay_ms_p99 = percentile(&delays, 0.99);
    s.timers_fire_delay_ms_max = delays.last().copied();
    s.timers_examples = ex;
}

fn check_pop(state: &State, s: &mut Summary) {
    let sends = lock(&state.pop_sends).clone();
    let deliveries = lock(&state.deliveries).clone();
    let acks = lock(&state.acks).clone();
    let count = |o: Outcome| sends.iter().filter(|t| t.outcome == o).count() as u64;
    s.pop_sent = sends.len() as u64;
    s.pop_acknowledged = count(Outcome::Ok);
    s.pop_failed = count(Outcome::Failed);
    s.pop_unknown = count(Outcome::Unknown);
    s.pop_deliveries = deliveries.len() as u64;
    s.pop_deliberately_unacked = deliveries.iter().filter(|d| d.skipped).count() as u64;
    s.pop_acks_ok = acks.iter().filter(|a| a.ok).count() as u64;
    s.pop_ack_errors = acks.iter().filter(|a| !a.ok).count() as u64;
    let sent: HashSet<u64> = sends.iter().map(|t| t.n).collect();

    let mut by_id: BTreeMap<&str, Vec<&Delivery>> = BTreeMap::new();
    for d in &deliveries {
        by_id.entry(d.message_id.as_str()).or_default().push(d);
    }
    let mut acks_of: HashMap<&str, Vec<&AckCall>> = HashMap::new();
    for a in &acks {
        acks_of.entry(a.message_id.as_str()).or_default().push(a);
    }
    s.pop_messages = by_id.len() as u64;
    let mut ex = Vec::new();
    // Numbers whose message reached an ack call (Ok, or failed and never back).
    let mut settled: HashSet<u64> = HashSet::new();
    let mut ids_of_n: HashMap<u64, u64> = HashMap::new();
    for (id, ds) in &mut by_id {
        ds.sort_by_key(|d| d.end_us);
        let n = ds[0].n;
        *ids_of_n.entry(n).or_default() += 1;
        if !sent.contains(&n) {
            s.pop_unexpected += 1;
            if ex.len() < EXAMPLES {
                ex.push(format!("unexpected: #{n} id {id}"));
            }
        }
        let redeliveries = ds.len() as u64 - 1;
        s.pop_redeliveries += redeliveries;
        if ds[0].skipped {
            s.pop_redeliveries_deliberate += redeliveries;
        }
        for w in ds.windows(2) {
            let (prev, next) = (w[0], w[1]);
            if next.end_wall_ms < prev.invisible_until_ms {
                s.pop_redelivered_early += 1;
                if ex.len() < EXAMPLES {
                    ex.push(format!(
                        "early redelivery: #{n} id {id} attempt {} (member {}) handed out by {} ms, attempt {} (member {}) was invisible until {}",
                        next.attempt, next.member, next.end_wall_ms, prev.attempt, prev.member, prev.invisible_until_ms
                    ));
                }
            }
        }
        let calls = acks_of.get(*id).cloned().unwrap_or_default();
        if let Some(ok) = calls.iter().filter(|a| a.ok).min_by_key(|a| a.end_us) {
            settled.insert(n);
            for d in ds.iter().filter(|d| d.start_us > ok.end_us) {
                s.pop_redelivered_after_ack += 1;
                if ex.len() < EXAMPLES {
                    ex.push(format!(
                        "redelivered after ack: #{n} id {id} attempt {} acked Ok at {} (wall), handed out again as attempt {} to member {} by {} (receive started {} ms after the ack returned)",
                        ok.attempt,
                        ok.end_wall_ms,
                        d.attempt,
                        d.member,
                        d.end_wall_ms,
                        (d.start_us - ok.end_us) / 1000
                    ));
                }
            }
            for d in ds.iter().filter(|d| d.attempt > ok.attempt && d.start_us <= ok.end_us) {
                s.pop_stale_ack_ok += 1;
                if ex.len() < EXAMPLES {
                    ex.push(format!(
                        "stale ack ok: #{n} id {id} attempt {} acked Ok at {} (wall) though attempt {} had been handed to member {} by {}",
                        ok.attempt, ok.end_wall_ms, d.attempt, d.member, d.end_wall_ms
                    ));
                }
            }
        } else if !calls.is_empty() {
            let last = ds.last().map_or(0, |d| d.end_us);
            if calls.iter().any(|a| a.end_us >= last) {
                settled.insert(n);
                s.pop_ack_unconfirmed += 1;
            }
        }
    }
    s.pop_duplicate_sends = ids_of_n.values().filter(|c| **c > 1).count() as u64;
    let mut lost: Vec<u64> = sends
        .iter()
        .filter(|t| t.outcome == Outcome::Ok && !settled.contains(&t.n))
        .map(|t| t.n)
        .collect();
    lost.sort_unstable();
    s.pop_lost = lost.len() as u64;
    for n in lost.iter().take(EXAMPLES.saturating_sub(ex.len())) {
        let handed: Vec<String> = deliveries
            .iter()
            .filter(|d| d.n == *n)
            .map(|d| {
                format!(
                    "id {} attempt {} to member {} by {}{}",
                    d.message_id,
                    d.attempt,
                    d.member,
                    d.end_wall_ms,
                    if d.skipped { " (left unacked)" } else { "" }
                )
            })
            .collect();
        let ids: HashSet<&str> = deliveries
            .iter()
            .filter(|d| d.n == *n)
            .map(|d| d.message_id.as_str())
            .collect();
        let errors: Vec<String> = acks
            .iter()
            .filter(|a| ids.contains(a.message_id.as_str()))
            .filter_map(|a| a.error.clone())
            .collect();
        ex.push(format!(
            "lost: #{n} handed out: [{}]; ack errors: {errors:?}",
            handed.join("; ")
        ));
    }
    s.pop_examples = ex;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timer_send(n: u64, due_ms: u64, outcome: Outcome) -> TimerSend {
        TimerSend {
            n,
            due_ms,
            outcome,
            end_wall_ms: due_ms - 500,
            receipt: (outcome == Outcome::Ok).then_some((due_ms, 0)),
        }
    }

    fn timer_read(n: u64, id: &str, due_ms: u64, store_ms: u64, offset: u64) -> TimerRead {
        TimerRead {
            n,
            message_id: id.into(),
            due_ms,
            deliver_at_ms: due_ms,
            store_ms,
            read_wall_ms: store_ms + 1,
            queue: 0,
            offset,
        }
    }

    #[test]
    fn timers_early_late_never_twice_and_a_duplicate_send_are_told_apart() {
        let st = State::new("r".into());
        *lock(&st.timer_sends) = vec![
            timer_send(1, 10_000, Outcome::Ok),      // on time
            timer_send(2, 10_000, Outcome::Ok),      // early
            timer_send(3, 10_000, Outcome::Ok),      // late
            timer_send(4, 10_000, Outcome::Ok),      // never
            timer_send(5, 10_000, Outcome::Ok),      // fired twice (one id)
            timer_send(6, 10_000, Outcome::Ok),      // stored twice (two ids): not a failure
            timer_send(7, 10_000, Outcome::Unknown), // never read: fine
        ];
        *lock(&st.timer_reads) = vec![
            timer_read(1, "a", 10_000, 10_000, 0),
            timer_read(2, "b", 10_000, 9_999, 1),
            timer_read(3, "c", 10_000, 11_001, 2),
            timer_read(5, "e", 10_000, 10_003, 3),
            timer_read(5, "e", 10_000, 10_004, 4),
            timer_read(6, "f", 10_000, 10_002, 5),
            timer_read(6, "g", 10_000, 10_002, 6),
            timer_read(99, "z", 10_000, 10_002, 7),
        ];
        let s = check(&st);
        assert_eq!(
            (s.timers_early, s.timers_late, s.timers_never, s.timers_twice),
            (1, 1, 1, 1),
            "{s:?}"
        );
        assert_eq!(
            (s.timers_duplicate_sends, s.timers_unexpected, s.timers_received),
            (1, 1, 7)
        );
        assert!(!s.passed());
    }

    fn delivery(n: u64, id: &str, attempt: u32, at: u64, skipped: bool) -> Delivery {
        Delivery {
            n,
            message_id: id.into(),
            attempt,
            member: 0,
            invisible_until_ms: at + 5_000,
            start_us: at * 1000,
            end_us: at * 1000 + 10,
            end_wall_ms: at,
            skipped,
        }
    }

    fn ack(id: &str, attempt: u32, at: u64, ok: bool) -> AckCall {
        AckCall {
            message_id: id.into(),
            attempt,
            ok,
            error: (!ok).then(|| "unavailable".into()),
            end_us: at * 1000 + 20,
            end_wall_ms: at,
        }
    }

    #[test]
    fn pop_losses_redeliveries_after_acks_and_unconfirmed_acks_are_told_apart() {
        let st = State::new("r".into());
        *lock(&st.pop_sends) = (1..=7)
            .map(|n| PopSend {
                n,
                outcome: Outcome::Ok,
            })
            .collect();
        *lock(&st.deliveries) = vec![
            delivery(1, "a", 1, 100, false),
            // Left unacked, back after its invisible time, acked: a redelivery.
            delivery(2, "b", 1, 100, true),
            delivery(2, "b", 2, 5_200, false),
            // Acked, then handed out again: a violation.
            delivery(3, "c", 1, 100, false),
            delivery(3, "c", 2, 6_000, false),
            // Left unacked and never back: lost.
            delivery(4, "d", 1, 100, true),
            // The ack failed and it never came back: unconfirmed, not lost.
            delivery(5, "e", 1, 100, false),
            // Back before its invisible time: a violation.
            delivery(6, "f", 1, 100, false),
            delivery(6, "f", 2, 3_000, false),
            // 7 never handed out: lost.
        ];
        *lock(&st.acks) = vec![
            ack("a", 1, 110, true),
            ack("b", 2, 5_210, true),
            ack("c", 1, 110, true),
            ack("c", 2, 6_010, true),
            ack("e", 1, 110, false),
            ack("f", 2, 3_010, true),
        ];
        let s = check(&st);
        assert_eq!(s.pop_lost, 2, "{s:?}");
        assert_eq!(s.pop_redelivered_after_ack, 1, "{s:?}");
        assert_eq!(s.pop_redelivered_early, 1, "{s:?}");
        assert_eq!(s.pop_ack_unconfirmed, 1, "{s:?}");
        assert_eq!((s.pop_redeliveries, s.pop_redeliveries_deliberate), (3, 1));
        assert_eq!(s.pop_stale_ack_ok, 0);
        assert!(!s.passed());
    }

    #[test]
    fn an_ok_ack_of_a_superseded_delivery_is_a_violation() {
        let st = State::new("r".into());
        *lock(&st.pop_sends) = vec![PopSend {
            n: 1,
            outcome: Outcome::Ok,
        }];
        let mut second = delivery(1, "a", 2, 5_100, false);
        second.member = 1;
        *lock(&st.deliveries) = vec![delivery(1, "a", 1, 100, false), second];
        *lock(&st.acks) = vec![ack("a", 1, 5_500, true), ack("a", 2, 5_600, false)];
        let s = check(&st);
        assert_eq!((s.pop_stale_ack_ok, s.pop_redelivered_after_ack, s.pop_lost), (1, 0, 0));
        assert!(!s.passed());
    }
}
