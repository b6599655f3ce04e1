//! VolumeConfig::decode on arbitrary bytes; what it accepts encodes back to an equal config.
//! The body is kmsfs::fuzzing::config, which tests/fuzz_smoke.rs also runs on stable.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| kmsfs::fuzzing::config(data));
