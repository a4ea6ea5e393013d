//! What the console API answers: the cluster's protobuf answers turned into plain
//! JSON for the pages (names instead of enum numbers, a replica's lag and health
//! worked out once here rather than in JavaScript, message bodies bounded).

use std::collections::BTreeMap;

use raftmq_proto::v1 as pb;
use serde::Serialize;

/// Longest body preview a message view carries; the rest is only counted.
pub const BODY_PREVIEW_BYTES: usize = 4096;

#[derive(Serialize)]
pub struct ClusterView {
    /// "leaders" when every group's leader answered, "nameserver" when the
    /// console fell back to the NameServers' view (no log progress then).
    pub source: &'static str,
    /// Why the leaders' view could not be had, when it could not.
    pub warning: Option<String>,
    pub groups: Vec<GroupView>,
}

#[derive(Serialize)]
pub struct GroupView {
    pub broker_group: String,
    pub term: u64,
    pub leader_id: Option<u64>,
    pub leader_endpoint: String,
    pub reported_by: u64,
    pub committed_index: Option<u64>,
    pub log_bytes: u64,
    pub log_segments: u32,
    pub oldest_message_ms: Option<u64>,
    pub retention_horizon: u64,
    pub disk_used_ratio: Option<f64>,
    pub disk_full: bool,
    pub replicas: Vec<ReplicaView>,
}

#[derive(Serialize)]
pub struct ReplicaView {
    pub node_id: u64,
    pub endpoint: String,
    pub role: &'static str,
    pub last_log_index: Option<u64>,
    pub applied_index: Option<u64>,
    pub matched_index: Option<u64>,
    /// Entries the leader holds that this replica is not known to hold.
    pub lag: Option<u64>,
    pub last_ack_ms: Option<u64>,
    /// "ok", "unreachable" (silent past any election timeout), "no contact"
    /// (never acknowledged this leader) or "unknown" (no leader's view).
    pub health: &'static str,
}

impl GroupView {
    pub fn from_pb(g: pb::GroupStatus) -> GroupView {
        // The reporter's own log end: what a follower's matched index lags behind
        // when the reporter leads.
        let leader_log = g
            .replicas
            .iter()
            .find(|r| Some(r.node_id) == g.leader_id && r.node_id == g.reported_by)
            .and_then(|r| r.last_log_index);
        let replicas = g
            .replicas
            .iter()
            .map(|r| {
                let role = pb::ReplicaRole::try_from(r.role).unwrap_or_default();
                let is_leader = Some(r.node_id) == g.leader_id;
                let lag = match (leader_log, is_leader, r.matched_index) {
                    (Some(_), true, _) => Some(0),
                    (Some(end), false, Some(matched)) => Some(end.saturating_sub(matched)),
                    _ => None,
                };
                let health = match (is_leader && leader_log.is_some(), r.last_ack_ms, r.matched_index) {
                    (true, _, _) => "ok",
                    (false, Some(ms), _) if ms > crate::tools::UNREACHABLE_AFTER_MS => "unreachable",
                    (false, Some(_), _) => "ok",
                    (false, None, Some(_)) => "no contact",
                    (false, None, None) => "unknown",
                };
                ReplicaView {
                    node_id: r.node_id,
                    endpoint: r.endpoint.clone(),
                    role: role_name(role),
                    last_log_index: r.last_log_index,
                    applied_index: r.applied_index,
                    matched_index: r.matched_index,
                    lag,
                    last_ack_ms: r.last_ack_ms,
                    health,
                }
            })
            .collect();
        GroupView {
            broker_group: g.broker_group,
            term: g.term,
            leader_id: g.leader_id,
            leader_endpoint: g.leader_endpoint,
            reported_by: g.reported_by,
            committed_index: g.committed_index,
            log_bytes: g.log_bytes,
            log_segments: g.log_segments,
            oldest_message_ms: g.oldest_message_ms,
            retention_horizon: g.retention_horizon,
            disk_used_ratio: g.disk_used_ratio,
            disk_full: g.disk_full,
            replicas,
        }
    }
}

fn role_name(r: pb::ReplicaRole) -> &'static str {
    match r {
        pb::ReplicaRole::Leader => "leader",
        pb::ReplicaRole::Follower => "follower",
        pb::ReplicaRole::Candidate => "candidate",
        pb::ReplicaRole::Learner => "learner",
        pb::ReplicaRole::Unspecified => "unknown",
    }
}

pub fn perm_name(p: i32) -> &'static str {
    match pb::Permission::try_from(p).unwrap_or_default() {
        pb::Permission::ReadWrite | pb::Permission::Unspecified => "read_write",
        pb::Permission::Read => "read",
        pb::Permission::Write => "write",
    }
}

#[derive(Serialize)]
pub struct TopicList {
    pub topics: Vec<TopicSummary>,
}

#[derive(Serialize)]
pub struct TopicSummary {
    pub name: String,
    /// Retry and dead-letter topics (`%RETRY%g`, `%DLQ%g`) and other `%` names.
    pub system: bool,
    pub groups: Vec<TopicOnGroup>,
}

#[derive(Serialize)]
pub struct TopicOnGroup {
    pub broker_group: String,
    pub queues: u32,
    pub perm: &'static str,
    pub message_type: &'static str,
}

impl TopicList {
    /// `Admin::list_topics`' (group, topic) pairs as one entry per topic.
    pub fn from_pairs(pairs: Vec<(String, pb::TopicConfig)>) -> TopicList {
        let mut by_name: BTreeMap<String, Vec<TopicOnGroup>> = BTreeMap::new();
        for (group, t) in pairs {
            by_name.entry(t.name.clone()).or_default().push(TopicOnGroup {
                broker_group: group,
                queues: t.queues_per_group,
                perm: perm_name(t.perm),
                message_type: crate::tools::message_type_name(t.message_type()),
            });
        }
        TopicList {
            topics: by_name
                .into_iter()
                .map(|(name, groups)| TopicSummary {
                    system: name.starts_with('%'),
                    name,
                    groups,
                })
                .collect(),
        }
    }
}

#[derive(Serialize)]
pub struct TopicDetail {
    pub name: String,
    pub groups: Vec<TopicGroupDetail>,
    /// Sum of every queue's max offset: messages ever stored in the topic (the
    /// pages chart its change as the send rate).
    pub max_offset_sum: u64,
    /// Messages the queues still hold (max - min, summed).
    pub retained: u64,
}

#[derive(Serialize)]
pub struct TopicGroupDetail {
    pub broker_group: String,
    pub perm: &'static str,
    pub message_type: &'static str,
    pub queues: Vec<QueueView>,
}

#[derive(Serialize)]
pub struct QueueView {
    pub queue_id: u32,
    pub min_offset: Option<u64>,
    pub max_offset: Option<u64>,
    /// Why the offsets are missing (the group's leader did not answer).
    pub error: Option<String>,
}

#[derive(Serialize)]
pub struct MessageList {
    pub messages: Vec<MessageView>,
}

/// A message's trace (#19): its recorded events, oldest first.
#[derive(Serialize)]
pub struct TraceView {
    pub events: Vec<TraceEventView>,
}

#[derive(Serialize)]
pub struct TraceEventView {
    /// `PRODUCED`, `DELIVERED`, `ACKED`, `RETRIED`, `DEAD_LETTERED`.
    pub kind: String,
    pub time_ms: u64,
    pub broker_group: String,
    pub node_id: u64,
    pub topic: String,
    pub queue_id: u32,
    pub queue_offset: Option<u64>,
    pub producer: String,
    pub raft_index: u64,
    pub consumer_group: String,
    pub client_id: String,
    pub attempt: u32,
    pub from_topic: String,
    pub next_delivery_ms: u64,
    pub detail: String,
}

impl TraceEventView {
    pub fn from_pb(e: pb::TraceEvent) -> TraceEventView {
        let kind = pb::TraceEventKind::try_from(e.kind)
            .map(|k| k.as_str_name().trim_start_matches("TRACE_EVENT_KIND_").to_owned())
            .unwrap_or_else(|_| format!("kind {}", e.kind));
        TraceEventView {
            kind,
            time_ms: e.time_ms,
            broker_group: e.broker_group,
            node_id: e.node_id,
            topic: e.topic,
            queue_id: e.queue_id,
            queue_offset: e.queue_offset,
            producer: e.producer,
            raft_index: e.raft_index,
            consumer_group: e.consumer_group,
            client_id: e.client_id,
            attempt: e.attempt,
            from_topic: e.from_topic,
            next_delivery_ms: e.next_delivery_ms,
            detail: e.detail,
        }
    }
}

#[derive(Serialize)]
pub struct MessageView {
    pub message_id: String,
    pub topic: String,
    /// Known when the message was read from a queue (browse, DLQ).
    pub broker_group: Option<String>,
    pub queue_id: u32,
    pub queue_offset: u64,
    pub store_timestamp_ms: u64,
    pub born_timestamp_ms: u64,
    pub deliver_at_ms: u64,
    pub reconsume_times: u32,
    pub tag: String,
    pub keys: Vec<String>,
    pub properties: BTreeMap<String, String>,
    pub body_bytes: usize,
    /// The body's first `BODY_PREVIEW_BYTES` bytes as text (invalid UTF-8 replaced).
    pub body_preview: String,
    pub body_truncated: bool,
}

impl MessageView {
    pub fn from_pb(broker_group: Option<String>, p: pb::PulledMessage) -> MessageView {
        let m = p.message.unwrap_or_default();
        let shown = &m.body[..m.body.len().min(BODY_PREVIEW_BYTES)];
        MessageView {
            message_id: p.message_id,
            topic: m.topic,
            broker_group,
            queue_id: p.queue_id,
            queue_offset: p.queue_offset,
            store_timestamp_ms: p.store_timestamp_ms,
            born_timestamp_ms: m.born_timestamp_ms,
            deliver_at_ms: m.deliver_at_ms,
            reconsume_times: p.reconsume_times,
            tag: m.tag,
            keys: m.keys,
            properties: m.properties.into_iter().collect(),
            body_bytes: m.body.len(),
            body_preview: String::from_utf8_lossy(shown).into_owned(),
            body_truncated: m.body.len() > BODY_PREVIEW_BYTES,
        }
    }
}

#[derive(Serialize)]
pub struct BrowseView {
    pub topic: String,
    pub broker_group: String,
    pub queue_id: u32,
    pub min_offset: u64,
    pub max_offset: u64,
    /// Where the next page starts.
    pub next_offset: u64,
    pub messages: Vec<MessageView>,
}

#[derive(Serialize)]
pub struct ConsumerGroupList {
    pub groups: Vec<ConsumerGroupSummary>,
}

#[derive(Serialize)]
pub struct ConsumerGroupSummary {
    pub name: String,
    pub topics: Vec<String>,
    /// The most live members any broker group's leader counts (a member of a
    /// topic on several groups heartbeats to each, so the counts are not summed).
    pub live_members: u32,
    pub total_lag: u64,
    pub broker_groups: Vec<String>,
}

impl ConsumerGroupList {
    pub fn from_pb(answers: Vec<pb::ListConsumerGroupsResponse>) -> ConsumerGroupList {
        let mut by_name: BTreeMap<String, ConsumerGroupSummary> = BTreeMap::new();
        for a in answers {
            for g in a.groups {
                let s = by_name
                    .entry(g.consumer_group.clone())
                    .or_insert_with(|| ConsumerGroupSummary {
                        name: g.consumer_group.clone(),
                        topics: Vec::new(),
                        live_members: 0,
                        total_lag: 0,
                        broker_groups: Vec::new(),
                    });
                for t in g.topics {
                    if !s.topics.contains(&t) {
                        s.topics.push(t);
                    }
                }
                s.live_members = s.live_members.max(g.live_members);
                s.total_lag += g.total_lag;
                s.broker_groups.push(a.broker_group.clone());
            }
        }
        ConsumerGroupList {
            groups: by_name.into_values().collect(),
        }
    }
}

#[derive(Serialize)]
pub struct ConsumerGroupDetail {
    pub name: String,
    pub total_lag: u64,
    pub broker_groups: Vec<ConsumerGroupOnBroker>,
}

#[derive(Serialize)]
pub struct ConsumerGroupOnBroker {
    pub broker_group: String,
    pub members: Vec<MemberView>,
    pub queues: Vec<ConsumerQueueView>,
}

#[derive(Serialize)]
pub struct MemberView {
    pub client_id: String,
    pub topic: String,
    pub tag_expression: String,
    pub queue_ids: Vec<u32>,
    pub last_heartbeat_ms_ago: u64,
}

#[derive(Serialize)]
pub struct ConsumerQueueView {
    pub topic: String,
    pub queue_id: u32,
    pub committed_offset: Option<u64>,
    pub min_offset: u64,
    pub max_offset: u64,
    pub lag: u64,
    /// Messages retention removed before the group consumed them.
    pub skipped: u64,
    /// The member holding the queue; empty when none.
    pub client_id: String,
}

impl ConsumerQueueView {
    pub fn from_pb(q: pb::ConsumerQueueStatus) -> ConsumerQueueView {
        ConsumerQueueView {
            topic: q.topic,
            queue_id: q.queue_id,
            committed_offset: q.committed_offset,
            min_offset: q.min_offset,
            max_offset: q.max_offset,
            lag: q.lag,
            skipped: q.skipped,
            client_id: q.client_id,
        }
    }
}

impl ConsumerGroupDetail {
    pub fn from_pb(name: &str, answers: Vec<pb::DescribeConsumerGroupResponse>) -> ConsumerGroupDetail {
        let broker_groups: Vec<ConsumerGroupOnBroker> = answers
            .into_iter()
            .map(|d| ConsumerGroupOnBroker {
                broker_group: d.broker_group,
                members: d
                    .members
                    .into_iter()
                    .map(|m| MemberView {
                        client_id: m.client_id,
                        topic: m.topic,
                        tag_expression: m.tag_expression,
                        queue_ids: m.queue_ids,
                        last_heartbeat_ms_ago: m.last_heartbeat_ms_ago,
                    })
                    .collect(),
                queues: d.queues.into_iter().map(ConsumerQueueView::from_pb).collect(),
            })
            .collect();
        ConsumerGroupDetail {
            name: name.to_owned(),
            total_lag: broker_groups.iter().flat_map(|b| &b.queues).map(|q| q.lag).sum(),
            broker_groups,
        }
    }
}

#[derive(Serialize)]
pub struct ResetView {
    pub queues: Vec<ConsumerQueueView>,
}

#[derive(Serialize)]
pub struct ResendView {
    pub message_id: String,
    pub broker_group: String,
    pub queue_id: u32,
    pub queue_offset: u64,
}

#[derive(Serialize)]
pub struct Done {
    pub ok: bool,
    /// Delete: whether any broker group had the topic.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub existed: Option<bool>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn replica(node_id: u64, role: pb::ReplicaRole) -> pb::ReplicaStatus {
        pb::ReplicaStatus {
            node_id,
            endpoint: format!("127.0.0.1:{}", 10910 + node_id),
            role: role as i32,
            ..Default::default()
        }
    }

    #[test]
    fn console_replica_lag_and_health_come_from_the_leaders_view() {
        let mut leader = replica(1, pb::ReplicaRole::Leader);
        leader.last_log_index = Some(100);
        let mut fresh = replica(2, pb::ReplicaRole::Follower);
        fresh.matched_index = Some(97);
        fresh.last_ack_ms = Some(20);
        let mut silent = replica(3, pb::ReplicaRole::Follower);
        silent.matched_index = Some(40);
        silent.last_ack_ms = Some(5_000);
        let g = GroupView::from_pb(pb::GroupStatus {
            broker_group: "broker-a".into(),
            term: 3,
            leader_id: Some(1),
            reported_by: 1,
            replicas: vec![leader, fresh, silent],
            ..Default::default()
        });
        let seen: Vec<_> = g.replicas.iter().map(|r| (r.role, r.lag, r.health)).collect();
        assert_eq!(
            seen,
            vec![
                ("leader", Some(0), "ok"),
                ("follower", Some(3), "ok"),
                ("follower", Some(60), "unreachable")
            ]
        );
        // The NameServers' view: nobody's progress is known.
        let g = GroupView::from_pb(pb::GroupStatus {
            leader_id: Some(1),
            replicas: vec![
                replica(1, pb::ReplicaRole::Leader),
                replica(2, pb::ReplicaRole::Follower),
            ],
            ..Default::default()
        });
        assert!(g.replicas.iter().all(|r| r.lag.is_none() && r.health == "unknown"));
    }

    #[test]
    fn console_group_summaries_merge_broker_groups_without_double_counting_members() {
        let answer = |broker: &str, lag| pb::ListConsumerGroupsResponse {
            broker_group: broker.into(),
            groups: vec![pb::ConsumerGroupSummary {
                consumer_group: "G".into(),
                topics: vec!["T".into()],
                live_members: 2,
                total_lag: lag,
            }],
        };
        let l = ConsumerGroupList::from_pb(vec![answer("broker-a", 3), answer("broker-b", 4)]);
        assert_eq!(l.groups.len(), 1);
        let g = &l.groups[0];
        assert_eq!((g.live_members, g.total_lag, g.topics.len()), (2, 7, 1));
        assert_eq!(g.broker_groups, vec!["broker-a", "broker-b"]);
    }

    #[test]
    fn console_message_bodies_are_previewed_within_a_bound() {
        let big = pb::PulledMessage {
            message: Some(pb::Message {
                body: vec![b'x'; BODY_PREVIEW_BYTES + 10],
                ..Default::default()
            }),
            ..Default::default()
        };
        let v = MessageView::from_pb(None, big);
        assert_eq!(v.body_preview.len(), BODY_PREVIEW_BYTES);
        assert!(v.body_truncated);
        assert_eq!(v.body_bytes, BODY_PREVIEW_BYTES + 10);
    }
}
