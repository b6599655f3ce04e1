//! NameCipher decoders on arbitrary stored names, symlinks and xattrs; encrypt/decrypt round trips.
//! The body is kmsfs::fuzzing::name, which tests/fuzz_smoke.rs also runs on stable.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| kmsfs::fuzzing::name(data));
