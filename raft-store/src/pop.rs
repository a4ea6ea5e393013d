//! POP consumption as replicated state: per consumer group and message queue, the
//! hand-out cursor and the in-flight messages (invisible deadline, delivery
//! attempt, epoch), plus consumer-group configs. Held in memory (bounded by the
//! broker's per-group in-flight cap) and mirrored in RocksDB, so the leader
//! decides a receive without a scan and a restart or snapshot install reloads it.
//!
//! A queue's consumed prefix ("progress") is implicit: every offset below the
//! cursor that has no in-flight row is done (acked, or filtered out). Which
//! messages to hand out is the leader's decision (`broker/src/pop.rs`); the apply
//! side here re-checks each pick against the state at its index, so concurrent
//! receives or a deposed leader's stale decision can never hand a message out
//! twice or resurrect an acked one.
//!
//! Rows (column family `pop`): `C group 0 topic 0 queue_be32` -> cursor (le64);
//! `I group 0 topic 0 queue_be32 offset_be64` -> deadline le64, attempt le32,
//! epoch le64. Column family `cgroup`: name -> [`ConsumerGroupConfig`] JSON.

use std::collections::{BTreeMap, HashMap};
use std::io;

use rocksdb::WriteBatch;

use crate::command::{ConsumerGroupConfig, MessageRef, PopPick};
use crate::state_machine::{SmState, rocks_io};

pub(crate) const CF_POP: &str = "pop";
pub(crate) const CF_CGROUP: &str = "cgroup";

/// RocketMQ's default maximum of failed deliveries before the dead-letter queue.
pub const DEFAULT_MAX_RECONSUME_TIMES: u32 = 16;
/// RocketMQ's retry schedule: the n-th retry waits the (n+2)-th delay level.
pub const DEFAULT_RETRY_DELAYS_MS: [u64; 16] = [
    10_000, 30_000, 60_000, 120_000, 180_000, 240_000, 300_000, 360_000, 420_000, 480_000, 540_000, 600_000, 1_200_000,
    1_800_000, 3_600_000, 7_200_000,
];

impl ConsumerGroupConfig {
    /// The settings of a group never configured.
    pub fn default_for(name: &str) -> ConsumerGroupConfig {
        ConsumerGroupConfig {
            name: name.to_owned(),
            fifo: false,
            max_reconsume_times: DEFAULT_MAX_RECONSUME_TIMES,
            retry_delays_ms: DEFAULT_RETRY_DELAYS_MS.to_vec(),
        }
    }

    /// Backoff before the `reconsume`-th retry (1-based); the last delay repeats.
    pub fn retry_delay_ms(&self, reconsume: u32) -> u64 {
        let delays = if self.retry_delays_ms.is_empty() {
            &DEFAULT_RETRY_DELAYS_MS[..]
        } else {
            &self.retry_delays_ms[..]
        };
        let i = (reconsume.max(1) as usize - 1).min(delays.len() - 1);
        delays[i]
    }
}

/// One handed-out message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InFlight {
    pub deadline_ms: u64,
    /// 1 on the first delivery.
    pub attempt: u32,
    /// Index of the entry that made this delivery (or last changed its deadline):
    /// a receipt handle names it, so a handle from an earlier delivery is stale.
    pub epoch: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PopQueue {
    /// Next offset never handed out.
    pub cursor: u64,
    pub inflight: BTreeMap<u64, InFlight>,
}

impl PopQueue {
    /// Every offset below this is done: the lowest in-flight one, or the cursor.
    pub fn progress(&self) -> u64 {
        self.inflight.keys().next().copied().unwrap_or(self.cursor)
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PopGroup {
    /// By (topic, queue).
    pub queues: BTreeMap<(String, u32), PopQueue>,
}

impl PopGroup {
    pub fn inflight(&self) -> usize {
        self.queues.values().map(|q| q.inflight.len()).sum()
    }
}

/// Every POP group's state and every consumer-group config.
#[derive(Debug, Clone, Default)]
pub struct PopState {
    pub groups: HashMap<String, PopGroup>,
    pub configs: HashMap<String, ConsumerGroupConfig>,
}

/// A message the apply moved into a dead-letter queue.
pub(crate) struct DeadLetter {
    pub group: String,
    pub message: MessageRef,
    pub reconsume_times: u32,
}

fn queue_prefix(kind: u8, group: &str, topic: &str, queue_id: u32) -> Vec<u8> {
    let mut k = Vec::with_capacity(group.len() + topic.len() + 7);
    k.push(kind);
    k.extend_from_slice(group.as_bytes());
    k.push(0);
    k.extend_from_slice(topic.as_bytes());
    k.push(0);
    k.extend_from_slice(&queue_id.to_be_bytes());
    k
}

fn inflight_key(group: &str, topic: &str, queue_id: u32, offset: u64) -> Vec<u8> {
    let mut k = queue_prefix(b'I', group, topic, queue_id);
    k.extend_from_slice(&offset.to_be_bytes());
    k
}

fn encode_inflight(f: &InFlight) -> [u8; 20] {
    let mut b = [0u8; 20];
    b[0..8].copy_from_slice(&f.deadline_ms.to_le_bytes());
    b[8..12].copy_from_slice(&f.attempt.to_le_bytes());
    b[12..20].copy_from_slice(&f.epoch.to_le_bytes());
    b
}

/// `(group, topic, queue, rest)` of a POP row key after its kind byte.
fn split_key(k: &[u8]) -> Option<(String, String, u32, &[u8])> {
    let body = k.get(1..)?;
    let g_end = body.iter().position(|&b| b == 0)?;
    let rest = &body[g_end + 1..];
    let t_end = rest.iter().position(|&b| b == 0)?;
    let q = rest.get(t_end + 1..t_end + 5)?;
    Some((
        String::from_utf8(body[..g_end].to_vec()).ok()?,
        String::from_utf8(rest[..t_end].to_vec()).ok()?,
        u32::from_be_bytes(q.try_into().ok()?),
        &rest[t_end + 5..],
    ))
}

impl PopState {
    /// Reads every POP row and group config of a state generation.
    pub(crate) fn load(state: &SmState) -> io::Result<PopState> {
        let mut s = PopState::default();
        let bad = |k: &[u8]| io::Error::new(io::ErrorKind::InvalidData, format!("POP row key {k:?}"));
        for item in state.db.iterator_cf(state.cf(CF_POP), rocksdb::IteratorMode::Start) {
            let (k, v) = item.map_err(rocks_io("scan POP state"))?;
            let (group, topic, queue_id, rest) = split_key(&k).ok_or_else(|| bad(&k))?;
            let q = s
                .groups
                .entry(group)
                .or_default()
                .queues
                .entry((topic, queue_id))
                .or_default();
            let u64_at = |at: usize| {
                v.get(at..at + 8)
                    .and_then(|b| b.try_into().ok())
                    .map(u64::from_le_bytes)
                    .ok_or_else(|| bad(&k))
            };
            match k[0] {
                b'C' => q.cursor = u64_at(0)?,
                b'I' => {
                    let offset = u64::from_be_bytes(rest.try_into().map_err(|_| bad(&k))?);
                    let attempt = v
                        .get(8..12)
                        .and_then(|b| b.try_into().ok())
                        .map(u32::from_le_bytes)
                        .ok_or_else(|| bad(&k))?;
                    q.inflight.insert(
                        offset,
                        InFlight {
                            deadline_ms: u64_at(0)?,
                            attempt,
                            epoch: u64_at(12)?,
                        },
                    );
                }
                _ => return Err(bad(&k)),
            }
        }
        for item in state.db.iterator_cf(state.cf(CF_CGROUP), rocksdb::IteratorMode::Start) {
            let (_, v) = item.map_err(rocks_io("scan consumer-group configs"))?;
            let c: ConsumerGroupConfig =
                serde_json::from_slice(&v).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
            s.configs.insert(c.name.clone(), c);
        }
        Ok(s)
    }

    pub fn config(&self, group: &str) -> ConsumerGroupConfig {
        self.configs
            .get(group)
            .cloned()
            .unwrap_or_else(|| ConsumerGroupConfig::default_for(group))
    }

    pub(crate) fn upsert_config(
        &mut self,
        state: &SmState,
        wb: &mut WriteBatch,
        c: &ConsumerGroupConfig,
    ) -> io::Result<()> {
        wb.put_cf(
            state.cf(CF_CGROUP),
            c.name.as_bytes(),
            serde_json::to_vec(c).map_err(io::Error::other)?,
        );
        self.configs.insert(c.name.clone(), c.clone());
        Ok(())
    }

    fn put_inflight(
        state: &SmState,
        wb: &mut WriteBatch,
        group: &str,
        topic: &str,
        queue: u32,
        offset: u64,
        f: &InFlight,
    ) {
        wb.put_cf(
            state.cf(CF_POP),
            inflight_key(group, topic, queue, offset),
            encode_inflight(f),
        );
    }

    fn delete_inflight(state: &SmState, wb: &mut WriteBatch, group: &str, topic: &str, queue: u32, offset: u64) {
        wb.delete_cf(state.cf(CF_POP), inflight_key(group, topic, queue, offset));
    }

    /// Applies a receive: new offsets only if the cursor is still where the leader
    /// read it, redeliveries only of the delivery the leader saw expire.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn apply_receive(
        &mut self,
        state: &SmState,
        wb: &mut WriteBatch,
        index: u64,
        group: &str,
        topic: &str,
        now_ms: u64,
        invisible_ms: u64,
        picks: &[PopPick],
        dead: &mut Vec<DeadLetter>,
    ) -> Vec<(u32, u64, u32)> {
        let deadline_ms = now_ms.saturating_add(invisible_ms);
        let mut accepted = Vec::new();
        let g = self.groups.entry(group.to_owned()).or_default();
        for pick in picks {
            let key = (topic.to_owned(), pick.queue_id);
            // A queue the group never received from starts where the leader
            // chose (its lowest retained offset).
            let fresh = !g.queues.contains_key(&key);
            let q = g.queues.entry(key).or_default();
            if fresh {
                q.cursor = pick.from_cursor;
            }
            for &(offset, epoch) in &pick.redeliver {
                if let Some(f) = q.inflight.get_mut(&offset)
                    && f.epoch == epoch
                    && f.deadline_ms <= now_ms
                {
                    f.attempt += 1;
                    f.deadline_ms = deadline_ms;
                    f.epoch = index;
                    Self::put_inflight(state, wb, group, topic, pick.queue_id, offset, f);
                    accepted.push((pick.queue_id, offset, f.attempt));
                }
            }
            for &(offset, epoch, message) in &pick.dead {
                if let Some(f) = q.inflight.get(&offset)
                    && f.epoch == epoch
                    && f.deadline_ms <= now_ms
                {
                    dead.push(DeadLetter {
                        group: group.to_owned(),
                        message,
                        reconsume_times: f.attempt,
                    });
                    q.inflight.remove(&offset);
                    Self::delete_inflight(state, wb, group, topic, pick.queue_id, offset);
                }
            }
            if q.cursor == pick.from_cursor && pick.to_cursor > pick.from_cursor {
                for &offset in &pick.new {
                    if offset < pick.from_cursor || offset >= pick.to_cursor {
                        continue;
                    }
                    let f = InFlight {
                        deadline_ms,
                        attempt: 1,
                        epoch: index,
                    };
                    q.inflight.insert(offset, f);
                    Self::put_inflight(state, wb, group, topic, pick.queue_id, offset, &f);
                    accepted.push((pick.queue_id, offset, 1));
                }
                q.cursor = pick.to_cursor;
                wb.put_cf(
                    state.cf(CF_POP),
                    queue_prefix(b'C', group, topic, pick.queue_id),
                    q.cursor.to_le_bytes(),
                );
            }
        }
        accepted
    }

    pub(crate) fn apply_ack(
        &mut self,
        state: &SmState,
        wb: &mut WriteBatch,
        group: &str,
        topic: &str,
        acks: &[(u32, u64, u64)],
    ) -> Vec<bool> {
        let Some(g) = self.groups.get_mut(group) else {
            return vec![false; acks.len()];
        };
        acks.iter()
            .map(|&(queue_id, offset, epoch)| {
                let Some(q) = g.queues.get_mut(&(topic.to_owned(), queue_id)) else {
                    return false;
                };
                if q.inflight.get(&offset).is_some_and(|f| f.epoch == epoch) {
                    q.inflight.remove(&offset);
                    Self::delete_inflight(state, wb, group, topic, queue_id, offset);
                    true
                } else {
                    false
                }
            })
            .collect()
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn apply_change_invisible(
        &mut self,
        state: &SmState,
        wb: &mut WriteBatch,
        index: u64,
        group: &str,
        topic: &str,
        queue_id: u32,
        offset: u64,
        epoch: u64,
        deadline_ms: u64,
    ) -> bool {
        let Some(f) = self
            .groups
            .get_mut(group)
            .and_then(|g| g.queues.get_mut(&(topic.to_owned(), queue_id)))
            .and_then(|q| q.inflight.get_mut(&offset))
            .filter(|f| f.epoch == epoch)
        else {
            return false;
        };
        f.deadline_ms = deadline_ms;
        f.epoch = index;
        let f = *f;
        Self::put_inflight(state, wb, group, topic, queue_id, offset, &f);
        true
    }

    /// Removes one delivery for the dead-letter queue; its attempt count, or
    /// `None` when the epoch is stale.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn apply_dead_letter(
        &mut self,
        state: &SmState,
        wb: &mut WriteBatch,
        group: &str,
        topic: &str,
        queue_id: u32,
        offset: u64,
        epoch: u64,
    ) -> Option<u32> {
        let q = self
            .groups
            .get_mut(group)
            .and_then(|g| g.queues.get_mut(&(topic.to_owned(), queue_id)))?;
        let attempt = q.inflight.get(&offset).filter(|f| f.epoch == epoch)?.attempt;
        q.inflight.remove(&offset);
        Self::delete_inflight(state, wb, group, topic, queue_id, offset);
        Some(attempt)
    }

    /// Retention: in each queue whose rows below `mins[(topic, queue)]` were
    /// dropped, forgets deliveries of those offsets and moves the hand-out
    /// cursor up to the new minimum. Returns how many deliveries were dropped.
    pub(crate) fn retain(&mut self, state: &SmState, wb: &mut WriteBatch, mins: &HashMap<(String, u32), u64>) -> u64 {
        let mut dropped = 0;
        for (group, g) in &mut self.groups {
            for ((topic, queue), q) in &mut g.queues {
                let Some(&min) = mins.get(&(topic.clone(), *queue)) else {
                    continue;
                };
                let keep = q.inflight.split_off(&min);
                for &offset in q.inflight.keys() {
                    Self::delete_inflight(state, wb, group, topic, *queue, offset);
                    dropped += 1;
                }
                q.inflight = keep;
                if q.cursor < min {
                    q.cursor = min;
                    wb.put_cf(
                        state.cf(CF_POP),
                        queue_prefix(b'C', group, topic, *queue),
                        q.cursor.to_le_bytes(),
                    );
                }
            }
        }
        dropped
    }

    /// Forgets a deleted topic's POP state.
    pub(crate) fn delete_topic(&mut self, state: &SmState, wb: &mut WriteBatch, topic: &str) {
        for (group, g) in &mut self.groups {
            g.queues.retain(|(t, q), pq| {
                if t != topic {
                    return true;
                }
                for &offset in pq.inflight.keys() {
                    Self::delete_inflight(state, wb, group, topic, *q, offset);
                }
                wb.delete_cf(state.cf(CF_POP), queue_prefix(b'C', group, topic, *q));
                false
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_schedule_is_rocketmqs_and_the_last_delay_repeats() {
        let c = ConsumerGroupConfig::default_for("g");
        assert_eq!(c.retry_delay_ms(1), 10_000);
        assert_eq!(c.retry_delay_ms(2), 30_000);
        assert_eq!(c.retry_delay_ms(16), 7_200_000);
        assert_eq!(c.retry_delay_ms(40), 7_200_000);
        let custom = ConsumerGroupConfig {
            retry_delays_ms: vec![100, 200],
            ..c
        };
        assert_eq!((custom.retry_delay_ms(1), custom.retry_delay_ms(5)), (100, 200));
    }

    #[test]
    fn keys_split_back_into_their_parts() {
        let k = inflight_key("g", "%RETRY%g", 7, 99);
        let (g, t, q, rest) = split_key(&k).unwrap();
        assert_eq!((g.as_str(), t.as_str(), q), ("g", "%RETRY%g", 7));
        assert_eq!(u64::from_be_bytes(rest.try_into().unwrap()), 99);
        assert!(split_key(b"Ig").is_none());
    }

    #[test]
    fn progress_is_the_lowest_unacked_offset() {
        let mut q = PopQueue {
            cursor: 10,
            ..Default::default()
        };
        assert_eq!(q.progress(), 10);
        q.inflight.insert(
            4,
            InFlight {
                deadline_ms: 0,
                attempt: 1,
                epoch: 1,
            },
        );
        assert_eq!(q.progress(), 4);
    }
}
