//! `Puller`: registry access with oci-client, each blob streamed to its consumer as it
//! arrives.
//!
//! Blobs are neither held in memory nor written to disk: [`Puller::stream_layer`] hands the
//! bytes over a small bounded channel to a reader on a blocking thread (the extraction), hashing
//! them on the way; the reader ends only when the SHA-256 matched, so whatever read it to the
//! end saw exactly the published bytes, and a consumer commits nothing before that. An
//! interrupted download resumes with an HTTP Range request from where it stopped, feeding the
//! same hash and the same reader. Transient failures (connection errors, 5xx) are retried with
//! exponential backoff and full jitter; 401/403, 404 and digest mismatches are not. A per-node
//! semaphore bounds parallel pulls.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use oci_client::client::{
    BlobResponse, Certificate, CertificateEncoding, ClientConfig, ClientProtocol,
};
use oci_client::errors::{OciDistributionError, OciEnvelope, OciErrorCode};
use oci_client::manifest::{ImageIndexEntry, OciDescriptor, OciImageManifest, OciManifest};
use oci_client::{Client, Reference};
use sha2::{Digest, Sha256};
use thiserror::Error;

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

struct Inner {
    config: PullerConfig,
    permits: Arc<tokio::sync::Semaphore>,
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
                permits: Arc::new(tokio::sync::Semaphore::new(
                    config.max_parallel_pulls.max(1),
                )),
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

    /// Holds one of this node's parallel-pull slots until dropped (`--max-parallel-pulls`).
    pub async fn pull_slot(&self) -> tokio::sync::OwnedSemaphorePermit {
        Arc::clone(&self.inner.permits)
            .acquire_owned()
            .await
            .expect("semaphore never closed")
    }

    /// Streams one layer of `image` to the returned reader as it downloads: nothing waits for
    /// the whole blob. The SHA-256 is computed on the way and checked at the end; the reader
    /// fails instead of ending when it does not match, so a consumer that read to the end has
    /// read exactly the published bytes. An interrupted download resumes with an HTTP Range
    /// request (transient errors retried with backoff and full jitter). The task's result is
    /// the typed outcome; the reader only carries messages.
    pub fn stream_layer(
        &self,
        image: &ResolvedImage,
        layer: &LayerDescriptor,
        options: &RegistryOptions,
        progress: Arc<dyn Fn(u64) + Send + Sync>,
    ) -> (LayerReader, tokio::task::JoinHandle<Result<u64, PullError>>) {
        let (tx, rx) = tokio::sync::mpsc::channel(STREAM_CHUNKS);
        self.inner.downloads_started.fetch_add(1, Ordering::Relaxed);
        let me = self.clone();
        let image = image.clone();
        let layer = layer.clone();
        let options = options.clone();
        let task = tokio::spawn(async move {
            let result = me.download(&image, &layer, &options, &tx, progress).await;
            if let Err(e) = &result {
                // The consumer sees the failure where the data would have ended.
                let _ = tx.send(Err(e.to_string())).await;
            }
            result
        });
        (
            LayerReader {
                rx,
                current: Bytes::new(),
                failed: None,
            },
            task,
        )
    }

    async fn download(
        &self,
        image: &ResolvedImage,
        layer: &LayerDescriptor,
        options: &RegistryOptions,
        tx: &tokio::sync::mpsc::Sender<Result<Bytes, String>>,
        progress: Arc<dyn Fn(u64) + Send + Sync>,
    ) -> Result<u64, PullError> {
        let reference =
            Self::parse(&image.reference)?.clone_with_digest(image.manifest_digest.clone());
        let hex = layer
            .digest
            .split_once(':')
            .map(|(_, h)| h)
            .unwrap_or_default();
        if hex.is_empty() || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(PullError::Registry {
                registry: reference.registry().to_string(),
                message: format!("layer digest {:?} is malformed", layer.digest),
            });
        }
        let client = self.client(&reference, options)?;
        client
            .store_auth_if_needed(reference.resolve_registry(), &options.auth)
            .await;
        let registry = reference.registry().to_string();
        let descriptor = OciDescriptor {
            media_type: layer.media_type.clone(),
            digest: layer.digest.clone(),
            size: layer.size as i64,
            ..OciDescriptor::default()
        };
        let closed = || PullError::Io {
            context: format!("streaming blob {}", layer.digest),
            message: "the consumer stopped reading".into(),
        };
        let policy = self.inner.config.retry;
        let mut hasher = Sha256::new();
        let mut offset: u64 = 0;
        let mut attempt = 0;
        loop {
            attempt += 1;
            // Always a Range request: the registry then skips its own digest check of a full
            // response, and a resume is the same request from further on.
            let result: Result<(), PullError> = async {
                let (mut stream, mut skip) = match client
                    .pull_blob_stream_partial(&reference, &descriptor, offset, None)
                    .await
                    .map_err(|e| classify(&registry, &image.reference, e))?
                {
                    BlobResponse::Partial(s) => (s.stream, 0),
                    // The registry ignored the Range: drop what was already passed on.
                    BlobResponse::Full(s) => (s.stream, offset),
                };
                if offset > 0 {
                    tracing::info!(digest = %layer.digest, offset, "resuming blob download");
                }
                while let Some(chunk) = stream.next().await {
                    let mut chunk = chunk.map_err(|e| PullError::Transient {
                        registry: registry.clone(),
                        attempts: 1,
                        message: format!("reading blob {}: {e}", layer.digest),
                    })?;
                    if skip > 0 {
                        let n = skip.min(chunk.len() as u64) as usize;
                        chunk = chunk.slice(n..);
                        skip -= n as u64;
                        if chunk.is_empty() {
                            continue;
                        }
                    }
                    if offset + chunk.len() as u64 > layer.size {
                        return Err(PullError::DigestMismatch {
                            digest: layer.digest.clone(),
                            actual: format!("a blob longer than its {} bytes", layer.size),
                        });
                    }
                    hasher.update(&chunk);
                    offset += chunk.len() as u64;
                    tx.send(Ok(chunk)).await.map_err(|_| closed())?;
                    progress(offset);
                }
                if offset < layer.size {
                    return Err(PullError::Transient {
                        registry: registry.clone(),
                        attempts: 1,
                        message: format!(
                            "blob {} ended after {offset} of {} bytes",
                            layer.digest, layer.size
                        ),
                    });
                }
                Ok(())
            }
            .await;
            match result {
                Ok(()) => {
                    let actual = hex_sha256(&hasher);
                    if actual != layer.digest {
                        return Err(PullError::DigestMismatch {
                            digest: layer.digest.clone(),
                            actual,
                        });
                    }
                    return Ok(offset);
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

/// Chunks in flight between a download and its consumer. hyper hands out chunks of up to
/// ~400 KiB from a fast connection, so this keeps a few MiB in flight at most.
const STREAM_CHUNKS: usize = 8;

/// A layer's bytes for a consumer on a blocking thread (`std::io::Read`). Ends only once the
/// digest checked out; a failed download is an error where the data stops.
pub struct LayerReader {
    rx: tokio::sync::mpsc::Receiver<Result<Bytes, String>>,
    current: Bytes,
    failed: Option<String>,
}

impl std::io::Read for LayerReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            if let Some(message) = &self.failed {
                return Err(std::io::Error::other(message.clone()));
            }
            if !self.current.is_empty() {
                let n = buf.len().min(self.current.len());
                buf[..n].copy_from_slice(&self.current[..n]);
                self.current = self.current.slice(n..);
                return Ok(n);
            }
            match self.rx.blocking_recv() {
                Some(Ok(chunk)) => self.current = chunk,
                Some(Err(message)) => self.failed = Some(message),
                None => return Ok(0),
            }
        }
    }
}

impl LayerReader {
    /// Reads what is left (a consumer may stop before the compressed stream's trailer), so the
    /// download can finish and its digest be checked.
    pub fn drain(&mut self) -> std::io::Result<u64> {
        std::io::copy(self, &mut std::io::sink())
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
