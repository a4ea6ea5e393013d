//! Admin: topics, cluster status, consumer groups and message lookup. Topic changes go to the leader of every broker
//! group the NameServers list (a topic has queues on each group that serves it);
//! status comes from NameServers (`list_cluster`) or from brokers (`cluster_status`).

use std::sync::Arc;
use std::time::Duration;

use raftmq_proto::v1 as pb;
use raftmq_proto::v1::admin_service_client::AdminServiceClient;
use tonic::transport::Channel;

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
    #[tracing::instrument(skip(self))]
    pub async fn create_topic_with_type(
        &self,
        name: &str,
        queues: u32,
        perm: pb::Permission,
        message_type: pb::MessageType,
    ) -> Result<(), Error> {
        for g in self.core.list_cluster().await? {
            let topic = pb::TopicConfig {
                name: name.to_owned(),
                queues_per_group: queues,
                perm: perm as i32,
                message_type: message_type as i32,
            };
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
        F: Fn(AdminServiceClient<Channel>) -> Fut,
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
        F: Fn(AdminServiceClient<Channel>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let spec = Spec {
            label: "",
            deadline: self.core.config.send_deadline,
            long_poll: Duration::ZERO,
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
        let served = follow_group(&self.core, spec, route, |a| f(AdminServiceClient::new(a.channel))).await?;
        Ok(served.value)
    }
}
