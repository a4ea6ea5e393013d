//! The NameServer's in-memory registry: the latest registration of every broker
//! node, when it was heard from, and the route and cluster views computed from
//! the live ones. Pure logic over an injected clock, so liveness is testable
//! without waiting. The registry is rebuilt from heartbeats after a restart; it
//! persists nothing (NameServers are stateless, as in RocketMQ).

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use raftmq_proto::v1 as pb;

/// Why a registration was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RegistrationError {
    #[error("registration lacks {field}")]
    Missing { field: &'static str },
    #[error("broker group name {name:?} is invalid: {reason}")]
    BadGroup { name: String, reason: &'static str },
}

#[derive(Debug, Clone)]
struct Record {
    reg: pb::RegisterBrokerRequest,
    seen: Instant,
}

/// Broker registrations keyed by (group, node id).
#[derive(Debug, Default)]
pub struct Registry {
    nodes: HashMap<(String, u64), Record>,
}

/// RocketMQ's rule for names, applied to broker groups as to topics.
pub fn check_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("empty");
    }
    if name.len() > 127 {
        return Err("longer than 127 characters");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'%' | b'|' | b'_' | b'-'))
    {
        return Err("only letters, digits, '%', '|', '_' and '-' are allowed");
    }
    Ok(())
}

impl Registry {
    /// Records a node's registration (a heartbeat is a registration repeated).
    pub fn register(&mut self, reg: pb::RegisterBrokerRequest, now: Instant) -> Result<(), RegistrationError> {
        check_name(&reg.broker_group).map_err(|reason| RegistrationError::BadGroup {
            name: reg.broker_group.clone(),
            reason,
        })?;
        if reg.endpoint.is_empty() {
            return Err(RegistrationError::Missing { field: "endpoint" });
        }
        let key = (reg.broker_group.clone(), reg.node_id);
        if let Some(old) = self.nodes.get(&key)
            && old.reg.term > reg.term
        {
            // A delayed heartbeat from before the last election must not roll the
            // route back to a stale leader; it still proves the node is alive.
            tracing::debug!(group = %reg.broker_group, node_id = reg.node_id, "stale registration term");
            self.nodes.get_mut(&key).expect("present").seen = now;
            return Ok(());
        }
        self.nodes.insert(key, Record { reg, seen: now });
        Ok(())
    }

    /// Drops nodes not heard from within `timeout`; returns how many.
    pub fn expire(&mut self, now: Instant, timeout: Duration) -> usize {
        let before = self.nodes.len();
        self.nodes.retain(|(group, node_id), r| {
            let alive = now.saturating_duration_since(r.seen) <= timeout;
            if !alive {
                tracing::info!(%group, node_id, "broker node missed its heartbeats; dropped from routes");
            }
            alive
        });
        before - self.nodes.len()
    }

    fn groups(&self, now: Instant, timeout: Duration) -> BTreeMap<&str, Vec<&pb::RegisterBrokerRequest>> {
        let mut groups: BTreeMap<&str, Vec<&pb::RegisterBrokerRequest>> = BTreeMap::new();
        for r in self.nodes.values() {
            if now.saturating_duration_since(r.seen) <= timeout {
                groups.entry(r.reg.broker_group.as_str()).or_default().push(&r.reg);
            }
        }
        for regs in groups.values_mut() {
            regs.sort_by_key(|r| r.node_id);
        }
        groups
    }

    /// Per live group: the registration that speaks for it (highest term; a
    /// leader's own registration wins its term) and the leader it names.
    fn view<'a>(regs: &[&'a pb::RegisterBrokerRequest]) -> GroupView<'a> {
        let best = regs
            .iter()
            .copied()
            .max_by_key(|r| (r.term, r.leader_id == Some(r.node_id), r.leader_id.is_some()))
            .expect("a group has at least one live node");
        // A leader the NameServer has not heard from within the timeout is not
        // routed to: clients then ask a live replica, whose NOT_LEADER answer
        // names the current leader, instead of dialling a dead node.
        let leader = best.leader_id.and_then(|id| regs.iter().find(|r| r.node_id == id));
        GroupView {
            best,
            leader_id: leader.map(|r| r.node_id),
            leader_endpoint: leader.map(|r| r.endpoint.clone()).unwrap_or_default(),
        }
    }

    /// The route of `topic`: every live group that serves it. Empty when none does.
    pub fn route(&self, topic: &str, now: Instant, timeout: Duration) -> Vec<pb::GroupRoute> {
        let mut out = Vec::new();
        for (group, regs) in self.groups(now, timeout) {
            let view = Self::view(&regs);
            let Some(cfg) = view.best.topics.iter().find(|t| t.name == topic) else {
                continue;
            };
            out.push(pb::GroupRoute {
                broker_group: group.to_owned(),
                leader_endpoint: view.leader_endpoint.clone(),
                follower_endpoints: regs
                    .iter()
                    .filter(|r| Some(r.node_id) != view.leader_id)
                    .map(|r| r.endpoint.clone())
                    .collect(),
                queues: cfg.queues_per_group,
                perm: cfg.perm,
                message_type: route_message_type(cfg.message_type),
            });
        }
        out
    }

    /// Every live group with its replicas' roles as their registrations state them.
    pub fn cluster(&self, now: Instant, timeout: Duration) -> Vec<pb::GroupStatus> {
        self.groups(now, timeout)
            .into_iter()
            .map(|(group, regs)| {
                let view = Self::view(&regs);
                pb::GroupStatus {
                    broker_group: group.to_owned(),
                    term: view.best.term,
                    leader_id: view.leader_id,
                    leader_endpoint: view.leader_endpoint.clone(),
                    replicas: regs
                        .iter()
                        .map(|r| pb::ReplicaStatus {
                            node_id: r.node_id,
                            endpoint: r.endpoint.clone(),
                            role: if Some(r.node_id) == view.leader_id {
                                pb::ReplicaRole::Leader
                            } else {
                                pb::ReplicaRole::Follower
                            } as i32,
                            // Registrations carry roles, not log positions; the
                            // broker's own ClusterStatus reports those.
                            last_log_index: None,
                            applied_index: None,
                            matched_index: None,
                            last_ack_ms: None,
                        })
                        .collect(),
                    reported_by: view.best.node_id,
                    committed_index: None,
                    // Storage figures come from the broker's own ClusterStatus.
                    ..Default::default()
                }
            })
            .collect()
    }
}

/// A registered topic's message type as routes give it. A broker built before
/// topics had a type registers none (UNSPECIFIED); its topics accept every type,
/// which routes say as MIXED. Values this NameServer does not know pass through.
fn route_message_type(registered: i32) -> i32 {
    if registered == pb::MessageType::Unspecified as i32 {
        pb::MessageType::Mixed as i32
    } else {
        registered
    }
}

struct GroupView<'a> {
    best: &'a pb::RegisterBrokerRequest,
    leader_id: Option<u64>,
    leader_endpoint: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    const TIMEOUT: Duration = Duration::from_secs(10);

    fn reg(group: &str, node_id: u64, term: u64, leader: Option<u64>, topics: &[&str]) -> pb::RegisterBrokerRequest {
        pb::RegisterBrokerRequest {
            cluster: "c".into(),
            broker_group: group.into(),
            node_id,
            endpoint: format!("10.0.0.{node_id}:10911"),
            term,
            leader_id: leader,
            leader_endpoint: leader.map(|l| format!("10.0.0.{l}:10911")).unwrap_or_default(),
            follower_endpoints: vec![],
            topics: topics
                .iter()
                .map(|t| pb::TopicConfig {
                    name: (*t).into(),
                    queues_per_group: 4,
                    perm: pb::Permission::ReadWrite as i32,
                    message_type: pb::MessageType::Fifo as i32,
                    trace: None,
                })
                .collect(),
        }
    }

    #[test]
    fn routes_carry_the_topic_message_type_and_an_untyped_registration_is_mixed() {
        let now = Instant::now();
        let mut r = Registry::default();
        r.register(reg("broker-a", 1, 1, Some(1), &["orders"]), now).unwrap();
        let mut old = reg("broker-b", 2, 1, Some(2), &["orders"]);
        // A broker built before topics had a type.
        old.topics[0].message_type = pb::MessageType::Unspecified as i32;
        r.register(old, now).unwrap();
        let mut route = r.route("orders", now, TIMEOUT);
        route.sort_by(|a, b| a.broker_group.cmp(&b.broker_group));
        let types: Vec<_> = route
            .iter()
            .map(|g| (g.broker_group.as_str(), g.message_type()))
            .collect();
        assert_eq!(
            types,
            [
                ("broker-a", pb::MessageType::Fifo),
                ("broker-b", pb::MessageType::Mixed)
            ]
        );
    }

    #[test]
    fn route_names_the_leader_and_followers_of_each_serving_group() {
        let now = Instant::now();
        let mut r = Registry::default();
        for n in 0..3 {
            r.register(reg("broker-a", n, 2, Some(1), &["orders"]), now).unwrap();
        }
        r.register(reg("broker-b", 7, 1, Some(7), &["other"]), now).unwrap();
        let route = r.route("orders", now, TIMEOUT);
        assert_eq!(route.len(), 1);
        assert_eq!(route[0].broker_group, "broker-a");
        assert_eq!(route[0].leader_endpoint, "10.0.0.1:10911");
        assert_eq!(route[0].follower_endpoints, vec!["10.0.0.0:10911", "10.0.0.2:10911"]);
        assert_eq!(route[0].queues, 4);
        assert!(r.route("missing", now, TIMEOUT).is_empty());
    }

    #[test]
    fn a_newer_term_moves_the_leader_and_a_stale_heartbeat_does_not_move_it_back() {
        let now = Instant::now();
        let mut r = Registry::default();
        r.register(reg("g", 1, 1, Some(1), &["t"]), now).unwrap();
        r.register(reg("g", 2, 2, Some(2), &["t"]), now).unwrap();
        assert_eq!(r.route("t", now, TIMEOUT)[0].leader_endpoint, "10.0.0.2:10911");
        // Node 1's delayed heartbeat from term 1 after it registered term 2.
        r.register(reg("g", 1, 2, Some(2), &["t"]), now).unwrap();
        r.register(reg("g", 1, 1, Some(1), &["t"]), now).unwrap();
        assert_eq!(r.route("t", now, TIMEOUT)[0].leader_endpoint, "10.0.0.2:10911");
    }

    #[test]
    fn silent_nodes_leave_routes_after_the_timeout() {
        let start = Instant::now();
        let mut r = Registry::default();
        r.register(reg("g", 1, 1, Some(1), &["t"]), start).unwrap();
        r.register(reg("g", 2, 1, Some(1), &["t"]), start + Duration::from_secs(8))
            .unwrap();
        let later = start + Duration::from_secs(12);
        // Node 1 (the leader) is past the timeout: the route shows no leader rather
        // than a dead one, and node 2 as a reachable replica.
        let route = r.route("t", later, TIMEOUT);
        assert_eq!(route[0].leader_endpoint, "");
        assert_eq!(route[0].follower_endpoints, vec!["10.0.0.2:10911"]);
        assert_eq!(r.expire(later, TIMEOUT), 1);
        assert_eq!(r.cluster(later, TIMEOUT)[0].replicas.len(), 1);
    }

    #[test]
    fn bad_registrations_are_refused_with_the_reason() {
        let mut r = Registry::default();
        let mut bad = reg("bad group!", 1, 1, None, &[]);
        assert!(matches!(
            r.register(bad.clone(), Instant::now()),
            Err(RegistrationError::BadGroup { .. })
        ));
        bad.broker_group = "ok".into();
        bad.endpoint.clear();
        assert_eq!(
            r.register(bad, Instant::now()),
            Err(RegistrationError::Missing { field: "endpoint" })
        );
    }
}
