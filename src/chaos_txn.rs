//! `raftmq chaos`'s transactional workload, run beside its other workloads and
//! under the same faults.
//!
//! One [`TransactionProducer`] of its own producer group sends a transaction at
//! most every 100 ms (one at a time) to its own topic: a half message, then
//! EndTransaction. Each transaction's outcome is a pure function of its number
//! `n`: even numbers commit, odd ones roll back. Every fifth transaction is left
//! unknown (no EndTransaction), so the broker checks back; the producer's checker
//! answers by the same rule, reading `n` from a message property. So is a
//! transaction whose EndTransaction failed (ambiguously or not): the broker's
//! checks settle it, and the rule still decides. A half send whose outcome is
//! unknown may or may not have stored a half message; if it did, the checker
//! settles it by the rule too.
//!
//! At the end the workload waits (bounded) until the broker groups hold no
//! pending transaction of its producer group, then reads every queue of the
//! topic from offset 0 (the log itself, as the other workloads do) and checks:
//! every acknowledged half message that the rule commits is there (`committed
//! missing` is a failure), nothing the rule rolls back is there (`rolled back
//! present` is a failure, whether its half send was acknowledged or not), no
//! message id is read twice (one commit applied twice), and nothing of this
//! run is read that was never sent. Numbers stored under two transaction ids (a
//! half send retried after an ambiguous failure) are counted as duplicates, a
//! report, not a failure.
//!
//! Messages carry the run's id; messages of earlier runs on the same cluster
//! are skipped (and their check-backs answered by the same rule).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use raftmq_client::{Client, MessageExt, TransactionCheck, TransactionProducer, TransactionResolution};
use raftmq_proto::v1 as pb;

/// The number of a transaction within the run.
const NUMBER: &str = "chaos-txn-n";
/// The run a message belongs to.
const RUN: &str = "chaos-run";
const EVERY: Duration = Duration::from_millis(100);
/// Transactions whose number is a multiple of this are left unknown.
const UNKNOWN_EVERY: u64 = 5;
/// Longest wait for the pending transactions to be resolved at the end.
const RESOLVE_LIMIT: Duration = Duration::from_secs(60);
/// Longest the final read of the topic may take.
const READ_LIMIT: Duration = Duration::from_secs(60);
const EXAMPLES: usize = 10;

#[derive(Clone, Debug)]
pub struct Config {
    pub topic: String,
    pub producer_group: String,
    pub queues: u32,
}

/// How transaction `n` must end.
fn rule(n: u64) -> TransactionResolution {
    if n.is_multiple_of(2) {
        TransactionResolution::Commit
    } else {
        TransactionResolution::Rollback
    }
}

/// Whether transaction `n` is left to the check-backs.
fn left_unknown(n: u64) -> bool {
    n.is_multiple_of(UNKNOWN_EVERY)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    Ok,
    /// The broker said no: not stored.
    Failed,
    /// Timed out or lost the connection: maybe stored.
    Unknown,
}

fn outcome<T>(r: &Result<T, raftmq_client::Error>) -> Outcome {
    match r {
        Ok(_) => Outcome::Ok,
        Err(e) if e.is_outcome_unknown() => Outcome::Unknown,
        Err(_) => Outcome::Failed,
    }
}

/// What the producer did to end a transaction.
#[derive(Clone, Debug, PartialEq, Eq)]
enum End {
    /// The half send was not acknowledged: nothing to end.
    NoHalf,
    /// Left to the check-backs on purpose.
    LeftUnknown,
    /// EndTransaction answered Ok.
    Ok { already_ended: bool },
    /// EndTransaction failed; the check-backs settle it.
    Failed { outcome: Outcome, error: String },
}

#[derive(Clone, Debug)]
struct TxnSend {
    n: u64,
    half: Outcome,
    transaction_id: Option<String>,
    /// µs since the workload started, when the half send returned.
    half_us: u64,
    end: End,
    /// µs since the workload started, when the EndTransaction returned.
    end_us: Option<u64>,
}

#[derive(Clone, Debug)]
struct CheckSeen {
    /// `None`: a message of another run, or without a number.
    n: Option<u64>,
    transaction_id: String,
    check_times: u32,
    at_us: u64,
}

#[derive(Clone, Debug)]
struct Read {
    n: u64,
    message_id: String,
    queue: u32,
    offset: u64,
}

struct State {
    run_id: String,
    started: Instant,
    stop_sending: AtomicBool,
    sends: Mutex<Vec<TxnSend>>,
    checks: Mutex<Vec<CheckSeen>>,
    /// Messages (and check-backs) of other runs.
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
            sends: Mutex::new(Vec::new()),
            checks: Mutex::new(Vec::new()),
            foreign: Mutex::new(0),
        }
    }

    fn us(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_micros()).unwrap_or(u64::MAX)
    }

    /// The checker: records the check and answers by the rule.
    fn answer(&self, c: &TransactionCheck) -> TransactionResolution {
        let props = c.message.message.as_ref().map(|m| &m.properties);
        let n = props.and_then(|p| p.get(NUMBER)).and_then(|v| v.parse::<u64>().ok());
        let ours = props.and_then(|p| p.get(RUN)) == Some(&self.run_id);
        if !ours {
            *lock(&self.foreign) += 1;
        }
        lock(&self.checks).push(CheckSeen {
            n: n.filter(|_| ours),
            transaction_id: c.transaction_id.clone(),
            check_times: c.check_times,
            at_us: self.us(),
        });
        // Another run's transaction follows the same rule; one without a number
        // is not ours to keep.
        n.map_or(TransactionResolution::Rollback, rule)
    }
}

fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The broker groups' transaction totals, summed.
#[derive(Clone, Copy, Debug, Default)]
struct Totals {
    committed: u64,
    rolled_back: u64,
    rolled_back_unresolved: u64,
}

async fn totals(client: &Client, producer_group: &str) -> Option<(Totals, Vec<String>)> {
    let groups = client.admin().list_transactions(producer_group, 10_000).await.ok()?;
    let mut t = Totals::default();
    let mut pending = Vec::new();
    for g in groups {
        t.committed += g.committed;
        t.rolled_back += g.rolled_back;
        t.rolled_back_unresolved += g.rolled_back_unresolved;
        pending.extend(g.transactions.into_iter().map(|p| p.transaction_id));
    }
    Some((t, pending))
}

/// The workload, started; [`Workload::finish`] settles, reads and checks it.
pub struct Workload {
    state: Arc<State>,
    cfg: Config,
    client: Client,
    producer: TransactionProducer,
    sender: tokio::task::JoinHandle<()>,
    queues: Vec<(String, u32)>,
    before: Option<Totals>,
}

impl Workload {
    /// Creates the topic and starts the transaction producer and its checker.
    pub async fn start(client: &Client, cfg: Config) -> anyhow::Result<Workload> {
        let queues =
            crate::tools::create_topic_and_wait(client, &cfg.topic, cfg.queues, Duration::from_secs(30)).await?;
        let state = Arc::new(State::new(format!("{}-{}", wall_ms(), std::process::id())));
        let producer = client.transaction_producer(&cfg.producer_group, {
            let state = state.clone();
            move |c| state.answer(c)
        })?;
        let before = totals(client, &cfg.producer_group).await.map(|(t, _)| t);
        let sender = tokio::spawn(send(producer.clone(), cfg.topic.clone(), state.clone()));
        Ok(Workload {
            state,
            cfg,
            client: client.clone(),
            producer,
            sender,
            queues,
            before,
        })
    }

    pub fn stop_sending(&self) {
        self.state.stop_sending.store(true, Ordering::Relaxed);
    }

    /// Stops sending, waits (bounded) until no transaction of the producer
    /// group is pending, closes the producer, reads the topic and checks it.
    pub async fn finish(self) -> Summary {
        self.stop_sending();
        let _ = self.sender.await;
        let started = Instant::now();
        let deadline = started + RESOLVE_LIMIT;
        let mut clear_once = false;
        let mut after = None;
        let mut pending = Vec::new();
        let unresolved: Vec<String> = loop {
            if let Some((t, now_pending)) = totals(&self.client, &self.cfg.producer_group).await {
                after = Some(t);
                // Clear twice in a row, a second apart: a half send still in
                // some old leader's log may land late.
                let clear = now_pending.is_empty();
                if clear && clear_once {
                    break Vec::new();
                }
                clear_once = clear;
                pending = now_pending;
            }
            if Instant::now() >= deadline {
                break pending;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        };
        let resolve_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        if !unresolved.is_empty() {
            eprintln!(
                "chaos: {} transaction(s) of {} still pending after {RESOLVE_LIMIT:?}",
                unresolved.len(),
                self.cfg.producer_group
            );
        }
        self.producer.shutdown();
        let (reads, read_error) = match read_all(&self.client, &self.cfg.topic, &self.queues, &self.state).await {
            Ok(r) => (r, None),
            Err((r, e)) => {
                eprintln!("chaos: transactional topic not read completely: {e}");
                (r, Some(e))
            }
        };
        let mut s = check(&self.state, &reads, &unresolved);
        s.txn_resolve_wait_ms = resolve_ms;
        s.txn_read_error = read_error;
        if let (Some(b), Some(a)) = (self.before, after) {
            s.txn_broker_committed = Some(a.committed.saturating_sub(b.committed));
            s.txn_broker_rolled_back = Some(a.rolled_back.saturating_sub(b.rolled_back));
            s.txn_broker_rolled_back_unresolved =
                Some(a.rolled_back_unresolved.saturating_sub(b.rolled_back_unresolved));
        }
        s
    }
}

/// Sends a transaction at most every 100 ms (one at a time) until told to stop.
async fn send(producer: TransactionProducer, topic: String, state: Arc<State>) {
    let mut tick = tokio::time::interval(EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut n = 0u64;
    while !state.stop_sending.load(Ordering::Relaxed) {
        tick.tick().await;
        let mut m = pb::Message::new(format!("txn{n}").into_bytes());
        m.properties.insert(NUMBER.into(), n.to_string());
        m.properties.insert(RUN.into(), state.run_id.clone());
        let r = producer.begin(&topic, m).await;
        let half_us = state.us();
        let mut send = TxnSend {
            n,
            half: outcome(&r),
            transaction_id: r.as_ref().ok().map(|h| h.transaction_id.clone()),
            half_us,
            end: End::NoHalf,
            end_us: None,
        };
        if let Ok(half) = &r {
            send.end = if left_unknown(n) {
                End::LeftUnknown
            } else {
                let ended = match rule(n) {
                    TransactionResolution::Commit => producer.commit(half).await,
                    _ => producer.rollback(half).await,
                };
                send.end_us = Some(state.us());
                match ended {
                    Ok(resp) => End::Ok {
                        already_ended: resp.already_ended,
                    },
                    Err(e) => End::Failed {
                        outcome: if e.is_outcome_unknown() {
                            Outcome::Unknown
                        } else {
                            Outcome::Failed
                        },
                        error: e.to_string(),
                    },
                }
            };
        }
        let failed = send.half != Outcome::Ok || matches!(send.end, End::Failed { .. });
        lock(&state.sends).push(send);
        n += 1;
        if failed {
            // The client already retried within its deadline; do not spin.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Reads every queue of the topic from offset 0 to its end. On a deadline,
/// returns what was read with the error.
async fn read_all(
    client: &Client,
    topic: &str,
    queues: &[(String, u32)],
    state: &State,
) -> Result<Vec<Read>, (Vec<Read>, String)> {
    let consumer = client.pull_consumer();
    let deadline = Instant::now() + READ_LIMIT;
    let mut reads = Vec::new();
    for (group, queue) in queues {
        let mut offset = 0u64;
        loop {
            let r = consumer
                .pull(
                    topic,
                    group,
                    *queue,
                    offset,
                    256,
                    Duration::ZERO,
                    &raftmq_client::Filter::all(),
                )
                .await;
            let r = match r {
                Ok(r) => r,
                Err(e) if Instant::now() >= deadline => {
                    return Err((reads, format!("{group}/{queue} at offset {offset}: {e}")));
                }
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            };
            for p in &r.messages {
                let Some(m) = p.message.as_ref() else { continue };
                if m.properties.get(RUN) != Some(&state.run_id) {
                    *lock(&state.foreign) += 1;
                    continue;
                }
                reads.push(Read {
                    n: m.properties
                        .get(NUMBER)
                        .and_then(|v| v.parse().ok())
                        .unwrap_or(u64::MAX),
                    message_id: p.message_id.clone(),
                    queue: *queue,
                    offset: p.queue_offset,
                });
            }
            if r.messages.is_empty() && r.next_offset >= r.max_offset {
                break;
            }
            if r.next_offset == offset && r.messages.is_empty() {
                // Not at the end, yet nothing moved: a gap the broker skips
                // later; do not spin.
                if Instant::now() >= deadline {
                    return Err((
                        reads,
                        format!("{group}/{queue} stuck at offset {offset} of {}", r.max_offset),
                    ));
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            offset = r.next_offset;
        }
    }
    Ok(reads)
}

fn percentile(sorted: &[u64], p: f64) -> Option<u64> {
    if sorted.is_empty() {
        return None;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted.get(i).copied()
}

fn check(state: &State, reads: &[Read], unresolved: &[String]) -> Summary {
    let sends = lock(&state.sends).clone();
    let checks = lock(&state.checks).clone();
    let mut s = Summary {
        txn_foreign: *lock(&state.foreign),
        txn_unresolved: unresolved.len() as u64,
        ..Summary::default()
    };
    let mut ex = Vec::new();
    s.txn_sent = sends.len() as u64;
    let half = |o: Outcome| sends.iter().filter(|t| t.half == o).count() as u64;
    s.txn_half_acknowledged = half(Outcome::Ok);
    s.txn_half_failed = half(Outcome::Failed);
    s.txn_half_unknown = half(Outcome::Unknown);
    s.txn_left_unknown = sends.iter().filter(|t| t.end == End::LeftUnknown).count() as u64;
    s.txn_ended_ok = sends.iter().filter(|t| matches!(t.end, End::Ok { .. })).count() as u64;
    s.txn_end_already_ended = sends
        .iter()
        .filter(|t| t.end == End::Ok { already_ended: true })
        .count() as u64;
    for t in &sends {
        if let End::Failed { outcome, error } = &t.end {
            if *outcome == Outcome::Unknown {
                s.txn_end_failed_ambiguous += 1;
            } else {
                s.txn_end_failed += 1;
            }
            if ex.len() < EXAMPLES && *outcome != Outcome::Unknown {
                ex.push(format!(
                    "end refused: #{} ({:?}) transaction {}: {error}",
                    t.n,
                    rule(t.n),
                    t.transaction_id.as_deref().unwrap_or("-")
                ));
            }
        }
    }

    // Check-backs.
    s.txn_checks = checks.len() as u64;
    let mut first_check: HashMap<u64, u64> = HashMap::new();
    let mut checked_ids: HashSet<&str> = HashSet::new();
    for c in &checks {
        checked_ids.insert(c.transaction_id.as_str());
        s.txn_max_check_times = s.txn_max_check_times.max(c.check_times);
        if let Some(n) = c.n {
            let e = first_check.entry(n).or_insert(c.at_us);
            *e = (*e).min(c.at_us);
        }
    }
    s.txn_checked_transactions = checked_ids.len() as u64;
    let by_n: HashMap<u64, &TxnSend> = sends.iter().map(|t| (t.n, t)).collect();
    // A check that arrived after the producer's own end of it had returned Ok.
    s.txn_checks_after_end = checks
        .iter()
        .filter(|c| {
            c.n.and_then(|n| by_n.get(&n))
                .is_some_and(|t| matches!(t.end, End::Ok { .. }) && t.end_us.is_some_and(|end| c.at_us > end))
        })
        .count() as u64;
    let mut check_delays: Vec<u64> = sends
        .iter()
        .filter(|t| t.end == End::LeftUnknown)
        .filter_map(|t| first_check.get(&t.n).map(|at| at.saturating_sub(t.half_us) / 1000))
        .collect();
    check_delays.sort_unstable();
    s.txn_left_unknown_never_checked = sends
        .iter()
        .filter(|t| t.end == End::LeftUnknown && !first_check.contains_key(&t.n))
        .count() as u64;
    s.txn_first_check_ms_median = percentile(&check_delays, 0.5);
    s.txn_first_check_ms_max = check_delays.last().copied();

    // What the log holds.
    let mut by_id: BTreeMap<&str, Vec<&Read>> = BTreeMap::new();
    for r in reads {
        by_id.entry(r.message_id.as_str()).or_default().push(r);
    }
    s.txn_read = reads.len() as u64;
    let mut ids_of_n: HashMap<u64, u64> = HashMap::new();
    for (id, rs) in &by_id {
        let r = rs[0];
        *ids_of_n.entry(r.n).or_default() += 1;
        if rs.len() > 1 {
            s.txn_same_id_twice += 1;
            if ex.len() < EXAMPLES {
                let at: Vec<String> = rs
                    .iter()
                    .map(|r| format!("queue {} offset {}", r.queue, r.offset))
                    .collect();
                ex.push(format!("read twice: #{} id {id} at {}", r.n, at.join(", ")));
            }
        }
        if !by_n.contains_key(&r.n) {
            s.txn_unexpected += 1;
            if ex.len() < EXAMPLES {
                ex.push(format!(
                    "unexpected: #{} id {id} (queue {} offset {})",
                    r.n, r.queue, r.offset
                ));
            }
        }
    }
    s.txn_duplicates = ids_of_n.values().map(|c| c.saturating_sub(1)).sum();
    for t in &sends {
        let present = ids_of_n.contains_key(&t.n);
        let commit = rule(t.n) == TransactionResolution::Commit;
        let how = match &t.end {
            End::NoHalf => "half send not acknowledged".to_owned(),
            End::LeftUnknown => "left unknown".to_owned(),
            End::Ok { .. } => "ended Ok".to_owned(),
            End::Failed { error, .. } => format!("end failed: {error}"),
        };
        match (t.half, commit, present) {
            (Outcome::Ok, true, true) => s.txn_committed_present += 1,
            (Outcome::Ok, true, false) => {
                s.txn_committed_missing += 1;
                if ex.len() < EXAMPLES {
                    let pending = t.transaction_id.as_ref().is_some_and(|id| unresolved.contains(id));
                    ex.push(format!(
                        "committed missing: #{} transaction {} ({how}; {})",
                        t.n,
                        t.transaction_id.as_deref().unwrap_or("-"),
                        if pending { "still pending" } else { "not pending" }
                    ));
                }
            }
            (_, false, true) => {
                s.txn_rolled_back_present += 1;
                if ex.len() < EXAMPLES {
                    ex.push(format!(
                        "rolled back present: #{} transaction {} (half {:?}, {how})",
                        t.n,
                        t.transaction_id.as_deref().unwrap_or("-"),
                        t.half
                    ));
                }
            }
            (Outcome::Ok, false, false) => s.txn_rolled_back_absent += 1,
            (_, true, true) => s.txn_unacknowledged_then_committed += 1,
            (_, _, false) => {}
        }
        if t.half == Outcome::Ok {
            if commit {
                s.txn_commit_expected += 1;
            } else {
                s.txn_rollback_expected += 1;
            }
        }
    }
    s.txn_examples = ex;
    s
}

#[derive(Debug, Default, serde::Serialize)]
pub struct Summary {
    /// Transactions begun (half sends attempted).
    pub txn_sent: u64,
    pub txn_half_acknowledged: u64,
    pub txn_half_failed: u64,
    /// Half sends whose outcome is unknown (maybe stored; settled by the checker if so).
    pub txn_half_unknown: u64,
    /// Acknowledged half messages the rule commits / rolls back.
    pub txn_commit_expected: u64,
    pub txn_rollback_expected: u64,
    /// Left to the check-backs on purpose (every fifth).
    pub txn_left_unknown: u64,
    /// EndTransaction answered Ok (of them, `already ended`: a retry, or a check-back answer first).
    pub txn_ended_ok: u64,
    pub txn_end_already_ended: u64,
    /// EndTransaction failed with an unknown outcome / was refused; the checks settle them.
    pub txn_end_failed_ambiguous: u64,
    pub txn_end_failed: u64,
    /// Check-backs received (all runs), distinct transactions checked, most checks of one.
    pub txn_checks: u64,
    pub txn_checked_transactions: u64,
    pub txn_max_check_times: u32,
    /// Check-backs of a transaction whose EndTransaction had already returned Ok.
    pub txn_checks_after_end: u64,
    /// Of those left unknown, never checked (yet resolved or still pending).
    pub txn_left_unknown_never_checked: u64,
    /// From a left-unknown half send's acknowledgement to its first check-back.
    pub txn_first_check_ms_median: Option<u64>,
    pub txn_first_check_ms_max: Option<u64>,
    /// Messages of this run read from the topic.
    pub txn_read: u64,
    /// Acknowledged, committed by the rule, and read.
    pub txn_committed_present: u64,
    /// Acknowledged, committed by the rule, and never read: failure.
    pub txn_committed_missing: u64,
    /// Rolled back by the rule, yet read (acknowledged or not): failure.
    pub txn_rolled_back_present: u64,
    pub txn_rolled_back_absent: u64,
    /// Half sends not acknowledged whose message was stored and committed (by the checker).
    pub txn_unacknowledged_then_committed: u64,
    /// Extra copies of a number under other message ids (a half send stored twice).
    pub txn_duplicates: u64,
    /// One message id read more than once (a commit applied twice): failure.
    pub txn_same_id_twice: u64,
    /// Read, but never sent by this run: failure.
    pub txn_unexpected: u64,
    /// Transactions of the producer group still pending after the bounded wait.
    pub txn_unresolved: u64,
    pub txn_resolve_wait_ms: u64,
    /// The broker groups' totals over the run (all producer groups).
    pub txn_broker_committed: Option<u64>,
    pub txn_broker_rolled_back: Option<u64>,
    pub txn_broker_rolled_back_unresolved: Option<u64>,
    pub txn_read_error: Option<String>,
    /// Messages and check-backs of earlier runs, skipped.
    pub txn_foreign: u64,
    pub txn_examples: Vec<String>,
}

impl Summary {
    /// Whether nothing that must not happen happened.
    pub fn passed(&self) -> bool {
        self.txn_committed_missing == 0
            && self.txn_rolled_back_present == 0
            && self.txn_same_id_twice == 0
            && self.txn_unexpected == 0
    }

    pub fn print(&self) {
        let ms = |v: Option<u64>| v.map_or("-".to_owned(), |v| v.to_string());
        println!(
            "| txns sent | half acked / failed / unknown | left unknown | ended ok | end failed (ambiguous) | checks (txns, max per txn) | first check median / max ms | unresolved | resolve wait ms |"
        );
        println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- |");
        println!(
            "| {} | {} / {} / {} | {} | {} | {} ({}) | {} ({}, {}) | {} / {} | {} | {} |",
            self.txn_sent,
            self.txn_half_acknowledged,
            self.txn_half_failed,
            self.txn_half_unknown,
            self.txn_left_unknown,
            self.txn_ended_ok,
            self.txn_end_failed + self.txn_end_failed_ambiguous,
            self.txn_end_failed_ambiguous,
            self.txn_checks,
            self.txn_checked_transactions,
            self.txn_max_check_times,
            ms(self.txn_first_check_ms_median),
            ms(self.txn_first_check_ms_max),
            self.txn_unresolved,
            self.txn_resolve_wait_ms,
        );
        println!();
        println!(
            "| commit expected | committed present | committed MISSING | rollback expected | rolled back PRESENT | unacked then committed | duplicates | read twice | unexpected | broker committed / rolled back (unresolved) |"
        );
        println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |");
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} / {} ({}) |",
            self.txn_commit_expected,
            self.txn_committed_present,
            self.txn_committed_missing,
            self.txn_rollback_expected,
            self.txn_rolled_back_present,
            self.txn_unacknowledged_then_committed,
            self.txn_duplicates,
            self.txn_same_id_twice,
            self.txn_unexpected,
            ms(self.txn_broker_committed),
            ms(self.txn_broker_rolled_back),
            ms(self.txn_broker_rolled_back_unresolved),
        );
        if let Some(e) = &self.txn_read_error {
            println!("transactions: the topic was not read completely: {e}");
        }
        for ex in &self.txn_examples {
            println!("transactions: {ex}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sent(n: u64, half: Outcome, end: End) -> TxnSend {
        TxnSend {
            n,
            half,
            transaction_id: (half == Outcome::Ok).then(|| format!("T{n}")),
            half_us: n * 1_000_000,
            end,
            end_us: Some(n * 1_000_000 + 10),
        }
    }

    fn read(n: u64, id: &str, offset: u64) -> Read {
        Read {
            n,
            message_id: id.into(),
            queue: 0,
            offset,
        }
    }

    #[test]
    fn the_rule_commits_even_numbers_and_leaves_every_fifth_unknown() {
        assert_eq!(rule(0), TransactionResolution::Commit);
        assert_eq!(rule(7), TransactionResolution::Rollback);
        assert!(left_unknown(10) && !left_unknown(11));
    }

    #[test]
    fn missing_commits_present_rollbacks_and_duplicates_are_told_apart() {
        let st = State::new("r".into());
        let ok = End::Ok { already_ended: false };
        let ambiguous = End::Failed {
            outcome: Outcome::Unknown,
            error: "timeout".into(),
        };
        *lock(&st.sends) = vec![
            sent(0, Outcome::Ok, End::LeftUnknown), // commit, present
            sent(1, Outcome::Ok, ok.clone()),       // rollback, absent
            sent(2, Outcome::Ok, ok.clone()),       // commit, missing: failure
            sent(3, Outcome::Ok, ambiguous),        // rollback, present: failure
            sent(4, Outcome::Unknown, End::NoHalf), // commit, present: fine
            sent(5, Outcome::Unknown, End::NoHalf), // rollback, present: failure
            sent(6, Outcome::Ok, ok.clone()),       // commit, stored twice: a duplicate
            sent(8, Outcome::Ok, ok),               // commit, one id read twice: failure
        ];
        let reads = vec![
            read(0, "a", 0),
            read(3, "b", 1),
            read(4, "c", 2),
            read(5, "d", 3),
            read(6, "e", 4),
            read(6, "f", 5),
            read(8, "g", 6),
            read(8, "g", 7),
            read(99, "z", 8),
        ];
        let s = check(&st, &reads, &[]);
        assert_eq!(s.txn_committed_present, 3, "{s:?}");
        assert_eq!(s.txn_committed_missing, 1, "{s:?}");
        assert_eq!(s.txn_rolled_back_present, 2, "{s:?}");
        assert_eq!(s.txn_rolled_back_absent, 1, "{s:?}");
        assert_eq!(s.txn_unacknowledged_then_committed, 1, "{s:?}");
        assert_eq!((s.txn_duplicates, s.txn_same_id_twice, s.txn_unexpected), (1, 1, 1));
        assert_eq!((s.txn_commit_expected, s.txn_rollback_expected), (4, 2));
        assert_eq!(s.txn_end_failed_ambiguous, 1);
        assert!(!s.passed());
    }

    #[test]
    fn a_clean_history_passes() {
        let st = State::new("r".into());
        *lock(&st.sends) = vec![
            sent(0, Outcome::Ok, End::LeftUnknown),
            sent(1, Outcome::Ok, End::Ok { already_ended: false }),
        ];
        *lock(&st.checks) = vec![CheckSeen {
            n: Some(0),
            transaction_id: "T0".into(),
            check_times: 1,
            at_us: 2_000_000,
        }];
        let s = check(&st, &[read(0, "a", 0)], &[]);
        assert!(s.passed(), "{s:?}");
        assert_eq!(s.txn_first_check_ms_median, Some(2_000));
        assert_eq!(s.txn_left_unknown_never_checked, 0);
    }
}
