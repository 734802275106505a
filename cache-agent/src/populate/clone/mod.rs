//! Copying a cache entry to a PVC's volume (what `populate` does).
//!
//! A regular-file target (Filesystem volume mode) is created or truncated, then a reflink is
//! tried first (`reflink`: `FICLONE`, instant and shared on btrfs/XFS). Otherwise only the
//! source's data extents (`SEEK_DATA`/`SEEK_HOLE`) are copied, so holes stay holes (`extents`):
//! each whole extent with `copy_file_range` (the kernel copies page cache to page cache, or
//! shares or offloads the copy; the bytes never come up to this process, and cache entries were
//! written sparse, so their extents hold few zero blocks), or where that is unsupported through
//! memory, skipping all-zero blocks inside the extents. The target is then grown to the
//! requested size. That growth is only right for raw disks: a qcow2 target's virtual size is
//! changed by the caller with `qemu-img resize`, so it passes no size.
//!
//! A block-device target (Block volume mode, `block`) is never truncated: the data extents are
//! written in place and holes are zeroed only when the device is not known to read back zeros.

mod block;
mod extents;
mod reflink;
#[cfg(test)]
mod tests;

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use thiserror::Error;

use self::extents::Copier;

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

    if is_block {
        return block::copy_to_device(
            &source,
            &target,
            src,
            dst,
            source_size,
            options.zero_holes_on_block,
        );
    }

    let (method, written) = match reflink::reflink(&source, &target) {
        Ok(()) => (CloneMethod::Reflink, 0),
        Err(e) => {
            tracing::debug!(error = %e, "reflink unavailable; copying data extents");
            let mut copier = Copier::new(&source, &target, true, false);
            copier
                .copy(source_size)
                .map_err(|e| e.into_clone_error(src, dst, source_size))?;
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
