//! PushConsumer: consumer groups as RocketMQ users know them. Subscribe to a topic
//! with a tag expression and a callback; the consumer finds its queues, long-polls
//! them, calls the callback (concurrently on a pool of workers, or orderly: one
//! message at a time per queue) and keeps the group's offsets.
//!
//! * Clustering (default): each broker group's leader assigns its queues among the
//!   group's live members (see `ConsumerService` in `proto/`). This module runs the
//!   member's side: heartbeats every second carrying each held queue's consumed
//!   offset (the leader commits them through Raft), starting and stopping queue
//!   workers as the assignment changes, and releasing a revoked queue only after
//!   its in-flight messages are done, reporting the final offset. A member that
//!   cannot reach a group's leader for the session timeout stops consuming that
//!   group's queues: by then the leader may have given them to someone else.
//! * Broadcasting: every member consumes every queue; offsets are kept in a local
//!   file (`<offset_dir>/<group>@<topic>.json`, written atomically every second and
//!   at shutdown), as RocketMQ does. Broadcasting members do not heartbeat, so the
//!   brokers do not list them.
//!
//! The committed offset of a queue is its lowest message not yet finished (every
//! message below it was consumed), so a crash or rebalance redelivers what was in
//! flight (at-least-once), and never skips.
//!
//! Failed consumption (`ConsumeResult::RetryLater`): this member calls the callback
//! again for that message after 1 s, 2 s, ... (capped at 10 s), up to `max_retries`
//! times (default 16), then logs it at WARN and counts it in
//! [`ConsumerStats::skipped`]. While it waits the queue's committed offset stays
//! below it, so a crash or rebalance redelivers it. In orderly mode the queue waits
//! for that message. A retry topic and dead-letter queue come later.

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

use crate::consumer::PullConsumer;
use crate::error::Error;
use crate::leader::{Attempt, Followers, Spec, Target, follow};
use crate::route::{Core, TopicRoute};

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
    /// Messages given up on after `max_retries`.
    pub skipped: AtomicU64,
    /// Queue assignments that changed (started or stopped workers).
    pub rebalances: AtomicU64,
}

/// The brokers' default session timeout, assumed until a leader's answer says.
const DEFAULT_SESSION_TIMEOUT: Duration = Duration::from_secs(5);

type Listener = Arc<dyn Fn(pb::PulledMessage) -> BoxFuture<'static, ConsumeResult> + Send + Sync>;

/// Settings of a [`PushConsumer`]; made by `Client::push_consumer`.
#[derive(Clone)]
pub struct PushConsumerBuilder {
    core: Arc<Core>,
    group: String,
    topic: String,
    tag_expression: String,
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
            tag_expression: "*".into(),
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

    /// `"*"` (default) or `"TagA || TagB"`; filtered on the broker.
    pub fn tag_expression(mut self, expr: &str) -> Self {
        expr.clone_into(&mut self.tag_expression);
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

    /// Callback retries before a message is skipped (default 16).
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
        let ctx = Arc::new(Ctx {
            pull: PullConsumer::from_core(self.core.clone()),
            settings: self,
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

fn default_client_id() -> String {
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

    /// The queues this member consumes now, as `(broker group, queue id)`.
    pub fn assigned_queues(&self) -> Vec<(String, u32)> {
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

struct Ctx {
    settings: PushConsumerBuilder,
    pull: PullConsumer,
    listener: Listener,
    /// Concurrent mode's worker pool (unused in orderly mode).
    permits: Arc<Semaphore>,
    stats: Arc<ConsumerStats>,
    /// A queue worker finished: heartbeat now to report its final offset.
    wake: Notify,
    offsets: Option<LocalOffsets>,
    assigned: Mutex<BTreeSet<(String, u32)>>,
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
    fn start(ctx: &Arc<Ctx>, group: &str, queue_id: u32, offset: u64) -> QueueWorker {
        let stop = CancellationToken::new();
        let progress = Arc::new(Mutex::new(Progress {
            pulled_to: offset,
            pending: BTreeSet::new(),
        }));
        let task = tokio::spawn(consume_queue(
            ctx.clone(),
            group.to_owned(),
            queue_id,
            progress.clone(),
            stop.clone(),
        ));
        ctx.stats.rebalances.fetch_add(1, Ordering::Relaxed);
        lock(&ctx.assigned).insert((group.to_owned(), queue_id));
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
    group: String,
    queue_id: u32,
    progress: Arc<Mutex<Progress>>,
    stop: CancellationToken,
) {
    let s = &ctx.settings;
    let mut in_flight = tokio::task::JoinSet::new();
    let mut failures = 0u32;
    let skip_before = match (s.model, s.start_from) {
        (MessageModel::Broadcasting, StartFrom::Timestamp(ts)) => ts,
        _ => 0,
    };
    'pull: while !stop.is_cancelled() {
        let from = lock(&progress).pulled_to;
        let filter = crate::consumer::Filter::Tag(s.tag_expression.clone());
        let pulled = tokio::select! {
            r = ctx.pull.pull(&s.topic, &group, queue_id, from, s.pull_batch, s.pull_wait, &filter) => r,
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
                tracing::warn!(topic = %s.topic, group = %group, queue_id, error = %e, "pull failed; retrying");
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
                    if !deliver(&ctx, m, &stop).await {
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
                    let (ctx, progress, stop) = (ctx.clone(), progress.clone(), stop.clone());
                    in_flight.spawn(async move {
                        let _permit = permit;
                        if deliver(&ctx, m, &stop).await {
                            lock(&progress).pending.remove(&offset);
                        }
                    });
                }
            }
        }
    }
    while in_flight.join_next().await.is_some() {}
    lock(&ctx.assigned).remove(&(group, queue_id));
    ctx.wake.notify_one();
}

/// Calls the callback until it succeeds or retries run out (true: the message
/// is done, consumed or skipped); false if stopped while waiting to retry.
async fn deliver(ctx: &Ctx, m: pb::PulledMessage, stop: &CancellationToken) -> bool {
    let s = &ctx.settings;
    let mut attempt = 0u32;
    loop {
        match (ctx.listener)(m.clone()).await {
            ConsumeResult::Success => {
                ctx.stats.delivered.fetch_add(1, Ordering::Relaxed);
                return true;
            }
            ConsumeResult::RetryLater => {
                ctx.stats.retried.fetch_add(1, Ordering::Relaxed);
                attempt += 1;
                if attempt > s.max_retries {
                    ctx.stats.skipped.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(
                        message_id = %m.message_id,
                        queue_id = m.queue_id,
                        offset = m.queue_offset,
                        attempts = attempt,
                        "giving up on a message after its retries; it is skipped"
                    );
                    return true;
                }
                let wait = s.retry_delay * attempt.min(10);
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = stop.cancelled() => return false,
                }
            }
        }
    }
}

/// The member's control loop: heartbeats (clustering) or queue discovery
/// (broadcasting), worker starts and stops, and the final commit at shutdown.
async fn run(ctx: Arc<Ctx>, stop: CancellationToken) -> Result<(), Error> {
    let mut member = Member::default();
    let mut interval = Duration::from_secs(1);
    while !stop.is_cancelled() {
        let settle = match ctx.settings.model {
            MessageModel::Clustering => member.heartbeat_all(&ctx, false).await,
            MessageModel::Broadcasting => member.broadcast_round(&ctx).await,
        };
        if let Some(i) = member.interval {
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
    for (_, w) in member.workers.iter() {
        w.stop.cancel();
    }
    let stopping = std::mem::take(&mut member.workers)
        .into_iter()
        .chain(std::mem::take(&mut member.releasing));
    for (key, w) in stopping {
        let _ = w.task.await;
        member.released.insert(key, lock(&w.progress).consumed());
    }
    match ctx.settings.model {
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
    }
}

/// The member's view of its queues.
#[derive(Default)]
struct Member {
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
}

impl Member {
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
        let route = match ctx.pull_core().route(&s.topic).await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(topic = %s.topic, error = %e, "no route for the consumer's topic");
                self.last_error = Some(e);
                self.fence_silent_groups(&[]);
                return false;
            }
        };
        let mut settled = true;
        let mut answered = Vec::new();
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
            let req = pb::HeartbeatRequest {
                consumer_group: s.group.clone(),
                client_id: s.client_id.clone(),
                topic: s.topic.clone(),
                tag_expression: s.tag_expression.clone(),
                filter_type: pb::FilterType::Tag as i32,
                start_from: match s.start_from {
                    StartFrom::First => pb::StartFrom::First,
                    StartFrom::Last => pb::StartFrom::Last,
                    StartFrom::Timestamp(_) => pb::StartFrom::Timestamp,
                } as i32,
                start_timestamp_ms: match s.start_from {
                    StartFrom::Timestamp(t) => t,
                    _ => 0,
                },
                queues,
                leaving,
            };
            let session_timeout = self.session_timeout.unwrap_or(DEFAULT_SESSION_TIMEOUT);
            let resp = match heartbeat(ctx, name, req, session_timeout).await {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(broker_group = %name, error = %e, "consumer heartbeat failed");
                    self.last_error = Some(e);
                    settled = false;
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
                        .insert(key.clone(), QueueWorker::start(ctx, name, q, a.offset));
                    continue;
                }
                if !self.workers.contains_key(&key) {
                    tracing::info!(broker_group = %name, queue_id = q, offset = a.offset, "queue assigned");
                    self.workers
                        .insert(key.clone(), QueueWorker::start(ctx, name, q, a.offset));
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
        let s = &ctx.settings;
        let offsets = ctx.offsets.as_ref().expect("broadcasting has an offset file");
        match ctx.pull_core().route(&s.topic).await {
            Ok(route) => {
                for g in &route.groups {
                    for q in 0..g.queues {
                        let key = (g.broker_group.clone(), q);
                        if self.workers.contains_key(&key) {
                            continue;
                        }
                        let start = match offsets.get(&key) {
                            Some(o) => o,
                            None => match s.start_from {
                                // Pull clamps 0 up to the queue's first offset.
                                StartFrom::First | StartFrom::Timestamp(_) => 0,
                                StartFrom::Last => match ctx
                                    .pull
                                    .pull(
                                        &s.topic,
                                        &g.broker_group,
                                        q,
                                        u64::MAX,
                                        1,
                                        Duration::ZERO,
                                        &crate::consumer::Filter::all(),
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
                            .insert(key.clone(), QueueWorker::start(ctx, &g.broker_group, q, start));
                    }
                }
            }
            Err(e) => tracing::warn!(topic = %s.topic, error = %e, "no route for the consumer's topic"),
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
    group: &str,
    req: pb::HeartbeatRequest,
    session_timeout: Duration,
) -> Result<pb::HeartbeatResponse, Error> {
    let core = ctx.pull_core();
    let topic = ctx.settings.topic.as_str();
    let spec = Spec {
        label: topic,
        deadline: core.config.send_deadline.min(session_timeout / 2),
        long_poll: Duration::ZERO,
        followers: Followers::Redirect,
    };
    let target = Target::Topic {
        topic,
        pick: |route: &TopicRoute| match route.group(group) {
            Some(g) => Ok((g.clone(), ())),
            None => Err(Error::UnknownGroup {
                topic: topic.into(),
                group: group.into(),
            }),
        },
    };
    let served = follow(core, spec, target, |a: Attempt<()>| {
        let req = req.clone();
        async move { ConsumerServiceClient::new(a.channel).heartbeat(req).await }
    })
    .await?;
    Ok(served.value)
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
