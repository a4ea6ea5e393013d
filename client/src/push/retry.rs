//! What a push consumer does with a message its callback failed (`RetryLater`):
//! send it back to the brokers' retry topic, retry it here, dead-letter it, or
//! give it up, as the module docs of `push` describe. [`Retries`] makes the
//! decisions without I/O (unit-tested below); [`deliver`] carries them out.

use std::sync::atomic::Ordering;
use std::time::Duration;

use raftmq_proto::v1 as pb;
use raftmq_proto::v1::admin_service_client::AdminServiceClient;
use raftmq_proto::v1::consumer_service_client::ConsumerServiceClient;
use tokio_util::sync::CancellationToken;

use super::{ConsumeMode, ConsumeResult, Ctx, MessageModel, pick_group};
use crate::error::Error;
use crate::leader::{Attempt, Followers, Spec, Target, follow};

/// How failed messages are handled, from the consumer's model and mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Policy {
    /// Clustering, concurrent: send back on every failure; retry here only while
    /// sending back fails.
    SendBack,
    /// Clustering, orderly: retry here (the queue waits), then dead-letter.
    LocalThenDeadLetter,
    /// Broadcasting: retry here, then give up.
    Local,
}

impl Policy {
    pub(super) fn of(model: MessageModel, mode: ConsumeMode) -> Policy {
        match (model, mode) {
            (MessageModel::Broadcasting, _) => Policy::Local,
            (MessageModel::Clustering, ConsumeMode::Concurrent { .. }) => Policy::SendBack,
            (MessageModel::Clustering, ConsumeMode::Orderly) => Policy::LocalThenDeadLetter,
        }
    }
}

/// The next thing to do with a failed message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Step {
    /// Wait this long, then call the callback again.
    Wait(Duration),
    /// Send it back to the group's retry topic now.
    SendBack,
    /// Wait this long, then send it to the dead-letter topic.
    DeadLetter(Duration),
    /// Give it up (counted as skipped).
    Skip,
}

/// One failed message's retries: the decisions, without I/O.
#[derive(Debug)]
pub(super) struct Retries {
    policy: Policy,
    max_retries: u32,
    delay: Duration,
    /// Callback failures so far.
    failures: u32,
}

impl Retries {
    pub(super) fn new(policy: Policy, max_retries: u32, delay: Duration) -> Retries {
        Retries {
            policy,
            max_retries,
            delay,
            failures: 0,
        }
    }

    /// Callback failures so far.
    pub(super) fn failures(&self) -> u32 {
        self.failures
    }

    /// `retry_delay`, 2x, ... capped at 10x: the spacing of local retries.
    fn pause(&self) -> Duration {
        self.delay * self.failures.clamp(1, 10)
    }

    /// The callback answered `RetryLater`.
    pub(super) fn failed(&mut self) -> Step {
        self.failures += 1;
        let exhausted = self.failures > self.max_retries;
        match self.policy {
            Policy::SendBack => Step::SendBack,
            Policy::LocalThenDeadLetter if exhausted => Step::DeadLetter(Duration::ZERO),
            Policy::Local if exhausted => Step::Skip,
            Policy::LocalThenDeadLetter | Policy::Local => Step::Wait(self.pause()),
        }
    }

    /// Sending back (or dead-lettering) failed with `e`, after the client's own
    /// retries.
    pub(super) fn send_back_failed(&mut self, e: &Error) -> Step {
        match self.policy {
            // Keep it pending and retry here; give up only when the callback has
            // failed `max_retries` times as well.
            Policy::SendBack if self.failures > self.max_retries => Step::Skip,
            Policy::SendBack => Step::Wait(self.pause()),
            // The queue waits for it; sending again only helps if the cluster
            // was in the way (no leader, unreachable), not when it refused.
            Policy::LocalThenDeadLetter if retrying_may_help(e) => Step::DeadLetter(self.pause()),
            Policy::LocalThenDeadLetter | Policy::Local => Step::Skip,
        }
    }
}

/// The call failed for a reason that may pass: the cluster was unreachable,
/// electing, or too slow, rather than refusing the request.
fn retrying_may_help(e: &Error) -> bool {
    e.is_retriable() || matches!(e, Error::DeadlineExceeded { .. })
}

/// The `reconsume_times` an orderly member sends a message back with to have it
/// dead-lettered: the broker dead-letters once `reconsume_times + 1` exceeds the
/// group's `max_reconsume_times`, so at least that maximum; more if the message
/// has really been tried more often (its earlier reconsumes plus the local
/// failures), so the dead-letter record tells the truth.
pub(super) fn dead_letter_reconsume_times(delivered: u32, local_failures: u32, group_max: u32) -> u32 {
    delivered.saturating_add(local_failures).max(group_max)
}

/// Calls the callback for `m` (pulled from `topic` on `broker_group`) until it is
/// done with: consumed, sent back, dead-lettered, or given up (true), or the
/// worker is stopped while waiting to retry (false: the message stays pending).
pub(super) async fn deliver(
    ctx: &Ctx,
    topic: &str,
    broker_group: &str,
    m: pb::PulledMessage,
    stop: &CancellationToken,
) -> bool {
    let s = &ctx.settings;
    let stats = &ctx.stats;
    let mut retries = Retries::new(Policy::of(s.model, s.mode), s.max_retries, s.retry_delay);
    loop {
        let mut step = match (ctx.listener)(m.clone()).await {
            ConsumeResult::Success => {
                stats.delivered.fetch_add(1, Ordering::Relaxed);
                return true;
            }
            ConsumeResult::RetryLater => {
                stats.retried.fetch_add(1, Ordering::Relaxed);
                retries.failed()
            }
        };
        // Carry out steps until one says to call the callback again.
        loop {
            let sent = match step {
                Step::Wait(pause) => {
                    tokio::select! {
                        _ = tokio::time::sleep(pause) => break,
                        _ = stop.cancelled() => return false,
                    }
                }
                Step::Skip => {
                    stats.skipped.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(
                        %topic,
                        %broker_group,
                        message_id = %m.message_id,
                        queue_id = m.queue_id,
                        offset = m.queue_offset,
                        failures = retries.failures(),
                        "giving up on a message after its retries; it is skipped"
                    );
                    return true;
                }
                Step::SendBack => send_back(ctx, topic, broker_group, &m, m.reconsume_times, 0).await,
                Step::DeadLetter(pause) => {
                    tokio::select! {
                        _ = tokio::time::sleep(pause) => {}
                        _ = stop.cancelled() => return false,
                    }
                    match group_max_reconsume_times(ctx, topic, broker_group).await {
                        Ok(max) => {
                            let times = dead_letter_reconsume_times(m.reconsume_times, retries.failures(), max);
                            send_back(ctx, topic, broker_group, &m, times, 0).await
                        }
                        Err(e) => Err(e),
                    }
                }
            };
            match sent {
                Ok(resp) => {
                    let counter = if resp.dead_lettered {
                        &stats.dead_lettered
                    } else {
                        &stats.sent_back
                    };
                    counter.fetch_add(1, Ordering::Relaxed);
                    if matches!(step, Step::DeadLetter(_)) && !resp.dead_lettered {
                        // The group's maximum grew between reading and sending.
                        tracing::warn!(message_id = %m.message_id, "meant for the dead-letter topic, the message was scheduled for a retry instead");
                    } else {
                        tracing::debug!(message_id = %m.message_id, dead_lettered = resp.dead_lettered, deliver_at_ms = resp.deliver_at_ms, "message sent back");
                    }
                    return true;
                }
                Err(e) => {
                    step = retries.send_back_failed(&e);
                    tracing::warn!(
                        %topic,
                        %broker_group,
                        message_id = %m.message_id,
                        error = %e,
                        next = ?step,
                        "sending a failed message back failed"
                    );
                }
            }
        }
    }
}

/// SendBack to the leader of `broker_group` (the group that stored the message;
/// its retry and dead-letter topics live there too), with the client's
/// leader-following policy, within `send_deadline`.
async fn send_back(
    ctx: &Ctx,
    topic: &str,
    broker_group: &str,
    m: &pb::PulledMessage,
    reconsume_times: u32,
    delay_ms: u64,
) -> Result<pb::SendBackResponse, Error> {
    let core = ctx.pull_core();
    let req = pb::SendBackRequest {
        consumer_group: ctx.settings.group.clone(),
        message_id: m.message_id.clone(),
        reconsume_times,
        delay_ms,
    };
    let spec = Spec {
        label: topic,
        deadline: core.config.send_deadline,
        long_poll: Duration::ZERO,
        followers: Followers::Redirect,
    };
    let target = Target::Topic {
        topic,
        pick: pick_group(topic, broker_group),
    };
    let served = follow(core, spec, target, |a: Attempt<()>| {
        let req = req.clone();
        async move { ConsumerServiceClient::new(a.channel).send_back(req).await }
    })
    .await?;
    Ok(served.value)
}

/// The consumer group's `max_reconsume_times` on `broker_group` (its leader's
/// replicated config; 16 for a group never configured).
async fn group_max_reconsume_times(ctx: &Ctx, topic: &str, broker_group: &str) -> Result<u32, Error> {
    let core = ctx.pull_core();
    let req = pb::GetConsumerGroupRequest {
        consumer_group: ctx.settings.group.clone(),
    };
    let spec = Spec {
        label: topic,
        deadline: core.config.send_deadline,
        long_poll: Duration::ZERO,
        followers: Followers::Ask,
    };
    let target = Target::Topic {
        topic,
        pick: pick_group(topic, broker_group),
    };
    let served = follow(core, spec, target, |a: Attempt<()>| {
        let req = req.clone();
        async move { AdminServiceClient::new(a.channel).get_consumer_group(req).await }
    })
    .await?;
    Ok(served
        .value
        .config
        .and_then(|c| c.max_reconsume_times)
        .unwrap_or(DEFAULT_MAX_RECONSUME_TIMES))
}

/// The brokers' default `max_reconsume_times` (RocketMQ's).
const DEFAULT_MAX_RECONSUME_TIMES: u32 = 16;

#[cfg(test)]
mod tests {
    use super::*;

    const D: Duration = Duration::from_millis(100);

    fn unreachable() -> Error {
        Error::Timeout {
            endpoint: "b:1".into(),
            timeout: D,
        }
    }

    fn refused() -> Error {
        Error::Rpc {
            endpoint: "b:1".into(),
            code: tonic::Code::NotFound,
            message: "message is not retained here".into(),
            leader: None,
        }
    }

    #[test]
    fn policy_follows_model_and_mode() {
        let concurrent = ConsumeMode::Concurrent { workers: 4 };
        assert_eq!(Policy::of(MessageModel::Clustering, concurrent), Policy::SendBack);
        assert_eq!(
            Policy::of(MessageModel::Clustering, ConsumeMode::Orderly),
            Policy::LocalThenDeadLetter
        );
        assert_eq!(Policy::of(MessageModel::Broadcasting, concurrent), Policy::Local);
        assert_eq!(
            Policy::of(MessageModel::Broadcasting, ConsumeMode::Orderly),
            Policy::Local
        );
    }

    #[test]
    fn concurrent_clustering_sends_back_every_failure() {
        let mut r = Retries::new(Policy::SendBack, 2, D);
        for _ in 0..5 {
            assert_eq!(r.failed(), Step::SendBack);
        }
    }

    #[test]
    fn a_failed_send_back_retries_here_with_growing_spacing_then_gives_up() {
        let mut r = Retries::new(Policy::SendBack, 2, D);
        assert_eq!(r.failed(), Step::SendBack);
        assert_eq!(r.send_back_failed(&unreachable()), Step::Wait(D));
        assert_eq!(r.failed(), Step::SendBack);
        // A refusal is retried here too: the callback may yet succeed.
        assert_eq!(r.send_back_failed(&refused()), Step::Wait(D * 2));
        assert_eq!(r.failed(), Step::SendBack);
        // Three callback failures and three failed send-backs with max_retries 2.
        assert_eq!(r.send_back_failed(&unreachable()), Step::Skip);
    }

    #[test]
    fn orderly_clustering_retries_here_then_dead_letters() {
        let mut r = Retries::new(Policy::LocalThenDeadLetter, 3, D);
        assert_eq!(r.failed(), Step::Wait(D));
        assert_eq!(r.failed(), Step::Wait(D * 2));
        assert_eq!(r.failed(), Step::Wait(D * 3));
        assert_eq!(r.failed(), Step::DeadLetter(Duration::ZERO));
        assert_eq!(r.failures(), 4);
        // The queue keeps waiting while the cluster is in the way...
        assert_eq!(r.send_back_failed(&unreachable()), Step::DeadLetter(D * 4));
        let deadline = Error::DeadlineExceeded {
            topic: "t".into(),
            attempts: 3,
            elapsed: D,
            last: Box::new(unreachable()),
        };
        assert_eq!(r.send_back_failed(&deadline), Step::DeadLetter(D * 4));
        // ...and gives up on a refusal retrying cannot change.
        assert_eq!(r.send_back_failed(&refused()), Step::Skip);
    }

    #[test]
    fn broadcasting_retries_here_then_gives_up_with_capped_spacing() {
        let mut r = Retries::new(Policy::Local, 12, D);
        for i in 1..=12 {
            assert_eq!(r.failed(), Step::Wait(D * i.min(10)));
        }
        assert_eq!(r.failed(), Step::Skip);
        let mut none = Retries::new(Policy::Local, 0, D);
        assert_eq!(none.failed(), Step::Skip);
    }

    #[test]
    fn dead_letter_reconsume_times_reach_the_group_maximum() {
        // A first delivery tried 16 times locally, group maximum 16.
        assert_eq!(dead_letter_reconsume_times(0, 17, 16), 17);
        // Few local tries, a large group maximum: the maximum wins.
        assert_eq!(dead_letter_reconsume_times(0, 3, 16), 16);
        // Already reconsumed from the retry topic: counted.
        assert_eq!(dead_letter_reconsume_times(5, 17, 16), 22);
        assert_eq!(dead_letter_reconsume_times(u32::MAX, 1, 16), u32::MAX);
    }
}
