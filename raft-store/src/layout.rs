//! The state machine's RocksDB layout: column families, key encodings, and the
//! ConsumeQueue row format. Everything that reads or writes a row builds its key
//! here, so the layout is written down once.

use std::io;

use crate::acl::CF_ACL;
use crate::command::MessageRef;
use crate::dedup::CF_DEDUP;
use crate::pop::{CF_CGROUP, CF_POP};
use crate::timers::CF_TIMER;
use crate::transactions::CF_TXN;

pub(crate) const CF_META: &str = "meta";
/// The ConsumeQueue rows of the layout before epochs (`queue, offset -> row`):
/// only read to move them into [`CF_CQ_ROWS`] (`cq::migrate_queue_first_rows`).
pub(crate) const CF_CQ_QUEUE_FIRST: &str = "cq";
/// ConsumeQueue rows, `epoch, queue, offset -> row` (see `cq.rs` for why).
pub(crate) const CF_CQ_ROWS: &str = "cq_rows";
/// Per queue, the first offset of each epoch's run of rows -> the epoch.
pub(crate) const CF_CQ_RUNS: &str = "cq_runs";
/// The index of the entry that opened each ConsumeQueue epoch -> the epoch.
pub(crate) const CF_CQ_EPOCHS: &str = "cq_epochs";
pub(crate) const CF_KEY: &str = "key";
pub(crate) const CF_TOPIC: &str = "topic";
pub(crate) const CF_OFFSET: &str = "offset";
pub(crate) const CF_QMAX: &str = "qmax";
/// Per queue, the lowest offset retention left (`queue_key` -> le64); absent
/// means 0. Reads start from it, so they never walk the deleted rows' tombstones.
pub(crate) const CF_QMIN: &str = "qmin";
/// Every column family, in the order snapshots number them (new ones go last).
pub(crate) const CFS: [&str; 16] = [
    CF_META,
    CF_CQ_QUEUE_FIRST,
    CF_KEY,
    CF_TOPIC,
    CF_OFFSET,
    CF_QMAX,
    CF_TIMER,
    CF_POP,
    CF_CGROUP,
    CF_DEDUP,
    CF_TXN,
    CF_QMIN,
    CF_CQ_ROWS,
    CF_CQ_RUNS,
    CF_CQ_EPOCHS,
    CF_ACL,
];
/// Meta row holding the retention horizon (le64): every entry at or below it
/// is gone from this group's retained data.
pub(crate) const KEY_HORIZON: &[u8] = b"horizon";
/// Prefix of the retry topic a push consumer group's failed messages go to.
pub const RETRY_TOPIC_PREFIX: &str = "%RETRY%";
/// Prefix of a consumer group's dead-letter queue.
pub const DLQ_TOPIC_PREFIX: &str = "%DLQ%";

/// Bytes of one ConsumeQueue row: raft index, position in batch, size, tag hash, store time.
pub(crate) const CQ_ROW_LEN: usize = 32;
/// A row for a moved message (a fired timer, a retry, a dead letter) also records
/// the index of the entry that wrote it and the reconsume count. Rows of plain
/// appends keep the short form, so older data reads unchanged.
pub(crate) const CQ_MOVED_ROW_LEN: usize = 44;

/// One ConsumeQueue row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CqRow {
    pub raft_index: u64,
    /// Position of the message within its entry's batch.
    pub batch_pos: u32,
    pub size: u32,
    pub tag_hash: u64,
    pub store_timestamp_ms: u64,
    /// Index of the entry that wrote the row: `raft_index` for an append, later
    /// for a moved message. Rows of a queue are in this order.
    pub applied_index: u64,
    pub reconsume_times: u32,
}

impl CqRow {
    /// The row's bytes: the short form unless the message was moved. A fixed
    /// buffer, not a Vec: this runs once per stored message.
    pub(crate) fn encode(&self) -> EncodedRow {
        let mut b = [0u8; CQ_MOVED_ROW_LEN];
        b[0..8].copy_from_slice(&self.raft_index.to_le_bytes());
        b[8..12].copy_from_slice(&self.batch_pos.to_le_bytes());
        b[12..16].copy_from_slice(&self.size.to_le_bytes());
        b[16..24].copy_from_slice(&self.tag_hash.to_le_bytes());
        b[24..32].copy_from_slice(&self.store_timestamp_ms.to_le_bytes());
        let moved = self.applied_index != self.raft_index || self.reconsume_times != 0;
        if moved {
            b[32..40].copy_from_slice(&self.applied_index.to_le_bytes());
            b[40..44].copy_from_slice(&self.reconsume_times.to_le_bytes());
        }
        EncodedRow {
            bytes: b,
            len: if moved { CQ_MOVED_ROW_LEN } else { CQ_ROW_LEN },
        }
    }

    pub(crate) fn decode(b: &[u8]) -> io::Result<CqRow> {
        if b.len() != CQ_ROW_LEN && b.len() != CQ_MOVED_ROW_LEN {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("ConsumeQueue row of {} bytes", b.len()),
            ));
        }
        let u64_at = |at: usize| u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"));
        let u32_at = |at: usize| u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"));
        let raft_index = u64_at(0);
        let (applied_index, reconsume_times) = if b.len() == CQ_MOVED_ROW_LEN {
            (u64_at(32), u32_at(40))
        } else {
            (raft_index, 0)
        };
        Ok(CqRow {
            raft_index,
            batch_pos: u32_at(8),
            size: u32_at(12),
            tag_hash: u64_at(16),
            store_timestamp_ms: u64_at(24),
            applied_index,
            reconsume_times,
        })
    }

    pub(crate) fn message_ref(&self) -> MessageRef {
        MessageRef {
            raft_index: self.raft_index,
            batch_pos: self.batch_pos,
            size: self.size,
            tag_hash: self.tag_hash,
        }
    }
}

/// An encoded ConsumeQueue row.
pub(crate) struct EncodedRow {
    bytes: [u8; CQ_MOVED_ROW_LEN],
    len: usize,
}

impl AsRef<[u8]> for EncodedRow {
    fn as_ref(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

pub(crate) fn queue_key(topic: &str, queue_id: u32) -> Vec<u8> {
    let mut k = Vec::with_capacity(topic.len() + 5);
    k.extend_from_slice(topic.as_bytes());
    k.push(0);
    k.extend_from_slice(&queue_id.to_be_bytes());
    k
}

/// The Raft index a key-index row names (its last 12 bytes are index, position).
pub(crate) fn key_row_index(k: &[u8]) -> Option<u64> {
    let at = k.len().checked_sub(12)?;
    Some(u64::from_be_bytes(k[at..at + 8].try_into().ok()?))
}

pub(crate) fn key_prefix(topic: &str, key: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(topic.len() + key.len() + 5);
    k.extend_from_slice(topic.as_bytes());
    k.push(0);
    k.extend_from_slice(&(key.len() as u32).to_be_bytes());
    k.extend_from_slice(key.as_bytes());
    k
}

pub(crate) fn offset_key(group: &str, topic: &str, queue_id: u32) -> Vec<u8> {
    let mut k = Vec::with_capacity(group.len() + topic.len() + 6);
    k.extend_from_slice(group.as_bytes());
    k.push(0);
    k.extend_from_slice(&queue_key(topic, queue_id));
    k
}

/// Splits a consumer-offset row `group 0 topic 0 queue_be32 -> offset_le64`.
pub(crate) fn parse_offset_row(k: &[u8], v: &[u8]) -> io::Result<(String, String, u32, u64)> {
    let bad = || io::Error::new(io::ErrorKind::InvalidData, format!("consumer offset key {k:?}"));
    let g_end = k.iter().position(|&b| b == 0).ok_or_else(bad)?;
    let rest = &k[g_end + 1..];
    if rest.len() < 5 {
        return Err(bad());
    }
    let (topic, q) = rest.split_at(rest.len() - 5);
    if q[0] != 0 {
        return Err(bad());
    }
    let queue_id = u32::from_be_bytes(q[1..].try_into().expect("4 bytes"));
    let text = |b: &[u8]| String::from_utf8(b.to_vec()).map_err(|_| bad());
    Ok((text(&k[..g_end])?, text(topic)?, queue_id, u64_value(v)?))
}

/// `[topic 0x00, topic 0x01)`: every row of a topic in a topic-first column family.
pub(crate) fn topic_range(topic: &str) -> (Vec<u8>, Vec<u8>) {
    let mut from = topic.as_bytes().to_vec();
    from.push(0);
    let mut to = topic.as_bytes().to_vec();
    to.push(1);
    (from, to)
}

pub(crate) fn u64_value(v: &[u8]) -> io::Result<u64> {
    v.try_into()
        .map(u64::from_le_bytes)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, format!("counter of {} bytes", v.len())))
}
