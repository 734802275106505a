//! `SparseFile`: writes a disk image at given offsets, leaving all-zero blocks as holes, and
//! starting writeback of what it wrote as it goes, so the final fsync at commit finds little
//! left to do (the data reaches the disk while inflation is still running, instead of all at
//! the end).
//!
//! The writes happen on a thread of their own: the caller (inflating and decoding, the
//! slowest stage of a warm) only copies the bytes into a batch, and the zero scan and the
//! write run on the other core. Batches in flight are bounded. Whole aligned blocks are
//! written with `O_DIRECT` where the filesystem takes it: the disk reads them straight from the
//! batch, without the CPU cost of filling (and later writing back) the page cache, which on a
//! small node is what a warm competes for with the download.

use std::alloc::Layout;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::thread::JoinHandle;

/// Zero runs are detected per block of this size; smaller holes are not worth a seek.
pub const HOLE_BLOCK: usize = 64 << 10;
/// Writeback is started after this many bytes written.
const WRITEBACK_EVERY: u64 = 64 << 20;
/// Contiguous writes are gathered up to this size before the writer thread gets them.
const BATCH: usize = 1 << 20;
/// Batches queued for the writer thread (memory bound: about this many MiB).
const BATCHES_IN_FLIGHT: usize = 2;

/// Whether a block holds only zeros (a hole to skip rather than write).
pub fn is_zero(block: &[u8]) -> bool {
    let (chunks, rest) = block.split_at(block.len() - block.len() % 16);
    chunks
        .chunks_exact(16)
        .all(|c| u128::from_ne_bytes(c.try_into().expect("16 bytes")) == 0)
        && rest.iter().all(|&b| b == 0)
}

/// `O_DIRECT` wants buffers, offsets and lengths aligned to the logical block size; a page
/// covers every device in use.
const DIRECT_ALIGN: usize = 4096;

/// A batch buffer aligned for `O_DIRECT`, of `BATCH` bytes capacity.
struct AlignedBuf {
    ptr: std::ptr::NonNull<u8>,
    len: usize,
}

// SAFETY: the buffer is uniquely owned; nothing else points into it.
unsafe impl Send for AlignedBuf {}

impl AlignedBuf {
    fn layout() -> Layout {
        Layout::from_size_align(BATCH, DIRECT_ALIGN).expect("a valid layout")
    }

    fn new() -> Self {
        // SAFETY: the layout has a non-zero size.
        let raw = unsafe { std::alloc::alloc(Self::layout()) };
        let ptr = std::ptr::NonNull::new(raw)
            .unwrap_or_else(|| std::alloc::handle_alloc_error(Self::layout()));
        Self { ptr, len: 0 }
    }

    fn as_slice(&self) -> &[u8] {
        // SAFETY: the first `len` bytes were written by `extend_from_slice`.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    fn extend_from_slice(&mut self, data: &[u8]) {
        assert!(self.len + data.len() <= BATCH, "batch overflow");
        // SAFETY: in bounds (checked above); the source cannot overlap a buffer we own.
        unsafe {
            std::ptr::copy_nonoverlapping(
                data.as_ptr(),
                self.ptr.as_ptr().add(self.len),
                data.len(),
            );
        }
        self.len += data.len();
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with the same layout.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), Self::layout()) }
    }
}

struct Batch {
    offset: u64,
    data: AlignedBuf,
}

/// What the writer thread owns.
struct Writer {
    file: File,
    /// The same file opened `O_DIRECT`, while the filesystem takes it.
    direct: Option<File>,
    /// Bytes of data written (holes not counted).
    written: u64,
    since_writeback: u64,
}

impl Writer {
    fn run(
        mut self,
        batches: Receiver<Batch>,
        spent: SyncSender<AlignedBuf>,
    ) -> std::io::Result<Self> {
        for mut batch in batches {
            self.write_at(batch.offset, batch.data.as_slice())?;
            batch.data.len = 0;
            let _ = spent.try_send(batch.data);
        }
        Ok(self)
    }

    /// Writes one run of data: aligned whole blocks direct, the rest through the page cache.
    fn write_run(&mut self, data: &[u8], offset: u64) -> std::io::Result<()> {
        let aligned = offset.is_multiple_of(DIRECT_ALIGN as u64)
            && data.len().is_multiple_of(DIRECT_ALIGN)
            && (data.as_ptr() as usize).is_multiple_of(DIRECT_ALIGN);
        if let (true, Some(direct)) = (aligned, &self.direct) {
            match direct.write_all_at(data, offset) {
                Ok(()) => {
                    self.written += data.len() as u64;
                    return Ok(());
                }
                // Some filesystems take the open and refuse the write.
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => self.direct = None,
                Err(e) => return Err(e),
            }
        }
        self.file.write_all_at(data, offset)?;
        self.account(data.len() as u64);
        Ok(())
    }

    /// Writes `data` at `offset`, skipping blocks that are all zeros (aligned to `offset`).
    fn write_at(&mut self, mut offset: u64, data: &[u8]) -> std::io::Result<()> {
        let mut start = 0;
        while start < data.len() {
            // A run of non-zero blocks, written in one call.
            let mut end = start;
            while end < data.len() && !is_zero(&data[end..(end + HOLE_BLOCK).min(data.len())]) {
                end = (end + HOLE_BLOCK).min(data.len());
            }
            if end > start {
                self.write_run(&data[start..end], offset)?;
            }
            let mut skip = end;
            while skip < data.len() && is_zero(&data[skip..(skip + HOLE_BLOCK).min(data.len())]) {
                skip = (skip + HOLE_BLOCK).min(data.len());
            }
            offset += (skip - start) as u64;
            start = skip;
        }
        Ok(())
    }

    fn account(&mut self, n: u64) {
        self.written += n;
        self.since_writeback += n;
        if self.since_writeback >= WRITEBACK_EVERY {
            self.since_writeback = 0;
            // SAFETY: sync_file_range on an open descriptor; nbytes 0 means "to the end".
            // Only starts writeback (no wait): best effort, errors surface at fsync.
            unsafe {
                libc::sync_file_range(self.file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE);
            }
        }
    }
}

pub struct SparseFile {
    path: PathBuf,
    batch: Batch,
    to_writer: Option<SyncSender<Batch>>,
    /// Emptied batch buffers coming back, to be reused.
    spent: Receiver<AlignedBuf>,
    writer: Option<JoinHandle<std::io::Result<Writer>>>,
}

impl SparseFile {
    pub fn create(path: &Path) -> std::io::Result<Self> {
        let file = File::create(path)?;
        let direct = File::options()
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
            .ok();
        let writer = Writer {
            file,
            direct,
            written: 0,
            since_writeback: 0,
        };
        let (to_writer, batches) = sync_channel(BATCHES_IN_FLIGHT);
        let (give_back, spent) = sync_channel(BATCHES_IN_FLIGHT + 1);
        let thread = std::thread::Builder::new()
            .name("sparse-writer".into())
            .spawn(move || writer.run(batches, give_back))?;
        Ok(Self {
            path: path.to_path_buf(),
            batch: Batch {
                offset: 0,
                data: AlignedBuf::new(),
            },
            to_writer: Some(to_writer),
            spent,
            writer: Some(thread),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes `data` at `offset`, skipping blocks that are all zeros (aligned to `offset`).
    /// A failed write is reported by a later call or by [`SparseFile::finish`].
    pub fn write_at(&mut self, offset: u64, mut data: &[u8]) -> std::io::Result<()> {
        let mut offset = offset;
        let batch_end = self.batch.offset + self.batch.data.len as u64;
        if self.batch.data.len > 0 && offset != batch_end {
            self.flush()?;
        }
        while !data.is_empty() {
            if self.batch.data.len == 0 {
                self.batch.offset = offset;
            }
            let room = BATCH - self.batch.data.len;
            let n = room.min(data.len());
            self.batch.data.extend_from_slice(&data[..n]);
            (offset, data) = (offset + n as u64, &data[n..]);
            if self.batch.data.len == BATCH {
                self.flush()?;
            }
        }
        Ok(())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if self.batch.data.len == 0 {
            return Ok(());
        }
        let fresh = self.spent.try_recv().unwrap_or_else(|_| AlignedBuf::new());
        let data = std::mem::replace(&mut self.batch.data, fresh);
        let batch = Batch {
            offset: self.batch.offset,
            data,
        };
        let sent = self.to_writer.as_ref().map(|tx| tx.send(batch));
        match sent {
            Some(Ok(())) => Ok(()),
            // The writer stopped: its error is the one to report.
            _ => Err(self
                .join()
                .err()
                .unwrap_or_else(|| std::io::Error::other("the sparse writer stopped"))),
        }
    }

    fn join(&mut self) -> std::io::Result<Writer> {
        self.to_writer = None;
        match self.writer.take() {
            Some(thread) => thread
                .join()
                .unwrap_or_else(|_| Err(std::io::Error::other("the sparse writer panicked"))),
            None => Err(std::io::Error::other("the sparse writer already stopped")),
        }
    }

    /// Writes what is pending, sets the file's length (the disk's size) and hands the file
    /// back with the bytes of data written (holes not counted).
    pub fn finish(mut self, len: u64) -> std::io::Result<(File, u64)> {
        self.flush()?;
        let writer = self.join()?;
        writer.file.set_len(len)?;
        Ok((writer.file, writer.written))
    }
}

impl Drop for SparseFile {
    fn drop(&mut self) {
        if self.writer.is_some() {
            let _ = self.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn zero_blocks_become_holes_and_data_lands_where_asked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.raw");
        let mut f = SparseFile::create(&path).unwrap();
        let mut data = vec![0u8; 4 * HOLE_BLOCK];
        data[HOLE_BLOCK + 7] = 1;
        f.write_at(10 * HOLE_BLOCK as u64, &data).unwrap();
        f.write_at(0, b"hello").unwrap();
        let (_, written) = f.finish(20 * HOLE_BLOCK as u64).unwrap();
        assert_eq!(written, HOLE_BLOCK as u64 + 5);
        let back = std::fs::read(&path).unwrap();
        assert_eq!(back.len(), 20 * HOLE_BLOCK);
        assert_eq!(&back[..5], b"hello");
        assert_eq!(back[11 * HOLE_BLOCK + 7], 1);
        assert_eq!(back.iter().filter(|b| **b != 0).count(), 6);
        let allocated = std::fs::metadata(&path).unwrap().blocks() * 512;
        assert!(allocated <= 3 * HOLE_BLOCK as u64, "{allocated}");
    }

    #[test]
    fn contiguous_and_scattered_writes_of_any_size_land_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.raw");
        let mut f = SparseFile::create(&path).unwrap();
        let mut expected = vec![0u8; 8 << 20];
        let mut at = 0usize;
        for (i, len) in [1usize, 7, 4096, 100_000, 3 << 20, 17, 65536]
            .iter()
            .cycle()
            .take(40)
            .enumerate()
        {
            let len = (*len).min(expected.len() - at);
            let chunk: Vec<u8> = (0..len).map(|j| (i * 31 + j) as u8 | 1).collect();
            f.write_at(at as u64, &chunk).unwrap();
            expected[at..at + len].copy_from_slice(&chunk);
            // Every third write jumps ahead, leaving a hole.
            at += len + if i % 3 == 0 { 70_000 } else { 0 };
            if at >= expected.len() {
                break;
            }
        }
        f.write_at(5, b"again").unwrap();
        expected[5..10].copy_from_slice(b"again");
        f.finish(expected.len() as u64).unwrap();
        assert!(std::fs::read(&path).unwrap() == expected);
    }

    #[test]
    fn a_failing_write_is_reported_not_lost() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.raw");
        let mut f = SparseFile::create(&path).unwrap();
        // Beyond the largest file ext4 or XFS allow: the writer's pwrite fails.
        let result = f
            .write_at(u64::MAX - (1 << 20), &[1u8; 4096])
            .and_then(|()| f.finish(0).map(|_| ()));
        assert!(result.is_err());
    }
}
