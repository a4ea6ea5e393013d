//! The metrics endpoints: a broker replica's and the NameServer's, scraped over
//! HTTP while a workload runs. The counters and Raft positions move, the lag
//! and lifecycle gauges say what the workload left, and every scrape parses
//! whole with a strict OpenMetrics parser. A bad metrics address is refused by
//! `raftmq broker` and `raftmq namesrv`, naming the key.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, ensure};
use openmetrics_parser::{MetricsExposition, OpenMetricsType, OpenMetricsValue};
use raftmq_broker::MessagingConfig;
use raftmq_client::{Client, ClientConfig};
use raftmq_proto::v1 as pb;
use raftmq_proto::v1::consumer_service_client::ConsumerServiceClient;
use raftmq_proto::v1::messaging_service_client::MessagingServiceClient;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::fixtures::{
    Check, Cluster, DEADLINE, GROUP, QUEUES, Settings, TOPIC, create_topic_via, eventually, http, message,
    wait_for_known_route,
};

pub(crate) type Exposition = MetricsExposition<OpenMetricsType, OpenMetricsValue>;

/// `GET /metrics` over a fresh connection; checks the status and content type.
async fn fetch(addr: SocketAddr) -> anyhow::Result<String> {
    let (status, head, body) = http(addr, "GET", "/metrics", None, b"")
        .await
        .with_context(|| format!("scraping the metrics endpoint {addr}"))?;
    ensure!(status == 200, "metrics answered {head}");
    ensure!(head.contains("content-type: application/openmetrics-text"), "{head}");
    String::from_utf8(body).context("the metrics answer is not UTF-8")
}

/// A scrape, parsed whole: any line the parser cannot read fails it.
pub(crate) async fn scrape(addr: SocketAddr) -> anyhow::Result<Exposition> {
    let body = fetch(addr).await?;
    openmetrics_parser::openmetrics::parse_openmetrics(&body)
        .map_err(|e| anyhow::anyhow!("the scrape of {addr} does not parse as OpenMetrics: {e}\n{body}"))
}

/// The value of `family`'s sample whose labels include `labels` (a
/// histogram's count), or `None` when there is none.
fn value(exp: &Exposition, family: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let fam = exp.families.get(family)?;
    fam.iter_samples().find_map(|s| {
        let set = s.get_labelset().ok()?;
        let have: Vec<(&String, &String)> = set.iter().collect();
        let all = labels
            .iter()
            .all(|(k, v)| have.iter().any(|(hk, hv)| hk.as_str() == *k && hv.as_str() == *v));
        all.then(|| match &s.value {
            OpenMetricsValue::Gauge(n) | OpenMetricsValue::Unknown(n) => n.as_f64(),
            OpenMetricsValue::Counter(c) => c.value.as_f64(),
            OpenMetricsValue::Histogram(h) => h.count.unwrap_or(0) as f64,
            _ => f64::NAN,
        })
    })
}

/// Samples in `family`.
fn samples(exp: &Exposition, family: &str) -> usize {
    exp.families.get(family).map_or(0, |f| f.iter_samples().count())
}

pub(crate) fn must(exp: &Exposition, family: &str, labels: &[(&str, &str)]) -> anyhow::Result<f64> {
    value(exp, family, labels).with_context(|| format!("no {family} sample with labels {labels:?}"))
}

/// A NameServer with a metrics endpoint on an ephemeral port.
struct MeteredNameServer {
    addr: String,
    metrics: SocketAddr,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), raftmq_namesrv::Error>>,
}

impl MeteredNameServer {
    async fn start() -> anyhow::Result<MeteredNameServer> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let metrics = TcpListener::bind("127.0.0.1:0").await?;
        let (addr, metrics_addr) = (listener.local_addr()?.to_string(), metrics.local_addr()?);
        let stop = CancellationToken::new();
        let task = tokio::spawn(raftmq_namesrv::serve_with_metrics(
            raftmq_namesrv::NameServerConfig {
                broker_timeout: Duration::from_secs(1),
                heartbeat_interval: Duration::from_millis(200),
                ..Default::default()
            },
            listener,
            Some(metrics),
            stop.clone(),
        ));
        Ok(MeteredNameServer {
            addr,
            metrics: metrics_addr,
            stop,
            task,
        })
    }

    async fn stop(self) -> anyhow::Result<()> {
        self.stop.cancel();
        Ok(self.task.await??)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_and_nameserver_metrics_move_with_a_workload_and_parse_as_openmetrics() -> anyhow::Result<()> {
    const SENDS: u64 = 40;
    let ns = MeteredNameServer::start().await?;
    let cluster = Cluster::start_with_settings(
        3,
        Settings {
            messaging: MessagingConfig {
                auto_create_topics: true,
                ..MessagingConfig::default()
            },
            nameservers: vec![ns.addr.clone()],
            metrics: true,
            ..Settings::default()
        },
    )
    .await?;
    let leader = cluster.wait_for_leader(DEADLINE).await?;
    let endpoint = |id| {
        cluster
            .replica(id)
            .node()
            .metrics_addr()
            .with_context(|| format!("node {id} serves no metrics"))
    };
    let leader_metrics = endpoint(leader)?;
    let follower = (1..=3).find(|id| *id != leader).context("no follower")?;
    let follower_metrics = endpoint(follower)?;
    create_topic_via(&cluster, leader).await?;
    let client = Client::new(ClientConfig::new(vec![ns.addr.clone()]))?;
    wait_for_known_route(&client, TOPIC).await?;

    let before = scrape(leader_metrics).await?;
    let node = leader.to_string();
    let me = [("group", GROUP), ("node", node.as_str())];
    ensure!(
        must(&before, "raftmq_raft_is_leader", &me)? == 1.0,
        "node {leader} leads"
    );
    let applied_before = must(&before, "raftmq_raft_applied_index", &me)?;
    let sent_before = value(&before, "raftmq_messages_sent", &[("topic", TOPIC)]).unwrap_or(0.0);
    let follower_before = must(&scrape(follower_metrics).await?, "raftmq_raft_applied_index", &[])?;
    let ns_before = scrape(ns.metrics).await?;
    let registrations_before = must(&ns_before, "raftmq_namesrv_registrations", &[])?;

    // The workload: sends through the client (routes from the NameServer), a
    // pull of everything, and a POP receive of which half is acked.
    let producer = client.producer();
    for seq in 0..SENDS {
        producer.send(TOPIC, message(seq, None)).await?;
    }
    let leader_url = format!("http://{}", cluster.replica(leader).addr);
    let mut messaging = MessagingServiceClient::connect(leader_url.clone()).await?;
    let mut pulled = 0;
    for queue_id in 0..QUEUES {
        let read = messaging
            .pull(pb::PullRequest {
                topic: TOPIC.into(),
                queue_id,
                offset: 0,
                max_messages: 1000,
                tag_expression: "*".into(),
                ..Default::default()
            })
            .await?
            .into_inner();
        pulled += read.messages.len() as u64;
    }
    ensure!(pulled == SENDS, "pulled {pulled} of {SENDS}");
    let mut consumer = ConsumerServiceClient::connect(leader_url).await?;
    let received = consumer
        .receive(pb::ReceiveRequest {
            consumer_group: "metrics-pop".into(),
            topic: TOPIC.into(),
            max_messages: 10,
            invisible_duration_ms: 60_000,
            filter_expression: "*".into(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .messages;
    ensure!(!received.is_empty(), "a POP receive got nothing");
    let acked = received.len() / 2;
    consumer
        .ack(pb::AckRequest {
            consumer_group: "metrics-pop".into(),
            topic: TOPIC.into(),
            receipt_handles: received[..acked].iter().map(|m| m.receipt_handle.clone()).collect(),
        })
        .await?;

    let after = scrape(leader_metrics).await?;
    let sent = must(&after, "raftmq_messages_sent", &[("topic", TOPIC)])?;
    ensure!(
        sent - sent_before == SENDS as f64,
        "sent counter {sent_before} -> {sent}"
    );
    ensure!(
        must(&after, "raftmq_sent_bytes", &[("topic", TOPIC)])? > 0.0,
        "no bytes counted"
    );
    ensure!(must(&after, "raftmq_messages_pulled", &[("topic", TOPIC)])? >= pulled as f64);
    let got = must(&after, "raftmq_messages_received", &[("topic", TOPIC)])?;
    ensure!(got == received.len() as f64, "received counter {got}");
    ensure!(must(&after, "raftmq_messages_acked", &[("topic", TOPIC)])? == acked as f64);
    ensure!(
        must(
            &after,
            "raftmq_pop_inflight_messages",
            &[("consumer_group", "metrics-pop")]
        )? == (received.len() - acked) as f64
    );
    // The POP group's progress stops at its first unacked message: the rest of
    // the queue is its lag.
    let lag_series = samples(&after, "raftmq_consumer_lag_messages");
    ensure!(lag_series > 0, "no consumer-lag series");
    let applied = must(&after, "raftmq_raft_applied_index", &me)?;
    ensure!(
        applied >= applied_before + 1.0,
        "applied index {applied_before} -> {applied}"
    );
    ensure!(must(&after, "raftmq_send_duration_seconds", &[])? >= SENDS as f64 / 128.0);
    ensure!(must(&after, "raftmq_commitlog_fsync_duration_seconds", &[])? > 0.0);
    ensure!(must(&after, "raftmq_apply_duration_seconds", &[])? > 0.0);
    ensure!(must(&after, "raftmq_replication_round_duration_seconds", &[])? > 0.0);
    ensure!(must(&after, "raftmq_commitlog_bytes", &[])? > 0.0);
    ensure!(must(&after, "raftmq_commitlog_segments", &[])? >= 1.0);
    ensure!(must(&after, "raftmq_client_connections", &[])? >= 1.0);
    ensure!(
        samples(&after, "raftmq_rocksdb_keys") >= 10,
        "RocksDB figures per column family"
    );
    ensure!(value(&after, "raftmq_rocksdb_running_compactions", &[]).is_some());
    // The leader reports each follower's lag, which settles at 0.
    ensure!(samples(&after, "raftmq_raft_follower_lag_entries") == 2);
    eventually(
        DEADLINE,
        "followers' lag to reach 0 on the leader's endpoint",
        async || {
            let exp = scrape(leader_metrics).await?;
            let lags: Vec<Option<f64>> = (1..=3u64)
                .filter(|id| *id != leader)
                .map(|id| {
                    let id = id.to_string();
                    value(&exp, "raftmq_raft_follower_lag_entries", &[("follower", id.as_str())])
                })
                .collect();
            Ok(if lags.iter().all(|l| *l == Some(0.0)) {
                Check::Done(())
            } else {
                Check::Pending(format!("{lags:?}"))
            })
        },
    )
    .await?;
    // A follower's applied index moves with the leader's.
    eventually(DEADLINE, "the follower's applied index to move", async || {
        let exp = scrape(follower_metrics).await?;
        let applied = must(&exp, "raftmq_raft_applied_index", &[])?;
        ensure!(must(&exp, "raftmq_raft_is_leader", &[])? == 0.0);
        Ok(if applied > follower_before {
            Check::Done(())
        } else {
            Check::Pending(format!("applied {applied}"))
        })
    })
    .await?;

    // The NameServer: registrations keep coming, the client asked for routes,
    // and the registry holds the three replicas of one group.
    eventually(DEADLINE, "NameServer registrations to grow", async || {
        let exp = scrape(ns.metrics).await?;
        let registrations = must(&exp, "raftmq_namesrv_registrations", &[])?;
        ensure!(must(&exp, "raftmq_namesrv_route_queries", &[])? >= 1.0);
        ensure!(must(&exp, "raftmq_namesrv_broker_groups", &[])? == 1.0);
        ensure!(must(&exp, "raftmq_client_connections_accepted", &[])? >= 1.0);
        let nodes = must(&exp, "raftmq_namesrv_broker_nodes", &[])?;
        Ok(if registrations > registrations_before && nodes == 3.0 {
            Check::Done(())
        } else {
            Check::Pending(format!("registrations {registrations}, nodes {nodes}"))
        })
    })
    .await?;

    drop(client);
    cluster.shutdown().await?;
    ns.stop().await
}

/// Runs the `raftmq` binary with `args`; it must fail, naming `key` on stderr.
fn refused(args: &[&str], key: &str) -> anyhow::Result<()> {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_raftmq"))
        .args(args)
        .env("RAFTMQ_PEER_SECRET", "metrics-test-peer-secret")
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(!out.status.success(), "raftmq {args:?} started: {stderr}");
    ensure!(stderr.contains(key), "raftmq {args:?} did not name {key}: {stderr}");
    Ok(())
}

#[test]
fn a_bad_metrics_address_is_refused_naming_the_key() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let data = dir.path().display().to_string();
    // A port of its own: with port 0 the derived Raft address would equal the
    // client one, which validation names first.
    let broker = |listen: &str, metrics: [&str; 2]| -> anyhow::Result<()> {
        let args = [
            "broker",
            "--group",
            "broker-a",
            "--node-id",
            "1",
            "--listen",
            listen,
            "--data-dir",
            &data,
            metrics[0],
            metrics[1],
        ];
        refused(&args, "metrics_listen")
    };
    for bad in ["localhost", "127.0.0.1", "127.0.0.1:99999"] {
        broker("127.0.0.1:10998", ["--metrics-listen", bad])?;
    }
    // The gRPC port itself.
    broker("127.0.0.1:10999", ["--set", "metrics_listen=127.0.0.1:10999"])?;
    refused(
        &["namesrv", "--listen", "127.0.0.1:0", "--metrics-listen", "nowhere"],
        "metrics_listen",
    )?;
    refused(
        &[
            "namesrv",
            "--listen",
            "127.0.0.1:19876",
            "--set",
            "metrics_listen=127.0.0.1:19876",
        ],
        "metrics_listen",
    )?;
    Ok(())
}
