//! SimpleConsumer: RocketMQ 5's POP consumption. `receive` gets messages no
//! other member of the consumer group holds, each invisible to the group until
//! it is acked or its invisible duration passes (then it comes back with
//! `delivery_attempt` + 1; after the group's max reconsume times it goes to the
//! dead-letter queue `%DLQ%<group>`). The broker group's leader keeps all of this
//! in replicated state, so a failover neither loses an in-flight message nor
//! brings back an acked one. Calls go to the leader through the client's one
//! leader-following policy (`leader`).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use raftmq_proto::v1 as pb;
use raftmq_proto::v1::consumer_service_client::ConsumerServiceClient;

use crate::consumer::Filter;
use crate::error::Error;
use crate::leader::{Attempt, Followers, Spec, Target, follow};
use crate::route::{Core, TopicRoute};

/// One received message and what acking it needs.
#[derive(Debug, Clone, PartialEq)]
pub struct Received {
    pub message: pb::PulledMessage,
    /// Opaque; names this delivery only (a redelivery gets a new one).
    pub receipt_handle: String,
    /// 1 on the first delivery.
    pub delivery_attempt: u32,
    /// When the message becomes visible again unless acked (ms since the epoch).
    pub invisible_until_ms: u64,
    /// The broker group that handed it out (acks go there).
    pub broker_group: String,
}

/// A POP consumer of one topic in one consumer group; cheap to clone.
#[derive(Clone)]
pub struct SimpleConsumer {
    core: Arc<Core>,
    group: String,
    topic: String,
    filter: Filter,
    invisible: Duration,
    next_group: Arc<AtomicUsize>,
    /// Sent with each receive; message traces name the member with it.
    client_id: String,
}

impl SimpleConsumer {
    pub(crate) fn new(core: Arc<Core>, group: &str, topic: &str) -> SimpleConsumer {
        SimpleConsumer {
            core,
            group: group.to_owned(),
            topic: topic.to_owned(),
            filter: Filter::all(),
            invisible: Duration::from_secs(30),
            next_group: Arc::new(AtomicUsize::new(0)),
            client_id: crate::push::default_client_id(),
        }
    }

    /// This member's id, as message traces show its receives (default:
    /// host@pid@random; 1 to 255 printable ASCII characters).
    pub fn client_id(mut self, id: &str) -> Self {
        id.clone_into(&mut self.client_id);
        self
    }

    /// Which messages to receive (default all).
    pub fn filter(mut self, filter: Filter) -> Self {
        self.filter = filter;
        self
    }

    /// How long received messages stay invisible (default 30 s; 1 s to 12 h).
    pub fn invisible_duration(mut self, d: Duration) -> Self {
        self.invisible = d;
        self
    }

    pub fn group(&self) -> &str {
        &self.group
    }

    /// Receives up to `max` messages (0 = broker default), waiting up to `wait`
    /// for the first (long polling). Broker groups serving the topic are asked in
    /// turn, one per call; a group that has no reachable leader is skipped for a
    /// few seconds and the call asks another one instead (as unkeyed sends do), so
    /// one group down does not fail every n-th receive.
    #[tracing::instrument(skip(self), fields(group = %self.group, topic = %self.topic))]
    pub async fn receive(&self, max: u32, wait: Duration) -> Result<Vec<Received>, Error> {
        let turn = self.next_group.fetch_add(1, Ordering::Relaxed);
        let core = &self.core;
        let topic = &self.topic;
        let target = Target::AnyGroup {
            topic,
            pick: move |route: &TopicRoute| {
                let now = std::time::Instant::now();
                let mut groups: Vec<&pb::GroupRoute> = route.groups.iter().collect();
                if groups.iter().any(|g| !core.faults.is_isolated(&g.broker_group, now)) {
                    groups.retain(|g| !core.faults.is_isolated(&g.broker_group, now));
                }
                match groups.get(turn % groups.len().max(1)) {
                    Some(g) => Ok(((*g).clone(), ())),
                    None => Err(Error::NoRoute {
                        topic: topic.clone(),
                        reason: "no broker group serves it".into(),
                    }),
                }
            },
        };
        let (filter_type, filter_expression) = self.filter.to_wire();
        let spec = Spec {
            label: &self.topic,
            deadline: self.core.config.send_deadline + wait,
            long_poll: wait,
            followers: Followers::Redirect,
        };
        let max_bytes = self.core.max_message_bytes();
        let served = follow(&self.core, spec, target, |a: Attempt<()>| {
            let req = pb::ReceiveRequest {
                consumer_group: self.group.clone(),
                topic: self.topic.clone(),
                filter_type,
                filter_expression: filter_expression.clone(),
                max_messages: max,
                invisible_duration_ms: self.invisible.as_millis() as u64,
                max_wait_ms: u32::try_from(a.long_poll.as_millis()).unwrap_or(u32::MAX),
                client_id: self.client_id.clone(),
            };
            async move {
                ConsumerServiceClient::new(a.channel)
                    .max_decoding_message_size(max_bytes)
                    .receive(req)
                    .await
            }
        })
        .await?;
        let r = served.value;
        Ok(r.messages
            .into_iter()
            .filter_map(|m| {
                Some(Received {
                    message: m.message?,
                    receipt_handle: m.receipt_handle,
                    delivery_attempt: m.delivery_attempt,
                    invisible_until_ms: m.invisible_until_ms,
                    broker_group: r.broker_group.clone(),
                })
            })
            .collect())
    }

    /// Acks one message. A handle that no longer names the message's current
    /// delivery (acked, redelivered, or replaced by a change of invisible time)
    /// fails with FAILED_PRECONDITION "stale receipt handle".
    pub async fn ack(&self, m: &Received) -> Result<(), Error> {
        let results = self
            .ack_all(&m.broker_group, std::slice::from_ref(&m.receipt_handle))
            .await?;
        match results.into_iter().next() {
            Some(r) if r.ok => Ok(()),
            Some(r) => Err(Error::Rpc {
                endpoint: String::new(),
                code: tonic::Code::FailedPrecondition,
                message: r.error,
                leader: None,
            }),
            None => Err(Error::Protocol {
                endpoint: String::new(),
                reason: "ack answered without a result".into(),
            }),
        }
    }

    /// Acks several handles of one broker group in one Raft entry; one result each.
    pub async fn ack_all(&self, broker_group: &str, handles: &[String]) -> Result<Vec<pb::AckResult>, Error> {
        let spec = self.spec();
        let served = follow(&self.core, spec, self.target(broker_group), |a: Attempt<()>| {
            let req = pb::AckRequest {
                consumer_group: self.group.clone(),
                topic: self.topic.clone(),
                receipt_handles: handles.to_vec(),
            };
            async move { ConsumerServiceClient::new(a.channel).ack(req).await }
        })
        .await?;
        Ok(served.value.results)
    }

    /// Makes the message invisible for `d` from now (a nack with a backoff; zero
    /// takes the group's retry schedule). The returned handle replaces the old
    /// one, which then fails.
    pub async fn change_invisible_duration(&self, m: &Received, d: Duration) -> Result<Received, Error> {
        let served = follow(
            &self.core,
            self.spec(),
            self.target(&m.broker_group),
            |a: Attempt<()>| {
                let req = pb::ChangeInvisibleDurationRequest {
                    consumer_group: self.group.clone(),
                    topic: self.topic.clone(),
                    receipt_handle: m.receipt_handle.clone(),
                    invisible_duration_ms: d.as_millis() as u64,
                };
                async move {
                    ConsumerServiceClient::new(a.channel)
                        .change_invisible_duration(req)
                        .await
                }
            },
        )
        .await?;
        Ok(Received {
            receipt_handle: served.value.receipt_handle,
            invisible_until_ms: served.value.invisible_until_ms,
            ..m.clone()
        })
    }

    /// Moves the message to the group's dead-letter queue now.
    pub async fn forward_to_dead_letter(&self, m: &Received) -> Result<(), Error> {
        follow(
            &self.core,
            self.spec(),
            self.target(&m.broker_group),
            |a: Attempt<()>| {
                let req = pb::ForwardToDeadLetterRequest {
                    consumer_group: self.group.clone(),
                    topic: self.topic.clone(),
                    receipt_handle: m.receipt_handle.clone(),
                };
                async move { ConsumerServiceClient::new(a.channel).forward_to_dead_letter(req).await }
            },
        )
        .await?;
        Ok(())
    }

    fn spec(&self) -> Spec<'_> {
        Spec {
            label: &self.topic,
            deadline: self.core.config.send_deadline,
            long_poll: Duration::ZERO,
            followers: Followers::Redirect,
        }
    }

    fn target<'a>(
        &'a self,
        broker_group: &'a str,
    ) -> Target<'a, impl Fn(&TopicRoute) -> Result<(pb::GroupRoute, ()), Error> + 'a> {
        Target::Topic {
            topic: &self.topic,
            pick: move |route: &TopicRoute| match route.group(broker_group) {
                Some(g) => Ok((g.clone(), ())),
                None => Err(Error::UnknownGroup {
                    topic: self.topic.clone(),
                    group: broker_group.to_owned(),
                }),
            },
        }
    }
}
