//! The Raft RPC service as a peer sees it over gRPC: requests for another group
//! or with bad input are refused with a status that names the problem, and the
//! node keeps serving afterwards.

use anyhow::ensure;
use openraft::ServerState;
use openraft::async_runtime::WatchReceiver;

use super::fixtures::{Cluster, DEADLINE, GROUP, create_topic_via, signed_as};

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

/// A replica with an empty log (new, or restarted on a wiped disk under its old
/// id) has forgotten any vote it gave: it refuses to vote for a candidate whose
/// log is past the group's first entry, and votes again once replication has
/// refilled it. A candidate at index 0 (a group being formed) still gets its vote.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_log_refuses_votes_until_refilled() -> anyhow::Result<()> {
    use raftmq_proto::raft::v1 as pb;
    use raftmq_proto::raft::v1::raft_service_client::RaftServiceClient;

    let mut cluster = Cluster::start(3).await?;
    let leader = cluster.wait_for_leader(DEADLINE).await?;
    create_topic_via(&cluster, leader).await?;
    // The replica with an empty log: a fourth node, not yet a member.
    cluster.start_joiner(4, None).await?;
    let mut client = RaftServiceClient::connect(format!("http://{}", cluster.replica(4).raft_addr)).await?;
    let metrics = cluster.replica(leader).metrics();
    let last_index = metrics.last_log_index.expect("the leader has a log");
    ensure!(last_index > 0, "the group is past its first entry");
    let last = raftmq_raft_store::log_id(metrics.current_term, last_index);
    let higher = openraft::Vote::new(metrics.current_term + 1, leader);
    let vote = |last_log_id| -> anyhow::Result<pb::VoteRequest> {
        let v = openraft::raft::VoteRequest::<raftmq_raft_store::TypeConfig>::new(higher, last_log_id);
        Ok(pb::VoteRequest {
            broker_group: GROUP.into(),
            body: serde_json::to_vec(&v)?,
            leader_unreachable: false,
        })
    };
    let err = client
        .vote(signed_as(leader, "vote", vote(Some(last))?))
        .await
        .expect_err("an empty log must not vote for a candidate past index 0");
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err}");
    assert!(err.message().contains("empty log"), "{err}");
    ensure!(
        cluster.replica(4).metrics().vote.leader_id.term < higher.leader_id.term,
        "the refused vote must not raise the empty replica's term"
    );
    // Forming a group: the candidate's log is the initial membership at index 0.
    let first = raftmq_raft_store::log_id(0, 0);
    let granted = client.vote(signed_as(leader, "vote", vote(Some(first))?)).await?;
    let granted: openraft::raft::VoteResponse<raftmq_raft_store::TypeConfig> =
        serde_json::from_slice(&granted.into_inner().body)?;
    ensure!(granted.vote_granted, "a forming group's first candidate gets the vote");
    cluster.shutdown().await
}
