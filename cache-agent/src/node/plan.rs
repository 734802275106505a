//! What this node should hold, and what to start now: pure decisions over plain values (the
//! list the controller wrote for this node, what is cached, what is running, per-entry
//! backoff), so the run loop in `agent` only gathers those values and carries the plan out.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::ConfigMap;
use vmdisk_crds::{DesiredImage, ImageReference, EVERY_NODE_LIST_KEY};
use vmdisk_support::Backoff;

use crate::store::EntryKey;

/// An image this node should hold, as the plan sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WantedImage {
    pub namespace: String,
    pub name: String,
    pub key: EntryKey,
    /// The reference pinned to the resolved digest: every node pulls the same bits.
    pub reference: String,
    pub pinned: bool,
    /// The image names a pull secret (its credentials come from the agent API).
    pub pull_secret: bool,
    pub ca_bundle: Option<String>,
    pub insecure: bool,
}

/// The images of this node's list (its NodeDiskCache's spec, written by the controller from
/// the VMDiskImages' cache policies and this node's labels: only resolved images, pulled
/// through the cache). An entry whose reference does not parse is skipped.
pub fn wanted_images(list: &[DesiredImage]) -> Vec<WantedImage> {
    let mut out: Vec<WantedImage> = list
        .iter()
        .filter_map(|i| {
            let reference = ImageReference::parse(&i.url).ok()?;
            Some(WantedImage {
                namespace: i.namespace.clone(),
                name: i.name.clone(),
                key: EntryKey {
                    digest: i.digest.clone(),
                    format: i.format,
                },
                reference: reference.with_digest(&i.digest).to_string(),
                pinned: i.pinned,
                pull_secret: i.pull_secret,
                ca_bundle: i.ca_bundle.clone(),
                insecure: i.insecure.unwrap_or(false),
            })
        })
        .collect();
    out.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    out
}

/// The images of the every-node list (the controller's ConfigMap `EVERY_NODE_LIST`, a JSON
/// array under `EVERY_NODE_LIST_KEY`); none when it has no such key.
pub fn every_node_images(map: &ConfigMap) -> Result<Vec<DesiredImage>, serde_json::Error> {
    match map.data.as_ref().and_then(|d| d.get(EVERY_NODE_LIST_KEY)) {
        Some(json) => serde_json::from_str(json),
        None => Ok(Vec::new()),
    }
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
    use vmdisk_crds::DiskFormat;

    const D1: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";
    const D2: &str = "sha256:2222222222222222222222222222222222222222222222222222222222222222";

    fn image(name: &str, digest: &str, pinned: bool, format: DiskFormat) -> DesiredImage {
        DesiredImage {
            namespace: "vms".into(),
            name: name.into(),
            digest: digest.into(),
            format,
            pinned,
            url: format!("registry.example.com/disks/{name}:1"),
            pull_secret: false,
            ca_bundle: None,
            insecure: None,
        }
    }

    #[test]
    fn wanted_pins_references_to_the_listed_digest_and_skips_bad_ones() {
        let mut bad = image("bad", D1, false, DiskFormat::Raw);
        bad.url = "not a reference".into();
        let list = vec![
            image("e", D2, false, DiskFormat::Qcow2),
            bad,
            image("a", D1, false, DiskFormat::Raw),
        ];
        let wanted = wanted_images(&list);
        let names: Vec<&str> = wanted.iter().map(|w| w.name.as_str()).collect();
        assert_eq!(names, ["a", "e"]);
        assert_eq!(
            wanted[0].reference,
            format!("registry.example.com/disks/a:1@{D1}")
        );
        assert_eq!(wanted[1].key.format, DiskFormat::Qcow2);
    }

    #[test]
    fn the_every_node_list_reads_back_what_the_controller_wrote_and_refuses_garbage() {
        let list = vec![image("a", D1, true, DiskFormat::Raw)];
        let mut map = ConfigMap::default();
        assert!(every_node_images(&map).unwrap().is_empty());
        map.data = Some(
            [(
                EVERY_NODE_LIST_KEY.to_string(),
                serde_json::to_string(&list).unwrap(),
            )]
            .into(),
        );
        assert_eq!(every_node_images(&map).unwrap(), list);
        map.data = Some([(EVERY_NODE_LIST_KEY.to_string(), "{not json".to_string())].into());
        assert!(every_node_images(&map).is_err());
    }

    #[test]
    fn plan_skips_cached_running_backing_off_and_duplicates() {
        let images = vec![
            image("a", D1, true, DiskFormat::Raw),
            image("a-again", D1, false, DiskFormat::Raw),
            image("b", D2, false, DiskFormat::Raw),
            image("c", D2, false, DiskFormat::Qcow2),
        ];
        let wanted = wanted_images(&images);
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
