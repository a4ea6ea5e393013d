//! PullConsumer: reads one queue from an explicit offset. The caller keeps its
//! offsets; consumer groups, rebalancing and committed offsets are the push
//! consumer's (`push`), which pulls through this.

use std::sync::Arc;
use std::time::Duration;

use raftmq_proto::v1 as pb;
use raftmq_proto::v1::messaging_service_client::MessagingServiceClient;

use crate::error::Error;
use crate::leader::{Attempt, Followers, Spec, Target, follow};
use crate::route::{Core, TopicRoute};

/// Which messages of a queue a consumer wants, evaluated by the broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Filter {
    /// `"*"` (or empty) for all, or `"TagA || TagB"`.
    Tag(String),
    /// RocketMQ's SQL92 subset over user properties and `TAGS`, e.g.
    /// `"region = 'eu' AND amount > 100"`; a malformed one is refused with the
    /// position of the error.
    Sql92(String),
}

impl Filter {
    /// Every message.
    pub fn all() -> Filter {
        Filter::Tag("*".into())
    }

    /// The wire's `(filter_type, expression)`.
    pub fn to_wire(&self) -> (i32, String) {
        match self {
            Filter::Tag(e) => (pb::FilterType::Tag as i32, e.clone()),
            Filter::Sql92(e) => (pb::FilterType::Sql92 as i32, e.clone()),
        }
    }

    pub fn expression(&self) -> &str {
        match self {
            Filter::Tag(e) | Filter::Sql92(e) => e,
        }
    }
}

impl From<&str> for Filter {
    fn from(tag_expression: &str) -> Filter {
        Filter::Tag(tag_expression.to_owned())
    }
}

/// One pull's answer.
#[derive(Debug, Clone, PartialEq)]
pub struct PullResult {
    pub messages: Vec<pb::PulledMessage>,
    /// Offset to pull from next (past filtered-out messages too).
    pub next_offset: u64,
    /// Lowest and next offset the queue currently holds.
    pub min_offset: u64,
    pub max_offset: u64,
    /// The replica that answered.
    pub endpoint: String,
}

/// Pulls messages; cheap to clone (shares connections and routes).
#[derive(Clone)]
pub struct PullConsumer {
    core: Arc<Core>,
    /// The consumer group and client id its pulls name (a push consumer's), so
    /// the brokers record them as deliveries in message traces.
    member: Option<Arc<(String, String)>>,
}

impl PullConsumer {
    pub(crate) fn from_core(core: Arc<Core>) -> PullConsumer {
        PullConsumer { core, member: None }
    }

    /// The same consumer pulling as member `client_id` of `consumer_group`.
    pub(crate) fn for_member(mut self, consumer_group: &str, client_id: &str) -> PullConsumer {
        self.member = Some(Arc::new((consumer_group.to_owned(), client_id.to_owned())));
        self
    }

    pub(crate) fn core(&self) -> &Arc<Core> {
        &self.core
    }

    /// Pulls up to `max` messages (0 = broker default) of `queue_id` on
    /// `broker_group` from `offset`, waiting up to `max_wait` for the first to
    /// arrive (long polling). Reads go to the group's leader, which has applied
    /// everything acknowledged; its followers are only asked who leads (they would
    /// serve their own, possibly older, state). A failed pull is retried within
    /// `send_deadline` + `max_wait` (a pull has no side effect, so retrying is
    /// safe; see `leader` for the policy).
    #[allow(clippy::too_many_arguments)]
    #[tracing::instrument(skip(self, filter))]
    pub async fn pull(
        &self,
        topic: &str,
        broker_group: &str,
        queue_id: u32,
        offset: u64,
        max: u32,
        max_wait: Duration,
        filter: &Filter,
    ) -> Result<PullResult, Error> {
        let (filter_type, expression) = filter.to_wire();
        let spec = Spec {
            label: topic,
            deadline: self.core.config.send_deadline + max_wait,
            long_poll: max_wait,
            followers: Followers::Ask,
        };
        let target = Target::Topic {
            topic,
            pick: |route: &TopicRoute| match route.group(broker_group) {
                Some(g) => Ok((g.clone(), ())),
                None => Err(Error::UnknownGroup {
                    topic: topic.into(),
                    group: broker_group.into(),
                }),
            },
        };
        let max_bytes = self.core.max_message_bytes();
        let served = follow(&self.core, spec, target, |a: Attempt<()>| {
            let req = pb::PullRequest {
                topic: topic.to_owned(),
                queue_id,
                offset,
                max_messages: max,
                // Near the call's deadline the wait shrinks, so the broker answers
                // before this client stops listening.
                max_wait_ms: u32::try_from(a.long_poll.as_millis()).unwrap_or(u32::MAX),
                tag_expression: expression.clone(),
                filter_type,
                consumer_group: self.member.as_ref().map(|m| m.0.clone()).unwrap_or_default(),
                client_id: self.member.as_ref().map(|m| m.1.clone()).unwrap_or_default(),
            };
            async move {
                MessagingServiceClient::new(a.channel)
                    .max_decoding_message_size(max_bytes)
                    .pull(req)
                    .await
            }
        })
        .await?;
        let r = served.value;
        Ok(PullResult {
            messages: r.messages,
            next_offset: r.next_offset,
            min_offset: r.min_offset,
            max_offset: r.max_offset,
            endpoint: served.endpoint,
        })
    }
}
