//! The block codec's cost next to the raw cipher: sealing and opening one 64 KiB block, and a
//! 1 MiB write (16 blocks) and read through `ContentFile` on a tmpfs file. The gap between
//! "raw" and "codec" is the format's overhead (AAD, nonce, layout); the gap between 16 × seal
//! and the 1 MiB write is the data path's (allocation, copies, pwrite).
//!
//! `cargo bench --bench codec`

use aes_gcm_siv::aead::{AeadInOut, KeyInit};
use aes_gcm_siv::{Aes256GcmSiv, Nonce};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use kmsfs::crypto::SecretKey;
use kmsfs::format::FileId;
use kmsfs::format::block::{BlockLayout, ContentCipher, DEFAULT_BLOCK_SIZE, RECORD_OVERHEAD};
use kmsfs::format::header::HEADER_LEN;
use kmsfs::fs::content::ContentFile;
use std::hint::black_box;
use std::sync::Arc;

const BLOCK: usize = DEFAULT_BLOCK_SIZE as usize;
const MIB: usize = 1 << 20;

fn block(c: &mut Criterion) {
    let mut g = c.benchmark_group("64KiB block");
    g.throughput(Throughput::Bytes(BLOCK as u64));
    let raw = Aes256GcmSiv::new_from_slice(&[7u8; 32]).unwrap();
    let nonce = Nonce::from([1u8; 12]);
    let mut buf = vec![0x5au8; BLOCK];
    g.bench_function("raw AES-256-GCM-SIV encrypt", |b| {
        b.iter(|| {
            raw.encrypt_inout_detached(&nonce, b"aad", buf.as_mut_slice().into())
                .unwrap()
        })
    });
    let tag = raw
        .encrypt_inout_detached(&nonce, b"aad", buf.as_mut_slice().into())
        .unwrap();
    g.bench_function("raw AES-256-GCM-SIV decrypt", |b| {
        b.iter(|| {
            // A failed tag check costs the same work as a good one: both decrypt and hash.
            let _ = raw.decrypt_inout_detached(&nonce, b"aad", buf.as_mut_slice().into(), &tag);
        })
    });
    let cipher = ContentCipher::new(&SecretKey::generate(), FileId::generate());
    let mut rec = vec![0x5au8; BLOCK + RECORD_OVERHEAD as usize];
    g.bench_function("codec seal", |b| {
        b.iter(|| cipher.seal(black_box(3), false, &mut rec))
    });
    cipher.seal(3, false, &mut rec);
    let sealed = rec.clone();
    g.bench_function("codec open", |b| {
        b.iter(|| {
            rec.copy_from_slice(&sealed);
            cipher.open(black_box(3), false, &mut rec).unwrap()
        })
    });
    g.finish();
}

fn content_file() -> (tempfile::NamedTempFile, ContentFile) {
    let dir = if std::path::Path::new("/dev/shm").is_dir() {
        "/dev/shm"
    } else {
        "/tmp"
    };
    let tmp = tempfile::NamedTempFile::new_in(dir).unwrap();
    tmp.as_file().set_len(HEADER_LEN).unwrap();
    let cipher = Arc::new(ContentCipher::new(&SecretKey::generate(), FileId::generate()));
    let f = ContentFile::new(tmp.reopen().unwrap(), cipher, BlockLayout::DEFAULT, true).unwrap();
    (tmp, f)
}

fn mebibyte(c: &mut Criterion) {
    let mut g = c.benchmark_group("1MiB request");
    g.throughput(Throughput::Bytes(MIB as u64));
    let data = vec![0xa5u8; MIB];
    let (_tmp, f) = content_file();
    g.bench_function("overwrite (16 blocks)", |b| b.iter(|| f.write(0, &data).unwrap()));
    let (_tmp2, app) = content_file();
    let mut off = 0u64;
    g.bench_function("append (16 blocks)", |b| {
        b.iter(|| {
            // Stay within 256 MiB of tmpfs: start over when the file gets big.
            if off >= 256 * MIB as u64 {
                app.truncate(0).unwrap();
                off = 0;
            }
            app.write(off, &data).unwrap();
            off += MIB as u64;
        })
    });
    g.bench_function("read (16 blocks)", |b| b.iter(|| f.read(0, MIB as u32).unwrap()));
    g.throughput(Throughput::Bytes(128 * 1024));
    g.bench_function("read 128 KiB (a readahead request)", |b| {
        b.iter(|| f.read(black_box(256 * 1024), 128 * 1024).unwrap())
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20).measurement_time(std::time::Duration::from_secs(2));
    targets = block, mebibyte
}
criterion_main!(benches);
