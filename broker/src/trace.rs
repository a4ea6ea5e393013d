//! Message traces (RocketMQ's 消息轨迹, issue #19): what happened to a traced
//! message, step by step, kept in the broker group's trace topic
//! [`TRACE_TOPIC`] and read back by message id (`QueryTrace`).
//!
//! * **Which messages.** A message is traced when its producer asked
//!   (`SendRequest.trace`, RocketMQ's `enableMsgTrace`; the RocketMQ 5 gateway
//!   maps an SDK message's `TRACE_ON=true` property to it) or its topic has
//!   `trace` on when it is sent. The send marks each such message with the
//!   property [`TRACE_PROPERTY`] (RocketMQ's name), stored with it through
//!   Raft, so every later step (a POP receive, a pull from the retry topic, a
//!   send-back) knows from the message alone, on any leader, after any failover.
//!   Turning a topic's trace on or off changes messages sent afterwards.
//! * **What is recorded** ([`pb::TraceEvent`]): PRODUCED (producer id, the
//!   entry's Raft index, queue and offset), DELIVERED (consumer group, client,
//!   attempt; a pull naming its group, or a POP receive), ACKED (a POP ack; for
//!   push consumers the group's committed offset passing the message), RETRIED
//!   (a send-back, or a POP delivery whose invisible time expired, recorded when
//!   it is handed out again) and DEAD_LETTERED.
//! * **How it is written.** Each step is queued (a bounded channel per replica,
//!   [`QUEUE_CAPACITY`]) and the request goes on: nothing here waits for a
//!   trace write, and nothing fails the traced call. One task per replica drains
//!   the queue into one Raft entry per batch (up to [`WRITE_BATCH`] records): an
//!   append to [`TRACE_TOPIC`], queue 0, one message per record, keyed by the
//!   traced message id (so a lookup is a key-index query), tagged with the
//!   kind, the record's protobuf encoding as body. So trace records are
//!   replicated, in snapshots and retained like any message, and survive the
//!   leader that wrote them. Records that find the queue full, or that their
//!   replica cannot write (it stopped leading, the write failed), are dropped
//!   and counted (`raftmq_trace_records_dropped_total` by reason).
//! * **Untraced messages cost nothing measurable:** a send tests two flags it
//!   already holds; a delivery or ack looks for one property (a pull only when
//!   it names its consumer group) or one bit of the receipt handle.
//!
//! Push consumers ack by committing offsets, which name no message: the leader
//! remembers the traced messages a pull delivered to a group
//! ([`PendingAcks`], in memory, bounded, forgotten after an hour) and records
//! them ACKED when a commit of that group passes them. A delivery made by
//! another leader (before a failover) is not remembered, so its ACKED is not
//! recorded; its other steps are.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prost::Message as _;
use raftmq_proto::v1 as pb;
use raftmq_raft_store::command::{PERM_READ, PERM_WRITE};
use raftmq_raft_store::{AppendBatch, Command, Message, Response, StoreReader, TopicConfig, TopicMessageType};
use tokio::sync::mpsc;
use tracing::Instrument;

use crate::api_error::ApiError;
use crate::convert;
use crate::group::GroupHandle;
use crate::messaging::now_ms;

/// The trace topic of each broker group (RocketMQ's default name).
pub const TRACE_TOPIC: &str = "RMQ_SYS_TRACE_TOPIC";
/// The property marking a traced message (RocketMQ's `TRACE_ON`).
pub const TRACE_PROPERTY: &str = "TRACE_ON";
const TRACE_VALUE: &str = "true";
/// Trace records a replica queues before it drops new ones.
pub const QUEUE_CAPACITY: usize = 16_384;
/// Most records per trace entry.
pub const WRITE_BATCH: usize = 256;
/// Most events one QueryTrace returns.
pub const MAX_EVENTS: u32 = 1024;
/// Traced push deliveries awaiting their group's commit, at most.
const MAX_PENDING_ACKS: usize = 100_000;
/// A traced push delivery no commit passed within this long is forgotten (a
/// broadcasting member, which never commits, or a member that went away).
const PENDING_ACK_TTL: Duration = Duration::from_secs(3600);
const SWEEP_EVERY: Duration = Duration::from_secs(60);

use pb::TraceEventKind as Kind;

/// Whether a stored message is traced.
pub fn is_traced(properties: &[(String, String)]) -> bool {
    properties.iter().any(|(k, v)| k == TRACE_PROPERTY && v == TRACE_VALUE)
}

/// Whether a message as the wire carries it is traced.
pub fn is_traced_pb(m: Option<&pb::Message>) -> bool {
    m.is_some_and(|m| m.properties.get(TRACE_PROPERTY).is_some_and(|v| v == TRACE_VALUE))
}

/// Whether sends to `topic` may be traced: never the trace topic itself, whose
/// records would otherwise trace their own consumption.
pub fn traceable(topic: &str) -> bool {
    topic != TRACE_TOPIC
}

/// Marks messages about to be stored as traced (their properties stay sorted,
/// as every replica stores them).
pub fn mark(messages: &mut [Message]) {
    for m in messages {
        match m.properties.binary_search_by(|(k, _)| k.as_str().cmp(TRACE_PROPERTY)) {
            Ok(i) => TRACE_VALUE.clone_into(&mut m.properties[i].1),
            Err(i) => m
                .properties
                .insert(i, (TRACE_PROPERTY.to_owned(), TRACE_VALUE.to_owned())),
        }
    }
}

/// Counts of what happened to trace records on this replica.
#[derive(Debug, Default)]
pub struct TraceCounts {
    pub written: AtomicU64,
    /// The queue was full.
    pub dropped_full: AtomicU64,
    /// The replica stopped leading before it wrote them.
    pub dropped_not_leader: AtomicU64,
    /// The write failed (no quorum, shutdown, ...).
    pub dropped_failed: AtomicU64,
}

/// A traced message a pull handed to a consumer group, until a commit passes it.
struct Delivery {
    message_id: String,
    topic: String,
    queue_id: u32,
    attempt: u32,
    at: Instant,
}

/// Traced push deliveries by (consumer group, topic read, queue), by offset.
#[derive(Default)]
struct PendingAcks {
    queues: HashMap<(String, String, u32), BTreeMap<u64, Delivery>>,
    len: usize,
}

/// One replica's trace recorder: the queue the request paths push records
/// into, and what push deliveries still await their commit.
pub struct Tracer {
    group: String,
    node_id: u64,
    tx: mpsc::Sender<pb::TraceEvent>,
    rx: Mutex<Option<mpsc::Receiver<pb::TraceEvent>>>,
    counts: Arc<TraceCounts>,
    pending: Mutex<PendingAcks>,
    /// `pending.len`, read without the lock: commits skip the lock while it is 0.
    pending_len: AtomicUsize,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Tracer {
    pub fn new(group: &str, node_id: u64) -> Tracer {
        let (tx, rx) = mpsc::channel(QUEUE_CAPACITY);
        Tracer {
            group: group.to_owned(),
            node_id,
            tx,
            rx: Mutex::new(Some(rx)),
            counts: Arc::default(),
            pending: Mutex::default(),
            pending_len: AtomicUsize::new(0),
        }
    }

    pub fn counts(&self) -> Arc<TraceCounts> {
        self.counts.clone()
    }

    fn event(&self, kind: Kind, message_id: String, topic: &str, queue_id: u32) -> pb::TraceEvent {
        pb::TraceEvent {
            kind: kind as i32,
            message_id,
            time_ms: now_ms(),
            broker_group: self.group.clone(),
            node_id: self.node_id,
            topic: topic.to_owned(),
            queue_id,
            ..Default::default()
        }
    }

    /// Queues a record; never waits. A full queue drops it (counted).
    fn record(&self, e: pb::TraceEvent) {
        if self.tx.try_send(e).is_err() {
            self.counts.dropped_full.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A traced send was stored by entry `raft_index` at `store_ms`.
    pub fn produced(&self, topic: &str, raft_index: u64, results: &[pb::SendResult], producer: &str, store_ms: u64) {
        for r in results {
            self.record(pb::TraceEvent {
                time_ms: store_ms,
                // A delayed or half message has no offset yet.
                queue_offset: (r.queue_offset != 0 || (r.deliver_at_ms == 0 && r.transaction_id.is_empty()))
                    .then_some(r.queue_offset),
                producer: producer.to_owned(),
                raft_index,
                next_delivery_ms: r.deliver_at_ms,
                detail: if !r.transaction_id.is_empty() {
                    "half message (transaction)".into()
                } else if r.deliver_at_ms != 0 {
                    "delayed".into()
                } else {
                    String::new()
                },
                ..self.event(Kind::Produced, r.message_id.clone(), topic, r.queue_id)
            });
        }
    }

    /// A pull of `topic` naming `consumer_group` returned `messages`: the traced
    /// ones were delivered to the group, and await its commit.
    pub fn pulled(&self, consumer_group: &str, client_id: &str, topic: &str, messages: &[pb::PulledMessage]) {
        for m in messages.iter().filter(|m| is_traced_pb(m.message.as_ref())) {
            let origin = m.message.as_ref().map_or(topic, |x| x.topic.as_str());
            let (queue_id, attempt) = (origin_queue(m), m.reconsume_times.saturating_add(1));
            self.record(pb::TraceEvent {
                queue_offset: Some(m.queue_offset),
                consumer_group: consumer_group.to_owned(),
                client_id: client_id.to_owned(),
                attempt,
                from_topic: if origin == topic {
                    String::new()
                } else {
                    topic.to_owned()
                },
                detail: "pull".into(),
                ..self.event(Kind::Delivered, m.message_id.clone(), origin, queue_id)
            });
            let mut p = lock(&self.pending);
            if p.len >= MAX_PENDING_ACKS {
                continue;
            }
            let key = (consumer_group.to_owned(), topic.to_owned(), m.queue_id);
            let delivery = Delivery {
                message_id: m.message_id.clone(),
                topic: origin.to_owned(),
                queue_id,
                attempt,
                at: Instant::now(),
            };
            if p.queues
                .entry(key)
                .or_default()
                .insert(m.queue_offset, delivery)
                .is_none()
            {
                p.len += 1;
                self.pending_len.store(p.len, Ordering::Relaxed);
            }
        }
    }

    /// `consumer_group` committed `offsets` (queue, next offset) of `topic`: the
    /// traced deliveries below them were consumed.
    pub fn committed(&self, consumer_group: &str, topic: &str, offsets: &[(u32, u64)], client_id: &str) {
        if self.pending_len.load(Ordering::Relaxed) == 0 {
            return;
        }
        let mut acked = Vec::new();
        {
            let mut p = lock(&self.pending);
            for &(queue_id, offset) in offsets {
                let key = (consumer_group.to_owned(), topic.to_owned(), queue_id);
                let Some(q) = p.queues.get_mut(&key) else { continue };
                let rest = q.split_off(&offset);
                let done = std::mem::replace(q, rest);
                if q.is_empty() {
                    p.queues.remove(&key);
                }
                p.len -= done.len();
                acked.extend(done.into_values());
            }
            self.pending_len.store(p.len, Ordering::Relaxed);
        }
        for d in acked {
            self.record(pb::TraceEvent {
                consumer_group: consumer_group.to_owned(),
                client_id: client_id.to_owned(),
                attempt: d.attempt,
                detail: "offset committed".into(),
                ..self.event(Kind::Acked, d.message_id, &d.topic, d.queue_id)
            });
        }
    }

    /// An administrator moved `consumer_group`'s offsets of `topic`: what it
    /// skips or rereads was not consumed.
    pub fn forget(&self, consumer_group: &str, topic: &str) {
        if self.pending_len.load(Ordering::Relaxed) == 0 {
            return;
        }
        let mut p = lock(&self.pending);
        let mut removed = 0;
        p.queues.retain(|(g, t, _), q| {
            let keep = g != consumer_group || t != topic;
            if !keep {
                removed += q.len();
            }
            keep
        });
        p.len -= removed;
        self.pending_len.store(p.len, Ordering::Relaxed);
    }

    /// Drops push deliveries no commit passed within [`PENDING_ACK_TTL`].
    fn sweep(&self) {
        if self.pending_len.load(Ordering::Relaxed) == 0 {
            return;
        }
        let mut p = lock(&self.pending);
        let mut removed = 0;
        for q in p.queues.values_mut() {
            let before = q.len();
            q.retain(|_, d| d.at.elapsed() < PENDING_ACK_TTL);
            removed += before - q.len();
        }
        p.queues.retain(|_, q| !q.is_empty());
        p.len -= removed;
        self.pending_len.store(p.len, Ordering::Relaxed);
    }

    /// A push consumer of `consumer_group` sent back traced message `message_id`
    /// (its `failed_attempt`-th delivery failed) at `at_ms`: retried, due at
    /// `due_ms`, or dead-lettered. It no longer awaits a commit.
    pub fn sent_back(
        &self,
        consumer_group: &str,
        message: &raftmq_raft_store::StoredMessage,
        message_id: &str,
        failed_attempt: u32,
        (dead, at_ms, due_ms): (bool, u64, u64),
    ) {
        if self.pending_len.load(Ordering::Relaxed) != 0 {
            let mut p = lock(&self.pending);
            let mut removed = 0;
            for ((g, _, _), q) in p.queues.iter_mut() {
                if g == consumer_group {
                    let before = q.len();
                    q.retain(|_, d| d.message_id != message_id);
                    removed += before - q.len();
                }
            }
            p.queues.retain(|_, q| !q.is_empty());
            p.len -= removed;
            self.pending_len.store(p.len, Ordering::Relaxed);
        }
        let kind = if dead { Kind::DeadLettered } else { Kind::Retried };
        self.record(pb::TraceEvent {
            time_ms: at_ms,
            consumer_group: consumer_group.to_owned(),
            attempt: failed_attempt,
            next_delivery_ms: if dead { 0 } else { due_ms },
            detail: if dead {
                "send back past the group's max reconsume times".into()
            } else {
                "send back".into()
            },
            ..self.event(kind, message_id.to_owned(), &message.topic, message.queue_id)
        });
    }

    /// A POP receive handed out traced `message` as delivery `attempt`; a
    /// redelivery first records that the previous one expired unacked.
    pub fn popped(
        &self,
        consumer_group: &str,
        client_id: &str,
        message: &raftmq_raft_store::StoredMessage,
        attempt: u32,
        invisible_until_ms: u64,
    ) {
        let id = convert::message_id(&self.group, message.raft_index, message.batch_pos);
        let (topic, queue_id) = (&message.topic, message.queue_id);
        if attempt > 1 {
            self.record(pb::TraceEvent {
                consumer_group: consumer_group.to_owned(),
                attempt: attempt - 1,
                queue_offset: Some(message.queue_offset),
                detail: "invisible time expired unacked".into(),
                ..self.event(Kind::Retried, id.clone(), topic, queue_id)
            });
        }
        self.record(pb::TraceEvent {
            consumer_group: consumer_group.to_owned(),
            client_id: client_id.to_owned(),
            attempt,
            queue_offset: Some(message.queue_offset),
            next_delivery_ms: invisible_until_ms,
            detail: "pop".into(),
            ..self.event(Kind::Delivered, id, topic, queue_id)
        });
    }

    /// A POP delivery of a traced message was acked, forwarded to the DLQ by the
    /// consumer, or expired past the group's max reconsume times (`kind` says).
    pub fn pop_outcome(
        &self,
        kind: Kind,
        (consumer_group, topic): (&str, &str),
        (queue_id, offset): (u32, u64),
        message: raftmq_raft_store::MessageRef,
        attempt: u32,
        detail: &str,
    ) {
        let id = convert::message_id(&self.group, message.raft_index, message.batch_pos);
        self.record(pb::TraceEvent {
            consumer_group: consumer_group.to_owned(),
            attempt,
            queue_offset: Some(offset),
            detail: detail.to_owned(),
            ..self.event(kind, id, topic, queue_id)
        });
    }
}

/// Serves the trace counters on the node's metrics endpoint.
pub fn register_metrics(registry: &mut prometheus_client::registry::Registry, tracer: &Tracer) {
    registry.register_collector(Box::new(TraceCollector(tracer.counts())));
}

#[derive(Debug)]
struct TraceCollector(Arc<TraceCounts>);

impl prometheus_client::collector::Collector for TraceCollector {
    fn encode(&self, mut enc: prometheus_client::encoding::DescriptorEncoder) -> std::fmt::Result {
        let c = &self.0;
        let get = |a: &AtomicU64| i64::try_from(a.load(Ordering::Relaxed)).unwrap_or(i64::MAX);
        crate::metrics::counter(
            &mut enc,
            "raftmq_trace_records_written",
            "Message-trace records this node wrote to the trace topic",
            None,
            c.written.load(Ordering::Relaxed),
        )?;
        crate::metrics::family(
            &mut enc,
            (
                "raftmq_trace_records_dropped",
                "Message-trace records dropped: the queue was full (queue_full), the node stopped leading \
                 before writing them (not_leader), or the write failed (write_failed)",
                None,
            ),
            prometheus_client::metrics::MetricType::Counter,
            [
                ([("reason", "queue_full".to_owned())], get(&c.dropped_full)),
                ([("reason", "not_leader".to_owned())], get(&c.dropped_not_leader)),
                ([("reason", "write_failed".to_owned())], get(&c.dropped_failed)),
            ],
        )
    }
}

/// The queue a pulled message was first stored in (its retry-topic queue is
/// the one it was read from).
fn origin_queue(m: &pb::PulledMessage) -> u32 {
    m.message
        .as_ref()
        .and_then(|x| x.properties.get(convert::PROPERTY_ORIGIN_QUEUE_ID))
        .and_then(|q| q.parse().ok())
        .unwrap_or(m.queue_id)
}

/// The attempt count of a POP group's in-flight message (0 when not in flight).
pub fn inflight_attempt(store: &StoreReader, consumer_group: &str, topic: &str, queue_id: u32, offset: u64) -> u32 {
    store.with_pop(|p| {
        p.groups
            .get(consumer_group)
            .and_then(|g| g.queues.get(&(topic.to_owned(), queue_id)))
            .and_then(|q| q.inflight.get(&offset))
            .map_or(0, |f| f.attempt)
    })
}

/// Starts this replica's trace writer (ends with the replica's shutdown).
pub fn spawn(group: GroupHandle) {
    let Some(rx) = lock(&group.tracer().rx).take() else {
        return;
    };
    let span = tracing::info_span!("trace_writer", group = %group.group());
    group.tasks().spawn(write_loop(group.clone(), rx).instrument(span));
}

async fn write_loop(group: GroupHandle, mut rx: mpsc::Receiver<pb::TraceEvent>) {
    let mut sweep = tokio::time::interval(SWEEP_EVERY);
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let max = WRITE_BATCH.min(group.config().max_batch_messages).max(1);
    let mut batch = Vec::with_capacity(max);
    loop {
        tokio::select! {
            n = rx.recv_many(&mut batch, max) => if n == 0 { return },
            _ = sweep.tick() => {
                group.tracer().sweep();
                continue;
            }
            _ = group.shutdown().cancelled() => return,
        }
        let events = std::mem::take(&mut batch);
        let n = events.len() as u64;
        // Shutdown waits for this task before it stops Raft: never hold it up
        // behind a write that cannot commit.
        tokio::select! {
            () = write(&group, events) => {}
            _ = group.shutdown().cancelled() => {
                group.tracer().counts.dropped_failed.fetch_add(n, Ordering::Relaxed);
                return;
            }
        }
    }
}

/// Writes one batch of records as one entry of the trace topic, creating the
/// topic first if it is missing.
async fn write(group: &GroupHandle, events: Vec<pb::TraceEvent>) {
    let counts = &group.tracer().counts;
    let n = events.len() as u64;
    if group.ensure_leader().is_err() {
        counts.dropped_not_leader.fetch_add(n, Ordering::Relaxed);
        tracing::debug!(records = n, "not leading: trace records dropped");
        return;
    }
    let written = async {
        ensure_topic(group).await?;
        let now = now_ms();
        let messages = events
            .into_iter()
            .map(|e| Message {
                tag: e
                    .kind()
                    .as_str_name()
                    .trim_start_matches("TRACE_EVENT_KIND_")
                    .to_owned(),
                keys: vec![e.message_id.clone()],
                properties: Vec::new(),
                born_timestamp_ms: e.time_ms,
                deliver_at_ms: 0,
                body: e.encode_to_vec().into(),
            })
            .collect();
        let w = group
            .write(Command::Append(AppendBatch {
                topic: TRACE_TOPIC.to_owned(),
                queue_id: 0,
                store_timestamp_ms: now,
                messages,
                producer: None,
                transaction: None,
            }))
            .await?;
        match w.response {
            Response::Appended { .. } => Ok(()),
            other => Err(ApiError::Internal(format!("trace append was answered with {other}"))),
        }
    }
    .await;
    match written {
        Ok(()) => {
            counts.written.fetch_add(n, Ordering::Relaxed);
        }
        Err(ApiError::NotLeader { .. }) => {
            counts.dropped_not_leader.fetch_add(n, Ordering::Relaxed);
        }
        Err(e) => {
            counts.dropped_failed.fetch_add(n, Ordering::Relaxed);
            tracing::warn!(records = n, error = %e, "writing trace records failed; dropped");
        }
    }
}

/// Creates the trace topic (one queue, NORMAL, untraced) when it is missing.
async fn ensure_topic(group: &GroupHandle) -> Result<(), ApiError> {
    match group.topic_for_write(TRACE_TOPIC).await {
        Ok(_) => return Ok(()),
        Err(ApiError::NotFound(_)) => {}
        Err(e) => return Err(e),
    }
    tracing::info!(topic = TRACE_TOPIC, "creating the trace topic");
    group
        .write(Command::UpsertTopic(TopicConfig {
            name: TRACE_TOPIC.to_owned(),
            queues: 1,
            perm: PERM_READ | PERM_WRITE,
            message_type: TopicMessageType::Normal,
            trace: false,
        }))
        .await?;
    group.topics_changed();
    Ok(())
}

/// `QueryTrace`: the records of one message id from this replica's applied
/// state, sorted by time; ties keep the order of a message's life (its
/// delivery attempts in turn, each delivery before its outcome), then the
/// order they were stored in.
pub async fn query(group: &GroupHandle, req: pb::QueryTraceRequest) -> Result<pb::QueryTraceResponse, ApiError> {
    convert::parse_own_message_id(&req.message_id, group.group())?;
    let max = match req.max_events {
        0 => MAX_EVENTS,
        n => n.min(MAX_EVENTS),
    } as usize;
    let store = group.store().clone();
    let key = req.message_id.clone();
    let found = tokio::task::spawn_blocking(move || store.messages_by_key(TRACE_TOPIC, &key, max))
        .await
        .map_err(|e| ApiError::blocking_task("reading trace records", e))?
        .map_err(|e| ApiError::storage("reading trace records", e))?;
    let mut events: Vec<pb::TraceEvent> = found
        .into_iter()
        .filter_map(|m| match pb::TraceEvent::decode(m.message.body) {
            Ok(e) if e.message_id == req.message_id => Some(e),
            Ok(_) => None,
            Err(e) => {
                tracing::warn!(raft_index = m.raft_index, error = %e, "an undecodable trace record; skipped");
                None
            }
        })
        .collect();
    sort_timeline(&mut events);
    Ok(pb::QueryTraceResponse {
        broker_group: group.group().to_owned(),
        events,
    })
}

/// Sorts by time; at equal times by attempt, a delivery before its outcome
/// (stable, so records otherwise keep their stored order).
pub fn sort_timeline(events: &mut [pb::TraceEvent]) {
    events.sort_by_key(|e| {
        let outcome = !matches!(e.kind(), Kind::Produced | Kind::Delivered);
        (e.time_ms, e.attempt, outcome)
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(kind: Kind, time_ms: u64, attempt: u32) -> pb::TraceEvent {
        pb::TraceEvent {
            kind: kind as i32,
            time_ms,
            attempt,
            ..Default::default()
        }
    }

    #[test]
    fn marking_keeps_properties_sorted_and_is_recognised() {
        let mut m = vec![Message {
            tag: String::new(),
            keys: vec![],
            properties: vec![("A".into(), "1".into()), ("Z".into(), "2".into())],
            body: Default::default(),
            born_timestamp_ms: 0,
            deliver_at_ms: 0,
        }];
        assert!(!is_traced(&m[0].properties));
        mark(&mut m);
        mark(&mut m);
        let keys: Vec<_> = m[0].properties.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys, ["A", TRACE_PROPERTY, "Z"]);
        assert!(is_traced(&m[0].properties));
        assert!(!traceable(TRACE_TOPIC) && traceable("orders"));
    }

    #[test]
    fn equal_times_sort_in_the_order_of_a_life() {
        let mut events = vec![
            ev(Kind::Delivered, 5, 2),
            ev(Kind::Retried, 5, 1),
            ev(Kind::Acked, 5, 2),
            ev(Kind::Delivered, 5, 1),
            ev(Kind::Produced, 5, 0),
            ev(Kind::DeadLettered, 4, 0),
        ];
        sort_timeline(&mut events);
        let kinds: Vec<_> = events.iter().map(|e| (e.kind(), e.attempt)).collect();
        assert_eq!(
            kinds,
            [
                (Kind::DeadLettered, 0),
                (Kind::Produced, 0),
                (Kind::Delivered, 1),
                (Kind::Retried, 1),
                (Kind::Delivered, 2),
                (Kind::Acked, 2),
            ]
        );
    }

    fn pulled(id: &str, offset: u64) -> pb::PulledMessage {
        let m = pb::Message {
            topic: "t".into(),
            properties: [(TRACE_PROPERTY.to_owned(), TRACE_VALUE.to_owned())].into(),
            ..Default::default()
        };
        pb::PulledMessage {
            message: Some(m),
            message_id: id.into(),
            queue_id: 0,
            queue_offset: offset,
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn push_deliveries_are_acked_by_the_commit_that_passes_them_and_a_send_back_is_not() {
        let t = Tracer::new("g", 1);
        let mut rx = lock(&t.rx).take().unwrap();
        let mut untraced = pulled("u", 9);
        untraced.message.as_mut().unwrap().properties.clear();
        t.pulled(
            "cg",
            "c1",
            "t",
            &[pulled("a", 3), pulled("b", 4), untraced, pulled("c", 5)],
        );
        assert_eq!(t.pending_len.load(Ordering::Relaxed), 3);
        let stored = raftmq_raft_store::StoredMessage {
            topic: "t".into(),
            queue_id: 0,
            queue_offset: 4,
            raft_index: 1,
            batch_pos: 0,
            store_timestamp_ms: 0,
            message: Message {
                tag: String::new(),
                keys: vec![],
                properties: vec![],
                body: Default::default(),
                born_timestamp_ms: 0,
                deliver_at_ms: 0,
            },
            reconsume_times: 0,
            origin: None,
        };
        t.sent_back("cg", &stored, "b", 1, (false, 9, 99));
        // Another group's commit acks nothing; this one's passes a and b (sent back).
        t.committed("other", "t", &[(0, 100)], "c9");
        t.committed("cg", "t", &[(0, 5)], "c1");
        assert_eq!(t.pending_len.load(Ordering::Relaxed), 1);
        let mut got = Vec::new();
        rx.recv_many(&mut got, 100).await;
        let seen: Vec<_> = got.iter().map(|e| (e.kind(), e.message_id.as_str())).collect();
        assert_eq!(
            seen,
            [
                (Kind::Delivered, "a"),
                (Kind::Delivered, "b"),
                (Kind::Delivered, "c"),
                (Kind::Retried, "b"),
                (Kind::Acked, "a"),
            ]
        );
        t.forget("cg", "t");
        assert_eq!(t.pending_len.load(Ordering::Relaxed), 0);
    }
}
