//! What the client-facing services share about this node's broker group: the
//! Raft handle, the applied-state reader, the limits, and the write path to Raft
//! (leadership check, `client_write`, mapping openraft's refusals to
//! [`ApiError`]). Reads never go through Raft: they are served from this
//! replica's applied state, which never runs ahead of commit.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::Raft;
use openraft::ReadPolicy;
use openraft::ServerState;
use openraft::async_runtime::WatchReceiver;
use openraft::error::{ClientWriteError, ForwardReason, ForwardToLeader, LinearizableReadError, RaftError};
use raftmq_raft_store::{Command, NodeId, Response, StateMachine, StoreReader, TopicConfig, TypeConfig};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::api_error::ApiError;
use crate::config::MessagingConfig;

/// One broker group's replica as the messaging and admin services see it.
#[derive(Clone)]
pub struct GroupHandle {
    inner: Arc<Inner>,
}

struct Inner {
    group: String,
    node_id: NodeId,
    raft: Raft<TypeConfig, StateMachine>,
    store: StoreReader,
    config: MessagingConfig,
    /// Cancelled at shutdown; long polls end early on it so they do not hold
    /// the server's graceful drain for their whole wait.
    shutdown: CancellationToken,
    /// Next broker-chosen queue per topic. Per node and not replicated: it only
    /// spreads load, so losing it on failover is harmless.
    round_robin: Mutex<HashMap<String, u32>>,
    /// Woken when this node changed a topic (create, update, delete), so the
    /// NameServers hear of it now rather than at the next registration round.
    topics_changed: tokio::sync::Notify,
    /// Every background task of this replica (registration, election watchers,
    /// fast-failover probes): shutdown waits for them before stopping Raft.
    tasks: TaskTracker,
    /// Set once this replica learns it was removed from the group
    /// ([`crate::membership`]); it then serves no client request.
    removed: std::sync::OnceLock<crate::membership::Removed>,
    /// How this node dials other nodes' client ports and the NameServers: the
    /// cluster CA when TLS is on (`None`: plaintext).
    client_tls: Option<tonic::transport::ClientTlsConfig>,
    /// What the request paths record into; `None` when the node serves no
    /// metrics endpoint, so that nothing is recorded either.
    metrics: Option<Arc<crate::metrics::BrokerMetrics>>,
    /// Who may do what on the client port (off unless `[auth] enabled`).
    auth: crate::auth::Auth,
    /// Message traces: the queue of records to write ([`crate::trace`]).
    tracer: crate::trace::Tracer,
}

/// A committed write: its Raft index and the state machine's answer.
pub struct Written {
    pub index: u64,
    pub response: Response,
}

/// What a node gives its group handle besides Raft and the store: how it dials
/// other nodes, and where the request paths record.
pub struct NodeWiring {
    /// The cluster CA when TLS is on (`None`: plaintext).
    pub client_tls: Option<tonic::transport::ClientTlsConfig>,
    /// `None` when the node serves no metrics endpoint.
    pub metrics: Option<Arc<crate::metrics::BrokerMetrics>>,
    /// The ACL's checks (`Auth::off()` when auth is off).
    pub auth: crate::auth::Auth,
}

impl GroupHandle {
    pub fn new(
        group: &str,
        node_id: NodeId,
        raft: Raft<TypeConfig, StateMachine>,
        store: StoreReader,
        config: MessagingConfig,
        shutdown: CancellationToken,
        NodeWiring {
            client_tls,
            metrics,
            auth,
        }: NodeWiring,
    ) -> Self {
        GroupHandle {
            inner: Arc::new(Inner {
                group: group.to_owned(),
                node_id,
                raft,
                store,
                config,
                shutdown,
                round_robin: Mutex::new(HashMap::new()),
                topics_changed: tokio::sync::Notify::new(),
                tasks: TaskTracker::new(),
                removed: std::sync::OnceLock::new(),
                client_tls,
                metrics,
                auth,
                tracer: crate::trace::Tracer::new(group, node_id),
            }),
        }
    }

    /// The metrics to record into, when this node serves them.
    pub fn metrics(&self) -> Option<&crate::metrics::BrokerMetrics> {
        self.inner.metrics.as_deref()
    }

    pub fn group(&self) -> &str {
        &self.inner.group
    }

    /// The ACL's checks for this node's client port.
    pub fn auth(&self) -> &crate::auth::Auth {
        &self.inner.auth
    }

    /// Where the request paths record message-trace steps.
    pub fn tracer(&self) -> &crate::trace::Tracer {
        &self.inner.tracer
    }

    /// The endpoint for another node's client port or a NameServer (`host:port`):
    /// over TLS checked against the cluster CA when TLS is on.
    pub fn client_endpoint(&self, addr: &str) -> Result<tonic::transport::Endpoint, raftmq_tls::EndpointError> {
        raftmq_tls::endpoint(addr, self.inner.client_tls.as_ref())
    }

    pub fn node_id(&self) -> NodeId {
        self.inner.node_id
    }

    pub fn raft(&self) -> &Raft<TypeConfig, StateMachine> {
        &self.inner.raft
    }

    pub fn store(&self) -> &StoreReader {
        &self.inner.store
    }

    pub fn shutdown(&self) -> &CancellationToken {
        &self.inner.shutdown
    }

    /// The tracker background tasks of this replica are spawned on; each must end
    /// when [`GroupHandle::shutdown`] is cancelled.
    pub fn tasks(&self) -> &TaskTracker {
        &self.inner.tasks
    }

    /// Why this replica no longer serves its group, once it was removed.
    pub fn removed(&self) -> Option<&crate::membership::Removed> {
        self.inner.removed.get()
    }

    /// Records this replica's removal; false if it was already recorded.
    pub fn mark_removed(&self, removed: crate::membership::Removed) -> bool {
        self.inner.removed.set(removed).is_ok()
    }

    /// Completes after the next [`GroupHandle::topics_changed`] call.
    pub async fn topics_changed_notified(&self) {
        self.inner.topics_changed.notified().await;
    }

    /// Tells the registration loop that a topic was created, updated or deleted.
    pub fn topics_changed(&self) {
        self.inner.topics_changed.notify_one();
    }

    pub fn config(&self) -> &MessagingConfig {
        &self.inner.config
    }

    /// The advertised endpoint of `node` according to the current membership.
    pub fn endpoint_of(&self, node: NodeId) -> String {
        let metrics = self.inner.raft.metrics();
        let m = metrics.borrow_watched();
        m.membership_config
            .membership()
            .get_node(&node)
            .map(|n| n.addr.clone())
            .unwrap_or_default()
    }

    /// Refuses early when this node is not the leader, so a follower neither
    /// auto-creates topics nor does work openraft would refuse anyway. A leader
    /// that lost its lease is caught later by `client_write` itself.
    pub fn ensure_leader(&self) -> Result<(), ApiError> {
        let (state, leader, quorum_acked) = {
            let metrics = self.inner.raft.metrics();
            let m = metrics.borrow_watched();
            (m.state, m.current_leader, m.last_quorum_acked)
        };
        if state == ServerState::Leader {
            // openraft keeps a leader that lost its quorum (paused, cut off) in the
            // Leader state until it hears a higher term. Such a node can never
            // acknowledge a write, but it would hold each one until the client's
            // timeout; refusing at once after one election timeout without a quorum
            // ack sends clients to the NameServer for the new leader instead.
            let limit = Duration::from_millis(self.inner.raft.config().election_timeout_max);
            if let Some(acked) = quorum_acked {
                let silent = openraft::Instant::elapsed(&*acked);
                if silent > limit {
                    return Err(ApiError::Unavailable(format!(
                        "this node leads broker group {} but no quorum has acknowledged it for {} ms \
                         (partitioned or paused?); ask a NameServer for the current leader",
                        self.inner.group,
                        silent.as_millis()
                    )));
                }
            }
            return Ok(());
        }
        Err(ApiError::NotLeader {
            leader_endpoint: leader.map(|l| self.endpoint_of(l)).unwrap_or_default(),
        })
    }

    pub fn next_queue(&self, topic: &str, queues: u32) -> u32 {
        let mut rr = self.inner.round_robin.lock().unwrap_or_else(|p| p.into_inner());
        let next = rr.entry(topic.to_owned()).or_insert(0);
        let q = *next % queues.max(1);
        *next = next.wrapping_add(1);
        q
    }

    /// INVALID_ARGUMENT unless `queue_id` is one of `topic`'s queues here.
    pub fn check_queue(&self, topic: &TopicConfig, queue_id: u32) -> Result<(), ApiError> {
        if queue_id < topic.queues {
            return Ok(());
        }
        Err(ApiError::InvalidArgument(format!(
            "queue_id {queue_id} is out of range: topic {:?} has {} queues on broker group {}",
            topic.name, topic.queues, self.inner.group
        )))
    }

    /// Applied topic config, or NOT_FOUND.
    pub fn topic(&self, name: &str) -> Result<TopicConfig, ApiError> {
        self.inner
            .store
            .topic(name)
            .map_err(|e| ApiError::storage("reading topic config", e))?
            .ok_or_else(|| {
                ApiError::NotFound(format!(
                    "topic {name:?} does not exist on broker group {}",
                    self.inner.group
                ))
            })
    }

    /// The topic's config for a write decision on the leader. The applied state
    /// can trail the log on a just-elected leader (a topic created under the old
    /// leader may be committed but not yet applied here), so before answering
    /// NOT_FOUND, or auto-creating over a config that exists, catch up to
    /// everything committed and look again. Only the miss pays for it.
    pub async fn topic_for_write(&self, name: &str) -> Result<TopicConfig, ApiError> {
        match self.topic(name) {
            Err(ApiError::NotFound(_)) => {
                self.catch_up().await?;
                self.topic(name)
            }
            found => found,
        }
    }

    /// Waits until this leader has applied everything committed before now
    /// (openraft's ReadIndex: one heartbeat round confirms leadership).
    pub async fn catch_up(&self) -> Result<(), ApiError> {
        match self.inner.raft.ensure_linearizable(ReadPolicy::ReadIndex).await {
            Ok(_) => Ok(()),
            Err(RaftError::APIError(LinearizableReadError::ForwardToLeader(f))) => {
                if f.reason == ForwardReason::LeaseExpired && f.leader_id.is_none_or(|l| l == self.inner.node_id) {
                    Err(ApiError::Unavailable(format!(
                        "this node leads broker group {} but a quorum has not confirmed it; retry shortly",
                        self.inner.group
                    )))
                } else {
                    Err(ApiError::NotLeader {
                        leader_endpoint: self.leader_endpoint(&f),
                    })
                }
            }
            Err(RaftError::APIError(LinearizableReadError::QuorumNotEnough(q))) => Err(ApiError::Unavailable(format!(
                "broker group {} cannot reach a quorum: {q}",
                self.inner.group
            ))),
            Err(RaftError::Fatal(f)) => Err(ApiError::Unavailable(format!("Raft on this node has stopped: {f}"))),
        }
    }

    /// Proposes `cmd` and waits until it is applied here. While this node has won
    /// an election but a quorum has not yet confirmed it (openraft answers
    /// `ForwardToLeader` with reason `LeaseExpired` and no other leader), the write
    /// is retried for up to `unconfirmed_leader_retry`, waking on metrics changes
    /// rather than polling; then UNAVAILABLE.
    pub async fn write(&self, cmd: Command) -> Result<Written, ApiError> {
        let raft = &self.inner.raft;
        let deadline = Instant::now() + self.inner.config.unconfirmed_leader_retry;
        let mut metrics = raft.metrics();
        loop {
            let forward = match raft.client_write(cmd.clone()).await {
                Ok(resp) => {
                    return match resp.data {
                        Response::Rejected { reason } => Err(ApiError::FailedPrecondition(reason)),
                        response => Ok(Written {
                            index: resp.log_id.index,
                            response,
                        }),
                    };
                }
                Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => f,
                Err(RaftError::APIError(ClientWriteError::LogEntryDiscarded(f))) => {
                    // The entry may still commit through the new leader: a blind
                    // retry here could store the batch twice, so the client decides.
                    tracing::warn!(leader = ?f.leader_id, "write discarded by a leader change");
                    return Err(ApiError::Unavailable(format!(
                        "leadership changed while writing; the write may or may not have been stored (new leader: {})",
                        self.leader_endpoint(&f)
                    )));
                }
                Err(RaftError::APIError(other)) => {
                    return Err(ApiError::Internal(format!("Raft refused the write: {other}")));
                }
                Err(RaftError::Fatal(f)) => {
                    return Err(ApiError::Unavailable(format!("Raft on this node has stopped: {f}")));
                }
            };
            let unconfirmed_self = forward.reason == ForwardReason::LeaseExpired
                && forward.leader_id.is_none_or(|l| l == self.inner.node_id);
            if !unconfirmed_self {
                return Err(ApiError::NotLeader {
                    leader_endpoint: self.leader_endpoint(&forward),
                });
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(ApiError::Unavailable(format!(
                    "this node leads broker group {} but a quorum has not confirmed it within {:?}; retry shortly",
                    self.inner.group, self.inner.config.unconfirmed_leader_retry
                )));
            }
            tracing::debug!(group = %self.inner.group, "leadership not yet confirmed by a quorum; retrying the write");
            // Retry when a quorum acknowledges this leader (`last_quorum_acked`
            // moves) or it stops leading, not on every metrics change: a leader's
            // metrics change with each replication ack. The cap only guards
            // against a change we could not observe.
            let acked_before = metrics.borrow_watched().last_quorum_acked;
            let confirmed = async {
                while metrics.changed().await.is_ok() {
                    let m = metrics.borrow_watched();
                    if m.last_quorum_acked != acked_before || m.state != ServerState::Leader {
                        break;
                    }
                }
            };
            let _ = tokio::time::timeout((deadline - now).min(Duration::from_millis(100)), confirmed).await;
        }
    }

    /// Runs `lead(term)` each time this replica becomes leader, until shutdown:
    /// the shape of every leader-only background loop (timers, transaction
    /// checks). `lead` should return once [`GroupHandle::leads`] turns false.
    pub async fn while_leading<F, Fut>(&self, mut lead: F)
    where
        F: FnMut(u64) -> Fut,
        Fut: std::future::Future<Output = ()>,
    {
        // Server metrics change with role, vote or membership only, not with
        // every replication ack as the full metrics do: waiting on them costs
        // nothing under load.
        let mut server = self.inner.raft.server_metrics();
        let stop = self.inner.shutdown.clone();
        loop {
            let term = loop {
                let (state, term, running) = {
                    let metrics = self.inner.raft.metrics();
                    let m = metrics.borrow_watched();
                    (m.state, m.current_term, m.running_state.is_ok())
                };
                if !running {
                    // Stopped on a fatal error: nothing will change any more.
                    return;
                }
                if state == ServerState::Leader {
                    break term;
                }
                tokio::select! {
                    changed = server.changed() => if changed.is_err() { return },
                    _ = stop.cancelled() => return,
                }
            };
            lead(term).await;
            if stop.is_cancelled() {
                return;
            }
        }
    }

    /// Whether this replica still leads in `term`. A Raft core that stopped on a
    /// fatal error leaves its last metrics (Leader) frozen; it leads nothing, and
    /// leader-only loops must end rather than spin on its refusals.
    pub fn leads(&self, term: u64) -> bool {
        let metrics = self.inner.raft.metrics();
        let m = metrics.borrow_watched();
        m.state == ServerState::Leader && m.current_term == term && m.running_state.is_ok()
    }

    /// Completes when this replica stops leading `term` (or Raft stops). Wakes
    /// on a change of role, vote or membership only (server metrics), not on
    /// each replication ack.
    pub async fn deposed(&self, term: u64) {
        let mut server = self.inner.raft.server_metrics();
        while self.leads(term) {
            if server.changed().await.is_err() {
                return;
            }
        }
    }

    fn leader_endpoint(&self, f: &ForwardToLeader<TypeConfig>) -> String {
        match (&f.leader_node, f.leader_id) {
            (Some(node), _) => node.addr.clone(),
            (None, Some(id)) => self.endpoint_of(id),
            (None, None) => String::new(),
        }
    }
}
