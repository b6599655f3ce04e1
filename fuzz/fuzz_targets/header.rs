//! format::header::decode on arbitrary bytes, and headers built from fields (re-encode, re-wrap, torn re-wrap).
//! The body is kmsfs::fuzzing::header, which tests/fuzz_smoke.rs also runs on stable.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| kmsfs::fuzzing::header(data));
