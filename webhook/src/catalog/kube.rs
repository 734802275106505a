//! `KubeCatalog`: reflectors on VMDiskImages (all namespaces) and on the metadata of PVCs the
//! webhook labelled `vmdisk.io/image`, so admission reads memory, never the API server.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::core::v1::PersistentVolumeClaim;
use kube::core::PartialObjectMeta;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client};
use vmdisk_crds::{VMDiskImage, IMAGE_LABEL};

use super::ImageCatalog;
use crate::mutate::ImageLookup;

pub struct KubeCatalog {
    images: Store<VMDiskImage>,
    claims: Store<PartialObjectMeta<PersistentVolumeClaim>>,
    synced: AtomicBool,
}

impl KubeCatalog {
    /// Starts both reflectors on the current runtime; they run (with kube's default backoff on
    /// errors) until the returned tasks are aborted.
    pub fn start(client: Client) -> (Arc<Self>, Vec<tokio::task::JoinHandle<()>>) {
        let (images, images_writer) = reflector::store::<VMDiskImage>();
        let (claims, claims_writer) =
            reflector::store::<PartialObjectMeta<PersistentVolumeClaim>>();
        let catalog = Arc::new(Self {
            images,
            claims,
            synced: AtomicBool::new(false),
        });

        let image_stream = reflector::reflector(
            images_writer,
            watcher(
                Api::<VMDiskImage>::all(client.clone()),
                watcher::Config::default(),
            ),
        )
        .default_backoff()
        .touched_objects();
        let claim_stream = reflector::reflector(
            claims_writer,
            watcher(
                Api::<PartialObjectMeta<PersistentVolumeClaim>>::all(client),
                watcher::Config::default().labels(IMAGE_LABEL),
            ),
        )
        .default_backoff()
        .touched_objects();

        let mut tasks = vec![
            tokio::spawn(image_stream.for_each(|event| async move {
                if let Err(e) = event {
                    tracing::warn!(error = %e, "VMDiskImage watch error; retrying");
                }
            })),
            tokio::spawn(claim_stream.for_each(|event| async move {
                if let Err(e) = event {
                    tracing::warn!(error = %e, "PVC watch error; retrying");
                }
            })),
        ];
        let me = Arc::clone(&catalog);
        tasks.push(tokio::spawn(async move {
            let images_ready = me.images.wait_until_ready().await;
            let claims_ready = me.claims.wait_until_ready().await;
            if images_ready.is_ok() && claims_ready.is_ok() {
                me.synced.store(true, Ordering::Release);
                tracing::info!(
                    images = me.images.state().len(),
                    claims = me.claims.state().len(),
                    "catalog synced from the API server"
                );
            }
        }));
        (catalog, tasks)
    }
}

impl ImageLookup for KubeCatalog {
    fn image(&self, namespace: &str, name: &str) -> Option<Arc<VMDiskImage>> {
        self.images.get(&ObjectRef::new(name).within(namespace))
    }

    fn claim_image(&self, namespace: &str, claim: &str) -> Option<String> {
        self.claims
            .get(&ObjectRef::new(claim).within(namespace))?
            .metadata
            .labels
            .as_ref()?
            .get(IMAGE_LABEL)
            .cloned()
    }
}

impl ImageCatalog for KubeCatalog {
    fn is_synced(&self) -> bool {
        self.synced.load(Ordering::Acquire)
    }
}
