//! `raftmq.v1.AdminService`: topic create/update/delete through Raft on the
//! leader (a follower answers "not leader" like Send does), topic listing and
//! description from this replica's applied state, and the group's status as this
//! node's Raft metrics see it; consumer groups (list, describe with lag, offset
//! reset, via the [`Coordinator`]) and message lookup by id or key.

use openraft::ServerState;
use openraft::async_runtime::WatchReceiver;
use raftmq_proto::v1 as pb;
use raftmq_proto::v1::admin_service_server::{AdminService, AdminServiceServer};
use raftmq_raft_store::{Command, Permission, ResourceKind, Response, TopicConfig, TopicMessageType};
use tonic::{Request, Status};
use tracing::Instrument;

use crate::api_error::ApiError;
use crate::consumer_group::Coordinator;
use crate::convert;
use crate::group::GroupHandle;
use crate::validate;

/// The admin endpoint of this node's broker group replica.
#[derive(Clone)]
pub struct Admin {
    group: GroupHandle,
    coordinator: Coordinator,
    /// Membership changes ([`crate::membership`]).
    changes: crate::membership::Changes,
    /// This node's disk as the retention monitor last measured it.
    disk: crate::retention::DiskState,
}

/// Messages a key query returns when the request leaves `max_messages` at 0.
const DEFAULT_KEY_QUERY_MESSAGES: u32 = 32;
/// Most messages one key query returns.
const MAX_KEY_QUERY_MESSAGES: u32 = 1024;
/// Bounds on a consumer group's retry settings (RocketMQ caps retries too).
const MAX_RECONSUME_TIMES: u32 = 1000;
const MAX_RETRY_DELAYS: usize = 64;

impl Admin {
    pub fn new(group: GroupHandle, coordinator: Coordinator) -> Self {
        let changes = crate::membership::Changes::new(group.clone());
        Admin {
            group,
            coordinator,
            changes,
            disk: Default::default(),
        }
    }

    /// Report `disk` in the cluster status.
    pub fn with_disk(mut self, disk: crate::retention::DiskState) -> Self {
        self.disk = disk;
        self
    }

    /// By id: the id names the broker group (crc32c of its name), the Raft entry
    /// and the position in its batch. By key: the key index of the topic.
    async fn query_message(&self, req: pb::QueryMessageRequest) -> Result<pb::QueryMessageResponse, ApiError> {
        let g = &self.group;
        // Checked here, read below on a blocking thread.
        let by_id = match (req.message_id.is_empty(), req.key.is_empty()) {
            (false, true) => Some(convert::parse_own_message_id(&req.message_id, g.group())?),
            (true, false) => {
                validate::topic_name(&req.topic)?;
                if req.key.len() > validate::MAX_KEY_LEN {
                    return Err(ApiError::InvalidArgument(format!(
                        "key is {} bytes; at most {} are allowed",
                        req.key.len(),
                        validate::MAX_KEY_LEN
                    )));
                }
                None
            }
            _ => {
                return Err(ApiError::InvalidArgument(
                    "QueryMessage needs either message_id, or topic and key (not both)".into(),
                ));
            }
        };
        let max = match req.max_messages {
            0 => DEFAULT_KEY_QUERY_MESSAGES,
            n => n.min(MAX_KEY_QUERY_MESSAGES),
        } as usize;
        let (store, topic, key) = (g.store().clone(), req.topic.clone(), req.key.clone());
        let found = tokio::task::spawn_blocking(move || match by_id {
            Some(id) => store
                .message_at(id.raft_index, id.batch_pos)
                .map(|m| m.into_iter().collect()),
            None => store.messages_by_key(&topic, &key, max),
        })
        .await
        .map_err(|e| ApiError::blocking_task("looking a message up", e))?
        .map_err(|e| ApiError::storage("looking a message up", e))?;
        if found.is_empty() {
            return Err(ApiError::NotFound(if by_id.is_none() {
                format!("no message of topic {:?} has key {:?}", req.topic, req.key)
            } else {
                format!(
                    "message {} is not stored on broker group {} (never written, or trimmed)",
                    req.message_id,
                    g.group()
                )
            }));
        }
        Ok(pb::QueryMessageResponse {
            messages: found
                .into_iter()
                .map(|m| convert::pulled_message(g.group(), m))
                .collect(),
        })
    }

    pub fn into_server(self) -> AdminServiceServer<Self> {
        AdminServiceServer::new(self)
    }

    async fn create_topic(&self, req: pb::CreateTopicRequest) -> Result<pb::CreateTopicResponse, ApiError> {
        let t = req
            .topic
            .ok_or_else(|| ApiError::InvalidArgument("CreateTopic needs a topic config".into()))?;
        validate::topic_name(&t.name)?;
        validate::queue_count(t.queues_per_group)?;
        let perm = convert::perm_from_pb(t.perm)?;
        let given_type = convert::message_type_from_pb(t.message_type)?;
        if t.trace == Some(true) && !crate::trace::traceable(&t.name) {
            return Err(ApiError::InvalidArgument(format!(
                "topic {:?} holds the trace records and cannot itself be traced",
                t.name
            )));
        }
        self.group.ensure_leader()?;
        if req.if_absent {
            match self.group.topic_for_write(&t.name).await {
                Ok(_) => return Ok(pb::CreateTopicResponse {}),
                Err(ApiError::NotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
        // UNSPECIFIED keeps an existing topic's type and makes a new topic NORMAL,
        // and an unset trace keeps its trace setting (off for a new topic; see
        // CreateTopicRequest in the proto). The existing config is read on the
        // leader, caught up if it misses the topic, like a send's auto-create.
        let existing = if given_type.is_none() || t.trace.is_none() {
            match self.group.topic_for_write(&t.name).await {
                Ok(existing) => Some(existing),
                Err(ApiError::NotFound(_)) => None,
                Err(e) => return Err(e),
            }
        } else {
            None
        };
        let message_type = given_type
            .or(existing.as_ref().map(|e| e.message_type))
            .unwrap_or(TopicMessageType::Normal);
        let trace = t.trace.or(existing.map(|e| e.trace)).unwrap_or(false);
        let written = self
            .group
            .write(Command::UpsertTopic(TopicConfig {
                name: t.name,
                queues: t.queues_per_group,
                perm,
                message_type,
                trace,
            }))
            .await?;
        self.group.topics_changed();
        match written.response {
            Response::TopicUpserted => Ok(pb::CreateTopicResponse {}),
            other => Err(ApiError::Internal(format!("topic upsert was answered with {other}"))),
        }
    }

    async fn delete_topic(&self, req: pb::DeleteTopicRequest) -> Result<pb::DeleteTopicResponse, ApiError> {
        validate::topic_name(&req.name)?;
        self.group.ensure_leader()?;
        let written = self.group.write(Command::DeleteTopic { name: req.name }).await?;
        self.group.topics_changed();
        match written.response {
            Response::TopicDeleted { existed } => Ok(pb::DeleteTopicResponse { existed }),
            other => Err(ApiError::Internal(format!("topic delete was answered with {other}"))),
        }
    }

    fn list_topics(&self) -> Result<pb::ListTopicsResponse, ApiError> {
        let topics = self
            .group
            .store()
            .topics()
            .map_err(|e| ApiError::storage("listing topics", e))?;
        Ok(pb::ListTopicsResponse {
            topics: topics.into_iter().map(convert::topic_to_pb).collect(),
        })
    }

    fn describe_topic(&self, req: pb::DescribeTopicRequest) -> Result<pb::DescribeTopicResponse, ApiError> {
        validate::topic_name(&req.name)?;
        let topic = self.group.topic(&req.name)?;
        let store = self.group.store();
        let queues = (0..topic.queues)
            .map(|q| {
                // Max first and min capped by it, as Pull does (see there).
                let max_offset = store.queue_next_offset(&topic.name, q)?;
                Ok(pb::QueueStatus {
                    queue_id: q,
                    min_offset: store.queue_min_offset(&topic.name, q)?.min(max_offset),
                    max_offset,
                })
            })
            .collect::<std::io::Result<Vec<_>>>()
            .map_err(|e| ApiError::storage("reading queue offsets", e))?;
        Ok(pb::DescribeTopicResponse {
            topic: Some(convert::topic_to_pb(topic)),
            queues,
        })
    }

    fn cluster_status(&self) -> pb::ClusterStatusResponse {
        let g = &self.group;
        let m = g.raft().metrics().borrow_watched().clone();
        let me = g.node_id();
        let membership = m.membership_config.membership();
        let voters: Vec<_> = membership.voter_ids().collect();
        let replicas = membership
            .nodes()
            .map(|(&id, node)| {
                let role = if id == me {
                    match m.state {
                        ServerState::Leader => pb::ReplicaRole::Leader,
                        ServerState::Follower => pb::ReplicaRole::Follower,
                        ServerState::Candidate => pb::ReplicaRole::Candidate,
                        ServerState::Learner => pb::ReplicaRole::Learner,
                        ServerState::Shutdown => pb::ReplicaRole::Unspecified,
                    }
                } else if m.current_leader == Some(id) {
                    pb::ReplicaRole::Leader
                } else if voters.contains(&id) {
                    pb::ReplicaRole::Follower
                } else {
                    pb::ReplicaRole::Learner
                };
                let matched = m
                    .replication
                    .as_ref()
                    .and_then(|r| r.get(&id))
                    .map(|l| l.as_ref().map_or(0, |l| l.index));
                pb::ReplicaStatus {
                    node_id: id,
                    endpoint: node.addr.clone(),
                    role: role as i32,
                    last_log_index: if id == me { m.last_log_index } else { None },
                    applied_index: if id == me {
                        m.last_applied.map(|l| l.index)
                    } else {
                        None
                    },
                    matched_index: matched,
                    last_ack_ms: m
                        .heartbeat
                        .as_ref()
                        .and_then(|h| h.get(&id))
                        .and_then(|t| t.as_ref())
                        .map(|t| u64::try_from(openraft::Instant::elapsed(&**t).as_millis()).unwrap_or(u64::MAX)),
                }
            })
            .collect();
        // This node's retained data: segment files still holding records above
        // the horizon (those at or below it are being deleted).
        let store = g.store();
        let horizon = store.retention_horizon();
        let kept: Vec<_> = store
            .segments()
            .into_iter()
            .filter(|s| s.info.next_index > s.info.first_index && s.info.next_index - 1 > horizon)
            .collect();
        let oldest_message_ms = store.oldest_message_ms().unwrap_or_else(|e| {
            tracing::warn!(error = %e, "reading the oldest retained message failed");
            None
        });
        pb::ClusterStatusResponse {
            groups: vec![pb::GroupStatus {
                broker_group: g.group().to_owned(),
                term: m.current_term,
                leader_id: m.current_leader,
                leader_endpoint: m.current_leader.map(|l| g.endpoint_of(l)).unwrap_or_default(),
                replicas,
                reported_by: me,
                committed_index: m.local_committed.map(|l| l.index),
                log_bytes: kept.iter().map(|s| s.info.bytes).sum(),
                log_segments: kept.len() as u32,
                oldest_message_ms,
                retention_horizon: horizon,
                disk_used_ratio: self.disk.used_ratio(),
                disk_full: self.disk.is_full(),
            }],
        }
    }

    async fn update_consumer_group(
        &self,
        req: pb::UpdateConsumerGroupRequest,
    ) -> Result<pb::UpdateConsumerGroupResponse, ApiError> {
        let c = req
            .config
            .ok_or_else(|| ApiError::InvalidArgument("UpdateConsumerGroup needs a config".into()))?;
        validate::consumer_group_name(&c.name)?;
        let max_reconsume_times = c
            .max_reconsume_times
            .unwrap_or(raftmq_raft_store::pop::DEFAULT_MAX_RECONSUME_TIMES);
        if max_reconsume_times > MAX_RECONSUME_TIMES {
            return Err(ApiError::InvalidArgument(format!(
                "max_reconsume_times {max_reconsume_times} exceeds {MAX_RECONSUME_TIMES}"
            )));
        }
        if c.retry_delays_ms.len() > MAX_RETRY_DELAYS {
            return Err(ApiError::InvalidArgument(format!(
                "{} retry delays; at most {MAX_RETRY_DELAYS} are allowed",
                c.retry_delays_ms.len()
            )));
        }
        let max_delay = self.group.config().max_delay.as_millis() as u64;
        if let Some(d) = c.retry_delays_ms.iter().find(|d| **d == 0 || **d > max_delay) {
            return Err(ApiError::InvalidArgument(format!(
                "retry delay {d} ms is not between 1 ms and the broker's maximum delay of {max_delay} ms"
            )));
        }
        self.group.ensure_leader()?;
        let config = raftmq_raft_store::ConsumerGroupConfig {
            name: c.name,
            fifo: c.fifo,
            max_reconsume_times,
            retry_delays_ms: if c.retry_delays_ms.is_empty() {
                raftmq_raft_store::pop::DEFAULT_RETRY_DELAYS_MS.to_vec()
            } else {
                c.retry_delays_ms
            },
        };
        self.group.write(Command::UpsertConsumerGroup(config)).await?;
        Ok(pb::UpdateConsumerGroupResponse {})
    }

    fn get_consumer_group(&self, req: pb::GetConsumerGroupRequest) -> Result<pb::GetConsumerGroupResponse, ApiError> {
        validate::consumer_group_name(&req.consumer_group)?;
        let c = self.group.store().with_pop(|p| p.config(&req.consumer_group));
        Ok(pb::GetConsumerGroupResponse {
            config: Some(pb::ConsumerGroupConfig {
                name: c.name,
                fifo: c.fifo,
                max_reconsume_times: Some(c.max_reconsume_times),
                retry_delays_ms: c.retry_delays_ms,
            }),
        })
    }

    fn span(&self, rpc: &'static str, topic: &str) -> tracing::Span {
        tracing::info_span!("admin", rpc, group = %self.group.group(), topic)
    }
}

pub(crate) fn answer<T>(rpc: &'static str, result: Result<T, ApiError>) -> Result<tonic::Response<T>, Status> {
    if let Err(e) = &result {
        tracing::debug!(rpc, error = %e, "admin request refused");
    }
    result.map(tonic::Response::new).map_err(Status::from)
}

#[tonic::async_trait]
impl AdminService for Admin {
    async fn create_topic(
        &self,
        request: Request<pb::CreateTopicRequest>,
    ) -> Result<tonic::Response<pb::CreateTopicResponse>, Status> {
        let name = request
            .get_ref()
            .topic
            .as_ref()
            .map(|t| t.name.as_str())
            .unwrap_or_default();
        self.group
            .auth()
            .check(&request, Permission::Admin, ResourceKind::Topic, name)?;
        let req = request.into_inner();
        let name = req.topic.as_ref().map(|t| t.name.clone()).unwrap_or_default();
        let span = self.span("CreateTopic", &name);
        async { answer("CreateTopic", Admin::create_topic(self, req).await) }
            .instrument(span)
            .await
    }

    async fn delete_topic(
        &self,
        request: Request<pb::DeleteTopicRequest>,
    ) -> Result<tonic::Response<pb::DeleteTopicResponse>, Status> {
        self.group.auth().check(
            &request,
            Permission::Admin,
            ResourceKind::Topic,
            &request.get_ref().name,
        )?;
        let req = request.into_inner();
        let span = self.span("DeleteTopic", &req.name);
        async { answer("DeleteTopic", Admin::delete_topic(self, req).await) }
            .instrument(span)
            .await
    }

    async fn list_topics(
        &self,
        request: Request<pb::ListTopicsRequest>,
    ) -> Result<tonic::Response<pb::ListTopicsResponse>, Status> {
        self.group.auth().authenticated(&request)?;
        let _span = self.span("ListTopics", "").entered();
        answer("ListTopics", self.list_topics())
    }

    async fn describe_topic(
        &self,
        request: Request<pb::DescribeTopicRequest>,
    ) -> Result<tonic::Response<pb::DescribeTopicResponse>, Status> {
        self.group.auth().authenticated(&request)?;
        let req = request.into_inner();
        let _span = self.span("DescribeTopic", &req.name).entered();
        answer("DescribeTopic", self.describe_topic(req))
    }

    async fn cluster_status(
        &self,
        request: Request<pb::ClusterStatusRequest>,
    ) -> Result<tonic::Response<pb::ClusterStatusResponse>, Status> {
        self.group.auth().authenticated(&request)?;
        let _span = self.span("ClusterStatus", "").entered();
        Ok(tonic::Response::new(self.cluster_status()))
    }

    async fn list_consumer_groups(
        &self,
        request: Request<pb::ListConsumerGroupsRequest>,
    ) -> Result<tonic::Response<pb::ListConsumerGroupsResponse>, Status> {
        self.group.auth().authenticated(&request)?;
        let span = self.span("ListConsumerGroups", "");
        async { answer("ListConsumerGroups", self.coordinator.list_groups().await) }
            .instrument(span)
            .await
    }

    async fn describe_consumer_group(
        &self,
        request: Request<pb::DescribeConsumerGroupRequest>,
    ) -> Result<tonic::Response<pb::DescribeConsumerGroupResponse>, Status> {
        self.group.auth().authenticated(&request)?;
        let req = request.into_inner();
        let span = self.span("DescribeConsumerGroup", "");
        async {
            answer(
                "DescribeConsumerGroup",
                self.coordinator.describe(&req.consumer_group).await,
            )
        }
        .instrument(span)
        .await
    }

    async fn reset_consumer_offset(
        &self,
        request: Request<pb::ResetConsumerOffsetRequest>,
    ) -> Result<tonic::Response<pb::ResetConsumerOffsetResponse>, Status> {
        let group = &request.get_ref().consumer_group;
        self.group
            .auth()
            .check(&request, Permission::Admin, ResourceKind::Group, group)?;
        let req = request.into_inner();
        let span = self.span("ResetConsumerOffset", &req.topic);
        async { answer("ResetConsumerOffset", self.coordinator.reset(req).await) }
            .instrument(span)
            .await
    }

    async fn query_message(
        &self,
        request: Request<pb::QueryMessageRequest>,
    ) -> Result<tonic::Response<pb::QueryMessageResponse>, Status> {
        // Bodies of any topic, found by id or key: for the cluster's admins.
        self.group.auth().admin(&request)?;
        let req = request.into_inner();
        let span = self.span("QueryMessage", &req.topic);
        async { answer("QueryMessage", Admin::query_message(self, req).await) }
            .instrument(span)
            .await
    }

    async fn update_consumer_group(
        &self,
        request: Request<pb::UpdateConsumerGroupRequest>,
    ) -> Result<tonic::Response<pb::UpdateConsumerGroupResponse>, Status> {
        let group = request
            .get_ref()
            .config
            .as_ref()
            .map(|c| c.name.as_str())
            .unwrap_or_default();
        self.group
            .auth()
            .check(&request, Permission::Admin, ResourceKind::Group, group)?;
        let req = request.into_inner();
        let span = self.span("UpdateConsumerGroup", "");
        async { answer("UpdateConsumerGroup", Admin::update_consumer_group(self, req).await) }
            .instrument(span)
            .await
    }

    async fn get_consumer_group(
        &self,
        request: Request<pb::GetConsumerGroupRequest>,
    ) -> Result<tonic::Response<pb::GetConsumerGroupResponse>, Status> {
        self.group.auth().authenticated(&request)?;
        let req = request.into_inner();
        let _span = self.span("GetConsumerGroup", "").entered();
        answer("GetConsumerGroup", Admin::get_consumer_group(self, req))
    }

    async fn list_transactions(
        &self,
        request: Request<pb::ListTransactionsRequest>,
    ) -> Result<tonic::Response<pb::ListTransactionsResponse>, Status> {
        self.group.auth().admin(&request)?;
        let req = request.into_inner();
        let _span = self.span("ListTransactions", "").entered();
        answer("ListTransactions", crate::transactions::list(&self.group, req))
    }

    async fn add_replica(
        &self,
        request: Request<pb::AddReplicaRequest>,
    ) -> Result<tonic::Response<pb::AddReplicaResponse>, Status> {
        self.group.auth().admin(&request)?;
        let req = request.into_inner();
        let span = tracing::info_span!("admin", rpc = "AddReplica", group = %self.group.group(), node = req.node_id);
        async { self.changes.add_replica(req).await.map(tonic::Response::new) }
            .instrument(span)
            .await
    }

    async fn remove_replica(
        &self,
        request: Request<pb::RemoveReplicaRequest>,
    ) -> Result<tonic::Response<pb::RemoveReplicaResponse>, Status> {
        self.group.auth().admin(&request)?;
        let req = request.into_inner();
        let span = tracing::info_span!("admin", rpc = "RemoveReplica", group = %self.group.group(), node = req.node_id);
        async { self.changes.remove_replica(req).await.map(tonic::Response::new) }
            .instrument(span)
            .await
    }

    async fn transfer_leader(
        &self,
        request: Request<pb::TransferLeaderRequest>,
    ) -> Result<tonic::Response<pb::TransferLeaderResponse>, Status> {
        self.group.auth().admin(&request)?;
        let req = request.into_inner();
        let span =
            tracing::info_span!("admin", rpc = "TransferLeader", group = %self.group.group(), to = ?req.to_node_id);
        async { self.changes.transfer_leader(req).await.map(tonic::Response::new) }
            .instrument(span)
            .await
    }

    async fn get_membership(
        &self,
        _request: Request<pb::GetMembershipRequest>,
    ) -> Result<tonic::Response<pb::GetMembershipResponse>, Status> {
        let _span = self.span("GetMembership", "").entered();
        Ok(tonic::Response::new(self.changes.get_membership()))
    }

    async fn query_trace(
        &self,
        request: Request<pb::QueryTraceRequest>,
    ) -> Result<tonic::Response<pb::QueryTraceResponse>, Status> {
        // Who consumed what, for any topic, by message id: for the cluster's
        // admins, as QueryMessage is.
        self.group.auth().admin(&request)?;
        let req = request.into_inner();
        let span = self.span("QueryTrace", crate::trace::TRACE_TOPIC);
        async { answer("QueryTrace", crate::trace::query(&self.group, req).await) }
            .instrument(span)
            .await
    }
}
