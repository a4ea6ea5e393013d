//! Small durable-file helpers: atomic replace (write temp, fsync, rename, fsync the
//! directory) and directory fsync. Used for the vote, committed and purged markers,
//! segment index files and the state machine's CURRENT pointer.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::Path;

/// Replaces `dir/name` with `bytes` so that after a crash the file holds either the
/// old or the new contents, and once this returns the new contents survive a crash.
pub fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> io::Result<()> {
    let tmp = dir.join(format!("{name}.tmp"));
    let dst = dir.join(name);
    {
        let mut f = OpenOptions::new().write(true).create(true).truncate(true).open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, &dst)?;
    fsync_dir(dir)
}

/// Makes creations, renames and deletions of entries in `dir` durable.
pub fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Reads `path`, or `None` when it does not exist.
pub fn read_optional(path: &Path) -> io::Result<Option<Vec<u8>>> {
    match fs::read(path) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// An `io::Error` of kind `InvalidData` that names the file and byte offset, so an
/// operator can find the damage.
pub fn corrupt(path: &Path, offset: u64, what: impl std::fmt::Display) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!(
            "corrupt CommitLog data in {} at byte offset {offset}: {what}",
            path.display()
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_replaces_and_leaves_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        write_atomic(dir.path(), "vote", b"one").unwrap();
        write_atomic(dir.path(), "vote", b"two").unwrap();
        assert_eq!(read_optional(&dir.path().join("vote")).unwrap().unwrap(), b"two");
        assert!(!dir.path().join("vote.tmp").exists());
        assert!(read_optional(&dir.path().join("missing")).unwrap().is_none());
    }
}
