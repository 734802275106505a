//! `DirWatch`: run a callback shortly after anything in a directory changes.
//!
//! The watch is on the directory, non-recursive: kubelet updates mounted Secrets and
//! ConfigMaps by swapping a `..data` symlink, and a watch on a file itself dies with the first
//! rotation. Bursts of events (an editor or cert-manager writing several files) collapse into
//! one call after a short settle.

use std::path::Path;
use std::time::Duration;

use notify::{RecursiveMode, Watcher};

/// How long to let a burst of writes finish before reacting.
const SETTLE: Duration = Duration::from_millis(100);

/// Keeps the watch alive; dropping it stops the watch.
pub struct DirWatch {
    _watcher: notify::RecommendedWatcher,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for DirWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl DirWatch {
    /// Calls `on_change` (on the runtime) after changes in `dir`.
    pub fn start(dir: &Path, on_change: impl Fn() + Send + 'static) -> Result<Self, notify::Error> {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<()>(1);
        let mut watcher =
            notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
                if event.is_ok() {
                    // The callback runs on notify's thread; a full channel already means "pending".
                    let _ = tx.try_send(());
                }
            })?;
        watcher.watch(dir, RecursiveMode::NonRecursive)?;
        let task = tokio::spawn(async move {
            while rx.recv().await.is_some() {
                tokio::time::sleep(SETTLE).await;
                while rx.try_recv().is_ok() {}
                on_change();
            }
        });
        Ok(Self {
            _watcher: watcher,
            task,
        })
    }
}
