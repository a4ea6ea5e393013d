//! Network faults in-process: partitions (symmetric and one-way), an isolated or
//! paused leader, a flapping link, lost and delayed Raft messages, a reply lost
//! after a commit, and forged Raft RPCs at the peer port. Each test asserts what a
//! user relies on: nothing acknowledged is lost, a minority never acknowledges, a
//! client gets a clear error and then succeeds after heal, and only the group's
//! members speak Raft.
//!
//! Faults come from one [`Faults`] switchboard shared by the replicas; it holds a
//! cut link's requests in silence (as a real partition does), so servers notice
//! faults only through their timeouts. A test that injects random losses prints
//! its seed; `RAFTMQ_FAULT_SEED=<seed>` replays the same losses.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use bytes::Bytes;
use openraft::ServerState;
use raftmq_broker::faults::Faults;
use raftmq_proto::raft::v1 as rpb;
use raftmq_proto::raft::v1::raft_service_client::RaftServiceClient;
use raftmq_proto::v1 as pb;
use raftmq_proto::v1::messaging_service_client::MessagingServiceClient;
use raftmq_raft_store::NodeId;
use tonic::Code;

use super::fixtures::{
    Check, Cluster, DEADLINE, GROUP, PEER_SECRET, QUEUES, Replica, Settings, TOPIC, append, body, create_topic_via,
    eventually, forged_transfer, signed, signed_as,
};

/// A three-replica cluster whose links go through a fresh switchboard.
async fn faulty_cluster(seed: u64) -> anyhow::Result<(Cluster, Faults)> {
    let faults = Faults::new(seed);
    let cluster = Cluster::start_with_settings(
        3,
        Settings {
            faults: Some(faults.clone()),
            ..Settings::default()
        },
    )
    .await?;
    Ok((cluster, faults))
}

/// The seed for random losses: `RAFTMQ_FAULT_SEED`, or one from the clock.
fn seed() -> u64 {
    std::env::var("RAFTMQ_FAULT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
        })
}

/// Waits until the nodes in `side` agree on a leader among them that holds a
/// quorum's acknowledgement; returns it.
async fn leader_among(cluster: &Cluster, side: &[NodeId], within: Duration) -> anyhow::Result<NodeId> {
    let deadline = Instant::now() + within;
    loop {
        let views: Vec<Option<NodeId>> = side
            .iter()
            .map(|id| cluster.replica(*id).metrics().current_leader)
            .collect();
        if let Some(Some(leader)) = views.first()
            && side.contains(leader)
            && views.iter().all(|v| *v == Some(*leader))
            && let m = cluster.replica(*leader).metrics()
            && m.state == ServerState::Leader
            && m.last_quorum_acked.is_some()
        {
            return Ok(*leader);
        }
        if Instant::now() > deadline {
            bail!("nodes {side:?} agreed on no leader among them within {within:?}; views: {views:?}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Writes messages `range` through `leader`'s Raft one batch at a time; returns
/// those acknowledged (a write may fail while leadership moves).
async fn write_acked(cluster: &Cluster, leader: NodeId, range: std::ops::Range<u64>) -> BTreeSet<u64> {
    let raft = cluster.replica(leader).node().raft().clone();
    let mut acked = BTreeSet::new();
    for i in range {
        let write = tokio::time::timeout(Duration::from_secs(2), raft.client_write(append(i))).await;
        if let Ok(Ok(_)) = write {
            acked.insert(i);
        }
    }
    acked
}

/// Writes batches through `leader` for two seconds (several election timeouts),
/// checking after each that it still leads in `term`; all must be acknowledged,
/// since the leader keeps a quorum. Returns what was.
async fn write_while_leading(
    cluster: &Cluster,
    leader: NodeId,
    term: u64,
    when: &str,
) -> anyhow::Result<BTreeSet<u64>> {
    let mut acked = BTreeSet::new();
    let started = Instant::now();
    let mut round = 0;
    while started.elapsed() < Duration::from_millis(2_000) && round < 200 {
        acked.extend(write_acked(cluster, leader, round * 10..round * 10 + 10).await);
        cluster.ensure_still_leads(leader, term, when)?;
        round += 1;
    }
    ensure!(
        acked.len() as u64 == round * 10,
        "{when}: a quorum (the leader and a follower) acknowledged only {} of {}",
        acked.len(),
        round * 10
    );
    Ok(acked)
}

/// Every running replica holds every acknowledged message, and all hold the same.
async fn assert_acked_everywhere(cluster: &Cluster, acked: &BTreeSet<u64>) -> anyhow::Result<()> {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let held: Vec<(NodeId, BTreeSet<Bytes>)> = cluster
            .running()
            .map(|r| {
                let mut bodies = BTreeSet::new();
                for q in 0..QUEUES {
                    for m in r.store().read_messages(TOPIC, q, 0, 100_000)? {
                        bodies.insert(m.message.body);
                    }
                }
                anyhow::Ok((r.id, bodies))
            })
            .collect::<anyhow::Result<_>>()?;
        let missing: Vec<(NodeId, usize)> = held
            .iter()
            .map(|(id, b)| (*id, acked.iter().filter(|i| !b.contains(&body(**i))).count()))
            .filter(|(_, n)| *n > 0)
            .collect();
        let same = held.windows(2).all(|w| w[0].1 == w[1].1);
        if missing.is_empty() && same {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("acknowledged messages missing per node {missing:?}; replicas identical: {same}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn messaging(
    cluster: &Cluster,
    node: NodeId,
) -> anyhow::Result<MessagingServiceClient<tonic::transport::Channel>> {
    Ok(MessagingServiceClient::connect(format!("http://{}", cluster.replica(node).addr)).await?)
}

fn send_one(i: u64) -> pb::SendRequest {
    pb::SendRequest {
        topic: TOPIC.into(),
        queue_id: Some((i % u64::from(QUEUES)) as u32),
        messages: vec![pb::Message {
            body: body(i).to_vec(),
            ..pb::Message::default()
        }],
        ..Default::default()
    }
}

fn others(id: NodeId) -> Vec<NodeId> {
    (1..=3).filter(|n| *n != id).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn isolated_leader_refuses_writes_while_the_majority_elects_and_steps_down_on_heal() -> anyhow::Result<()> {
    let (cluster, faults) = faulty_cluster(1).await?;
    let old = cluster.wait_for_leader(DEADLINE).await?;
    create_topic_via(&cluster, old).await?;
    let mut acked = write_acked(&cluster, old, 0..100).await;
    ensure!(
        acked.len() == 100,
        "healthy cluster acknowledged {} of 100",
        acked.len()
    );

    faults.isolate(old, &others(old));
    let majority = others(old);
    let new = leader_among(&cluster, &majority, DEADLINE).await?;

    // The minority side answers a send with UNAVAILABLE (it cannot reach a
    // quorum), promptly, and never acknowledges.
    let mut client = messaging(&cluster, old).await?;
    let asked = Instant::now();
    let err = tokio::time::timeout(DEADLINE, client.send(send_one(1_000)))
        .await
        .context("a send to the isolated leader hung")?
        .expect_err("the isolated leader acknowledged a send");
    ensure!(
        matches!(err.code(), Code::Unavailable | Code::FailedPrecondition),
        "isolated leader answered {err:?}"
    );
    eprintln!(
        "isolated leader answered {:?} after {:?}: {}",
        err.code(),
        asked.elapsed(),
        err.message()
    );

    // The majority goes on acknowledging.
    let more = write_acked(&cluster, new, 100..200).await;
    ensure!(more.len() == 100, "the majority acknowledged {} of 100", more.len());
    acked.extend(more);

    faults.heal();
    // The old leader hears the higher term and follows the new leader.
    let agreed = cluster.wait_for_leader(DEADLINE).await?;
    ensure!(agreed == new, "after heal node {agreed} leads, not {new}");
    ensure!(
        cluster.replica(old).metrics().state == ServerState::Follower,
        "the old leader did not step down"
    );
    let absent = body(1_000);
    assert_acked_everywhere(&cluster, &acked).await?;
    for r in cluster.running() {
        for q in 0..QUEUES {
            ensure!(
                r.store()
                    .read_messages(TOPIC, q, 0, 100_000)?
                    .iter()
                    .all(|m| m.message.body != absent),
                "node {}: a send the minority refused was stored",
                r.id
            );
        }
    }
    cluster.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paused_leader_is_replaced_and_follows_after_resume() -> anyhow::Result<()> {
    let (cluster, faults) = faulty_cluster(2).await?;
    let old = cluster.wait_for_leader(DEADLINE).await?;
    create_topic_via(&cluster, old).await?;
    let mut acked = write_acked(&cluster, old, 0..50).await;

    let paused_at = Instant::now();
    faults.pause(old);
    let new = leader_among(&cluster, &others(old), DEADLINE).await?;
    eprintln!("leader {old} paused; node {new} leads after {:?}", paused_at.elapsed());
    acked.extend(write_acked(&cluster, new, 50..100).await);

    faults.resume(old);
    ensure!(
        cluster.wait_for_leader(DEADLINE).await? == new,
        "the resumed node took leadership back"
    );
    ensure!(
        acked.len() == 100,
        "acknowledged {} of 100 around the pause",
        acked.len()
    );
    assert_acked_everywhere(&cluster, &acked).await?;
    cluster.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_way_partition_from_the_leader_does_not_depose_it() -> anyhow::Result<()> {
    let (cluster, faults) = faulty_cluster(3).await?;
    let leader = cluster.wait_for_leader(DEADLINE).await?;
    create_topic_via(&cluster, leader).await?;
    let term = cluster.replica(leader).metrics().current_term;
    let deaf = others(leader)[0];

    // The leader's requests no longer reach `deaf`; `deaf`'s still reach the
    // leader. `deaf` stops hearing heartbeats and pre-votes, but the leader and
    // the other follower still hold the lease: nobody grants, the term stays.
    faults.cut_one_way(leader, deaf);
    let acked = write_while_leading(&cluster, leader, term, "under a one-way partition").await?;

    faults.heal();
    ensure!(cluster.wait_for_leader(DEADLINE).await? == leader);
    ensure!(cluster.replica(leader).metrics().current_term == term, "the term moved");
    assert_acked_everywhere(&cluster, &acked).await?;
    cluster.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flapping_link_never_changes_the_leader() -> anyhow::Result<()> {
    let (cluster, faults) = faulty_cluster(4).await?;
    let leader = cluster.wait_for_leader(DEADLINE).await?;
    create_topic_via(&cluster, leader).await?;
    let term = cluster.replica(leader).metrics().current_term;
    let peer = others(leader)[1];

    // The link between the leader and one follower goes down and up, with
    // outages up to twice the election timeout (the follower pre-votes during
    // the long ones and is refused by the lease).
    let mut acked = BTreeSet::new();
    for (i, outage_ms) in [150u64, 300, 900, 100, 600, 250, 900, 150].into_iter().enumerate() {
        faults.partition(&[leader], &[peer]);
        let outage = Instant::now();
        let i = i as u64;
        acked.extend(write_acked(&cluster, leader, i * 100..i * 100 + 20).await);
        // The outage schedule is the fault being tested, not a wait for progress.
        tokio::time::sleep(Duration::from_millis(outage_ms).saturating_sub(outage.elapsed())).await;
        faults.mend(leader, peer);
        acked.extend(write_acked(&cluster, leader, i * 100 + 20..i * 100 + 40).await);
        cluster.ensure_still_leads(leader, term, &format!("flap {i}"))?;
    }
    ensure!(acked.len() == 8 * 40, "acknowledged {} of {}", acked.len(), 8 * 40);
    assert_acked_everywhere(&cluster, &acked).await?;
    ensure!(cluster.wait_for_leader(DEADLINE).await? == leader);
    cluster.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_and_delayed_raft_messages_lose_nothing_acknowledged() -> anyhow::Result<()> {
    let seed = seed();
    eprintln!("fault seed {seed}; replay: RAFTMQ_FAULT_SEED={seed} cargo test --test cluster lost_and_delayed");
    let (cluster, faults) = faulty_cluster(seed).await?;
    let leader = cluster.wait_for_leader(DEADLINE).await?;
    create_topic_via(&cluster, leader).await?;

    faults.drop_fraction(0.05);
    faults.delay(Duration::from_millis(2));
    let mut acked = BTreeSet::new();
    for i in 0..300 {
        // Leadership may move under losses: write through whoever leads now.
        let Some(now) = cluster
            .running()
            .find(|r| r.metrics().state == ServerState::Leader)
            .map(|r| r.id)
        else {
            continue;
        };
        acked.extend(write_acked(&cluster, now, i..i + 1).await);
    }
    faults.heal();
    cluster.wait_for_leader(DEADLINE).await?;
    ensure!(
        acked.len() >= 150,
        "seed {seed}: only {} of 300 acknowledged under 5 % loss",
        acked.len()
    );
    assert_acked_everywhere(&cluster, &acked)
        .await
        .with_context(|| format!("seed {seed}"))?;
    cluster.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_lost_after_the_commit_leaves_the_outcome_unknown_and_a_retry_stores_a_counted_duplicate()
-> anyhow::Result<()> {
    let (cluster, faults) = faulty_cluster(5).await?;
    let leader = cluster.wait_for_leader(DEADLINE).await?;
    create_topic_via(&cluster, leader).await?;
    let mut client = messaging(&cluster, leader).await?;

    faults.drop_client_replies(leader, 1);
    let mut first = tonic::Request::new(send_one(7));
    first.set_timeout(Duration::from_millis(500));
    let err = client.send(first).await.expect_err("the reply was dropped");
    // The client cannot tell whether the message was stored.
    ensure!(
        matches!(err.code(), Code::DeadlineExceeded | Code::Cancelled),
        "a lost reply surfaced as {err:?}"
    );
    // A retry is acknowledged; the message is now stored twice. Without an
    // idempotent producer (issue #9) that is the best a broker can do: nothing is
    // lost, and the copies are exactly the attempts that may have been stored.
    client.send(send_one(7)).await.context("the retry")?;
    let copies = |r: &Replica| -> anyhow::Result<usize> {
        Ok(r.store()
            .read_messages(TOPIC, 7 % QUEUES, 0, 1_000)?
            .iter()
            .filter(|m| m.message.body == body(7))
            .count())
    };
    let deadline = Instant::now() + DEADLINE;
    loop {
        let counts: Vec<usize> = cluster.running().map(copies).collect::<anyhow::Result<_>>()?;
        if counts.iter().all(|c| *c == 2) {
            break;
        }
        ensure!(counts.iter().all(|c| *c <= 2), "more copies than attempts: {counts:?}");
        if Instant::now() > deadline {
            bail!("copies per replica {counts:?}: expected the first attempt and the retry");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    cluster.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idempotent_retry_after_a_lost_reply_is_answered_from_the_first_attempt_even_after_a_failover()
-> anyhow::Result<()> {
    let (mut cluster, faults) = faulty_cluster(6).await?;
    let leader = cluster.wait_for_leader(DEADLINE).await?;
    create_topic_via(&cluster, leader).await?;
    let mut client = messaging(&cluster, leader).await?;
    let request = || pb::SendRequest {
        producer_id: "producer-1".into(),
        sequence: 42,
        ..send_one(7)
    };
    faults.drop_client_replies(leader, 1);
    let mut first = tonic::Request::new(request());
    first.set_timeout(Duration::from_millis(500));
    let err = client.send(first).await.expect_err("the reply was dropped");
    ensure!(
        matches!(err.code(), Code::DeadlineExceeded | Code::Cancelled),
        "a lost reply surfaced as {err:?}"
    );
    let retry = client.send(request()).await.context("the retry")?.into_inner();
    let again = client.send(request()).await.context("a second retry")?.into_inner();
    ensure!(
        retry == again,
        "two retries answered differently: {retry:?} vs {again:?}"
    );
    let copies = |r: &Replica| -> anyhow::Result<usize> {
        Ok(r.store()
            .read_messages(TOPIC, 7 % QUEUES, 0, 1_000)?
            .iter()
            .filter(|m| m.message.body == body(7))
            .count())
    };
    // Everything the three sends wrote is applied everywhere before counting.
    let applied = cluster.replica(leader).metrics().last_applied.map_or(0, |l| l.index);
    cluster.wait_applied(applied).await?;
    let counts: Vec<usize> = cluster.running().map(copies).collect::<anyhow::Result<_>>()?;
    ensure!(
        counts.iter().all(|c| *c == 1),
        "copies per replica {counts:?}: a retry was stored again"
    );
    let stored = cluster
        .replica(leader)
        .store()
        .read_messages(TOPIC, 7 % QUEUES, 0, 1_000)?;
    let original = stored.iter().find(|m| m.message.body == body(7)).context("stored")?;
    ensure!(
        retry.results[0].queue_offset == original.queue_offset,
        "{retry:?} vs {original:?}"
    );

    // The window is replicated state: the new leader answers the same way.
    cluster.replica_mut(leader).kill().await;
    let new = cluster.wait_for_leader_other_than(Some(leader), DEADLINE).await?;
    let mut client = messaging(&cluster, new).await?;
    let after = eventually(DEADLINE, "the new leader to answer the retry", async || {
        Ok(match client.send(request()).await {
            Ok(r) => Check::Done(r.into_inner()),
            Err(e) => Check::Pending(format!("{e:?}")),
        })
    })
    .await?;
    ensure!(after == retry, "after the failover: {after:?}, first answer {retry:?}");
    let counts: Vec<usize> = cluster.running().map(copies).collect::<anyhow::Result<_>>()?;
    ensure!(
        counts.iter().all(|c| *c == 1),
        "copies per replica after the failover {counts:?}"
    );
    cluster.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raft_port_refuses_forged_and_impersonating_rpcs_and_the_client_port_serves_no_raft() -> anyhow::Result<()> {
    let cluster = Cluster::start(3).await?;
    let leader = cluster.wait_for_leader(DEADLINE).await?;
    create_topic_via(&cluster, leader).await?;
    let before = cluster.replica(leader).metrics();
    let target = others(leader)[0];
    let mut raft = RaftServiceClient::connect(format!("http://{}", cluster.replica(target).raft_addr)).await?;

    // What an attacker wants: `target` to take over, as if the leader asked.
    let transfer = || forged_transfer(before.vote, target);
    let cases: Vec<(&str, tonic::Request<rpb::TransferLeaderRequest>, Code)> = vec![
        ("unsigned", tonic::Request::new(transfer()?), Code::Unauthenticated),
        (
            "wrong secret",
            signed(transfer()?, "transfer_leader", leader, b"not-the-cluster-secret"),
            Code::Unauthenticated,
        ),
        (
            "not a member",
            signed_as(9, "transfer_leader", transfer()?),
            Code::Unauthenticated,
        ),
        (
            "signed for another RPC",
            signed_as(leader, "vote", transfer()?),
            Code::Unauthenticated,
        ),
        (
            "a member speaking for the leader",
            signed_as(target, "transfer_leader", transfer()?),
            Code::PermissionDenied,
        ),
    ];
    for (what, req, code) in cases {
        let err = raft.transfer_leader(req).await.expect_err(what);
        ensure!(err.code() == code, "{what}: {err:?}");
    }

    // A forged append from a higher term would truncate the follower's log, and a
    // forged vote would raise its term: both refused before reaching Raft.
    let higher = openraft::Vote::new(before.current_term + 5, 9);
    let header = serde_json::json!({ "vote": higher, "prev_log_id": null, "leader_commit": null });
    let err = raft
        .append_entries(rpb::AppendEntriesRequest {
            broker_group: GROUP.into(),
            header: serde_json::to_vec(&header)?,
            entries: vec![],
        })
        .await
        .expect_err("forged append");
    ensure!(err.code() == Code::Unauthenticated, "{err:?}");
    let vote = openraft::raft::VoteRequest::<raftmq_raft_store::TypeConfig>::new(higher, None);
    let err = raft
        .vote(signed(
            rpb::VoteRequest {
                broker_group: GROUP.into(),
                body: serde_json::to_vec(&vote)?,
                leader_unreachable: true,
            },
            "vote",
            9,
            b"guessed-secret-guessed-secret",
        ))
        .await
        .expect_err("forged vote");
    ensure!(err.code() == Code::Unauthenticated, "{err:?}");
    let err = raft
        .install_snapshot(futures::stream::iter(vec![rpb::SnapshotChunk {
            broker_group: GROUP.into(),
            ..Default::default()
        }]))
        .await
        .expect_err("forged snapshot");
    ensure!(err.code() == Code::Unauthenticated, "{err:?}");
    // A stale signature (a replay from 10 minutes ago) is refused too.
    let mut stale = tonic::Request::new(transfer()?);
    let old_ms = raftmq_broker::peer_auth::unix_ms() - 600_000;
    let value = raftmq_broker::PeerSecret::new(PEER_SECRET.to_vec()).sign(GROUP, leader, "transfer_leader", old_ms);
    stale
        .metadata_mut()
        .insert(raftmq_broker::peer_auth::PEER_AUTH_KEY, value.parse()?);
    let err = raft.transfer_leader(stale).await.expect_err("stale signature");
    ensure!(
        err.code() == Code::Unauthenticated && err.message().contains("ms off"),
        "{err:?}"
    );

    // The client port does not serve Raft at all.
    let mut on_client_port = RaftServiceClient::connect(format!("http://{}", cluster.replica(target).addr)).await?;
    let err = on_client_port
        .transfer_leader(signed_as(leader, "transfer_leader", transfer()?))
        .await
        .expect_err("Raft on the client port");
    ensure!(err.code() == Code::Unimplemented, "{err:?}");

    // None of it moved leadership or the term, and the group still writes.
    ensure!(cluster.wait_for_leader(DEADLINE).await? == leader, "leadership moved");
    for r in cluster.running() {
        ensure!(
            r.metrics().current_term == before.current_term,
            "node {} term moved",
            r.id
        );
    }
    let acked = write_acked(&cluster, leader, 0..10).await;
    ensure!(acked.len() == 10);
    // A genuine transfer by the leader itself still works (it signs as itself).
    cluster
        .replica(leader)
        .node()
        .raft()
        .trigger()
        .transfer_leader(target)
        .await?;
    ensure!(
        cluster.wait_for_leader_other_than(Some(leader), DEADLINE).await? == target,
        "the leader's own transfer did not move leadership"
    );
    cluster.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_stuck_with_the_minority_gets_unavailable_then_succeeds_after_heal() -> anyhow::Result<()> {
    use raftmq_client::{Client, ClientConfig, MessageExt};

    let (cluster, faults) = faulty_cluster(6).await?;
    let old = cluster.wait_for_leader(DEADLINE).await?;
    create_topic_via(&cluster, old).await?;
    faults.isolate(old, &others(old));
    let new = leader_among(&cluster, &others(old), DEADLINE).await?;

    // The client reaches only the old leader (no NameServer answers, and its
    // route names no other replica): it is on the minority side.
    let mut config = ClientConfig::new(vec!["127.0.0.1:1".into()]);
    config.send_deadline = Duration::from_secs(2);
    config.request_timeout = Duration::from_secs(1);
    let client = Client::new(config)?;
    let stale_route = || pb::QueryRouteResponse {
        topic: TOPIC.into(),
        groups: vec![pb::GroupRoute {
            broker_group: GROUP.into(),
            leader_endpoint: cluster.replica(old).addr.to_string(),
            follower_endpoints: vec![],
            queues: QUEUES,
            perm: pb::Permission::ReadWrite as i32,
            message_type: 0,
        }],
    };
    client.seed_route(stale_route());
    let producer = client.producer();
    let started = Instant::now();
    let err = tokio::time::timeout(
        DEADLINE,
        producer.send(TOPIC, pb::Message::new(b"from the minority".to_vec())),
    )
    .await
    .context("a send on the minority side hung past its deadline")?
    .expect_err("the minority acknowledged a send");
    let text = err.to_string();
    eprintln!("minority send failed after {:?}: {text}", started.elapsed());
    ensure!(
        text.contains("Unavailable") && text.contains("quorum"),
        "the error does not say the node cannot reach a quorum: {text}"
    );

    // After heal the old leader follows the new one and redirects there. The
    // client still knows only the old leader (its failed NameServer lookups
    // dropped the route; it is given the same stale one again).
    faults.heal();
    ensure!(cluster.wait_for_leader(DEADLINE).await? == new);
    let deadline = Instant::now() + DEADLINE;
    let receipt = loop {
        client.seed_route(stale_route());
        match producer.send(TOPIC, pb::Message::new(b"after heal".to_vec())).await {
            Ok(r) => break r,
            Err(e) if Instant::now() < deadline => eprintln!("not yet: {e}"),
            Err(e) => bail!("no send succeeded within {DEADLINE:?} of the heal: {e}"),
        }
    };
    let stored = cluster
        .replica(new)
        .store()
        .read_messages(TOPIC, receipt.queue_id, receipt.queue_offset, 1)?;
    ensure!(
        stored.first().is_some_and(|m| m.message.body.as_ref() == b"after heal"),
        "the acknowledged send is not where the receipt says"
    );
    cluster.shutdown().await
}

/// The fast path's pre-vote: a follower whose streams from a healthy leader
/// break and that cannot reach the leader itself finds the leader gone, but the
/// other follower still reaches it and says so; without a quorum agreeing, the
/// cut-off follower never campaigns, so its term stays put and the leader is
/// not deposed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_cut_off_by_resets_never_raises_the_term_of_a_healthy_leader() -> anyhow::Result<()> {
    let (cluster, faults) = faulty_cluster(7).await?;
    let leader = cluster.wait_for_leader(DEADLINE).await?;
    create_topic_via(&cluster, leader).await?;
    let term = cluster.replica(leader).metrics().current_term;
    let cut = others(leader)[0];

    // Its streams from the leader break, and it cannot reach the leader itself
    // (its probes fail); the leader still reaches it, and the other follower
    // reaches the leader.
    faults.cut_one_way(cut, leader);
    faults.reset_streams(leader, cut);
    let acked = write_while_leading(&cluster, leader, term, "while a follower's streams were reset").await?;
    ensure!(
        cluster.replica(cut).metrics().current_term == term,
        "the cut-off follower raised its term to {}",
        cluster.replica(cut).metrics().current_term
    );

    faults.heal();
    ensure!(
        cluster.wait_for_leader(DEADLINE).await? == leader,
        "the leader was deposed on heal"
    );
    cluster.ensure_still_leads(leader, term, "after heal")?;
    assert_acked_everywhere(&cluster, &acked).await?;
    cluster.shutdown().await
}
