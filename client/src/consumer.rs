//! PullConsumer: reads one queue from an explicit offset. The caller keeps its
//! offsets; consumer groups, rebalancing and committed offsets are the push
//! consumer's (`push`), which pulls through this.

use std::sync::Arc;
use std::time::{Duration, Instant};

use raftmq_proto::v1 as pb;
use raftmq_proto::v1::messaging_service_client::MessagingServiceClient;

use crate::error::Error;
use crate::route::{Core, backoff};

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
}

impl PullConsumer {
    pub(crate) fn from_core(core: Arc<Core>) -> PullConsumer {
        PullConsumer { core }
    }

    pub(crate) fn core(&self) -> &Arc<Core> {
        &self.core
    }

    /// Pulls up to `max` messages (0 = broker default) of `queue_id` on
    /// `broker_group` from `offset`, waiting up to `max_wait` for the first to
    /// arrive (long polling). Reads go to the group's leader, which has applied
    /// everything acknowledged; a connection error refreshes the route and retries
    /// within `send_deadline` (a pull has no side effect, so retrying is safe).
    #[allow(clippy::too_many_arguments)]
    #[tracing::instrument(skip(self, tag_expression))]
    pub async fn pull(
        &self,
        topic: &str,
        broker_group: &str,
        queue_id: u32,
        offset: u64,
        max: u32,
        max_wait: Duration,
        tag_expression: &str,
    ) -> Result<PullResult, Error> {
        let started = Instant::now();
        let deadline = started + self.core.config.send_deadline + max_wait;
        let mut attempts = 0u32;
        loop {
            attempts += 1;
            let e = match self.core.route(topic).await {
                Err(e) => e,
                Ok(route) => {
                    let Some(group) = route.group(broker_group) else {
                        return Err(Error::UnknownGroup {
                            topic: topic.into(),
                            group: broker_group.into(),
                        });
                    };
                    // A follower serves what it has applied; the leader is only
                    // unknown mid-election, and then a follower beats waiting.
                    let endpoint = if group.leader_endpoint.is_empty() {
                        group.follower_endpoints.first().cloned().unwrap_or_default()
                    } else {
                        group.leader_endpoint.clone()
                    };
                    let req = pb::PullRequest {
                        topic: topic.to_owned(),
                        queue_id,
                        offset,
                        max_messages: max,
                        max_wait_ms: u32::try_from(max_wait.as_millis()).unwrap_or(u32::MAX),
                        tag_expression: tag_expression.to_owned(),
                    };
                    let max_bytes = self.core.max_message_bytes();
                    let timeout = self.core.config.request_timeout + max_wait;
                    match self
                        .core
                        .call(&endpoint, timeout, |ch| async move {
                            MessagingServiceClient::new(ch)
                                .max_decoding_message_size(max_bytes)
                                .pull(req)
                                .await
                        })
                        .await
                    {
                        Ok(r) => {
                            return Ok(PullResult {
                                messages: r.messages,
                                next_offset: r.next_offset,
                                min_offset: r.min_offset,
                                max_offset: r.max_offset,
                                endpoint,
                            });
                        }
                        Err(e) => {
                            if e.is_retriable() {
                                self.core.routes.invalidate(topic);
                            }
                            e
                        }
                    }
                }
            };
            let pause = backoff(attempts);
            if !e.is_retriable() {
                return Err(e);
            }
            if Instant::now() + pause >= deadline {
                return Err(Error::DeadlineExceeded {
                    topic: topic.to_owned(),
                    attempts,
                    elapsed: started.elapsed(),
                    last: Box::new(e),
                });
            }
            tokio::time::sleep(pause).await;
        }
    }
}
