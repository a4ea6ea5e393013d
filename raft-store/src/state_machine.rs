//! The replicated state built from committed entries, in RocksDB: applying
//! entries (ConsumeQueues, the message-key index, topic configs, queue offset
//! counters, consumer-group offsets, timers and POP state through [`crate::timers`]
//! and [`crate::pop`], moves of messages to other queues), the applied log id and
//! membership, and the state generations snapshots install. The key layout is in
//! [`crate::layout`]; the read side in [`crate::reader`].
//!
//! Layout: `sm/CURRENT` names the live `sm/state-N/` directory, which holds `db/`
//! (RocksDB) and `archive/` (retained records received in a snapshot). Installing a
//! snapshot builds `state-N+1` beside the live one and switches `CURRENT`
//! atomically, so a crash mid-install leaves the old state intact. Snapshots
//! live beside the generations in `sm/snapshots/` (see [`crate::snapshot`]):
//! they hard-link a generation's files, so removing a generation never breaks one.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use bytes::Bytes;
use futures::{Stream, StreamExt};
use openraft::storage::{EntryResponder, RaftStateMachine};
use openraft::{EntryPayload, OptionalSend};
use rocksdb::{ColumnFamilyDescriptor, DB, Options, WriteBatch, WriteOptions};

use crate::acl::AclState;
use crate::command::{
    AppendBatch, Command, MessageRef, PERM_READ, PERM_WRITE, QueueOffset, Response, TimerKey, TopicConfig,
    TxnEndOutcome, TxnEndSource, TxnId, tag_hash,
};
use crate::commitlog::CommitLogReader;
use crate::dedup::{Dedup, Outcome};
use crate::layout::*;
use crate::pop::{DeadLetter, PopState};
use crate::reader::StoreReader;
use crate::segment::SegmentSet;
use crate::snapshot::{self, SnapshotBuilder, SnapshotData, Snapshots};
use crate::timers::{self, CF_TIMER, TimerTarget};
use crate::transactions::{EndFound, PendingTxn, TxnState};
use crate::{Error, LogId, SnapshotMeta, StoreConfig, StoredMembership, TypeConfig, cq, durable};

const KEY_APPLIED: &[u8] = b"applied";
const KEY_MEMBERSHIP: &[u8] = b"membership";
const CURRENT_FILE: &str = "CURRENT";
pub(crate) fn rocks_io(action: &str) -> impl FnOnce(rocksdb::Error) -> io::Error + '_ {
    move |e| io::Error::other(format!("RocksDB {action}: {e}"))
}

/// One generation of state: a RocksDB instance plus the snapshot archive.
pub(crate) struct SmState {
    pub db: DB,
    /// Retained records received in a snapshot. Locked because retention
    /// deletes its old segments while readers use it.
    pub archive: RwLock<SegmentSet>,
    pub dir: PathBuf,
    /// The retention horizon as applied (the meta row's value once written):
    /// reads skip what it covers, and the key index's compaction filter drops
    /// rows naming entries at or below it.
    horizon: Arc<AtomicU64>,
    /// ConsumeQueue epochs below this were dropped by retention (the meta row's
    /// value once written): `cq_rows`' compaction filter removes their rows.
    cq_dropped_below: Arc<AtomicU64>,
}

impl SmState {
    pub fn open(dir: &Path, segment_bytes: u64) -> Result<SmState, Error> {
        let db_path = dir.join("db");
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        opts.set_max_background_jobs(2);
        // Compactions (RocksDB's LOW thread pool) run at the lowest CPU priority:
        // under a long produce run their bursts took over a core for ~10 s at a
        // time and halved the send rate (scripts/backlog-run.sh SAMPLE=DIR shows
        // it). Flushes (HIGH pool) keep normal priority, so memtables never back
        // up; compactions use the CPU the request path leaves idle.
        let mut env = rocksdb::Env::new().map_err(|source| Error::Rocks {
            action: "create the environment of",
            path: db_path.clone(),
            source,
        })?;
        env.lower_thread_pool_cpu_priority();
        opts.set_env(&env);
        let horizon = Arc::new(AtomicU64::new(0));
        let cq_dropped_below = Arc::new(AtomicU64::new(0));
        let cfs = CFS.iter().map(|n| {
            let mut cf_opts = Options::default();
            if *n == CF_CQ_ROWS {
                // Retention drops whole epochs without tombstones (see cq.rs):
                // files wholly below the boundary are deleted, and compaction
                // drops the rows of the files that straddle it.
                let below = cq_dropped_below.clone();
                cf_opts.set_compaction_filter("raftmq-cq-retention", move |_level: u32, key: &[u8], _value: &[u8]| {
                    match cq::key_epoch(key) {
                        Some(e) if e < below.load(Ordering::Relaxed) => rocksdb::compaction_filter::Decision::Remove,
                        _ => rocksdb::compaction_filter::Decision::Keep,
                    }
                });
            }
            if *n == CF_KEY {
                // Key rows are ordered by key, not by entry, so retention cannot
                // delete them by range without scanning the whole index inside
                // apply. Reads already ignore rows at or below the horizon
                // (they name nothing retained); compaction drops them for good.
                let horizon = horizon.clone();
                cf_opts.set_compaction_filter("raftmq-retention", move |_level: u32, key: &[u8], _value: &[u8]| {
                    match key_row_index(key) {
                        Some(i) if i <= horizon.load(Ordering::Relaxed) => rocksdb::compaction_filter::Decision::Remove,
                        _ => rocksdb::compaction_filter::Decision::Keep,
                    }
                });
            }
            ColumnFamilyDescriptor::new(*n, cf_opts)
        });
        let db = DB::open_cf_descriptors(&opts, &db_path, cfs).map_err(|source| Error::Rocks {
            action: "open",
            path: db_path.clone(),
            source,
        })?;
        let archive_dir = dir.join("archive");
        let archive = SegmentSet::open(&archive_dir, segment_bytes).map_err(Error::io("opening", &archive_dir))?;
        let state = SmState {
            db,
            archive: RwLock::new(archive),
            dir: dir.to_path_buf(),
            horizon,
            cq_dropped_below,
        };
        state
            .load_horizon()
            .map_err(Error::io("reading the retention horizon in", dir))?;
        cq::migrate_queue_first_rows(&state).map_err(Error::io("moving the ConsumeQueue rows of", dir))?;
        Ok(state)
    }

    /// The applied retention horizon (0: nothing was ever trimmed).
    pub fn horizon(&self) -> u64 {
        self.horizon.load(Ordering::Acquire)
    }

    /// Re-reads the horizon from the meta row (at open, after a snapshot fill).
    pub(crate) fn load_horizon(&self) -> io::Result<u64> {
        let h = match self.get(CF_META, KEY_HORIZON)? {
            Some(v) => u64_value(&v)?,
            None => 0,
        };
        self.horizon.store(h, Ordering::Release);
        let below = match self.get(CF_META, cq::KEY_DROPPED_BELOW)? {
            Some(v) => u64_value(&v)?,
            None => 0,
        };
        self.cq_dropped_below.store(below, Ordering::Release);
        Ok(h)
    }

    /// ConsumeQueue epochs below this were dropped by retention.
    pub(crate) fn cq_dropped_below(&self) -> u64 {
        self.cq_dropped_below.load(Ordering::Acquire)
    }

    pub(crate) fn archive(&self) -> std::sync::RwLockReadGuard<'_, SegmentSet> {
        self.archive.read().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn archive_mut(&self) -> std::sync::RwLockWriteGuard<'_, SegmentSet> {
        self.archive.write().unwrap_or_else(|p| p.into_inner())
    }

    pub fn cf(&self, name: &str) -> &rocksdb::ColumnFamily {
        self.db.cf_handle(name).expect("column families are created on open")
    }

    pub(crate) fn get(&self, cf: &str, key: &[u8]) -> io::Result<Option<Vec<u8>>> {
        self.db.get_cf(self.cf(cf), key).map_err(rocks_io("read"))
    }

    pub(crate) fn applied_state(&self) -> io::Result<(Option<LogId>, StoredMembership)> {
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
    /// Pending half messages and transaction outcomes of the live generation.
    pub txn: RwLock<TxnState>,
    /// Woken when an apply stored a half message, so the leader's check loop
    /// can re-read the earliest check time.
    pub txn_added: tokio::sync::Notify,
    /// Users and ACL rules of the live generation (read on every request when
    /// brokers enforce the ACL).
    pub acl: RwLock<AclState>,
    /// Woken when an apply scheduled a timer, so the leader's timer loop can
    /// re-read the earliest due time.
    pub timer_added: tokio::sync::Notify,
    /// The applied retention horizon, for the task that frees disk after it
    /// (snapshot, purge, segment deletion) off the apply path.
    pub horizon: tokio::sync::watch::Sender<u64>,
    /// The horizon the current snapshot was built under: records at or below
    /// it are not in it. Retention rebuilds a snapshot older than its horizon.
    pub snapshot_horizon: AtomicU64,
    /// The snapshot directories and which one is current.
    pub snapshots: Snapshots,
    /// How long each apply batch took (commands, RocksDB write, replies), for
    /// the metrics endpoint.
    pub apply_seconds: crate::stats::AtomicHistogram,
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
        let archive = state.archive();
        if let (Some(af), Some(al)) = (archive.first_index(), archive.last_index())
            && next <= al
        {
            let from = next.max(af);
            let to = end.min(al + 1);
            if from < to {
                archive.read_range(from, to, &mut out)?;
            }
            next = to;
        }
        drop(archive);
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
    /// Each queue's newest ConsumeQueue epoch and the count of rows stored.
    cq_runs: cq::RunCache,
    /// ConsumeQueue epochs below this were dropped by the batch being applied:
    /// their files are deleted once it is written.
    cq_files_below: Option<u64>,
    topics: HashMap<String, TopicConfig>,
    timer_overlay: timers::Overlay,
    /// Idempotent producers' recent sends; changed only by apply.
    dedup: Dedup,
    /// The retention horizon as of the entries applied so far (ahead of the
    /// state's, which moves when the batch is written).
    horizon: u64,
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
            } else if name.starts_with("incoming-") && name.ends_with(".tmp") {
                // A local snapshot's stream staged for install (normally unlinked
                // as soon as it is created).
                std::fs::remove_file(entry.path()).map_err(Error::io("removing", entry.path()))?;
            }
        }
        let state = SmState::open(&dir.join(&current), segment_bytes)?;
        let topics = load_topics(&state).map_err(Error::io("loading topics from", &dir))?;
        let pop = PopState::load(&state).map_err(Error::io("loading POP state from", &dir))?;
        let dedup = Dedup::load(&state).map_err(Error::io("loading idempotent-producer state from", &dir))?;
        let txn = TxnState::load(&state).map_err(Error::io("loading transactions from", &dir))?;
        let acl = AclState::load(&state).map_err(Error::io("loading users and ACL rules from", &dir))?;
        let horizon = state.horizon();
        let (snapshots, snapshot_horizon) =
            Snapshots::open(&dir).map_err(Error::io("opening the snapshots of", &dir))?;
        let shared = Arc::new(SmShared {
            dir,
            segment_bytes,
            state: RwLock::new(Arc::new(state)),
            log,
            pop: RwLock::new(pop),
            timer_added: tokio::sync::Notify::new(),
            txn: RwLock::new(txn),
            txn_added: tokio::sync::Notify::new(),
            acl: RwLock::new(acl),
            horizon: tokio::sync::watch::Sender::new(horizon),
            snapshot_horizon: AtomicU64::new(snapshot_horizon),
            snapshots,
            apply_seconds: crate::stats::AtomicHistogram::latency(),
        });
        Ok(StateMachine {
            shared,
            next_offsets: HashMap::new(),
            cq_runs: cq::RunCache::default(),
            cq_files_below: None,
            topics,
            timer_overlay: timers::Overlay::default(),
            dedup,
            horizon,
        })
    }

    pub fn reader(&self) -> StoreReader {
        StoreReader::new(self.shared.clone())
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
        if let Some(p) = &batch.producer
            && let Some(o) = self.dedup.lookup(&p.producer_id, p.sequence)
        {
            return Ok(Response::Duplicate {
                raft_index: o.raft_index,
                queue_id: o.queue_id,
                first_offset: o.first_offset,
                count: o.count,
                scheduled: o.scheduled,
                half: o.half,
            });
        }
        let response = if batch.transaction.is_some() {
            self.store_half(state, wb, raft_index, batch)
        } else {
            self.store_append(state, wb, raft_index, batch)?
        };
        if let Some(p) = &batch.producer {
            let outcome = match response {
                Response::Appended {
                    queue_id,
                    first_offset,
                    count,
                } => Some(Outcome {
                    raft_index,
                    queue_id,
                    first_offset,
                    count,
                    scheduled: false,
                    half: false,
                }),
                Response::Scheduled { count } | Response::HalfStored { count } => Some(Outcome {
                    raft_index,
                    queue_id: batch.queue_id,
                    first_offset: 0,
                    count,
                    scheduled: matches!(response, Response::Scheduled { .. }),
                    half: matches!(response, Response::HalfStored { .. }),
                }),
                _ => None,
            };
            if let Some(o) = outcome {
                self.dedup
                    .record(state, wb, &p.producer_id, p.sequence, batch.store_timestamp_ms, o);
            }
        }
        Ok(response)
    }

    /// Stores a transactional append: each message becomes a pending half
    /// message, with no ConsumeQueue or key-index row until it is committed.
    fn store_half(&mut self, state: &SmState, wb: &mut WriteBatch, raft_index: u64, batch: &AppendBatch) -> Response {
        let Some(spec) = &batch.transaction else {
            return Response::Rejected {
                reason: "not a transactional append".into(),
            };
        };
        let mut txn = self.shared.txn.write().unwrap_or_else(|p| p.into_inner());
        for (pos, m) in batch.messages.iter().enumerate() {
            let id = TxnId {
                raft_index,
                batch_pos: pos as u32,
            };
            let pending = PendingTxn {
                producer_group: spec.producer_group.clone(),
                topic: batch.topic.clone(),
                queue_id: batch.queue_id,
                message: MessageRef {
                    raft_index,
                    batch_pos: pos as u32,
                    size: m.body.len() as u32,
                    tag_hash: tag_hash(&m.tag),
                },
                keys: m.keys.clone(),
                store_timestamp_ms: batch.store_timestamp_ms,
                checks: 0,
                next_check_ms: spec.first_check_ms,
            };
            txn.add(state, wb, id, pending);
        }
        self.shared.txn_added.notify_one();
        Response::HalfStored {
            count: batch.messages.len() as u32,
        }
    }

    /// Commits or rolls back pending transactions. A commit writes the message's
    /// ConsumeQueue row (pointing at the half message's record, as a fired timer
    /// does) and its key-index rows; a rollback only forgets it.
    fn apply_end_transactions(
        &mut self,
        state: &SmState,
        wb: &mut WriteBatch,
        index: u64,
        ends: &[(TxnId, bool)],
        source: TxnEndSource,
        ts: u64,
    ) -> io::Result<Response> {
        let mut outcomes = Vec::with_capacity(ends.len());
        for &(id, commit) in ends {
            // Exhausted checks always roll back, whatever the command says.
            let commit = commit && source != TxnEndSource::Exhausted;
            let found = self
                .shared
                .txn
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .end(state, wb, id, commit, source, index);
            let outcome = match found {
                EndFound::Unknown => TxnEndOutcome::Unknown,
                EndFound::AlreadyEnded(e) => TxnEndOutcome::AlreadyEnded {
                    committed: e.committed,
                    source: e.source,
                },
                EndFound::Pending(p) if !commit => TxnEndOutcome::Ended {
                    queue_id: p.queue_id,
                    queue_offset: None,
                },
                EndFound::Pending(p) => {
                    let row = Self::moved_row(p.message, ts, index, 0);
                    let landed = self.append_moved(state, wb, &p.topic, p.queue_id, row)?;
                    if let Some(offset) = landed {
                        // Where it landed, for lookups by message id (its row is
                        // out of Raft-index order in its queue), as for a delayed message.
                        wb.put_cf(
                            state.cf(CF_TIMER),
                            timers::fired_key(id.raft_index, id.batch_pos),
                            offset.to_le_bytes(),
                        );
                        let key_cf = state.cf(CF_KEY);
                        for k in &p.keys {
                            let mut kk = key_prefix(&p.topic, k);
                            kk.extend_from_slice(&id.raft_index.to_be_bytes());
                            kk.extend_from_slice(&id.batch_pos.to_be_bytes());
                            wb.put_cf(key_cf, kk, []);
                        }
                    }
                    TxnEndOutcome::Ended {
                        queue_id: p.queue_id,
                        queue_offset: landed,
                    }
                }
            };
            outcomes.push(outcome);
        }
        Ok(Response::TransactionsEnded { outcomes })
    }

    /// Stores an append's messages: ConsumeQueue rows, key-index rows, and timers
    /// for the delayed ones.
    fn store_append(
        &mut self,
        state: &SmState,
        wb: &mut WriteBatch,
        raft_index: u64,
        batch: &AppendBatch,
    ) -> io::Result<Response> {
        let first = self.next_offset(state, &batch.topic, batch.queue_id)?;
        let key_cf = state.cf(CF_KEY);
        let qk = queue_key(&batch.topic, batch.queue_id);
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
                self.cq_runs.put(state, wb, &qk, next, &row)?;
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
        if row.raft_index <= self.horizon {
            // Its record is past retention: a row would name nothing.
            return Ok(None);
        }
        self.ensure_system_topic(state, wb, topic)?;
        match self.topics.get(topic) {
            Some(t) if queue_id < t.queues => {}
            _ => return Ok(None),
        }
        let at = self.next_offset(state, topic, queue_id)?;
        self.cq_runs.put(state, wb, &queue_key(topic, queue_id), at, &row)?;
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
            message_type: crate::command::TopicMessageType::Mixed,
            trace: false,
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

    fn acl_mut(&self) -> std::sync::RwLockWriteGuard<'_, AclState> {
        self.shared.acl.write().unwrap_or_else(|p| p.into_inner())
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
                for cf in [CF_KEY, CF_QMAX, CF_QMIN] {
                    wb.delete_range_cf(state.cf(cf), &from, &to);
                }
                cq::delete_topic(state, wb, name)?;
                self.cq_runs.forget_topic(name);
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
            Command::EndTransactions {
                ends,
                source,
                store_timestamp_ms,
            } => self.apply_end_transactions(state, wb, raft_index, ends, *source, *store_timestamp_ms),
            Command::TransactionsChecked { ids, next_check_ms } => {
                let checked =
                    self.shared
                        .txn
                        .write()
                        .unwrap_or_else(|p| p.into_inner())
                        .checked(state, wb, ids, *next_check_ms);
                Ok(Response::TransactionsChecked { checked })
            }
            Command::UpsertConsumerGroup(c) => {
                self.shared
                    .pop
                    .write()
                    .unwrap_or_else(|p| p.into_inner())
                    .upsert_config(state, wb, c)?;
                Ok(Response::ConsumerGroupUpserted)
            }
            Command::Retain { upto, reason } => self.apply_retain(state, wb, *upto, reason),
            Command::PutUser(u) => {
                let existed = self.acl_mut().put_user(state, wb, u)?;
                Ok(Response::AclChanged { existed })
            }
            Command::DeleteUser { access_key } => {
                let existed = self.acl_mut().delete_user(state, wb, access_key);
                Ok(Response::AclChanged { existed })
            }
            Command::PutAclRule(r) => {
                let existed = self.acl_mut().put_rule(state, wb, r)?;
                Ok(Response::AclChanged { existed })
            }
            Command::DeleteAclRule {
                access_key,
                kind,
                pattern,
            } => {
                let existed = self.acl_mut().delete_rule(state, wb, access_key, *kind, pattern);
                Ok(Response::AclChanged { existed })
            }
        }
    }

    /// Moves the retention horizon to `upto`: drops each queue's rows written by
    /// entries at or below it (a prefix, rows being in that order) and records
    /// the queue's new minimum, drops pending timers and half messages whose
    /// record is gone and POP deliveries of dropped rows. Reads the
    /// ConsumeQueues from RocksDB, so the caller has written every earlier
    /// entry of the batch first. Moved rows above the prefix whose original
    /// record is gone (a retry of an old message) stay until a later horizon
    /// covers them; reads skip them meanwhile.
    fn apply_retain(&mut self, state: &SmState, wb: &mut WriteBatch, upto: u64, reason: &str) -> io::Result<Response> {
        if upto <= self.horizon {
            return Ok(Response::Retained {
                horizon: self.horizon,
                advanced: false,
            });
        }
        let qmin = state.cf(CF_QMIN);
        let mut queues = Vec::new();
        for item in state.db.iterator_cf(state.cf(CF_QMAX), rocksdb::IteratorMode::Start) {
            let (k, v) = item.map_err(rocks_io("scan queue ends"))?;
            queues.push((k.to_vec(), u64_value(&v)?));
        }
        let mut mins: HashMap<(String, u32), u64> = HashMap::new();
        let mut rows_dropped = 0u64;
        for (qk, next) in queues {
            let Some((topic, queue_id)) = split_queue_key(&qk) else {
                continue;
            };
            let min = match state.get(CF_QMIN, &qk)? {
                Some(v) => u64_value(&v)?,
                None => 0,
            };
            let row_at = |offset: u64| cq::get(state, &topic, queue_id, offset);
            // The first row written after the horizon: rows are in the order of
            // the entries that wrote them.
            let (mut lo, mut hi) = (min, next.max(min));
            while lo < hi {
                let mid = lo + (hi - lo) / 2;
                match row_at(mid)? {
                    Some(r) if r.applied_index > upto => hi = mid,
                    _ => lo = mid + 1,
                }
            }
            if lo > min {
                cq::trim(state, wb, &topic, queue_id, min, lo)?;
                wb.put_cf(qmin, &qk, lo.to_le_bytes());
                rows_dropped += lo - min;
                mins.insert((topic, queue_id), lo);
            }
        }
        if let Some(boundary) = cq::drop_epochs_at_or_below(state, wb, upto)? {
            self.cq_files_below = Some(boundary);
        }
        let timers_dropped = timers::drop_through(state, wb, upto)?;
        let inflight_dropped = self.pop_mut().retain(state, wb, &mins);
        let halves_dropped = self
            .shared
            .txn
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .drop_through(state, wb, upto);
        wb.put_cf(state.cf(CF_META), KEY_HORIZON, upto.to_le_bytes());
        tracing::info!(
            upto,
            reason,
            rows_dropped,
            queues_trimmed = mins.len(),
            timers_dropped,
            inflight_dropped,
            halves_dropped,
            "retention horizon moved"
        );
        self.horizon = upto;
        Ok(Response::Retained {
            horizon: upto,
            advanced: true,
        })
    }

    /// Writes an apply batch with the id of its last entry (and a membership
    /// it changed), atomically through RocksDB's WAL.
    fn write_applied(
        state: &SmState,
        mut wb: WriteBatch,
        last: LogId,
        membership: Option<StoredMembership>,
    ) -> io::Result<()> {
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
        state.db.write_opt(wb, &opts).map_err(rocks_io("apply write"))
    }
}

/// `(topic, queue)` of a `queue_key`.
fn split_queue_key(k: &[u8]) -> Option<(String, u32)> {
    let (topic, q) = k.split_at(k.len().checked_sub(5)?);
    if q[0] != 0 {
        return None;
    }
    Some((
        String::from_utf8(topic.to_vec()).ok()?,
        u32::from_be_bytes(q[1..].try_into().ok()?),
    ))
}

pub(crate) fn load_topics(state: &SmState) -> io::Result<HashMap<String, TopicConfig>> {
    let mut topics = HashMap::new();
    for item in state.db.iterator_cf(state.cf(CF_TOPIC), rocksdb::IteratorMode::Start) {
        let (_, v) = item.map_err(rocks_io("scan topics"))?;
        let t: TopicConfig = serde_json::from_slice(&v).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        topics.insert(t.name.clone(), t);
    }
    Ok(topics)
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotData = SnapshotData;
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
        // Timed from the first entry's arrival, not from the call: openraft may
        // call with a stream that is still waiting for its entries.
        let mut started = None;
        let mut replies = Vec::new();
        let mut last = None;
        let mut membership = None;
        let horizon_before = self.horizon;
        while let Some(item) = entries.next().await {
            let (entry, responder) = item?;
            started.get_or_insert_with(std::time::Instant::now);
            if let (EntryPayload::Normal(Command::Retain { .. }), Some(done)) = (&entry.payload, last) {
                // Retention reads the ConsumeQueues from RocksDB: write what this
                // batch applied so far first, with its own applied id, so the
                // split is as atomic as two batches.
                self.cq_runs.persist(&state, &mut wb);
                Self::write_applied(&state, std::mem::take(&mut wb), done, membership.take())?;
                self.timer_overlay.clear();
            }
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
            if self.cq_runs.closed_epoch().is_some() {
                // The ConsumeQueue epoch is full: write what is applied so far,
                // then start a new memtable, so the next epoch's rows land in
                // other files (see cq.rs). As atomic as two batches, like the
                // split before retention.
                self.cq_runs.persist(&state, &mut wb);
                Self::write_applied(&state, std::mem::take(&mut wb), entry.log_id, membership.take())?;
                self.timer_overlay.clear();
                cq::switch_memtable_at_epoch_end(&state);
            }
        }
        let Some(last) = last else { return Ok(()) };
        self.cq_runs.persist(&state, &mut wb);
        Self::write_applied(&state, wb, last, membership)?;
        if let Some(boundary) = self.cq_files_below.take() {
            state.cq_dropped_below.store(boundary, Ordering::Release);
            cq::delete_files_below(&state, boundary);
        }
        if self.horizon != horizon_before {
            state.horizon.store(self.horizon, Ordering::Release);
            self.shared.horizon.send_replace(self.horizon);
        }
        for (responder, response) in replies {
            if let Some(r) = responder {
                r.send(response);
            }
        }
        if let Some(started) = started {
            self.shared.apply_seconds.observe_duration(started.elapsed());
        }
        Ok(())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        SnapshotBuilder::new(self.shared.clone())
    }

    async fn install_snapshot(&mut self, meta: &SnapshotMeta, snapshot: SnapshotData) -> Result<(), io::Error> {
        let shared = self.shared.clone();
        let meta = meta.clone();
        tokio::task::spawn_blocking(move || snapshot::install_data(&shared, &meta, snapshot))
            .await
            .map_err(io::Error::other)??;
        self.next_offsets.clear();
        self.cq_runs.clear();
        let current = self.shared.current();
        self.topics = load_topics(&current)?;
        *self.pop_mut() = PopState::load(&current)?;
        self.dedup = Dedup::load(&current)?;
        *self.shared.txn.write().unwrap_or_else(|p| p.into_inner()) = TxnState::load(&current)?;
        self.shared.txn_added.notify_one();
        *self.shared.acl.write().unwrap_or_else(|p| p.into_inner()) = AclState::load(&current)?;
        self.horizon = current.horizon();
        self.shared.horizon.send_replace(self.horizon);
        Ok(())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<openraft::alias::SnapshotOf<TypeConfig, SnapshotData>>, io::Error> {
        // A lookup in memory: the snapshot was found at open or built since.
        snapshot::current(&self.shared)
    }
}
