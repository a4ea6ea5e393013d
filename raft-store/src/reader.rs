//! The read side of the state machine for the broker: topics, queue offsets,
//! consumer offsets, messages by queue offset, id or key (ConsumeQueue row ->
//! CommitLog or snapshot archive record -> message), due timers, POP state and
//! transactions.
//! Reads never go through Raft: they see this replica's applied state.

use std::io;
use std::sync::Arc;

use crate::command::{AppendBatch, Command, Message, MessageRef, TimerKey, TopicConfig, tag_hash};
use crate::layout::*;
use crate::pop::PopState;
use crate::state_machine::{SmShared, SmState, load_topics, rocks_io};
use crate::transactions::TxnState;
use crate::{LogId, cq, entry_codec, timers};

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

/// One segment file of a replica's retained records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoredSegment {
    pub info: crate::segment::SegmentInfo,
    /// In the snapshot archive (received in a snapshot), not the CommitLog.
    pub archive: bool,
    /// The CommitLog segment being written: never deleted.
    pub active: bool,
}

/// A cloneable read handle for the broker (pull, admin, queries).
#[derive(Clone)]
pub struct StoreReader {
    shared: Arc<SmShared>,
}

impl StoreReader {
    pub(crate) fn new(shared: Arc<SmShared>) -> StoreReader {
        StoreReader { shared }
    }

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
    /// wants both reads the next offset first and caps this by it. The scan
    /// starts at the minimum retention recorded, so it never walks the
    /// tombstones of trimmed rows.
    pub fn queue_min_offset(&self, topic: &str, queue_id: u32) -> io::Result<u64> {
        let first = {
            let state = self.shared.current();
            let prefix = queue_key(topic, queue_id);
            let trimmed_to = match state.get(CF_QMIN, &prefix)? {
                Some(v) => u64_value(&v)?,
                None => 0,
            };
            let mut first = None;
            cq::scan(&state, topic, queue_id, trimmed_to, 1, |offset, _| {
                first = Some(offset);
                Ok(false)
            })?;
            first
        };
        match first {
            Some(offset) => Ok(offset),
            None => self.queue_next_offset(topic, queue_id),
        }
    }

    /// Number of ConsumeQueue rows across all queues (for checks and admin).
    /// Rows retention dropped but RocksDB still holds (cq.rs drops them without
    /// tombstones) are not counted: those of dropped epochs and of trimmed prefixes.
    pub fn consume_queue_rows(&self) -> io::Result<u64> {
        let state = self.shared.current();
        let (from, horizon) = (state.cq_dropped_below().to_be_bytes(), state.horizon());
        let mut n = 0;
        let mode = rocksdb::IteratorMode::From(&from, rocksdb::Direction::Forward);
        for item in state.db.iterator_cf(state.cf(CF_CQ_ROWS), mode) {
            let (_, v) = item.map_err(rocks_io("scan ConsumeQueue"))?;
            if CqRow::decode(&v)?.applied_index > horizon {
                n += 1;
            }
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
        let horizon = state.horizon();
        let mut rows = Vec::new();
        let mut scanned_to = offset;
        cq::scan(&state, topic, queue_id, offset, max_rows, |off, v| {
            scanned_to = off + 1;
            let row = CqRow::decode(v)?;
            // A moved row (a retry) whose original record retention removed
            // names nothing any more: skipped like a filtered one.
            if row.raft_index > horizon && tag_hashes.is_none_or(|h| h.contains(&row.tag_hash)) {
                rows.push((off, row));
            }
            Ok(true)
        })?;
        Ok((self.resolve(&state, topic, queue_id, rows)?, scanned_to))
    }

    /// Messages of `topic` carrying `key`, oldest first, with where they live.
    pub fn messages_by_key(&self, topic: &str, key: &str, max: usize) -> io::Result<Vec<StoredMessage>> {
        let state = self.shared.current();
        let prefix = key_prefix(topic, key);
        let horizon = state.horizon();
        let mut found = Vec::new();
        let iter = state.db.prefix_iterator_cf(state.cf(CF_KEY), &prefix);
        for item in iter {
            let (k, _) = item.map_err(rocks_io("scan key index"))?;
            if !k.starts_with(&prefix) || k.len() != prefix.len() + 12 || found.len() >= max {
                break;
            }
            let index = u64::from_be_bytes(k[prefix.len()..prefix.len() + 8].try_into().expect("8 bytes"));
            let pos = u32::from_be_bytes(k[prefix.len() + 8..].try_into().expect("4 bytes"));
            // Rows of trimmed entries wait for compaction to drop them.
            if index > horizon {
                found.push((index, pos));
            }
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
        let Some(batch) = self.append_at(state, index)? else {
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
            // Not among its entry's rows: a committed half message landed later,
            // and says where like a fired timer (one more read, on this miss only).
            return timers::fired_offset(state, index, pos);
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

    /// The message entry `index` stored at `pos` as stored, without looking for
    /// its queue offset (0): for a half message, which has none yet.
    pub fn message_record(&self, index: u64, pos: u32) -> io::Result<Option<StoredMessage>> {
        let state = self.shared.current();
        let Some(batch) = self.append_at(&state, index)? else {
            return Ok(None);
        };
        Ok(batch
            .messages
            .into_iter()
            .nth(pos as usize)
            .map(|message| StoredMessage {
                topic: batch.topic,
                queue_id: batch.queue_id,
                queue_offset: 0,
                raft_index: index,
                batch_pos: pos,
                store_timestamp_ms: batch.store_timestamp_ms,
                message,
                reconsume_times: 0,
                origin: None,
            }))
    }

    /// Reads the transaction state (pending half messages, outcomes, totals).
    pub fn with_txn<R>(&self, f: impl FnOnce(&TxnState) -> R) -> R {
        f(&self.shared.txn.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// Completes after an apply stores a half message (or a snapshot replaces
    /// the transaction state). Create it before reading, then await it.
    pub fn txn_added(&self) -> tokio::sync::futures::Notified<'_> {
        self.shared.txn_added.notified()
    }

    /// What a ConsumeQueue row of the message named by a message id holds, for
    /// moving it (retry, dead letter); `None` when not retained.
    pub fn message_ref(&self, index: u64, pos: u32) -> io::Result<Option<(String, MessageRef)>> {
        let state = self.shared.current();
        let Some(batch) = self.append_at(&state, index)? else {
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

    /// Runs `f` over the applied users and ACL rules.
    pub fn with_acl<R>(&self, f: impl FnOnce(&crate::acl::AclState) -> R) -> R {
        f(&self.shared.acl.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// Runs `f` over the applied POP state and consumer-group configs.
    pub fn with_pop<R>(&self, f: impl FnOnce(&PopState) -> R) -> R {
        f(&self.shared.pop.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// The applied retention horizon: every entry at or below it is trimmed
    /// (0 when nothing ever was).
    pub fn retention_horizon(&self) -> u64 {
        self.shared.current().horizon()
    }

    /// The retention horizon the current snapshot honours: it carries no
    /// record at or below it (0 when there is no snapshot).
    pub fn snapshot_horizon(&self) -> u64 {
        self.shared.snapshot_horizon.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Follows the applied retention horizon, for the task that frees the disk
    /// after it moves (and finishes an interrupted cleanup after a restart).
    pub fn horizon_watch(&self) -> tokio::sync::watch::Receiver<u64> {
        self.shared.horizon.subscribe()
    }

    /// How long apply batches took.
    pub fn apply_seconds(&self) -> &crate::stats::AtomicHistogram {
        &self.shared.apply_seconds
    }

    /// RocksDB's integer `properties` of every column family, for the metrics
    /// endpoint: (column family, property, value). A property RocksDB does not
    /// know is left out. Reads in-memory counters only; no I/O.
    pub fn rocksdb_properties(&self, properties: &[&str]) -> Vec<(&'static str, String, u64)> {
        let state = self.shared.current();
        let mut out = Vec::new();
        for cf in crate::layout::CFS {
            let Some(handle) = state.db.cf_handle(cf) else { continue };
            for p in properties {
                if let Ok(Some(v)) = state.db.property_int_value_cf(handle, *p) {
                    out.push((cf, (*p).to_owned(), v));
                }
            }
        }
        out
    }

    /// RocksDB's estimate of the pending timers (delayed messages and retries
    /// not yet due): the timer column family's key count, which is exact once
    /// compacted and never needs a scan.
    pub fn pending_timers_estimate(&self) -> u64 {
        let state = self.shared.current();
        state
            .db
            .property_int_value_cf(state.cf(crate::timers::CF_TIMER), "rocksdb.estimate-num-keys")
            .ok()
            .flatten()
            .unwrap_or(0)
    }

    /// Every segment file holding this replica's retained records, oldest
    /// first: the snapshot archive's, then the CommitLog's (whose last one is
    /// being written). The two may overlap in index after a snapshot install.
    pub fn segments(&self) -> Vec<StoredSegment> {
        let state = self.shared.current();
        let mut out: Vec<StoredSegment> = state
            .archive()
            .infos()
            .into_iter()
            .map(|i| StoredSegment {
                info: i,
                archive: true,
                active: false,
            })
            .collect();
        let log = self.shared.log.segment_infos();
        let n = log.len();
        out.extend(log.into_iter().enumerate().map(|(at, i)| StoredSegment {
            info: i,
            archive: false,
            active: at + 1 == n,
        }));
        out
    }

    /// The store time of the newest record in `first..next` that has one
    /// (appends, timer firings and other stamped commands), looking back at most
    /// 1024 records from the end; `None` when none does.
    pub fn newest_store_ms(&self, first: u64, next: u64) -> io::Result<Option<u64>> {
        let state = self.shared.current();
        let mut end = next;
        while end > first && next - end < 1024 {
            let start = end.saturating_sub(64).max(first);
            let recs = self.shared.read_records(&state, start, end)?;
            for (h, payload) in recs.into_iter().rev() {
                if let Some(ms) = entry_codec::decode_command(&h, payload)?.and_then(|c| c.store_time_ms()) {
                    return Ok(Some(ms));
                }
            }
            end = start;
        }
        Ok(None)
    }

    /// The store time of the oldest retained message: of the first append
    /// above the horizon, looking at most 1024 entries ahead.
    pub fn oldest_message_ms(&self) -> io::Result<Option<u64>> {
        let state = self.shared.current();
        let archive_first = state.archive().first_index();
        let Some(held) = archive_first.or(self.shared.log.physical_range().map(|(f, _)| f)) else {
            return Ok(None);
        };
        let start = held.max(state.horizon().saturating_add(1));
        // Small chunks: the first entry is almost always an append.
        for from in (start..start + 1024).step_by(16) {
            let chunk = self.shared.read_records(&state, from, from + 16)?;
            if chunk.is_empty() {
                break;
            }
            for (h, payload) in chunk {
                if let Some(Command::Append(b)) = entry_codec::decode_command(&h, payload)? {
                    return Ok(Some(b.store_timestamp_ms));
                }
            }
        }
        Ok(None)
    }

    /// Frees the disk below the applied horizon `upto` (at most the applied
    /// one): deletes whole CommitLog segments at or below it, never above the
    /// log's purge point, and whole archive segments at or below it. Makes the
    /// applied state durable first, so a power loss cannot bring back a state
    /// machine that still needs what is deleted. Returns the segments deleted
    /// (log, archive).
    pub async fn free_through(&self, upto: u64) -> io::Result<(usize, usize)> {
        let state = self.shared.current();
        let upto = upto.min(state.horizon());
        if upto == 0 {
            return Ok((0, 0));
        }
        let flushed = state.clone();
        tokio::task::spawn_blocking(move || flushed.db.flush_wal(true).map_err(rocks_io("flush WAL")))
            .await
            .map_err(io::Error::other)??;
        let log = self.shared.log.apply_retention(upto).await?;
        let archive = tokio::task::spawn_blocking(move || state.archive_mut().remove_through(upto))
            .await
            .map_err(io::Error::other)??;
        if archive > 0 {
            tracing::info!(upto, segments = archive, "retention deleted snapshot-archive segments");
        }
        Ok((log, archive))
    }

    fn cq_row(&self, state: &SmState, topic: &str, queue_id: u32, offset: u64) -> io::Result<Option<CqRow>> {
        cq::get(state, topic, queue_id, offset)
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

    /// The append entry `index` holds; `None` when it is not retained or not an append.
    fn append_at(&self, state: &SmState, index: u64) -> io::Result<Option<AppendBatch>> {
        if index <= state.horizon() {
            // Trimmed by retention, whether or not its segment is deleted yet.
            return Ok(None);
        }
        match self.read_command(state, index) {
            Ok(Some(Command::Append(batch))) => Ok(Some(batch)),
            Ok(_) => Ok(None),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
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
