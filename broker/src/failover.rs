//! Fast failover: what a follower does when the network says the leader died,
//! instead of waiting out the leader lease and an election timeout.
//!
//! A leader's process that dies closes its connections at once, so each
//! follower's inbound replication stream ends with an error. The follower then
//! checks once whether the leader still answers on its peer port (accepts a
//! connection and sends HTTP/2 settings). A leader that answers is alive (a
//! flapping stream, a restarted session), and nothing happens. One that refuses, or does not answer within
//! `leader_probe_timeout`, is taken for dead. Before campaigning, the follower
//! asks the other voters whether they find the leader gone too
//! (`ConfirmLeaderGone`, each answering from its own probe): only with a quorum
//! agreeing does it go on, so a follower cut off from a healthy leader never
//! raises the term (this is the fast path's pre-vote). Then the first surviving
//! voter (by node id; the next ones wait `stagger` each, so they do not split the
//! vote) campaigns at once as if the dead leader had handed leadership to it. Its vote
//! requests are marked `leader_unreachable`, and a voter grants such a vote past
//! its leader lease only after its own probe of the leader fails too
//! ([`LeaderWatch::agrees_leader_gone`]); otherwise the lease stands and the
//! vote is refused. A paused or cut-off leader closes nothing: it is left to the
//! election timeout, as before.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use openraft::async_runtime::WatchReceiver;
use openraft::raft::TransferLeaderRequest;
use openraft::{Raft, ServerState};
use raftmq_raft_store::{NodeId, StateMachine, TypeConfig};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::transport::Channel;

use crate::faults::Faults;
use crate::network::PeerLink;
use crate::peer_auth::{PEER_AUTH_KEY, PeerSecret, unix_ms};
use raftmq_proto::raft::v1 as pb;
use raftmq_proto::raft::v1::raft_service_client::RaftServiceClient;

/// How long a failed probe is believed: both survivors of a dead leader ask at
/// once (one to campaign, one to grant), and a dead leader stays dead that long.
/// A leader that answered is asked again next time: a connect to it is cheap.
const PROBE_REUSE: Duration = Duration::from_millis(500);

/// Settings of the fast path.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct FastFailover {
    /// Off: a dead leader is noticed by the election timeout only.
    pub enabled: bool,
    /// A leader that neither accepts nor refuses a connection within this long
    /// is taken for dead (a killed container's address stops answering at all).
    #[serde(with = "humantime_serde")]
    pub probe_timeout: Duration,
    /// Delay per rank between survivors that campaign, so the first one's vote
    /// arrives before the second one campaigns. Tried instead and not kept: the
    /// survivors telling each other (in `ConfirmLeaderGone`) whether they react
    /// too and how long their logs are, the second waiting for the first's vote.
    /// It took every in-process kill to 17-32 ms (this: about 25, and 80 when
    /// only one survivor sees the break), but in containers 7 to 12 of 25 kills
    /// took 230-800 ms against 2 of 25 (409-436 ms) with this stagger.
    #[serde(with = "humantime_serde")]
    pub stagger: Duration,
}

impl Default for FastFailover {
    fn default() -> Self {
        FastFailover {
            enabled: true,
            probe_timeout: Duration::from_millis(100),
            stagger: Duration::from_millis(30),
        }
    }
}

/// The term of this node's latest fast-failover campaign (0: none), shared by
/// the [`LeaderWatch`] that starts campaigns and the Raft network that marks the
/// campaign's vote requests `leader_unreachable`. The network is built before
/// Raft and the watch after, hence a handle of its own.
#[derive(Clone, Default, Debug)]
pub struct CampaignMarker(Arc<AtomicU64>);

impl CampaignMarker {
    /// Whether a vote request of `term` from this node is a fast-failover one.
    pub fn is_campaign_term(&self, term: u64) -> bool {
        term != 0 && self.0.load(Ordering::Relaxed) == term
    }

    fn set(&self, term: u64) {
        self.0.store(term, Ordering::Relaxed);
    }
}

/// A probe that found the leader gone.
struct Probe {
    leader: NodeId,
    at: Instant,
}

/// Watches for the leader's death on one replica; shared by its Raft service
/// (which reports broken streams and asks before granting a marked vote) and its
/// Raft network (which marks its own fast-failover votes).
pub struct LeaderWatch {
    node_id: NodeId,
    group: String,
    raft: Raft<TypeConfig, StateMachine>,
    settings: FastFailover,
    faults: Option<Faults>,
    campaign: CampaignMarker,
    failed_probe: Mutex<Option<Probe>>,
    /// The (leader, term) a reaction is running for: broken streams and peers'
    /// questions arrive together, and one reaction at a time is enough.
    reacting: Mutex<Option<(NodeId, u64)>>,
    /// Signs the `ConfirmLeaderGone` questions to the other voters.
    secret: PeerSecret,
    /// Mutual TLS toward peers' Raft ports, as the Raft network dials them.
    tls: Option<tonic::transport::ClientTlsConfig>,
    /// Channels to peers for those questions, by Raft address (lazily connected).
    peers: Mutex<HashMap<String, Channel>>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
}

impl LeaderWatch {
    pub fn new(
        node_id: NodeId,
        group: &str,
        raft: Raft<TypeConfig, StateMachine>,
        settings: FastFailover,
        link: PeerLink,
        (shutdown, tasks): (CancellationToken, TaskTracker),
    ) -> Arc<Self> {
        Arc::new(LeaderWatch {
            node_id,
            group: group.to_owned(),
            raft,
            settings,
            faults: link.faults,
            campaign: link.campaign,
            failed_probe: Mutex::new(None),
            reacting: Mutex::new(None),
            secret: link.secret,
            tls: link.tls,
            peers: Mutex::new(HashMap::new()),
            shutdown,
            tasks,
        })
    }

    pub fn node_id(&self) -> NodeId {
        self.node_id
    }

    /// An inbound replication stream from `sender` ended with an error.
    pub fn stream_broke(self: &Arc<Self>, sender: NodeId) {
        if !self.settings.enabled || self.shutdown.is_cancelled() {
            return;
        }
        let this = self.clone();
        self.tasks.spawn(async move {
            tokio::select! {
                _ = this.shutdown.cancelled() => {}
                _ = this.react(sender) => {}
            }
        });
    }

    async fn react(&self, sender: NodeId) {
        let Some((term, leader, rank)) = self.following(sender) else {
            return;
        };
        {
            let mut reacting = self.reacting.lock().unwrap_or_else(PoisonError::into_inner);
            if *reacting == Some((leader, term)) {
                return;
            }
            *reacting = Some((leader, term));
        }
        self.react_once(term, leader, rank).await;
        *self.reacting.lock().unwrap_or_else(PoisonError::into_inner) = None;
    }

    async fn react_once(&self, term: u64, leader: NodeId, rank: u32) {
        if self.leader_reachable(leader).await {
            tracing::debug!(group = %self.group, leader, "replication stream broke but the leader answers; nothing to do");
            return;
        }
        if !self.quorum_agrees(leader, term).await {
            tracing::info!(group = %self.group, leader, "the leader does not answer here, but no quorum finds it gone; leaving it to the election timeout");
            return;
        }
        if rank > 0 {
            tokio::time::sleep(self.settings.stagger * rank).await;
        }
        // Campaign only if nothing moved meanwhile: another survivor's vote or a
        // new leader would show as a different term or leader.
        let metrics = self.raft.metrics().borrow_watched().clone();
        if metrics.current_term != term
            || metrics.current_leader != Some(leader)
            || metrics.state != ServerState::Follower
        {
            return;
        }
        self.campaign.set(term + 1);
        tracing::info!(group = %self.group, dead_leader = leader, term, "leader's connections closed and it does not answer; campaigning now");
        let req = TransferLeaderRequest::new(metrics.vote, self.node_id, None);
        if let Err(e) = self.raft.handle_transfer_leader(req).await {
            tracing::warn!(group = %self.group, error = %e, "could not start a fast-failover election");
        }
    }

    /// `(term, leader, rank)` if this node follows `sender` as a voter now; rank
    /// is this node's place among the voters other than the leader.
    fn following(&self, sender: NodeId) -> Option<(u64, NodeId, u32)> {
        let metrics = self.raft.metrics();
        let m = metrics.borrow_watched();
        if m.state != ServerState::Follower || m.current_leader != Some(sender) {
            return None;
        }
        let membership = m.membership_config.membership();
        let survivors: Vec<NodeId> = membership.voter_ids().filter(|id| *id != sender).collect();
        let rank = survivors.iter().position(|id| *id == self.node_id)?;
        Some((m.current_term, sender, u32::try_from(rank).unwrap_or(u32::MAX)))
    }

    /// Whether enough other voters find `leader` gone that, with this node, they
    /// make a quorum of the voters. Asked concurrently; each may probe the leader
    /// itself first, so each answer is bounded by twice the probe timeout.
    async fn quorum_agrees(&self, leader: NodeId, term: u64) -> bool {
        let (others, needed) = {
            let metrics = self.raft.metrics();
            let m = metrics.borrow_watched();
            let membership = m.membership_config.membership();
            let voters: Vec<NodeId> = membership.voter_ids().collect();
            let others: Vec<String> = voters
                .iter()
                .filter(|id| **id != leader && **id != self.node_id)
                .filter_map(|id| membership.get_node(id).map(|n| n.raft_endpoint().into_owned()))
                .collect();
            // A majority of all voters (the dead leader among them), less this node.
            (others, (voters.len() / 2 + 1).saturating_sub(1))
        };
        if needed == 0 {
            return true;
        }
        let mut answers: futures::stream::FuturesUnordered<_> = others
            .iter()
            .map(|addr| self.ask_leader_gone(addr, leader, term))
            .collect();
        let mut agreed = 0;
        while let Some(gone) = futures::StreamExt::next(&mut answers).await {
            agreed += usize::from(gone);
            if agreed >= needed {
                return true;
            }
        }
        false
    }

    /// Asks the peer at `addr` whether it finds `leader` (of `term`) gone; any
    /// failure to answer counts as no.
    async fn ask_leader_gone(&self, addr: &str, leader: NodeId, term: u64) -> bool {
        if let Some(f) = &self.faults
            && let Some(peer) = self.peer_id(addr)
            && !f.link_open(self.node_id, peer)
        {
            return false;
        }
        let channel = {
            let mut peers = self.peers.lock().unwrap_or_else(PoisonError::into_inner);
            match peers.get(addr) {
                Some(c) => c.clone(),
                None => match raftmq_tls::endpoint(addr, self.tls.as_ref()) {
                    Ok(e) => {
                        let c = e.connect_timeout(self.settings.probe_timeout).connect_lazy();
                        peers.insert(addr.to_owned(), c.clone());
                        c
                    }
                    Err(_) => return false,
                },
            }
        };
        let mut req = tonic::Request::new(pb::ConfirmLeaderGoneRequest {
            broker_group: self.group.clone(),
            leader_id: leader,
            term,
        });
        let signature = self
            .secret
            .sign(&self.group, self.node_id, "confirm_leader_gone", unix_ms());
        if let Ok(value) = signature.parse() {
            req.metadata_mut().insert(PEER_AUTH_KEY, value);
        }
        let mut client = RaftServiceClient::new(channel);
        let call = client.confirm_leader_gone(req);
        let answer = tokio::time::timeout(self.settings.probe_timeout * 2, call).await;
        tracing::debug!(group = %self.group, peer = %addr, leader, ?answer, "asked a peer whether the leader is gone");
        matches!(answer, Ok(Ok(reply)) if reply.get_ref().gone)
    }

    fn peer_id(&self, raft_addr: &str) -> Option<NodeId> {
        let metrics = self.raft.metrics();
        let m = metrics.borrow_watched();
        m.membership_config
            .membership()
            .nodes()
            .find(|(_, n)| n.raft_endpoint() == raft_addr)
            .map(|(id, _)| *id)
    }

    /// Answers a peer's `ConfirmLeaderGone`: whether `leader`, which this node
    /// followed in `term`, is gone from here too. A node that has moved on to
    /// another term or leader says no: the asker's view is stale. Agreeing does
    /// not make this node campaign too: tried, it split the vote whenever this
    /// node had just restarted and its log was behind the asker's (bench
    /// failover: every third kill took two elections and 290-440 ms instead of
    /// about 80 ms).
    pub async fn confirms_leader_gone(&self, leader: NodeId, term: u64) -> bool {
        let (current_term, current_leader) = {
            let metrics = self.raft.metrics();
            let m = metrics.borrow_watched();
            (m.current_term, m.current_leader)
        };
        let gone = match current_leader {
            _ if current_term != term => false,
            None => true,
            Some(l) if l != leader || l == self.node_id => false,
            Some(_) => !self.leader_reachable(leader).await,
        };
        tracing::debug!(
            node = self.node_id,
            leader,
            term,
            current_term,
            ?current_leader,
            gone,
            "confirming the leader is gone"
        );
        gone
    }

    /// Asked before granting a vote marked `leader_unreachable`: does this node
    /// also find its leader gone? A node without a leader agrees.
    pub async fn agrees_leader_gone(&self) -> bool {
        let leader = self.raft.metrics().borrow_watched().current_leader;
        match leader {
            None => true,
            Some(leader) if leader == self.node_id => false,
            Some(leader) => !self.leader_reachable(leader).await,
        }
    }

    /// Whether the leader's peer port answers within `probe_timeout` (see [`answers`]).
    async fn leader_reachable(&self, leader: NodeId) -> bool {
        if let Some(p) = self
            .failed_probe
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            && p.leader == leader
            && p.at.elapsed() < PROBE_REUSE
        {
            return false;
        }
        let addr = {
            let metrics = self.raft.metrics();
            let m = metrics.borrow_watched();
            m.membership_config
                .membership()
                .get_node(&leader)
                .map(|n| n.raft_endpoint().into_owned())
        };
        let Some(addr) = addr else {
            return false;
        };
        let reachable = match &self.faults {
            // The fault layer cuts links with silence: a blocked link times out.
            Some(f) if !f.link_open(self.node_id, leader) => {
                tokio::time::sleep(self.settings.probe_timeout).await;
                false
            }
            _ => matches!(
                tokio::time::timeout(self.settings.probe_timeout, answers(&addr)).await,
                Ok(true)
            ),
        };
        tracing::debug!(group = %self.group, leader, %addr, reachable, "probed the leader");
        if !reachable {
            *self.failed_probe.lock().unwrap_or_else(PoisonError::into_inner) = Some(Probe {
                leader,
                at: Instant::now(),
            });
        }
        reachable
    }
}

/// Whether a live process serves `addr`: it accepts a connection *and* writes to
/// it. The gRPC server sends its HTTP/2 SETTINGS as soon as it accepts, so one
/// byte back proves a running process. A bare connect is not enough: the kernel
/// completes handshakes into the listen backlog of a process that is being
/// killed (measured: connects to a SIGKILLed broker's port succeeded while its
/// followers were already reading the end of its streams).
async fn answers(addr: &str) -> bool {
    use tokio::io::AsyncReadExt;
    let Ok(mut stream) = tokio::net::TcpStream::connect(addr).await else {
        return false;
    };
    let mut byte = [0u8; 1];
    matches!(stream.read(&mut byte).await, Ok(n) if n > 0)
}
