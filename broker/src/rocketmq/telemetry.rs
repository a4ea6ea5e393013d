//! RocketMQ 5's Telemetry stream: the client's Settings answered with the
//! server's (the Python SDK takes its max body size and retry policy from the
//! answer, and a push consumer will not start without one), and transaction
//! check-backs relayed to producers as RecoverOrphanedTransactionCommand.
//!
//! Check-backs come from raftmq's own TransactionChecks streams: for every topic
//! a producer's Settings list, the stream opens one to every replica of every
//! broker group serving the topic (only a leader sends checks, and any replica
//! may lead next), with producer group = topic, as RocketMQ's proxy registers
//! producers. They are re-planned every few seconds and end with the Telemetry
//! stream.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use raftmq_proto::rocketmq::v2;
use raftmq_proto::v1 as pb;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use v2::settings::PubSub;

use super::message;
use super::upstream::Upstream;
use super::{codes, now_ms};

/// Commands waiting to be written to one client. A check-back that does not fit
/// is dropped: the leader checks again at its next interval.
pub const STREAM_BUFFER: usize = 256;
/// Topics one producer stream relays check-backs for.
const MAX_RELAYED_TOPICS: usize = 64;
/// How often a relay looks for new replicas, and waits after a failed stream.
const REPLAN: Duration = Duration::from_secs(5);
const RECONNECT: Duration = Duration::from_secs(1);
/// The long polling a push consumer is told to use, RocketMQ's proxy default.
pub const LONG_POLLING: Duration = Duration::from_secs(20);
/// Messages a push consumer receives at once (RocketMQ's proxy default).
const RECEIVE_BATCH: i32 = 32;

fn duration(d: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

/// The server's answer to a client's Settings: the client's own, completed
/// with what this cluster enforces, as RocketMQ's proxy merges them.
pub fn settings_reply(up: &Upstream, mut s: v2::Settings) -> v2::Settings {
    s.metric = Some(v2::Metric {
        on: false,
        endpoints: None,
    });
    match s.pub_sub.as_mut() {
        Some(PubSub::Publishing(p)) => {
            p.max_body_size = i32::try_from(up.group().config().max_body_bytes).unwrap_or(i32::MAX);
            p.validate_message_type = true;
            s.backoff_policy = Some(v2::RetryPolicy {
                max_attempts: 3,
                strategy: Some(v2::retry_policy::Strategy::ExponentialBackoff(v2::ExponentialBackoff {
                    initial: Some(duration(Duration::from_millis(10))),
                    max: Some(duration(Duration::from_secs(1))),
                    multiplier: 2.0,
                })),
            });
        }
        Some(PubSub::Subscription(sub)) => {
            let name = sub.group.as_ref().map(|g| g.name.clone()).unwrap_or_default();
            let config = up.group().store().with_pop(|p| p.config(&name));
            sub.fifo = Some(config.fifo);
            sub.receive_batch_size = Some(RECEIVE_BATCH);
            sub.long_polling_timeout = Some(duration(LONG_POLLING));
            let delays: Vec<u64> = if config.retry_delays_ms.is_empty() {
                raftmq_raft_store::pop::DEFAULT_RETRY_DELAYS_MS.to_vec()
            } else {
                config.retry_delays_ms.clone()
            };
            s.backoff_policy = Some(v2::RetryPolicy {
                max_attempts: i32::try_from(config.max_reconsume_times.saturating_add(1)).unwrap_or(i32::MAX),
                strategy: Some(v2::retry_policy::Strategy::CustomizedBackoff(v2::CustomizedBackoff {
                    next: delays
                        .into_iter()
                        .map(|ms| duration(Duration::from_millis(ms)))
                        .collect(),
                })),
            });
        }
        None => {}
    }
    s
}

/// One Telemetry stream's state: the check-back relays it started.
pub struct Session {
    pub up: Upstream,
    pub client_id: String,
    pub tx: mpsc::Sender<Result<v2::TelemetryCommand, tonic::Status>>,
    pub stop: CancellationToken,
    relayed: HashSet<String>,
}

impl Session {
    pub fn new(
        up: Upstream,
        client_id: String,
        tx: mpsc::Sender<Result<v2::TelemetryCommand, tonic::Status>>,
        stop: CancellationToken,
    ) -> Self {
        Session {
            up,
            client_id,
            tx,
            stop,
            relayed: HashSet::new(),
        }
    }

    /// Handles one command from the client.
    pub async fn command(&mut self, cmd: v2::TelemetryCommand) {
        let Some(v2::telemetry_command::Command::Settings(settings)) = cmd.command else {
            // Thread dumps and verify results answer commands we never send.
            return;
        };
        if let Some(PubSub::Publishing(p)) = &settings.pub_sub {
            for topic in &p.topics {
                self.relay(&topic.name);
            }
        }
        let reply = settings_reply(&self.up, settings);
        let answer = v2::TelemetryCommand {
            status: codes::ok(),
            command: Some(v2::telemetry_command::Command::Settings(reply)),
        };
        if self.tx.send(Ok(answer)).await.is_err() {
            self.stop.cancel();
        }
    }

    fn relay(&mut self, topic: &str) {
        if topic.is_empty() || self.relayed.contains(topic) || self.relayed.len() >= MAX_RELAYED_TOPICS {
            return;
        }
        self.relayed.insert(topic.to_owned());
        let relay = Arc::new(Relay {
            up: self.up.clone(),
            topic: topic.to_owned(),
            client_id: self.client_id.clone(),
            tx: self.tx.clone(),
        });
        let stop = self.stop.clone();
        self.up.group().tasks().spawn(relay.run(stop));
    }
}

/// Check-backs of one topic's transactions to one producer.
struct Relay {
    up: Upstream,
    topic: String,
    client_id: String,
    tx: mpsc::Sender<Result<v2::TelemetryCommand, tonic::Status>>,
}

impl Relay {
    async fn run(self: Arc<Self>, stop: CancellationToken) {
        let shutdown = self.up.group().shutdown().clone();
        let mut open: HashSet<String> = HashSet::new();
        loop {
            match self.up.topic_routes(&self.topic).await {
                Ok(routes) => {
                    for endpoint in routes.into_iter().flat_map(|r| r.group.endpoints) {
                        if open.insert(endpoint.clone()) {
                            let me = self.clone();
                            let stop = stop.clone();
                            self.up
                                .group()
                                .tasks()
                                .spawn(async move { me.stream_from(endpoint, stop).await });
                        }
                    }
                }
                Err(e) => tracing::debug!(topic = %self.topic, error = %e, "check-back relay could not read routes"),
            }
            tokio::select! {
                _ = tokio::time::sleep(REPLAN) => {}
                _ = stop.cancelled() => return,
                _ = shutdown.cancelled() => return,
            }
        }
    }

    async fn stream_from(&self, endpoint: String, stop: CancellationToken) {
        let shutdown = self.up.group().shutdown().clone();
        loop {
            let result = async {
                let channel = self.up.channel(&endpoint)?;
                let mut client = pb::messaging_service_client::MessagingServiceClient::new(channel)
                    .max_decoding_message_size(self.up.max_message_bytes());
                let mut stream = client
                    .transaction_checks(pb::TransactionChecksRequest {
                        producer_group: self.topic.clone(),
                        client_id: self.client_id.clone(),
                    })
                    .await?
                    .into_inner();
                while let Some(check) = stream.message().await? {
                    let Some(pulled) = check.message else { continue };
                    let command = v2::TelemetryCommand {
                        status: None,
                        command: Some(v2::telemetry_command::Command::RecoverOrphanedTransactionCommand(
                            v2::RecoverOrphanedTransactionCommand {
                                message: Some(message::incoming(pulled, "", &endpoint, None, now_ms())),
                                transaction_id: check.transaction_id,
                            },
                        )),
                    };
                    if let Err(mpsc::error::TrySendError::Closed(_)) = self.tx.try_send(Ok(command)) {
                        return Ok(());
                    }
                }
                Ok::<(), tonic::Status>(())
            };
            tokio::select! {
                r = result => if let Err(e) = r {
                    tracing::debug!(%endpoint, topic = %self.topic, error = %e, "check-back stream ended");
                },
                _ = stop.cancelled() => return,
                _ = shutdown.cancelled() => return,
            }
            if self.tx.is_closed() {
                return;
            }
            tokio::select! {
                _ = tokio::time::sleep(RECONNECT) => {}
                _ = stop.cancelled() => return,
                _ = shutdown.cancelled() => return,
            }
        }
    }
}
