//! `raftmq bench failover`: how long a leader's failure keeps writes from
//! succeeding. Against a local cluster of replica processes, under a steady load
//! of one-at-a-time producers, it kills (SIGKILL) or pauses (SIGSTOP) the leader
//! `--kills` times and times each fault to the first acknowledged send that was
//! started after it, the figure users compare between brokers. Between faults it
//! waits until the group is whole again (the killed replica restarted by the
//! supervisor and acknowledging its leader), and it counts elections by terms.
//!
//! It does not run against `--namesrv`: it must own the processes it kills.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use hdrhistogram::Histogram;
use raftmq_client::{Client, ClientConfig, MessageExt};
use raftmq_proto::v1 as pb;
use raftmq_proto::v1::admin_service_client::AdminServiceClient;

use crate::local::LocalCluster;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LeaderFault {
    /// SIGKILL the leader's process (the supervisor restarts it).
    Kill,
    /// SIGSTOP the leader's process until a new leader acknowledged a send, then
    /// SIGCONT it: its connections stay open and silent.
    Pause,
}

/// What `bench failover` measured; `--json` prints exactly this.
#[derive(Debug, serde::Serialize)]
pub struct FailoverReport {
    pub fault: LeaderFault,
    pub faults: usize,
    pub producers: usize,
    /// Fault -> first acknowledged send started after it, per fault, in ms.
    pub samples_ms: Vec<f64>,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub max_ms: f64,
    pub mean_ms: f64,
    /// Term increases per fault (1 is one election; more are split or repeated votes).
    pub elections: Vec<u64>,
    pub sends_ok: u64,
    pub sends_failed: u64,
}

/// Load and fault settings.
pub struct FailoverArgs {
    pub fault: LeaderFault,
    pub kills: usize,
    pub producers: usize,
    pub topic: String,
    pub size: usize,
}

/// Microseconds since `origin`, for atomics shared with the producers.
fn since(origin: Instant) -> u64 {
    u64::try_from(origin.elapsed().as_micros()).unwrap_or(u64::MAX)
}

/// Where the producers leave the first acknowledgement of a send started at or
/// after `fault_at` (both in µs since the bench's origin; `u64::MAX`: none yet).
struct Watch {
    origin: Instant,
    fault_at: AtomicU64,
    first_ack: AtomicU64,
    ok: AtomicU64,
    failed: AtomicU64,
}

pub async fn run(cluster: &LocalCluster, namesrv: Vec<String>, args: &FailoverArgs) -> anyhow::Result<FailoverReport> {
    let client = Client::new(ClientConfig::new(namesrv)).context("building a client")?;
    crate::tools::create_topic_and_wait(&client, &args.topic, 4, Duration::from_secs(15)).await?;
    let watch = Arc::new(Watch {
        origin: Instant::now(),
        fault_at: AtomicU64::new(u64::MAX),
        first_ack: AtomicU64::new(u64::MAX),
        ok: AtomicU64::new(0),
        failed: AtomicU64::new(0),
    });
    let stop = tokio_util::sync::CancellationToken::new();
    let mut load = Vec::new();
    for _ in 0..args.producers {
        let (producer, watch, stop, topic, size) = (
            client.producer(),
            watch.clone(),
            stop.clone(),
            args.topic.clone(),
            args.size,
        );
        load.push(tokio::spawn(async move {
            while !stop.is_cancelled() {
                let started = since(watch.origin);
                match producer.send(&topic, pb::Message::new(vec![b'f'; size])).await {
                    Ok(_) => {
                        watch.ok.fetch_add(1, Ordering::Relaxed);
                        if started >= watch.fault_at.load(Ordering::Acquire) {
                            watch.first_ack.fetch_min(since(watch.origin), Ordering::AcqRel);
                        }
                    }
                    Err(_) => {
                        watch.failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }

    let mut hist = Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3).context("histogram bounds")?;
    let (mut samples, mut elections) = (Vec::new(), Vec::new());
    let result: anyhow::Result<()> = async {
        for round in 1..=args.kills {
            let (leader, term) = whole_group(cluster, Duration::from_secs(60)).await?;
            let pid = read_pid(cluster, leader)?;
            watch.first_ack.store(u64::MAX, Ordering::Release);
            watch.fault_at.store(since(watch.origin), Ordering::Release);
            signal(pid, if args.fault == LeaderFault::Kill { libc::SIGKILL } else { libc::SIGSTOP })?;
            // Wall-clock time of the fault, to line it up with the replicas' logs.
            let wall = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64());
            tracing::info!(round, leader, pid, unix_secs = wall, "fault injected");
            let deadline = Instant::now() + Duration::from_secs(30);
            let took_us = loop {
                let first = watch.first_ack.load(Ordering::Acquire);
                if first != u64::MAX {
                    break first - watch.fault_at.load(Ordering::Acquire);
                }
                if Instant::now() > deadline {
                    if args.fault == LeaderFault::Pause {
                        signal(pid, libc::SIGCONT)?;
                    }
                    bail!("fault {round}: no send acknowledged within 30 s of the fault on node {leader}");
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            };
            if args.fault == LeaderFault::Pause {
                signal(pid, libc::SIGCONT)?;
            }
            let (_, term_after) = whole_group(cluster, Duration::from_secs(60)).await?;
            let ms = took_us as f64 / 1000.0;
            hist.saturating_record(took_us.max(1));
            samples.push(ms);
            elections.push(term_after.saturating_sub(term));
            eprintln!(
                "[failover {round}/{}] {:?} leader node {leader}: first ack after {ms:.1} ms, term {term} -> {term_after}",
                args.kills, args.fault
            );
        }
        Ok(())
    }
    .await;
    stop.cancel();
    for l in load {
        let _ = l.await;
    }
    result?;
    let q = |p: f64| hist.value_at_quantile(p) as f64 / 1000.0;
    Ok(FailoverReport {
        fault: args.fault,
        faults: samples.len(),
        producers: args.producers,
        p50_ms: q(0.5),
        p90_ms: q(0.9),
        max_ms: hist.max() as f64 / 1000.0,
        mean_ms: samples.iter().sum::<f64>() / samples.len().max(1) as f64,
        samples_ms: samples,
        elections,
        sends_ok: watch.ok.load(Ordering::Relaxed),
        sends_failed: watch.failed.load(Ordering::Relaxed),
    })
}

fn read_pid(cluster: &LocalCluster, node: u64) -> anyhow::Result<i32> {
    let replica = cluster
        .replicas
        .iter()
        .find(|r| r.node_id == node)
        .with_context(|| format!("no local replica with node id {node}"))?;
    let text = std::fs::read_to_string(&replica.pid_file)
        .with_context(|| format!("reading {}", replica.pid_file.display()))?;
    text.trim()
        .parse()
        .with_context(|| format!("{} holds no pid", replica.pid_file.display()))
}

fn signal(pid: i32, sig: i32) -> anyhow::Result<()> {
    // SAFETY: kill(2) with a pid this process started and a valid signal number.
    if unsafe { libc::kill(pid, sig) } != 0 {
        bail!("signal {sig} to pid {pid}: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// Waits until every replica answers, all name the same leader in the same term,
/// and the leader has heard from every follower within the last 300 ms; returns
/// (leader, term).
async fn whole_group(cluster: &LocalCluster, within: Duration) -> anyhow::Result<(u64, u64)> {
    let deadline = Instant::now() + within;
    loop {
        let mut views = Vec::new();
        for r in &cluster.replicas {
            let status = async {
                let mut admin = AdminServiceClient::connect(format!("http://{}", r.endpoint)).await?;
                let resp = tokio::time::timeout(
                    Duration::from_millis(500),
                    admin.cluster_status(pb::ClusterStatusRequest {}),
                )
                .await??;
                anyhow::Ok(resp.into_inner())
            }
            .await;
            views.push(status.ok().and_then(|s| s.groups.into_iter().next()));
        }
        let agreed = views.iter().all(|v| {
            v.as_ref().is_some_and(|g| {
                g.leader_id.is_some()
                    && Some(g.leader_id) == views[0].as_ref().map(|f| f.leader_id)
                    && g.term == views[0].as_ref().map_or(0, |f| f.term)
            })
        });
        if agreed
            && let Some(Some(first)) = views.first()
            && let Some(leader) = first.leader_id
            && let Some(Some(own)) = views
                .iter()
                .find(|v| v.as_ref().is_some_and(|g| g.reported_by == leader))
            && own
                .replicas
                .iter()
                .filter(|r| r.node_id != leader)
                .all(|r| r.last_ack_ms.is_some_and(|ms| ms < 300))
        {
            return Ok((leader, first.term));
        }
        if Instant::now() > deadline {
            bail!("the group was not whole again within {within:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub fn print_table(r: &FailoverReport) {
    println!(
        "failover ({:?} the leader, {} times, {} one-at-a-time producers)",
        r.fault, r.faults, r.producers
    );
    println!("  fault -> first acknowledged new send:");
    println!(
        "    p50 {:.1} ms   p90 {:.1} ms   max {:.1} ms   mean {:.1} ms",
        r.p50_ms, r.p90_ms, r.max_ms, r.mean_ms
    );
    println!(
        "  elections per fault: {:?}  (total {})",
        r.elections,
        r.elections.iter().sum::<u64>()
    );
    println!("  sends: {} ok, {} failed during the run", r.sends_ok, r.sends_failed);
}
