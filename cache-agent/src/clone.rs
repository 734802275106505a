//! Copying a cache entry to a PVC's volume (what `populate` does).
//!
//! A regular-file target first tries a reflink (`FICLONE`: instant and shared on btrfs/XFS),
//! then falls back to copying only the data extents (`SEEK_DATA`/`SEEK_HOLE`), skipping
//! all-zero blocks inside them, so holes stay holes. A raw target
//! is then grown to the requested size. Block devices get the data extents written in place;
//! holes are zeroed only when the device is not known to read back zeros.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileTypeExt;
use std::path::Path;

use thiserror::Error;

const BLOCK: usize = 1 << 20;
/// Zero blocks inside data extents are skipped at this granularity.
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
}

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> CloneError {
    let context = context.into();
    move |source| CloneError::Io { context, source }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloneMethod {
    Reflink,
    SparseCopy,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CloneReport {
    pub method: CloneMethod,
    pub bytes_written: u64,
    pub source_size: u64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CloneOptions {
    /// Write zeros over the holes of a block-device target (its old content would show
    /// through otherwise). Off when the device is known to read back zeros (fresh thin LV).
    pub zero_holes_on_block: bool,
}

/// Clones `src` to a regular file or block device `dst`; a file target is grown to
/// `target_size` when that is larger than the disk.
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

pub fn clone_disk_with(
    src: &Path,
    dst: &Path,
    target_size: Option<u64>,
    options: CloneOptions,
) -> Result<CloneReport, CloneError> {
    let source = File::open(src).map_err(io(format!("opening {}", src.display())))?;
    let source_size = source
        .metadata()
        .map_err(io("reading the source size"))?
        .len();
    let is_block = std::fs::metadata(dst)
        .map(|m| m.file_type().is_block_device())
        .unwrap_or(false);
    let target = OpenOptions::new()
        .write(true)
        .create(!is_block)
        .truncate(!is_block)
        .open(dst)
        .map_err(io(format!("opening {}", dst.display())))?;

    if is_block {
        let device_size = (&target)
            .seek(SeekFrom::End(0))
            .map_err(io("sizing the device"))?;
        if device_size < source_size {
            return Err(CloneError::TargetTooSmall {
                target: dst.display().to_string(),
                target_size: device_size,
                disk_size: source_size,
            });
        }
        let written = copy_extents(&source, &target, source_size, options.zero_holes_on_block)?;
        target.sync_all().map_err(io("syncing the device"))?;
        return Ok(CloneReport {
            method: CloneMethod::SparseCopy,
            bytes_written: written,
            source_size,
        });
    }

    let (method, written) = if reflink(&source, &target).is_ok() {
        (CloneMethod::Reflink, 0)
    } else {
        target.set_len(0).map_err(io("truncating the target"))?;
        let written = copy_extents(&source, &target, source_size, false)?;
        (CloneMethod::SparseCopy, written)
    };
    let final_size = target_size.unwrap_or(0).max(source_size);
    target
        .set_len(final_size)
        .map_err(io("sizing the target"))?;
    target.sync_all().map_err(io("syncing the target"))?;
    Ok(CloneReport {
        method,
        bytes_written: written,
        source_size,
    })
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

/// Data extents of `file` as (start, end) pairs. Filesystems without SEEK_DATA report the
/// whole file as data.
fn data_extents(file: &File, size: u64) -> std::io::Result<Vec<(u64, u64)>> {
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < size {
        let Some(start) = seek_data_hole(file, pos, libc::SEEK_DATA)? else {
            break;
        };
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

/// Copies the data extents of `source` into `target` at the same offsets, skipping zero
/// blocks; with `zero_holes` the gaps are written as zeros. Returns bytes written.
fn copy_extents(
    source: &File,
    target: &File,
    size: u64,
    zero_holes: bool,
) -> Result<u64, CloneError> {
    let extents = data_extents(source, size).map_err(io("finding data extents"))?;
    let mut buf = vec![0u8; BLOCK];
    let zeros = vec![0u8; BLOCK];
    let mut written = 0u64;
    let mut src = source;
    let mut dst = target;
    let mut cursor = 0u64;
    let write_zeros =
        |dst: &mut &File, from: u64, to: u64, written: &mut u64| -> Result<(), CloneError> {
            dst.seek(SeekFrom::Start(from))
                .map_err(io("seeking the target"))?;
            let mut left = to - from;
            while left > 0 {
                let n = left.min(BLOCK as u64) as usize;
                dst.write_all(&zeros[..n])
                    .map_err(io("zeroing the target"))?;
                left -= n as u64;
                *written += n as u64;
            }
            Ok(())
        };
    for (start, end) in extents {
        if zero_holes && start > cursor {
            write_zeros(&mut dst, cursor, start, &mut written)?;
        }
        src.seek(SeekFrom::Start(start))
            .map_err(io("seeking the source"))?;
        let mut pos = start;
        while pos < end {
            let n = ((end - pos) as usize).min(BLOCK);
            src.read_exact(&mut buf[..n])
                .map_err(io("reading the source"))?;
            let mut i = 0;
            while i < n {
                let j = (i + ZERO_BLOCK).min(n);
                let block = &buf[i..j];
                if is_zero(block) {
                    if zero_holes {
                        dst.seek(SeekFrom::Start(pos + i as u64))
                            .map_err(io("seeking the target"))?;
                        dst.write_all(block).map_err(io("writing the target"))?;
                        written += block.len() as u64;
                    }
                } else {
                    // Coalesce consecutive non-zero blocks into one write.
                    let mut k = j;
                    while k < n && !is_zero(&buf[k..(k + ZERO_BLOCK).min(n)]) {
                        k = (k + ZERO_BLOCK).min(n);
                    }
                    dst.seek(SeekFrom::Start(pos + i as u64))
                        .map_err(io("seeking the target"))?;
                    dst.write_all(&buf[i..k])
                        .map_err(io("writing the target"))?;
                    written += (k - i) as u64;
                    i = k;
                    continue;
                }
                i = j;
            }
            pos += n as u64;
        }
        cursor = end;
    }
    if zero_holes && cursor < size {
        write_zeros(&mut dst, cursor, size, &mut written)?;
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn sparse_source(dir: &Path, size: u64, data_at: &[u64]) -> std::path::PathBuf {
        let p = dir.join("src.raw");
        let mut f = File::create(&p).unwrap();
        f.set_len(size).unwrap();
        for (i, off) in data_at.iter().enumerate() {
            f.seek(SeekFrom::Start(*off)).unwrap();
            f.write_all(&vec![i as u8 + 1; 256 << 10]).unwrap();
        }
        p
    }

    #[test]
    fn sparse_copy_is_identical_and_stays_sparse() {
        let dir = tempfile::tempdir().unwrap();
        let src = sparse_source(dir.path(), 64 << 20, &[0, 10 << 20, 40 << 20]);
        let dst = dir.path().join("dst.raw");
        let r = clone_disk(&src, &dst, None).unwrap();
        assert_eq!(std::fs::read(&src).unwrap(), std::fs::read(&dst).unwrap());
        let allocated = std::fs::metadata(&dst).unwrap().blocks() * 512;
        assert!(allocated < 4 << 20, "target not sparse: {allocated}");
        if r.method == CloneMethod::SparseCopy {
            assert_eq!(r.bytes_written, 3 * (256 << 10));
        }
    }

    #[test]
    fn target_grows_to_the_requested_size_with_zeros() {
        let dir = tempfile::tempdir().unwrap();
        let src = sparse_source(dir.path(), 8 << 20, &[(8 << 20) - (256 << 10)]);
        let dst = dir.path().join("dst.raw");
        clone_disk(&src, &dst, Some(32 << 20)).unwrap();
        let out = std::fs::read(&dst).unwrap();
        assert_eq!(out.len(), 32 << 20);
        assert_eq!(&out[..8 << 20], &std::fs::read(&src).unwrap()[..]);
        assert!(out[8 << 20..].iter().all(|&b| b == 0));
        // A smaller requested size never truncates the disk.
        clone_disk(&src, &dst, Some(1 << 20)).unwrap();
        assert_eq!(std::fs::metadata(&dst).unwrap().len(), 8 << 20);
    }

    #[test]
    fn existing_target_content_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let src = sparse_source(dir.path(), 4 << 20, &[0]);
        let dst = dir.path().join("dst.raw");
        std::fs::write(&dst, vec![0xAA; 6 << 20]).unwrap();
        clone_disk(&src, &dst, None).unwrap();
        assert_eq!(std::fs::read(&dst).unwrap(), std::fs::read(&src).unwrap());
    }

    #[test]
    fn zero_holes_variant_overwrites_stale_bytes() {
        // The block-device path, exercised on a preallocated file standing in for a device.
        let dir = tempfile::tempdir().unwrap();
        let src = sparse_source(dir.path(), 4 << 20, &[1 << 20]);
        let dev = dir.path().join("dev");
        std::fs::write(&dev, vec![0xAA; 4 << 20]).unwrap();
        let source = File::open(&src).unwrap();
        let target = OpenOptions::new().write(true).open(&dev).unwrap();
        copy_extents(&source, &target, 4 << 20, true).unwrap();
        assert_eq!(std::fs::read(&dev).unwrap(), std::fs::read(&src).unwrap());
    }

    #[test]
    fn missing_source_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let err = clone_disk(&dir.path().join("nope"), &dir.path().join("d"), None).unwrap_err();
        assert!(err.to_string().contains("nope"), "{err}");
    }
}
