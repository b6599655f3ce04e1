//! Plaintext names ↔ backing names, and the files that make that work on disk: directory ids
//! and long-name sidecars. The byte formats are in `format::name`; this is where they meet
//! the backing directory.

use super::error::{FsError, FsResult};
use crate::format::config::RESERVED_ROOT_NAMES;
use crate::format::name::{
    self, BackingEntry, DIR_ID_FILE, DIR_ID_LEN, DirId, MAX_SIDECAR_LEN, NameCipher, NameError, TEMP_PREFIX,
};
use crate::sys;
use std::ffi::{OsStr, OsString};
use std::io::{Read, Write};
use std::os::fd::BorrowedFd;
use std::os::unix::ffi::{OsStrExt, OsStringExt};

/// How this volume stores names.
pub enum Names {
    /// Names, symlink targets and xattrs in the clear (`kmsfs init --plaintext-names`).
    Plain,
    /// Encrypted names; the root directory's id comes from the volume config.
    Encrypted {
        cipher: Box<NameCipher>,
        root_dir_id: DirId,
    },
}

/// Where an entry lives in its backing directory.
pub struct BackingName {
    pub name: OsString,
    /// For a long name: the sidecar's file name and the full encoded name it holds.
    pub sidecar: Option<(OsString, String)>,
}

impl BackingName {
    fn plain(name: &OsStr) -> Self {
        BackingName {
            name: name.to_os_string(),
            sidecar: None,
        }
    }
}

pub fn name_error(e: NameError) -> FsError {
    match e {
        NameError::TooLong => FsError::NameTooLong,
        NameError::Invalid => FsError::InvalidArgument,
        NameError::Encoding | NameError::Auth => FsError::Corrupt,
    }
}

impl Names {
    pub fn encrypted(&self) -> bool {
        matches!(self, Names::Encrypted { .. })
    }

    pub fn cipher(&self) -> Option<&NameCipher> {
        match self {
            Names::Plain => None,
            Names::Encrypted { cipher, .. } => Some(cipher),
        }
    }

    /// The backing name of `name` in the directory whose id is `dir_id` (`None` for plaintext
    /// names), or an error for names that cannot exist.
    pub fn to_backing(&self, dir_id: Option<&DirId>, is_root: bool, name: &OsStr) -> FsResult<BackingName> {
        name::check_name(name.as_bytes()).map_err(name_error)?;
        match (self, dir_id) {
            (Names::Encrypted { cipher, .. }, Some(id)) => {
                let enc = cipher.encrypt_name(id, name.as_bytes()).map_err(name_error)?;
                let (backing, long) = name::backing_name_for(&enc);
                let sidecar = long.then(|| (OsString::from(name::sidecar_of(&backing)), enc));
                Ok(BackingName {
                    name: backing.into(),
                    sidecar,
                })
            }
            _ => {
                if is_reserved_plain(is_root, name) {
                    return Err(FsError::Reserved);
                }
                Ok(BackingName::plain(name))
            }
        }
    }

    /// The plaintext name of a backing entry: `None` for kmsfs's own files, `Some(Err)` for an
    /// entry whose name does not decrypt.
    pub fn from_backing(
        &self,
        dir: BorrowedFd<'_>,
        dir_id: Option<&DirId>,
        is_root: bool,
        backing: &OsStr,
    ) -> Option<Result<OsString, NameError>> {
        let (Names::Encrypted { cipher, .. }, Some(id)) = (self, dir_id) else {
            return (!is_reserved_plain(is_root, backing)).then(|| Ok(backing.to_os_string()));
        };
        let plain = match name::classify(backing.as_bytes()) {
            BackingEntry::Internal => return None,
            BackingEntry::Short(enc) => cipher.decrypt_name(id, enc),
            BackingEntry::Long(long) => read_sidecar(dir, long)
                .ok_or(NameError::Encoding)
                .and_then(|enc| cipher.decrypt_name(id, &enc)),
        };
        Some(plain.map(OsString::from_vec))
    }
}

/// With plaintext names, the names kmsfs keeps for itself: the config, lock and lost+found
/// in the root, and its temporary entries (files being created, files made ahead of their
/// creates) everywhere.
fn is_reserved_plain(is_root: bool, name: &OsStr) -> bool {
    name.as_bytes().starts_with(name::TEMP_PREFIX.as_bytes())
        || is_root
            && RESERVED_ROOT_NAMES
                .iter()
                .any(|r| name.as_bytes() == r.as_bytes())
}

/// Reads a long-name entry's sidecar and checks that it belongs to that entry. Only a regular
/// file is read (no symlink followed, no FIFO or device waited on: `sys::open_regular_at`),
/// and at most `MAX_SIDECAR_LEN` + 1 bytes of it.
fn read_sidecar(dir: BorrowedFd<'_>, long: &str) -> Option<String> {
    let (fd, _) = sys::open_regular_at(dir, OsStr::new(&name::sidecar_of(long)), libc::O_RDONLY, 0).ok()?;
    let mut buf = Vec::new();
    std::fs::File::from(fd)
        .take(MAX_SIDECAR_LEN as u64 + 1)
        .read_to_end(&mut buf)
        .ok()?;
    let enc = String::from_utf8(buf).ok()?;
    (name::long_name_of(&enc) == long).then_some(enc)
}

/// Writes the sidecar of long-name entry `long` durably (temp file, fsync, rename, fsync of
/// the directory) before the entry exists. Returns false if an identical sidecar was already
/// there (it belongs to an existing entry of the same name and must not be removed on failure).
pub fn write_sidecar(dir: BorrowedFd<'_>, long: &OsStr, encoded: &str) -> FsResult<bool> {
    let long = long.to_str().ok_or(FsError::InvalidArgument)?;
    if read_sidecar(dir, long).as_deref() == Some(encoded) {
        return Ok(false);
    }
    let tmp = temp_name();
    let flags = libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW;
    let fd = sys::openat(dir, &tmp, flags, 0o444)?;
    let mut f = std::fs::File::from(fd);
    let sidecar = OsString::from(name::sidecar_of(long));
    let result = f
        .write_all(encoded.as_bytes())
        .and_then(|()| f.sync_all())
        .and_then(|()| sys::renameat2(dir, &tmp, dir, &sidecar, 0))
        .and_then(|()| sys::fsync_dir(dir));
    if let Err(e) = result {
        let _ = sys::unlinkat(dir, &tmp, false);
        return Err(e.into());
    }
    Ok(true)
}

/// A name for something being created, hidden from listings until renamed into place.
pub fn temp_name() -> OsString {
    let mut r = [0u8; 8];
    crate::crypto::fill_random(&mut r);
    format!("{TEMP_PREFIX}{}", crate::hex::encode(&r)).into()
}

/// Reads the id of the directory `dir` from its id file: only a regular file (a symlink, FIFO
/// or device there is an `InvalidData` error, and never blocks), and at most `DIR_ID_LEN` + 1
/// bytes of it.
pub fn read_dir_id(dir: BorrowedFd<'_>) -> std::io::Result<DirId> {
    let (fd, _) = sys::open_regular_at(dir, OsStr::new(DIR_ID_FILE), libc::O_RDONLY, 0)?;
    let mut buf = Vec::with_capacity(DIR_ID_LEN + 1);
    std::fs::File::from(fd)
        .take(DIR_ID_LEN as u64 + 1)
        .read_to_end(&mut buf)?;
    buf.try_into().map_err(|_| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "directory id file has the wrong length",
        )
    })
}

/// Writes a new directory's id file and syncs it and the directory.
pub fn write_dir_id(dir: BorrowedFd<'_>, id: &DirId) -> std::io::Result<()> {
    write_dir_id_file(dir, id)?;
    sys::fsync_dir(dir)
}

/// Writes a new directory's id file and syncs it (not the directory: the caller does, once
/// it has finished the directory).
pub fn write_dir_id_file(dir: BorrowedFd<'_>, id: &DirId) -> std::io::Result<()> {
    let fd = sys::openat(
        dir,
        OsStr::new(DIR_ID_FILE),
        libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW,
        0o444,
    )?;
    let mut f = std::fs::File::from(fd);
    f.write_all(id)?;
    f.sync_all()
}
