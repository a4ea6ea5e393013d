//! The server side of Raft RPC: the `raftmq.raft.v1.RaftService` tonic service on
//! the node's peer port. Each request is authenticated first ([`crate::peer_auth`]:
//! signed with the group's peer secret by a member of the group), and what it
//! claims must match who signed it (a vote's candidate, an append's or a
//! snapshot's leader, a transfer's old leader); then it must name this node's
//! broker group. Bad input becomes a `Status` with a message; openraft decides
//! everything else (stale terms, conflicts) and its answer goes back as JSON.
//! An inbound append stream that breaks is reported to [`LeaderWatch`].

use std::io::SeekFrom;
use std::path::PathBuf;
use std::sync::Arc;

use futures::StreamExt;
use openraft::Raft;
use openraft::async_runtime::WatchReceiver;
use openraft::error::Fatal;
use openraft::raft::{TransferLeaderRequest, VoteRequest};
use raftmq_proto::raft::v1 as pb;
use raftmq_proto::raft::v1::raft_service_server::{RaftService, RaftServiceServer};
use raftmq_raft_store::{NodeId, StateMachine, TypeConfig};
use tokio::io::{AsyncSeekExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

use crate::failover::LeaderWatch;
use crate::peer_auth::{AuthError, PEER_AUTH_KEY, PeerSecret, unix_ms};
use crate::wire::{self, SnapshotHeader, WireError};

/// The Raft RPC endpoint of one broker group's replica on this node.
#[derive(Clone)]
pub struct RaftRpcService {
    group: Arc<str>,
    raft: Raft<TypeConfig, StateMachine>,
    secret: PeerSecret,
    /// How far a signature's time may be from this node's clock.
    auth_window: std::time::Duration,
    watch: Arc<LeaderWatch>,
    /// Tests only: breaks inbound append streams on a reset fault.
    faults: Option<crate::faults::Faults>,
    /// Where received snapshots are staged before installing; same filesystem as
    /// the store, so staging never crosses devices.
    incoming_dir: Arc<PathBuf>,
    /// Ends the long-lived append streams at shutdown; the server's graceful
    /// drain would otherwise wait on them until its grace period runs out.
    shutdown: CancellationToken,
}

impl RaftRpcService {
    pub fn new(
        group: &str,
        raft: Raft<TypeConfig, StateMachine>,
        (secret, auth_window): (PeerSecret, std::time::Duration),
        (watch, faults): (Arc<LeaderWatch>, Option<crate::faults::Faults>),
        incoming_dir: PathBuf,
        shutdown: CancellationToken,
    ) -> Self {
        RaftRpcService {
            group: group.into(),
            raft,
            secret,
            auth_window,
            watch,
            faults,
            incoming_dir: Arc::new(incoming_dir),
            shutdown,
        }
    }

    /// The tonic service, accepting messages up to `max_message_bytes`.
    pub fn into_server(self, max_message_bytes: usize) -> RaftServiceServer<Self> {
        RaftServiceServer::new(self)
            .max_decoding_message_size(max_message_bytes)
            .max_encoding_message_size(max_message_bytes)
    }

    fn check_group(&self, group: &str) -> Result<(), Status> {
        if group == &*self.group {
            Ok(())
        } else {
            Err(Status::invalid_argument(format!(
                "this node serves broker group {:?}, not {group:?}",
                &*self.group
            )))
        }
    }

    fn span(&self, rpc: &'static str) -> tracing::Span {
        tracing::debug_span!("raft_rpc", rpc, group = %self.group)
    }

    /// The member of this group that signed `request` for `rpc`, or UNAUTHENTICATED.
    fn authenticate<T>(&self, request: &Request<T>, rpc: &'static str) -> Result<NodeId, Status> {
        let header = request
            .metadata()
            .get(PEER_AUTH_KEY)
            .ok_or(AuthError::Missing)
            .and_then(|v| v.to_str().map_err(|_| AuthError::Malformed));
        let checked = header.and_then(|h| {
            let node = self.secret.verify(&self.group, rpc, h, unix_ms(), self.auth_window)?;
            let metrics = self.raft.metrics();
            let m = metrics.borrow_watched();
            let membership = m.membership_config.membership();
            // A node waiting to be initialized has no membership yet: the secret
            // alone admits the member that forms the group.
            let known = membership.nodes().next().is_none() || membership.get_node(&node).is_some();
            if known {
                Ok(node)
            } else {
                Err(AuthError::NotMember {
                    node,
                    group: self.group.to_string(),
                })
            }
        });
        checked.map_err(|e| {
            tracing::warn!(group = %self.group, rpc, remote = ?request.remote_addr(), error = %e, "refused an unauthenticated Raft RPC");
            Status::unauthenticated(e.to_string())
        })
    }
}

type Inbound = std::pin::Pin<Box<dyn futures::Stream<Item = Result<pb::AppendEntriesRequest, Status>> + Send>>;

impl RaftRpcService {
    /// Tests only: the inbound stream breaks (an error, as from a torn-down
    /// connection) once the fault layer resets `sender -> this node`.
    fn broken_on_reset_fault(&self, sender: NodeId, requests: Streaming<pb::AppendEntriesRequest>) -> Inbound {
        let Some(faults) = self.faults.clone() else {
            return Box::pin(requests);
        };
        let me = self.watch.node_id();
        Box::pin(futures::stream::unfold(Some(requests), move |state| {
            let faults = faults.clone();
            async move {
                let mut requests = state?;
                tokio::select! {
                    item = requests.next() => item.map(|i| (i, Some(requests))),
                    () = faults.reset_signalled(sender, me) => {
                        Some((Err(Status::unavailable("fault layer: connection reset")), None))
                    }
                }
            }
        }))
    }
}

/// PERMISSION_DENIED unless the node that signed a request is the one it speaks for.
fn same_sender(signed_by: NodeId, claimed: NodeId, what: &str) -> Result<(), Status> {
    if signed_by == claimed {
        Ok(())
    } else {
        Err(Status::permission_denied(format!(
            "{what} names node {claimed} but was signed by node {signed_by}"
        )))
    }
}

fn bad_input(e: WireError) -> Status {
    Status::invalid_argument(e.to_string())
}

/// openraft only fails a request when this Raft node has stopped (storage error,
/// panic, shutdown); the sender should treat it like an unreachable peer.
fn fatal(e: impl Into<Fatal<TypeConfig>>) -> Status {
    let e = e.into();
    tracing::warn!(error = %e, "Raft node cannot serve RPCs");
    Status::unavailable(format!("Raft node has stopped: {e}"))
}

fn reply<T: serde::Serialize>(what: &'static str, value: &T) -> Result<Response<pb::RaftReply>, Status> {
    let body = wire::to_json(what, value).map_err(|e| Status::internal(e.to_string()))?;
    Ok(Response::new(pb::RaftReply { body }))
}

fn raft_fatal(e: openraft::error::RaftError<TypeConfig>) -> Status {
    match e {
        openraft::error::RaftError::Fatal(f) => fatal(f),
        // The default error parameter is Infallible: no API error can occur.
        openraft::error::RaftError::APIError(never) => match never {},
    }
}

impl RaftRpcService {
    /// Feeds the request stream to `Raft::stream_append`, which appends in order
    /// with up to 64 requests in flight and answers each once it is flushed. The
    /// first undecodable request or wrong group ends the input; the replies to the
    /// requests before it are sent, then the error.
    fn stream(&self, sender: NodeId, requests: Streaming<pb::AppendEntriesRequest>) -> ReplyStream {
        let requests = self.broken_on_reset_fault(sender, requests);
        let failure: Arc<std::sync::Mutex<Option<Status>>> = Arc::default();
        let input = {
            let (svc, failure) = (self.clone(), failure.clone());
            // Ending the input at shutdown lets openraft's reader finish and drop
            // the request body, which closes the HTTP/2 stream so the drain completes.
            let shutdown = self.shutdown.clone().cancelled_owned();
            requests.take_until(shutdown).scan((), move |_, item| {
                let decoded = match item {
                    Ok(req) => svc
                        .check_group(&req.broker_group)
                        .and_then(|()| wire::decode_append(req).map_err(bad_input))
                        .and_then(|rpc| same_sender(sender, rpc.vote.leader_id.voted_for, "append").map(|()| rpc))
                        .inspect_err(|status| {
                            tracing::warn!(group = %svc.group, error = %status, "refused an append stream request");
                        }),
                    Err(status) => {
                        // The leader went away or reset the stream. Routine when it
                        // restarts a session; when its process died, the watch
                        // notices that the leader no longer answers.
                        tracing::debug!(group = %svc.group, error = %status, "append stream broke");
                        svc.watch.stream_broke(sender);
                        Err(status)
                    }
                };
                let next = match decoded {
                    Ok(rpc) => Some(rpc),
                    Err(status) => {
                        if let Ok(mut slot) = failure.lock() {
                            *slot = Some(status);
                        }
                        None
                    }
                };
                futures::future::ready(next)
            })
        };
        let replies = self.raft.stream_append(input).map(|res| match res {
            Ok(result) => {
                let body =
                    wire::to_json("stream append reply", &result).map_err(|e| Status::internal(e.to_string()))?;
                Ok(pb::RaftReply { body })
            }
            Err(e) => Err(fatal(e)),
        });
        let failure = futures::stream::once(async move { failure.lock().ok().and_then(|mut g| g.take()) })
            .filter_map(|f| futures::future::ready(f.map(Err)));
        let shutdown = self.shutdown.clone().cancelled_owned();
        Box::pin(replies.chain(failure).take_until(shutdown))
    }

    async fn append(&self, sender: NodeId, req: pb::AppendEntriesRequest) -> Result<Response<pb::RaftReply>, Status> {
        self.check_group(&req.broker_group)?;
        let rpc = wire::decode_append(req).map_err(bad_input)?;
        same_sender(sender, rpc.vote.leader_id.voted_for, "append")?;
        tracing::trace!(prev = ?rpc.prev_log_id, entries = rpc.entries.len(), "append entries");
        let resp = self.raft.append_entries(rpc).await.map_err(raft_fatal)?;
        reply("append reply", &resp)
    }

    async fn vote(&self, sender: NodeId, req: pb::VoteRequest, pre: bool) -> Result<Response<pb::RaftReply>, Status> {
        self.check_group(&req.broker_group)?;
        let mut rpc: VoteRequest<TypeConfig> = wire::from_json("vote request", &req.body).map_err(bad_input)?;
        same_sender(sender, rpc.vote.leader_id.voted_for, "vote")?;
        // A replica with an empty log whose candidate's log is past the initial
        // membership (index 0) was wiped, or was never part of the group: it has
        // forgotten any vote it gave in this term, so granting one now could elect
        // two leaders in one term. It votes again once replication has refilled it.
        // Forming a new group is unaffected: the first candidate's log is index 0.
        let own_last = self.raft.metrics().borrow_watched().last_log_index;
        let candidate_last = rpc.last_log_id.as_ref().map(|l| l.index);
        if own_last.is_none() && candidate_last.is_some_and(|i| i > 0) {
            tracing::warn!(
                candidate = sender,
                candidate_last_log_index = candidate_last,
                "refusing a vote: this replica's log is empty (new or wiped) and the group is past its first entry"
            );
            return Err(Status::failed_precondition(format!(
                "node {} of broker group {} has an empty log (new or wiped); it votes only after replication refills it",
                self.watch.node_id(),
                self.group
            )));
        }
        // A vote past the leader lease is granted for a handover by the leader,
        // or for a fast failover that this node confirms: its own probe must find
        // the leader gone too, or the lease stands.
        if rpc.leadership_transfer && req.leader_unreachable && !self.watch.agrees_leader_gone().await {
            tracing::info!(
                candidate = sender,
                "fast-failover vote while the leader still answers here; the lease stands"
            );
            rpc.leadership_transfer = false;
        }
        let resp = if pre {
            self.raft.pre_vote(rpc).await
        } else {
            self.raft.vote(rpc).await
        }
        .map_err(raft_fatal)?;
        tracing::debug!(granted = resp.vote_granted, pre, "answered vote");
        reply("vote reply", &resp)
    }

    async fn transfer(
        &self,
        sender: NodeId,
        req: pb::TransferLeaderRequest,
    ) -> Result<Response<pb::RaftReply>, Status> {
        self.check_group(&req.broker_group)?;
        let rpc: TransferLeaderRequest<TypeConfig> =
            wire::from_json("transfer-leader request", &req.body).map_err(bad_input)?;
        // Only the leader itself hands its leadership over.
        same_sender(sender, rpc.from_leader().leader_id.voted_for, "transfer-leader")?;
        let resp = self.raft.handle_transfer_leader(rpc).await.map_err(fatal)?;
        reply("transfer-leader reply", &resp)
    }

    async fn snapshot(
        &self,
        sender: NodeId,
        mut stream: Streaming<pb::SnapshotChunk>,
    ) -> Result<Response<pb::RaftReply>, Status> {
        let first = stream
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("empty snapshot stream"))?;
        self.check_group(&first.broker_group)?;
        let header: SnapshotHeader = wire::from_json("snapshot header", &first.header).map_err(bad_input)?;
        same_sender(sender, header.vote.leader_id.voted_for, "snapshot")?;
        tracing::info!(last_log_id = ?header.meta.last_log_id, "receiving snapshot");
        let io_err = |action: &'static str| {
            let dir = self.incoming_dir.clone();
            move |e: std::io::Error| Status::internal(format!("{action} snapshot in {}: {e}", dir.display()))
        };
        // Unnamed temp file: the OS deletes it when the last handle closes, so an
        // aborted transfer leaves nothing behind to clean up.
        let staged = tempfile::tempfile_in(&*self.incoming_dir).map_err(io_err("staging"))?;
        let mut file = tokio::fs::File::from_std(staged);
        let mut bytes = 0u64;
        let mut chunk = first;
        loop {
            file.write_all(&chunk.data).await.map_err(io_err("writing"))?;
            bytes += chunk.data.len() as u64;
            if chunk.done {
                break;
            }
            chunk = stream
                .message()
                .await?
                .ok_or_else(|| Status::invalid_argument("snapshot stream ended before its last chunk"))?;
        }
        file.flush().await.map_err(io_err("writing"))?;
        file.seek(SeekFrom::Start(0)).await.map_err(io_err("rewinding"))?;
        let file = file.into_std().await;
        let snapshot = openraft::alias::SnapshotOf::<TypeConfig, raftmq_raft_store::SnapshotData> {
            meta: header.meta,
            snapshot: raftmq_raft_store::SnapshotData::Stream(file),
        };
        let resp = self
            .raft
            .install_full_snapshot(header.vote, snapshot)
            .await
            .map_err(fatal)?;
        tracing::info!(bytes, "installed snapshot");
        reply("snapshot reply", &resp)
    }
}

type ReplyStream = std::pin::Pin<Box<dyn futures::Stream<Item = Result<pb::RaftReply, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl RaftService for RaftRpcService {
    type StreamAppendStream = ReplyStream;

    async fn stream_append(
        &self,
        request: Request<Streaming<pb::AppendEntriesRequest>>,
    ) -> Result<Response<ReplyStream>, Status> {
        let _span = self.span("stream_append").entered();
        let sender = self.authenticate(&request, "stream_append")?;
        tracing::trace!(sender, "append stream opened");
        Ok(Response::new(self.stream(sender, request.into_inner())))
    }

    async fn append_entries(
        &self,
        request: Request<pb::AppendEntriesRequest>,
    ) -> Result<Response<pb::RaftReply>, Status> {
        let sender = self.authenticate(&request, "append_entries")?;
        self.append(sender, request.into_inner())
            .instrument(self.span("append_entries"))
            .await
    }

    async fn vote(&self, request: Request<pb::VoteRequest>) -> Result<Response<pb::RaftReply>, Status> {
        let sender = self.authenticate(&request, "vote")?;
        RaftRpcService::vote(self, sender, request.into_inner(), false)
            .instrument(self.span("vote"))
            .await
    }

    async fn pre_vote(&self, request: Request<pb::VoteRequest>) -> Result<Response<pb::RaftReply>, Status> {
        let sender = self.authenticate(&request, "pre_vote")?;
        RaftRpcService::vote(self, sender, request.into_inner(), true)
            .instrument(self.span("pre_vote"))
            .await
    }

    async fn transfer_leader(
        &self,
        request: Request<pb::TransferLeaderRequest>,
    ) -> Result<Response<pb::RaftReply>, Status> {
        let sender = self.authenticate(&request, "transfer_leader")?;
        self.transfer(sender, request.into_inner())
            .instrument(self.span("transfer_leader"))
            .await
    }

    async fn confirm_leader_gone(
        &self,
        request: Request<pb::ConfirmLeaderGoneRequest>,
    ) -> Result<Response<pb::ConfirmLeaderGoneReply>, Status> {
        let asker = self.authenticate(&request, "confirm_leader_gone")?;
        let req = request.into_inner();
        self.check_group(&req.broker_group)?;
        let gone = self
            .watch
            .confirms_leader_gone(req.leader_id, req.term)
            .instrument(self.span("confirm_leader_gone"))
            .await;
        tracing::debug!(
            asker,
            leader = req.leader_id,
            term = req.term,
            gone,
            "asked whether the leader is gone"
        );
        Ok(Response::new(pb::ConfirmLeaderGoneReply { gone }))
    }

    async fn install_snapshot(
        &self,
        request: Request<Streaming<pb::SnapshotChunk>>,
    ) -> Result<Response<pb::RaftReply>, Status> {
        let sender = self.authenticate(&request, "install_snapshot")?;
        self.snapshot(sender, request.into_inner())
            .instrument(self.span("install_snapshot"))
            .await
    }
}
