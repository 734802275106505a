//! `KubeCatalog`: reflectors on VMDiskImages (all namespaces) and on the metadata of PVCs the
//! webhook labelled `vmdisk.io/image`, so admission reads memory. The one exception: a pod
//! naming a claim the watch has not delivered yet (created right after its PVC) costs one GET
//! of that claim's metadata, and only in namespaces that hold VMDiskImages.

use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use futures::StreamExt;
use k8s_openapi::api::core::v1::PersistentVolumeClaim;
use kube::core::PartialObjectMeta;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client, ResourceExt};
use lru::LruCache;
use vmdisk_crds::{AccessScope, ApiAccess, VMDiskImage, IMAGE_LABEL};

use super::{ClaimFetch, ImageCatalog};
use crate::mutate::ImageLookup;

/// What the catalog asks of the API server: it watches, never writes.
pub const API_ACCESS: &[ApiAccess] = &[
    ApiAccess::WATCH_VMDISKIMAGES,
    // Metadata only (PartialObjectMetadata), still authorized as the resource itself.
    ApiAccess::new(
        "",
        "persistentvolumeclaims",
        &["get", "list", "watch"],
        AccessScope::Cluster,
    ),
];

/// A claim lookup must leave room in the pod webhook's 2 s timeout for the answer.
pub const CLAIM_FETCH_TIMEOUT: Duration = Duration::from_secs(1);

/// How long a fetched claim is trusted: by then the watch has delivered it, and a claim deleted
/// and created again under the same name must not keep its old image.
const FETCHED_CLAIM_TTL: Duration = Duration::from_secs(60);

const FETCHED_CLAIMS_CAPACITY: NonZeroUsize = NonZeroUsize::new(1024).unwrap();

type ClaimKey = (String, String);

pub struct KubeCatalog {
    client: Client,
    images: Store<VMDiskImage>,
    claims: Store<PartialObjectMeta<PersistentVolumeClaim>>,
    /// Claims fetched at admission time, ahead of the watch: image name and when fetched.
    fetched: Mutex<LruCache<ClaimKey, (String, Instant)>>,
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
            client: client.clone(),
            images,
            claims,
            fetched: Mutex::new(LruCache::new(FETCHED_CLAIMS_CAPACITY)),
            synced: AtomicBool::new(false),
        });

        let image_stream = reflector::reflector(
            images_writer,
            watcher(
                Api::<VMDiskImage>::all(client.clone()),
                watcher::Config::default(),
            )
            .modify(VMDiskImage::strip_for_catalog),
        )
        .default_backoff()
        .touched_objects();
        let claim_stream = reflector::reflector(
            claims_writer,
            watcher(
                Api::<PartialObjectMeta<PersistentVolumeClaim>>::all(client),
                watcher::Config::default().labels(IMAGE_LABEL),
            )
            .modify(|claim| {
                // The kind and version, repeated on each of 10,000 claims, are never read.
                claim.types = None;
                vmdisk_crds::strip_metadata_to(&mut claim.metadata, &[IMAGE_LABEL])
            }),
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

    fn namespace_has_images(&self, namespace: &str) -> bool {
        self.images
            .find(|image| image.metadata.namespace.as_deref() == Some(namespace))
            .is_some()
    }

    fn fetched_claim(&self, namespace: &str, claim: &str) -> Option<String> {
        let mut fetched = self.fetched.lock().unwrap_or_else(|e| e.into_inner());
        let key = (namespace.to_string(), claim.to_string());
        match fetched.get(&key) {
            Some((image, at)) if at.elapsed() < FETCHED_CLAIM_TTL => Some(image.clone()),
            Some(_) => {
                fetched.pop(&key);
                None
            }
            None => None,
        }
    }

    /// One claim's image label, read from the API server.
    async fn fetch_claim(&self, namespace: &str, claim: &str) -> Result<Option<String>, String> {
        let api = Api::<PersistentVolumeClaim>::namespaced(self.client.clone(), namespace);
        match tokio::time::timeout(CLAIM_FETCH_TIMEOUT, api.get_metadata_opt(claim)).await {
            Err(_) => Err(format!("no answer within {CLAIM_FETCH_TIMEOUT:?}")),
            Ok(Err(e)) => Err(e.to_string()),
            Ok(Ok(meta)) => Ok(meta.and_then(|m| m.labels().get(IMAGE_LABEL).cloned())),
        }
    }
}

impl ImageLookup for KubeCatalog {
    fn image(&self, namespace: &str, name: &str) -> Option<Arc<VMDiskImage>> {
        self.images.get(&ObjectRef::new(name).within(namespace))
    }

    fn claim_image(&self, namespace: &str, claim: &str) -> Option<String> {
        match self.claims.get(&ObjectRef::new(claim).within(namespace)) {
            Some(meta) => meta.labels().get(IMAGE_LABEL).cloned(),
            None => self.fetched_claim(namespace, claim),
        }
    }
}

impl ImageCatalog for KubeCatalog {
    fn is_synced(&self) -> bool {
        self.synced.load(Ordering::Acquire)
    }

    fn fetch_claims<'a>(&'a self, claims: &'a [(String, String)]) -> BoxFuture<'a, ClaimFetch> {
        Box::pin(async move {
            // Without an image in the namespace no claim there can be VMDiskImage-backed: pods
            // in namespaces that do not use vmdisk never wait on the API server.
            let asked = claims
                .iter()
                .filter(|(namespace, _)| self.namespace_has_images(namespace))
                .map(|(namespace, claim)| async move {
                    (namespace, claim, self.fetch_claim(namespace, claim).await)
                });
            let mut out = ClaimFetch::default();
            for (namespace, claim, answer) in futures::future::join_all(asked).await {
                match answer {
                    Ok(Some(image)) => {
                        tracing::debug!(%namespace, %claim, %image, "claim fetched ahead of the watch");
                        self.fetched
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .put((namespace.clone(), claim.clone()), (image, Instant::now()));
                        out.found += 1;
                    }
                    Ok(None) => out.absent += 1,
                    Err(error) => {
                        tracing::warn!(%namespace, %claim, %error, "claim lookup failed; the pod gets no node preference for it");
                        out.failed += 1;
                    }
                }
            }
            out
        })
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
            let response = if let Some(claim) =
                uri.strip_prefix("/api/v1/namespaces/vms/persistentvolumeclaims/")
            {
                let meta = |labels: serde_json::Value| {
                    let body = json!({
                        "apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata",
                        "metadata": {"name": claim, "namespace": "vms", "resourceVersion": "7",
                                     "labels": labels}
                    });
                    http::Response::builder()
                        .body(Body::from(serde_json::to_vec(&body).unwrap()))
                        .unwrap()
                };
                match claim {
                    "late" => meta(json!({"vmdisk.io/image": "fedora"})),
                    "plain" => meta(json!({"app": "db"})),
                    "slow" => {
                        held.push(send);
                        continue;
                    }
                    _ => {
                        let status = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                            "message": format!("persistentvolumeclaims \"{claim}\" not found"),
                                            "reason": "NotFound", "code": 404});
                        http::Response::builder()
                            .status(404)
                            .body(Body::from(serde_json::to_vec(&status).unwrap()))
                            .unwrap()
                    }
                }
            } else if uri.starts_with("/apis/vmdisk.io/v1alpha1/vmdiskimages") {
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

    type Seen = tokio::sync::mpsc::UnboundedReceiver<String>;

    async fn synced_catalog() -> (Arc<KubeCatalog>, Vec<tokio::task::JoinHandle<()>>, Seen) {
        let (service, handle) = tower_test::mock::pair::<Request, Response>();
        let (seen_tx, seen) = tokio::sync::mpsc::unbounded_channel();
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
        (catalog, tasks, seen)
    }

    fn drain(seen: &mut Seen) -> Vec<String> {
        let mut uris = Vec::new();
        while let Ok(u) = seen.try_recv() {
            uris.push(u);
        }
        uris
    }

    #[tokio::test]
    async fn reflectors_fill_the_catalog_from_list_and_report_synced() {
        let (catalog, tasks, mut seen) = synced_catalog().await;
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
        let uris = drain(&mut seen);
        assert!(
            uris.iter().all(|u| !u.contains("/namespaces/")),
            "cluster-wide lists expected: {uris:?}"
        );
        for t in tasks {
            t.abort();
        }
    }

    #[tokio::test]
    async fn claims_the_watch_has_not_delivered_are_fetched_only_where_images_live() {
        let (catalog, tasks, mut seen) = synced_catalog().await;
        drain(&mut seen);
        assert_eq!(catalog.claim_image("vms", "late"), None);
        let asked: Vec<(String, String)> = [
            ("vms", "late"),
            ("vms", "plain"),
            ("vms", "gone"),
            ("vms", "slow"),
            ("no-images-here", "late"),
        ]
        .iter()
        .map(|(n, c)| (n.to_string(), c.to_string()))
        .collect();
        let fetched = catalog.fetch_claims(&asked).await;
        assert_eq!(
            fetched,
            ClaimFetch {
                found: 1,
                absent: 2,
                failed: 1
            }
        );
        assert_eq!(
            catalog.claim_image("vms", "late").as_deref(),
            Some("fedora")
        );
        assert_eq!(catalog.claim_image("vms", "plain"), None);
        let mut uris = drain(&mut seen);
        uris.sort();
        assert_eq!(
            uris,
            ["gone", "late", "plain", "slow"]
                .map(|c| format!("/api/v1/namespaces/vms/persistentvolumeclaims/{c}")),
            "one GET per claim, none in a namespace without images"
        );
        for t in tasks {
            t.abort();
        }
    }
}
