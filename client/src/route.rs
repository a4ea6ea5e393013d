//! Route discovery and connections: a per-topic cache of NameServer answers and one
//! lazily connected, long-lived tonic `Channel` per endpoint. Routes are refreshed
//! when older than `route_refresh_interval` (checked on use, so an idle client
//! costs nothing) and when the `leader` module's policy asks for it; that module
//! also writes leaders learned from redirects into the cache.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use raftmq_proto::v1 as pb;
use raftmq_proto::v1::name_server_service_client::NameServerServiceClient;
/// What every call goes through: a channel that signs calls when the client
/// has credentials.
pub type RpcChannel = raftmq_proto::request_auth::SignedChannel;

use crate::config::ClientConfig;
use crate::error::Error;

/// gRPC metadata key carrying the leader's endpoint on a not-leader answer
/// (the broker's `raftmq_broker::LEADER_METADATA_KEY`; repeated so the client
/// does not depend on the broker crate).
pub const LEADER_METADATA_KEY: &str = "raftmq-leader";

/// Pull answers may exceed gRPC's default 4 MiB (one message may be 4 MiB).
const MAX_MESSAGE_BYTES: usize = 64 << 20;
/// How often a channel with requests in flight pings its server (see
/// `ClientConfig::dead_connection_timeout`).
const PING_INTERVAL: Duration = Duration::from_millis(200);

/// One topic's route: per serving broker group its leader, followers and queues.
#[derive(Debug, Clone, PartialEq)]
pub struct TopicRoute {
    pub topic: String,
    /// Sorted by group name so queue selection is the same in every process.
    pub groups: Vec<pb::GroupRoute>,
    /// Built from the cluster listing because no NameServer knew the topic yet
    /// (a broker may auto-create it on first send): queue counts are unknown (0).
    pub provisional: bool,
    fetched_at: Instant,
}

impl TopicRoute {
    fn new(mut resp: pb::QueryRouteResponse, provisional: bool) -> TopicRoute {
        resp.groups.sort_by(|a, b| a.broker_group.cmp(&b.broker_group));
        TopicRoute {
            topic: resp.topic,
            groups: resp.groups,
            provisional,
            fetched_at: Instant::now(),
        }
    }

    pub fn group(&self, name: &str) -> Option<&pb::GroupRoute> {
        self.groups.iter().find(|g| g.broker_group == name)
    }
}

#[derive(Default)]
pub(crate) struct RouteCache {
    topics: Mutex<HashMap<String, Arc<TopicRoute>>>,
}

impl RouteCache {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<TopicRoute>>> {
        // The map holds plain data; a panic elsewhere cannot leave it half-updated.
        self.topics.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn get(&self, topic: &str) -> Option<Arc<TopicRoute>> {
        self.lock().get(topic).cloned()
    }

    pub(crate) fn put(&self, resp: pb::QueryRouteResponse) -> Arc<TopicRoute> {
        self.insert(TopicRoute::new(resp, false))
    }

    fn insert(&self, route: TopicRoute) -> Arc<TopicRoute> {
        let route = Arc::new(route);
        self.lock().insert(route.topic.clone(), route.clone());
        route
    }

    pub(crate) fn invalidate(&self, topic: &str) {
        self.lock().remove(topic);
    }

    /// A not-leader answer named the group's leader: believe it at once (it comes
    /// from a replica's Raft state, fresher than any NameServer) and demote the old
    /// leader to follower so reads and later fallbacks still know it.
    pub(crate) fn set_leader(&self, topic: &str, group: &str, leader: &str) {
        let mut topics = self.lock();
        let Some(route) = topics.get(topic) else { return };
        let mut route = TopicRoute::clone(route);
        if let Some(g) = route.groups.iter_mut().find(|g| g.broker_group == group) {
            if g.leader_endpoint == leader {
                return;
            }
            let old = std::mem::replace(&mut g.leader_endpoint, leader.to_owned());
            g.follower_endpoints.retain(|f| f != leader);
            if !old.is_empty() && !g.follower_endpoints.contains(&old) {
                g.follower_endpoints.push(old);
            }
        }
        topics.insert(topic.to_owned(), Arc::new(route));
    }
}

/// What producers, consumers and admins share.
pub(crate) struct Core {
    pub(crate) config: ClientConfig,
    /// Built once from `config.tls`; cloned into every channel.
    tls: Option<tonic::transport::ClientTlsConfig>,
    channels: Mutex<HashMap<String, RpcChannel>>,
    /// Shared by every channel: each call is signed with them.
    credentials: Option<Arc<raftmq_proto::request_auth::Credentials>>,
    pub(crate) routes: RouteCache,
    /// Endpoints that failed recently (see `leader`).
    pub(crate) dead: crate::leader::DeadSet,
    pub(crate) hedges: crate::leader::Hedges,
    /// Broker groups that recently had no reachable leader (see `leader`).
    pub(crate) faults: crate::leader::GroupFaults,
}

impl Core {
    pub(crate) fn new(config: ClientConfig) -> Core {
        Core {
            tls: config.tls.as_ref().map(raftmq_tls::ClientTls::config),
            credentials: config.credentials.clone().map(Arc::new),
            config,
            channels: Mutex::new(HashMap::new()),
            routes: RouteCache::default(),
            dead: crate::leader::DeadSet::default(),
            hedges: crate::leader::Hedges::default(),
            faults: crate::leader::GroupFaults::default(),
        }
    }

    /// The channel to `endpoint`, created on first use and reused after. A lazy
    /// channel reconnects by itself, so one entry serves an endpoint for the
    /// client's lifetime, across restarts of the node behind it.
    pub(crate) fn channel(&self, endpoint: &str) -> Result<RpcChannel, Error> {
        let mut channels = self.channels.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(c) = channels.get(endpoint) {
            return Ok(c.clone());
        }
        let mut ep = raftmq_tls::endpoint(endpoint, self.tls.as_ref())
            .map_err(|e| Error::Protocol {
                endpoint: endpoint.to_owned(),
                reason: e.to_string(),
            })?
            .connect_timeout(self.config.connect_timeout)
            .tcp_nodelay(true);
        if let Some(timeout) = self.config.dead_connection_timeout {
            // Pings only while requests are in flight: an idle channel costs nothing.
            ep = ep
                .http2_keep_alive_interval(PING_INTERVAL)
                .keep_alive_timeout(timeout)
                .keep_alive_while_idle(false);
        }
        let channel = RpcChannel::new(ep.connect_lazy(), self.credentials.clone());
        channels.insert(endpoint.to_owned(), channel.clone());
        Ok(channel)
    }

    pub(crate) fn max_message_bytes(&self) -> usize {
        MAX_MESSAGE_BYTES
    }

    /// Runs one RPC against `endpoint`, bounded by `timeout`, turning every failure
    /// into an [`Error`] that names the endpoint.
    pub(crate) async fn call<T, F, Fut>(&self, endpoint: &str, timeout: Duration, f: F) -> Result<T, Error>
    where
        F: FnOnce(RpcChannel) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let channel = self.channel(endpoint)?;
        match tokio::time::timeout(timeout, f(channel)).await {
            Ok(Ok(resp)) => Ok(resp.into_inner()),
            Ok(Err(status)) => Err(Error::from_status(endpoint, &status)),
            Err(_) => Err(Error::Timeout {
                endpoint: endpoint.to_owned(),
                timeout,
            }),
        }
    }

    /// The cached route, or a fresh one when absent or older than the refresh
    /// interval. A provisional route is asked for again on every use: the
    /// NameServers learn an auto-created topic within a registration round, and
    /// until then keyed sends cannot keep their order.
    pub(crate) async fn route(&self, topic: &str) -> Result<Arc<TopicRoute>, Error> {
        if let Some(r) = self.routes.get(topic)
            && !r.provisional
            && r.fetched_at.elapsed() < self.config.route_refresh_interval
        {
            return Ok(r);
        }
        self.refresh(topic).await
    }

    /// Asks the NameServers in order; the first answer wins. A topic no NameServer
    /// knows gets a provisional route over every live group (from ListCluster), so a
    /// send can reach a broker that auto-creates topics.
    #[tracing::instrument(skip(self), level = "debug")]
    pub(crate) async fn refresh(&self, topic: &str) -> Result<Arc<TopicRoute>, Error> {
        let mut reasons = Vec::new();
        let mut unknown_topic = false;
        for ns in &self.config.nameservers {
            let req = pb::QueryRouteRequest {
                topic: topic.to_owned(),
            };
            match self
                .call(ns, self.config.request_timeout, |ch| async move {
                    NameServerServiceClient::new(ch).query_route(req).await
                })
                .await
            {
                Ok(resp) if !resp.groups.is_empty() => return Ok(self.routes.put(resp)),
                Ok(_) => unknown_topic = true,
                Err(Error::Rpc {
                    code: tonic::Code::NotFound,
                    ..
                }) => unknown_topic = true,
                Err(
                    e @ Error::Rpc {
                        code: tonic::Code::InvalidArgument,
                        ..
                    },
                ) => return Err(e),
                Err(e) => {
                    tracing::debug!(nameserver = %ns, error = %e, "route query failed");
                    reasons.push(e.to_string());
                }
            }
        }
        if unknown_topic {
            let groups = self.list_cluster().await?;
            let groups: Vec<pb::GroupRoute> = groups
                .into_iter()
                .map(|g| pb::GroupRoute {
                    broker_group: g.broker_group,
                    follower_endpoints: g
                        .replicas
                        .into_iter()
                        .map(|r| r.endpoint)
                        .filter(|e| *e != g.leader_endpoint)
                        .collect(),
                    leader_endpoint: g.leader_endpoint,
                    queues: 0,
                    perm: pb::Permission::ReadWrite as i32,
                    message_type: pb::MessageType::Unspecified as i32,
                })
                .collect();
            if groups.is_empty() {
                return Err(Error::NoRoute {
                    topic: topic.to_owned(),
                    reason: "no live broker group is registered".into(),
                });
            }
            let resp = pb::QueryRouteResponse {
                topic: topic.to_owned(),
                groups,
            };
            return Ok(self.routes.insert(TopicRoute::new(resp, true)));
        }
        Err(Error::NoRoute {
            topic: topic.to_owned(),
            reason: reasons.join("; "),
        })
    }

    /// Every live broker group as the first answering NameServer sees it.
    pub(crate) async fn list_cluster(&self) -> Result<Vec<pb::GroupStatus>, Error> {
        let mut last = None;
        for ns in &self.config.nameservers {
            match self
                .call(ns, self.config.request_timeout, |ch| async move {
                    NameServerServiceClient::new(ch)
                        .list_cluster(pb::ListClusterRequest {})
                        .await
                })
                .await
            {
                Ok(resp) => return Ok(resp.groups),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| Error::Config {
            key: "nameservers".into(),
            value: "[]".into(),
            reason: "no NameServer to ask".into(),
        }))
    }
}
