//! Leadership and replication through failures: a killed leader is replaced and
//! catches up, returning followers neither depose the leader nor apply past the
//! commit index, a lagging follower is restored by a snapshot, NameServer routes
//! follow the leader, and a planned transfer moves leadership at once.

use std::time::{Duration, Instant};

use anyhow::{Context, ensure};

use super::fixtures::{
    Check, Cluster, DEADLINE, GROUP, NameServer, QUEUES, Settings, assert_converged, create_topic_via, eventually,
    queue_data, wait_for_route, write_messages,
};

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
        cluster.ensure_still_leads(leader, term, &format!("round {round}, node {follower} returned"))?;
    }
    cluster.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nameserver_routes_follow_the_leader_through_a_failover() -> anyhow::Result<()> {
    let ns = NameServer::start().await?;
    let mut cluster = Cluster::start_with_settings(
        3,
        Settings {
            nameservers: vec![ns.addr.clone()],
            ..Settings::default()
        },
    )
    .await?;
    let leader = cluster.wait_for_leader(DEADLINE).await?;
    create_topic_via(&cluster, leader).await?;
    let leader_addr = cluster.replica(leader).node().broker_node().addr;
    let mut client =
        raftmq_proto::v1::name_server_service_client::NameServerServiceClient::connect(format!("http://{}", ns.addr))
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
    ns.stop().await
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
    let mut observations = 0u32;
    eventually(DEADLINE, &format!("the follower to apply {last}"), async || {
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
        Ok(if applied >= last {
            Check::Done(())
        } else {
            Check::Pending(format!("follower applied {applied}"))
        })
    })
    .await?;
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
