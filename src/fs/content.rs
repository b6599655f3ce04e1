//! Reading and writing one file's encrypted content on its backing descriptor: the block codec
//! applied at offsets, with read-modify-write of partial blocks and the final-block rule.
//!
//! Crash ordering (see docs/format.md, "Crash behaviour"): every step that grows a file first
//! makes the grown file valid on its own, so an interrupted extension leaves readable data.

use super::error::{FsError, FsResult};
use crate::crypto::{self, NONCE_LEN};
use crate::format::block::{BlockLayout, ContentCipher, Extent, RECORD_OVERHEAD, record_body};
use crate::format::header::HEADER_LEN;
use crate::sys;
use rayon::prelude::*;
use std::fs::File;
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

/// Largest plaintext size we accept: keeps every backing offset well inside `i64`.
pub const MAX_FILE_SIZE: u64 = 1 << 60;

thread_local! {
    /// Each thread's buffer for the records a write builds, kept between writes: a 1 MiB
    /// request neither allocates nor zero-fills its records (the fill alone cost the daemon
    /// as much as the copy). Between writes it holds what the last one put on disk, and the
    /// plaintext of the blocks it changed in part (as the page cache holds them too).
    static WRITE_BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The plaintext of the file's final block, kept after a write seals it: the next append must
/// reseal that block as a middle block, and this saves reading and opening it again.
struct FinalBlock {
    index: u64,
    plain: Vec<u8>,
}

/// Requests of this process now sealing or opening several records (the cipher step only,
/// not their disk I/O).
static MULTI_RECORD_BUSY: AtomicUsize = AtomicUsize::new(0);

/// Cores below which a request's records are never split: the caller copying the data and
/// the kernel moving it already need two. On a 2-core machine splitting a 1 MiB sequential
/// read or write gained no speed and cost a quarter of the daemon's CPU (the pool's
/// hand-offs and its idle threads' yielding).
const SPLIT_MIN_CORES: usize = 4;

/// Whether this machine has cores to spare for splitting a request.
fn cores_to_spare() -> bool {
    static SPARE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *SPARE.get_or_init(|| std::thread::available_parallelism().is_ok_and(|n| n.get() >= SPLIT_MIN_CORES))
}

/// One request sealing or opening several records, counted in [`MULTI_RECORD_BUSY`] while
/// it lives. Its records are split across the cores only when no other request was in its
/// cipher step as it began (two that begin together may both split) and the machine has
/// cores to spare: a lone request (a direct read or write at queue depth 1, one stream on
/// a large server) then finishes sooner, while concurrent requests already keep the cores
/// busy and splitting them too only adds hand-offs.
struct Busy {
    split: bool,
}

impl Busy {
    fn enter() -> Self {
        let alone = MULTI_RECORD_BUSY.fetch_add(1, Ordering::Relaxed) == 0;
        Busy {
            split: alone && cores_to_spare(),
        }
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        MULTI_RECORD_BUSY.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Runs `f` on each `record`-long piece of `buf` (the last may be short) with its block
/// index, counting from `first`; on the pool's threads when `split`. An error ends it (with
/// `split`, which of several errors comes back is not fixed).
///
/// Each thread's run of records is one [`crypto::scrubbed`] call: the cipher's stack is
/// wiped once after the run instead of after each record (32 KiB zeroed per 4 KiB record
/// cost about as much as opening it). So the split hands each pool thread one contiguous run
/// rather than single records.
fn for_each_record(
    buf: &mut [u8],
    record: usize,
    first: u64,
    split: bool,
    f: impl Fn(u64, &mut [u8]) -> FsResult<()> + Sync,
) -> FsResult<()> {
    let run = |from: u64, recs: &mut [u8]| {
        crypto::scrubbed(|| {
            recs.chunks_mut(record)
                .enumerate()
                .try_for_each(|(i, rec)| f(from + i as u64, rec))
        })
    };
    if split {
        let records = buf.len().div_ceil(record);
        let per_thread = records.div_ceil(rayon::current_num_threads().max(1));
        buf.par_chunks_mut(per_thread * record)
            .enumerate()
            .try_for_each(|(i, recs)| run(first + (i * per_thread) as u64, recs))
    } else {
        run(first, buf)
    }
}

/// One open file's content: the backing descriptor, the file's cipher and its size.
pub struct ContentFile {
    file: File,
    cipher: Arc<ContentCipher>,
    /// The volume's block size and the record arithmetic that follows from it.
    layout: BlockLayout,
    writable: bool,
    /// Plaintext size, which also guards the content: readers hold it shared, writers and
    /// truncate hold it exclusively, so no reader sees a half-written block and no two
    /// read-modify-writes of one block interleave.
    size: RwLock<u64>,
    /// Only touched with `size` held exclusively.
    final_block: std::sync::Mutex<Option<FinalBlock>>,
}

impl ContentFile {
    /// Wraps a backing descriptor whose header has been read and whose key has been unwrapped;
    /// `layout` is its volume's.
    pub fn new(
        file: File,
        cipher: Arc<ContentCipher>,
        layout: BlockLayout,
        writable: bool,
    ) -> FsResult<Self> {
        let len = file.metadata()?.len();
        let Ok(Extent { size, torn }) = layout.extent(len) else {
            log::error!("file {}: backing file shorter than its header", cipher.file_id());
            return Err(FsError::Corrupt);
        };
        if torn > 0 {
            // A crash tore the record being appended: keep the intact records. A writable
            // open cuts the torn bytes off so the file is valid again.
            log::warn!(
                "file {}: ignoring a torn record at the end ({torn} bytes)",
                cipher.file_id()
            );
            if writable {
                file.set_len(layout.backing_len(size))?;
            }
        }
        Ok(ContentFile {
            file,
            cipher,
            layout,
            writable,
            size: RwLock::new(size),
            final_block: std::sync::Mutex::new(None),
        })
    }

    pub fn size(&self) -> u64 {
        *self.size.read().unwrap_or_else(|p| p.into_inner())
    }

    pub fn file_id(&self) -> crate::format::FileId {
        *self.cipher.file_id()
    }

    pub fn writable(&self) -> bool {
        self.writable
    }

    /// Reads up to `len` bytes at `off`; short only at end of file.
    pub fn read(&self, off: u64, len: u32) -> FsResult<Vec<u8>> {
        let mut buf = Vec::new();
        let n = self.read_into(off, len, &mut buf)?;
        buf.truncate(n);
        Ok(buf)
    }

    /// Reads up to `len` bytes at `off` into `buf[..n]` and returns `n` (short only at end of
    /// file). `buf` is a scratch buffer the caller keeps between calls: it only ever grows,
    /// so the hot path neither allocates nor clears memory.
    pub fn read_into(&self, off: u64, len: u32, buf: &mut Vec<u8>) -> FsResult<usize> {
        let l = self.layout;
        let size = self.size.read().unwrap_or_else(|p| p.into_inner());
        let size = *size;
        if off >= size || len == 0 {
            return Ok(0);
        }
        let end = size.min(off + len as u64);
        let (first, last) = (l.block_of(off), l.block_of(end - 1));
        let final_block = l.block_count(size) - 1;
        let start = l.record_offset(first);
        let stop = l.record_offset(last) + l.block_plain_len(size, last) + RECORD_OVERHEAD;
        let need = (stop - start) as usize;
        if buf.len() < need {
            buf.resize(need, 0);
        }
        let buf = &mut buf[..need];
        self.read_exact_at(buf, start)?;
        // Records are independent: open them on all cores (a 1 MiB request is 16 of them at 64 KiB,
        // 256 at 4 KiB).
        self.each_record(buf, first, |b, rec| self.open_record(b, b == final_block, rec))?;
        // Move the wanted plaintext to the front of the buffer: no second buffer, no copy
        // beyond this one.
        let mut len = 0;
        for b in first..=last {
            let plain = l.block_plain_len(size, b);
            let rec_start = (l.record_offset(b) - start) as usize;
            let bstart = l.block_start(b);
            let from = rec_start + NONCE_LEN + (off.max(bstart) - bstart) as usize;
            let to = rec_start + NONCE_LEN + (end.min(bstart + plain) - bstart) as usize;
            buf.copy_within(from..to, len);
            len += to - from;
        }
        Ok(len)
    }

    /// Runs `f` on each record of `buf` (records of consecutive blocks from `first`; the last
    /// may be short); an error ends it. See [`Busy`] for when the records are split
    /// across the cores.
    fn each_record(
        &self,
        buf: &mut [u8],
        first: u64,
        f: impl Fn(u64, &mut [u8]) -> FsResult<()> + Sync,
    ) -> FsResult<()> {
        let record = self.layout.record_len() as usize;
        if buf.len() <= record {
            return f(first, buf);
        }
        let busy = Busy::enter();
        for_each_record(buf, record, first, busy.split, f)
    }

    /// Writes `data` at `off`, growing the file if needed.
    pub fn write(&self, off: u64, data: &[u8]) -> FsResult<usize> {
        if data.is_empty() {
            return Ok(0);
        }
        if !self.writable {
            return Err(FsError::ReadOnly);
        }
        let end = off
            .checked_add(data.len() as u64)
            .filter(|&e| e <= MAX_FILE_SIZE)
            .ok_or(FsError::TooBig)?;
        let mut size = self.size.write().unwrap_or_else(|p| p.into_inner());
        let result = self.write_locked(&mut size, off, end, data);
        self.settle(*size, &result);
        result.map(|()| data.len())
    }

    /// After a failed write or truncate, cut off whatever a failed step appended beyond the
    /// size the completed steps reached, so the file stays valid at that size.
    fn settle(&self, size: u64, result: &FsResult<()>) {
        if result.is_err()
            && let Err(e) = self.file.set_len(self.layout.backing_len(size))
        {
            log::error!("file {}: cannot undo a failed write: {e}", self.cipher.file_id());
        }
    }

    /// The write proper. `size` follows each step as it completes.
    fn write_locked(&self, size: &mut u64, off: u64, end: u64, data: &[u8]) -> FsResult<()> {
        let l = self.layout;
        let old = *size;
        let new = old.max(end);
        let (first, last) = (l.block_of(off), l.block_of(end - 1));
        let new_final = l.block_count(new) - 1;
        let old_blocks = l.block_count(old);
        // The old final block, if the write leaves it behind (it must stop being final) or
        // extends it into later blocks (it must first grow to a full block, still final).
        let grows_past_final = old > 0 && new_final > old_blocks - 1;
        let old_final = grows_past_final.then(|| old_blocks - 1);

        // Reserve every byte this write will put on disk before changing anything, so a full
        // disk fails it whole. Records that all lie past the file's last block (a plain
        // append) need no reservation: they overwrite nothing, and if the disk fills while
        // they are written, `settle` cuts them off and the file is as it was. That saves a
        // fallocate(2) per request on the sequential-write path.
        let stop = l.record_offset(last) + l.block_plain_len(new, last) + RECORD_OVERHEAD;
        if first < old_blocks {
            self.reserve(l.record_offset(first), stop - l.record_offset(first))?;
        }
        if let Some(b) = old_final {
            self.reserve(l.record_offset(b), l.record_len())?;
        }
        let detached = match old_final {
            Some(b) => {
                let rec = self.grow_final_to_full(old)?;
                *size = l.block_start(b + 1);
                Some((b, rec))
            }
            None => None,
        };
        let cached = self.take_final_block();

        let grown = *size;
        // Records `first..=last`: all full but the last, which may be the short final one.
        let len = ((last - first) * l.record_len() + l.block_plain_len(new, last) + RECORD_OVERHEAD) as usize;
        let rec_start = |b: u64| ((b - first) * l.record_len()) as usize;
        // The caller's data for block `b` if the write covers it whole: it is then sealed
        // straight from `data` into its record, one pass over the bytes with no copy first.
        let whole = |b: u64| -> Option<&[u8]> {
            let (bstart, plain) = (l.block_start(b), l.block_plain_len(new, b));
            (off <= bstart && bstart + plain <= end)
                .then(|| &data[(bstart - off) as usize..(bstart + plain - off) as usize])
        };
        let keep = WRITE_BUF.with_borrow_mut(|buf| -> FsResult<Option<FinalBlock>> {
            if buf.len() < len {
                buf.resize(len, 0);
            }
            let buf = &mut buf[..len];
            // Blocks the write covers in part: the old plaintext, the new bytes over it, and
            // zeros for any gap (a write past the end of the block's old data).
            for b in first..=last {
                if whole(b).is_some() {
                    continue;
                }
                let plain = l.block_plain_len(new, b) as usize;
                let bstart = l.block_start(b);
                let body = &mut buf[rec_start(b) + NONCE_LEN..rec_start(b) + NONCE_LEN + plain];
                body.fill(0);
                let (ws, we) = (off.max(bstart), end.min(bstart + plain as u64));
                let have = l.block_count(grown);
                if b < have {
                    let old_plain = l.block_plain_len(grown, b) as usize;
                    match &cached {
                        Some(c) if c.index == b && c.plain.len() == old_plain && b == have - 1 => {
                            body[..old_plain].copy_from_slice(&c.plain)
                        }
                        _ => {
                            let rec = self.load_block(b, old_plain, b == have - 1)?;
                            body[..old_plain].copy_from_slice(&rec[record_body(rec.len())]);
                        }
                    }
                }
                body[(ws - bstart) as usize..(we - bstart) as usize]
                    .copy_from_slice(&data[(ws - off) as usize..(we - off) as usize]);
            }
            // Keep the new final block's plaintext for the next append (before sealing it).
            let keep = (last == new_final).then(|| FinalBlock {
                index: last,
                plain: match whole(last) {
                    Some(p) => p.to_vec(),
                    None => buf[rec_start(last) + NONCE_LEN..len - crate::crypto::TAG_LEN].to_vec(),
                },
            });
            self.each_record(buf, first, |b, rec| {
                match whole(b) {
                    Some(p) => self.cipher.seal_from(b, b == new_final, p, rec),
                    None => self.cipher.seal(b, b == new_final, rec),
                }
                Ok(())
            })?;
            self.put(l.record_offset(first), buf)?;
            Ok(keep)
        })?;
        *size = new;
        if keep.is_some() {
            self.set_final_block(keep);
        } else if let Some(c) = cached
            && c.index == new_final
            && (c.index < first || c.index > last)
        {
            self.set_final_block(Some(c)); // untouched by this write
        }

        if let Some((b, mut rec)) = detached
            && b < first
        {
            self.cipher.seal(b, false, &mut rec);
            self.put(l.record_offset(b), &rec)?;
        }
        Ok(())
    }

    /// Sets the plaintext size, rewriting the block that becomes final.
    pub fn truncate(&self, new: u64) -> FsResult<()> {
        if new > MAX_FILE_SIZE {
            return Err(FsError::TooBig);
        }
        if !self.writable {
            return Err(FsError::ReadOnly);
        }
        let mut size = self.size.write().unwrap_or_else(|p| p.into_inner());
        if new == *size {
            return Ok(());
        }
        let result = self.truncate_locked(&mut size, new);
        self.settle(*size, &result);
        result
    }

    fn truncate_locked(&self, size: &mut u64, new: u64) -> FsResult<()> {
        let l = self.layout;
        self.set_final_block(None);
        let old = *size;
        let Some(nf) = l.block_count(new).checked_sub(1) else {
            self.file.set_len(HEADER_LEN)?;
            *size = 0;
            return Ok(());
        };
        let new_len = l.block_plain_len(new, nf) as usize;
        let old_final = l.block_count(old).checked_sub(1);
        self.reserve(l.record_offset(nf), new_len as u64 + RECORD_OVERHEAD)?;
        if new < old {
            let old_final = old_final.expect("old > new > 0");
            let old_len = l.block_plain_len(old, nf) as usize;
            if old_len != new_len || nf != old_final {
                let mut rec = self.load_block(nf, old_len, nf == old_final)?;
                rec.truncate(NONCE_LEN + new_len);
                rec.resize(new_len + RECORD_OVERHEAD as usize, 0);
                self.cipher.seal(nf, true, &mut rec);
                self.put(l.record_offset(nf), &rec)?;
            }
            self.file.set_len(l.backing_len(new))?;
            *size = new;
            return Ok(());
        }
        let detached = match old_final {
            None => None,
            Some(of) if of == nf => {
                // Growing inside the final block: one rewrite, still final.
                let old_len = l.block_plain_len(old, nf) as usize;
                let mut rec = self.load_block(nf, old_len, true)?;
                rec.truncate(NONCE_LEN + old_len);
                rec.resize(new_len + RECORD_OVERHEAD as usize, 0);
                self.cipher.seal(nf, true, &mut rec);
                self.put(l.record_offset(nf), &rec)?;
                *size = new;
                return Ok(());
            }
            Some(of) => {
                self.reserve(l.record_offset(of), l.record_len())?;
                let rec = self.grow_final_to_full(old)?;
                *size = l.block_start(of + 1);
                Some((of, rec))
            }
        };
        let mut rec = vec![0u8; new_len + RECORD_OVERHEAD as usize];
        self.cipher.seal(nf, true, &mut rec);
        self.put(l.record_offset(nf), &rec)?;
        *size = new;
        if let Some((b, mut rec)) = detached {
            self.cipher.seal(b, false, &mut rec);
            self.put(l.record_offset(b), &rec)?;
        }
        Ok(())
    }

    /// fallocate(2) mode 0: grows the file to `off + len` if it is shorter, and allocates
    /// backing space for the whole range so later writes there cannot fail with ENOSPC.
    pub fn allocate(&self, off: u64, len: u64) -> FsResult<()> {
        let l = self.layout;
        let end = off
            .checked_add(len)
            .filter(|&e| e <= MAX_FILE_SIZE)
            .ok_or(FsError::TooBig)?;
        if len == 0 {
            return Err(FsError::InvalidArgument);
        }
        if !self.writable {
            return Err(FsError::ReadOnly);
        }
        let mut size = self.size.write().unwrap_or_else(|p| p.into_inner());
        if end > *size {
            let result = self.truncate_locked(&mut size, end);
            self.settle(*size, &result);
            result?;
        }
        // Allocated zeros in a hole still read as a hole.
        let (first, last) = (l.block_of(off), l.block_of(end - 1));
        let stop = l.record_offset(last) + l.block_plain_len(*size, last) + RECORD_OVERHEAD;
        self.reserve(l.record_offset(first), stop - l.record_offset(first))
    }

    pub fn sync(&self, datasync: bool) -> FsResult<()> {
        if datasync {
            self.file.sync_data()?;
        } else {
            self.file.sync_all()?;
        }
        Ok(())
    }

    /// First step of growing a file past its final block: that block becomes a full block
    /// (zero-padded), still sealed as final, so the file is valid at the block boundary if we
    /// stop here. Returns the full record with its plaintext, which the caller reseals as
    /// non-final once the new final block is on disk.
    fn grow_final_to_full(&self, old: u64) -> FsResult<Vec<u8>> {
        let l = self.layout;
        let b = l.block_count(old) - 1;
        let old_len = l.block_plain_len(old, b) as usize;
        let mut rec = match self.take_final_block() {
            Some(c) if c.index == b && c.plain.len() == old_len => {
                let mut rec = vec![0u8; old_len + RECORD_OVERHEAD as usize];
                rec[NONCE_LEN..NONCE_LEN + old_len].copy_from_slice(&c.plain);
                rec
            }
            _ => self.load_block(b, old_len, true)?,
        };
        if old_len < l.block_size() as usize {
            rec.truncate(NONCE_LEN + old_len);
            rec.resize(l.record_len() as usize, 0);
            let mut sealed = rec.clone();
            self.cipher.seal(b, true, &mut sealed);
            self.put(l.record_offset(b), &sealed)?;
        }
        Ok(rec)
    }

    fn take_final_block(&self) -> Option<FinalBlock> {
        self.final_block.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    fn set_final_block(&self, f: Option<FinalBlock>) {
        *self.final_block.lock().unwrap_or_else(|p| p.into_inner()) = f;
    }

    /// Reads and opens block `b` of `plain` bytes; returns the record with its plaintext in
    /// the body (zeros for a hole).
    fn load_block(&self, b: u64, plain: usize, is_final: bool) -> FsResult<Vec<u8>> {
        let mut rec = vec![0u8; plain + RECORD_OVERHEAD as usize];
        self.read_exact_at(&mut rec, self.layout.record_offset(b))?;
        self.open_record(b, is_final, &mut rec)?;
        Ok(rec)
    }

    /// Opens one record in place by the format's rules (`ContentCipher::open_block`); a
    /// hole's body is zeros already.
    fn open_record(&self, b: u64, is_final: bool, rec: &mut [u8]) -> FsResult<()> {
        match self.cipher.open_block(b, is_final, rec) {
            Ok(_) => Ok(()),
            Err(why) => {
                log::error!(
                    "file {}: block {b} failed authentication ({}); returning EIO",
                    self.cipher.file_id(),
                    why.message()
                );
                Err(FsError::Corrupt)
            }
        }
    }

    fn read_exact_at(&self, buf: &mut [u8], off: u64) -> FsResult<()> {
        self.file.read_exact_at(buf, off).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                log::error!(
                    "file {}: backing file is shorter than its records at offset {off}",
                    self.cipher.file_id()
                );
                FsError::Corrupt
            } else {
                FsError::Io(e)
            }
        })
    }

    /// Allocates backing space for `len` bytes at `off` without changing the file size, so
    /// that a full disk fails before a record is touched (not supported everywhere: then
    /// the write itself reports ENOSPC).
    fn reserve(&self, off: u64, len: u64) -> FsResult<()> {
        sys::fallocate(self.file.as_fd(), sys::FALLOC_KEEP_SIZE, off, len)?;
        Ok(())
    }

    /// Writes sealed records at `off` (space already reserved).
    fn put(&self, off: u64, records: &[u8]) -> FsResult<()> {
        debug_assert!(off >= HEADER_LEN);
        self.file.write_all_at(records, off)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests;
