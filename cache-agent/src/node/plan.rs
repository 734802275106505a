//! What this node should hold, and what to start now: pure decisions over plain values (the
//! VMDiskImages, this node's labels, what is cached, what is running, per-entry backoff), so
//! the run loop in `agent` only gathers those values and carries the plan out.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmdisk_crds::{ImageReference, RegistrySource, VMDiskImage};
use vmdisk_support::Backoff;

use crate::store::EntryKey;

/// An image this node should hold, as the plan sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WantedImage {
    pub namespace: String,
    pub name: String,
    /// The VMDiskImage's UID: names its credentials copy.
    pub uid: String,
    pub key: EntryKey,
    /// The reference pinned to the resolved digest: every node pulls the same bits.
    pub reference: String,
    pub pinned: bool,
    pub source: RegistrySource,
}

/// Images whose cache policy selects a node with `node_labels` and whose digest is resolved.
/// Unresolved images wait for the image controller: agents never resolve tags themselves, so
/// every node caches the same digest. Images that name `pullMethod: node` or `nodeOnly` are not
/// prefetched: the node's runtime pulls them where it can, and where it cannot (`node` falls
/// back to the cache) the first PVC warms the entry.
pub fn wanted_images(
    images: &[Arc<VMDiskImage>],
    node_labels: &BTreeMap<String, String>,
) -> Vec<WantedImage> {
    let mut out: Vec<WantedImage> = images
        .iter()
        .filter(|i| i.prefetched_on(node_labels))
        .filter_map(|i| {
            let digest = i.digest()?;
            let reference = ImageReference::parse(&i.spec.source.registry.url).ok()?;
            Some(WantedImage {
                namespace: i.metadata.namespace.clone().unwrap_or_default(),
                name: i.metadata.name.clone().unwrap_or_default(),
                uid: i.metadata.uid.clone().unwrap_or_default(),
                key: EntryKey {
                    digest: digest.to_string(),
                    format: i.spec.format,
                },
                reference: reference.with_digest(digest).to_string(),
                pinned: i.spec.cache.pinned,
                source: i.spec.source.registry.clone(),
            })
        })
        .collect();
    out.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    out
}

/// Backoff after failed warms, per entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryState {
    pub failures: u32,
    pub next_attempt: Instant,
}

/// Waits before warming an entry again after consecutive failures: 10 s doubling to 10 min.
pub const WARM_BACKOFF: Backoff = Backoff::new(Duration::from_secs(10), Duration::from_secs(600));

/// What to do now.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Entries that must survive eviction.
    pub pinned: HashSet<EntryKey>,
    /// Warms to start now (not cached, not running, not backing off). Several images may
    /// share one entry: each entry appears once.
    pub start: Vec<WantedImage>,
}

pub fn plan(
    wanted: &[WantedImage],
    cached: &HashSet<EntryKey>,
    running: &HashSet<EntryKey>,
    retries: &HashMap<EntryKey, RetryState>,
    now: Instant,
) -> Plan {
    let mut out = Plan::default();
    let mut seen = HashSet::new();
    for w in wanted {
        if w.pinned {
            out.pinned.insert(w.key.clone());
        }
        if cached.contains(&w.key) || running.contains(&w.key) || !seen.insert(w.key.clone()) {
            continue;
        }
        if retries.get(&w.key).is_some_and(|r| r.next_attempt > now) {
            continue;
        }
        out.start.push(w.clone());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmdisk_crds::{
        CachePolicy, DiskFormat, ImageSource, PullMethod, RegistrySource, VMDiskImageSpec,
        VMDiskImageStatus,
    };

    const D1: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";
    const D2: &str = "sha256:2222222222222222222222222222222222222222222222222222222222222222";

    fn image(
        name: &str,
        digest: Option<&str>,
        cache: CachePolicy,
        format: DiskFormat,
    ) -> Arc<VMDiskImage> {
        let mut i = VMDiskImage::new(
            name,
            VMDiskImageSpec {
                source: ImageSource {
                    registry: RegistrySource {
                        url: format!("registry.example.com/disks/{name}:1"),
                        pull_secret_ref: None,
                        ca_bundle: None,
                        insecure: None,
                        pull_method: None,
                    },
                },
                format,
                size: None,
                storage_class_name: None,
                access_modes: None,
                cache,
                poll_interval: None,
            },
        );
        i.metadata.namespace = Some("vms".into());
        i.status = Some(VMDiskImageStatus {
            digest: digest.map(str::to_string),
            ..Default::default()
        });
        Arc::new(i)
    }

    fn selector(k: &str, v: &str) -> CachePolicy {
        CachePolicy {
            node_selector: Some([(k.to_string(), v.to_string())].into()),
            ..CachePolicy::default()
        }
    }

    #[test]
    fn wanted_follows_selectors_digests_and_prefetch() {
        let labels: BTreeMap<String, String> = [("zone".to_string(), "a".to_string())].into();
        let images = vec![
            image("a", Some(D1), selector("zone", "a"), DiskFormat::Raw),
            image("b", Some(D2), selector("zone", "b"), DiskFormat::Raw),
            image("c", None, CachePolicy::default(), DiskFormat::Raw),
            image(
                "d",
                Some(D2),
                CachePolicy {
                    prefetch: false,
                    ..CachePolicy::default()
                },
                DiskFormat::Raw,
            ),
            image("e", Some(D2), CachePolicy::default(), DiskFormat::Qcow2),
        ];
        let mut pulled_by_nodes = Vec::new();
        for (name, method) in [
            ("f", PullMethod::Node),
            ("g", PullMethod::NodeOnly),
            ("h", PullMethod::Pod),
        ] {
            let mut i = image(name, Some(D1), CachePolicy::default(), DiskFormat::Raw);
            Arc::make_mut(&mut i).spec.source.registry.pull_method = Some(method);
            pulled_by_nodes.push(i);
        }
        let images = [images, pulled_by_nodes].concat();
        let wanted = wanted_images(&images, &labels);
        let names: Vec<&str> = wanted.iter().map(|w| w.name.as_str()).collect();
        assert_eq!(names, ["a", "e", "h"]);
        assert_eq!(
            wanted[0].reference,
            format!("registry.example.com/disks/a:1@{D1}")
        );
        assert_eq!(wanted[1].key.format, DiskFormat::Qcow2);
    }

    #[test]
    fn plan_skips_cached_running_backing_off_and_duplicates() {
        let labels = BTreeMap::new();
        let pinned = CachePolicy {
            pinned: true,
            ..CachePolicy::default()
        };
        let images = vec![
            image("a", Some(D1), pinned.clone(), DiskFormat::Raw),
            image("a-again", Some(D1), CachePolicy::default(), DiskFormat::Raw),
            image("b", Some(D2), CachePolicy::default(), DiskFormat::Raw),
            image("c", Some(D2), CachePolicy::default(), DiskFormat::Qcow2),
        ];
        let wanted = wanted_images(&images, &labels);
        let now = Instant::now();
        let p = plan(
            &wanted,
            &HashSet::new(),
            &HashSet::new(),
            &HashMap::new(),
            now,
        );
        assert_eq!(p.start.len(), 3, "one warm per entry: {:?}", p.start);
        assert!(p.pinned.contains(&EntryKey {
            digest: D1.into(),
            format: DiskFormat::Raw
        }));
        assert_eq!(p.pinned.len(), 1);

        let cached: HashSet<EntryKey> = [EntryKey {
            digest: D1.into(),
            format: DiskFormat::Raw,
        }]
        .into();
        let running: HashSet<EntryKey> = [EntryKey {
            digest: D2.into(),
            format: DiskFormat::Raw,
        }]
        .into();
        let retries: HashMap<EntryKey, RetryState> = [(
            EntryKey {
                digest: D2.into(),
                format: DiskFormat::Qcow2,
            },
            RetryState {
                failures: 1,
                next_attempt: now + Duration::from_secs(5),
            },
        )]
        .into();
        let p = plan(&wanted, &cached, &running, &retries, now);
        assert!(p.start.is_empty(), "{:?}", p.start);
        let p = plan(
            &wanted,
            &cached,
            &running,
            &retries,
            now + Duration::from_secs(6),
        );
        assert_eq!(p.start.len(), 1);
        assert_eq!(p.start[0].name, "c");
    }
}
