//! Snapshots: building one from the live state, streaming it to a peer,
//! installing a received one, and the wire format they share.
//!
//! # On disk: a directory of hard links
//!
//! A snapshot is a directory `sm/snapshots/snap-<seq>-<term>-<index>-h<horizon>/`:
//!
//! * `db/`: a RocksDB checkpoint of the state machine (hard links of its SST
//!   files plus the live WAL tail), taken at one consistent point. The
//!   snapshot's last log id, membership and retention horizon are read back
//!   from this checkpoint, so they describe exactly the rows it holds even
//!   though apply keeps running while it is taken.
//! * `archive-<segment>` / `log-<segment>`: hard links of every segment file
//!   (of the state's `archive/` and of the CommitLog) holding a retained record,
//!   i.e. one in (horizon, last log id]. The segment still being written is linked
//!   too, with the byte length of its records up to the last log id recorded and
//!   fsynced: those records are committed, so no truncation ever cuts them (it
//!   cuts only uncommitted entries after them) and appends land past that length.
//! * `manifest.json`: the meta, the horizon, the record range and, per linked
//!   file, which records and which bytes of it belong to the snapshot.
//!
//! Building costs a memtable flush, one hard link per file and one fsync of the
//! active segment: nothing grows with the retained messages. It happens in
//! `snap-<seq>.tmp/`, which is fsynced and then renamed into place; a crash
//! mid-build leaves only a `.tmp` directory, which the next open removes, and the
//! newest complete directory (highest `<seq>`, with a manifest) is the current
//! snapshot. Retention deleting a segment removes only the CommitLog's name for
//! it; the snapshot's link keeps the data until the snapshot itself is replaced.
//! A replaced snapshot is removed once nothing streams it any more.
//!
//! # On the wire: `RMQSNAP1`
//!
//! A snapshot travels as one byte stream: `RMQSNAP1`, the JSON `SnapshotMeta`, then
//! items — every RocksDB row (column family, key, value) in `CFS` order, then every
//! retained CommitLog record in the CommitLog's own framing — and an end marker with
//! a crc32c of everything before it. The sender generates it from the snapshot
//! directory as it goes ([`SnapshotData::write_wire`]: the checkpoint opened
//! read-only, records read from the linked files with every checksum verified).
//! Carrying the records is what makes "the log is the data" hold for a replica
//! that installs a snapshot: its ConsumeQueue rows point at those records, which
//! it keeps in `archive/` (see the crate docs). Installing stages a new state
//! generation, and switches to it only after the checksum held and everything was
//! fsynced; it then takes a directory snapshot of the installed state (checkpoint
//! plus links of its archive), so the replica can serve the snapshot on.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, BufWriter, Read, Seek, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use openraft::RaftSnapshotBuilder;
use openraft::alias::SnapshotOf;
use rocksdb::WriteBatch;

use crate::commitlog::CommitLogReader;
use crate::layout::{CF_CQ_ROWS, CF_META, CFS, KEY_HORIZON, u64_value};
use crate::record::{self, Decoded, HEADER_LEN, Header};
use crate::segment::LinkedSegment;
use crate::state_machine::{SmShared, SmState, rocks_io};
use crate::{LogId, SnapshotMeta, StoredMembership, TypeConfig, durable};

const MAGIC: &[u8; 8] = b"RMQSNAP1";
const ITEM_ROW: u8 = 1;
const ITEM_RECORD: u8 = 2;
const ITEM_END: u8 = 0xFF;
const SNAPSHOT_DIR: &str = "snapshots";
/// Single-file snapshots written before snapshots were directories: still
/// served (as a stream) until the first directory snapshot replaces them.
const LEGACY_EXT: &str = "snap";
const MANIFEST: &str = "manifest.json";
const CHECKPOINT_DIR: &str = "db";
const MANIFEST_VERSION: u32 = 1;

fn bad(what: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("snapshot: {what}"))
}

/// Adds the path an I/O step worked on to its error.
fn at<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> io::Error + 'a {
    move |e| io::Error::new(e.kind(), format!("{action} {}: {e}", path.display()))
}

/// What openraft moves around as a snapshot's data.
#[derive(Debug)]
pub enum SnapshotData {
    /// One of this replica's snapshot directories (see the module docs); the
    /// wire format is generated from it when it is sent.
    Local(Arc<LocalSnapshot>),
    /// A snapshot in the wire format: received from a leader and about to be
    /// installed, or a single-file snapshot of an older version.
    Stream(File),
}

impl From<File> for SnapshotData {
    fn from(f: File) -> Self {
        SnapshotData::Stream(f)
    }
}

impl SnapshotData {
    /// Writes the snapshot in the wire format to `w`. Blocking: it reads
    /// RocksDB and segment files; call it from a blocking thread.
    pub fn write_wire(&self, w: &mut dyn Write) -> io::Result<u64> {
        match self {
            SnapshotData::Local(local) => local.write_wire(w),
            SnapshotData::Stream(file) => {
                // Positioned reads: the handle's offset may be shared with clones.
                let mut buf = vec![0u8; 1 << 20];
                let mut pos = 0u64;
                loop {
                    let n = file.read_at(&mut buf, pos)?;
                    if n == 0 {
                        return Ok(pos);
                    }
                    w.write_all(&buf[..n])?;
                    pos += n as u64;
                }
            }
        }
    }

    /// The wire format in chunks of `chunk_size` bytes, generated by a blocking
    /// task (so the runtime never waits on the disk): `Ok(Some(bytes))` per
    /// chunk, then `Ok(None)` once all were sent, or an `Err` if generating
    /// failed. A channel that closes without `Ok(None)` also means failure.
    /// Dropping the receiver stops the generation.
    pub fn into_chunks(self, chunk_size: usize) -> tokio::sync::mpsc::Receiver<io::Result<Option<Vec<u8>>>> {
        let (tx, rx) = tokio::sync::mpsc::channel(2);
        tokio::task::spawn_blocking(move || {
            let mut w = ChunkWriter {
                tx: tx.clone(),
                buf: Vec::with_capacity(chunk_size.max(1)),
                chunk_size: chunk_size.max(1),
            };
            let result = self.write_wire(&mut w).and_then(|_| w.send_buffered());
            // A failed send means the receiver went away: nobody to tell.
            let _ = tx.blocking_send(result.map(|()| None));
        });
        rx
    }

    /// The snapshot directory, for a local snapshot.
    pub fn local_dir(&self) -> Option<&Path> {
        match self {
            SnapshotData::Local(l) => Some(&l.dir),
            SnapshotData::Stream(_) => None,
        }
    }
}

struct ChunkWriter {
    tx: tokio::sync::mpsc::Sender<io::Result<Option<Vec<u8>>>>,
    buf: Vec<u8>,
    chunk_size: usize,
}

impl ChunkWriter {
    fn send(&mut self, chunk: Vec<u8>) -> io::Result<()> {
        self.tx
            .blocking_send(Ok(Some(chunk)))
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the snapshot's receiver went away"))
    }

    fn send_buffered(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = std::mem::replace(&mut self.buf, Vec::with_capacity(self.chunk_size));
        self.send(chunk)
    }
}

impl Write for ChunkWriter {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        let n = b.len().min(self.chunk_size - self.buf.len());
        self.buf.extend_from_slice(&b[..n]);
        if self.buf.len() == self.chunk_size {
            self.send_buffered()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// What a snapshot directory holds, as written in its `manifest.json`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub(crate) struct Manifest {
    version: u32,
    meta: SnapshotMeta,
    /// The retention horizon of the checkpointed state: no record at or below
    /// it is in the snapshot.
    horizon: u64,
    /// First and last index of the records carried (none when none are).
    records: Option<(u64, u64)>,
    /// The linked segment files, in index order, covering `records` exactly.
    files: Vec<LinkedSegment>,
}

/// A complete snapshot directory of this replica.
#[derive(Debug)]
pub struct LocalSnapshot {
    dir: PathBuf,
    seq: u64,
    manifest: Manifest,
    /// Set once a newer snapshot replaced this one: the directory goes when
    /// the last handle (a transfer still streaming it) is dropped.
    retired: AtomicBool,
}

impl LocalSnapshot {
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn meta(&self) -> &SnapshotMeta {
        &self.manifest.meta
    }

    /// The retention horizon it honours.
    pub fn horizon(&self) -> u64 {
        self.manifest.horizon
    }

    fn load(dir: PathBuf, seq: u64) -> io::Result<LocalSnapshot> {
        let path = dir.join(MANIFEST);
        let bytes = fs::read(&path).map_err(at("reading", &path))?;
        let manifest: Manifest =
            serde_json::from_slice(&bytes).map_err(|e| bad(format_args!("{}: {e}", path.display())))?;
        if manifest.version != MANIFEST_VERSION {
            return Err(bad(format_args!(
                "{}: manifest version {} is not {MANIFEST_VERSION}",
                path.display(),
                manifest.version
            )));
        }
        Ok(LocalSnapshot {
            dir,
            seq,
            manifest,
            retired: AtomicBool::new(false),
        })
    }

    /// Writes the wire format, generated from the checkpoint and the linked
    /// segment files.
    fn write_wire(&self, out: &mut dyn Write) -> io::Result<u64> {
        let m = &self.manifest;
        check_coverage(m).map_err(|e| bad(format_args!("{}: {e}", self.dir.display())))?;
        let mut w = CrcWriter {
            w: BufWriter::with_capacity(256 << 10, out),
            crc: 0,
            bytes: 0,
        };
        w.put(MAGIC)?;
        w.put_bytes(&serde_json::to_vec(&m.meta).map_err(io::Error::other)?)?;
        let db_path = self.dir.join(CHECKPOINT_DIR);
        {
            let db = open_checkpoint(&db_path)?;
            // ConsumeQueue rows of epochs retention dropped may still be stored
            // (cq.rs drops them without tombstones); they are not sent.
            let cq_from = match db.cf_handle(CF_META) {
                Some(meta) => db
                    .get_cf(meta, crate::cq::KEY_DROPPED_BELOW)
                    .map_err(|e| io::Error::other(format!("reading {}: {e}", db_path.display())))?
                    .map(|v| u64_value(&v))
                    .transpose()?
                    .unwrap_or(0),
                None => 0,
            }
            .to_be_bytes();
            for (cf_id, cf) in CFS.iter().enumerate() {
                // A checkpoint taken before a column family existed has no rows of it.
                let Some(handle) = db.cf_handle(cf) else {
                    continue;
                };
                let mode = if *cf == CF_CQ_ROWS {
                    rocksdb::IteratorMode::From(&cq_from, rocksdb::Direction::Forward)
                } else {
                    rocksdb::IteratorMode::Start
                };
                for item in db.iterator_cf(handle, mode) {
                    let (k, v) = item.map_err(|e| io::Error::other(format!("reading {}: {e}", db_path.display())))?;
                    w.put(&[ITEM_ROW, cf_id as u8])?;
                    w.put_bytes(&k)?;
                    w.put_bytes(&v)?;
                }
            }
        }
        let mut payload = Vec::new();
        for f in &m.files {
            let path = self.dir.join(&f.name);
            let mut file = File::open(&path).map_err(at("opening", &path))?;
            file.seek(io::SeekFrom::Start(f.start))
                .map_err(at("seeking in", &path))?;
            let mut r = BufReader::with_capacity(1 << 20, file.take(f.end - f.start));
            let mut pos = f.start;
            for index in f.first_index..=f.last_index {
                let mut head = [0u8; HEADER_LEN];
                r.read_exact(&mut head)
                    .map_err(|e| durable::corrupt(&path, pos, format_args!("record {index} cut short: {e}")))?;
                let h = Header::parse(&head);
                if h.index != index || h.len as usize > record::MAX_PAYLOAD_LEN {
                    return Err(durable::corrupt(
                        &path,
                        pos,
                        format_args!(
                            "record header names index {} ({} bytes) where {index} was expected",
                            h.index, h.len
                        ),
                    ));
                }
                payload.resize(h.len as usize, 0);
                r.read_exact(&mut payload)
                    .map_err(|e| durable::corrupt(&path, pos, format_args!("record {index} cut short: {e}")))?;
                if !h.matches(&payload) {
                    return Err(durable::corrupt(
                        &path,
                        pos,
                        format_args!("checksum mismatch in record {index}"),
                    ));
                }
                w.put(&[ITEM_RECORD])?;
                w.put(&head)?;
                w.put(&payload)?;
                pos += h.record_len();
            }
            if pos != f.end {
                return Err(durable::corrupt(
                    &path,
                    pos,
                    format_args!("records {}..={} end before byte {}", f.first_index, f.last_index, f.end),
                ));
            }
        }
        let crc = w.crc;
        w.put(&[ITEM_END])?;
        w.w.write_all(&crc.to_le_bytes())?;
        w.w.flush()?;
        Ok(w.bytes + 4)
    }
}

impl Drop for LocalSnapshot {
    fn drop(&mut self) {
        if self.retired.load(Ordering::Acquire)
            && let Err(e) = fs::remove_dir_all(&self.dir)
            && e.kind() != io::ErrorKind::NotFound
        {
            // Harmless but for the space: the next open removes it.
            tracing::warn!(dir = %self.dir.display(), error = %e, "removing a replaced snapshot failed");
        }
    }
}

/// The linked files must hold exactly the manifest's record range, in order.
fn check_coverage(m: &Manifest) -> Result<(), String> {
    let mut next = m.records.map(|(first, _)| first);
    for f in &m.files {
        if Some(f.first_index) != next || f.last_index < f.first_index || f.end < f.start {
            return Err(format!(
                "manifest lists {} with records {}..={} where record {next:?} was expected",
                f.name, f.first_index, f.last_index
            ));
        }
        next = Some(f.last_index + 1);
    }
    match (m.records, next) {
        (None, None) => Ok(()),
        (Some((_, last)), Some(n)) if n == last + 1 => Ok(()),
        _ => Err(format!("manifest's files do not cover records {:?}", m.records)),
    }
}

fn open_checkpoint(path: &Path) -> io::Result<rocksdb::DB> {
    let opts = rocksdb::Options::default();
    // The column families it has: one taken by an earlier version lacks newer ones.
    let cfs = rocksdb::DB::list_cf(&opts, path).map_err(|e| {
        io::Error::other(format!(
            "listing the column families of the snapshot checkpoint {}: {e}",
            path.display()
        ))
    })?;
    rocksdb::DB::open_cf_for_read_only(&opts, path, cfs, false).map_err(|e| {
        io::Error::other(format!(
            "opening the snapshot checkpoint {} read-only: {e}",
            path.display()
        ))
    })
}

/// The snapshot meta and horizon of a checkpoint, read from its own meta rows.
fn checkpoint_meta(path: &Path) -> io::Result<(SnapshotMeta, u64)> {
    let db = open_checkpoint(path)?;
    let cf = db
        .cf_handle(CF_META)
        .ok_or_else(|| bad(format_args!("{} lacks column family {CF_META}", path.display())))?;
    let get = |key: &[u8]| {
        db.get_cf(cf, key)
            .map_err(|e| io::Error::other(format!("reading {}: {e}", path.display())))
    };
    let applied: Option<LogId> = match get(b"applied")? {
        Some(b) => serde_json::from_slice(&b).map_err(bad)?,
        None => None,
    };
    let membership: StoredMembership = match get(b"membership")? {
        Some(b) => serde_json::from_slice(&b).map_err(bad)?,
        None => StoredMembership::default(),
    };
    let horizon = match get(KEY_HORIZON)? {
        Some(v) => u64_value(&v)?,
        None => 0,
    };
    Ok((
        SnapshotMeta {
            last_log_id: applied,
            last_membership: membership,
        },
        horizon,
    ))
}

/// The current snapshot as found on disk or last built.
#[derive(Debug)]
enum Current {
    Local(Arc<LocalSnapshot>),
    Legacy(PathBuf),
}

/// A replica's snapshots: where they live, which one is current, the next
/// sequence number.
pub(crate) struct Snapshots {
    dir: PathBuf,
    current: Mutex<Option<Current>>,
    next_seq: AtomicU64,
}

impl Snapshots {
    /// Finds the current snapshot under `sm_dir` and removes everything else
    /// there: `.tmp` directories of interrupted builds, older snapshots (nothing
    /// streams them at start-up), directories without a readable manifest.
    /// Returns the registry and the horizon the current snapshot honours.
    pub fn open(sm_dir: &Path) -> io::Result<(Snapshots, u64)> {
        let dir = sm_dir.join(SNAPSHOT_DIR);
        let mut locals: Vec<(u64, PathBuf)> = Vec::new();
        let mut legacy: Vec<(std::time::SystemTime, PathBuf)> = Vec::new();
        let mut max_seq = 0u64;
        if dir.exists() {
            for entry in fs::read_dir(&dir).map_err(at("listing", &dir))? {
                let entry = entry.map_err(at("listing", &dir))?;
                let path = entry.path();
                let name = entry.file_name().to_string_lossy().into_owned();
                let is_dir = entry.file_type().map_err(at("inspecting", &path))?.is_dir();
                if name.ends_with(".tmp") {
                    remove_any(&path, is_dir)?;
                    continue;
                }
                if is_dir && let Some(seq) = parse_seq(&name) {
                    max_seq = max_seq.max(seq);
                    locals.push((seq, path));
                } else if !is_dir && path.extension().is_some_and(|e| e == LEGACY_EXT) {
                    let t = entry
                        .metadata()
                        .and_then(|m| m.modified())
                        .map_err(at("inspecting", &path))?;
                    legacy.push((t, path));
                } else {
                    tracing::warn!(path = %path.display(), "removing an unexpected entry among the snapshots");
                    remove_any(&path, is_dir)?;
                }
            }
        }
        locals.sort();
        let mut current = None;
        while let Some((seq, path)) = locals.pop() {
            if current.is_some() {
                fs::remove_dir_all(&path).map_err(at("removing", &path))?;
                continue;
            }
            match LocalSnapshot::load(path.clone(), seq) {
                Ok(s) => current = Some(Current::Local(Arc::new(s))),
                Err(e) => {
                    // Only complete builds are renamed into place, so this is
                    // damage, not a crash; an older snapshot may still serve.
                    tracing::warn!(dir = %path.display(), error = %e, "removing an unreadable snapshot");
                    fs::remove_dir_all(&path).map_err(at("removing", &path))?;
                }
            }
        }
        legacy.sort();
        while let Some((_, path)) = legacy.pop() {
            if current.is_some() {
                fs::remove_file(&path).map_err(at("removing", &path))?;
            } else {
                current = Some(Current::Legacy(path));
            }
        }
        let horizon = match &current {
            Some(Current::Local(l)) => l.horizon(),
            Some(Current::Legacy(p)) => legacy_horizon(p),
            None => 0,
        };
        Ok((
            Snapshots {
                dir,
                current: Mutex::new(current),
                next_seq: AtomicU64::new(max_seq + 1),
            },
            horizon,
        ))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Current>> {
        self.current.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes `new` the current snapshot and retires the previous one. A build
    /// that finishes after a newer snapshot was installed is retired at once
    /// instead (unless `force`).
    fn set_current(&self, new: &Arc<LocalSnapshot>, force: bool) {
        let mut cur = self.lock();
        let newer = match &*cur {
            Some(Current::Local(c)) => force || (new.meta().last_log_id, new.seq) >= (c.meta().last_log_id, c.seq),
            _ => true,
        };
        if !newer {
            new.retired.store(true, Ordering::Release);
            return;
        }
        match cur.replace(Current::Local(new.clone())) {
            Some(Current::Local(old)) => old.retired.store(true, Ordering::Release),
            Some(Current::Legacy(p)) => {
                if let Err(e) = fs::remove_file(&p) {
                    tracing::warn!(path = %p.display(), error = %e, "removing a replaced snapshot file failed");
                }
            }
            None => {}
        }
    }
}

fn remove_any(path: &Path, is_dir: bool) -> io::Result<()> {
    if is_dir {
        fs::remove_dir_all(path).map_err(at("removing", path))
    } else {
        fs::remove_file(path).map_err(at("removing", path))
    }
}

/// `<seq>` of a directory named `snap-<seq>-...`.
fn parse_seq(name: &str) -> Option<u64> {
    name.strip_prefix("snap-")?.split('-').next()?.parse().ok()
}

fn legacy_horizon(path: &Path) -> u64 {
    path.file_stem()
        .and_then(|s| s.to_str())
        .and_then(|s| s.rsplit_once("-h"))
        .and_then(|(_, h)| h.parse().ok())
        .unwrap_or(0)
}

/// Builds snapshots of the state machine for openraft.
pub struct SnapshotBuilder {
    shared: Arc<SmShared>,
}

impl SnapshotBuilder {
    pub(crate) fn new(shared: Arc<SmShared>) -> SnapshotBuilder {
        SnapshotBuilder { shared }
    }
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    type SnapshotData = SnapshotData;

    async fn build_snapshot(&mut self) -> Result<SnapshotOf<TypeConfig, SnapshotData>, io::Error> {
        let shared = self.shared.clone();
        tokio::task::spawn_blocking(move || build(&shared))
            .await
            .map_err(io::Error::other)?
    }
}

struct CrcWriter<W: Write> {
    w: W,
    crc: u32,
    bytes: u64,
}

impl<W: Write> CrcWriter<W> {
    fn put(&mut self, b: &[u8]) -> io::Result<()> {
        self.crc = crc32c::crc32c_append(self.crc, b);
        self.bytes += b.len() as u64;
        self.w.write_all(b)
    }

    fn put_bytes(&mut self, b: &[u8]) -> io::Result<()> {
        self.put(&(b.len() as u32).to_le_bytes())?;
        self.put(b)
    }
}

struct CrcReader {
    r: BufReader<File>,
    crc: u32,
}

impl CrcReader {
    fn take(&mut self, n: usize) -> io::Result<Vec<u8>> {
        let mut b = vec![0u8; n];
        self.r
            .read_exact(&mut b)
            .map_err(|e| bad(format_args!("truncated: {e}")))?;
        self.crc = crc32c::crc32c_append(self.crc, &b);
        Ok(b)
    }

    fn u8(&mut self) -> io::Result<u8> {
        Ok(self.take(1)?[0])
    }

    fn len_prefixed(&mut self, limit: usize) -> io::Result<Vec<u8>> {
        let n = u32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes")) as usize;
        if n > limit {
            return Err(bad(format_args!("item of {n} bytes exceeds {limit}")));
        }
        self.take(n)
    }
}

fn read_header(file: File) -> io::Result<(SnapshotMeta, CrcReader)> {
    let mut r = CrcReader {
        r: BufReader::with_capacity(1 << 20, file),
        crc: 0,
    };
    if r.take(MAGIC.len())? != MAGIC {
        return Err(bad("not a raftmq snapshot (bad magic)"));
    }
    let meta_bytes = r.len_prefixed(1 << 20)?;
    let meta = serde_json::from_slice(&meta_bytes).map_err(|e| bad(format_args!("meta: {e}")))?;
    Ok((meta, r))
}

/// Snapshots are named by their last log id: two snapshots at the same applied id
/// hold the same state, so the name identifies the content.
fn snapshot_name(meta: &SnapshotMeta) -> String {
    match &meta.last_log_id {
        Some(l) => format!("{}-{}", crate::term_of(l), l.index),
        None => "0-0".to_owned(),
    }
}

/// Builds a snapshot of the live state and makes it the current one.
fn build(shared: &SmShared) -> io::Result<SnapshotOf<TypeConfig, SnapshotData>> {
    let state = shared.current();
    let snap = build_local(&shared.snapshots, &state, Some(&shared.log))?;
    shared.snapshots.set_current(&snap, false);
    shared.snapshot_horizon.store(snap.horizon(), Ordering::Release);
    Ok(SnapshotOf::<TypeConfig, SnapshotData> {
        meta: snap.meta().clone(),
        snapshot: SnapshotData::Local(snap),
    })
}

/// Builds a snapshot directory of `state` (whose records above the archive
/// are in `log`, when given): checkpoint, links, manifest, in a temp directory
/// renamed into place once durable.
fn build_local(snaps: &Snapshots, state: &SmState, log: Option<&CommitLogReader>) -> io::Result<Arc<LocalSnapshot>> {
    let started = std::time::Instant::now();
    fs::create_dir_all(&snaps.dir).map_err(at("creating", &snaps.dir))?;
    let seq = snaps.next_seq.fetch_add(1, Ordering::Relaxed);
    let tmp = snaps.dir.join(format!("snap-{seq:010}.tmp"));
    if tmp.exists() {
        fs::remove_dir_all(&tmp).map_err(at("removing", &tmp))?;
    }
    fs::create_dir(&tmp).map_err(at("creating", &tmp))?;
    let manifest = match fill_dir(&tmp, state, log) {
        Ok(m) => m,
        Err(e) => {
            if let Err(e) = fs::remove_dir_all(&tmp) {
                tracing::warn!(dir = %tmp.display(), error = %e, "removing a failed snapshot build");
            }
            return Err(e);
        }
    };
    let name = format!("snap-{seq:010}-{}-h{}", snapshot_name(&manifest.meta), manifest.horizon);
    let path = snaps.dir.join(&name);
    fs::rename(&tmp, &path).map_err(at("renaming the snapshot built in", &tmp))?;
    durable::fsync_dir(&snaps.dir).map_err(at("syncing", &snaps.dir))?;
    tracing::info!(
        snapshot = name,
        records = ?manifest.records,
        files = manifest.files.len(),
        horizon = manifest.horizon,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "built snapshot"
    );
    Ok(Arc::new(LocalSnapshot {
        dir: path,
        seq,
        manifest,
        retired: AtomicBool::new(false),
    }))
}

fn fill_dir(tmp: &Path, state: &SmState, log: Option<&CommitLogReader>) -> io::Result<Manifest> {
    let db_path = tmp.join(CHECKPOINT_DIR);
    rocksdb::checkpoint::Checkpoint::new(&state.db)
        .and_then(|c| c.create_checkpoint(&db_path))
        .map_err(|e| io::Error::other(format!("RocksDB checkpoint into {}: {e}", db_path.display())))?;
    // Apply keeps running: the checkpoint, not the live state, says what the
    // snapshot holds.
    let (meta, horizon) = checkpoint_meta(&db_path)?;
    let mut files = Vec::new();
    let mut records = None;
    if let Some(applied) = &meta.last_log_id {
        // Retained records start where the archive starts (data received in an
        // earlier snapshot), else where the CommitLog physically starts.
        let log_range = log.and_then(|l| l.physical_range());
        let (archive_first, archive_last) = {
            let archive = state.archive();
            (archive.first_index(), archive.last_index())
        };
        let first = archive_first
            .or(log_range.map(|(f, _)| f))
            .map(|f| f.max(horizon.saturating_add(1)));
        let held_last = archive_last.max(log_range.map(|(_, l)| l));
        // Records above what is held cannot be carried: that happens only when a
        // crash tore entries off the log after the state machine applied them,
        // and those messages are unreadable here already.
        let last = match held_last {
            Some(h) if h < applied.index => {
                tracing::warn!(
                    applied = applied.index,
                    held = h,
                    "snapshot cannot carry records above the log's end"
                );
                h
            }
            _ => applied.index,
        };
        if let Some(first) = first.filter(|f| *f <= last) {
            let mut to_sync = Vec::new();
            let mut next = first;
            if let Some(al) = archive_last.filter(|al| *al >= first) {
                let end = al.min(last) + 1;
                let (linked, active) = state.archive().link_range(first, end, tmp, "archive-")?;
                files.extend(linked);
                to_sync.extend(active);
                next = end;
            }
            if next <= last {
                let log = log.ok_or_else(|| {
                    bad(format_args!(
                        "records {next}..={last} are neither in the archive nor in a log"
                    ))
                })?;
                let (linked, active) = log.link_range(next, last + 1, tmp, "log-")?;
                files.extend(linked);
                to_sync.extend(active);
            }
            // The segment being written may hold records the flusher has not
            // synced yet (flush = async): the snapshot relies on them now.
            for f in to_sync {
                f.sync_data()
                    .map_err(|e| io::Error::new(e.kind(), format!("syncing a linked segment: {e}")))?;
            }
            records = Some((first, last));
        }
    }
    let manifest = Manifest {
        version: MANIFEST_VERSION,
        meta,
        horizon,
        records,
        files,
    };
    check_coverage(&manifest).map_err(|e| bad(format_args!("built in {}: {e}", tmp.display())))?;
    let path = tmp.join(MANIFEST);
    {
        let mut f = File::create(&path).map_err(at("creating", &path))?;
        f.write_all(&serde_json::to_vec_pretty(&manifest).map_err(io::Error::other)?)
            .map_err(at("writing", &path))?;
        f.sync_all().map_err(at("syncing", &path))?;
    }
    // RocksDB syncs the checkpoint's files; the directories' entries (and the
    // segment links) are made durable here.
    durable::fsync_dir(&db_path).map_err(at("syncing", &db_path))?;
    durable::fsync_dir(tmp).map_err(at("syncing", tmp))?;
    Ok(manifest)
}

/// The current snapshot, if any: cheap (no stream is generated here), since
/// openraft asks at start-up and before each transfer.
pub(crate) fn current(shared: &SmShared) -> io::Result<Option<SnapshotOf<TypeConfig, SnapshotData>>> {
    let cur = shared.snapshots.lock();
    match &*cur {
        None => Ok(None),
        Some(Current::Local(l)) => Ok(Some(SnapshotOf::<TypeConfig, SnapshotData> {
            meta: l.meta().clone(),
            snapshot: SnapshotData::Local(l.clone()),
        })),
        Some(Current::Legacy(path)) => {
            let file = File::open(path).map_err(at("opening", path))?;
            let (meta, _) = read_header(file.try_clone()?)?;
            Ok(Some(SnapshotOf::<TypeConfig, SnapshotData> {
                meta,
                snapshot: SnapshotData::Stream(file),
            }))
        }
    }
}

/// Installs `data`: a received stream as it is, a local snapshot (another
/// replica's directory, in tests) through its wire format in a temp file.
pub(crate) fn install_data(shared: &SmShared, meta: &SnapshotMeta, data: SnapshotData) -> io::Result<()> {
    match data {
        SnapshotData::Stream(file) => install(shared, meta, file),
        local @ SnapshotData::Local(_) => {
            let path = shared.dir.join(format!(
                "incoming-{}.tmp",
                shared.snapshots.next_seq.fetch_add(1, Ordering::Relaxed)
            ));
            let mut file = OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&path)
                .map_err(at("creating", &path))?;
            // Unnamed from here on: the file goes with its last handle.
            fs::remove_file(&path).map_err(at("removing", &path))?;
            local.write_wire(&mut file)?;
            file.rewind()?;
            install(shared, meta, file)
        }
    }
}

/// Installs `file` as the new state: stages a new generation, verifies the whole
/// file, makes it durable, then switches `CURRENT` to it.
fn install(shared: &SmShared, meta: &SnapshotMeta, mut file: File) -> io::Result<()> {
    file.rewind()?;
    let (file_meta, mut r) = read_header(file)?;
    if file_meta.last_log_id != meta.last_log_id {
        return Err(bad(format_args!(
            "file holds a snapshot up to {:?}, but {:?} was to be installed",
            file_meta.last_log_id, meta.last_log_id
        )));
    }
    let live = shared.current();
    let generation = live
        .dir
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("state-"))
        .and_then(|n| n.parse::<u64>().ok())
        .unwrap_or(0)
        + 1;
    let new_dir = shared.dir.join(format!("state-{generation}"));
    if new_dir.exists() {
        fs::remove_dir_all(&new_dir)?;
    }
    let mut staged = SmState::open(&new_dir, shared.segment_bytes).map_err(io::Error::from)?;
    let result = fill(&mut staged, &mut r);
    if let Err(e) = result {
        drop(staged);
        let _ = fs::remove_dir_all(&new_dir);
        return Err(e);
    }
    staged.load_horizon()?;
    // A snapshot from a replica that still runs the queue-first layout.
    crate::cq::migrate_queue_first_rows(&staged)?;
    staged.db.flush_wal(true).map_err(rocks_io("flush WAL"))?;
    {
        let archive = staged.archive();
        for (_, _, f) in archive.files() {
            f.sync_data()?;
        }
        durable::fsync_dir(archive.dir())?;
    }
    durable::fsync_dir(&new_dir)?;

    // A snapshot of the installed state (its checkpoint and archive links),
    // durable before the switch, so this replica can serve it on.
    let snap = match build_local(&shared.snapshots, &staged, None) {
        Ok(s) => s,
        Err(e) => {
            drop(staged);
            let _ = fs::remove_dir_all(&new_dir);
            return Err(e);
        }
    };

    durable::write_atomic(&shared.dir, "CURRENT", format!("state-{generation}").as_bytes())?;
    shared.snapshots.set_current(&snap, true);
    shared.snapshot_horizon.store(staged.horizon(), Ordering::Release);
    shared.replace(staged);
    // The old generation's directory is removed at the next open: readers may still
    // hold it, and RocksDB opens table files lazily.
    tracing::info!(snapshot = %snapshot_name(meta), last_log_id = ?meta.last_log_id, "installed snapshot");
    Ok(())
}

fn fill(staged: &mut SmState, r: &mut CrcReader) -> io::Result<()> {
    let mut wb = WriteBatch::default();
    let mut pending: Vec<(Header, Vec<u8>)> = Vec::new();
    let flush_records = |staged: &mut SmState, pending: &mut Vec<(Header, Vec<u8>)>| -> io::Result<()> {
        staged
            .archive_mut()
            .append(pending.iter().map(|(h, p)| (h.term, h.index, p.as_slice())))?;
        pending.clear();
        Ok(())
    };
    loop {
        let crc_before = r.crc;
        match r.u8()? {
            ITEM_ROW => {
                let cf_id = r.u8()? as usize;
                let cf = *CFS
                    .get(cf_id)
                    .ok_or_else(|| bad(format_args!("unknown column family {cf_id}")))?;
                let k = r.len_prefixed(record::MAX_PAYLOAD_LEN)?;
                let v = r.len_prefixed(record::MAX_PAYLOAD_LEN)?;
                wb.put_cf(staged.cf(cf), k, v);
                if wb.size_in_bytes() > 4 << 20 {
                    staged
                        .db
                        .write(std::mem::take(&mut wb))
                        .map_err(rocks_io("snapshot write"))?;
                }
            }
            ITEM_RECORD => {
                let head: [u8; HEADER_LEN] = r.take(HEADER_LEN)?.try_into().expect("sized");
                let h = Header::parse(&head);
                if h.len as usize > record::MAX_PAYLOAD_LEN {
                    return Err(bad(format_args!("record {} claims {} bytes", h.index, h.len)));
                }
                let payload = r.take(h.len as usize)?;
                let mut whole = head.to_vec();
                whole.extend_from_slice(&payload);
                if !matches!(record::decode(&whole), Decoded::Record { .. }) {
                    return Err(bad(format_args!("record {} fails its checksum", h.index)));
                }
                pending.push((h, payload));
                if pending.len() >= 1024 {
                    flush_records(staged, &mut pending)?;
                }
            }
            ITEM_END => {
                let mut tail = [0u8; 4];
                r.r.read_exact(&mut tail)
                    .map_err(|e| bad(format_args!("truncated trailer: {e}")))?;
                // The end marker's own byte is not covered by the checksum.
                if u32::from_le_bytes(tail) != crc_before {
                    return Err(bad("checksum mismatch"));
                }
                break;
            }
            other => return Err(bad(format_args!("unknown item type {other}"))),
        }
    }
    flush_records(staged, &mut pending)?;
    staged.db.write(wb).map_err(rocks_io("snapshot write"))?;
    Ok(())
}
