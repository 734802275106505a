//! `Puller`: registry access with oci-client, streaming every blob to disk.
//!
//! Blobs are never held in memory: each is streamed into `<digest>.partial`, hashed while
//! written, and renamed to its final name only once the SHA-256 matches. An interrupted
//! download resumes with an HTTP Range request (the existing prefix is re-hashed first), or
//! starts over when the registry answers with the whole blob. Transient failures (connection
//! errors, 5xx) are retried with exponential backoff and full jitter; 401/403, 404 and digest
//! mismatches are not. A per-node semaphore bounds parallel pulls, and concurrent fetches of
//! the same blob into the same place share one download.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::{BoxFuture, FutureExt, Shared};
use futures::StreamExt;
use oci_client::client::{
    BlobResponse, Certificate, CertificateEncoding, ClientConfig, ClientProtocol,
};
use oci_client::errors::{OciDistributionError, OciEnvelope, OciErrorCode};
use oci_client::manifest::{ImageIndexEntry, OciDescriptor, OciImageManifest, OciManifest};
use oci_client::{Client, Reference};
use sha2::{Digest, Sha256};
use thiserror::Error;
use tokio::io::AsyncWriteExt;

pub use crate::options::RegistryOptions;

#[derive(Debug, Error, Clone)]
pub enum PullError {
    #[error("invalid image reference {reference:?}: {message}")]
    BadReference { reference: String, message: String },
    #[error("registry {registry} refused the credentials (check the pull secret / docker config): {message}")]
    Unauthorized { registry: String, message: String },
    #[error("{reference} not found in the registry: {message}")]
    NotFound { reference: String, message: String },
    #[error("no manifest for platform {wanted} in {reference} (available: {available})")]
    NoMatchingPlatform {
        reference: String,
        wanted: String,
        available: String,
    },
    #[error("blob {digest} does not match its digest (got {actual}); the download was discarded")]
    DigestMismatch { digest: String, actual: String },
    #[error("registry {registry} failed after {attempts} attempts: {message}")]
    Transient {
        registry: String,
        attempts: u32,
        message: String,
    },
    #[error("registry {registry}: {message}")]
    Registry { registry: String, message: String },
    #[error("invalid CA bundle: {0}")]
    BadCaBundle(String),
    #[error("{context}: {message}")]
    Io { context: String, message: String },
}

/// The node's platform in OCI terms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlatformSpec {
    pub os: String,
    pub architecture: String,
}

impl Default for PlatformSpec {
    fn default() -> Self {
        let architecture = match std::env::consts::ARCH {
            "x86_64" => "amd64",
            "aarch64" => "arm64",
            "powerpc64" => "ppc64le",
            other => other,
        };
        Self {
            os: std::env::consts::OS.to_string(),
            architecture: architecture.to_string(),
        }
    }
}

impl std::fmt::Display for PlatformSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    pub max_attempts: u32,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 6,
            initial_backoff: Duration::from_millis(250),
            max_backoff: Duration::from_secs(20),
        }
    }
}

/// Delay before retry number `attempt` (1-based): full jitter over an exponential ceiling.
/// `rand01` is a uniform sample in [0, 1).
pub fn backoff_delay(policy: &RetryPolicy, attempt: u32, rand01: f64) -> Duration {
    let ceiling = policy
        .initial_backoff
        .saturating_mul(1u32 << attempt.saturating_sub(1).min(20))
        .min(policy.max_backoff);
    ceiling.mul_f64(rand01.clamp(0.0, 1.0))
}

#[derive(Debug, Clone, Copy)]
pub struct PullerConfig {
    pub max_parallel_pulls: usize,
    pub retry: RetryPolicy,
}

impl Default for PullerConfig {
    fn default() -> Self {
        Self {
            max_parallel_pulls: 2,
            retry: RetryPolicy::default(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerDescriptor {
    pub digest: String,
    pub media_type: String,
    pub size: u64,
}

/// A reference resolved to this node's manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedImage {
    pub reference: String,
    /// Digest of what the reference names (an index or a manifest): the cache key.
    pub digest: String,
    /// Digest of the platform manifest whose layers are pulled.
    pub manifest_digest: String,
    pub layers: Vec<LayerDescriptor>,
    pub total_layer_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DownloadedLayer {
    pub digest: String,
    pub media_type: String,
    pub path: PathBuf,
    pub size: u64,
}

type SharedDownload = Shared<BoxFuture<'static, Result<u64, PullError>>>;

struct Inner {
    config: PullerConfig,
    permits: tokio::sync::Semaphore,
    downloads: Mutex<HashMap<PathBuf, SharedDownload>>,
    downloads_started: AtomicU64,
}

#[derive(Clone)]
pub struct Puller {
    inner: Arc<Inner>,
}

fn has_code(envelope: &OciEnvelope, codes: &[OciErrorCode]) -> bool {
    envelope.errors.iter().any(|e| codes.contains(&e.code))
}

fn classify(registry: &str, reference: &str, e: OciDistributionError) -> PullError {
    use OciDistributionError as E;
    use OciErrorCode as C;
    let message = e.to_string();
    match e {
        E::UnauthorizedError { .. } | E::AuthenticationFailure(_) => PullError::Unauthorized {
            registry: registry.to_string(),
            message,
        },
        E::ImageManifestNotFoundError(_) => PullError::NotFound {
            reference: reference.to_string(),
            message,
        },
        E::ServerError { code, .. } if code == 401 || code == 403 => PullError::Unauthorized {
            registry: registry.to_string(),
            message,
        },
        E::ServerError { code: 404, .. } => PullError::NotFound {
            reference: reference.to_string(),
            message,
        },
        E::ServerError { code, .. } if code >= 500 => PullError::Transient {
            registry: registry.to_string(),
            attempts: 1,
            message,
        },
        E::RegistryError { ref envelope, .. }
            if has_code(
                envelope,
                &[
                    C::ManifestUnknown,
                    C::BlobUnknown,
                    C::NameUnknown,
                    C::NotFound,
                    C::ManifestBlobUnknown,
                ],
            ) =>
        {
            PullError::NotFound {
                reference: reference.to_string(),
                message,
            }
        }
        E::RegistryError { ref envelope, .. }
            if has_code(envelope, &[C::Unauthorized, C::Denied]) =>
        {
            PullError::Unauthorized {
                registry: registry.to_string(),
                message,
            }
        }
        E::RequestError(_) | E::IoError(_) => PullError::Transient {
            registry: registry.to_string(),
            attempts: 1,
            message: vmdisk_crds::error_chain(&e),
        },
        _ => PullError::Registry {
            registry: registry.to_string(),
            message,
        },
    }
}

fn is_transient(e: &PullError) -> bool {
    matches!(e, PullError::Transient { .. })
}

fn hex_sha256(hasher: &Sha256) -> String {
    format!("sha256:{}", hex::encode(hasher.clone().finalize()))
}

impl Puller {
    pub fn new(config: PullerConfig) -> Self {
        Self {
            inner: Arc::new(Inner {
                config,
                permits: tokio::sync::Semaphore::new(config.max_parallel_pulls.max(1)),
                downloads: Mutex::new(HashMap::new()),
                downloads_started: AtomicU64::new(0),
            }),
        }
    }

    /// Blob downloads begun (not joined), for tests of sharing.
    pub fn downloads_started(&self) -> u64 {
        self.inner.downloads_started.load(Ordering::Relaxed)
    }

    fn parse(reference: &str) -> Result<Reference, PullError> {
        let r = reference.trim().trim_start_matches("docker://");
        r.parse::<Reference>().map_err(|e| PullError::BadReference {
            reference: reference.to_string(),
            message: e.to_string(),
        })
    }

    fn client(
        &self,
        reference: &Reference,
        options: &RegistryOptions,
    ) -> Result<Client, PullError> {
        let mut extra = Vec::new();
        if let Some(pem) = &options.ca_bundle_pem {
            if !String::from_utf8_lossy(pem).contains("BEGIN CERTIFICATE") {
                return Err(PullError::BadCaBundle(
                    "no PEM certificate in the bundle".into(),
                ));
            }
            extra.push(Certificate {
                encoding: CertificateEncoding::Pem,
                data: pem.clone(),
            });
        }
        let platform = options.platform.clone();
        let config = ClientConfig {
            protocol: if options.insecure {
                ClientProtocol::HttpsExcept(vec![reference.registry().to_string()])
            } else {
                ClientProtocol::Https
            },
            extra_root_certificates: extra,
            platform_resolver: Some(Box::new(move |entries: &[ImageIndexEntry]| {
                pick_platform(entries, &platform).map(|e| e.digest.clone())
            })),
            connect_timeout: Some(Duration::from_secs(15)),
            read_timeout: Some(Duration::from_secs(60)),
            ..ClientConfig::default()
        };
        Client::try_from(config).map_err(|e| PullError::Registry {
            registry: reference.registry().to_string(),
            message: e.to_string(),
        })
    }

    async fn with_retries<T, F, Fut>(&self, registry: &str, mut op: F) -> Result<T, PullError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, PullError>>,
    {
        let policy = self.inner.config.retry;
        let mut attempt = 0;
        loop {
            attempt += 1;
            match op().await {
                Err(e) if is_transient(&e) && attempt < policy.max_attempts => {
                    let delay = backoff_delay(&policy, attempt, rand::random::<f64>());
                    tracing::warn!(registry, attempt, error = %e, ?delay, "transient registry error; retrying");
                    tokio::time::sleep(delay).await;
                }
                Err(PullError::Transient { message, .. }) => {
                    return Err(PullError::Transient {
                        registry: registry.to_string(),
                        attempts: attempt,
                        message,
                    })
                }
                other => return other,
            }
        }
    }

    /// The digest the reference names now (tag → digest), without pulling layers.
    pub async fn resolve_digest(
        &self,
        reference: &str,
        options: &RegistryOptions,
    ) -> Result<String, PullError> {
        let r = Self::parse(reference)?;
        if let Some(d) = r.digest() {
            return Ok(d.to_string());
        }
        let client = self.client(&r, options)?;
        let registry = r.registry().to_string();
        self.with_retries(&registry, || async {
            client
                .fetch_manifest_digest(&r, &options.auth)
                .await
                .map_err(|e| classify(&registry, reference, e))
        })
        .await
    }

    /// Resolves the reference (an index to this node's platform) to its layers.
    pub async fn resolve(
        &self,
        reference: &str,
        options: &RegistryOptions,
    ) -> Result<ResolvedImage, PullError> {
        let r = Self::parse(reference)?;
        let client = self.client(&r, options)?;
        let registry = r.registry().to_string();
        let (manifest, digest) = self
            .with_retries(&registry, || async {
                client
                    .pull_manifest(&r, &options.auth)
                    .await
                    .map_err(|e| classify(&registry, reference, e))
            })
            .await?;
        if let Some(wanted) = r.digest() {
            if wanted != digest {
                return Err(PullError::DigestMismatch {
                    digest: wanted.to_string(),
                    actual: digest,
                });
            }
        }
        let (image, manifest_digest) = match manifest {
            OciManifest::Image(m) => (m, digest.clone()),
            OciManifest::ImageIndex(index) => {
                let entry =
                    pick_platform(&index.manifests, &options.platform).ok_or_else(|| {
                        PullError::NoMatchingPlatform {
                            reference: reference.to_string(),
                            wanted: options.platform.to_string(),
                            available: index
                                .manifests
                                .iter()
                                .filter_map(|m| m.platform.as_ref())
                                .map(|p| format!("{}/{}", p.os, p.architecture))
                                .collect::<Vec<_>>()
                                .join(", "),
                        }
                    })?;
                let by_digest = r.clone_with_digest(entry.digest.clone());
                let (m, d) = self
                    .with_retries(&registry, || async {
                        client
                            .pull_manifest(&by_digest, &options.auth)
                            .await
                            .map_err(|e| classify(&registry, reference, e))
                    })
                    .await?;
                match m {
                    OciManifest::Image(m) => (m, d),
                    OciManifest::ImageIndex(_) => {
                        return Err(PullError::Registry {
                            registry,
                            message: "an index entry names another index".into(),
                        })
                    }
                }
            }
        };
        Ok(resolved(reference, digest, manifest_digest, &image))
    }

    /// Downloads every layer of `image` into `dest_dir` (named by digest), verified.
    /// `progress` receives the bytes downloaded so far across layers.
    pub async fn fetch_layers(
        &self,
        image: &ResolvedImage,
        options: &RegistryOptions,
        dest_dir: &Path,
        progress: Arc<dyn Fn(u64) + Send + Sync>,
    ) -> Result<Vec<DownloadedLayer>, PullError> {
        let _permit = self
            .inner
            .permits
            .acquire()
            .await
            .expect("semaphore never closed");
        let r = Self::parse(&image.reference)?.clone_with_digest(image.manifest_digest.clone());
        let client = self.client(&r, options)?;
        client
            .store_auth_if_needed(r.resolve_registry(), &options.auth)
            .await;
        let done_before = Arc::new(AtomicU64::new(0));
        let mut out = Vec::new();
        for layer in &image.layers {
            let hex = layer
                .digest
                .split_once(':')
                .map(|(_, h)| h)
                .unwrap_or(&layer.digest);
            if hex.is_empty() || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
                return Err(PullError::Registry {
                    registry: r.registry().to_string(),
                    message: format!("layer digest {:?} is malformed", layer.digest),
                });
            }
            let path = dest_dir.join(hex);
            let base = done_before.load(Ordering::Relaxed);
            let layer_progress = {
                let progress = Arc::clone(&progress);
                Arc::new(move |n: u64| progress(base + n)) as Arc<dyn Fn(u64) + Send + Sync>
            };
            let size = self
                .download_shared(
                    client.clone(),
                    r.clone(),
                    layer.clone(),
                    path.clone(),
                    layer_progress,
                )
                .await?;
            done_before.fetch_add(size, Ordering::Relaxed);
            out.push(DownloadedLayer {
                digest: layer.digest.clone(),
                media_type: layer.media_type.clone(),
                path,
                size,
            });
        }
        progress(done_before.load(Ordering::Relaxed));
        Ok(out)
    }

    async fn download_shared(
        &self,
        client: Client,
        reference: Reference,
        layer: LayerDescriptor,
        path: PathBuf,
        progress: Arc<dyn Fn(u64) + Send + Sync>,
    ) -> Result<u64, PullError> {
        let shared = {
            let mut downloads = self.inner.downloads.lock().expect("downloads lock");
            if let Some(existing) = downloads.get(&path) {
                existing.clone()
            } else {
                self.inner.downloads_started.fetch_add(1, Ordering::Relaxed);
                let me = self.clone();
                let p = path.clone();
                let fut =
                    async move { me.download(&client, &reference, &layer, &p, progress).await }
                        .boxed()
                        .shared();
                downloads.insert(path.clone(), fut.clone());
                fut
            }
        };
        let result = shared.await;
        self.inner
            .downloads
            .lock()
            .expect("downloads lock")
            .remove(&path);
        result
    }

    async fn download(
        &self,
        client: &Client,
        reference: &Reference,
        layer: &LayerDescriptor,
        path: &Path,
        progress: Arc<dyn Fn(u64) + Send + Sync>,
    ) -> Result<u64, PullError> {
        if let Ok(meta) = tokio::fs::metadata(path).await {
            return Ok(meta.len()); // verified by an earlier download
        }
        let partial = path.with_extension("partial");
        let registry = reference.registry().to_string();
        let descriptor = OciDescriptor {
            media_type: layer.media_type.clone(),
            digest: layer.digest.clone(),
            size: layer.size as i64,
            ..OciDescriptor::default()
        };
        let io = |context: &str, e: std::io::Error| PullError::Io {
            context: format!("{context} {}", partial.display()),
            message: e.to_string(),
        };
        let policy = self.inner.config.retry;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let result: Result<Sha256, PullError> = async {
                let mut offset = match tokio::fs::metadata(&partial).await {
                    Ok(m) => m.len(),
                    Err(_) => 0,
                };
                let mut hasher = Sha256::new();
                if offset > 0 {
                    // Verify ourselves later: re-hash what is already on disk.
                    let existing = tokio::fs::read(&partial).await.map_err(|e| io("reading", e))?;
                    hasher.update(&existing);
                }
                let stream = if offset > 0 && offset < layer.size {
                    match client
                        .pull_blob_stream_partial(reference, &descriptor, offset, None)
                        .await
                        .map_err(|e| classify(&registry, &reference.to_string(), e))?
                    {
                        BlobResponse::Partial(s) => {
                            tracing::info!(digest = %layer.digest, offset, "resuming blob download");
                            s
                        }
                        BlobResponse::Full(s) => {
                            offset = 0;
                            hasher = Sha256::new();
                            s
                        }
                    }
                } else {
                    if offset >= layer.size {
                        offset = 0;
                        hasher = Sha256::new();
                    }
                    client
                        .pull_blob_stream(reference, &descriptor)
                        .await
                        .map_err(|e| classify(&registry, &reference.to_string(), e))?
                };
                let mut file = tokio::fs::OpenOptions::new()
                    .create(true)
                    .write(true)
                    .truncate(offset == 0)
                    .append(offset > 0)
                    .open(&partial)
                    .await
                    .map_err(|e| io("opening", e))?;
                let mut written = offset;
                let mut stream = stream.stream;
                while let Some(chunk) = stream.next().await {
                    let chunk = chunk.map_err(|e| {
                        if e.to_string().contains("Invalid digest") {
                            PullError::DigestMismatch {
                                digest: layer.digest.clone(),
                                actual: e.to_string(),
                            }
                        } else {
                            PullError::Transient {
                                registry: registry.clone(),
                                attempts: 1,
                                message: format!("reading blob {}: {e}", layer.digest),
                            }
                        }
                    })?;
                    hasher.update(&chunk);
                    file.write_all(&chunk).await.map_err(|e| io("writing", e))?;
                    written += chunk.len() as u64;
                    progress(written);
                    if written > layer.size {
                        break;
                    }
                }
                file.flush().await.map_err(|e| io("flushing", e))?;
                file.sync_all().await.map_err(|e| io("syncing", e))?;
                if written < layer.size {
                    return Err(PullError::Transient {
                        registry: registry.clone(),
                        attempts: 1,
                        message: format!("blob {} ended after {written} of {} bytes", layer.digest, layer.size),
                    });
                }
                Ok(hasher)
            }
            .await;
            match result {
                Ok(hasher) => {
                    let actual = hex_sha256(&hasher);
                    if actual != layer.digest {
                        let _ = tokio::fs::remove_file(&partial).await;
                        return Err(PullError::DigestMismatch {
                            digest: layer.digest.clone(),
                            actual,
                        });
                    }
                    tokio::fs::rename(&partial, path)
                        .await
                        .map_err(|e| io("renaming", e))?;
                    return Ok(layer.size);
                }
                Err(e @ PullError::DigestMismatch { .. }) => {
                    let _ = tokio::fs::remove_file(&partial).await;
                    return Err(e);
                }
                Err(e) if is_transient(&e) && attempt < policy.max_attempts => {
                    let delay = backoff_delay(&policy, attempt, rand::random::<f64>());
                    tracing::warn!(digest = %layer.digest, attempt, error = %e, ?delay, "blob download interrupted; will resume");
                    tokio::time::sleep(delay).await;
                }
                Err(PullError::Transient { message, .. }) => {
                    return Err(PullError::Transient {
                        registry,
                        attempts: attempt,
                        message,
                    })
                }
                Err(e) => return Err(e),
            }
        }
    }
}

fn resolved(
    reference: &str,
    digest: String,
    manifest_digest: String,
    image: &OciImageManifest,
) -> ResolvedImage {
    let layers: Vec<LayerDescriptor> = image
        .layers
        .iter()
        .map(|l| LayerDescriptor {
            digest: l.digest.clone(),
            media_type: l.media_type.clone(),
            size: l.size.max(0) as u64,
        })
        .collect();
    ResolvedImage {
        reference: reference.to_string(),
        digest,
        manifest_digest,
        total_layer_bytes: layers.iter().map(|l| l.size).sum(),
        layers,
    }
}

/// The index entry for `platform` (os and architecture must match).
pub fn pick_platform<'a>(
    entries: &'a [ImageIndexEntry],
    platform: &PlatformSpec,
) -> Option<&'a ImageIndexEntry> {
    entries.iter().find(|e| {
        e.platform.as_ref().is_some_and(|p| {
            p.os.to_string() == platform.os && p.architecture.to_string() == platform.architecture
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_caps_and_jitters() {
        let p = RetryPolicy {
            max_attempts: 5,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(1),
        };
        assert_eq!(backoff_delay(&p, 1, 1.0), Duration::from_millis(100));
        assert_eq!(backoff_delay(&p, 3, 1.0), Duration::from_millis(400));
        assert_eq!(backoff_delay(&p, 10, 1.0), Duration::from_secs(1));
        assert_eq!(backoff_delay(&p, 3, 0.5), Duration::from_millis(200));
        assert_eq!(backoff_delay(&p, 3, 0.0), Duration::ZERO);
    }

    #[test]
    fn platform_selection() {
        let entries: Vec<ImageIndexEntry> = serde_json::from_value(serde_json::json!([
            {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": "sha256:aa", "size": 1, "platform": {"os": "linux", "architecture": "amd64"}},
            {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": "sha256:bb", "size": 1, "platform": {"os": "linux", "architecture": "arm64"}}
        ]))
        .unwrap();
        let arm = PlatformSpec {
            os: "linux".into(),
            architecture: "arm64".into(),
        };
        assert_eq!(pick_platform(&entries, &arm).unwrap().digest, "sha256:bb");
        let s390 = PlatformSpec {
            os: "linux".into(),
            architecture: "s390x".into(),
        };
        assert!(pick_platform(&entries, &s390).is_none());
        assert_eq!(PlatformSpec::default().os, "linux");
    }

    #[test]
    fn bad_references_and_ca_bundles_are_clear_errors() {
        assert!(matches!(
            Puller::parse("Not A Ref!!"),
            Err(PullError::BadReference { .. })
        ));
        let p = Puller::new(PullerConfig::default());
        let r = Puller::parse("127.0.0.1:5000/a/b:1").unwrap();
        let opts = RegistryOptions {
            ca_bundle_pem: Some(b"junk".to_vec()),
            ..RegistryOptions::default()
        };
        assert!(matches!(
            p.client(&r, &opts),
            Err(PullError::BadCaBundle(_))
        ));
    }
}
