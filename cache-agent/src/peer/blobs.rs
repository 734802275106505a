//! The layers this node can serve its peers: while a warm downloads a layer, a copy of the
//! compressed blob is written under `<cache>/peers/` ([`Blobs::sink`]), and peers may read it
//! from any offset at once, also while it is still being written: a reader that catches up
//! with the writer waits for the next bytes ([`Blob::read_from`]).
//!
//! A copy whose download failed its digest (or failed at all) is removed and its readers
//! fail; one whose digest checked out is kept for [`Blobs::sweep`]'s `keep` after its last
//! use, long enough for the nodes warming the same image at the same time, then removed (the
//! cache keeps the converted disk, not the layers). Nothing here is trusted by a reader: every
//! peer checks the digest of what it received, as it does for a registry.
//!
//! The directory belongs to the agent that owns the cache; it is emptied when the agent starts.

use std::collections::{BTreeSet, HashMap};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::Stream;
use tokio::sync::watch;
use vmdisk_registry::pull::BlobSink;

/// What a copy holds so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlobState {
    /// Being written: the first `written` bytes are there.
    Writing { written: u64 },
    /// Every byte is there and the download's digest checked out.
    Complete,
    /// The download failed; the copy is gone.
    Failed,
}

/// One layer's copy.
pub struct Blob {
    pub digest: String,
    pub size: u64,
    /// The images (manifest digests) it was downloaded for: a peer may read it only if its
    /// node was asked to hold one of them.
    images: Mutex<BTreeSet<String>>,
    path: PathBuf,
    state: watch::Sender<BlobState>,
    last_used: Mutex<Instant>,
}

/// Bytes read from the file at a time.
const READ_CHUNK: usize = 256 * 1024;

impl Blob {
    pub fn state(&self) -> BlobState {
        *self.state.borrow()
    }

    /// Whether the copy was downloaded for one of `images`.
    pub fn serves_any_of<'a>(&self, mut images: impl Iterator<Item = &'a str>) -> bool {
        let held = self.images.lock().expect("poisoned");
        images.any(|i| held.contains(i))
    }

    /// The bytes from `offset` to the end, as they are written. Fails where the copy fails.
    pub fn read_from(self: &Arc<Self>, offset: u64) -> impl Stream<Item = std::io::Result<Bytes>> {
        *self.last_used.lock().expect("poisoned") = Instant::now();
        let blob = Arc::clone(self);
        let states = self.state.subscribe();
        let file = std::fs::File::open(&self.path);
        futures::stream::unfold(
            (blob, states, file.map(Arc::new), offset),
            |(blob, mut states, file, offset)| async move {
                if offset >= blob.size {
                    return None;
                }
                let file = match file {
                    Ok(f) => f,
                    Err(e) => return Some((Err(e), (blob, states, Err(gone()), u64::MAX))),
                };
                // Wait until there is something past `offset`, or the copy ended.
                let available = loop {
                    let state = *states.borrow_and_update();
                    match state {
                        BlobState::Complete => break blob.size,
                        BlobState::Writing { written } if written > offset => break written,
                        BlobState::Writing { .. } => {}
                        BlobState::Failed => {
                            return Some((Err(gone()), (blob, states, Err(gone()), u64::MAX)))
                        }
                    }
                    if states.changed().await.is_err() {
                        return Some((Err(gone()), (blob, states, Err(gone()), u64::MAX)));
                    }
                };
                let len = (available - offset).min(READ_CHUNK as u64) as usize;
                let reading = Arc::clone(&file);
                let read = tokio::task::spawn_blocking(move || {
                    let mut buf = vec![0u8; len];
                    reading.read_exact_at(&mut buf, offset).map(|_| buf)
                })
                .await
                .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())));
                match read {
                    Ok(buf) => Some((
                        Ok(Bytes::from(buf)),
                        (blob, states, Ok(file), offset + len as u64),
                    )),
                    Err(e) => Some((Err(e), (blob, states, Err(gone()), u64::MAX))),
                }
            },
        )
    }
}

fn gone() -> std::io::Error {
    std::io::Error::other("the copy of this blob failed and was removed")
}

/// The copies this node holds or is writing, by layer digest.
pub struct Blobs {
    dir: PathBuf,
    blobs: Mutex<HashMap<String, Arc<Blob>>>,
    /// Woken whenever a copy begins.
    added: tokio::sync::Notify,
}

impl Blobs {
    /// The copies under `dir`, which is emptied (copies of an earlier run are not trusted to
    /// be whole).
    pub fn open(dir: &Path) -> std::io::Result<Arc<Self>> {
        match std::fs::remove_dir_all(dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        std::fs::create_dir_all(dir)?;
        Ok(Arc::new(Self {
            dir: dir.to_path_buf(),
            blobs: Mutex::default(),
            added: tokio::sync::Notify::new(),
        }))
    }

    pub fn get(&self, digest: &str) -> Option<Arc<Blob>> {
        self.blobs.lock().expect("poisoned").get(digest).cloned()
    }

    /// The copy of `digest`, waiting up to `wait` for one to begin (a peer may ask as soon as
    /// this node's NodeDiskCache shows it pulling the image, a moment before the layer's
    /// download begins).
    pub async fn wait_for(&self, digest: &str, wait: Duration) -> Option<Arc<Blob>> {
        let give_up = tokio::time::Instant::now() + wait;
        loop {
            let added = self.added.notified();
            if let Some(blob) = self.get(digest) {
                return Some(blob);
            }
            if tokio::time::timeout_at(give_up, added).await.is_err() {
                return self.get(digest);
            }
        }
    }

    /// Copies held or being written.
    pub fn len(&self) -> usize {
        self.blobs.lock().expect("poisoned").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Where a download of layer `digest` (`size` bytes) for image `image` writes its copy;
    /// `None` when a copy is already there or being written (the image is noted on it), or
    /// the file cannot be made.
    pub fn sink(
        self: &Arc<Self>,
        digest: &str,
        size: u64,
        image: &str,
    ) -> Option<Box<dyn BlobSink>> {
        let hex = digest.strip_prefix("sha256:")?;
        if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        let mut blobs = self.blobs.lock().expect("poisoned");
        if let Some(existing) = blobs.get(digest) {
            existing
                .images
                .lock()
                .expect("poisoned")
                .insert(image.to_string());
            return None;
        }
        let path = self.dir.join(hex);
        let file = match std::fs::File::create(&path) {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(%digest, error = %e, "cannot keep a copy of the layer for peers");
                return None;
            }
        };
        let blob = Arc::new(Blob {
            digest: digest.to_string(),
            size,
            images: Mutex::new(BTreeSet::from([image.to_string()])),
            path,
            state: watch::channel(BlobState::Writing { written: 0 }).0,
            last_used: Mutex::new(Instant::now()),
        });
        blobs.insert(digest.to_string(), Arc::clone(&blob));
        self.added.notify_waiters();
        Some(Box::new(BlobWriter {
            blobs: Arc::clone(self),
            blob,
            file: Some(file),
        }))
    }

    /// Removes complete copies nobody read for `keep`.
    pub fn sweep(&self, keep: Duration) {
        let mut blobs = self.blobs.lock().expect("poisoned");
        blobs.retain(|_, blob| {
            let idle = blob.last_used.lock().expect("poisoned").elapsed();
            let stale = blob.state() == BlobState::Complete && idle >= keep;
            if stale {
                let _ = std::fs::remove_file(&blob.path);
            }
            !stale
        });
    }

    fn remove(&self, blob: &Blob) {
        let mut blobs = self.blobs.lock().expect("poisoned");
        if blobs
            .get(&blob.digest)
            .is_some_and(|b| std::ptr::eq(b.as_ref(), blob))
        {
            blobs.remove(&blob.digest);
        }
        let _ = std::fs::remove_file(&blob.path);
    }
}

/// Writes one download's copy (see [`BlobSink`]).
struct BlobWriter {
    blobs: Arc<Blobs>,
    blob: Arc<Blob>,
    /// `None` once writing failed: the copy is dropped, the download goes on.
    file: Option<std::fs::File>,
}

impl BlobSink for BlobWriter {
    fn write(&mut self, offset: u64, chunk: &[u8]) {
        let Some(file) = &self.file else { return };
        match file.write_all_at(chunk, offset) {
            Ok(()) => {
                self.blob.state.send_replace(BlobState::Writing {
                    written: offset + chunk.len() as u64,
                });
            }
            Err(e) => {
                tracing::warn!(digest = %self.blob.digest, error = %e, "cannot write the copy of the layer for peers; dropped");
                self.file = None;
                self.blob.state.send_replace(BlobState::Failed);
                self.blobs.remove(&self.blob);
            }
        }
    }

    fn finish(self: Box<Self>, verified: bool) {
        if self.file.is_none() {
            return;
        }
        if verified {
            *self.blob.last_used.lock().expect("poisoned") = Instant::now();
            self.blob.state.send_replace(BlobState::Complete);
        } else {
            self.blob.state.send_replace(BlobState::Failed);
            self.blobs.remove(&self.blob);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;

    const DIGEST: &str = "sha256:0000000000000000000000000000000000000000000000000000000000000001";

    async fn collect(
        stream: impl Stream<Item = std::io::Result<Bytes>>,
    ) -> std::io::Result<Vec<u8>> {
        futures::pin_mut!(stream);
        let mut out = Vec::new();
        while let Some(chunk) = stream.next().await {
            out.extend_from_slice(&chunk?);
        }
        Ok(out)
    }

    #[tokio::test]
    async fn a_reader_gets_the_bytes_as_they_are_written_then_the_end() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = Blobs::open(&dir.path().join("peers")).unwrap();
        let data: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
        let mut sink = blobs
            .sink(DIGEST, data.len() as u64, "sha256:image")
            .unwrap();
        assert!(
            blobs
                .sink(DIGEST, data.len() as u64, "sha256:other")
                .is_none(),
            "one copy at a time"
        );
        sink.write(0, &data[..300_000]);
        let blob = blobs.get(DIGEST).unwrap();
        assert!(
            blob.serves_any_of(["sha256:other"].into_iter()),
            "both images noted"
        );
        // A reader from the middle of what is there, started before the rest arrives.
        let reader = tokio::spawn(collect(blob.read_from(100_000)));
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!reader.is_finished(), "the reader waits for the writer");
        sink.write(300_000, &data[300_000..]);
        sink.finish(true);
        assert_eq!(reader.await.unwrap().unwrap(), &data[100_000..]);
        assert_eq!(blob.state(), BlobState::Complete);
        // Complete copies go once nobody read them for `keep`.
        blobs.sweep(Duration::from_secs(60));
        assert_eq!(blobs.len(), 1);
        blobs.sweep(Duration::ZERO);
        assert!(blobs.is_empty());
        assert_eq!(
            std::fs::read_dir(dir.path().join("peers")).unwrap().count(),
            0
        );
    }

    #[tokio::test]
    async fn a_request_just_before_the_download_begins_waits_for_it() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = Blobs::open(&dir.path().join("peers")).unwrap();
        assert!(blobs
            .wait_for(DIGEST, Duration::from_millis(20))
            .await
            .is_none());
        let waiting = {
            let blobs = Arc::clone(&blobs);
            tokio::spawn(async move { blobs.wait_for(DIGEST, Duration::from_secs(5)).await })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        let _sink = blobs.sink(DIGEST, 10, "sha256:image").unwrap();
        assert_eq!(waiting.await.unwrap().unwrap().digest, DIGEST);
    }

    #[tokio::test]
    async fn a_failed_download_fails_its_readers_and_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = Blobs::open(&dir.path().join("peers")).unwrap();
        let mut sink = blobs.sink(DIGEST, 1000, "sha256:image").unwrap();
        sink.write(0, &[7u8; 400]);
        let blob = blobs.get(DIGEST).unwrap();
        let reader = tokio::spawn(collect(blob.read_from(0)));
        tokio::time::sleep(Duration::from_millis(50)).await;
        sink.finish(false);
        let failed = reader.await.unwrap().unwrap_err();
        assert!(failed.to_string().contains("failed"), "{failed}");
        assert!(blobs.get(DIGEST).is_none());
        assert_eq!(
            std::fs::read_dir(dir.path().join("peers")).unwrap().count(),
            0
        );
        // A new download may write it again.
        assert!(blobs.sink(DIGEST, 1000, "sha256:image").is_some());
    }

    #[test]
    fn copies_of_an_earlier_run_are_not_kept() {
        let dir = tempfile::tempdir().unwrap();
        let peers = dir.path().join("peers");
        std::fs::create_dir_all(&peers).unwrap();
        std::fs::write(peers.join("leftover"), b"half").unwrap();
        let blobs = Blobs::open(&peers).unwrap();
        assert!(blobs.is_empty());
        assert_eq!(std::fs::read_dir(&peers).unwrap().count(), 0);
        assert!(
            blobs.sink("sha256:short", 1, "i").is_none(),
            "a malformed digest names no file"
        );
    }
}
