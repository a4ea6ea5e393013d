//! How full the filesystem holding a replica's data is: `statvfs(3)`, for the
//! broker's disk watermarks.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// `(used, capacity)` bytes of the filesystem holding `path`, as `df` computes
/// `Use%`: used = blocks in use, capacity = used + what an unprivileged writer
/// may still take. Blocks reserved for root are left out of both, since the
/// broker cannot count on them (on some filesystems they are most of the disk).
pub fn usage(path: &Path) -> io::Result<(u64, u64)> {
    let c = CString::new(path.as_os_str().as_bytes()).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} contains a NUL byte", path.display()),
        )
    })?;
    // SAFETY: `statvfs` only writes into the zeroed struct we pass, and `c` is a
    // valid NUL-terminated path for the duration of the call.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(e.kind(), format!("statvfs {}: {e}", path.display())));
    }
    let frsize = st.f_frsize as u64;
    let used = (st.f_blocks as u64)
        .saturating_sub(st.f_bfree as u64)
        .saturating_mul(frsize);
    let avail = (st.f_bavail as u64).saturating_mul(frsize);
    Ok((used, used.saturating_add(avail)))
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_temp_dir_has_a_size() {
        let dir = tempfile::tempdir().unwrap();
        let (used, total) = super::usage(dir.path()).unwrap();
        assert!(total > 0 && used <= total, "used {used} of {total}");
        assert!(super::usage(std::path::Path::new("/no/such/dir")).is_err());
    }
}
