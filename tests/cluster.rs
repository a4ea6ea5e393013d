//! Whole-cluster tests: a three-replica broker group in one process, each replica
//! on its own Tokio runtime and an ephemeral port, talking Raft over real gRPC.
//!
//! A replica is "killed" by dropping its runtime: every task (Raft core, state
//! machine worker, gRPC server) is cancelled wherever it stands, with no
//! `raft.shutdown()`, the closest an in-process test gets to a crash. Waits poll
//! metrics against deadlines; nothing sleeps a fixed time hoping for progress.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use openraft::ServerState;
use openraft::async_runtime::WatchReceiver;
use openraft::metrics::RaftMetrics;
use raftmq_broker::{MessagingConfig, RaftNode, RaftNodeConfig};
use raftmq_raft_store::{
    AppendBatch, BrokerNode, Command, Message, NodeId, Response, StoreReader, TopicConfig, TypeConfig,
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

#[path = "cluster/consumers.rs"]
mod consumers;
#[path = "cluster/faults.rs"]
mod faults;
#[path = "cluster/processes.rs"]
mod processes;

const GROUP: &str = "broker-a";
const TOPIC: &str = "orders";
const QUEUES: u32 = 4;
/// Generous next to the ~1 s failover the default timing gives: the test machine
/// may be running other builds.
const DEADLINE: Duration = Duration::from_secs(10);

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}

/// A Raft RPC signed for `rpc` as `node` with `secret`, as a peer would send it.
fn signed<T>(msg: T, rpc: &str, node: NodeId, secret: &[u8]) -> tonic::Request<T> {
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
fn signed_as<T>(node: NodeId, rpc: &str, msg: T) -> tonic::Request<T> {
    signed(msg, rpc, node, PEER_SECRET)
}

/// One replica and the runtime that runs it.
/// The peer secret every test cluster's replicas share.
const PEER_SECRET: &[u8] = b"test-cluster-peer-secret";

/// Per-node settings a test varies.
#[derive(Clone, Default)]
struct Settings {
    messaging: MessagingConfig,
    nameservers: Vec<String>,
    /// In-process network faults shared by every replica.
    faults: Option<raftmq_broker::faults::Faults>,
}

struct Replica {
    id: NodeId,
    dir: PathBuf,
    settings: Settings,
    addr: SocketAddr,
    raft_addr: SocketAddr,
    rt: Option<tokio::runtime::Runtime>,
    node: Option<RaftNode>,
}

impl Replica {
    /// Starts a replica on `bind` (client and Raft ports; port 0 for a fresh one,
    /// its old addresses when restarting, so the membership's addresses stay right).
    async fn start(
        id: NodeId,
        dir: &Path,
        bind: (SocketAddr, SocketAddr),
        settings: Settings,
    ) -> anyhow::Result<Replica> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name(format!("node-{id}"))
            .enable_all()
            .build()?;
        let data_dir = dir.to_path_buf();
        let node_settings = settings.clone();
        let started = rt
            .spawn(async move {
                let client = TcpListener::bind(bind.0)
                    .await
                    .with_context(|| format!("binding {}", bind.0))?;
                let raft = TcpListener::bind(bind.1)
                    .await
                    .with_context(|| format!("binding {}", bind.1))?;
                let mut config = RaftNodeConfig::new(id, GROUP, data_dir, client.local_addr()?.to_string());
                config.raft_advertise_addr = raft.local_addr()?.to_string();
                config.peer_secret = raftmq_broker::PeerSecret::new(PEER_SECRET.to_vec());
                config.messaging = node_settings.messaging;
                config.nameservers = node_settings.nameservers;
                config.faults = node_settings.faults;
                // Fast rounds so route tests need not wait seconds.
                config.registration_interval = Duration::from_millis(200);
                let listeners = raftmq_broker::Listeners { client, raft };
                anyhow::Ok(RaftNode::start(config, listeners, CancellationToken::new()).await?)
            })
            .await
            .map_err(anyhow::Error::from)
            .and_then(|r| r);
        let node = match started {
            Ok(node) => node,
            Err(e) => {
                rt.shutdown_background();
                return Err(e.context(format!("starting node {id}")));
            }
        };
        Ok(Replica {
            id,
            dir: dir.to_path_buf(),
            settings,
            addr: node.local_addr(),
            raft_addr: node.raft_addr(),
            rt: Some(rt),
            node: Some(node),
        })
    }

    fn node(&self) -> &RaftNode {
        self.node.as_ref().expect("replica is running")
    }

    fn store(&self) -> &StoreReader {
        self.node().store()
    }

    fn metrics(&self) -> RaftMetrics<TypeConfig> {
        self.node().raft().metrics().borrow_watched().clone()
    }

    /// Crash: drop the runtime and with it every task, without `raft.shutdown()`.
    async fn kill(&mut self) {
        drop(self.node.take());
        if let Some(rt) = self.rt.take() {
            tokio::task::spawn_blocking(move || rt.shutdown_timeout(Duration::from_secs(10)))
                .await
                .expect("runtime shutdown");
        }
    }

    async fn restart(&mut self) -> anyhow::Result<()> {
        ensure!(self.node.is_none(), "node {} is still running", self.id);
        *self = Replica::start(self.id, &self.dir, (self.addr, self.raft_addr), self.settings.clone()).await?;
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

struct Cluster {
    // Fields drop in order: replicas first, so a test that fails early does not
    // delete the data directories under still-running nodes.
    replicas: Vec<Replica>,
    _dir: tempfile::TempDir,
}

impl Cluster {
    async fn start(n: u64) -> anyhow::Result<Cluster> {
        Cluster::start_with(n, MessagingConfig::default()).await
    }

    async fn start_with(n: u64, messaging: MessagingConfig) -> anyhow::Result<Cluster> {
        Cluster::start_with_settings(
            n,
            Settings {
                messaging,
                ..Settings::default()
            },
        )
        .await
    }

    async fn start_with_settings(n: u64, settings: Settings) -> anyhow::Result<Cluster> {
        init_tracing();
        let dir = tempfile::tempdir()?;
        let mut replicas = Vec::new();
        for id in 1..=n {
            let any_port: SocketAddr = "127.0.0.1:0".parse()?;
            replicas.push(
                Replica::start(
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

    fn replica(&self, id: NodeId) -> &Replica {
        &self.replicas[(id - 1) as usize]
    }

    fn replica_mut(&mut self, id: NodeId) -> &mut Replica {
        &mut self.replicas[(id - 1) as usize]
    }

    fn running(&self) -> impl Iterator<Item = &Replica> {
        self.replicas.iter().filter(|r| r.node.is_some())
    }

    /// Waits until every running replica names the same leader, that leader is
    /// running, knows it leads, and holds a lease (a quorum acknowledged it):
    /// before that openraft refuses writes with `LeaseExpired`.
    async fn wait_for_leader(&self, within: Duration) -> anyhow::Result<NodeId> {
        self.wait_for_leader_other_than(None, within).await
    }

    async fn wait_for_leader_other_than(&self, old: Option<NodeId>, within: Duration) -> anyhow::Result<NodeId> {
        let deadline = Instant::now() + within;
        loop {
            let views: Vec<Option<NodeId>> = self.running().map(|r| r.metrics().current_leader).collect();
            if let Some(Some(leader)) = views.first()
                && Some(*leader) != old
                && views.iter().all(|v| *v == Some(*leader))
                && let Some(r) = self.running().find(|r| r.id == *leader)
                && let m = r.metrics()
                && m.state == ServerState::Leader
                && m.last_quorum_acked.is_some()
            {
                return Ok(*leader);
            }
            if Instant::now() > deadline {
                bail!("no agreed leader (other than {old:?}) within {within:?}; views: {views:?}");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Waits until every running replica has applied at least `index`.
    async fn wait_applied(&self, index: u64) -> anyhow::Result<()> {
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

    async fn shutdown(mut self) -> anyhow::Result<()> {
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
    })
}

/// Creates the test topic through `node`'s Raft (which must lead).
async fn create_topic_via(cluster: &Cluster, node: NodeId) -> anyhow::Result<()> {
    cluster
        .replica(node)
        .node()
        .raft()
        .client_write(create_topic())
        .await
        .map_err(|e| anyhow::anyhow!("create topic through node {node}: {e:?}"))?;
    Ok(())
}

fn body(i: u64) -> Bytes {
    Bytes::from(format!("message-{i:05}"))
}

fn append(i: u64) -> Command {
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
        }],
    })
}

/// Writes messages `range` through `leader`, 32 in flight so openraft batches
/// them, and returns the last log index they reached.
async fn write_messages(cluster: &Cluster, leader: NodeId, range: std::ops::Range<u64>) -> anyhow::Result<u64> {
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
type QueueData = Vec<Vec<(u64, u64, Bytes)>>;

fn queue_data(store: &StoreReader) -> anyhow::Result<QueueData> {
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
fn assert_converged(cluster: &Cluster, count: u64) -> anyhow::Result<()> {
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_leader_is_replaced_and_catches_up_after_restart() -> anyhow::Result<()> {
    let mut cluster = Cluster::start(3).await?;
    let leader = cluster.wait_for_leader(DEADLINE).await?;
    create_topic_via(&cluster, leader).await?;
    let last = write_messages(&cluster, leader, 0..500).await?;
    cluster.wait_applied(last).await?;
    assert_converged(&cluster, 500)?;

    // Crash the leader; the survivors must elect a new one.
    let killed_at = Instant::now();
    cluster.replica_mut(leader).kill().await;
    let new_leader = cluster.wait_for_leader(DEADLINE).await?;
    let elected = killed_at.elapsed();
    assert_ne!(new_leader, leader);
    // Upserting the same topic again is idempotent: a probe that writes are accepted.
    create_topic_via(&cluster, new_leader).await?;
    eprintln!(
        "failover: node {leader} killed; node {new_leader} elected after {elected:?}, accepting writes after {:?}",
        killed_at.elapsed()
    );

    // Acknowledged writes survived; more go through the new leader.
    assert_converged(&cluster, 500)?;
    let last = write_messages(&cluster, new_leader, 500..700).await?;
    cluster.wait_applied(last).await?;
    assert_converged(&cluster, 700)?;

    // The old leader comes back on its data dir and address and catches up.
    cluster.replica_mut(leader).restart().await?;
    cluster.wait_applied(last).await?;
    assert_converged(&cluster, 700)?;
    assert_eq!(
        cluster.wait_for_leader(DEADLINE).await?,
        new_leader,
        "a rejoining node does not depose the leader"
    );
    cluster.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn followers_that_crash_and_return_never_depose_a_healthy_leader() -> anyhow::Result<()> {
    let mut cluster = Cluster::start(3).await?;
    let leader = cluster.wait_for_leader(DEADLINE).await?;
    create_topic_via(&cluster, leader).await?;
    let term = cluster.replica(leader).metrics().current_term;
    let mut next = 0;
    for round in 0..3u64 {
        let follower = cluster
            .running()
            .map(|r| r.id)
            .find(|&id| id != leader)
            .context("a follower")?;
        cluster.replica_mut(follower).kill().await;
        // Long enough for the leader's replication to that peer to back off, so the
        // returning node's election timer fires before it hears a heartbeat.
        let last = write_messages(&cluster, leader, next..next + 50).await?;
        next += 50;
        tokio::time::sleep(Duration::from_millis(1500)).await;
        cluster.replica_mut(follower).restart().await?;
        cluster.wait_applied(last).await?;
        // A few election timeouts with the returned node up.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let m = cluster.replica(leader).metrics();
        ensure!(
            m.state == ServerState::Leader && m.current_term == term,
            "round {round}: node {follower} returned and the leader changed: node {leader} is {:?} in term {} (was term {term})",
            m.state,
            m.current_term
        );
    }
    cluster.shutdown().await
}

/// Polls the NameServer until the topic's route satisfies `ok`, or fails at the deadline.
async fn wait_for_route(
    client: &mut raftmq_proto::v1::name_server_service_client::NameServerServiceClient<tonic::transport::Channel>,
    what: &str,
    ok: impl Fn(&raftmq_proto::v1::GroupRoute) -> bool,
) -> anyhow::Result<raftmq_proto::v1::GroupRoute> {
    let deadline = Instant::now() + DEADLINE;
    let mut last = None;
    while Instant::now() < deadline {
        let resp = client
            .query_route(raftmq_proto::v1::QueryRouteRequest { topic: TOPIC.into() })
            .await;
        if let Some(g) = resp.ok().and_then(|r| r.into_inner().groups.into_iter().next()) {
            if ok(&g) {
                return Ok(g);
            }
            last = Some(g);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    bail!("route never showed {what}; last seen {last:?}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nameserver_routes_follow_the_leader_through_a_failover() -> anyhow::Result<()> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let namesrv_addr = listener.local_addr()?.to_string();
    let stop_namesrv = CancellationToken::new();
    let namesrv = tokio::spawn(raftmq_namesrv::serve(
        raftmq_namesrv::NameServerConfig {
            broker_timeout: Duration::from_secs(1),
            heartbeat_interval: Duration::from_millis(200),
        },
        listener,
        stop_namesrv.clone(),
    ));
    let mut cluster = Cluster::start_with_settings(
        3,
        Settings {
            nameservers: vec![namesrv_addr.clone()],
            ..Settings::default()
        },
    )
    .await?;
    let leader = cluster.wait_for_leader(DEADLINE).await?;
    create_topic_via(&cluster, leader).await?;
    let leader_addr = cluster.replica(leader).node().broker_node().addr;
    let mut client = raftmq_proto::v1::name_server_service_client::NameServerServiceClient::connect(format!(
        "http://{namesrv_addr}"
    ))
    .await?;
    let route = wait_for_route(&mut client, "the first leader and two followers", |g| {
        g.leader_endpoint == leader_addr && g.follower_endpoints.len() == 2
    })
    .await?;
    assert_eq!(route.broker_group, GROUP);
    assert_eq!(route.queues, QUEUES);

    cluster.replica_mut(leader).kill().await;
    let killed_at = Instant::now();
    let new_leader = cluster.wait_for_leader_other_than(Some(leader), DEADLINE).await?;
    let new_addr = cluster.replica(new_leader).node().broker_node().addr;
    wait_for_route(&mut client, "the new leader", |g| g.leader_endpoint == new_addr).await?;
    eprintln!(
        "route moved from node {leader} to node {new_leader} {:?} after the kill",
        killed_at.elapsed()
    );
    cluster.shutdown().await?;
    stop_namesrv.cancel();
    namesrv.await??;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_follower_catches_up_and_never_applies_past_commit() -> anyhow::Result<()> {
    let mut cluster = Cluster::start(3).await?;
    let leader = cluster.wait_for_leader(DEADLINE).await?;
    create_topic_via(&cluster, leader).await?;
    let first = write_messages(&cluster, leader, 0..50).await?;
    cluster.wait_applied(first).await?;

    let follower = if leader == 1 { 2 } else { 1 };
    cluster.replica_mut(follower).kill().await;
    // A majority (leader + one follower) keeps committing while it is down.
    let last = write_messages(&cluster, leader, 50..350).await?;
    cluster.replica_mut(follower).restart().await?;

    let f = cluster.replica(follower);
    let l = cluster.replica(leader);
    let leader_data = queue_data(l.store())?;
    let mut follower_metrics = f.node().raft().metrics();
    let deadline = Instant::now() + DEADLINE;
    let mut observations = 0u32;
    loop {
        // Applied is read before the leader's commit index; the commit index only
        // grows, so applied <= committed must hold whatever happens in between.
        let applied = f.store().applied()?.map_or(0, |l| l.index);
        let committed = l.metrics().cluster_committed.map_or(0, |l| l.index);
        ensure!(
            applied <= committed,
            "follower applied {applied} past the commit index {committed}"
        );
        // Whatever the follower serves is a prefix of what the leader committed.
        for (q, rows) in queue_data(f.store())?.iter().enumerate() {
            ensure!(
                leader_data[q].starts_with(rows),
                "follower queue {q} serves data the leader does not have"
            );
        }
        observations += 1;
        if applied >= last {
            break;
        }
        ensure!(Instant::now() < deadline, "follower stuck at {applied}, want {last}");
        // Wake on the follower's next metrics change, or re-check shortly anyway.
        let _ = tokio::time::timeout(Duration::from_millis(20), follower_metrics.changed()).await;
    }
    eprintln!("follower {follower} caught up to {last}; {observations} observations, none ahead of commit");
    assert_converged(&cluster, 350)?;
    cluster.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follower_behind_the_purge_point_is_restored_by_a_streamed_snapshot() -> anyhow::Result<()> {
    let mut cluster = Cluster::start(3).await?;
    let leader = cluster.wait_for_leader(DEADLINE).await?;
    create_topic_via(&cluster, leader).await?;
    let first = write_messages(&cluster, leader, 0..50).await?;
    cluster.wait_applied(first).await?;

    let follower = if leader == 1 { 2 } else { 1 };
    cluster.replica_mut(follower).kill().await;
    let last = write_messages(&cluster, leader, 50..200).await?;
    cluster.wait_applied(last).await?;

    // Snapshot on the leader and purge (logically) up to it, so the returning
    // follower cannot be fed from the log and must receive the snapshot.
    let raft = cluster.replica(leader).node().raft().clone();
    raft.trigger().snapshot().await?;
    raft.wait(Some(DEADLINE))
        .metrics(|m| m.snapshot.is_some_and(|s| s.index >= last), "leader snapshot built")
        .await?;
    raft.trigger().purge_log(last).await?;
    raft.wait(Some(DEADLINE))
        .metrics(|m| m.purged.is_some_and(|p| p.index >= last), "leader log purged")
        .await?;

    cluster.replica_mut(follower).restart().await?;
    cluster.wait_applied(last).await?;
    let snap = cluster.replica(follower).metrics().snapshot;
    ensure!(
        snap.is_some_and(|s| s.index >= last),
        "follower caught up without installing the snapshot (snapshot {snap:?})"
    );
    assert_converged(&cluster, 200)?;

    // Replication continues from the log after the snapshot.
    let last = write_messages(&cluster, leader, 200..250).await?;
    cluster.wait_applied(last).await?;
    assert_converged(&cluster, 250)?;
    cluster.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raft_service_refuses_wrong_group_and_bad_input_and_keeps_serving() -> anyhow::Result<()> {
    use raftmq_proto::raft::v1 as pb;
    use raftmq_proto::raft::v1::raft_service_client::RaftServiceClient;

    let cluster = Cluster::start(1).await?;
    let leader = cluster.wait_for_leader(DEADLINE).await?;
    let mut client = RaftServiceClient::connect(format!("http://{}", cluster.replica(leader).raft_addr)).await?;
    // Signed as the node itself: these requests get past authentication, so what
    // is checked is the handling of their content.

    let err = client
        .vote(signed_as(
            leader,
            "vote",
            pb::VoteRequest {
                broker_group: "broker-z".into(),
                body: b"{}".to_vec(),
                leader_unreachable: false,
            },
        ))
        .await
        .expect_err("wrong group");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(
        err.message().contains("broker-a") && err.message().contains("broker-z"),
        "{err}"
    );

    let err = client
        .append_entries(signed_as(
            leader,
            "append_entries",
            pb::AppendEntriesRequest {
                broker_group: GROUP.into(),
                header: b"{not json".to_vec(),
                entries: vec![],
            },
        ))
        .await
        .expect_err("garbage header");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("append header"), "{err}");

    let err = client
        .pre_vote(signed_as(
            leader,
            "pre_vote",
            pb::VoteRequest {
                broker_group: GROUP.into(),
                body: vec![0xff; 3],
                leader_unreachable: false,
            },
        ))
        .await
        .expect_err("garbage vote");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);

    // On the replication stream too, a wrong group ends the stream with its status.
    let mut replies = client
        .stream_append(signed_as(
            leader,
            "stream_append",
            futures::stream::iter(vec![pb::AppendEntriesRequest {
                broker_group: "broker-z".into(),
                header: vec![],
                entries: vec![],
            }]),
        ))
        .await?
        .into_inner();
    let err = replies.message().await.expect_err("wrong group on a stream");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("broker-z"), "{err}");

    // A snapshot stream that stops before its `done` chunk is discarded.
    let raft = cluster.replica(leader).node().raft();
    let header = raftmq_broker::wire::SnapshotHeader {
        vote: raft.metrics().borrow_watched().vote,
        meta: raftmq_raft_store::SnapshotMeta {
            last_log_id: None,
            last_membership: Default::default(),
        },
    };
    let chunks = vec![
        pb::SnapshotChunk {
            broker_group: GROUP.into(),
            header: raftmq_broker::wire::to_json("header", &header)?,
            data: b"RMQSNAP1".to_vec(),
            done: false,
        },
        pb::SnapshotChunk {
            data: vec![0; 100],
            ..Default::default()
        },
    ];
    let err = client
        .install_snapshot(signed_as(leader, "install_snapshot", futures::stream::iter(chunks)))
        .await
        .expect_err("truncated snapshot");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("before its last chunk"), "{err}");

    // None of that disturbed the node.
    ensure!(cluster.replica(leader).metrics().state == ServerState::Leader);
    create_topic_via(&cluster, leader).await?;
    cluster.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn planned_leader_transfer_moves_leadership_without_waiting_for_the_lease() -> anyhow::Result<()> {
    let cluster = Cluster::start(3).await?;
    let leader = cluster.wait_for_leader(DEADLINE).await?;
    let to = if leader == 3 { 2 } else { 3 };
    let started = Instant::now();
    cluster
        .replica(leader)
        .node()
        .raft()
        .trigger()
        .transfer_leader(to)
        .await?;
    let new_leader = cluster.wait_for_leader_other_than(Some(leader), DEADLINE).await?;
    let took = started.elapsed();
    eprintln!("leadership moved from node {leader} to node {new_leader} in {took:?}");
    assert_eq!(new_leader, to);
    // Without the TransferLeader RPC the target would campaign only after the
    // lease (400 ms) plus its own election timeout.
    assert!(took < Duration::from_millis(400), "transfer took {took:?}");
    create_topic_via(&cluster, new_leader).await?;
    let last = write_messages(&cluster, new_leader, 0..10).await?;
    cluster.wait_applied(last).await?;
    assert_converged(&cluster, 10)?;
    cluster.shutdown().await
}

// ---------------------------------------------------------------------------
// The client API (raftmq.v1 MessagingService / AdminService) over real gRPC.
// ---------------------------------------------------------------------------

mod api {
    use std::collections::{HashMap, HashSet};
    use std::time::{Duration, Instant};

    use anyhow::{Context, ensure};
    use futures::{StreamExt, TryStreamExt};
    use openraft::ServerState;
    use openraft::async_runtime::WatchReceiver;
    use raftmq_broker::{LEADER_METADATA_KEY, MessagingConfig};
    use raftmq_proto::v1 as pb;
    use raftmq_proto::v1::admin_service_client::AdminServiceClient;
    use raftmq_proto::v1::messaging_service_client::MessagingServiceClient;
    use tonic::Code;
    use tonic::transport::Channel;

    use super::{Cluster, DEADLINE, QUEUES, Replica, TOPIC};

    async fn messaging(r: &Replica) -> anyhow::Result<MessagingServiceClient<Channel>> {
        Ok(MessagingServiceClient::connect(format!("http://{}", r.addr))
            .await?
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20))
    }

    async fn admin(r: &Replica) -> anyhow::Result<AdminServiceClient<Channel>> {
        Ok(AdminServiceClient::connect(format!("http://{}", r.addr)).await?)
    }

    async fn create_topic(r: &Replica, name: &str, queues: u32) -> anyhow::Result<()> {
        admin(r)
            .await?
            .create_topic(pb::CreateTopicRequest {
                topic: Some(pb::TopicConfig {
                    name: name.into(),
                    queues_per_group: queues,
                    perm: pb::Permission::ReadWrite as i32,
                }),
            })
            .await
            .context("create topic")?;
        Ok(())
    }

    /// Message `i`: tag, keys, properties and a body whose size varies with `i`.
    fn message(i: u64) -> pb::Message {
        pb::Message {
            topic: if i.is_multiple_of(2) {
                TOPIC.into()
            } else {
                String::new()
            },
            tag: format!("Tag{}", i % 3),
            keys: vec![format!("key-{i}"), format!("order-{}", i / 10)],
            properties: HashMap::from([("seq".into(), i.to_string()), ("origin".into(), "test".into())]),
            body: format!("body-{i:05}-{}", "x".repeat((i % 97) as usize)).into_bytes(),
            born_timestamp_ms: 1_700_000_000_000 + i,
        }
    }

    fn seq_of(m: &pb::Message) -> anyhow::Result<u64> {
        m.properties
            .get("seq")
            .context("seq property missing")?
            .parse()
            .context("seq property not a number")
    }

    fn send_request(topic: &str, queue_id: Option<u32>, messages: Vec<pb::Message>) -> pb::SendRequest {
        pb::SendRequest {
            topic: topic.into(),
            queue_id,
            messages,
        }
    }

    fn pull_request(topic: &str, queue_id: u32, offset: u64, max: u32, wait_ms: u32, tags: &str) -> pb::PullRequest {
        pb::PullRequest {
            topic: topic.into(),
            queue_id,
            offset,
            max_messages: max,
            max_wait_ms: wait_ms,
            tag_expression: tags.into(),
        }
    }

    /// Pulls a queue from `offset` to its end, as a consumer would.
    async fn pull_all(
        client: &mut MessagingServiceClient<Channel>,
        topic: &str,
        queue_id: u32,
        tags: &str,
    ) -> anyhow::Result<Vec<pb::PulledMessage>> {
        let mut out = Vec::new();
        let mut offset = 0;
        loop {
            let resp = client
                .pull(pull_request(topic, queue_id, offset, 1024, 0, tags))
                .await?
                .into_inner();
            ensure!(resp.next_offset >= offset, "next_offset went backwards");
            out.extend(resp.messages);
            if resp.next_offset == resp.max_offset {
                return Ok(out);
            }
            ensure!(resp.next_offset > offset, "pull made no progress at {offset}");
            offset = resp.next_offset;
        }
    }

    /// The Raft index a message id names (see `raftmq_broker::convert`).
    pub(super) fn raft_index_of(message_id: &str) -> anyhow::Result<u64> {
        let hex = message_id.get(10..26).context("message id too short")?;
        Ok(u64::from_str_radix(hex, 16)?)
    }

    fn leader_of(status: &tonic::Status) -> Option<&str> {
        status.metadata().get(LEADER_METADATA_KEY).and_then(|v| v.to_str().ok())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn ten_thousand_sent_messages_pull_back_exactly_once_in_queue_order() -> anyhow::Result<()> {
        const COUNT: u64 = 10_000;
        const BATCH: u64 = 50;
        let cluster = Cluster::start(3).await?;
        let leader = cluster.wait_for_leader(DEADLINE).await?;
        let leader = cluster.replica(leader);
        create_topic(leader, TOPIC, QUEUES).await?;
        let client = messaging(leader).await?;
        let started = Instant::now();

        // Every third batch names its queue (as a producer ordering by sharding
        // key would); the rest let the broker choose.
        let acks: Vec<(u64, Option<u32>, pb::SendResponse)> = futures::stream::iter(0..COUNT / BATCH)
            .map(|b| {
                let mut client = client.clone();
                async move {
                    let chosen = (b % 3 == 0).then(|| (b % u64::from(QUEUES)) as u32);
                    let msgs = (b * BATCH..(b + 1) * BATCH).map(message).collect();
                    let resp = client
                        .send(send_request(TOPIC, chosen, msgs))
                        .await
                        .with_context(|| format!("batch {b}"))?;
                    anyhow::Ok((b, chosen, resp.into_inner()))
                }
            })
            .buffer_unordered(8)
            .try_collect()
            .await?;
        eprintln!("sent {COUNT} messages in {:?}", started.elapsed());

        // What the broker acknowledged: (queue, offset) -> (message, id).
        let mut acked: HashMap<(u32, u64), (u64, String)> = HashMap::new();
        let mut ids = HashSet::new();
        for (b, chosen, resp) in &acks {
            ensure!(
                resp.results.len() == BATCH as usize,
                "batch {b}: {} results",
                resp.results.len()
            );
            let queue = resp.results[0].queue_id;
            if let Some(q) = chosen {
                ensure!(queue == *q, "batch {b} asked for queue {q}, got {queue}");
            }
            for (pos, r) in resp.results.iter().enumerate() {
                // A batch is one entry: one queue, contiguous offsets, request order.
                ensure!(r.queue_id == queue && r.queue_offset == resp.results[0].queue_offset + pos as u64);
                ensure!(
                    r.message_id.len() == 34 && ids.insert(r.message_id.clone()),
                    "bad or duplicate id {}",
                    r.message_id
                );
                let i = b * BATCH + pos as u64;
                ensure!(
                    acked
                        .insert((queue, r.queue_offset), (i, r.message_id.clone()))
                        .is_none()
                );
            }
        }
        let queues_used: HashSet<u32> = acked.keys().map(|(q, _)| *q).collect();
        ensure!(
            queues_used.len() == QUEUES as usize,
            "round-robin used only {queues_used:?}"
        );

        let mut client = messaging(leader).await?;
        let mut seen = 0;
        for q in 0..QUEUES {
            let pulled = pull_all(&mut client, TOPIC, q, "*").await?;
            for (n, p) in pulled.iter().enumerate() {
                ensure!(
                    p.queue_id == q && p.queue_offset == n as u64,
                    "queue {q} out of order at {n}"
                );
                let (i, id) = acked
                    .get(&(q, p.queue_offset))
                    .context("pulled an unacknowledged offset")?;
                ensure!(&p.message_id == id, "message id differs between send and pull");
                let got = p.message.as_ref().context("no message")?;
                let want = message(*i);
                ensure!(seq_of(got)? == *i);
                ensure!(
                    got.topic == TOPIC && got.body == want.body && got.tag == want.tag,
                    "message {i} altered"
                );
                ensure!(
                    got.keys == want.keys && got.properties == want.properties,
                    "message {i} metadata altered"
                );
                ensure!(got.born_timestamp_ms == want.born_timestamp_ms && p.store_timestamp_ms > 0);
            }
            seen += pulled.len();
        }
        ensure!(seen as u64 == COUNT, "pulled {seen} of {COUNT}");
        eprintln!("sent and pulled {COUNT} messages in {:?}", started.elapsed());
        cluster.shutdown().await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn follower_redirects_writes_to_the_leader_and_serves_applied_reads() -> anyhow::Result<()> {
        let cluster = Cluster::start(3).await?;
        let leader_id = cluster.wait_for_leader(DEADLINE).await?;
        let leader = cluster.replica(leader_id);
        let follower = cluster.running().find(|r| r.id != leader_id).context("a follower")?;
        create_topic(leader, TOPIC, QUEUES).await?;
        let sent = messaging(leader)
            .await?
            .send(send_request(TOPIC, Some(1), (0..20).map(message).collect()))
            .await?
            .into_inner();

        let mut to_follower = messaging(follower).await?;
        let err = to_follower
            .send(send_request(TOPIC, None, vec![message(99)]))
            .await
            .expect_err("a follower refuses writes");
        assert_eq!(err.code(), Code::FailedPrecondition);
        assert_eq!(err.message(), "not leader");
        assert_eq!(leader_of(&err), Some(leader.addr.to_string().as_str()));
        let err = admin(follower)
            .await?
            .delete_topic(pb::DeleteTopicRequest { name: TOPIC.into() })
            .await
            .expect_err("admin writes too");
        assert_eq!(
            (err.code(), leader_of(&err)),
            (Code::FailedPrecondition, Some(leader.addr.to_string().as_str()))
        );

        // Once applied there, the follower serves the data, with the same ids. The
        // id names the Raft entry (the leader's metrics may not show it applied
        // yet when the answer arrives: the reply is sent from inside apply).
        let applied = raft_index_of(&sent.results[0].message_id)?;
        cluster.wait_applied(applied).await?;
        let pulled = to_follower
            .pull(pull_request(TOPIC, 1, 0, 100, 0, ""))
            .await?
            .into_inner();
        assert_eq!((pulled.min_offset, pulled.max_offset, pulled.next_offset), (0, 20, 20));
        let ids: Vec<_> = pulled.messages.iter().map(|m| m.message_id.clone()).collect();
        let sent_ids: Vec<_> = sent.results.iter().map(|r| r.message_id.clone()).collect();
        assert_eq!(ids, sent_ids);

        let status = admin(follower)
            .await?
            .cluster_status(pb::ClusterStatusRequest {})
            .await?
            .into_inner();
        let g = &status.groups[0];
        assert_eq!(
            (g.leader_id, g.leader_endpoint.as_str()),
            (Some(leader_id), leader.addr.to_string().as_str())
        );
        assert_eq!(g.replicas.len(), 3);
        let me = g
            .replicas
            .iter()
            .find(|r| r.node_id == follower.id)
            .context("self in status")?;
        assert_eq!(me.role, pb::ReplicaRole::Follower as i32);
        assert!(me.applied_index >= Some(applied));
        // The leader's replication progress is reported asynchronously; wait for
        // it to show what every replica has applied.
        leader
            .node()
            .raft()
            .wait(Some(DEADLINE))
            .metrics(
                |m| {
                    m.replication
                        .as_ref()
                        .is_some_and(|r| r.values().all(|l| l.is_some_and(|l| l.index >= applied)))
                },
                "replication progress reaches the send",
            )
            .await?;
        let status = admin(leader)
            .await?
            .cluster_status(pb::ClusterStatusRequest {})
            .await?
            .into_inner();
        let g = &status.groups[0];
        assert!(g.term >= 1 && g.reported_by == leader_id);
        for r in &g.replicas {
            let want = if r.node_id == leader_id {
                pb::ReplicaRole::Leader
            } else {
                pb::ReplicaRole::Follower
            };
            assert_eq!(r.role, want as i32, "role of {}", r.node_id);
            // The leader knows how far each replica's log matches its own.
            assert!(
                r.matched_index >= Some(applied),
                "replica {} matched {:?}",
                r.node_id,
                r.matched_index
            );
        }
        cluster.shutdown().await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn each_bad_input_gets_its_own_status_and_nothing_partial_is_written() -> anyhow::Result<()> {
        let cluster = Cluster::start(3).await?;
        let leader = cluster.replica(cluster.wait_for_leader(DEADLINE).await?);
        create_topic(leader, TOPIC, QUEUES).await?;
        let mut client = messaging(leader).await?;
        let limits = MessagingConfig::default();

        let big_props = {
            let mut m = message(1);
            m.properties
                .insert("blob".into(), "p".repeat(limits.max_properties_bytes));
            m
        };
        let empty_body = pb::Message {
            body: vec![],
            ..message(2)
        };
        let huge_body = pb::Message {
            body: vec![7; limits.max_body_bytes + 1],
            ..message(3)
        };
        let other_topic = pb::Message {
            topic: "elsewhere".into(),
            ..message(4)
        };
        let bad_tag = pb::Message {
            tag: "A || B".into(),
            ..message(5)
        };
        let good = || (0..5).map(message).collect::<Vec<_>>();
        // For requests to other topics: messages that leave their topic to the request.
        let anonymous = || {
            (0..5)
                .map(|i| pb::Message {
                    topic: String::new(),
                    ..message(i)
                })
                .collect::<Vec<_>>()
        };
        let with_last = |bad: pb::Message| {
            let mut v = good();
            v.push(bad);
            v
        };
        let cases: Vec<(&str, pb::SendRequest, Code, &str)> = vec![
            (
                "unknown topic",
                send_request("nope", None, anonymous()),
                Code::NotFound,
                "\"nope\" does not exist",
            ),
            (
                "bad topic char",
                send_request("a/b", None, anonymous()),
                Code::InvalidArgument,
                "'/'",
            ),
            (
                "long topic",
                send_request(&"t".repeat(128), None, anonymous()),
                Code::InvalidArgument,
                "128 characters",
            ),
            (
                "no messages",
                send_request(TOPIC, None, vec![]),
                Code::InvalidArgument,
                "no messages",
            ),
            (
                "empty body",
                send_request(TOPIC, None, with_last(empty_body)),
                Code::InvalidArgument,
                "message 5: body is empty",
            ),
            (
                "huge body",
                send_request(TOPIC, None, with_last(huge_body)),
                Code::ResourceExhausted,
                "message 5: body of 4194305 bytes",
            ),
            (
                "properties",
                send_request(TOPIC, None, with_last(big_props)),
                Code::ResourceExhausted,
                "message 5: properties",
            ),
            (
                "topic mismatch",
                send_request(TOPIC, None, with_last(other_topic)),
                Code::InvalidArgument,
                "\"elsewhere\" differs",
            ),
            (
                "bad tag",
                send_request(TOPIC, None, with_last(bad_tag)),
                Code::InvalidArgument,
                "message 5: tag",
            ),
            (
                "queue range",
                send_request(TOPIC, Some(QUEUES), good()),
                Code::InvalidArgument,
                "queue_id 4 is out of range",
            ),
            (
                "batch count",
                send_request(
                    TOPIC,
                    None,
                    (0..limits.max_batch_messages as u64 + 1).map(message).collect(),
                ),
                Code::ResourceExhausted,
                "1025 messages",
            ),
        ];
        for (what, req, code, text) in cases {
            let err = client.send(req).await.expect_err(what);
            assert_eq!(err.code(), code, "{what}: {err}");
            assert!(
                err.message().contains(text),
                "{what}: {:?} lacks {text:?}",
                err.message()
            );
        }

        let pulls: Vec<(&str, pb::PullRequest, Code, &str)> = vec![
            (
                "pull unknown topic",
                pull_request("nope", 0, 0, 1, 0, ""),
                Code::NotFound,
                "does not exist",
            ),
            (
                "pull queue range",
                pull_request(TOPIC, 9, 0, 1, 0, ""),
                Code::InvalidArgument,
                "queue_id 9",
            ),
            (
                "pull bad tags",
                pull_request(TOPIC, 0, 0, 1, 0, "A ||"),
                Code::InvalidArgument,
                "tag expression",
            ),
            (
                "pull bad topic",
                pull_request("a b", 0, 0, 1, 0, ""),
                Code::InvalidArgument,
                "' '",
            ),
        ];
        for (what, req, code, text) in pulls {
            let err = client.pull(req).await.expect_err(what);
            assert_eq!(err.code(), code, "{what}: {err}");
            assert!(
                err.message().contains(text),
                "{what}: {:?} lacks {text:?}",
                err.message()
            );
        }

        let mut admin = admin(leader).await?;
        let topic = |name: &str, queues: u32, perm: i32| pb::CreateTopicRequest {
            topic: Some(pb::TopicConfig {
                name: name.into(),
                queues_per_group: queues,
                perm,
            }),
        };
        for (what, req, text) in [
            ("zero queues", topic("t1", 0, 6), "queues_per_group 0"),
            ("too many queues", topic("t1", 1025, 6), "queues_per_group 1025"),
            ("bad perm", topic("t1", 4, 99), "permission 99"),
            ("bad name", topic("t.1", 4, 6), "'.'"),
        ] {
            let err = admin.create_topic(req).await.expect_err(what);
            assert_eq!(err.code(), Code::InvalidArgument, "{what}: {err}");
            assert!(
                err.message().contains(text),
                "{what}: {:?} lacks {text:?}",
                err.message()
            );
        }

        // Nothing was written: no queue holds a message, no stray topic exists.
        let described = admin
            .describe_topic(pb::DescribeTopicRequest { name: TOPIC.into() })
            .await?
            .into_inner();
        assert!(described.queues.iter().all(|q| q.max_offset == 0), "{described:?}");
        let names: Vec<_> = admin
            .list_topics(pb::ListTopicsRequest {})
            .await?
            .into_inner()
            .topics
            .into_iter()
            .map(|t| t.name)
            .collect();
        assert_eq!(names, vec![TOPIC.to_owned()]);

        // And the group still serves.
        let ok = client.send(send_request(TOPIC, Some(2), good())).await?.into_inner();
        assert_eq!(
            ok.results.iter().map(|r| r.queue_offset).collect::<Vec<_>>(),
            vec![0, 1, 2, 3, 4]
        );
        let described = admin
            .describe_topic(pb::DescribeTopicRequest { name: TOPIC.into() })
            .await?
            .into_inner();
        let maxes: Vec<_> = described.queues.iter().map(|q| q.max_offset).collect();
        assert_eq!(maxes, vec![0, 0, 5, 0]);
        cluster.shutdown().await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn tag_filter_returns_exactly_the_matching_messages_and_auto_creates_topics() -> anyhow::Result<()> {
        let cluster = Cluster::start_with(
            1,
            MessagingConfig {
                auto_create_topics: true,
                default_queues: 2,
                ..Default::default()
            },
        )
        .await?;
        let node = cluster.replica(cluster.wait_for_leader(DEADLINE).await?);
        let mut client = messaging(node).await?;
        let tags = ["TagA", "TagB", "TagC", ""];
        let msgs: Vec<pb::Message> = (0..300u64)
            .map(|i| pb::Message {
                topic: String::new(),
                tag: tags[(i % 4) as usize].into(),
                ..message(i)
            })
            .collect();
        for chunk in msgs.chunks(100) {
            client.send(send_request("auto-topic", Some(1), chunk.to_vec())).await?;
        }
        let described = admin(node)
            .await?
            .describe_topic(pb::DescribeTopicRequest {
                name: "auto-topic".into(),
            })
            .await?
            .into_inner();
        assert_eq!(
            described.topic.map(|t| t.queues_per_group),
            Some(2),
            "auto-created with default_queues"
        );

        let seqs = |ms: &[pb::PulledMessage]| -> anyhow::Result<Vec<u64>> {
            ms.iter()
                .map(|m| seq_of(m.message.as_ref().context("no message")?))
                .collect()
        };
        let a_or_c = pull_all(&mut client, "auto-topic", 1, "TagA || TagC").await?;
        let want: Vec<u64> = (0..300).filter(|i| i % 4 == 0 || i % 4 == 2).collect();
        assert_eq!(seqs(&a_or_c)?, want);
        assert_eq!(
            seqs(&pull_all(&mut client, "auto-topic", 1, "*").await?)?,
            (0..300).collect::<Vec<_>>()
        );

        // A short page stops right after its last match; skipped messages advance it.
        let page = client
            .pull(pull_request("auto-topic", 1, 0, 5, 0, " TagB "))
            .await?
            .into_inner();
        assert_eq!(seqs(&page.messages)?, vec![1, 5, 9, 13, 17]);
        assert_eq!(page.next_offset, 18);
        let none = client
            .pull(pull_request("auto-topic", 1, 0, 10, 0, "TagZ"))
            .await?
            .into_inner();
        assert!(none.messages.is_empty());
        assert_eq!(none.next_offset, 300, "filtered-out messages still advance next_offset");
        // Past the end: empty, and next_offset is the queue's max (documented).
        let past = client
            .pull(pull_request("auto-topic", 1, 1_000, 10, 0, ""))
            .await?
            .into_inner();
        assert!(past.messages.is_empty());
        assert_eq!((past.next_offset, past.max_offset), (300, 300));
        cluster.shutdown().await
    }

    /// (follower id, ms since it last acknowledged the leader) from the leader's
    /// ClusterStatus: what `raftmq admin cluster` prints.
    async fn follower_ack_ages(cluster: &Cluster, leader: u64) -> anyhow::Result<Vec<(u64, Option<u64>)>> {
        let status = admin(cluster.replica(leader))
            .await?
            .cluster_status(pb::ClusterStatusRequest::default())
            .await?
            .into_inner();
        let group = status.groups.first().context("no group in the status")?;
        Ok(group
            .replicas
            .iter()
            .filter(|r| r.node_id != leader)
            .map(|r| (r.node_id, r.last_ack_ms))
            .collect())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_leader_that_lost_its_quorum_refuses_writes_at_once_instead_of_holding_them() -> anyhow::Result<()> {
        let mut cluster = Cluster::start(3).await?;
        let leader = cluster.wait_for_leader(DEADLINE).await?;
        create_topic(cluster.replica(leader), TOPIC, QUEUES).await?;
        let mut client = messaging(cluster.replica(leader)).await?;
        client.send(send_request(TOPIC, Some(0), vec![message(0)])).await?;
        for (id, ack) in follower_ack_ages(&cluster, leader).await? {
            ensure!(
                ack.is_some_and(|ms| ms < 1000),
                "follower {id} of a healthy group looks silent: {ack:?}"
            );
        }

        // Both followers crash: the leader is alone, and openraft keeps it Leader.
        let followers: Vec<_> = cluster.running().map(|r| r.id).filter(|&id| id != leader).collect();
        let lost_at = Instant::now();
        for id in followers {
            cluster.replica_mut(id).kill().await;
        }
        // Once a quorum has been silent for an election timeout (400 ms here), a send
        // is refused with UNAVAILABLE at once, rather than waiting out the client's
        // deadline. Until then a send may wait; bound each by a timeout.
        let refused = loop {
            let started = Instant::now();
            let sent = tokio::time::timeout(
                Duration::from_secs(3),
                client.send(send_request(TOPIC, Some(0), vec![message(1)])),
            )
            .await;
            match sent {
                Ok(Err(status)) if status.code() == Code::Unavailable => break (status, started.elapsed()),
                Ok(Ok(_)) => anyhow::bail!("a leader without a quorum acknowledged a write"),
                Ok(Err(other)) => anyhow::bail!("unexpected refusal: {other}"),
                Err(_) => {}
            }
            ensure!(
                lost_at.elapsed() < DEADLINE,
                "the isolated leader never refused a write"
            );
        };
        eprintln!(
            "isolated leader refused after {:?} (that send answered in {:?}): {}",
            lost_at.elapsed(),
            refused.1,
            refused.0.message()
        );
        ensure!(
            refused.1 < Duration::from_millis(500),
            "the refusal itself took {:?}",
            refused.1
        );
        ensure!(refused.0.message().contains("no quorum"), "{}", refused.0.message());
        assert_eq!(cluster.replica(leader).metrics().state, ServerState::Leader);
        // Its cluster status says the followers are silent (what `admin cluster`
        // prints as UNREACHABLE).
        for (id, ack) in follower_ack_ages(&cluster, leader).await? {
            ensure!(
                ack.is_some_and(|ms| ms >= 400),
                "follower {id} should look silent: {ack:?}"
            );
        }
        cluster.shutdown().await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn send_to_a_just_elected_leader_succeeds_and_the_old_one_redirects_to_it() -> anyhow::Result<()> {
        let cluster = Cluster::start(3).await?;
        let old = cluster.wait_for_leader(DEADLINE).await?;
        create_topic(cluster.replica(old), TOPIC, QUEUES).await?;
        let new = if old == 3 { 2 } else { 3 };
        cluster
            .replica(old)
            .node()
            .raft()
            .trigger()
            .transfer_leader(new)
            .await?;
        // Send the moment the new node calls itself leader, before a quorum has
        // necessarily confirmed it: the broker retries internally rather than
        // bouncing the producer with "not leader" pointing at itself.
        let target = cluster.replica(new);
        let mut metrics = target.node().raft().metrics();
        while metrics.borrow_watched().state != ServerState::Leader {
            tokio::time::timeout(DEADLINE, metrics.changed()).await??;
        }
        let started = Instant::now();
        let sent = messaging(target)
            .await?
            .send(send_request(TOPIC, Some(0), vec![message(0)]))
            .await?
            .into_inner();
        eprintln!("send to the new leader answered in {:?}", started.elapsed());
        assert_eq!(sent.results[0].queue_offset, 0);

        // The old leader, once it knows the new one, redirects there.
        let mut old_metrics = cluster.replica(old).node().raft().metrics();
        while old_metrics.borrow_watched().current_leader != Some(new) {
            tokio::time::timeout(DEADLINE, old_metrics.changed()).await??;
        }
        let err = messaging(cluster.replica(old))
            .await?
            .send(send_request(TOPIC, None, vec![message(1)]))
            .await
            .expect_err("old leader refuses");
        assert_eq!(err.code(), Code::FailedPrecondition);
        assert_eq!(leader_of(&err), Some(target.addr.to_string().as_str()));
        cluster.shutdown().await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn long_poll_wakes_when_a_message_arrives_and_times_out_empty() -> anyhow::Result<()> {
        let cluster = Cluster::start(3).await?;
        let leader_id = cluster.wait_for_leader(DEADLINE).await?;
        let leader = cluster.replica(leader_id);
        let follower = cluster.running().find(|r| r.id != leader_id).context("a follower")?;
        create_topic(leader, TOPIC, QUEUES).await?;
        // The follower must know the topic before it can long-poll it; the topic
        // is the leader's last log entry by now.
        let created = leader.metrics().last_log_index.context("empty log")?;
        cluster.wait_applied(created).await?;

        // Nothing arrives: empty after max_wait, not before, not much after.
        let mut on_follower = messaging(follower).await?;
        let started = Instant::now();
        let empty = on_follower
            .pull(pull_request(TOPIC, 0, 0, 10, 300, ""))
            .await?
            .into_inner();
        let waited = started.elapsed();
        assert!(empty.messages.is_empty() && empty.next_offset == 0);
        assert!(
            waited >= Duration::from_millis(300) && waited < Duration::from_secs(3),
            "waited {waited:?}"
        );

        // A message sent during the wait ends it at once, on a follower too. The
        // follower's apply notification is what wakes it.
        let mut leader_metrics = leader.node().raft().metrics();
        let poll = tokio::spawn(async move {
            let started = Instant::now();
            let resp = on_follower.pull(pull_request(TOPIC, 0, 0, 10, 20_000, "")).await;
            (resp, started.elapsed())
        });
        // Send only once the poll is surely parked on the server: wait until the
        // follower has acknowledged a heartbeat sent after the poll was spawned (a
        // round trip over the same loopback, on the follower's server), and check
        // the poll has not answered.
        let spawned = <openraft::alias::InstantOf<super::TypeConfig> as openraft::Instant>::now();
        loop {
            let acked = leader_metrics
                .borrow_watched()
                .heartbeat
                .as_ref()
                .and_then(|h| h.get(&follower.id).cloned().flatten())
                .map(|at| *at);
            if acked.is_some_and(|at| at > spawned) {
                break;
            }
            tokio::time::timeout(DEADLINE, leader_metrics.changed()).await??;
        }
        ensure!(!poll.is_finished(), "the long poll answered before anything was sent");
        messaging(leader)
            .await?
            .send(send_request(TOPIC, Some(0), vec![message(42)]))
            .await?;
        let (resp, took) = poll.await?;
        let resp = resp?.into_inner();
        ensure!(
            resp.messages.len() == 1,
            "long poll answered {:?} after {took:?}; the follower now holds {} message(s) in queue 0 and its metrics say {}",
            resp,
            follower.store().queue_next_offset(TOPIC, 0)?,
            follower.metrics()
        );
        assert_eq!(seq_of(resp.messages[0].message.as_ref().context("no message")?)?, 42);
        assert!(
            took < Duration::from_secs(5),
            "long poll took {took:?} for a message that arrived"
        );
        eprintln!("long poll answered {took:?} after it started (empty poll waited {waited:?})");
        cluster.shutdown().await
    }
}

// ---------------------------------------------------------------------------
// The Rust client (raftmq-client) against a NameServer and a three-node group.
// ---------------------------------------------------------------------------

mod client {
    use std::collections::{BTreeMap, HashMap};
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use anyhow::{Context, bail, ensure};
    use raftmq_broker::MessagingConfig;
    use raftmq_client::{Client, ClientConfig, MessageExt, Producer, PullConsumer};
    use raftmq_proto::v1 as pb;
    use tokio::net::TcpListener;
    use tokio_util::sync::CancellationToken;

    use super::{Cluster, DEADLINE, GROUP, Settings};

    pub(super) struct NameServer {
        pub(super) addr: String,
        stop: CancellationToken,
        task: tokio::task::JoinHandle<Result<(), raftmq_namesrv::Error>>,
    }

    impl NameServer {
        async fn start() -> anyhow::Result<NameServer> {
            let listener = TcpListener::bind("127.0.0.1:0").await?;
            let addr = listener.local_addr()?.to_string();
            let stop = CancellationToken::new();
            let task = tokio::spawn(raftmq_namesrv::serve(
                raftmq_namesrv::NameServerConfig {
                    broker_timeout: Duration::from_secs(1),
                    heartbeat_interval: Duration::from_millis(200),
                },
                listener,
                stop.clone(),
            ));
            Ok(NameServer { addr, stop, task })
        }

        pub(super) async fn stop(self) -> anyhow::Result<()> {
            self.stop.cancel();
            Ok(self.task.await??)
        }
    }

    /// A NameServer, a three-node group that auto-creates topics and registers
    /// with it, and a client; returns once the NameServer names the group's leader.
    pub(super) async fn start() -> anyhow::Result<(NameServer, Cluster, Client)> {
        let ns = NameServer::start().await?;
        let cluster = Cluster::start_with_settings(
            3,
            Settings {
                messaging: MessagingConfig {
                    auto_create_topics: true,
                    ..MessagingConfig::default()
                },
                nameservers: vec![ns.addr.clone()],
                ..Settings::default()
            },
        )
        .await?;
        let leader = cluster.wait_for_leader(DEADLINE).await?;
        let leader_addr = cluster.replica(leader).addr.to_string();
        let client = Client::new(ClientConfig::new(vec![ns.addr.clone()]))?;
        let deadline = Instant::now() + DEADLINE;
        loop {
            let groups = client.admin().list_cluster().await.unwrap_or_default();
            if groups.iter().any(|g| g.leader_endpoint == leader_addr) {
                break;
            }
            ensure!(Instant::now() < deadline, "NameServer never named leader {leader_addr}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok((ns, cluster, client))
    }

    pub(super) fn message(seq: u64, key: Option<&str>) -> pb::Message {
        let mut m = pb::Message::new(format!("body-{seq}").into_bytes());
        m.properties.insert("seq".into(), seq.to_string());
        if let Some(k) = key {
            m.keys.push(k.to_owned());
            m.properties.insert("key".into(), k.to_owned());
        }
        m
    }

    pub(super) fn seq_of(m: &pb::PulledMessage) -> anyhow::Result<u64> {
        m.message
            .as_ref()
            .and_then(|m| m.properties.get("seq"))
            .context("seq property missing")?
            .parse()
            .context("seq not a number")
    }

    /// Waits until the topic's route comes from a NameServer (not provisional).
    pub(super) async fn wait_for_known_route(
        client: &Client,
        topic: &str,
    ) -> anyhow::Result<Arc<raftmq_client::TopicRoute>> {
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Ok(r) = client.route(topic).await
                && !r.provisional
            {
                return Ok(r);
            }
            ensure!(Instant::now() < deadline, "NameServer never learned topic {topic}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Reads every queue of every group of the topic's route from offset 0.
    pub(super) async fn pull_everything(
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
                        .pull(topic, &g.broker_group, q, offset, 1024, Duration::ZERO, "*")
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

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn producer_sends_two_thousand_and_pull_consumer_reads_each_once_in_key_order() -> anyhow::Result<()> {
        const TOPIC: &str = "client-orders";
        const COUNT: u64 = 2_000;
        const KEYS: u64 = 7;
        let (ns, cluster, client) = start().await?;
        let producer = client.producer();
        // The first send reaches a broker through a provisional route and
        // auto-creates the topic; keyed order is promised once the route is known.
        let first = producer.send(TOPIC, message(0, None)).await?;
        assert_eq!(first.broker_group, GROUP);
        let route = wait_for_known_route(&client, TOPIC).await?;
        assert_eq!(route.groups.len(), 1);
        assert_eq!(route.groups[0].queues, 4, "auto-created with the default queue count");

        let started = Instant::now();
        // Seven tasks each send one key's messages in order (a send returns after
        // the ack, so per-key order is the send order); three send unkeyed ones.
        let mut tasks = Vec::new();
        for t in 0..10u64 {
            let producer: Producer = producer.clone();
            tasks.push(tokio::spawn(async move {
                let mut receipts = Vec::new();
                for seq in (1..COUNT).filter(|s| s % 10 == t) {
                    let receipt = if t < KEYS {
                        let key = format!("key-{t}");
                        producer.send_with_key(TOPIC, &key, message(seq, Some(&key))).await?
                    } else {
                        producer.send(TOPIC, message(seq, None)).await?
                    };
                    receipts.push((seq, receipt));
                }
                anyhow::Ok(receipts)
            }));
        }
        let mut acked = BTreeMap::new();
        for t in tasks {
            for (seq, r) in t.await?? {
                acked.insert(seq, r);
            }
        }
        acked.insert(0, first);
        eprintln!("{COUNT} sends took {:?}", started.elapsed());
        assert_eq!(acked.len() as u64, COUNT);
        let used: std::collections::BTreeSet<u32> = acked.values().map(|r| r.queue_id).collect();
        assert_eq!(used.len(), 4, "round-robin and keys spread over every queue");

        let (pulled, _) = pull_everything(&client.pull_consumer(), &route, TOPIC).await?;
        let mut seen: HashMap<u64, (u32, u64)> = HashMap::new();
        let mut last_of_key: HashMap<String, (u32, u64)> = HashMap::new();
        for (_, q, m) in &pulled {
            let seq = seq_of(m)?;
            ensure!(seen.insert(seq, (*q, m.queue_offset)).is_none(), "seq {seq} read twice");
            let r = acked.get(&seq).context("read a message never acknowledged")?;
            assert_eq!(
                (r.queue_id, r.queue_offset, r.message_id.as_str()),
                (*q, m.queue_offset, m.message_id.as_str())
            );
            if let Some(key) = m.message.as_ref().and_then(|m| m.properties.get("key")) {
                // Queues are read in offset order: a key's messages must sit in one
                // queue with rising sequence numbers.
                if let Some((lq, lseq)) = last_of_key.insert(key.clone(), (*q, seq)) {
                    ensure!(lq == *q, "key {key} moved from queue {lq} to {q}");
                    ensure!(lseq < seq, "key {key}: seq {seq} stored after {lseq}");
                }
            }
        }
        assert_eq!(seen.len() as u64, COUNT, "every message read exactly once");
        assert_eq!(last_of_key.len() as u64, KEYS);
        cluster.shutdown().await?;
        ns.stop().await
    }

    /// Unkeyed sends rotate over the queues: awaited one at a time, each goes to the
    /// next queue; many at once, they gather into large batches (one Raft entry
    /// each, visible as shared indexes in the message ids) and still reach every queue.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn unkeyed_sends_rotate_per_send_alone_and_per_batch_under_load() -> anyhow::Result<()> {
        use futures::{StreamExt, TryStreamExt};
        use std::collections::HashSet;
        const TOPIC: &str = "client-rotation";
        const CONCURRENT: u64 = 2_000;
        let (ns, cluster, client) = start().await?;
        let producer = client.producer();
        producer.send(TOPIC, message(0, None)).await?;
        let route = wait_for_known_route(&client, TOPIC).await?;
        let queues = route.groups[0].queues;

        let mut one_by_one = Vec::new();
        for seq in 1..=u64::from(2 * queues) {
            one_by_one.push(producer.send(TOPIC, message(seq, None)).await?.queue_id);
        }
        for w in one_by_one.windows(2) {
            ensure!(
                w[1] == (w[0] + 1) % queues,
                "one-at-a-time sends went to queues {one_by_one:?}"
            );
        }

        let receipts: Vec<_> = futures::stream::iter(0..CONCURRENT)
            .map(|i| producer.send(TOPIC, message(1_000 + i, None)))
            .buffer_unordered(512)
            .try_collect()
            .await?;
        let used: HashSet<u32> = receipts.iter().map(|r| r.queue_id).collect();
        ensure!(
            used.len() == queues as usize,
            "concurrent sends used only queues {used:?}"
        );
        // Message id: "01", group crc (8 hex), Raft index (16 hex), position (8 hex).
        let entries: HashSet<&str> = receipts
            .iter()
            .map(|r| r.message_id.get(10..26).context("message id too short"))
            .collect::<anyhow::Result<_>>()?;
        eprintln!("{CONCURRENT} concurrent sends stored in {} entries", entries.len());
        ensure!(
            (entries.len() as u64) * 8 <= CONCURRENT,
            "{CONCURRENT} concurrent sends made {} entries: sends were not combined",
            entries.len()
        );
        cluster.shutdown().await?;
        ns.stop().await
    }

    type Outcome = (u64, Instant, Result<raftmq_client::SendReceipt, raftmq_client::Error>);

    #[derive(Default)]
    struct Outcomes {
        acked: BTreeMap<u64, (Instant, raftmq_client::SendReceipt)>,
        /// seq, error, whether the message may have been stored anyway.
        failed: Vec<(u64, String, bool)>,
    }

    impl Outcomes {
        fn record(&mut self, (seq, at, outcome): Outcome) {
            match outcome {
                Ok(r) => {
                    self.acked.insert(seq, (at, r));
                }
                Err(e) => self.failed.push((seq, e.to_string(), e.is_outcome_unknown())),
            }
        }
    }

    async fn next_outcome(rx: &mut tokio::sync::mpsc::UnboundedReceiver<Outcome>) -> Option<Outcome> {
        tokio::time::timeout(DEADLINE, rx.recv()).await.ok().flatten()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn producer_continues_through_a_killed_leader_and_every_ack_survives() -> anyhow::Result<()> {
        const TOPIC: &str = "client-failover";
        const BEFORE: usize = 200;
        const AFTER: usize = 200;
        let (ns, mut cluster, client) = start().await?;
        let old = cluster.wait_for_leader(DEADLINE).await?;
        client.admin().create_topic(TOPIC, 4, pb::Permission::ReadWrite).await?;
        wait_for_known_route(&client, TOPIC).await?;

        // One producer task sends seq 0, 1, 2, … and reports each outcome.
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let stop = CancellationToken::new();
        let sender = {
            let (producer, stop) = (client.producer(), stop.clone());
            tokio::spawn(async move {
                let mut seq = 0u64;
                while !stop.is_cancelled() {
                    let outcome = producer.send(TOPIC, message(seq, None)).await;
                    if tx.send((seq, Instant::now(), outcome)).is_err() {
                        break;
                    }
                    seq += 1;
                }
            })
        };
        let mut outcomes = Outcomes::default();
        while outcomes.acked.len() < BEFORE {
            outcomes.record(
                next_outcome(&mut rx)
                    .await
                    .context("producer stalled before the kill")?,
            );
        }
        cluster.replica_mut(old).kill().await;
        let killed_at = Instant::now();
        let acked_before = outcomes.acked.len();
        while outcomes.acked.len() < acked_before + AFTER {
            outcomes.record(next_outcome(&mut rx).await.context("producer stalled after the kill")?);
        }
        stop.cancel();
        while let Some(event) = rx.recv().await {
            outcomes.record(event);
        }
        sender.await?;
        let Outcomes { acked, failed } = outcomes;
        let first_after = acked
            .values()
            .map(|(at, _)| *at)
            .filter(|at| *at > killed_at)
            .min()
            .context("no ack after the kill")?;
        eprintln!(
            "leader {old} killed: {} ack(s) before, {} after; first ack after the kill {:?} later; {} send(s) failed: {:?}",
            acked_before,
            acked.len() - acked_before,
            first_after - killed_at,
            failed.len(),
            failed
        );

        let new = cluster.wait_for_leader_other_than(Some(old), DEADLINE).await?;
        let new_addr = cluster.replica(new).addr.to_string();
        let route = client.route(TOPIC).await?;
        let (pulled, endpoints) = pull_everything(&client.pull_consumer(), &route, TOPIC).await?;
        ensure!(
            endpoints.iter().all(|e| *e == new_addr),
            "reads were served by {endpoints:?}, not the new leader {new_addr}"
        );
        let read: HashMap<u64, usize> = pulled.iter().try_fold(HashMap::new(), |mut m, (_, _, p)| {
            *m.entry(seq_of(p)?).or_default() += 1;
            anyhow::Ok(m)
        })?;
        for seq in acked.keys() {
            ensure!(
                read.contains_key(seq),
                "acknowledged seq {seq} is missing after the failover"
            );
        }
        let duplicated = read.values().filter(|n| **n > 1).count();
        eprintln!("duplicates stored by retries after unknown outcomes: {duplicated}");
        cluster.shutdown().await?;
        ns.stop().await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_sends_are_combined_into_fewer_entries_and_a_bad_one_fails_alone() -> anyhow::Result<()> {
        const TOPIC: &str = "combined";
        const COUNT: u64 = 3_000;
        let (ns, cluster, client) = start().await?;
        client.admin().create_topic(TOPIC, 2, pb::Permission::ReadWrite).await?;
        let route = wait_for_known_route(&client, TOPIC).await?;
        let producer = client.producer();
        // 256 sends in flight at a time, with one empty body (refused as invalid)
        // in the middle of the stream.
        let bad = COUNT / 2;
        let mut pending = futures::StreamExt::buffer_unordered(
            futures::StreamExt::map(futures::stream::iter(0..COUNT), |seq| {
                let producer = producer.clone();
                async move {
                    let mut m = message(seq, None);
                    if seq == bad {
                        m.body.clear();
                    }
                    (seq, producer.send(TOPIC, m).await)
                }
            }),
            256,
        );
        let mut receipts = BTreeMap::new();
        let mut refused = Vec::new();
        while let Some((seq, r)) = futures::StreamExt::next(&mut pending).await {
            match r {
                Ok(r) => {
                    receipts.insert(seq, r);
                }
                Err(e) => refused.push((seq, e)),
            }
        }
        ensure!(
            refused.len() == 1 && refused[0].0 == bad,
            "only the empty body should fail: {:?}",
            refused.iter().map(|(s, e)| format!("{s}: {e}")).collect::<Vec<_>>()
        );
        ensure!(
            refused[0].1.code() == Some(tonic::Code::InvalidArgument),
            "{}",
            refused[0].1
        );
        // Fewer Raft entries than messages: sends were combined.
        let entries: std::collections::BTreeSet<u64> = receipts
            .values()
            .map(|r| super::api::raft_index_of(&r.message_id))
            .collect::<anyhow::Result<_>>()?;
        eprintln!("{} messages acknowledged in {} entries", receipts.len(), entries.len());
        ensure!(
            entries.len() * 2 < receipts.len(),
            "{} entries for {} messages: little was combined",
            entries.len(),
            receipts.len()
        );
        // Each acknowledged message is stored once, where its receipt says.
        let (pulled, _) = pull_everything(&client.pull_consumer(), &route, TOPIC).await?;
        ensure!(
            pulled.len() == receipts.len(),
            "{} stored, {} acknowledged",
            pulled.len(),
            receipts.len()
        );
        for (group, queue, m) in &pulled {
            let seq = seq_of(m)?;
            let r = receipts
                .get(&seq)
                .with_context(|| format!("seq {seq} stored but not acknowledged"))?;
            ensure!(
                (&r.broker_group, r.queue_id, r.queue_offset, &r.message_id)
                    == (group, *queue, m.queue_offset, &m.message_id),
                "seq {seq}: receipt {r:?} but stored at {group}/{queue}@{}",
                m.queue_offset
            );
        }
        cluster.shutdown().await?;
        ns.stop().await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn send_through_a_route_naming_a_follower_redirects_to_the_leader() -> anyhow::Result<()> {
        const TOPIC: &str = "client-redirect";
        let (ns, cluster, client) = start().await?;
        let leader = cluster.wait_for_leader(DEADLINE).await?;
        let admin = client.admin();
        admin.create_topic(TOPIC, 2, pb::Permission::ReadWrite).await?;
        let topics = admin.list_topics().await?;
        ensure!(
            topics
                .iter()
                .any(|(g, t)| g == GROUP && t.name == TOPIC && t.queues_per_group == 2),
            "created topic not listed: {topics:?}"
        );
        let status = admin.cluster_status().await?;
        assert_eq!(status.len(), 1);
        assert_eq!(status[0].leader_id, Some(leader));

        let leader_addr = cluster.replica(leader).addr.to_string();
        let followers: Vec<String> = cluster
            .running()
            .filter(|r| r.id != leader)
            .map(|r| r.addr.to_string())
            .collect();
        // A stale cache: it calls a follower the leader.
        client.seed_route(pb::QueryRouteResponse {
            topic: TOPIC.into(),
            groups: vec![pb::GroupRoute {
                broker_group: GROUP.into(),
                leader_endpoint: followers[0].clone(),
                follower_endpoints: vec![leader_addr.clone(), followers[1].clone()],
                queues: 2,
                perm: pb::Permission::ReadWrite as i32,
            }],
        });
        let receipt = client.producer().send(TOPIC, message(1, None)).await?;
        assert_eq!(receipt.broker_group, GROUP);
        let cached = client.route(TOPIC).await?;
        assert_eq!(
            cached.groups[0].leader_endpoint, leader_addr,
            "the redirect updated the cache"
        );
        assert!(cached.groups[0].follower_endpoints.contains(&followers[0]));

        let pulled = client
            .pull_consumer()
            .pull(
                TOPIC,
                GROUP,
                receipt.queue_id,
                receipt.queue_offset,
                1,
                Duration::ZERO,
                "*",
            )
            .await?;
        assert_eq!(pulled.endpoint, leader_addr);
        assert_eq!(pulled.messages.len(), 1);
        assert_eq!(pulled.messages[0].message_id, receipt.message_id);

        let chosen = client
            .producer()
            .send_to_queue(TOPIC, GROUP, 1, message(2, None))
            .await?;
        assert_eq!((chosen.broker_group.as_str(), chosen.queue_id), (GROUP, 1));

        // Errors that retrying cannot fix come back at once, with their code.
        let started = Instant::now();
        let err = client
            .producer()
            .send(TOPIC, pb::Message::new(Vec::new()))
            .await
            .expect_err("an empty body is refused");
        assert_eq!(err.code(), Some(tonic::Code::InvalidArgument), "{err}");
        assert!(started.elapsed() < Duration::from_secs(1), "not retried");
        if err.is_outcome_unknown() {
            bail!("an invalid argument is a definite failure");
        }
        cluster.shutdown().await?;
        ns.stop().await
    }

    /// A leader that goes silent (paused or cut off: no reset, no answer) is given
    /// up on after `request_timeout`; its replicas, asked next, name the real
    /// leader. While the silent endpoint is remembered as dead, later calls (a
    /// send, and a pull, whose followers are asked with ClusterStatus) do not wait
    /// on it again even though the route still names it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_silent_leader_is_given_up_after_request_timeout_and_its_replicas_name_the_real_one() -> anyhow::Result<()>
    {
        const TOPIC: &str = "client-silent";
        const REQUEST_TIMEOUT: Duration = Duration::from_millis(500);
        let (ns, cluster, admin_client) = start().await?;
        let leader = cluster.wait_for_leader(DEADLINE).await?;
        admin_client
            .admin()
            .create_topic(TOPIC, 2, pb::Permission::ReadWrite)
            .await?;
        wait_for_known_route(&admin_client, TOPIC).await?;
        // The kernel completes TCP handshakes into the backlog of a listener that
        // never accepts: a connection that opens and then hears nothing, as from
        // a stopped process.
        let silent = TcpListener::bind("127.0.0.1:0").await?;
        let silent_addr = silent.local_addr()?.to_string();
        let leader_addr = cluster.replica(leader).addr.to_string();
        let followers: Vec<String> = cluster
            .running()
            .filter(|r| r.id != leader)
            .map(|r| r.addr.to_string())
            .collect();
        let mut config = ClientConfig::new(vec![ns.addr.clone()]);
        config.request_timeout = REQUEST_TIMEOUT;
        let client = Client::new(config)?;
        // A NameServer that still names the silent node as the leader.
        let stale = || pb::QueryRouteResponse {
            topic: TOPIC.into(),
            groups: vec![pb::GroupRoute {
                broker_group: GROUP.into(),
                leader_endpoint: silent_addr.clone(),
                follower_endpoints: followers.clone(),
                queues: 2,
                perm: pb::Permission::ReadWrite as i32,
            }],
        };

        client.seed_route(stale());
        let started = Instant::now();
        let receipt = client.producer().send(TOPIC, message(1, None)).await?;
        let took = started.elapsed();
        assert_eq!(receipt.broker_group, GROUP);
        ensure!(
            took >= REQUEST_TIMEOUT && took < REQUEST_TIMEOUT + Duration::from_secs(2),
            "the first send took {took:?}: it should wait out request_timeout once, then be redirected"
        );
        assert_eq!(
            client.route(TOPIC).await?.groups[0].leader_endpoint,
            leader_addr,
            "the redirect updated the cache"
        );

        client.seed_route(stale());
        let started = Instant::now();
        client.producer().send(TOPIC, message(2, None)).await?;
        let took = started.elapsed();
        ensure!(
            took < REQUEST_TIMEOUT,
            "the second send took {took:?}: it waited on the silent endpoint again"
        );

        client.seed_route(stale());
        let pulled = client
            .pull_consumer()
            .pull(
                TOPIC,
                GROUP,
                receipt.queue_id,
                receipt.queue_offset,
                1,
                Duration::ZERO,
                "*",
            )
            .await?;
        assert_eq!(pulled.endpoint, leader_addr, "pulls are served by the leader");
        assert_eq!(pulled.messages.len(), 1);
        assert_eq!(pulled.messages[0].message_id, receipt.message_id);
        drop(silent);
        cluster.shutdown().await?;
        ns.stop().await
    }
}
