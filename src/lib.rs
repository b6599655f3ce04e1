//! kmsfs: a transparent encrypting FUSE filesystem whose keys live in a KMS.
//!
//! Layers, bottom up (each uses only those below it): `crypto` → `format` → `kms` → `fs` →
//! `fuse`; `volume` opens a volume for every command, `daemon` wires a mount together and
//! `cli` parses commands. docs/design.md has the module map; tests/layers.rs checks it.
#![deny(unsafe_code)]

pub mod anchor;
pub mod audit;
pub mod cli;
pub mod control;
pub mod crypto;
pub mod daemon;
pub mod docs;
pub mod durable;
pub mod exit;
pub mod format;
pub mod fs;
pub mod fsck;
pub mod fuse;
#[doc(hidden)]
pub mod fuzzing;
pub mod hex;
pub mod init;
pub mod install;
pub mod journal;
pub mod key_backup;
pub mod key_list;
pub mod keycache;
pub mod kmip;
pub mod kms;
pub mod logging;
pub mod metrics;
pub mod mount_cmd;
pub mod mount_helper;
pub mod mount_state;
pub mod mountinfo;
pub mod notify;
pub mod policy;
pub mod progress;
pub mod revocation;
pub mod rewrap;
pub mod stop;
pub mod sys;
pub mod time;
pub mod unmount;
pub mod volume;
pub mod watchdog;
