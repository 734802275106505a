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
use oci_client::client::{Certificate, CertificateEncoding, ClientConfig, ClientProtocol};
use oci_client::manifest::{ImageIndexEntry, OciDescriptor, OciManifest};
use oci_client::{Client, Reference};
use sha2::{Digest, Sha256};
use vmdisk_crds::ImageReference;
use vmdisk_support::Backoff;

mod clients;
mod download;
mod error;
mod manifest;
pub mod peers;
mod reader;
mod start;

pub use self::download::Downloaded;
pub use self::error::PullError;
pub use self::manifest::{pick_platform, LayerDescriptor, PlatformSpec, ResolvedImage};
pub use self::peers::{BlobSink, LayerSources, Peer, PeerClient, PeerConnect};
pub use self::reader::LayerReader;
pub use crate::options::RegistryOptions;

use self::clients::{client_key, Clients};
use self::error::{classify, is_transient};
use self::manifest::resolved;
use self::reader::STREAM_CHUNKS;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    pub max_attempts: u32,
    /// Waits between attempts, with full jitter.
    pub backoff: Backoff,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 6,
            backoff: Backoff::new(Duration::from_millis(250), Duration::from_secs(20)),
        }
    }
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

struct Inner {
    config: PullerConfig,
    permits: Arc<tokio::sync::Semaphore>,
    downloads_started: AtomicU64,
    clients: Clients,
}

#[derive(Clone)]
pub struct Puller {
    inner: Arc<Inner>,
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
                clients: Clients::default(),
            }),
        }
    }

    /// Blob downloads begun (not joined), for tests of sharing.
    pub fn downloads_started(&self) -> u64 {
        self.inner.downloads_started.load(Ordering::Relaxed)
    }

    /// Registry clients built so far (each reused for requests that agree on registry, TLS
    /// settings, platform and credentials), for tests of sharing.
    pub fn clients_built(&self) -> u64 {
        self.inner.clients.built()
    }

    /// oci-client's `Reference`, from vmdisk's own reading of the reference (the one the
    /// CRD's rule and the controller use). `Reference::from_str` would compile oci-spec's
    /// reference regex (Unicode classes repeated 128 times): measured in the agent and the
    /// controller, 4.2 MiB for the compiled program and 2.5 MiB of lazy-DFA cache for each
    /// thread that parsed, kept for the life of the process (a third of an agent's memory).
    fn parse(reference: &str) -> Result<Reference, PullError> {
        let r = ImageReference::parse(reference).map_err(|e| PullError::BadReference {
            reference: reference.to_string(),
            message: e.to_string(),
        })?;
        // Docker Hub's names, as oci-spec's parser spells them.
        let registry = match r.registry.as_str() {
            "index.docker.io" => "docker.io".to_string(),
            _ => r.registry,
        };
        let repository = if registry == "docker.io" && !r.repository.contains('/') {
            format!("library/{}", r.repository)
        } else {
            r.repository
        };
        Ok(match (r.tag, r.digest) {
            (Some(tag), Some(digest)) => {
                Reference::with_tag_and_digest(registry, repository, tag, digest)
            }
            (None, Some(digest)) => Reference::with_digest(registry, repository, digest),
            (tag, None) => {
                Reference::with_tag(registry, repository, tag.unwrap_or_else(|| "latest".into()))
            }
        })
    }

    /// The client for this registry and these options: built once, then reused.
    fn client(
        &self,
        reference: &Reference,
        options: &RegistryOptions,
    ) -> Result<Client, PullError> {
        let key = client_key(reference.registry(), options);
        self.inner
            .clients
            .get_or_build(key, || Self::build_client(reference, options))
    }

    fn build_client(reference: &Reference, options: &RegistryOptions) -> Result<Client, PullError> {
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
                    let delay = policy.backoff.jittered(attempt, rand::random::<f64>());
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

    /// The digest the reference names now (tag → digest), without pulling layers: one
    /// manifest HEAD with `options`' credentials. A reference pinned to a digest is asked too,
    /// so the answer also proves that these credentials may pull `<repository>@<digest>` (a
    /// digest alone proves nothing: anyone may write one down).
    pub async fn resolve_digest(
        &self,
        reference: &str,
        options: &RegistryOptions,
    ) -> Result<String, PullError> {
        let r = Self::parse(reference)?;
        let client = self.client(&r, options)?;
        let registry = r.registry().to_string();
        let digest = self
            .with_retries(&registry, || async {
                client
                    .fetch_manifest_digest(&r, &options.auth)
                    .await
                    .map_err(|e| classify(&registry, reference, e))
            })
            .await?;
        match r.digest() {
            Some(wanted) if wanted != digest => Err(PullError::DigestMismatch {
                digest: wanted.to_string(),
                actual: digest,
            }),
            _ => Ok(digest),
        }
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
    /// request (transient errors retried with backoff and full jitter). `sources` names peers
    /// asked first (see [`peers`]) and a copy of the blob for this node's own peers. The
    /// task's result is the typed outcome; the reader only carries messages.
    pub fn stream_layer(
        &self,
        image: &ResolvedImage,
        layer: &LayerDescriptor,
        options: &RegistryOptions,
        sources: LayerSources,
        progress: Arc<dyn Fn(u64) + Send + Sync>,
    ) -> (
        LayerReader,
        tokio::task::JoinHandle<Result<Downloaded, PullError>>,
    ) {
        let (tx, rx) = tokio::sync::mpsc::channel(STREAM_CHUNKS);
        self.inner.downloads_started.fetch_add(1, Ordering::Relaxed);
        let me = self.clone();
        let image = image.clone();
        let layer = layer.clone();
        let options = options.clone();
        let task = tokio::spawn(async move {
            let result = me
                .download(&image, &layer, &options, sources, &tx, progress)
                .await;
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

    /// What a blob request needs: the image pinned to its platform manifest, this registry's
    /// client (authenticated), and the layer's descriptor, whose digest is checked for shape.
    async fn blob_request(
        &self,
        image: &ResolvedImage,
        layer: &LayerDescriptor,
        options: &RegistryOptions,
    ) -> Result<(Reference, Client, OciDescriptor), PullError> {
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
        let descriptor = OciDescriptor {
            media_type: layer.media_type.clone(),
            digest: layer.digest.clone(),
            size: layer.size as i64,
            ..OciDescriptor::default()
        };
        Ok((reference, client, descriptor))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_read_as_oci_spec_reads_them() {
        const D: &str = "sha256:abababababababababababababababababababababababababababababababab";
        for text in [
            "127.0.0.1:5000/a/b:1".to_string(),
            "quay.io/containerdisks/fedora".to_string(),
            format!("quay.io/containerdisks/fedora@{D}"),
            format!("registry.example.com:5000/disks/a:40@{D}"),
            "docker.io/fedora:40".to_string(),
            "index.docker.io/kubevirt/fedora:40".to_string(),
            "localhost/disks/a:v1.0_rc-2".to_string(),
        ] {
            let ours = Puller::parse(&text).unwrap();
            let theirs: Reference = text.parse().unwrap();
            assert_eq!(ours, theirs, "{text}");
            assert_eq!(ours.whole(), theirs.whole(), "{text}");
        }
        assert_eq!(
            Puller::parse("docker://quay.io/a/b:1").unwrap().whole(),
            "quay.io/a/b:1"
        );
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
        // One TLS client per registry and options, however many requests.
        let _ = rustls::crypto::ring::default_provider().install_default();
        for _ in 0..3 {
            p.client(&r, &RegistryOptions::default()).unwrap();
        }
        assert_eq!(p.clients_built(), 1);
    }
}
