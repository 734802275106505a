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
use vmdisk_crds::{AccessScope, ApiAccess, VMDiskImage, IMAGE_LABEL};

use super::ImageCatalog;
use crate::mutate::ImageLookup;

/// What the catalog asks of the API server: it watches, never writes.
pub const API_ACCESS: &[ApiAccess] = &[
    ApiAccess::new(
        "vmdisk.io",
        "vmdiskimages",
        &["list", "watch"],
        AccessScope::Cluster,
    ),
    // Metadata only (PartialObjectMetadata), still authorized as the resource itself.
    ApiAccess::new(
        "",
        "persistentvolumeclaims",
        &["list", "watch"],
        AccessScope::Cluster,
    ),
];

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

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use kube::client::Body;
    use serde_json::json;
    use std::time::Duration;

    type Request = http::Request<Body>;
    type Response = http::Response<Body>;

    fn list(api_version: &str, kind: &str, items: serde_json::Value) -> Response {
        let body = json!({
            "apiVersion": api_version, "kind": kind,
            "metadata": {"resourceVersion": "10"}, "items": items,
        });
        http::Response::builder()
            .body(Body::from(serde_json::to_vec(&body).unwrap()))
            .unwrap()
    }

    /// Plays the API server: answers the initial lists, and holds watches open with no events.
    async fn apiserver(
        mut handle: tower_test::mock::Handle<Request, Response>,
        seen: tokio::sync::mpsc::UnboundedSender<String>,
    ) {
        let mut held = Vec::new();
        while let Some((request, send)) = handle.next_request().await {
            let uri = request.uri().to_string();
            let _ = seen.send(uri.clone());
            if uri.contains("watch=true") {
                // A watch with no events yet: never answer, keep it pending.
                held.push(send);
                continue;
            }
            let response = if uri.starts_with("/apis/vmdisk.io/v1alpha1/vmdiskimages") {
                list(
                    "vmdisk.io/v1alpha1",
                    "VMDiskImageList",
                    json!([{
                        "apiVersion": "vmdisk.io/v1alpha1", "kind": "VMDiskImage",
                        "metadata": {"name": "fedora", "namespace": "vms", "resourceVersion": "5"},
                        "spec": {"source": {"registry": {"url": "quay.io/containerdisks/fedora:40"}}},
                        "status": {"digest": "sha256:abc"}
                    }]),
                )
            } else if uri.starts_with("/api/v1/persistentvolumeclaims") {
                assert!(uri.contains("labelSelector=vmdisk.io%2Fimage"), "{uri}");
                let _ = request.into_body().collect().await;
                list(
                    "meta.k8s.io/v1",
                    "PartialObjectMetadataList",
                    json!([{
                        "apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata",
                        "metadata": {"name": "root", "namespace": "vms", "resourceVersion": "6",
                                     "labels": {"vmdisk.io/image": "fedora"}}
                    }]),
                )
            } else {
                panic!("unexpected request {uri}");
            };
            send.send_response(response);
        }
    }

    #[tokio::test]
    async fn reflectors_fill_the_catalog_from_list_and_report_synced() {
        let (service, handle) = tower_test::mock::pair::<Request, Response>();
        let (seen_tx, mut seen) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(apiserver(handle, seen_tx));
        let client = kube::Client::new(service, "default");
        let (catalog, tasks) = KubeCatalog::start(client);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !catalog.is_synced() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "catalog never synced"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(
            catalog.image("vms", "fedora").unwrap().digest(),
            Some("sha256:abc")
        );
        assert!(catalog.image("other", "fedora").is_none());
        assert_eq!(
            catalog.claim_image("vms", "root").as_deref(),
            Some("fedora")
        );
        assert_eq!(catalog.claim_image("vms", "nope"), None);
        let mut uris = Vec::new();
        while let Ok(u) = seen.try_recv() {
            uris.push(u);
        }
        assert!(
            uris.iter().all(|u| !u.contains("/namespaces/")),
            "cluster-wide lists expected: {uris:?}"
        );
        for t in tasks {
            t.abort();
        }
    }
}
