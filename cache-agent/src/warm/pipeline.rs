//! One warm, stage by stage: a pinned digest already cached is a hit once the requester is
//! verified (`authorize`); otherwise resolve → cache hit? → the entry's warm lock (another process may be warming it)
//! → make room → stream every layer into the extraction (and decoder) → inspect, check and
//! convert with qemu-img where still needed → commit, only after every digest checked out.
//! A streaming decode that gives up half-way streams the layers again for qemu-img.

use std::sync::Arc;
use std::time::Instant;

use vmdisk_crds::DiskFormat;
use vmdisk_registry::pull::{LayerSources, PullError, ResolvedImage};

/// Times a warm streams its layers again without peers whose bytes failed the digest.
const MAX_EXCLUDED_PEERS: usize = 4;

use super::convert;
use super::decode;
use super::extract::{
    self, DiskTarget, ExtractError, ExtractedDisk, LayerCompression, LayerSource,
};
use super::{
    pinned_digest, Conversion, ProgressFn, WarmError, WarmOutcome, WarmProgress, WarmRequest,
    Warmer,
};
use crate::store::{allocated_bytes, CacheEntry, EntryKey, EntryMeta, PullRecord, StagingDir};

impl Warmer {
    pub(super) async fn warm_once(
        &self,
        request: WarmRequest,
        progress: ProgressFn,
    ) -> Result<WarmOutcome, WarmError> {
        let reference = request.reference.clone();
        let pull_error = |source| WarmError::Pull {
            reference: reference.clone(),
            source,
        };
        let hit = |entry: CacheEntry| {
            self.store.touch(&entry.key);
            WarmOutcome {
                entry,
                pulled: false,
                bytes_pulled: 0,
                bytes_from_peers: 0,
                pull_seconds: 0.0,
                convert_seconds: 0.0,
                stages: [
                    ("resolve", 0.0),
                    ("stream", 0.0),
                    ("convert", 0.0),
                    ("commit", 0.0),
                ],
                conversion: Conversion::Unneeded,
            }
        };
        // A reference pinned to a digest names its cache entry: a warm entry is served once
        // the registry confirmed this requester may pull it (or did within the records' TTL,
        // so a populator keeps working while the registry is down).
        if let Some(digest) = pinned_digest(&request.reference) {
            let key = EntryKey {
                digest: digest.to_string(),
                format: request.format,
            };
            if let Some(entry) = self.store.get_or_adopt(&key) {
                self.authorize(&request, digest).await?;
                return Ok(hit(entry));
            }
        }
        progress(WarmProgress::Resolving);
        let resolving = Instant::now();
        let warm_started = chrono::Utc::now();
        let image = self
            .puller
            .resolve(&request.reference, &request.registry)
            .await
            .map_err(pull_error)?;
        // The registry just served the manifest to these credentials.
        self.record_served(&request, &image.digest);
        let key = EntryKey {
            digest: image.digest.clone(),
            format: request.format,
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
        // Counted until this warm ends, however it ends, short of the process dying.
        let _attempt = self
            .store
            .begin_attempt(&key, &request.reference)
            .map_err(|p| WarmError::Poisoned {
                reference: p.reference,
                digest: p.key.digest,
                unfinished: p.unfinished,
            })?;
        // The disk is at least as large as its compressed layers; the budget is enforced again
        // once the real size is known.
        self.store.make_room(image.total_layer_bytes)?;

        let resolve_seconds = resolving.elapsed().as_secs_f64();
        let staging = self.store.staging()?;
        let _slot = self.puller.pull_slot().await;
        let started = Instant::now();
        // One pass from the wire to the disk: each layer streams to the extraction as it
        // downloads (digest checked on the way, resumed after interruptions), and a qcow2 or
        // VMDK disk cached as raw is decoded on the way too. A decode that gives up half-way
        // (an image laid out beyond what it may buffer) leaves the disk to qemu-img: the layers
        // are streamed again and the disk kept as it is.
        let mut target = match request.format {
            DiskFormat::Raw => DiskTarget::Raw,
            DiskFormat::Qcow2 => DiskTarget::AsIs,
        };
        let mut dir = "extract".to_string();
        // Nodes whose bytes failed the digest: the layers are streamed again without them.
        let mut excluded: Vec<String> = Vec::new();
        let (extracted, (bytes_pulled, bytes_from_peers)) = loop {
            let attempt = match self
                .stream_disk(
                    &image, &request, &staging, &dir, target, &excluded, &progress,
                )
                .await
            {
                Err(WarmError::Pull {
                    source: PullError::PeerCorrupt { peers, digest },
                    ..
                }) if excluded.len() < MAX_EXCLUDED_PEERS => {
                    tracing::warn!(%digest, ?peers, "peers sent bytes that failed the digest; streaming again without them");
                    excluded.extend(peers);
                    dir = format!("extract-{}", excluded.len());
                    continue;
                }
                other => other?,
            };
            match attempt {
                (
                    Err(ExtractError::Disk {
                        source: decode::DecodeError::Unsupported(why),
                        ..
                    }),
                    _,
                ) if target == DiskTarget::Raw => {
                    tracing::warn!(%why, "streaming decode gave up; pulling again for qemu-img");
                    target = DiskTarget::AsIs;
                    dir = "extract-as-is".to_string();
                }
                (extracted, bytes_pulled) => {
                    let extracted = extracted.map_err(|source| WarmError::Extract {
                        reference: reference.clone(),
                        source,
                    })?;
                    break (extracted, bytes_pulled);
                }
            }
        };
        let pull_seconds = started.elapsed().as_secs_f64();
        progress(WarmProgress::Converting);
        let convert_started = Instant::now();
        let convert_error = |source| WarmError::Convert {
            reference: reference.clone(),
            source,
        };
        let target = staging
            .path()
            .join(format!("disk.{}", request.format.as_str()));
        let mut conversion = Conversion::Unneeded;
        let (source_format, virtual_size) = match extracted.decoded_from {
            // Already raw, its qcow2 header checked like qemu-img info's would be.
            Some(from) => {
                conversion = Conversion::Streamed;
                std::fs::rename(&extracted.path, &target).map_err(|source| WarmError::Io {
                    context: format!("moving {} into place", extracted.path.display()),
                    source,
                })?;
                (from.to_string(), extracted.apparent_size)
            }
            None => {
                let info = convert::inspect(&extracted.path)
                    .await
                    .map_err(convert_error)?;
                convert::check_safe(&info).map_err(convert_error)?;
                if convert::needs_conversion(&info.format, request.format) {
                    conversion = Conversion::QemuImg;
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
                (info.format.clone(), info.virtual_size)
            }
        };
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
            source_format,
            virtual_size,
            allocated_size,
            created: now,
            last_used: now,
            reference: Some(request.reference.clone()),
            pull: Some(PullRecord {
                started: warm_started,
                bytes_from_registry: bytes_pulled.saturating_sub(bytes_from_peers),
                bytes_from_peers,
            }),
        };
        let committing = Instant::now();
        let entry = self.store.commit(staging, key, &target, meta)?;
        let commit_seconds = committing.elapsed().as_secs_f64();
        self.store.make_room(0)?;
        Ok(WarmOutcome {
            entry,
            pulled: true,
            bytes_pulled,
            bytes_from_peers,
            pull_seconds,
            convert_seconds,
            stages: [
                ("resolve", resolve_seconds),
                ("stream", pull_seconds),
                ("convert", convert_seconds),
                ("commit", commit_seconds),
            ],
            conversion,
        })
    }

    /// Streams every layer of `image` into the extraction, writing the disk for `target` in
    /// `dir` of `staging`. The extraction's own failure is returned for the caller to judge; a download
    /// failure that caused it is returned as the error instead, since it is the cause. Also
    /// returns the bytes downloaded, and of them those peers sent.
    #[allow(clippy::too_many_arguments)]
    async fn stream_disk(
        &self,
        image: &ResolvedImage,
        request: &WarmRequest,
        staging: &StagingDir,
        dir: &str,
        target: DiskTarget,
        excluded: &[String],
        progress: &ProgressFn,
    ) -> Result<(Result<ExtractedDisk, ExtractError>, (u64, u64)), WarmError> {
        let reference = &request.reference;
        let total = image.total_layer_bytes;
        let mut sources = Vec::new();
        let mut downloads = Vec::new();
        let mut before = 0u64;
        for layer in &image.layers {
            let compression =
                LayerCompression::from_media_type(&layer.media_type).map_err(|source| {
                    WarmError::Extract {
                        reference: reference.clone(),
                        source,
                    }
                })?;
            let layer_progress = {
                let progress = Arc::clone(progress);
                let base = before;
                Arc::new(move |n: u64| {
                    progress(WarmProgress::Pulling {
                        done: base + n,
                        total,
                    })
                })
            };
            let layer_sources = match &self.sourcing {
                Some(sourcing) => sourcing.sources(image, layer, excluded).await,
                None => LayerSources::registry_only(),
            };
            let (reader, task) = self.puller.stream_layer(
                image,
                layer,
                &request.registry,
                layer_sources,
                layer_progress,
            );
            sources.push(LayerSource {
                reader: Box::new(reader),
                compression,
            });
            downloads.push(task);
            before += layer.size;
        }
        let extract_dir = staging.path().join(dir);
        let limits = self.limits.clone();
        let extracted = tokio::task::spawn_blocking(move || {
            extract::extract_disk_from(sources, &extract_dir, &limits, target, &mut |_| {})
        })
        .await
        .map_err(|e| WarmError::Task(e.to_string()))?;
        // A failed download is the cause of whatever the extraction saw; a finished extraction
        // read every layer to its end, so each download has checked its digest.
        let (mut bytes_pulled, mut from_peers) = (0, 0);
        for task in downloads {
            match task.await.map_err(|e| WarmError::Task(e.to_string()))? {
                Ok(n) => {
                    bytes_pulled += n.bytes;
                    from_peers += n.from_peers;
                }
                Err(source) if extracted.is_ok() || !matches!(source, PullError::Io { .. }) => {
                    return Err(WarmError::Pull {
                        reference: reference.clone(),
                        source,
                    })
                }
                Err(_) => {} // the extraction stopped reading: its own error says why
            }
        }
        Ok((extracted, (bytes_pulled, from_peers)))
    }
}
