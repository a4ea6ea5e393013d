//! PushConsumer: consumer groups as RocketMQ users know them. Subscribe to a topic
//! with a filter (tags or SQL92) and a callback; the consumer finds its queues,
//! long-polls them, calls the callback (concurrently on a pool of workers, or
//! orderly: one message at a time per queue) and keeps the group's offsets.
//!
//! * Clustering (default): each broker group's leader assigns its queues among the
//!   group's live members (see `ConsumerService` in `proto/`). This module runs the
//!   member's side: heartbeats every second carrying each held queue's consumed
//!   offset (the leader commits them through Raft), starting and stopping queue
//!   workers as the assignment changes, and releasing a revoked queue only after
//!   its in-flight messages are done, reporting the final offset. A member that
//!   cannot reach a group's leader for the session timeout stops consuming that
//!   group's queues: by then the leader may have given them to someone else.
//!   A clustering member also consumes the group's retry topic `%RETRY%<group>`
//!   ([`retry_topic`]) the same way, with the same callback, as RocketMQ
//!   subscribes to it automatically. That topic exists on a broker group only once
//!   a retry stored there falls due; until then the member keeps trying to
//!   subscribe, quietly (one INFO line every few minutes, DEBUG otherwise).
//! * Broadcasting: every member consumes every queue; offsets are kept in a local
//!   file (`<offset_dir>/<group>@<topic>.json`, written atomically every second and
//!   at shutdown), as RocketMQ does. Broadcasting members do not heartbeat, so the
//!   brokers do not list them.
//!
//! The committed offset of a queue is its lowest message not yet finished (every
//! message below it was consumed), so a crash or rebalance redelivers what was in
//! flight (at-least-once), and never skips.
//!
//! Failed consumption (`ConsumeResult::RetryLater`), as in RocketMQ:
//! * Clustering, concurrent: the message is sent back (`SendBack`, RocketMQ's
//!   consumerSendMsgBack) to the leader of the broker group that stored it, which
//!   stores it for the group in `%RETRY%<group>`, due after the group's backoff
//!   for its reconsume count (10 s, 30 s, 1 min, ... by default; set per group
//!   with `UpdateConsumerGroup`), or, past the group's `max_reconsume_times`
//!   (default 16), in the dead-letter topic `%DLQ%<group>` ([`dlq_topic`]). Once
//!   the broker accepted it the message counts as consumed and the queue's offset
//!   moves past it; it comes back through the retry topic with
//!   `reconsume_times` + 1, the original topic in `message.topic` and the
//!   original message id. Counted in [`ConsumerStats::sent_back`] or
//!   [`ConsumerStats::dead_lettered`]. A send-back whose answer was lost may have
//!   been stored anyway, so a retry can come twice (at-least-once).
//!   If the send-back fails (after the client's leader-following retries, within
//!   `send_deadline`), the message stays pending (its queue's committed offset
//!   stays below it) and this member calls the callback again after
//!   `retry_delay`, 2 x `retry_delay`, ... (capped at 10 x), sending back again
//!   on each failure. Only when the callback and every send-back have failed
//!   `max_retries` times is the message given up: logged at WARN and counted in
//!   [`ConsumerStats::skipped`].
//! * Clustering, orderly: the queue waits for the message. This member calls the
//!   callback again after `retry_delay`, 2 x `retry_delay`, ... (capped at 10 x),
//!   `max_retries` times (default 16); if it still fails, the message goes to the
//!   dead-letter topic (a send-back whose `reconsume_times` is the larger of the
//!   message's reconsume count plus the local attempts and the group's
//!   `max_reconsume_times`, read with `GetConsumerGroup`, so the broker
//!   dead-letters it rather than scheduling a retry that would break the order),
//!   and the queue moves on. While that send-back fails with an error retrying may
//!   fix (no leader, unreachable) the queue keeps waiting and it is sent again;
//!   an error it cannot fix (e.g. the message is no longer retained) gives the
//!   message up (WARN, [`ConsumerStats::skipped`]).
//! * Broadcasting (either mode): RocketMQ never sends back in broadcasting, since
//!   a retry topic is shared by the whole group. This member calls the callback
//!   again as above, up to `max_retries` times, then gives the message up (WARN,
//!   [`ConsumerStats::skipped`]). In orderly mode the queue waits meanwhile.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use raftmq_proto::v1 as pb;
use raftmq_proto::v1::consumer_service_client::ConsumerServiceClient;
use tokio::sync::{Notify, Semaphore};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::consumer::{Filter, PullConsumer};
use crate::error::Error;
use crate::leader::{Attempt, Followers, Spec, Target, follow};
use crate::route::{Core, TopicRoute};

mod retry;

/// What the callback did with a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConsumeResult {
    Success,
    /// Deliver it again later (see the module docs).
    RetryLater,
}

/// How a consumer group shares the topic among its members.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MessageModel {
    #[default]
    Clustering,
    Broadcasting,
}

/// Where a group starts in a queue it has never committed an offset for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StartFrom {
    First,
    /// RocketMQ's default: only messages stored from now on.
    #[default]
    Last,
    /// The first message stored at or after this time (ms since the epoch).
    Timestamp(u64),
}

/// How the callback is called.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConsumeMode {
    /// Up to `workers` callbacks at once, across all queues; messages of one
    /// queue may finish out of order.
    Concurrent { workers: usize },
    /// One queue at a time per queue worker, in queue order: what per-key order
    /// needs (send with the same sharding key to the same queue).
    Orderly,
}

/// Counters a running consumer keeps; read them with [`PushConsumer::stats`].
#[derive(Debug, Default)]
pub struct ConsumerStats {
    /// Callbacks that returned `Success`.
    pub delivered: AtomicU64,
    /// `RetryLater` answers.
    pub retried: AtomicU64,
    /// Failed messages the brokers stored in the group's retry topic (clustering).
    pub sent_back: AtomicU64,
    /// Failed messages the brokers stored in the group's dead-letter topic
    /// (clustering: past the group's `max_reconsume_times`, or orderly after
    /// `max_retries`).
    pub dead_lettered: AtomicU64,
    /// Messages given up on (see the module docs: broadcasting after
    /// `max_retries`; clustering only when sending back kept failing too).
    pub skipped: AtomicU64,
    /// Queue assignments that changed (started or stopped workers).
    pub rebalances: AtomicU64,
}

/// The brokers' default session timeout, assumed until a leader's answer says.
const DEFAULT_SESSION_TIMEOUT: Duration = Duration::from_secs(5);

/// The retry topic of a consumer group: `%RETRY%<group>`.
pub fn retry_topic(group: &str) -> String {
    format!("%RETRY%{group}")
}

/// The dead-letter topic of a consumer group: `%DLQ%<group>`.
pub fn dlq_topic(group: &str) -> String {
    format!("%DLQ%{group}")
}

type Listener = Arc<dyn Fn(pb::PulledMessage) -> BoxFuture<'static, ConsumeResult> + Send + Sync>;

/// Settings of a [`PushConsumer`]; made by `Client::push_consumer`.
#[derive(Clone)]
pub struct PushConsumerBuilder {
    core: Arc<Core>,
    group: String,
    topic: String,
    filter: Filter,
    model: MessageModel,
    start_from: StartFrom,
    mode: ConsumeMode,
    pull_batch: u32,
    pull_wait: Duration,
    max_retries: u32,
    retry_delay: Duration,
    offset_dir: Option<PathBuf>,
    client_id: String,
}

impl PushConsumerBuilder {
    pub(crate) fn new(core: Arc<Core>, group: &str, topic: &str) -> PushConsumerBuilder {
        PushConsumerBuilder {
            core,
            group: group.to_owned(),
            topic: topic.to_owned(),
            filter: Filter::all(),
            model: MessageModel::Clustering,
            start_from: StartFrom::Last,
            mode: ConsumeMode::Concurrent { workers: 20 },
            pull_batch: 32,
            pull_wait: Duration::from_secs(5),
            max_retries: 16,
            retry_delay: Duration::from_secs(1),
            offset_dir: None,
            client_id: default_client_id(),
        }
    }

    /// `"*"` (default) or `"TagA || TagB"`; filtered on the broker. Same as
    /// `filter(Filter::Tag(expr))`; replaces an earlier [`Self::filter`].
    pub fn tag_expression(mut self, expr: &str) -> Self {
        self.filter = Filter::Tag(expr.to_owned());
        self
    }

    /// Which messages of the topic this member wants: a tag expression or a SQL92
    /// one (`Filter::Sql92("region = 'eu' AND amount > 100".into())`), evaluated
    /// by the brokers on every pull and shown by the group's description. Default:
    /// every message. The group's retry topic is always read unfiltered (only
    /// messages that matched were sent back).
    pub fn filter(mut self, filter: Filter) -> Self {
        self.filter = filter;
        self
    }

    pub fn model(mut self, model: MessageModel) -> Self {
        self.model = model;
        self
    }

    pub fn start_from(mut self, from: StartFrom) -> Self {
        self.start_from = from;
        self
    }

    /// Default: concurrent with 20 workers (RocketMQ's `consumeThreadMin`).
    pub fn mode(mut self, mode: ConsumeMode) -> Self {
        self.mode = mode;
        self
    }

    /// Messages per pull (default 32, RocketMQ's `pullBatchSize`).
    pub fn pull_batch(mut self, n: u32) -> Self {
        self.pull_batch = n;
        self
    }

    /// Local callback retries of a failed message (default 16): before an orderly
    /// clustering member dead-letters it, or a broadcasting member (or a
    /// clustering one that cannot send it back) gives it up. See the module docs.
    pub fn max_retries(mut self, n: u32) -> Self {
        self.max_retries = n;
        self
    }

    /// First retry delay (default 1 s); each retry waits one more of it, up to 10.
    pub fn retry_delay(mut self, d: Duration) -> Self {
        self.retry_delay = d;
        self
    }

    /// Where a broadcasting consumer keeps its offsets (default: the working
    /// directory). Ignored in clustering mode.
    pub fn offset_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.offset_dir = Some(dir.into());
        self
    }

    /// This member's id (default `hostname@pid@random`); must be unique in the group.
    pub fn client_id(mut self, id: &str) -> Self {
        id.clone_into(&mut self.client_id);
        self
    }

    /// Starts consuming, calling `listener` for each message. The callback's
    /// future must finish for the message's offset to be committed.
    pub fn start<F, Fut>(self, listener: F) -> Result<PushConsumer, Error>
    where
        F: Fn(pb::PulledMessage) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = ConsumeResult> + Send + 'static,
    {
        let bad = |key: &str, value: String, reason: &str| Error::Config {
            key: key.into(),
            value,
            reason: reason.into(),
        };
        if self.group.is_empty() {
            return Err(bad("group", String::new(), "a consumer group name is required"));
        }
        if self.topic.is_empty() {
            return Err(bad("topic", String::new(), "a topic is required"));
        }
        if let ConsumeMode::Concurrent { workers: 0 } = self.mode {
            return Err(bad("workers", "0".into(), "at least one worker is needed"));
        }
        if self.pull_batch == 0 {
            return Err(bad("pull_batch", "0".into(), "must be positive"));
        }
        let offsets = match self.model {
            MessageModel::Broadcasting => {
                let dir = self.offset_dir.clone().unwrap_or_else(|| PathBuf::from("."));
                Some(LocalOffsets::open(&dir, &self.group, &self.topic)?)
            }
            MessageModel::Clustering => None,
        };
        let listener: Listener = Arc::new(move |m| Box::pin(listener(m)));
        let workers = match self.mode {
            ConsumeMode::Concurrent { workers } => workers,
            ConsumeMode::Orderly => 0,
        };
        let mut subs = vec![Arc::new(Sub {
            topic: self.topic.clone(),
            filter: self.filter.clone(),
            start_from: self.start_from,
            retry: false,
        })];
        if self.model == MessageModel::Clustering {
            subs.push(Arc::new(Sub {
                topic: retry_topic(&self.group),
                filter: Filter::all(),
                // Only this group's failed messages are there: all of them are due.
                start_from: StartFrom::First,
                retry: true,
            }));
        }
        let ctx = Arc::new(Ctx {
            pull: PullConsumer::from_core(self.core.clone()).for_member(&self.group, &self.client_id),
            settings: self,
            subs,
            listener,
            permits: Arc::new(Semaphore::new(workers)),
            stats: Arc::new(ConsumerStats::default()),
            wake: Notify::new(),
            offsets,
            assigned: Mutex::new(BTreeSet::new()),
        });
        let stop = CancellationToken::new();
        let task = tokio::spawn(run(ctx.clone(), stop.clone()));
        Ok(PushConsumer { ctx, stop, task })
    }
}

pub(crate) fn default_client_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "localhost".into());
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    // Host names may carry characters the broker refuses in ids; keep the safe ones.
    let host: String = host.chars().filter(|c| c.is_ascii_graphic()).take(200).collect();
    format!("{host}@{}@{nanos:08x}", std::process::id())
}

/// A running consumer. Call [`PushConsumer::shutdown`] to stop it cleanly; a
/// consumer dropped without it stops too, without committing its last offsets.
pub struct PushConsumer {
    ctx: Arc<Ctx>,
    stop: CancellationToken,
    task: JoinHandle<Result<(), Error>>,
}

impl PushConsumer {
    pub fn client_id(&self) -> &str {
        &self.ctx.settings.client_id
    }

    pub fn stats(&self) -> &ConsumerStats {
        &self.ctx.stats
    }

    /// The queues of the subscribed topic this member consumes now, as
    /// `(broker group, queue id)`.
    pub fn assigned_queues(&self) -> Vec<(String, u32)> {
        let topic = &self.ctx.settings.topic;
        lock(&self.ctx.assigned)
            .iter()
            .filter(|(t, _, _)| t == topic)
            .map(|(_, g, q)| (g.clone(), *q))
            .collect()
    }

    /// Every queue this member consumes now, the group's retry topic's included,
    /// as `(topic, broker group, queue id)`.
    pub fn held_queues(&self) -> Vec<(String, String, u32)> {
        lock(&self.ctx.assigned).iter().cloned().collect()
    }

    /// Stops pulling, waits for in-flight callbacks, commits the final offsets and
    /// leaves the group, so its queues move to other members at once.
    pub async fn shutdown(mut self) -> Result<(), Error> {
        self.stop.cancel();
        match (&mut self.task).await {
            Ok(r) => r,
            Err(e) => Err(Error::Protocol {
                endpoint: String::new(),
                reason: format!("consumer task failed: {e}"),
            }),
        }
    }
}

impl Drop for PushConsumer {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// One topic a member consumes: the subscribed one, or the group's retry topic.
struct Sub {
    topic: String,
    /// Stored once, so pulls do not build one each time.
    filter: Filter,
    start_from: StartFrom,
    /// The group's retry topic: absent until the first retry falls due, so its
    /// absence is expected and logged quietly.
    retry: bool,
}

struct Ctx {
    settings: PushConsumerBuilder,
    /// The subscribed topic first, then (clustering) the group's retry topic.
    subs: Vec<Arc<Sub>>,
    pull: PullConsumer,
    listener: Listener,
    /// Concurrent mode's worker pool (unused in orderly mode).
    permits: Arc<Semaphore>,
    stats: Arc<ConsumerStats>,
    /// A queue worker finished: heartbeat now to report its final offset.
    wake: Notify,
    offsets: Option<LocalOffsets>,
    /// `(topic, broker group, queue)` of every running queue worker.
    assigned: Mutex<BTreeSet<(String, String, u32)>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Which offsets of one queue are done: everything below `pulled_to` was pulled,
/// and of those, `pending` are not finished yet.
#[derive(Default)]
struct Progress {
    pulled_to: u64,
    pending: BTreeSet<u64>,
}

impl Progress {
    /// The offset to commit: every message below it is consumed.
    fn consumed(&self) -> u64 {
        self.pending.first().copied().unwrap_or(self.pulled_to)
    }
}

/// One running queue worker.
struct QueueWorker {
    stop: CancellationToken,
    progress: Arc<Mutex<Progress>>,
    task: JoinHandle<()>,
}

impl QueueWorker {
    fn start(ctx: &Arc<Ctx>, sub: &Arc<Sub>, group: &str, queue_id: u32, offset: u64) -> QueueWorker {
        let stop = CancellationToken::new();
        let progress = Arc::new(Mutex::new(Progress {
            pulled_to: offset,
            pending: BTreeSet::new(),
        }));
        let task = tokio::spawn(consume_queue(
            ctx.clone(),
            sub.clone(),
            group.to_owned(),
            queue_id,
            progress.clone(),
            stop.clone(),
        ));
        ctx.stats.rebalances.fetch_add(1, Ordering::Relaxed);
        lock(&ctx.assigned).insert((sub.topic.clone(), group.to_owned(), queue_id));
        QueueWorker { stop, progress, task }
    }

    fn consumed(&self) -> u64 {
        lock(&self.progress).consumed()
    }
}

/// Pulls one queue and hands its messages to the callback until stopped; then
/// waits for its in-flight callbacks before finishing, so `consumed()` is final.
async fn consume_queue(
    ctx: Arc<Ctx>,
    sub: Arc<Sub>,
    group: String,
    queue_id: u32,
    progress: Arc<Mutex<Progress>>,
    stop: CancellationToken,
) {
    let s = &ctx.settings;
    let mut in_flight = tokio::task::JoinSet::new();
    let mut failures = 0u32;
    let skip_before = match (s.model, sub.start_from) {
        (MessageModel::Broadcasting, StartFrom::Timestamp(ts)) => ts,
        _ => 0,
    };
    'pull: while !stop.is_cancelled() {
        let from = lock(&progress).pulled_to;
        let pulled = tokio::select! {
            r = ctx.pull.pull(&sub.topic, &group, queue_id, from, s.pull_batch, s.pull_wait, &sub.filter) => r,
            _ = stop.cancelled() => break,
        };
        // Reap finished callbacks so the set does not grow with the queue.
        while in_flight.try_join_next().is_some() {}
        let result = match pulled {
            Ok(r) => {
                failures = 0;
                r
            }
            Err(e) => {
                failures += 1;
                tracing::warn!(topic = %sub.topic, group = %group, queue_id, error = %e, "pull failed; retrying");
                let pause = Duration::from_millis(100 * u64::from(failures.min(20)));
                tokio::select! {
                    _ = tokio::time::sleep(pause) => continue,
                    _ = stop.cancelled() => break,
                }
            }
        };
        {
            let mut p = lock(&progress);
            p.pending.extend(result.messages.iter().map(|m| m.queue_offset));
            // Past filtered-out messages too; never backwards (a reset restarts the worker).
            p.pulled_to = p.pulled_to.max(result.next_offset);
        }
        for m in result.messages {
            let offset = m.queue_offset;
            if m.store_timestamp_ms < skip_before {
                lock(&progress).pending.remove(&offset);
                continue;
            }
            match s.mode {
                ConsumeMode::Orderly => {
                    if !retry::deliver(&ctx, &sub.topic, &group, m, &stop).await {
                        // Stopped while waiting to retry: the message stays pending.
                        break 'pull;
                    }
                    lock(&progress).pending.remove(&offset);
                }
                ConsumeMode::Concurrent { .. } => {
                    let permit = tokio::select! {
                        p = ctx.permits.clone().acquire_owned() => match p {
                            Ok(p) => p,
                            Err(_) => break 'pull,
                        },
                        // The rest of the batch stays pending and is redelivered
                        // to whoever consumes the queue next.
                        _ = stop.cancelled() => break 'pull,
                    };
                    let (ctx, sub, group) = (ctx.clone(), sub.clone(), group.clone());
                    let (progress, stop) = (progress.clone(), stop.clone());
                    in_flight.spawn(async move {
                        let _permit = permit;
                        if retry::deliver(&ctx, &sub.topic, &group, m, &stop).await {
                            lock(&progress).pending.remove(&offset);
                        }
                    });
                }
            }
        }
    }
    while in_flight.join_next().await.is_some() {}
    lock(&ctx.assigned).remove(&(sub.topic.clone(), group, queue_id));
    ctx.wake.notify_one();
}

/// The member's control loop: heartbeats (clustering) or queue discovery
/// (broadcasting), worker starts and stops, and the final commit at shutdown.
async fn run(ctx: Arc<Ctx>, stop: CancellationToken) -> Result<(), Error> {
    let mut members: Vec<Member> = ctx.subs.iter().map(|sub| Member::new(sub.clone())).collect();
    let mut interval = Duration::from_secs(1);
    while !stop.is_cancelled() {
        // Subscriptions (the topic and the retry topic) are served side by side,
        // for the same reason as a subscription's groups: a group without a
        // leader must not delay the heartbeats every other group expects.
        let rounds = members.iter_mut().map(|member| {
            let ctx = &ctx;
            async move {
                match ctx.settings.model {
                    MessageModel::Clustering => member.heartbeat_all(ctx, false).await,
                    MessageModel::Broadcasting => member.broadcast_round(ctx).await,
                }
            }
        });
        let settle = futures::future::join_all(rounds).await.into_iter().all(|s| s);
        if let Some(i) = members.iter().filter_map(|m| m.interval).min() {
            interval = i;
        }
        // Unsettled (a queue awaits release, or a release awaits reporting): look
        // again soon instead of a whole interval later.
        let wait = if settle {
            interval
        } else {
            (interval / 5).max(Duration::from_millis(20))
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = ctx.wake.notified() => {}
            _ = stop.cancelled() => {}
        }
    }
    // Shutdown: stop every worker, wait for in-flight callbacks, commit, leave.
    for member in &members {
        for w in member.workers.values() {
            w.stop.cancel();
        }
    }
    for member in &mut members {
        let stopping = std::mem::take(&mut member.workers)
            .into_iter()
            .chain(std::mem::take(&mut member.releasing));
        for (key, w) in stopping {
            let _ = w.task.await;
            member.released.insert(key, lock(&w.progress).consumed());
        }
    }
    let mut result = Ok(());
    for member in &mut members {
        let r = match ctx.settings.model {
            MessageModel::Clustering => {
                member.heartbeat_all(&ctx, true).await;
                match member.last_error.take() {
                    Some(e) if !member.released.is_empty() => Err(e),
                    _ => Ok(()),
                }
            }
            MessageModel::Broadcasting => {
                let offsets = ctx.offsets.as_ref().expect("broadcasting has an offset file");
                offsets.save(&member.released)
            }
        };
        if result.is_ok() {
            result = r;
        }
    }
    result
}

/// How often the absence of the group's retry topic is logged at INFO.
const QUIET_LOG_EVERY: Duration = Duration::from_secs(300);

/// The member's view of its queues of one topic.
struct Member {
    sub: Arc<Sub>,
    workers: HashMap<(String, u32), QueueWorker>,
    /// Revoked, stopping: still held until their workers finish.
    releasing: HashMap<(String, u32), QueueWorker>,
    /// Stopped, final offset not yet acknowledged by a heartbeat.
    released: BTreeMap<(String, u32), u64>,
    /// Last successful heartbeat per broker group.
    last_ok: HashMap<String, Instant>,
    interval: Option<Duration>,
    session_timeout: Option<Duration>,
    last_error: Option<Error>,
    /// When the retry topic's absence was last logged at INFO.
    quiet_logged: Option<Instant>,
}

/// The topic (or the broker group's copy of it) does not exist (yet): for the
/// group's retry topic, the normal state until a retry falls due there.
fn not_there_yet(e: &Error) -> bool {
    matches!(e, Error::NoRoute { .. } | Error::UnknownGroup { .. }) || e.code() == Some(tonic::Code::NotFound)
}

impl Member {
    fn new(sub: Arc<Sub>) -> Member {
        Member {
            sub,
            workers: HashMap::new(),
            releasing: HashMap::new(),
            released: BTreeMap::new(),
            last_ok: HashMap::new(),
            interval: None,
            session_timeout: None,
            last_error: None,
            quiet_logged: None,
        }
    }

    /// Logs a failure to reach the topic: at WARN, except the retry topic's
    /// expected absence, at INFO every [`QUIET_LOG_EVERY`] and DEBUG otherwise.
    fn log_failure(&mut self, broker_group: Option<&str>, e: &Error, what: &str) {
        let topic = &self.sub.topic;
        let group = broker_group.unwrap_or("");
        if self.sub.retry && not_there_yet(e) {
            if self.quiet_logged.is_none_or(|t| t.elapsed() >= QUIET_LOG_EVERY) {
                self.quiet_logged = Some(Instant::now());
                tracing::info!(%topic, broker_group = %group, error = %e,
                    "the group's retry topic is not there yet (it is made when a first retry falls due); \
                     subscribing to it as soon as it is");
            } else {
                tracing::debug!(%topic, broker_group = %group, error = %e, "retry topic still absent");
            }
        } else {
            tracing::warn!(%topic, broker_group = %group, error = %e, "{what}");
        }
    }

    /// Moves finished releasing workers to `released`.
    fn reap(&mut self) {
        let done: Vec<_> = self
            .releasing
            .iter()
            .filter(|(_, w)| w.task.is_finished())
            .map(|(k, _)| k.clone())
            .collect();
        for k in done {
            let w = self.releasing.remove(&k).expect("listed above");
            self.released.insert(k, w.consumed());
        }
    }

    fn release(&mut self, key: (String, u32)) {
        if let Some(w) = self.workers.remove(&key) {
            w.stop.cancel();
            self.releasing.insert(key, w);
        }
    }

    /// One heartbeat to every broker group of the topic; true when settled.
    async fn heartbeat_all(&mut self, ctx: &Arc<Ctx>, leaving: bool) -> bool {
        self.reap();
        let s = &ctx.settings;
        let sub = self.sub.clone();
        let route = match ctx.pull_core().route(&sub.topic).await {
            Ok(r) => r,
            Err(e) => {
                self.log_failure(None, &e, "no route for the consumer's topic");
                // The retry topic's absence is the normal state: settled.
                let settled = sub.retry && not_there_yet(&e) && self.workers.is_empty();
                self.last_error = Some(e);
                self.fence_silent_groups(&[]);
                return settled;
            }
        };
        let mut settled = true;
        let mut answered = Vec::new();
        // Every group is asked at once: one group without a leader holds its
        // heartbeat until the deadline, which must not delay the others' past
        // their session timeout (they would hand this member's queues away).
        let session_timeout = self.session_timeout.unwrap_or(DEFAULT_SESSION_TIMEOUT);
        let mut requests = Vec::with_capacity(route.groups.len());
        for g in &route.groups {
            let name = &g.broker_group;
            let mut queues: Vec<pb::HeldQueue> = Vec::new();
            for ((group, q), w) in self.workers.iter().chain(self.releasing.iter()) {
                if group == name {
                    queues.push(pb::HeldQueue {
                        queue_id: *q,
                        offset: w.consumed(),
                        held: !leaving,
                    });
                }
            }
            for ((group, q), offset) in &self.released {
                if group == name {
                    queues.push(pb::HeldQueue {
                        queue_id: *q,
                        offset: *offset,
                        held: false,
                    });
                }
            }
            let (filter_type, tag_expression) = sub.filter.to_wire();
            let req = pb::HeartbeatRequest {
                consumer_group: s.group.clone(),
                client_id: s.client_id.clone(),
                topic: sub.topic.clone(),
                tag_expression,
                filter_type,
                start_from: match sub.start_from {
                    StartFrom::First => pb::StartFrom::First,
                    StartFrom::Last => pb::StartFrom::Last,
                    StartFrom::Timestamp(_) => pb::StartFrom::Timestamp,
                } as i32,
                start_timestamp_ms: match sub.start_from {
                    StartFrom::Timestamp(t) => t,
                    _ => 0,
                },
                queues,
                leaving,
            };
            requests.push((name.clone(), req));
        }
        let topic = sub.topic.as_str();
        let answers = futures::future::join_all(
            requests
                .into_iter()
                .map(|(name, req)| async move { (heartbeat(ctx, topic, &name, req, session_timeout).await, name) }),
        )
        .await;
        for (answer, name) in answers {
            let name = &name;
            let resp = match answer {
                Ok(r) => r,
                Err(e) => {
                    self.log_failure(Some(name), &e, "consumer heartbeat failed");
                    let held_here = self.workers.keys().any(|(g, _)| g == name);
                    if !(sub.retry && not_there_yet(&e) && !held_here) {
                        settled = false;
                    }
                    self.last_error = Some(e);
                    continue;
                }
            };
            answered.push(name.clone());
            self.last_ok.insert(name.clone(), Instant::now());
            self.interval = Some(Duration::from_millis(u64::from(resp.heartbeat_interval_ms.max(20))));
            self.session_timeout = Some(Duration::from_millis(u64::from(resp.session_timeout_ms.max(100))));
            self.released.retain(|(group, _), _| group != name);
            if leaving {
                continue;
            }
            settled &= !resp.rebalancing;
            let assigned: BTreeMap<u32, &pb::AssignedQueue> = resp.assigned.iter().map(|a| (a.queue_id, a)).collect();
            let held: Vec<u32> = self
                .workers
                .keys()
                .filter(|(group, _)| group == name)
                .map(|(_, q)| *q)
                .collect();
            for q in held {
                if !assigned.contains_key(&q) {
                    tracing::info!(broker_group = %name, queue_id = q, "queue revoked; releasing it");
                    self.release((name.clone(), q));
                    settled = false;
                }
            }
            for (q, a) in assigned {
                let key = (name.clone(), q);
                if self.releasing.contains_key(&key) || self.released.contains_key(&key) {
                    // Still finishing the last holding of it (e.g. a reset): take it
                    // again once that is reported.
                    settled = false;
                    continue;
                }
                if a.reset && self.workers.contains_key(&key) {
                    tracing::info!(broker_group = %name, queue_id = q, offset = a.offset, "offset reset; restarting the queue");
                    let w = self.workers.remove(&key).expect("checked");
                    w.stop.cancel();
                    let _ = w.task.await;
                    self.workers
                        .insert(key.clone(), QueueWorker::start(ctx, &sub, name, q, a.offset));
                    continue;
                }
                if !self.workers.contains_key(&key) {
                    tracing::info!(topic = %sub.topic, broker_group = %name, queue_id = q, offset = a.offset, "queue assigned");
                    self.workers
                        .insert(key.clone(), QueueWorker::start(ctx, &sub, name, q, a.offset));
                }
            }
        }
        self.fence_silent_groups(&answered);
        settled && self.releasing.is_empty() && self.released.is_empty()
    }

    /// Stops consuming the queues of groups whose leader has not answered for the
    /// session timeout: it may have handed them to another member by now.
    fn fence_silent_groups(&mut self, answered: &[String]) {
        let timeout = self.session_timeout.unwrap_or(DEFAULT_SESSION_TIMEOUT);
        let silent: Vec<(String, u32)> = self
            .workers
            .keys()
            .filter(|(group, _)| {
                !answered.contains(group) && self.last_ok.get(group).is_none_or(|t| t.elapsed() >= timeout)
            })
            .cloned()
            .collect();
        for key in silent {
            tracing::warn!(broker_group = %key.0, queue_id = key.1, "no heartbeat answer within the session timeout; stopping the queue");
            self.release(key);
        }
    }

    /// Broadcasting: start a worker for every queue of every group in the route,
    /// and save the offsets. True (always settled).
    async fn broadcast_round(&mut self, ctx: &Arc<Ctx>) -> bool {
        let sub = self.sub.clone();
        let offsets = ctx.offsets.as_ref().expect("broadcasting has an offset file");
        match ctx.pull_core().route(&sub.topic).await {
            Ok(route) => {
                for g in &route.groups {
                    for q in 0..g.queues {
                        let key = (g.broker_group.clone(), q);
                        if self.workers.contains_key(&key) {
                            continue;
                        }
                        let start = match offsets.get(&key) {
                            Some(o) => o,
                            None => match sub.start_from {
                                // Pull clamps 0 up to the queue's first offset.
                                StartFrom::First | StartFrom::Timestamp(_) => 0,
                                StartFrom::Last => match ctx
                                    .pull
                                    .pull(
                                        &sub.topic,
                                        &g.broker_group,
                                        q,
                                        u64::MAX,
                                        1,
                                        Duration::ZERO,
                                        &Filter::all(),
                                    )
                                    .await
                                {
                                    Ok(r) => r.max_offset,
                                    Err(e) => {
                                        tracing::warn!(error = %e, "cannot read the queue's end");
                                        continue;
                                    }
                                },
                            },
                        };
                        self.workers
                            .insert(key.clone(), QueueWorker::start(ctx, &sub, &g.broker_group, q, start));
                    }
                }
            }
            Err(e) => tracing::warn!(topic = %sub.topic, error = %e, "no route for the consumer's topic"),
        }
        let now: BTreeMap<(String, u32), u64> = self.workers.iter().map(|(k, w)| (k.clone(), w.consumed())).collect();
        if let Err(e) = offsets.save(&now) {
            tracing::warn!(error = %e, "cannot save broadcasting offsets");
        }
        self.interval = Some(Duration::from_secs(1));
        true
    }
}

impl Ctx {
    fn pull_core(&self) -> &Arc<Core> {
        self.pull.core()
    }
}

/// One heartbeat to a group's leader, with the `leader` module's policy (a
/// follower refuses a heartbeat naming the leader). The deadline stays well inside
/// the session timeout, so one hung leader cannot hold up the heartbeats to the
/// topic's other groups until this member fences itself from them.
async fn heartbeat(
    ctx: &Ctx,
    topic: &str,
    group: &str,
    req: pb::HeartbeatRequest,
    session_timeout: Duration,
) -> Result<pb::HeartbeatResponse, Error> {
    let core = ctx.pull_core();
    let spec = Spec {
        label: topic,
        deadline: core.config.send_deadline.min(session_timeout / 2),
        long_poll: Duration::ZERO,
        followers: Followers::Redirect,
    };
    let target = Target::Topic {
        topic,
        pick: pick_group(topic, group),
    };
    let served = follow(core, spec, target, |a: Attempt<()>| {
        let req = req.clone();
        async move { ConsumerServiceClient::new(a.channel).heartbeat(req).await }
    })
    .await?;
    Ok(served.value)
}

/// Picks broker group `group` in a route of `topic`.
fn pick_group<'a>(topic: &'a str, group: &'a str) -> impl Fn(&TopicRoute) -> Result<(pb::GroupRoute, ()), Error> + 'a {
    move |route: &TopicRoute| match route.group(group) {
        Some(g) => Ok((g.clone(), ())),
        None => Err(Error::UnknownGroup {
            topic: topic.into(),
            group: group.into(),
        }),
    }
}

/// A broadcasting member's offsets: `{"<broker group>/<queue>": offset}` in one
/// JSON file, replaced atomically (write, fsync, rename).
struct LocalOffsets {
    path: PathBuf,
    loaded: BTreeMap<(String, u32), u64>,
}

impl LocalOffsets {
    fn open(dir: &Path, group: &str, topic: &str) -> Result<LocalOffsets, Error> {
        let path = dir.join(format!("{group}@{topic}.json"));
        let err = |reason: String| Error::OffsetStore {
            path: path.display().to_string(),
            reason,
        };
        std::fs::create_dir_all(dir).map_err(|e| err(format!("creating its directory: {e}")))?;
        let loaded = match std::fs::read(&path) {
            Ok(bytes) => {
                let map: BTreeMap<String, u64> =
                    serde_json::from_slice(&bytes).map_err(|e| err(format!("not an offset map: {e}")))?;
                let mut out = BTreeMap::new();
                for (k, v) in map {
                    let (g, q) = k
                        .rsplit_once('/')
                        .and_then(|(g, q)| q.parse::<u32>().ok().map(|q| (g.to_owned(), q)))
                        .ok_or_else(|| err(format!("key {k:?} is not <broker group>/<queue>")))?;
                    out.insert((g, q), v);
                }
                out
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => return Err(err(e.to_string())),
        };
        Ok(LocalOffsets { path, loaded })
    }

    fn get(&self, key: &(String, u32)) -> Option<u64> {
        self.loaded.get(key).copied()
    }

    fn save(&self, offsets: &BTreeMap<(String, u32), u64>) -> Result<(), Error> {
        use std::io::Write;
        let err = |reason: String| Error::OffsetStore {
            path: self.path.display().to_string(),
            reason,
        };
        // Queues not running now (e.g. before their first round) keep their old offset.
        let mut all: BTreeMap<String, u64> = self.loaded.iter().map(|((g, q), o)| (format!("{g}/{q}"), *o)).collect();
        all.extend(offsets.iter().map(|((g, q), o)| (format!("{g}/{q}"), *o)));
        let json = serde_json::to_vec_pretty(&all).map_err(|e| err(e.to_string()))?;
        let tmp = self.path.with_extension("json.tmp");
        let mut f = std::fs::File::create(&tmp).map_err(|e| err(format!("creating {}: {e}", tmp.display())))?;
        f.write_all(&json)
            .and_then(|()| f.sync_all())
            .map_err(|e| err(format!("writing {}: {e}", tmp.display())))?;
        std::fs::rename(&tmp, &self.path).map_err(|e| err(format!("replacing it: {e}")))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consumed_offset_is_the_lowest_unfinished_message() {
        let mut p = Progress {
            pulled_to: 10,
            pending: BTreeSet::new(),
        };
        assert_eq!(p.consumed(), 10);
        p.pending.extend([4, 6, 9]);
        assert_eq!(p.consumed(), 4);
        p.pending.remove(&4);
        assert_eq!(p.consumed(), 6);
    }

    #[test]
    fn local_offsets_survive_a_reopen_and_refuse_garbage() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalOffsets::open(dir.path(), "g", "t").unwrap();
        assert_eq!(store.get(&("broker-a".into(), 1)), None);
        let mut now = BTreeMap::new();
        now.insert(("broker-a".to_owned(), 1), 42);
        store.save(&now).unwrap();
        let again = LocalOffsets::open(dir.path(), "g", "t").unwrap();
        assert_eq!(again.get(&("broker-a".into(), 1)), Some(42));
        std::fs::write(dir.path().join("g@t.json"), b"{\"nonsense\": 1}").unwrap();
        let e = LocalOffsets::open(dir.path(), "g", "t").err().unwrap().to_string();
        assert!(e.contains("nonsense"), "{e}");
    }
}
