//! The idempotent producer's memory: per producer id, the outcome of its last
//! sends by sequence number, so a retried send (same producer id and sequence)
//! is answered with the original result instead of being stored again. It is
//! state-machine state: replicated, carried in snapshots, reloaded on restart, so
//! a retry after a leader failover is recognised too.
//!
//! Bounded: each producer keeps its last [`DEDUP_WINDOW`] sends (the most
//! recently stored, whatever their numbers); a producer
//! not heard from for [`DEDUP_IDLE_MS`] (by the entries' store times, so every
//! replica forgets it at the same entry) is forgotten, and past
//! [`MAX_PRODUCERS`] the least recently seen one is. Fixed constants rather than
//! node settings: every replica must decide identically.
//!
//! Rows (column family `dedup`): `S producer 0 sequence_be64` -> outcome;
//! `L producer` -> last store time (le64).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io;

use rocksdb::WriteBatch;

use crate::state_machine::{SmState, rocks_io};

pub(crate) const CF_DEDUP: &str = "dedup";
/// Sequences remembered per producer: more than a producer keeps in flight.
pub const DEDUP_WINDOW: usize = 4096;
/// A producer silent this long (by store time) is forgotten.
pub const DEDUP_IDLE_MS: u64 = 10 * 60 * 1000;
/// Producers remembered at once.
pub const MAX_PRODUCERS: usize = 4096;
/// Longest producer id.
pub const MAX_PRODUCER_ID_LEN: usize = 128;

/// What a send stored: enough to answer a retry exactly as the first attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    pub raft_index: u64,
    pub queue_id: u32,
    pub first_offset: u64,
    pub count: u32,
    /// Delayed messages: no offsets yet.
    pub scheduled: bool,
    /// A transactional send's half message: no offsets until committed.
    pub half: bool,
}

impl Outcome {
    fn encode(&self) -> [u8; 25] {
        let mut b = [0u8; 25];
        b[0..8].copy_from_slice(&self.raft_index.to_le_bytes());
        b[8..12].copy_from_slice(&self.queue_id.to_le_bytes());
        b[12..20].copy_from_slice(&self.first_offset.to_le_bytes());
        b[20..24].copy_from_slice(&self.count.to_le_bytes());
        // One kind byte: 0 appended, 1 scheduled, 2 half message.
        b[24] = if self.half { 2 } else { u8::from(self.scheduled) };
        b
    }

    fn decode(v: &[u8]) -> Option<Outcome> {
        if v.len() != 25 {
            return None;
        }
        Some(Outcome {
            raft_index: u64::from_le_bytes(v[0..8].try_into().ok()?),
            queue_id: u32::from_le_bytes(v[8..12].try_into().ok()?),
            first_offset: u64::from_le_bytes(v[12..20].try_into().ok()?),
            count: u32::from_le_bytes(v[20..24].try_into().ok()?),
            scheduled: v[24] == 1,
            half: v[24] == 2,
        })
    }
}

#[derive(Debug, Default)]
struct Window {
    last_ms: u64,
    sends: BTreeMap<u64, Outcome>,
    /// (raft index of the outcome, sequence): the window forgets the send stored
    /// longest ago, not the lowest number, so a "sequence" may be any 64-bit key
    /// unique per send: the RocketMQ 5 gateway (#10) keys on a hash of the SDK's
    /// client-made message id, which its retries repeat.
    order: BTreeSet<(u64, u64)>,
}

/// Every remembered producer.
#[derive(Debug, Default)]
pub(crate) struct Dedup {
    producers: HashMap<String, Window>,
    /// (last store time, producer): who to forget first.
    by_last: BTreeSet<(u64, String)>,
}

fn seq_key(producer: &str, sequence: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(producer.len() + 10);
    k.push(b'S');
    k.extend_from_slice(producer.as_bytes());
    k.push(0);
    k.extend_from_slice(&sequence.to_be_bytes());
    k
}

fn last_key(producer: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(producer.len() + 1);
    k.push(b'L');
    k.extend_from_slice(producer.as_bytes());
    k
}

impl Dedup {
    pub fn load(state: &SmState) -> io::Result<Dedup> {
        let mut d = Dedup::default();
        let bad = |k: &[u8]| io::Error::new(io::ErrorKind::InvalidData, format!("dedup row key {k:?}"));
        for item in state.db.iterator_cf(state.cf(CF_DEDUP), rocksdb::IteratorMode::Start) {
            let (k, v) = item.map_err(rocks_io("scan dedup state"))?;
            match k.first() {
                Some(b'S') => {
                    let end = k.iter().position(|&b| b == 0).ok_or_else(|| bad(&k))?;
                    let producer = String::from_utf8(k[1..end].to_vec()).map_err(|_| bad(&k))?;
                    let seq = u64::from_be_bytes(k[end + 1..].try_into().map_err(|_| bad(&k))?);
                    let outcome = Outcome::decode(&v).ok_or_else(|| bad(&k))?;
                    let w = d.producers.entry(producer).or_default();
                    w.order.insert((outcome.raft_index, seq));
                    w.sends.insert(seq, outcome);
                }
                Some(b'L') => {
                    let producer = String::from_utf8(k[1..].to_vec()).map_err(|_| bad(&k))?;
                    let last = u64::from_le_bytes(v.as_ref().try_into().map_err(|_| bad(&k))?);
                    d.producers.entry(producer).or_default().last_ms = last;
                }
                _ => return Err(bad(&k)),
            }
        }
        d.by_last = d.producers.iter().map(|(p, w)| (w.last_ms, p.clone())).collect();
        Ok(d)
    }

    pub fn lookup(&self, producer: &str, sequence: u64) -> Option<Outcome> {
        self.producers.get(producer)?.sends.get(&sequence).copied()
    }

    /// Remembers a stored send, then forgets what the bounds say to.
    pub fn record(
        &mut self,
        state: &SmState,
        wb: &mut WriteBatch,
        producer: &str,
        sequence: u64,
        now_ms: u64,
        outcome: Outcome,
    ) {
        let cf = state.cf(CF_DEDUP);
        let w = self.producers.entry(producer.to_owned()).or_default();
        self.by_last.remove(&(w.last_ms, producer.to_owned()));
        w.last_ms = w.last_ms.max(now_ms);
        self.by_last.insert((w.last_ms, producer.to_owned()));
        wb.put_cf(cf, last_key(producer), w.last_ms.to_le_bytes());
        if let Some(prev) = w.sends.insert(sequence, outcome) {
            w.order.remove(&(prev.raft_index, sequence));
        }
        w.order.insert((outcome.raft_index, sequence));
        wb.put_cf(cf, seq_key(producer, sequence), outcome.encode());
        while w.sends.len() > DEDUP_WINDOW {
            let Some((_, old)) = w.order.pop_first() else { break };
            w.sends.remove(&old);
            wb.delete_cf(cf, seq_key(producer, old));
        }
        // Idle producers, then the least recently seen past the cap.
        while let Some((last, p)) = self.by_last.first().cloned() {
            let idle = last.saturating_add(DEDUP_IDLE_MS) < now_ms;
            if !idle && self.by_last.len() <= MAX_PRODUCERS {
                break;
            }
            self.by_last.pop_first();
            if let Some(gone) = self.producers.remove(&p) {
                for seq in gone.sends.keys() {
                    wb.delete_cf(cf, seq_key(&p, *seq));
                }
                wb.delete_cf(cf, last_key(&p));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_round_trip_and_keys_sort_by_sequence() {
        let o = Outcome {
            raft_index: 9,
            queue_id: 2,
            first_offset: 77,
            count: 3,
            scheduled: false,
            half: false,
        };
        assert_eq!(Outcome::decode(&o.encode()), Some(o));
        assert!(Outcome::decode(&[1, 2]).is_none());
        assert!(seq_key("p", 255) < seq_key("p", 256));
    }
}
