//! Transactional messages on the broker: ending transactions (EndTransaction),
//! the producers' check-back streams (TransactionChecks) and the leader's check
//! loop, and the admin listing. The replicated part (pending half messages,
//! check counts, outcomes) is raft-store's `transactions` module; this module
//! decides, on the leader, what to check and when to give up.
//!
//! Check-backs: a transactional producer keeps a TransactionChecks stream open to
//! every replica of the group, so whichever replica leads can reach it. When a
//! half message's next check is due, the leader first records the check through
//! Raft (`TransactionsChecked`: the count and the next check time are replicated,
//! so the maximum holds across failovers), then sends it on one live stream of the
//! message's producer group, rotating between them. No stream, or no answer,
//! still counts as a check; after `transaction_max_checks` the leader rolls the
//! message back (`EndTransactions` with source `Exhausted`), logs it and the
//! state machine counts it. A new leader re-sends the checks that may have been in
//! flight under the old one (pending, checked at least once, next check not yet
//! due) as soon as it leads, without counting them again.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Mutex;
use std::time::Duration;

use futures::Stream;
use raftmq_proto::v1 as pb;
use raftmq_raft_store::{Command, PendingTxn, Response, TxnEndOutcome, TxnEndSource, TxnId};
use tokio::sync::mpsc;
use tonic::Status;
use tracing::Instrument;

use crate::api_error::ApiError;
use crate::convert;
use crate::group::GroupHandle;
use crate::messaging::now_ms;
use crate::validate;

/// Checks queued per stream before further ones to it are dropped (and count as
/// unanswered): a producer that stopped reading must not make the broker buffer.
const STREAM_BUFFER: usize = 256;
/// Transactions checked (or rolled back) per Raft entry.
const CHECK_BATCH: usize = 256;
/// Longest sleep without re-reading the earliest check time.
const MAX_SLEEP: Duration = Duration::from_secs(1);
/// Most pending transactions a ListTransactions returns.
const MAX_LIST: usize = 10_000;

/// The server side of a TransactionChecks stream.
pub type CheckStream = Pin<Box<dyn Stream<Item = Result<pb::TransactionCheck, Status>> + Send>>;

struct Checker {
    client_id: String,
    tx: mpsc::Sender<Result<pb::TransactionCheck, Status>>,
}

#[derive(Default)]
struct Checkers {
    by_group: HashMap<String, Vec<Checker>>,
    /// Rotates checks among a group's streams.
    next: usize,
}

impl Checkers {
    fn prune(&mut self) {
        self.by_group.retain(|_, v| {
            v.retain(|c| !c.tx.is_closed());
            !v.is_empty()
        });
    }

    fn count(&self) -> usize {
        self.by_group.values().map(Vec::len).sum()
    }
}

/// This replica's transaction endpoint and check-back registry.
pub struct Transactions {
    group: GroupHandle,
    checkers: Mutex<Checkers>,
}

/// A pure decision of the check loop for one due transaction.
#[derive(Debug, PartialEq, Eq)]
enum Due {
    Check,
    GiveUp,
}

fn decide(checks_so_far: u32, max_checks: u32) -> Due {
    if checks_so_far >= max_checks {
        Due::GiveUp
    } else {
        Due::Check
    }
}

impl Transactions {
    pub fn new(group: GroupHandle) -> std::sync::Arc<Transactions> {
        std::sync::Arc::new(Transactions {
            group,
            checkers: Mutex::new(Checkers::default()),
        })
    }

    fn checkers(&self) -> std::sync::MutexGuard<'_, Checkers> {
        self.checkers.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a producer's check-back stream; it ends when the producer goes
    /// away or this node shuts down.
    pub fn open_checks(&self, req: pb::TransactionChecksRequest) -> Result<CheckStream, ApiError> {
        validate::producer_group_name(&req.producer_group)?;
        validate::client_id(&req.client_id)?;
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        {
            let mut c = self.checkers();
            c.prune();
            let max = self.group.config().max_transaction_checkers;
            if c.count() >= max {
                return Err(ApiError::ResourceExhausted(format!(
                    "this replica already holds {max} TransactionChecks streams (max_transaction_checkers)"
                )));
            }
            tracing::debug!(producer_group = %req.producer_group, client_id = %req.client_id, "transaction checker connected");
            c.by_group.entry(req.producer_group).or_default().push(Checker {
                client_id: req.client_id,
                tx,
            });
        }
        let stop = self.group.shutdown().clone();
        let stream = futures::stream::unfold((rx, stop), |(mut rx, stop)| async move {
            tokio::select! {
                item = rx.recv() => item.map(|i| (i, (rx, stop))),
                _ = stop.cancelled() => None,
            }
        });
        Ok(Box::pin(stream))
    }

    /// Sends a check to one live stream of `producer_group`; false when none took it.
    fn dispatch(&self, producer_group: &str, check: pb::TransactionCheck) -> bool {
        let mut c = self.checkers();
        c.prune();
        let start = c.next;
        c.next = c.next.wrapping_add(1);
        let Some(streams) = c.by_group.get(producer_group) else {
            return false;
        };
        for i in 0..streams.len() {
            let s = &streams[(start + i) % streams.len()];
            if s.tx.try_send(Ok(check.clone())).is_ok() {
                tracing::debug!(transaction_id = %check.transaction_id, client_id = %s.client_id, check_times = check.check_times, "transaction check sent");
                return true;
            }
        }
        false
    }

    /// The topic of the pending half message `transaction_id` names, if any
    /// (what the ACL checks PUB on before the transaction is ended).
    pub fn pending_topic(&self, transaction_id: &str) -> Option<String> {
        let id = parse_txn_id(self.group.group(), transaction_id).ok()?;
        self.group.store().with_txn(|t| t.pending(&id).map(|p| p.topic.clone()))
    }

    /// EndTransaction: commit or roll back through Raft; "unknown" changes nothing.
    pub async fn end(&self, req: pb::EndTransactionRequest) -> Result<pb::EndTransactionResponse, ApiError> {
        let g = &self.group;
        let id = parse_txn_id(g.group(), &req.transaction_id)?;
        let commit = match pb::TransactionResolution::try_from(req.resolution) {
            Ok(pb::TransactionResolution::Commit) => true,
            Ok(pb::TransactionResolution::Rollback) => false,
            Ok(pb::TransactionResolution::Unspecified) => {
                // RocketMQ's "unknown": the broker checks again later.
                g.ensure_leader()?;
                return Ok(pb::EndTransactionResponse::default());
            }
            Err(_) => {
                return Err(ApiError::InvalidArgument(format!(
                    "resolution {} is not a TransactionResolution",
                    req.resolution
                )));
            }
        };
        let source = match pb::TransactionSource::try_from(req.source) {
            Ok(pb::TransactionSource::ServerCheck) => TxnEndSource::Check,
            Ok(_) => TxnEndSource::Client,
            Err(_) => {
                return Err(ApiError::InvalidArgument(format!(
                    "source {} is not a TransactionSource",
                    req.source
                )));
            }
        };
        g.ensure_leader()?;
        let cmd = Command::EndTransactions {
            ends: vec![(id, commit)],
            source,
            store_timestamp_ms: now_ms(),
        };
        let written = g.write(cmd).await?;
        let outcome = match written.response {
            Response::TransactionsEnded { outcomes } if outcomes.len() == 1 => outcomes[0],
            other => {
                return Err(ApiError::Internal(format!(
                    "ending a transaction was answered with {other}"
                )));
            }
        };
        end_response(&req.transaction_id, commit, outcome)
    }

    /// Runs the check loop on this replica; it works only while the replica leads.
    pub fn spawn_checker(self: &std::sync::Arc<Self>) {
        let span = tracing::info_span!("transaction_checks", group = %self.group.group());
        let this = self.clone();
        self.group
            .tasks()
            .spawn(async move { this.run().await }.instrument(span));
    }

    async fn run(&self) {
        self.group.while_leading(|term| self.lead(term)).await;
    }

    /// Checks due transactions until this node stops leading `term`.
    async fn lead(&self, term: u64) {
        let g = &self.group;
        let store = g.store().clone();
        let stop = g.shutdown().clone();
        // What the previous leader may have had in flight: committed entries it
        // proposed may not be applied here yet, so catch up first.
        if g.catch_up().await.is_ok() {
            let outstanding = store.with_txn(|t| t.outstanding(now_ms(), g.config().max_pending_transactions));
            if !outstanding.is_empty() {
                tracing::info!(
                    term,
                    count = outstanding.len(),
                    "new leader: re-sending checks that may have been in flight"
                );
            }
            let checks = outstanding.into_iter().map(|(id, p)| (id, p.checks, p)).collect();
            self.send_checks(checks).await;
        }
        loop {
            if !g.leads(term) {
                return;
            }
            let added = store.txn_added();
            tokio::pin!(added);
            added.as_mut().enable();
            let now = now_ms();
            let due = store.with_txn(|t| t.due(now, CHECK_BATCH));
            if due.is_empty() {
                let next = store.with_txn(|t| t.next_check_ms());
                let wait = next
                    .map(|at| Duration::from_millis(at.saturating_sub(now_ms())))
                    .unwrap_or(MAX_SLEEP)
                    .min(MAX_SLEEP);
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = &mut added => {}
                    _ = g.deposed(term) => return,
                    _ = stop.cancelled() => return,
                }
                continue;
            }
            if let Err(e) = self.handle_due(now, due).await {
                if matches!(e, ApiError::NotLeader { .. }) {
                    return;
                }
                // Nothing was lost: the transactions stay due until an entry applies.
                tracing::warn!(error = %e, "checking transactions failed; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                    _ = stop.cancelled() => return,
                }
            }
        }
    }

    async fn handle_due(&self, now: u64, due: Vec<(TxnId, PendingTxn)>) -> Result<(), ApiError> {
        let g = &self.group;
        let max = g.config().transaction_max_checks;
        let (give_up, check): (Vec<_>, Vec<_>) =
            due.into_iter().partition(|(_, p)| decide(p.checks, max) == Due::GiveUp);
        if !give_up.is_empty() {
            for (id, p) in &give_up {
                tracing::warn!(
                    transaction_id = %convert::message_id(g.group(), id.raft_index, id.batch_pos),
                    producer_group = %p.producer_group,
                    topic = %p.topic,
                    checks = p.checks,
                    "transaction unresolved after the maximum checks: rolling it back"
                );
            }
            let cmd = Command::EndTransactions {
                ends: give_up.iter().map(|(id, _)| (*id, false)).collect(),
                source: TxnEndSource::Exhausted,
                store_timestamp_ms: now,
            };
            g.write(cmd).await?;
        }
        if check.is_empty() {
            return Ok(());
        }
        let interval = u64::try_from(g.config().transaction_check_interval.as_millis()).unwrap_or(u64::MAX);
        let cmd = Command::TransactionsChecked {
            ids: check.iter().map(|(id, _)| *id).collect(),
            next_check_ms: now.saturating_add(interval),
        };
        let written = g.write(cmd).await?;
        let Response::TransactionsChecked { checked } = written.response else {
            return Err(ApiError::Internal(format!(
                "counting checks was answered with {}",
                written.response
            )));
        };
        let counts: HashMap<TxnId, u32> = checked.into_iter().collect();
        // Ended meanwhile (the producer answered first): nothing to ask.
        let checks = check
            .into_iter()
            .filter_map(|(id, p)| counts.get(&id).map(|&n| (id, n, p)))
            .collect();
        self.send_checks(checks).await;
        Ok(())
    }

    /// Reads each half message (off the async workers: it may read disk) and
    /// sends its check to a producer of its group.
    async fn send_checks(&self, checks: Vec<(TxnId, u32, PendingTxn)>) {
        let g = &self.group;
        let (store, group) = (g.store().clone(), g.group().to_owned());
        let read = tokio::task::spawn_blocking(move || {
            checks
                .into_iter()
                .map(|(id, n, p)| {
                    let message = store.message_record(id.raft_index, id.batch_pos);
                    (id, n, p, message)
                })
                .collect::<Vec<_>>()
        })
        .await;
        let read = match read {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "reading half messages for their checks did not finish");
                return;
            }
        };
        for (id, check_times, p, message) in read {
            let transaction_id = convert::message_id(&group, id.raft_index, id.batch_pos);
            let message = match message {
                Ok(Some(m)) => convert::pulled_message(&group, m),
                Ok(None) => {
                    tracing::error!(%transaction_id, "half message is not retained; cannot check it");
                    continue;
                }
                Err(e) => {
                    tracing::error!(%transaction_id, error = %e, "reading a half message for its check failed");
                    continue;
                }
            };
            let check = pb::TransactionCheck {
                broker_group: group.clone(),
                transaction_id: transaction_id.clone(),
                message: Some(message),
                check_times,
            };
            if !self.dispatch(&p.producer_group, check) {
                tracing::debug!(%transaction_id, producer_group = %p.producer_group, check_times, "no live producer of the group to check with");
            }
        }
    }
}

/// A transaction id is its half message's id, which must name this broker group.
fn parse_txn_id(group: &str, id: &str) -> Result<TxnId, ApiError> {
    let parsed =
        convert::parse_message_id(id).map_err(|e| ApiError::InvalidArgument(format!("transaction_id: {e}")))?;
    if parsed.group_crc != crc32c::crc32c(group.as_bytes()) {
        return Err(ApiError::NotFound(format!(
            "transaction {id} was not stored by broker group {group}"
        )));
    }
    Ok(TxnId {
        raft_index: parsed.raft_index,
        batch_pos: parsed.batch_pos,
    })
}

/// What an EndTransaction answers, from what the state machine found.
fn end_response(id: &str, commit: bool, outcome: TxnEndOutcome) -> Result<pb::EndTransactionResponse, ApiError> {
    let word = |c: bool| if c { "committed" } else { "rolled back" };
    match outcome {
        TxnEndOutcome::Ended {
            queue_id,
            queue_offset: None,
        } if commit => Err(ApiError::FailedPrecondition(format!(
            "transaction {id} is committed but its message was dropped: its topic or queue {queue_id} was deleted \
             after the half message was stored"
        ))),
        TxnEndOutcome::Ended { queue_id, queue_offset } => Ok(pb::EndTransactionResponse {
            already_ended: false,
            queue_id,
            queue_offset: queue_offset.unwrap_or(0),
        }),
        TxnEndOutcome::AlreadyEnded { committed, .. } if committed == commit => Ok(pb::EndTransactionResponse {
            already_ended: true,
            ..Default::default()
        }),
        TxnEndOutcome::AlreadyEnded { committed, source } => {
            let how = match source {
                TxnEndSource::Exhausted => " by the broker after its maximum checks went unanswered",
                TxnEndSource::Check => " by a check-back answer",
                TxnEndSource::Client => "",
            };
            Err(ApiError::FailedPrecondition(format!(
                "transaction {id} cannot be {}: it was already {}{how}",
                word(commit),
                word(committed)
            )))
        }
        TxnEndOutcome::Unknown => Err(ApiError::NotFound(format!(
            "transaction {id} is not pending and not among the recently ended ones"
        ))),
    }
}

/// ListTransactions, from this replica's applied state.
pub fn list(group: &GroupHandle, req: pb::ListTransactionsRequest) -> Result<pb::ListTransactionsResponse, ApiError> {
    if !req.producer_group.is_empty() {
        validate::producer_group_name(&req.producer_group)?;
    }
    let max = match req.max_transactions {
        0 => 100,
        n => (n as usize).min(MAX_LIST),
    };
    let filter = (!req.producer_group.is_empty()).then_some(req.producer_group.as_str());
    let (pending, totals, count) = group
        .store()
        .with_txn(|t| (t.list(filter, max), t.totals(), t.pending_count()));
    Ok(pb::ListTransactionsResponse {
        broker_group: group.group().to_owned(),
        transactions: pending
            .into_iter()
            .map(|(id, p)| pb::PendingTransaction {
                transaction_id: convert::message_id(group.group(), id.raft_index, id.batch_pos),
                producer_group: p.producer_group,
                topic: p.topic,
                queue_id: p.queue_id,
                store_timestamp_ms: p.store_timestamp_ms,
                check_times: p.checks,
                next_check_ms: p.next_check_ms,
                keys: p.keys,
            })
            .collect(),
        pending: count as u64,
        committed: totals.committed,
        rolled_back: totals.rolled_back,
        rolled_back_unresolved: totals.rolled_back_unresolved,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gives_up_after_the_maximum_checks() {
        assert_eq!(decide(0, 15), Due::Check);
        assert_eq!(decide(14, 15), Due::Check);
        assert_eq!(decide(15, 15), Due::GiveUp);
    }

    #[test]
    fn ending_twice_the_same_way_is_ok_the_other_way_names_the_first() {
        let again = TxnEndOutcome::AlreadyEnded {
            committed: true,
            source: TxnEndSource::Client,
        };
        assert!(end_response("X", true, again).unwrap().already_ended);
        let exhausted = TxnEndOutcome::AlreadyEnded {
            committed: false,
            source: TxnEndSource::Exhausted,
        };
        let err = end_response("X", true, exhausted).unwrap_err().to_string();
        assert!(
            err.contains("already rolled back by the broker after its maximum checks"),
            "{err}"
        );
        assert!(matches!(
            end_response("X", true, TxnEndOutcome::Unknown),
            Err(ApiError::NotFound(_))
        ));
    }

    #[test]
    fn a_transaction_id_must_name_this_group() {
        let id = convert::message_id("g1", 42, 0);
        assert_eq!(
            parse_txn_id("g1", &id).unwrap(),
            TxnId {
                raft_index: 42,
                batch_pos: 0
            }
        );
        assert!(matches!(parse_txn_id("g2", &id), Err(ApiError::NotFound(_))));
        assert!(matches!(parse_txn_id("g1", "nope"), Err(ApiError::InvalidArgument(_))));
    }
}
