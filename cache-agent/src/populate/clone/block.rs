//! A block-device target (Block volume mode): never truncated, since the device has its own
//! size. The source's data extents are written in place, and holes are zeroed unless the
//! device is known to read back zeros (a fresh thin volume), since the device's old content
//! would show through them.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;

use super::extents::Copier;
use super::{io, CloneError, CloneMethod, CloneReport};

/// Copies `source` (`src`, `source_size` bytes) onto the block device `target` (`dst`).
pub(super) fn copy_to_device(
    source: &File,
    target: &File,
    src: &Path,
    dst: &Path,
    source_size: u64,
    zero_holes: bool,
) -> Result<CloneReport, CloneError> {
    let device_size = block_device_size(target).map_err(io(format!("sizing {}", dst.display())))?;
    if device_size < source_size {
        return Err(CloneError::TargetTooSmall {
            target: dst.display().to_string(),
            target_size: device_size,
            disk_size: source_size,
        });
    }
    let mut copier = Copier::new(source, target, false, zero_holes);
    copier
        .copy(source_size)
        .map_err(|e| e.into_clone_error(src, dst, source_size))?;
    target
        .sync_all()
        .map_err(io(format!("syncing {}", dst.display())))?;
    Ok(CloneReport {
        method: CloneMethod::SparseCopy,
        bytes_written: copier.written,
        source_size,
        target_size: device_size,
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
