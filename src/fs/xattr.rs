//! Extended attributes. Only the `user.` namespace is stored: with encrypted names, its
//! attribute names are encrypted like file names and its values with a random nonce, bound to
//! the attribute name and (volume format 2) to the file's id or the directory's id. `security.`, `system.` (POSIX ACLs) and `trusted.` are not stored:
//! reading one finds nothing and setting one is refused (EOPNOTSUPP), so no label or ACL can
//! sit in the backing directory in the clear, and permissions are the mode bits alone.

use super::Fs;
use super::error::{FsError, FsResult};
use super::inode::{Inode, Kind};
use super::names::Names;
use crate::format::name::{NameCipher, XATTR_USER_PREFIX, XattrOwner};
use crate::sys;
use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;

/// Largest attribute value Linux allows.
const XATTR_SIZE_MAX: usize = 65536;

fn user_name(name: &OsStr) -> Option<&[u8]> {
    name.as_bytes()
        .strip_prefix(XATTR_USER_PREFIX.as_bytes())
        .filter(|n| !n.is_empty())
}

impl Fs {
    /// What a value stored on `inode` is bound to: its file id (from its header) or its
    /// directory id. Linux has `user.` attributes on these two kinds only (EPERM otherwise).
    fn xattr_owner(&self, cipher: &NameCipher, inode: &Inode) -> FsResult<XattrOwner> {
        if !cipher.binds_placement() {
            // Format 1: not bound to the owner; any value will do.
            return Ok(XattrOwner::Dir([0; crate::format::DIR_ID_LEN]));
        }
        match inode.kind {
            Kind::Dir => match self.dir_id(inode)? {
                Some(id) => Ok(XattrOwner::Dir(id)),
                None => Err(FsError::Corrupt),
            },
            Kind::File => match inode.content() {
                Some(c) => Ok(XattrOwner::File(c.file_id())),
                None => Ok(XattrOwner::File(self.header_of(inode)?.file_id)),
            },
            _ => Err(FsError::NotPermitted),
        }
    }

    /// The backing attribute name for `user.NAME`.
    fn stored_xattr_name(names: &Names, name: &[u8]) -> OsString {
        match names.cipher() {
            Some(c) => c.encrypt_xattr_name(name).into(),
            None => {
                let mut n = OsString::from(XATTR_USER_PREFIX);
                n.push(OsStr::from_bytes(name));
                n
            }
        }
    }

    pub fn getxattr(&self, ino: u64, name: &OsStr) -> FsResult<Vec<u8>> {
        let inode = self.inodes.get(ino)?;
        let Some(plain) = user_name(name) else {
            return Err(FsError::NoAttribute);
        };
        let names = self.names()?;
        let stored_name = Self::stored_xattr_name(&names, plain);
        let mut buf = vec![0u8; XATTR_SIZE_MAX + 256];
        let n = sys::getxattr_fd(inode.fd(), &stored_name, &mut buf)?;
        buf.truncate(n);
        match names.cipher() {
            None => Ok(buf),
            Some(c) => c
                .decrypt_xattr_value(&self.xattr_owner(c, &inode)?, &stored_name.to_string_lossy(), &buf)
                .map_err(|_| {
                    log::error!(
                        "inode {ino}: an extended attribute value does not decrypt for this file (altered, or copied from another)"
                    );
                    FsError::Corrupt
                }),
        }
    }

    /// NUL-separated names, as listxattr(2) returns them.
    pub fn listxattr(&self, ino: u64) -> FsResult<Vec<u8>> {
        let inode = self.inodes.get(ino)?;
        let mut buf = vec![0u8; XATTR_SIZE_MAX];
        let n = sys::listxattr_fd(inode.fd(), &mut buf)?;
        let names = self.names()?;
        let mut out = Vec::new();
        for stored in buf[..n].split(|&b| b == 0).filter(|s| !s.is_empty()) {
            let plain = match names.cipher() {
                None => user_name(OsStr::from_bytes(stored)).map(<[u8]>::to_vec),
                Some(c) => c.decrypt_xattr_name(stored).ok(),
            };
            if let Some(p) = plain {
                out.extend_from_slice(XATTR_USER_PREFIX.as_bytes());
                out.extend_from_slice(&p);
                out.push(0);
            }
        }
        Ok(out)
    }

    pub fn setxattr(&self, ino: u64, name: &OsStr, value: &[u8], flags: i32) -> FsResult<()> {
        self.check_writable()?;
        let inode = self.inodes.get(ino)?;
        let Some(plain) = user_name(name) else {
            return Err(FsError::Unsupported);
        };
        if plain.len() > 255 - XATTR_USER_PREFIX.len() {
            return Err(FsError::Range);
        }
        let names = self.names()?;
        let stored_name = Self::stored_xattr_name(&names, plain);
        if stored_name.len() > 255 {
            return Err(FsError::Range);
        }
        let stored = match names.cipher() {
            None => value.to_vec(),
            Some(c) => c.encrypt_xattr_value(
                &self.xattr_owner(c, &inode)?,
                &stored_name.to_string_lossy(),
                value,
            ),
        };
        Ok(sys::setxattr_fd(inode.fd(), &stored_name, &stored, flags)?)
    }

    pub fn removexattr(&self, ino: u64, name: &OsStr) -> FsResult<()> {
        self.check_writable()?;
        let inode = self.inodes.get(ino)?;
        let Some(plain) = user_name(name) else {
            return Err(FsError::NoAttribute);
        };
        let names = self.names()?;
        Ok(sys::removexattr_fd(
            inode.fd(),
            &Self::stored_xattr_name(&names, plain),
        )?)
    }
}
