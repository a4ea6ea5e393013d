//! Shared fixtures for every whole-cluster test: in-process replicas and clusters,
//! a NameServer and a client, the test topic and its messages, convergence
//! checks, and `eventually`, the one way a test waits for something to happen.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use openraft::ServerState;
use openraft::async_runtime::WatchReceiver;
use openraft::metrics::RaftMetrics;
use raftmq_broker::{MessagingConfig, RaftNode, RaftNodeConfig};
use raftmq_client::{Client, ClientConfig, MessageExt, PullConsumer};
use raftmq_proto::v1 as pb;
use raftmq_raft_store::{
    AppendBatch, BrokerNode, Command, Message, NodeId, Response, StoreReader, TopicConfig, TypeConfig,
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub const GROUP: &str = "broker-a";
pub const TOPIC: &str = "orders";
pub const QUEUES: u32 = 4;
/// Generous next to the ~1 s failover the default timing gives: the test machine
/// may be running other builds.
/// Tests that each run a cluster plus producers and consumers take turns: on two
/// cores, running them side by side with the rest of the suite starves Raft
/// heartbeats. One at a time keeps each test's timing honest.
pub static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

pub const DEADLINE: Duration = Duration::from_secs(10);

/// How soon `eventually` first looks again: a leader transfer or a write shows in
/// a few milliseconds, and tests time some of those.
const FIRST_POLL: Duration = Duration::from_millis(5);
/// The longest `eventually` waits between looks: a long wait (a failover, a
/// consumer group catching up) must not spend the two cores, which the replicas
/// it watches need for their heartbeats, on asking again.
const MAX_POLL: Duration = Duration::from_millis(50);

/// One look at a condition that `eventually` waits for. Not an `Option` or a
/// `bool`: "not yet" carries what was seen, so a wait that times out says where
/// it stood rather than only that it failed.
pub enum Check<T> {
    /// The condition holds; `eventually` returns this value.
    Done(T),
    /// Not yet, and what was seen.
    Pending(String),
}

/// Looks at `condition` until it is `Done`, first after 5 ms and then less and
/// less often (up to every 50 ms), and fails naming `what` and the last
/// `Pending` observation once `deadline` has passed.
///
/// An `Err` from the condition fails the wait at once: conditions use it for
/// invariants that must hold on every look, not for "not yet". Waits that poll
/// go through this helper, so no test sleeps a fixed time hoping for progress.
pub async fn eventually<T>(
    deadline: Duration,
    what: &str,
    mut condition: impl AsyncFnMut() -> anyhow::Result<Check<T>>,
) -> anyhow::Result<T> {
    let give_up = Instant::now() + deadline;
    let mut pause = FIRST_POLL;
    loop {
        match condition().await? {
            Check::Done(value) => return Ok(value),
            Check::Pending(seen) => ensure!(
                Instant::now() < give_up,
                "waited {deadline:?} for {what}; last seen: {seen}"
            ),
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(MAX_POLL);
    }
}

/// One HTTP/1.1 request over a fresh connection (`Connection: close`), for the
/// processes' small HTTP servers (metrics endpoints, the console): the status
/// code, the header block lower-cased, and the body. `body` is sent with
/// `content_type` when one is given.
pub async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    content_type: Option<&str>,
    body: &[u8],
) -> anyhow::Result<(u16, String, Vec<u8>)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    let mut request = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    if let Some(t) = content_type {
        request.push_str(&format!("Content-Type: {t}\r\n"));
    }
    request.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
    stream.write_all(request.as_bytes()).await?;
    stream.write_all(body).await?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await?;
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .with_context(|| format!("{method} {path}: no end of the HTTP header"))?;
    let head = String::from_utf8_lossy(&raw[..end]).to_ascii_lowercase();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("{method} {path}: no status in {head:?}"))?;
    Ok((status, head, raw[end + 4..].to_vec()))
}

/// A process of the `raftmq` binary whose stdout lines arrive on a channel: a
/// thread reads them, so a test waiting for a line (a banner, an address) keeps
/// its deadline with `recv_timeout` instead of blocking on the pipe.
pub fn spawn_with_lines(
    cmd: &mut std::process::Command,
    what: &str,
) -> anyhow::Result<(std::process::Child, std::sync::mpsc::Receiver<String>)> {
    use std::io::BufRead;
    let mut child = cmd
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .with_context(|| format!("spawning {what}"))?;
    let stdout = child.stdout.take().with_context(|| format!("{what}'s stdout"))?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    Ok((child, rx))
}

pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}

/// Per-node settings a test varies.
#[derive(Clone, Default)]
pub struct Settings {
    pub messaging: MessagingConfig,
    pub nameservers: Vec<String>,
    /// In-process network faults shared by every replica.
    pub faults: Option<raftmq_broker::faults::Faults>,
    /// Retention and disk watermarks (tests/cluster/retention.rs). `None`: the
    /// defaults, but on a fake, nearly empty disk, so that no test depends on
    /// how full the host's disk is (past 75% the leader would trim early), and
    /// keeping messages for ten years (`append`'s are stamped in 2023).
    pub retention: Option<raftmq_broker::retention::RetentionConfig>,
    /// CommitLog segment size; `None` keeps the default.
    pub segment_bytes: Option<u64>,
    /// Where the replicas' data directories go (a small filesystem in the
    /// watermark test); `None`: the system's temp dir.
    pub data_root: Option<PathBuf>,
    /// TLS on both ports and every dial (tests/cluster/tls.rs); default off.
    pub tls: raftmq_tls::TlsConfig,
    /// Serve a metrics endpoint on an ephemeral port (tests/cluster/metrics.rs).
    pub metrics: bool,
    /// Signed requests and the ACL (tests/cluster/acl.rs); default off.
    pub auth: raftmq_broker::auth::AuthConfig,
}

/// The peer secret every test cluster's replicas share.
pub const PEER_SECRET: &[u8] = b"test-cluster-peer-secret";

/// A Raft RPC signed for `rpc` as `node` with `secret`, as a peer would send it.
pub fn signed<T>(msg: T, rpc: &str, node: NodeId, secret: &[u8]) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    let value =
        raftmq_broker::PeerSecret::new(secret.to_vec()).sign(GROUP, node, rpc, raftmq_broker::peer_auth::unix_ms());
    req.metadata_mut().insert(
        raftmq_broker::peer_auth::PEER_AUTH_KEY,
        value.parse().expect("a signature is ASCII"),
    );
    req
}

/// A Raft RPC signed as member `node` with the cluster's secret.
pub fn signed_as<T>(node: NodeId, rpc: &str, msg: T) -> tonic::Request<T> {
    signed(msg, rpc, node, PEER_SECRET)
}

/// What an attacker wants of a forged Raft RPC: `target` asked to take over
/// leadership, as if the leader holding `vote` sent it.
pub fn forged_transfer(
    vote: raftmq_raft_store::Vote,
    target: NodeId,
) -> anyhow::Result<raftmq_proto::raft::v1::TransferLeaderRequest> {
    let req = openraft::raft::TransferLeaderRequest::<raftmq_raft_store::TypeConfig>::new(vote, target, None);
    Ok(raftmq_proto::raft::v1::TransferLeaderRequest {
        broker_group: GROUP.into(),
        body: raftmq_broker::wire::to_json("transfer", &req)?,
    })
}

/// One replica and the runtime that runs it.
pub struct Replica {
    pub id: NodeId,
    /// The broker group it belongs to (`GROUP` unless started by `Cluster::start_group`).
    group: String,
    dir: PathBuf,
    settings: Settings,
    pub addr: SocketAddr,
    pub raft_addr: SocketAddr,
    rt: Option<tokio::runtime::Runtime>,
    node: Option<RaftNode>,
}

impl Replica {
    /// Starts a replica on `bind` (client and Raft ports; port 0 for a fresh one,
    /// its old addresses when restarting, so the membership's addresses stay right).
    async fn start(
        group: &str,
        id: NodeId,
        dir: &Path,
        bind: (SocketAddr, SocketAddr),
        settings: Settings,
    ) -> anyhow::Result<Replica> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name(format!("{group}-{id}"))
            .enable_all()
            .build()?;
        let data_dir = dir.to_path_buf();
        let node_settings = settings.clone();
        let group_name = group.to_owned();
        let started = rt
            .spawn(async move {
                let client = TcpListener::bind(bind.0)
                    .await
                    .with_context(|| format!("binding {}", bind.0))?;
                let raft = TcpListener::bind(bind.1)
                    .await
                    .with_context(|| format!("binding {}", bind.1))?;
                let mut config = RaftNodeConfig::new(id, &group_name, data_dir, client.local_addr()?.to_string());
                config.raft_advertise_addr = raft.local_addr()?.to_string();
                config.peer_secret = raftmq_broker::PeerSecret::new(PEER_SECRET.to_vec());
                config.messaging = node_settings.messaging;
                config.nameservers = node_settings.nameservers;
                config.faults = node_settings.faults;
                config.tls = node_settings.tls;
                config.auth = node_settings.auth;
                config.retention = node_settings.retention.unwrap_or_else(|| {
                    use raftmq_broker::retention::{DiskUsageSource, RetentionConfig};
                    RetentionConfig {
                        disk_usage: DiskUsageSource::new(|_| Ok((0, 1 << 40))),
                        // `append` stamps its entries in 2023: past the default
                        // 72 h they would be trimmed (once archived by a snapshot
                        // install) under tests that are not about retention.
                        file_reserved_time: Duration::from_secs(10 * 365 * 24 * 3600),
                        ..RetentionConfig::default()
                    }
                });
                if let Some(bytes) = node_settings.segment_bytes {
                    config.store.segment_bytes = bytes;
                }
                // Fast rounds so route tests need not wait seconds.
                config.registration_interval = Duration::from_millis(200);
                let metrics = match node_settings.metrics {
                    true => Some(TcpListener::bind("127.0.0.1:0").await?),
                    false => None,
                };
                let listeners = raftmq_broker::Listeners { client, raft, metrics };
                anyhow::Ok(RaftNode::start(config, listeners, CancellationToken::new()).await?)
            })
            .await
            .map_err(anyhow::Error::from)
            .and_then(|r| r);
        let node = match started {
            Ok(node) => node,
            Err(e) => {
                rt.shutdown_background();
                return Err(e.context(format!("starting {group} node {id}")));
            }
        };
        Ok(Replica {
            id,
            group: group.to_owned(),
            dir: dir.to_path_buf(),
            settings,
            addr: node.local_addr(),
            raft_addr: node.raft_addr(),
            rt: Some(rt),
            node: Some(node),
        })
    }

    pub fn node(&self) -> &RaftNode {
        self.node.as_ref().expect("replica is running")
    }

    pub fn store(&self) -> &StoreReader {
        self.node().store()
    }

    pub fn metrics(&self) -> RaftMetrics<TypeConfig> {
        self.node().raft().metrics().borrow_watched().clone()
    }

    /// Crash: drop the runtime and with it every task, without `raft.shutdown()`.
    pub async fn kill(&mut self) {
        drop(self.node.take());
        if let Some(rt) = self.rt.take() {
            tokio::task::spawn_blocking(move || rt.shutdown_timeout(Duration::from_secs(10)))
                .await
                .expect("runtime shutdown");
        }
    }

    pub async fn restart(&mut self) -> anyhow::Result<()> {
        ensure!(self.node.is_none(), "node {} is still running", self.id);
        let bind = (self.addr, self.raft_addr);
        *self = Replica::start(&self.group, self.id, &self.dir, bind, self.settings.clone()).await?;
        Ok(())
    }

    /// Clean stop, in the order production uses.
    async fn shutdown(&mut self) -> anyhow::Result<()> {
        if let (Some(node), Some(rt)) = (self.node.take(), self.rt.take()) {
            rt.spawn(node.shutdown()).await??;
            tokio::task::spawn_blocking(move || rt.shutdown_timeout(Duration::from_secs(10))).await?;
        }
        Ok(())
    }
}

impl Drop for Replica {
    /// A test that fails early drops running replicas on an async thread, where a
    /// runtime may not block in its drop; let it wind down in the background.
    fn drop(&mut self) {
        drop(self.node.take());
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

pub struct Cluster {
    // Fields drop in order: replicas first, so a test that fails early does not
    // delete the data directories under still-running nodes.
    replicas: Vec<Replica>,
    _dir: tempfile::TempDir,
}

impl Cluster {
    pub async fn start(n: u64) -> anyhow::Result<Cluster> {
        Cluster::start_with(n, MessagingConfig::default()).await
    }

    pub async fn start_with(n: u64, messaging: MessagingConfig) -> anyhow::Result<Cluster> {
        Cluster::start_with_settings(
            n,
            Settings {
                messaging,
                ..Settings::default()
            },
        )
        .await
    }

    pub async fn start_with_settings(n: u64, settings: Settings) -> anyhow::Result<Cluster> {
        Cluster::start_group(GROUP, n, settings).await
    }

    pub fn replica(&self, id: NodeId) -> &Replica {
        &self.replicas[(id - 1) as usize]
    }

    pub fn replica_mut(&mut self, id: NodeId) -> &mut Replica {
        &mut self.replicas[(id - 1) as usize]
    }

    /// Fails unless `leader` still leads in `term`; `when` says at what point.
    pub fn ensure_still_leads(&self, leader: NodeId, term: u64, when: &str) -> anyhow::Result<()> {
        let m = self.replica(leader).metrics();
        anyhow::ensure!(
            m.state == ServerState::Leader && m.current_term == term,
            "{when}: the leader changed: node {leader} is {:?} in term {} (was term {term})",
            m.state,
            m.current_term
        );
        Ok(())
    }

    pub fn running(&self) -> impl Iterator<Item = &Replica> {
        self.replicas.iter().filter(|r| r.node.is_some())
    }

    /// Waits until every running replica names the same leader, that leader is
    /// running, knows it leads, and holds a lease (a quorum acknowledged it):
    /// before that openraft refuses writes with `LeaseExpired`.
    pub async fn wait_for_leader(&self, within: Duration) -> anyhow::Result<NodeId> {
        self.wait_for_leader_other_than(None, within).await
    }

    pub async fn wait_for_leader_other_than(&self, old: Option<NodeId>, within: Duration) -> anyhow::Result<NodeId> {
        eventually(within, &format!("an agreed leader other than {old:?}"), async || {
            let views: Vec<Option<NodeId>> = self.running().map(|r| r.metrics().current_leader).collect();
            if let Some(Some(leader)) = views.first()
                && Some(*leader) != old
                && views.iter().all(|v| *v == Some(*leader))
                && let Some(r) = self.running().find(|r| r.id == *leader)
                && let m = r.metrics()
                && m.state == ServerState::Leader
                && m.last_quorum_acked.is_some()
            {
                return Ok(Check::Done(*leader));
            }
            Ok(Check::Pending(format!("views {views:?}")))
        })
        .await
    }

    /// Waits until every running replica has applied at least `index`.
    pub async fn wait_applied(&self, index: u64) -> anyhow::Result<()> {
        for r in self.running() {
            r.node()
                .raft()
                .wait(Some(DEADLINE))
                .applied_index_at_least(Some(index), format!("node {} applies {index}", r.id))
                .await
                .with_context(|| format!("node {} did not apply {index}", r.id))?;
        }
        Ok(())
    }

    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        for r in &mut self.replicas {
            r.shutdown().await?;
        }
        Ok(())
    }
}

fn create_topic() -> Command {
    Command::UpsertTopic(TopicConfig {
        name: TOPIC.into(),
        queues: QUEUES,
        perm: raftmq_raft_store::command::PERM_READ | raftmq_raft_store::command::PERM_WRITE,
        message_type: Default::default(),
        trace: false,
    })
}

/// Creates the test topic through `node`'s Raft (which must lead).
pub async fn create_topic_via(cluster: &Cluster, node: NodeId) -> anyhow::Result<()> {
    cluster
        .replica(node)
        .node()
        .raft()
        .client_write(create_topic())
        .await
        .map_err(|e| anyhow::anyhow!("create topic through node {node}: {e:?}"))?;
    Ok(())
}

pub fn body(i: u64) -> Bytes {
    Bytes::from(format!("message-{i:05}"))
}

pub fn append(i: u64) -> Command {
    Command::Append(AppendBatch {
        topic: TOPIC.into(),
        queue_id: (i % u64::from(QUEUES)) as u32,
        store_timestamp_ms: 1_700_000_000_000 + i,
        messages: vec![Message {
            tag: "TagA".into(),
            keys: vec![format!("key-{i}")],
            properties: vec![("seq".into(), i.to_string())],
            body: body(i),
            born_timestamp_ms: 1_700_000_000_000 + i,
            deliver_at_ms: 0,
        }],
        producer: None,
        transaction: None,
    })
}

/// Writes messages `range` through `leader`, 32 in flight so openraft batches
/// them, and returns the last log index they reached.
pub async fn write_messages(cluster: &Cluster, leader: NodeId, range: std::ops::Range<u64>) -> anyhow::Result<u64> {
    let raft = cluster.replica(leader).node().raft().clone();
    let indexes: Vec<u64> = futures::stream::iter(range)
        .map(|i| {
            let raft = raft.clone();
            async move {
                let resp = raft
                    .client_write(append(i))
                    .await
                    .map_err(|e| anyhow::anyhow!("writing message {i}: {e:?}"))?;
                match resp.response() {
                    Response::Appended { count: 1, .. } => Ok(resp.log_id().index),
                    other => bail!("message {i}: unexpected response {other:?}"),
                }
            }
        })
        .buffer_unordered(32)
        .try_collect()
        .await?;
    Ok(indexes.into_iter().max().unwrap_or(0))
}

/// Everything a replica serves for the topic: per queue, (offset, raft index, body).
pub type QueueData = Vec<Vec<(u64, u64, Bytes)>>;

pub fn queue_data(store: &StoreReader) -> anyhow::Result<QueueData> {
    (0..QUEUES)
        .map(|q| {
            Ok(store
                .read_messages(TOPIC, q, 0, 100_000)?
                .into_iter()
                .map(|m| (m.queue_offset, m.raft_index, m.message.body))
                .collect())
        })
        .collect()
}

/// Every running replica holds exactly the messages `0..count`, identically.
pub fn assert_converged(cluster: &Cluster, count: u64) -> anyhow::Result<()> {
    let mut reference: Option<(NodeId, QueueData)> = None;
    for r in cluster.running() {
        let data = queue_data(r.store())?;
        ensure!(
            r.store().consume_queue_rows()? == count,
            "node {} has {} ConsumeQueue rows, want {count}",
            r.id,
            r.store().consume_queue_rows()?
        );
        for (q, rows) in data.iter().enumerate() {
            let offsets: Vec<u64> = rows.iter().map(|(o, _, _)| *o).collect();
            ensure!(
                offsets == (0..rows.len() as u64).collect::<Vec<_>>(),
                "node {} queue {q} offsets have gaps",
                r.id
            );
        }
        let bodies: BTreeSet<Bytes> = data.iter().flatten().map(|(_, _, b)| b.clone()).collect();
        ensure!(
            bodies == (0..count).map(body).collect(),
            "node {} does not hold exactly messages 0..{count}",
            r.id
        );
        match &reference {
            None => reference = Some((r.id, data)),
            Some((id, want)) => ensure!(&data == want, "node {} differs from node {id}", r.id),
        }
    }
    Ok(())
}

/// Polls the NameServer until the topic's route satisfies `ok`, or fails at the deadline.
pub async fn wait_for_route(
    client: &mut pb::name_server_service_client::NameServerServiceClient<tonic::transport::Channel>,
    what: &str,
    ok: impl Fn(&pb::GroupRoute) -> bool,
) -> anyhow::Result<pb::GroupRoute> {
    // Only a route the NameServer answered with counts as the last one seen: an
    // error (the NameServer not up yet) says nothing about routing.
    let mut last = None;
    eventually(DEADLINE, &format!("a route showing {what}"), async || {
        let resp = client.query_route(pb::QueryRouteRequest { topic: TOPIC.into() }).await;
        if let Some(g) = resp.ok().and_then(|r| r.into_inner().groups.into_iter().next()) {
            if ok(&g) {
                return Ok(Check::Done(g));
            }
            last = Some(g);
        }
        Ok(Check::Pending(format!("{last:?}")))
    })
    .await
}

/// The Raft index a message id names (see `raftmq_broker::convert`).
pub fn raft_index_of(message_id: &str) -> anyhow::Result<u64> {
    let hex = message_id.get(10..26).context("message id too short")?;
    Ok(u64::from_str_radix(hex, 16)?)
}

/// A NameServer on an ephemeral port, in the test's runtime.
pub struct NameServer {
    pub addr: String,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), raftmq_namesrv::Error>>,
}

impl NameServer {
    /// Short broker timeout and heartbeat, so routes follow a failover in about a second.
    pub async fn start() -> anyhow::Result<NameServer> {
        NameServer::start_with_tls(raftmq_tls::TlsConfig::default()).await
    }

    /// [`NameServer::start`] serving `tls`.
    pub async fn start_with_tls(tls: raftmq_tls::TlsConfig) -> anyhow::Result<NameServer> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?.to_string();
        let stop = CancellationToken::new();
        let task = tokio::spawn(raftmq_namesrv::serve(
            raftmq_namesrv::NameServerConfig {
                broker_timeout: Duration::from_secs(1),
                heartbeat_interval: Duration::from_millis(200),
                tls,
                ..Default::default()
            },
            listener,
            stop.clone(),
        ));
        Ok(NameServer { addr, stop, task })
    }

    pub async fn stop(self) -> anyhow::Result<()> {
        self.stop.cancel();
        Ok(self.task.await??)
    }
}

/// A NameServer, a three-node group that auto-creates topics and registers
/// with it, and a client; returns once the NameServer names the group's leader.
pub async fn start_with_client() -> anyhow::Result<(NameServer, Cluster, Client)> {
    start_with_client_using(MessagingConfig {
        auto_create_topics: true,
        ..MessagingConfig::default()
    })
    .await
}

/// [`start_with_client`] with the brokers' messaging settings given.
pub async fn start_with_client_using(messaging: MessagingConfig) -> anyhow::Result<(NameServer, Cluster, Client)> {
    let ns = NameServer::start().await?;
    let cluster = Cluster::start_with_settings(
        3,
        Settings {
            messaging,
            nameservers: vec![ns.addr.clone()],
            ..Settings::default()
        },
    )
    .await?;
    let leader = cluster.wait_for_leader(DEADLINE).await?;
    let leader_addr = cluster.replica(leader).addr.to_string();
    let client = Client::new(ClientConfig::new(vec![ns.addr.clone()]))?;
    eventually(
        DEADLINE,
        &format!("the NameServer to name leader {leader_addr}"),
        async || {
            let groups = client.admin().list_cluster().await.unwrap_or_default();
            Ok(if groups.iter().any(|g| g.leader_endpoint == leader_addr) {
                Check::Done(())
            } else {
                Check::Pending(format!("groups {groups:?}"))
            })
        },
    )
    .await?;
    Ok((ns, cluster, client))
}

/// A client-side message carrying its sequence number (and `key`, if any) as properties.
pub fn message(seq: u64, key: Option<&str>) -> pb::Message {
    let mut m = pb::Message::new(format!("body-{seq}").into_bytes());
    m.properties.insert("seq".into(), seq.to_string());
    if let Some(k) = key {
        m.keys.push(k.to_owned());
        m.properties.insert("key".into(), k.to_owned());
    }
    m
}

pub fn seq_of(m: &pb::PulledMessage) -> anyhow::Result<u64> {
    m.message
        .as_ref()
        .and_then(|m| m.properties.get("seq"))
        .context("seq property missing")?
        .parse()
        .context("seq not a number")
}

/// Waits until the topic's route comes from a NameServer (not provisional).
pub async fn wait_for_known_route(client: &Client, topic: &str) -> anyhow::Result<Arc<raftmq_client::TopicRoute>> {
    eventually(
        DEADLINE,
        &format!("the NameServer to learn topic {topic}"),
        async || {
            Ok(match client.route(topic).await {
                Ok(r) if !r.provisional => Check::Done(r),
                Ok(r) => Check::Pending(format!("a provisional route {r:?}")),
                Err(e) => Check::Pending(format!("no route: {e}")),
            })
        },
    )
    .await
}

/// Reads every queue of every group of the topic's route from offset 0.
pub async fn pull_everything(
    consumer: &PullConsumer,
    route: &raftmq_client::TopicRoute,
    topic: &str,
) -> anyhow::Result<(Vec<(String, u32, pb::PulledMessage)>, Vec<String>)> {
    let mut out = Vec::new();
    let mut endpoints = Vec::new();
    for g in &route.groups {
        for q in 0..g.queues {
            let mut offset = 0;
            loop {
                let r = consumer
                    .pull(
                        topic,
                        &g.broker_group,
                        q,
                        offset,
                        1024,
                        Duration::ZERO,
                        &raftmq_client::Filter::all(),
                    )
                    .await?;
                endpoints.push(r.endpoint.clone());
                out.extend(r.messages.into_iter().map(|m| (g.broker_group.clone(), q, m)));
                if r.next_offset >= r.max_offset {
                    break;
                }
                ensure!(r.next_offset > offset, "pull made no progress at {offset}");
                offset = r.next_offset;
            }
        }
    }
    Ok((out, endpoints))
}

// ---- Membership changes (tests/cluster/membership.rs) ----

impl Cluster {
    /// Starts replica `id`, which must be the next id (the cluster indexes
    /// replicas by id), fresh and outside the membership: it serves Raft only
    /// and waits to be added. With `at`, it binds those client and Raft
    /// addresses (a replacement on a dead replica's endpoints), else new ports.
    pub async fn start_joiner(&mut self, id: NodeId, at: Option<(SocketAddr, SocketAddr)>) -> anyhow::Result<()> {
        ensure!(
            id == self.replicas.len() as NodeId + 1,
            "replica ids are consecutive: the next one is {}, not {id}",
            self.replicas.len() + 1
        );
        let any_port: SocketAddr = "127.0.0.1:0".parse()?;
        let settings = self.replicas.first().map(|r| r.settings.clone()).unwrap_or_default();
        let dir = self._dir.path().join(format!("node-{id}"));
        let group = self.replicas.first().map_or(GROUP.to_owned(), |r| r.group.clone());
        let replica = Replica::start(&group, id, &dir, at.unwrap_or((any_port, any_port)), settings).await?;
        self.replicas.push(replica);
        Ok(())
    }

    /// Kills replica `id` and deletes its data directory: a lost disk.
    pub async fn kill_and_wipe(&mut self, id: NodeId) -> anyhow::Result<()> {
        let r = self.replica_mut(id);
        r.kill().await;
        let dir = r.dir.clone();
        tokio::fs::remove_dir_all(&dir)
            .await
            .with_context(|| format!("wiping {}", dir.display()))?;
        Ok(())
    }

    /// Stops replica `id` cleanly (it no longer counts as running).
    pub async fn stop_replica(&mut self, id: NodeId) -> anyhow::Result<()> {
        self.replica_mut(id).shutdown().await
    }
}

// ---- Several broker groups (tests/cluster/groups.rs) ----
//
// `Cluster::start*` run group `GROUP` through this; tests of several groups
// name their own, so that several groups register with one NameServer.

impl Cluster {
    /// `n` replicas forming broker group `group`, registering with the
    /// NameServers `settings` names.
    pub async fn start_group(group: &str, n: u64, settings: Settings) -> anyhow::Result<Cluster> {
        init_tracing();
        let dir = match &settings.data_root {
            Some(root) => tempfile::tempdir_in(root)?,
            None => tempfile::tempdir()?,
        };
        let mut replicas = Vec::new();
        for id in 1..=n {
            let any_port: SocketAddr = "127.0.0.1:0".parse()?;
            replicas.push(
                Replica::start(
                    group,
                    id,
                    &dir.path().join(format!("node-{id}")),
                    (any_port, any_port),
                    settings.clone(),
                )
                .await?,
            );
        }
        let members: BTreeMap<NodeId, BrokerNode> = replicas.iter().map(|r| (r.id, r.node().broker_node())).collect();
        replicas[0].node().initialize(members).await?;
        Ok(Cluster { _dir: dir, replicas })
    }
}
