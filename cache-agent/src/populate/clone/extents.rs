//! Copying only the data: the source's data extents (`SEEK_DATA`/`SEEK_HOLE`) are copied to
//! the same offsets of the target, each with `copy_file_range` in 32 MiB steps (the bytes never
//! come up to this process) or, where the filesystems refuse that, through memory, skipping
//! all-zero blocks. Writeback is started after each step and the step before is waited for, so
//! a copy holds at most two steps of unwritten data: a burst of copies does not fill the page
//! cache with dirty pages that every other fsync on the filesystem (etcd's, containerd's, the
//! kubelet's) would then wait behind. Holes stay holes, or are written as zeros when the target
//! (a used block device) asks for it.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::{io, CloneError};
use crate::warm::is_zero;

/// Read buffer for the copy.
const BLOCK: usize = 1 << 20;
/// Writeback of the target is started after each copy of this many bytes, and waited for
/// after the next.
const WRITEBACK_EVERY: usize = 16 << 20;
/// Zero blocks inside data extents are skipped at this granularity (a multiple of every
/// filesystem block size in use, so a skipped block really becomes a hole).
pub(super) const ZERO_BLOCK: usize = 64 << 10;

fn seek_data_hole(file: &File, offset: u64, whence: libc::c_int) -> std::io::Result<Option<u64>> {
    // SAFETY: plain lseek on an open descriptor.
    let r = unsafe { libc::lseek(file.as_raw_fd(), offset as libc::off_t, whence) };
    if r < 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENXIO) {
            return Ok(None);
        }
        return Err(e);
    }
    Ok(Some(r as u64))
}

/// Data extents of `file` as (start, end) pairs, up to `size`. Where SEEK_DATA is unsupported
/// the whole file counts as data (the zero-block check still keeps holes).
fn data_extents(file: &File, size: u64) -> std::io::Result<Vec<(u64, u64)>> {
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < size {
        let start = match seek_data_hole(file, pos, libc::SEEK_DATA) {
            Ok(Some(start)) => start,
            Ok(None) => break,
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) && out.is_empty() => {
                return Ok(vec![(0, size)]);
            }
            Err(e) => return Err(e),
        };
        if start >= size {
            break;
        }
        let end = seek_data_hole(file, start, libc::SEEK_HOLE)?
            .unwrap_or(size)
            .min(size);
        if end <= start {
            break;
        }
        out.push((start, end));
        pos = end;
    }
    Ok(out)
}

/// Where a copy failed, before the paths are attached.
pub(super) enum CopyFailure {
    ReadSource(std::io::Error),
    WriteTarget(std::io::Error),
    Extents(std::io::Error),
    SourceShrank,
}

impl CopyFailure {
    /// The failure as the clone reports it; `expected` is the source's length.
    pub(super) fn into_clone_error(self, src: &Path, dst: &Path, expected: u64) -> CloneError {
        match self {
            CopyFailure::ReadSource(e) => io(format!("reading {}", src.display()))(e),
            CopyFailure::WriteTarget(e) => io(format!("writing {}", dst.display()))(e),
            CopyFailure::Extents(e) => {
                io(format!("finding the data extents of {}", src.display()))(e)
            }
            CopyFailure::SourceShrank => CloneError::SourceShrank {
                source_path: src.display().to_string(),
                expected,
            },
        }
    }
}

/// Copies data extents from one file to the same offsets of another.
pub(super) struct Copier<'a> {
    source: &'a File,
    target: &'a File,
    /// Copy whole extents in the kernel; cleared for good on the first copy_file_range that
    /// the filesystems refuse.
    pub(super) use_copy_file_range: bool,
    zero_holes: bool,
    pub(super) written: u64,
    /// The range whose writeback was started last and not yet waited for.
    writing: Option<(u64, u64)>,
}

impl<'a> Copier<'a> {
    pub(super) fn new(
        source: &'a File,
        target: &'a File,
        use_copy_file_range: bool,
        zero_holes: bool,
    ) -> Self {
        Self {
            source,
            target,
            use_copy_file_range,
            zero_holes,
            written: 0,
            writing: None,
        }
    }

    /// Copies the first `size` bytes of the source, writing zeros over holes when asked.
    pub(super) fn copy(&mut self, size: u64) -> Result<(), CopyFailure> {
        let extents = data_extents(self.source, size).map_err(CopyFailure::Extents)?;
        let mut buf = vec![0u8; BLOCK];
        let mut cursor = 0u64;
        for (start, end) in extents {
            if self.zero_holes {
                self.write_zeros(cursor, start)?;
            }
            let mut pos = start;
            if self.use_copy_file_range {
                pos = self.copy_in_kernel(start, end)?;
            }
            let mut unflushed = pos;
            while pos < end {
                let n = ((end - pos) as usize).min(BLOCK);
                read_exact_at(self.source, &mut buf[..n], pos)?;
                self.copy_nonzero(&buf[..n], pos)?;
                pos += n as u64;
                if pos - unflushed >= WRITEBACK_EVERY as u64 || pos == end {
                    self.start_writeback(unflushed, pos - unflushed);
                    unflushed = pos;
                }
            }
            cursor = end;
        }
        if self.zero_holes {
            self.write_zeros(cursor, size)?;
        }
        Ok(())
    }

    /// Copies the non-zero runs of `data` (the source's bytes at `offset`).
    fn copy_nonzero(&mut self, data: &[u8], offset: u64) -> Result<(), CopyFailure> {
        let mut i = 0;
        while i < data.len() {
            let block_end = |from: usize| (from + ZERO_BLOCK).min(data.len());
            if is_zero(&data[i..block_end(i)]) {
                let j = block_end(i);
                if self.zero_holes {
                    self.write_at(&data[i..j], offset + i as u64)?;
                }
                i = j;
                continue;
            }
            // One write for a whole run of non-zero blocks.
            let mut k = block_end(i);
            while k < data.len() && !is_zero(&data[k..block_end(k)]) {
                k = block_end(k);
            }
            self.write_at(&data[i..k], offset + i as u64)?;
            i = k;
        }
        Ok(())
    }

    /// Copies bytes `start..end` with `copy_file_range`; returns where it stopped: `end`, or
    /// earlier when the filesystems refuse it (the rest is then copied through memory).
    fn copy_in_kernel(&mut self, start: u64, end: u64) -> Result<u64, CopyFailure> {
        let mut pos = start;
        while pos < end {
            let mut off_in = pos as libc::loff_t;
            let mut off_out = off_in;
            let len = ((end - pos) as usize).min(WRITEBACK_EVERY);
            // SAFETY: both descriptors are open; the offsets are valid out-parameters.
            let n = unsafe {
                libc::copy_file_range(
                    self.source.as_raw_fd(),
                    &mut off_in,
                    self.target.as_raw_fd(),
                    &mut off_out,
                    len,
                    0,
                )
            };
            if n > 0 {
                self.start_writeback(pos, n as u64);
                pos += n as u64;
                self.written += n as u64;
                continue;
            }
            if n == 0 {
                return Err(CopyFailure::SourceShrank);
            }
            let e = std::io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(
                    libc::EXDEV | libc::ENOSYS | libc::EINVAL | libc::EOPNOTSUPP | libc::EPERM,
                ) => {
                    tracing::debug!(error = %e, "copy_file_range unavailable; copying through memory");
                    self.use_copy_file_range = false;
                    return Ok(pos);
                }
                _ => return Err(CopyFailure::WriteTarget(e)),
            }
        }
        Ok(pos)
    }

    /// Starts writing back what was just copied, then waits for the range started before it:
    /// the disk works while the copy goes on, the final fsync finds little left, and no more
    /// than two ranges of the target are dirty or in flight at once (best effort: errors
    /// surface at that fsync).
    fn start_writeback(&mut self, offset: u64, len: u64) {
        sync_range(self.target, offset, len, libc::SYNC_FILE_RANGE_WRITE);
        if let Some((before, before_len)) = self.writing.replace((offset, len)) {
            sync_range(
                self.target,
                before,
                before_len,
                libc::SYNC_FILE_RANGE_WAIT_BEFORE
                    | libc::SYNC_FILE_RANGE_WRITE
                    | libc::SYNC_FILE_RANGE_WAIT_AFTER,
            );
        }
    }

    fn write_at(&mut self, data: &[u8], offset: u64) -> Result<(), CopyFailure> {
        self.target
            .write_all_at(data, offset)
            .map_err(CopyFailure::WriteTarget)?;
        self.written += data.len() as u64;
        Ok(())
    }

    fn write_zeros(&mut self, from: u64, to: u64) -> Result<(), CopyFailure> {
        let zeros = vec![0u8; BLOCK.min(to.saturating_sub(from) as usize)];
        let mut pos = from;
        while pos < to {
            let n = ((to - pos) as usize).min(BLOCK);
            self.write_at(&zeros[..n], pos)?;
            pos += n as u64;
        }
        Ok(())
    }
}

fn sync_range(file: &File, offset: u64, len: u64, flags: libc::c_uint) {
    // SAFETY: sync_file_range on an open descriptor, within what was just written; its result
    // is ignored on purpose (the final fsync reports any error).
    unsafe {
        libc::sync_file_range(
            file.as_raw_fd(),
            offset as libc::off64_t,
            len as libc::off64_t,
            flags,
        );
    }
}

fn read_exact_at(file: &File, buf: &mut [u8], offset: u64) -> Result<(), CopyFailure> {
    file.read_exact_at(buf, offset).map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            CopyFailure::SourceShrank
        } else {
            CopyFailure::ReadSource(e)
        }
    })
}
