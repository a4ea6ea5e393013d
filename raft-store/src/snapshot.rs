//! Snapshots: building one from the live state, installing a received one, and the
//! file format they share.
//!
//! A snapshot is a single file: `RMQSNAP1`, the JSON `SnapshotMeta`, then items —
//! every RocksDB row (column family, key, value) read from one consistent RocksDB
//! snapshot, then every retained CommitLog record up to the snapshot's last log id
//! in the CommitLog's own framing — and an end marker with a crc32c of everything
//! before it. Carrying the records is what makes "the log is the data" hold for a
//! replica that installs a snapshot: its ConsumeQueue rows point at those records,
//! which it keeps in `archive/` (see the crate docs). Installing stages a new state
//! generation and switches to it only after the checksum held and everything was
//! fsynced.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::PathBuf;
use std::sync::Arc;

use openraft::RaftSnapshotBuilder;
use openraft::alias::SnapshotOf;
use rocksdb::WriteBatch;

use crate::layout::{CF_META, CFS, KEY_HORIZON, u64_value};
use crate::record::{self, Decoded, HEADER_LEN, Header};
use crate::state_machine::{SmShared, SmState, rocks_io};
use crate::{LogId, SnapshotMeta, StoredMembership, TypeConfig, durable};

const MAGIC: &[u8; 8] = b"RMQSNAP1";
const ITEM_ROW: u8 = 1;
const ITEM_RECORD: u8 = 2;
const ITEM_END: u8 = 0xFF;
const SNAPSHOT_DIR: &str = "snapshots";
const SNAPSHOT_EXT: &str = "snap";
/// Records read from the log per chunk while building.
const RECORD_CHUNK: u64 = 1024;

fn bad(what: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("snapshot file: {what}"))
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
    type SnapshotData = File;

    async fn build_snapshot(&mut self) -> Result<SnapshotOf<TypeConfig, File>, io::Error> {
        let shared = self.shared.clone();
        tokio::task::spawn_blocking(move || build(&shared))
            .await
            .map_err(io::Error::other)?
    }
}

struct CrcWriter {
    w: BufWriter<File>,
    crc: u32,
}

impl CrcWriter {
    fn put(&mut self, b: &[u8]) -> io::Result<()> {
        self.crc = crc32c::crc32c_append(self.crc, b);
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

fn snapshot_dir(shared: &SmShared) -> PathBuf {
    shared.dir.join(SNAPSHOT_DIR)
}

fn build(shared: &SmShared) -> io::Result<SnapshotOf<TypeConfig, File>> {
    let state = shared.current();
    let snap = state.db.snapshot();
    let meta_cf = state.cf(CF_META);
    let parse = |key: &[u8]| -> io::Result<Option<Vec<u8>>> { snap.get_cf(meta_cf, key).map_err(rocks_io("read")) };
    let applied: Option<LogId> = match parse(b"applied")? {
        Some(b) => serde_json::from_slice(&b).map_err(bad)?,
        None => None,
    };
    let membership: StoredMembership = match parse(b"membership")? {
        Some(b) => serde_json::from_slice(&b).map_err(bad)?,
        None => StoredMembership::default(),
    };
    // Records at or below the retention horizon are gone from the state these
    // rows describe: the snapshot carries only what is retained.
    let horizon = match parse(KEY_HORIZON)? {
        Some(v) => u64_value(&v)?,
        None => 0,
    };
    let meta = SnapshotMeta {
        last_log_id: applied,
        last_membership: membership,
    };
    // The horizon is in the file's name, so a restarted replica knows which
    // horizon its snapshot honours without reading it (see `file_horizon`).
    let snapshot_id = format!("{}-h{horizon}", snapshot_name(&meta));

    let dir = snapshot_dir(shared);
    fs::create_dir_all(&dir)?;
    let tmp = dir.join(format!("{snapshot_id}.{SNAPSHOT_EXT}.tmp"));
    let mut w = CrcWriter {
        w: BufWriter::with_capacity(1 << 20, File::create(&tmp)?),
        crc: 0,
    };
    w.put(MAGIC)?;
    w.put_bytes(&serde_json::to_vec(&meta).map_err(io::Error::other)?)?;
    let mut rows = 0u64;
    for (cf_id, cf) in CFS.iter().enumerate() {
        for item in snap.iterator_cf(state.cf(cf), rocksdb::IteratorMode::Start) {
            let (k, v) = item.map_err(rocks_io("snapshot scan"))?;
            w.put(&[ITEM_ROW, cf_id as u8])?;
            w.put_bytes(&k)?;
            w.put_bytes(&v)?;
            rows += 1;
        }
    }
    let mut records = 0u64;
    if let Some(applied) = &applied {
        // Retained records start where the archive starts (data received in an
        // earlier snapshot), else where the CommitLog physically starts.
        let log_range = shared.log.physical_range();
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
        if let Some(first) = first {
            let mut next = first;
            let mut buf = Vec::new();
            while next <= last {
                let end = (next + RECORD_CHUNK).min(last + 1);
                let chunk = shared.read_records(&state, next, end)?;
                if chunk.len() as u64 != end - next {
                    return Err(bad(format_args!(
                        "retained records {next}..{end} are not all present ({} found)",
                        chunk.len()
                    )));
                }
                for (h, payload) in chunk {
                    buf.clear();
                    record::encode_into(&mut buf, h.term, h.index, &payload);
                    w.put(&[ITEM_RECORD])?;
                    w.put(&buf)?;
                    records += 1;
                }
                next = end;
            }
        }
    }
    let crc = w.crc;
    w.put(&[ITEM_END])?;
    w.w.write_all(&crc.to_le_bytes())?;
    let file = w.w.into_inner().map_err(|e| e.into_error())?;
    file.sync_all()?;
    drop(file);
    let path = dir.join(format!("{snapshot_id}.{SNAPSHOT_EXT}"));
    fs::rename(&tmp, &path)?;
    durable::fsync_dir(&dir)?;
    remove_other_snapshots(shared, &path)?;
    shared
        .snapshot_horizon
        .store(horizon, std::sync::atomic::Ordering::Release);
    tracing::info!(snapshot_id, rows, records, horizon, "built snapshot");
    Ok(SnapshotOf::<TypeConfig, File> {
        meta,
        snapshot: File::open(&path)?,
    })
}

fn remove_other_snapshots(shared: &SmShared, keep: &std::path::Path) -> io::Result<()> {
    for entry in fs::read_dir(snapshot_dir(shared))? {
        let p = entry?.path();
        if p != keep {
            fs::remove_file(&p)?;
        }
    }
    Ok(())
}

/// The retention horizon the latest snapshot on disk was built under (from
/// its name; 0 for none, or one named before horizons existed).
pub(crate) fn file_horizon(dir: &std::path::Path) -> u64 {
    let Ok(entries) = fs::read_dir(dir.join(SNAPSHOT_DIR)) else {
        return 0;
    };
    let mut latest: Option<(std::time::SystemTime, PathBuf)> = None;
    for entry in entries.flatten() {
        let p = entry.path();
        if p.extension().is_some_and(|e| e == SNAPSHOT_EXT)
            && let Ok(t) = entry.metadata().and_then(|m| m.modified())
            && latest.as_ref().is_none_or(|(lt, _)| t > *lt)
        {
            latest = Some((t, p));
        }
    }
    latest
        .and_then(|(_, p)| {
            let stem = p.file_stem()?.to_str()?.to_owned();
            stem.rsplit_once("-h")?.1.parse().ok()
        })
        .unwrap_or(0)
}

/// The latest snapshot on disk, if any.
pub(crate) fn current(shared: &SmShared) -> io::Result<Option<SnapshotOf<TypeConfig, File>>> {
    let dir = snapshot_dir(shared);
    let Ok(entries) = fs::read_dir(&dir) else {
        return Ok(None);
    };
    let mut latest: Option<(std::time::SystemTime, PathBuf)> = None;
    for entry in entries {
        let entry = entry?;
        let p = entry.path();
        if p.extension().is_some_and(|e| e == SNAPSHOT_EXT) {
            let t = entry.metadata()?.modified()?;
            if latest.as_ref().is_none_or(|(lt, _)| t > *lt) {
                latest = Some((t, p));
            }
        }
    }
    let Some((_, path)) = latest else { return Ok(None) };
    let (meta, _) = read_header(File::open(&path)?)?;
    Ok(Some(SnapshotOf::<TypeConfig, File> {
        meta,
        snapshot: File::open(&path)?,
    }))
}

/// Installs `file` as the new state: stages a new generation, verifies the whole
/// file, makes it durable, then switches `CURRENT` to it.
pub(crate) fn install(shared: &SmShared, meta: &SnapshotMeta, mut file: File) -> io::Result<()> {
    use std::io::Seek;
    file.rewind()?;
    let copy = file.try_clone()?;
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
    staged.db.flush_wal(true).map_err(rocks_io("flush WAL"))?;
    {
        let archive = staged.archive();
        for (_, _, f) in archive.files() {
            f.sync_data()?;
        }
        durable::fsync_dir(archive.dir())?;
    }
    durable::fsync_dir(&new_dir)?;

    // Keep the installed snapshot as the current one, so this replica can serve it on.
    let snap_dir = snapshot_dir(shared);
    fs::create_dir_all(&snap_dir)?;
    let dst = snap_dir.join(format!("{}-h{}.{SNAPSHOT_EXT}", snapshot_name(meta), staged.horizon()));
    let tmp = dst.with_extension("tmp");
    {
        let mut src = copy;
        src.rewind()?;
        let mut out = OpenOptions::new().write(true).create(true).truncate(true).open(&tmp)?;
        io::copy(&mut src, &mut out)?;
        out.sync_all()?;
    }
    fs::rename(&tmp, &dst)?;
    durable::fsync_dir(&snap_dir)?;
    remove_other_snapshots(shared, &dst)?;

    durable::write_atomic(&shared.dir, "CURRENT", format!("state-{generation}").as_bytes())?;
    shared
        .snapshot_horizon
        .store(staged.horizon(), std::sync::atomic::Ordering::Release);
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
