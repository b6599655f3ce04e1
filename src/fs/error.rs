//! The filesystem's error type and the one table that maps it to errno.

use crate::kms::KmsError;
use std::io;

#[derive(Debug)]
pub enum FsError {
    /// A system call on the backing directory failed; its errno passes through.
    Io(io::Error),
    /// Content failed to authenticate or a header/length on disk is impossible. Already logged
    /// with the file id and block index where it was found.
    Corrupt,
    /// The KMS refused or could not be reached.
    Kms(KmsError),
    /// A name the volume keeps for itself (config, lock file).
    Reserved,
    /// An inode or handle number the kernel sent that we do not know.
    Stale,
    BadHandle,
    /// The handle was not opened for writing.
    NotWritable,
    /// The mount or the backing file is read-only.
    ReadOnly,
    Unsupported,
    /// No such extended attribute.
    NoAttribute,
    InvalidArgument,
    /// Past the largest file size the format allows.
    TooBig,
    /// A name longer than 255 bytes, or a symlink target too long once encrypted.
    NameTooLong,
    /// The mount is locked: keys are gone.
    Locked,
    /// No such entry (a name the volume keeps for itself looks absent).
    NotFound,
    /// A directory still holds entries.
    NotEmpty,
    /// Opened for writing, but the backing file can only be read.
    PermissionDenied,
    /// An xattr name too long once stored, or a reply buffer smaller than the value.
    Range,
    /// The operation needs the KMS and may not wait for it: the first try of an open or a
    /// create on a FUSE worker (which then parks it, so this never reaches the kernel), or
    /// one refused because every KMS waiter is busy and the queue is full (EAGAIN: try again).
    WouldWait,
    /// A symlink would have to be valid in two directories (format 2 seals its target for
    /// one): a hard link or an exchange across directories.
    CrossDirectory,
    /// A `user.` attribute on what Linux allows none on (a symlink, a device).
    NotPermitted,
}

impl FsError {
    /// The errno the kernel (and so the application) sees. Exhaustive on purpose: a new
    /// variant must decide its errno here.
    pub fn errno(&self) -> i32 {
        match self {
            FsError::Io(e) => e.raw_os_error().unwrap_or(libc::EIO),
            FsError::Corrupt => libc::EIO,
            FsError::Kms(k) => match k {
                KmsError::Denied(_) => libc::EACCES,
                KmsError::Unreachable(_) => libc::EIO,
                KmsError::Corrupt(_) => libc::EIO,
                KmsError::Misconfigured(_) => libc::EIO,
            },
            FsError::Reserved => libc::EPERM,
            FsError::Stale => libc::ESTALE,
            FsError::BadHandle => libc::EBADF,
            FsError::NotWritable => libc::EBADF,
            FsError::ReadOnly => libc::EROFS,
            FsError::Unsupported => libc::EOPNOTSUPP,
            FsError::NoAttribute => libc::ENODATA,
            FsError::InvalidArgument => libc::EINVAL,
            FsError::TooBig => libc::EFBIG,
            FsError::NameTooLong => libc::ENAMETOOLONG,
            FsError::Locked => libc::ENOKEY,
            FsError::NotFound => libc::ENOENT,
            FsError::NotEmpty => libc::ENOTEMPTY,
            FsError::PermissionDenied => libc::EACCES,
            FsError::Range => libc::ERANGE,
            FsError::WouldWait => libc::EAGAIN,
            FsError::CrossDirectory => libc::EXDEV,
            FsError::NotPermitted => libc::EPERM,
        }
    }
}

/// For logs and one-line errors: what went wrong, never a name or a key (the variants carry
/// neither).
impl std::fmt::Display for FsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FsError::Io(e) => write!(f, "{e}"),
            FsError::Corrupt => f.write_str("failed authentication or impossible on-disk data"),
            FsError::Kms(e) => write!(f, "{e}"),
            FsError::Reserved => f.write_str("name reserved by kmsfs"),
            FsError::Stale => f.write_str("unknown inode"),
            FsError::BadHandle => f.write_str("unknown handle"),
            FsError::NotWritable => f.write_str("handle not open for writing"),
            FsError::ReadOnly => f.write_str("read-only"),
            FsError::Unsupported => f.write_str("not supported"),
            FsError::NoAttribute => f.write_str("no such attribute"),
            FsError::InvalidArgument => f.write_str("invalid argument"),
            FsError::TooBig => f.write_str("file too large"),
            FsError::NameTooLong => f.write_str("name too long"),
            FsError::Locked => f.write_str("volume locked: keys are gone"),
            FsError::NotFound => f.write_str("no such entry"),
            FsError::NotEmpty => f.write_str("directory not empty"),
            FsError::PermissionDenied => f.write_str("permission denied"),
            FsError::Range => f.write_str("too long for the attribute or the buffer"),
            FsError::WouldWait => f.write_str("too many operations waiting on the KMS"),
            FsError::CrossDirectory => f.write_str("a symlink cannot be linked across directories"),
            FsError::NotPermitted => f.write_str("operation not permitted"),
        }
    }
}

impl std::error::Error for FsError {}

impl From<io::Error> for FsError {
    fn from(e: io::Error) -> Self {
        FsError::Io(e)
    }
}

impl From<KmsError> for FsError {
    fn from(e: KmsError) -> Self {
        FsError::Kms(e)
    }
}

pub type FsResult<T> = Result<T, FsError>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errnos() {
        assert_eq!(FsError::Corrupt.errno(), libc::EIO);
        assert_eq!(FsError::Kms(KmsError::Denied("x".into())).errno(), libc::EACCES);
        assert_eq!(
            FsError::Io(io::Error::from_raw_os_error(libc::ENOSPC)).errno(),
            libc::ENOSPC
        );
        assert_eq!(FsError::Locked.errno(), libc::ENOKEY);
    }
}
