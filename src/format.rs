//! The on-disk format: byte layouts and offset arithmetic. Pure: no files, no clocks, no KMS.
//!
//! `docs/format.md` is the specification; every constant it names is defined here or in a
//! submodule, and the unit tests pin the layouts.

pub mod block;
pub mod config;
pub mod header;
pub mod name;

/// The version in every record's bytes and associated data (headers, blocks, names). It is 1
/// in every volume format: format 2 changes what names are bound to and how big blocks may be,
/// not the record layouts, so a v1 volume's bytes stay valid as they are.
pub const RECORD_VERSION: u16 = 1;

/// The first volume format: 64 KiB blocks; symlink targets and xattr values bound to the
/// volume only.
pub const VOLUME_FORMAT_V1: u16 = 1;
/// The volume format `kmsfs init` writes: a block size chosen per volume, symlink targets bound
/// to their directory and xattr values to their file or directory, an authenticated config.
pub const VOLUME_FORMAT_V2: u16 = 2;
/// The newest volume format, the one new volumes get.
pub const VOLUME_FORMAT: u16 = VOLUME_FORMAT_V2;

/// Length of a file id: random, unique per file, the binding for everything sealed in it.
pub const FILE_ID_LEN: usize = 16;
/// Length of a volume id in bytes (hex-encoded in the config).
pub const VOLUME_ID_LEN: usize = 16;
/// Length of a directory id: random, unique per directory, the binding of the names in it.
pub const DIR_ID_LEN: usize = 16;

/// A file's random identity, from its header.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct FileId(pub [u8; FILE_ID_LEN]);

impl FileId {
    pub fn generate() -> Self {
        let mut id = [0u8; FILE_ID_LEN];
        crate::crypto::fill_random(&mut id);
        FileId(id)
    }
}

/// File ids are not secret; logs name files by id because names are personal data.
impl std::fmt::Display for FileId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&crate::hex::encode(&self.0))
    }
}

impl std::fmt::Debug for FileId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "FileId({self})")
    }
}

/// A volume's random identity, from its config: the binding of its name key.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct VolumeId(pub [u8; VOLUME_ID_LEN]);

impl VolumeId {
    pub fn generate() -> Self {
        let mut id = [0u8; VOLUME_ID_LEN];
        crate::crypto::fill_random(&mut id);
        VolumeId(id)
    }
}

impl std::fmt::Display for VolumeId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&crate::hex::encode(&self.0))
    }
}

impl std::fmt::Debug for VolumeId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "VolumeId({self})")
    }
}
