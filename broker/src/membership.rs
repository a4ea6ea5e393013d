//! Online membership changes of a broker group (issue #18): adding a replica
//! (learner, catch-up, promotion), removing one, handing leadership over, and
//! what a replica does once it has been removed. The AdminService RPCs
//! (`AddReplica`, `RemoveReplica`, `TransferLeader`, `GetMembership`) delegate
//! here; they are served by the group's leader, and a follower answers
//! NOT_LEADER with the leader's endpoint like every other write.
//!
//! # Adding
//! `add_learner` (non-blocking) puts the node in the membership as a learner;
//! the leader then replicates to it, or sends it a snapshot carrying the
//! retained CommitLog segments when it is behind the purge point. We wait, up
//! to the caller's deadline, until its matched index is within
//! [`MAX_PROMOTE_LAG`] entries of the leader's log, then promote it with
//! `change_membership(AddVoterIds)`, a joint-consensus change. A node that
//! does not catch up in time stays a learner (DEADLINE_EXCEEDED names its lag)
//! and a repeated `AddReplica` resumes from there. openraft's own blocking
//! `add_learner` is not used: it waits without a deadline.
//!
//! # Removing
//! `change_membership(RemoveVoters, retain = false)` for a voter (joint
//! consensus, then the uniform config without it), `RemoveNodes` for a learner.
//! The last voter cannot be removed. Removing the leader is allowed: it keeps
//! leading until the config without it commits, then openraft's step-down
//! watcher hands leadership to the most caught-up voter.
//!
//! # A removed replica
//! openraft stops replicating to a removed node as soon as the leader appends
//! the config without it, so a removed follower usually never sees that config
//! committed: it just stops hearing from the leader, and would campaign forever
//! (the others refuse its votes: peer authentication admits members only). So
//! each replica watches for its removal ([`spawn_removal_watch`]) two ways: as
//! leader, its own committed membership no longer lists it; otherwise the
//! leader (asked with `GetMembership` every second: the leader it knows, or
//! every member when that one no longer leads) answers with a committed
//! membership, at least as new as the latest this node knows, that does not
//! list it. Both are proof: a leader's log holds every committed membership,
//! and a committed one never un-commits. A follower's own committed membership
//! is no proof: while catching up it replays old ones that do not list it.
//!
//! The node then answers every client request with UNAVAILABLE naming the
//! removal (UNAVAILABLE rather than FAILED_PRECONDITION: clients then try
//! another replica, which redirects them to the leader), stops registering
//! with the NameServers, logs it once at WARN, and shuts its Raft down, so it
//! neither campaigns nor votes (a removed leader first gets a moment to hand
//! leadership over).
//!
//! # A wiped disk
//! Node ids are never reused while the id is a member: a replica whose data dir
//! was lost must not come back under its id while the membership still lists
//! it, because it has forgotten its vote and its log (it could vote twice in a
//! term, or help elect a leader missing committed entries). The procedure is
//! to remove the old id first, then add the wiped node, preferably under a new
//! id (same endpoints are fine). Re-adding the same id after its removal is
//! accepted (AddReplica only refuses an id that is still a voter, or a learner
//! at other endpoints); openraft documents a residual hazard for that case (the
//! wiped node replays historical configs in which it was a voter), which is
//! why a new id is recommended, and why a removed replica shuts its Raft down
//! instead of lingering as a potential voter of an old config.
//!
//! Nothing on the wiped node itself can tell it apart from a new member that
//! never received anything (a peer of `--peers` started late), so the wrong
//! procedure (restarting it empty while still a member) is not refused. Its
//! consequence is bounded: the leader allows log reversion (`node.rs`), so
//! instead of panicking its Raft core (openraft's default, which took the
//! leader down) it feeds the replica again from the start; what remains is
//! the forgotten vote, which the Raft service closes (`service.rs`): a replica
//! with an empty log refuses to vote for a candidate whose log is past the
//! initial membership (index 0), until replication has refilled it.
//!
//! # Not yet a member
//! A fresh node (no `--peers`, or `--peers` of a group that already formed)
//! has no membership: it serves Raft only (peer authentication admits the
//! group's members before it has a membership of its own) and answers client
//! requests with UNAVAILABLE until it is added.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use openraft::alias::StoredMembershipOf;
use openraft::async_runtime::WatchReceiver;
use openraft::error::{ChangeMembershipError, ClientWriteError, RaftError};
use openraft::metrics::RaftMetrics;
use openraft::{ChangeMembers, ServerState, StoredMembership};
use raftmq_proto::v1 as pb;
use raftmq_proto::v1::admin_service_client::AdminServiceClient;
use raftmq_proto::v1::admin_service_server::AdminServiceServer;
use raftmq_raft_store::{BrokerNode, NodeId, RAFT_PORT_OFFSET, TypeConfig};
use tokio::time::Instant;
use tonic::Status;
use tracing::Instrument;

use crate::api_error::ApiError;
use crate::group::GroupHandle;

/// Most voters a group may have: each write waits for a majority of them.
pub const MAX_VOTERS: usize = 9;
/// A learner is promoted once its matched log is within this many entries of
/// the leader's last log.
pub const MAX_PROMOTE_LAG: u64 = 1000;
/// Catch-up deadline when AddReplica gives none.
pub const DEFAULT_CATCH_UP: Duration = Duration::from_secs(60);
/// Longest catch-up deadline a caller may ask for.
pub const MAX_CATCH_UP: Duration = Duration::from_secs(3600);
/// Leader-transfer deadline when TransferLeader gives none.
pub const DEFAULT_TRANSFER: Duration = Duration::from_secs(10);
/// How often a replica that is not the leader asks whether it was removed.
const PROBE_INTERVAL: Duration = Duration::from_secs(1);
/// One `GetMembership` probe's deadline.
const PROBE_TIMEOUT: Duration = Duration::from_millis(800);
/// How long a removed leader is given to hand leadership over before its Raft stops.
const REMOVED_LEADER_HANDOVER: Duration = Duration::from_secs(3);

/// Why this replica no longer serves its group.
#[derive(Debug, Clone)]
pub struct Removed {
    /// Raft index of the committed membership that does not list this node.
    pub log_index: u64,
    /// The answer every client request gets.
    pub message: String,
}

/// The membership-change endpoint of one replica (one per node: the lock that
/// serializes changes lives here).
#[derive(Clone)]
pub struct Changes {
    group: GroupHandle,
    /// Held for the whole of an add or remove; a second one is refused with
    /// UNAVAILABLE rather than queued behind a catch-up that may take a minute.
    busy: Arc<tokio::sync::Mutex<()>>,
}

/// A membership as the API shows it.
fn view(group: &str, stored: &StoredMembershipOf<TypeConfig>, committed: bool) -> pb::MembershipView {
    let membership = stored.membership();
    let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
    pb::MembershipView {
        broker_group: group.to_owned(),
        members: membership
            .nodes()
            .map(|(id, n)| pb::Member {
                node_id: *id,
                endpoint: n.addr.clone(),
                raft_endpoint: n.raft_endpoint().into_owned(),
                voter: voters.contains(id),
            })
            .collect(),
        log_index: stored.log_id().as_ref().map_or(0, |l| l.index),
        committed,
        joint: membership.get_joint_config().len() > 1,
    }
}

fn describe_members(m: &RaftMetrics<TypeConfig>) -> String {
    let membership = m.membership_config.membership();
    let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
    let parts: Vec<String> = membership
        .nodes()
        .map(|(id, n)| {
            let role = if voters.contains(id) { "voter" } else { "learner" };
            format!("{id}={} ({role})", n.addr)
        })
        .collect();
    parts.join(", ")
}

/// `host:port` with a non-empty host and a port in 1..=65535; the port.
fn parse_endpoint(what: &str, endpoint: &str) -> Result<u16, ApiError> {
    let bad = |why: &str| ApiError::InvalidArgument(format!("{what} {endpoint:?} is not host:port: {why}"));
    if endpoint.contains("://") {
        return Err(bad("give host:port without a scheme"));
    }
    let (host, port) = endpoint.rsplit_once(':').ok_or_else(|| bad("no port"))?;
    if host.is_empty() || host.chars().any(|c| c.is_whitespace() || c == '/') {
        return Err(bad("bad host"));
    }
    match port.parse::<u16>() {
        Ok(0) | Err(_) => Err(bad("the port must be a number between 1 and 65535")),
        Ok(p) => Ok(p),
    }
}

/// The Raft endpoint a request names, or the client port + 30000 (`raftmq broker`'s default).
fn raft_endpoint_for(endpoint: &str, raft_endpoint: &str) -> Result<String, ApiError> {
    let port = parse_endpoint("endpoint", endpoint)?;
    if !raft_endpoint.is_empty() {
        parse_endpoint("raft_endpoint", raft_endpoint)?;
        if raft_endpoint == endpoint {
            return Err(ApiError::InvalidArgument(format!(
                "raft_endpoint {raft_endpoint:?} equals endpoint: the Raft port must differ from the client port"
            )));
        }
        return Ok(raft_endpoint.to_owned());
    }
    let raft_port = port.checked_add(RAFT_PORT_OFFSET).ok_or_else(|| {
        ApiError::InvalidArgument(format!(
            "endpoint {endpoint:?}: its port + {RAFT_PORT_OFFSET} (the default Raft port) is past 65535; give raft_endpoint"
        ))
    })?;
    let host = endpoint.rsplit_once(':').map_or("", |(h, _)| h);
    Ok(format!("{host}:{raft_port}"))
}

fn node_id_arg(node_id: u64) -> Result<NodeId, ApiError> {
    if node_id == 0 {
        return Err(ApiError::InvalidArgument(
            "node_id 0 is not a valid node id (ids start at 1)".into(),
        ));
    }
    Ok(node_id)
}

fn deadline_exceeded(message: String) -> Status {
    Status::deadline_exceeded(message)
}

impl Changes {
    pub fn new(group: GroupHandle) -> Self {
        Changes {
            group,
            busy: Arc::new(tokio::sync::Mutex::new(())),
        }
    }

    fn metrics(&self) -> RaftMetrics<TypeConfig> {
        self.group.raft().metrics().borrow_watched().clone()
    }

    /// Refuses while another change runs here.
    fn begin(&self) -> Result<tokio::sync::MutexGuard<'_, ()>, ApiError> {
        self.busy.try_lock().map_err(|_| {
            ApiError::Unavailable(format!(
                "a membership change is already in progress on broker group {}; retry when it has finished",
                self.group.group()
            ))
        })
    }

    /// Refuses while the membership `m` shows is not committed: a change
    /// proposed by an earlier leader left behind (joint), or a leader so new
    /// that it has not yet committed an entry of its term. Checked after the
    /// request's own validation, so a bad request hears what is wrong with it.
    fn settled(&self, m: &RaftMetrics<TypeConfig>) -> Result<(), ApiError> {
        if m.membership_config != m.committed_membership_config
            || m.membership_config.membership().get_joint_config().len() > 1
        {
            return Err(ApiError::Unavailable(format!(
                "broker group {}'s membership at log index {} is not committed yet (a change in flight, \
                 or a leader just elected); retry shortly",
                self.group.group(),
                m.membership_config.log_id().as_ref().map_or(0, |l| l.index)
            )));
        }
        Ok(())
    }

    /// This replica's current membership, whether it is committed, whether
    /// this replica leads, and its removal notice if any.
    pub fn get_membership(&self) -> pb::GetMembershipResponse {
        let m = self.metrics();
        let committed = m.membership_config == m.committed_membership_config;
        pb::GetMembershipResponse {
            membership: Some(view(self.group.group(), &m.membership_config, committed)),
            node_id: self.group.node_id(),
            removed: self.group.removed().map(|r| r.message.clone()).unwrap_or_default(),
            leader: m.state == ServerState::Leader,
        }
    }

    fn change_error(&self, e: RaftError<TypeConfig, ClientWriteError<TypeConfig>>, what: &str) -> ApiError {
        let g = self.group.group();
        match e {
            RaftError::APIError(ClientWriteError::ForwardToLeader(f))
            | RaftError::APIError(ClientWriteError::LogEntryDiscarded(f)) => ApiError::NotLeader {
                leader_endpoint: f
                    .leader_node
                    .map(|n| n.addr)
                    .or_else(|| f.leader_id.map(|l| self.group.endpoint_of(l)))
                    .unwrap_or_default(),
            },
            RaftError::APIError(ClientWriteError::ChangeMembershipError(c)) => match c {
                ChangeMembershipError::InProgress(p) => ApiError::Unavailable(format!(
                    "{what}: a membership change is already in progress on broker group {g} ({p}); retry shortly"
                )),
                ChangeMembershipError::LearnerNotFound(l) => ApiError::FailedPrecondition(format!(
                    "{what}: node {} is not a learner of broker group {g} (removed meanwhile?)",
                    l.node_id
                )),
                ChangeMembershipError::EmptyMembership(_) => ApiError::FailedPrecondition(format!(
                    "{what}: the change would leave broker group {g} with no voter"
                )),
                other => ApiError::FailedPrecondition(format!("{what}: refused by Raft: {other}")),
            },
            RaftError::APIError(other) => ApiError::Unavailable(format!("{what}: refused by Raft: {other}")),
            RaftError::Fatal(f) => ApiError::Unavailable(format!("{what}: Raft on this node has stopped: {f}")),
        }
    }

    /// See the module docs: learner, catch-up, promotion.
    pub async fn add_replica(&self, req: pb::AddReplicaRequest) -> Result<pb::AddReplicaResponse, Status> {
        let g = self.group.group().to_owned();
        let id = node_id_arg(req.node_id)?;
        let raft_endpoint = raft_endpoint_for(&req.endpoint, &req.raft_endpoint)?;
        let catch_up = match req.catch_up_timeout_ms {
            0 => DEFAULT_CATCH_UP,
            ms => Duration::from_millis(u64::from(ms)).min(MAX_CATCH_UP),
        };
        self.group.ensure_leader()?;
        let _busy = self.begin()?;
        let node = BrokerNode::new(&req.endpoint, &raft_endpoint);
        let m = self.metrics();
        let membership = m.membership_config.membership();
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        if voters.contains(&id) {
            let at = membership.get_node(&id).map(|n| n.addr.clone()).unwrap_or_default();
            return Err(ApiError::FailedPrecondition(format!(
                "node {id} is already a voter of broker group {g} (endpoint {at}); members: {}",
                describe_members(&m)
            ))
            .into());
        }
        if let Some((other, _)) = membership
            .nodes()
            .find(|(other, n)| **other != id && (n.addr == req.endpoint || n.raft_endpoint() == raft_endpoint.as_str()))
        {
            return Err(ApiError::FailedPrecondition(format!(
                "endpoint {} (raft {raft_endpoint}) is already used by node {other} of broker group {g}; remove node {other} first",
                req.endpoint
            ))
            .into());
        }
        if voters.len() >= MAX_VOTERS {
            return Err(ApiError::FailedPrecondition(format!(
                "broker group {g} already has {} voters, the most allowed ({MAX_VOTERS}); remove one first",
                voters.len()
            ))
            .into());
        }
        self.settled(&m)?;
        match membership.get_node(&id) {
            Some(existing) if *existing == node => {
                tracing::info!(node = id, "node is already a learner; resuming its catch-up");
            }
            Some(existing) => {
                return Err(ApiError::FailedPrecondition(format!(
                    "node {id} is already a learner of broker group {g} at {} (raft {}); remove it first to change its endpoints",
                    existing.addr,
                    existing.raft_endpoint()
                ))
                .into());
            }
            None => {
                tracing::info!(node = id, endpoint = %req.endpoint, raft_endpoint = %raft_endpoint, "adding a learner");
                self.group
                    .raft()
                    .add_learner(id, node, false)
                    .await
                    .map_err(|e| self.change_error(e, &format!("adding node {id} as a learner")))?;
            }
        }
        self.wait_caught_up(id, catch_up).await?;
        tracing::info!(node = id, "learner caught up; promoting it to voter");
        let resp = self
            .group
            .raft()
            .change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([id])), false)
            .await
            .map_err(|e| self.change_error(e, &format!("promoting node {id} to voter")))?;
        tracing::info!(node = id, log_index = resp.log_id.index, "replica added");
        Ok(pb::AddReplicaResponse {
            membership: Some(self.committed_view()),
        })
    }

    fn committed_view(&self) -> pb::MembershipView {
        view(self.group.group(), &self.metrics().committed_membership_config, true)
    }

    /// Waits until `id`'s matched log is within [`MAX_PROMOTE_LAG`] of this
    /// leader's last log, waking on metrics changes.
    async fn wait_caught_up(&self, id: NodeId, within: Duration) -> Result<(), Status> {
        let g = self.group.group();
        let deadline = Instant::now() + within;
        let mut watch = self.group.raft().metrics();
        loop {
            let (lag, matched, last) = {
                let m = watch.borrow_watched();
                if m.state != ServerState::Leader {
                    return Err(ApiError::NotLeader {
                        leader_endpoint: m.current_leader.map(|l| self.group.endpoint_of(l)).unwrap_or_default(),
                    }
                    .into());
                }
                if m.membership_config.membership().get_node(&id).is_none() {
                    return Err(ApiError::FailedPrecondition(format!(
                        "node {id} left broker group {g} while catching up (removed by another change)"
                    ))
                    .into());
                }
                let matched = m
                    .replication
                    .as_ref()
                    .and_then(|r| r.get(&id))
                    .and_then(|l| l.as_ref().map(|l| l.index));
                let last = m.last_log_index.unwrap_or(0);
                (last.saturating_sub(matched.unwrap_or(0)), matched, last)
            };
            if matched.is_some() && lag <= MAX_PROMOTE_LAG {
                return Ok(());
            }
            let now = Instant::now();
            if now >= deadline {
                let matched = matched.map_or(
                    "nothing yet (unreachable, or still receiving a snapshot)".to_owned(),
                    |m| format!("through index {m}"),
                );
                return Err(deadline_exceeded(format!(
                    "node {id} did not catch up within {within:?}: it has replicated {matched} of the leader's {last} \
                     (lag {lag} entries, promotion needs at most {MAX_PROMOTE_LAG}); it stays a learner of broker group {g} \
                     and AddReplica again resumes"
                )));
            }
            // Replication metrics change with every ack; the cap only bounds a
            // wait whose change we could not observe.
            let _ = tokio::time::timeout((deadline - now).min(Duration::from_millis(200)), watch.changed()).await;
        }
    }

    pub async fn remove_replica(&self, req: pb::RemoveReplicaRequest) -> Result<pb::RemoveReplicaResponse, Status> {
        let g = self.group.group().to_owned();
        let id = node_id_arg(req.node_id)?;
        self.group.ensure_leader()?;
        let _busy = self.begin()?;
        let m = self.metrics();
        let membership = m.membership_config.membership();
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        if membership.get_node(&id).is_none() {
            return Err(ApiError::FailedPrecondition(format!(
                "node {id} is not a member of broker group {g}; members: {}",
                describe_members(&m)
            ))
            .into());
        }
        let change = if voters.contains(&id) {
            if voters.len() <= 1 {
                return Err(ApiError::FailedPrecondition(format!(
                    "node {id} is the last voter of broker group {g}: removing it would leave no voter"
                ))
                .into());
            }
            ChangeMembers::RemoveVoters(BTreeSet::from([id]))
        } else {
            ChangeMembers::RemoveNodes(BTreeSet::from([id]))
        };
        self.settled(&m)?;
        let me = self.group.node_id();
        if id == me
            && let Some(answer) = self.hand_over_and_forward(&m, id).await?
        {
            return Ok(answer);
        }
        tracing::info!(node = id, leader_removes_itself = id == me, "removing a replica");
        let resp = self
            .group
            .raft()
            .change_membership(change, false)
            .await
            .map_err(|e| self.change_error(e, &format!("removing node {id}")))?;
        tracing::info!(node = id, log_index = resp.log_id.index, "replica removed");
        // The response's membership is the committed uniform config: this
        // node's metrics may already show the next leader's view when it
        // removed itself.
        let membership = resp
            .membership
            .clone()
            .unwrap_or_else(|| m.membership_config.membership().clone());
        let stored = StoredMembership::new(Some(resp.log_id), membership);
        Ok(pb::RemoveReplicaResponse {
            membership: Some(view(&g, &stored, true)),
        })
    }

    /// A leader asked to remove itself first hands leadership to the most
    /// caught-up other voter and has that one remove it, as a follower. Were it
    /// to commit its own removal, openraft's step-down would try to hand over
    /// only afterwards, when the others no longer take Raft RPCs from it (peer
    /// authentication admits members only), and the group would wait out an
    /// election timeout. `None`: the hand-over did not happen in time and this
    /// node, still leading, removes itself.
    async fn hand_over_and_forward(
        &self,
        m: &RaftMetrics<TypeConfig>,
        id: NodeId,
    ) -> Result<Option<pb::RemoveReplicaResponse>, Status> {
        let Some(to) = best_other_voter(m, id) else {
            return Ok(None);
        };
        tracing::info!(to, "asked to remove itself: handing leadership over first");
        self.group
            .raft()
            .trigger()
            .transfer_leader(to)
            .await
            .map_err(|f| ApiError::Unavailable(format!("Raft on this node has stopped: {f}")))?;
        if self.wait_leader_is(to, DEFAULT_TRANSFER).await.is_err() {
            if self.metrics().state == ServerState::Leader {
                tracing::warn!(to, "leadership did not move in time; removing this leader directly");
                return Ok(None);
            }
            // Someone else leads now: the caller retries there.
            return Err(self
                .group
                .ensure_leader()
                .err()
                .map_or_else(|| Status::unavailable("leadership is moving; retry"), Status::from));
        }
        let endpoint = self.group.endpoint_of(to);
        let channel = self
            .group
            .client_endpoint(&endpoint)
            .map_err(|e| ApiError::Internal(format!("the new leader's endpoint {endpoint:?}: {e}")))?
            .connect_timeout(Duration::from_secs(2))
            .timeout(DEFAULT_TRANSFER)
            .connect()
            .await
            .map_err(|e| {
                ApiError::Unavailable(format!(
                    "handed leadership to node {to} but cannot reach it at {endpoint}: {e}; retry there"
                ))
            })?;
        // A leader just elected answers UNAVAILABLE until a quorum confirms it.
        // Signed as this broker: the caller was checked here.
        let mut client = AdminServiceClient::new(raftmq_proto::request_auth::SignedChannel::new(
            channel,
            self.group.auth().forwarding_credentials(),
        ));
        let deadline = Instant::now() + DEFAULT_TRANSFER;
        let resp = loop {
            match client.remove_replica(pb::RemoveReplicaRequest { node_id: id }).await {
                Err(s) if s.code() == tonic::Code::Unavailable && Instant::now() < deadline => {
                    tracing::debug!(to, error = %s, "the new leader is not ready; asking again");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                answer => break answer?.into_inner(),
            }
        };
        Ok(Some(resp))
    }

    /// Waits until this node sees `to` lead; its term.
    async fn wait_leader_is(&self, to: NodeId, within: Duration) -> Result<u64, Status> {
        let g = self.group.group();
        let me = self.group.node_id();
        let deadline = Instant::now() + within;
        let mut watch = self.group.raft().server_metrics();
        loop {
            let (leader, term, state) = {
                let s = self.group.raft().metrics();
                let s = s.borrow_watched();
                (s.current_leader, s.current_term, s.state)
            };
            if leader == Some(to) {
                return Ok(term);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(deadline_exceeded(format!(
                    "leadership of broker group {g} did not move to node {to} within {within:?}; \
                     this node (node {me}) is {state:?}, current leader {}",
                    leader.map_or("unknown".to_owned(), |l| l.to_string())
                )));
            }
            if tokio::time::timeout(deadline - now, watch.changed())
                .await
                .is_ok_and(|r| r.is_err())
            {
                return Err(ApiError::Unavailable("Raft on this node stopped during the transfer".into()).into());
            }
        }
    }

    pub async fn transfer_leader(&self, req: pb::TransferLeaderRequest) -> Result<pb::TransferLeaderResponse, Status> {
        let g = self.group.group().to_owned();
        let within = match req.timeout_ms {
            0 => DEFAULT_TRANSFER,
            ms => Duration::from_millis(u64::from(ms)).min(MAX_CATCH_UP),
        };
        self.group.ensure_leader()?;
        let me = self.group.node_id();
        let m = self.metrics();
        let membership = m.membership_config.membership();
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        let to = match req.to_node_id {
            Some(to) => {
                node_id_arg(to)?;
                if !voters.contains(&to) {
                    return Err(ApiError::FailedPrecondition(if membership.get_node(&to).is_some() {
                        format!("node {to} is a learner of broker group {g}; only a voter can lead")
                    } else {
                        format!(
                            "node {to} is not a member of broker group {g}; members: {}",
                            describe_members(&m)
                        )
                    })
                    .into());
                }
                to
            }
            None => best_other_voter(&m, me).ok_or_else(|| {
                ApiError::FailedPrecondition(format!(
                    "broker group {g} has no voter other than node {me} to hand leadership to"
                ))
            })?,
        };
        if to == me {
            return Ok(pb::TransferLeaderResponse {
                leader_id: me,
                leader_endpoint: self.group.endpoint_of(me),
                term: m.current_term,
            });
        }
        tracing::info!(to, "transferring leadership");
        self.group
            .raft()
            .trigger()
            .transfer_leader(to)
            .await
            .map_err(|f| ApiError::Unavailable(format!("Raft on this node has stopped: {f}")))?;
        let term = self.wait_leader_is(to, within).await?;
        Ok(pb::TransferLeaderResponse {
            leader_id: to,
            leader_endpoint: self.group.endpoint_of(to),
            term,
        })
    }
}

/// The voter other than `me` whose log matches the leader's furthest (what
/// openraft's own step-down picks).
fn best_other_voter(m: &RaftMetrics<TypeConfig>, me: NodeId) -> Option<NodeId> {
    let matched = |id: &NodeId| m.replication.as_ref().and_then(|r| r.get(id)).cloned().flatten();
    m.membership_config
        .membership()
        .voter_ids()
        .filter(|v| *v != me)
        .max_by_key(|v| matched(v))
}

/// Watches for this replica's removal from its group (see the module docs);
/// ends at shutdown or once removed.
pub fn spawn_removal_watch(group: GroupHandle, connect_timeout: Duration) {
    let tasks = group.tasks().clone();
    let span = tracing::info_span!("removal_watch", group = %group.group(), node = group.node_id());
    tasks.spawn(
        async move {
            let mut server = group.raft().server_metrics();
            let mut tick = tokio::time::interval(PROBE_INTERVAL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let stop = group.shutdown().clone();
            let mut probes = Probes::new(group.clone(), connect_timeout);
            loop {
                let probe = tokio::select! {
                    _ = stop.cancelled() => return,
                    changed = server.changed() => {
                        if changed.is_err() {
                            return; // Raft stopped.
                        }
                        false
                    }
                    _ = tick.tick() => true,
                };
                let found = match committed_without_me(&group) {
                    Some(index) => Some(index),
                    None if probe => probes.ask_peers(&group).await,
                    None => None,
                };
                if let Some(index) = found {
                    on_removed(&group, index).await;
                    return;
                }
            }
        }
        .instrument(span),
    );
}

/// The index of the committed membership that removed this replica, when it
/// leads (the step-down case). Only a leader's own view is proof: a follower or
/// learner catching up replays old memberships, committed ones among them,
/// that do not list it (it was added later) or that removed an earlier holder
/// of its id.
fn committed_without_me(group: &GroupHandle) -> Option<u64> {
    let metrics = group.raft().metrics();
    let m = metrics.borrow_watched();
    if m.state != ServerState::Leader || m.membership_config != m.committed_membership_config {
        return None;
    }
    let committed = &m.committed_membership_config;
    let index = committed.log_id().as_ref()?.index;
    let listed = committed.membership().get_node(&group.node_id()).is_some();
    (!listed && committed.membership().nodes().next().is_some()).then_some(index)
}

/// Clients to peers' client ports, kept across probes.
struct Probes {
    /// Dials with the node's client TLS.
    group: GroupHandle,
    connect_timeout: Duration,
    clients: BTreeMap<String, AdminServiceClient<tonic::transport::Channel>>,
}

impl Probes {
    fn new(group: GroupHandle, connect_timeout: Duration) -> Self {
        Probes {
            group,
            connect_timeout,
            clients: BTreeMap::new(),
        }
    }

    fn client(&mut self, endpoint: &str) -> Option<AdminServiceClient<tonic::transport::Channel>> {
        if let Some(c) = self.clients.get(endpoint) {
            return Some(c.clone());
        }
        let ep = self
            .group
            .client_endpoint(endpoint)
            .ok()?
            .connect_timeout(self.connect_timeout)
            .timeout(PROBE_TIMEOUT);
        let client = AdminServiceClient::new(ep.connect_lazy());
        self.clients.insert(endpoint.to_owned(), client.clone());
        Some(client)
    }

    /// Asks the leader this node knows, or every other member when it knows
    /// none or that one no longer leads, for its membership. Proof of removal
    /// is an answer from a leader whose membership is committed (no change in
    /// flight), does not list this node, and is at least as new as the latest
    /// membership this node knows: the leader's log holds every committed
    /// entry, so no later membership re-adding this node can exist, and this
    /// node's own membership of the same index would list it.
    async fn ask_peers(&mut self, group: &GroupHandle) -> Option<u64> {
        let me = group.node_id();
        let (mine, leader, others) = {
            let metrics = group.raft().metrics();
            let m = metrics.borrow_watched();
            if m.state == ServerState::Leader {
                return None; // A leader learns its removal from its own commit.
            }
            let mine = m.membership_config.log_id().as_ref()?.index;
            let membership = m.membership_config.membership();
            let leader = m
                .current_leader
                .filter(|l| *l != me)
                .and_then(|l| membership.get_node(&l))
                .map(|n| n.addr.clone());
            let others: Vec<String> = membership
                .nodes()
                .filter(|(id, _)| **id != me)
                .map(|(_, n)| n.addr.clone())
                .filter(|addr| Some(addr) != leader.as_ref())
                .collect();
            (mine, leader, others)
        };
        let mut asked_a_leader = false;
        if let Some(endpoint) = leader {
            let (found, was_leader) = self.ask(group, &endpoint, mine).await;
            if found.is_some() || was_leader {
                return found;
            }
            asked_a_leader = was_leader;
        }
        if asked_a_leader {
            return None;
        }
        let mut clients = Vec::new();
        for endpoint in others {
            if let Some(c) = self.client(&endpoint) {
                clients.push((endpoint, c));
            }
        }
        let asks = clients
            .into_iter()
            .map(|(endpoint, client)| async move { Self::ask_with(client, group, &endpoint, mine).await.0 });
        futures::future::join_all(asks).await.into_iter().flatten().max()
    }

    async fn ask(&mut self, group: &GroupHandle, endpoint: &str, mine: u64) -> (Option<u64>, bool) {
        match self.client(endpoint) {
            Some(client) => Self::ask_with(client, group, endpoint, mine).await,
            None => (None, false),
        }
    }

    /// One probe: the removal index if the answer proves it, and whether the
    /// answering node leads.
    async fn ask_with(
        mut client: AdminServiceClient<tonic::transport::Channel>,
        group: &GroupHandle,
        endpoint: &str,
        mine: u64,
    ) -> (Option<u64>, bool) {
        let me = group.node_id();
        let Ok(resp) = client.get_membership(pb::GetMembershipRequest {}).await else {
            return (None, false);
        };
        let resp = resp.into_inner();
        let Some(view) = resp.membership.filter(|_| resp.leader) else {
            return (None, false);
        };
        let listed = view.members.iter().any(|m| m.node_id == me);
        let proof = view.broker_group == group.group()
            && view.committed
            && view.log_index >= mine
            && !listed
            && !view.members.is_empty();
        if proof {
            tracing::debug!(leader = resp.node_id, %endpoint, index = view.log_index, "the leader's membership no longer lists this node");
        }
        (proof.then_some(view.log_index), true)
    }
}

/// Stops serving: every client request is answered with the removal, the
/// NameServers are no longer told about this node, and Raft stops (a removed
/// leader first gets a moment to hand leadership over).
async fn on_removed(group: &GroupHandle, log_index: u64) {
    let (me, g) = (group.node_id(), group.group().to_owned());
    let removed = Removed {
        log_index,
        message: format!(
            "node {me} was removed from broker group {g} (membership at log index {log_index}); it no longer serves this group"
        ),
    };
    if !group.mark_removed(removed.clone()) {
        return;
    }
    tracing::warn!(node = me, group = %g, log_index, "{}", removed.message);
    let raft = group.raft().clone();
    // openraft's step-down watcher transfers a removed leader's leadership;
    // stopping Raft before it did would cost the group an election timeout.
    let deadline = Instant::now() + REMOVED_LEADER_HANDOVER;
    let mut server = raft.server_metrics();
    while server.borrow_watched().state == ServerState::Leader {
        let now = Instant::now();
        if now >= deadline
            || tokio::time::timeout(deadline - now, server.changed())
                .await
                .is_ok_and(|r| r.is_err())
        {
            break;
        }
    }
    raft.runtime_config().elect(false);
    if let Err(e) = raft.shutdown().await {
        tracing::warn!(node = me, error = %e, "stopping Raft on a removed replica failed");
    }
}

/// Answers every client request of a removed replica with the removal, and
/// every request of a replica that is not yet a member with UNAVAILABLE.
/// `GetMembership` is always answered, here and straight from the admin
/// service: peers probe with it every second, and the probes must not pass the
/// test fault layer inside this one (they would use up a reply a test means to
/// drop), so this layer goes outermost.
#[derive(Clone)]
pub struct MembershipGateLayer {
    group: GroupHandle,
    admin: AdminServiceServer<crate::admin::Admin>,
}

impl MembershipGateLayer {
    pub fn new(group: GroupHandle, admin: crate::admin::Admin) -> Self {
        MembershipGateLayer {
            group,
            admin: admin.into_server(),
        }
    }
}

impl<S> tower::Layer<S> for MembershipGateLayer {
    type Service = MembershipGate<S>;

    fn layer(&self, inner: S) -> Self::Service {
        MembershipGate {
            inner,
            group: self.group.clone(),
            admin: self.admin.clone(),
        }
    }
}

#[derive(Clone)]
pub struct MembershipGate<S> {
    inner: S,
    group: GroupHandle,
    admin: AdminServiceServer<crate::admin::Admin>,
}

const GET_MEMBERSHIP: &str = "/raftmq.v1.AdminService/GetMembership";
const SERVED_BEFORE_JOINING: &str = "/raftmq.v1.AdminService/ClusterStatus";

impl<S> MembershipGate<S> {
    /// Why this request is refused, if it is.
    fn refusal(&self, path: &str) -> Option<Status> {
        if let Some(r) = self.group.removed() {
            return Some(Status::unavailable(r.message.clone()));
        }
        if path == SERVED_BEFORE_JOINING {
            return None;
        }
        let metrics = self.group.raft().metrics();
        let m = metrics.borrow_watched();
        if m.membership_config.membership().nodes().next().is_none() {
            return Some(Status::unavailable(format!(
                "node {} is not yet a member of broker group {}: it waits to be added (raftmq admin replica add) \
                 or for the group to be initialized",
                self.group.node_id(),
                self.group.group()
            )));
        }
        None
    }
}

type GateFuture<E> = futures::future::BoxFuture<'static, Result<http::Response<tonic::body::Body>, E>>;

impl<S, B> tower::Service<http::Request<B>> for MembershipGate<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: tonic::codegen::Body + Send + 'static,
    B::Error: Into<tonic::codegen::StdError> + Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = futures::future::Either<S::Future, GateFuture<S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let path = req.uri().path();
        if path == GET_MEMBERSHIP {
            let mut admin = self.admin.clone();
            return futures::future::Either::Right(Box::pin(async move {
                match tower::Service::call(&mut admin, req).await {
                    Ok(response) => Ok(response),
                    Err(never) => match never {},
                }
            }));
        }
        match self.refusal(path) {
            None => futures::future::Either::Left(self.inner.call(req)),
            Some(status) => futures::future::Either::Right(Box::pin(futures::future::ready(Ok(status.into_http())))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_host_and_port() {
        assert_eq!(raft_endpoint_for("127.0.0.1:10911", "").unwrap(), "127.0.0.1:40911");
        assert_eq!(
            raft_endpoint_for("broker-a-4:10911", "10.0.0.4:5000").unwrap(),
            "10.0.0.4:5000"
        );
        for bad in [
            "",
            "127.0.0.1",
            ":10911",
            "host:0",
            "host:port",
            "http://h:1",
            "h:70000",
        ] {
            assert!(
                matches!(raft_endpoint_for(bad, ""), Err(ApiError::InvalidArgument(_))),
                "{bad:?} was accepted"
            );
        }
        assert!(matches!(raft_endpoint_for("h:40000", ""), Err(ApiError::InvalidArgument(m)) if m.contains("65535")));
        assert!(matches!(
            raft_endpoint_for("h:1", "h:1"),
            Err(ApiError::InvalidArgument(_))
        ));
        assert!(matches!(node_id_arg(0), Err(ApiError::InvalidArgument(_))));
    }
}
