//! The KMIP codec on arbitrary bytes: TTLV decode (canonical), response and payload readers,
//! the wrapped-key layout. The body is kmsfs::fuzzing::kmip, which tests/fuzz_smoke.rs also runs
//! on stable.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| kmsfs::fuzzing::kmip(data));
