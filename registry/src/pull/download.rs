//! One layer's download: from peers first (when there are any), then the registry, resumed
//! from the same offset whichever source fails, every byte through one SHA-256 that must
//! match the layer's digest before the consumer sees the end of the data.

use std::sync::Arc;

use bytes::Bytes;
use futures::StreamExt;
use oci_client::client::BlobResponse;
use sha2::{Digest, Sha256};

use super::error::{classify, is_transient};
use super::peers::{open, BlobSink, LayerSources, PeerFailure};
use super::{hex_sha256, LayerDescriptor, PullError, Puller, RegistryOptions, ResolvedImage};

/// How long peers that answer 503 (serving as many as they may) are asked again, and how
/// often, before the registry is.
const BUSY_WAIT: std::time::Duration = std::time::Duration::from_secs(120);
const BUSY_AGAIN: std::time::Duration = std::time::Duration::from_millis(500);

/// What one layer's download took, and from where.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Downloaded {
    /// The layer's bytes (its size).
    pub bytes: u64,
    /// Of them, those peers sent.
    pub from_peers: u64,
}

/// The bytes so far: each chunk is checked against the layer's size, hashed, copied and
/// handed to the consumer, in order, whichever source sent it.
struct Received<'a> {
    layer: &'a LayerDescriptor,
    offset: u64,
    hasher: Sha256,
    tx: &'a tokio::sync::mpsc::Sender<Result<Bytes, String>>,
    sink: Option<Box<dyn BlobSink>>,
    progress: Arc<dyn Fn(u64) + Send + Sync>,
}

impl Received<'_> {
    async fn push(&mut self, chunk: Bytes) -> Result<(), PullError> {
        if chunk.is_empty() {
            return Ok(());
        }
        if self.offset + chunk.len() as u64 > self.layer.size {
            return Err(PullError::DigestMismatch {
                digest: self.layer.digest.clone(),
                actual: format!("a blob longer than its {} bytes", self.layer.size),
            });
        }
        self.hasher.update(&chunk);
        if let Some(sink) = self.sink.as_mut() {
            sink.write(self.offset, &chunk);
        }
        self.offset += chunk.len() as u64;
        self.tx.send(Ok(chunk)).await.map_err(|_| PullError::Io {
            context: format!("streaming blob {}", self.layer.digest),
            message: "the consumer stopped reading".into(),
        })?;
        (self.progress)(self.offset);
        Ok(())
    }

    fn complete(&self) -> bool {
        self.offset == self.layer.size
    }

    fn finish(&mut self, verified: bool) {
        if let Some(sink) = self.sink.take() {
            sink.finish(verified);
        }
    }
}

impl Puller {
    pub(super) async fn download(
        &self,
        image: &ResolvedImage,
        layer: &LayerDescriptor,
        options: &RegistryOptions,
        sources: LayerSources,
        tx: &tokio::sync::mpsc::Sender<Result<Bytes, String>>,
        progress: Arc<dyn Fn(u64) + Send + Sync>,
    ) -> Result<Downloaded, PullError> {
        let LayerSources {
            peers,
            client: peer_client,
            sink,
            refresh,
        } = sources;
        let mut received = Received {
            layer,
            offset: 0,
            hasher: Sha256::new(),
            tx,
            sink,
            progress,
        };
        let result = self
            .download_into(
                image,
                layer,
                options,
                peers,
                peer_client,
                refresh,
                &mut received,
            )
            .await;
        received.finish(result.is_ok());
        result
    }

    #[allow(clippy::too_many_arguments)]
    async fn download_into(
        &self,
        image: &ResolvedImage,
        layer: &LayerDescriptor,
        options: &RegistryOptions,
        peers: Vec<super::Peer>,
        peer_client: Option<super::PeerClient>,
        refresh: Option<super::peers::RefreshFn>,
        received: &mut Received<'_>,
    ) -> Result<Downloaded, PullError> {
        // Peers first, each until it fails; whatever they sent stays and the next source
        // goes on from there. While peers are serving as many as they may (503), a fresh
        // list (nodes that got bytes since) or the same busy ones are asked again for a while
        // before the registry is; a peer that failed otherwise is not asked again.
        let mut from_peers = 0;
        let mut contributors = Vec::new();
        if let Some(client) = &peer_client {
            let mut dropped: Vec<String> = Vec::new();
            let mut round = peers;
            let busy_until = tokio::time::Instant::now() + BUSY_WAIT;
            while !round.is_empty() && !received.complete() {
                let mut busy = Vec::new();
                for peer in round {
                    if received.complete() {
                        break;
                    }
                    let before = received.offset;
                    let outcome = async {
                        let mut body = open(client, &peer, &layer.digest, before).await?;
                        while let Some(chunk) = body.next().await? {
                            if let Err(e) = received.push(chunk).await {
                                return Ok(Err(e));
                            }
                        }
                        Ok::<_, PeerFailure>(Ok(()))
                    }
                    .await;
                    let sent = received.offset - before;
                    from_peers += sent;
                    if sent > 0 && !contributors.contains(&peer.node) {
                        contributors.push(peer.node.clone());
                    }
                    match outcome {
                        Ok(Err(e)) => return Err(e),
                        Ok(Ok(())) if received.complete() => {}
                        Ok(Ok(())) => {
                            tracing::info!(digest = %layer.digest, peer = %peer.node, offset = received.offset, "peer ended its answer early; going on elsewhere")
                        }
                        Err(PeerFailure::Refused { status: 503, .. }) => busy.push(peer),
                        Err(e) => {
                            tracing::warn!(digest = %layer.digest, peer = %peer.node, offset = received.offset, error = %e, "peer dropped; going on elsewhere");
                            dropped.push(peer.node.clone());
                        }
                    }
                }
                if busy.is_empty() || tokio::time::Instant::now() >= busy_until {
                    if !busy.is_empty() {
                        tracing::info!(digest = %layer.digest, waited = ?BUSY_WAIT, "peers still busy; going on with the registry");
                    }
                    break;
                }
                tokio::time::sleep(BUSY_AGAIN).await;
                round = match &refresh {
                    Some(refresh) => {
                        let fresh: Vec<_> = refresh()
                            .await
                            .into_iter()
                            .filter(|p| !dropped.contains(&p.node))
                            .collect();
                        if fresh.is_empty() {
                            busy
                        } else {
                            fresh
                        }
                    }
                    None => busy,
                };
            }
        }
        if !received.complete() {
            self.rest_from_registry(image, layer, options, received)
                .await?;
        }
        let actual = hex_sha256(&received.hasher);
        if actual != layer.digest {
            if !contributors.is_empty() {
                return Err(PullError::PeerCorrupt {
                    digest: layer.digest.clone(),
                    peers: contributors,
                });
            }
            return Err(PullError::DigestMismatch {
                digest: layer.digest.clone(),
                actual,
            });
        }
        Ok(Downloaded {
            bytes: received.offset,
            from_peers,
        })
    }

    /// The rest of the blob from its registry, resumed after interruptions.
    async fn rest_from_registry(
        &self,
        image: &ResolvedImage,
        layer: &LayerDescriptor,
        options: &RegistryOptions,
        received: &mut Received<'_>,
    ) -> Result<(), PullError> {
        let (reference, client, descriptor) = self.blob_request(image, layer, options).await?;
        let registry = reference.registry().to_string();
        let policy = self.inner.config.retry;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let offset = received.offset;
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
                    }
                    received.push(chunk).await?;
                }
                if !received.complete() {
                    return Err(PullError::Transient {
                        registry: registry.clone(),
                        attempts: 1,
                        message: format!(
                            "blob {} ended after {} of {} bytes",
                            layer.digest, received.offset, layer.size
                        ),
                    });
                }
                Ok(())
            }
            .await;
            match result {
                Ok(()) => return Ok(()),
                Err(e) if is_transient(&e) && attempt < policy.max_attempts => {
                    let delay = policy.backoff.jittered(attempt, rand::random::<f64>());
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
