//! Retention and disk watermarks: the leader's loop that decides the retention
//! horizon (RocketMQ's `fileReservedTime`, a size cap per group, early cleaning
//! past `disk_clean_watermark`) and proposes it as one `Retain` command; every
//! replica's task that frees the disk once a horizon is applied (snapshot at or
//! past it, Raft log purge, segment deletion, in that order); and every
//! replica's disk monitor, which refuses client writes past
//! `disk_full_watermark` through one atomic flag ([`DiskState`]).
//!
//! The horizon is replicated state: a new leader starts from it, a restarted
//! replica finishes an interrupted cleanup from it, and a snapshot carries only
//! the records above it. Segments are deleted whole: the horizon is always the
//! last index of a sealed segment on the leader, and each replica deletes its own
//! segments lying wholly at or below it (their boundaries may differ, e.g. after
//! a snapshot install), never the one being written.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::async_runtime::WatchReceiver;
use raftmq_raft_store::{Command, StoredSegment};
use serde::{Deserialize, Serialize};
use tracing::Instrument;

use crate::api_error::ApiError;
use crate::error::Error;
use crate::group::GroupHandle;
use crate::messaging::now_ms;

/// How long freeing the disk waits for a snapshot covering the horizon.
const SNAPSHOT_WAIT: Duration = Duration::from_secs(120);
/// How long it waits for openraft to purge its log up to the horizon (a leader
/// purges only once no replication stream still reads those entries).
const PURGE_WAIT: Duration = Duration::from_secs(30);
/// The disk monitor looks at least this often, whatever `check_interval` says:
/// a fast producer must not fill the disk between two looks.
const MAX_DISK_CHECK: Duration = Duration::from_secs(1);

/// Where a node's disk usage comes from: `statvfs` of the data directory by
/// default; tests inject fake figures.
#[derive(Clone)]
pub struct DiskUsageSource(Arc<UsageFn>);

/// `(used, capacity)` bytes of the filesystem holding a path.
type UsageFn = dyn Fn(&Path) -> io::Result<(u64, u64)> + Send + Sync;

impl DiskUsageSource {
    /// A source answering `(used, capacity)` bytes for a path.
    pub fn new(f: impl Fn(&Path) -> io::Result<(u64, u64)> + Send + Sync + 'static) -> Self {
        DiskUsageSource(Arc::new(f))
    }

    /// The real one: the filesystem's `statvfs`, counted as `df` counts `Use%`.
    pub fn statvfs() -> Self {
        DiskUsageSource::new(raftmq_raft_store::disk::usage)
    }

    pub fn usage(&self, path: &Path) -> io::Result<(u64, u64)> {
        (self.0)(path)
    }
}

impl Default for DiskUsageSource {
    fn default() -> Self {
        DiskUsageSource::statvfs()
    }
}

impl std::fmt::Debug for DiskUsageSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DiskUsageSource")
    }
}

/// Retention and disk watermarks (the `[retention]` table of the settings).
// No `deny_unknown_fields`: the settings loader reports every unknown key
// with where it came from (`src/settings.rs`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct RetentionConfig {
    /// How often the leader reconsiders the horizon (and every replica retries
    /// an unfinished cleanup). Default 10 s, RocketMQ's `cleanResourceInterval`:
    /// segments are large, so nothing is gained by looking more often.
    #[serde(with = "humantime_serde")]
    pub check_interval: Duration,
    /// Messages are kept at least this long: a sealed segment whose newest
    /// record is older is deleted. Default 72 h, RocketMQ's `fileReservedTime`.
    #[serde(with = "humantime_serde")]
    pub file_reserved_time: Duration,
    /// Most bytes of records a broker group keeps; the oldest whole segments
    /// go first past it, whatever their age. Default unset (unlimited), as in
    /// RocketMQ, which caps only by time and disk.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_bytes: Option<u64>,
    /// Past this fraction of the data directory's filesystem in use, the leader
    /// deletes the oldest segments early, younger than `file_reserved_time`,
    /// until usage is estimated back under it. Default 0.75, RocketMQ's
    /// `diskMaxUsedSpaceRatio`.
    pub disk_clean_watermark: f64,
    /// At or past this fraction in use, the node refuses client writes that add
    /// data (RESOURCE_EXHAUSTED "disk full: ..."), until usage is back below.
    /// Default 0.90, RocketMQ's forced-clean ratio: the headroom above it is
    /// for RocksDB's flushes and compactions and for a snapshot received from
    /// the leader (a replica installing one writes its records into its archive).
    pub disk_full_watermark: f64,
    /// Tests only: where disk usage comes from. Default `statvfs`.
    #[serde(skip)]
    pub disk_usage: DiskUsageSource,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        RetentionConfig {
            check_interval: Duration::from_secs(10),
            file_reserved_time: Duration::from_secs(72 * 3600),
            max_bytes: None,
            disk_clean_watermark: 0.75,
            disk_full_watermark: 0.90,
            disk_usage: DiskUsageSource::default(),
        }
    }
}

impl RetentionConfig {
    /// Checks the settings; the error names the bad key and value.
    pub fn validate(&self) -> Result<(), Error> {
        let bad = |key: &'static str, value: String, reason: &str| Error::Config {
            key,
            value,
            reason: reason.to_owned(),
        };
        if self.check_interval < Duration::from_millis(10) || self.check_interval > Duration::from_secs(3600) {
            return Err(bad(
                "retention.check_interval",
                format!("{:?}", self.check_interval),
                "must be between 10 ms and 1 h",
            ));
        }
        if self.file_reserved_time.is_zero() {
            return Err(bad(
                "retention.file_reserved_time",
                "0".into(),
                "must be positive (messages would be deleted as soon as their segment is sealed)",
            ));
        }
        if self.max_bytes == Some(0) {
            return Err(bad(
                "retention.max_bytes",
                "0".into(),
                "must be positive; leave it unset for no size limit",
            ));
        }
        if !(self.disk_clean_watermark > 0.0 && self.disk_clean_watermark < 1.0) {
            return Err(bad(
                "retention.disk_clean_watermark",
                self.disk_clean_watermark.to_string(),
                "must be a fraction between 0 and 1 (exclusive)",
            ));
        }
        if !(self.disk_full_watermark > self.disk_clean_watermark && self.disk_full_watermark <= 1.0) {
            return Err(bad(
                "retention.disk_full_watermark",
                self.disk_full_watermark.to_string(),
                "must be above disk_clean_watermark and at most 1",
            ));
        }
        Ok(())
    }
}

/// This node's disk as the monitor last saw it. Cloned into the services; the
/// write path reads one atomic flag.
#[derive(Clone, Default)]
pub struct DiskState {
    inner: Arc<DiskInner>,
}

#[derive(Default)]
struct DiskInner {
    full: AtomicBool,
    /// Used fraction as f64 bits; `known` says whether it was ever measured.
    ratio_bits: AtomicU64,
    known: AtomicBool,
    /// Why writes are refused, while they are.
    refusal: Mutex<String>,
}

impl DiskState {
    /// RESOURCE_EXHAUSTED "disk full: ..." while the disk is past the full
    /// watermark. One relaxed atomic load when it is not.
    pub fn check_write(&self) -> Result<(), ApiError> {
        if !self.inner.full.load(Ordering::Relaxed) {
            return Ok(());
        }
        let why = self.inner.refusal.lock().unwrap_or_else(|p| p.into_inner()).clone();
        Err(ApiError::ResourceExhausted(why))
    }

    /// Whether writes are refused.
    pub fn is_full(&self) -> bool {
        self.inner.full.load(Ordering::Relaxed)
    }

    /// The used fraction of the data directory's filesystem, once measured.
    pub fn used_ratio(&self) -> Option<f64> {
        self.inner
            .known
            .load(Ordering::Relaxed)
            .then(|| f64::from_bits(self.inner.ratio_bits.load(Ordering::Relaxed)))
    }

    /// Records a measurement and sets the flag (returns whether it changed).
    fn record(&self, used: u64, total: u64, watermark: f64, path: &Path) -> Option<bool> {
        let ratio = if total == 0 { 0.0 } else { used as f64 / total as f64 };
        self.inner.ratio_bits.store(ratio.to_bits(), Ordering::Relaxed);
        self.inner.known.store(true, Ordering::Relaxed);
        let full = ratio >= watermark;
        if full {
            *self.inner.refusal.lock().unwrap_or_else(|p| p.into_inner()) = format!(
                "disk full: {:.1}% of the filesystem holding {} is used, at or above retention.disk_full_watermark {:.1}%; \
                 writes resume once usage is back below it",
                ratio * 100.0,
                path.display(),
                watermark * 100.0
            );
        }
        let was = self.inner.full.swap(full, Ordering::Relaxed);
        (was != full).then_some(full)
    }
}

/// One segment as the horizon decision sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seg {
    pub last_index: u64,
    pub bytes: u64,
    /// Store time of its newest record; `None` when unknown (never expires by time).
    pub newest_ms: Option<u64>,
    /// Sealed and applied (the segment being written never is).
    pub deletable: bool,
}

/// What the leader proposes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub upto: u64,
    /// Which limits asked for it, for the command and the logs.
    pub reason: String,
    /// Bytes of the segments the new horizon covers.
    pub bytes: u64,
}

/// The decision's inputs besides the segments.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub horizon: u64,
    pub now_ms: u64,
    pub reserved_ms: u64,
    pub max_bytes: Option<u64>,
    /// `(used, total)` bytes of the filesystem, when known.
    pub disk: Option<(u64, u64)>,
    pub clean_watermark: f64,
}

/// The horizon to propose: the last index of the longest prefix of whole,
/// deletable segments that time, size or disk pressure asks to drop; `None` when
/// nothing above the current horizon qualifies. `segs` is sorted by last index
/// (archive and log segments together); segments at or below the horizon are
/// already trimmed and count for nothing.
pub fn decide(segs: &[Seg], l: Limits) -> Option<Plan> {
    let retained: Vec<&Seg> = segs.iter().filter(|s| s.last_index > l.horizon).collect();
    let candidates: Vec<&Seg> = retained.iter().copied().take_while(|s| s.deletable).collect();
    let total: u64 = retained.iter().map(|s| s.bytes).sum();
    // How many candidates each limit wants gone.
    let by_time = candidates
        .iter()
        .take_while(|s| s.newest_ms.is_some_and(|t| t.saturating_add(l.reserved_ms) <= l.now_ms))
        .count();
    let drop_until = |excess: u64| {
        let mut freed = 0u64;
        candidates
            .iter()
            .take_while(|s| {
                let more = freed < excess;
                freed += s.bytes;
                more
            })
            .count()
    };
    let by_size = match l.max_bytes {
        Some(max) if total > max => drop_until(total - max),
        _ => 0,
    };
    let by_disk = match l.disk {
        Some((used, size)) if size > 0 && used as f64 > l.clean_watermark * size as f64 => {
            drop_until(used - (l.clean_watermark * size as f64) as u64)
        }
        _ => 0,
    };
    let n = by_time.max(by_size).max(by_disk);
    if n == 0 {
        return None;
    }
    let mut reasons = Vec::new();
    if by_time > 0 {
        reasons.push(format!("older than {} ms", l.reserved_ms));
    }
    if by_size > 0 {
        reasons.push(format!(
            "{total} bytes retained, over max_bytes {}",
            l.max_bytes.unwrap_or_default()
        ));
    }
    if let (true, Some((used, size))) = (by_disk > 0, l.disk) {
        reasons.push(format!(
            "disk {:.1}% used, over disk_clean_watermark {:.1}%",
            used as f64 * 100.0 / size as f64,
            l.clean_watermark * 100.0
        ));
    }
    Some(Plan {
        upto: candidates[n - 1].last_index,
        reason: reasons.join("; "),
        bytes: candidates[..n].iter().map(|s| s.bytes).sum(),
    })
}

/// Starts retention on this replica: the disk monitor and the disk freeing on
/// every replica, the horizon decision while it leads.
pub fn spawn(group: GroupHandle, config: RetentionConfig, data_dir: PathBuf, disk: DiskState) {
    let ctx = Arc::new(Ctx {
        group,
        config,
        data_dir,
        disk,
    });
    let span = || tracing::info_span!("retention", group = %ctx.group.group(), node = ctx.group.node_id());
    let tasks = ctx.group.tasks().clone();
    tasks.spawn(monitor_disk(ctx.clone()).instrument(span()));
    tasks.spawn(free_disk(ctx.clone()).instrument(span()));
    tasks.spawn({
        let ctx = ctx.clone();
        async move { ctx.group.while_leading(|term| lead(&ctx, term)).await }.instrument(span())
    });
}

struct Ctx {
    group: GroupHandle,
    config: RetentionConfig,
    data_dir: PathBuf,
    disk: DiskState,
}

impl Ctx {
    fn usage(&self) -> io::Result<(u64, u64)> {
        self.config.disk_usage.usage(&self.data_dir)
    }

    /// Sleeps `d` unless shutdown comes first (then false).
    async fn pause(&self, d: Duration) -> bool {
        tokio::select! {
            _ = tokio::time::sleep(d) => true,
            _ = self.group.shutdown().cancelled() => false,
        }
    }
}

async fn monitor_disk(ctx: Arc<Ctx>) {
    let every = ctx.config.check_interval.min(MAX_DISK_CHECK);
    let mut failing = false;
    loop {
        match ctx.usage() {
            Ok((used, total)) => {
                failing = false;
                match ctx
                    .disk
                    .record(used, total, ctx.config.disk_full_watermark, &ctx.data_dir)
                {
                    Some(true) => tracing::warn!(
                        used,
                        total,
                        watermark = ctx.config.disk_full_watermark,
                        path = %ctx.data_dir.display(),
                        "disk full: refusing client writes until usage is back below disk_full_watermark"
                    ),
                    Some(false) => tracing::warn!(
                        used,
                        total,
                        path = %ctx.data_dir.display(),
                        "disk usage back below disk_full_watermark: accepting writes again"
                    ),
                    None => {}
                }
            }
            Err(e) if !failing => {
                failing = true;
                tracing::error!(error = %e, path = %ctx.data_dir.display(), "reading disk usage failed; keeping the last figures");
            }
            Err(_) => {}
        }
        if !ctx.pause(every).await {
            return;
        }
    }
}

/// Decides and proposes horizons until this node stops leading `term`.
async fn lead(ctx: &Ctx, term: u64) {
    tracing::debug!(term, "leading: deciding the retention horizon");
    // Sealed segments never change: their newest store time is read once.
    let mut newest: HashMap<(bool, u64, u64), Option<u64>> = HashMap::new();
    loop {
        if !ctx.group.leads(term) {
            return;
        }
        match plan(ctx, &mut newest).await {
            Ok(Some(p)) => {
                if p.reason.contains("disk") {
                    tracing::warn!(
                        upto = p.upto,
                        bytes = p.bytes,
                        reason = %p.reason,
                        "cleaning early under disk pressure: deleting segments younger than file_reserved_time"
                    );
                } else {
                    tracing::info!(upto = p.upto, bytes = p.bytes, reason = %p.reason, "proposing retention horizon");
                }
                match ctx
                    .group
                    .write(Command::Retain {
                        upto: p.upto,
                        reason: p.reason,
                    })
                    .await
                {
                    Ok(_) => {}
                    Err(ApiError::NotLeader { .. }) => return,
                    Err(e) => {
                        tracing::warn!(error = %e, upto = p.upto, "proposing the retention horizon failed; retrying")
                    }
                }
            }
            Ok(None) => {}
            Err(e) => tracing::error!(error = %e, "computing the retention horizon failed; retrying"),
        }
        tokio::select! {
            _ = tokio::time::sleep(ctx.config.check_interval) => {}
            _ = ctx.group.deposed(term) => return,
            _ = ctx.group.shutdown().cancelled() => return,
        }
    }
}

async fn plan(ctx: &Ctx, newest: &mut HashMap<(bool, u64, u64), Option<u64>>) -> io::Result<Option<Plan>> {
    let store = ctx.group.store().clone();
    let applied = {
        let m = ctx.group.raft().metrics();
        let m = m.borrow_watched();
        m.last_applied.map_or(0, |l| l.index)
    };
    let horizon = store.retention_horizon();
    let mut segs: Vec<StoredSegment> = store.segments();
    segs.retain(|s| s.info.next_index > s.info.first_index);
    segs.sort_by_key(|s| s.info.next_index);
    let mut known = std::mem::take(newest);
    let (known, out) = tokio::task::spawn_blocking(move || -> io::Result<_> {
        let mut out = Vec::with_capacity(segs.len());
        let mut fresh = HashMap::new();
        for s in segs {
            let last = s.info.next_index - 1;
            let deletable = !s.active && last <= applied;
            let key = (s.archive, s.info.first_index, s.info.next_index);
            // Only segments that could go need a time; the rest keep `None`.
            let newest_ms = if deletable && last > horizon {
                match known.remove(&key) {
                    Some(t) => t,
                    None => store.newest_store_ms(s.info.first_index, s.info.next_index)?,
                }
            } else {
                None
            };
            if deletable {
                fresh.insert(key, newest_ms);
            }
            out.push(Seg {
                last_index: last,
                bytes: s.info.bytes,
                newest_ms,
                deletable,
            });
        }
        Ok((fresh, out))
    })
    .await
    .map_err(io::Error::other)??;
    *newest = known;
    let disk = match ctx.usage() {
        Ok(u) => Some(u),
        Err(e) => {
            tracing::warn!(error = %e, "reading disk usage failed; deciding by time and size only");
            None
        }
    };
    Ok(decide(
        &out,
        Limits {
            horizon,
            now_ms: now_ms(),
            reserved_ms: u64::try_from(ctx.config.file_reserved_time.as_millis()).unwrap_or(u64::MAX),
            max_bytes: ctx.config.max_bytes,
            disk,
            clean_watermark: ctx.config.disk_clean_watermark,
        },
    ))
}

/// Frees the disk below each applied horizon, on every replica; at start it
/// finishes whatever a restart interrupted (the horizon is durable).
async fn free_disk(ctx: Arc<Ctx>) {
    let mut horizons = ctx.group.store().horizon_watch();
    let mut done = 0u64;
    loop {
        let h = *horizons.borrow_and_update();
        let mut retry = false;
        if h > done {
            // Waits for a snapshot or a purge must not hold up shutdown; an
            // interrupted cleanup is finished at the next start.
            let freed = tokio::select! {
                r = free_through(&ctx, h) => r,
                _ = ctx.group.shutdown().cancelled() => return,
            };
            match freed {
                Ok(()) => done = h,
                Err(e) => {
                    retry = true;
                    tracing::warn!(horizon = h, error = %e, "freeing disk after retention failed; will retry");
                }
            }
        }
        tokio::select! {
            changed = horizons.changed() => if changed.is_err() { return },
            _ = tokio::time::sleep(ctx.config.check_interval), if retry => {}
            _ = ctx.group.shutdown().cancelled() => return,
        }
    }
}

/// Snapshot at or past `h`, purge the Raft log up to it, delete the segments
/// wholly at or below it: in that order, so that every deleted record is
/// below the purge point and a snapshot holds everything a peer needs.
async fn free_through(ctx: &Ctx, h: u64) -> Result<(), String> {
    let raft = ctx.group.raft();
    let store = ctx.group.store();
    let index_of = |l: &Option<raftmq_raft_store::LogId>| l.map_or(0, |l| l.index);
    // A snapshot taken under an older horizon covers `h` by index but still
    // carries trimmed records: a peer installing it would get them back.
    let covers = |m: &openraft::RaftMetrics<raftmq_raft_store::TypeConfig>| {
        index_of(&m.snapshot) >= h && store.snapshot_horizon() >= h
    };
    // No free-space check before asking for one: a snapshot is a RocksDB
    // checkpoint and hard links of the retained segments (see raft-store's
    // `snapshot` module), so it takes a memtable flush's worth of disk, not a
    // copy of the retained records.
    let give_up = tokio::time::Instant::now() + SNAPSHOT_WAIT;
    while !covers(&raft.metrics().borrow_watched()) {
        if tokio::time::Instant::now() >= give_up {
            return Err(format!(
                "no snapshot covering index {h} was built within {SNAPSHOT_WAIT:?}"
            ));
        }
        raft.trigger()
            .snapshot()
            .await
            .map_err(|e| format!("asking for a snapshot: {e}"))?;
        // One build at a time: if one was already running (at an older index),
        // this round ends with it and the next asks again.
        let _ = raft
            .wait(Some(Duration::from_secs(5)))
            .metrics(covers, format!("a snapshot covering {h}"))
            .await;
        if ctx.group.shutdown().is_cancelled() {
            return Err("shutting down".into());
        }
    }
    if index_of(&raft.metrics().borrow_watched().purged) < h {
        raft.trigger()
            .purge_log(h)
            .await
            .map_err(|e| format!("asking to purge the Raft log: {e}"))?;
        raft.wait(Some(PURGE_WAIT))
            .metrics(|m| index_of(&m.purged) >= h, format!("the Raft log purged up to {h}"))
            .await
            .map_err(|e| format!("waiting for the Raft log purge up to {h}: {e}"))?;
    }
    let (log, archive) = store
        .free_through(h)
        .await
        .map_err(|e| format!("deleting segments at or below {h}: {e}"))?;
    tracing::info!(
        horizon = h,
        log_segments = log,
        archive_segments = archive,
        "freed disk below the retention horizon"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: u64 = 3_600_000;

    fn seg(last_index: u64, bytes: u64, newest_ms: u64) -> Seg {
        Seg {
            last_index,
            bytes,
            newest_ms: Some(newest_ms),
            deletable: true,
        }
    }

    fn limits(now_ms: u64) -> Limits {
        Limits {
            horizon: 0,
            now_ms,
            reserved_ms: 72 * HOUR,
            max_bytes: None,
            disk: None,
            clean_watermark: 0.75,
        }
    }

    #[test]
    fn time_drops_the_oldest_whole_segments_past_the_reserved_time() {
        let now = 100 * HOUR;
        let mut segs = vec![seg(10, 100, HOUR), seg(20, 100, 27 * HOUR), seg(30, 100, 29 * HOUR)];
        segs.push(Seg {
            deletable: false,
            ..seg(40, 50, 0)
        });
        let p = decide(&segs, limits(now)).unwrap();
        assert_eq!((p.upto, p.bytes), (20, 200), "{p:?}");
        assert!(p.reason.contains("older than"), "{}", p.reason);
        // Nothing new past the current horizon: no proposal.
        assert_eq!(
            decide(
                &segs,
                Limits {
                    horizon: 20,
                    ..limits(now)
                }
            ),
            None
        );
        // Nothing old enough.
        assert_eq!(decide(&segs, limits(HOUR)), None);
    }

    #[test]
    fn the_segment_being_written_and_unapplied_ones_are_never_dropped() {
        let mut segs = vec![seg(10, 100, 0)];
        segs.push(Seg {
            deletable: false,
            ..seg(20, 100, 0)
        });
        segs.push(seg(30, 100, 0));
        // Whatever the pressure, the horizon stops before the first segment it may not delete.
        let l = Limits {
            max_bytes: Some(1),
            disk: Some((99, 100)),
            ..limits(100 * HOUR)
        };
        assert_eq!(decide(&segs, l).map(|p| p.upto), Some(10));
        assert_eq!(decide(&segs[1..], l), None);
    }

    #[test]
    fn size_drops_oldest_segments_until_under_max_bytes() {
        let now = HOUR;
        let segs = vec![
            seg(10, 100, now),
            seg(20, 100, now),
            seg(30, 100, now),
            Seg {
                deletable: false,
                ..seg(35, 100, now)
            },
        ];
        let at = |max| {
            decide(
                &segs,
                Limits {
                    max_bytes: Some(max),
                    ..limits(now)
                },
            )
            .map(|p| p.upto)
        };
        assert_eq!(at(400), None);
        assert_eq!(at(399), Some(10));
        assert_eq!(at(250), Some(20));
        assert_eq!(at(1), Some(30));
        // Already trimmed segments do not count.
        let p = decide(
            &segs,
            Limits {
                horizon: 10,
                max_bytes: Some(250),
                ..limits(now)
            },
        )
        .unwrap();
        assert_eq!(p.upto, 20);
        assert!(p.reason.contains("300 bytes retained"), "{}", p.reason);
    }

    #[test]
    fn disk_pressure_cleans_young_segments_until_under_the_watermark() {
        let now = HOUR;
        let segs = vec![
            seg(10, 100, now),
            seg(20, 100, now),
            seg(30, 100, now),
            Seg {
                deletable: false,
                ..seg(40, 100, now)
            },
        ];
        let at = |used| {
            decide(
                &segs,
                Limits {
                    disk: Some((used, 1000)),
                    ..limits(now)
                },
            )
        };
        assert_eq!(at(750), None);
        // 150 bytes over: two segments.
        let p = at(900).unwrap();
        assert_eq!(p.upto, 20);
        assert!(p.reason.contains("disk 90.0% used"), "{}", p.reason);
        // More than can be freed: every deletable one.
        assert_eq!(at(1000).map(|p| p.upto), Some(30));
    }

    #[test]
    fn an_unknown_store_time_never_expires_by_time() {
        let segs = [Seg {
            newest_ms: None,
            ..seg(10, 1, 0)
        }];
        assert_eq!(decide(&segs, limits(u64::MAX)), None);
    }

    #[test]
    fn settings_are_checked_and_name_the_key() {
        RetentionConfig::default().validate().unwrap();
        let key_of = |c: RetentionConfig| match c.validate() {
            Err(Error::Config { key, .. }) => key,
            other => panic!("{other:?}"),
        };
        let d = RetentionConfig::default;
        assert_eq!(
            key_of(RetentionConfig {
                check_interval: Duration::ZERO,
                ..d()
            }),
            "retention.check_interval"
        );
        assert_eq!(
            key_of(RetentionConfig {
                file_reserved_time: Duration::ZERO,
                ..d()
            }),
            "retention.file_reserved_time"
        );
        assert_eq!(
            key_of(RetentionConfig {
                max_bytes: Some(0),
                ..d()
            }),
            "retention.max_bytes"
        );
        assert_eq!(
            key_of(RetentionConfig {
                disk_clean_watermark: f64::NAN,
                ..d()
            }),
            "retention.disk_clean_watermark"
        );
        assert_eq!(
            key_of(RetentionConfig {
                disk_full_watermark: 0.5,
                ..d()
            }),
            "retention.disk_full_watermark"
        );
        assert_eq!(
            key_of(RetentionConfig {
                disk_full_watermark: 1.5,
                ..d()
            }),
            "retention.disk_full_watermark"
        );
    }

    #[test]
    fn settings_parse_with_durations() {
        let c: RetentionConfig = serde_json::from_str(
            r#"{"file_reserved_time": "48h", "max_bytes": 1073741824, "check_interval": "500ms"}"#,
        )
        .unwrap();
        assert_eq!(c.file_reserved_time, Duration::from_secs(48 * 3600));
        assert_eq!(c.check_interval, Duration::from_millis(500));
        assert_eq!(c.max_bytes, Some(1 << 30));
        assert_eq!(c.disk_full_watermark, 0.90);
        // Unknown keys are the settings loader's to refuse, naming their source
        // (`src/settings_tests.rs`); a bad duration is refused here.
        assert!(serde_json::from_str::<RetentionConfig>(r#"{"file_reserved_time": "soon"}"#).is_err());
    }

    #[test]
    fn the_disk_flag_names_the_numbers_and_clears_below_the_watermark() {
        let d = DiskState::default();
        assert!(d.check_write().is_ok() && d.used_ratio().is_none());
        assert_eq!(d.record(95, 100, 0.9, Path::new("/data")), Some(true));
        let Err(ApiError::ResourceExhausted(m)) = d.check_write() else {
            panic!("not refused")
        };
        assert!(
            m.starts_with("disk full:") && m.contains("95.0%") && m.contains("90.0%") && m.contains("/data"),
            "{m}"
        );
        assert_eq!(d.record(96, 100, 0.9, Path::new("/data")), None);
        assert_eq!(d.record(80, 100, 0.9, Path::new("/data")), Some(false));
        assert!(d.check_write().is_ok());
        assert_eq!(d.used_ratio(), Some(0.8));
    }
}
