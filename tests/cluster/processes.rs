//! The `raftmq` binary as users run it: `raftmq dev` with its replicas as separate
//! processes, the README tour automated (produce, pull, SIGKILL the leader's
//! process, produce again, the killed replica restarted and caught up), and
//! `raftmq bench` against the local cluster it starts itself.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use raftmq_client::{Client, ClientConfig, MessageExt};
use raftmq_proto::v1 as pb;

use super::fixtures::{Check, eventually, pull_everything, spawn_with_lines};

const BIN: &str = env!("CARGO_BIN_EXE_raftmq");
/// Processes start slower than in-process replicas, and CI may be busy.
const DEADLINE: Duration = Duration::from_secs(30);

/// A `raftmq dev` process; SIGKILLed on drop if the test did not stop it.
struct Dev {
    child: Child,
    namesrv: String,
    data_dir: PathBuf,
}

impl Dev {
    /// Starts `raftmq dev` on free ports and waits for its "cluster is up" banner.
    fn start(data_dir: &Path) -> anyhow::Result<Dev> {
        let (child, rx) = spawn_with_lines(
            Command::new(BIN)
                .args([
                    "dev",
                    "--namesrv-listen",
                    "127.0.0.1:0",
                    "--broker-ports",
                    "0,0,0",
                    "--data-dir",
                ])
                .arg(data_dir),
            "raftmq dev",
        )?;
        let mut dev = Dev {
            child,
            namesrv: String::new(),
            data_dir: data_dir.to_owned(),
        };
        // Not `eventually`: lines arrive on a channel, so a blocking receive with
        // the time left waits for each without polling.
        let deadline = Instant::now() + DEADLINE;
        loop {
            let line = rx
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                .context("raftmq dev printed no 'cluster is up' banner in time")?;
            if let Some(addr) = line.trim().strip_prefix("NameServer") {
                dev.namesrv = addr.trim().to_owned();
            }
            if line.contains("Ctrl-C stops the cluster") {
                break;
            }
        }
        ensure!(!dev.namesrv.is_empty(), "the banner named no NameServer");
        Ok(dev)
    }

    fn pid_of(&self, node: u64) -> anyhow::Result<i32> {
        let file = self.data_dir.join(format!("broker-a-{node}.pid"));
        let text = std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
        text.trim()
            .parse()
            .with_context(|| format!("{} holds no pid", file.display()))
    }

    /// SIGTERM, as Ctrl-C would; returns dev's exit status.
    async fn stop(mut self) -> anyhow::Result<std::process::ExitStatus> {
        signal(i32::try_from(self.child.id())?, libc::SIGTERM);
        eventually(DEADLINE, "raftmq dev to exit after SIGTERM", async || {
            Ok(match self.child.try_wait()? {
                Some(status) => Check::Done(status),
                None => Check::Pending("still running".into()),
            })
        })
        .await
    }
}

impl Drop for Dev {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn signal(pid: i32, sig: i32) {
    // SAFETY: kill(2) with a pid this test started (directly or through dev).
    unsafe {
        libc::kill(pid, sig);
    }
}

fn alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    unsafe { libc::kill(pid, 0) == 0 }
}

async fn leader(client: &Client) -> Option<pb::GroupStatus> {
    let groups = client.admin().cluster_status().await.ok()?;
    groups.into_iter().find(|g| g.leader_id.is_some())
}

fn message(seq: u64) -> pb::Message {
    let mut m = pb::Message::new(format!("tour-{seq}").into_bytes());
    m.properties.insert("seq".into(), seq.to_string());
    m
}

/// Sends `range`, retrying nothing by hand: the client's own redirects and retries
/// are what is under test. Returns the acknowledged message ids.
async fn send_all(client: &Client, topic: &str, range: std::ops::Range<u64>) -> anyhow::Result<BTreeSet<String>> {
    let producer = client.producer();
    let mut ids = BTreeSet::new();
    for seq in range {
        let r = producer
            .send(topic, message(seq))
            .await
            .with_context(|| format!("send {seq}"))?;
        ids.insert(r.message_id);
    }
    Ok(ids)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_cluster_replaces_a_sigkilled_leader_process_and_restarts_it() -> anyhow::Result<()> {
    const TOPIC: &str = "TourTopic";
    let dir = tempfile::tempdir()?;
    let dev = Dev::start(dir.path())?;
    let client = Client::new(ClientConfig::new(vec![dev.namesrv.clone()]))?;

    // Produce (the topic is auto-created by dev), and read everything back.
    let mut acked = send_all(&client, TOPIC, 0..100).await?;
    let old = leader(&client).await.context("no leader after the first sends")?;
    let old_id = old.leader_id.context("leader id")?;
    let old_pid = dev.pid_of(old_id)?;
    ensure!(alive(old_pid), "pid file of the leader names a dead process");

    // dev's NameServer takes registrations signed with the cluster secret only:
    // a fake broker claiming the group's leadership at a higher term is refused,
    // and the route keeps naming the real leader.
    let mut ns =
        pb::name_server_service_client::NameServerServiceClient::connect(format!("http://{}", dev.namesrv)).await?;
    let real = ns
        .query_route(pb::QueryRouteRequest { topic: TOPIC.into() })
        .await?
        .into_inner();
    let group = real.groups.first().context("a route")?.clone();
    let refused = ns
        .register_broker(pb::RegisterBrokerRequest {
            cluster: "dev".into(),
            broker_group: group.broker_group.clone(),
            node_id: old_id,
            endpoint: "127.0.0.1:1".into(),
            term: u64::MAX / 2,
            leader_id: Some(old_id),
            leader_endpoint: "127.0.0.1:1".into(),
            follower_endpoints: vec![],
            topics: vec![],
        })
        .await
        .expect_err("an unsigned registration");
    ensure!(refused.code() == tonic::Code::Unauthenticated, "{refused}");
    let after = ns
        .query_route(pb::QueryRouteRequest { topic: TOPIC.into() })
        .await?
        .into_inner();
    ensure!(
        after.groups.first().map(|g| &g.leader_endpoint) == Some(&group.leader_endpoint),
        "the route moved: {after:?}"
    );

    // SIGKILL the leader's process, as the README's tour does with kill -9.
    let killed_at = Instant::now();
    signal(old_pid, libc::SIGKILL);
    let new_leader = eventually(
        DEADLINE,
        &format!("a new leader after SIGKILL of node {old_id}"),
        async || {
            Ok(match leader(&client).await {
                Some(g) if g.leader_id != Some(old_id) && g.term > old.term => Check::Done(g),
                seen => Check::Pending(format!("{seen:?}")),
            })
        },
    )
    .await?;
    eprintln!(
        "new leader {:?} (term {}) reported {:?} after the kill",
        new_leader.leader_id,
        new_leader.term,
        killed_at.elapsed()
    );
    // The producer follows the new leader on its own.
    acked.extend(send_all(&client, TOPIC, 100..200).await?);

    // dev restarts the killed replica (new pid) and it catches up with the leader.
    eventually(
        DEADLINE,
        &format!("killed node {old_id} to be restarted and caught up"),
        async || {
            let restarted = dev.pid_of(old_id).is_ok_and(|p| p != old_pid && alive(p));
            let caught_up = leader(&client).await.is_some_and(|g| {
                let committed = g.committed_index.unwrap_or(u64::MAX);
                g.replicas
                    .iter()
                    .any(|r| r.node_id == old_id && r.matched_index.is_some_and(|m| m >= committed))
            });
            Ok(if restarted && caught_up {
                Check::Done(())
            } else {
                Check::Pending(format!("restarted: {restarted}, caught up: {caught_up}"))
            })
        },
    )
    .await?;

    // Every acknowledged message is readable, exactly once.
    let route = client.refresh_route(TOPIC).await?;
    let (pulled, _) = pull_everything(&client.pull_consumer(), &route, TOPIC).await?;
    let seen: Vec<String> = pulled.into_iter().map(|(_, _, m)| m.message_id).collect();
    let unique: BTreeSet<String> = seen.iter().cloned().collect();
    let missing: Vec<_> = acked.difference(&unique).collect();
    ensure!(missing.is_empty(), "acknowledged but not readable: {missing:?}");
    // A send whose ack was lost in the kill may be stored twice (at-least-once);
    // more than a couple would be a bug.
    ensure!(
        seen.len() <= acked.len() + 2,
        "{} stored for {} acknowledged",
        seen.len(),
        acked.len()
    );

    // Ctrl-C (SIGTERM) stops dev and every replica.
    let pids = (1..=3).map(|n| dev.pid_of(n)).collect::<anyhow::Result<Vec<_>>>()?;
    let status = dev.stop().await?;
    ensure!(status.success(), "raftmq dev exited with {status}");
    for pid in pids {
        if alive(pid) {
            bail!("replica process {pid} outlived raftmq dev");
        }
    }
    Ok(())
}

/// Waits for `child` to exit and collects its output; kills it and fails if it
/// runs past `limit`.
async fn output_within(
    child: std::process::Child,
    limit: Duration,
    what: &str,
) -> anyhow::Result<std::process::Output> {
    let pid = i32::try_from(child.id())?;
    match tokio::time::timeout(limit, tokio::task::spawn_blocking(move || child.wait_with_output())).await {
        Ok(out) => Ok(out??),
        Err(_) => {
            signal(pid, libc::SIGKILL);
            bail!("{what} did not finish within {limit:?}");
        }
    }
}

/// Runs `raftmq bench ARGS --json` against a local cluster of its own under `dir`
/// and returns the JSON report it printed.
async fn bench_json(args: &[&str], dir: &std::path::Path) -> anyhow::Result<serde_json::Value> {
    let child = Command::new(BIN)
        .arg("bench")
        .args(args)
        .args(["--duration", "60", "--json", "--data-dir"])
        .arg(dir.join("cluster"))
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("spawning raftmq bench")?;
    let out = output_within(child, Duration::from_secs(120), "raftmq bench").await?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        out.status.success(),
        "raftmq bench {args:?} failed: {}\n{stderr}",
        out.status
    );
    let stdout = String::from_utf8(out.stdout)?;
    serde_json::from_str(stdout.trim()).with_context(|| format!("bench --json printed no JSON object: {stdout:?}"))
}

/// A bench report that counted all `count` operations, no errors, and a latency.
fn ensure_complete(report: &serde_json::Value, count: u64, each: &str) -> anyhow::Result<()> {
    ensure!(report["messages"] == count, "not every {each}: {report}");
    ensure!(report["errors"] == 0, "errors: {report}");
    ensure!(
        report["p50_ms"].as_f64().is_some_and(|p| p > 0.0),
        "no latency: {report}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_produce_against_its_own_local_cluster_reports_json() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let report = bench_json(
        &["produce", "--count", "300", "--size", "512", "--inflight", "32"],
        dir.path(),
    )
    .await?;
    for key in ["msgs_per_sec", "mb_per_sec", "p50_ms", "p99_ms", "errors"] {
        ensure!(
            report.get(key).is_some_and(|v| v.is_number()),
            "{key} missing in {report}"
        );
    }
    ensure_complete(&report, 300, "message was acknowledged")
}

/// `bench ping` times real NameServer round trips: every lookup answered, one
/// latency per lookup, and no more lookups than --count allows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_ping_times_each_route_lookup_against_a_nameserver() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let report = bench_json(&["ping", "--count", "200"], dir.path()).await?;
    ensure!(report["workload"] == "ping", "not a ping report: {report}");
    ensure!(report["latency_samples"] == 200, "one latency per lookup: {report}");
    ensure_complete(&report, 200, "lookup was answered")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_refuses_a_bad_worker_thread_count_from_flag_file_and_environment() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("broker.toml");
    // 0 means one per core; more than 1024 is refused, wherever it was set.
    std::fs::write(&file, "worker_threads = 5000\n")?;
    let common = [
        "broker",
        "--group",
        "broker-a",
        "--node-id",
        "1",
        "--listen",
        "127.0.0.1:0",
        // Advertised only (never bound): with port 0 both would be 127.0.0.1:0.
        "--advertise",
        "127.0.0.1:10911",
        "--raft-advertise",
        "127.0.0.1:40911",
    ];
    for (extra, env) in [
        (vec!["--worker-threads".to_owned(), "5000".to_owned()], None),
        (vec!["--config".to_owned(), file.display().to_string()], None),
        (vec![], Some("5000")),
    ] {
        let mut cmd = Command::new(BIN);
        if let Some(n) = env {
            cmd.env("RAFTMQ_WORKER_THREADS", n);
        }
        cmd.args(common)
            .args(&extra)
            .env("RAFTMQ_PEER_SECRET", "0123456789abcdef0123")
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let child = cmd.spawn().context("spawning raftmq broker")?;
        let out = output_within(child, Duration::from_secs(30), "raftmq broker with 5000 workers").await?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        ensure!(
            !out.status.success(),
            "{extra:?} {env:?}: a broker with 5000 workers started"
        );
        ensure!(
            stderr.contains("worker_threads = 5000") && stderr.contains("at most 1024"),
            "{extra:?} {env:?}: the error does not name the setting: {stderr}"
        );
    }
    Ok(())
}

/// `raftmq ... | head` must not end in a panic and a backtrace when `head`
/// closes the pipe: the output's reader is gone before the first write here
/// (a pipe whose read end was dropped), so every write fails with EPIPE.
#[test]
fn printing_into_a_closed_pipe_ends_quietly() -> anyhow::Result<()> {
    let (reader, writer) = std::io::pipe()?;
    drop(reader);
    let out = std::process::Command::new(BIN)
        .args(["broker", "--print-config"])
        .stdout(writer)
        .stderr(std::process::Stdio::piped())
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    anyhow::ensure!(
        out.status.success() && !stderr.contains("panicked"),
        "exit {}, stderr: {stderr}",
        out.status
    );
    Ok(())
}
