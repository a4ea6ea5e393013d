//! Keeps every NameServer told about this replica: its endpoint, the group's term
//! and leader, the other replicas, and the topics it serves. Sent at start, every
//! `registration_interval`, and at once when the term, the leader or the
//! membership changes, or this node changes a topic, so routes follow a failover
//! (or a new topic) within one round trip rather than one heartbeat. NameServers are independent: one being down delays nobody.
//!
//! A replica that is not yet a member of its group (a fresh node waiting to be
//! added) does not register: it serves nothing routes could point at. One that
//! was removed ([`crate::membership`]) stops registering, so the NameServers
//! drop it after their broker timeout.

use std::time::Duration;

use openraft::async_runtime::WatchReceiver;
use raftmq_proto::v1 as pb;
use raftmq_proto::v1::name_server_service_client::NameServerServiceClient;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use crate::convert;
use crate::group::GroupHandle;

/// How long one registration RPC may take before it is abandoned until the next round.
const RPC_TIMEOUT: Duration = Duration::from_secs(1);

/// What makes a registration urgent: a change of any of these.
#[derive(Debug, Clone, PartialEq, Eq)]
struct RoleKey {
    term: u64,
    leader: Option<u64>,
    members: Vec<u64>,
}

fn role_key(group: &GroupHandle) -> RoleKey {
    let metrics = group.raft().metrics();
    let m = metrics.borrow_watched();
    RoleKey {
        term: m.current_term,
        leader: m.current_leader,
        members: m.membership_config.membership().nodes().map(|(id, _)| *id).collect(),
    }
}

fn request(group: &GroupHandle, cluster: &str, endpoint: &str) -> pb::RegisterBrokerRequest {
    let key = role_key(group);
    let leader_endpoint = key.leader.map(|l| group.endpoint_of(l)).unwrap_or_default();
    let follower_endpoints = key
        .members
        .iter()
        .filter(|id| Some(**id) != key.leader)
        .map(|id| group.endpoint_of(*id))
        .collect();
    // Each topic with its queue count, permission and message type: the
    // NameServer's routes carry all three (the type for RocketMQ 5 clients).
    // Not the trace flag: routes do not need it, and a NameServer built before
    // it would re-encode the request without it and find the signature wrong.
    let topics = match group.store().topics() {
        Ok(t) => t
            .into_iter()
            .map(|t| pb::TopicConfig {
                trace: None,
                ..convert::topic_to_pb(t)
            })
            .collect(),
        Err(e) => {
            // Still register: liveness and leadership matter even without topics.
            tracing::warn!(error = %e, "reading topics for NameServer registration failed");
            Vec::new()
        }
    };
    pb::RegisterBrokerRequest {
        cluster: cluster.to_owned(),
        broker_group: group.group().to_owned(),
        node_id: group.node_id(),
        endpoint: endpoint.to_owned(),
        term: key.term,
        leader_id: key.leader,
        leader_endpoint,
        follower_endpoints,
        topics,
    }
}

/// Starts the registration loop; it ends when `shutdown` is cancelled.
/// Who registers: the cluster name, this node's advertised client endpoint,
/// and the cluster secret registrations are signed with (`None`: unsigned).
pub struct Identity {
    pub cluster: String,
    pub endpoint: String,
    pub secret: Option<std::sync::Arc<[u8]>>,
}

/// The registration as sent: signed when there is a cluster secret. Signed per
/// send, not once per round, so every NameServer sees a fresh time.
fn signed(req: pb::RegisterBrokerRequest, secret: Option<&[u8]>) -> tonic::Request<pb::RegisterBrokerRequest> {
    use prost::Message as _;
    let value = secret.map(|s| {
        raftmq_proto::registration_auth::sign(s, &req.encode_to_vec(), raftmq_proto::registration_auth::unix_ms())
    });
    let mut r = tonic::Request::new(req);
    if let Some(v) = value.and_then(|v| v.parse().ok()) {
        r.metadata_mut()
            .insert(raftmq_proto::registration_auth::REGISTRATION_AUTH_KEY, v);
    }
    r
}

pub fn spawn(
    group: GroupHandle,
    Identity {
        cluster,
        endpoint,
        secret,
    }: Identity,
    nameservers: &[String],
    interval: Duration,
    shutdown: CancellationToken,
) -> JoinHandle<()> {
    let clients: Vec<(String, NameServerServiceClient<Channel>)> = nameservers
        .iter()
        .filter_map(|addr| match group.client_endpoint(addr) {
            Ok(ep) => Some((
                addr.clone(),
                NameServerServiceClient::new(ep.timeout(RPC_TIMEOUT).connect_lazy()),
            )),
            Err(e) => {
                tracing::error!(namesrv = %addr, error = %e, "invalid NameServer address; not registering with it");
                None
            }
        })
        .collect();
    let tasks = group.tasks().clone();
    tasks.spawn(async move {
        // Role, term, leader and membership are server metrics: they change
        // with those only, not with every replication ack.
        let mut metrics = group.raft().server_metrics();
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last: Option<RoleKey> = None;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tick.tick() => {}
                _ = group.topics_changed_notified() => {}
                changed = metrics.changed() => {
                    if changed.is_err() {
                        break; // Raft stopped.
                    }
                    if last.as_ref() == Some(&role_key(&group)) {
                        continue;
                    }
                }
            }
            if let Some(removed) = group.removed() {
                tracing::info!(reason = %removed.message, "no longer registering with NameServers");
                break;
            }
            let key = role_key(&group);
            if key.members.is_empty() {
                // Not a member yet: nothing to route to this node.
                last = Some(key);
                continue;
            }
            let req = request(&group, &cluster, &endpoint);
            last = Some(key);
            let sends = clients.iter().map(|(addr, client)| {
                let (mut client, req) = (client.clone(), signed(req.clone(), secret.as_deref()));
                async move {
                    if let Err(status) = client.register_broker(req).await {
                        if status.code() == tonic::Code::Unauthenticated {
                            // A cluster secret that differs from the NameServer's:
                            // this node stays out of routes until someone fixes it.
                            tracing::warn!(namesrv = %addr, error = %status, "registration refused; retrying next round");
                        } else {
                            tracing::debug!(namesrv = %addr, error = %status, "registration failed; retrying next round");
                        }
                    }
                }
            });
            futures::future::join_all(sends).await;
        }
    })
}
