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
use raftmq_broker::{RaftNode, RaftNodeConfig};
use raftmq_raft_store::{
    AppendBatch, BrokerNode, Command, Message, NodeId, Response, StoreReader, TopicConfig, TypeConfig,
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

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

/// One replica and the runtime that runs it.
struct Replica {
    id: NodeId,
    dir: PathBuf,
    addr: SocketAddr,
    rt: Option<tokio::runtime::Runtime>,
    node: Option<RaftNode>,
}

impl Replica {
    /// Starts a replica on `bind` (port 0 for a fresh one, its old address when
    /// restarting, so the membership's address stays right).
    async fn start(id: NodeId, dir: &Path, bind: SocketAddr) -> anyhow::Result<Replica> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name(format!("node-{id}"))
            .enable_all()
            .build()?;
        let data_dir = dir.to_path_buf();
        let started = rt
            .spawn(async move {
                let listener = TcpListener::bind(bind)
                    .await
                    .with_context(|| format!("binding {bind}"))?;
                let addr = listener.local_addr()?;
                let config = RaftNodeConfig::new(id, GROUP, data_dir, addr.to_string());
                anyhow::Ok(RaftNode::start(config, listener, CancellationToken::new()).await?)
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
            addr: node.local_addr(),
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
        *self = Replica::start(self.id, &self.dir, self.addr).await?;
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
    _dir: tempfile::TempDir,
    replicas: Vec<Replica>,
}

impl Cluster {
    async fn start(n: u64) -> anyhow::Result<Cluster> {
        init_tracing();
        let dir = tempfile::tempdir()?;
        let mut replicas = Vec::new();
        for id in 1..=n {
            let any_port: SocketAddr = "127.0.0.1:0".parse()?;
            replicas.push(Replica::start(id, &dir.path().join(format!("node-{id}")), any_port).await?);
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
    cluster
        .replica(leader)
        .node()
        .raft()
        .client_write(create_topic())
        .await
        .map_err(|e| anyhow::anyhow!("create topic: {e:?}"))?;
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
    cluster
        .replica(new_leader)
        .node()
        .raft()
        .client_write(create_topic())
        .await
        .map_err(|e| anyhow::anyhow!("create topic: {e:?}"))?;
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
async fn restarted_follower_catches_up_and_never_applies_past_commit() -> anyhow::Result<()> {
    let mut cluster = Cluster::start(3).await?;
    let leader = cluster.wait_for_leader(DEADLINE).await?;
    cluster
        .replica(leader)
        .node()
        .raft()
        .client_write(create_topic())
        .await
        .map_err(|e| anyhow::anyhow!("create topic: {e:?}"))?;
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
    cluster
        .replica(leader)
        .node()
        .raft()
        .client_write(create_topic())
        .await
        .map_err(|e| anyhow::anyhow!("create topic: {e:?}"))?;
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
    let mut client = RaftServiceClient::connect(format!("http://{}", cluster.replica(leader).addr)).await?;

    let err = client
        .vote(pb::VoteRequest {
            broker_group: "broker-z".into(),
            body: b"{}".to_vec(),
        })
        .await
        .expect_err("wrong group");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(
        err.message().contains("broker-a") && err.message().contains("broker-z"),
        "{err}"
    );

    let err = client
        .append_entries(pb::AppendEntriesRequest {
            broker_group: GROUP.into(),
            header: b"{not json".to_vec(),
            entries: vec![],
        })
        .await
        .expect_err("garbage header");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("append header"), "{err}");

    let err = client
        .pre_vote(pb::VoteRequest {
            broker_group: GROUP.into(),
            body: vec![0xff; 3],
        })
        .await
        .expect_err("garbage vote");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);

    // On the replication stream too, a wrong group ends the stream with its status.
    let mut replies = client
        .stream_append(futures::stream::iter(vec![pb::AppendEntriesRequest {
            broker_group: "broker-z".into(),
            header: vec![],
            entries: vec![],
        }]))
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
        .install_snapshot(futures::stream::iter(chunks))
        .await
        .expect_err("truncated snapshot");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("before its last chunk"), "{err}");

    // None of that disturbed the node.
    ensure!(cluster.replica(leader).metrics().state == ServerState::Leader);
    cluster
        .replica(leader)
        .node()
        .raft()
        .client_write(create_topic())
        .await
        .map_err(|e| anyhow::anyhow!("create topic: {e:?}"))?;
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
    cluster
        .replica(new_leader)
        .node()
        .raft()
        .client_write(create_topic())
        .await
        .map_err(|e| anyhow::anyhow!("create topic: {e:?}"))?;
    let last = write_messages(&cluster, new_leader, 0..10).await?;
    cluster.wait_applied(last).await?;
    assert_converged(&cluster, 10)?;
    cluster.shutdown().await
}
