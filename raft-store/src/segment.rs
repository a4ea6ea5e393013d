//! Segment files: a directory of append-only files named by the Raft index of
//! their first record (`00000000000000000001.log`), each holding contiguous
//! records framed by `record`, plus a sealed segment's offset index (`.idx`).
//!
//! Owns: recovery on open (torn-tail repair, corruption detection), the in-memory
//! Raft index -> (segment, byte offset) map, appends with segment roll, reads by
//! index, truncation of a suffix and deletion of a prefix by whole segments. It does
//! not decide when bytes reach the disk (the CommitLog's flusher does) nor what a
//! payload means.
//!
//! Start-up cost: a sealed segment's offsets come from its `.idx` file (4 bytes per
//! record, checksummed, written when the segment is sealed), so opening a large log
//! reads every `.idx` plus one full scan of the last (active) segment: O(records / 1024
//! KiB of index) + O(segment size), never O(log size). A sealed segment whose `.idx` is
//! missing or does not match (a crash between seal and index write) is rescanned.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;

use crate::durable::{self, corrupt};
use crate::record::{self, Decoded, HEADER_LEN, Header};

const LOG_EXT: &str = "log";
const IDX_EXT: &str = "idx";
/// Trailer of an `.idx` file: record count (8) + covered data length (8) + crc32c (4).
const IDX_TRAILER: usize = 20;

pub(crate) fn segment_name(first_index: u64, ext: &str) -> String {
    format!("{first_index:020}.{ext}")
}

/// One segment file and the byte offset of each record in it.
pub(crate) struct Segment {
    pub first_index: u64,
    pub path: PathBuf,
    pub file: Arc<File>,
    /// `offsets[i]` is where the record for `first_index + i` starts. u32 suffices
    /// because a record only starts below the segment size limit (< 4 GiB).
    pub offsets: Vec<u32>,
    /// Bytes of valid records; the next record is written here.
    pub len: u64,
}

impl Segment {
    pub fn next_index(&self) -> u64 {
        self.first_index + self.offsets.len() as u64
    }

    fn idx_path(&self) -> PathBuf {
        self.path.with_extension(IDX_EXT)
    }

    fn end_of(&self, i: usize) -> u64 {
        self.offsets.get(i + 1).map_or(self.len, |&o| u64::from(o))
    }
}

/// One segment file's extent, for retention and status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentInfo {
    pub first_index: u64,
    /// One past its last record (`first_index` when it holds none).
    pub next_index: u64,
    /// Bytes of records in the file.
    pub bytes: u64,
}

/// A segment hard-linked into a snapshot: which records of it the snapshot
/// holds and the bytes they occupy.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct LinkedSegment {
    /// File name inside the snapshot directory.
    pub name: String,
    pub first_index: u64,
    pub last_index: u64,
    /// Byte offset of record `first_index` in the file.
    pub start: u64,
    /// Byte offset just past record `last_index`.
    pub end: u64,
}

/// A directory of segments with contiguous indexes.
pub struct SegmentSet {
    dir: PathBuf,
    segment_bytes: u64,
    segments: Vec<Segment>,
    last_term: u64,
}

/// Whether a scan may treat a bad record as a torn tail (only the last segment's
/// tail can be torn: earlier segments were fsynced before the next one began).
#[derive(Clone, Copy, PartialEq, Eq)]
enum ScanMode {
    Sealed,
    Tail,
}

struct Scanned {
    offsets: Vec<u32>,
    valid_len: u64,
    last_term: Option<u64>,
}

impl SegmentSet {
    /// Opens (creating if needed) the segments under `dir`, repairing a torn tail.
    /// Refuses, with an error naming file and byte offset, to open a log with a
    /// corrupt record anywhere but the torn tail, or with a gap between segments.
    pub fn open(dir: &Path, segment_bytes: u64) -> io::Result<SegmentSet> {
        fs::create_dir_all(dir)?;
        let mut firsts = Vec::new();
        for entry in fs::read_dir(dir)? {
            let entry = entry?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.ends_with(".tmp") {
                fs::remove_file(entry.path())?;
                continue;
            }
            let Some(stem) = name.strip_suffix(".log") else {
                continue;
            };
            let first: u64 = stem.parse().map_err(|_| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("unexpected file {} in CommitLog directory {}", name, dir.display()),
                )
            })?;
            firsts.push(first);
        }
        firsts.sort_unstable();

        let mut set = SegmentSet {
            dir: dir.to_path_buf(),
            segment_bytes,
            segments: Vec::with_capacity(firsts.len()),
            last_term: 0,
        };
        let count = firsts.len();
        for (i, first) in firsts.into_iter().enumerate() {
            let mode = if i + 1 == count {
                ScanMode::Tail
            } else {
                ScanMode::Sealed
            };
            let seg = open_segment(dir, first, mode, &mut set.last_term)?;
            if let Some(prev) = set.segments.last()
                && prev.next_index() != seg.first_index
            {
                return Err(corrupt(
                    &seg.path,
                    0,
                    format_args!(
                        "segment starts at index {} but the previous one ends before index {}",
                        seg.first_index,
                        prev.next_index()
                    ),
                ));
            }
            set.segments.push(seg);
        }
        Ok(set)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// First index held, if any record is held.
    pub fn first_index(&self) -> Option<u64> {
        self.segments
            .iter()
            .find(|s| !s.offsets.is_empty())
            .map(|s| s.first_index)
    }

    /// Last index held, if any record is held.
    pub fn last_index(&self) -> Option<u64> {
        self.first_index()?;
        Some(self.segments.last()?.next_index() - 1)
    }

    /// Term of the last record (0 when empty).
    pub fn last_term(&self) -> u64 {
        self.last_term
    }

    pub fn segment_count(&self) -> usize {
        self.segments.len()
    }

    /// Appends encoded records; `records` yields (term, index, payload) with indexes
    /// contiguous and continuing the log. Returns the files written to; their bytes
    /// are in the page cache, not yet durable, except for segments sealed by a roll,
    /// which were fsynced before the roll.
    pub fn append<'a>(
        &mut self,
        records: impl IntoIterator<Item = (u64, u64, &'a [u8])>,
    ) -> io::Result<Vec<Arc<File>>> {
        let mut touched: Vec<Arc<File>> = Vec::new();
        let mut buf: Vec<u8> = Vec::new();
        let mut pending_offsets: Vec<u32> = Vec::new();
        let mut last_term = self.last_term;
        for (term, index, payload) in records {
            if payload.len() > record::MAX_PAYLOAD_LEN {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "entry {index} has {} bytes, over the {} byte record limit",
                        payload.len(),
                        record::MAX_PAYLOAD_LEN
                    ),
                ));
            }
            if let Some(active) = self.segments.last() {
                let expected = active.next_index() + pending_offsets.len() as u64;
                if index != expected {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!("append of index {index} where {expected} is next"),
                    ));
                }
            }
            let rec_len = (HEADER_LEN + payload.len()) as u64;
            let needs_roll = match self.segments.last() {
                None => true,
                Some(active) => {
                    let used = active.len + buf.len() as u64;
                    used > 0 && used + rec_len > self.segment_bytes
                }
            };
            if needs_roll {
                self.write_pending(&mut buf, &mut pending_offsets, &mut touched)?;
                self.roll(index)?;
            }
            let active = self.segments.last().expect("a segment exists after roll");
            pending_offsets.push((active.len + buf.len() as u64) as u32);
            record::encode_into(&mut buf, term, index, payload);
            last_term = term;
        }
        self.write_pending(&mut buf, &mut pending_offsets, &mut touched)?;
        self.last_term = last_term;
        Ok(touched)
    }

    fn write_pending(
        &mut self,
        buf: &mut Vec<u8>,
        offsets: &mut Vec<u32>,
        touched: &mut Vec<Arc<File>>,
    ) -> io::Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        let active = self.segments.last_mut().expect("pending bytes imply a segment");
        active.file.write_all_at(buf, active.len)?;
        active.len += buf.len() as u64;
        active.offsets.append(offsets);
        if !touched.iter().any(|f| Arc::ptr_eq(f, &active.file)) {
            touched.push(active.file.clone());
        }
        buf.clear();
        Ok(())
    }

    /// Seals the active segment (fsync + index file) and starts one at `first_index`.
    fn roll(&mut self, first_index: u64) -> io::Result<()> {
        if let Some(active) = self.segments.last() {
            active.file.sync_data()?;
            write_idx(active)?;
        }
        let path = self.dir.join(segment_name(first_index, LOG_EXT));
        let file = OpenOptions::new().read(true).write(true).create_new(true).open(&path)?;
        // The new file's directory entry must be durable before any record in it is
        // reported flushed, or a crash could lose the whole file.
        durable::fsync_dir(&self.dir)?;
        self.segments.push(Segment {
            first_index,
            path,
            file: Arc::new(file),
            offsets: Vec::new(),
            len: 0,
        });
        Ok(())
    }

    /// Reads records `start..end` (all must be held), verifying every checksum.
    pub fn read_range(&self, start: u64, end: u64, out: &mut Vec<(Header, Bytes)>) -> io::Result<()> {
        let mut next = start;
        while next < end {
            let seg = self.segment_for(next)?;
            let first = (next - seg.first_index) as usize;
            let last = ((end.min(seg.next_index()) - 1) - seg.first_index) as usize;
            let from = u64::from(seg.offsets[first]);
            let to = seg.end_of(last);
            let mut buf = vec![0u8; (to - from) as usize];
            seg.file.read_exact_at(&mut buf, from)?;
            let buf = Bytes::from(buf);
            let mut pos = 0usize;
            for i in first..=last {
                let index = seg.first_index + i as u64;
                let at = from + pos as u64;
                match record::decode(&buf[pos..]) {
                    Decoded::Record { header, payload } if header.index == index => {
                        let body_start = pos + HEADER_LEN;
                        out.push((header, buf.slice(body_start..body_start + payload.len())));
                        pos += header.record_len() as usize;
                    }
                    Decoded::Record { header, .. } => {
                        return Err(corrupt(
                            &seg.path,
                            at,
                            format_args!("record holds index {} where {index} was expected", header.index),
                        ));
                    }
                    Decoded::Corrupt { .. } | Decoded::Incomplete => {
                        return Err(corrupt(
                            &seg.path,
                            at,
                            format_args!("checksum mismatch in record {index}"),
                        ));
                    }
                }
            }
            next = seg.first_index + last as u64 + 1;
        }
        Ok(())
    }

    /// Reads the term stored in record `index`'s header.
    pub fn term_of(&self, index: u64) -> io::Result<u64> {
        let mut out = Vec::with_capacity(1);
        self.read_range(index, index + 1, &mut out)?;
        Ok(out[0].0.term)
    }

    fn segment_for(&self, index: u64) -> io::Result<&Segment> {
        let pos = self.segments.partition_point(|s| s.first_index <= index);
        pos.checked_sub(1)
            .map(|p| &self.segments[p])
            .filter(|s| index < s.next_index())
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("index {index} is not in the CommitLog at {}", self.dir.display()),
                )
            })
    }

    /// Removes every record with index >= `index`, across segment boundaries, durably.
    pub fn truncate_from(&mut self, index: u64) -> io::Result<()> {
        while let Some(last) = self.segments.last() {
            if last.first_index < index {
                break;
            }
            let last = self.segments.pop().expect("checked above");
            remove_segment_files(&last)?;
        }
        if let Some(last) = self.segments.last_mut()
            && index < last.next_index()
        {
            let keep = (index - last.first_index) as usize;
            let new_len = u64::from(last.offsets[keep]);
            last.file.set_len(new_len)?;
            last.file.sync_all()?;
            last.offsets.truncate(keep);
            last.len = new_len;
            // The segment is the active one again; its index file would describe
            // records that no longer exist.
            remove_if_exists(&last.idx_path())?;
        }
        durable::fsync_dir(&self.dir)?;
        self.last_term = match self.last_index() {
            Some(i) => self.term_of(i)?,
            None => 0,
        };
        Ok(())
    }

    /// Deletes whole segments whose every record has index <= `index`. Returns how
    /// many were deleted. A segment straddling `index` is kept whole.
    pub fn remove_through(&mut self, index: u64) -> io::Result<usize> {
        let mut removed = 0;
        while let Some(first) = self.segments.first() {
            if first.next_index() > index + 1 {
                break;
            }
            let seg = self.segments.remove(0);
            remove_segment_files(&seg)?;
            removed += 1;
        }
        if removed > 0 {
            durable::fsync_dir(&self.dir)?;
            if self.segments.is_empty() {
                self.last_term = 0;
            }
        }
        Ok(removed)
    }

    /// Deletes every segment.
    pub fn clear(&mut self) -> io::Result<()> {
        self.remove_through(u64::MAX - 1).map(|_| ())
    }

    /// The files of every segment, oldest first, with the index range each covers.
    pub fn files(&self) -> Vec<(u64, u64, Arc<File>)> {
        self.segments
            .iter()
            .map(|s| (s.first_index, s.next_index(), s.file.clone()))
            .collect()
    }

    /// Hard-links into `dst` every segment holding records `start..end` (all must
    /// be held), named `prefix` + the segment's name, and describes for each the
    /// byte range those records occupy in it. Returns the descriptions and the
    /// last linked file when it is the segment still being written, which the
    /// caller must fsync before relying on the link (sealed segments were fsynced
    /// when they rolled).
    ///
    /// Linking under the caller's lock is what makes this safe: no segment can be
    /// deleted or truncated meanwhile. Afterwards deleting a segment removes only
    /// its name here, and a truncation only ever cuts records above `end`
    /// (uncommitted ones), outside the described range.
    pub(crate) fn link_range(
        &self,
        start: u64,
        end: u64,
        dst: &Path,
        prefix: &str,
    ) -> io::Result<(Vec<LinkedSegment>, Option<Arc<File>>)> {
        let mut out = Vec::new();
        let mut active = None;
        let mut next = start;
        while next < end {
            let seg = self.segment_for(next)?;
            let first = (next - seg.first_index) as usize;
            let last_index = end.min(seg.next_index()) - 1;
            let last = (last_index - seg.first_index) as usize;
            let file_name = seg
                .path
                .file_name()
                .and_then(|n| n.to_str())
                .ok_or_else(|| io::Error::other(format!("segment {} has no UTF-8 name", seg.path.display())))?;
            let name = format!("{prefix}{file_name}");
            let link = dst.join(&name);
            fs::hard_link(&seg.path, &link).map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("hard-linking {} to {}: {e}", seg.path.display(), link.display()),
                )
            })?;
            if std::ptr::eq(seg, self.segments.last().expect("segment_for found one")) {
                active = Some(seg.file.clone());
            }
            out.push(LinkedSegment {
                name,
                first_index: next,
                last_index,
                start: u64::from(seg.offsets[first]),
                end: seg.end_of(last),
            });
            next = last_index + 1;
        }
        Ok((out, active))
    }

    /// Every segment's extent, oldest first (the last one is the active one).
    pub fn infos(&self) -> Vec<SegmentInfo> {
        self.segments
            .iter()
            .map(|s| SegmentInfo {
                first_index: s.first_index,
                next_index: s.next_index(),
                bytes: s.len,
            })
            .collect()
    }

    /// The active segment's file, if any.
    pub fn active_file(&self) -> Option<Arc<File>> {
        self.segments.last().map(|s| s.file.clone())
    }
}

fn remove_if_exists(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

fn remove_segment_files(seg: &Segment) -> io::Result<()> {
    remove_if_exists(&seg.idx_path())?;
    remove_if_exists(&seg.path)
}

fn open_segment(dir: &Path, first_index: u64, mode: ScanMode, last_term: &mut u64) -> io::Result<Segment> {
    let path = dir.join(segment_name(first_index, LOG_EXT));
    let file = OpenOptions::new().read(true).write(true).open(&path)?;
    let file_len = file.metadata()?.len();
    let mut seg = Segment {
        first_index,
        path,
        file: Arc::new(file),
        offsets: Vec::new(),
        len: file_len,
    };
    if mode == ScanMode::Sealed
        && let Some(offsets) = load_idx(&seg.idx_path(), file_len)?
    {
        seg.offsets = offsets;
        if let Some(last) = seg.offsets.len().checked_sub(1) {
            let mut head = [0u8; HEADER_LEN];
            seg.file.read_exact_at(&mut head, u64::from(seg.offsets[last]))?;
            *last_term = Header::parse(&head).term;
        }
        return Ok(seg);
    }
    // Reading the whole segment at once keeps the scan simple; it happens for the
    // last segment only (plus any sealed one whose index was lost).
    let data = fs::read(&seg.path)?;
    let scanned = scan(&seg.path, &data, first_index, mode, *last_term)?;
    if scanned.valid_len < file_len {
        tracing::warn!(
            file = %seg.path.display(),
            valid_bytes = scanned.valid_len,
            dropped_bytes = file_len - scanned.valid_len,
            "dropping torn tail of CommitLog segment"
        );
        seg.file.set_len(scanned.valid_len)?;
        seg.file.sync_all()?;
    }
    if mode == ScanMode::Tail {
        remove_if_exists(&seg.idx_path())?;
    }
    seg.offsets = scanned.offsets;
    seg.len = scanned.valid_len;
    if let Some(t) = scanned.last_term {
        *last_term = t;
    }
    Ok(seg)
}

fn scan(path: &Path, data: &[u8], first_index: u64, mode: ScanMode, prev_term: u64) -> io::Result<Scanned> {
    let mut offsets = Vec::new();
    let mut pos = 0usize;
    let mut expected = first_index;
    let mut last_term = None;
    while pos < data.len() {
        match record::decode(&data[pos..]) {
            Decoded::Record { header, .. } => {
                if header.index != expected {
                    return Err(corrupt(
                        path,
                        pos as u64,
                        format_args!("record holds index {} where {expected} was expected", header.index),
                    ));
                }
                offsets.push(pos as u32);
                pos += header.record_len() as usize;
                expected += 1;
                last_term = Some(header.term);
            }
            bad => {
                let what = match bad {
                    Decoded::Incomplete => "record runs past the end of the segment",
                    _ => "checksum mismatch",
                };
                if mode == ScanMode::Sealed {
                    return Err(corrupt(path, pos as u64, format_args!("{what} in a sealed segment")));
                }
                let term_floor = last_term.unwrap_or(prev_term);
                if let Some(later) = find_valid_record(data, pos + 1, expected, term_floor) {
                    return Err(corrupt(
                        path,
                        pos as u64,
                        format_args!(
                            "{what} for index {expected}, yet a valid record follows at byte {later}; \
                             refusing to drop acknowledged data"
                        ),
                    ));
                }
                break;
            }
        }
    }
    Ok(Scanned {
        offsets,
        valid_len: pos as u64,
        last_term,
    })
}

/// Looks for any checksum-valid record for index >= `min_index` at or after `from`.
/// A torn tail has none (nothing was written after the tear); damage in the middle
/// of the data leaves later records intact, which is how the two are told apart.
fn find_valid_record(data: &[u8], from: usize, min_index: u64, min_term: u64) -> Option<usize> {
    let end = data.len().checked_sub(HEADER_LEN)?;
    (from..=end).find(|&at| {
        let head: &[u8; HEADER_LEN] = data[at..at + HEADER_LEN].try_into().expect("sized slice");
        let h = Header::parse(head);
        // Cheap plausibility checks first so the checksum runs on few candidates.
        h.index >= min_index
            && h.index - min_index < data.len() as u64
            && h.term >= min_term
            && (h.len as usize) <= data.len() - at - HEADER_LEN
            && matches!(record::decode(&data[at..]), Decoded::Record { .. })
    })
}

fn write_idx(seg: &Segment) -> io::Result<()> {
    let mut bytes = Vec::with_capacity(seg.offsets.len() * 4 + IDX_TRAILER);
    for o in &seg.offsets {
        bytes.extend_from_slice(&o.to_le_bytes());
    }
    bytes.extend_from_slice(&(seg.offsets.len() as u64).to_le_bytes());
    bytes.extend_from_slice(&seg.len.to_le_bytes());
    let crc = crc32c::crc32c(&bytes);
    bytes.extend_from_slice(&crc.to_le_bytes());
    let name = seg
        .idx_path()
        .file_name()
        .and_then(|n| n.to_str())
        .map(str::to_owned)
        .expect("segment names are ASCII");
    durable::write_atomic(seg.path.parent().expect("segment has a directory"), &name, &bytes)
}

/// Loads a sealed segment's offsets, or `None` when the index is missing or does not
/// describe exactly `data_len` bytes (then the caller rescans the segment).
fn load_idx(path: &Path, data_len: u64) -> io::Result<Option<Vec<u32>>> {
    let Some(bytes) = durable::read_optional(path)? else {
        return Ok(None);
    };
    if bytes.len() < IDX_TRAILER || !(bytes.len() - IDX_TRAILER).is_multiple_of(4) {
        return Ok(None);
    }
    let body = &bytes[..bytes.len() - 4];
    let crc = u32::from_le_bytes(bytes[bytes.len() - 4..].try_into().expect("4 bytes"));
    let count = u64::from_le_bytes(body[body.len() - 16..body.len() - 8].try_into().expect("8 bytes"));
    let covered = u64::from_le_bytes(body[body.len() - 8..].try_into().expect("8 bytes"));
    let n = (bytes.len() - IDX_TRAILER) / 4;
    if crc32c::crc32c(body) != crc || count != n as u64 || covered != data_len {
        return Ok(None);
    }
    Ok(Some(
        body[..n * 4]
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes")))
            .collect(),
    ))
}
