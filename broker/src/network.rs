//! The client side of Raft RPC: openraft's network factory and per-peer network
//! over tonic. One lazily connected HTTP/2 channel per peer address, cached in the
//! factory, carries every RPC to that peer (replication, heartbeats, votes,
//! snapshots multiplex on it), because openraft asks for a new client on every
//! replication restart and every election round. It does not retry: openraft owns
//! retries and backoff, this layer only classifies failures for it.
//!
//! Every request is signed with the group's peer secret ([`crate::peer_auth`])
//! and sent to the peer's Raft port (`BrokerNode::raft_endpoint`). In tests, a
//! [`Faults`] switchboard decides each request's fate before it leaves.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::StreamExt;
use openraft::base::{BoxFuture, BoxStream};
use openraft::error::{NetworkError, RPCError, ReplicationClosed, StreamingError, Timeout, Unreachable};
use openraft::network::{RPCOption, RPCTypes};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, StreamAppendResult, TransferLeaderRequest,
    TransferLeaderResponse, VoteRequest, VoteResponse,
};
use openraft::{RaftNetworkFactory, RaftNetworkV2};
use raftmq_proto::raft::v1 as pb;
use raftmq_proto::raft::v1::raft_service_client::RaftServiceClient;
use raftmq_raft_store::{BrokerNode, NodeId, SnapshotData, TypeConfig, Vote};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tonic::{Code, Status};

use crate::failover::CampaignMarker;
use crate::faults::{Faults, Verdict};
use crate::peer_auth::{PEER_AUTH_KEY, PeerSecret, unix_ms};
use crate::wire::{self, SnapshotHeader, WireError};

/// Snapshot chunk size when openraft does not say (it normally passes
/// `snapshot_max_chunk_size`, 3 MiB by default).
const DEFAULT_CHUNK: usize = 1024 * 1024;

/// The slowest rate (bytes per second) at which a healthy follower is assumed to
/// take in replication requests: transfer, decode, write and fsync. A reply owed
/// for a large request is a timeout only after openraft's soft TTL *plus* the
/// owed bytes at this rate. Without it, one AppendEntries of a few dozen 1 MiB
/// entries (64 KiB messages, 256 in flight) outlived the 75 ms TTL every time:
/// replication restarted from scratch in a loop, heartbeats timed out, and
/// leadership moved (measured: 485-510 failed sends of 6,000, stalls of seconds).
const SLOWEST_INTAKE_BYTES_PER_SEC: f64 = 16.0 * 1024.0 * 1024.0;

/// Requests sent on a replication session and not answered yet, oldest first,
/// with when each was sent (the replication round's start, for metrics).
#[derive(Default)]
struct Owed {
    sizes: std::collections::VecDeque<(u64, std::time::Instant)>,
    bytes: u64,
}

impl Owed {
    fn sent(&mut self, size: u64) {
        self.sizes.push_back((size, std::time::Instant::now()));
        self.bytes += size;
    }

    /// The oldest request's reply arrived (replies come in request order):
    /// returns when that request was sent.
    fn answered(&mut self) -> Option<std::time::Instant> {
        let (size, sent_at) = self.sizes.pop_front()?;
        self.bytes -= size;
        Some(sent_at)
    }

    /// How long a window with replies owed may pass without one.
    fn window(&self, ttl: Duration) -> Option<Duration> {
        (!self.sizes.is_empty())
            .then(|| ttl + Duration::from_secs_f64(self.bytes as f64 / SLOWEST_INTAKE_BYTES_PER_SEC))
    }
}

/// How channels to peers are built.
#[derive(Debug, Clone)]
pub struct ChannelSettings {
    pub connect_timeout: Duration,
    pub max_message_bytes: usize,
}

/// What every request to a peer carries or passes through besides its message.
#[derive(Debug, Clone)]
pub struct PeerLink {
    pub secret: PeerSecret,
    pub campaign: CampaignMarker,
    /// Tests only: the fault switchboard.
    pub faults: Option<Faults>,
    /// Mutual TLS toward peers' Raft ports (the cluster CA, this node's
    /// certificate); `None`: plaintext.
    pub tls: Option<tonic::transport::ClientTlsConfig>,
    /// Where replication rounds (AppendEntries sent -> answered) are recorded,
    /// when the node serves metrics.
    pub replication_seconds: Option<Arc<raftmq_raft_store::stats::AtomicHistogram>>,
}

/// openraft's factory of per-peer clients for one broker group.
pub struct GrpcNetworkFactory {
    node_id: NodeId,
    group: Arc<str>,
    settings: ChannelSettings,
    link: PeerLink,
    /// Keyed by address, not node id, so a membership change that moves a node to
    /// a new address gets a new channel.
    channels: HashMap<String, Result<Channel, Arc<str>>>,
}

impl GrpcNetworkFactory {
    pub fn new(node_id: NodeId, group: &str, settings: ChannelSettings, link: PeerLink) -> Self {
        GrpcNetworkFactory {
            node_id,
            group: group.into(),
            settings,
            link,
            channels: HashMap::new(),
        }
    }

    fn channel(&mut self, addr: &str) -> Result<Channel, Arc<str>> {
        if let Some(c) = self.channels.get(addr) {
            return c.clone();
        }
        // connect_lazy: no I/O here; the first RPC connects, and a broken connection
        // is re-established by the next RPC rather than by a background loop.
        let channel = raftmq_tls::endpoint(addr, self.link.tls.as_ref())
            .map(|e| {
                e.connect_timeout(self.settings.connect_timeout)
                    .tcp_nodelay(true)
                    .connect_lazy()
            })
            .map_err(|e| Arc::<str>::from(format!("invalid peer address {addr:?}: {e}")));
        self.channels.insert(addr.to_owned(), channel.clone());
        channel
    }
}

impl RaftNetworkFactory<TypeConfig> for GrpcNetworkFactory {
    type Network = GrpcNetwork;

    async fn new_client(&mut self, target: NodeId, node: &BrokerNode) -> GrpcNetwork {
        let client = self.channel(&node.raft_endpoint()).map(|ch| {
            RaftServiceClient::new(ch)
                .max_decoding_message_size(self.settings.max_message_bytes)
                .max_encoding_message_size(self.settings.max_message_bytes)
        });
        GrpcNetwork {
            node_id: self.node_id,
            target,
            group: self.group.clone(),
            link: self.link.clone(),
            client,
        }
    }
}

/// Raft RPCs from this node to one peer.
pub struct GrpcNetwork {
    node_id: NodeId,
    target: NodeId,
    group: Arc<str>,
    link: PeerLink,
    /// An error when the peer's advertised address is not a valid URI: every RPC
    /// then reports the peer unreachable instead of panicking in `new_client`.
    client: Result<RaftServiceClient<Channel>, Arc<str>>,
}

impl GrpcNetwork {
    fn client(&self) -> Result<RaftServiceClient<Channel>, RPCError<TypeConfig>> {
        self.client
            .clone()
            .map_err(|e| RPCError::Unreachable(Unreachable::from_string(e)))
    }

    fn timeout(&self, action: RPCTypes, timeout: Duration) -> Timeout<TypeConfig> {
        Timeout {
            action,
            id: self.node_id,
            target: self.target,
            timeout,
        }
    }

    /// What the fault layer does to one request: pass it (after any delay), or
    /// lose it, which the sender sees as its deadline `ttl` passing in silence.
    async fn fault_gate(&self, action: RPCTypes, ttl: Duration) -> Result<(), RPCError<TypeConfig>> {
        let Some(faults) = &self.link.faults else {
            return Ok(());
        };
        match faults.verdict(self.node_id, self.target) {
            Verdict::Pass => Ok(()),
            Verdict::Delay(d) => {
                tokio::time::sleep(d).await;
                Ok(())
            }
            Verdict::Drop => {
                tokio::time::sleep(ttl).await;
                Err(RPCError::Timeout(self.timeout(action, ttl)))
            }
        }
    }

    /// Runs one unary RPC under openraft's soft deadline and decodes the JSON reply.
    async fn unary<T, F>(&self, action: RPCTypes, ttl: Duration, call: F) -> Result<T, RPCError<TypeConfig>>
    where
        T: serde::de::DeserializeOwned,
        F: Future<Output = Result<tonic::Response<pb::RaftReply>, Status>>,
    {
        self.fault_gate(action, ttl).await?;
        match tokio::time::timeout(ttl, call).await {
            Err(_) => Err(RPCError::Timeout(self.timeout(action, ttl))),
            Ok(Err(status)) => Err(self.status_error(action, ttl, &status)),
            Ok(Ok(reply)) => {
                wire::from_json("reply", &reply.into_inner().body).map_err(|e| RPCError::Network(NetworkError::new(&e)))
            }
        }
    }

    fn status_error(&self, action: RPCTypes, ttl: Duration, status: &Status) -> RPCError<TypeConfig> {
        let msg = format!("{action} to node {} of {}: {status}", self.target, self.group);
        match status.code() {
            // Connection refused or reset, or the peer's Raft has stopped: openraft
            // backs off harder for Unreachable than for a transient network error.
            Code::Unavailable => RPCError::Unreachable(Unreachable::from_string(msg)),
            Code::DeadlineExceeded => RPCError::Timeout(self.timeout(action, ttl)),
            // tonic's channel enforces the grpc-timeout we set and reports it as
            // CANCELLED "Timeout expired"; that is our deadline, not a peer's choice.
            Code::Cancelled if status.message() == "Timeout expired" => RPCError::Timeout(self.timeout(action, ttl)),
            _ => RPCError::Network(NetworkError::from_string(msg)),
        }
    }

    /// A request signed for `rpc` (the name the server authenticates it under).
    fn signed<T>(&self, rpc: &'static str, msg: T) -> tonic::Request<T> {
        let mut req = tonic::Request::new(msg);
        let signature = self.link.secret.sign(&self.group, self.node_id, rpc, unix_ms());
        // Hex and digits only: always a valid ASCII metadata value.
        if let Ok(value) = signature.parse() {
            req.metadata_mut().insert(PEER_AUTH_KEY, value);
        }
        req
    }

    fn request<T>(&self, rpc: &'static str, msg: T, ttl: Duration) -> tonic::Request<T> {
        let mut req = self.signed(rpc, msg);
        // Tells the server the deadline, so it abandons work nobody waits for.
        req.set_timeout(ttl);
        req
    }

    fn encode_error(e: WireError) -> RPCError<TypeConfig> {
        RPCError::Network(NetworkError::new(&e))
    }

    /// Vote and pre-vote travel in the same message; only the RPC differs.
    fn vote_message(
        &self,
        what: &'static str,
        rpc: &VoteRequest<TypeConfig>,
    ) -> Result<pb::VoteRequest, RPCError<TypeConfig>> {
        Ok(pb::VoteRequest {
            broker_group: self.group.to_string(),
            body: wire::to_json(what, rpc).map_err(Self::encode_error)?,
            leader_unreachable: rpc.leadership_transfer && self.link.campaign.is_campaign_term(rpc.vote.leader_id.term),
        })
    }
}

impl RaftNetworkV2<TypeConfig> for GrpcNetwork {
    type SnapshotData = SnapshotData;

    /// Replication and heartbeats: one bidi gRPC stream per replication session,
    /// requests sent as openraft produces them, replies consumed in order. An
    /// idle session owes nothing and may wait indefinitely; a window that starts
    /// with replies owed and ends without one is a timeout (so a stuck follower is
    /// noticed within one to two windows). The window is `soft_ttl` plus the time
    /// the owed bytes take at [`SLOWEST_INTAKE_BYTES_PER_SEC`].
    fn stream_append<'s, S>(
        &'s mut self,
        input: S,
        option: RPCOption,
    ) -> BoxFuture<
        's,
        Result<BoxStream<'s, Result<StreamAppendResult<TypeConfig>, RPCError<TypeConfig>>>, RPCError<TypeConfig>>,
    >
    where
        S: futures::Stream<Item = AppendEntriesRequest<TypeConfig>> + Send + Unpin + 'static,
    {
        Box::pin(async move {
            let ttl = option.soft_ttl();
            let mut input = input;
            // Wait for the first request before dialing: openraft sleeps out its
            // backoff inside the request stream, so dialing first would retry an
            // unreachable peer in a tight loop.
            let Some(first) = input.next().await else {
                let empty: BoxStream<'s, _> = Box::pin(futures::stream::empty());
                return Ok(empty);
            };
            // The session ends when openraft drops the reply stream; the guard then
            // ends the request stream too, closing the HTTP/2 stream instead of
            // leaving it half open on the peer.
            let session = CancellationToken::new();
            let session_guard = session.clone().drop_guard();
            let input = futures::stream::once(futures::future::ready(first))
                .chain(input)
                .take_until(session.cancelled_owned());
            let mut client = self.client()?;
            let owed: Arc<std::sync::Mutex<Owed>> = Arc::default();
            let encode_failure: Arc<std::sync::Mutex<Option<WireError>>> = Arc::default();
            let requests = {
                let (group, owed, failure) = (self.group.clone(), owed.clone(), encode_failure.clone());
                // An entry that cannot be encoded ends the request stream; the
                // failure is reported after the replies to what was sent.
                input.scan((), move |_, rpc| {
                    let next = match wire::encode_append(&group, &rpc) {
                        Ok(msg) => {
                            let size = prost::Message::encoded_len(&msg) as u64;
                            owed.lock().unwrap_or_else(|p| p.into_inner()).sent(size);
                            Some(msg)
                        }
                        Err(e) => {
                            if let Ok(mut slot) = failure.lock() {
                                *slot = Some(e);
                            }
                            None
                        }
                    };
                    futures::future::ready(next)
                })
            };
            // Faults hold a lost request forever: the replies owed stop coming, the
            // window times out and openraft opens a new session, as after a real loss.
            let (faults, from, to) = (self.link.faults.clone(), self.node_id, self.target);
            let requests = requests.then(move |msg| {
                let faults = faults.clone();
                async move {
                    match faults.map(|f| f.verdict(from, to)) {
                        None | Some(Verdict::Pass) => {}
                        Some(Verdict::Delay(d)) => tokio::time::sleep(d).await,
                        Some(Verdict::Drop) => futures::future::pending::<()>().await,
                    }
                    msg
                }
            });
            let request = self.signed("stream_append", requests);
            let replies = match tokio::time::timeout(ttl, client.stream_append(request)).await {
                Err(_) => return Err(RPCError::Timeout(self.timeout(RPCTypes::AppendEntries, ttl))),
                Ok(Err(status)) => return Err(self.status_error(RPCTypes::AppendEntries, ttl, &status)),
                Ok(Ok(response)) => response.into_inner(),
            };
            let this = &*self;
            let rounds = self.link.replication_seconds.clone();
            let out = futures::stream::unfold(Some((replies, session_guard)), move |state| {
                let (owed, encode_failure, rounds) = (owed.clone(), encode_failure.clone(), rounds.clone());
                async move {
                    let (mut replies, session_guard) = state?;
                    let item = loop {
                        let window = owed.lock().unwrap_or_else(|p| p.into_inner()).window(ttl);
                        match tokio::time::timeout(window.unwrap_or(ttl), replies.next()).await {
                            // Replies were owed for a whole window and none came.
                            Err(_) if window.is_some() => {
                                let waited = window.unwrap_or(ttl);
                                break Err(RPCError::Timeout(this.timeout(RPCTypes::AppendEntries, waited)));
                            }
                            // Idle, or the first request went out mid-window: wait on.
                            Err(_) => {}
                            Ok(None) => {
                                let failure = encode_failure.lock().ok().and_then(|mut g| g.take());
                                return failure.map(|e| (Err(Self::encode_error(e)), None));
                            }
                            Ok(Some(Err(status))) => {
                                break Err(this.status_error(RPCTypes::AppendEntries, ttl, &status));
                            }
                            Ok(Some(Ok(reply))) => {
                                let sent_at = owed.lock().unwrap_or_else(|p| p.into_inner()).answered();
                                if let (Some(h), Some(at)) = (&rounds, sent_at) {
                                    h.observe_duration(at.elapsed());
                                }
                                break wire::from_json::<StreamAppendResult<TypeConfig>>(
                                    "stream append reply",
                                    &reply.body,
                                )
                                .map_err(|e| RPCError::Network(NetworkError::new(&e)));
                            }
                        }
                    };
                    // After an error the session is over: openraft starts a new one.
                    let next = item.is_ok().then_some((replies, session_guard));
                    Some((item, next))
                }
            });
            let out: BoxStream<'s, _> = Box::pin(out);
            Ok(out)
        })
    }

    // Required by the trait; openraft replicates through `stream_append` above.
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RPCError<TypeConfig>> {
        let ttl = option.soft_ttl();
        let msg = wire::encode_append(&self.group, &rpc).map_err(Self::encode_error)?;
        let mut client = self.client()?;
        self.unary(
            RPCTypes::AppendEntries,
            ttl,
            client.append_entries(self.request("append_entries", msg, ttl)),
        )
        .await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        let ttl = option.soft_ttl();
        let msg = self.vote_message("vote request", &rpc)?;
        let mut client = self.client()?;
        self.unary(RPCTypes::Vote, ttl, client.vote(self.request("vote", msg, ttl)))
            .await
    }

    async fn pre_vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        let ttl = option.soft_ttl();
        let msg = self.vote_message("pre-vote request", &rpc)?;
        let mut client = self.client()?;
        self.unary(RPCTypes::Vote, ttl, client.pre_vote(self.request("pre_vote", msg, ttl)))
            .await
    }

    async fn transfer_leader(
        &mut self,
        req: TransferLeaderRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<TransferLeaderResponse<TypeConfig>, RPCError<TypeConfig>> {
        let ttl = option.soft_ttl();
        let msg = pb::TransferLeaderRequest {
            broker_group: self.group.to_string(),
            body: wire::to_json("transfer-leader request", &req).map_err(Self::encode_error)?,
        };
        let mut client = self.client()?;
        self.unary(
            RPCTypes::TransferLeader,
            ttl,
            client.transfer_leader(self.request("transfer_leader", msg, ttl)),
        )
        .await
    }

    /// Streams the snapshot in the wire format, generated chunk by chunk from the
    /// snapshot directory by a blocking task. `soft_ttl` bounds each idle period (no
    /// chunk taken by the transport, or no reply after the last one), not the whole
    /// transfer, whose length grows with the retained messages.
    async fn full_snapshot(
        &mut self,
        vote: Vote,
        snapshot: openraft::alias::SnapshotOf<TypeConfig, SnapshotData>,
        cancel: impl Future<Output = ReplicationClosed> + Send + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        let idle = option.soft_ttl();
        let chunk_size = option.snapshot_chunk_size().unwrap_or(DEFAULT_CHUNK).max(1);
        let header = wire::to_json(
            "snapshot header",
            &SnapshotHeader {
                vote,
                meta: snapshot.meta.clone(),
            },
        )
        .map_err(|e| StreamingError::Network(NetworkError::new(&e)))?;
        let mut client = self.client()?;
        let signature = snapshot.meta.signature();

        let progress = Arc::new(AtomicU64::new(0));
        let read_error: Arc<std::sync::Mutex<Option<std::io::Error>>> = Arc::default();
        let chunks = snapshot_chunks(
            self.group.to_string(),
            header,
            snapshot.snapshot.into_chunks(chunk_size),
            progress.clone(),
            read_error.clone(),
        );
        if let Err(RPCError::Timeout(t)) = self.fault_gate(RPCTypes::InstallSnapshot, idle).await {
            return Err(StreamingError::Timeout(t));
        }
        let call = client.install_snapshot(self.signed("install_snapshot", chunks));
        tokio::pin!(call);
        tokio::pin!(cancel);
        let mut seen = 0;
        let result = loop {
            tokio::select! {
                res = &mut call => break res,
                closed = &mut cancel => return Err(StreamingError::Closed(closed)),
                _ = tokio::time::sleep(idle) => {
                    let now = progress.load(Ordering::Relaxed);
                    if now == seen {
                        return Err(StreamingError::Timeout(self.timeout(RPCTypes::InstallSnapshot, idle)));
                    }
                    seen = now;
                }
            }
        };
        if let Some(e) = read_error.lock().ok().and_then(|mut g| g.take()) {
            // The stream ended early without `done`; the receiver discarded it.
            return Err(StreamingError::StorageError(openraft::StorageError::from_io_error(
                openraft::ErrorSubject::Snapshot(Some(signature)),
                openraft::ErrorVerb::Read,
                e,
            )));
        }
        match result {
            Ok(reply) => wire::from_json("snapshot reply", &reply.into_inner().body)
                .map_err(|e| StreamingError::Network(NetworkError::new(&e))),
            Err(status) => Err(self.status_error(RPCTypes::InstallSnapshot, idle, &status).into()),
        }
    }
}

type Chunks = tokio::sync::mpsc::Receiver<std::io::Result<Option<Vec<u8>>>>;

enum ChunkState {
    Header(String, Vec<u8>, Chunks),
    Data(Chunks),
    Done,
}

/// The request stream of `InstallSnapshot`: the header chunk, the snapshot's
/// bytes as [`SnapshotData::into_chunks`] produces them, then an empty chunk
/// with `done`. A read error ends the stream without `done` (so the receiver
/// discards the transfer) and is left in `error`.
fn snapshot_chunks(
    group: String,
    header: Vec<u8>,
    chunks: Chunks,
    progress: Arc<AtomicU64>,
    error: Arc<std::sync::Mutex<Option<std::io::Error>>>,
) -> impl futures::Stream<Item = pb::SnapshotChunk> + Send + 'static {
    futures::stream::unfold(ChunkState::Header(group, header, chunks), move |state| {
        let (progress, error) = (progress.clone(), error.clone());
        async move {
            progress.fetch_add(1, Ordering::Relaxed);
            let chunk = |data: Vec<u8>, done: bool| pb::SnapshotChunk {
                broker_group: String::new(),
                header: Vec::new(),
                data,
                done,
            };
            match state {
                ChunkState::Header(broker_group, header, chunks) => {
                    let first = pb::SnapshotChunk {
                        broker_group,
                        header,
                        data: Vec::new(),
                        done: false,
                    };
                    Some((first, ChunkState::Data(chunks)))
                }
                ChunkState::Data(mut chunks) => match chunks.recv().await {
                    Some(Ok(Some(data))) => Some((chunk(data, false), ChunkState::Data(chunks))),
                    Some(Ok(None)) => Some((chunk(Vec::new(), true), ChunkState::Done)),
                    failed => {
                        let e = match failed {
                            Some(Err(e)) => e,
                            _ => std::io::Error::other("the snapshot reader stopped before the end"),
                        };
                        if let Ok(mut g) = error.lock() {
                            *g = Some(e);
                        }
                        None
                    }
                },
                ChunkState::Done => None,
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reply_window_grows_with_the_bytes_owed_and_closes_when_nothing_is() {
        let ttl = Duration::from_millis(75);
        let mut owed = Owed::default();
        assert_eq!(owed.window(ttl), None, "an idle session may wait indefinitely");
        owed.sent(32 << 20);
        owed.sent(1024);
        let window = owed.window(ttl).expect("replies are owed");
        // 32 MiB + 1 KiB at 16 MiB/s: just over two seconds on top of the TTL.
        assert!(
            window > ttl + Duration::from_secs(2) && window < ttl + Duration::from_millis(2010),
            "{window:?}"
        );
        // The big request answered: only the small one's allowance is left.
        owed.answered();
        let window = owed.window(ttl).expect("one reply is still owed");
        assert!(window < ttl + Duration::from_millis(1), "{window:?}");
        owed.answered();
        assert_eq!(owed.window(ttl), None);
        owed.answered();
        assert_eq!(owed.window(ttl), None, "a stray reply leaves nothing owed");
    }
}
