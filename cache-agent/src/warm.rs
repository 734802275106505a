//! `Warmer`: one image reference in, one verified cache entry out.
//!
//! resolve (index → this node's platform) → cache hit? → make room → download layers into a
//! staging directory (digests verified) → extract the disk (sparse) → inspect with qemu-img and
//! refuse unsafe images → convert to the target format if needed → check → commit by rename.
//! Everything before the commit lives in staging, which is deleted on failure and on the next
//! start after a crash, so no partial entry is ever visible. Two warms of the same entry share
//! one run.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use futures::future::{BoxFuture, FutureExt, Shared};
use thiserror::Error;
use vmdisk_crds::DiskFormat;

use crate::convert::{self, ConvertError};
use crate::extract::{self, ExtractError, ExtractLimits, LayerCompression, LayerFile};
use crate::store::{allocated_bytes, CacheEntry, CacheStore, EntryKey, EntryMeta, StoreError};
use vmdisk_registry::pull::{PullError, Puller, RegistryOptions};

#[derive(Debug, Error)]
pub enum WarmError {
    #[error("pulling {reference}: {source}")]
    Pull {
        reference: String,
        #[source]
        source: PullError,
    },
    #[error("extracting the disk of {reference}: {source}")]
    Extract {
        reference: String,
        #[source]
        source: ExtractError,
    },
    #[error("converting the disk of {reference}: {source}")]
    Convert {
        reference: String,
        #[source]
        source: ConvertError,
    },
    #[error("cache store: {0}")]
    Store(#[from] StoreError),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("warm task failed: {0}")]
    Task(String),
}

impl WarmError {
    /// True when warming again cannot succeed: the image is missing, refused by the registry
    /// or by vmdisk's safety checks, or not for this platform. Disk space, network and
    /// qemu-img failures are worth another try.
    pub fn is_permanent(&self) -> bool {
        use vmdisk_registry::PullError as P;
        match self {
            WarmError::Pull { source, .. } => matches!(
                source,
                P::BadReference { .. }
                    | P::Unauthorized { .. }
                    | P::NotFound { .. }
                    | P::NoMatchingPlatform { .. }
                    | P::DigestMismatch { .. }
                    | P::BadCaBundle(_)
            ),
            WarmError::Extract { source, .. } => !matches!(source, ExtractError::Io { .. }),
            WarmError::Convert { source, .. } => matches!(
                source,
                ConvertError::BackingFile { .. }
                    | ConvertError::DataFile { .. }
                    | ConvertError::ForeignExtent { .. }
                    | ConvertError::Encrypted
                    | ConvertError::UnsupportedFormat { .. }
            ),
            WarmError::Store(_) | WarmError::Io { .. } | WarmError::Task(_) => false,
        }
    }
}

/// What to warm.
#[derive(Debug, Clone)]
pub struct WarmRequest {
    /// Image reference; agents pass the digest the image controller resolved.
    pub reference: String,
    pub format: DiskFormat,
    pub registry: RegistryOptions,
}

/// Progress of one warm, for progress bars and NodeDiskCache rows.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum WarmProgress {
    Resolving,
    Pulling { done: u64, total: u64 },
    Extracting,
    Converting,
    Committing,
}

pub type ProgressFn = Arc<dyn Fn(WarmProgress) + Send + Sync>;

/// How a warm ended.
#[derive(Debug, Clone)]
pub struct WarmOutcome {
    pub entry: CacheEntry,
    /// False when the entry was already cached.
    pub pulled: bool,
    pub bytes_pulled: u64,
    pub pull_seconds: f64,
    pub convert_seconds: f64,
}

type SharedWarm = Shared<BoxFuture<'static, Result<WarmOutcome, Arc<WarmError>>>>;

/// Runs warms against one store, sharing concurrent requests for the same entry.
#[derive(Clone)]
pub struct Warmer {
    store: Arc<CacheStore>,
    puller: Puller,
    limits: ExtractLimits,
    in_flight: Arc<Mutex<HashMap<(String, DiskFormat), SharedWarm>>>,
}

impl Warmer {
    pub fn new(store: Arc<CacheStore>, puller: Puller, limits: ExtractLimits) -> Self {
        Self {
            store,
            puller,
            limits,
            in_flight: Arc::default(),
        }
    }

    pub fn store(&self) -> &Arc<CacheStore> {
        &self.store
    }

    pub fn puller(&self) -> &Puller {
        &self.puller
    }

    /// Warms `request`, or joins a warm of the same reference and format already running.
    pub async fn warm(
        &self,
        request: WarmRequest,
        progress: ProgressFn,
    ) -> Result<WarmOutcome, Arc<WarmError>> {
        let key = (request.reference.clone(), request.format);
        let shared = {
            let mut in_flight = self.in_flight.lock().expect("in-flight map poisoned");
            if let Some(existing) = in_flight.get(&key) {
                existing.clone()
            } else {
                let me = self.clone();
                let fut = async move { me.warm_once(request, progress).await.map_err(Arc::new) }
                    .boxed()
                    .shared();
                in_flight.insert(key.clone(), fut.clone());
                fut
            }
        };
        let result = shared.await;
        self.in_flight
            .lock()
            .expect("in-flight map poisoned")
            .remove(&key);
        result
    }

    async fn warm_once(
        &self,
        request: WarmRequest,
        progress: ProgressFn,
    ) -> Result<WarmOutcome, WarmError> {
        let reference = request.reference.clone();
        let pull_error = |source| WarmError::Pull {
            reference: reference.clone(),
            source,
        };
        progress(WarmProgress::Resolving);
        let image = self
            .puller
            .resolve(&request.reference, &request.registry)
            .await
            .map_err(pull_error)?;
        let key = EntryKey {
            digest: image.digest.clone(),
            format: request.format,
        };
        let hit = |entry: CacheEntry| {
            self.store.touch(&entry.key);
            WarmOutcome {
                entry,
                pulled: false,
                bytes_pulled: 0,
                pull_seconds: 0.0,
                convert_seconds: 0.0,
            }
        };
        if let Some(entry) = self.store.get_or_adopt(&key) {
            return Ok(hit(entry));
        }
        // One warm of an entry at a time across every process sharing the cache; whoever
        // waited finds it committed.
        let _warming = self.store.warm_lock(&key).await?;
        if let Some(entry) = self.store.get_or_adopt(&key) {
            return Ok(hit(entry));
        }
        // The disk is at least as large as its compressed layers; the budget is enforced again
        // once the real size is known.
        self.store.make_room(image.total_layer_bytes)?;

        let staging = self.store.staging()?;
        let layers_dir = staging.path().join("layers");
        std::fs::create_dir_all(&layers_dir).map_err(|source| WarmError::Io {
            context: format!("creating {}", layers_dir.display()),
            source,
        })?;
        let total = image.total_layer_bytes;
        let pull_started = Instant::now();
        let layer_progress = {
            let progress = Arc::clone(&progress);
            Arc::new(move |done: u64| progress(WarmProgress::Pulling { done, total }))
        };
        let layers = self
            .puller
            .fetch_layers(&image, &request.registry, &layers_dir, layer_progress)
            .await
            .map_err(pull_error)?;
        let pull_seconds = pull_started.elapsed().as_secs_f64();
        let bytes_pulled: u64 = layers.iter().map(|l| l.size).sum();

        progress(WarmProgress::Extracting);
        let convert_started = Instant::now();
        let layer_files = layers
            .iter()
            .map(|l| {
                Ok(LayerFile {
                    path: l.path.clone(),
                    compression: LayerCompression::from_media_type(&l.media_type)?,
                })
            })
            .collect::<Result<Vec<_>, ExtractError>>()
            .map_err(|source| WarmError::Extract {
                reference: reference.clone(),
                source,
            })?;
        let extract_dir = staging.path().join("extract");
        let limits = self.limits.clone();
        let extracted = tokio::task::spawn_blocking(move || {
            extract::extract_disk(&layer_files, &extract_dir, &limits, &mut |_| {})
        })
        .await
        .map_err(|e| WarmError::Task(e.to_string()))?
        .map_err(|source| WarmError::Extract {
            reference: reference.clone(),
            source,
        })?;
        // Layers are no longer needed; free the space before converting.
        let _ = std::fs::remove_dir_all(&layers_dir);

        progress(WarmProgress::Converting);
        let convert_error = |source| WarmError::Convert {
            reference: reference.clone(),
            source,
        };
        let info = convert::inspect(&extracted.path)
            .await
            .map_err(convert_error)?;
        convert::check_safe(&info).map_err(convert_error)?;
        let target = staging
            .path()
            .join(format!("disk.{}", request.format.as_str()));
        if convert::needs_conversion(&info.format, request.format) {
            convert::convert(&extracted.path, &info.format, &target, request.format)
                .await
                .map_err(convert_error)?;
            let _ = std::fs::remove_file(&extracted.path);
        } else {
            std::fs::rename(&extracted.path, &target).map_err(|source| WarmError::Io {
                context: format!("moving {} into place", extracted.path.display()),
                source,
            })?;
        }
        convert::check(&target, request.format)
            .await
            .map_err(convert_error)?;
        let convert_seconds = convert_started.elapsed().as_secs_f64();

        progress(WarmProgress::Committing);
        let allocated_size = allocated_bytes(&target).map_err(|source| WarmError::Io {
            context: format!("measuring {}", target.display()),
            source,
        })?;
        let now = chrono::Utc::now();
        let meta = EntryMeta {
            digest: key.digest.clone(),
            format: request.format,
            source_format: info.format.clone(),
            virtual_size: info.virtual_size,
            allocated_size,
            created: now,
            last_used: now,
            reference: Some(request.reference.clone()),
        };
        let entry = self.store.commit(staging, key, &target, meta)?;
        self.store.make_room(0)?;
        Ok(WarmOutcome {
            entry,
            pulled: true,
            bytes_pulled,
            pull_seconds,
            convert_seconds,
        })
    }
}
