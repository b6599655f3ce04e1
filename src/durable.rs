//! Crash-safe small-file writes (the config and the keystore are replaced whole, never edited),
//! and bounded reads of small files that may sit in a directory someone else can write.

use crate::sys;
use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Replaces `path` with `bytes` so that a crash leaves either the old or the new file, never a
/// mix: write a temp file beside it, fsync it, rename over, fsync the directory.
///
/// The directory may be the backing directory, which others can write: the temp file has an
/// unguessable name and is created with O_EXCL|O_NOFOLLOW (never opened if something is
/// already there, never through a link), and only a temp file we created is removed on failure.
/// The rename replaces whatever is at `path` (a planted symlink included) and writes through
/// nothing.
pub fn atomic_write(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    let dir_path = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, "path has no file name"))?;
    let dir = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY)
        .open(dir_path)?;
    let mut random = [0u8; 8];
    crate::crypto::fill_random(&mut random);
    let mut tmp = OsString::from(".");
    tmp.push(name);
    tmp.push(format!(
        ".tmp{}.{}",
        std::process::id(),
        crate::hex::encode(&random)
    ));
    let fd = sys::openat(
        dir.as_fd(),
        &tmp,
        libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW,
        mode,
    )?;
    let mut f = File::from(fd);
    let result = f
        .write_all(bytes)
        .and_then(|()| f.sync_all())
        .and_then(|()| sys::renameat2(dir.as_fd(), &tmp, dir.as_fd(), name, 0))
        .and_then(|()| dir.sync_all());
    if result.is_err() {
        let _ = sys::unlinkat(dir.as_fd(), &tmp, false);
    }
    result
}

/// Makes the entry `path` durable in its directory (after a mkdir, say): fsync of the parent.
pub fn sync_parent(path: &Path) -> std::io::Result<()> {
    let parent = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    File::open(parent)?.sync_all()
}

/// Reads from offset 0 until `buf` is full or the file ends; returns the bytes read.
pub fn read_up_to(file: &File, buf: &mut [u8]) -> std::io::Result<usize> {
    use std::os::unix::fs::FileExt;
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// Reads a small regular file whole, refusing anything that is not a regular file or is
/// longer than `max` bytes. Opened once, without following a symlink in the last component
/// and without blocking on a FIFO or device (`sys::open_regular`), and checked on the open
/// descriptor, so a file swapped or grown between a check and the read cannot make us read
/// more, or something else. A symlink or special file is an `InvalidData` error saying what
/// it is.
pub fn read_bounded(path: &Path, max: u64) -> std::io::Result<Vec<u8>> {
    let (fd, st) = sys::open_regular(path, libc::O_RDONLY, 0).map_err(|e| match e.kind() {
        std::io::ErrorKind::InvalidData => std::io::Error::new(
            e.kind(),
            format!("{e} (kmsfs reads it only as a regular file, never through a link): put the file itself in its place"),
        ),
        _ => e,
    })?;
    read_all_bounded(&File::from(fd), st.st_size as u64, max)
}

/// Reads an open file from its current offset to its end, refusing more than `max` bytes.
/// `size_hint` (the file's size when it was opened) sizes the buffer once, so a keystore's
/// bytes are not left behind in a reallocated one.
pub fn read_all_bounded(file: &File, size_hint: u64, max: u64) -> std::io::Result<Vec<u8>> {
    let mut buf = Vec::with_capacity(size_hint.min(max) as usize + 1);
    file.take(max + 1).read_to_end(&mut buf)?;
    if buf.len() as u64 > max {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("larger than {max} bytes"),
        ));
    }
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn replaces_whole_file_with_mode() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f");
        super::atomic_write(&p, b"one", 0o600).unwrap();
        super::atomic_write(&p, b"two", 0o600).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        assert_eq!(std::fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 1);
    }

    #[test]
    fn bounded_reads_refuse_large_and_special_files() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f");
        std::fs::write(&p, b"12345").unwrap();
        assert_eq!(super::read_bounded(&p, 5).unwrap(), b"12345");
        assert!(super::read_bounded(&p, 4).is_err());
        assert!(super::read_bounded(std::path::Path::new("/dev/zero"), 4).is_err());
        assert!(super::read_bounded(d.path(), 4).is_err());
    }

    #[test]
    fn bounded_reads_refuse_links_and_fifos_without_blocking() {
        let d = tempfile::tempdir().unwrap();
        let target = d.path().join("target");
        std::fs::write(&target, b"secret").unwrap();
        let link = d.path().join("link");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let e = super::read_bounded(&link, 100).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidData);
        assert!(e.to_string().contains("symbolic link"), "{e}");
        let fifo = d.path().join("fifo");
        rustix::fs::mknodat(
            rustix::fs::CWD,
            fifo.as_path(),
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from_bits_retain(0o600),
            0,
        )
        .unwrap();
        let e = super::read_bounded(&fifo, 100).unwrap_err();
        assert!(e.to_string().contains("FIFO"), "{e}");
    }

    #[test]
    fn atomic_write_replaces_a_planted_link_and_writes_nothing_through_it() {
        let d = tempfile::tempdir().unwrap();
        let victim = d.path().join("victim");
        std::fs::write(&victim, b"victim").unwrap();
        let p = d.path().join("f");
        std::os::unix::fs::symlink(&victim, &p).unwrap();
        super::atomic_write(&p, b"new", 0o600).unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"victim");
        assert!(std::fs::symlink_metadata(&p).unwrap().is_file());
        assert_eq!(std::fs::read(&p).unwrap(), b"new");
    }
}
