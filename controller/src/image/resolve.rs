//! When an image's reference must be resolved to a digest, and how: [`needs_resolve`] and
//! [`next_poll`] are the pure rules (once, again when the spec changes, and every
//! `pollInterval` for a moving tag); [`RegistryResolver`] asks the registry with the image's
//! CA bundle, `insecure` flag and credentials.

use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use vmdisk_cache_agent::warm::extract::peek::{peek_disk, PeekError};
use vmdisk_cache_agent::warm::extract::LayerCompression;
use vmdisk_crds::{ImageReference, VMDiskImage};
use vmdisk_registry::{DockerConfig, Puller, PullerConfig, RegistryOptions, RetryPolicy};
use vmdisk_support::Backoff;

/// Waits after consecutive failed resolutions of one image: 30 s doubling to 30 min. The
/// image controller retries through it (per image), so the registry client makes one attempt.
pub const RESOLVE_BACKOFF: Backoff =
    Backoff::new(Duration::from_secs(30), Duration::from_secs(1800));

/// Resolves an image's reference to a digest, with the image's credentials (if any).
pub trait DigestResolver: Send + Sync + 'static {
    fn resolve<'a>(
        &'a self,
        image: &'a VMDiskImage,
        credentials: Option<&'a DockerConfig>,
    ) -> BoxFuture<'a, Result<Resolution, String>>;
}

/// What resolving found: the digest, and the disk's format and virtual size when the first
/// bytes of its layer tell them (so volumes are sized before any node has warmed the image).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolution {
    pub digest: String,
    pub disk: Option<PeekedDisk>,
}

impl Resolution {
    pub fn digest_only(digest: String) -> Self {
        Self { digest, disk: None }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeekedDisk {
    pub source_format: String,
    pub virtual_size: u64,
}

/// How much of a layer is fetched to find the disk's header: a qcow2 header cluster is at
/// most 2 MiB and mostly zeros, a raw disk needs only its tar header.
const PEEK_BYTES: u64 = 1 << 20;
/// Layers looked at, from the last one back (a containerDisk's disk is in its last layer).
const PEEK_LAYERS: usize = 2;

/// Resolves references against their registries with the image's CA bundle, `insecure` flag
/// and credentials.
pub struct RegistryResolver {
    puller: Puller,
}

impl Default for RegistryResolver {
    /// One attempt per resolution (the controller's per-image backoff retries), one registry
    /// client per registry and credentials, reused by every image.
    fn default() -> Self {
        Self {
            puller: Puller::new(PullerConfig {
                retry: RetryPolicy {
                    max_attempts: 1,
                    ..RetryPolicy::default()
                },
                ..PullerConfig::default()
            }),
        }
    }
}

impl DigestResolver for RegistryResolver {
    fn resolve<'a>(
        &'a self,
        image: &'a VMDiskImage,
        credentials: Option<&'a DockerConfig>,
    ) -> BoxFuture<'a, Result<Resolution, String>> {
        Box::pin(async move {
            let source = &image.spec.source.registry;
            let reference = ImageReference::parse(&source.url).map_err(|e| e.to_string())?;
            let options = RegistryOptions::for_source(&reference, source, credentials);
            let digest = self
                .puller
                .resolve_digest(&reference.to_string(), &options)
                .await
                .map_err(|e| e.to_string())?;
            let status = image.status.as_ref();
            let sized = status.and_then(|s| s.digest.as_deref()) == Some(digest.as_str())
                && status.and_then(|s| s.virtual_size).is_some();
            if sized {
                return Ok(Resolution::digest_only(digest));
            }
            let pinned = reference.with_digest(&digest).to_string();
            let disk = match self.peek(&pinned, &options).await {
                Ok(disk) => Some(disk),
                Err(message) => {
                    tracing::info!(reference = %pinned, %message, "the disk's size is known once a node has warmed it");
                    None
                }
            };
            Ok(Resolution { digest, disk })
        })
    }
}

impl RegistryResolver {
    /// The disk's format and size from the first bytes of the layer that holds it.
    async fn peek(&self, pinned: &str, options: &RegistryOptions) -> Result<PeekedDisk, String> {
        let image = self
            .puller
            .resolve(pinned, options)
            .await
            .map_err(|e| e.to_string())?;
        let mut why = "the image has no layers".to_string();
        for layer in image.layers.iter().rev().take(PEEK_LAYERS) {
            let compression =
                LayerCompression::from_media_type(&layer.media_type).map_err(|e| e.to_string())?;
            let start = self
                .puller
                .layer_start(&image, layer, options, PEEK_BYTES)
                .await
                .map_err(|e| e.to_string())?;
            match peek_disk(&start, compression) {
                Ok(disk) => {
                    return Ok(PeekedDisk {
                        source_format: disk.source_format.to_string(),
                        virtual_size: disk.virtual_size,
                    })
                }
                Err(e @ PeekError::NoDisk) => why = format!("layer {}: {e}", layer.digest),
                Err(e) => return Err(format!("layer {}: {e}", layer.digest)),
            }
        }
        Err(why)
    }
}

/// `30s`, `10m`, `1h30m`.
pub fn parse_interval(text: &str) -> Option<Duration> {
    let mut total = 0u64;
    let mut number = String::new();
    for c in text.chars() {
        if c.is_ascii_digit() {
            number.push(c);
            continue;
        }
        let n: u64 = number.parse().ok()?;
        number.clear();
        total += n * match c {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            _ => return None,
        };
    }
    (number.is_empty() && total > 0).then(|| Duration::from_secs(total))
}

fn last_resolved(image: &VMDiskImage) -> Option<DateTime<Utc>> {
    crate::time::parse_rfc3339(image.status.as_ref()?.last_resolved.as_deref()?)
}

/// Time until a moving tag is due for re-resolution, if it ever is.
pub fn next_poll(image: &VMDiskImage, now: DateTime<Utc>) -> Option<Duration> {
    let interval = parse_interval(image.spec.poll_interval.as_deref()?)?;
    let moving =
        ImageReference::parse(&image.spec.source.registry.url).is_ok_and(|r| r.is_moving());
    if !moving {
        return None;
    }
    let due = last_resolved(image)? + chrono::Duration::from_std(interval).ok()?;
    Some((due - now).to_std().unwrap_or(Duration::ZERO))
}

/// True when the reference must be (re-)resolved now.
pub fn needs_resolve(image: &VMDiskImage, now: DateTime<Utc>) -> bool {
    let status = image.status.as_ref();
    if status.and_then(|s| s.digest.as_ref()).is_none() {
        return true;
    }
    if status.and_then(|s| s.observed_generation) != image.metadata.generation {
        return true;
    }
    next_poll(image, now) == Some(Duration::ZERO)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::test_objects::{image, D};
    use vmdisk_crds::VMDiskImageStatus;

    #[test]
    fn intervals() {
        assert_eq!(parse_interval("30s"), Some(Duration::from_secs(30)));
        assert_eq!(parse_interval("1h30m"), Some(Duration::from_secs(5400)));
        assert_eq!(parse_interval("10"), None);
        assert_eq!(parse_interval("5x"), None);
        assert_eq!(parse_interval("0s"), None);
    }

    #[test]
    fn resolution_is_needed_once_then_on_generation_or_poll() {
        let now = Utc::now();
        let fresh = image("quay.io/a/b:1", Some("10m"), None);
        assert!(needs_resolve(&fresh, now));
        let resolved = VMDiskImageStatus {
            digest: Some(D.into()),
            observed_generation: Some(1),
            last_resolved: Some(now.to_rfc3339()),
            ..Default::default()
        };
        let done = image("quay.io/a/b:1", Some("10m"), Some(resolved.clone()));
        assert!(!needs_resolve(&done, now));
        assert!(
            needs_resolve(&done, now + chrono::Duration::minutes(11)),
            "moving tag due again"
        );
        let pinned = image(
            &format!("quay.io/a/b@{D}"),
            Some("10m"),
            Some(resolved.clone()),
        );
        assert!(
            !needs_resolve(&pinned, now + chrono::Duration::hours(5)),
            "digest references never move"
        );
        let mut edited = done.clone();
        edited.metadata.generation = Some(2);
        assert!(needs_resolve(&edited, now));
    }
}
