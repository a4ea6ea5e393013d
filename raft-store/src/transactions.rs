//! Transactions as replicated state: pending half messages with their check-back
//! schedule, the outcomes of recently ended transactions (so a retried or late
//! EndTransaction gets a precise answer), and totals. What is due for a check and
//! when to give up is the broker leader's decision (`broker/src/transactions.rs`);
//! this module only records it, so every replica agrees and a new leader resumes
//! where the old one stopped.
//!
//! A half message is an ordinary CommitLog record with no ConsumeQueue row and no
//! key-index rows; committing writes both, pointing at that record (the message
//! keeps its id), and a rollback only forgets it.
//!
//! Rows (column family `txn`), JSON values (few and small next to messages):
//! * `P | raft_index_be64 | batch_pos_be32` -> [`PendingTxn`];
//! * `E | raft_index_be64 | batch_pos_be32` -> how it ended;
//! * `T` -> [`TxnTotals`].
//!
//! Everything is also held in memory (bounded: the broker caps pending half
//! messages, and [`MAX_ENDED_REMEMBERED`] caps outcomes), loaded at open and on
//! snapshot install.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io;

use rocksdb::WriteBatch;
use serde::{Deserialize, Serialize};

use crate::command::{MessageRef, TxnEndSource, TxnId};
use crate::state_machine::{SmState, rocks_io};

pub(crate) const CF_TXN: &str = "txn";
/// Ended transactions whose outcome is remembered; the oldest is forgotten first.
/// A fixed constant, not a setting: every replica must forget the same ones.
pub const MAX_ENDED_REMEMBERED: usize = 100_000;

const PENDING: u8 = b'P';
const ENDED: u8 = b'E';
const TOTALS: &[u8] = b"T";

/// A half message waiting for its outcome.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingTxn {
    pub producer_group: String,
    pub topic: String,
    pub queue_id: u32,
    pub message: MessageRef,
    /// Written to the key index only when committed.
    pub keys: Vec<String>,
    pub store_timestamp_ms: u64,
    /// Checks issued so far.
    pub checks: u32,
    pub next_check_ms: u64,
}

/// How a transaction ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndedTxn {
    pub committed: bool,
    pub source: TxnEndSource,
    /// The entry that ended it: outcomes are forgotten in this order.
    pub end_index: u64,
}

/// Counts since the broker group was created.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TxnTotals {
    pub committed: u64,
    pub rolled_back: u64,
    /// Rollbacks the leader made after the maximum checks went unanswered.
    pub rolled_back_unresolved: u64,
}

/// What ending one transaction found.
#[derive(Debug)]
pub(crate) enum EndFound {
    /// It was pending, and now is ended.
    Pending(PendingTxn),
    AlreadyEnded(EndedTxn),
    Unknown,
}

/// Every pending and remembered transaction of the broker group.
#[derive(Debug, Default)]
pub struct TxnState {
    /// By id, i.e. in the order they were stored: listing the oldest is cheap.
    pending: BTreeMap<TxnId, PendingTxn>,
    /// (next check time, id): what is due first.
    by_check: BTreeSet<(u64, TxnId)>,
    ended: HashMap<TxnId, EndedTxn>,
    /// (end index, id): what to forget first.
    ended_order: BTreeSet<(u64, TxnId)>,
    totals: TxnTotals,
}

fn key(kind: u8, id: TxnId) -> [u8; 13] {
    let mut k = [0u8; 13];
    k[0] = kind;
    k[1..9].copy_from_slice(&id.raft_index.to_be_bytes());
    k[9..13].copy_from_slice(&id.batch_pos.to_be_bytes());
    k
}

fn parse_id(k: &[u8]) -> Option<TxnId> {
    if k.len() != 13 {
        return None;
    }
    Some(TxnId {
        raft_index: u64::from_be_bytes(k[1..9].try_into().ok()?),
        batch_pos: u32::from_be_bytes(k[9..13].try_into().ok()?),
    })
}

fn json<T: Serialize>(v: &T) -> Vec<u8> {
    // Plain structs of strings and integers cannot fail to serialize.
    serde_json::to_vec(v).expect("transaction row serializes")
}

impl TxnState {
    pub(crate) fn load(state: &SmState) -> io::Result<TxnState> {
        let mut t = TxnState::default();
        let bad = |k: &[u8], e: String| io::Error::new(io::ErrorKind::InvalidData, format!("txn row {k:?}: {e}"));
        for item in state.db.iterator_cf(state.cf(CF_TXN), rocksdb::IteratorMode::Start) {
            let (k, v) = item.map_err(rocks_io("scan transactions"))?;
            if k.as_ref() == TOTALS {
                t.totals = serde_json::from_slice(&v).map_err(|e| bad(&k, e.to_string()))?;
                continue;
            }
            let id = parse_id(&k).ok_or_else(|| bad(&k, "bad key".into()))?;
            match k[0] {
                PENDING => {
                    let p: PendingTxn = serde_json::from_slice(&v).map_err(|e| bad(&k, e.to_string()))?;
                    t.by_check.insert((p.next_check_ms, id));
                    t.pending.insert(id, p);
                }
                ENDED => {
                    let e: EndedTxn = serde_json::from_slice(&v).map_err(|e| bad(&k, e.to_string()))?;
                    t.ended_order.insert((e.end_index, id));
                    t.ended.insert(id, e);
                }
                _ => return Err(bad(&k, "unknown row kind".into())),
            }
        }
        Ok(t)
    }

    pub(crate) fn add(&mut self, state: &SmState, wb: &mut WriteBatch, id: TxnId, p: PendingTxn) {
        wb.put_cf(state.cf(CF_TXN), key(PENDING, id), json(&p));
        self.by_check.insert((p.next_check_ms, id));
        self.pending.insert(id, p);
    }

    /// Ends `id` if it is pending, recording the outcome; else says what it found.
    pub(crate) fn end(
        &mut self,
        state: &SmState,
        wb: &mut WriteBatch,
        id: TxnId,
        committed: bool,
        source: TxnEndSource,
        end_index: u64,
    ) -> EndFound {
        let Some(p) = self.pending.remove(&id) else {
            return match self.ended.get(&id) {
                Some(e) => EndFound::AlreadyEnded(*e),
                None => EndFound::Unknown,
            };
        };
        let cf = state.cf(CF_TXN);
        self.by_check.remove(&(p.next_check_ms, id));
        wb.delete_cf(cf, key(PENDING, id));
        let e = EndedTxn {
            committed,
            source,
            end_index,
        };
        wb.put_cf(cf, key(ENDED, id), json(&e));
        self.ended.insert(id, e);
        self.ended_order.insert((end_index, id));
        while self.ended.len() > MAX_ENDED_REMEMBERED {
            let Some((_, old)) = self.ended_order.pop_first() else {
                break;
            };
            self.ended.remove(&old);
            wb.delete_cf(cf, key(ENDED, old));
        }
        if committed {
            self.totals.committed += 1;
        } else {
            self.totals.rolled_back += 1;
            if source == TxnEndSource::Exhausted {
                self.totals.rolled_back_unresolved += 1;
            }
        }
        wb.put_cf(cf, TOTALS, json(&self.totals));
        EndFound::Pending(p)
    }

    /// Counts one more check of each still-pending id and moves its next check.
    pub(crate) fn checked(
        &mut self,
        state: &SmState,
        wb: &mut WriteBatch,
        ids: &[TxnId],
        next_check_ms: u64,
    ) -> Vec<(TxnId, u32)> {
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            let Some(p) = self.pending.get_mut(id) else { continue };
            self.by_check.remove(&(p.next_check_ms, *id));
            p.checks += 1;
            p.next_check_ms = next_check_ms;
            self.by_check.insert((next_check_ms, *id));
            wb.put_cf(state.cf(CF_TXN), key(PENDING, *id), json(&*p));
            out.push((*id, p.checks));
        }
        out
    }

    /// Retention: forgets pending half messages stored at or below `upto`
    /// (their record is gone, so they can never be committed). Returns how many.
    pub(crate) fn drop_through(&mut self, state: &SmState, wb: &mut WriteBatch, upto: u64) -> u64 {
        let keep = self.pending.split_off(&TxnId {
            raft_index: upto.saturating_add(1),
            batch_pos: 0,
        });
        let gone = std::mem::replace(&mut self.pending, keep);
        for (id, p) in &gone {
            self.by_check.remove(&(p.next_check_ms, *id));
            wb.delete_cf(state.cf(CF_TXN), key(PENDING, *id));
        }
        gone.len() as u64
    }

    pub fn pending_count(&self) -> usize {
        self.pending.len()
    }

    pub fn pending(&self, id: &TxnId) -> Option<&PendingTxn> {
        self.pending.get(id)
    }

    pub fn ended(&self, id: &TxnId) -> Option<EndedTxn> {
        self.ended.get(id).copied()
    }

    pub fn totals(&self) -> TxnTotals {
        self.totals
    }

    /// Up to `limit` pending transactions whose next check is due at `now_ms`,
    /// earliest first.
    pub fn due(&self, now_ms: u64, limit: usize) -> Vec<(TxnId, PendingTxn)> {
        self.by_check
            .iter()
            .take_while(|(due, _)| *due <= now_ms)
            .take(limit)
            .filter_map(|(_, id)| self.pending.get(id).map(|p| (*id, p.clone())))
            .collect()
    }

    /// When the earliest pending check is due.
    pub fn next_check_ms(&self) -> Option<u64> {
        self.by_check.first().map(|(due, _)| *due)
    }

    /// Pending transactions already checked at least once whose next check is
    /// not due yet: a check of each may have been in flight when the previous
    /// leader stopped.
    pub fn outstanding(&self, now_ms: u64, limit: usize) -> Vec<(TxnId, PendingTxn)> {
        self.by_check
            .range((now_ms.saturating_add(1), TxnId::MIN)..)
            .filter_map(|(_, id)| self.pending.get(id).filter(|p| p.checks > 0).map(|p| (*id, p.clone())))
            .take(limit)
            .collect()
    }

    /// Up to `max` pending transactions, oldest first, optionally of one producer group.
    pub fn list(&self, producer_group: Option<&str>, max: usize) -> Vec<(TxnId, PendingTxn)> {
        self.pending
            .iter()
            .filter(|(_, p)| producer_group.is_none_or(|g| p.producer_group == g))
            .take(max)
            .map(|(id, p)| (*id, p.clone()))
            .collect()
    }
}

impl TxnId {
    const MIN: TxnId = TxnId {
        raft_index: 0,
        batch_pos: 0,
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip() {
        let id = TxnId {
            raft_index: 77,
            batch_pos: 3,
        };
        assert_eq!(parse_id(&key(PENDING, id)), Some(id));
        assert!(
            key(PENDING, id)
                < key(
                    PENDING,
                    TxnId {
                        raft_index: 78,
                        batch_pos: 0
                    }
                )
        );
        assert_eq!(parse_id(b"T"), None);
    }
}
