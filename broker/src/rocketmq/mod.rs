//! RocketMQ 5's gRPC API, `apache.rocketmq.v2.MessagingService`, served on
//! every broker node's client port so the official RocketMQ 5 SDKs work against
//! raftmq with only their endpoint changed (the SDK's access point is any
//! node's client address; RocketMQ's proxy would be on 8081).
//!
//! A translation layer over raftmq's own services: each RPC becomes a
//! `raftmq.v1` call on the leader of the broker group concerned, in-process
//! when this node leads and forwarded otherwise ([`upstream`]), so every node
//! serves every RPC and a failover is invisible to SDKs that never re-query
//! their routes. What it maps:
//!
//! * QueryRoute: one queue per queue id per broker group, broker id 0, with all
//!   of the group's replicas as endpoints (gRPC's pick-first moves to the next
//!   replica when one dies); the topic's type as `accept_message_types`. In a
//!   cluster that auto-creates topics, an unknown topic is created (MIXED).
//! * SendMessage: NORMAL, FIFO (queue = hash of the message group), DELAY
//!   (delivery timestamp) and TRANSACTION (a half message, producer group = the
//!   topic); the producer is the SDK's client id and the sequence a hash of the
//!   message ids, so the Python SDK's immediate retries of a send are stored
//!   once. The SDK's message id is echoed and delivered back ([`message`]).
//! * ReceiveMessage (POP over every queue of the group), AckMessage,
//!   ChangeInvisibleDuration, ForwardMessageToDeadLetterQueue, EndTransaction.
//! * Telemetry: Settings answered; check-backs relayed ([`telemetry`]).
//! * Heartbeat, NotifyClientTermination, QueryAssignment.
//!
//! Every answer carries an `apache.rocketmq.v2.Status` ([`codes`]); the gRPC
//! status is OK unless the request could not be read. The `authorization`
//! header every SDK sends is accepted unverified here (ACL is raftmq's #13).

pub mod codes;
pub mod message;
pub mod telemetry;
pub mod upstream;

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use openraft::async_runtime::WatchReceiver;
use raftmq_proto::rocketmq::v2;
use raftmq_proto::rocketmq::v2::messaging_service_server::{MessagingService, MessagingServiceServer};
use raftmq_proto::v1 as pb;
use raftmq_proto::v1::admin_service_server::AdminService as V1Admin;
use raftmq_proto::v1::consumer_service_server::ConsumerService as V1Consumer;
use raftmq_proto::v1::messaging_service_server::MessagingService as V1Messaging;
use raftmq_raft_store::TopicMessageType;
use raftmq_raft_store::command::{PERM_READ, PERM_WRITE};
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;
use v2::Code;

use crate::admin::Admin;
use crate::consumer_group::Coordinator;
use crate::messaging::Messaging;
use codes::Op;
use upstream::{Retry, Target, Upstream};

pub(crate) use crate::messaging::now_ms;

/// Telemetry streams one node holds open at once.
const MAX_TELEMETRY_STREAMS: usize = 10_000;
/// Time budget of a call whose client gave no deadline (the SDKs' default
/// request timeout is 3 s).
const DEFAULT_BUDGET: Duration = Duration::from_secs(3);
/// Longest a forwarded call keeps retrying across a leader change.
const MAX_BUDGET: Duration = Duration::from_secs(10);
/// Messages per receive when the SDK asks for none.
const DEFAULT_BATCH: u32 = 32;
/// Invisible time of a push consumer's receive (auto-renew, no duration given),
/// RocketMQ's proxy default.
const AUTO_RENEW_INVISIBLE: Duration = Duration::from_secs(60);
/// The ASCII header with the SDK's client id.
const CLIENT_ID_HEADER: &str = "x-mq-client-id";

/// The RocketMQ 5 gateway of one broker node.
#[derive(Clone)]
pub struct Gateway {
    inner: Arc<Inner>,
}

struct Inner {
    up: Upstream,
    messaging: Messaging,
    consumer: Coordinator,
    admin: Admin,
    streams: Arc<Semaphore>,
}

type ReceiveStream = Pin<Box<dyn Stream<Item = Result<v2::ReceiveMessageResponse, Status>> + Send>>;
type PullStream = Pin<Box<dyn Stream<Item = Result<v2::PullMessageResponse, Status>> + Send>>;
type TelemetryStream = Pin<Box<dyn Stream<Item = Result<v2::TelemetryCommand, Status>> + Send>>;

/// A refusal before any upstream call: the RocketMQ code and what was wrong.
type Refusal = (Code, String);

fn refuse(code: Code, message: impl Into<String>) -> Refusal {
    (code, message.into())
}

fn header(md: &MetadataMap, key: &str) -> Option<String> {
    md.get(key).and_then(|v| v.to_str().ok()).map(str::to_owned)
}

fn client_id(md: &MetadataMap) -> Result<String, Refusal> {
    match header(md, CLIENT_ID_HEADER) {
        Some(id) if !id.is_empty() && id.len() <= 256 => Ok(id),
        Some(id) => Err(refuse(
            Code::ClientIdRequired,
            format!("header {CLIENT_ID_HEADER} of {} bytes: 1 to 256 expected", id.len()),
        )),
        None => Err(refuse(
            Code::ClientIdRequired,
            format!("header {CLIENT_ID_HEADER} is required (every RocketMQ 5 SDK sends it)"),
        )),
    }
}

/// The client's deadline, from the `grpc-timeout` header ("3S", "2999980u", ...).
fn deadline(md: &MetadataMap) -> Option<Duration> {
    let v = header(md, "grpc-timeout")?;
    let (n, unit) = v.split_at(v.len().checked_sub(1)?);
    let n: u64 = n.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// How long a unary call may spend retrying across a leader change: most of
/// the client's deadline, so the answer still reaches it.
fn budget(md: &MetadataMap) -> Duration {
    let d = deadline(md).unwrap_or(DEFAULT_BUDGET);
    d.saturating_sub(d / 5).min(MAX_BUDGET)
}

fn resource(namespace: &str, name: &str) -> Option<v2::Resource> {
    Some(v2::Resource {
        resource_namespace: namespace.to_owned(),
        name: name.to_owned(),
    })
}

fn name_of(r: &Option<v2::Resource>) -> (&str, &str) {
    r.as_ref()
        .map_or(("", ""), |r| (r.resource_namespace.as_str(), r.name.as_str()))
}

/// FNV-1a over the batch's message ids: the sequence the broker's dedup window
/// remembers a send by. 64 bits, so two different sends of one producer within
/// its window of 4096 collide with odds of about 2^-40.
fn sequence_of(ids: &[&str]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for id in ids {
        for b in id.bytes().chain(std::iter::once(0)) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h
}

/// Endpoints as an SDK connects to them. IP addresses go as one IPv4 (or IPv6)
/// list, which gRPC's pick-first walks when a replica dies; host names cannot
/// be listed (a `dns:` target names one host), so the leader's alone.
fn endpoints(addrs: &[String]) -> v2::Endpoints {
    let parsed: Vec<Option<std::net::SocketAddr>> = addrs.iter().map(|a| a.parse().ok()).collect();
    let all_v4 = parsed.iter().all(|p| p.is_some_and(|a| a.is_ipv4()));
    let all_v6 = parsed.iter().all(|p| p.is_some_and(|a| a.is_ipv6()));
    if !addrs.is_empty() && (all_v4 || all_v6) {
        return v2::Endpoints {
            scheme: if all_v4 {
                v2::AddressScheme::IPv4
            } else {
                v2::AddressScheme::IPv6
            } as i32,
            addresses: parsed
                .into_iter()
                .flatten()
                .map(|a| v2::Address {
                    host: a.ip().to_string(),
                    port: i32::from(a.port()),
                })
                .collect(),
        };
    }
    let first = addrs.first().map(String::as_str).unwrap_or_default();
    let (host, port) = first.rsplit_once(':').unwrap_or((first, "0"));
    v2::Endpoints {
        scheme: v2::AddressScheme::DomainName as i32,
        addresses: vec![v2::Address {
            host: host.to_owned(),
            port: port.parse().unwrap_or(0),
        }],
    }
}

/// The addresses a route gives for a broker group. Every node serves every RPC
/// (forwarding to the leader), so any live replica will do; what differs is how
/// SDKs use a list:
///
/// * The Rust SDK balances its calls over all the addresses (tonic's
///   `balance_list`) and never re-queries routes: it gets every replica, so a
///   dead node costs it nothing but the calls in flight.
/// * The Python SDK (grpcio) dials a list as one `ipv4:a,b,c` target, whose HTTP/2
///   `:authority` carries every address and is refused by our HTTP/2 server as
///   malformed; Java and Go SDKs are untested. They get one address: for our
///   own group this node, which just answered them and forwards the rest (a
///   leader change is then invisible); for another group its leader. They
///   re-query routes (Python every 30 s), which moves them off a dead node.
fn route_addresses(group: &upstream::GroupInfo, local_group: &str, me: &str, lists_all: bool) -> Vec<String> {
    if lists_all || group.endpoints.len() <= 1 {
        return group.endpoints.clone();
    }
    if group.name == local_group && !me.is_empty() {
        return vec![me.to_owned()];
    }
    group.endpoints[..1].to_vec()
}

fn permission(perm: u8) -> v2::Permission {
    match (perm & PERM_READ != 0, perm & PERM_WRITE != 0) {
        (true, true) => v2::Permission::ReadWrite,
        (true, false) => v2::Permission::Read,
        (false, true) => v2::Permission::Write,
        (false, false) => v2::Permission::None,
    }
}

/// The broker group a receipt handle or transaction id came from: both carry
/// the crc32c of its name (handles at 1..9, message ids at 2..10).
fn crc_at(s: &str, range: std::ops::Range<usize>) -> Option<u32> {
    s.get(range).and_then(|h| u32::from_str_radix(h, 16).ok())
}

impl Gateway {
    pub fn new(up: Upstream, messaging: Messaging, consumer: Coordinator, admin: Admin) -> Self {
        Gateway {
            inner: Arc::new(Inner {
                up,
                messaging,
                consumer,
                admin,
                streams: Arc::new(Semaphore::new(MAX_TELEMETRY_STREAMS)),
            }),
        }
    }

    pub fn into_server(self, max_message_bytes: usize) -> MessagingServiceServer<Self> {
        MessagingServiceServer::new(self)
            .max_decoding_message_size(max_message_bytes)
            .max_encoding_message_size(max_message_bytes)
    }

    fn auth(&self) -> &crate::auth::Auth {
        self.up().group().auth()
    }

    fn up(&self) -> &Upstream {
        &self.inner.up
    }

    async fn query_route(
        &self,
        md: &MetadataMap,
        req: v2::QueryRouteRequest,
    ) -> Result<Vec<v2::MessageQueue>, Refusal> {
        let (ns, topic) = name_of(&req.topic);
        crate::validate::topic_name(topic).map_err(|e| refuse(Code::IllegalTopic, e.to_string()))?;
        let mut routes = self.routes(topic).await?;
        if routes.is_empty() && self.up().group().config().auto_create_topics {
            self.auto_create(md, topic).await?;
            routes = self.routes(topic).await?;
        }
        if routes.is_empty() {
            return Err(refuse(Code::TopicNotFound, format!("topic {topic:?} does not exist")));
        }
        // Which addresses an SDK gets (see `route_addresses`).
        let lists_all = header(md, "x-mq-language").is_some_and(|l| l.eq_ignore_ascii_case("RUST"));
        let me = self.up().group().endpoint_of(self.up().group().node_id());
        let mut queues = Vec::new();
        for r in routes {
            let addrs = route_addresses(&r.group, self.up().local_group(), &me, lists_all);
            let broker = v2::Broker {
                name: r.group.name.clone(),
                id: 0,
                endpoints: Some(endpoints(&addrs)),
            };
            for q in 0..r.queues {
                queues.push(v2::MessageQueue {
                    topic: resource(ns, topic),
                    id: i32::try_from(q).unwrap_or(i32::MAX),
                    permission: permission(r.perm) as i32,
                    broker: Some(broker.clone()),
                    accept_message_types: message::accepted(r.message_type),
                });
            }
        }
        if queues.is_empty() {
            // Both SDKs break on a route without queues (Rust divides by zero).
            return Err(refuse(Code::TopicNotFound, format!("topic {topic:?} has no queues")));
        }
        Ok(queues)
    }

    async fn routes(&self, topic: &str) -> Result<Vec<upstream::TopicRoute>, Refusal> {
        self.up().topic_routes(topic).await.map_err(|s| {
            codes::from_status(Op::Route, &s).map_or_else(
                || refuse(Code::InternalServerError, ""),
                |s| (Code::try_from(s.code).unwrap_or(Code::InternalServerError), s.message),
            )
        })
    }

    /// Creates `topic` (MIXED: `raftmq dev` users send every kind) on this
    /// node's group and waits until this replica has applied it, so the route
    /// read next sees it.
    async fn auto_create(&self, md: &MetadataMap, topic: &str) -> Result<(), Refusal> {
        let g = self.up().group();
        tracing::info!(topic, "auto-creating topic for a RocketMQ 5 route query");
        let req = pb::CreateTopicRequest {
            topic: Some(pb::TopicConfig {
                name: topic.to_owned(),
                queues_per_group: g.config().default_queues,
                perm: pb::Permission::ReadWrite as i32,
                message_type: pb::MessageType::Mixed as i32,
                trace: None,
            }),
            // This node may not have applied a topic just created through
            // another: never reset it (its type, its queue count).
            if_absent: true,
        };
        let admin = self.inner.admin.clone();
        let created = self
            .up()
            .call(g.group(), Retry::Unavailable, budget(md), |t| {
                let (admin, req) = (admin.clone(), req.clone());
                async move {
                    match t {
                        Target::Local => V1Admin::create_topic(&admin, crate::auth::internal(req)).await,
                        Target::Remote(ch) => {
                            pb::admin_service_client::AdminServiceClient::new(ch)
                                .create_topic(req)
                                .await
                        }
                    }
                }
            })
            .await;
        if let Err(s) = created {
            let s = codes::from_status(Op::Route, &s).unwrap_or_default();
            return Err((Code::try_from(s.code).unwrap_or(Code::InternalServerError), s.message));
        }
        // Created through the leader; this replica applies it a moment later.
        let wait = async {
            let mut applied = g.raft().data_metrics();
            while g.store().topic(topic).ok().flatten().is_none() {
                if applied.changed().await.is_err() {
                    break;
                }
            }
        };
        let _ = tokio::time::timeout(budget(md), wait).await;
        Ok(())
    }

    async fn send(&self, md: &MetadataMap, req: v2::SendMessageRequest) -> v2::SendMessageResponse {
        let count = req.messages.len().max(1);
        let failed = |(code, message): Refusal| {
            let status = codes::status(code, message);
            v2::SendMessageResponse {
                status: status.clone(),
                // One entry per message: Python asserts it, Rust indexes [0].
                entries: (0..count)
                    .map(|_| v2::SendResultEntry {
                        status: status.clone(),
                        ..Default::default()
                    })
                    .collect(),
            }
        };
        match self.send_checked(md, req).await {
            Ok(entries) => v2::SendMessageResponse {
                status: codes::ok(),
                entries,
            },
            Err(r) => failed(r),
        }
    }

    async fn send_checked(
        &self,
        md: &MetadataMap,
        req: v2::SendMessageRequest,
    ) -> Result<Vec<v2::SendResultEntry>, Refusal> {
        let client = client_id(md)?;
        let g = self.up().group().clone();
        let config = g.config();
        if req.messages.is_empty() {
            return Err(refuse(Code::BadRequest, "a SendMessage without messages"));
        }
        if req.messages.len() > config.max_batch_messages {
            return Err(refuse(
                Code::BadRequest,
                format!(
                    "{} messages in one SendMessage: at most {} (max_batch_messages)",
                    req.messages.len(),
                    config.max_batch_messages
                ),
            ));
        }
        let now = now_ms();
        let mut out = Vec::with_capacity(req.messages.len());
        for m in req.messages {
            let size = m.body.len();
            if size > config.max_body_bytes {
                return Err(refuse(
                    Code::MessageBodyTooLarge,
                    format!(
                        "a message body of {size} bytes: at most {} (max_body_bytes)",
                        config.max_body_bytes
                    ),
                ));
            }
            if size == 0 {
                // Not MESSAGE_BODY_EMPTY: the Rust SDK 5.0.0 panics on that code.
                return Err(refuse(Code::BadRequest, "a message with an empty body"));
            }
            out.push(message::outgoing(m, now, config.max_delay)?);
        }
        let first = &out[0];
        let (topic, kind, group) = (first.message.topic.clone(), first.kind, first.message_group.clone());
        crate::validate::topic_name(&topic).map_err(|e| refuse(Code::IllegalTopic, e.to_string()))?;
        if out
            .iter()
            .any(|o| o.message.topic != topic || o.kind != kind || o.message_group != group)
        {
            return Err(refuse(
                Code::BadRequest,
                "the messages of one SendMessage must share their topic, type and message group",
            ));
        }
        let stored = g
            .store()
            .topic(&topic)
            .map_err(|e| refuse(Code::InternalServerError, e.to_string()))?;
        let mut queue_id = None;
        if let Some(t) = &stored {
            if !t.message_type.accepts(kind) {
                return Err(refuse(
                    Code::MessagePropertyConflictWithType,
                    format!(
                        "topic {topic:?} is a {} topic and does not accept {} messages",
                        t.message_type.name(),
                        kind.name()
                    ),
                ));
            }
            if t.perm & PERM_WRITE == 0 {
                return Err(refuse(Code::Forbidden, format!("topic {topic:?} is not writable")));
            }
            // FIFO: one message group, one queue, so its order is kept.
            if let Some(group) = &group {
                queue_id = Some(crc32c::crc32c(group.as_bytes()) % t.queues.max(1));
            }
        }
        let ids: Vec<&str> = out.iter().map(|o| o.id.as_str()).collect();
        let sequence = sequence_of(&ids);
        let client_ids: Vec<String> = out.iter().map(|o| o.id.clone()).collect();
        // Message trace: an SDK asks with the user property TRACE_ON=true (its
        // own trace hook would write RocketMQ's trace format, which this is not).
        let trace = out.iter().any(|o| crate::trace::is_traced_pb(Some(&o.message)));
        let producer_id = if client.len() + 5 <= raftmq_raft_store::dedup::MAX_PRODUCER_ID_LEN {
            format!("rmq5:{client}")
        } else {
            format!("rmq5:{:016x}", sequence_of(&[&client]))
        };
        let v1 = pb::SendRequest {
            topic: topic.clone(),
            queue_id,
            messages: out.into_iter().map(|o| o.message).collect(),
            producer_id,
            sequence,
            transactional: kind == TopicMessageType::Transaction,
            // RocketMQ's proxy registers a producer under its topic: check-backs
            // of a topic go to the producers that named it in their Settings.
            producer_group: if kind == TopicMessageType::Transaction {
                topic.clone()
            } else {
                String::new()
            },
            trace,
        };
        let messaging = self.inner.messaging.clone();
        let sent = self
            .up()
            .call(g.group(), Retry::Unavailable, budget(md), |t| {
                let (messaging, v1) = (messaging.clone(), v1.clone());
                async move {
                    match t {
                        Target::Local => V1Messaging::send(&messaging, crate::auth::internal(v1)).await,
                        Target::Remote(ch) => {
                            pb::messaging_service_client::MessagingServiceClient::new(ch)
                                .send(v1)
                                .await
                        }
                    }
                }
            })
            .await
            .map_err(|s| self.refusal(Op::Send, &s))?
            .into_inner();
        if sent.results.len() != client_ids.len() {
            return Err(refuse(
                Code::InternalServerError,
                format!("{} messages sent, {} results", client_ids.len(), sent.results.len()),
            ));
        }
        Ok(sent
            .results
            .into_iter()
            .zip(client_ids)
            .map(|(r, id)| v2::SendResultEntry {
                status: codes::ok(),
                message_id: id,
                transaction_id: r.transaction_id,
                offset: i64::try_from(r.queue_offset).unwrap_or(i64::MAX),
                recall_handle: String::new(),
            })
            .collect())
    }

    fn refusal(&self, op: Op, s: &Status) -> Refusal {
        let st = codes::from_status(op, s).unwrap_or_default();
        (Code::try_from(st.code).unwrap_or(Code::InternalServerError), st.message)
    }

    /// The broker group to send `req`'s consumer calls to: the one named in the
    /// queue, else ours.
    fn broker_of(&self, q: &Option<v2::MessageQueue>) -> String {
        q.as_ref()
            .and_then(|q| q.broker.as_ref())
            .map(|b| b.name.clone())
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| self.up().local_group().to_owned())
    }

    async fn receive(&self, md: &MetadataMap, req: v2::ReceiveMessageRequest) -> Vec<v2::ReceiveMessageResponse> {
        let status_only = |(code, message): Refusal| {
            vec![v2::ReceiveMessageResponse {
                content: Some(v2::receive_message_response::Content::Status(v2::Status {
                    code: code as i32,
                    message,
                })),
            }]
        };
        match self.receive_checked(md, req).await {
            Ok(answer) => answer,
            Err(r) => status_only(r),
        }
    }

    async fn receive_checked(
        &self,
        md: &MetadataMap,
        req: v2::ReceiveMessageRequest,
    ) -> Result<Vec<v2::ReceiveMessageResponse>, Refusal> {
        let client = client_id(md)?;
        let (_, group) = name_of(&req.group);
        let (ns, topic) = req.message_queue.as_ref().map_or(("", ""), |q| name_of(&q.topic));
        let (ns, topic, group) = (ns.to_owned(), topic.to_owned(), group.to_owned());
        let broker = self.broker_of(&req.message_queue);
        let (filter_type, expression) = match &req.filter_expression {
            Some(f) => match v2::FilterType::try_from(f.r#type) {
                Ok(v2::FilterType::Sql) => (pb::FilterType::Sql92, f.expression.clone()),
                Ok(v2::FilterType::Tag | v2::FilterType::Unspecified) => (pb::FilterType::Tag, f.expression.clone()),
                Err(_) => {
                    return Err(refuse(
                        Code::IllegalFilterExpression,
                        format!("filter type {} is not TAG (1) or SQL (2)", f.r#type),
                    ));
                }
            },
            None => (pb::FilterType::Tag, "*".to_owned()),
        };
        let invisible_ms = match &req.invisible_duration {
            Some(d) if d.seconds < 0 || d.nanos < 0 => {
                return Err(refuse(Code::IllegalInvisibleTime, "a negative invisible_duration"));
            }
            Some(d) => (d.seconds as u64).saturating_mul(1000) + (d.nanos as u64) / 1_000_000,
            None if req.auto_renew => AUTO_RENEW_INVISIBLE.as_millis() as u64,
            None => 0,
        };
        if req.batch_size < 0 {
            return Err(refuse(
                Code::BadRequest,
                format!("batch_size {} is negative", req.batch_size),
            ));
        }
        let batch = match req.batch_size as u32 {
            0 => DEFAULT_BATCH,
            n => n,
        };
        // Long polling must end before the client's deadline (the Rust SDK's
        // equals its long-polling timeout), so keep a margin, and at most what a
        // push consumer is told to use.
        let requested = match &req.long_polling_timeout {
            Some(d) if d.seconds >= 0 && d.nanos >= 0 => Duration::new(d.seconds as u64, d.nanos as u32),
            Some(_) => return Err(refuse(Code::IllegalPollingTime, "a negative long_polling_timeout")),
            None => telemetry::LONG_POLLING,
        };
        let remaining = deadline(md).unwrap_or(telemetry::LONG_POLLING + DEFAULT_BUDGET);
        let margin = (remaining / 2).min(Duration::from_secs(2));
        let poll = requested
            .min(telemetry::LONG_POLLING)
            .min(remaining.saturating_sub(margin));
        let v1 = pb::ReceiveRequest {
            consumer_group: group.clone(),
            topic: topic.clone(),
            filter_type: filter_type as i32,
            filter_expression: if expression.is_empty() {
                "*".to_owned()
            } else {
                expression
            },
            max_messages: batch,
            invisible_duration_ms: invisible_ms,
            max_wait_ms: u32::try_from(poll.as_millis()).unwrap_or(u32::MAX),
            // For message traces; an SDK's id this API would refuse is left out.
            client_id: if crate::validate::client_id(&client).is_ok() {
                client
            } else {
                String::new()
            },
        };
        let consumer = self.inner.consumer.clone();
        let received = self
            .up()
            .call(&broker, Retry::NotLeader, margin, |t| {
                let (consumer, v1) = (consumer.clone(), v1.clone());
                async move {
                    match t {
                        Target::Local => V1Consumer::receive(&consumer, crate::auth::internal(v1)).await,
                        Target::Remote(ch) => {
                            pb::consumer_service_client::ConsumerServiceClient::new(ch)
                                .max_decoding_message_size(usize::MAX)
                                .receive(v1)
                                .await
                        }
                    }
                }
            })
            .await
            .map_err(|s| self.refusal(Op::Receive, &s))?
            .into_inner();
        let store_host = self.up().group().endpoint_of(self.up().group().node_id());
        let now = now_ms();
        let mut answer = Vec::with_capacity(received.messages.len() + 2);
        let first = if received.messages.is_empty() {
            codes::status(Code::MessageNotFound, "no new message")
        } else {
            codes::ok()
        };
        answer.push(v2::ReceiveMessageResponse {
            content: first.map(v2::receive_message_response::Content::Status),
        });
        for r in received.messages {
            let Some(pulled) = r.message else { continue };
            let delivery = message::Delivery {
                receipt_handle: r.receipt_handle,
                attempt: r.delivery_attempt,
                invisible_until_ms: r.invisible_until_ms,
            };
            answer.push(v2::ReceiveMessageResponse {
                content: Some(v2::receive_message_response::Content::Message(message::incoming(
                    pulled,
                    &ns,
                    &store_host,
                    Some(delivery),
                    now,
                ))),
            });
        }
        answer.push(v2::ReceiveMessageResponse {
            content: Some(v2::receive_message_response::Content::DeliveryTimestamp(
                message::timestamp(now),
            )),
        });
        Ok(answer)
    }

    /// The broker group that issued a receipt handle.
    async fn handle_group(&self, handle: &str) -> Result<String, Refusal> {
        let crc = crc_at(handle, 1..9)
            .filter(|_| handle.starts_with('1'))
            .ok_or_else(|| {
                refuse(
                    Code::InvalidReceiptHandle,
                    format!("receipt handle {handle:?} was not issued by raftmq"),
                )
            })?;
        self.up().group_by_crc(crc).await.map_err(|s| {
            refuse(
                Code::InvalidReceiptHandle,
                format!("receipt handle {handle:?}: {}", s.message()),
            )
        })
    }

    async fn ack(&self, md: &MetadataMap, req: v2::AckMessageRequest) -> v2::AckMessageResponse {
        let (_, group) = name_of(&req.group);
        let (_, topic) = name_of(&req.topic);
        if req.entries.is_empty() {
            return v2::AckMessageResponse {
                status: codes::status(Code::BadRequest, "an AckMessage without entries"),
                entries: Vec::new(),
            };
        }
        // Handles grouped by the broker group that issued them, in request order.
        let mut results: Vec<Option<v2::Status>> = vec![None; req.entries.len()];
        let mut by_group: HashMap<String, Vec<usize>> = HashMap::new();
        for (i, e) in req.entries.iter().enumerate() {
            match self.handle_group(&e.receipt_handle).await {
                Ok(g) => by_group.entry(g).or_default().push(i),
                Err((code, m)) => results[i] = codes::status(code, m),
            }
        }
        for (broker, idx) in by_group {
            let v1 = pb::AckRequest {
                consumer_group: group.to_owned(),
                topic: topic.to_owned(),
                receipt_handles: idx.iter().map(|&i| req.entries[i].receipt_handle.clone()).collect(),
            };
            let consumer = self.inner.consumer.clone();
            // Retried across a lost leader too: if the first attempt was stored,
            // the retry finds the handle stale and says so (INVALID_RECEIPT_HANDLE),
            // which SDKs treat as done; if not, the retry acks it.
            let acked = self
                .up()
                .call(&broker, Retry::Unavailable, budget(md), |t| {
                    let (consumer, v1) = (consumer.clone(), v1.clone());
                    async move {
                        match t {
                            Target::Local => V1Consumer::ack(&consumer, crate::auth::internal(v1)).await,
                            Target::Remote(ch) => {
                                pb::consumer_service_client::ConsumerServiceClient::new(ch)
                                    .ack(v1)
                                    .await
                            }
                        }
                    }
                })
                .await;
            match acked {
                Ok(resp) => {
                    for (&i, r) in idx.iter().zip(resp.into_inner().results) {
                        results[i] = if r.ok {
                            codes::ok()
                        } else {
                            codes::status(Code::InvalidReceiptHandle, r.error)
                        };
                    }
                }
                Err(s) => {
                    for &i in &idx {
                        results[i] = codes::from_status(Op::Handle, &s);
                    }
                }
            }
        }
        let entries: Vec<v2::AckMessageResultEntry> = req
            .entries
            .into_iter()
            .zip(results)
            .map(|(e, status)| v2::AckMessageResultEntry {
                message_id: e.message_id,
                receipt_handle: e.receipt_handle,
                status: status.or_else(|| codes::status(Code::InternalServerError, "no answer for this handle")),
            })
            .collect();
        v2::AckMessageResponse {
            status: overall(entries.iter().map(|e| e.status.as_ref())),
            entries,
        }
    }

    async fn change_invisible(
        &self,
        md: &MetadataMap,
        req: v2::ChangeInvisibleDurationRequest,
    ) -> v2::ChangeInvisibleDurationResponse {
        let handle = req.receipt_handle.clone();
        // Python stores the answer's handle before it looks at the status: a
        // failed change answers with the old one.
        let failed = |(code, m): Refusal| v2::ChangeInvisibleDurationResponse {
            status: codes::status(code, m),
            receipt_handle: handle.clone(),
        };
        let broker = match self.handle_group(&req.receipt_handle).await {
            Ok(b) => b,
            Err(r) => return failed(r),
        };
        let ms = match &req.invisible_duration {
            Some(d) if d.seconds >= 0 && d.nanos >= 0 => {
                (d.seconds as u64).saturating_mul(1000) + d.nanos as u64 / 1_000_000
            }
            _ => {
                return failed(refuse(
                    Code::IllegalInvisibleTime,
                    "invisible_duration missing or negative",
                ));
            }
        };
        let v1 = pb::ChangeInvisibleDurationRequest {
            consumer_group: name_of(&req.group).1.to_owned(),
            topic: name_of(&req.topic).1.to_owned(),
            receipt_handle: req.receipt_handle.clone(),
            // 0 would mean "the group's backoff" to raftmq; RocketMQ means now.
            invisible_duration_ms: ms.max(1),
        };
        let consumer = self.inner.consumer.clone();
        let changed = self
            .up()
            .call(&broker, Retry::NotLeader, budget(md), |t| {
                let (consumer, v1) = (consumer.clone(), v1.clone());
                async move {
                    match t {
                        Target::Local => {
                            V1Consumer::change_invisible_duration(&consumer, crate::auth::internal(v1)).await
                        }
                        Target::Remote(ch) => {
                            pb::consumer_service_client::ConsumerServiceClient::new(ch)
                                .change_invisible_duration(v1)
                                .await
                        }
                    }
                }
            })
            .await;
        match changed {
            Ok(r) => v2::ChangeInvisibleDurationResponse {
                status: codes::ok(),
                receipt_handle: r.into_inner().receipt_handle,
            },
            Err(s) => failed(self.refusal(Op::Handle, &s)),
        }
    }

    async fn forward_to_dlq(
        &self,
        md: &MetadataMap,
        req: v2::ForwardMessageToDeadLetterQueueRequest,
    ) -> Option<v2::Status> {
        let broker = match self.handle_group(&req.receipt_handle).await {
            Ok(b) => b,
            Err((code, m)) => return codes::status(code, m),
        };
        let v1 = pb::ForwardToDeadLetterRequest {
            consumer_group: name_of(&req.group).1.to_owned(),
            topic: name_of(&req.topic).1.to_owned(),
            receipt_handle: req.receipt_handle,
        };
        let consumer = self.inner.consumer.clone();
        let r = self
            .up()
            .call(&broker, Retry::NotLeader, budget(md), |t| {
                let (consumer, v1) = (consumer.clone(), v1.clone());
                async move {
                    match t {
                        Target::Local => V1Consumer::forward_to_dead_letter(&consumer, crate::auth::internal(v1)).await,
                        Target::Remote(ch) => {
                            pb::consumer_service_client::ConsumerServiceClient::new(ch)
                                .forward_to_dead_letter(v1)
                                .await
                        }
                    }
                }
            })
            .await;
        match r {
            Ok(_) => codes::ok(),
            Err(s) => codes::from_status(Op::Handle, &s),
        }
    }

    async fn end_transaction(&self, md: &MetadataMap, req: v2::EndTransactionRequest) -> Option<v2::Status> {
        let resolution = match v2::TransactionResolution::try_from(req.resolution) {
            Ok(v2::TransactionResolution::Commit) => pb::TransactionResolution::Commit,
            Ok(v2::TransactionResolution::Rollback) => pb::TransactionResolution::Rollback,
            // The Rust SDK's checker answers "unknown" as 0: nothing to do, the
            // leader checks again later.
            Ok(v2::TransactionResolution::Unspecified) => return codes::ok(),
            Err(_) => {
                return codes::status(
                    Code::BadRequest,
                    format!("resolution {} is not COMMIT (1) or ROLLBACK (2)", req.resolution),
                );
            }
        };
        let source = match v2::TransactionSource::try_from(req.source) {
            Ok(v2::TransactionSource::SourceServerCheck) => pb::TransactionSource::ServerCheck,
            _ => pb::TransactionSource::Client,
        };
        let id = req.transaction_id;
        let Some(crc) = crc_at(&id, 2..10).filter(|_| id.len() == 34) else {
            return codes::status(
                Code::InvalidTransactionId,
                format!("transaction id {id:?} was not issued by raftmq"),
            );
        };
        let broker = match self.up().group_by_crc(crc).await {
            Ok(b) => b,
            Err(s) => {
                return codes::status(
                    Code::InvalidTransactionId,
                    format!("transaction id {id:?}: {}", s.message()),
                );
            }
        };
        let v1 = pb::EndTransactionRequest {
            transaction_id: id,
            resolution: resolution as i32,
            source: source as i32,
        };
        let messaging = self.inner.messaging.clone();
        let r = self
            .up()
            .call(&broker, Retry::Unavailable, budget(md), |t| {
                let (messaging, v1) = (messaging.clone(), v1.clone());
                async move {
                    match t {
                        Target::Local => V1Messaging::end_transaction(&messaging, crate::auth::internal(v1)).await,
                        Target::Remote(ch) => {
                            pb::messaging_service_client::MessagingServiceClient::new(ch)
                                .end_transaction(v1)
                                .await
                        }
                    }
                }
            })
            .await;
        match r {
            Ok(_) => codes::ok(),
            Err(s) => codes::from_status(Op::Transaction, &s),
        }
    }

    async fn query_assignment(
        &self,
        md: &MetadataMap,
        req: v2::QueryAssignmentRequest,
    ) -> Result<Vec<v2::Assignment>, Refusal> {
        let route = self
            .query_route(
                md,
                v2::QueryRouteRequest {
                    topic: req.topic.clone(),
                    endpoints: req.endpoints.clone(),
                },
            )
            .await?;
        // Receives pop from every queue of a broker group, so one assignment per
        // group (queue id -1: any), as RocketMQ's proxy answers.
        let mut seen = std::collections::HashSet::new();
        let assignments: Vec<v2::Assignment> = route
            .into_iter()
            .filter(|q| q.permission == v2::Permission::ReadWrite as i32 || q.permission == v2::Permission::Read as i32)
            .filter(|q| seen.insert(q.broker.as_ref().map(|b| b.name.clone()).unwrap_or_default()))
            .map(|q| v2::Assignment {
                message_queue: Some(v2::MessageQueue { id: -1, ..q }),
            })
            .collect();
        if assignments.is_empty() {
            return Err(refuse(Code::Forbidden, "the topic has no readable queue"));
        }
        Ok(assignments)
    }

    fn telemetry(&self, md: &MetadataMap, inbound: Streaming<v2::TelemetryCommand>) -> Result<TelemetryStream, Status> {
        let client = client_id(md).map_err(|(_, m)| Status::invalid_argument(m))?;
        let permit = self.inner.streams.clone().try_acquire_owned().map_err(|_| {
            Status::resource_exhausted(format!(
                "this node already holds {MAX_TELEMETRY_STREAMS} Telemetry streams"
            ))
        })?;
        let (tx, rx) = mpsc::channel(telemetry::STREAM_BUFFER);
        let stop = CancellationToken::new();
        let shutdown = self.up().group().shutdown().clone();
        let mut session = telemetry::Session::new(self.up().clone(), client.clone(), tx.clone(), stop.clone());
        let span = tracing::debug_span!("rmq5.telemetry", client = %client);
        self.up().group().tasks().spawn(
            async move {
                let _permit = permit;
                let _stop = stop.clone().drop_guard();
                let mut inbound = inbound;
                loop {
                    tokio::select! {
                        msg = inbound.message() => match msg {
                            Ok(Some(cmd)) => session.command(cmd).await,
                            Ok(None) => break,
                            Err(e) => {
                                tracing::debug!(error = %e, "telemetry stream failed");
                                break;
                            }
                        },
                        _ = tx.closed() => break,
                        _ = stop.cancelled() => break,
                        _ = shutdown.cancelled() => break,
                    }
                }
            }
            .instrument(span),
        );
        let stream = futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|item| (item, rx)) });
        Ok(Box::pin(stream))
    }
}

/// The status of a multi-entry answer: OK if every entry is, the entries' code
/// if they agree, else MULTIPLE_RESULTS (as RocketMQ's proxy answers).
fn overall<'a>(mut statuses: impl Iterator<Item = Option<&'a v2::Status>>) -> Option<v2::Status> {
    let first = statuses.next().flatten().cloned()?;
    if statuses.all(|s| s.map(|s| s.code) == Some(first.code)) {
        return Some(first);
    }
    codes::status(Code::MultipleResults, "the entries have different outcomes")
}

#[tonic::async_trait]
impl MessagingService for Gateway {
    async fn query_route(
        &self,
        request: Request<v2::QueryRouteRequest>,
    ) -> Result<Response<v2::QueryRouteResponse>, Status> {
        self.auth().authenticated(&request)?;
        let (md, _, req) = request.into_parts();
        let span = tracing::debug_span!("rmq5.query_route", topic = %name_of(&req.topic).1);
        let resp = match Gateway::query_route(self, &md, req).instrument(span).await {
            Ok(message_queues) => v2::QueryRouteResponse {
                status: codes::ok(),
                message_queues,
            },
            Err((code, m)) => v2::QueryRouteResponse {
                status: codes::status(code, m),
                message_queues: Vec::new(),
            },
        };
        Ok(Response::new(resp))
    }

    async fn heartbeat(
        &self,
        request: Request<v2::HeartbeatRequest>,
    ) -> Result<Response<v2::HeartbeatResponse>, Status> {
        self.auth().authenticated(&request)?;
        let status = match client_id(request.metadata()) {
            Ok(_) => codes::ok(),
            Err((code, m)) => codes::status(code, m),
        };
        Ok(Response::new(v2::HeartbeatResponse { status }))
    }

    async fn send_message(
        &self,
        request: Request<v2::SendMessageRequest>,
    ) -> Result<Response<v2::SendMessageResponse>, Status> {
        // Every message's topic, before any is stored.
        for m in &request.get_ref().messages {
            self.auth().publish(&request, name_of(&m.topic).1)?;
        }
        let (md, _, req) = request.into_parts();
        let span = tracing::debug_span!("rmq5.send", messages = req.messages.len());
        Ok(Response::new(self.send(&md, req).instrument(span).await))
    }

    async fn query_assignment(
        &self,
        request: Request<v2::QueryAssignmentRequest>,
    ) -> Result<Response<v2::QueryAssignmentResponse>, Status> {
        let r = request.get_ref();
        self.auth()
            .subscribe(&request, name_of(&r.topic).1, name_of(&r.group).1)?;
        let (md, _, req) = request.into_parts();
        let resp = match Gateway::query_assignment(self, &md, req).await {
            Ok(assignments) => v2::QueryAssignmentResponse {
                status: codes::ok(),
                assignments,
            },
            Err((code, m)) => v2::QueryAssignmentResponse {
                status: codes::status(code, m),
                assignments: Vec::new(),
            },
        };
        Ok(Response::new(resp))
    }

    type ReceiveMessageStream = ReceiveStream;

    async fn receive_message(
        &self,
        request: Request<v2::ReceiveMessageRequest>,
    ) -> Result<Response<Self::ReceiveMessageStream>, Status> {
        let r = request.get_ref();
        let topic = r.message_queue.as_ref().map_or("", |q| name_of(&q.topic).1);
        self.auth().subscribe(&request, topic, name_of(&r.group).1)?;
        let (md, _, req) = request.into_parts();
        let span = tracing::debug_span!("rmq5.receive", group = %name_of(&req.group).1);
        let answer = self.receive(&md, req).instrument(span).await;
        Ok(Response::new(Box::pin(futures::stream::iter(
            answer.into_iter().map(Ok),
        ))))
    }

    async fn ack_message(
        &self,
        request: Request<v2::AckMessageRequest>,
    ) -> Result<Response<v2::AckMessageResponse>, Status> {
        let r = request.get_ref();
        self.auth()
            .subscribe(&request, name_of(&r.topic).1, name_of(&r.group).1)?;
        let (md, _, req) = request.into_parts();
        let span = tracing::debug_span!("rmq5.ack", group = %name_of(&req.group).1, entries = req.entries.len());
        Ok(Response::new(self.ack(&md, req).instrument(span).await))
    }

    async fn forward_message_to_dead_letter_queue(
        &self,
        request: Request<v2::ForwardMessageToDeadLetterQueueRequest>,
    ) -> Result<Response<v2::ForwardMessageToDeadLetterQueueResponse>, Status> {
        let r = request.get_ref();
        self.auth()
            .subscribe(&request, name_of(&r.topic).1, name_of(&r.group).1)?;
        let (md, _, req) = request.into_parts();
        let status = self.forward_to_dlq(&md, req).await;
        Ok(Response::new(v2::ForwardMessageToDeadLetterQueueResponse { status }))
    }

    type PullMessageStream = PullStream;

    async fn pull_message(
        &self,
        _request: Request<v2::PullMessageRequest>,
    ) -> Result<Response<Self::PullMessageStream>, Status> {
        let status = v2::PullMessageResponse {
            content: Some(v2::pull_message_response::Content::Status(v2::Status {
                code: Code::NotImplemented as i32,
                message: "PullMessage is not served; use a SimpleConsumer or PushConsumer".into(),
            })),
        };
        Ok(Response::new(Box::pin(futures::stream::iter([Ok(status)]))))
    }

    async fn update_offset(
        &self,
        _request: Request<v2::UpdateOffsetRequest>,
    ) -> Result<Response<v2::UpdateOffsetResponse>, Status> {
        Ok(Response::new(v2::UpdateOffsetResponse {
            status: codes::status(Code::NotImplemented, "UpdateOffset is not served"),
        }))
    }

    async fn get_offset(
        &self,
        _request: Request<v2::GetOffsetRequest>,
    ) -> Result<Response<v2::GetOffsetResponse>, Status> {
        Ok(Response::new(v2::GetOffsetResponse {
            status: codes::status(Code::NotImplemented, "GetOffset is not served"),
            offset: 0,
        }))
    }

    async fn query_offset(
        &self,
        _request: Request<v2::QueryOffsetRequest>,
    ) -> Result<Response<v2::QueryOffsetResponse>, Status> {
        Ok(Response::new(v2::QueryOffsetResponse {
            status: codes::status(Code::NotImplemented, "QueryOffset is not served"),
            offset: 0,
        }))
    }

    async fn end_transaction(
        &self,
        request: Request<v2::EndTransactionRequest>,
    ) -> Result<Response<v2::EndTransactionResponse>, Status> {
        self.auth().publish(&request, name_of(&request.get_ref().topic).1)?;
        let (md, _, req) = request.into_parts();
        let span = tracing::debug_span!("rmq5.end_transaction", transaction = %req.transaction_id);
        let status = Gateway::end_transaction(self, &md, req).instrument(span).await;
        Ok(Response::new(v2::EndTransactionResponse { status }))
    }

    type TelemetryStream = TelemetryStream;

    async fn telemetry(
        &self,
        request: Request<Streaming<v2::TelemetryCommand>>,
    ) -> Result<Response<Self::TelemetryStream>, Status> {
        self.auth().authenticated(&request)?;
        let (md, _, inbound) = request.into_parts();
        Gateway::telemetry(self, &md, inbound).map(Response::new)
    }

    async fn notify_client_termination(
        &self,
        _request: Request<v2::NotifyClientTerminationRequest>,
    ) -> Result<Response<v2::NotifyClientTerminationResponse>, Status> {
        // Nothing is held per client outside its Telemetry stream, which ends
        // with the client's channel.
        Ok(Response::new(v2::NotifyClientTerminationResponse {
            status: codes::ok(),
        }))
    }

    async fn change_invisible_duration(
        &self,
        request: Request<v2::ChangeInvisibleDurationRequest>,
    ) -> Result<Response<v2::ChangeInvisibleDurationResponse>, Status> {
        let r = request.get_ref();
        self.auth()
            .subscribe(&request, name_of(&r.topic).1, name_of(&r.group).1)?;
        let (md, _, req) = request.into_parts();
        let span = tracing::debug_span!("rmq5.change_invisible", group = %name_of(&req.group).1);
        Ok(Response::new(self.change_invisible(&md, req).instrument(span).await))
    }

    async fn recall_message(
        &self,
        _request: Request<v2::RecallMessageRequest>,
    ) -> Result<Response<v2::RecallMessageResponse>, Status> {
        Ok(Response::new(v2::RecallMessageResponse {
            status: codes::status(Code::NotImplemented, "RecallMessage is not served by raftmq yet"),
            message_id: String::new(),
        }))
    }

    async fn sync_lite_subscription(
        &self,
        _request: Request<v2::SyncLiteSubscriptionRequest>,
    ) -> Result<Response<v2::SyncLiteSubscriptionResponse>, Status> {
        Ok(Response::new(v2::SyncLiteSubscriptionResponse {
            status: codes::status(Code::NotImplemented, "lite topics are not served by raftmq"),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_parse_in_every_unit() {
        let mut md = MetadataMap::new();
        for (v, d) in [
            ("3S", Duration::from_secs(3)),
            ("2999980u", Duration::from_micros(2_999_980)),
            ("40000m", Duration::from_secs(40)),
            ("1M", Duration::from_secs(60)),
        ] {
            md.insert("grpc-timeout", v.parse().expect("ascii"));
            assert_eq!(deadline(&md), Some(d), "{v}");
        }
        md.insert("grpc-timeout", "x".parse().expect("ascii"));
        assert_eq!(deadline(&md), None);
    }

    #[test]
    fn ip_replicas_are_listed_for_pick_first_and_host_names_give_the_leader() {
        let e = endpoints(&["127.0.0.1:1".into(), "127.0.0.2:2".into()]);
        assert_eq!(e.scheme, v2::AddressScheme::IPv4 as i32);
        assert_eq!(e.addresses.len(), 2);
        let e = endpoints(&["broker-a-1:9876".into(), "broker-a-2:9876".into()]);
        assert_eq!(e.scheme, v2::AddressScheme::DomainName as i32);
        assert_eq!(
            e.addresses,
            vec![v2::Address {
                host: "broker-a-1".into(),
                port: 9876
            }]
        );
    }

    #[test]
    fn rust_sdks_get_every_replica_and_others_one_live_address() {
        let group = upstream::GroupInfo {
            name: "a".into(),
            endpoints: vec!["10.0.0.1:1".into(), "10.0.0.2:1".into(), "10.0.0.3:1".into()],
        };
        assert_eq!(route_addresses(&group, "a", "10.0.0.2:1", true).len(), 3);
        assert_eq!(
            route_addresses(&group, "a", "10.0.0.2:1", false),
            vec!["10.0.0.2:1".to_owned()]
        );
        // Another group: its leader (listed first).
        assert_eq!(
            route_addresses(&group, "b", "10.0.0.9:1", false),
            vec!["10.0.0.1:1".to_owned()]
        );
    }

    #[test]
    fn a_retried_batch_has_the_same_sequence_and_another_batch_does_not() {
        assert_eq!(sequence_of(&["a", "b"]), sequence_of(&["a", "b"]));
        assert_ne!(sequence_of(&["a", "b"]), sequence_of(&["ab"]));
        assert_ne!(sequence_of(&["a"]), sequence_of(&["b"]));
    }

    #[test]
    fn mixed_outcomes_are_multiple_results() {
        let ok = codes::ok();
        let bad = codes::status(Code::InvalidReceiptHandle, "stale");
        assert_eq!(
            overall([ok.as_ref(), ok.as_ref()].into_iter()).map(|s| s.code),
            Some(Code::Ok as i32)
        );
        assert_eq!(
            overall([ok.as_ref(), bad.as_ref()].into_iter()).map(|s| s.code),
            Some(Code::MultipleResults as i32)
        );
    }
}
