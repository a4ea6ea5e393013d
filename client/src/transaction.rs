//! TransactionProducer: RocketMQ's transactional messages. A send stores a half
//! message (invisible to consumers), runs the caller's local transaction, then
//! commits or rolls the message back; an outcome left unknown (or lost with a
//! crashed producer) is settled by the broker asking a live producer of the same
//! producer group, whose checker answers.
//!
//! Check-backs arrive on a `TransactionChecks` stream this producer keeps open to
//! every replica of every broker group it sends to (only the leader checks, and
//! any replica may become leader), reopened after errors and re-planned when
//! routes change. Checkers run on Tokio's blocking pool, never on the stream.
//!
//! ```no_run
//! # async fn demo() -> Result<(), raftmq_client::Error> {
//! use raftmq_client::{Client, ClientConfig, Message, MessageExt, SendReceipt, TransactionResolution};
//! let client = Client::new(ClientConfig::new(vec!["127.0.0.1:9876".into()]))?;
//! // The checker answers for transactions whose sender crashed or said "unknown".
//! let producer = client.transaction_producer("order-service", |_check| TransactionResolution::Commit)?;
//! let result = producer
//!     .send("orders", Message::new(b"order 42".to_vec()), async |half: &SendReceipt| {
//!         let _ = &half.transaction_id;
//!         // ... write the order to the database ...
//!         TransactionResolution::Commit
//!     })
//!     .await?;
//! println!("{} ended as {:?}", result.receipt.transaction_id, result.resolution);
//! # Ok(()) }
//! ```

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use raftmq_proto::v1 as pb;
use raftmq_proto::v1::messaging_service_client::MessagingServiceClient;
use tokio_util::sync::CancellationToken;

use crate::error::Error;
use crate::leader::{Followers, Spec, follow_group};
use crate::producer::{Producer, SendReceipt};
use crate::route::Core;

/// How a transaction ends, as a local transaction or a checker decides it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransactionResolution {
    Commit,
    Rollback,
    /// Not known yet: the broker checks again later (up to its maximum checks,
    /// then rolls back).
    Unknown,
}

/// One check-back from a broker: which transaction, and its half message.
#[derive(Debug, Clone)]
pub struct TransactionCheck {
    pub broker_group: String,
    pub transaction_id: String,
    pub message: pb::PulledMessage,
    /// 1 on the first check.
    pub check_times: u32,
}

/// The answer to a transactional send.
#[derive(Debug, Clone)]
pub struct TransactionSendResult {
    /// The half message (`transaction_id` set; `queue_offset` 0).
    pub receipt: SendReceipt,
    /// What the local transaction decided (and was applied, unless Unknown).
    pub resolution: TransactionResolution,
    /// Ending the transaction failed (RocketMQ's producers only log this): the
    /// broker's check-backs settle it through the checker.
    pub end_error: Option<Error>,
}

type Checker = Arc<dyn Fn(&TransactionCheck) -> TransactionResolution + Send + Sync>;

/// How long a broken check stream waits before reopening.
const REOPEN_AFTER: Duration = Duration::from_secs(1);
/// How often the replicas to keep streams to are re-read from the routes.
const REPLAN_EVERY: Duration = Duration::from_secs(10);

/// Sends transactional messages for one producer group and answers its checks;
/// cheap to clone. Call [`TransactionProducer::shutdown`] to close its streams.
#[derive(Clone)]
pub struct TransactionProducer {
    inner: Arc<Inner>,
}

struct Inner {
    core: Arc<Core>,
    producer: Producer,
    producer_group: String,
    client_id: String,
    checker: Checker,
    /// Topics sent to: their groups' replicas get check streams.
    topics: Mutex<HashSet<String>>,
    /// Endpoints with a running stream task.
    streams: Mutex<HashMap<String, CancellationToken>>,
    stop: CancellationToken,
}

impl TransactionProducer {
    pub(crate) fn new(
        core: Arc<Core>,
        producer_group: &str,
        checker: impl Fn(&TransactionCheck) -> TransactionResolution + Send + Sync + 'static,
    ) -> Result<TransactionProducer, Error> {
        if producer_group.is_empty() {
            return Err(Error::Config {
                key: "producer_group".into(),
                value: String::new(),
                reason: "a transaction producer needs a producer group".into(),
            });
        }
        let inner = Arc::new(Inner {
            producer: Producer::from_core(core.clone()),
            core,
            producer_group: producer_group.to_owned(),
            client_id: crate::producer::new_producer_id(),
            checker: Arc::new(checker),
            topics: Mutex::new(HashSet::new()),
            streams: Mutex::new(HashMap::new()),
            stop: CancellationToken::new(),
        });
        let weak = Arc::downgrade(&inner);
        let stop = inner.stop.clone();
        // Re-plans the streams as routes change (replicas added or replaced).
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(REPLAN_EVERY) => {}
                    _ = stop.cancelled() => return,
                }
                let Some(inner) = weak.upgrade() else { return };
                replan(&inner).await;
            }
        });
        Ok(TransactionProducer { inner })
    }

    pub fn producer_group(&self) -> &str {
        &self.inner.producer_group
    }

    /// Sends a half message to `topic`, runs `local_transaction` with its
    /// receipt, and ends the transaction as it answers (Unknown leaves it to the
    /// check-backs). Only the half message's send can fail the call: a failure to
    /// end the transaction is in [`TransactionSendResult::end_error`], and the
    /// broker's checks settle the transaction anyway.
    pub async fn send(
        &self,
        topic: &str,
        message: pb::Message,
        local_transaction: impl AsyncFnOnce(&SendReceipt) -> TransactionResolution,
    ) -> Result<TransactionSendResult, Error> {
        let receipt = self.begin(topic, message).await?;
        let resolution = local_transaction(&receipt).await;
        let ended = match resolution {
            TransactionResolution::Commit => self.commit(&receipt).await.map(drop),
            TransactionResolution::Rollback => self.rollback(&receipt).await.map(drop),
            TransactionResolution::Unknown => Ok(()),
        };
        let end_error = ended.err();
        if let Some(e) = &end_error {
            tracing::warn!(transaction_id = %receipt.transaction_id, error = %e, "ending a transaction failed; the broker's check-back will settle it");
        }
        Ok(TransactionSendResult {
            receipt,
            resolution,
            end_error,
        })
    }

    /// Answers checks about `topic`'s transactions from now on, before sending
    /// any (RocketMQ's `setTopics`): a producer started to take over from a
    /// crashed one. A send to a topic does this by itself.
    pub async fn add_topic(&self, topic: &str) {
        lock(&self.inner.topics).insert(topic.to_owned());
        plan_streams(&self.inner, topic).await;
    }

    /// Sends a half message, for callers that end the transaction elsewhere
    /// ([`TransactionProducer::commit`], [`TransactionProducer::rollback`]).
    pub async fn begin(&self, topic: &str, message: pb::Message) -> Result<SendReceipt, Error> {
        lock(&self.inner.topics).insert(topic.to_owned());
        // Streams first, so a check of this very message can reach us. Cheap
        // when they exist (the route is cached); retried here after a failure.
        plan_streams(&self.inner, topic).await;
        let receipt = self
            .inner
            .producer
            .send_half(topic, &self.inner.producer_group, message)
            .await?;
        if receipt.transaction_id.is_empty() {
            return Err(Error::Protocol {
                endpoint: receipt.broker_group.clone(),
                reason: "a transactional send was answered without a transaction id".into(),
            });
        }
        Ok(receipt)
    }

    /// Makes the half message visible. Repeating it is harmless; after a
    /// rollback (e.g. by the broker, when checks went unanswered) it fails with
    /// FAILED_PRECONDITION.
    pub async fn commit(&self, half: &SendReceipt) -> Result<pb::EndTransactionResponse, Error> {
        end(
            &self.inner,
            &half.broker_group,
            &half.transaction_id,
            TransactionResolution::Commit,
            pb::TransactionSource::Client,
        )
        .await
    }

    /// Discards the half message. Repeating it is harmless; after a commit it
    /// fails with FAILED_PRECONDITION.
    pub async fn rollback(&self, half: &SendReceipt) -> Result<pb::EndTransactionResponse, Error> {
        end(
            &self.inner,
            &half.broker_group,
            &half.transaction_id,
            TransactionResolution::Rollback,
            pb::TransactionSource::Client,
        )
        .await
    }

    /// Closes the check streams; checks then go to the group's other producers.
    pub fn shutdown(&self) {
        self.inner.stop.cancel();
        lock(&self.inner.streams).clear();
    }

    /// Replicas this producer currently holds a check stream to (for tests and tools).
    pub fn check_stream_endpoints(&self) -> Vec<String> {
        let mut v: Vec<String> = lock(&self.inner.streams).keys().cloned().collect();
        v.sort();
        v
    }
}

impl Drop for Inner {
    /// The last handle is gone: close the streams now, so checks go to the
    /// group's other producers instead of to tasks that can no longer answer.
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Starts the streams every topic's route asks for, and stops those to replicas
/// no route lists any more (only when every route was read, so a NameServer
/// hiccup closes nothing).
async fn replan(inner: &Arc<Inner>) {
    let topics: Vec<String> = lock(&inner.topics).iter().cloned().collect();
    let mut wanted = HashSet::new();
    let mut complete = true;
    for t in &topics {
        match inner.core.route(t).await {
            Ok(route) => wanted.extend(route.groups.iter().flat_map(replicas).cloned()),
            Err(_) => complete = false,
        }
        plan_streams(inner, t).await;
    }
    if complete {
        lock(&inner.streams).retain(|ep, token| {
            let keep = wanted.contains(ep);
            if !keep {
                tracing::debug!(endpoint = %ep, "no route lists this replica any more: closing its check stream");
                token.cancel();
            }
            keep
        });
    }
}

fn replicas(g: &pb::GroupRoute) -> impl Iterator<Item = &String> {
    std::iter::once(&g.leader_endpoint)
        .chain(g.follower_endpoints.iter())
        .filter(|e| !e.is_empty())
}

/// Starts a stream task for every replica of every group serving `topic` that
/// has none yet.
async fn plan_streams(inner: &Arc<Inner>, topic: &str) {
    if inner.stop.is_cancelled() {
        return;
    }
    let route = match inner.core.route(topic).await {
        Ok(r) => r,
        Err(e) => {
            tracing::debug!(topic, error = %e, "no route yet for transaction check streams");
            return;
        }
    };
    let mut streams = lock(&inner.streams);
    for g in &route.groups {
        for ep in replicas(g) {
            if streams.contains_key(ep) {
                continue;
            }
            let token = inner.stop.child_token();
            streams.insert(ep.clone(), token.clone());
            tokio::spawn(stream_task(Arc::downgrade(inner), ep.clone(), token));
        }
    }
}

/// Keeps one check stream to `endpoint` open until `stop`, answering each check.
async fn stream_task(inner: std::sync::Weak<Inner>, endpoint: String, stop: CancellationToken) {
    loop {
        let Some(this) = inner.upgrade() else { return };
        let req = pb::TransactionChecksRequest {
            producer_group: this.producer_group.clone(),
            client_id: this.client_id.clone(),
        };
        let opened = match this.core.channel(&endpoint) {
            Ok(ch) => {
                let mut client =
                    MessagingServiceClient::new(ch).max_decoding_message_size(this.core.max_message_bytes());
                tokio::select! {
                    r = tokio::time::timeout(this.core.config.request_timeout, client.transaction_checks(req)) => r,
                    _ = stop.cancelled() => return,
                }
            }
            Err(e) => {
                // Not a usable address: retrying cannot help. Forget it, so a
                // corrected route starts a stream again.
                tracing::warn!(%endpoint, error = %e, "cannot open a transaction check stream");
                lock(&this.streams).remove(&endpoint);
                return;
            }
        };
        drop(this);
        match opened {
            Ok(Ok(resp)) => {
                let mut stream = resp.into_inner();
                tracing::debug!(%endpoint, "transaction check stream open");
                loop {
                    let next = tokio::select! {
                        m = stream.message() => m,
                        _ = stop.cancelled() => return,
                    };
                    match next {
                        Ok(Some(check)) => {
                            let Some(this) = inner.upgrade() else { return };
                            tokio::spawn(answer(this, check));
                        }
                        Ok(None) => break,
                        Err(status) => {
                            tracing::debug!(%endpoint, %status, "transaction check stream broke");
                            break;
                        }
                    }
                }
            }
            Ok(Err(status)) => tracing::debug!(%endpoint, %status, "transaction check stream refused"),
            Err(_) => tracing::debug!(%endpoint, "transaction check stream did not open in time"),
        }
        tokio::select! {
            _ = tokio::time::sleep(REOPEN_AFTER) => {}
            _ = stop.cancelled() => return,
        }
    }
}

/// Runs the checker for one check and sends its answer to the group's leader.
async fn answer(inner: Arc<Inner>, check: pb::TransactionCheck) {
    let Some(message) = check.message else {
        tracing::warn!(transaction_id = %check.transaction_id, "a transaction check without its message; ignored");
        return;
    };
    let check = TransactionCheck {
        broker_group: check.broker_group,
        transaction_id: check.transaction_id,
        message,
        check_times: check.check_times,
    };
    let checker = inner.checker.clone();
    let asked = check.clone();
    let resolution = match tokio::task::spawn_blocking(move || checker(&asked)).await {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(transaction_id = %check.transaction_id, error = %e, "transaction checker panicked; answering unknown");
            TransactionResolution::Unknown
        }
    };
    tracing::debug!(transaction_id = %check.transaction_id, ?resolution, check_times = check.check_times, "answering a transaction check");
    if resolution == TransactionResolution::Unknown {
        return;
    }
    let result = end(
        &inner,
        &check.broker_group,
        &check.transaction_id,
        resolution,
        pb::TransactionSource::ServerCheck,
    )
    .await;
    if let Err(e) = result {
        // The broker checks again; nothing is lost.
        tracing::warn!(transaction_id = %check.transaction_id, error = %e, "answering a transaction check failed");
    }
}

/// EndTransaction at the leader of `broker_group`, following failovers within
/// `send_deadline`. Safe to retry: ending twice the same way is OK.
async fn end(
    inner: &Inner,
    broker_group: &str,
    transaction_id: &str,
    resolution: TransactionResolution,
    source: pb::TransactionSource,
) -> Result<pb::EndTransactionResponse, Error> {
    let resolution = match resolution {
        TransactionResolution::Commit => pb::TransactionResolution::Commit,
        TransactionResolution::Rollback => pb::TransactionResolution::Rollback,
        TransactionResolution::Unknown => pb::TransactionResolution::Unspecified,
    };
    let core = &inner.core;
    let group = group_route(inner, broker_group).await?;
    let spec = Spec {
        label: "",
        deadline: core.config.send_deadline,
        long_poll: Duration::ZERO,
        followers: Followers::Redirect,
    };
    let req = pb::EndTransactionRequest {
        transaction_id: transaction_id.to_owned(),
        resolution: resolution as i32,
        source: source as i32,
    };
    let served = follow_group(core, spec, group, |a| {
        let req = req.clone();
        async move { MessagingServiceClient::new(a.channel).end_transaction(req).await }
    })
    .await?;
    Ok(served.value)
}

/// The broker group's replicas: from the (cached) route of a topic this
/// producer sends to, else from the NameServers' cluster view.
async fn group_route(inner: &Inner, broker_group: &str) -> Result<pb::GroupRoute, Error> {
    let topics: Vec<String> = lock(&inner.topics).iter().cloned().collect();
    for t in topics {
        if let Ok(route) = inner.core.route(&t).await
            && let Some(g) = route.group(broker_group)
        {
            return Ok(g.clone());
        }
    }
    let groups = inner.core.list_cluster().await?;
    let g = groups
        .into_iter()
        .find(|g| g.broker_group == broker_group)
        .ok_or_else(|| Error::NoRoute {
            topic: String::new(),
            reason: format!("no NameServer lists broker group {broker_group:?}"),
        })?;
    Ok(pb::GroupRoute {
        follower_endpoints: g
            .replicas
            .iter()
            .map(|r| r.endpoint.clone())
            .filter(|e| *e != g.leader_endpoint)
            .collect(),
        broker_group: g.broker_group,
        leader_endpoint: g.leader_endpoint,
        queues: 0,
        perm: 0,
        message_type: 0,
    })
}
