//! File attributes as the mount shows them: the backing object's, with plaintext sizes.

use super::inode::Kind;
use crate::format::block::BlockLayout;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attr {
    pub ino: u64,
    pub size: u64,
    pub blocks: u64,
    pub atime: SystemTime,
    pub mtime: SystemTime,
    pub ctime: SystemTime,
    pub kind: Kind,
    pub perm: u16,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    pub rdev: u32,
    pub blksize: u32,
}

fn time(sec: i64, nsec: i64) -> SystemTime {
    let d = Duration::new(sec.unsigned_abs(), nsec.clamp(0, 999_999_999) as u32);
    if sec >= 0 { UNIX_EPOCH + d } else { UNIX_EPOCH - d }
}

/// Plaintext size of a regular file from its backing length, for stat only. An impossible
/// length (a create cut short by a crash, a torn last record) shows the size of the intact
/// part; opening the file is what reports the damage.
pub fn shown_size(layout: BlockLayout, backing_len: u64) -> u64 {
    layout.extent(backing_len).map_or(0, |e| e.size)
}

impl Attr {
    /// Attributes of inode `ino` from its backing stat, in a volume of `layout`; `open_size`
    /// is the size of an open regular file (authoritative while open).
    pub fn from_stat(ino: u64, st: &libc::stat, layout: BlockLayout, open_size: Option<u64>) -> Attr {
        let kind = Kind::from_mode(st.st_mode);
        let size = match kind {
            Kind::File => open_size.unwrap_or_else(|| shown_size(layout, st.st_size as u64)),
            _ => st.st_size as u64,
        };
        Attr {
            ino,
            size,
            blocks: st.st_blocks as u64,
            atime: time(st.st_atime, st.st_atime_nsec),
            mtime: time(st.st_mtime, st.st_mtime_nsec),
            ctime: time(st.st_ctime, st.st_ctime_nsec),
            kind,
            perm: (st.st_mode & 0o7777) as u16,
            nlink: st.st_nlink as u32,
            uid: st.st_uid,
            gid: st.st_gid,
            rdev: st.st_rdev as u32,
            // The preferred I/O size: a whole block (at most 1 MiB).
            blksize: layout.block_size() as u32,
        }
    }
}
