//! The first bytes of a layer, for looking at what it holds without pulling it: one Range
//! request. A prefix has no digest to check, so these bytes only inform (the image
//! controller reads a disk's size from them); nothing is served from them.

use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use oci_client::client::BlobResponse;

use super::error::classify;
use super::{LayerDescriptor, PullError, Puller, ResolvedImage};
use crate::options::RegistryOptions;

impl Puller {
    /// Up to `max` bytes from the start of `layer` (fewer when it is shorter). A registry
    /// that ignores the Range is read only as far as `max`.
    pub async fn layer_start(
        &self,
        image: &ResolvedImage,
        layer: &LayerDescriptor,
        options: &RegistryOptions,
        max: u64,
    ) -> Result<Bytes, PullError> {
        let (reference, client, descriptor) = self.blob_request(image, layer, options).await?;
        let registry = reference.registry().to_string();
        let wanted = max.min(layer.size);
        let mut stream = match self
            .with_retries(&registry, || async {
                client
                    .pull_blob_stream_partial(&reference, &descriptor, 0, Some(wanted))
                    .await
                    .map_err(|e| classify(&registry, &image.reference, e))
            })
            .await?
        {
            BlobResponse::Partial(s) | BlobResponse::Full(s) => s.stream,
        };
        let mut start = BytesMut::new();
        while (start.len() as u64) < wanted {
            let Some(chunk) = stream.next().await else {
                break;
            };
            let chunk = chunk.map_err(|e| PullError::Transient {
                registry: registry.clone(),
                attempts: 1,
                message: format!("reading blob {}: {e}", layer.digest),
            })?;
            let room = (wanted - start.len() as u64) as usize;
            start.extend_from_slice(&chunk[..chunk.len().min(room)]);
        }
        Ok(start.freeze())
    }
}
