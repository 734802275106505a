//! The image controller: the only writer of VMDiskImage status.
//!
//! It resolves each image's reference to a digest once for the whole cluster (agents pull by
//! that digest, so every node caches the same bits), re-resolves moving tags on the image's
//! `pollInterval`, keeps the agents' copy of the image's pull credentials current
//! ([`crate::credentials`]), and aggregates source format, virtual size and the warm-node
//! count from the NodeDiskCache objects the agents publish. [`resolve`] and [`status`] are
//! the pure decisions; [`mod@reconcile`] does the I/O; [`run`] wires the watches.

#[cfg(test)]
mod convergence;
pub mod pull;
pub mod reconcile;
pub mod resolve;
pub mod status;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use crate::events::Recorder;
use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use kube::runtime::events::Reporter;
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{controller, watcher};
use kube::{Api, Client, ResourceExt};
use vmdisk_crds::{
    AccessScope, ApiAccess, CacheEntryState, DiskFormat, NodeDiskCache, PullMethod, VMDiskImage,
    IMAGE_UID_LABEL,
};

use crate::credentials::{self, CredentialsCopier};
use crate::node_pull::NodeRuntimes;
use crate::tasks::{Reflected, TaskGuard};
pub use reconcile::{error_policy, reconcile, Context, ImageError};
pub use resolve::{needs_resolve, DigestResolver, RegistryResolver};
pub use status::{aggregate_status, ResolveOutcome};

/// What the image controller asks of the API server (besides [`credentials::API_ACCESS`]).
pub const API_ACCESS: &[ApiAccess] = &[
    ApiAccess::WATCH_VMDISKIMAGES,
    ApiAccess::new(
        "vmdisk.io",
        "vmdiskimages/status",
        &["patch"],
        AccessScope::Cluster,
    ),
    ApiAccess::new(
        "vmdisk.io",
        "nodediskcaches",
        &["list", "watch"],
        AccessScope::Cluster,
    ),
    // Events on VMDiskImages (Resolved, ResolveFailed, PullSecretError).
    ApiAccess::record_events(AccessScope::Cluster),
];

/// Images reconciled at once. Unbounded, 10,000 images behind an unreachable registry opened
/// 10,000 connections together: the process ran out of file descriptors, so the same image
/// failed with changing messages (each one a status write and an Event) and the API server's
/// own connections failed too.
const CONCURRENCY: u16 = 64;

/// Changes to one image arriving together (300 nodes reporting it warm within a second) make
/// one reconcile and one status write, not one each.
const STATUS_DEBOUNCE: Duration = Duration::from_millis(200);

/// How often orphaned credentials copies are looked for.
const COPY_SWEEP: Duration = Duration::from_secs(10);

/// What the image controller knows of pull methods: the cluster's default and where the node's
/// runtime mounts images, for the `NodePull` condition.
#[derive(Clone)]
pub struct ImageSettings {
    pub runtimes: NodeRuntimes,
    pub default_pull_method: PullMethod,
    /// Placement runs with the image controller; its metrics.
    pub placement: crate::metrics::PlacementMetrics,
    /// How the images' nodes pulled them.
    pub metrics: crate::metrics::ImageMetrics,
}

/// Runs the image controller until the stop (reconciles in flight finish) or until the future
/// is dropped.
pub async fn run(
    client: Client,
    images: &Reflected<VMDiskImage>,
    credentials_namespace: &str,
    identity: &str,
    settings: ImageSettings,
    stop: vmdisk_support::process::Stop,
) {
    let caches = Reflected::spawn(
        Api::<NodeDiskCache>::all(client.clone()),
        watcher::Config::default(),
    );
    let copies = Reflected::spawn(
        Api::<Secret>::namespaced(client.clone(), credentials_namespace),
        watcher::Config::default().labels(IMAGE_UID_LABEL),
    );
    let copier = CredentialsCopier::new(client.clone(), credentials_namespace);
    let runtimes = settings.runtimes.clone();
    let placement_metrics = settings.placement.clone();
    let image_metrics = settings.metrics.clone();
    let ctx = Arc::new(Context {
        metrics: Some(image_metrics.clone()),
        pull_methods: Some(settings),
        ..Context::new(
            client.clone(),
            Arc::new(RegistryResolver::default()),
            caches.store(),
            copies.store(),
            copier.clone(),
            Recorder::new(
                client.clone(),
                Reporter {
                    controller: "vmdisk-image-controller".into(),
                    instance: Some(identity.to_string()),
                },
            ),
        )
    });
    // Status aggregates the node caches: an empty store would report no warm nodes.
    if crate::tasks::ready(&ctx.caches).await.is_err()
        || crate::tasks::ready(&runtimes.store()).await.is_err()
    {
        tracing::error!("the NodeDiskCache or Node watch stopped before its first list; the image controller is not started");
        return;
    }
    let Some(controller) = images.controller() else {
        tracing::error!("the VMDiskImage watch already drives a controller; the image controller is not started");
        return;
    };
    let controller = controller
        .graceful_shutdown_on(stop.cancelled_owned())
        .with_config(
            controller::Config::default()
                .concurrency(CONCURRENCY)
                .debounce(STATUS_DEBOUNCE),
        );
    let placement_wake = Arc::new(tokio::sync::Notify::new());
    let wake = Arc::clone(&placement_wake);
    // Placement reads an image's digest, format, source and cache policy: it is woken when
    // one of these changes, not by every status write.
    let placed = LastSeen::default();
    let stored = images.store();
    images.on_change(move |image: &VMDiskImage| {
        let uid = image.uid().unwrap_or_default();
        let now = stored
            .get(&ObjectRef::from_obj(image))
            .map(|i| placement_fingerprint(&i));
        if placed.replace(uid, now) != now {
            wake.notify_one();
        }
    });
    let image_store = controller.store();
    // The per-image series are this store's while it runs: not a former leader's.
    image_metrics.watch(Some(image_store.clone()));
    let _unwatch = Unwatch(image_metrics);

    // Copies of deleted images (or of images that dropped their pull secret) go away.
    let sweep_images = image_store.clone();
    let copies = copies.store();
    let sweep_ctx = Arc::clone(&ctx);
    let _sweeper = TaskGuard::spawn(async move {
        loop {
            tokio::time::sleep(COPY_SWEEP).await;
            if crate::tasks::ready(&copies).await.is_err()
                || crate::tasks::ready(&sweep_images).await.is_err()
            {
                continue;
            }
            // Backoff records of deleted images go too.
            sweep_ctx
                .resolve_failures
                .retain(|image| sweep_images.get(image).is_some());
            sweep_ctx
                .errors
                .retain(|image| sweep_images.get(image).is_some());
            for name in credentials::orphaned_copies(&copies.state(), &sweep_images.state()) {
                match copier.delete(&name).await {
                    Ok(()) => {
                        tracing::info!(secret = %name, "deleted the credentials copy of a removed image")
                    }
                    Err(e) => {
                        tracing::warn!(secret = %name, error = %e, "cannot delete a credentials copy")
                    }
                }
            }
        }
    });

    // Which node holds which image: every agent's list, kept current.
    runtimes.on_labels_change(Arc::clone(&placement_wake));
    let wake = Arc::clone(&placement_wake);
    let lists = caches.store();
    let known_lists = LastSeen::default();
    caches.on_change(move |cache: &NodeDiskCache| {
        // A NodeDiskCache appearing (an agent started), going, or its list changed by
        // someone else; not the agents' status reports.
        let now = lists
            .get(&ObjectRef::from_obj(cache))
            .map(|c| list_fingerprint(&c));
        if known_lists.replace(cache.name_any(), now) != now {
            wake.notify_one();
        }
    });
    let _placement = TaskGuard::spawn(
        crate::placement::Placement {
            client: client.clone(),
            images: image_store.clone(),
            nodes: runtimes.store(),
            caches: caches.store(),
            recorder: ctx.recorder.clone(),
            wake: placement_wake,
            metrics: placement_metrics,
        }
        .run(),
    );

    let node_pull_images = image_store.clone();
    // A node's cache changed: re-aggregate the images whose ready entries on it, or whose
    // place in its list, changed (not on progress reports: with 300 nodes, each report would
    // wake every image).
    let known_ready = LastSeen::default();
    let cache_store = caches.store();
    let cache_changes = caches.trigger(move |cache: &NodeDiskCache| {
        let now = cache_store
            .get(&ObjectRef::from_obj(cache))
            .map(|c| ready_entries(&c))
            .unwrap_or_default();
        let before = known_ready
            .replace(cache.name_any(), (!now.is_empty()).then(|| now.clone()))
            .unwrap_or_default();
        let changed: HashSet<&str> = before
            .symmetric_difference(&now)
            .map(|e| e.0.as_str())
            .collect();
        if changed.is_empty() {
            return Vec::new();
        }
        image_store
            .state()
            .into_iter()
            .filter(|i| i.digest().is_some_and(|d| changed.contains(d)))
            .map(|i| ObjectRef::from_obj(&*i))
            .collect::<Vec<_>>()
    });
    // A node starting or stopping to mount image volumes: the images its runtime pulls.
    let default_method = ctx
        .pull_methods
        .as_ref()
        .map(|s| s.default_pull_method)
        .unwrap_or_default();
    let node_changes = runtimes.on_change(move || {
        node_pull_images
            .state()
            .into_iter()
            .filter(|i| {
                i.spec.source.registry.pull_method.unwrap_or(default_method) != PullMethod::Pod
            })
            .map(|i| ObjectRef::from_obj(&*i))
            .collect::<Vec<_>>()
    });
    controller
        .reconcile_on(cache_changes)
        .reconcile_on(node_changes)
        .run(reconcile, error_policy, ctx)
        .for_each(|result| {
            if let Err(e) = result {
                tracing::debug!(error = %e, "image controller event");
            }
            futures::future::ready(())
        })
        .await;
}

/// Stops the per-image metrics reading the image store when the image controller stops or is
/// dropped.
struct Unwatch(crate::metrics::ImageMetrics);

impl Drop for Unwatch {
    fn drop(&mut self) {
        self.0.watch(None);
    }
}

/// The last value seen of each object (by name or uid), to tell a change from a repeat.
struct LastSeen<V>(std::sync::Mutex<HashMap<String, V>>);

impl<V> Default for LastSeen<V> {
    fn default() -> Self {
        Self(Default::default())
    }
}

impl<V> LastSeen<V> {
    /// Records `now` for `key` (`None`: the object is gone) and returns what was seen before.
    fn replace(&self, key: String, now: Option<V>) -> Option<V> {
        let mut seen = self.0.lock().expect("last seen lock");
        match now {
            Some(v) => seen.insert(key, v),
            None => seen.remove(&key),
        }
    }
}

/// What of a node's cache the images' status reads: the digests its list asks for (`None`),
/// and its Ready entries (digest, format, and what the node read of the disk).
type ReadyEntries = BTreeSet<(String, Option<(DiskFormat, Option<String>, Option<u64>)>)>;

fn ready_entries(cache: &NodeDiskCache) -> ReadyEntries {
    let listed = cache.spec.images.iter().map(|i| (i.digest.clone(), None));
    let ready = cache
        .status
        .iter()
        .flat_map(|s| s.entries.iter())
        .filter(|e| e.state == CacheEntryState::Ready)
        .map(|e| {
            (
                e.digest.clone(),
                Some((e.format, e.source_format.clone(), e.virtual_size)),
            )
        });
    listed.chain(ready).collect()
}

/// A hash of a NodeDiskCache's list, to tell its changes from the agent's status reports.
fn list_fingerprint(cache: &NodeDiskCache) -> u64 {
    fingerprint(&cache.spec)
}

/// A hash of what placement reads of an image.
fn placement_fingerprint(image: &VMDiskImage) -> u64 {
    fingerprint(&(
        image.digest(),
        &image.spec.format,
        &image.spec.source,
        &image.spec.cache,
        image.metadata.deletion_timestamp.is_some(),
    ))
}

fn fingerprint(value: &impl serde::Serialize) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    serde_json::to_string(value)
        .unwrap_or_default()
        .hash(&mut h);
    h.finish()
}

/// Objects the image controller's tests share.
#[cfg(test)]
pub(crate) mod test_objects {
    use std::sync::Arc;

    use vmdisk_crds::{
        CacheEntryState, CacheEntryStatus, DiskFormat, NodeDiskCache, NodeDiskCacheSpec,
        NodeDiskCacheStatus, VMDiskImage, VMDiskImageStatus,
    };

    pub const D: &str = "sha256:abababababababababababababababababababababababababababababababab";

    pub fn image(url: &str, poll: Option<&str>, status: Option<VMDiskImageStatus>) -> VMDiskImage {
        let mut i: VMDiskImage = serde_json::from_value(serde_json::json!({
            "apiVersion": "vmdisk.io/v1alpha1", "kind": "VMDiskImage",
            "metadata": {"name": "fedora", "namespace": "vms", "generation": 1},
            "spec": {"source": {"registry": {"url": url}}, "pollInterval": poll},
        }))
        .unwrap();
        i.status = status;
        i
    }

    pub fn cache(
        node: &str,
        digest: &str,
        state: CacheEntryState,
        format: DiskFormat,
    ) -> Arc<NodeDiskCache> {
        let mut c = NodeDiskCache::new(
            node,
            NodeDiskCacheSpec {
                node_name: node.into(),
                ..Default::default()
            },
        );
        c.status = Some(NodeDiskCacheStatus {
            entries: vec![CacheEntryStatus {
                digest: digest.into(),
                format,
                state,
                source_format: Some("qcow2".into()),
                virtual_size: Some(5 << 30),
                ..Default::default()
            }],
            ..Default::default()
        });
        Arc::new(c)
    }
}
