//! Consumer groups on a broker group's leader: which members of a consumer group
//! are alive (heartbeats), which of this broker group's queues each holds, how
//! queues move when members join and leave, offset commits through Raft, offset
//! resets, and the `raftmq.v1.ConsumerService` server.
//!
//! Membership is soft state on the leader only, rebuilt from heartbeats after a
//! failover: members report the queues they hold, and a just-elected leader only
//! confirms those reports for a grace period (three heartbeat intervals) before
//! it hands out free queues. Offsets are the durable part and go through Raft.
//!
//! A queue moves between members in two steps: the leader drops it from the old
//! holder's answer, the holder stops, finishes in-flight messages and reports its
//! final offset (`held = false`); only after that offset is committed is the queue
//! free for the new owner, who starts from it. So no queue is consumed by two
//! members at once, except when a member is presumed dead while still running
//! (it stops by itself after the same session timeout).
//!
//! The membership rules are a pure decision over an injected clock in
//! [`crate::assignment`] (unit-tested there without a cluster); this module is
//! the I/O around it: reading the state, Raft writes of offsets, the reply.
//!
//! Every heartbeat, reset and describe runs under one async lock, Raft write
//! included: the steps above then never interleave. That caps this leader at
//! about one membership change per Raft round trip, plenty for heartbeats once a
//! second from hundreds of members; batching commits would lift it.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use openraft::async_runtime::WatchReceiver;
use raftmq_proto::v1 as pb;
use raftmq_proto::v1::consumer_service_server::{ConsumerService, ConsumerServiceServer};
use raftmq_raft_store::command::PERM_READ;
use raftmq_raft_store::{Command, QueueOffset, StoreReader};
use tokio::time::Instant;
use tonic::{Request, Status};
use tracing::Instrument;

use crate::api_error::ApiError;
use crate::assignment::{self, BadReport, GroupTopic};
use crate::group::GroupHandle;
use crate::validate::{self, MAX_QUEUES};

/// Longest a heartbeat (or reset) may take, Raft write included, before it is
/// answered UNAVAILABLE: a leader that lost its quorum must not hold members.
const OPERATION_TIMEOUT: Duration = Duration::from_secs(5);

/// The consumer-group coordinator of this node's broker group replica.
#[derive(Clone)]
pub struct Coordinator {
    group: GroupHandle,
    state: std::sync::Arc<tokio::sync::Mutex<State>>,
    /// The term this node last became leader in, and when: the grace period runs
    /// from election, not from the first heartbeat, so a leader that has led for a
    /// while grants a new group's queues at once.
    elected: std::sync::Arc<std::sync::Mutex<(u64, Instant)>>,
    /// POP consumption and retries, served on the same gRPC service.
    pop: crate::pop::Pop,
}

/// Soft state of one leadership term.
struct State {
    term: u64,
    /// When this node started answering in `term` (start of the grace period).
    since: Instant,
    topics: HashMap<(String, String), GroupTopic>,
}

/// Where a consumer group begins in a queue it never committed an offset for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartPosition {
    First,
    Last,
    Timestamp(u64),
}

impl StartPosition {
    fn from_pb(from: i32, timestamp_ms: u64, unspecified: Option<StartPosition>) -> Result<StartPosition, ApiError> {
        match pb::StartFrom::try_from(from) {
            Ok(pb::StartFrom::Unspecified) => unspecified.ok_or_else(|| {
                ApiError::InvalidArgument("start position is unspecified; give FIRST, LAST or TIMESTAMP".into())
            }),
            Ok(pb::StartFrom::First) => Ok(StartPosition::First),
            Ok(pb::StartFrom::Last) => Ok(StartPosition::Last),
            Ok(pb::StartFrom::Timestamp) => Ok(StartPosition::Timestamp(timestamp_ms)),
            Err(_) => Err(ApiError::InvalidArgument(format!(
                "start position {from} is not a StartFrom value"
            ))),
        }
    }

    fn offset(self, store: &StoreReader, topic: &str, queue_id: u32) -> std::io::Result<u64> {
        let next = store.queue_next_offset(topic, queue_id)?;
        Ok(match self {
            StartPosition::First => store.queue_min_offset(topic, queue_id)?.min(next),
            StartPosition::Last => next,
            StartPosition::Timestamp(ts) => store.offset_for_timestamp(topic, queue_id, ts)?.min(next),
        })
    }
}

impl Coordinator {
    /// Must be called inside the Tokio runtime: it starts a task that watches
    /// this node's Raft metrics for elections (ends with the node's shutdown).
    pub fn new(group: GroupHandle) -> Coordinator {
        let elected = std::sync::Arc::new(std::sync::Mutex::new((0, Instant::now())));
        let watch = {
            // Woken by server metrics (role, vote, membership), not by every
            // replication ack; the term is read from the full metrics.
            let (elected, mut metrics, stop) =
                (elected.clone(), group.raft().server_metrics(), group.shutdown().clone());
            let raft = group.raft().clone();
            async move {
                loop {
                    let (term, leading) = {
                        let all = raft.metrics();
                        let m = all.borrow_watched();
                        (m.current_term, m.state == openraft::ServerState::Leader)
                    };
                    if leading {
                        let mut e = elected.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                        if e.0 != term {
                            *e = (term, Instant::now());
                        }
                    }
                    tokio::select! {
                        changed = metrics.changed() => if changed.is_err() { return },
                        _ = stop.cancelled() => return,
                    }
                }
            }
        };
        group.tasks().spawn(watch);
        Coordinator {
            pop: crate::pop::Pop::new(group.clone()),
            group,
            state: std::sync::Arc::new(tokio::sync::Mutex::new(State {
                term: 0,
                since: Instant::now(),
                topics: HashMap::new(),
            })),
            elected,
        }
    }

    pub fn into_server(self) -> ConsumerServiceServer<Self> {
        ConsumerServiceServer::new(self)
    }

    fn grace(&self) -> Duration {
        self.group.config().consumer_heartbeat_interval * 3
    }

    fn session_timeout(&self) -> Duration {
        self.group.config().consumer_session_timeout
    }

    /// The state, emptied if this node has started a new term since it was built.
    async fn state(&self) -> tokio::sync::MutexGuard<'_, State> {
        let term = self.group.raft().metrics().borrow_watched().current_term;
        let mut st = self.state.lock().await;
        if st.term != term {
            let (elected_term, at) = *self.elected.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            st.term = term;
            // Not seen leading this term yet (the watcher lags): grace from now.
            st.since = if elected_term == term { at } else { Instant::now() };
            st.topics.clear();
        }
        st
    }

    async fn heartbeat(&self, req: pb::HeartbeatRequest) -> Result<pb::HeartbeatResponse, ApiError> {
        validate::consumer_group_name(&req.consumer_group)?;
        validate::client_id(&req.client_id)?;
        validate::topic_name(&req.topic)?;
        crate::filter::MessageFilter::parse(req.filter_type, &req.tag_expression)?;
        let start = StartPosition::from_pb(req.start_from, req.start_timestamp_ms, Some(StartPosition::Last))?;
        // Bounded before the topic is known: no topic has more than MAX_QUEUES,
        // held or just released.
        if req.queues.len() > 2 * MAX_QUEUES as usize {
            return Err(ApiError::InvalidArgument(format!(
                "heartbeat reports {} queues; a topic has at most {MAX_QUEUES} on a broker group",
                req.queues.len()
            )));
        }
        assignment::check_report(&req.queues, MAX_QUEUES).map_err(|e| match e {
            BadReport::TooMany { reported, .. } => ApiError::InvalidArgument(format!(
                "heartbeat reports {reported} queues; a topic has at most {MAX_QUEUES} on a broker group"
            )),
            BadReport::OutOfRange { queue_id, .. } => ApiError::InvalidArgument(format!(
                "queue_id {queue_id} is out of range: a topic has at most {MAX_QUEUES} queues on a broker group"
            )),
            twice @ BadReport::Twice { .. } => ApiError::InvalidArgument(twice.to_string()),
        })?;
        self.group.ensure_leader()?;
        if self.pop.is_pop_group(&req.consumer_group) {
            return Err(ApiError::FailedPrecondition(format!(
                "consumer group {} consumes by POP (Receive) on broker group {}; a group uses POP or \
                 clustering heartbeats, not both",
                req.consumer_group,
                self.group.group()
            )));
        }
        let topic = self.group.topic_for_write(&req.topic).await?;
        if topic.perm & PERM_READ == 0 {
            return Err(ApiError::FailedPrecondition(format!(
                "topic {:?} is not readable",
                topic.name
            )));
        }
        assignment::check_report(&req.queues, topic.queues).map_err(|e| {
            let group = self.group.group();
            ApiError::InvalidArgument(match e {
                BadReport::TooMany { reported, queues } => format!(
                    "heartbeat reports {reported} queues: topic {:?} has {queues} queues on broker group {group}",
                    topic.name
                ),
                BadReport::OutOfRange { queue_id, queues } => format!(
                    "queue_id {queue_id} is out of range: topic {:?} has {queues} queues on broker group {group}",
                    topic.name
                ),
                twice @ BadReport::Twice { .. } => twice.to_string(),
            })
        })?;
        match tokio::time::timeout(OPERATION_TIMEOUT, self.heartbeat_locked(req, topic.queues, start)).await {
            Ok(r) => r,
            Err(_) => Err(ApiError::Unavailable(format!(
                "heartbeat not settled within {OPERATION_TIMEOUT:?} (is broker group {} losing its quorum?)",
                self.group.group()
            ))),
        }
    }

    /// The I/O around [`GroupTopic::decide`]: under the lock, decide, commit the
    /// reported offsets and the start offsets of granted queues through Raft,
    /// settle, answer.
    async fn heartbeat_locked(
        &self,
        req: pb::HeartbeatRequest,
        queues: u32,
        start: StartPosition,
    ) -> Result<pb::HeartbeatResponse, ApiError> {
        let mut st = self.state().await;
        let timing = assignment::Timing {
            leading_since: st.since,
            grace: self.grace(),
            session_timeout: self.session_timeout(),
        };
        let key = (req.consumer_group.clone(), req.topic.clone());
        let heartbeat = assignment::Heartbeat {
            client_id: &req.client_id,
            tag_expression: &req.tag_expression,
            queues: &req.queues,
            leaving: req.leaving,
        };
        let decision = st
            .topics
            .entry(key.clone())
            .or_default()
            .decide(&heartbeat, queues, Instant::now(), &timing);
        for (member, queues) in &decision.presumed_dead {
            tracing::info!(%member, ?queues, "consumer presumed dead; its queues are free");
        }
        if decision.joined {
            tracing::info!(member = %req.client_id, group = %req.consumer_group, topic = %req.topic, "consumer joined");
        }

        // Durable part: commit offsets that moved, then start offsets of queues the
        // group never consumed.
        let store = self.group.store();
        let committed = |q: u32| {
            store
                .consumer_offset(&req.consumer_group, &req.topic, q)
                .map_err(|e| ApiError::storage("reading consumer offsets", e))
        };
        let mut changed = Vec::new();
        for &(q, offset) in &decision.commits {
            if committed(q)? != Some(offset) {
                changed.push((q, offset));
            }
        }
        let wrote = self.commit(&req.consumer_group, &req.topic, &changed).await?;
        // Push consumers ack by offset: traced deliveries below the commits are done.
        self.group
            .tracer()
            .committed(&req.consumer_group, &req.topic, &changed, &req.client_id);
        if !decision.granted.is_empty() && !wrote {
            // Offsets committed under an earlier leader may not be applied here yet.
            self.group.catch_up().await?;
        }
        let mut starts = Vec::new();
        for &q in &decision.granted {
            if committed(q)?.is_none() {
                let offset = start
                    .offset(store, &req.topic, q)
                    .map_err(|e| ApiError::storage("finding a start offset", e))?;
                starts.push((q, offset));
            }
        }
        self.commit(&req.consumer_group, &req.topic, &starts).await?;

        let gt = st.topics.get_mut(&key).expect("present");
        gt.settle(&req.client_id, &decision);
        if decision.leaving {
            tracing::info!(member = %req.client_id, group = %req.consumer_group, "consumer left");
        }
        if gt.is_idle() {
            st.topics.remove(&key);
        }
        let mut out = Vec::with_capacity(decision.assigned.len());
        for a in &decision.assigned {
            let offset = match a.reset {
                Some(o) => o,
                None => committed(a.queue_id)?.unwrap_or(0),
            };
            out.push(pb::AssignedQueue {
                queue_id: a.queue_id,
                offset,
                reset: a.reset.is_some(),
            });
        }
        let ms = |d: Duration| u32::try_from(d.as_millis()).unwrap_or(u32::MAX);
        Ok(pb::HeartbeatResponse {
            broker_group: self.group.group().to_owned(),
            assigned: out,
            heartbeat_interval_ms: ms(self.group.config().consumer_heartbeat_interval),
            session_timeout_ms: ms(timing.session_timeout),
            rebalancing: decision.rebalancing,
        })
    }

    /// Commits `offsets` of one topic through Raft; false when there was nothing to write.
    async fn commit(&self, group: &str, topic: &str, offsets: &[(u32, u64)]) -> Result<bool, ApiError> {
        if offsets.is_empty() {
            return Ok(false);
        }
        let offsets = offsets
            .iter()
            .map(|&(queue_id, offset)| QueueOffset {
                topic: topic.to_owned(),
                queue_id,
                offset,
            })
            .collect();
        self.group
            .write(Command::CommitOffsets {
                group: group.to_owned(),
                offsets,
            })
            .await?;
        Ok(true)
    }

    /// Whether the group has live clustering members on this leader.
    async fn has_members(&self, consumer_group: &str) -> bool {
        let st = self.state().await;
        let timeout = self.session_timeout();
        let now = Instant::now();
        st.topics
            .iter()
            .any(|((g, _), gt)| g == consumer_group && gt.has_live_member(now, timeout))
    }

    async fn receive(&self, req: pb::ReceiveRequest) -> Result<pb::ReceiveResponse, ApiError> {
        if self.has_members(&req.consumer_group).await {
            return Err(ApiError::FailedPrecondition(format!(
                "consumer group {} has clustering members (Heartbeat) on broker group {}; a group uses POP or \
                 clustering heartbeats, not both",
                req.consumer_group,
                self.group.group()
            )));
        }
        self.pop.receive(req).await
    }

    async fn query_offset(&self, req: pb::QueryOffsetRequest) -> Result<pb::QueryOffsetResponse, ApiError> {
        validate::consumer_group_name(&req.consumer_group)?;
        let topic = self.group.topic(&req.topic)?;
        self.group.check_queue(&topic, req.queue_id)?;
        let store = self.group.store();
        let io = |e| ApiError::storage("reading offsets", e);
        let max_offset = store.queue_next_offset(&req.topic, req.queue_id).map_err(io)?;
        Ok(pb::QueryOffsetResponse {
            offset: store
                .consumer_offset(&req.consumer_group, &req.topic, req.queue_id)
                .map_err(io)?,
            min_offset: store
                .queue_min_offset(&req.topic, req.queue_id)
                .map_err(io)?
                .min(max_offset),
            max_offset,
        })
    }

    /// Every consumer group with committed offsets here, or live members (leader).
    pub async fn list_groups(&self) -> Result<pb::ListConsumerGroupsResponse, ApiError> {
        let store = self.group.store();
        let io = |e| ApiError::storage("reading consumer offsets", e);
        let mut groups: BTreeMap<String, pb::ConsumerGroupSummary> = BTreeMap::new();
        for (group, topic, q, offset) in store.consumer_offsets(None).map_err(io)? {
            let s = groups.entry(group.clone()).or_insert_with(|| summary(&group));
            if !s.topics.contains(&topic) {
                s.topics.push(topic.clone());
            }
            let max = store.queue_next_offset(&topic, q).map_err(io)?;
            s.total_lag += max.saturating_sub(offset);
        }
        if self.group.ensure_leader().is_ok() {
            let st = self.state().await;
            for ((group, topic), gt) in &st.topics {
                let s = groups.entry(group.clone()).or_insert_with(|| summary(group));
                if !s.topics.contains(topic) {
                    s.topics.push(topic.clone());
                }
                s.live_members += gt.members().count() as u32;
            }
        }
        Ok(pb::ListConsumerGroupsResponse {
            broker_group: self.group.group().to_owned(),
            groups: groups.into_values().collect(),
        })
    }

    pub async fn describe(&self, consumer_group: &str) -> Result<pb::DescribeConsumerGroupResponse, ApiError> {
        validate::consumer_group_name(consumer_group)?;
        let store = self.group.store();
        let io = |e| ApiError::storage("reading consumer offsets", e);
        let mut committed: BTreeMap<(String, u32), u64> = BTreeMap::new();
        for (_, topic, q, offset) in store.consumer_offsets(Some(consumer_group)).map_err(io)? {
            committed.insert((topic, q), offset);
        }
        let mut members = Vec::new();
        let mut holders: HashMap<(String, u32), String> = HashMap::new();
        if self.group.ensure_leader().is_ok() {
            let st = self.state().await;
            let now = Instant::now();
            for ((group, topic), gt) in &st.topics {
                if group != consumer_group {
                    continue;
                }
                for (id, m) in gt.members() {
                    for q in &m.holds {
                        holders.insert((topic.clone(), *q), id.to_owned());
                    }
                    members.push(pb::ConsumerMember {
                        client_id: id.to_owned(),
                        topic: topic.clone(),
                        tag_expression: m.tag_expression.clone(),
                        queue_ids: m.holds.iter().copied().collect(),
                        last_heartbeat_ms_ago: now.duration_since(m.last_seen).as_millis() as u64,
                    });
                }
            }
        }
        let mut topics: BTreeSet<String> = committed.keys().map(|(t, _)| t.clone()).collect();
        topics.extend(members.iter().map(|m| m.topic.clone()));
        if topics.is_empty() {
            return Err(ApiError::NotFound(format!(
                "consumer group {consumer_group:?} has no committed offsets and no live members on broker group {}",
                self.group.group()
            )));
        }
        let mut queues = Vec::new();
        for topic in topics {
            // A deleted topic's offsets stay; show the queues they name.
            let queue_ids: Vec<u32> = match self.group.topic(&topic) {
                Ok(t) => (0..t.queues).collect(),
                Err(_) => committed
                    .range((topic.clone(), 0)..=(topic.clone(), u32::MAX))
                    .map(|((_, q), _)| *q)
                    .collect(),
            };
            for q in queue_ids {
                queues.push(queue_status(
                    store,
                    &topic,
                    q,
                    committed.get(&(topic.clone(), q)).copied(),
                    holders.get(&(topic.clone(), q)).cloned().unwrap_or_default(),
                )?);
            }
        }
        Ok(pb::DescribeConsumerGroupResponse {
            broker_group: self.group.group().to_owned(),
            consumer_group: consumer_group.to_owned(),
            members,
            queues,
        })
    }

    pub async fn reset(
        &self,
        req: pb::ResetConsumerOffsetRequest,
    ) -> Result<pb::ResetConsumerOffsetResponse, ApiError> {
        validate::consumer_group_name(&req.consumer_group)?;
        validate::topic_name(&req.topic)?;
        let to = StartPosition::from_pb(req.to, req.timestamp_ms, None)?;
        self.group.ensure_leader()?;
        let topic = self.group.topic_for_write(&req.topic).await?;
        let work = async {
            let mut st = self.state().await;
            let store = self.group.store();
            let mut offsets = Vec::new();
            for q in 0..topic.queues {
                let o = to
                    .offset(store, &topic.name, q)
                    .map_err(|e| ApiError::storage("finding reset offsets", e))?;
                offsets.push((q, o));
            }
            self.commit(&req.consumer_group, &topic.name, &offsets).await?;
            self.group.tracer().forget(&req.consumer_group, &topic.name);
            // Holders jump on their next heartbeat; until then their commits for
            // these queues are ignored.
            if let Some(gt) = st.topics.get_mut(&(req.consumer_group.clone(), topic.name.clone())) {
                gt.note_reset(&offsets);
            }
            tracing::info!(group = %req.consumer_group, topic = %topic.name, ?to, "consumer offsets reset");
            let mut queues = Vec::new();
            for (q, o) in offsets {
                queues.push(queue_status(store, &topic.name, q, Some(o), String::new())?);
            }
            Ok(pb::ResetConsumerOffsetResponse { queues })
        };
        tokio::time::timeout(OPERATION_TIMEOUT, work)
            .await
            .map_err(|_| ApiError::Unavailable(format!("offset reset not committed within {OPERATION_TIMEOUT:?}")))?
    }
}

fn summary(group: &str) -> pb::ConsumerGroupSummary {
    pb::ConsumerGroupSummary {
        consumer_group: group.to_owned(),
        ..Default::default()
    }
}

fn queue_status(
    store: &StoreReader,
    topic: &str,
    queue_id: u32,
    committed: Option<u64>,
    client_id: String,
) -> Result<pb::ConsumerQueueStatus, ApiError> {
    let io = |e| ApiError::storage("reading queue offsets", e);
    let max_offset = store.queue_next_offset(topic, queue_id).map_err(io)?;
    let min_offset = store.queue_min_offset(topic, queue_id).map_err(io)?.min(max_offset);
    // Below the minimum, retention removed what the group had not consumed: it
    // resumes at the minimum (pulls below it are served from it).
    let from = committed.map_or(min_offset, |o| o.max(min_offset));
    Ok(pb::ConsumerQueueStatus {
        topic: topic.to_owned(),
        queue_id,
        committed_offset: committed,
        max_offset,
        lag: max_offset.saturating_sub(from),
        client_id,
        min_offset,
        skipped: committed.map_or(0, |o| min_offset.saturating_sub(o)),
    })
}

#[tonic::async_trait]
impl ConsumerService for Coordinator {
    async fn heartbeat(
        &self,
        request: Request<pb::HeartbeatRequest>,
    ) -> Result<tonic::Response<pb::HeartbeatResponse>, Status> {
        let r = request.get_ref();
        self.group.auth().subscribe(&request, &r.topic, &r.consumer_group)?;
        let req = request.into_inner();
        let span = tracing::debug_span!(
            "heartbeat",
            group = %self.group.group(),
            consumer_group = %req.consumer_group,
            member = %req.client_id,
            topic = %req.topic
        );
        async {
            let result = Coordinator::heartbeat(self, req).await;
            if let Err(e) = &result {
                tracing::debug!(error = %e, "heartbeat refused");
            }
            result.map(tonic::Response::new).map_err(Status::from)
        }
        .instrument(span)
        .await
    }

    async fn query_offset(
        &self,
        request: Request<pb::QueryOffsetRequest>,
    ) -> Result<tonic::Response<pb::QueryOffsetResponse>, Status> {
        let r = request.get_ref();
        self.group.auth().subscribe(&request, &r.topic, &r.consumer_group)?;
        let req = request.into_inner();
        let span =
            tracing::debug_span!("query_offset", group = %self.group.group(), consumer_group = %req.consumer_group);
        Coordinator::query_offset(self, req)
            .instrument(span)
            .await
            .map(tonic::Response::new)
            .map_err(Status::from)
    }

    async fn receive(
        &self,
        request: Request<pb::ReceiveRequest>,
    ) -> Result<tonic::Response<pb::ReceiveResponse>, Status> {
        let r = request.get_ref();
        self.group.auth().subscribe(&request, &r.topic, &r.consumer_group)?;
        let req = request.into_inner();
        let span = tracing::debug_span!("receive", group = %self.group.group(), consumer_group = %req.consumer_group, topic = %req.topic);
        answer(Coordinator::receive(self, req).instrument(span).await)
    }

    async fn ack(&self, request: Request<pb::AckRequest>) -> Result<tonic::Response<pb::AckResponse>, Status> {
        let r = request.get_ref();
        self.group.auth().subscribe(&request, &r.topic, &r.consumer_group)?;
        let req = request.into_inner();
        let span = tracing::debug_span!("ack", group = %self.group.group(), consumer_group = %req.consumer_group, handles = req.receipt_handles.len());
        answer(self.pop.ack(req).instrument(span).await)
    }

    async fn change_invisible_duration(
        &self,
        request: Request<pb::ChangeInvisibleDurationRequest>,
    ) -> Result<tonic::Response<pb::ChangeInvisibleDurationResponse>, Status> {
        let r = request.get_ref();
        self.group.auth().subscribe(&request, &r.topic, &r.consumer_group)?;
        let req = request.into_inner();
        let span = tracing::debug_span!("change_invisible_duration", group = %self.group.group(), consumer_group = %req.consumer_group);
        answer(self.pop.change_invisible_duration(req).instrument(span).await)
    }

    async fn forward_to_dead_letter(
        &self,
        request: Request<pb::ForwardToDeadLetterRequest>,
    ) -> Result<tonic::Response<pb::ForwardToDeadLetterResponse>, Status> {
        let r = request.get_ref();
        self.group.auth().subscribe(&request, &r.topic, &r.consumer_group)?;
        let req = request.into_inner();
        let span = tracing::debug_span!("forward_to_dead_letter", group = %self.group.group(), consumer_group = %req.consumer_group);
        answer(self.pop.forward_to_dead_letter(req).instrument(span).await)
    }

    async fn send_back(
        &self,
        request: Request<pb::SendBackRequest>,
    ) -> Result<tonic::Response<pb::SendBackResponse>, Status> {
        self.group
            .auth()
            .subscribe(&request, "", &request.get_ref().consumer_group)?;
        let req = request.into_inner();
        let span = tracing::debug_span!("send_back", group = %self.group.group(), consumer_group = %req.consumer_group, message_id = %req.message_id);
        answer(self.pop.send_back(req).instrument(span).await)
    }
}

fn answer<T>(result: Result<T, ApiError>) -> Result<tonic::Response<T>, Status> {
    if let Err(e) = &result {
        tracing::debug!(error = %e, "refused");
    }
    result.map(tonic::Response::new).map_err(Status::from)
}
