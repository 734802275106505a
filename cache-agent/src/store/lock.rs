//! Advisory file locks (`flock`) that several processes on a node use to share one cache: the
//! agent that owns it, and populator pods that read from it (and fill it when it is cold).
//!
//! flock locks belong to the open file, so they are released when the process dies, however
//! it dies: a crashed holder never leaves a lock behind.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

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

/// Waits for the lock without blocking a runtime thread: the wait runs on a thread of its own
/// and ends the moment the holder lets go (no polling). Dropping the future abandons the wait;
/// the thread then lets go of the lock as soon as it gets it.
pub async fn lock_async(path: &Path, exclusive: bool) -> std::io::Result<FileLock> {
    lock_any(std::slice::from_ref(&path.to_path_buf()), exclusive).await
}

/// Waits for whichever of `paths` is free first and holds it: `n` lock files make a counting
/// semaphore across the processes of a node. Each busy path is waited for on a thread of its
/// own (a detached one, so that a process may exit while it waits); the first lock taken is
/// returned, and any taken after it is let go at once.
pub async fn lock_any(paths: &[PathBuf], exclusive: bool) -> std::io::Result<FileLock> {
    for path in paths {
        if let Some(lock) = try_lock(path, exclusive)? {
            return Ok(lock);
        }
    }
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    for path in paths {
        let (tx, path) = (tx.clone(), path.clone());
        std::thread::spawn(move || {
            // Once the first answer was taken the channel is closed: this lock is dropped.
            let _ = tx.send(lock(&path, exclusive));
        });
    }
    drop(tx);
    rx.recv()
        .await
        .unwrap_or_else(|| Err(std::io::Error::other("no lock to wait for")))
}

/// For tests: `f` again until it gives a value, for up to a second. A lock just let go may stay
/// held for a moment by a process another test of the same binary forks: the child shares the
/// lock's open file until it execs (close-on-exec is not close-on-fork).
#[cfg(test)]
pub(crate) fn soon<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    for _ in 0..50 {
        if let Some(v) = f() {
            return v;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    f().unwrap_or_else(|| panic!("{what}: still not so after a second"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Two slots held: a third taker waits, gets the first one let go (by whichever holder),
    /// and a slot its other wait took later is let go again at once.
    #[tokio::test]
    async fn lock_any_takes_the_first_slot_let_go_and_no_other() {
        let dir = tempfile::tempdir().unwrap();
        let slots: Vec<PathBuf> = (0..2)
            .map(|i| dir.path().join(format!("{i}.lock")))
            .collect();
        let first = lock_any(&slots, true).await.unwrap();
        let second = lock_any(&slots, true).await.unwrap();
        assert_ne!(first.path(), second.path());
        let waiting = tokio::spawn({
            let slots = slots.clone();
            async move { lock_any(&slots, true).await.unwrap() }
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!waiting.is_finished(), "both slots are held");
        let freed = second.path().to_path_buf();
        drop(second);
        let third = tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("the freed slot is taken")
            .unwrap();
        assert_eq!(third.path(), freed);
        // The wait on the other slot ends when it is let go, and lets it go again.
        let other = first.path().to_path_buf();
        drop(first);
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while try_lock(&other, true).unwrap().is_none() {
            assert!(
                std::time::Instant::now() < deadline,
                "the abandoned wait kept the slot"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[test]
    fn exclusive_excludes_and_shared_shares_even_within_a_process() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.lock");
        let a = try_lock(&path, false).unwrap().unwrap();
        let b = try_lock(&path, false).unwrap().unwrap();
        assert!(try_lock(&path, true).unwrap().is_none(), "readers hold it");
        drop((a, b));
        let writer = soon("the readers let go", || try_lock(&path, true).unwrap());
        assert!(try_lock(&path, false).unwrap().is_none());
        assert!(try_lock(&path, true).unwrap().is_none());
        drop(writer);
        soon("the writer let go", || try_lock(&path, true).unwrap());
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
