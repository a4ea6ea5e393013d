//! The replicated state built from committed entries, in RocksDB: ConsumeQueues,
//! the message-key index, topic configs, queue offset counters, consumer-group
//! offsets, and the applied log id and membership. Also the message read path
//! (ConsumeQueue row -> CommitLog or snapshot archive record -> message).
//!
//! Layout: `sm/CURRENT` names the live `sm/state-N/` directory, which holds `db/`
//! (RocksDB) and `archive/` (retained records received in a snapshot). Installing a
//! snapshot builds `state-N+1` beside the live one and switches `CURRENT`
//! atomically, so a crash mid-install leaves the old state intact.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use bytes::Bytes;
use futures::{Stream, StreamExt};
use openraft::storage::{EntryResponder, RaftStateMachine};
use openraft::{EntryPayload, OptionalSend};
use rocksdb::{ColumnFamilyDescriptor, DB, Options, WriteBatch, WriteOptions};

use crate::command::{
    AppendBatch, Command, Message, MessageRef, PERM_READ, PERM_WRITE, QueueOffset, Response, TimerKey, TopicConfig,
    tag_hash,
};
use crate::commitlog::CommitLogReader;
use crate::pop::{CF_CGROUP, CF_POP, DeadLetter, PopState};
use crate::segment::SegmentSet;
use crate::snapshot::{self, SnapshotBuilder};
use crate::timers::{self, CF_TIMER, TimerTarget};
use crate::{Error, LogId, SnapshotMeta, StoreConfig, StoredMembership, TypeConfig, durable, entry_codec};

pub(crate) const CF_META: &str = "meta";
pub(crate) const CF_CQ: &str = "cq";
pub(crate) const CF_KEY: &str = "key";
pub(crate) const CF_TOPIC: &str = "topic";
pub(crate) const CF_OFFSET: &str = "offset";
pub(crate) const CF_QMAX: &str = "qmax";
/// Every column family, in the order snapshots number them (new ones go last).
pub(crate) const CFS: [&str; 9] = [
    CF_META, CF_CQ, CF_KEY, CF_TOPIC, CF_OFFSET, CF_QMAX, CF_TIMER, CF_POP, CF_CGROUP,
];
/// Prefix of the retry topic a push consumer group's failed messages go to.
pub const RETRY_TOPIC_PREFIX: &str = "%RETRY%";
/// Prefix of a consumer group's dead-letter queue.
pub const DLQ_TOPIC_PREFIX: &str = "%DLQ%";

const KEY_APPLIED: &[u8] = b"applied";
const KEY_MEMBERSHIP: &[u8] = b"membership";
const CURRENT_FILE: &str = "CURRENT";
/// Bytes of one ConsumeQueue row: raft index, position in batch, size, tag hash, store time.
const CQ_ROW_LEN: usize = 32;
/// A row for a moved message (a fired timer, a retry, a dead letter) also records
/// the index of the entry that wrote it and the reconsume count. Rows of plain
/// appends keep the short form, so older data reads unchanged.
const CQ_MOVED_ROW_LEN: usize = 44;

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
    fn encode(&self) -> EncodedRow {
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

    fn decode(b: &[u8]) -> io::Result<CqRow> {
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

    fn message_ref(&self) -> MessageRef {
        MessageRef {
            raft_index: self.raft_index,
            batch_pos: self.batch_pos,
            size: self.size,
            tag_hash: self.tag_hash,
        }
    }
}

/// An encoded ConsumeQueue row.
struct EncodedRow {
    bytes: [u8; CQ_MOVED_ROW_LEN],
    len: usize,
}

impl AsRef<[u8]> for EncodedRow {
    fn as_ref(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

/// Where a moved message (retry, dead letter) was first stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub topic: String,
    pub queue_id: u32,
    /// `None` when its ConsumeQueue row is no longer retained.
    pub queue_offset: Option<u64>,
}

/// A message as read back, with where it lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredMessage {
    pub topic: String,
    pub queue_id: u32,
    pub queue_offset: u64,
    pub raft_index: u64,
    pub batch_pos: u32,
    pub store_timestamp_ms: u64,
    pub message: Message,
    /// Failed deliveries before this one (retry and dead-letter rows).
    pub reconsume_times: u32,
    /// Set when the row's queue is not where the message was stored.
    pub origin: Option<Origin>,
}

fn queue_key(topic: &str, queue_id: u32) -> Vec<u8> {
    let mut k = Vec::with_capacity(topic.len() + 5);
    k.extend_from_slice(topic.as_bytes());
    k.push(0);
    k.extend_from_slice(&queue_id.to_be_bytes());
    k
}

fn cq_key(topic: &str, queue_id: u32, offset: u64) -> Vec<u8> {
    let mut k = queue_key(topic, queue_id);
    k.extend_from_slice(&offset.to_be_bytes());
    k
}

fn key_prefix(topic: &str, key: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(topic.len() + key.len() + 5);
    k.extend_from_slice(topic.as_bytes());
    k.push(0);
    k.extend_from_slice(&(key.len() as u32).to_be_bytes());
    k.extend_from_slice(key.as_bytes());
    k
}

fn offset_key(group: &str, topic: &str, queue_id: u32) -> Vec<u8> {
    let mut k = Vec::with_capacity(group.len() + topic.len() + 6);
    k.extend_from_slice(group.as_bytes());
    k.push(0);
    k.extend_from_slice(&queue_key(topic, queue_id));
    k
}

/// Splits a consumer-offset row `group 0 topic 0 queue_be32 -> offset_le64`.
fn parse_offset_row(k: &[u8], v: &[u8]) -> io::Result<(String, String, u32, u64)> {
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
fn topic_range(topic: &str) -> (Vec<u8>, Vec<u8>) {
    let mut from = topic.as_bytes().to_vec();
    from.push(0);
    let mut to = topic.as_bytes().to_vec();
    to.push(1);
    (from, to)
}

fn u64_value(v: &[u8]) -> io::Result<u64> {
    v.try_into()
        .map(u64::from_le_bytes)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, format!("counter of {} bytes", v.len())))
}

pub(crate) fn rocks_io(action: &str) -> impl FnOnce(rocksdb::Error) -> io::Error + '_ {
    move |e| io::Error::other(format!("RocksDB {action}: {e}"))
}

/// One generation of state: a RocksDB instance plus the snapshot archive.
pub(crate) struct SmState {
    pub db: DB,
    pub archive: SegmentSet,
    pub dir: PathBuf,
}

impl SmState {
    pub fn open(dir: &Path, segment_bytes: u64) -> Result<SmState, Error> {
        let db_path = dir.join("db");
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        opts.set_max_background_jobs(2);
        let cfs = CFS.iter().map(|n| ColumnFamilyDescriptor::new(*n, Options::default()));
        let db = DB::open_cf_descriptors(&opts, &db_path, cfs).map_err(|source| Error::Rocks {
            action: "open",
            path: db_path.clone(),
            source,
        })?;
        let archive_dir = dir.join("archive");
        let archive = SegmentSet::open(&archive_dir, segment_bytes).map_err(Error::io("opening", &archive_dir))?;
        Ok(SmState {
            db,
            archive,
            dir: dir.to_path_buf(),
        })
    }

    pub fn cf(&self, name: &str) -> &rocksdb::ColumnFamily {
        self.db.cf_handle(name).expect("column families are created on open")
    }

    fn get(&self, cf: &str, key: &[u8]) -> io::Result<Option<Vec<u8>>> {
        self.db.get_cf(self.cf(cf), key).map_err(rocks_io("read"))
    }

    fn applied_state(&self) -> io::Result<(Option<LogId>, StoredMembership)> {
        let applied = match self.get(CF_META, KEY_APPLIED)? {
            Some(b) => serde_json::from_slice(&b).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?,
            None => None,
        };
        let membership = match self.get(CF_META, KEY_MEMBERSHIP)? {
            Some(b) => serde_json::from_slice(&b).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?,
            None => StoredMembership::default(),
        };
        Ok((applied, membership))
    }
}

pub(crate) struct SmShared {
    pub dir: PathBuf,
    pub segment_bytes: u64,
    pub state: RwLock<Arc<SmState>>,
    pub log: CommitLogReader,
    /// POP state and consumer-group configs of the live generation; the state
    /// machine changes it while applying, readers copy what they need.
    pub pop: RwLock<PopState>,
    /// Woken when an apply scheduled a timer, so the leader's timer loop can
    /// re-read the earliest due time.
    pub timer_added: tokio::sync::Notify,
}

impl SmShared {
    pub fn current(&self) -> Arc<SmState> {
        self.state.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn replace(&self, new: SmState) {
        *self.state.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(new);
    }

    /// Reads records `start..end` for the message path: from the snapshot archive
    /// where it covers them, otherwise from the CommitLog.
    pub fn read_records(
        &self,
        state: &SmState,
        start: u64,
        end: u64,
    ) -> io::Result<Vec<(crate::record::Header, Bytes)>> {
        let mut out = Vec::new();
        let mut next = start;
        if let (Some(af), Some(al)) = (state.archive.first_index(), state.archive.last_index())
            && next <= al
        {
            let from = next.max(af);
            let to = end.min(al + 1);
            if from < to {
                state.archive.read_range(from, to, &mut out)?;
            }
            next = to;
        }
        if next < end {
            out.extend(self.log.read_records(next, end)?);
        }
        Ok(out)
    }
}

/// openraft's state machine for a broker group.
pub struct StateMachine {
    shared: Arc<SmShared>,
    /// Next queue offset per (topic, queue); loaded lazily from `qmax`.
    next_offsets: HashMap<(String, u32), u64>,
    topics: HashMap<String, TopicConfig>,
    timer_overlay: timers::Overlay,
}

/// A cloneable read handle for the broker (pull, admin, queries).
#[derive(Clone)]
pub struct StoreReader {
    shared: Arc<SmShared>,
}

impl StateMachine {
    pub async fn open(dir: PathBuf, log: CommitLogReader, config: &StoreConfig) -> Result<StateMachine, Error> {
        let segment_bytes = config.segment_bytes;
        tokio::task::spawn_blocking(move || Self::open_blocking(dir, log, segment_bytes))
            .await
            .map_err(|e| Error::Io {
                action: "opening state machine (task failed)",
                path: PathBuf::new(),
                source: io::Error::other(e),
            })?
    }

    fn open_blocking(dir: PathBuf, log: CommitLogReader, segment_bytes: u64) -> Result<StateMachine, Error> {
        std::fs::create_dir_all(&dir).map_err(Error::io("creating", &dir))?;
        let current_path = dir.join(CURRENT_FILE);
        let current = match durable::read_optional(&current_path).map_err(Error::io("reading", &current_path))? {
            Some(b) => String::from_utf8_lossy(&b).trim().to_owned(),
            None => {
                durable::write_atomic(&dir, CURRENT_FILE, b"state-0").map_err(Error::io("writing", &current_path))?;
                "state-0".to_owned()
            }
        };
        // A directory that CURRENT does not name is a crashed install or a replaced
        // generation; either way nothing reads it.
        for entry in std::fs::read_dir(&dir).map_err(Error::io("listing", &dir))? {
            let entry = entry.map_err(Error::io("listing", &dir))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with("state-") && name != current {
                std::fs::remove_dir_all(entry.path()).map_err(Error::io("removing", entry.path()))?;
            }
        }
        let state = SmState::open(&dir.join(&current), segment_bytes)?;
        let topics = load_topics(&state).map_err(Error::io("loading topics from", &dir))?;
        let pop = PopState::load(&state).map_err(Error::io("loading POP state from", &dir))?;
        let shared = Arc::new(SmShared {
            dir,
            segment_bytes,
            state: RwLock::new(Arc::new(state)),
            log,
            pop: RwLock::new(pop),
            timer_added: tokio::sync::Notify::new(),
        });
        Ok(StateMachine {
            shared,
            next_offsets: HashMap::new(),
            topics,
            timer_overlay: timers::Overlay::default(),
        })
    }

    pub fn reader(&self) -> StoreReader {
        StoreReader {
            shared: self.shared.clone(),
        }
    }

    fn next_offset(&mut self, state: &SmState, topic: &str, queue_id: u32) -> io::Result<u64> {
        let key = (topic.to_owned(), queue_id);
        if let Some(&n) = self.next_offsets.get(&key) {
            return Ok(n);
        }
        let n = match state.get(CF_QMAX, &queue_key(topic, queue_id))? {
            Some(v) => u64_value(&v)?,
            None => 0,
        };
        self.next_offsets.insert(key, n);
        Ok(n)
    }

    fn apply_append(
        &mut self,
        state: &SmState,
        wb: &mut WriteBatch,
        raft_index: u64,
        batch: &AppendBatch,
    ) -> io::Result<Response> {
        let Some(topic) = self.topics.get(&batch.topic) else {
            return Ok(Response::Rejected {
                reason: format!("topic {} does not exist", batch.topic),
            });
        };
        if batch.queue_id >= topic.queues {
            return Ok(Response::Rejected {
                reason: format!(
                    "queue {} out of range: topic {} has {} queues",
                    batch.queue_id, batch.topic, topic.queues
                ),
            });
        }
        let first = self.next_offset(state, &batch.topic, batch.queue_id)?;
        let (cq, key_cf) = (state.cf(CF_CQ), state.cf(CF_KEY));
        let mut next = first;
        let mut scheduled = 0u32;
        for (pos, m) in batch.messages.iter().enumerate() {
            let row = CqRow {
                raft_index,
                batch_pos: pos as u32,
                size: m.body.len() as u32,
                tag_hash: tag_hash(&m.tag),
                store_timestamp_ms: batch.store_timestamp_ms,
                applied_index: raft_index,
                reconsume_times: 0,
            };
            if m.deliver_at_ms > batch.store_timestamp_ms {
                // Stored now, visible at its time: a timer instead of a row.
                self.timer_overlay.schedule(
                    state,
                    wb,
                    TimerKey {
                        due_ms: m.deliver_at_ms,
                        created_index: raft_index,
                        slot: pos as u32,
                    },
                    TimerTarget {
                        topic: batch.topic.clone(),
                        queue_id: batch.queue_id,
                        message: row.message_ref(),
                        reconsume_times: 0,
                        delayed_original: true,
                    },
                );
                scheduled += 1;
            } else {
                wb.put_cf(cq, cq_key(&batch.topic, batch.queue_id, next), row.encode());
                next += 1;
            }
            for k in &m.keys {
                let mut kk = key_prefix(&batch.topic, k);
                kk.extend_from_slice(&raft_index.to_be_bytes());
                kk.extend_from_slice(&(pos as u32).to_be_bytes());
                wb.put_cf(key_cf, kk, []);
            }
        }
        if scheduled > 0 {
            self.shared.timer_added.notify_one();
        }
        if next == first && scheduled > 0 {
            return Ok(Response::Scheduled { count: scheduled });
        }
        wb.put_cf(
            state.cf(CF_QMAX),
            queue_key(&batch.topic, batch.queue_id),
            next.to_le_bytes(),
        );
        self.next_offsets.insert((batch.topic.clone(), batch.queue_id), next);
        Ok(Response::Appended {
            queue_id: batch.queue_id,
            first_offset: first,
            count: (next - first) as u32,
        })
    }

    /// Appends a row for a message stored elsewhere (a fired timer, a retry, a
    /// dead letter). A missing retry or dead-letter topic is created with one
    /// queue, as RocketMQ does; a missing ordinary topic (deleted meanwhile)
    /// drops the row and answers `None`.
    fn append_moved(
        &mut self,
        state: &SmState,
        wb: &mut WriteBatch,
        topic: &str,
        queue_id: u32,
        row: CqRow,
    ) -> io::Result<Option<u64>> {
        self.ensure_system_topic(state, wb, topic)?;
        match self.topics.get(topic) {
            Some(t) if queue_id < t.queues => {}
            _ => return Ok(None),
        }
        let at = self.next_offset(state, topic, queue_id)?;
        wb.put_cf(state.cf(CF_CQ), cq_key(topic, queue_id, at), row.encode());
        wb.put_cf(state.cf(CF_QMAX), queue_key(topic, queue_id), (at + 1).to_le_bytes());
        self.next_offsets.insert((topic.to_owned(), queue_id), at + 1);
        Ok(Some(at))
    }

    /// Creates a missing retry or dead-letter topic with one queue, as RocketMQ does.
    fn ensure_system_topic(&mut self, state: &SmState, wb: &mut WriteBatch, topic: &str) -> io::Result<()> {
        let system = topic.starts_with(RETRY_TOPIC_PREFIX) || topic.starts_with(DLQ_TOPIC_PREFIX);
        if !system || self.topics.contains_key(topic) {
            return Ok(());
        }
        let t = TopicConfig {
            name: topic.to_owned(),
            queues: 1,
            perm: PERM_READ | PERM_WRITE,
        };
        wb.put_cf(
            state.cf(CF_TOPIC),
            t.name.as_bytes(),
            serde_json::to_vec(&t).map_err(io::Error::other)?,
        );
        self.topics.insert(t.name.clone(), t);
        Ok(())
    }

    /// The POP state, to change while applying.
    fn pop_mut(&self) -> std::sync::RwLockWriteGuard<'_, PopState> {
        self.shared.pop.write().unwrap_or_else(|p| p.into_inner())
    }

    fn moved_row(message: MessageRef, store_timestamp_ms: u64, applied_index: u64, reconsume_times: u32) -> CqRow {
        CqRow {
            raft_index: message.raft_index,
            batch_pos: message.batch_pos,
            size: message.size,
            tag_hash: message.tag_hash,
            store_timestamp_ms,
            applied_index,
            reconsume_times,
        }
    }

    fn apply_dead_letters(
        &mut self,
        state: &SmState,
        wb: &mut WriteBatch,
        index: u64,
        store_timestamp_ms: u64,
        dead: Vec<DeadLetter>,
    ) -> io::Result<()> {
        for d in dead {
            let row = Self::moved_row(d.message, store_timestamp_ms, index, d.reconsume_times);
            self.append_moved(state, wb, &format!("{DLQ_TOPIC_PREFIX}{}", d.group), 0, row)?;
        }
        Ok(())
    }

    fn apply_fire(
        &mut self,
        state: &SmState,
        wb: &mut WriteBatch,
        index: u64,
        ts: u64,
        keys: &[TimerKey],
    ) -> io::Result<Response> {
        let mut fired = 0;
        for k in keys {
            let Some(t) = self.timer_overlay.take(state, wb, k)? else {
                continue;
            };
            let row = Self::moved_row(t.message, ts, index, t.reconsume_times);
            let landed = self.append_moved(state, wb, &t.topic, t.queue_id, row)?;
            if let (Some(offset), true) = (landed, t.delayed_original) {
                wb.put_cf(
                    state.cf(CF_TIMER),
                    timers::fired_key(t.message.raft_index, t.message.batch_pos),
                    offset.to_le_bytes(),
                );
            }
            fired += 1;
        }
        Ok(Response::TimersFired { fired })
    }

    fn apply_command(
        &mut self,
        state: &SmState,
        wb: &mut WriteBatch,
        raft_index: u64,
        cmd: &Command,
    ) -> io::Result<Response> {
        match cmd {
            Command::Append(batch) => self.apply_append(state, wb, raft_index, batch),
            Command::UpsertTopic(t) => {
                let json = serde_json::to_vec(t).map_err(io::Error::other)?;
                wb.put_cf(state.cf(CF_TOPIC), t.name.as_bytes(), json);
                self.topics.insert(t.name.clone(), t.clone());
                Ok(Response::TopicUpserted)
            }
            Command::DeleteTopic { name } => {
                let existed = self.topics.remove(name).is_some();
                wb.delete_cf(state.cf(CF_TOPIC), name.as_bytes());
                let (from, to) = topic_range(name);
                for cf in [CF_CQ, CF_KEY, CF_QMAX] {
                    wb.delete_range_cf(state.cf(cf), &from, &to);
                }
                self.next_offsets.retain(|(t, _), _| t != name);
                self.shared
                    .pop
                    .write()
                    .unwrap_or_else(|p| p.into_inner())
                    .delete_topic(state, wb, name);
                Ok(Response::TopicDeleted { existed })
            }
            Command::CommitOffsets { group, offsets } => {
                let cf = state.cf(CF_OFFSET);
                for QueueOffset {
                    topic,
                    queue_id,
                    offset,
                } in offsets
                {
                    wb.put_cf(cf, offset_key(group, topic, *queue_id), offset.to_le_bytes());
                }
                Ok(Response::OffsetsCommitted)
            }
            Command::FireTimers {
                store_timestamp_ms,
                timers,
            } => self.apply_fire(state, wb, raft_index, *store_timestamp_ms, timers),
            Command::SendBack {
                group,
                message,
                reconsume_times,
                due_ms,
                store_timestamp_ms,
            } => {
                if *due_ms == 0 {
                    let dead = vec![DeadLetter {
                        group: group.clone(),
                        message: *message,
                        reconsume_times: *reconsume_times,
                    }];
                    self.apply_dead_letters(state, wb, raft_index, *store_timestamp_ms, dead)?;
                    return Ok(Response::SentBack { dead_lettered: true });
                }
                // The retry topic exists from the first send-back, so the
                // group's members can subscribe before anything is due.
                self.ensure_system_topic(state, wb, &format!("{RETRY_TOPIC_PREFIX}{group}"))?;
                self.timer_overlay.schedule(
                    state,
                    wb,
                    TimerKey {
                        due_ms: *due_ms,
                        created_index: raft_index,
                        slot: 0,
                    },
                    TimerTarget {
                        topic: format!("{RETRY_TOPIC_PREFIX}{group}"),
                        queue_id: 0,
                        message: *message,
                        reconsume_times: *reconsume_times,
                        delayed_original: false,
                    },
                );
                self.shared.timer_added.notify_one();
                Ok(Response::SentBack { dead_lettered: false })
            }
            Command::PopReceive {
                group,
                topic,
                now_ms,
                invisible_ms,
                picks,
            } => {
                let mut dead = Vec::new();
                let accepted = self.pop_mut().apply_receive(
                    state,
                    wb,
                    raft_index,
                    group,
                    topic,
                    *now_ms,
                    *invisible_ms,
                    picks,
                    &mut dead,
                );
                self.apply_dead_letters(state, wb, raft_index, *now_ms, dead)?;
                Ok(Response::Popped { accepted })
            }
            Command::PopAck { group, topic, acks } => {
                let ok = self.pop_mut().apply_ack(state, wb, group, topic, acks);
                Ok(Response::PopAcked { ok })
            }
            Command::PopChangeInvisible {
                group,
                topic,
                queue_id,
                offset,
                epoch,
                deadline_ms,
            } => {
                let ok = self.pop_mut().apply_change_invisible(
                    state,
                    wb,
                    raft_index,
                    group,
                    topic,
                    *queue_id,
                    *offset,
                    *epoch,
                    *deadline_ms,
                );
                Ok(Response::PopChanged { ok })
            }
            Command::PopDeadLetter {
                group,
                topic,
                queue_id,
                offset,
                epoch,
                message,
                store_timestamp_ms,
            } => {
                let attempt = self
                    .pop_mut()
                    .apply_dead_letter(state, wb, group, topic, *queue_id, *offset, *epoch);
                let Some(attempt) = attempt else {
                    return Ok(Response::PopChanged { ok: false });
                };
                let dead = vec![DeadLetter {
                    group: group.clone(),
                    message: *message,
                    reconsume_times: attempt,
                }];
                self.apply_dead_letters(state, wb, raft_index, *store_timestamp_ms, dead)?;
                Ok(Response::PopChanged { ok: true })
            }
            Command::UpsertConsumerGroup(c) => {
                self.shared
                    .pop
                    .write()
                    .unwrap_or_else(|p| p.into_inner())
                    .upsert_config(state, wb, c)?;
                Ok(Response::ConsumerGroupUpserted)
            }
        }
    }
}

fn load_topics(state: &SmState) -> io::Result<HashMap<String, TopicConfig>> {
    let mut topics = HashMap::new();
    for item in state.db.iterator_cf(state.cf(CF_TOPIC), rocksdb::IteratorMode::Start) {
        let (_, v) = item.map_err(rocks_io("scan topics"))?;
        let t: TopicConfig = serde_json::from_slice(&v).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        topics.insert(t.name.clone(), t);
    }
    Ok(topics)
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotData = File;
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), io::Error> {
        self.shared.current().applied_state()
    }

    async fn apply<Strm>(&mut self, mut entries: Strm) -> Result<(), io::Error>
    where
        Strm: Stream<Item = Result<EntryResponder<TypeConfig>, io::Error>> + Unpin + OptionalSend,
    {
        let state = self.shared.current();
        let mut wb = WriteBatch::default();
        self.timer_overlay.clear();
        let mut replies = Vec::new();
        let mut last = None;
        let mut membership = None;
        while let Some(item) = entries.next().await {
            let (entry, responder) = item?;
            let response = match &entry.payload {
                EntryPayload::Blank => Response::Empty,
                EntryPayload::Normal(cmd) => self.apply_command(&state, &mut wb, entry.log_id.index, cmd)?,
                EntryPayload::Membership(m) => {
                    membership = Some(StoredMembership::new(Some(entry.log_id), m.clone()));
                    Response::Empty
                }
            };
            last = Some(entry.log_id);
            replies.push((responder, response));
        }
        let Some(last) = last else { return Ok(()) };
        let meta = state.cf(CF_META);
        wb.put_cf(
            meta,
            KEY_APPLIED,
            serde_json::to_vec(&Some(last)).map_err(io::Error::other)?,
        );
        if let Some(m) = &membership {
            wb.put_cf(meta, KEY_MEMBERSHIP, serde_json::to_vec(m).map_err(io::Error::other)?);
        }
        // No fsync: the batch is atomic through RocksDB's WAL, and whatever a crash
        // loses is re-applied from the (fsynced) CommitLog on restart.
        let mut opts = WriteOptions::default();
        opts.set_sync(false);
        state.db.write_opt(wb, &opts).map_err(rocks_io("apply write"))?;
        for (responder, response) in replies {
            if let Some(r) = responder {
                r.send(response);
            }
        }
        Ok(())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        SnapshotBuilder::new(self.shared.clone())
    }

    async fn install_snapshot(&mut self, meta: &SnapshotMeta, snapshot: File) -> Result<(), io::Error> {
        let shared = self.shared.clone();
        let meta = meta.clone();
        tokio::task::spawn_blocking(move || snapshot::install(&shared, &meta, snapshot))
            .await
            .map_err(io::Error::other)??;
        self.next_offsets.clear();
        let current = self.shared.current();
        self.topics = load_topics(&current)?;
        *self.pop_mut() = PopState::load(&current)?;
        Ok(())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<openraft::alias::SnapshotOf<TypeConfig, File>>, io::Error> {
        let shared = self.shared.clone();
        tokio::task::spawn_blocking(move || snapshot::current(&shared))
            .await
            .map_err(io::Error::other)?
    }
}

impl StoreReader {
    /// The last applied log id.
    pub fn applied(&self) -> io::Result<Option<LogId>> {
        Ok(self.shared.current().applied_state()?.0)
    }

    pub fn topic(&self, name: &str) -> io::Result<Option<TopicConfig>> {
        let state = self.shared.current();
        match state.get(CF_TOPIC, name.as_bytes())? {
            Some(v) => serde_json::from_slice(&v)
                .map(Some)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e)),
            None => Ok(None),
        }
    }

    pub fn topics(&self) -> io::Result<Vec<TopicConfig>> {
        let mut v: Vec<_> = load_topics(&self.shared.current())?.into_values().collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(v)
    }

    /// The offset the next message appended to the queue will get.
    pub fn queue_next_offset(&self, topic: &str, queue_id: u32) -> io::Result<u64> {
        match self.shared.current().get(CF_QMAX, &queue_key(topic, queue_id))? {
            Some(v) => u64_value(&v),
            None => Ok(0),
        }
    }

    /// The lowest offset the queue still holds (its next offset when empty).
    /// Not read in one snapshot with [`Self::queue_next_offset`]: a caller that
    /// wants both reads the next offset first and caps this by it.
    pub fn queue_min_offset(&self, topic: &str, queue_id: u32) -> io::Result<u64> {
        let first = {
            let state = self.shared.current();
            let prefix = queue_key(topic, queue_id);
            let mut iter = state.db.iterator_cf(
                state.cf(CF_CQ),
                rocksdb::IteratorMode::From(&prefix, rocksdb::Direction::Forward),
            );
            match iter.next() {
                Some(item) => {
                    let (k, _) = item.map_err(rocks_io("scan ConsumeQueue"))?;
                    (k.starts_with(&prefix) && k.len() == prefix.len() + 8)
                        .then(|| u64::from_be_bytes(k[prefix.len()..].try_into().expect("8 bytes")))
                }
                None => None,
            }
        };
        match first {
            Some(offset) => Ok(offset),
            None => self.queue_next_offset(topic, queue_id),
        }
    }

    /// Number of ConsumeQueue rows across all queues (for checks and admin).
    pub fn consume_queue_rows(&self) -> io::Result<u64> {
        let state = self.shared.current();
        let mut n = 0;
        for item in state.db.iterator_cf(state.cf(CF_CQ), rocksdb::IteratorMode::Start) {
            item.map_err(rocks_io("scan ConsumeQueue"))?;
            n += 1;
        }
        Ok(n)
    }

    pub fn consumer_offset(&self, group: &str, topic: &str, queue_id: u32) -> io::Result<Option<u64>> {
        self.shared
            .current()
            .get(CF_OFFSET, &offset_key(group, topic, queue_id))?
            .map(|v| u64_value(&v))
            .transpose()
    }

    /// Up to `max` messages of a queue starting at `offset`, in queue order.
    pub fn read_messages(&self, topic: &str, queue_id: u32, offset: u64, max: usize) -> io::Result<Vec<StoredMessage>> {
        Ok(self.read_messages_tagged(topic, queue_id, offset, max, None)?.0)
    }

    /// Scans up to `max_rows` ConsumeQueue rows from `offset` and returns the
    /// messages whose row's tag hash is in `tag_hashes` (all when `None`), plus the
    /// offset after the last row scanned. Rows that do not match are skipped
    /// without reading their entry, which is what makes a sparse tag filter
    /// cheap; a hash collision can let a non-matching tag through, so callers
    /// still compare the tag itself (see [`tag_hash`]).
    pub fn read_messages_tagged(
        &self,
        topic: &str,
        queue_id: u32,
        offset: u64,
        max_rows: usize,
        tag_hashes: Option<&[u64]>,
    ) -> io::Result<(Vec<StoredMessage>, u64)> {
        let state = self.shared.current();
        let start = cq_key(topic, queue_id, offset);
        let prefix = queue_key(topic, queue_id);
        let mut rows = Vec::new();
        let mut scanned_to = offset;
        let iter = state.db.iterator_cf(
            state.cf(CF_CQ),
            rocksdb::IteratorMode::From(&start, rocksdb::Direction::Forward),
        );
        for item in iter.take(max_rows) {
            let (k, v) = item.map_err(rocks_io("scan ConsumeQueue"))?;
            if !k.starts_with(&prefix) || k.len() != prefix.len() + 8 {
                break;
            }
            let off = u64::from_be_bytes(k[prefix.len()..].try_into().expect("8 bytes"));
            scanned_to = off + 1;
            let row = CqRow::decode(&v)?;
            if tag_hashes.is_none_or(|h| h.contains(&row.tag_hash)) {
                rows.push((off, row));
            }
        }
        Ok((self.resolve(&state, topic, queue_id, rows)?, scanned_to))
    }

    /// Messages of `topic` carrying `key`, oldest first, with where they live.
    pub fn messages_by_key(&self, topic: &str, key: &str, max: usize) -> io::Result<Vec<StoredMessage>> {
        let state = self.shared.current();
        let prefix = key_prefix(topic, key);
        let mut found = Vec::new();
        let iter = state.db.prefix_iterator_cf(state.cf(CF_KEY), &prefix);
        for item in iter {
            let (k, _) = item.map_err(rocks_io("scan key index"))?;
            if !k.starts_with(&prefix) || k.len() != prefix.len() + 12 || found.len() >= max {
                break;
            }
            let index = u64::from_be_bytes(k[prefix.len()..prefix.len() + 8].try_into().expect("8 bytes"));
            let pos = u32::from_be_bytes(k[prefix.len() + 8..].try_into().expect("4 bytes"));
            found.push((index, pos));
        }
        let mut out = Vec::with_capacity(found.len());
        for (index, pos) in found {
            out.extend(self.message_at_in(&state, index, pos)?);
        }
        Ok(out)
    }

    /// The message stored by entry `index` at batch position `pos` (what a message
    /// id names), with its queue offset; `None` when the entry is not retained or
    /// is not an append, or the batch is shorter.
    pub fn message_at(&self, index: u64, pos: u32) -> io::Result<Option<StoredMessage>> {
        let state = self.shared.current();
        self.message_at_in(&state, index, pos)
    }

    fn message_at_in(&self, state: &SmState, index: u64, pos: u32) -> io::Result<Option<StoredMessage>> {
        let command = match self.read_command(state, index) {
            Ok(c) => c,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let Some(Command::Append(batch)) = command else {
            return Ok(None);
        };
        let Some(message) = batch.messages.into_iter().nth(pos as usize) else {
            return Ok(None);
        };
        let Some(queue_offset) = self.origin_offset(state, &batch.topic, batch.queue_id, index, pos, &message)? else {
            return Ok(None);
        };
        Ok(Some(StoredMessage {
            topic: batch.topic,
            queue_id: batch.queue_id,
            queue_offset,
            raft_index: index,
            batch_pos: pos,
            store_timestamp_ms: batch.store_timestamp_ms,
            message,
            reconsume_times: 0,
            origin: None,
        }))
    }

    /// The offset a message got in the queue it was sent to: from the fired-timer
    /// row for a delayed message (`None` while its timer is pending), else from
    /// the ConsumeQueue, whose rows are in order of the entries that wrote them,
    /// so a binary search finds the batch's rows.
    fn origin_offset(
        &self,
        state: &SmState,
        topic: &str,
        queue_id: u32,
        index: u64,
        pos: u32,
        message: &Message,
    ) -> io::Result<Option<u64>> {
        if message.deliver_at_ms != 0
            && let Some(offset) = timers::fired_offset(state, index, pos)?
        {
            return Ok(Some(offset));
        }
        let Some(first) = self.batch_first_offset(state, topic, queue_id, index)? else {
            return Ok(None);
        };
        // Delayed messages of a batch have no row there, so count the rows of
        // this entry rather than trusting the batch position.
        let row = self.cq_row(state, topic, queue_id, first + u64::from(pos))?;
        if row.is_some_and(|r| r.raft_index == index && r.batch_pos == pos) {
            return Ok(Some(first + u64::from(pos)));
        }
        let mut at = first;
        while let Some(r) = self.cq_row(state, topic, queue_id, at)? {
            if r.applied_index != index {
                break;
            }
            if r.batch_pos == pos {
                return Ok(Some(at));
            }
            at += 1;
        }
        Ok(None)
    }

    /// What a ConsumeQueue row of the message named by a message id holds, for
    /// moving it (retry, dead letter); `None` when not retained.
    pub fn message_ref(&self, index: u64, pos: u32) -> io::Result<Option<(String, MessageRef)>> {
        let state = self.shared.current();
        let command = match self.read_command(&state, index) {
            Ok(c) => c,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let Some(Command::Append(batch)) = command else {
            return Ok(None);
        };
        Ok(batch.messages.get(pos as usize).map(|m| {
            (
                batch.topic.clone(),
                MessageRef {
                    raft_index: index,
                    batch_pos: pos,
                    size: m.body.len() as u32,
                    tag_hash: tag_hash(&m.tag),
                },
            )
        }))
    }

    /// The ConsumeQueue row at an offset, as a [`MessageRef`].
    pub fn row_ref(&self, topic: &str, queue_id: u32, offset: u64) -> io::Result<Option<MessageRef>> {
        let state = self.shared.current();
        Ok(self.cq_row(&state, topic, queue_id, offset)?.map(|r| r.message_ref()))
    }

    /// Up to `limit` pending timers due at or before `now_ms`, earliest first,
    /// scanning from due time `from_due_ms`.
    pub fn due_timers(&self, from_due_ms: u64, now_ms: u64, limit: usize) -> io::Result<Vec<TimerKey>> {
        timers::due(&self.shared.current(), from_due_ms, now_ms, limit)
    }

    /// Due time of the earliest pending timer at or after `from_due_ms`.
    pub fn next_timer_due(&self, from_due_ms: u64) -> io::Result<Option<u64>> {
        timers::next_due(&self.shared.current(), from_due_ms)
    }

    /// Completes after the next apply that scheduled a timer (`enable` it before
    /// reading, so a timer scheduled in between is not missed).
    pub fn timer_added(&self) -> tokio::sync::futures::Notified<'_> {
        self.shared.timer_added.notified()
    }

    /// Runs `f` over the applied POP state and consumer-group configs.
    pub fn with_pop<R>(&self, f: impl FnOnce(&PopState) -> R) -> R {
        f(&self.shared.pop.read().unwrap_or_else(|p| p.into_inner()))
    }

    fn cq_row(&self, state: &SmState, topic: &str, queue_id: u32, offset: u64) -> io::Result<Option<CqRow>> {
        state
            .get(CF_CQ, &cq_key(topic, queue_id, offset))?
            .map(|v| CqRow::decode(&v))
            .transpose()
    }

    /// The lowest offset in `[min, next)` whose row satisfies `after`, which must
    /// be false then true along the queue (rows are in raft-index and, per
    /// leader clock, store-time order). `next` when none does.
    fn search_queue(
        &self,
        state: &SmState,
        topic: &str,
        queue_id: u32,
        after: impl Fn(&CqRow) -> bool,
    ) -> io::Result<u64> {
        let next = self.queue_next_offset(topic, queue_id)?;
        let (mut lo, mut hi) = (self.queue_min_offset(topic, queue_id)?.min(next), next);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            match self.cq_row(state, topic, queue_id, mid)? {
                Some(row) if after(&row) => hi = mid,
                Some(_) => lo = mid + 1,
                // Trimmed between the reads: everything below is gone too.
                None => lo = mid + 1,
            }
        }
        Ok(lo)
    }

    fn batch_first_offset(&self, state: &SmState, topic: &str, queue_id: u32, index: u64) -> io::Result<Option<u64>> {
        let at = self.search_queue(state, topic, queue_id, |row| row.applied_index >= index)?;
        Ok(self
            .cq_row(state, topic, queue_id, at)?
            .filter(|row| row.applied_index == index)
            .map(|_| at))
    }

    /// The first offset of the queue stored at or after `timestamp_ms` (the queue's
    /// next offset when every message is older): where a consumer group starting
    /// or reset "from a timestamp" begins.
    pub fn offset_for_timestamp(&self, topic: &str, queue_id: u32, timestamp_ms: u64) -> io::Result<u64> {
        let state = self.shared.current();
        self.search_queue(&state, topic, queue_id, |row| row.store_timestamp_ms >= timestamp_ms)
    }

    /// Every committed consumer-group offset as `(group, topic, queue, offset)`,
    /// sorted; only `group`'s when given.
    pub fn consumer_offsets(&self, group: Option<&str>) -> io::Result<Vec<(String, String, u32, u64)>> {
        let state = self.shared.current();
        let prefix = group.map(|g| {
            let mut p = g.as_bytes().to_vec();
            p.push(0);
            p
        });
        let mode = match &prefix {
            Some(p) => rocksdb::IteratorMode::From(p, rocksdb::Direction::Forward),
            None => rocksdb::IteratorMode::Start,
        };
        let mut out = Vec::new();
        for item in state.db.iterator_cf(state.cf(CF_OFFSET), mode) {
            let (k, v) = item.map_err(rocks_io("scan consumer offsets"))?;
            if prefix.as_ref().is_some_and(|p| !k.starts_with(p)) {
                break;
            }
            out.push(parse_offset_row(&k, &v)?);
        }
        Ok(out)
    }

    fn read_command(&self, state: &SmState, index: u64) -> io::Result<Option<Command>> {
        let recs = self.shared.read_records(state, index, index + 1)?;
        let Some((h, payload)) = recs.into_iter().next() else {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("entry {index} is referenced by an index row but is not retained"),
            ));
        };
        entry_codec::decode_command(&h, payload)
    }

    fn resolve(
        &self,
        state: &SmState,
        topic: &str,
        queue_id: u32,
        rows: Vec<(u64, CqRow)>,
    ) -> io::Result<Vec<StoredMessage>> {
        let mut out = Vec::with_capacity(rows.len());
        // Consecutive rows usually share an entry (a batch): decode it once, and
        // move each message out (a row names each position once) instead of
        // cloning its tag, keys and properties.
        let mut cached: Option<(u64, Vec<Option<Message>>, String, u32)> = None;
        for (queue_offset, row) in rows {
            if cached.as_ref().is_none_or(|(i, ..)| *i != row.raft_index) {
                let (msgs, t, q) = match self.read_command(state, row.raft_index)? {
                    Some(Command::Append(b)) => (b.messages.into_iter().map(Some).collect(), b.topic, b.queue_id),
                    other => {
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            format!(
                                "ConsumeQueue row {topic}/{queue_id}@{queue_offset} points at entry {} which is not an append ({other:?})",
                                row.raft_index
                            ),
                        ));
                    }
                };
                cached = Some((row.raft_index, msgs, t, q));
            }
            let (_, msgs, origin_topic, origin_queue) = cached.as_mut().expect("just filled");
            let origin = (origin_topic != topic || *origin_queue != queue_id).then(|| Origin {
                topic: origin_topic.clone(),
                queue_id: *origin_queue,
                queue_offset: None,
            });
            let message = msgs
                .get_mut(row.batch_pos as usize)
                .and_then(|m| if origin.is_some() { m.clone() } else { m.take() })
                .ok_or_else(|| {
                    io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!(
                            "entry {} has no message at position {} (or two ConsumeQueue rows name it)",
                            row.raft_index, row.batch_pos
                        ),
                    )
                })?;
            let origin = match origin {
                Some(mut o) => {
                    o.queue_offset =
                        self.origin_offset(state, &o.topic, o.queue_id, row.raft_index, row.batch_pos, &message)?;
                    Some(o)
                }
                None => None,
            };
            out.push(StoredMessage {
                topic: topic.to_owned(),
                queue_id,
                queue_offset,
                raft_index: row.raft_index,
                batch_pos: row.batch_pos,
                store_timestamp_ms: row.store_timestamp_ms,
                message,
                reconsume_times: row.reconsume_times,
                origin,
            });
        }
        Ok(out)
    }
}
