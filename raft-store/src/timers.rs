//! Timers as replicated state: delayed messages and push-consumer retries waiting
//! for their time, kept in RocksDB ordered by due time, and the apply side of
//! firing them. What is due and when to fire is the broker leader's decision
//! (`broker/src/timers.rs`); this module only stores, finds and fires.
//!
//! Rows (column family `timer`):
//! * `T | due_be64 | created_index_be64 | slot_be32` -> [`TimerTarget`]: a pending
//!   timer. Sorted by due time, so finding what is due reads only the due rows and
//!   start-up never scans pending timers.
//! * `F | raft_index_be64 | batch_pos_be32` -> queue offset: where a delayed
//!   message landed when its timer fired, for lookups by message id (its
//!   ConsumeQueue row is out of Raft-index order in its queue).
//!
//! Firing writes a ConsumeQueue row pointing at the message's original record, so
//! the message keeps its id, body and properties and is never copied.

use std::collections::HashMap;
use std::io;

use rocksdb::WriteBatch;

use crate::command::{MessageRef, TimerKey};
use crate::state_machine::{SmState, rocks_io};

pub(crate) const CF_TIMER: &str = "timer";
const PENDING: u8 = b'T';
const FIRED: u8 = b'F';
const KEY_LEN: usize = 1 + 8 + 8 + 4;

/// Where a timer's message goes when it fires.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TimerTarget {
    pub topic: String,
    pub queue_id: u32,
    pub message: MessageRef,
    /// Carried by the ConsumeQueue row the firing writes (0 for a delayed message).
    pub reconsume_times: u32,
    /// A delayed message going to its own queue (not a retry): record where it
    /// lands, for lookups by id.
    pub delayed_original: bool,
}

pub(crate) fn key(k: &TimerKey) -> [u8; KEY_LEN] {
    let mut b = [0u8; KEY_LEN];
    b[0] = PENDING;
    b[1..9].copy_from_slice(&k.due_ms.to_be_bytes());
    b[9..17].copy_from_slice(&k.created_index.to_be_bytes());
    b[17..21].copy_from_slice(&k.slot.to_be_bytes());
    b
}

fn parse_key(b: &[u8]) -> Option<TimerKey> {
    if b.len() != KEY_LEN || b[0] != PENDING {
        return None;
    }
    Some(TimerKey {
        due_ms: u64::from_be_bytes(b[1..9].try_into().ok()?),
        created_index: u64::from_be_bytes(b[9..17].try_into().ok()?),
        slot: u32::from_be_bytes(b[17..21].try_into().ok()?),
    })
}

pub(crate) fn fired_key(raft_index: u64, batch_pos: u32) -> [u8; 13] {
    let mut b = [0u8; 13];
    b[0] = FIRED;
    b[1..9].copy_from_slice(&raft_index.to_be_bytes());
    b[9..13].copy_from_slice(&batch_pos.to_be_bytes());
    b
}

impl TimerTarget {
    fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(33 + self.topic.len());
        v.extend_from_slice(&self.queue_id.to_le_bytes());
        v.extend_from_slice(&self.message.raft_index.to_le_bytes());
        v.extend_from_slice(&self.message.batch_pos.to_le_bytes());
        v.extend_from_slice(&self.message.size.to_le_bytes());
        v.extend_from_slice(&self.message.tag_hash.to_le_bytes());
        v.extend_from_slice(&self.reconsume_times.to_le_bytes());
        v.push(u8::from(self.delayed_original));
        v.extend_from_slice(self.topic.as_bytes());
        v
    }

    fn decode(v: &[u8]) -> io::Result<TimerTarget> {
        let bad = || io::Error::new(io::ErrorKind::InvalidData, format!("timer row of {} bytes", v.len()));
        if v.len() < 33 {
            return Err(bad());
        }
        let u32_at = |at: usize| v[at..at + 4].try_into().map(u32::from_le_bytes).map_err(|_| bad());
        let u64_at = |at: usize| v[at..at + 8].try_into().map(u64::from_le_bytes).map_err(|_| bad());
        Ok(TimerTarget {
            queue_id: u32_at(0)?,
            message: MessageRef {
                raft_index: u64_at(4)?,
                batch_pos: u32_at(12)?,
                size: u32_at(16)?,
                tag_hash: u64_at(20)?,
            },
            reconsume_times: u32_at(28)?,
            delayed_original: v[32] != 0,
            topic: String::from_utf8(v[33..].to_vec()).map_err(|_| bad())?,
        })
    }
}

/// Timers added or fired by entries of the apply batch in progress: RocksDB does
/// not see the batch's writes until it is written, and a lagging follower can
/// apply a delayed send and the firing of its timer in one batch.
#[derive(Default)]
pub(crate) struct Overlay(HashMap<TimerKey, Option<TimerTarget>>);

impl Overlay {
    pub fn clear(&mut self) {
        self.0.clear();
    }

    pub fn schedule(&mut self, state: &SmState, wb: &mut WriteBatch, k: TimerKey, target: TimerTarget) {
        wb.put_cf(state.cf(CF_TIMER), key(&k), target.encode());
        self.0.insert(k, Some(target));
    }

    /// Removes and returns the timer if it is still pending.
    pub fn take(&mut self, state: &SmState, wb: &mut WriteBatch, k: &TimerKey) -> io::Result<Option<TimerTarget>> {
        let target = match self.0.get(k) {
            Some(t) => t.clone(),
            None => state
                .db
                .get_cf(state.cf(CF_TIMER), key(k))
                .map_err(rocks_io("read timer"))?
                .map(|v| TimerTarget::decode(&v))
                .transpose()?,
        };
        if target.is_some() {
            wb.delete_cf(state.cf(CF_TIMER), key(k));
            self.0.insert(*k, None);
        }
        Ok(target)
    }
}

/// Up to `limit` pending timers due at or before `now_ms`, earliest first,
/// scanning from `from_due_ms` (a bound below which the caller knows nothing is
/// pending, so it can step over the tombstones of fired timers).
pub(crate) fn due(state: &SmState, from_due_ms: u64, now_ms: u64, limit: usize) -> io::Result<Vec<TimerKey>> {
    let start = key(&TimerKey {
        due_ms: from_due_ms,
        created_index: 0,
        slot: 0,
    });
    let mut out = Vec::new();
    let iter = state.db.iterator_cf(
        state.cf(CF_TIMER),
        rocksdb::IteratorMode::From(&start, rocksdb::Direction::Forward),
    );
    for item in iter {
        let (k, _) = item.map_err(rocks_io("scan timers"))?;
        let Some(t) = parse_key(&k) else { break };
        if t.due_ms > now_ms || out.len() >= limit {
            break;
        }
        out.push(t);
    }
    Ok(out)
}

/// The due time of the earliest pending timer at or after `from_due_ms`.
pub(crate) fn next_due(state: &SmState, from_due_ms: u64) -> io::Result<Option<u64>> {
    Ok(due(state, from_due_ms, u64::MAX, 1)?.first().map(|t| t.due_ms))
}

/// Retention: deletes pending timers whose message's record is at or below
/// `upto` (their message is gone) and the landing offsets of delayed messages
/// stored there. Scans the pending timers, which the broker bounds; the landing
/// rows go by one range, being keyed by the message's entry. Returns how many
/// timers were dropped.
pub(crate) fn drop_through(state: &SmState, wb: &mut WriteBatch, upto: u64) -> io::Result<u64> {
    let cf = state.cf(CF_TIMER);
    let mut dropped = 0;
    let iter = state
        .db
        .iterator_cf(cf, rocksdb::IteratorMode::From(&[PENDING], rocksdb::Direction::Forward));
    for item in iter {
        let (k, v) = item.map_err(rocks_io("scan timers"))?;
        if parse_key(&k).is_none() {
            break;
        }
        // The target's message entry: bytes 4..12 (see `TimerTarget::encode`).
        let index = v
            .get(4..12)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_le_bytes)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, format!("timer row of {} bytes", v.len())))?;
        if index <= upto {
            wb.delete_cf(cf, &k);
            dropped += 1;
        }
    }
    wb.delete_range_cf(cf, fired_key(0, 0), fired_key(upto.saturating_add(1), 0));
    Ok(dropped)
}

/// Where a fired delayed message landed in its queue.
pub(crate) fn fired_offset(state: &SmState, raft_index: u64, batch_pos: u32) -> io::Result<Option<u64>> {
    match state
        .db
        .get_cf(state.cf(CF_TIMER), fired_key(raft_index, batch_pos))
        .map_err(rocks_io("read fired timer"))?
    {
        Some(v) => Ok(Some(u64::from_le_bytes(v.as_slice().try_into().map_err(|_| {
            io::Error::new(io::ErrorKind::InvalidData, "fired-timer row is not 8 bytes")
        })?))),
        None => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_sort_by_due_time_then_creation() {
        let k = |due_ms, created_index, slot| {
            key(&TimerKey {
                due_ms,
                created_index,
                slot,
            })
        };
        assert!(k(1, 9, 9) < k(2, 0, 0));
        assert!(k(256, 0, 0) > k(255, u64::MAX, u32::MAX));
        let t = TimerKey {
            due_ms: 77,
            created_index: 5,
            slot: 3,
        };
        assert_eq!(parse_key(&key(&t)), Some(t));
    }

    #[test]
    fn target_round_trips_and_short_rows_are_errors() {
        let t = TimerTarget {
            topic: "%RETRY%g".into(),
            queue_id: 0,
            message: MessageRef {
                raft_index: 12,
                batch_pos: 3,
                size: 100,
                tag_hash: 42,
            },
            reconsume_times: 2,
            delayed_original: false,
        };
        assert_eq!(TimerTarget::decode(&t.encode()).unwrap(), t);
        assert!(TimerTarget::decode(&[1, 2, 3]).is_err());
    }
}
