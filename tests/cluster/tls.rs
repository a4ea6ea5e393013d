//! TLS on every link: a NameServer and a three-replica group serving TLS (the
//! Raft peer port with mutual TLS) replicate and serve the Rust client; a client
//! trusting another CA, plaintext sent to TLS ports, and a Raft peer presenting a
//! certificate from another CA (or none) are each refused with their own error,
//! and the group keeps its leader and keeps serving.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, ensure};
use raftmq_client::{Client, ClientConfig, MessageExt};
use raftmq_proto::raft::v1 as rpb;
use raftmq_proto::raft::v1::raft_service_client::RaftServiceClient;
use raftmq_proto::v1 as pb;
use raftmq_tls::certgen::Files;
use tonic::transport::{Certificate, ClientTlsConfig, Identity};

use super::fixtures::{
    Check, Cluster, DEADLINE, NameServer, ONE_AT_A_TIME, Settings, eventually, forged_transfer, pull_everything,
    signed_as, wait_for_known_route,
};

const TOPIC: &str = "tls-orders";

/// A cluster's certificates (the one the servers use) and another CA's set.
struct Certs {
    _dir: tempfile::TempDir,
    cluster: Files,
    foreign: Files,
}

fn certs() -> anyhow::Result<Certs> {
    let dir = tempfile::tempdir()?;
    let hosts = ["127.0.0.1".to_owned(), "localhost".to_owned()];
    let cluster = raftmq_tls::certgen::write(&dir.path().join("cluster"), &hosts)?;
    let foreign = raftmq_tls::certgen::write(&dir.path().join("foreign"), &hosts)?;
    Ok(Certs {
        _dir: dir,
        cluster,
        foreign,
    })
}

fn server_tls(files: &Files) -> raftmq_tls::TlsConfig {
    raftmq_tls::TlsConfig {
        enabled: true,
        cert_file: Some(files.cert_file.clone()),
        key_file: Some(files.key_file.clone()),
        ca_file: Some(files.ca_file.clone()),
    }
}

fn client(ns: &NameServer, ca_file: &Path) -> anyhow::Result<Client> {
    let mut config = ClientConfig::new(vec![ns.addr.clone()]).with_tls_ca_file(ca_file)?;
    // A refused handshake is final: no need to spend the default 3 s retrying it.
    config.send_deadline = Duration::from_secs(2);
    Ok(Client::new(config)?)
}

/// A TLS NameServer, a TLS three-replica group registered with it, and a client
/// trusting the cluster CA that has seen the group's leader in the routes.
async fn start(certs: &Certs) -> anyhow::Result<(NameServer, Cluster, Client)> {
    let tls = server_tls(&certs.cluster);
    let ns = NameServer::start_with_tls(tls.clone()).await?;
    let cluster = Cluster::start_with_settings(
        3,
        Settings {
            messaging: raftmq_broker::MessagingConfig {
                auto_create_topics: true,
                ..Default::default()
            },
            nameservers: vec![ns.addr.clone()],
            tls,
            ..Settings::default()
        },
    )
    .await?;
    // Elected over mutual TLS: the peers' certificates were accepted.
    let leader = cluster.wait_for_leader(DEADLINE).await?;
    let leader_addr = cluster.replica(leader).addr.to_string();
    let client = client(&ns, &certs.cluster.ca_file)?;
    eventually(
        DEADLINE,
        &format!("the NameServer (registered over TLS) to name leader {leader_addr}"),
        async || {
            Ok(match client.admin().list_cluster().await {
                Ok(groups) if groups.iter().any(|g| g.leader_endpoint == leader_addr) => Check::Done(()),
                other => Check::Pending(format!("{other:?}")),
            })
        },
    )
    .await?;
    Ok((ns, cluster, client))
}

/// Sends `count` messages through `client` and checks each was acknowledged.
async fn produce(client: &Client, from: u64, count: u64) -> anyhow::Result<()> {
    let producer = client.producer();
    for i in from..from + count {
        producer
            .send(TOPIC, pb::Message::new(format!("tls-{i}").into_bytes()))
            .await
            .with_context(|| format!("sending message {i} over TLS"))?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_cluster_serves_produce_and_consume_through_the_rust_client() -> anyhow::Result<()> {
    let _turn = ONE_AT_A_TIME.lock().await;
    let certs = certs()?;
    let (ns, cluster, client) = start(&certs).await?;
    produce(&client, 0, 50).await?;
    let route = wait_for_known_route(&client, TOPIC).await?;
    let (pulled, endpoints) = pull_everything(&client.pull_consumer(), &route, TOPIC).await?;
    let mut bodies: Vec<String> = pulled
        .iter()
        .map(|(_, _, m)| {
            String::from_utf8_lossy(&m.message.as_ref().map(|m| m.body.clone()).unwrap_or_default()).into_owned()
        })
        .collect();
    bodies.sort();
    let mut want: Vec<String> = (0..50).map(|i| format!("tls-{i}")).collect();
    want.sort();
    ensure!(bodies == want, "read back over TLS: {bodies:?}");
    ensure!(!endpoints.is_empty(), "no pull reached a broker");
    // Replication over the mutual-TLS peer port reached every replica.
    let leader = cluster.wait_for_leader(DEADLINE).await?;
    let last = cluster.replica(leader).metrics().last_log_index.unwrap_or(0);
    cluster.wait_applied(last).await?;
    cluster.shutdown().await?;
    ns.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_trusting_another_ca_is_refused_and_the_cluster_keeps_serving() -> anyhow::Result<()> {
    let _turn = ONE_AT_A_TIME.lock().await;
    let certs = certs()?;
    let (ns, cluster, client) = start(&certs).await?;
    let leader = cluster.wait_for_leader(DEADLINE).await?;
    let term = cluster.replica(leader).metrics().current_term;

    let stranger = self::client(&ns, &certs.foreign.ca_file)?;
    let err = stranger
        .admin()
        .list_cluster()
        .await
        .expect_err("a client trusting another CA got an answer");
    let text = format!("{err:#}");
    ensure!(
        text.contains("invalid peer certificate") && text.contains("UnknownIssuer"),
        "the refusal should name the certificate check: {text}"
    );
    let err = stranger
        .producer()
        .send(TOPIC, pb::Message::new(b"never".to_vec()))
        .await
        .expect_err("a send with the wrong CA was acknowledged");
    ensure!(format!("{err:#}").contains("certificate"), "{err:#}");

    produce(&client, 0, 10).await?;
    cluster.ensure_still_leads(leader, term, "after the refused client")?;
    cluster.shutdown().await?;
    ns.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_to_tls_ports_is_refused_and_the_cluster_keeps_serving() -> anyhow::Result<()> {
    use raftmq_proto::v1::messaging_service_client::MessagingServiceClient;
    use raftmq_proto::v1::name_server_service_client::NameServerServiceClient;

    let _turn = ONE_AT_A_TIME.lock().await;
    let certs = certs()?;
    let (ns, cluster, client) = start(&certs).await?;
    let leader = cluster.wait_for_leader(DEADLINE).await?;
    let term = cluster.replica(leader).metrics().current_term;

    // A plaintext HTTP/2 preface is not a TLS ClientHello: the server drops the
    // connection, so the plaintext client sees a broken connection, not an answer.
    let plain = |addr: String| async move {
        tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
            .connect_timeout(Duration::from_secs(2))
            .timeout(Duration::from_secs(2))
            .connect()
            .await
    };
    let refused = |what: &str, result: Result<tonic::Status, tonic::transport::Error>| -> anyhow::Result<()> {
        if let Ok(status) = &result {
            refused_by_transport(what, status)?;
        }
        let text = format!("{result:?}").to_lowercase();
        // The TLS server hung up (or its alert record reached the plaintext
        // client, which read it as a broken HTTP/2 frame): no answer, no timeout.
        ensure!(
            [
                "connection closed",
                "reset",
                "broken pipe",
                "early eof",
                "protocol error"
            ]
            .iter()
            .any(|sign| text.contains(sign)),
            "{what}: not refused by the server ending the connection: {text}"
        );
        Ok(())
    };
    let leader_addr = cluster.replica(leader).addr.to_string();
    let to_broker = match plain(leader_addr).await {
        Ok(ch) => Ok(MessagingServiceClient::new(ch)
            .send(pb::SendRequest {
                topic: TOPIC.into(),
                messages: vec![pb::Message::new(b"plaintext".to_vec())],
                ..Default::default()
            })
            .await
            .expect_err("a plaintext send to the TLS client port was answered")),
        Err(e) => Err(e),
    };
    refused("client port", to_broker)?;
    let to_namesrv = match plain(ns.addr.clone()).await {
        Ok(ch) => Ok(NameServerServiceClient::new(ch)
            .list_cluster(pb::ListClusterRequest {})
            .await
            .expect_err("a plaintext query to the TLS NameServer was answered")),
        Err(e) => Err(e),
    };
    refused("NameServer", to_namesrv)?;
    let to_peer = match plain(cluster.replica(leader).raft_addr.to_string()).await {
        Ok(ch) => Ok(RaftServiceClient::new(ch)
            .vote(signed_as(leader, "vote", vote_for_another_group()))
            .await
            .expect_err("a plaintext Raft RPC to the peer port was answered")),
        Err(e) => Err(e),
    };
    refused("Raft peer port", to_peer)?;

    produce(&client, 0, 10).await?;
    cluster.ensure_still_leads(leader, term, "after the plaintext attempts")?;
    cluster.shutdown().await?;
    ns.stop().await
}

/// Fails unless `status` is a failed connection rather than an answer: a status
/// a service returns carries no source, a transport failure does.
fn refused_by_transport(what: &str, status: &tonic::Status) -> anyhow::Result<()> {
    ensure!(
        std::error::Error::source(status).is_some(),
        "{what}: answered by the service, not refused by the transport: {status:?}"
    );
    Ok(())
}

/// A harmless Raft request: signed correctly, for a group this node is not in,
/// so a node that reads it answers INVALID_ARGUMENT and changes nothing.
fn vote_for_another_group() -> rpb::VoteRequest {
    rpb::VoteRequest {
        broker_group: "broker-z".into(),
        body: b"{}".to_vec(),
        leader_unreachable: false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_raft_peer_without_a_cluster_certificate_is_refused_and_the_group_keeps_its_leader() -> anyhow::Result<()> {
    let _turn = ONE_AT_A_TIME.lock().await;
    let certs = certs()?;
    let (ns, cluster, client) = start(&certs).await?;
    let leader = cluster.wait_for_leader(DEADLINE).await?;
    let before = cluster.replica(leader).metrics();
    let target = if leader == 1 { 2 } else { 1 };
    let peer_addr = cluster.replica(target).raft_addr.to_string();
    let read = |p: &Path| std::fs::read(p).with_context(|| format!("reading {}", p.display()));
    // Every dial trusts the cluster CA, so the server is checked and only the
    // client's certificate differs between the cases.
    let trust = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read(&certs.cluster.ca_file)?));
    let dial = |tls: ClientTlsConfig| {
        let addr = peer_addr.clone();
        async move {
            let ch = raftmq_tls::endpoint(&addr, Some(&tls))?
                .connect_timeout(Duration::from_secs(2))
                .timeout(Duration::from_secs(2))
                .connect_lazy();
            anyhow::Ok(RaftServiceClient::new(ch))
        }
    };
    // The worst forgery: an attacker holding the peer secret asks `target` to
    // take over, as if the leader sent it. Only the certificate stops it here.
    let transfer = || forged_transfer(before.vote, target);
    let foreign = Identity::from_pem(read(&certs.foreign.cert_file)?, read(&certs.foreign.key_file)?);
    for (what, tls) in [
        ("a certificate from another CA", trust.clone().identity(foreign)),
        ("no certificate", trust.clone()),
    ] {
        let err = dial(tls)
            .await?
            .transfer_leader(signed_as(leader, "transfer_leader", transfer()?))
            .await
            .expect_err(what);
        // Refused in the TLS layer: either the client read the server's alert
        // (rustls names it) or, in TLS 1.3, where the client finishes its side
        // of the handshake first, the server hung up under the first request
        // (seen as "connection closed", or as a broken pipe when the client was
        // still writing it).
        refused_by_transport(what, &err)?;
        let text = format!("{err:?}");
        ensure!(
            [
                "UnknownCA",
                "CertificateRequired",
                "BadCertificate",
                "DecryptError",
                "connection closed",
                "broken pipe"
            ]
            .iter()
            .any(|sign| text.contains(sign)),
            "{what}: refused for the wrong reason: {text}"
        );
    }
    // Control: the cluster's own certificate reaches the service, which reads the
    // (harmless) request and answers it.
    let member = Identity::from_pem(read(&certs.cluster.cert_file)?, read(&certs.cluster.key_file)?);
    let err = dial(trust.identity(member))
        .await?
        .vote(signed_as(leader, "vote", vote_for_another_group()))
        .await
        .expect_err("a vote for another group");
    ensure!(err.code() == tonic::Code::InvalidArgument, "{err:?}");

    // No election, no transfer: the group kept its leader and term throughout.
    cluster.ensure_still_leads(leader, before.current_term, "after the refused peers")?;
    produce(&client, 0, 10).await?;
    cluster.ensure_still_leads(leader, before.current_term, "after producing")?;
    cluster.shutdown().await?;
    ns.stop().await
}
