//! The console's JSON API under `/api`: reads through `raftmq_client::Admin` and
//! the pull consumer, and state changes (topic create/delete, offset reset, DLQ
//! resend) through [`Console::admin_for`], the one place a request's admin
//! credential will be checked. Every answer is bounded (messages per call,
//! queues per topic, time per request).

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::HeaderMap;
use axum::routing::{get, post};
use futures::StreamExt;
use raftmq_client::{Admin, Client, Filter};
use raftmq_proto::v1 as pb;
use serde::Deserialize;

use super::input::{ApiError, Credential, Params, credential, json_body};
use super::view::*;

/// Most messages one browse call returns.
pub const MAX_BROWSE: u64 = 100;
/// Most messages a key lookup returns.
pub const MAX_BY_KEY: u64 = 64;
/// Most dead letters one DLQ listing returns.
pub const MAX_DEAD_LETTERS: u64 = 200;
/// Most queues a topic description reads (1024 per group is the broker's cap).
pub const MAX_DESCRIBED_QUEUES: usize = 4096;
/// Queue offsets read at once for a topic description.
const DESCRIBE_CONCURRENCY: usize = 8;
/// Longest message id accepted (ids are 34 hex characters today).
const MAX_MESSAGE_ID_LEN: usize = 128;

/// The console's state: one client for reads (its channels and route cache
/// shared by every request, signed with the console's own `--access-key` if
/// given), and the settings a state change's client is made from.
pub struct Console {
    client: Client,
    config: raftmq_client::ClientConfig,
}

type Api<T> = Result<Json<T>, ApiError>;
type Shared = State<Arc<Console>>;

impl Console {
    pub fn new(config: raftmq_client::ClientConfig) -> Result<Console, raftmq_client::Error> {
        Ok(Console {
            client: Client::new(config.clone())?,
            config,
        })
    }

    /// The admin handle for a state-changing request: its calls are signed with
    /// the credential the request carried (typed into the page), and with
    /// nothing when it carried none, never with the console's own, so on a
    /// cluster with `[auth] enabled` only a user the ACL allows changes anything
    /// (refused: 401 or 403 with the broker's reason). Every create, delete,
    /// reset and resend goes through here.
    pub fn admin_for(&self, cred: Option<Credential>) -> Result<Admin, ApiError> {
        let mut config = self.config.clone();
        config.credentials = cred.map(|c| raftmq_proto::request_auth::Credentials {
            access_key: c.access_key,
            secret: c.secret,
        });
        Ok(Client::new(config)?.admin())
    }

    /// The admin handle for reads.
    fn reader(&self) -> Admin {
        self.client.admin()
    }

    /// Each broker group holding `topic`, with the topic's config there.
    async fn placements(&self, topic: &str) -> Result<Vec<(String, pb::TopicConfig)>, ApiError> {
        let all = self.reader().list_topics().await?;
        Ok(all.into_iter().filter(|(_, t)| t.name == topic).collect())
    }
}

pub fn routes() -> axum::Router<Arc<Console>> {
    axum::Router::new()
        .route("/cluster", get(cluster))
        .route("/topics", get(list_topics).post(create_topic))
        .route("/topics/{name}", get(describe_topic).delete(delete_topic))
        .route("/groups", get(list_groups))
        .route("/groups/{group}", get(describe_group))
        .route("/groups/{group}/reset-offset", post(reset_offset))
        .route("/groups/{group}/dlq", get(dead_letters))
        .route("/groups/{group}/dlq/resend", post(resend_dead_letter))
        .route("/messages/by-id", get(message_by_id))
        .route("/messages/trace", get(message_trace))
        .route("/messages/by-key", get(messages_by_key))
        .route("/messages/browse", get(browse))
}

/// The leaders' view of every group (log progress, lag, storage); when a leader
/// cannot be reached, the NameServers' view with a warning, so the page still
/// shows which groups exist and who was last seen leading.
async fn cluster(State(c): Shared) -> Api<ClusterView> {
    let admin = c.reader();
    let (source, warning, groups) = match admin.cluster_status().await {
        Ok(groups) => ("leaders", None, groups),
        Err(e) => ("nameserver", Some(e.to_string()), admin.list_cluster().await?),
    };
    Ok(Json(ClusterView {
        source,
        warning,
        groups: groups.into_iter().map(GroupView::from_pb).collect(),
    }))
}

async fn list_topics(State(c): Shared) -> Api<TopicList> {
    Ok(Json(TopicList::from_pairs(c.reader().list_topics().await?)))
}

/// Every queue's min and max offset, read with an empty pull at the end of the
/// queue (the answer carries both), a few queues at a time.
async fn describe_topic(State(c): Shared, Path(name): Path<String>) -> Api<TopicDetail> {
    raftmq_broker::validate::topic_name(&name)?;
    let placed = c.placements(&name).await?;
    if placed.is_empty() {
        return Err(ApiError::not_found(format!("topic {name:?} is on no broker group")));
    }
    let wanted: Vec<(String, u32)> = placed
        .iter()
        .flat_map(|(g, t)| (0..t.queues_per_group).map(move |q| (g.clone(), q)))
        .collect();
    if wanted.len() > MAX_DESCRIBED_QUEUES {
        return Err(ApiError::bad_request(format!(
            "topic {name} has {} queues; the console describes at most {MAX_DESCRIBED_QUEUES}",
            wanted.len()
        )));
    }
    let pull = c.client.pull_consumer();
    let filter = Filter::all();
    let read = futures::stream::iter(wanted.into_iter().map(|(group, q)| {
        let (pull, filter, name) = (&pull, &filter, &name);
        async move {
            let r = pull.pull(name, &group, q, u64::MAX, 1, Duration::ZERO, filter).await;
            (group, q, r)
        }
    }))
    .buffered(DESCRIBE_CONCURRENCY)
    .collect::<Vec<_>>()
    .await;
    let mut groups: Vec<TopicGroupDetail> = placed
        .iter()
        .map(|(g, t)| TopicGroupDetail {
            broker_group: g.clone(),
            perm: perm_name(t.perm),
            message_type: crate::tools::message_type_name(t.message_type()),
            queues: Vec::new(),
        })
        .collect();
    let (mut max_offset_sum, mut retained) = (0, 0);
    for (group, queue_id, r) in read {
        let view = match r {
            Ok(r) => {
                max_offset_sum += r.max_offset;
                retained += r.max_offset.saturating_sub(r.min_offset);
                QueueView {
                    queue_id,
                    min_offset: Some(r.min_offset),
                    max_offset: Some(r.max_offset),
                    error: None,
                }
            }
            Err(e) => QueueView {
                queue_id,
                min_offset: None,
                max_offset: None,
                error: Some(e.to_string()),
            },
        };
        if let Some(g) = groups.iter_mut().find(|g| g.broker_group == group) {
            g.queues.push(view);
        }
    }
    Ok(Json(TopicDetail {
        name,
        groups,
        max_offset_sum,
        retained,
    }))
}

/// `perm` of a topic being created, as the page's form names it.
#[derive(Deserialize, Default, Clone, Copy)]
#[serde(rename_all = "snake_case")]
enum PermArg {
    #[default]
    ReadWrite,
    Read,
    Write,
}

#[derive(Deserialize, Clone, Copy)]
#[serde(rename_all = "snake_case")]
enum MessageTypeArg {
    Normal,
    Fifo,
    Delay,
    Transaction,
    Mixed,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateTopicBody {
    name: String,
    queues: u32,
    #[serde(default)]
    perm: PermArg,
    /// Absent: NORMAL for a new topic; an existing topic keeps its type.
    #[serde(default)]
    message_type: Option<MessageTypeArg>,
    /// Broker groups to create it on (empty: every live group).
    #[serde(default)]
    groups: Vec<String>,
    access_key: Option<String>,
    secret: Option<String>,
}

async fn create_topic(State(c): Shared, headers: HeaderMap, body: Bytes) -> Api<Done> {
    let b: CreateTopicBody = json_body(&headers, &body)?;
    let cred = credential(b.access_key, b.secret)?;
    raftmq_broker::validate::topic_name(&b.name)?;
    raftmq_broker::validate::queue_count(b.queues).map_err(|_| {
        ApiError::bad_request(format!(
            "queues {} is out of range 1..={}",
            b.queues,
            raftmq_broker::validate::MAX_QUEUES
        ))
    })?;
    if b.groups.len() > 64 || b.groups.iter().any(|g| g.is_empty() || g.len() > 127) {
        return Err(ApiError::bad_request(
            "groups must name at most 64 broker groups of 1 to 127 characters",
        ));
    }
    let perm = match b.perm {
        PermArg::ReadWrite => pb::Permission::ReadWrite,
        PermArg::Read => pb::Permission::Read,
        PermArg::Write => pb::Permission::Write,
    };
    let message_type = match b.message_type {
        None => pb::MessageType::Unspecified,
        Some(MessageTypeArg::Normal) => pb::MessageType::Normal,
        Some(MessageTypeArg::Fifo) => pb::MessageType::Fifo,
        Some(MessageTypeArg::Delay) => pb::MessageType::Delay,
        Some(MessageTypeArg::Transaction) => pb::MessageType::Transaction,
        Some(MessageTypeArg::Mixed) => pb::MessageType::Mixed,
    };
    c.admin_for(cred)?
        .create_topic_on(&b.name, b.queues, perm, message_type, &b.groups)
        .await
        .map_err(|e| match e {
            // The client's "no live broker group is named ..." is the caller's typo.
            raftmq_client::Error::NoRoute { reason, .. } if !b.groups.is_empty() => ApiError::bad_request(reason),
            e => e.into(),
        })?;
    Ok(Json(Done {
        ok: true,
        existed: None,
    }))
}

/// The body of a call that changes state and needs nothing but the credential.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CredentialOnly {
    access_key: Option<String>,
    secret: Option<String>,
}

async fn delete_topic(State(c): Shared, Path(name): Path<String>, headers: HeaderMap, body: Bytes) -> Api<Done> {
    // DELETE may come without a body (and then without a content type).
    let b: CredentialOnly = if body.is_empty() {
        CredentialOnly {
            access_key: None,
            secret: None,
        }
    } else {
        json_body(&headers, &body)?
    };
    let cred = credential(b.access_key, b.secret)?;
    raftmq_broker::validate::topic_name(&name)?;
    let existed = c.admin_for(cred)?.delete_topic(&name).await?;
    Ok(Json(Done {
        ok: true,
        existed: Some(existed),
    }))
}

async fn list_groups(State(c): Shared) -> Api<ConsumerGroupList> {
    Ok(Json(ConsumerGroupList::from_pb(
        c.reader().list_consumer_groups().await?,
    )))
}

async fn describe_group(State(c): Shared, Path(group): Path<String>) -> Api<ConsumerGroupDetail> {
    raftmq_broker::validate::consumer_group_name(&group)?;
    let found = c.reader().describe_consumer_group(&group).await?;
    if found.is_empty() {
        return Err(ApiError::not_found(format!(
            "consumer group {group:?} is unknown to every broker group"
        )));
    }
    Ok(Json(ConsumerGroupDetail::from_pb(&group, found)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ResetBody {
    topic: String,
    /// "first", "last", or a time in ms since the epoch (as `admin group
    /// reset-offset --to` takes it).
    to: String,
    access_key: Option<String>,
    secret: Option<String>,
}

async fn reset_offset(State(c): Shared, Path(group): Path<String>, headers: HeaderMap, body: Bytes) -> Api<ResetView> {
    let b: ResetBody = json_body(&headers, &body)?;
    let cred = credential(b.access_key, b.secret)?;
    raftmq_broker::validate::consumer_group_name(&group)?;
    raftmq_broker::validate::topic_name(&b.topic)?;
    let (to, ts) = crate::tools::reset_target(&b.to).map_err(|e| ApiError::bad_request(format!("to: {e:#}")))?;
    let queues = c
        .admin_for(cred)?
        .reset_consumer_offset(&group, &b.topic, to, ts)
        .await?;
    Ok(Json(ResetView {
        queues: queues.into_iter().map(ConsumerQueueView::from_pb).collect(),
    }))
}

async fn dead_letters(State(c): Shared, Path(group): Path<String>, RawQuery(q): RawQuery) -> Api<MessageList> {
    let p = Params::parse(q.as_deref(), &["max"])?;
    let max = p.number("max", 50, 1..=MAX_DEAD_LETTERS)?;
    raftmq_broker::validate::consumer_group_name(&group)?;
    let letters = c.reader().dead_letters(&group, max as usize).await?;
    Ok(Json(MessageList {
        messages: letters
            .into_iter()
            .map(|(broker_group, m)| MessageView::from_pb(Some(broker_group), m))
            .collect(),
    }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ResendBody {
    /// The dead letter's message id, as the DLQ listing shows it.
    id: String,
    access_key: Option<String>,
    secret: Option<String>,
}

async fn resend_dead_letter(
    State(c): Shared,
    Path(group): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Api<ResendView> {
    let b: ResendBody = json_body(&headers, &body)?;
    let cred = credential(b.access_key, b.secret)?;
    raftmq_broker::validate::consumer_group_name(&group)?;
    message_id(&b.id)?;
    let r = c.admin_for(cred)?.resend_dead_letter(&group, &b.id).await?;
    Ok(Json(ResendView {
        message_id: r.message_id,
        broker_group: r.broker_group,
        queue_id: r.queue_id,
        queue_offset: r.queue_offset,
    }))
}

/// A message id's shape, checked before any broker is asked.
fn message_id(id: &str) -> Result<(), ApiError> {
    if id.is_empty() || id.len() > MAX_MESSAGE_ID_LEN || !id.chars().all(|c| c.is_ascii_alphanumeric()) {
        return Err(ApiError::bad_request(format!(
            "message id {id:?} must be 1 to {MAX_MESSAGE_ID_LEN} letters and digits"
        )));
    }
    Ok(())
}

async fn message_by_id(State(c): Shared, RawQuery(q): RawQuery) -> Api<MessageList> {
    let p = Params::parse(q.as_deref(), &["id"])?;
    let id = p.required("id")?;
    message_id(id)?;
    match c.reader().query_message_by_id(id).await? {
        Some(m) => Ok(Json(MessageList {
            messages: vec![MessageView::from_pb(None, m)],
        })),
        None => Err(ApiError::not_found(format!("no broker group holds message {id}"))),
    }
}

/// The message's trace timeline (empty when it was not traced).
async fn message_trace(State(c): Shared, RawQuery(q): RawQuery) -> Api<TraceView> {
    let p = Params::parse(q.as_deref(), &["id"])?;
    let id = p.required("id")?;
    message_id(id)?;
    let events = c.reader().trace(id).await?;
    Ok(Json(TraceView {
        events: events.into_iter().map(TraceEventView::from_pb).collect(),
    }))
}

async fn messages_by_key(State(c): Shared, RawQuery(q): RawQuery) -> Api<MessageList> {
    let p = Params::parse(q.as_deref(), &["topic", "key", "max"])?;
    let topic = p.required("topic")?;
    let key = p.required("key")?;
    let max = p.number("max", 32, 1..=MAX_BY_KEY)?;
    raftmq_broker::validate::topic_name(topic)?;
    if key.len() > raftmq_broker::validate::MAX_KEY_LEN {
        return Err(ApiError::bad_request(format!(
            "key is {} bytes; at most {} are allowed",
            key.len(),
            raftmq_broker::validate::MAX_KEY_LEN
        )));
    }
    let found = c.reader().query_messages_by_key(topic, key, max as u32).await?;
    Ok(Json(MessageList {
        messages: found.into_iter().map(|m| MessageView::from_pb(None, m)).collect(),
    }))
}

/// Up to `count` messages of one queue from `offset`.
async fn browse(State(c): Shared, RawQuery(q): RawQuery) -> Api<BrowseView> {
    let p = Params::parse(q.as_deref(), &["topic", "broker_group", "queue", "offset", "count"])?;
    let topic = p.required("topic")?.to_owned();
    raftmq_broker::validate::topic_name(&topic)?;
    let queue_id = p.number("queue", 0, 0..=u64::from(raftmq_broker::validate::MAX_QUEUES - 1))? as u32;
    let offset = p.number("offset", 0, 0..=u64::MAX)?;
    let count = p.number("count", 20, 1..=MAX_BROWSE)? as u32;
    // Only a topic a group holds is read: a pull through the client's route
    // would otherwise ask every live group about a typo.
    let placed = c.placements(&topic).await?;
    let (broker_group, config) = match p.optional("broker_group") {
        Some(g) => placed
            .iter()
            .find(|(name, _)| name == g)
            .ok_or_else(|| ApiError::not_found(format!("topic {topic:?} is not on broker group {g:?}")))?,
        None => placed
            .first()
            .ok_or_else(|| ApiError::not_found(format!("topic {topic:?} is on no broker group")))?,
    };
    if queue_id >= config.queues_per_group {
        return Err(ApiError::bad_request(format!(
            "queue {queue_id} is out of range: topic {topic} has {} queue(s) on {broker_group}",
            config.queues_per_group
        )));
    }
    let r = c
        .client
        .pull_consumer()
        .pull(
            &topic,
            broker_group,
            queue_id,
            offset,
            count,
            Duration::ZERO,
            &Filter::all(),
        )
        .await?;
    Ok(Json(BrowseView {
        messages: r
            .messages
            .into_iter()
            .take(count as usize)
            .map(|m| MessageView::from_pb(Some(broker_group.clone()), m))
            .collect(),
        topic,
        broker_group: broker_group.clone(),
        queue_id,
        min_offset: r.min_offset,
        max_offset: r.max_offset,
        next_offset: r.next_offset,
    }))
}
