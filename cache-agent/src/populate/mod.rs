//! Filling one PVC from the node cache: what a populator pod runs (`vmdisk-cache-agent
//! populate`), and what the demo and the command line call.
//!
//! The cache is shared with the node's agent, which owns it: populate opens it as a guest
//! (never cleans or evicts), warms a cold entry through the same single-flight path as the
//! agent (the entry is committed whole or not at all), holds a lease the agent's eviction
//! honours while copying, and copies sparse (reflink where the filesystem allows) to a file
//! or block device. A raw file target is sized to the volume's usable bytes, a qcow2 one
//! grown with `qemu-img resize`; a disk larger than the volume is refused.

pub mod clone;
#[cfg(test)]
pub(crate) mod loop_device;
pub mod mounted;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use thiserror::Error;
use vmdisk_crds::DiskFormat;
use vmdisk_registry::RegistryOptions;

use self::clone::{clone_disk, CloneError, CloneMethod};
use crate::store::EntryKey;
use crate::warm::convert::ConvertError;
use crate::warm::{WarmError, WarmProgress, WarmRequest, Warmer};

#[derive(Debug, Error)]
pub enum PopulateError {
    #[error(transparent)]
    Warm(Arc<WarmError>),
    #[error("the disk needs {disk} bytes but the volume offers {room} bytes for {target}")]
    DiskTooLarge {
        disk: u64,
        room: u64,
        target: String,
    },
    #[error("copying the disk to {target}: {source}")]
    Clone {
        target: String,
        #[source]
        source: CloneError,
    },
    #[error("growing {target}: {source}")]
    Resize {
        target: String,
        #[source]
        source: ConvertError,
    },
    #[error("giving {target} to {uid}:{gid}: {source}")]
    Chown {
        target: String,
        uid: u32,
        gid: u32,
        #[source]
        source: std::io::Error,
    },
    #[error("cache entry {0} was evicted before it could be leased")]
    Evicted(EntryKey),
    #[error("waiting for a copy slot: {0}")]
    Store(crate::store::StoreError),
    #[error("copy task failed: {0}")]
    Task(String),
    #[error(transparent)]
    Mounted(#[from] mounted::MountedError),
}

impl PopulateError {
    /// True when running again cannot help (the image is missing or refused, the volume is too
    /// small): the populator stops retrying and says why.
    pub fn is_permanent(&self) -> bool {
        match self {
            PopulateError::Warm(e) => e.is_permanent(),
            PopulateError::DiskTooLarge { .. } => true,
            PopulateError::Mounted(e) => e.is_permanent(),
            PopulateError::Clone {
                source: CloneError::TargetTooSmall { .. },
                ..
            } => true,
            _ => false,
        }
    }
}

/// One PVC to fill.
#[derive(Debug, Clone)]
pub struct PopulateRequest {
    /// The image, pinned to the digest the PVC was admitted with.
    pub reference: String,
    /// What lands on the volume (and is kept in the cache).
    pub format: DiskFormat,
    pub registry: RegistryOptions,
    /// A file (Filesystem volume) or a block device (Block volume).
    pub target: PathBuf,
    /// Bytes the target file should end up with (raw: its length; qcow2: its virtual size).
    /// `None`: the disk's own size. Ignored for block devices, which have a size.
    pub size: Option<u64>,
    /// Owner of a file target (KubeVirt's qemu runs as 107:107).
    pub owner: Option<(u32, u32)>,
    /// At most this many populates copy out of the node's cache at once (`None`: no bound).
    pub parallel_copies: Option<usize>,
}

/// Where a populate stands, for progress reports.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum PopulateProgress {
    /// Warming the cache (cold): pull, extract, convert.
    Warming(WarmProgress),
    Copying,
    Done,
}

impl PopulateProgress {
    /// A rough percentage: pulling is most of a cold populate, copying most of a warm one.
    pub fn percent(self) -> u8 {
        match self {
            PopulateProgress::Warming(WarmProgress::Resolving) => 0,
            PopulateProgress::Warming(WarmProgress::Pulling { done, total }) => {
                (done.saturating_mul(70) / total.max(1)).min(70) as u8
            }
            PopulateProgress::Warming(WarmProgress::Converting) => 80,
            PopulateProgress::Warming(WarmProgress::Committing) => 85,
            PopulateProgress::Copying => 90,
            PopulateProgress::Done => 100,
        }
    }
}

pub type PopulateProgressFn = Arc<dyn Fn(PopulateProgress) + Send + Sync>;

/// How a populate went.
#[derive(Debug, Clone)]
pub struct PopulateReport {
    pub key: EntryKey,
    /// False when the entry had to be warmed first (cold).
    pub cache_hit: bool,
    pub method: CloneMethod,
    pub bytes_written: u64,
    pub virtual_size: u64,
    /// The target's size afterwards.
    pub target_size: u64,
}

fn is_block_device(path: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::metadata(path).is_ok_and(|m| m.file_type().is_block_device())
}

/// Fills `request.target` from the cache of `warmer`, warming the entry first when cold.
pub async fn populate(
    warmer: &Warmer,
    request: PopulateRequest,
    progress: PopulateProgressFn,
) -> Result<PopulateReport, PopulateError> {
    let warm_progress = {
        let progress = Arc::clone(&progress);
        Arc::new(move |p| progress(PopulateProgress::Warming(p)))
    };
    let outcome = warmer
        .warm(
            WarmRequest {
                reference: request.reference.clone(),
                format: request.format,
                registry: request.registry.clone(),
            },
            warm_progress,
        )
        .await
        .map_err(PopulateError::Warm)?;
    let key = outcome.entry.key.clone();
    let virtual_size = outcome.entry.meta.virtual_size;
    let target_name = request.target.display().to_string();
    let block = is_block_device(&request.target);
    if !block {
        if let Some(room) = request.size.filter(|room| *room < virtual_size) {
            return Err(PopulateError::DiskTooLarge {
                disk: virtual_size,
                room,
                target: target_name,
            });
        }
    }
    let store = warmer.store();
    let slot = match request.parallel_copies {
        Some(slots) => Some(store.copy_slot(slots).await.map_err(PopulateError::Store)?),
        None => None,
    };
    let lease = store
        .lease(&key)
        .ok_or_else(|| PopulateError::Evicted(key.clone()))?;
    progress(PopulateProgress::Copying);
    let source = outcome.entry.disk_path.clone();
    let target = request.target.clone();
    // A raw disk grows by length; a qcow2 file's length is not its virtual size, so qcow2 is
    // grown by `qemu-img resize` below instead.
    let grow_to = match (block, request.format) {
        (false, DiskFormat::Raw) => request.size,
        _ => None,
    };
    let report = tokio::task::spawn_blocking(move || clone_disk(&source, &target, grow_to))
        .await
        .map_err(|e| PopulateError::Task(e.to_string()))?
        .map_err(|source| match source {
            CloneError::TargetTooSmall {
                target_size,
                disk_size,
                target,
            } => PopulateError::DiskTooLarge {
                disk: disk_size,
                room: target_size,
                target,
            },
            source => PopulateError::Clone {
                target: target_name.clone(),
                source,
            },
        })?;
    drop((lease, slot));
    store.touch(&key);
    let mut target_size = report.target_size;
    if !block && request.format == DiskFormat::Qcow2 {
        if let Some(bytes) = request.size.filter(|s| *s > virtual_size) {
            crate::warm::convert::resize(&request.target, bytes)
                .await
                .map_err(|source| PopulateError::Resize {
                    target: target_name.clone(),
                    source,
                })?;
            target_size = bytes;
        }
    }
    if let (false, Some((uid, gid))) = (block, request.owner) {
        std::os::unix::fs::chown(&request.target, Some(uid), Some(gid)).map_err(|source| {
            PopulateError::Chown {
                target: target_name.clone(),
                uid,
                gid,
                source,
            }
        })?;
    }
    progress(PopulateProgress::Done);
    Ok(PopulateReport {
        key,
        cache_hit: !outcome.pulled,
        method: report.method,
        bytes_written: report.bytes_written,
        virtual_size,
        target_size,
    })
}

/// `UID:GID`.
pub fn parse_owner(text: &str) -> Result<(u32, u32), String> {
    let (uid, gid) = text
        .split_once(':')
        .ok_or_else(|| format!("{text:?} is not UID:GID"))?;
    let number = |s: &str| {
        s.parse::<u32>()
            .map_err(|_| format!("{s:?} in {text:?} is not a number"))
    };
    Ok((number(uid)?, number(gid)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owners_parse() {
        assert_eq!(parse_owner("107:107"), Ok((107, 107)));
        assert!(parse_owner("107").is_err());
        assert!(parse_owner("qemu:qemu").is_err());
    }

    #[test]
    fn progress_never_goes_back_within_a_populate() {
        let steps = [
            PopulateProgress::Warming(WarmProgress::Resolving),
            PopulateProgress::Warming(WarmProgress::Pulling { done: 1, total: 2 }),
            PopulateProgress::Warming(WarmProgress::Pulling { done: 2, total: 2 }),
            PopulateProgress::Warming(WarmProgress::Converting),
            PopulateProgress::Warming(WarmProgress::Committing),
            PopulateProgress::Copying,
            PopulateProgress::Done,
        ];
        let percents: Vec<u8> = steps.iter().map(|s| s.percent()).collect();
        assert!(percents.windows(2).all(|w| w[0] <= w[1]), "{percents:?}");
        assert_eq!(*percents.last().unwrap(), 100);
    }
}
