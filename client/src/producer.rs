//! Producer: sends one message or a batch to a topic's queue on a broker group's
//! leader, picking the queue round-robin or by sharding key, and combines
//! concurrent sends into batches. Finding and following the leader through
//! failovers, within `send_deadline`, is the `leader` module's.
//!
//! With several broker groups, an unkeyed send whose group has no reachable leader
//! moves to another group's queue within its deadline, and that group is skipped
//! by unkeyed sends for a few seconds (`leader::GROUP_FAULT_FOR`). A keyed send,
//! or one to a chosen queue, stays on its queue's group and fails with
//! [`Error::GroupUnavailable`] naming it: moving it would break the queue's order.
//!
//! Delivery is at-least-once on ambiguous failures: a send that timed out or lost
//! its connection (UNAVAILABLE, "outcome unknown") may have been stored, and the
//! retry stores it again. Exactly-once waits for the idempotent producer
//! (producer id + sequence deduplicated in the state machine).

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::oneshot;

use raftmq_proto::v1 as pb;
use raftmq_proto::v1::messaging_service_client::MessagingServiceClient;

use crate::error::Error;
use crate::leader::{Attempt, Followers, Spec, Target, follow};
use crate::route::{Core, TopicRoute};

/// Where a stored message lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SendReceipt {
    pub message_id: String,
    pub broker_group: String,
    pub queue_id: u32,
    /// 0 for a delayed message: its offset is assigned when it is delivered.
    pub queue_offset: u64,
    /// A delayed message: when it becomes visible (ms since the epoch); else 0.
    pub deliver_at_ms: u64,
    /// A transactional send's id to end it with (see
    /// [`crate::TransactionProducer`]); empty for other sends.
    pub transaction_id: String,
}

/// How a send chooses its queue.
#[derive(Debug, Clone)]
enum Pick {
    /// The n-th writable (group, queue) pair of the groups not isolated for a
    /// recent failure (see `leader::GroupFaults`): an unkeyed send, which may move
    /// to another group when its group has no leader.
    Index(usize),
    /// A sharding key's hash: the n-th writable (group, queue) pair of every
    /// writable group, isolated or not, so the key keeps its queue.
    Key { hash: usize, key: String },
    /// A caller-chosen queue, by group name: a refreshed route may list groups
    /// differently, and the caller meant this group.
    Queue { group: String, queue_id: u32 },
}

/// Sends messages; cheap to clone (shares connections, routes and batching).
#[derive(Clone)]
pub struct Producer {
    core: Arc<Core>,
    /// This producer's id for idempotent sends (random per producer) and the
    /// next sequence number; empty when idempotence is off.
    producer_id: Arc<str>,
    sequence: Arc<std::sync::atomic::AtomicU64>,
    next: Arc<AtomicUsize>,
    lanes: Arc<Mutex<HashMap<LaneKey, Lane>>>,
    /// Message trace on for every send (RocketMQ's `enableMsgTrace`).
    trace: bool,
}

/// RPCs a lane may have in flight (per broker group, for the rotating lane) before
/// further sends to it are combined. Two keeps the pipe full (one batch travels
/// while the next gathers) without letting many small RPCs race each other.
const LANE_PARALLELISM: usize = 2;
/// Bytes of bodies one combined send may carry (the broker's default batch limit
/// is 4 MiB; staying well below it keeps one RPC from dominating).
const MAX_AUTO_BATCH_BYTES: usize = 1024 * 1024;

/// Sends to one lane may be combined: (topic, Some((broker group, queue))) for sends
/// bound to one queue (keyed or explicit), (topic, None) for unkeyed sends, whose
/// batches take the topic's queues in turn.
type LaneKey = (String, Option<(String, u32)>);
type Waiter = oneshot::Sender<Result<SendReceipt, Error>>;

/// RPCs a lane keeps in flight: `usual` while sends gather, up to `most` while full
/// batches wait (the rotating lane spans several queues, so it may use as many
/// slots as per-queue lanes for all of them would).
struct LaneSlots {
    usual: usize,
    most: usize,
}

/// Sends bound for one lane: how many RPCs are in flight and who waits to go next.
#[derive(Default)]
struct Lane {
    in_flight: usize,
    queued: Vec<(pb::Message, Waiter)>,
}

impl Producer {
    pub(crate) fn from_core(core: Arc<Core>) -> Producer {
        let producer_id: Arc<str> = if core.config.idempotent {
            new_producer_id().into()
        } else {
            "".into()
        };
        Producer {
            core,
            producer_id,
            sequence: Arc::new(std::sync::atomic::AtomicU64::new(0)),
            next: Arc::new(AtomicUsize::new(0)),
            lanes: Arc::new(Mutex::new(HashMap::new())),
            trace: false,
        }
    }

    /// This producer with message trace on (RocketMQ's `enableMsgTrace`): the
    /// brokers record each message's life (stored, delivered, acked, retried,
    /// dead-lettered) in their trace topic; `Admin::trace` reads it back. It
    /// combines sends with its own lanes, so a traced and an untraced clone of
    /// one producer never share a batch. Tracing never fails nor holds a send.
    pub fn enable_msg_trace(mut self) -> Producer {
        if !self.trace {
            self.trace = true;
            self.lanes = Arc::new(Mutex::new(HashMap::new()));
        }
        self
    }

    /// Sends one message to the next queue round-robin. This is also the
    /// asynchronous send: the future does the work; `.await` it where and when
    /// the answer is wanted, or hand it to `tokio::spawn`.
    ///
    /// With combining on (`max_auto_batch` > 1) the rotation is per RPC, not per
    /// message: concurrent unkeyed sends to a topic share one lane with two RPCs in
    /// flight per broker group, and each batch that leaves it goes to the next
    /// queue. A busy producer thus sends a few large batches that still spread
    /// evenly over the queues, instead of a small batch per queue (Kafka's sticky
    /// partitioner works the same way); one that awaits each send moves to the next
    /// queue every time, as before. Unkeyed messages carry no order promise, so
    /// only the spread's granularity changes.
    pub async fn send(&self, topic: &str, message: pb::Message) -> Result<SendReceipt, Error> {
        self.send_single(topic, None, message).await
    }

    /// Same as [`Producer::send`]; named for readers coming from RocketMQ's API.
    pub async fn send_async(&self, topic: &str, message: pb::Message) -> Result<SendReceipt, Error> {
        self.send(topic, message).await
    }

    /// Fire-and-forget: spawns the send on the current Tokio runtime and drops its
    /// result, including failures (they are only logged at debug level). Use for
    /// data whose loss is acceptable, such as logs or metrics.
    pub fn send_oneway(&self, topic: &str, message: pb::Message) {
        let (producer, topic) = (self.clone(), topic.to_owned());
        tokio::spawn(async move {
            if let Err(e) = producer.send(&topic, message).await {
                tracing::debug!(topic = %topic, error = %e, "one-way send failed");
            }
        });
    }

    /// Sends a batch as one entry: all of it lands contiguously in one queue, or
    /// none of it does. Receipts are in message order.
    pub async fn send_batch(&self, topic: &str, messages: Vec<pb::Message>) -> Result<Vec<SendReceipt>, Error> {
        self.send_inner(topic, self.next_pick(), &messages, None).await
    }

    /// Sends to an explicit queue of an explicit broker group.
    pub async fn send_to_queue(
        &self,
        topic: &str,
        broker_group: &str,
        queue_id: u32,
        message: pb::Message,
    ) -> Result<SendReceipt, Error> {
        let route = self.core.route(topic).await?;
        if route.group(broker_group).is_none() {
            return Err(Error::UnknownGroup {
                topic: topic.into(),
                group: broker_group.into(),
            });
        }
        let pick = Pick::Queue {
            group: broker_group.to_owned(),
            queue_id,
        };
        self.send_single(topic, Some(pick), message).await
    }

    /// Sends to the queue `key` maps to. The mapping (a stable hash over the
    /// route's writable queues, ordered by group name) is the same in every process
    /// while the route's groups and queue counts stay the same, so messages of one
    /// key keep their order. Changing a topic's queues remaps keys, as in RocketMQ.
    /// A topic that no NameServer knows yet (one a broker auto-creates on first
    /// send) has no queue count to hash over: until its route is known, within one
    /// broker registration round, the broker places keyed messages and their order
    /// is not promised. Create ordered topics up front, or send once and wait.
    pub async fn send_with_key(&self, topic: &str, key: &str, message: pb::Message) -> Result<SendReceipt, Error> {
        let pick = Pick::Key {
            hash: fnv1a(key.as_bytes()) as usize,
            key: key.to_owned(),
        };
        self.send_single(topic, Some(pick), message).await
    }

    /// One message: alone if its lane is idle (or combining is off, or the queue
    /// is not known yet), otherwise combined with the other sends waiting on that
    /// lane into one RPC. A combined batch is one Raft entry: all of it is stored
    /// or none of it, and each sender gets its own receipt or the shared error.
    /// `pick` `None` is the rotation [`Producer::send`] describes.
    async fn send_single(&self, topic: &str, pick: Option<Pick>, message: pb::Message) -> Result<SendReceipt, Error> {
        let key = match &pick {
            Some(Pick::Key { key, .. }) => Some(key.clone()),
            _ => None,
        };
        // A keyed send may travel in its queue's lane with other keys' messages,
        // which knows the queue but not the key: name the key here.
        self.send_on_lane(topic, pick, message).await.map_err(|e| match e {
            Error::GroupUnavailable {
                topic,
                group,
                queue_id,
                key: None,
                last,
            } if key.is_some() => Error::GroupUnavailable {
                topic,
                group,
                queue_id,
                key,
                last,
            },
            e => e,
        })
    }

    /// [`Producer::send_single`]'s work.
    async fn send_on_lane(&self, topic: &str, pick: Option<Pick>, message: pb::Message) -> Result<SendReceipt, Error> {
        let lane = match self.core.config.max_auto_batch {
            0 | 1 => None,
            _ => match self.core.route(topic).await {
                Ok(route) => match &pick {
                    // The rotating lane needs the topic's queues, which a
                    // provisional route does not know yet.
                    None if !route.provisional => {
                        let (groups, queues) = route
                            .groups
                            .iter()
                            .filter(|g| writable(g))
                            .fold((0, 0), |(n, q), g| (n + 1, q + g.queues as usize));
                        (queues > 0).then(|| {
                            let slots = LaneSlots {
                                usual: LANE_PARALLELISM * groups,
                                most: LANE_PARALLELISM * queues,
                            };
                            ((topic.to_owned(), None), slots)
                        })
                    }
                    None => None,
                    Some(p) => choose(&route, p, |_| false).and_then(|(g, q)| {
                        let slots = LaneSlots {
                            usual: LANE_PARALLELISM,
                            most: LANE_PARALLELISM,
                        };
                        Some(((topic.to_owned(), Some((g.broker_group.clone(), q?))), slots))
                    }),
                },
                // The unbatched path retries route failures within the deadline.
                Err(_) => None,
            },
        };
        let Some((key, slots)) = lane else {
            let pick = pick.unwrap_or_else(|| self.next_pick());
            return one(self
                .send_inner(topic, pick, std::slice::from_ref(&message), None)
                .await?);
        };
        let mut message = Some(message);
        let mut extra_drain = false;
        let waiting = {
            let mut lanes = self.lanes.lock().unwrap_or_else(|p| p.into_inner());
            let lane = lanes.entry(key.clone()).or_default();
            if lane.in_flight < slots.usual {
                lane.in_flight += 1;
                None
            } else {
                let (tx, rx) = oneshot::channel();
                lane.queued.extend(message.take().map(|m| (m, tx)));
                // A full batch is waiting (by count or bytes, as `take_queued`
                // cuts it): send it now on one more slot rather than let the
                // producer's window exceed what the usual slots can carry.
                let max = self.core.config.max_auto_batch;
                let full = lane.queued.len() >= max || fitting(&lane.queued, 0, 0, max) < lane.queued.len();
                if full && lane.in_flight < slots.most {
                    lane.in_flight += 1;
                    extra_drain = true;
                }
                Some(rx)
            }
        };
        if extra_drain {
            let (producer, key) = (self.clone(), key.clone());
            tokio::spawn(async move { producer.drain_lane(key).await });
        }
        match waiting {
            Some(rx) => rx.await.unwrap_or_else(|_| {
                Err(Error::Protocol {
                    endpoint: String::new(),
                    reason: "the combined send carrying this message was dropped".into(),
                })
            }),
            None => {
                // This caller holds one of the lane's slots: send its own message
                // with whatever queued meanwhile, then free the slot or, if more
                // queued, leave it to a task that keeps draining the lane, so this
                // caller's answer is not held up.
                let (batch, waiters) = self.take_queued(&key, message);
                let mut results = self.send_combined(&key, batch).await.into_iter();
                let mine = results.next().unwrap_or_else(|| {
                    Err(Error::Protocol {
                        endpoint: String::new(),
                        reason: "no result for a combined send".into(),
                    })
                });
                for (w, r) in waiters.into_iter().zip(results) {
                    let _ = w.send(r);
                }
                if !self.release_if_idle(&key) {
                    let producer = self.clone();
                    tokio::spawn(async move { producer.drain_lane(key).await });
                }
                mine
            }
        }
    }

    /// The next queue of the round-robin rotation.
    fn next_pick(&self) -> Pick {
        Pick::Index(self.next.fetch_add(1, Ordering::Relaxed))
    }

    /// Takes up to `max_auto_batch` messages (and the byte limit) queued on the lane,
    /// after `first` if given.
    fn take_queued(&self, key: &LaneKey, first: Option<pb::Message>) -> (Vec<pb::Message>, Vec<Waiter>) {
        let max = self.core.config.max_auto_batch;
        let mut batch = Vec::new();
        let mut bytes = 0;
        if let Some(m) = first {
            bytes += m.body.len();
            batch.push(m);
        }
        let mut waiters = Vec::new();
        let mut lanes = self.lanes.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(lane) = lanes.get_mut(key) {
            let take = fitting(&lane.queued, batch.len(), bytes, max);
            for (m, w) in lane.queued.drain(..take) {
                batch.push(m);
                waiters.push(w);
            }
        }
        (batch, waiters)
    }

    /// Frees one of the lane's slots if nothing waits on it (checked under the same
    /// lock that queues, so no sender can be left waiting on a free lane).
    fn release_if_idle(&self, key: &LaneKey) -> bool {
        let mut lanes = self.lanes.lock().unwrap_or_else(|p| p.into_inner());
        let Some(lane) = lanes.get_mut(key) else {
            return true;
        };
        if !lane.queued.is_empty() {
            return false;
        }
        lane.in_flight -= 1;
        if lane.in_flight == 0 {
            lanes.remove(key);
        }
        true
    }

    /// Keeps sending what queues on the lane until it is empty, then frees the slot.
    async fn drain_lane(&self, key: LaneKey) {
        loop {
            let (batch, waiters) = self.take_queued(&key, None);
            if batch.is_empty() {
                if self.release_if_idle(&key) {
                    return;
                }
                continue;
            }
            for (w, r) in waiters.into_iter().zip(self.send_combined(&key, batch).await) {
                let _ = w.send(r);
            }
        }
    }

    /// Sends `batch` to the lane's queue as one RPC, one result per message. If the
    /// broker refuses the batch as invalid, each message is sent alone so that only
    /// the bad one fails.
    async fn send_combined(&self, key: &LaneKey, batch: Vec<pb::Message>) -> Vec<Result<SendReceipt, Error>> {
        let (topic, queue) = key;
        // The rotating lane's batch takes the next queue; its retries keep it.
        let chosen = match queue {
            Some((group, queue_id)) => Pick::Queue {
                group: group.clone(),
                queue_id: *queue_id,
            },
            None => self.next_pick(),
        };
        let pick = || chosen.clone();
        let n = batch.len();
        match self.send_inner(topic, pick(), &batch, None).await {
            Ok(receipts) => receipts.into_iter().map(Ok).collect(),
            Err(e) if n > 1 && e.code() == Some(tonic::Code::InvalidArgument) => {
                let mut out = Vec::with_capacity(n);
                for m in &batch {
                    out.push(
                        self.send_inner(topic, pick(), std::slice::from_ref(m), None)
                            .await
                            .and_then(one),
                    );
                }
                out
            }
            Err(e) => vec![Err(e); n],
        }
    }

    /// Sends a transactional (half) message for `producer_group`: stored but
    /// invisible until its transaction is ended. Never combined with other sends.
    pub(crate) async fn send_half(
        &self,
        topic: &str,
        producer_group: &str,
        message: pb::Message,
    ) -> Result<SendReceipt, Error> {
        one(self
            .send_inner(
                topic,
                self.next_pick(),
                std::slice::from_ref(&message),
                Some(producer_group),
            )
            .await?)
    }

    /// One send of `messages` as one entry to the queue `pick` names, following
    /// the group's leader within `send_deadline` (see `leader`); with a producer
    /// group, as a transactional send.
    #[tracing::instrument(skip(self, pick, messages), fields(count = messages.len()))]
    async fn send_inner(
        &self,
        topic: &str,
        pick: Pick,
        messages: &[pb::Message],
        transaction: Option<&str>,
    ) -> Result<Vec<SendReceipt>, Error> {
        let spec = Spec {
            label: topic,
            deadline: self.core.config.send_deadline,
            long_poll: Duration::ZERO,
            followers: Followers::Redirect,
        };
        // The queue is chosen again in each attempt's route: a refreshed route may
        // list the groups differently, and `pick` names a position, not a group.
        // Unkeyed picks skip groups isolated for a recent failure.
        // The last choice is kept to name the group and queue if the send fails.
        let core = &self.core;
        let last_choice: Mutex<Option<(String, Option<u32>)>> = Mutex::new(None);
        let choose_in = |route: &TopicRoute| {
            let now = std::time::Instant::now();
            let chosen = choose(route, &pick, |g| core.faults.is_isolated(g, now))
                .map(|(g, q)| (g.clone(), q))
                .ok_or_else(|| Error::NoRoute {
                    topic: topic.to_owned(),
                    reason: "no writable queue in the route".into(),
                })?;
            *last_choice.lock().unwrap_or_else(|p| p.into_inner()) = Some((chosen.0.broker_group.clone(), chosen.1));
            Ok(chosen)
        };
        let target = match pick {
            Pick::Index(_) => Target::AnyGroup { topic, pick: choose_in },
            Pick::Key { .. } | Pick::Queue { .. } => Target::Topic { topic, pick: choose_in },
        };
        let max = self.core.max_message_bytes();
        // One sequence number for every attempt of this RPC: the broker group
        // answers a retry of a stored send from its first attempt.
        let sequence = self.sequence.fetch_add(1, Ordering::Relaxed);
        let served = follow(&self.core, spec, target, |a: Attempt<Option<u32>>| {
            let req = pb::SendRequest {
                topic: topic.to_owned(),
                queue_id: a.choice,
                // One copy per attempt: the request owns its messages.
                messages: messages.to_vec(),
                producer_id: self.producer_id.to_string(),
                sequence,
                transactional: transaction.is_some(),
                producer_group: transaction.unwrap_or_default().to_owned(),
                trace: self.trace,
            };
            async move {
                MessagingServiceClient::new(a.channel)
                    .max_decoding_message_size(max)
                    .max_encoding_message_size(max)
                    .send(req)
                    .await
            }
        })
        .await
        .map_err(|e| {
            let last = last_choice.lock().unwrap_or_else(|p| p.into_inner()).take();
            bound_to_queue(topic, &pick, last, e)
        })?;
        if served.provisional {
            // The broker has the topic now (it auto-created it); let the next send
            // learn its real queues.
            self.core.routes.invalidate(topic);
        }
        receipts(&served.endpoint, &served.group, served.value, messages.len())
    }
}

/// A send bound to its queue (keyed or chosen) that ran out of time on `last`, the
/// group and queue it was chasing: say which group holds the queue and that the
/// send was not moved. Other failures, and unkeyed sends, are returned as they are.
fn bound_to_queue(topic: &str, pick: &Pick, last: Option<(String, Option<u32>)>, e: Error) -> Error {
    if !matches!(e, Error::DeadlineExceeded { .. }) || matches!(pick, Pick::Index(_)) {
        return e;
    }
    let Some((group, Some(queue_id))) = last else {
        return e;
    };
    Error::GroupUnavailable {
        topic: topic.to_owned(),
        group,
        queue_id,
        key: match pick {
            Pick::Key { key, .. } => Some(key.clone()),
            _ => None,
        },
        last: Box::new(e),
    }
}

/// A producer id unique across processes and hosts in practice: host, process,
/// start time in ns, and a per-process counter (two producers of one process
/// never share one, whatever the clock does).
pub(crate) fn new_producer_id() -> String {
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    let host: String = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .unwrap_or_else(|_| "localhost".into())
        .chars()
        .filter(|c| c.is_ascii_graphic())
        .take(64)
        .collect();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let mut id = format!(
        "{host}@{}@{nanos:x}@{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    );
    // The broker's limit; keep the unique tail.
    if id.len() > 128 {
        id = id.split_off(id.len() - 128);
    }
    id
}

fn one(mut receipts: Vec<SendReceipt>) -> Result<SendReceipt, Error> {
    // `receipts` checked the count already; this only guards the type.
    receipts.pop().ok_or_else(|| Error::Protocol {
        endpoint: String::new(),
        reason: "no receipt for a single message".into(),
    })
}

fn receipts(endpoint: &str, group: &str, resp: pb::SendResponse, sent: usize) -> Result<Vec<SendReceipt>, Error> {
    if resp.results.len() != sent {
        return Err(Error::Protocol {
            endpoint: endpoint.to_owned(),
            reason: format!("{} result(s) for {sent} message(s)", resp.results.len()),
        });
    }
    Ok(resp
        .results
        .into_iter()
        .map(|r| SendReceipt {
            message_id: r.message_id,
            broker_group: group.to_owned(),
            queue_id: r.queue_id,
            queue_offset: r.queue_offset,
            deliver_at_ms: r.deliver_at_ms,
            transaction_id: r.transaction_id,
        })
        .collect())
}

fn writable(g: &pb::GroupRoute) -> bool {
    let perm = g.perm;
    perm == pb::Permission::Unspecified as i32 || perm & pb::Permission::Write as i32 != 0
}

/// How many of `queued` fit in a batch that already holds `count` messages with
/// `bytes` of bodies: at most `max` messages and `MAX_AUTO_BATCH_BYTES`, except that
/// the byte limit never leaves a batch empty (one message always goes).
fn fitting(queued: &[(pb::Message, Waiter)], mut count: usize, mut bytes: usize, max: usize) -> usize {
    let mut take = 0;
    for (m, _) in queued {
        let too_big = count > 0 && bytes + m.body.len() > MAX_AUTO_BATCH_BYTES;
        if count >= max || too_big {
            break;
        }
        bytes += m.body.len();
        count += 1;
        take += 1;
    }
    take
}

/// The group and queue a pick names in `route`. A provisional route (topic not yet
/// known to any NameServer) has no queue counts, so the broker chooses the queue.
/// An unkeyed pick skips the groups `isolated` names while any other is writable.
fn choose<'r>(
    route: &'r TopicRoute,
    pick: &Pick,
    isolated: impl Fn(&str) -> bool,
) -> Option<(&'r pb::GroupRoute, Option<u32>)> {
    let mut groups: Vec<&pb::GroupRoute> = route.groups.iter().filter(|g| writable(g)).collect();
    if groups.is_empty() {
        return None;
    }
    if matches!(pick, Pick::Index(_)) && groups.iter().any(|g| !isolated(&g.broker_group)) {
        groups.retain(|g| !isolated(&g.broker_group));
    }
    match pick {
        Pick::Queue { group, queue_id } => Some((route.group(group)?, Some(*queue_id))),
        Pick::Index(n) | Pick::Key { hash: n, .. } if route.provisional => Some((groups[n % groups.len()], None)),
        Pick::Index(n) | Pick::Key { hash: n, .. } => {
            let n = *n;
            let total: usize = groups.iter().map(|g| g.queues as usize).sum();
            if total == 0 {
                return None;
            }
            let mut i = n % total;
            for g in groups {
                if i < g.queues as usize {
                    return Some((g, Some(i as u32)));
                }
                i -= g.queues as usize;
            }
            None
        }
    }
}

/// FNV-1a: tiny, and unlike `DefaultHasher` fixed across Rust versions and
/// processes, which per-key order across producers needs.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(queues: &[(&str, u32)]) -> TopicRoute {
        let resp = pb::QueryRouteResponse {
            topic: "t".into(),
            groups: queues
                .iter()
                .map(|(g, q)| pb::GroupRoute {
                    broker_group: (*g).into(),
                    leader_endpoint: format!("{g}:1"),
                    follower_endpoints: vec![],
                    queues: *q,
                    perm: pb::Permission::ReadWrite as i32,
                    message_type: 0,
                })
                .collect(),
        };
        let cache = crate::route::RouteCache::default();
        TopicRoute::clone(&cache.put(resp))
    }

    #[test]
    fn picks_cover_every_queue_of_every_group_in_a_stable_order() {
        let r = route(&[("b", 2), ("a", 3)]);
        let picked: Vec<(String, Option<u32>)> = (0..6)
            .map(|n| {
                let (g, q) = choose(&r, &Pick::Index(n), |_| false).unwrap();
                (g.broker_group.clone(), q)
            })
            .collect();
        let names: Vec<(&str, Option<u32>)> = picked.iter().map(|(g, q)| (g.as_str(), *q)).collect();
        assert_eq!(
            names,
            [
                ("a", Some(0)),
                ("a", Some(1)),
                ("a", Some(2)),
                ("b", Some(0)),
                ("b", Some(1)),
                ("a", Some(0))
            ]
        );
    }

    #[test]
    fn unkeyed_picks_skip_isolated_groups_but_keys_keep_their_queue() {
        let r = route(&[("a", 2), ("b", 2)]);
        let a_down = |g: &str| g == "a";
        for n in 0..4 {
            let (g, _) = choose(&r, &Pick::Index(n), a_down).unwrap();
            assert_eq!(g.broker_group, "b", "pick {n}");
        }
        // Every group isolated: unkeyed sends still use all of them, not none.
        let spread: std::collections::BTreeSet<String> = (0..4)
            .map(|n| choose(&r, &Pick::Index(n), |_| true).unwrap().0.broker_group.clone())
            .collect();
        assert_eq!(spread.len(), 2);
        for hash in 0..8 {
            let key = Pick::Key { hash, key: "k".into() };
            let with = choose(&r, &key, a_down).map(|(g, q)| (g.broker_group.clone(), q));
            let without = choose(&r, &key, |_| false).map(|(g, q)| (g.broker_group.clone(), q));
            assert_eq!(with, without, "a key's queue does not depend on isolation");
        }
    }

    #[test]
    fn a_batch_fits_the_count_and_byte_limits_but_never_leaves_empty() {
        let queued = |sizes: &[usize]| -> Vec<(pb::Message, Waiter)> {
            sizes
                .iter()
                .map(|&n| {
                    let m = pb::Message {
                        body: vec![0; n],
                        ..Default::default()
                    };
                    (m, oneshot::channel().0)
                })
                .collect()
        };
        assert_eq!(fitting(&queued(&[10; 5]), 0, 0, 3), 3, "count limit");
        assert_eq!(
            fitting(&queued(&[10; 5]), 2, 20, 3),
            1,
            "count includes what the batch holds"
        );
        let big = 600 * 1024;
        assert_eq!(
            fitting(&queued(&[big, big]), 0, 0, 128),
            1,
            "byte limit, one always goes"
        );
        assert_eq!(fitting(&queued(&[2 * MAX_AUTO_BATCH_BYTES]), 0, 0, 128), 1);
        assert_eq!(
            fitting(&queued(&[big]), 1, big, 128),
            0,
            "a started batch stays under the bytes"
        );
    }

    #[test]
    fn key_hash_is_fixed() {
        // Pinned: changing the hash would reorder keys across a client upgrade.
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
    }
}
