//! Copying a cache entry to a PVC's volume (what `populate` does).
//!
//! A regular-file target (Filesystem volume mode) is created or truncated, then a reflink is
//! tried first (`FICLONE`: instant and shared on btrfs/XFS). Otherwise only the source's data
//! extents (`SEEK_DATA`/`SEEK_HOLE`) are copied, so holes stay holes: each whole extent with
//! `copy_file_range` (the kernel copies page cache to page cache, or shares or offloads the
//! copy; the bytes never come up to this process, and cache entries were written sparse, so
//! their extents hold few zero blocks), or where that is unsupported through memory, skipping
//! all-zero blocks inside the extents. The target is then grown to the requested size. That growth is only right for raw disks: a qcow2 target's
//! virtual size is changed by the caller with `qemu-img resize`, so it passes no size.
//!
//! A block-device target (Block volume mode) is never truncated: the data extents are written
//! in place and holes are zeroed only when the device is not known to read back zeros.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt};
use std::path::Path;

use thiserror::Error;

/// Read buffer for the copy.
const BLOCK: usize = 1 << 20;
/// Writeback of the target is started after each copy of this many bytes.
const WRITEBACK_EVERY: usize = 32 << 20;
/// Zero blocks inside data extents are skipped at this granularity (a multiple of every
/// filesystem block size in use, so a skipped block really becomes a hole).
const ZERO_BLOCK: usize = 64 << 10;

#[derive(Debug, Error)]
pub enum CloneError {
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("target {target} ({target_size} bytes) is smaller than the disk ({disk_size} bytes)")]
    TargetTooSmall {
        target: String,
        target_size: u64,
        disk_size: u64,
    },
    #[error("target {target} is the source disk itself")]
    SameFile { target: String },
    #[error("source {source_path} changed length while being copied (expected {expected} bytes)")]
    SourceShrank { source_path: String, expected: u64 },
}

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> CloneError {
    let context = context.into();
    move |source| CloneError::Io { context, source }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloneMethod {
    /// The target shares the source's blocks.
    Reflink,
    /// Data extents copied, holes and zero blocks left as holes (or zeroed on a device).
    SparseCopy,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CloneReport {
    pub method: CloneMethod,
    /// Bytes written to the target; 0 for a reflink, which writes no data.
    pub bytes_written: u64,
    /// Length of the source disk file.
    pub source_size: u64,
    /// Length of the target afterwards: for a raw disk its virtual size; for a block device
    /// the device's size.
    pub target_size: u64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CloneOptions {
    /// Write zeros over the holes of a block-device target (its old content would show
    /// through otherwise). Off when the device is known to read back zeros (fresh thin LV).
    pub zero_holes_on_block: bool,
}

/// Clones `src` to a regular file or block device `dst`; a file target is grown to
/// `target_size` when that is larger than the disk (never shrunk below it). Block-device holes
/// are zeroed. Blocking: run it with `spawn_blocking`.
pub fn clone_disk(
    src: &Path,
    dst: &Path,
    target_size: Option<u64>,
) -> Result<CloneReport, CloneError> {
    clone_disk_with(
        src,
        dst,
        target_size,
        CloneOptions {
            zero_holes_on_block: true,
        },
    )
}

/// `clone_disk` with options.
pub fn clone_disk_with(
    src: &Path,
    dst: &Path,
    target_size: Option<u64>,
    options: CloneOptions,
) -> Result<CloneReport, CloneError> {
    let source = File::open(src).map_err(io(format!("opening {}", src.display())))?;
    let source_meta = source
        .metadata()
        .map_err(io(format!("reading the size of {}", src.display())))?;
    let source_size = source_meta.len();
    let existing = std::fs::metadata(dst).ok();
    if existing
        .as_ref()
        .is_some_and(|m| m.dev() == source_meta.dev() && m.ino() == source_meta.ino())
    {
        return Err(CloneError::SameFile {
            target: dst.display().to_string(),
        });
    }
    let is_block = existing.is_some_and(|m| m.file_type().is_block_device());
    let target = OpenOptions::new()
        .write(true)
        .create(!is_block)
        .truncate(!is_block)
        .open(dst)
        .map_err(io(format!("opening {}", dst.display())))?;
    let shrank = || CloneError::SourceShrank {
        source_path: src.display().to_string(),
        expected: source_size,
    };

    if is_block {
        let device_size =
            block_device_size(&target).map_err(io(format!("sizing {}", dst.display())))?;
        if device_size < source_size {
            return Err(CloneError::TargetTooSmall {
                target: dst.display().to_string(),
                target_size: device_size,
                disk_size: source_size,
            });
        }
        let mut copier = Copier::new(&source, &target, false, options.zero_holes_on_block);
        copier
            .copy(source_size)
            .map_err(|e| e.into_clone_error(src, dst, shrank))?;
        target
            .sync_all()
            .map_err(io(format!("syncing {}", dst.display())))?;
        return Ok(CloneReport {
            method: CloneMethod::SparseCopy,
            bytes_written: copier.written,
            source_size,
            target_size: device_size,
        });
    }

    let (method, written) = match reflink(&source, &target) {
        Ok(()) => (CloneMethod::Reflink, 0),
        Err(e) => {
            tracing::debug!(error = %e, "reflink unavailable; copying data extents");
            let mut copier = Copier::new(&source, &target, true, false);
            copier
                .copy(source_size)
                .map_err(|e| e.into_clone_error(src, dst, shrank))?;
            (CloneMethod::SparseCopy, copier.written)
        }
    };
    let final_size = target_size.unwrap_or(0).max(source_size);
    target.set_len(final_size).map_err(io(format!(
        "sizing {} to {final_size} bytes",
        dst.display()
    )))?;
    target
        .sync_all()
        .map_err(io(format!("syncing {}", dst.display())))?;
    Ok(CloneReport {
        method,
        bytes_written: written,
        source_size,
        target_size: final_size,
    })
}

fn block_device_size(device: &File) -> std::io::Result<u64> {
    // SAFETY: plain lseek on an open descriptor; the offset is not used afterwards (all I/O
    // here is positional).
    let end = unsafe { libc::lseek(device.as_raw_fd(), 0, libc::SEEK_END) };
    if end < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(end as u64)
}

fn reflink(source: &File, target: &File) -> std::io::Result<()> {
    // FICLONE = _IOW(0x94, 9, int)
    const FICLONE: libc::c_ulong = 0x4004_9409;
    // SAFETY: both descriptors are open for the duration of the call.
    let rc = unsafe { libc::ioctl(target.as_raw_fd(), FICLONE as _, source.as_raw_fd()) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

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

fn is_zero(block: &[u8]) -> bool {
    let (chunks, rest) = block.split_at(block.len() - block.len() % 16);
    chunks
        .chunks_exact(16)
        .all(|c| u128::from_ne_bytes(c.try_into().expect("16 bytes")) == 0)
        && rest.iter().all(|&b| b == 0)
}

/// Where a copy failed, before the paths are attached.
enum CopyFailure {
    ReadSource(std::io::Error),
    WriteTarget(std::io::Error),
    Extents(std::io::Error),
    SourceShrank,
}

impl CopyFailure {
    fn into_clone_error(
        self,
        src: &Path,
        dst: &Path,
        shrank: impl FnOnce() -> CloneError,
    ) -> CloneError {
        match self {
            CopyFailure::ReadSource(e) => io(format!("reading {}", src.display()))(e),
            CopyFailure::WriteTarget(e) => io(format!("writing {}", dst.display()))(e),
            CopyFailure::Extents(e) => {
                io(format!("finding the data extents of {}", src.display()))(e)
            }
            CopyFailure::SourceShrank => shrank(),
        }
    }
}

/// Copies data extents from one file to the same offsets of another.
struct Copier<'a> {
    source: &'a File,
    target: &'a File,
    /// Copy whole extents in the kernel; cleared for good on the first copy_file_range that
    /// the filesystems refuse.
    use_copy_file_range: bool,
    zero_holes: bool,
    written: u64,
}

impl<'a> Copier<'a> {
    fn new(
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
        }
    }

    /// Copies the first `size` bytes of the source, writing zeros over holes when asked.
    fn copy(&mut self, size: u64) -> Result<(), CopyFailure> {
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

    /// Starts writing back what was just copied, so the disk works while the copy goes on
    /// and the final fsync finds little left (best effort: errors surface at that fsync).
    fn start_writeback(&self, offset: u64, len: u64) {
        // SAFETY: sync_file_range on an open descriptor, within what was just written.
        unsafe {
            libc::sync_file_range(
                self.target.as_raw_fd(),
                offset as libc::off64_t,
                len as libc::off64_t,
                libc::SYNC_FILE_RANGE_WRITE,
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

fn read_exact_at(file: &File, buf: &mut [u8], offset: u64) -> Result<(), CopyFailure> {
    file.read_exact_at(buf, offset).map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            CopyFailure::SourceShrank
        } else {
            CopyFailure::ReadSource(e)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    const CHUNK: usize = 256 << 10;

    /// A sparse file of `size` bytes with `CHUNK` bytes of data at each offset.
    fn sparse_file(path: &Path, size: u64, data_at: &[u64]) -> PathBuf {
        let f = File::create(path).unwrap();
        f.set_len(size).unwrap();
        for (i, off) in data_at.iter().enumerate() {
            let len = CHUNK.min((size - off) as usize);
            f.write_all_at(&vec![i as u8 + 1; len], *off).unwrap();
        }
        path.to_path_buf()
    }

    fn allocated(path: &Path) -> u64 {
        std::fs::metadata(path).unwrap().blocks() * 512
    }

    #[test]
    fn sparse_copy_is_identical_and_stays_sparse() {
        let dir = tempfile::tempdir().unwrap();
        let src = sparse_file(
            &dir.path().join("src"),
            64 << 20,
            &[0, 10 << 20, 40 << 20, 63 << 20],
        );
        let dst = dir.path().join("dst");
        let r = clone_disk(&src, &dst, None).unwrap();
        assert_eq!(std::fs::read(&src).unwrap(), std::fs::read(&dst).unwrap());
        assert_eq!((r.source_size, r.target_size), (64 << 20, 64 << 20));
        let (a_src, a_dst) = (allocated(&src), allocated(&dst));
        assert!(
            a_dst <= a_src + (1 << 20),
            "target not sparse: {a_dst} allocated, source {a_src}"
        );
        if r.method == CloneMethod::SparseCopy {
            assert_eq!(r.bytes_written, 4 * CHUNK as u64);
        }
    }

    #[test]
    fn both_copy_paths_are_identical_and_only_memory_skips_zero_blocks() {
        let dir = tempfile::tempdir().unwrap();
        // Fully allocated, but mostly zeros: a disk written without holes.
        let src = dir.path().join("src");
        let mut content = vec![0u8; 8 << 20];
        content[3 << 20..(3 << 20) + 100].fill(7);
        content[(8 << 20) - 1] = 9;
        std::fs::write(&src, &content).unwrap();
        for use_copy_file_range in [true, false] {
            let dst = dir.path().join(format!("dst-{use_copy_file_range}"));
            let source = File::open(&src).unwrap();
            let target = File::create(&dst).unwrap();
            let mut copier = Copier::new(&source, &target, use_copy_file_range, false);
            assert!(copier.copy(8 << 20).is_ok());
            target.set_len(8 << 20).unwrap();
            assert_eq!(std::fs::read(&dst).unwrap(), content);
            if copier.use_copy_file_range {
                // The kernel copied the whole extent: as allocated as the source.
                assert_eq!(copier.written, 8 << 20);
            } else {
                assert_eq!(
                    copier.written,
                    2 * ZERO_BLOCK as u64,
                    "only the two non-zero blocks"
                );
                assert!(
                    allocated(&dst) <= 2 * ZERO_BLOCK as u64,
                    "zero blocks became holes: {}",
                    allocated(&dst)
                );
            }
        }
    }

    #[test]
    fn target_grows_to_the_requested_size_with_zeros() {
        let dir = tempfile::tempdir().unwrap();
        let src = sparse_file(&dir.path().join("src"), 8 << 20, &[1 << 20]);
        let dst = dir.path().join("dst");
        let r = clone_disk(&src, &dst, Some(32 << 20)).unwrap();
        assert_eq!(r.target_size, 32 << 20);
        let out = std::fs::read(&dst).unwrap();
        assert_eq!(out.len(), 32 << 20);
        assert_eq!(&out[..8 << 20], &std::fs::read(&src).unwrap()[..]);
        assert!(out[8 << 20..].iter().all(|&b| b == 0));
        assert!(allocated(&dst) < 2 << 20, "the growth is a hole");
        // A smaller requested size never truncates the disk.
        let r = clone_disk(&src, &dst, Some(1 << 20)).unwrap();
        assert_eq!(r.target_size, 8 << 20);
        assert_eq!(std::fs::metadata(&dst).unwrap().len(), 8 << 20);
    }

    #[test]
    fn data_up_to_eof_and_a_trailing_hole_both_survive() {
        let dir = tempfile::tempdir().unwrap();
        let ends_in_data = sparse_file(&dir.path().join("a"), 4 << 20, &[(4 << 20) - CHUNK as u64]);
        let ends_in_hole = sparse_file(&dir.path().join("b"), 4 << 20, &[0]);
        // Odd length: the last data block is partial.
        let odd = sparse_file(&dir.path().join("c"), (4 << 20) + 1000, &[4 << 20]);
        for src in [ends_in_data, ends_in_hole, odd] {
            let dst = dir.path().join("dst");
            clone_disk(&src, &dst, None).unwrap();
            assert_eq!(
                std::fs::read(&dst).unwrap(),
                std::fs::read(&src).unwrap(),
                "{}",
                src.display()
            );
        }
    }

    #[test]
    fn an_existing_longer_target_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let src = sparse_file(&dir.path().join("src"), 4 << 20, &[0]);
        let dst = dir.path().join("dst");
        std::fs::write(&dst, vec![0xAA; 6 << 20]).unwrap();
        clone_disk(&src, &dst, None).unwrap();
        assert_eq!(std::fs::read(&dst).unwrap(), std::fs::read(&src).unwrap());
    }

    #[test]
    fn zeroing_holes_overwrites_stale_bytes_and_skipping_keeps_them() {
        // The block-device path on a file that stands in for a used device.
        let dir = tempfile::tempdir().unwrap();
        let src = sparse_file(&dir.path().join("src"), 4 << 20, &[1 << 20]);
        let expected = std::fs::read(&src).unwrap();
        for zero_holes in [true, false] {
            let dev = dir.path().join("dev");
            std::fs::write(&dev, vec![0xAA; 6 << 20]).unwrap();
            let source = File::open(&src).unwrap();
            let target = OpenOptions::new().write(true).open(&dev).unwrap();
            assert!(Copier::new(&source, &target, false, zero_holes)
                .copy(4 << 20)
                .is_ok());
            let out = std::fs::read(&dev).unwrap();
            assert_eq!(out.len(), 6 << 20, "never truncated");
            assert!(
                out[4 << 20..].iter().all(|&b| b == 0xAA),
                "beyond the disk stays untouched"
            );
            assert_eq!(
                &out[1 << 20..(1 << 20) + CHUNK],
                &expected[1 << 20..(1 << 20) + CHUNK]
            );
            assert_eq!(
                out[..4 << 20] == expected[..],
                zero_holes,
                "zero_holes={zero_holes}"
            );
        }
    }

    /// A loop device over a file, detached on drop.
    struct LoopDevice(String);

    impl LoopDevice {
        fn attach(backing: &Path) -> Result<Self, String> {
            let out = std::process::Command::new("losetup")
                .args(["--find", "--show"])
                .arg(backing)
                .output()
                .map_err(|e| format!("cannot run losetup: {e}"))?;
            if !out.status.success() {
                return Err(format!(
                    "losetup failed: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                ));
            }
            Ok(Self(
                String::from_utf8_lossy(&out.stdout).trim().to_string(),
            ))
        }
    }

    impl Drop for LoopDevice {
        fn drop(&mut self) {
            let _ = std::process::Command::new("losetup")
                .arg("-d")
                .arg(&self.0)
                .status();
        }
    }

    #[test]
    fn block_device_gets_data_in_place_and_is_never_truncated() {
        let dir = tempfile::tempdir().unwrap();
        let backing = dir.path().join("backing");
        std::fs::write(&backing, vec![0xAA; 8 << 20]).unwrap();
        let device = match LoopDevice::attach(&backing) {
            Ok(d) => d,
            Err(reason) => {
                eprintln!("skipping the block-device test: {reason}");
                return;
            }
        };
        let dev = Path::new(&device.0);
        let src = sparse_file(
            &dir.path().join("src"),
            4 << 20,
            &[1 << 20, (4 << 20) - CHUNK as u64],
        );
        let expected = std::fs::read(&src).unwrap();

        let r = clone_disk_with(
            &src,
            dev,
            Some(64 << 20),
            CloneOptions {
                zero_holes_on_block: false,
            },
        )
        .unwrap();
        assert_eq!(
            (r.method, r.target_size, r.bytes_written),
            (CloneMethod::SparseCopy, 8 << 20, 2 * CHUNK as u64)
        );
        let out = std::fs::read(dev).unwrap();
        assert_eq!(out.len(), 8 << 20);
        assert_eq!(
            &out[1 << 20..(1 << 20) + CHUNK],
            &expected[1 << 20..(1 << 20) + CHUNK]
        );
        assert!(
            out[..1 << 20].iter().all(|&b| b == 0xAA),
            "holes left alone on a known-zeroed device"
        );

        let r = clone_disk(&src, dev, None).unwrap();
        assert_eq!(r.bytes_written, 4 << 20);
        let out = std::fs::read(dev).unwrap();
        assert_eq!(&out[..4 << 20], &expected[..]);
        assert!(
            out[4 << 20..].iter().all(|&b| b == 0xAA),
            "beyond the disk is untouched"
        );
        assert_eq!(std::fs::metadata(&backing).unwrap().len(), 8 << 20);

        let big = sparse_file(&dir.path().join("big"), 16 << 20, &[0]);
        let err = clone_disk(&big, dev, None).unwrap_err();
        assert!(
            matches!(&err, CloneError::TargetTooSmall { target_size, disk_size, .. } if *target_size == 8 << 20 && *disk_size == 16 << 20),
            "{err}"
        );
    }

    #[test]
    fn bad_paths_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let err = clone_disk(&dir.path().join("nope"), &dir.path().join("d"), None).unwrap_err();
        assert!(
            matches!(&err, CloneError::Io { context, .. } if context.contains("opening") && context.contains("nope")),
            "{err}"
        );

        let src = sparse_file(&dir.path().join("src"), 1 << 20, &[0]);
        let err = clone_disk(&src, &dir.path().join("missing-dir/d"), None).unwrap_err();
        assert!(err.to_string().contains("missing-dir"), "{err}");

        let err = clone_disk(&src, dir.path(), None).unwrap_err();
        assert!(
            matches!(err, CloneError::Io { .. }),
            "a directory target: {err}"
        );

        let before = std::fs::read(&src).unwrap();
        let err = clone_disk(&src, &src, None).unwrap_err();
        assert!(matches!(err, CloneError::SameFile { .. }), "{err}");
        assert_eq!(
            std::fs::read(&src).unwrap(),
            before,
            "the source is untouched"
        );
    }
}
