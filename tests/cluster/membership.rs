//! Online membership changes through the AdminService (issue #18): a group
//! grown from three replicas to five and shrunk back while a producer sends,
//! wiped replicas replaced under a new id and under their old one, a removed
//! replica that stops serving and says why without disturbing the group, a
//! leader transfer, and bad requests each answered with their own status.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use openraft::ServerState;
use raftmq_proto::v1 as pb;
use raftmq_proto::v1::admin_service_client::AdminServiceClient;
use raftmq_proto::v1::messaging_service_client::MessagingServiceClient;
use raftmq_raft_store::NodeId;
use tokio_util::sync::CancellationToken;
use tonic::Code;
use tonic::transport::Channel;

use super::fixtures::{
    Check, Cluster, DEADLINE, GROUP, ONE_AT_A_TIME, Replica, assert_converged, create_topic_via, eventually, message,
    start_with_client, wait_for_known_route, write_messages,
};

async fn admin(cluster: &Cluster, id: NodeId) -> anyhow::Result<AdminServiceClient<Channel>> {
    let addr = cluster.replica(id).addr;
    AdminServiceClient::connect(format!("http://{addr}"))
        .await
        .with_context(|| format!("connecting to node {id} at {addr}"))
}

fn add_request(r: &Replica) -> pb::AddReplicaRequest {
    pb::AddReplicaRequest {
        node_id: r.id,
        endpoint: r.addr.to_string(),
        // Test replicas take any free Raft port, not the client port + 30000.
        raft_endpoint: r.raft_addr.to_string(),
        catch_up_timeout_ms: 30_000,
    }
}

/// AddReplica on node `on`, retried while it answers UNAVAILABLE (a leader a
/// quorum has not yet confirmed, on a busy test machine).
async fn add_replica(cluster: &Cluster, on: NodeId, req: pb::AddReplicaRequest) -> anyhow::Result<pb::MembershipView> {
    let id = req.node_id;
    eventually(
        DEADLINE,
        &format!("node {on} to add node {id}"),
        async || match admin(cluster, on).await?.add_replica(req.clone()).await {
            Ok(r) => Ok(Check::Done(
                r.into_inner().membership.context("no membership in the answer")?,
            )),
            Err(s) if s.code() == Code::Unavailable => Ok(Check::Pending(format!("{s:?}"))),
            Err(s) => Err(anyhow::Error::from(s).context(format!("adding node {id} through node {on}"))),
        },
    )
    .await
}

/// RemoveReplica on node `on`, retried like [`add_replica`], following a
/// NOT_LEADER redirect as clients do.
async fn remove_replica(cluster: &Cluster, on: NodeId, id: NodeId) -> anyhow::Result<pb::MembershipView> {
    let mut on = on;
    eventually(
        DEADLINE,
        &format!("the leader to remove node {id}"),
        async || match admin(cluster, on)
            .await?
            .remove_replica(pb::RemoveReplicaRequest { node_id: id })
            .await
        {
            Ok(r) => Ok(Check::Done(
                r.into_inner().membership.context("no membership in the answer")?,
            )),
            Err(s) if s.code() == Code::Unavailable => Ok(Check::Pending(format!("{s:?}"))),
            Err(s) if s.message() == "not leader" => {
                let leader = s
                    .metadata()
                    .get(raftmq_broker::LEADER_METADATA_KEY)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_owned();
                if let Some(r) = cluster.running().find(|r| r.addr.to_string() == leader) {
                    on = r.id;
                }
                Ok(Check::Pending(format!("redirected to {leader:?}")))
            }
            Err(s) => Err(anyhow::Error::from(s).context(format!("removing node {id} through node {on}"))),
        },
    )
    .await
}

/// Runs `call` again while it answers UNAVAILABLE (a leader just elected, or
/// one a quorum has not confirmed lately on a busy test machine), up to
/// [`DEADLINE`].
async fn confirmed<T>(mut call: impl AsyncFnMut() -> Result<T, tonic::Status>) -> Result<T, tonic::Status> {
    let give_up = Instant::now() + DEADLINE;
    loop {
        match call().await {
            Err(s) if s.code() == Code::Unavailable && Instant::now() < give_up => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            other => return other,
        }
    }
}

fn voters(view: &pb::MembershipView) -> BTreeSet<NodeId> {
    view.members.iter().filter(|m| m.voter).map(|m| m.node_id).collect()
}

fn members(view: &pb::MembershipView) -> BTreeSet<NodeId> {
    view.members.iter().map(|m| m.node_id).collect()
}

/// The replica among `among` that leads with a quorum's acknowledgement.
async fn leader_among(cluster: &Cluster, among: &[NodeId]) -> anyhow::Result<NodeId> {
    eventually(DEADLINE, &format!("a leader among {among:?}"), async || {
        let mut seen = Vec::new();
        for id in among {
            let m = cluster.replica(*id).metrics();
            if m.state == ServerState::Leader && m.last_quorum_acked.is_some() {
                return Ok(Check::Done(*id));
            }
            seen.push((*id, m.state, m.current_leader));
        }
        Ok(Check::Pending(format!("{seen:?}")))
    })
    .await
}

/// Waits until each of `ids` has applied its leader's last log entry and
/// committed a membership whose voters are exactly `ids`.
async fn settle(cluster: &Cluster, ids: &[NodeId]) -> anyhow::Result<()> {
    let leader = leader_among(cluster, ids).await?;
    let last = cluster.replica(leader).metrics().last_log_index.unwrap_or(0);
    let want: BTreeSet<NodeId> = ids.iter().copied().collect();
    for id in ids {
        let raft = cluster.replica(*id).node().raft().clone();
        raft.wait(Some(DEADLINE))
            .applied_index_at_least(Some(last), format!("node {id} applies {last}"))
            .await
            .with_context(|| format!("node {id} did not apply {last}"))?;
        let m = cluster.replica(*id).metrics();
        let got: BTreeSet<NodeId> = m.committed_membership_config.membership().voter_ids().collect();
        ensure!(got == want, "node {id} has committed voters {got:?}, want {want:?}");
    }
    Ok(())
}

/// The `seq` property of every message of `topic` stored on replica `id`.
fn stored_seqs(cluster: &Cluster, id: NodeId, topic: &str, queues: u32) -> anyhow::Result<BTreeSet<u64>> {
    let mut out = BTreeSet::new();
    for q in 0..queues {
        for m in cluster.replica(id).store().read_messages(topic, q, 0, 1_000_000)? {
            let seq = m
                .message
                .properties
                .iter()
                .find(|(k, _)| k == "seq")
                .context("a stored message has no seq property")?
                .1
                .parse()?;
            out.insert(seq);
        }
    }
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_to_five_to_three_replicas_under_load_keeps_every_acknowledged_message() -> anyhow::Result<()> {
    const TOPIC: &str = "membership-load";
    const QUEUES: u32 = 4;
    const MAX_SENDS: u64 = 50_000;
    const MAX_TIME: Duration = Duration::from_secs(120);
    let _turn = ONE_AT_A_TIME.lock().await;
    let (ns, mut cluster, client) = start_with_client().await?;
    client
        .admin()
        .create_topic(TOPIC, QUEUES, pb::Permission::ReadWrite)
        .await?;
    wait_for_known_route(&client, TOPIC).await?;

    // Two senders, bounded in count and time, record what was acknowledged.
    let acked: Arc<Mutex<BTreeSet<u64>>> = Arc::default();
    let failed: Arc<Mutex<Vec<(u64, String)>>> = Arc::default();
    let stop = CancellationToken::new();
    let started = Instant::now();
    let senders: Vec<_> = (0..2u64)
        .map(|lane| {
            let (producer, stop, acked, failed) = (client.producer(), stop.clone(), acked.clone(), failed.clone());
            tokio::spawn(async move {
                let mut seq = lane;
                while seq < MAX_SENDS && !stop.is_cancelled() && started.elapsed() < MAX_TIME {
                    match producer.send(TOPIC, message(seq, None)).await {
                        Ok(_) => {
                            acked.lock().unwrap().insert(seq);
                        }
                        Err(e) => failed.lock().unwrap().push((seq, e.to_string())),
                    }
                    seq += 2;
                }
            })
        })
        .collect();
    let acks = || acked.lock().unwrap().len();
    let wait_for_acks = async |n: usize, when: &str| {
        eventually(
            Duration::from_secs(30),
            &format!("{n} acknowledged sends {when}"),
            async || {
                Ok(if acks() >= n {
                    Check::Done(())
                } else {
                    Check::Pending(format!("{} acked, {} failed", acks(), failed.lock().unwrap().len()))
                })
            },
        )
        .await
    };
    wait_for_acks(100, "before any change").await?;

    // Grow: two fresh replicas, not in the membership, added one at a time.
    cluster.start_joiner(4, None).await?;
    cluster.start_joiner(5, None).await?;
    for id in [4, 5] {
        let leader = leader_among(&cluster, &[1, 2, 3]).await?;
        let before = acks();
        let t = Instant::now();
        let view = add_replica(&cluster, leader, add_request(cluster.replica(id))).await?;
        ensure!(
            voters(&view).contains(&id),
            "node {id} is not a voter after AddReplica: {view:?}"
        );
        eprintln!(
            "node {id} added in {:?} while {} sends were acknowledged",
            t.elapsed(),
            acks() - before
        );
        wait_for_acks(acks() + 50, &format!("after adding node {id}")).await?;
    }
    settle(&cluster, &[1, 2, 3, 4, 5]).await?;

    // Shrink: a follower first, then the leader itself.
    let leader = leader_among(&cluster, &[1, 2, 3, 4, 5]).await?;
    let follower = [1, 2, 3]
        .into_iter()
        .find(|id| *id != leader)
        .context("no original follower")?;
    let view = remove_replica(&cluster, leader, follower).await?;
    ensure!(
        !members(&view).contains(&follower),
        "node {follower} still a member: {view:?}"
    );
    wait_for_acks(acks() + 50, &format!("after removing follower {follower}")).await?;

    let four: Vec<NodeId> = [1, 2, 3, 4, 5].into_iter().filter(|i| *i != follower).collect();
    let leader = leader_among(&cluster, &four).await?;
    let t = Instant::now();
    // The leader hands leadership over, then the new leader removes it.
    let view = remove_replica(&cluster, leader, leader).await?;
    ensure!(
        !members(&view).contains(&leader),
        "node {leader} still a member: {view:?}"
    );
    let remaining: Vec<NodeId> = [1, 2, 3, 4, 5]
        .into_iter()
        .filter(|id| *id != follower && *id != leader)
        .collect();
    let new_leader = leader_among(&cluster, &remaining).await?;
    eprintln!(
        "leader {leader} removed itself; node {new_leader} leads {:?} later",
        t.elapsed()
    );
    wait_for_acks(acks() + 100, "after removing the leader").await?;

    stop.cancel();
    for s in senders {
        s.await?;
    }
    cluster.stop_replica(follower).await?;
    cluster.stop_replica(leader).await?;
    settle(&cluster, &remaining).await?;
    let acked = acked.lock().unwrap().clone();
    let failed = failed.lock().unwrap().clone();
    eprintln!(
        "{} sends acknowledged, {} failed (outcome unknown or refused) in {:?}: {:?}",
        acked.len(),
        failed.len(),
        started.elapsed(),
        failed.iter().take(5).collect::<Vec<_>>()
    );
    for id in &remaining {
        let stored = stored_seqs(&cluster, *id, TOPIC, QUEUES)?;
        let missing: Vec<u64> = acked.difference(&stored).copied().take(10).collect();
        ensure!(
            missing.is_empty(),
            "node {id} lacks acknowledged messages, e.g. {missing:?} ({} stored, {} acked)",
            stored.len(),
            acked.len()
        );
    }
    cluster.shutdown().await?;
    ns.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wiped_replicas_are_replaced_under_a_new_id_and_under_their_own_id() -> anyhow::Result<()> {
    let mut cluster = Cluster::start(3).await?;
    let leader = cluster.wait_for_leader(DEADLINE).await?;
    create_topic_via(&cluster, leader).await?;
    let last = write_messages(&cluster, leader, 0..200).await?;
    cluster.wait_applied(last).await?;

    // A follower's disk is lost; the group goes on with two of three.
    let lost = if leader == 1 { 2 } else { 1 };
    let (lost_addr, lost_raft) = (cluster.replica(lost).addr, cluster.replica(lost).raft_addr);
    cluster.kill_and_wipe(lost).await?;
    let last = write_messages(&cluster, leader, 200..400).await?;

    // Snapshot and purge on the leader, so the replacement cannot be fed from
    // the log and must receive a snapshot carrying the retained segments.
    let raft = cluster.replica(leader).node().raft().clone();
    raft.trigger().snapshot().await?;
    raft.wait(Some(DEADLINE))
        .metrics(|m| m.snapshot.is_some_and(|s| s.index >= last), "leader snapshot built")
        .await?;
    raft.trigger().purge_log(last).await?;
    raft.wait(Some(DEADLINE))
        .metrics(|m| m.purged.is_some_and(|p| p.index >= last), "leader log purged")
        .await?;

    // Under a new id, on the lost replica's endpoints: remove the old id first.
    let view = remove_replica(&cluster, leader, lost).await?;
    ensure!(
        !members(&view).contains(&lost),
        "node {lost} is still a member: {view:?}"
    );
    cluster.start_joiner(4, Some((lost_addr, lost_raft))).await?;
    let view = add_replica(&cluster, leader, add_request(cluster.replica(4))).await?;
    let others: Vec<NodeId> = [1, 2, 3].into_iter().filter(|id| *id != lost).collect();
    ensure!(
        voters(&view) == others.iter().copied().chain([4]).collect(),
        "unexpected voters after replacing node {lost} by node 4: {view:?}"
    );
    let snap = cluster.replica(4).metrics().snapshot;
    ensure!(
        snap.is_some_and(|s| s.index >= last),
        "node 4 caught up without the snapshot (snapshot {snap:?}, purged through {last})"
    );
    let last = write_messages(&cluster, leader, 400..500).await?;
    cluster.wait_applied(last).await?;
    assert_converged(&cluster, 500)?;

    // The membership is replicated state: it survives the leader's death.
    cluster.replica_mut(leader).kill().await;
    let members_now: Vec<NodeId> = others.iter().copied().filter(|id| *id != leader).chain([4]).collect();
    let new_leader = leader_among(&cluster, &members_now).await?;
    let m = cluster.replica(new_leader).metrics();
    let got: BTreeSet<NodeId> = m.membership_config.membership().voter_ids().collect();
    ensure!(
        got == others.iter().copied().chain([4]).collect(),
        "the new leader {new_leader} sees voters {got:?}"
    );
    cluster.replica_mut(leader).restart().await?;
    let last = write_messages(&cluster, new_leader, 500..600).await?;
    cluster.wait_applied(last).await?;
    assert_converged(&cluster, 600)?;

    // Under its own id: a follower's disk is lost, the id is removed, then the
    // wiped replica comes back empty under the same id and is added again.
    let lost = others
        .iter()
        .copied()
        .chain([4])
        .find(|id| *id != new_leader)
        .context("no follower")?;
    cluster.kill_and_wipe(lost).await?;
    remove_replica(&cluster, new_leader, lost).await?;
    let last = write_messages(&cluster, new_leader, 600..700).await?;
    cluster.replica_mut(lost).restart().await?;
    let view = add_replica(&cluster, new_leader, add_request(cluster.replica(lost))).await?;
    ensure!(
        voters(&view).contains(&lost) && voters(&view).len() == 3,
        "voters after re-adding: {view:?}"
    );
    cluster.wait_applied(last).await?;
    let last = write_messages(&cluster, new_leader, 700..800).await?;
    cluster.wait_applied(last).await?;
    assert_converged(&cluster, 800)?;
    cluster.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_replica_stops_serving_says_why_and_leaves_the_group_alone() -> anyhow::Result<()> {
    let _turn = ONE_AT_A_TIME.lock().await;
    let (ns, mut cluster, client) = start_with_client().await?;
    let leader = cluster.wait_for_leader(DEADLINE).await?;
    let removed = if leader == 3 { 2 } else { 3 };
    let removed_addr = cluster.replica(removed).addr.to_string();
    remove_replica(&cluster, leader, removed).await?;
    let term = cluster.replica(leader).metrics().current_term;

    // Its client API names the removal, on every service.
    let why = format!("node {removed} was removed from broker group {GROUP}");
    let mut on_removed = admin(&cluster, removed).await?;
    let status = eventually(DEADLINE, "the removed replica to refuse requests", async || {
        Ok(match on_removed.list_topics(pb::ListTopicsRequest {}).await {
            Err(s) if s.message().contains(&why) => Check::Done(s),
            other => Check::Pending(format!("{other:?}")),
        })
    })
    .await?;
    ensure!(status.code() == Code::Unavailable, "answered {status:?}");
    ensure!(
        status.message().contains("no longer serves this group"),
        "answered {status:?}"
    );
    let mut messaging = MessagingServiceClient::connect(format!("http://{removed_addr}")).await?;
    let sent = messaging
        .send(pb::SendRequest {
            topic: "orders".into(),
            messages: vec![message(1, None)],
            ..Default::default()
        })
        .await;
    ensure!(
        matches!(&sent, Err(s) if s.message().contains(&why)),
        "a send to the removed replica was answered {sent:?}"
    );
    let asked = on_removed
        .get_membership(pb::GetMembershipRequest {})
        .await?
        .into_inner();
    ensure!(asked.removed.contains(&why), "GetMembership on it says {asked:?}");
    ensure!(
        cluster.replica(removed).metrics().state == ServerState::Shutdown,
        "the removed replica's Raft still runs"
    );

    // It does not disturb the group: watch the leader for a while (an
    // observation window, not a wait for progress).
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        cluster.ensure_still_leads(leader, term, "after removing a follower")?;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // NameServers drop it once it stops registering.
    eventually(DEADLINE, "the NameServer to drop the removed replica", async || {
        let groups = client.admin().list_cluster().await.unwrap_or_default();
        let listed = groups
            .iter()
            .flat_map(|g| {
                g.replicas
                    .iter()
                    .map(|r| r.endpoint.clone())
                    .chain([g.leader_endpoint.clone()])
            })
            .any(|e| e == removed_addr);
        Ok(if listed {
            Check::Pending(format!("{groups:?}"))
        } else {
            Check::Done(())
        })
    })
    .await?;
    cluster.ensure_still_leads(leader, term, "at the end")?;
    cluster.stop_replica(removed).await?;
    cluster.shutdown().await?;
    ns.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_transfer_through_the_admin_api_moves_leadership_to_the_named_node() -> anyhow::Result<()> {
    let cluster = Cluster::start(3).await?;
    let leader = cluster.wait_for_leader(DEADLINE).await?;
    let to = if leader == 3 { 2 } else { 3 };
    let t = Instant::now();
    let resp = admin(&cluster, leader)
        .await?
        .transfer_leader(pb::TransferLeaderRequest {
            to_node_id: Some(to),
            timeout_ms: 0,
        })
        .await?
        .into_inner();
    ensure!(resp.leader_id == to, "answered {resp:?}");
    ensure!(
        resp.leader_endpoint == cluster.replica(to).addr.to_string(),
        "answered {resp:?}"
    );
    ensure!(
        cluster.replica(to).metrics().state == ServerState::Leader,
        "node {to} does not lead"
    );
    eprintln!("leadership moved from {leader} to {to} in {:?}", t.elapsed());

    // Without a target: to another voter.
    let resp = admin(&cluster, to)
        .await?
        .transfer_leader(pb::TransferLeaderRequest::default())
        .await?
        .into_inner();
    ensure!(resp.leader_id != to, "leadership stayed on node {to}: {resp:?}");

    // A follower redirects to the leader; a non-member target is refused.
    let now = leader_among(&cluster, &[1, 2, 3]).await?;
    let follower = [1, 2, 3].into_iter().find(|id| *id != now).context("no follower")?;
    eventually(
        DEADLINE,
        &format!("node {follower} to know that node {now} leads"),
        async || {
            let seen = cluster.replica(follower).metrics().current_leader;
            Ok(if seen == Some(now) {
                Check::Done(())
            } else {
                Check::Pending(format!("{seen:?}"))
            })
        },
    )
    .await?;
    let status = admin(&cluster, follower)
        .await?
        .transfer_leader(pb::TransferLeaderRequest::default())
        .await
        .expect_err("a follower transferred leadership");
    ensure!(
        status.code() == Code::FailedPrecondition && status.message() == "not leader",
        "{status:?}"
    );
    ensure!(
        status
            .metadata()
            .get(raftmq_broker::LEADER_METADATA_KEY)
            .and_then(|v| v.to_str().ok())
            == Some(cluster.replica(now).addr.to_string().as_str()),
        "no leader endpoint in {status:?}"
    );
    let status = admin(&cluster, now)
        .await?
        .transfer_leader(pb::TransferLeaderRequest {
            to_node_id: Some(42),
            timeout_ms: 0,
        })
        .await
        .expect_err("a transfer to a non-member was accepted");
    ensure!(
        status.code() == Code::FailedPrecondition && status.message().contains("node 42 is not a member"),
        "{status:?}"
    );
    cluster.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_membership_requests_get_their_own_status() -> anyhow::Result<()> {
    let mut cluster = Cluster::start(3).await?;
    let leader = cluster.wait_for_leader(DEADLINE).await?;
    let mut on_leader = admin(&cluster, leader).await?;
    let expect =
        |result: Result<tonic::Response<pb::AddReplicaResponse>, tonic::Status>, code: Code, text: &str| match result {
            Err(s) if s.code() == code && s.message().contains(text) => Ok(()),
            other => Err(anyhow::anyhow!("wanted {code:?} naming {text:?}, got {other:?}")),
        };
    let existing = add_request(cluster.replica(2));
    let answer = confirmed(async || on_leader.add_replica(existing.clone()).await).await;
    expect(answer, Code::FailedPrecondition, "node 2 is already a voter")?;
    for (endpoint, raft) in [
        ("nohost", ""),
        ("127.0.0.1:0", ""),
        ("http://127.0.0.1:5", ""),
        ("127.0.0.1:5", "127.0.0.1:5"),
    ] {
        let req = pb::AddReplicaRequest {
            node_id: 9,
            endpoint: endpoint.into(),
            raft_endpoint: raft.into(),
            catch_up_timeout_ms: 0,
        };
        expect(on_leader.add_replica(req).await, Code::InvalidArgument, "")?;
    }
    let zero = pb::AddReplicaRequest {
        node_id: 0,
        endpoint: "127.0.0.1:5".into(),
        ..Default::default()
    };
    expect(on_leader.add_replica(zero).await, Code::InvalidArgument, "node_id 0")?;
    let taken = pb::AddReplicaRequest {
        node_id: 9,
        endpoint: cluster.replica(2).addr.to_string(),
        raft_endpoint: "127.0.0.1:6".into(),
        catch_up_timeout_ms: 0,
    };
    let answer = confirmed(async || on_leader.add_replica(taken.clone()).await).await;
    expect(answer, Code::FailedPrecondition, "already used by node 2")?;

    let status = confirmed(async || on_leader.remove_replica(pb::RemoveReplicaRequest { node_id: 42 }).await)
        .await
        .expect_err("removing a non-member succeeded");
    ensure!(
        status.code() == Code::FailedPrecondition && status.message().contains("node 42 is not a member"),
        "{status:?}"
    );

    // A follower redirects.
    let follower = if leader == 1 { 2 } else { 1 };
    let status = admin(&cluster, follower)
        .await?
        .remove_replica(pb::RemoveReplicaRequest { node_id: 3 })
        .await
        .expect_err("a follower removed a replica");
    ensure!(
        status.code() == Code::FailedPrecondition && status.message() == "not leader",
        "{status:?}"
    );

    // A learner that never catches up (nothing listens at its endpoints):
    // DEADLINE_EXCEEDED naming the lag, and meanwhile a second change is
    // refused as in progress. It stays a learner until removed.
    let unreachable = pb::AddReplicaRequest {
        node_id: 7,
        endpoint: "127.0.0.1:1".into(),
        raft_endpoint: "127.0.0.1:2".into(),
        catch_up_timeout_ms: 2_000,
    };
    let mut first = on_leader.clone();
    let stuck = tokio::spawn(async move { first.add_replica(unreachable).await });
    let busy = eventually(DEADLINE, "a second change to be refused as in progress", async || {
        let r = on_leader.remove_replica(pb::RemoveReplicaRequest { node_id: 42 }).await;
        Ok(match r {
            Err(s) if s.code() == Code::Unavailable && s.message().contains("in progress") => Check::Done(s),
            other => Check::Pending(format!("{other:?}")),
        })
    })
    .await?;
    eprintln!("a second change meanwhile: {}", busy.message());
    let status = stuck.await?.expect_err("an unreachable replica was added");
    ensure!(
        status.code() == Code::DeadlineExceeded && status.message().contains("node 7 did not catch up"),
        "{status:?}"
    );
    let view = on_leader
        .get_membership(pb::GetMembershipRequest {})
        .await?
        .into_inner()
        .membership
        .context("no membership")?;
    ensure!(
        members(&view).contains(&7) && !voters(&view).contains(&7),
        "node 7 should be a learner: {view:?}"
    );
    on_leader
        .remove_replica(pb::RemoveReplicaRequest { node_id: 7 })
        .await?;

    // A fresh node waiting to be added serves nothing yet.
    cluster.start_joiner(4, None).await?;
    let status = admin(&cluster, 4)
        .await?
        .list_topics(pb::ListTopicsRequest {})
        .await
        .expect_err("a node outside the membership served a request");
    ensure!(
        status.code() == Code::Unavailable && status.message().contains("not yet a member"),
        "{status:?}"
    );
    cluster.stop_replica(4).await?;
    cluster.shutdown().await?;

    // The last voter cannot be removed.
    let single = Cluster::start(1).await?;
    single.wait_for_leader(DEADLINE).await?;
    let status = admin(&single, 1)
        .await?
        .remove_replica(pb::RemoveReplicaRequest { node_id: 1 })
        .await
        .expect_err("the last voter was removed");
    ensure!(
        status.code() == Code::FailedPrecondition && status.message().contains("last voter"),
        "{status:?}"
    );
    single.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wiped_member_restarted_under_its_id_does_not_bring_the_leader_down() -> anyhow::Result<()> {
    // The wrong procedure (README: remove the id first). openraft's leader
    // panics when a follower's matched log goes backwards unless log
    // reversion is allowed; with it the leader keeps leading and feeds the
    // wiped replica again from the start.
    let mut cluster = Cluster::start(3).await?;
    let leader = cluster.wait_for_leader(DEADLINE).await?;
    create_topic_via(&cluster, leader).await?;
    let last = write_messages(&cluster, leader, 0..100).await?;
    cluster.wait_applied(last).await?;
    let term = cluster.replica(leader).metrics().current_term;
    let wiped = if leader == 1 { 2 } else { 1 };
    cluster.kill_and_wipe(wiped).await?;
    cluster.replica_mut(wiped).restart().await?;
    let last = write_messages(&cluster, leader, 100..200).await?;
    cluster.wait_applied(last).await?;
    cluster.ensure_still_leads(leader, term, "after the wiped replica returned")?;
    let m = cluster.replica(leader).metrics();
    ensure!(
        m.running_state.is_ok(),
        "the leader's Raft stopped: {:?}",
        m.running_state
    );
    assert_converged(&cluster, 200)?;
    cluster.shutdown().await
}
