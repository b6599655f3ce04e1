//! ContentCipher::open on arbitrary records, seal/open round trips, block and size arithmetic.
//! The body is kmsfs::fuzzing::block, which tests/fuzz_smoke.rs also runs on stable.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| kmsfs::fuzzing::block(data));
