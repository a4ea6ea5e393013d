//! Admin: topics, cluster status, consumer groups and message lookup. Topic changes go to the leader of every broker
//! group the NameServers list (a topic has queues on each group that serves it);
//! status comes from NameServers (`list_cluster`) or from brokers (`cluster_status`).

use std::sync::Arc;
use std::time::Duration;

use raftmq_proto::v1 as pb;
use raftmq_proto::v1::admin_service_client::AdminServiceClient;

use crate::error::Error;
use crate::leader::{Followers, Spec, follow_group};
use crate::route::Core;

/// Topic and cluster administration; cheap to clone.
#[derive(Clone)]
pub struct Admin {
    core: Arc<Core>,
}

impl Admin {
    pub(crate) fn from_core(core: Arc<Core>) -> Admin {
        Admin { core }
    }

    /// Every live broker group, as the NameServers list them.
    pub(crate) async fn live_groups(&self) -> Result<Vec<pb::GroupStatus>, Error> {
        self.core.list_cluster().await
    }

    /// Every live broker group as a NameServer sees it (leader, term, replicas).
    pub async fn list_cluster(&self) -> Result<Vec<pb::GroupStatus>, Error> {
        self.core.list_cluster().await
    }

    /// Each group's status as its leader reports it (log and applied indexes
    /// per replica, which NameServers do not know).
    pub async fn cluster_status(&self) -> Result<Vec<pb::GroupStatus>, Error> {
        let mut out = Vec::new();
        for g in self.core.list_cluster().await? {
            let resp = self
                .on_leader(&g, |mut c| async move {
                    c.cluster_status(pb::ClusterStatusRequest {}).await
                })
                .await?;
            out.extend(resp.groups);
        }
        Ok(out)
    }

    /// Creates (or updates) `name` with `queues` queues on every live broker group.
    /// A new topic is NORMAL; an existing one keeps its message type (see
    /// [`Admin::create_topic_with_type`]).
    pub async fn create_topic(&self, name: &str, queues: u32, perm: pb::Permission) -> Result<(), Error> {
        self.create_topic_with_type(name, queues, perm, pb::MessageType::Unspecified)
            .await
    }

    /// Creates (or updates) `name` with `queues` queues and the given message type
    /// (which messages RocketMQ 5 clients may send to it) on every live broker
    /// group. `MessageType::Unspecified` makes a new topic NORMAL and keeps an
    /// existing topic's type.
    pub async fn create_topic_with_type(
        &self,
        name: &str,
        queues: u32,
        perm: pb::Permission,
        message_type: pb::MessageType,
    ) -> Result<(), Error> {
        self.create_topic_on(name, queues, perm, message_type, &[]).await
    }

    /// Creates (or updates) `name` with `queues` queues on the named broker groups
    /// only (every live group when `groups` is empty), so a topic can live on some
    /// groups and not others. Calling it again with a group the topic is not on yet
    /// extends the topic there: producers and consumers see the new group's queues
    /// after their next route refresh (`route_refresh_interval`, or at once after a
    /// failure), and the queues it already has elsewhere are left alone. A group no
    /// NameServer lists as live is refused with `NoRoute`, naming it, before
    /// any group is changed.
    #[tracing::instrument(skip(self))]
    pub async fn create_topic_on(
        &self,
        name: &str,
        queues: u32,
        perm: pb::Permission,
        message_type: pb::MessageType,
        groups: &[String],
    ) -> Result<(), Error> {
        let topic = pb::TopicConfig {
            name: name.to_owned(),
            queues_per_group: queues,
            perm: perm as i32,
            message_type: message_type as i32,
            trace: None,
        };
        self.create_topic_with(topic, groups).await
    }

    /// Creates (or updates) a topic from a whole config on the named broker
    /// groups (every live group when `groups` is empty), as
    /// [`Admin::create_topic_on`] does; the config's `trace` turns message
    /// trace on or off for the topic (unset keeps its setting, off for a new
    /// topic).
    #[tracing::instrument(skip(self))]
    pub async fn create_topic_with(&self, topic: pb::TopicConfig, groups: &[String]) -> Result<(), Error> {
        let name = topic.name.as_str();
        let live = self.core.list_cluster().await?;
        let chosen: Vec<pb::GroupStatus> = if groups.is_empty() {
            live
        } else {
            let mut chosen = Vec::with_capacity(groups.len());
            for want in groups {
                match live.iter().find(|g| g.broker_group == *want) {
                    Some(g) => {
                        if !chosen.iter().any(|c: &pb::GroupStatus| c.broker_group == *want) {
                            chosen.push(g.clone());
                        }
                    }
                    None => {
                        return Err(Error::NoRoute {
                            topic: name.to_owned(),
                            reason: format!(
                                "no live broker group is named {want:?} (live: {})",
                                live.iter()
                                    .map(|g| g.broker_group.as_str())
                                    .collect::<Vec<_>>()
                                    .join(", ")
                            ),
                        });
                    }
                }
            }
            chosen
        };
        for g in chosen {
            self.on_leader(&g, |mut c| {
                let topic = topic.clone();
                async move {
                    c.create_topic(pb::CreateTopicRequest {
                        topic: Some(topic),
                        if_absent: false,
                    })
                    .await
                }
            })
            .await?;
        }
        // The NameServers learn the change with the brokers' next registration.
        self.core.routes.invalidate(name);
        Ok(())
    }

    /// Deletes `name` on every live broker group; true if any group had it.
    #[tracing::instrument(skip(self))]
    pub async fn delete_topic(&self, name: &str) -> Result<bool, Error> {
        let mut existed = false;
        for g in self.core.list_cluster().await? {
            let req = pb::DeleteTopicRequest { name: name.to_owned() };
            let resp = self
                .on_leader(&g, |mut c| {
                    let req = req.clone();
                    async move { c.delete_topic(req).await }
                })
                .await?;
            existed |= resp.existed;
        }
        self.core.routes.invalidate(name);
        Ok(existed)
    }

    /// Every topic of every live group, with the group that holds it (its
    /// config includes its message type).
    pub async fn list_topics(&self) -> Result<Vec<(String, pb::TopicConfig)>, Error> {
        let mut out = Vec::new();
        for g in self.core.list_cluster().await? {
            let resp = self
                .on_leader(&g, |mut c| async move { c.list_topics(pb::ListTopicsRequest {}).await })
                .await?;
            out.extend(resp.topics.into_iter().map(|t| (g.broker_group.clone(), t)));
        }
        Ok(out)
    }

    /// Every consumer group known to each live broker group (committed offsets,
    /// live members), per broker group.
    pub async fn list_consumer_groups(&self) -> Result<Vec<pb::ListConsumerGroupsResponse>, Error> {
        let mut out = Vec::new();
        for g in self.core.list_cluster().await? {
            out.push(
                self.on_leader(&g, |mut c| async move {
                    c.list_consumer_groups(pb::ListConsumerGroupsRequest {}).await
                })
                .await?,
            );
        }
        Ok(out)
    }

    /// A consumer group's members, offsets and lag on each live broker group that
    /// knows it (groups that do not are left out).
    pub async fn describe_consumer_group(&self, group: &str) -> Result<Vec<pb::DescribeConsumerGroupResponse>, Error> {
        let req = pb::DescribeConsumerGroupRequest {
            consumer_group: group.to_owned(),
        };
        self.on_each_leader_that_knows(|mut c| {
            let req = req.clone();
            async move { c.describe_consumer_group(req).await }
        })
        .await
    }

    /// Moves `group`'s offsets in every queue of `topic` on every live broker
    /// group to `to` (FIRST, LAST or TIMESTAMP with `timestamp_ms`).
    pub async fn reset_consumer_offset(
        &self,
        group: &str,
        topic: &str,
        to: pb::StartFrom,
        timestamp_ms: u64,
    ) -> Result<Vec<pb::ConsumerQueueStatus>, Error> {
        let mut out = Vec::new();
        for g in self.core.list_cluster().await? {
            let req = pb::ResetConsumerOffsetRequest {
                consumer_group: group.to_owned(),
                topic: topic.to_owned(),
                to: to as i32,
                timestamp_ms,
            };
            let resp = self
                .on_leader(&g, |mut c| {
                    let req = req.clone();
                    async move { c.reset_consumer_offset(req).await }
                })
                .await?;
            out.extend(resp.queues);
        }
        Ok(out)
    }

    /// The message with this id, from the broker group whose name hash the id
    /// carries; `None` if that group does not hold it (never written, or trimmed).
    pub async fn query_message_by_id(&self, id: &str) -> Result<Option<pb::PulledMessage>, Error> {
        let req = pb::QueryMessageRequest {
            message_id: id.to_owned(),
            ..Default::default()
        };
        // Every other group answers NOT_FOUND (the id names its group).
        Ok(self.query_messages(req).await?.into_iter().next())
    }

    /// Message `id`'s trace timeline, sorted by time (see `TraceEvent` in the
    /// proto): from the broker group whose name hash the id carries; empty when
    /// the message was not traced (or its records were trimmed).
    pub async fn trace(&self, id: &str) -> Result<Vec<pb::TraceEvent>, Error> {
        let req = pb::QueryTraceRequest {
            message_id: id.to_owned(),
            max_events: 0,
        };
        // Every other group answers NOT_FOUND (the id names its group).
        let answers = self
            .on_each_leader_that_knows(|mut c| {
                let req = req.clone();
                async move { c.query_trace(req).await }
            })
            .await?;
        Ok(answers.into_iter().flat_map(|r| r.events).collect())
    }

    /// Messages of `topic` carrying `key`, from every live broker group.
    pub async fn query_messages_by_key(
        &self,
        topic: &str,
        key: &str,
        max: u32,
    ) -> Result<Vec<pb::PulledMessage>, Error> {
        self.query_messages(pb::QueryMessageRequest {
            topic: topic.to_owned(),
            key: key.to_owned(),
            max_messages: max,
            ..Default::default()
        })
        .await
    }

    async fn query_messages(&self, req: pb::QueryMessageRequest) -> Result<Vec<pb::PulledMessage>, Error> {
        let answers = self
            .on_each_leader_that_knows(|mut c| {
                let req = req.clone();
                async move { c.query_message(req).await }
            })
            .await?;
        Ok(answers.into_iter().flat_map(|r| r.messages).collect())
    }

    /// Sets a consumer group's retry and POP settings on every live broker group.
    #[tracing::instrument(skip(self))]
    pub async fn update_consumer_group(&self, config: pb::ConsumerGroupConfig) -> Result<(), Error> {
        for g in self.core.list_cluster().await? {
            let req = pb::UpdateConsumerGroupRequest {
                config: Some(config.clone()),
            };
            self.on_leader(&g, |mut c| {
                let req = req.clone();
                async move { c.update_consumer_group(req).await }
            })
            .await?;
        }
        Ok(())
    }

    /// A consumer group's settings as each broker group's leader holds them.
    pub async fn get_consumer_group(&self, group: &str) -> Result<Vec<pb::ConsumerGroupConfig>, Error> {
        let mut out = Vec::new();
        for g in self.core.list_cluster().await? {
            let req = pb::GetConsumerGroupRequest {
                consumer_group: group.to_owned(),
            };
            let resp = self
                .on_leader(&g, |mut c| {
                    let req = req.clone();
                    async move { c.get_consumer_group(req).await }
                })
                .await?;
            out.extend(resp.config);
        }
        Ok(out)
    }

    /// Pending half messages of every broker group (optionally of one producer
    /// group, at most `max` per broker group, oldest first), with each group's
    /// transaction totals, as its leader sees them.
    pub async fn list_transactions(
        &self,
        producer_group: &str,
        max: u32,
    ) -> Result<Vec<pb::ListTransactionsResponse>, Error> {
        let mut out = Vec::new();
        for g in self.core.list_cluster().await? {
            let req = pb::ListTransactionsRequest {
                producer_group: producer_group.to_owned(),
                max_transactions: max,
            };
            let resp = self
                .on_leader(&g, |mut c| {
                    let req = req.clone();
                    async move { c.list_transactions(req).await }
                })
                .await?;
            out.push(resp);
        }
        Ok(out)
    }

    /// Every message in consumer group `group`'s dead-letter queue
    /// (`%DLQ%<group>`), oldest first per broker group, at most `max`. Each
    /// carries ORIGIN_TOPIC and the other `ORIGIN_*` properties.
    pub async fn dead_letters(&self, group: &str, max: usize) -> Result<Vec<(String, pb::PulledMessage)>, Error> {
        let topic = format!("%DLQ%{group}");
        let route = match self.core.route(&topic).await {
            Ok(r) => r,
            // No dead letter yet: the topic is created with the first one.
            Err(Error::NoRoute { .. }) => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let pull = crate::consumer::PullConsumer::from_core(self.core.clone());
        let mut out = Vec::new();
        for g in &route.groups {
            for q in 0..g.queues.max(1) {
                let mut offset = 0;
                while out.len() < max {
                    let r = pull
                        .pull(
                            &topic,
                            &g.broker_group,
                            q,
                            offset,
                            256,
                            Duration::ZERO,
                            &crate::Filter::all(),
                        )
                        .await;
                    let r = match r {
                        Ok(r) => r,
                        // This broker group has no dead letter of the group yet.
                        Err(e) if e.code() == Some(tonic::Code::NotFound) => break,
                        Err(e) => return Err(e),
                    };
                    let done = r.messages.is_empty() || r.next_offset >= r.max_offset;
                    out.extend(r.messages.into_iter().map(|m| (g.broker_group.clone(), m)));
                    offset = r.next_offset;
                    if done {
                        break;
                    }
                }
            }
        }
        out.truncate(max);
        Ok(out)
    }

    /// Sends dead letter `message_id` of `group` back to its original topic, as a
    /// new message with the same body, tag, keys and user properties (the
    /// `ORIGIN_*` ones dropped). RocketMQ's resend: the dead letter stays in the
    /// DLQ, so the queue keeps its history.
    pub async fn resend_dead_letter(&self, group: &str, message_id: &str) -> Result<crate::SendReceipt, Error> {
        let found = self
            .dead_letters(group, usize::MAX)
            .await?
            .into_iter()
            .find(|(_, m)| m.message_id == message_id);
        let Some((_, pulled)) = found else {
            return Err(Error::Rpc {
                endpoint: String::new(),
                code: tonic::Code::NotFound,
                message: format!("message {message_id} is not in the dead-letter queue of {group}"),
                leader: None,
            });
        };
        let mut m = pulled.message.unwrap_or_default();
        let topic = m
            .properties
            .get("ORIGIN_TOPIC")
            .cloned()
            .unwrap_or_else(|| m.topic.clone());
        m.properties.retain(|k, _| !k.starts_with("ORIGIN_"));
        m.topic = topic.clone();
        m.deliver_at_ms = 0;
        crate::Producer::from_core(self.core.clone()).send(&topic, m).await
    }

    /// Runs `f` on every live broker group's leader; a group answering NOT_FOUND
    /// (it does not know the consumer group or message) is left out of the result.
    async fn on_each_leader_that_knows<T, F, Fut>(&self, f: F) -> Result<Vec<T>, Error>
    where
        F: Fn(AdminServiceClient<crate::route::RpcChannel>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let mut out = Vec::new();
        for g in self.core.list_cluster().await? {
            match self.on_leader(&g, &f).await {
                Ok(v) => out.push(v),
                Err(e) if e.code() == Some(tonic::Code::NotFound) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    /// Runs `f` against the group's leader within `send_deadline`, with the
    /// `leader` module's policy: redirects followed, dead replicas skipped, the
    /// others asked who leads. Admin answers come from the leader (a follower would
    /// answer reads from its own state). Admin writes are idempotent (create =
    /// upsert, delete of a missing topic is harmless), so retrying after an
    /// unknown outcome is safe.
    async fn on_leader<T, F, Fut>(&self, group: &pb::GroupStatus, f: F) -> Result<T, Error>
    where
        F: Fn(AdminServiceClient<crate::route::RpcChannel>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        self.on_leader_waiting(group, Duration::ZERO, f).await
    }

    /// [`Admin::on_leader`], letting one attempt take `wait` on top of the usual
    /// deadline (the server holds the call while it waits, e.g. for a new
    /// replica to catch up).
    async fn on_leader_waiting<T, F, Fut>(&self, group: &pb::GroupStatus, wait: Duration, f: F) -> Result<T, Error>
    where
        F: Fn(AdminServiceClient<crate::route::RpcChannel>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        self.on_leader_as(group, wait, AdminServiceClient::new, f).await
    }

    /// [`Admin::on_leader_waiting`] with a client of another service (`make`
    /// builds it on the attempt's channel).
    pub(crate) async fn on_leader_as<C, T, M, F, Fut>(
        &self,
        group: &pb::GroupStatus,
        wait: Duration,
        make: M,
        f: F,
    ) -> Result<T, Error>
    where
        M: Fn(crate::route::RpcChannel) -> C,
        F: Fn(C) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let spec = Spec {
            label: "",
            deadline: self.core.config.send_deadline + wait,
            long_poll: wait,
            followers: Followers::Ask,
        };
        let route = pb::GroupRoute {
            broker_group: group.broker_group.clone(),
            leader_endpoint: group.leader_endpoint.clone(),
            follower_endpoints: group
                .replicas
                .iter()
                .map(|r| r.endpoint.clone())
                .filter(|e| *e != group.leader_endpoint)
                .collect(),
            queues: 0,
            perm: 0,
            message_type: 0,
        };
        let served = follow_group(&self.core, spec, route, |a| f(make(a.channel))).await?;
        Ok(served.value)
    }
}

/// Membership changes of one broker group (issue #18), each run on the group's
/// leader (found through the NameServers, redirects followed).
impl Admin {
    /// The live group named `group`, as the NameServers list it.
    async fn group_status(&self, group: &str) -> Result<pb::GroupStatus, Error> {
        let groups = self.core.list_cluster().await?;
        let names: Vec<String> = groups.iter().map(|g| g.broker_group.clone()).collect();
        groups
            .into_iter()
            .find(|g| g.broker_group == group)
            .ok_or_else(|| Error::Rpc {
                endpoint: "NameServer".into(),
                code: tonic::Code::NotFound,
                message: format!("no live broker group named {group:?} (live groups: {names:?})"),
                leader: None,
            })
    }

    /// Runs `f` on `group`'s leader, letting one attempt take `wait` on top of
    /// the usual request timeout (the server holds the call while it waits).
    async fn on_group_leader<T, F, Fut>(&self, group: &str, wait: Duration, f: F) -> Result<T, Error>
    where
        F: Fn(AdminServiceClient<crate::route::RpcChannel>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let g = self.group_status(group).await?;
        self.on_leader_waiting(&g, wait, f).await
    }

    /// Adds `node_id` (client address `endpoint`; Raft address `raft_endpoint`,
    /// or the client port + 30000) to `group`: a learner first, a voter once it
    /// has caught up within `catch_up`. Returns the new membership.
    #[tracing::instrument(skip(self))]
    pub async fn add_replica(
        &self,
        group: &str,
        node_id: u64,
        endpoint: &str,
        raft_endpoint: Option<&str>,
        catch_up: Duration,
    ) -> Result<pb::MembershipView, Error> {
        let req = pb::AddReplicaRequest {
            node_id,
            endpoint: endpoint.to_owned(),
            raft_endpoint: raft_endpoint.unwrap_or_default().to_owned(),
            catch_up_timeout_ms: u32::try_from(catch_up.as_millis()).unwrap_or(u32::MAX),
        };
        let resp = self
            .on_group_leader(group, catch_up + Duration::from_secs(5), |mut c| {
                let req = req.clone();
                async move { c.add_replica(req).await }
            })
            .await?;
        resp.membership.ok_or_else(|| Error::Protocol {
            endpoint: group.to_owned(),
            reason: "AddReplica answered without the membership".into(),
        })
    }

    /// Removes `node_id` from `group`; returns the new membership.
    #[tracing::instrument(skip(self))]
    pub async fn remove_replica(&self, group: &str, node_id: u64) -> Result<pb::MembershipView, Error> {
        let resp = self
            .on_group_leader(group, Duration::from_secs(10), |mut c| async move {
                c.remove_replica(pb::RemoveReplicaRequest { node_id }).await
            })
            .await?;
        resp.membership.ok_or_else(|| Error::Protocol {
            endpoint: group.to_owned(),
            reason: "RemoveReplica answered without the membership".into(),
        })
    }

    /// Hands `group`'s leadership to `to` (or the most caught-up other voter)
    /// and waits, up to `within`, until it leads.
    #[tracing::instrument(skip(self))]
    pub async fn transfer_leader(
        &self,
        group: &str,
        to: Option<u64>,
        within: Duration,
    ) -> Result<pb::TransferLeaderResponse, Error> {
        let timeout_ms = u32::try_from(within.as_millis()).unwrap_or(u32::MAX);
        self.on_group_leader(group, within, |mut c| async move {
            c.transfer_leader(pb::TransferLeaderRequest {
                to_node_id: to,
                timeout_ms,
            })
            .await
        })
        .await
    }
}
