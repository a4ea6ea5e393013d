//! Retention (issue #18): the leader decides a horizon from whole segments by
//! size, age or disk pressure, every replica trims what it covers and frees its
//! disk (snapshot, purge, segment deletion); consumers below the new minimum
//! resume at it; a new leader keeps the horizon and a lagging replica is brought
//! up by a snapshot holding exactly the retained messages; past the full disk
//! watermark sends are refused until usage is back below.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, ensure};
use raftmq_broker::retention::{DiskUsageSource, RetentionConfig};
use raftmq_proto::v1 as pb;
use raftmq_proto::v1::admin_service_client::AdminServiceClient;
use raftmq_proto::v1::messaging_service_client::MessagingServiceClient;
use raftmq_raft_store::{Command, QueueOffset, StoreReader};
use tonic::Code;
use tonic::transport::Channel;

use super::fixtures::{Check, Cluster, DEADLINE, ONE_AT_A_TIME, QUEUES, Replica, Settings, TOPIC, eventually};

/// The smallest segment the store accepts, so a few hundred KiB of messages
/// make several segments.
const SEGMENT: u64 = 64 * 1024;
/// Bytes of each test message's body.
const BODY: usize = 1000;
/// Long enough for a snapshot round and a purge on a loaded test machine.
const RETENTION_DEADLINE: Duration = Duration::from_secs(30);

async fn messaging(r: &Replica) -> anyhow::Result<MessagingServiceClient<Channel>> {
    Ok(MessagingServiceClient::connect(format!("http://{}", r.addr)).await?)
}

async fn admin(r: &Replica) -> anyhow::Result<AdminServiceClient<Channel>> {
    Ok(AdminServiceClient::connect(format!("http://{}", r.addr)).await?)
}

/// A disk whose usage the test sets, in thousandths of 1 GB.
fn fake_disk(permille: &Arc<AtomicU64>) -> DiskUsageSource {
    let p = permille.clone();
    DiskUsageSource::new(move |_| Ok((p.load(Ordering::Relaxed) * 1_000_000, 1_000_000_000)))
}

fn settings(retention: RetentionConfig) -> Settings {
    Settings {
        retention: Some(retention),
        segment_bytes: Some(SEGMENT),
        ..Settings::default()
    }
}

/// Fast checks and a half-empty (fake) disk, whatever the test machine's is.
fn quick(disk: &Arc<AtomicU64>) -> RetentionConfig {
    RetentionConfig {
        check_interval: Duration::from_millis(100),
        disk_usage: fake_disk(disk),
        ..RetentionConfig::default()
    }
}

async fn start(settings: Settings) -> anyhow::Result<(Cluster, u64)> {
    let cluster = Cluster::start_with_settings(3, settings).await?;
    let leader = cluster.wait_for_leader(DEADLINE).await?;
    admin(cluster.replica(leader))
        .await?
        .create_topic(pb::CreateTopicRequest {
            topic: Some(pb::TopicConfig {
                name: TOPIC.into(),
                queues_per_group: QUEUES,
                perm: pb::Permission::ReadWrite as i32,
                message_type: 0,
                trace: None,
            }),
            if_absent: false,
        })
        .await
        .context("create topic")?;
    Ok((cluster, leader))
}

/// What was stored: per queue, offset -> sequence number.
type Sent = BTreeMap<u32, BTreeMap<u64, u64>>;

fn body_of(seq: u64) -> Vec<u8> {
    let mut b = format!("seq-{seq:06}-").into_bytes();
    b.resize(BODY, b'x');
    b
}

/// Sends messages `seqs` in batches of ten (one Raft entry each, queues
/// round-robin) through `leader`, recording where each landed.
async fn send(
    cluster: &Cluster,
    leader: u64,
    seqs: std::ops::Range<u64>,
    sent: &mut Sent,
) -> Result<(), tonic::Status> {
    let mut client = messaging(cluster.replica(leader))
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let seqs: Vec<u64> = seqs.collect();
    for chunk in seqs.chunks(10) {
        let messages = chunk
            .iter()
            .map(|&s| pb::Message {
                body: body_of(s),
                keys: vec![format!("key-{s}")],
                ..Default::default()
            })
            .collect();
        let req = pb::SendRequest {
            topic: TOPIC.into(),
            messages,
            // Idempotent, so a retry after an unknown outcome stores nothing twice.
            producer_id: "retention-test".into(),
            sequence: chunk[0],
            ..Default::default()
        };
        // A loaded test machine can starve heartbeats for a moment: retry what
        // a client would retry.
        let give_up = std::time::Instant::now() + DEADLINE;
        let r = loop {
            match client.send(req.clone()).await {
                Ok(r) => break r.into_inner(),
                Err(s) if s.code() == Code::Unavailable && std::time::Instant::now() < give_up => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(s) => return Err(s),
            }
        };
        for (res, &s) in r.results.iter().zip(chunk) {
            sent.entry(res.queue_id).or_default().insert(res.queue_offset, s);
        }
    }
    Ok(())
}

/// Per queue, offset -> sequence number of what `store` serves from offset 0.
fn held(store: &StoreReader) -> anyhow::Result<Sent> {
    let mut out = Sent::new();
    for q in 0..QUEUES {
        let rows = out.entry(q).or_default();
        for m in store.read_messages(TOPIC, q, 0, 1_000_000)? {
            let text = String::from_utf8_lossy(&m.message.body[..11]).into_owned();
            let seq = text
                .strip_prefix("seq-")
                .and_then(|t| t.trim_end_matches('-').parse().ok())
                .with_context(|| format!("body {text:?} at {q}@{}", m.queue_offset))?;
            rows.insert(m.queue_offset, seq);
        }
    }
    Ok(out)
}

/// `store` holds exactly the sent messages at or above each queue's minimum,
/// and its minimum agrees with what it serves.
fn holds_exactly_the_retained(store: &StoreReader, sent: &Sent, who: &str) -> anyhow::Result<BTreeMap<u32, u64>> {
    let mins_now = || {
        (0..QUEUES)
            .map(|q| store.queue_min_offset(TOPIC, q))
            .collect::<std::io::Result<Vec<_>>>()
    };
    // The leader may move the horizon again meanwhile (replicas' segment
    // boundaries differ): compare a read taken between two equal minimums.
    let (got, at) = loop {
        let before = mins_now()?;
        let got = held(store)?;
        if mins_now()? == before {
            break (got, before);
        }
    };
    let mut mins = BTreeMap::new();
    for q in 0..QUEUES {
        let min = at[q as usize];
        let want: BTreeMap<u64, u64> = sent
            .get(&q)
            .map(|m| m.range(min..).map(|(o, s)| (*o, *s)).collect())
            .unwrap_or_default();
        let have = got.get(&q).cloned().unwrap_or_default();
        ensure!(
            have == want,
            "{who} queue {q} (min {min}): holds {} messages {:?}..{:?}, want {} {:?}..{:?}",
            have.len(),
            have.first_key_value(),
            have.last_key_value(),
            want.len(),
            want.first_key_value(),
            want.last_key_value()
        );
        mins.insert(q, min);
    }
    Ok(mins)
}

/// Bytes of the segments `store` keeps above its horizon.
fn kept_bytes(store: &StoreReader) -> u64 {
    let h = store.retention_horizon();
    store
        .segments()
        .iter()
        .filter(|g| g.info.next_index > g.info.first_index && g.info.next_index - 1 > h)
        .map(|g| g.info.bytes)
        .sum()
}

/// Waits until the leader trimmed down to `max_bytes`, when it stops moving
/// the horizon (a horizon proposed while sends went on is followed by
/// another); returns that horizon.
async fn under_cap(cluster: &Cluster, leader: u64, max_bytes: u64) -> anyhow::Result<u64> {
    eventually(RETENTION_DEADLINE, "the leader to trim down to max_bytes", async || {
        let s = cluster.replica(leader).store();
        let (h, kept) = (s.retention_horizon(), kept_bytes(s));
        Ok(if h > 0 && kept <= max_bytes {
            Check::Done(h)
        } else {
            Check::Pending(format!("horizon {h}, {kept} bytes kept"))
        })
    })
    .await
}

/// Waits until every running replica applied everything in `leader`'s log: a
/// send is answered once the leader applied it, followers may trail. (Not the
/// leader's applied metric: the answer is sent from inside apply, before that
/// metric moves, so it could name an index short of the last send.)
async fn settle(cluster: &Cluster, leader: u64) -> anyhow::Result<()> {
    let last = cluster.replica(leader).metrics().last_log_index.unwrap_or(0);
    cluster.wait_applied(last).await
}

/// Waits until every running replica applied a horizon of at least `above + 1`
/// and deleted every segment wholly at or below it.
async fn wait_trimmed_everywhere(cluster: &Cluster, above: u64) -> anyhow::Result<u64> {
    eventually(RETENTION_DEADLINE, "retention on every replica", async || {
        let mut seen = Vec::new();
        let mut horizons = Vec::new();
        for r in cluster.running() {
            let s = r.store();
            let h = s.retention_horizon();
            let stale = s
                .segments()
                .iter()
                .filter(|g| g.info.next_index > g.info.first_index && g.info.next_index - 1 <= h)
                .count();
            seen.push(format!("node {}: horizon {h}, {stale} segment(s) left below it", r.id));
            if h <= above || stale > 0 {
                return Ok(Check::Pending(seen.join("; ")));
            }
            horizons.push(h);
        }
        Ok(Check::Done(horizons.into_iter().min().unwrap_or(0)))
    })
    .await
}

/// Waits until a send through `leader` is refused with RESOURCE_EXHAUSTED;
/// returns the refusal's message.
async fn refused(cluster: &Cluster, leader: u64) -> anyhow::Result<String> {
    eventually(DEADLINE, "sends to be refused", async || {
        let mut scratch = Sent::new();
        Ok(match send(cluster, leader, 10_000..10_001, &mut scratch).await {
            Err(s) if s.code() == Code::ResourceExhausted => Check::Done(s.message().to_owned()),
            Err(s) => Check::Pending(format!("{s:?}")),
            Ok(()) => Check::Pending("accepted".into()),
        })
    })
    .await
}

/// Waits until a send through `leader` is accepted again.
async fn accepted_again(cluster: &Cluster, leader: u64) -> anyhow::Result<()> {
    let mut more = Sent::new();
    eventually(DEADLINE, "sends to be accepted again", async || {
        Ok(match send(cluster, leader, 20_000..20_001, &mut more).await {
            Ok(()) => Check::Done(()),
            Err(s) => Check::Pending(format!("{s:?}")),
        })
    })
    .await
}

async fn commit_offset(cluster: &Cluster, leader: u64, group: &str, queue_id: u32, offset: u64) -> anyhow::Result<()> {
    cluster
        .replica(leader)
        .node()
        .raft()
        .client_write(Command::CommitOffsets {
            group: group.into(),
            offsets: vec![QueueOffset {
                topic: TOPIC.into(),
                queue_id,
                offset,
            }],
        })
        .await
        .map_err(|e| anyhow::anyhow!("committing an offset: {e:?}"))?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn size_retention_trims_every_replica_and_consumers_resume_at_the_minimum() -> anyhow::Result<()> {
    let _turn = ONE_AT_A_TIME.lock().await;
    let disk = Arc::new(AtomicU64::new(500));
    let max_bytes = 4 * SEGMENT;
    let (cluster, leader) = start(settings(RetentionConfig {
        max_bytes: Some(max_bytes),
        ..quick(&disk)
    }))
    .await?;
    commit_offset(&cluster, leader, "slow", 0, 0).await?;
    let mut sent = Sent::new();
    // About 1.2 MB: some 18 segments, far over the 256 KiB cap.
    send(&cluster, leader, 0..1200, &mut sent).await?;
    let horizon = under_cap(&cluster, leader, max_bytes).await?;
    wait_trimmed_everywhere(&cluster, horizon - 1).await?;
    settle(&cluster, leader).await?;

    for r in cluster.running() {
        let s = r.store();
        // What is left is within the cap, give or take the segment being
        // written and the one straddling the cap.
        let kept = kept_bytes(s);
        ensure!(
            kept <= max_bytes + 2 * SEGMENT,
            "node {} keeps {kept} bytes, cap {max_bytes}",
            r.id
        );
        let mins = holds_exactly_the_retained(s, &sent, &format!("node {}", r.id))?;
        ensure!(mins.values().all(|m| *m > 0), "node {}: minimums {mins:?}", r.id);
    }

    // A pull below the minimum is served from the minimum.
    let min0 = cluster.replica(leader).store().queue_min_offset(TOPIC, 0)?;
    let pulled = messaging(cluster.replica(leader))
        .await?
        .pull(pb::PullRequest {
            topic: TOPIC.into(),
            queue_id: 0,
            offset: 0,
            max_messages: 8,
            ..Default::default()
        })
        .await?
        .into_inner();
    ensure!(
        pulled.min_offset == min0,
        "pull says min {}, store {min0}",
        pulled.min_offset
    );
    let first = pulled.messages.first().context("a pull from 0 returned nothing")?;
    ensure!(
        first.queue_offset == min0,
        "a pull from 0 starts at {} instead of the minimum {min0}",
        first.queue_offset
    );
    let want = body_of(sent[&0][&min0]);
    ensure!(
        first.message.as_ref().map(|m| &m.body) == Some(&want),
        "the message at the minimum is not the one sent there"
    );

    // The consumer group that had consumed nothing skipped what retention removed.
    let d = admin(cluster.replica(leader))
        .await?
        .describe_consumer_group(pb::DescribeConsumerGroupRequest {
            consumer_group: "slow".into(),
        })
        .await?
        .into_inner();
    let q0 = d
        .queues
        .iter()
        .find(|q| q.topic == TOPIC && q.queue_id == 0)
        .context("queue 0 in describe")?;
    ensure!(
        q0.min_offset == min0 && q0.skipped == min0 && q0.lag == q0.max_offset - min0,
        "describe says {q0:?}, min {min0}"
    );

    // Status shows the storage of the answering node.
    let status = admin(cluster.replica(leader))
        .await?
        .cluster_status(pb::ClusterStatusRequest {})
        .await?
        .into_inner();
    let g = status.groups.first().context("no group in the status")?;
    ensure!(
        g.retention_horizon >= horizon && g.log_segments > 0 && g.log_bytes > 0 && g.oldest_message_ms.is_some(),
        "status {g:?}"
    );
    ensure!(
        g.disk_used_ratio == Some(0.5) && !g.disk_full,
        "disk in status: {:?} {}",
        g.disk_used_ratio,
        g.disk_full
    );
    cluster.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn time_retention_drops_segments_older_than_the_reserved_time() -> anyhow::Result<()> {
    let _turn = ONE_AT_A_TIME.lock().await;
    let disk = Arc::new(AtomicU64::new(500));
    let (cluster, leader) = start(settings(RetentionConfig {
        file_reserved_time: Duration::from_secs(1),
        ..quick(&disk)
    }))
    .await?;
    let mut sent = Sent::new();
    send(&cluster, leader, 0..400, &mut sent).await?;
    let horizon = wait_trimmed_everywhere(&cluster, 0).await?;
    // Once their newest message is a second old, every sealed segment goes:
    // the leader keeps only the one being written.
    eventually(
        RETENTION_DEADLINE,
        "the leader to keep only its active segment",
        async || {
            let segs = cluster.replica(leader).store().segments();
            let live: Vec<_> = segs.iter().filter(|s| s.info.next_index > s.info.first_index).collect();
            Ok(if live.len() == 1 && live[0].active {
                Check::Done(())
            } else {
                Check::Pending(format!("{live:?}"))
            })
        },
    )
    .await?;
    settle(&cluster, leader).await?;
    for r in cluster.running() {
        holds_exactly_the_retained(r.store(), &sent, &format!("node {}", r.id))?;
        ensure!(r.store().retention_horizon() >= horizon);
    }
    // The newest messages are in the active segment and still there.
    let last = sent
        .values()
        .flat_map(|m| m.values())
        .max()
        .copied()
        .unwrap_or_default();
    ensure!(
        held(cluster.replica(leader).store())?
            .values()
            .any(|m| m.values().any(|s| *s == last)),
        "the last message sent is gone"
    );
    cluster.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_leader_keeps_the_horizon_and_a_lagging_replica_gets_exactly_the_retained_messages_by_snapshot()
-> anyhow::Result<()> {
    let _turn = ONE_AT_A_TIME.lock().await;
    let disk = Arc::new(AtomicU64::new(500));
    let max_bytes = 4 * SEGMENT;
    let (mut cluster, leader) = start(settings(RetentionConfig {
        max_bytes: Some(max_bytes),
        ..quick(&disk)
    }))
    .await?;
    // A follower misses everything: it will need a snapshot.
    let lagging = (1..=3).find(|&id| id != leader).context("a follower")?;
    let other = (1..=3)
        .find(|&id| id != leader && id != lagging)
        .context("another follower")?;
    cluster.replica_mut(lagging).kill().await;
    let mut sent = Sent::new();
    send(&cluster, leader, 0..1200, &mut sent).await?;
    let horizon = under_cap(&cluster, leader, max_bytes).await?;
    wait_trimmed_everywhere(&cluster, horizon - 1).await?;
    let before = holds_exactly_the_retained(cluster.replica(leader).store(), &sent, "old leader")?;

    // Kill the leader; the lagging follower comes back. Only `other` holds the
    // log, so it leads, and its log no longer reaches back to where the
    // lagging follower stopped: a snapshot it must be.
    cluster.replica_mut(leader).kill().await;
    cluster.replica_mut(lagging).restart().await?;
    let new_leader = cluster.wait_for_leader_other_than(Some(leader), DEADLINE).await?;
    ensure!(
        new_leader == other,
        "node {new_leader} leads; node {other} holds the log"
    );
    let new_store = cluster.replica(other).store().clone();
    ensure!(
        new_store.retention_horizon() >= horizon,
        "the new leader's horizon {} is below {horizon}",
        new_store.retention_horizon()
    );
    let after = holds_exactly_the_retained(&new_store, &sent, "new leader")?;
    for (q, m) in &before {
        ensure!(
            after[q] >= *m,
            "queue {q}: the new leader's minimum {} went back below {m}",
            after[q]
        );
    }

    eventually(
        RETENTION_DEADLINE,
        "the lagging replica to catch up by snapshot",
        async || {
            let s = cluster.replica(lagging).store();
            let (mine, theirs) = (held(s)?, held(&new_store)?);
            Ok(
                if mine == theirs && s.retention_horizon() == new_store.retention_horizon() {
                    Check::Done(())
                } else {
                    Check::Pending(format!(
                        "horizon {} vs {}, {} vs {} messages",
                        s.retention_horizon(),
                        new_store.retention_horizon(),
                        mine.values().map(|m| m.len()).sum::<usize>(),
                        theirs.values().map(|m| m.len()).sum::<usize>()
                    ))
                },
            )
        },
    )
    .await?;
    let caught_up = cluster.replica(lagging).store();
    holds_exactly_the_retained(caught_up, &sent, "the replica brought up by snapshot")?;
    // The snapshot carried nothing at or below the horizon it was built
    // under, and no whole segment at or below its own horizon is left.
    let segs = caught_up.segments();
    let archive_first = segs
        .iter()
        .filter(|s| s.archive && s.info.next_index > s.info.first_index)
        .map(|s| s.info.first_index)
        .min()
        .context("the caught-up replica holds no archive: it was not brought up by a snapshot")?;
    ensure!(
        archive_first > horizon,
        "the snapshot brought records from {archive_first}, at or below the horizon {horizon}"
    );
    // Freeing the disk follows the install asynchronously.
    eventually(
        RETENTION_DEADLINE,
        "the caught-up replica to free its disk",
        async || {
            let s = cluster.replica(lagging).store();
            let own = s.retention_horizon();
            let segs = s.segments();
            Ok(
                if segs
                    .iter()
                    .all(|s| s.info.next_index == s.info.first_index || s.info.next_index - 1 > own)
                {
                    Check::Done(())
                } else {
                    Check::Pending(format!("horizon {own}, segments {segs:?}"))
                },
            )
        },
    )
    .await?;

    // The group goes on: more messages, the old leader back, everyone agrees.
    send(&cluster, other, 1200..1300, &mut sent).await?;
    cluster.replica_mut(leader).restart().await?;
    eventually(
        RETENTION_DEADLINE,
        "every replica to hold the same retained messages",
        async || {
            let views: Vec<Sent> = cluster
                .running()
                .map(|r| held(r.store()))
                .collect::<anyhow::Result<_>>()?;
            Ok(if views.windows(2).all(|w| w[0] == w[1]) {
                Check::Done(())
            } else {
                Check::Pending(format!(
                    "{:?} messages",
                    views
                        .iter()
                        .map(|v| v.values().map(|m| m.len()).sum::<usize>())
                        .collect::<Vec<_>>()
                ))
            })
        },
    )
    .await?;
    for r in cluster.running() {
        holds_exactly_the_retained(r.store(), &sent, &format!("node {}", r.id))?;
    }
    cluster.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_watermarks_clean_early_and_refuse_sends_while_the_disk_is_full() -> anyhow::Result<()> {
    let _turn = ONE_AT_A_TIME.lock().await;
    let disk = Arc::new(AtomicU64::new(500));
    let (cluster, leader) = start(settings(quick(&disk))).await?;
    let mut sent = Sent::new();
    send(&cluster, leader, 0..300, &mut sent).await?;
    // Young messages, no size cap, half-empty disk: nothing is trimmed.
    ensure!(
        cluster.running().all(|r| r.store().retention_horizon() == 0),
        "retention trimmed with nothing asking for it"
    );

    // Past the clean watermark the leader deletes young segments early; sends
    // are still accepted.
    disk.store(800, Ordering::Relaxed);
    wait_trimmed_everywhere(&cluster, 0).await?;
    send(&cluster, leader, 300..310, &mut sent).await?;

    // Past the full watermark sends are refused with the numbers and the path.
    disk.store(950, Ordering::Relaxed);
    let refusal = refused(&cluster, leader).await?;
    ensure!(
        refusal.starts_with("disk full:")
            && refusal.contains("95.0%")
            && refusal.contains("90.0%")
            && refusal.contains(&format!("node-{leader}")),
        "refusal: {refusal}"
    );
    let status = admin(cluster.replica(leader))
        .await?
        .cluster_status(pb::ClusterStatusRequest {})
        .await?
        .into_inner();
    let g = status.groups.first().context("no group in the status")?;
    ensure!(
        g.disk_full && g.disk_used_ratio.is_some_and(|r| (r - 0.95).abs() < 1e-9),
        "status {g:?}"
    );
    // Offsets still commit: only writes that add data are refused.
    commit_offset(&cluster, leader, "g", 0, 1).await?;

    // Back below: sends succeed again.
    disk.store(500, Ordering::Relaxed);
    accepted_again(&cluster, leader).await?;
    let g = admin(cluster.replica(leader))
        .await?
        .cluster_status(pb::ClusterStatusRequest {})
        .await?
        .into_inner()
        .groups
        .into_iter()
        .next()
        .context("no group in the status")?;
    ensure!(!g.disk_full, "status still says full: {g:?}");
    cluster.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_finishes_a_cleanup_that_could_not_complete() -> anyhow::Result<()> {
    let _turn = ONE_AT_A_TIME.lock().await;
    let disk = Arc::new(AtomicU64::new(500));
    let max_bytes = 4 * SEGMENT;
    let (mut cluster, leader) = start(settings(RetentionConfig {
        max_bytes: Some(max_bytes),
        ..quick(&disk)
    }))
    .await?;
    let stuck = (1..=3).find(|&id| id != leader).context("a follower")?;
    let data = cluster
        .replica(stuck)
        .node()
        .log()
        .dir()
        .parent()
        .context("the log's data directory")?
        .to_path_buf();
    // A file where its snapshots go: this replica can apply the horizon but
    // cannot snapshot, so it may neither purge nor delete anything.
    let blocker = data.join("sm").join("snapshots");
    std::fs::write(&blocker, b"not a directory")?;
    let mut sent = Sent::new();
    send(&cluster, leader, 0..1200, &mut sent).await?;
    under_cap(&cluster, leader, max_bytes).await?;
    let below = |s: &StoreReader| {
        let h = s.retention_horizon();
        s.segments()
            .iter()
            .filter(|g| g.info.next_index > g.info.first_index && g.info.next_index - 1 <= h)
            .count()
    };
    let applied = eventually(RETENTION_DEADLINE, "the stuck replica to apply a horizon", async || {
        let s = cluster.replica(stuck).store();
        Ok(match (s.retention_horizon(), below(s)) {
            (h, n) if h > 0 && n > 0 => Check::Done(h),
            (h, n) => Check::Pending(format!("horizon {h}, {n} segment(s) below it")),
        })
    })
    .await?;

    // Crash it, clear the way, restart: it finishes the cleanup by itself.
    cluster.replica_mut(stuck).kill().await;
    std::fs::remove_file(&blocker)?;
    cluster.replica_mut(stuck).restart().await?;
    eventually(
        RETENTION_DEADLINE,
        "the restarted replica to finish its cleanup",
        async || {
            let s = cluster.replica(stuck).store();
            Ok(match (s.retention_horizon(), below(s)) {
                (h, 0) if h >= applied => Check::Done(()),
                (h, n) => Check::Pending(format!("horizon {h}, {n} segment(s) below it")),
            })
        },
    )
    .await?;
    settle(&cluster, leader).await?;
    holds_exactly_the_retained(cluster.replica(stuck).store(), &sent, "the restarted replica")?;
    cluster.shutdown().await
}

/// A tmpfs of a few MiB mounted on a temp dir: a real small filesystem, whose
/// `statvfs` the brokers read as they would a real disk. Unmounted on drop
/// (lazily, so a failed test that left a file open still unmounts).
struct SmallFs {
    dir: tempfile::TempDir,
}

impl SmallFs {
    /// `None` when this process may not mount (not root, or no
    /// `CAP_SYS_ADMIN`): the caller says it skipped.
    fn mount(mib: u64) -> anyhow::Result<Option<SmallFs>> {
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            return Ok(None);
        }
        let dir = tempfile::tempdir()?;
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "raftmq-test-fs"])
            .arg(dir.path())
            .output()
            .context("running mount")?;
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            if err.contains("permission denied") || err.contains("not permitted") {
                return Ok(None);
            }
            anyhow::bail!("mount -t tmpfs on {}: {}: {err}", dir.path().display(), out.status);
        }
        Ok(Some(SmallFs { dir }))
    }

    fn path(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// `(used, capacity)` as the brokers see it.
    fn usage(&self) -> anyhow::Result<(u64, u64)> {
        Ok(raftmq_raft_store::disk::usage(self.path())?)
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

/// Another program's file on the small filesystem, grown until the
/// filesystem is `ratio` full.
fn fill_to(fs: &SmallFs, filler: &mut std::fs::File, ratio: f64) -> anyhow::Result<()> {
    use std::io::Write;
    let chunk = vec![0xA5u8; 256 * 1024];
    loop {
        let (used, total) = fs.usage()?;
        if used as f64 >= ratio * total as f64 {
            return Ok(());
        }
        filler.write_all(&chunk).context("writing the filler file")?;
    }
}

/// The watermarks against a real filesystem (a 6 GiB tmpfs holding the three
/// replicas), not an injected usage figure: another program's file pushes the
/// disk past the clean watermark and the leader deletes whole segments early;
/// past the full watermark sends are refused with the real figures and path;
/// once the file is deleted sends are accepted again. (Three fresh replicas
/// already take ~87 MB there, most of it RocksDB's preallocated write-ahead
/// logs. Each snapshot flushes the memtables and opens a new WAL, which
/// preallocates ~70 MB while the old one may still be open: the room above the
/// full watermark must hold two per replica, or a replica's write hits ENOSPC
/// and its Raft stops, as it did on 512 MiB filled to 95 % and on 2 GiB filled
/// to 93 %. Hence 6 GiB filled to 91 %: 550 MB of room. tmpfs pages are RAM,
/// and the filler's are freed when the test ends.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watermarks_hold_on_a_real_small_filesystem() -> anyhow::Result<()> {
    let _turn = ONE_AT_A_TIME.lock().await;
    let Some(fs) = SmallFs::mount(6144)? else {
        eprintln!("skipped: mounting a tmpfs needs root (CAP_SYS_ADMIN); the injected-usage test still runs");
        return Ok(());
    };
    let retention = RetentionConfig {
        check_interval: Duration::from_millis(100),
        // Only disk pressure trims here.
        file_reserved_time: Duration::from_secs(10 * 365 * 24 * 3600),
        ..RetentionConfig::default()
    };
    let (cluster, leader) = start(Settings {
        data_root: Some(fs.path().to_path_buf()),
        ..settings(retention)
    })
    .await?;
    let (used, total) = fs.usage()?;
    ensure!(
        (used as f64) < 0.5 * total as f64,
        "three fresh replicas already use {used} of {total} bytes: the test's filesystem is too small"
    );
    let mut sent = Sent::new();
    send(&cluster, leader, 0..300, &mut sent).await?;
    settle(&cluster, leader).await?;
    ensure!(
        cluster.running().all(|r| r.store().retention_horizon() == 0),
        "retention trimmed on a disk below its clean watermark ({:?})",
        fs.usage()?
    );

    // Past the clean watermark (0.75) the leader trims young segments early.
    let filler_path = fs.path().join("someone-elses-file");
    let mut filler = std::fs::File::create(&filler_path)?;
    fill_to(&fs, &mut filler, 0.80)?;
    wait_trimmed_everywhere(&cluster, 0).await?;
    send(&cluster, leader, 300..310, &mut sent).await?;
    settle(&cluster, leader).await?;
    for r in cluster.running() {
        holds_exactly_the_retained(r.store(), &sent, &format!("node {}", r.id))?;
    }

    // Past the full watermark (0.90) sends are refused, naming the real figures.
    fill_to(&fs, &mut filler, 0.91)?;
    let refusal = refused(&cluster, leader).await?;
    ensure!(
        refusal.starts_with("disk full:")
            && refusal.contains(&fs.path().display().to_string())
            && refusal.contains("retention.disk_full_watermark 90.0%"),
        "refusal: {refusal}"
    );
    let g = admin(cluster.replica(leader))
        .await?
        .cluster_status(pb::ClusterStatusRequest {})
        .await?
        .into_inner()
        .groups
        .into_iter()
        .next()
        .context("no group in the status")?;
    ensure!(
        g.disk_full && g.disk_used_ratio.is_some_and(|r| r >= 0.90),
        "status {g:?}"
    );

    // The other program's file goes: sends are accepted again.
    drop(filler);
    std::fs::remove_file(&filler_path)?;
    accepted_again(&cluster, leader).await?;
    cluster.shutdown().await?;
    drop(fs);
    Ok(())
}
