//! `Warmer`: one image reference in, one verified cache entry out.
//!
//! resolve (index → this node's platform) → cache hit? → make room → stream each layer from
//! the registry straight into the extraction (digest checked on the way, resumed after an
//! interruption; nothing waits for a whole blob) → the disk lands sparse in staging, a qcow2
//! or VMDK one decoded to raw on the way when raw is wanted → otherwise inspect with qemu-img, refuse
//! unsafe images, convert if needed → check → commit by rename, only after every digest
//! checked out. Everything before the commit lives in staging, which is deleted on failure and
//! by the owner after a crash, so no partial entry is ever visible. Two warms of the same entry
//! share one run, in one process (a shared future) and across processes (a lock).
//!
//! Where to read: this file (the requests, outcomes and errors, and `Warmer::warm`, which
//! shares concurrent warms of one entry), then `pipeline` (one warm, stage by stage), then the
//! stages it drives: [`extract`] (layers in, one disk out), [`decode`] (qcow2 and VMDK to raw
//! while the layer streams), `sparse` (how the disk is written: holes, batches, `O_DIRECT`)
//! and [`convert`] (qemu-img: inspect, refuse unsafe images, convert, check). [`authorize`]
//! decides whether a requester may be handed a disk that is already cached.

pub mod authorize;
pub mod convert;
pub mod decode;
pub mod extract;
mod pipeline;
mod sparse;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use futures::future::{BoxFuture, FutureExt, Shared};
use thiserror::Error;
use vmdisk_crds::DiskFormat;

use self::authorize::VerifyPolicy;
use self::convert::ConvertError;
use self::extract::{ExtractError, ExtractLimits};
pub(crate) use self::sparse::is_zero;
use crate::store::{CacheEntry, CacheStore, StoreError};
use vmdisk_registry::pull::{
    LayerDescriptor, LayerSources, PullError, Puller, RegistryOptions, ResolvedImage,
};

/// Where a warm's layers may come from besides their registry, and where a copy of each goes
/// (the `peers` room; without it a warm asks the registry alone). `excluded` names the nodes
/// whose bytes already failed a digest check in this warm.
pub trait LayerSourcing: Send + Sync {
    fn sources<'a>(
        &'a self,
        image: &'a ResolvedImage,
        layer: &'a LayerDescriptor,
        excluded: &'a [String],
    ) -> BoxFuture<'a, LayerSources>;
}

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
    #[error("{reference} is cached, but the registry did not confirm that these credentials may pull it, so it is not served: {source}")]
    NotVerified {
        reference: String,
        #[source]
        source: PullError,
    },
    #[error("{reference}: {unfinished} warms of this image died with their process (out of memory?); refused until forgotten with `vmdisk-cache-agent ls --forget {digest}`")]
    Poisoned {
        reference: String,
        digest: String,
        unfinished: u32,
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
            WarmError::Pull { source, .. } | WarmError::NotVerified { source, .. } => matches!(
                source,
                P::BadReference { .. }
                    | P::Unauthorized { .. }
                    | P::NotFound { .. }
                    | P::NoMatchingPlatform { .. }
                    | P::DigestMismatch { .. }
                    | P::BadCaBundle(_)
            ),
            WarmError::Extract { source, .. } => !matches!(
                source,
                ExtractError::Io { .. }
                    | ExtractError::Disk {
                        source: decode::DecodeError::Io { .. },
                        ..
                    }
            ),
            WarmError::Convert { source, .. } => source.refuses_disk(),
            WarmError::Poisoned { .. } => true,
            WarmError::Store(_) | WarmError::Io { .. } | WarmError::Task(_) => false,
        }
    }
}

/// The digest a reference is pinned to (`repo@sha256:<64 hex>`), if it is.
pub(crate) fn pinned_digest(reference: &str) -> Option<&str> {
    let (_, digest) = reference.rsplit_once('@')?;
    let hex = digest.strip_prefix("sha256:")?;
    (hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit())).then_some(digest)
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
    /// Downloading, which extraction (and decoding) follows as the bytes arrive.
    Pulling {
        done: u64,
        total: u64,
    },
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
    /// Of `bytes_pulled`, those other nodes' agents sent.
    pub bytes_from_peers: u64,
    /// Download, digest, inflation and extraction, which overlap (and qcow2 or VMDK decoding to raw).
    pub pull_seconds: f64,
    /// qemu-img inspection, conversion and check, where still needed.
    pub convert_seconds: f64,
    /// Seconds per stage, in order: resolve, stream, convert, commit.
    pub stages: [(&'static str, f64); 4],
    pub conversion: Conversion,
}

/// How the disk became the cached format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Conversion {
    /// It already was (or the entry was cached).
    Unneeded,
    /// Decoded to raw as the layer streamed in.
    Streamed,
    /// Written as it is, then converted by `qemu-img convert`.
    QemuImg,
}

type SharedWarm = Shared<BoxFuture<'static, Result<WarmOutcome, Arc<WarmError>>>>;

/// A warm in flight: reference, format and the requester's credential identity.
type WarmKey = (String, DiskFormat, String);

/// Runs warms against one store, sharing concurrent requests for the same entry.
#[derive(Clone)]
pub struct Warmer {
    store: Arc<CacheStore>,
    puller: Puller,
    limits: ExtractLimits,
    verify: VerifyPolicy,
    sourcing: Option<Arc<dyn LayerSourcing>>,
    /// Keyed by reference, format and the requester's credential identity: requesters with
    /// different credentials never share a warm (nor its answer).
    in_flight: Arc<Mutex<HashMap<WarmKey, SharedWarm>>>,
}

impl Warmer {
    pub fn new(store: Arc<CacheStore>, puller: Puller, limits: ExtractLimits) -> Self {
        Self {
            store,
            puller,
            limits,
            verify: VerifyPolicy::default(),
            sourcing: None,
            in_flight: Arc::default(),
        }
    }

    /// Layers asked of peers first, and copied for them (see [`LayerSourcing`]).
    pub fn with_peers(mut self, sourcing: Arc<dyn LayerSourcing>) -> Self {
        self.sourcing = Some(sourcing);
        self
    }

    /// Whether cache hits are verified with the registry (default: always, trusted a day).
    pub fn with_verification(mut self, verify: VerifyPolicy) -> Self {
        self.verify = verify;
        self
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
        let key = (
            request.reference.clone(),
            request.format,
            vmdisk_registry::credential_identity(&request.registry.auth),
        );
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
}
