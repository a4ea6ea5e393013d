//! Where the gateway's calls go: raftmq's own `raftmq.v1` services on the
//! leader of a broker group, called in-process when this node leads its group
//! and over gRPC otherwise, following not-leader answers to the new leader.
//!
//! RocketMQ 5 SDKs keep the endpoints of a route for a long time (the Rust SDK
//! forever, Python for 30 s), so the node an SDK talks to is often not its
//! group's leader; refusing would break them across every failover. Forwarding
//! here makes a leader change cost the SDK at most its own retry.
//!
//! Which failures are retried is the caller's choice ([`Retry`]): a not-leader
//! answer always (nothing was done), an UNAVAILABLE only for calls that are safe
//! to repeat (sends carry a producer id and sequence the leader de-duplicates;
//! ending a transaction twice is answered "already ended").

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::async_runtime::WatchReceiver;
use raftmq_proto::request_auth::SignedChannel;
use raftmq_proto::v1 as pb;
use tokio::time::Instant;
use tonic::Status;

use crate::api_error::{ApiError, LEADER_METADATA_KEY};
use crate::group::GroupHandle;

/// Channels kept to other nodes. The endpoints come from our own membership and
/// the NameServers' routes, not from clients, so this only guards against a
/// cluster that keeps renaming its nodes.
const MAX_CHANNELS: usize = 256;
/// How long a NameServer's view of the cluster is reused.
const CLUSTER_TTL: Duration = Duration::from_secs(2);
/// Longest wait between two attempts while no leader is known.
const LEADER_POLL: Duration = Duration::from_millis(100);

/// Where one attempt of a call runs.
#[derive(Clone)]
pub enum Target {
    /// This node leads the group: call the service in-process.
    Local,
    /// Another node (the group's leader, as far as we know).
    /// Signed as this broker (see [`crate::auth`]) when auth is on: the
    /// gateway checked the SDK's request before forwarding it.
    Remote(SignedChannel),
}

/// Which failures a call retries (within its time budget).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// Only not-leader answers: the call was not carried out.
    NotLeader,
    /// Also UNAVAILABLE or a broken connection (leader gone, write outcome
    /// unknown): for calls whose repetition is harmless.
    Unavailable,
}

/// The leader could not be reached, or the connection to it broke mid-call
/// (tonic reports a reset connection as UNKNOWN "transport error").
fn lost_connection(s: &Status) -> bool {
    s.code() == tonic::Code::Unavailable
        || (s.code() == tonic::Code::Unknown && s.message().contains("transport error"))
}

/// A broker group as the NameServers (or this node's membership) describe it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupInfo {
    pub name: String,
    /// Client endpoints, the leader's first when one is known.
    pub endpoints: Vec<String>,
}

/// A topic on one broker group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicRoute {
    pub group: GroupInfo,
    pub queues: u32,
    pub perm: u8,
    pub message_type: raftmq_raft_store::TopicMessageType,
}

/// The gateway's way to the leaders of every broker group.
#[derive(Clone)]
pub struct Upstream {
    inner: Arc<Inner>,
}

struct Inner {
    group: GroupHandle,
    nameservers: Vec<String>,
    max_message_bytes: usize,
    connect_timeout: Duration,
    channels: Mutex<HashMap<String, SignedChannel>>,
    cluster: Mutex<Option<(Instant, Vec<GroupInfo>)>>,
}

impl Upstream {
    pub fn new(
        group: GroupHandle,
        nameservers: Vec<String>,
        max_message_bytes: usize,
        connect_timeout: Duration,
    ) -> Self {
        Upstream {
            inner: Arc::new(Inner {
                group,
                nameservers,
                max_message_bytes,
                connect_timeout,
                channels: Mutex::new(HashMap::new()),
                cluster: Mutex::new(None),
            }),
        }
    }

    pub fn group(&self) -> &GroupHandle {
        &self.inner.group
    }

    pub fn local_group(&self) -> &str {
        self.inner.group.group()
    }

    pub fn max_message_bytes(&self) -> usize {
        self.inner.max_message_bytes
    }

    /// A lazily connected channel to `endpoint` (host:port), reused by every call.
    pub fn channel(&self, endpoint: &str) -> Result<SignedChannel, Status> {
        let mut channels = self.inner.channels.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = channels.get(endpoint) {
            return Ok(c.clone());
        }
        if channels.len() >= MAX_CHANNELS {
            channels.clear();
        }
        let channel = self
            .inner
            .group
            .client_endpoint(endpoint)
            .map_err(|e| Status::internal(format!("endpoint {endpoint:?}: {e}")))?
            .connect_timeout(self.inner.connect_timeout)
            .tcp_nodelay(true)
            .connect_lazy();
        let channel = SignedChannel::new(channel, self.inner.group.auth().forwarding_credentials());
        channels.insert(endpoint.to_owned(), channel.clone());
        Ok(channel)
    }

    /// Runs `f` on the leader of `group`, retrying as `retry` allows until
    /// `budget` is spent; the last failure is returned as it came.
    pub async fn call<T, F, Fut>(&self, group: &str, retry: Retry, budget: Duration, f: F) -> Result<T, Status>
    where
        F: Fn(Target) -> Fut,
        Fut: std::future::Future<Output = Result<T, Status>>,
    {
        let deadline = Instant::now() + budget;
        let mut target = self.first_target(group).await?;
        loop {
            let status = match f(target).await {
                Ok(v) => return Ok(v),
                Err(s) => s,
            };
            let leader = match status.metadata().get(LEADER_METADATA_KEY) {
                Some(v) => Some(v.to_str().unwrap_or_default().to_owned()),
                None if retry == Retry::Unavailable && lost_connection(&status) => None,
                None => return Err(status),
            };
            if Instant::now() >= deadline {
                return Err(status);
            }
            tracing::debug!(group, leader = ?leader, code = ?status.code(), "retrying at the group's leader");
            target = match leader.filter(|l| !l.is_empty()) {
                Some(endpoint) => self.target_for(group, &endpoint)?,
                None => {
                    self.wait_for_leader(group, deadline).await;
                    self.first_target(group).await?
                }
            };
        }
    }

    /// Where a call to `group` starts: in-process for our own group (the local
    /// service answers not-leader with the leader's address if we do not lead),
    /// else the leader a NameServer reported.
    async fn first_target(&self, group: &str) -> Result<Target, Status> {
        let g = &self.inner.group;
        if group == g.group() {
            return Ok(match g.ensure_leader() {
                Err(ApiError::NotLeader { leader_endpoint }) if !leader_endpoint.is_empty() => {
                    self.target_for(group, &leader_endpoint)?
                }
                _ => Target::Local,
            });
        }
        let info = self.group_info(group, false).await?;
        let endpoint = info.endpoints.first().ok_or_else(|| {
            Status::unavailable(format!(
                "broker group {group} has no reachable replica in the NameServers' routes"
            ))
        })?;
        Ok(Target::Remote(self.channel(endpoint)?))
    }

    fn target_for(&self, group: &str, endpoint: &str) -> Result<Target, Status> {
        let g = &self.inner.group;
        if group == g.group() && endpoint == g.endpoint_of(g.node_id()) {
            return Ok(Target::Local);
        }
        Ok(Target::Remote(self.channel(endpoint)?))
    }

    /// Until a leader may be known again: for our group, the next change of
    /// role or leader in Raft's metrics; for another, a fresh NameServer view.
    async fn wait_for_leader(&self, group: &str, deadline: Instant) {
        let until = deadline.min(Instant::now() + LEADER_POLL);
        if group == self.inner.group.group() {
            let mut server = self.inner.group.raft().server_metrics();
            let _ = tokio::time::timeout_at(until, server.changed()).await;
        } else {
            tokio::time::sleep_until(until).await;
            let _ = self.group_info(group, true).await;
        }
    }

    /// Our own group as its membership says: every replica's client endpoint,
    /// the leader's first.
    pub fn local_info(&self) -> GroupInfo {
        let g = &self.inner.group;
        let metrics = g.raft().metrics();
        let m = metrics.borrow_watched();
        let leader = m.current_leader;
        let mut endpoints: Vec<(bool, String)> = m
            .membership_config
            .membership()
            .nodes()
            .map(|(id, n)| (Some(*id) != leader, n.addr.clone()))
            .collect();
        endpoints.sort();
        GroupInfo {
            name: g.group().to_owned(),
            endpoints: endpoints.into_iter().map(|(_, e)| e).collect(),
        }
    }

    /// One broker group by name (ours from membership, others from a NameServer).
    pub async fn group_info(&self, group: &str, refresh: bool) -> Result<GroupInfo, Status> {
        if group == self.inner.group.group() {
            return Ok(self.local_info());
        }
        self.cluster(refresh)
            .await?
            .into_iter()
            .find(|g| g.name == group)
            .ok_or_else(|| Status::not_found(format!("broker group {group:?} is not known to the NameServers")))
    }

    /// The broker group whose name hashes to `crc` (receipt handles and message
    /// ids carry the crc32c of their group's name).
    pub async fn group_by_crc(&self, crc: u32) -> Result<String, Status> {
        let local = self.inner.group.group();
        if crc32c::crc32c(local.as_bytes()) == crc {
            return Ok(local.to_owned());
        }
        for refresh in [false, true] {
            if let Some(g) = self
                .cluster(refresh)
                .await?
                .into_iter()
                .find(|g| crc32c::crc32c(g.name.as_bytes()) == crc)
            {
                return Ok(g.name);
            }
        }
        Err(Status::not_found(format!(
            "no broker group of this cluster issued it (group hash {crc:08x})"
        )))
    }

    /// Every broker group the NameServers know (cached for [`CLUSTER_TTL`]).
    async fn cluster(&self, refresh: bool) -> Result<Vec<GroupInfo>, Status> {
        if !refresh {
            let cached = self.inner.cluster.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((at, groups)) = cached.as_ref()
                && at.elapsed() < CLUSTER_TTL
            {
                return Ok(groups.clone());
            }
        }
        let mut last = Status::unavailable("no NameServer is configured on this broker");
        for ns in &self.inner.nameservers {
            let mut client = pb::name_server_service_client::NameServerServiceClient::new(self.channel(ns)?);
            match client.list_cluster(pb::ListClusterRequest {}).await {
                Ok(resp) => {
                    let groups: Vec<GroupInfo> = resp
                        .into_inner()
                        .groups
                        .into_iter()
                        .map(|g| {
                            let mut endpoints = Vec::new();
                            if !g.leader_endpoint.is_empty() {
                                endpoints.push(g.leader_endpoint.clone());
                            }
                            for r in g.replicas {
                                if !endpoints.contains(&r.endpoint) && !r.endpoint.is_empty() {
                                    endpoints.push(r.endpoint);
                                }
                            }
                            GroupInfo {
                                name: g.broker_group,
                                endpoints,
                            }
                        })
                        .collect();
                    *self.inner.cluster.lock().unwrap_or_else(|p| p.into_inner()) =
                        Some((Instant::now(), groups.clone()));
                    return Ok(groups);
                }
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    /// Every broker group serving `topic`: ours from the applied state and
    /// membership (fresh, and no NameServer needed), the others from a NameServer.
    pub async fn topic_routes(&self, topic: &str) -> Result<Vec<TopicRoute>, Status> {
        let g = &self.inner.group;
        let mut routes = Vec::new();
        if let Some(t) = g
            .store()
            .topic(topic)
            .map_err(|e| Status::internal(format!("reading topic config: {e}")))?
        {
            routes.push(TopicRoute {
                group: self.local_info(),
                queues: t.queues,
                perm: t.perm,
                message_type: t.message_type,
            });
        }
        for ns in &self.inner.nameservers {
            let mut client = pb::name_server_service_client::NameServerServiceClient::new(self.channel(ns)?);
            let resp = match client
                .query_route(pb::QueryRouteRequest {
                    topic: topic.to_owned(),
                })
                .await
            {
                Ok(r) => r.into_inner(),
                Err(s) if s.code() == tonic::Code::NotFound => break,
                Err(e) => {
                    tracing::debug!(nameserver = %ns, error = %e, "route query failed; trying the next NameServer");
                    continue;
                }
            };
            for gr in resp.groups {
                if gr.broker_group == g.group() {
                    continue;
                }
                let mut endpoints = Vec::new();
                if !gr.leader_endpoint.is_empty() {
                    endpoints.push(gr.leader_endpoint.clone());
                }
                endpoints.extend(gr.follower_endpoints.iter().filter(|e| !e.is_empty()).cloned());
                let message_type = crate::convert::message_type_from_pb(gr.message_type)
                    .ok()
                    .flatten()
                    .unwrap_or(raftmq_raft_store::TopicMessageType::Mixed);
                routes.push(TopicRoute {
                    group: GroupInfo {
                        name: gr.broker_group,
                        endpoints,
                    },
                    queues: gr.queues,
                    perm: crate::convert::perm_from_pb(gr.perm).unwrap_or(0),
                    message_type,
                });
            }
            break;
        }
        Ok(routes)
    }
}
