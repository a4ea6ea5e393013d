//! `raftmq.v1.MessagingService`: Send (validated at the edge, one Raft entry per
//! request, leader only; a transactional send stores a half message) and Pull
//! (from this replica's applied state, with long polling and tag filtering).
//! EndTransaction and TransactionChecks are served by [`crate::transactions`];
//! consumer groups and offset commits are [`crate::consumer_group`]'s.
//!
//! Long polling waits on openraft's data-metrics watch, which changes whenever
//! this replica applies entries (among other things); each wake re-reads the
//! queue's next offset, one RocksDB point read, so a wait costs nothing while the
//! group is idle and never spins.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use openraft::async_runtime::WatchReceiver;
use raftmq_proto::v1 as pb;
use raftmq_proto::v1::messaging_service_server::{MessagingService, MessagingServiceServer};
use raftmq_raft_store::command::{PERM_READ, PERM_WRITE};
use raftmq_raft_store::{AppendBatch, Command, HalfSpec, ProducerSeq, Response, TopicConfig};
use raftmq_raft_store::{Permission, ResourceKind};
use tokio::time::Instant;
use tonic::{Request, Status};
use tracing::Instrument;

use crate::api_error::ApiError;
use crate::convert;
use crate::filter::MessageFilter;
use crate::group::GroupHandle;
use crate::transactions::{CheckStream, Transactions};
use crate::validate;

/// Messages a Pull returns when the request leaves `max_messages` at 0.
pub const DEFAULT_PULL_MESSAGES: u32 = 32;

/// The messaging endpoint of this node's broker group replica.
#[derive(Clone)]
pub struct Messaging {
    group: GroupHandle,
    txns: std::sync::Arc<Transactions>,
    /// This node's disk: sends are refused while it is past the full watermark.
    disk: crate::retention::DiskState,
}

impl Messaging {
    pub fn new(group: GroupHandle, txns: std::sync::Arc<Transactions>) -> Self {
        Messaging {
            group,
            txns,
            disk: Default::default(),
        }
    }

    /// Refuse sends while `disk` says the disk is full.
    pub fn with_disk(mut self, disk: crate::retention::DiskState) -> Self {
        self.disk = disk;
        self
    }

    pub fn into_server(self, max_message_bytes: usize) -> MessagingServiceServer<Self> {
        MessagingServiceServer::new(self)
            .max_decoding_message_size(max_message_bytes)
            .max_encoding_message_size(max_message_bytes)
    }

    async fn send(&self, req: pb::SendRequest) -> Result<pb::SendResponse, ApiError> {
        let started = std::time::Instant::now();
        let g = &self.group;
        validate::send_request(&req, g.config())?;
        g.ensure_leader()?;
        // One atomic load; the monitor computes the flag in the background.
        self.disk.check_write()?;
        let mut topic = match g.topic_for_write(&req.topic).await {
            Ok(t) => t,
            Err(ApiError::NotFound(_)) if g.config().auto_create_topics => self.auto_create(&req.topic).await?,
            Err(e) => return Err(e),
        };
        if topic.perm & PERM_WRITE == 0 {
            return Err(ApiError::FailedPrecondition(format!(
                "topic {:?} is not writable",
                topic.name
            )));
        }
        if req.queue_id.is_some_and(|q| q >= topic.queues) {
            // As for a missing topic: a queue-count increase may be committed but
            // not yet applied on a just-elected leader.
            g.catch_up().await?;
            topic = g.topic(&req.topic)?;
        }
        let queue_id = match req.queue_id {
            Some(q) => {
                g.check_queue(&topic, q)?;
                q
            }
            None => g.next_queue(&topic.name, topic.queues),
        };
        tracing::Span::current().record("queue", queue_id);
        // Message trace: two flags already at hand; the rest only when set.
        let traced = (req.trace || topic.trace) && crate::trace::traceable(&topic.name);
        let count = req.messages.len();
        // Only summed when someone reads it: one pass over the batch.
        let body_bytes = g
            .metrics()
            .map_or(0, |_| req.messages.iter().map(|m| m.body.len()).sum::<usize>());
        // Stamped once here so every replica stores the same time.
        let store_timestamp_ms = now_ms();
        let due = validate::delivery_times(&req.messages, store_timestamp_ms, g.config().max_delay)?;
        let mut messages: Vec<_> = req.messages.into_iter().map(convert::message_from_pb).collect();
        for (i, m) in messages.iter_mut().enumerate() {
            m.deliver_at_ms = due.as_ref().map_or(0, |d| d[i]);
        }
        let trace_producer = if traced {
            crate::trace::mark(&mut messages);
            Some(req.producer_id.clone())
        } else {
            None
        };
        let producer = (!req.producer_id.is_empty()).then_some(ProducerSeq {
            producer_id: req.producer_id,
            sequence: req.sequence,
        });
        let transaction = if req.transactional {
            let max = g.config().max_pending_transactions;
            let pending = g.store().with_txn(|t| t.pending_count());
            if pending >= max {
                return Err(ApiError::ResourceExhausted(format!(
                    "broker group {} already holds {pending} pending half messages (max_pending_transactions {max})",
                    g.group()
                )));
            }
            let first = u64::try_from(g.config().transaction_first_check.as_millis()).unwrap_or(u64::MAX);
            Some(HalfSpec {
                producer_group: req.producer_group,
                first_check_ms: store_timestamp_ms.saturating_add(first),
            })
        } else {
            None
        };
        let batch = AppendBatch {
            topic: req.topic,
            queue_id,
            store_timestamp_ms,
            messages,
            producer,
            transaction,
        };
        let written = g.write(Command::Append(batch)).await?;
        let stored_by = written.index;
        let (index, response, queue_id) = match written.response {
            // A retry of a send already stored: answer as the first attempt did.
            Response::Duplicate {
                raft_index,
                queue_id,
                first_offset,
                count,
                scheduled,
                half,
            } => {
                tracing::debug!(raft_index, "duplicate send answered from the producer's window");
                let response = if half {
                    Response::HalfStored { count }
                } else if scheduled {
                    Response::Scheduled { count }
                } else {
                    Response::Appended {
                        queue_id,
                        first_offset,
                        count,
                    }
                };
                (raft_index, response, queue_id)
            }
            other => (written.index, other, queue_id),
        };
        let answer = match response {
            Response::HalfStored { count: n } if n as usize == count => Ok(pb::SendResponse {
                results: (0..n)
                    .map(|pos| {
                        let id = convert::message_id(g.group(), index, pos);
                        pb::SendResult {
                            message_id: id.clone(),
                            queue_id,
                            queue_offset: 0,
                            deliver_at_ms: 0,
                            transaction_id: id,
                        }
                    })
                    .collect(),
            }),
            Response::Scheduled { count: n } if n as usize == count => Ok(pb::SendResponse {
                results: (0..n)
                    .map(|pos| pb::SendResult {
                        message_id: convert::message_id(g.group(), index, pos),
                        queue_id,
                        queue_offset: 0,
                        deliver_at_ms: due.as_ref().map_or(0, |d| d[pos as usize]),
                        transaction_id: String::new(),
                    })
                    .collect(),
            }),
            Response::Appended {
                queue_id,
                first_offset,
                count: n,
            } if n as usize == count => Ok(pb::SendResponse {
                results: (0..n)
                    .map(|pos| pb::SendResult {
                        message_id: convert::message_id(g.group(), index, pos),
                        queue_id,
                        queue_offset: first_offset + u64::from(pos),
                        deliver_at_ms: 0,
                        transaction_id: String::new(),
                    })
                    .collect(),
            }),
            other => Err(ApiError::Internal(format!(
                "append of {count} message(s) was answered with {other}"
            ))),
        };
        if let (Ok(_), Some(m)) = (&answer, g.metrics()) {
            m.sent(&topic.name, count, body_bytes, started.elapsed());
        }
        // A retry answered from the producer's window was traced by its first attempt.
        if let (Some(producer), Ok(sent)) = (trace_producer, &answer)
            && index == stored_by
        {
            g.tracer()
                .produced(&topic.name, index, &sent.results, &producer, store_timestamp_ms);
        }
        answer
    }

    async fn auto_create(&self, name: &str) -> Result<TopicConfig, ApiError> {
        let config = TopicConfig {
            name: name.to_owned(),
            queues: self.group.config().default_queues,
            perm: PERM_READ | PERM_WRITE,
            // MIXED: the send that creates the topic may be of any type (`raftmq
            // dev` auto-creates topics, and SDK users send every kind to them), so
            // the topic accepts them all rather than only the first one's.
            message_type: raftmq_raft_store::TopicMessageType::Mixed,
            trace: false,
        };
        tracing::info!(topic = name, queues = config.queues, "auto-creating topic");
        self.group.write(Command::UpsertTopic(config)).await?;
        self.group.topics_changed();
        // Re-read: a concurrent create or update may have won, and its config stands.
        self.group.topic(name)
    }

    async fn pull(&self, req: pb::PullRequest) -> Result<pb::PullResponse, ApiError> {
        let g = &self.group;
        validate::topic_name(&req.topic)?;
        if !req.consumer_group.is_empty() {
            validate::consumer_group_name(&req.consumer_group)?;
            if !req.client_id.is_empty() {
                validate::client_id(&req.client_id)?;
            }
        }
        let filter = MessageFilter::parse(req.filter_type, &req.tag_expression)?;
        let topic = g.topic(&req.topic)?;
        g.check_queue(&topic, req.queue_id)?;
        if topic.perm & PERM_READ == 0 {
            return Err(ApiError::FailedPrecondition(format!(
                "topic {:?} is not readable",
                topic.name
            )));
        }
        let max = match req.max_messages {
            0 => DEFAULT_PULL_MESSAGES,
            n => n,
        }
        .min(g.config().max_pull_messages) as usize;
        let wait = Duration::from_millis(u64::from(req.max_wait_ms)).min(g.config().max_pull_wait);
        let deadline = Instant::now() + wait;
        let authoritative = self.catch_up_if_behind(&req.topic, req.queue_id, req.offset).await?;
        // Subscribe before the first read, so an apply between the read and the
        // wait still wakes us.
        let mut applied = g.raft().data_metrics();
        let mut offset = req.offset;
        loop {
            let read = self
                .read(&req.topic, req.queue_id, offset, max, &filter, authoritative)
                .await?;
            if !read.messages.is_empty() || Instant::now() >= deadline {
                if let Some(m) = g.metrics() {
                    m.pulled(&req.topic, read.messages.len());
                }
                // A pull naming its consumer group delivers to it (message trace).
                if !req.consumer_group.is_empty() {
                    g.tracer()
                        .pulled(&req.consumer_group, &req.client_id, &req.topic, &read.messages);
                }
                return Ok(read);
            }
            // Nothing matched yet: wait from where this read stopped, so messages
            // skipped by the filter are not scanned again.
            offset = read.next_offset;
            tracing::trace!(offset, max_offset = read.max_offset, "long poll waiting");
            tokio::select! {
                changed = applied.changed() => {
                    if changed.is_err() {
                        // Raft stopped; answer with what we have.
                        return Ok(read);
                    }
                }
                _ = tokio::time::sleep_until(deadline) => {}
                _ = g.shutdown().cancelled() => return Ok(read),
            }
        }
    }

    /// A pull past the end of the queue on a leader may be a leader that has not
    /// applied its predecessors' last entries yet (just elected, or restarted
    /// with the whole group): answering from that state would rewind the
    /// consumer to this replica's shorter queue and have it read the same
    /// messages again. So the leader first catches up with everything committed
    /// (one ReadIndex round; only such a miss pays for it). A follower answers
    /// from what it has, as documented.
    ///
    /// Returns whether this replica's queue end is authoritative: true on a
    /// leader (caught up when the pull was past its end), false on a follower
    /// or a leader deposed meanwhile, which cannot tell a consumer ahead of it
    /// from one past the group's end.
    async fn catch_up_if_behind(&self, topic: &str, queue_id: u32, offset: u64) -> Result<bool, ApiError> {
        let g = &self.group;
        let max = g
            .store()
            .queue_next_offset(topic, queue_id)
            .map_err(|e| ApiError::storage("reading the queue's end", e))?;
        if g.ensure_leader().is_err() {
            return Ok(false);
        }
        if offset <= max {
            return Ok(true);
        }
        match g.catch_up().await {
            Ok(()) => Ok(true),
            // Deposed meanwhile: answer from what this replica has.
            Err(ApiError::NotLeader { .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// One read of up to `max` matching messages from `offset`. Offsets below the
    /// queue's minimum start at the minimum; at or past its maximum the answer is
    /// empty with `next_offset` = the maximum, so a consumer with a stale offset
    /// resumes at the head. Filtered-out messages still advance `next_offset`.
    ///
    /// Only an `authoritative` (leader) end may pull a consumer back: a replica
    /// that is behind (a follower, or a deposed leader a client still takes for
    /// the leader, seen after a whole-group restart in the chaos run) would
    /// rewind the consumer to its shorter queue and have it read the same
    /// messages twice. It answers empty with `next_offset` = the asked offset,
    /// as a RocketMQ slave answers OFFSET_OVERFLOW_BADLY with a retry rather
    /// than OFFSET_MOVED.
    async fn read(
        &self,
        topic: &str,
        queue_id: u32,
        offset: u64,
        max: usize,
        filter: &MessageFilter,
        authoritative: bool,
    ) -> Result<pb::PullResponse, ApiError> {
        let store = self.group.store().clone();
        let (topic, filter) = (topic.to_owned(), filter.clone());
        let group = self.group.group().to_owned();
        // Bounded in bytes too (but always carrying at least one message, or a
        // large one could never be read), so default gRPC clients can decode it.
        let max_bytes = self.group.config().max_pull_bytes;
        // Bounds the rows scanned for a sparse tag, so one pull cannot read a whole queue.
        let scan_limit = (max * 16).max(1024) as u64;
        let task = tokio::task::spawn_blocking(move || -> std::io::Result<pb::PullResponse> {
            // Max first, and min never above it: the two reads are not one
            // snapshot, and an empty queue's min is its next offset, so a message
            // applied between them would otherwise give min = max = 1 with offset 0
            // never read, and the consumer would skip that message.
            let max_offset = store.queue_next_offset(&topic, queue_id)?;
            let min_offset = store.queue_min_offset(&topic, queue_id)?.min(max_offset);
            if offset > max_offset && !authoritative {
                return Ok(pb::PullResponse {
                    messages: Vec::new(),
                    next_offset: offset,
                    min_offset,
                    max_offset,
                });
            }
            let start = offset.clamp(min_offset, max_offset);
            let mut next = start;
            let mut messages = Vec::new();
            let mut bytes = 0usize;
            let hashes = filter.tag_hashes();
            'scan: while next < max_offset && messages.len() < max && next - start < scan_limit {
                // Rows whose tag hash cannot match are skipped without reading
                // their entry; a filtered scan may cover more rows than `max`.
                let rows = if hashes.is_some() { max.max(256) } else { max };
                let (chunk, scanned_to) =
                    store.read_messages_tagged(&topic, queue_id, next, rows, hashes.as_deref())?;
                if scanned_to <= next {
                    break;
                }
                for m in chunk {
                    // Rows applied since max_offset was read wait for the next pull,
                    // so next_offset never passes the max_offset we report.
                    if m.queue_offset >= max_offset {
                        break 'scan;
                    }
                    if !messages.is_empty() && bytes + m.message.body.len() > max_bytes {
                        break 'scan;
                    }
                    next = m.queue_offset + 1;
                    if filter.matches(&m.message.tag, &m.message.properties) {
                        bytes += m.message.body.len();
                        messages.push(convert::pulled_message(&group, m));
                        if messages.len() == max {
                            break 'scan;
                        }
                    }
                }
                // Past the rows the hash skipped, but never past what we report.
                next = next.max(scanned_to.min(max_offset));
            }
            Ok(pb::PullResponse {
                messages,
                next_offset: next,
                min_offset,
                max_offset,
            })
        });
        task.await
            .map_err(|e| ApiError::blocking_task("reading messages", e))?
            .map_err(|e| ApiError::storage("reading messages", e))
    }
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

#[tonic::async_trait]
impl MessagingService for Messaging {
    async fn send(&self, request: Request<pb::SendRequest>) -> Result<tonic::Response<pb::SendResponse>, Status> {
        self.group.auth().publish(&request, &request.get_ref().topic)?;
        let req = request.into_inner();
        let span = tracing::info_span!(
            "send",
            group = %self.group.group(),
            topic = %req.topic,
            queue = tracing::field::Empty,
            messages = req.messages.len()
        );
        if let Some(q) = req.queue_id {
            span.record("queue", q);
        }
        async {
            let result = Messaging::send(self, req).await;
            if let Err(e) = &result {
                tracing::debug!(error = %e, "send refused");
            }
            result.map(tonic::Response::new).map_err(Status::from)
        }
        .instrument(span)
        .await
    }

    async fn pull(&self, request: Request<pb::PullRequest>) -> Result<tonic::Response<pb::PullResponse>, Status> {
        // SUB on the topic; a pull naming its consumer group (a push consumer's,
        // recorded as a delivery to the group in message traces) on the group too.
        let (topic, consumer_group) = (&request.get_ref().topic, &request.get_ref().consumer_group);
        if consumer_group.is_empty() {
            self.group
                .auth()
                .check(&request, Permission::Sub, ResourceKind::Topic, topic)?;
        } else {
            self.group.auth().subscribe(&request, topic, consumer_group)?;
        }
        let req = request.into_inner();
        let span = tracing::debug_span!(
            "pull",
            group = %self.group.group(),
            topic = %req.topic,
            queue = req.queue_id,
            offset = req.offset
        );
        async {
            let result = Messaging::pull(self, req).await;
            if let Err(e) = &result {
                tracing::debug!(error = %e, "pull refused");
            }
            result.map(tonic::Response::new).map_err(Status::from)
        }
        .instrument(span)
        .await
    }

    async fn end_transaction(
        &self,
        request: Request<pb::EndTransactionRequest>,
    ) -> Result<tonic::Response<pb::EndTransactionResponse>, Status> {
        // PUB on the half message's topic; an id that names no pending
        // transaction goes on to be answered as unknown or already ended.
        if let Some(topic) = self.txns.pending_topic(&request.get_ref().transaction_id) {
            self.group.auth().publish(&request, &topic)?;
        } else {
            self.group.auth().authenticated(&request)?;
        }
        let req = request.into_inner();
        let span = tracing::info_span!(
            "end_transaction",
            group = %self.group.group(),
            transaction_id = %req.transaction_id,
            resolution = req.resolution,
            source = req.source
        );
        async {
            let result = self.txns.end(req).await;
            if let Err(e) = &result {
                tracing::debug!(error = %e, "end transaction refused");
            }
            result.map(tonic::Response::new).map_err(Status::from)
        }
        .instrument(span)
        .await
    }

    type TransactionChecksStream = CheckStream;

    async fn transaction_checks(
        &self,
        request: Request<pb::TransactionChecksRequest>,
    ) -> Result<tonic::Response<Self::TransactionChecksStream>, Status> {
        // Checks carry the half messages: PUB on the producer group's name
        // as a group resource (the gateway's streams are named by topic).
        let producer_group = &request.get_ref().producer_group;
        self.group
            .auth()
            .check(&request, Permission::Pub, ResourceKind::Group, producer_group)?;
        let req = request.into_inner();
        let _span = tracing::debug_span!("transaction_checks", group = %self.group.group(), producer_group = %req.producer_group).entered();
        self.txns
            .open_checks(req)
            .map(tonic::Response::new)
            .map_err(Status::from)
    }
}
