//! raftmq-client: a Rust client for a raftmq cluster. It asks NameServers where a
//! topic lives, keeps one long-lived gRPC channel per endpoint, and follows a broker
//! group's leader through failovers (`NOT_LEADER` redirects, route refreshes and
//! bounded retries). [`PushConsumer`] runs consumer groups (clustering, with
//! offsets committed through the brokers' Raft, or broadcasting).
//!
//! ```no_run
//! # async fn demo() -> Result<(), raftmq_client::Error> {
//! use raftmq_client::{Client, ClientConfig, Message, MessageExt};
//! let client = Client::new(ClientConfig::new(vec!["127.0.0.1:9876".into()]))?;
//! let receipt = client.producer().send("orders", Message::new(b"hello".to_vec())).await?;
//! println!("stored as {} at offset {}", receipt.message_id, receipt.queue_offset);
//! # Ok(()) }
//! ```

mod acl;
pub mod admin;
pub mod config;
pub mod consumer;
pub mod error;
mod leader;
pub mod producer;
pub mod push;
pub mod route;
pub mod simple;
pub mod transaction;

use std::sync::Arc;

pub use admin::Admin;
pub use config::ClientConfig;
pub use consumer::{Filter, PullConsumer, PullResult};
pub use error::Error;
pub use producer::{Producer, SendReceipt};
pub use push::{ConsumeMode, ConsumeResult, ConsumerStats, MessageModel, PushConsumer, PushConsumerBuilder, StartFrom};
pub use raftmq_proto::v1::{GroupRoute, Message, PulledMessage, QueryRouteResponse};
pub use route::{LEADER_METADATA_KEY, TopicRoute};
pub use simple::{Received, SimpleConsumer};
pub use transaction::{TransactionCheck, TransactionProducer, TransactionResolution, TransactionSendResult};

/// Shared state of everything built from one [`ClientConfig`]: the channel map and
/// the route cache. Cloning is cheap and shares both, so a producer, a consumer and
/// an admin made from one `Client` reuse the same connections.
#[derive(Clone)]
pub struct Client {
    core: Arc<route::Core>,
}

impl Client {
    /// Checks the config; connects nothing yet (channels connect on first use).
    pub fn new(config: ClientConfig) -> Result<Client, Error> {
        config.validate()?;
        Ok(Client {
            core: Arc::new(route::Core::new(config)),
        })
    }

    pub fn producer(&self) -> Producer {
        Producer::from_core(self.core.clone())
    }

    /// A producer of transactional messages for `producer_group`; `checker`
    /// answers the brokers' check-backs for the group's unresolved transactions
    /// (see [`transaction`]). Needs a Tokio runtime (it starts background tasks).
    pub fn transaction_producer(
        &self,
        producer_group: &str,
        checker: impl Fn(&TransactionCheck) -> TransactionResolution + Send + Sync + 'static,
    ) -> Result<TransactionProducer, Error> {
        TransactionProducer::new(self.core.clone(), producer_group, checker)
    }

    pub fn pull_consumer(&self) -> PullConsumer {
        PullConsumer::from_core(self.core.clone())
    }

    /// A consumer of `topic` in consumer group `group`; configure it, then
    /// [`PushConsumerBuilder::start`] it with a callback.
    pub fn push_consumer(&self, group: &str, topic: &str) -> PushConsumerBuilder {
        PushConsumerBuilder::new(self.core.clone(), group, topic)
    }

    /// A POP consumer (RocketMQ 5's SimpleConsumer) of `topic` in consumer group `group`.
    pub fn simple_consumer(&self, group: &str, topic: &str) -> SimpleConsumer {
        SimpleConsumer::new(self.core.clone(), group, topic)
    }

    pub fn admin(&self) -> Admin {
        Admin::from_core(self.core.clone())
    }

    /// The cached route of `topic`, fetching it if absent or stale.
    pub async fn route(&self, topic: &str) -> Result<Arc<TopicRoute>, Error> {
        self.core.route(topic).await
    }

    /// Fetches the route of `topic` from a NameServer now, replacing the cached one
    /// (for a caller that just changed the topic, e.g. created it).
    pub async fn refresh_route(&self, topic: &str) -> Result<Arc<TopicRoute>, Error> {
        self.core.routes.invalidate(topic);
        self.core.route(topic).await
    }

    /// Replaces the cached route of a topic, as if a NameServer had answered it.
    /// For clients that must work while every NameServer is down, and for tests.
    pub fn seed_route(&self, route: QueryRouteResponse) {
        self.core.routes.put(route);
    }
}

/// A message with just a body; set `tag`, `keys` and `properties` on the result.
pub trait MessageExt {
    fn new(body: impl Into<Vec<u8>>) -> Self;
    /// Delivered `delay` after the broker stores it (never before).
    fn with_delay(self, delay: std::time::Duration) -> Self;
    /// Delivered at `ms` since the Unix epoch (never before).
    fn with_deliver_at(self, ms: u64) -> Self;
}

impl MessageExt for Message {
    fn new(body: impl Into<Vec<u8>>) -> Message {
        Message {
            body: body.into(),
            ..Message::default()
        }
    }

    fn with_delay(self, delay: std::time::Duration) -> Message {
        Message {
            delay_ms: u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
            ..self
        }
    }

    fn with_deliver_at(self, ms: u64) -> Message {
        Message {
            deliver_at_ms: ms,
            ..self
        }
    }
}
