//! POP consumption (RocketMQ 5's SimpleConsumer) and the retry / dead-letter
//! moves, on the broker group's leader: receive, ack, change invisible duration,
//! forward to the dead-letter queue, and a push consumer's send-back.
//!
//! The decision of what a receive hands out is [`plan`], a pure function of the
//! group's applied POP state and the clock; this module's async shell reads the
//! messages, proposes one `PopReceive` command and answers with what the state
//! machine accepted (it re-checks every pick, see `raft_store::pop`). Receives of
//! one consumer group are serialized here so they do not race for the same
//! offsets; a race that still happens (e.g. a deposed leader) loses at apply.
//!
//! Receipt handles are opaque to clients: `1` | crc32c of the broker group (8
//! hex) | queue (8) | offset (16) | epoch (16). The epoch is the Raft index of the
//! entry that made the delivery, so a handle from an earlier delivery, or one
//! replaced by ChangeInvisibleDuration, no longer matches and is refused. The
//! queue field's top bit (queue ids stay far below it) says the message is
//! traced ([`crate::trace`]), so an ack of an untraced one reads nothing more.
//!
//! A new consumer group starts each queue at its lowest retained offset.

use std::collections::HashMap;
use std::time::Duration;

use openraft::async_runtime::WatchReceiver;
use raftmq_proto::v1 as pb;
use raftmq_raft_store::command::PERM_READ;
use raftmq_raft_store::command::tag_hash;
use raftmq_raft_store::{Command, MessageRef, PopPick, PopQueue, Response, StoredMessage};
use tokio::time::Instant;

use crate::api_error::ApiError;
use crate::convert;
use crate::filter::MessageFilter;
use crate::group::GroupHandle;
use crate::messaging::now_ms;
use crate::validate;

const DEFAULT_INVISIBLE: Duration = Duration::from_secs(30);
const MIN_INVISIBLE: Duration = Duration::from_secs(1);
const MAX_INVISIBLE: Duration = Duration::from_secs(12 * 3600);
/// Receives in flight at once are serialized per consumer group by one of these
/// locks (by hash of the name): a fixed set, so clients cannot grow it.
const LOCK_STRIPES: usize = 64;
/// Most handles in one Ack.
const MAX_ACK_HANDLES: usize = 1024;

/// A parsed receipt handle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReceiptHandle {
    pub group_crc: u32,
    pub queue_id: u32,
    pub offset: u64,
    pub epoch: u64,
    /// The message is traced (message trace).
    pub traced: bool,
}

/// The queue field's bit that marks a traced message's handle.
const TRACED_BIT: u32 = 1 << 31;

impl ReceiptHandle {
    pub fn encode(&self) -> String {
        let queue = self.queue_id | if self.traced { TRACED_BIT } else { 0 };
        format!(
            "1{:08x}{queue:08x}{:016x}{:016x}",
            self.group_crc, self.offset, self.epoch
        )
    }

    /// Parses a handle issued by broker group `group`.
    pub fn parse(handle: &str, group: &str) -> Result<ReceiptHandle, ApiError> {
        let bad = |why: &str| ApiError::InvalidArgument(format!("receipt handle {handle:?} {why}"));
        if handle.len() != 49 || !handle.starts_with('1') || !handle.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad("is not a receipt handle this broker issued"));
        }
        let hex =
            |r: std::ops::Range<usize>| u64::from_str_radix(&handle[r], 16).map_err(|_| bad("is not hexadecimal"));
        let queue = hex(9..17)? as u32;
        let h = ReceiptHandle {
            group_crc: hex(1..9)? as u32,
            queue_id: queue & !TRACED_BIT,
            offset: hex(17..33)?,
            epoch: hex(33..49)?,
            traced: queue & TRACED_BIT != 0,
        };
        if h.group_crc != crc32c::crc32c(group.as_bytes()) {
            return Err(bad(&format!("was issued by another broker group, not {group}")));
        }
        Ok(h)
    }
}

/// What [`plan`] decided for one queue.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueuePlan {
    pub queue_id: u32,
    pub redeliver: Vec<(u64, u64)>,
    /// Expired past the group's max reconsume times: to the dead-letter queue.
    pub dead: Vec<(u64, u64)>,
    /// New messages may be handed out from this queue's cursor.
    pub take_new: bool,
}

/// Decides a receive: first what expired (redelivered, or dead-lettered past
/// `max_reconsume_times` failures), then which queues may hand out new messages.
/// FIFO: a queue hands out nothing new while a message of it is in flight, and
/// redelivers its expired messages only in offset order up to the first one still
/// invisible. `room` is how many more messages the group may hold in flight.
/// Queues are visited from `start` round-robin, so members share them.
pub fn plan(
    queues: &[(u32, PopQueue)],
    now_ms: u64,
    fifo: bool,
    max_messages: usize,
    max_reconsume_times: u32,
    start: usize,
) -> Vec<QueuePlan> {
    let n = queues.len();
    let mut out = Vec::new();
    let mut budget = max_messages;
    for i in 0..n {
        let (queue_id, q) = &queues[(start + i) % n];
        let mut p = QueuePlan {
            queue_id: *queue_id,
            ..Default::default()
        };
        let mut blocked = false;
        for (&offset, f) in &q.inflight {
            if f.deadline_ms > now_ms {
                if fifo {
                    blocked = true;
                    break;
                }
                continue;
            }
            if f.attempt > max_reconsume_times {
                p.dead.push((offset, f.epoch));
            } else if budget > 0 {
                p.redeliver.push((offset, f.epoch));
                budget -= 1;
            } else if fifo {
                blocked = true;
                break;
            }
        }
        // FIFO: new messages only once nothing of the queue is in flight.
        let dead_or_redelivered = p.dead.len() + p.redeliver.len();
        p.take_new = !(fifo && (blocked || q.inflight.len() > dead_or_redelivered || !p.redeliver.is_empty()));
        out.push(p);
    }
    out
}

/// The POP endpoint of this node's broker group replica.
#[derive(Clone)]
pub struct Pop {
    group: GroupHandle,
    locks: std::sync::Arc<Vec<tokio::sync::Mutex<()>>>,
}

impl Pop {
    pub fn new(group: GroupHandle) -> Pop {
        Pop {
            group,
            locks: std::sync::Arc::new((0..LOCK_STRIPES).map(|_| tokio::sync::Mutex::new(())).collect()),
        }
    }

    fn lock(&self, consumer_group: &str) -> &tokio::sync::Mutex<()> {
        &self.locks[crc32c::crc32c(consumer_group.as_bytes()) as usize % LOCK_STRIPES]
    }

    /// Whether `consumer_group` has ever received by POP here (it is then a POP
    /// group, and heartbeating it as a clustering group is refused).
    pub fn is_pop_group(&self, consumer_group: &str) -> bool {
        self.group.store().with_pop(|p| p.groups.contains_key(consumer_group))
    }

    pub async fn receive(&self, req: pb::ReceiveRequest) -> Result<pb::ReceiveResponse, ApiError> {
        let g = &self.group;
        validate::consumer_group_name(&req.consumer_group)?;
        validate::topic_name(&req.topic)?;
        if !req.client_id.is_empty() {
            validate::client_id(&req.client_id)?;
        }
        let filter = MessageFilter::parse(req.filter_type, &req.filter_expression)?;
        let invisible = match req.invisible_duration_ms {
            0 => DEFAULT_INVISIBLE,
            ms => Duration::from_millis(ms),
        };
        if !(MIN_INVISIBLE..=MAX_INVISIBLE).contains(&invisible) {
            return Err(ApiError::InvalidArgument(format!(
                "invisible_duration_ms {} is outside {} to {} ms",
                req.invisible_duration_ms,
                MIN_INVISIBLE.as_millis(),
                MAX_INVISIBLE.as_millis()
            )));
        }
        let max = match req.max_messages {
            0 => crate::messaging::DEFAULT_PULL_MESSAGES,
            n => n,
        }
        .min(g.config().max_pull_messages) as usize;
        g.ensure_leader()?;
        let (known, groups) = g
            .store()
            .with_pop(|p| (p.groups.contains_key(&req.consumer_group), p.groups.len()));
        if !known && groups >= g.config().max_pop_groups {
            return Err(ApiError::ResourceExhausted(format!(
                "broker group {} already tracks {groups} POP consumer groups (max_pop_groups); \
                 consumer group {} cannot start",
                g.group(),
                req.consumer_group
            )));
        }
        let topic = g.topic_for_write(&req.topic).await?;
        if topic.perm & PERM_READ == 0 {
            return Err(ApiError::FailedPrecondition(format!(
                "topic {:?} is not readable",
                topic.name
            )));
        }
        let wait = Duration::from_millis(u64::from(req.max_wait_ms)).min(g.config().max_pull_wait);
        let deadline = Instant::now() + wait;
        let mut applied = g.raft().data_metrics();
        loop {
            // Serialized per group for the decision and its write only, never
            // across the long-poll wait, so members do not queue behind it.
            let (messages, next_deadline) = {
                let _serial = self.lock(&req.consumer_group).lock().await;
                let member = (req.consumer_group.as_str(), req.client_id.as_str());
                self.receive_once(member, &topic.name, topic.queues, &filter, max, invisible)
                    .await?
            };
            if !messages.is_empty() || Instant::now() >= deadline {
                if let Some(m) = g.metrics() {
                    m.received(&topic.name, messages.len());
                }
                return Ok(pb::ReceiveResponse {
                    broker_group: g.group().to_owned(),
                    messages,
                });
            }
            // Wake on new messages (applies), on the next in-flight deadline,
            // or at the long-poll deadline.
            let until = next_deadline
                .map(|d| Instant::now() + Duration::from_millis(d.saturating_sub(now_ms())))
                .map_or(deadline, |d| d.min(deadline));
            tokio::select! {
                changed = applied.changed() => if changed.is_err() {
                    return Err(ApiError::Unavailable("Raft on this node has stopped".into()));
                },
                _ = tokio::time::sleep_until(until) => {}
                _ = g.shutdown().cancelled() => return Err(ApiError::Unavailable("this node is shutting down".into())),
            }
        }
    }

    /// One planned receive; also the earliest in-flight deadline, for the wait.
    /// `member` is the consumer group and the receiving client's id.
    async fn receive_once(
        &self,
        (consumer_group, client_id): (&str, &str),
        topic: &str,
        queue_count: u32,
        filter: &MessageFilter,
        max: usize,
        invisible: Duration,
    ) -> Result<(Vec<pb::ReceivedMessage>, Option<u64>), ApiError> {
        let g = &self.group;
        let store = g.store().clone();
        let now = now_ms();
        let (config, queues, inflight) = store.with_pop(|p| {
            let group = p.groups.get(consumer_group);
            let queues: Vec<(u32, Option<PopQueue>)> = (0..queue_count)
                .map(|q| (q, group.and_then(|gr| gr.queues.get(&(topic.to_owned(), q))).cloned()))
                .collect();
            (p.config(consumer_group), queues, group.map_or(0, |gr| gr.inflight()))
        });
        let next_deadline = queues
            .iter()
            .filter_map(|(_, q)| q.as_ref())
            .flat_map(|q| q.inflight.values().map(|f| f.deadline_ms))
            .min();
        let cap = g.config().max_inflight_per_group;
        let room = cap.saturating_sub(inflight);
        let start = (now / 7) as usize; // spreads members over the queues
        let known: Vec<(u32, PopQueue)> = queues
            .iter()
            .map(|(id, q)| (*id, q.clone().unwrap_or_default()))
            .collect();
        let plans = plan(&known, now, config.fifo, max, config.max_reconsume_times, start);
        let redeliveries: usize = plans.iter().map(|p| p.redeliver.len()).sum();
        if room == 0 && redeliveries == 0 && plans.iter().all(|p| p.dead.is_empty()) {
            return Err(ApiError::ResourceExhausted(format!(
                "consumer group {consumer_group} holds {inflight} in-flight messages on broker group {}, \
                 the most allowed (max_inflight_per_group = {cap}); ack or let some expire first",
                g.group()
            )));
        }
        let fresh: HashMap<u32, bool> = queues.iter().map(|(id, q)| (*id, q.is_none())).collect();
        let filter = filter.clone();
        let topic_owned = topic.to_owned();
        // Reads (and filtering) happen off the async runtime.
        let task = tokio::task::spawn_blocking(move || -> std::io::Result<_> {
            let topic = topic_owned;
            let mut picks = Vec::new();
            let mut found: HashMap<(u32, u64), StoredMessage> = HashMap::new();
            // Expired past the max and traced: (queue, offset, ref, failed attempt).
            let mut dead_traced = Vec::new();
            let mut budget = max.saturating_sub(redeliveries).min(room);
            let hashes = filter.tag_hashes();
            for p in plans {
                let q = known.iter().find(|(id, _)| *id == p.queue_id).map(|(_, q)| q);
                let mut pick = PopPick {
                    queue_id: p.queue_id,
                    from_cursor: 0,
                    to_cursor: 0,
                    new: Vec::new(),
                    redeliver: p.redeliver.clone(),
                    dead: Vec::new(),
                };
                for &(offset, epoch) in &p.redeliver {
                    if let Some(m) = store.read_messages(&topic, p.queue_id, offset, 1)?.into_iter().next()
                        && m.queue_offset == offset
                    {
                        found.insert((p.queue_id, offset), m);
                    } else {
                        // No longer retained: nothing to redeliver, so let it go.
                        pick.redeliver.retain(|r| *r != (offset, epoch));
                    }
                }
                for &(offset, epoch) in &p.dead {
                    if let Some(r) = store.row_ref(&topic, p.queue_id, offset)? {
                        pick.dead.push((offset, epoch, r));
                        // Rare (a message failed every attempt): one more read.
                        if store
                            .message_record(r.raft_index, r.batch_pos)?
                            .is_some_and(|m| crate::trace::is_traced(&m.message.properties))
                        {
                            let attempt = q.and_then(|q| q.inflight.get(&offset)).map_or(0, |f| f.attempt);
                            dead_traced.push((p.queue_id, offset, r, attempt));
                        }
                    }
                }
                if p.take_new && budget > 0 {
                    let max_offset = store.queue_next_offset(&topic, p.queue_id)?;
                    let min_offset = store.queue_min_offset(&topic, p.queue_id)?.min(max_offset);
                    let cursor = if fresh.get(&p.queue_id).copied().unwrap_or(true) {
                        min_offset
                    } else {
                        q.map_or(0, |q| q.cursor)
                    };
                    pick.from_cursor = cursor;
                    // Below the retained minimum there is nothing left to hand out.
                    let mut next = cursor.max(min_offset);
                    let scan_limit = (budget * 16).max(1024) as u64;
                    'scan: while next < max_offset && budget > 0 && next - cursor < scan_limit {
                        let rows = if hashes.is_some() { budget.max(256) } else { budget };
                        let (chunk, scanned_to) =
                            store.read_messages_tagged(&topic, p.queue_id, next, rows, hashes.as_deref())?;
                        if scanned_to <= next {
                            break;
                        }
                        for m in chunk {
                            if m.queue_offset >= max_offset {
                                break 'scan;
                            }
                            next = m.queue_offset + 1;
                            if filter.matches(&m.message.tag, &m.message.properties) {
                                pick.new.push(m.queue_offset);
                                found.insert((p.queue_id, m.queue_offset), m);
                                budget -= 1;
                                if budget == 0 {
                                    break 'scan;
                                }
                            }
                        }
                        next = next.max(scanned_to.min(max_offset));
                    }
                    pick.to_cursor = next;
                }
                if !pick.new.is_empty()
                    || pick.to_cursor > pick.from_cursor
                    || !pick.redeliver.is_empty()
                    || !pick.dead.is_empty()
                {
                    picks.push(pick);
                }
            }
            Ok((picks, found, dead_traced))
        });
        let (picks, mut found, dead_traced) = task
            .await
            .map_err(|e| ApiError::blocking_task("reading messages to hand out", e))?
            .map_err(|e| ApiError::storage("reading messages to hand out", e))?;
        if picks.is_empty() {
            return Ok((Vec::new(), next_deadline));
        }
        let invisible_ms = invisible.as_millis() as u64;
        let written = g
            .write(Command::PopReceive {
                group: consumer_group.to_owned(),
                topic: topic.to_owned(),
                now_ms: now,
                invisible_ms,
                picks,
            })
            .await?;
        let Response::Popped { accepted } = written.response else {
            return Err(ApiError::Internal(format!(
                "POP receive was answered with {}",
                written.response
            )));
        };
        for (queue_id, offset, r, attempt) in dead_traced {
            g.tracer().pop_outcome(
                pb::TraceEventKind::DeadLettered,
                (consumer_group, topic),
                (queue_id, offset),
                r,
                attempt,
                "invisible time expired past the group's max reconsume times",
            );
        }
        let group_crc = crc32c::crc32c(g.group().as_bytes());
        let messages = accepted
            .into_iter()
            .filter_map(|(queue_id, offset, attempt)| {
                let m = found.remove(&(queue_id, offset))?;
                let traced = crate::trace::is_traced(&m.message.properties);
                if traced {
                    g.tracer()
                        .popped(consumer_group, client_id, &m, attempt, now + invisible_ms);
                }
                Some(pb::ReceivedMessage {
                    message: Some(pb::PulledMessage {
                        reconsume_times: attempt - 1,
                        ..convert::pulled_message(g.group(), m)
                    }),
                    receipt_handle: ReceiptHandle {
                        group_crc,
                        queue_id,
                        offset,
                        epoch: written.index,
                        traced,
                    }
                    .encode(),
                    delivery_attempt: attempt,
                    invisible_until_ms: now + invisible_ms,
                })
            })
            .collect();
        Ok((messages, next_deadline))
    }

    pub async fn ack(&self, req: pb::AckRequest) -> Result<pb::AckResponse, ApiError> {
        let g = &self.group;
        validate::consumer_group_name(&req.consumer_group)?;
        validate::topic_name(&req.topic)?;
        if req.receipt_handles.is_empty() || req.receipt_handles.len() > MAX_ACK_HANDLES {
            return Err(ApiError::InvalidArgument(format!(
                "an ack carries 1 to {MAX_ACK_HANDLES} receipt handles, not {}",
                req.receipt_handles.len()
            )));
        }
        let handles = req
            .receipt_handles
            .iter()
            .map(|h| ReceiptHandle::parse(h, g.group()))
            .collect::<Result<Vec<_>, _>>()?;
        g.ensure_leader()?;
        // Traced deliveries' attempts, read while they are still in flight
        // (nothing at all when no handle is traced).
        let attempts: Vec<u32> = if handles.iter().any(|h| h.traced) {
            let attempt = |h: &ReceiptHandle| {
                crate::trace::inflight_attempt(g.store(), &req.consumer_group, &req.topic, h.queue_id, h.offset)
            };
            handles.iter().map(attempt).collect()
        } else {
            Vec::new()
        };
        let written = g
            .write(Command::PopAck {
                group: req.consumer_group.clone(),
                topic: req.topic.clone(),
                acks: handles.iter().map(|h| (h.queue_id, h.offset, h.epoch)).collect(),
            })
            .await?;
        let Response::PopAcked { ok } = written.response else {
            return Err(ApiError::Internal(format!(
                "POP ack was answered with {}",
                written.response
            )));
        };
        for ((h, ok), &attempt) in handles.iter().zip(&ok).zip(&attempts) {
            if h.traced
                && *ok
                && let Ok(Some(r)) = g.store().row_ref(&req.topic, h.queue_id, h.offset)
            {
                g.tracer().pop_outcome(
                    pb::TraceEventKind::Acked,
                    (&req.consumer_group, &req.topic),
                    (h.queue_id, h.offset),
                    r,
                    attempt,
                    "pop ack",
                );
            }
        }
        if let Some(m) = g.metrics() {
            m.acked(&req.topic, ok.iter().filter(|ok| **ok).count());
        }
        Ok(pb::AckResponse {
            results: req
                .receipt_handles
                .into_iter()
                .zip(ok)
                .map(|(receipt_handle, ok)| pb::AckResult {
                    receipt_handle,
                    ok,
                    error: if ok { String::new() } else { stale_handle() },
                })
                .collect(),
        })
    }

    pub async fn change_invisible_duration(
        &self,
        req: pb::ChangeInvisibleDurationRequest,
    ) -> Result<pb::ChangeInvisibleDurationResponse, ApiError> {
        let g = &self.group;
        validate::consumer_group_name(&req.consumer_group)?;
        validate::topic_name(&req.topic)?;
        let h = ReceiptHandle::parse(&req.receipt_handle, g.group())?;
        if req.invisible_duration_ms > MAX_INVISIBLE.as_millis() as u64 {
            return Err(ApiError::InvalidArgument(format!(
                "invisible_duration_ms {} exceeds {} ms",
                req.invisible_duration_ms,
                MAX_INVISIBLE.as_millis()
            )));
        }
        g.ensure_leader()?;
        let duration_ms = if req.invisible_duration_ms == 0 {
            // A nack without a duration: the group's backoff for this attempt.
            g.store().with_pop(|p| {
                let attempt = p
                    .groups
                    .get(&req.consumer_group)
                    .and_then(|gr| gr.queues.get(&(req.topic.clone(), h.queue_id)))
                    .and_then(|q| q.inflight.get(&h.offset))
                    .map_or(1, |f| f.attempt);
                p.config(&req.consumer_group).retry_delay_ms(attempt)
            })
        } else {
            req.invisible_duration_ms
        };
        let deadline_ms = now_ms() + duration_ms;
        let written = g
            .write(Command::PopChangeInvisible {
                group: req.consumer_group,
                topic: req.topic,
                queue_id: h.queue_id,
                offset: h.offset,
                epoch: h.epoch,
                deadline_ms,
            })
            .await?;
        match written.response {
            Response::PopChanged { ok: true } => Ok(pb::ChangeInvisibleDurationResponse {
                receipt_handle: ReceiptHandle {
                    epoch: written.index,
                    ..h
                }
                .encode(),
                invisible_until_ms: deadline_ms,
            }),
            Response::PopChanged { ok: false } => Err(ApiError::FailedPrecondition(stale_handle())),
            other => Err(ApiError::Internal(format!(
                "change of invisible time was answered with {other}"
            ))),
        }
    }

    pub async fn forward_to_dead_letter(
        &self,
        req: pb::ForwardToDeadLetterRequest,
    ) -> Result<pb::ForwardToDeadLetterResponse, ApiError> {
        let g = &self.group;
        validate::consumer_group_name(&req.consumer_group)?;
        validate::topic_name(&req.topic)?;
        let h = ReceiptHandle::parse(&req.receipt_handle, g.group())?;
        g.ensure_leader()?;
        let message = g
            .store()
            .row_ref(&req.topic, h.queue_id, h.offset)
            .map_err(|e| ApiError::storage("reading the message to dead-letter", e))?
            .ok_or_else(|| {
                ApiError::NotFound(format!(
                    "{}/{}@{} is no longer retained",
                    req.topic, h.queue_id, h.offset
                ))
            })?;
        let attempt = if h.traced {
            crate::trace::inflight_attempt(g.store(), &req.consumer_group, &req.topic, h.queue_id, h.offset)
        } else {
            0
        };
        let traced = h.traced.then(|| (req.consumer_group.clone(), req.topic.clone()));
        let written = g
            .write(Command::PopDeadLetter {
                group: req.consumer_group,
                topic: req.topic,
                queue_id: h.queue_id,
                offset: h.offset,
                epoch: h.epoch,
                message,
                store_timestamp_ms: now_ms(),
            })
            .await?;
        match written.response {
            Response::PopChanged { ok: true } => {
                if let Some((consumer_group, topic)) = traced {
                    g.tracer().pop_outcome(
                        pb::TraceEventKind::DeadLettered,
                        (&consumer_group, &topic),
                        (h.queue_id, h.offset),
                        message,
                        attempt,
                        "forwarded by the consumer",
                    );
                }
                Ok(pb::ForwardToDeadLetterResponse {})
            }
            Response::PopChanged { ok: false } => Err(ApiError::FailedPrecondition(stale_handle())),
            other => Err(ApiError::Internal(format!("dead-lettering was answered with {other}"))),
        }
    }

    /// A push consumer's failed message: to `%RETRY%<group>` after the group's
    /// backoff, or past its max reconsume times to `%DLQ%<group>`.
    pub async fn send_back(&self, req: pb::SendBackRequest) -> Result<pb::SendBackResponse, ApiError> {
        let g = &self.group;
        validate::consumer_group_name(&req.consumer_group)?;
        let id = convert::parse_message_id(&req.message_id)?;
        if id.group_crc != crc32c::crc32c(g.group().as_bytes()) {
            return Err(ApiError::InvalidArgument(format!(
                "message id {} was issued by another broker group, not {}",
                req.message_id,
                g.group()
            )));
        }
        g.ensure_leader()?;
        // The whole record (not only its ref): its properties say whether it is traced.
        let stored = g
            .store()
            .message_record(id.raft_index, id.batch_pos)
            .map_err(|e| ApiError::storage("reading the message to send back", e))?
            .ok_or_else(|| ApiError::NotFound(format!("message {} is not retained here", req.message_id)))?;
        let message = MessageRef {
            raft_index: id.raft_index,
            batch_pos: id.batch_pos,
            size: stored.message.body.len() as u32,
            tag_hash: tag_hash(&stored.message.tag),
        };
        let config = g.store().with_pop(|p| p.config(&req.consumer_group));
        let reconsume_times = req.reconsume_times.saturating_add(1);
        let now = now_ms();
        let due_ms = if reconsume_times > config.max_reconsume_times {
            0
        } else if req.delay_ms != 0 {
            if req.delay_ms > g.config().max_delay.as_millis() as u64 {
                return Err(ApiError::InvalidArgument(format!(
                    "delay_ms {} exceeds the broker's maximum delay",
                    req.delay_ms
                )));
            }
            now + req.delay_ms
        } else {
            now + config.retry_delay_ms(reconsume_times)
        };
        let written = g
            .write(Command::SendBack {
                group: req.consumer_group.clone(),
                message,
                reconsume_times,
                due_ms,
                store_timestamp_ms: now,
            })
            .await?;
        if let Response::SentBack { dead_lettered } = written.response
            && crate::trace::is_traced(&stored.message.properties)
        {
            g.tracer().sent_back(
                &req.consumer_group,
                &stored,
                &req.message_id,
                reconsume_times,
                (dead_lettered, now, due_ms),
            );
        }
        match written.response {
            Response::SentBack { dead_lettered } => Ok(pb::SendBackResponse {
                dead_lettered,
                deliver_at_ms: if dead_lettered { 0 } else { due_ms },
            }),
            other => Err(ApiError::Internal(format!("send-back was answered with {other}"))),
        }
    }
}

fn stale_handle() -> String {
    "stale receipt handle: the message was acked, handed out again, or its invisible time was changed \
     since this handle was issued"
        .to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use raftmq_raft_store::InFlight;

    fn queue(cursor: u64, inflight: &[(u64, u64, u32)]) -> PopQueue {
        PopQueue {
            cursor,
            inflight: inflight
                .iter()
                .map(|&(offset, deadline_ms, attempt)| {
                    (
                        offset,
                        InFlight {
                            deadline_ms,
                            attempt,
                            epoch: offset + 100,
                        },
                    )
                })
                .collect(),
        }
    }

    #[test]
    fn handles_round_trip_and_foreign_or_garbled_ones_are_refused() {
        let h = ReceiptHandle {
            group_crc: crc32c::crc32c(b"broker-a"),
            queue_id: 3,
            offset: 99,
            epoch: 1234,
            traced: false,
        };
        assert_eq!(ReceiptHandle::parse(&h.encode(), "broker-a").unwrap(), h);
        // A traced handle keeps its queue and says so; an untraced one reads as before.
        let t = ReceiptHandle { traced: true, ..h };
        assert_eq!(t.encode().len(), h.encode().len());
        assert_eq!(ReceiptHandle::parse(&t.encode(), "broker-a").unwrap(), t);
        assert_eq!(&h.encode()[9..17], "00000003");
        assert!(ReceiptHandle::parse(&h.encode(), "broker-b").is_err());
        assert!(ReceiptHandle::parse("xyz", "broker-a").is_err());
        assert!(ReceiptHandle::parse(&h.encode().replace('1', "2"), "broker-a").is_err());
    }

    #[test]
    fn expired_messages_are_redelivered_before_new_ones_and_past_the_max_go_dead() {
        let qs = vec![(0, queue(10, &[(3, 50, 1), (4, 500, 1), (5, 50, 17)]))];
        let p = plan(&qs, 100, false, 32, 16, 0);
        assert_eq!(p[0].redeliver, vec![(3, 103)]);
        assert_eq!(p[0].dead, vec![(5, 105)]);
        assert!(p[0].take_new);
    }

    #[test]
    fn nothing_expires_early() {
        let qs = vec![(0, queue(10, &[(3, 101, 1)]))];
        let p = plan(&qs, 100, false, 32, 16, 0);
        assert!(p[0].redeliver.is_empty() && p[0].dead.is_empty());
    }

    #[test]
    fn fifo_blocks_a_queue_while_anything_of_it_is_in_flight() {
        // Offset 3 still invisible: 4 expired must wait, and nothing new.
        let qs = vec![(0, queue(10, &[(3, 500, 1), (4, 50, 1)])), (1, queue(0, &[]))];
        let p = plan(&qs, 100, true, 32, 16, 0);
        assert!(p[0].redeliver.is_empty() && !p[0].take_new);
        assert!(p[1].take_new);
        // Both expired: redelivered in order, still nothing new.
        let qs = vec![(0, queue(10, &[(3, 50, 1), (4, 50, 1)]))];
        let p = plan(&qs, 100, true, 32, 16, 0);
        assert_eq!(p[0].redeliver, vec![(3, 103), (4, 104)]);
        assert!(!p[0].take_new);
        // Only dead ones: they leave, and the queue moves on.
        let qs = vec![(0, queue(10, &[(3, 50, 17)]))];
        let p = plan(&qs, 100, true, 32, 16, 0);
        assert_eq!(p[0].dead, vec![(3, 103)]);
        assert!(p[0].take_new);
    }

    #[test]
    fn the_budget_caps_redeliveries_and_rotation_starts_where_told() {
        let qs = vec![(0, queue(0, &[(1, 0, 1), (2, 0, 1)])), (1, queue(0, &[(7, 0, 1)]))];
        let p = plan(&qs, 100, false, 1, 16, 1);
        assert_eq!(p[0].queue_id, 1);
        assert_eq!(p[0].redeliver, vec![(7, 107)]);
        assert!(p[1].redeliver.is_empty());
    }
}
