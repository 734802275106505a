//! Reflinks (`FICLONE`): the target shares the source's blocks, instantly and with no data
//! written, where the filesystem allows it (XFS with `reflink=1`, btrfs) and both files are on
//! it. Anything else fails, and the caller copies the data extents instead.

use std::fs::File;
use std::os::fd::AsRawFd;

pub(super) fn reflink(source: &File, target: &File) -> std::io::Result<()> {
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
