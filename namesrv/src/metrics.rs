//! The NameServer's Prometheus metrics: registrations and route queries counted
//! as they are served (atomic adds), the registry's live groups and nodes read
//! at scrape time, and client connections. Served by
//! [`raftmq_proto::metrics_http`] on the NameServer's metrics port.

use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;
use raftmq_proto::metrics_http::ConnectionCounts;

/// What the NameServer's handlers count.
#[derive(Debug, Clone, Default)]
pub struct NameServerMetrics {
    pub registrations: Counter,
    /// Registrations refused for a missing, stale or wrong signature.
    pub registrations_refused: Counter,
    pub route_queries: Counter,
    /// Route queries answered NOT_FOUND (no live group serves the topic).
    pub route_misses: Counter,
    pub connections: ConnectionCounts,
}

/// Reads the registry's live state at scrape time.
struct RegistryCollector {
    registry: Arc<Mutex<crate::Registry>>,
    broker_timeout: Duration,
}

impl fmt::Debug for RegistryCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RegistryCollector").finish_non_exhaustive()
    }
}

impl Collector for RegistryCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), fmt::Error> {
        let groups = self
            .registry
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .cluster(Instant::now(), self.broker_timeout);
        let nodes: usize = groups.iter().map(|g| g.replicas.len()).sum();
        let leaderless = groups.iter().filter(|g| g.leader_id.is_none()).count();
        for (name, help, value) in [
            (
                "raftmq_namesrv_broker_groups",
                "Broker groups with a live registration",
                groups.len(),
            ),
            (
                "raftmq_namesrv_broker_nodes",
                "Broker nodes with a live registration",
                nodes,
            ),
            (
                "raftmq_namesrv_leaderless_groups",
                "Live broker groups whose registrations name no leader",
                leaderless,
            ),
        ] {
            let g = ConstGauge::new(i64::try_from(value).unwrap_or(i64::MAX));
            g.encode(enc.encode_descriptor(name, help, None, g.metric_type())?)?;
        }
        Ok(())
    }
}

impl NameServerMetrics {
    /// The registry the NameServer serves.
    pub(crate) fn registry(&self, registry: Arc<Mutex<crate::Registry>>, broker_timeout: Duration) -> Registry {
        let mut r = Registry::default();
        r.register(
            "raftmq_namesrv_registrations",
            "Broker registrations received",
            self.registrations.clone(),
        );
        r.register(
            "raftmq_namesrv_registrations_refused",
            "Broker registrations refused for a missing, stale or wrong cluster-secret signature",
            self.registrations_refused.clone(),
        );
        r.register(
            "raftmq_namesrv_route_queries",
            "Route queries answered",
            self.route_queries.clone(),
        );
        r.register(
            "raftmq_namesrv_route_misses",
            "Route queries for a topic no live broker group serves",
            self.route_misses.clone(),
        );
        self.connections.register(&mut r);
        r.register_collector(Box::new(RegistryCollector {
            registry,
            broker_timeout,
        }));
        r
    }
}
