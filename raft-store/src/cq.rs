//! The ConsumeQueues' rows in RocksDB, filed by epoch: where a queue's row for an
//! offset lives, how a queue is scanned, trimmed and deleted, and the one-time
//! move of rows from the earlier queue-first layout.
//!
//! Why epochs: a row's key used to be `queue, offset`. With several queues being
//! appended at once, every memtable flush produced a file spanning all of them,
//! which overlapped every older file of the queues in between, so leveled
//! compaction rewrote the whole ConsumeQueue again and again (write amplification
//! 4.1 after ten minutes and rising with each level; at 10^8 messages it took
//! 65-73 % of the 2 cores and the send rate fell 37 %). Now a row's key starts
//! with its epoch, a number that only grows: an epoch holds 2^16 rows (more when
//! one entry carries more) and the next one opens with the next entry that adds
//! a row, so an entry's rows never straddle two epochs.
//!
//! Why whole entries: the state machine switches the `cq_rows` memtable only
//! between epochs ([`RunCache::closed_epoch`]), so no two flushed files share
//! an epoch, no file overlaps an older one, and RocksDB moves every file down
//! its levels without rewriting it (a "trivial move"), as RocketMQ's flat
//! ConsumeQueue files are never rewritten. With epochs cut by row count alone,
//! consecutive flushes shared one epoch and compaction still rewrote the newest
//! levels: the 10^8 run's send rate fell 16 % from its first minute to its last.
//!
//! Retention writes no tombstone into `cq_rows` either (a range tombstone's file
//! spans from key 0 to the newest row and overlaps everything): it records the
//! epoch below which rows are dropped, deletes the files wholly below it, and a
//! compaction filter drops the rest when compaction meets them. Rows of a
//! queue's trimmed prefix inside the boundary epoch stay until a later horizon
//! drops that epoch; reads never reach them ([`get`] and [`scan`] stop at the
//! retention horizon and the queue's minimum).
//!
//! The epoch and its row count are state-machine state (a meta row written
//! with every apply batch), so a restart files the next row in the epoch every
//! replica files it in. A queue's rows are a run of offsets in each epoch it was
//! written in; `cq_runs` records, per queue, the first offset of each run and
//! its epoch, so a lookup by offset is one `seek_for_prev` there and one read
//! here. `cq_epochs` records the index of the entry that opened each epoch,
//! which tells retention which epochs lie wholly at or below its horizon.

use std::collections::HashMap;
use std::io;

use rocksdb::WriteBatch;

use crate::layout::*;
use crate::state_machine::{SmState, rocks_io};

/// Rows per epoch: 2^16 (about 4 MiB of rows). Small enough that the memtable
/// can be switched at an epoch's end long before it is full; large enough that
/// the run index gains one row per queue per 65,536 rows. Not entries: under
/// load one entry carries a hundred messages or more.
#[cfg(not(test))]
pub(crate) const CQ_EPOCH_SHIFT: u32 = 16;
/// Four rows per epoch, so unit tests cross epochs with a few rows.
#[cfg(test)]
pub(crate) const CQ_EPOCH_SHIFT: u32 = 2;
const EPOCH_ROWS: u64 = 1 << CQ_EPOCH_SHIFT;

/// Meta row: the current epoch (le64) and the rows filed in it (le64).
const KEY_EPOCH: &[u8] = b"cq_epoch";
/// Meta row of the layout before whole-entry epochs: rows ever stored (le64),
/// whose top bits were the epoch. Read once when `KEY_EPOCH` is missing.
const KEY_ROWS_STORED: &[u8] = b"cq_rows_stored";
/// Meta row: epochs below this (le64) were dropped by retention; the
/// compaction filter removes their rows and snapshots leave them out.
pub(crate) const KEY_DROPPED_BELOW: &[u8] = b"cq_dropped_below";

#[cfg(test)]
fn epoch_of(rows_stored: u64) -> u64 {
    rows_stored >> CQ_EPOCH_SHIFT
}

/// The epoch of a `cq_rows` key (its first 8 bytes).
pub(crate) fn key_epoch(key: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(key.get(..8)?.try_into().ok()?))
}

/// `first applied index_be64 -> epoch_le64` in `cq_epochs`.
fn epoch_start_key(applied_index: u64) -> [u8; 8] {
    applied_index.to_be_bytes()
}

/// `epoch_be64 topic 0 queue_be32 offset_be64`.
fn row_key(epoch: u64, qk: &[u8], offset: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(8 + qk.len() + 8);
    k.extend_from_slice(&epoch.to_be_bytes());
    k.extend_from_slice(qk);
    k.extend_from_slice(&offset.to_be_bytes());
    k
}

/// `topic 0 queue_be32 first_offset_be64 -> epoch_le64`.
fn run_key(qk: &[u8], first_offset: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(qk.len() + 8);
    k.extend_from_slice(qk);
    k.extend_from_slice(&first_offset.to_be_bytes());
    k
}

/// `(first offset, epoch)` of a run-index row of queue `qk`; `None` for another queue's.
fn parse_run(qk: &[u8], k: &[u8], v: &[u8]) -> io::Result<Option<(u64, u64)>> {
    if !k.starts_with(qk) || k.len() != qk.len() + 8 {
        return Ok(None);
    }
    let first = u64::from_be_bytes(k[qk.len()..].try_into().expect("8 bytes"));
    Ok(Some((first, u64_value(v)?)))
}

/// The state machine's ConsumeQueue writer: the current epoch and its row
/// count (loaded from their meta row, written back with each batch), the entry
/// that wrote the last row (so its further rows stay in its epoch) and, per
/// queue (by `queue_key`), the epoch of its newest run, so a run-index row is
/// written only when a queue enters an epoch. Keyed by bytes so the per-row
/// lookup allocates nothing.
#[derive(Default)]
pub(crate) struct RunCache {
    runs: HashMap<Vec<u8>, u64>,
    /// `(epoch, rows filed in it)`.
    epoch: Option<(u64, u64)>,
    last_entry: Option<u64>,
    /// The last full epoch [`RunCache::closed_epoch`] reported.
    reported: Option<u64>,
    dirty: bool,
}

impl RunCache {
    /// Forgets everything cached (after a snapshot is installed).
    pub(crate) fn clear(&mut self) {
        *self = RunCache::default();
    }

    pub(crate) fn forget_topic(&mut self, topic: &str) {
        let (from, _) = topic_range(topic);
        self.runs.retain(|qk, _| !qk.starts_with(&from));
    }

    /// Adds the epoch and its row count to `wb` if rows were put since the last
    /// call: every write of an apply batch carries them, so a restart files the
    /// next row exactly as the other replicas do.
    pub(crate) fn persist(&mut self, state: &SmState, wb: &mut WriteBatch) {
        if let (true, Some((epoch, rows))) = (self.dirty, self.epoch) {
            let mut v = [0u8; 16];
            v[..8].copy_from_slice(&epoch.to_le_bytes());
            v[8..].copy_from_slice(&rows.to_le_bytes());
            wb.put_cf(state.cf(CF_META), KEY_EPOCH, v);
            self.dirty = false;
        }
    }

    /// The current epoch once it is full, reported once: no later row goes
    /// into it, so the writes so far can be flushed into files of their own.
    pub(crate) fn closed_epoch(&mut self) -> Option<u64> {
        match self.epoch {
            Some((epoch, rows)) if rows >= EPOCH_ROWS && self.reported != Some(epoch) => {
                self.reported = Some(epoch);
                Some(epoch)
            }
            _ => None,
        }
    }

    fn load_epoch(state: &SmState) -> io::Result<(u64, u64)> {
        if let Some(v) = state.get(CF_META, KEY_EPOCH)? {
            let bad = || io::Error::new(io::ErrorKind::InvalidData, format!("ConsumeQueue epoch row {v:?}"));
            let epoch = u64::from_le_bytes(v.get(..8).ok_or_else(bad)?.try_into().map_err(|_| bad())?);
            let rows = u64::from_le_bytes(v.get(8..16).ok_or_else(bad)?.try_into().map_err(|_| bad())?);
            return Ok((epoch, rows));
        }
        let stored = match state.get(CF_META, KEY_ROWS_STORED)? {
            Some(v) => u64_value(&v)?,
            None => 0,
        };
        Ok((stored >> CQ_EPOCH_SHIFT, stored & (EPOCH_ROWS - 1)))
    }

    /// Writes the row at `offset` (the queue's next) of queue `qk` into `wb`,
    /// opening a new epoch when the current one is full and the row comes from
    /// a new entry, and a run when the row's epoch is newer than the queue's last.
    pub(crate) fn put(
        &mut self,
        state: &SmState,
        wb: &mut WriteBatch,
        qk: &[u8],
        offset: u64,
        row: &CqRow,
    ) -> io::Result<()> {
        let (mut epoch, mut rows) = match self.epoch {
            Some(e) => e,
            None => Self::load_epoch(state)?,
        };
        if rows >= EPOCH_ROWS && self.last_entry != Some(row.applied_index) {
            epoch += 1;
            rows = 0;
        }
        if rows == 0 {
            wb.put_cf(
                state.cf(CF_CQ_EPOCHS),
                epoch_start_key(row.applied_index),
                epoch.to_le_bytes(),
            );
        }
        self.epoch = Some((epoch, rows + 1));
        self.last_entry = Some(row.applied_index);
        self.dirty = true;
        let last = match self.runs.get(qk) {
            Some(&e) => Some(e),
            None => last_run(state, qk)?.map(|(_, e)| e),
        };
        if last != Some(epoch) {
            wb.put_cf(state.cf(CF_CQ_RUNS), run_key(qk, offset), epoch.to_le_bytes());
            self.runs.insert(qk.to_vec(), epoch);
        }
        wb.put_cf(state.cf(CF_CQ_ROWS), row_key(epoch, qk, offset), row.encode());
        Ok(())
    }
}

/// Below this, the active `cq_rows` memtable is not switched at an epoch's end:
/// the flush would make a small file for little gain. Half the write buffer
/// (RocksDB's 64 MiB default), so the switch comes before RocksDB's own, which
/// would cut an epoch in two.
#[cfg(not(test))]
const SWITCH_AT_BYTES: u64 = 32 << 20;
/// Any rows: unit tests switch at every epoch's end.
#[cfg(test)]
const SWITCH_AT_BYTES: u64 = 1;

/// Switches the `cq_rows` memtable at an epoch's end (the caller has written
/// every row of the epoch and none of the next), so the flushed file shares no
/// epoch with the next one. Skipped while the memtable is small, or while an
/// earlier one is still being flushed: RocksDB would wait for that flush here,
/// in the apply path, and the next epoch's end comes soon. True when switched.
pub(crate) fn switch_memtable_at_epoch_end(state: &SmState) -> bool {
    let cf = state.cf(CF_CQ_ROWS);
    let prop = |name: &str| state.db.property_int_value_cf(cf, name).ok().flatten().unwrap_or(0);
    if prop("rocksdb.cur-size-active-mem-table") < SWITCH_AT_BYTES || prop("rocksdb.num-immutable-mem-table") > 0 {
        return false;
    }
    let mut opts = rocksdb::FlushOptions::default();
    opts.set_wait(false);
    match state.db.flush_cf_opt(cf, &opts) {
        Ok(()) => true,
        Err(e) => {
            // Only compaction work is at stake: RocksDB flushes when the memtable is full.
            tracing::warn!(error = %e, "could not switch the ConsumeQueue memtable at an epoch's end");
            false
        }
    }
}

/// The queue's newest run, from RocksDB.
fn last_run(state: &SmState, qk: &[u8]) -> io::Result<Option<(u64, u64)>> {
    let mut it = state.db.raw_iterator_cf(state.cf(CF_CQ_RUNS));
    it.seek_for_prev(run_key(qk, u64::MAX));
    current_run(&it, qk)
}

fn current_run(it: &rocksdb::DBRawIterator<'_>, qk: &[u8]) -> io::Result<Option<(u64, u64)>> {
    if !it.valid() {
        it.status().map_err(rocks_io("scan ConsumeQueue runs"))?;
        return Ok(None);
    }
    match (it.key(), it.value()) {
        (Some(k), Some(v)) => parse_run(qk, k, v),
        _ => Ok(None),
    }
}

/// The row at `offset` of a queue, if the queue holds it.
pub(crate) fn get(state: &SmState, topic: &str, queue_id: u32, offset: u64) -> io::Result<Option<CqRow>> {
    let qk = queue_key(topic, queue_id);
    let mut it = state.db.raw_iterator_cf(state.cf(CF_CQ_RUNS));
    it.seek_for_prev(run_key(&qk, offset));
    let Some((_, epoch)) = current_run(&it, &qk)? else {
        return Ok(None);
    };
    let Some(row) = state
        .get(CF_CQ_ROWS, &row_key(epoch, &qk, offset))?
        .map(|v| CqRow::decode(&v))
        .transpose()?
    else {
        return Ok(None);
    };
    // A row of the queue's trimmed prefix, left in the boundary epoch (see the
    // module's note): trimmed rows are exactly those written at or below the horizon.
    Ok((row.applied_index > state.horizon()).then_some(row))
}

/// Visits up to `max_rows` rows of a queue from `from` on, in offset order, as
/// `(offset, encoded row)`; the visitor returns false to stop early.
pub(crate) fn scan(
    state: &SmState,
    topic: &str,
    queue_id: u32,
    from: u64,
    max_rows: usize,
    mut visit: impl FnMut(u64, &[u8]) -> io::Result<bool>,
) -> io::Result<()> {
    if max_rows == 0 {
        return Ok(());
    }
    let qk = queue_key(topic, queue_id);
    // Rows below the queue's minimum may still be stored (see the module's note).
    let from = match state.get(CF_QMIN, &qk)? {
        Some(v) => from.max(u64_value(&v)?),
        None => from,
    };
    let mut runs = state.db.raw_iterator_cf(state.cf(CF_CQ_RUNS));
    runs.seek_for_prev(run_key(&qk, from));
    if current_run(&runs, &qk)?.is_none() {
        // `from` is below the queue's first run (trimmed, or never written).
        runs.seek(&qk);
    }
    let mut rows = state.db.raw_iterator_cf(state.cf(CF_CQ_ROWS));
    let mut seen = 0;
    while let Some((first, epoch)) = current_run(&runs, &qk)? {
        let mut prefix = epoch.to_be_bytes().to_vec();
        prefix.extend_from_slice(&qk);
        rows.seek(row_key(epoch, &qk, from.max(first)));
        while rows.valid() {
            let (Some(k), Some(v)) = (rows.key(), rows.value()) else {
                break;
            };
            if !k.starts_with(&prefix) || k.len() != prefix.len() + 8 {
                break;
            }
            let offset = u64::from_be_bytes(k[prefix.len()..].try_into().expect("8 bytes"));
            if !visit(offset, v)? {
                return Ok(());
            }
            seen += 1;
            if seen >= max_rows {
                return Ok(());
            }
            rows.next();
        }
        rows.status().map_err(rocks_io("scan ConsumeQueue"))?;
        runs.next();
    }
    Ok(())
}

/// Drops the runs of a queue that end at or below `lo`, its new minimum (rows
/// below it were written by entries at or below the horizon). The rows stay:
/// those of epochs wholly below the horizon go with [`drop_epochs_at_or_below`],
/// the rest with a later one, and reads stop at the minimum meanwhile. `min`
/// is the queue's previous minimum.
pub(crate) fn trim(
    state: &SmState,
    wb: &mut WriteBatch,
    topic: &str,
    queue_id: u32,
    min: u64,
    lo: u64,
) -> io::Result<()> {
    let qk = queue_key(topic, queue_id);
    let mut runs = state.db.raw_iterator_cf(state.cf(CF_CQ_RUNS));
    runs.seek_for_prev(run_key(&qk, min));
    if current_run(&runs, &qk)?.is_none() {
        runs.seek(&qk);
    }
    // The first offset of the run holding `lo`: runs before it are emptied.
    let mut keep_from = None;
    while let Some((first, _)) = current_run(&runs, &qk)? {
        if first >= lo {
            if first == lo {
                keep_from = Some(lo);
            }
            break;
        }
        keep_from = Some(first);
        runs.next();
    }
    // Otherwise the last run starting below `lo` may hold `lo` and later rows; it
    // is kept (its rows below `lo` are never read again). So is a queue's newest
    // run, which `RunCache` relies on.
    if let Some(keep) = keep_from {
        wb.delete_range_cf(state.cf(CF_CQ_RUNS), run_key(&qk, 0), run_key(&qk, keep));
    }
    Ok(())
}

/// Drops every row of every epoch whose rows were all written by entries at or
/// below `upto`: those before the newest epoch opened at or below it (an epoch's
/// rows come from the entries between its opening and the next one's). Records
/// that epoch as the boundary, with no tombstone in `cq_rows`: once the batch is
/// written, the caller publishes it to the compaction filter and deletes the
/// files wholly below it ([`delete_files_below`]). Returns the boundary when it moved.
pub(crate) fn drop_epochs_at_or_below(state: &SmState, wb: &mut WriteBatch, upto: u64) -> io::Result<Option<u64>> {
    let mut it = state.db.raw_iterator_cf(state.cf(CF_CQ_EPOCHS));
    it.seek_for_prev(epoch_start_key(upto));
    if !it.valid() {
        it.status().map_err(rocks_io("scan ConsumeQueue epochs"))?;
        return Ok(None);
    }
    let (Some(k), Some(v)) = (it.key(), it.value()) else {
        return Ok(None);
    };
    let (opened_at, boundary) = (k.to_vec(), u64_value(v)?);
    if boundary == 0 {
        return Ok(None);
    }
    wb.put_cf(state.cf(CF_META), KEY_DROPPED_BELOW, boundary.to_le_bytes());
    wb.delete_range_cf(
        state.cf(CF_CQ_EPOCHS),
        epoch_start_key(0).as_slice(),
        opened_at.as_slice(),
    );
    Ok(Some(boundary))
}

/// Deletes the files that hold only rows of epochs below `boundary`, which a
/// written [`drop_epochs_at_or_below`] dropped: their space comes back now, and
/// compaction never reads them. Files holding the boundary epoch too keep
/// their dropped rows until compaction filters them or a later boundary passes.
pub(crate) fn delete_files_below(state: &SmState, boundary: u64) {
    if let Err(e) = state
        .db
        .delete_file_in_range_cf(state.cf(CF_CQ_ROWS), 0u64.to_be_bytes(), boundary.to_be_bytes())
    {
        // Only space is at stake: the rows are unreachable either way.
        tracing::warn!(error = %e, boundary, "could not delete trimmed ConsumeQueue files");
    }
}

/// Deletes every row and run of a topic.
pub(crate) fn delete_topic(state: &SmState, wb: &mut WriteBatch, topic: &str) -> io::Result<()> {
    let (from, to) = topic_range(topic);
    let mut epochs = Vec::new();
    let mut runs = state.db.raw_iterator_cf(state.cf(CF_CQ_RUNS));
    runs.seek(&from);
    while runs.valid() {
        let (Some(k), Some(v)) = (runs.key(), runs.value()) else {
            break;
        };
        if k >= to.as_slice() {
            break;
        }
        epochs.push(u64_value(v)?);
        runs.next();
    }
    runs.status().map_err(rocks_io("scan ConsumeQueue runs"))?;
    epochs.sort_unstable();
    epochs.dedup();
    for epoch in epochs {
        let (mut lo, mut hi) = (epoch.to_be_bytes().to_vec(), epoch.to_be_bytes().to_vec());
        lo.extend_from_slice(&from);
        hi.extend_from_slice(&to);
        wb.delete_range_cf(state.cf(CF_CQ_ROWS), lo, hi);
    }
    wb.delete_range_cf(state.cf(CF_CQ_RUNS), &from, &to);
    Ok(())
}

/// Moves rows of the earlier queue-first layout (`cq`: `topic 0 queue offset`),
/// from a data directory or a snapshot written before epochs, into the epoch
/// layout, then deletes them. Idempotent: a crash midway leaves the old rows,
/// and the next run writes the same keys again.
pub(crate) fn migrate_queue_first_rows(state: &SmState) -> io::Result<u64> {
    let legacy = state.cf(CF_CQ_QUEUE_FIRST);
    let mut it = state.db.raw_iterator_cf(legacy);
    it.seek_to_first();
    if !it.valid() {
        it.status().map_err(rocks_io("scan old ConsumeQueue"))?;
        return Ok(0);
    }
    let mut moved = 0u64;
    let mut wb = WriteBatch::default();
    let mut last: Option<Vec<u8>> = None;
    let mut lowest = u64::MAX;
    let mut first_key = None;
    let mut last_key = Vec::new();
    while it.valid() {
        let (Some(k), Some(v)) = (it.key(), it.value()) else {
            break;
        };
        let bad = || io::Error::new(io::ErrorKind::InvalidData, format!("old ConsumeQueue key {k:?}"));
        let qk_len = k.len().checked_sub(8).ok_or_else(bad)?;
        let (qk, offset) = k.split_at(qk_len);
        let offset = u64::from_be_bytes(offset.try_into().map_err(|_| bad())?);
        let row = CqRow::decode(v)?;
        // All old rows go to epoch 0, opened at the lowest index among them;
        // new rows start at epoch 1, so retention drops epoch 0 only once its
        // horizon passes every old row.
        let epoch = 0u64;
        lowest = lowest.min(row.applied_index);
        if last.as_ref().is_none_or(|q| q.as_slice() != qk) {
            wb.put_cf(state.cf(CF_CQ_RUNS), run_key(qk, offset), epoch.to_le_bytes());
            last = Some(qk.to_vec());
        }
        wb.put_cf(state.cf(CF_CQ_ROWS), row_key(epoch, qk, offset), v);
        first_key.get_or_insert_with(|| k.to_vec());
        last_key = k.to_vec();
        moved += 1;
        if wb.len() >= 10_000 {
            state
                .db
                .write(std::mem::take(&mut wb))
                .map_err(rocks_io("write moved ConsumeQueue rows"))?;
        }
        it.next();
    }
    it.status().map_err(rocks_io("scan old ConsumeQueue"))?;
    wb.put_cf(state.cf(CF_CQ_EPOCHS), epoch_start_key(lowest), 0u64.to_le_bytes());
    let mut next_epoch = [0u8; 16];
    next_epoch[..8].copy_from_slice(&1u64.to_le_bytes());
    wb.put_cf(state.cf(CF_META), KEY_EPOCH, next_epoch);
    // After every moved row, in WAL order: a crash before this leaves them all.
    if let Some(first) = first_key {
        last_key.push(0);
        wb.delete_range_cf(legacy, first, last_key);
    }
    state.db.write(wb).map_err(rocks_io("write moved ConsumeQueue rows"))?;
    state.db.flush_wal(true).map_err(rocks_io("flush WAL"))?;
    tracing::info!(rows = moved, "moved ConsumeQueue rows into the epoch layout");
    Ok(moved)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A row written by entry `applied_index`; the queue offset is kept in the
    /// size field so a read can be checked against what was written.
    fn row(applied_index: u64, offset: u64) -> CqRow {
        CqRow {
            raft_index: applied_index,
            batch_pos: 0,
            size: offset as u32,
            tag_hash: 7,
            store_timestamp_ms: 1_000 + offset,
            applied_index,
            reconsume_times: 0,
        }
    }

    fn open(dir: &std::path::Path) -> SmState {
        SmState::open(dir, 1 << 20).expect("open state")
    }

    fn offsets(state: &SmState, topic: &str, queue: u32, from: u64, max: usize) -> Vec<u64> {
        let mut out = Vec::new();
        scan(state, topic, queue, from, max, |offset, v| {
            let r = CqRow::decode(v)?;
            assert_eq!(r.size as u64, offset, "row filed under the wrong offset");
            out.push(offset);
            Ok(true)
        })
        .expect("scan");
        out
    }

    fn count(state: &SmState, cf: &str) -> usize {
        state.db.iterator_cf(state.cf(cf), rocksdb::IteratorMode::Start).count()
    }

    /// Three queues written in turn, one entry per row, entries 20,000 apart:
    /// with four rows per epoch (in tests), a queue changes epoch every one or
    /// two rows, as it does under a long produce run with many queues.
    fn fill(state: &SmState) {
        let mut cache = RunCache::default();
        let mut wb = WriteBatch::default();
        let mut index = 1;
        for offset in 0..30u64 {
            for (topic, queue) in [("T", 0), ("T", 1), ("U", 0)] {
                cache
                    .put(state, &mut wb, &queue_key(topic, queue), offset, &row(index, offset))
                    .expect("put");
                index += 20_000;
            }
        }
        cache.persist(state, &mut wb);
        state.db.write(wb).expect("write");
    }

    /// The newest epoch opened, from `cq_epochs`.
    fn newest_epoch(state: &SmState) -> u64 {
        let (_, v) = state
            .db
            .iterator_cf(state.cf(CF_CQ_EPOCHS), rocksdb::IteratorMode::End)
            .next()
            .expect("an epoch")
            .expect("read");
        u64_value(&v).expect("epoch")
    }

    #[test]
    fn a_queue_reads_in_order_across_epochs_and_by_offset() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = open(dir.path());
        fill(&state);
        assert_eq!(offsets(&state, "T", 0, 0, 100), (0..30).collect::<Vec<_>>());
        // Starting inside a run and stopping after a few rows, across a boundary.
        assert_eq!(offsets(&state, "T", 1, 7, 5), vec![7, 8, 9, 10, 11]);
        assert_eq!(offsets(&state, "U", 0, 29, 5), vec![29]);
        assert!(offsets(&state, "T", 0, 30, 5).is_empty());
        assert!(offsets(&state, "T", 2, 0, 5).is_empty(), "a queue never written");
        for offset in 0..30 {
            let r = get(&state, "T", 0, offset).expect("get").expect("row present");
            assert_eq!(r.size as u64, offset);
        }
        assert_eq!(get(&state, "T", 0, 30).expect("get"), None);
        // One run row per queue per epoch entered, not one per row.
        let entered: std::collections::HashSet<(u64, u64)> = (0..90u64).map(|c| (c % 3, epoch_of(c))).collect();
        assert_eq!(count(&state, CF_CQ_RUNS), entered.len());
        assert_eq!(newest_epoch(&state), epoch_of(89));
        drop(state);
        // After a restart the count of rows is read back: the next row is the
        // 91st, in the epoch every replica puts it in, not back at epoch 0.
        let state = open(dir.path());
        let mut cache = RunCache::default();
        let mut wb = WriteBatch::default();
        let last = get(&state, "U", 0, 29).expect("get").expect("row").applied_index;
        cache
            .put(&state, &mut wb, &queue_key("T", 0), 30, &row(last + 1, 30))
            .expect("put");
        cache.persist(&state, &mut wb);
        state.db.write(wb).expect("write");
        assert_eq!(newest_epoch(&state), epoch_of(90));
        assert_eq!(offsets(&state, "T", 0, 28, 10), vec![28, 29, 30]);
    }

    /// The row key's epoch of every stored row of queue `qk`, in offset order.
    fn epochs_of(state: &SmState, qk: &[u8]) -> Vec<u64> {
        let mut rows: Vec<(u64, u64)> = state
            .db
            .iterator_cf(state.cf(CF_CQ_ROWS), rocksdb::IteratorMode::Start)
            .map(|item| item.expect("row").0)
            .filter(|k| k[8..].starts_with(qk))
            .map(|k| {
                (
                    u64::from_be_bytes(k[k.len() - 8..].try_into().expect("offset")),
                    key_epoch(&k).expect("epoch"),
                )
            })
            .collect();
        rows.sort_unstable();
        rows.into_iter().map(|(_, e)| e).collect()
    }

    #[test]
    fn an_entrys_rows_share_one_epoch_and_a_full_epoch_is_reported_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = open(dir.path());
        let qk = queue_key("T", 0);
        let mut cache = RunCache::default();
        let mut wb = WriteBatch::default();
        let mut offset = 0;
        let mut closed = Vec::new();
        // Entries of 3, 6, 1 and 3 rows (four rows per epoch in tests).
        for (index, rows) in [(10u64, 3u64), (11, 6), (12, 1), (13, 3)] {
            for _ in 0..rows {
                cache
                    .put(&state, &mut wb, &qk, offset, &row(index, offset))
                    .expect("put");
                offset += 1;
            }
            closed.push(cache.closed_epoch());
            assert_eq!(cache.closed_epoch(), None, "reported twice");
        }
        cache.persist(&state, &mut wb);
        state.db.write(wb).expect("write");
        // Entry 11 overfills epoch 0 rather than cross into epoch 1; entry 12
        // opens epoch 1, and entry 13 fills it.
        assert_eq!(epochs_of(&state, &qk), vec![0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1]);
        assert_eq!(closed, vec![None, Some(0), None, Some(1)]);
        drop(state);
        // After a restart the full epoch is read back: the next entry opens epoch 2.
        let state = open(dir.path());
        let mut cache = RunCache::default();
        let mut wb = WriteBatch::default();
        cache.put(&state, &mut wb, &qk, offset, &row(14, offset)).expect("put");
        cache.persist(&state, &mut wb);
        state.db.write(wb).expect("write");
        assert_eq!(epochs_of(&state, &qk).last(), Some(&2));
        assert_eq!(newest_epoch(&state), 2);
        assert_eq!(offsets(&state, "T", 0, 0, 100), (0..14).collect::<Vec<_>>());
    }

    /// What #18's 10^8 run needs of the epochs: the memtable switched at every
    /// epoch's end gives files that share no epoch, so RocksDB moves them down
    /// its levels without rewriting any (a rewrite would merge them into fewer,
    /// larger files), and they never overlap.
    #[test]
    fn files_flushed_at_epoch_ends_are_moved_down_not_rewritten() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = open(dir.path());
        let mut cache = RunCache::default();
        let mut switches = 0;
        // Entries of three rows over eight queues, so every epoch (four rows in
        // tests) is overfilled by its last entry and queues interleave in each.
        for offset in 0..60u64 {
            let index = offset + 1;
            let mut wb = WriteBatch::default();
            for q in 0..3u32 {
                let queue = (offset as u32 * 3 + q) % 8;
                cache
                    .put(&state, &mut wb, &queue_key("T", queue), offset, &row(index, offset))
                    .expect("put");
            }
            cache.persist(&state, &mut wb);
            state.db.write(wb).expect("write");
            if cache.closed_epoch().is_some() {
                // As the state machine does after the entry that fills an epoch.
                let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
                while state
                    .db
                    .property_int_value_cf(state.cf(CF_CQ_ROWS), "rocksdb.num-immutable-mem-table")
                    .expect("property")
                    != Some(0)
                {
                    assert!(std::time::Instant::now() < deadline, "a flush never finished");
                    std::thread::yield_now();
                }
                switches += usize::from(switch_memtable_at_epoch_end(&state));
            }
        }
        assert!(switches >= 20, "only {switches} switches");
        // Let compaction finish what the files triggered (four L0 files start one).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        let prop = |name: &str| {
            state
                .db
                .property_int_value_cf(state.cf(CF_CQ_ROWS), name)
                .expect("property")
                .unwrap_or(0)
        };
        while prop("rocksdb.num-immutable-mem-table") > 0
            || prop("rocksdb.compaction-pending") > 0
            || prop("rocksdb.num-running-compactions") > 0
            || prop("rocksdb.num-running-flushes") > 0
        {
            assert!(std::time::Instant::now() < deadline, "compaction never settled");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let files: Vec<_> = state
            .db
            .live_files()
            .expect("live files")
            .into_iter()
            .filter(|f| f.column_family_name == CF_CQ_ROWS)
            .collect();
        assert_eq!(files.len(), switches, "files were merged: {files:?}");
        assert!(files.iter().any(|f| f.level > 0), "nothing left L0: {files:?}");
        let mut spans: Vec<(u64, u64)> = files
            .iter()
            .map(|f| {
                let epoch = |k: &Option<Vec<u8>>| key_epoch(k.as_deref().expect("key")).expect("epoch");
                (epoch(&f.start_key), epoch(&f.end_key))
            })
            .collect();
        spans.sort_unstable();
        for pair in spans.windows(2) {
            assert!(pair[0].1 < pair[1].0, "files share an epoch: {spans:?}");
        }
        assert_eq!(offsets(&state, "T", 5, 0, 100).len(), 22);
    }

    #[test]
    fn trimming_and_deleting_leave_exactly_the_rest() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = open(dir.path());
        fill(&state);
        // Retention at entry 630,000: rows 0-31 (by the count) were written at or
        // below it. Epoch 7 (rows 28-31) opened at entry 560,001, so epochs 0-6
        // go at once, then each queue's prefix up to its first later row.
        let upto = 630_000;
        let mut wb = WriteBatch::default();
        let boundary = drop_epochs_at_or_below(&state, &mut wb, upto).expect("drop");
        assert_eq!(boundary, Some(7));
        let mut lows = Vec::new();
        for (topic, queue) in [("T", 0), ("T", 1), ("U", 0)] {
            let lo = (0..30)
                .find(|&o| get(&state, topic, queue, o).expect("get").expect("row").applied_index > upto)
                .expect("a later row");
            trim(&state, &mut wb, topic, queue, 0, lo).expect("trim");
            lows.push(lo);
        }
        // What the state machine writes with them: the horizon and each queue's minimum.
        wb.put_cf(state.cf(CF_META), KEY_HORIZON, upto.to_le_bytes());
        for ((topic, queue), lo) in [("T", 0), ("T", 1), ("U", 0)].into_iter().zip(&lows) {
            wb.put_cf(state.cf(CF_QMIN), queue_key(topic, queue), lo.to_le_bytes());
        }
        // No tombstone goes into `cq_rows`: a flush of it would span every epoch.
        let rows_before = count(&state, CF_CQ_ROWS);
        state.db.write(wb).expect("write");
        state.load_horizon().expect("load horizon");
        assert_eq!(state.cq_dropped_below(), 7);
        state.db.flush_cf(state.cf(CF_CQ_ROWS)).expect("flush");
        assert_eq!(count(&state, CF_CQ_ROWS), rows_before, "rows deleted by a tombstone");
        delete_files_below(&state, 7);
        for ((topic, queue), lo) in [("T", 0), ("T", 1), ("U", 0)].into_iter().zip(lows) {
            assert_eq!(offsets(&state, topic, queue, 0, 100), (lo..30).collect::<Vec<_>>());
            assert_eq!(get(&state, topic, queue, lo - 1).expect("get"), None);
            // Reading from below the minimum starts at the minimum.
            assert_eq!(offsets(&state, topic, queue, lo - 1, 1), vec![lo]);
        }
        // Compaction drops the rows of the dropped epochs (0-6): what stays is
        // epoch 7 on (rows 28-89), four of them trimmed but not yet dropped.
        state
            .db
            .compact_range_cf(state.cf(CF_CQ_ROWS), None::<&[u8]>, None::<&[u8]>);
        assert_eq!(count(&state, CF_CQ_ROWS), 62);
        assert_eq!(19 + 19 + 20 + 4, 62);

        let mut wb = WriteBatch::default();
        delete_topic(&state, &mut wb, "T").expect("delete");
        wb.delete_cf(state.cf(CF_QMIN), queue_key("T", 0));
        wb.delete_cf(state.cf(CF_QMIN), queue_key("T", 1));
        state.db.write(wb).expect("write");
        assert!(offsets(&state, "T", 0, 0, 100).is_empty());
        assert!(offsets(&state, "T", 1, 0, 100).is_empty());
        assert_eq!(offsets(&state, "U", 0, 0, 100).len(), 20);
        // U's 20 rows, and T's 4 trimmed rows of epoch 7 (its runs there were
        // trimmed away, so deleting the topic does not see them).
        assert_eq!(count(&state, CF_CQ_ROWS), 24);
        let u = queue_key("U", 0);
        let runs: Vec<_> = state
            .db
            .iterator_cf(state.cf(CF_CQ_RUNS), rocksdb::IteratorMode::Start)
            .map(|item| item.expect("run").0)
            .collect();
        assert!(!runs.is_empty() && runs.iter().all(|k| k.starts_with(&u)), "{runs:?}");
    }

    #[test]
    fn rows_of_the_queue_first_layout_move_on_open() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let state = open(dir.path());
            let mut wb = WriteBatch::default();
            for (topic, queue) in [("T", 0), ("T", 3)] {
                for offset in 0..40u64 {
                    let mut k = queue_key(topic, queue);
                    k.extend_from_slice(&offset.to_be_bytes());
                    let r = row(1 + offset * 10_000 + queue as u64, offset);
                    wb.put_cf(state.cf(CF_CQ_QUEUE_FIRST), k, r.encode());
                }
            }
            state.db.write(wb).expect("write");
        }
        let state = open(dir.path());
        assert_eq!(count(&state, CF_CQ_QUEUE_FIRST), 0);
        assert_eq!(count(&state, CF_CQ_ROWS), 80);
        for queue in [0, 3] {
            assert_eq!(offsets(&state, "T", queue, 0, 100), (0..40).collect::<Vec<_>>());
            let r = get(&state, "T", queue, 39).expect("get").expect("row");
            assert_eq!(r.applied_index, 1 + 39 * 10_000 + queue as u64);
        }
        // Appends after the move continue the queue's runs.
        let mut cache = RunCache::default();
        let mut wb = WriteBatch::default();
        cache
            .put(&state, &mut wb, &queue_key("T", 0), 40, &row(1_000_000, 40))
            .expect("put");
        cache.persist(&state, &mut wb);
        state.db.write(wb).expect("write");
        assert_eq!(offsets(&state, "T", 0, 38, 10), vec![38, 39, 40]);
        // The old rows are epoch 0, dropped whole once the horizon passes them all.
        let mut wb = WriteBatch::default();
        assert_eq!(drop_epochs_at_or_below(&state, &mut wb, 390_004).expect("drop"), None);
        assert_eq!(
            drop_epochs_at_or_below(&state, &mut wb, 1_000_000).expect("drop"),
            Some(1)
        );
    }
}
