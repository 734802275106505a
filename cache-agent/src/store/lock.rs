//! Advisory file locks (`flock`) that several processes on a node use to share one cache: the
//! agent that owns it, and populator pods that read from it (and fill it when it is cold).
//!
//! flock locks belong to the open file, so they are released when the process dies, however
//! it dies: a crashed holder never leaves a lock behind.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A held lock; released on drop.
#[derive(Debug)]
pub struct FileLock {
    _file: File,
    path: PathBuf,
}

impl FileLock {
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Removes the lock file while still holding the lock (others that open the path later get
    /// a new file; only for locks whose name nobody else will ask for again).
    pub fn remove_file(&self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn open(path: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(path)
}

fn flock(file: &File, operation: libc::c_int) -> std::io::Result<bool> {
    loop {
        // SAFETY: flock on a valid, open file descriptor.
        let rc = unsafe { libc::flock(file.as_raw_fd(), operation) };
        if rc == 0 {
            return Ok(true);
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EWOULDBLOCK) => return Ok(false),
            Some(libc::EINTR) => continue,
            _ => return Err(e),
        }
    }
}

fn mode(exclusive: bool) -> libc::c_int {
    if exclusive {
        libc::LOCK_EX
    } else {
        libc::LOCK_SH
    }
}

/// Takes the lock if nobody holds a conflicting one; `None` otherwise.
pub fn try_lock(path: &Path, exclusive: bool) -> std::io::Result<Option<FileLock>> {
    let file = open(path)?;
    Ok(
        flock(&file, mode(exclusive) | libc::LOCK_NB)?.then(|| FileLock {
            _file: file,
            path: path.to_path_buf(),
        }),
    )
}

/// Waits for the lock. Blocking: call it off the async runtime's threads.
pub fn lock(path: &Path, exclusive: bool) -> std::io::Result<FileLock> {
    let file = open(path)?;
    flock(&file, mode(exclusive))?;
    Ok(FileLock {
        _file: file,
        path: path.to_path_buf(),
    })
}

/// Waits for the lock without blocking a runtime thread (polls).
pub async fn lock_async(path: &Path, exclusive: bool) -> std::io::Result<FileLock> {
    loop {
        if let Some(lock) = try_lock(path, exclusive)? {
            return Ok(lock);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exclusive_excludes_and_shared_shares_even_within_a_process() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.lock");
        let a = try_lock(&path, false).unwrap().unwrap();
        let b = try_lock(&path, false).unwrap().unwrap();
        assert!(try_lock(&path, true).unwrap().is_none(), "readers hold it");
        drop((a, b));
        let writer = try_lock(&path, true).unwrap().unwrap();
        assert!(try_lock(&path, false).unwrap().is_none());
        assert!(try_lock(&path, true).unwrap().is_none());
        drop(writer);
        assert!(try_lock(&path, true).unwrap().is_some());
    }

    #[test]
    fn a_dead_holder_leaves_no_lock() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("held.lock");
        // A child process takes the lock and is killed while holding it.
        let mut child = std::process::Command::new("flock")
            .arg("--close")
            .arg(&path)
            .args(["sleep", "30"])
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while try_lock(&path, true).unwrap().is_some() {
            assert!(
                std::time::Instant::now() < deadline,
                "the child never took the lock"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(lock(&path, true).is_ok());
    }
}
