//! Signed requests and the ACL (#20): a group with `[auth] enabled` refuses
//! each bad credential (none, an unknown key, a wrong secret, a tampered
//! signature, an expired or replayed raftmq signature, a malformed header)
//! with UNAUTHENTICATED and its own message, refuses a known user lacking a
//! permission with PERMISSION_DENIED naming the resource and the permission, in
//! every family of RPCs, writes nothing for any of them, and keeps serving the
//! users it should. Users and rules are replicated: a rule added on the leader
//! is enforced by the new leader after a failover and by a restarted replica.

use std::time::Duration;

use anyhow::{Context, ensure};
use raftmq_client::{Client, ClientConfig, MessageExt};
use raftmq_proto::request_auth::{self, Credentials};
use raftmq_proto::rocketmq::v2;
use raftmq_proto::v1 as pb;
use tonic::Code;
use tonic::transport::Channel;

use super::fixtures::{Check, Cluster, DEADLINE, NameServer, ONE_AT_A_TIME, Settings, eventually};

const TOPIC: &str = "acl-orders";
const OTHER: &str = "acl-payments";
const ROOT: &str = "root";
const ROOT_SECRET: &str = "root-secret-0123456789";
const APP: &str = "app";
const APP_SECRET: &str = "app-secret-0123456789ab";

struct Secured {
    _dir: tempfile::TempDir,
    ns: NameServer,
    cluster: Cluster,
    root: Client,
}

fn credentials(access_key: &str, secret: &str) -> Credentials {
    Credentials {
        access_key: access_key.into(),
        secret: secret.into(),
    }
}

fn client_as(ns: &NameServer, cred: Option<&Credentials>) -> anyhow::Result<Client> {
    let mut config = ClientConfig::new(vec![ns.addr.clone()]);
    config.send_deadline = Duration::from_secs(2);
    if let Some(c) = cred {
        config = config.with_credentials(c.access_key.clone(), c.secret.clone());
    }
    Ok(Client::new(config)?)
}

/// A NameServer and a three-replica group requiring signed requests (bootstrap
/// admin `root`), with topics TOPIC and OTHER, and user `app` allowed PUB and
/// SUB on TOPIC and SUB as any group.
async fn start() -> anyhow::Result<Secured> {
    let dir = tempfile::tempdir()?;
    let secret_file = dir.path().join("root.secret");
    std::fs::write(&secret_file, format!("{ROOT_SECRET}\n"))?;
    let ns = NameServer::start().await?;
    let cluster = Cluster::start_with_settings(
        3,
        Settings {
            nameservers: vec![ns.addr.clone()],
            auth: raftmq_broker::auth::AuthConfig {
                enabled: true,
                admin_access_key: ROOT.into(),
                admin_secret_file: Some(secret_file),
                ..Default::default()
            },
            metrics: true,
            ..Settings::default()
        },
    )
    .await?;
    let leader = cluster.wait_for_leader(DEADLINE).await?;
    let leader_addr = cluster.replica(leader).addr.to_string();
    let root = client_as(&ns, Some(&credentials(ROOT, ROOT_SECRET)))?;
    eventually(
        DEADLINE,
        &format!("the NameServer to name leader {leader_addr}"),
        async || {
            Ok(match root.admin().list_cluster().await {
                Ok(groups) if groups.iter().any(|g| g.leader_endpoint == leader_addr) => Check::Done(()),
                other => Check::Pending(format!("{other:?}")),
            })
        },
    )
    .await?;
    let admin = root.admin();
    for t in [TOPIC, OTHER] {
        admin.create_topic(t, 2, pb::Permission::ReadWrite).await?;
    }
    ensure!(!admin.put_user(APP, APP_SECRET, false).await?, "app existed before");
    let rule = |kind: pb::AclResourceKind, pattern: &str, perms: &[pb::AclPermission]| pb::AclRuleProto {
        access_key: APP.into(),
        kind: kind as i32,
        pattern: pattern.into(),
        perms: perms.iter().map(|p| *p as i32).collect(),
        allow: true,
    };
    admin
        .put_acl_rule(rule(
            pb::AclResourceKind::Topic,
            "acl-ord*",
            &[pb::AclPermission::Pub, pb::AclPermission::Sub],
        ))
        .await?;
    admin
        .put_acl_rule(rule(pb::AclResourceKind::Group, "*", &[pb::AclPermission::Sub]))
        .await?;
    Ok(Secured {
        _dir: dir,
        ns,
        cluster,
        root,
    })
}

impl Secured {
    async fn stop(self) -> anyhow::Result<()> {
        self.cluster.shutdown().await?;
        self.ns.stop().await
    }

    async fn leader_channel(&self) -> anyhow::Result<Channel> {
        let leader = self.cluster.wait_for_leader(DEADLINE).await?;
        Ok(
            Channel::from_shared(format!("http://{}", self.cluster.replica(leader).addr))?
                .connect()
                .await?,
        )
    }

    /// The leader's `raftmq_auth_refusals_total` for `reason`.
    async fn refusals(&self, reason: &str) -> anyhow::Result<f64> {
        let leader = self.cluster.wait_for_leader(DEADLINE).await?;
        let addr = self
            .cluster
            .replica(leader)
            .node()
            .metrics_addr()
            .context("no metrics endpoint")?;
        let exp = super::metrics::scrape(addr).await?;
        super::metrics::must(&exp, "raftmq_auth_refusals", &[("reason", reason)])
    }

    /// Messages stored in TOPIC's and OTHER's queues on the leader.
    async fn stored(&self) -> anyhow::Result<usize> {
        let leader = self.cluster.wait_for_leader(DEADLINE).await?;
        let store = self.cluster.replica(leader).store();
        let mut n = 0;
        for t in [TOPIC, OTHER] {
            for q in 0..2 {
                n += store.read_messages(t, q, 0, 10_000)?.len();
            }
        }
        Ok(n)
    }
}

fn send_request(topic: &str, body: &str) -> pb::SendRequest {
    pb::SendRequest {
        topic: topic.into(),
        messages: vec![pb::Message::new(body.as_bytes().to_vec())],
        ..Default::default()
    }
}

/// `msg` with an `authorization` header as given.
fn with_header<T>(msg: T, value: &str) -> anyhow::Result<tonic::Request<T>> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut().insert(request_auth::AUTHORIZATION, value.parse()?);
    Ok(r)
}

const SEND: &str = "/raftmq.v1.MessagingService/Send";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_bad_credential_is_refused_with_its_own_error_and_nothing_is_written() -> anyhow::Result<()> {
    let _turn = ONE_AT_A_TIME.lock().await;
    let s = start().await?;
    let mut messaging = pb::messaging_service_client::MessagingServiceClient::new(s.leader_channel().await?);
    let app = credentials(APP, APP_SECRET);
    let now = raftmq_proto::registration_auth::unix_ms();
    let good = request_auth::sign_with(&app, SEND, now, "0a0b0c0d");
    // One hex digit of the MAC flipped.
    let tampered = {
        let last = good.chars().last().context("empty header")?;
        let flipped = if last == '0' { '1' } else { '0' };
        format!("{}{flipped}", &good[..good.len() - 1])
    };
    let before = s.stored().await?;
    let cases: Vec<(&str, Option<String>, &str)> = vec![
        ("no credentials", None, "no credentials"),
        (
            "an unknown key",
            Some(request_auth::sign(&credentials("mallory", APP_SECRET), SEND)),
            "unknown access key \"mallory\"",
        ),
        (
            "a wrong secret",
            Some(request_auth::sign(&credentials(APP, "not-the-secret-of-app"), SEND)),
            "does not match",
        ),
        ("a tampered signature", Some(tampered), "does not match"),
        (
            "an expired request",
            Some(request_auth::sign_with(&app, SEND, now - 600_000, "01")),
            "outside the 300 s signature window",
        ),
        (
            "a signature for another method",
            Some(request_auth::sign(&app, "/raftmq.v1.AdminService/ListTopics")),
            "does not match",
        ),
        (
            "a malformed header",
            Some(format!("{} Credential=app, Signature=zz", request_auth::RAFTMQ_SCHEME)),
            "malformed authorization header",
        ),
    ];
    for (what, header, says) in cases {
        let req = match &header {
            Some(h) => with_header(send_request(TOPIC, what), h)?,
            None => tonic::Request::new(send_request(TOPIC, what)),
        };
        let err = messaging.send(req).await.expect_err(what);
        ensure!(
            err.code() == Code::Unauthenticated && err.message().contains(says),
            "{what}: {err:?}"
        );
    }
    // The good signature works once; the same request again is a replay.
    messaging
        .send(with_header(send_request(TOPIC, "signed once"), &good)?)
        .await
        .context("the first use of a good signature")?;
    let err = messaging
        .send(with_header(send_request(TOPIC, "replayed"), &good)?)
        .await
        .expect_err("replay");
    ensure!(
        err.code() == Code::Unauthenticated && err.message().contains("replayed"),
        "replay: {err:?}"
    );
    ensure!(s.stored().await? == before + 1, "only the one signed send was stored");

    // The Rust client: with app's credentials it sends; without, it is refused.
    let signed = client_as(&s.ns, Some(&app))?;
    signed
        .producer()
        .send(TOPIC, pb::Message::new(b"from the client".to_vec()))
        .await?;
    let err = client_as(&s.ns, None)?
        .producer()
        .send(TOPIC, pb::Message::new(b"anonymous".to_vec()))
        .await
        .expect_err("an unsigned client was served");
    ensure!(err.code() == Some(Code::Unauthenticated), "{err:?}");
    ensure!(s.stored().await? == before + 2);
    // Counted: the 7 cases, the replay and the unsigned client's attempts.
    let counted = s.refusals("unauthenticated").await?;
    ensure!(
        counted >= 9.0,
        "raftmq_auth_refusals_total{{reason=unauthenticated}} is {counted}"
    );
    s.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_permission_is_refused_in_every_family_of_rpcs() -> anyhow::Result<()> {
    let _turn = ONE_AT_A_TIME.lock().await;
    let s = start().await?;
    let ch = s.leader_channel().await?;
    let app = credentials(APP, APP_SECRET);
    let as_app = |method: &str| request_auth::sign(&app, method);
    let before = s.stored().await?;
    let denied = |what: &str, r: Result<(), tonic::Status>, names: &[&str]| -> anyhow::Result<()> {
        let err = r.err().with_context(|| format!("{what} was allowed"))?;
        ensure!(err.code() == Code::PermissionDenied, "{what}: {err:?}");
        for n in names {
            ensure!(
                err.message().contains(n),
                "{what}: {:?} does not name {n}",
                err.message()
            );
        }
        Ok(())
    };

    // Messaging: PUB on a topic no rule covers.
    let mut m = pb::messaging_service_client::MessagingServiceClient::new(ch.clone());
    let r = m
        .send(with_header(send_request(OTHER, "x"), &as_app(SEND))?)
        .await
        .map(drop);
    denied(
        "send to another topic",
        r,
        &["PUB", "topic \"acl-payments\"", "\"app\""],
    )?;
    let r = m
        .pull(with_header(
            pb::PullRequest {
                topic: OTHER.into(),
                max_messages: 1,
                ..Default::default()
            },
            &as_app("/raftmq.v1.MessagingService/Pull"),
        )?)
        .await
        .map(drop);
    denied("pull another topic", r, &["SUB", "topic \"acl-payments\""])?;

    // Consumers: SUB on the topic (the group is allowed).
    let mut c = pb::consumer_service_client::ConsumerServiceClient::new(ch.clone());
    let r = c
        .receive(with_header(
            pb::ReceiveRequest {
                consumer_group: "g1".into(),
                topic: OTHER.into(),
                max_messages: 1,
                invisible_duration_ms: 30_000,
                ..Default::default()
            },
            &as_app("/raftmq.v1.ConsumerService/Receive"),
        )?)
        .await
        .map(drop);
    denied("receive from another topic", r, &["SUB", "topic \"acl-payments\""])?;

    // Admin: ADMIN on the topic.
    let mut a = pb::admin_service_client::AdminServiceClient::new(ch.clone());
    let r = a
        .delete_topic(with_header(
            pb::DeleteTopicRequest { name: TOPIC.into() },
            &as_app("/raftmq.v1.AdminService/DeleteTopic"),
        )?)
        .await
        .map(drop);
    denied("delete a topic", r, &["ADMIN", "topic \"acl-orders\""])?;
    // Membership: ADMIN on the cluster.
    let r = a
        .transfer_leader(with_header(
            pb::TransferLeaderRequest::default(),
            &as_app("/raftmq.v1.AdminService/TransferLeader"),
        )?)
        .await
        .map(drop);
    denied("transfer leadership", r, &["ADMIN", "the cluster"])?;

    // Users and rules: ADMIN on the cluster.
    let mut acl = pb::acl_service_client::AclServiceClient::new(ch.clone());
    let r = acl
        .put_user(with_header(
            pb::PutUserRequest {
                access_key: APP.into(),
                secret: "a-new-secret-of-my-own".into(),
                admin: true,
            },
            &as_app("/raftmq.v1.AclService/PutUser"),
        )?)
        .await
        .map(drop);
    denied("make oneself an admin", r, &["ADMIN", "the cluster"])?;

    // The RocketMQ 5 gateway, with the SDKs' MQv2-HMAC-SHA1 signature.
    let mut rmq = v2::messaging_service_client::MessagingServiceClient::new(ch.clone());
    let v2_send = |topic: &str| -> anyhow::Result<tonic::Request<v2::SendMessageRequest>> {
        let date = "20261130T120000Z";
        let mut r = with_header(
            v2::SendMessageRequest {
                messages: vec![v2::Message {
                    topic: Some(v2::Resource {
                        name: topic.into(),
                        ..Default::default()
                    }),
                    system_properties: Some(v2::SystemProperties {
                        message_id: format!("01{topic}"),
                        body_encoding: v2::Encoding::Identity as i32,
                        message_type: v2::MessageType::Normal as i32,
                        ..Default::default()
                    }),
                    body: b"v2".to_vec(),
                    ..Default::default()
                }],
            },
            &request_auth::sign_mqv2(&app, date),
        )?;
        r.metadata_mut().insert(request_auth::MQ_DATE_TIME, date.parse()?);
        r.metadata_mut().insert("x-mq-client-id", "acl-test@1".parse()?);
        Ok(r)
    };
    let r = rmq.send_message(v2_send(OTHER)?).await.map(drop);
    denied("an SDK send to another topic", r, &["PUB", "topic \"acl-payments\""])?;
    let resp = rmq
        .send_message(v2_send(TOPIC)?)
        .await
        .context("an SDK send app may make")?
        .into_inner();
    ensure!(
        resp.status.as_ref().map(|s| s.code) == Some(v2::Code::Ok as i32),
        "{resp:?}"
    );
    ensure!(s.stored().await? == before + 1, "only the allowed SDK send was stored");

    // What app may do, it does; and root still may do everything.
    let client = client_as(&s.ns, Some(&app))?;
    client
        .producer()
        .send(TOPIC, pb::Message::new(b"allowed".to_vec()))
        .await?;
    ensure!(
        s.root.admin().delete_topic(OTHER).await?,
        "root could not delete a topic"
    );
    let counted = s.refusals("permission_denied").await?;
    ensure!(
        counted >= 7.0,
        "raftmq_auth_refusals_total{{reason=permission_denied}} is {counted}"
    );
    s.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acl_changes_are_replicated_and_enforced_after_a_leader_kill_and_a_restart() -> anyhow::Result<()> {
    let _turn = ONE_AT_A_TIME.lock().await;
    let mut s = start().await?;
    let app = client_as(&s.ns, Some(&credentials(APP, APP_SECRET)))?;
    let send = async |client: &Client, topic: &str| {
        client
            .producer()
            .send(topic, pb::Message::new(b"m".to_vec()))
            .await
            .map(drop)
    };
    send(&app, TOPIC).await.context("app's allowed send")?;
    // A deny more specific than the allow: app may no longer send to TOPIC.
    s.root
        .admin()
        .put_acl_rule(pb::AclRuleProto {
            access_key: APP.into(),
            kind: pb::AclResourceKind::Topic as i32,
            pattern: TOPIC.into(),
            perms: vec![pb::AclPermission::Pub as i32],
            allow: false,
        })
        .await?;
    let err = send(&app, TOPIC).await.expect_err("denied on the leader");
    ensure!(err.code() == Some(Code::PermissionDenied), "{err:?}");

    let old = s.cluster.wait_for_leader(DEADLINE).await?;
    s.cluster.replica_mut(old).kill().await;
    let new = s.cluster.wait_for_leader_other_than(Some(old), DEADLINE).await?;
    // The new leader enforces the deny (the client follows it there).
    let err = eventually(DEADLINE, "the new leader to answer app", async || {
        Ok(match send(&app, TOPIC).await {
            Err(e) if e.code() == Some(Code::PermissionDenied) => Check::Done(e),
            other => Check::Pending(format!("{other:?}")),
        })
    })
    .await?;
    ensure!(err.to_string().contains("PUB"), "{err}");
    // And still serves what is allowed: app's SUB on TOPIC is untouched, and
    // the admin can still change rules through the new leader.
    ensure!(s.cluster.replica(new).store().with_acl(|a| a.allows(
        APP,
        raftmq_raft_store::Permission::Sub,
        raftmq_raft_store::ResourceKind::Topic,
        TOPIC
    )));
    s.root
        .admin()
        .delete_acl_rule(APP, pb::AclResourceKind::Topic, TOPIC)
        .await
        .context("deleting the deny through the new leader")?;
    eventually(DEADLINE, "app's send to be allowed again", async || {
        Ok(match send(&app, TOPIC).await {
            Ok(()) => Check::Done(()),
            other => Check::Pending(format!("{other:?}")),
        })
    })
    .await?;

    // The killed replica comes back with the same users and rules, from its
    // disk and the log it catches up on.
    s.cluster.replica_mut(old).restart().await?;
    eventually(DEADLINE, "the restarted replica to catch up on the ACL", async || {
        let same = |id| {
            s.cluster.replica(id).store().with_acl(|a| {
                (
                    a.users().map(|u| u.access_key.clone()).collect::<Vec<_>>(),
                    a.rules().cloned().collect::<Vec<_>>(),
                )
            })
        };
        Ok(if same(old) == same(new) {
            Check::Done(())
        } else {
            Check::Pending(format!("{:?} vs {:?}", same(old), same(new)))
        })
    })
    .await?;
    s.stop().await
}
