//! The image catalog: what the webhook knows about VMDiskImages and VMDiskImage-backed PVCs,
//! held in memory so admission never waits on an API call.
//!
//! Two sources: [`kube::KubeCatalog`] (reflectors against the API server) and
//! [`file::FileCatalog`] (a watched directory of YAML, to run and test without a cluster).

pub mod file;
pub mod kube;

use std::collections::HashMap;
use std::sync::Arc;

use futures::future::BoxFuture;

use k8s_openapi::api::core::v1::PersistentVolumeClaim;
use vmdisk_crds::{VMDiskImage, IMAGE_ANNOTATION, IMAGE_LABEL};

use crate::mutate::pvc::image_claim;
use crate::mutate::ImageLookup;

/// What asking the source about claims the catalog did not know found.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ClaimFetch {
    /// VMDiskImage-backed claims, now known to the catalog.
    pub found: usize,
    /// Claims that do not exist or are not VMDiskImage-backed.
    pub absent: usize,
    /// Lookups that failed or timed out.
    pub failed: usize,
}

/// A catalog the server can ask at admission time.
pub trait ImageCatalog: ImageLookup + Send + Sync + 'static {
    /// True once the initial contents are loaded: `/readyz` waits for it, because admitting
    /// with an empty catalog would warn about images that exist.
    fn is_synced(&self) -> bool;

    /// Asks the source about `(namespace, claim)` pairs the catalog did not know, for the
    /// claims a watch has not delivered yet. A catalog that is its own source asks nothing.
    fn fetch_claims<'a>(&'a self, claims: &'a [(String, String)]) -> BoxFuture<'a, ClaimFetch> {
        let _ = claims;
        Box::pin(std::future::ready(ClaimFetch::default()))
    }
}

/// The image a PVC is filled from: the webhook's label first, then its data source or
/// annotation (for PVCs admitted before the webhook ran, or described in a catalog file).
pub fn claim_image_of(pvc: &PersistentVolumeClaim) -> Option<String> {
    if let Some(name) = pvc
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(IMAGE_LABEL))
    {
        return Some(name.clone());
    }
    let annotation = pvc
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(IMAGE_ANNOTATION))
        .map(String::as_str);
    image_claim(pvc.spec.as_ref(), annotation)
        .0
        .map(|c| c.image_name().to_string())
}

/// Values by namespace, then name: looked up with borrowed names, so an admission's lookups
/// allocate nothing.
#[derive(Debug, Clone)]
struct ByNamespace<V> {
    namespaces: HashMap<String, HashMap<String, V>>,
    len: usize,
}

impl<V> Default for ByNamespace<V> {
    fn default() -> Self {
        Self {
            namespaces: HashMap::new(),
            len: 0,
        }
    }
}

impl<V> ByNamespace<V> {
    fn insert(&mut self, namespace: String, name: String, value: V) {
        let names = self.namespaces.entry(namespace).or_default();
        if names.insert(name, value).is_none() {
            self.len += 1;
        }
    }

    fn get(&self, namespace: &str, name: &str) -> Option<&V> {
        self.namespaces.get(namespace)?.get(name)
    }
}

/// An immutable view of the catalog, swapped whole on every change.
#[derive(Debug, Default, Clone)]
pub struct CatalogSnapshot {
    images: ByNamespace<Arc<VMDiskImage>>,
    claims: ByNamespace<String>,
}

impl CatalogSnapshot {
    pub fn insert_image(&mut self, image: VMDiskImage) {
        let namespace = image.metadata.namespace.clone().unwrap_or_default();
        let name = image.metadata.name.clone().unwrap_or_default();
        self.images.insert(namespace, name, Arc::new(image));
    }

    /// Records a PVC if it is VMDiskImage-backed; returns whether it was.
    pub fn insert_claim(&mut self, pvc: &PersistentVolumeClaim) -> bool {
        let Some(image) = claim_image_of(pvc) else {
            return false;
        };
        let namespace = pvc.metadata.namespace.clone().unwrap_or_default();
        let name = pvc.metadata.name.clone().unwrap_or_default();
        self.claims.insert(namespace, name, image);
        true
    }

    pub fn image_count(&self) -> usize {
        self.images.len
    }

    pub fn claim_count(&self) -> usize {
        self.claims.len
    }
}

impl ImageLookup for CatalogSnapshot {
    fn image(&self, namespace: &str, name: &str) -> Option<Arc<VMDiskImage>> {
        self.images.get(namespace, name).cloned()
    }

    fn claim_image(&self, namespace: &str, claim: &str) -> Option<String> {
        self.claims.get(namespace, claim).cloned()
    }
}
