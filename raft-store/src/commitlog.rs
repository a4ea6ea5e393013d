//! The CommitLog as openraft's `RaftLogStorage`: segment files plus the flusher
//! thread that turns writes into group-committed fsyncs, and the durable vote,
//! committed and purge markers. See the crate docs for the design.

use std::fs::File;
use std::io;
use std::ops::{Bound, RangeBounds};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use openraft::storage::{IOFlushed, RaftLogStorage};
use openraft::{LogState, OptionalSend, RaftLogReader};

use crate::durable;
use crate::entry_codec;
use crate::record::Header;
use crate::segment::SegmentSet;
use crate::{Entry, Error, FlushMode, LogId, StoreConfig, TypeConfig, Vote, log_id, term_of};

const VOTE_FILE: &str = "vote.json";
const COMMITTED_FILE: &str = "committed.json";
const PURGED_FILE: &str = "purged.json";
/// The committed id is an optimisation (see crate docs); persisting it at most this
/// often keeps its fsyncs from competing with the log's.
const COMMITTED_PERSIST_INTERVAL: Duration = Duration::from_millis(100);

/// Counters of the flusher, for benchmarks and metrics.
#[derive(Debug)]
pub struct FlushStats {
    /// `fdatasync` calls on segment files.
    pub fsyncs: AtomicU64,
    /// `append` calls whose records those fsyncs covered.
    pub appends: AtomicU64,
    /// How long each flush round's `fdatasync`s took together.
    pub fsync_seconds: crate::stats::AtomicHistogram,
    /// Appends one flush round made durable: the group commit's size.
    pub group_commit_appends: crate::stats::AtomicHistogram,
}

impl Default for FlushStats {
    fn default() -> Self {
        FlushStats {
            fsyncs: AtomicU64::new(0),
            appends: AtomicU64::new(0),
            fsync_seconds: crate::stats::AtomicHistogram::latency(),
            group_commit_appends: crate::stats::AtomicHistogram::sizes(),
        }
    }
}

struct Meta {
    vote: Option<Vote>,
    committed: Option<LogId>,
    purged: Option<LogId>,
}

struct Shared {
    dir: PathBuf,
    segments: RwLock<SegmentSet>,
    meta: Mutex<Meta>,
    stats: FlushStats,
}

impl Shared {
    fn segments_read(&self) -> std::sync::RwLockReadGuard<'_, SegmentSet> {
        // A panic while holding the lock cannot leave the segment table half-updated
        // in a way that matters more than the panic itself; keep serving.
        self.segments.read().unwrap_or_else(|p| p.into_inner())
    }

    fn segments_write(&self) -> std::sync::RwLockWriteGuard<'_, SegmentSet> {
        self.segments.write().unwrap_or_else(|p| p.into_inner())
    }

    fn meta(&self) -> std::sync::MutexGuard<'_, Meta> {
        self.meta.lock().unwrap_or_else(|p| p.into_inner())
    }
}

enum Job {
    /// Make `files` durable, then report through `done`.
    Sync {
        files: Vec<Arc<File>>,
        done: Option<IOFlushed<TypeConfig>>,
    },
    /// Completes once every job queued before it has completed.
    Barrier(mpsc::SyncSender<io::Result<()>>),
    Committed(Option<LogId>),
}

/// A replica's Raft log. Owned by openraft; readers are cheap clones.
pub struct CommitLog {
    shared: Arc<Shared>,
    flush: FlushMode,
    jobs: mpsc::Sender<Job>,
    flusher: Option<std::thread::JoinHandle<()>>,
}

/// A read handle on the CommitLog, shared with openraft's log reader, the state
/// machine and the snapshot builder.
#[derive(Clone)]
pub struct CommitLogReader {
    shared: Arc<Shared>,
}

fn read_json<T: serde::de::DeserializeOwned>(dir: &Path, name: &str) -> Result<Option<T>, Error> {
    let path = dir.join(name);
    match durable::read_optional(&path).map_err(Error::io("reading", &path))? {
        None => Ok(None),
        Some(bytes) => serde_json::from_slice(&bytes).map_err(|e| Error::Io {
            action: "parsing",
            path,
            source: io::Error::new(io::ErrorKind::InvalidData, e),
        }),
    }
}

fn write_json<T: serde::Serialize>(dir: &Path, name: &str, value: &T) -> io::Result<()> {
    let bytes = serde_json::to_vec(value).map_err(io::Error::other)?;
    durable::write_atomic(dir, name, &bytes)
}

impl CommitLog {
    /// Opens the log under `dir`, recovering its tail (see [`SegmentSet::open`]).
    pub async fn open(dir: PathBuf, config: &StoreConfig) -> Result<CommitLog, Error> {
        let segment_bytes = config.segment_bytes;
        let flush = config.flush;
        tokio::task::spawn_blocking(move || Self::open_blocking(dir, segment_bytes, flush))
            .await
            .map_err(|e| Error::Io {
                action: "opening CommitLog (task failed)",
                path: PathBuf::new(),
                source: io::Error::other(e),
            })?
    }

    fn open_blocking(dir: PathBuf, segment_bytes: u64, flush: FlushMode) -> Result<CommitLog, Error> {
        std::fs::create_dir_all(&dir).map_err(Error::io("creating", &dir))?;
        let seg_dir = dir.join("segments");
        let segments = SegmentSet::open(&seg_dir, segment_bytes).map_err(Error::io("opening", &seg_dir))?;
        let meta = Meta {
            vote: read_json(&dir, VOTE_FILE)?,
            committed: read_json(&dir, COMMITTED_FILE)?,
            purged: read_json(&dir, PURGED_FILE)?,
        };
        tracing::info!(
            dir = %dir.display(),
            segments = segments.segment_count(),
            first_index = ?segments.first_index(),
            last_index = ?segments.last_index(),
            purged = ?meta.purged,
            "opened CommitLog"
        );
        let shared = Arc::new(Shared {
            dir,
            segments: RwLock::new(segments),
            meta: Mutex::new(meta),
            stats: FlushStats::default(),
        });
        let (jobs, rx) = mpsc::channel();
        let flusher_shared = shared.clone();
        let flusher = std::thread::Builder::new()
            .name("commitlog-flush".into())
            .spawn(move || run_flusher(flusher_shared, rx))
            .map_err(Error::io("starting flusher thread for", shared.dir.clone()))?;
        Ok(CommitLog {
            shared,
            flush,
            jobs,
            flusher: Some(flusher),
        })
    }

    pub fn reader(&self) -> CommitLogReader {
        CommitLogReader {
            shared: self.shared.clone(),
        }
    }

    pub fn stats(&self) -> &FlushStats {
        &self.shared.stats
    }

    /// Waits until every write so far is durable.
    pub async fn sync(&self) -> io::Result<()> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.jobs
            .send(Job::Barrier(tx))
            .map_err(|_| io::Error::other("CommitLog flusher has stopped"))?;
        tokio::task::spawn_blocking(move || rx.recv())
            .await
            .map_err(io::Error::other)?
            .map_err(|_| io::Error::other("CommitLog flusher has stopped"))?
    }

    /// Retention: deletes whole segments whose records all have index <= `upto`,
    /// but never above the purge point (entries openraft may still replicate from
    /// the log). Returns how many segments were deleted.
    pub async fn apply_retention(&self, upto: u64) -> io::Result<usize> {
        self.sync().await?;
        self.reader().apply_retention(upto).await
    }

    /// Flushes outstanding writes and stops the flusher thread.
    pub async fn shutdown(mut self) -> io::Result<()> {
        self.sync().await?;
        self.stop_flusher();
        Ok(())
    }

    fn stop_flusher(&mut self) {
        // Closing the channel ends the flusher loop after it drains queued jobs.
        let (dead, _) = mpsc::channel();
        drop(std::mem::replace(&mut self.jobs, dead));
        if let Some(h) = self.flusher.take() {
            let _ = h.join();
        }
    }
}

impl Drop for CommitLog {
    fn drop(&mut self) {
        self.stop_flusher();
    }
}

fn run_flusher(shared: Arc<Shared>, rx: mpsc::Receiver<Job>) {
    let mut pending_committed: Option<Option<LogId>> = None;
    let mut committed_written_at = Instant::now() - COMMITTED_PERSIST_INTERVAL;
    loop {
        let first = if pending_committed.is_some() {
            let wait = COMMITTED_PERSIST_INTERVAL.saturating_sub(committed_written_at.elapsed());
            match rx.recv_timeout(wait) {
                Ok(job) => Some(job),
                Err(mpsc::RecvTimeoutError::Timeout) => None,
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        } else {
            match rx.recv() {
                Ok(job) => Some(job),
                Err(_) => break,
            }
        };
        let mut batch: Vec<Job> = first.into_iter().collect();
        batch.extend(rx.try_iter());

        let mut files: Vec<Arc<File>> = Vec::new();
        for job in &batch {
            if let Job::Sync { files: fs, .. } = job {
                for f in fs {
                    if !files.iter().any(|g| Arc::ptr_eq(f, g)) {
                        files.push(f.clone());
                    }
                }
            }
        }
        let synced_at = Instant::now();
        let result = files.iter().try_for_each(|f| f.sync_data());
        if !files.is_empty() {
            shared.stats.fsync_seconds.observe_duration(synced_at.elapsed());
        }
        if let Err(e) = &result {
            tracing::error!(error = %e, "fdatasync of CommitLog segment failed");
        }
        shared.stats.fsyncs.fetch_add(files.len() as u64, Ordering::Relaxed);
        let copy = || match &result {
            Ok(()) => Ok(()),
            Err(e) => Err(io::Error::new(e.kind(), format!("CommitLog fdatasync failed: {e}"))),
        };
        let appends = batch.iter().filter(|j| matches!(j, Job::Sync { .. })).count();
        if appends > 0 {
            shared.stats.group_commit_appends.observe(appends as f64);
        }
        for job in batch {
            match job {
                Job::Sync { done, .. } => {
                    shared.stats.appends.fetch_add(1, Ordering::Relaxed);
                    if let Some(done) = done {
                        done.io_completed(copy());
                    }
                }
                Job::Barrier(tx) => {
                    let _ = tx.send(copy());
                }
                Job::Committed(c) => pending_committed = Some(c),
            }
        }
        if let Some(c) = &pending_committed
            && committed_written_at.elapsed() >= COMMITTED_PERSIST_INTERVAL
        {
            if let Err(e) = write_json(&shared.dir, COMMITTED_FILE, c) {
                tracing::warn!(error = %e, "persisting committed log id failed; will retry");
            } else {
                pending_committed = None;
            }
            committed_written_at = Instant::now();
        }
    }
    if let Some(c) = pending_committed
        && let Err(e) = write_json(&shared.dir, COMMITTED_FILE, &c)
    {
        tracing::warn!(error = %e, "persisting committed log id at shutdown failed");
    }
}

fn resolve_range(range: &impl RangeBounds<u64>) -> (u64, u64) {
    let start = match range.start_bound() {
        Bound::Included(&s) => s,
        Bound::Excluded(&s) => s.saturating_add(1),
        Bound::Unbounded => 0,
    };
    let end = match range.end_bound() {
        Bound::Included(&e) => e.saturating_add(1),
        Bound::Excluded(&e) => e,
        Bound::Unbounded => u64::MAX,
    };
    (start, end)
}

impl CommitLogReader {
    /// Raw records `start..end` clamped to what is physically held, including
    /// entries below the logical purge point. For the message read path and
    /// snapshots, which need retained data openraft no longer tracks.
    pub fn read_records(&self, start: u64, end: u64) -> io::Result<Vec<(Header, Bytes)>> {
        let segs = self.shared.segments_read();
        let (Some(first), Some(last)) = (segs.first_index(), segs.last_index()) else {
            return Ok(Vec::new());
        };
        let (start, end) = (start.max(first), end.min(last + 1));
        let mut out = Vec::with_capacity(end.saturating_sub(start) as usize);
        if start < end {
            segs.read_range(start, end, &mut out)?;
        }
        Ok(out)
    }

    /// Retention from a read handle (the broker holds no `CommitLog`, openraft
    /// owns it): deletes whole segments whose records all have index <= `upto`,
    /// never above the purge point. Returns how many were deleted.
    ///
    /// No flush first, unlike [`CommitLog::apply_retention`]: a segment can only
    /// qualify when every record in it is at or below the purge point, and a
    /// purged record was applied, so flushed long ago (sealed segments are
    /// fsynced when they roll; a queued fsync of a deleted file is harmless).
    pub async fn apply_retention(&self, upto: u64) -> io::Result<usize> {
        let limit = match &self.shared.meta().purged {
            Some(p) => p.index.min(upto),
            None => return Ok(0),
        };
        let shared = self.shared.clone();
        let removed = tokio::task::spawn_blocking(move || shared.segments_write().remove_through(limit))
            .await
            .map_err(io::Error::other)??;
        if removed > 0 {
            tracing::info!(upto = limit, segments = removed, "retention deleted CommitLog segments");
        }
        Ok(removed)
    }

    /// Hard-links the segments holding records `start..end` into `dst` (see
    /// [`SegmentSet::link_range`]), under the segment table's lock so no
    /// retention or truncation runs meanwhile.
    pub(crate) fn link_range(
        &self,
        start: u64,
        end: u64,
        dst: &Path,
        prefix: &str,
    ) -> io::Result<(Vec<crate::segment::LinkedSegment>, Option<Arc<File>>)> {
        self.shared.segments_read().link_range(start, end, dst, prefix)
    }

    /// The flusher's counters and histograms.
    pub fn stats(&self) -> &FlushStats {
        &self.shared.stats
    }

    /// Every segment's extent, oldest first; the last is the one being written.
    pub fn segment_infos(&self) -> Vec<crate::segment::SegmentInfo> {
        self.shared.segments_read().infos()
    }

    /// (first, last) index physically held.
    pub fn physical_range(&self) -> Option<(u64, u64)> {
        let segs = self.shared.segments_read();
        Some((segs.first_index()?, segs.last_index()?))
    }

    /// The logical purge point (entries at or below it are not served to openraft).
    pub fn purged(&self) -> Option<LogId> {
        self.shared.meta().purged
    }

    pub fn dir(&self) -> &Path {
        &self.shared.dir
    }
}

impl RaftLogReader<TypeConfig> for CommitLogReader {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + std::fmt::Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, io::Error> {
        let (mut start, end) = resolve_range(&range);
        if let Some(p) = self.purged() {
            start = start.max(p.index + 1);
        }
        self.read_records(start, end)?
            .into_iter()
            .map(|(h, payload)| entry_codec::decode_entry(&h, payload))
            .collect()
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, io::Error> {
        Ok(self.shared.meta().vote)
    }
}

impl RaftLogStorage<TypeConfig> for CommitLog {
    type LogReader = CommitLogReader;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, io::Error> {
        let purged = self.shared.meta().purged;
        let segs = self.shared.segments_read();
        let last = match segs.last_index() {
            Some(i) if purged.is_none_or(|p| i > p.index) => Some(log_id(segs.last_term(), i)),
            _ => purged,
        };
        Ok(LogState {
            last_purged_log_id: purged,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.reader()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), io::Error> {
        let dir = self.shared.dir.clone();
        let v = *vote;
        // The vote must be on disk before openraft acts on it (grants it, or
        // campaigns with it): a forgotten vote lets a node vote twice in one term.
        tokio::task::spawn_blocking(move || write_json(&dir, VOTE_FILE, &v))
            .await
            .map_err(io::Error::other)??;
        self.shared.meta().vote = Some(*vote);
        Ok(())
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), io::Error> {
        self.shared.meta().committed = committed;
        self.jobs
            .send(Job::Committed(committed))
            .map_err(|_| io::Error::other("CommitLog flusher has stopped"))
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, io::Error> {
        let (committed, purged) = {
            let m = self.shared.meta();
            (m.committed, m.purged)
        };
        let Some(c) = committed else { return Ok(None) };
        if purged.is_some_and(|p| c.index <= p.index) {
            return Ok(Some(c));
        }
        // A torn tail may have cut entries the committed id names; only report an id
        // the log still holds, so openraft never re-applies what it cannot read.
        let segs = self.shared.segments_read();
        let held = segs.last_index().is_some_and(|l| c.index <= l)
            && segs.first_index().is_some_and(|f| f <= c.index)
            && segs.term_of(c.index)? == term_of(&c);
        Ok(held.then_some(c))
    }

    async fn append<I>(&mut self, entries: I, callback: IOFlushed<TypeConfig>) -> Result<(), io::Error>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut payloads: Vec<(u64, u64, Vec<u8>)> = Vec::new();
        for entry in entries {
            let mut buf = Vec::new();
            entry_codec::encode_payload(&entry, &mut buf)?;
            payloads.push((term_of(&entry.log_id), entry.log_id.index, buf));
        }
        let Some(&(_, first_index, _)) = payloads.first() else {
            callback.io_completed(Ok(()));
            return Ok(());
        };
        let purged = self.shared.meta().purged;
        let files = {
            let mut segs = self.shared.segments_write();
            let next = segs.last_index().map(|l| l + 1);
            if let Some(next) = next
                && first_index > next
            {
                // Only a snapshot install moves the purge point past the log's end;
                // then every held record is below it and the log restarts after it.
                if purged.is_some_and(|p| p.index + 1 == first_index) {
                    segs.clear()?;
                } else {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!("append of index {first_index} leaves a gap after index {}", next - 1),
                    ));
                }
            }
            segs.append(payloads.iter().map(|(t, i, p)| (*t, *i, p.as_slice())))?
        };
        let done = match self.flush {
            FlushMode::Sync => Some(callback),
            FlushMode::Async => {
                callback.io_completed(Ok(()));
                None
            }
        };
        self.jobs
            .send(Job::Sync { files, done })
            .map_err(|_| io::Error::other("CommitLog flusher has stopped"))
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogId>) -> Result<(), io::Error> {
        // Let queued flushes finish first, so no callback reports entries that the
        // truncation is about to remove as flushed afterwards.
        self.sync().await?;
        let from = last_log_id.map_or(0, |l| l.index + 1);
        let shared = self.shared.clone();
        tokio::task::spawn_blocking(move || shared.segments_write().truncate_from(from))
            .await
            .map_err(io::Error::other)?
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), io::Error> {
        let dir = self.shared.dir.clone();
        tokio::task::spawn_blocking(move || write_json(&dir, PURGED_FILE, &Some(log_id)))
            .await
            .map_err(io::Error::other)??;
        self.shared.meta().purged = Some(log_id);
        Ok(())
    }
}
