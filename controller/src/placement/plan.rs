//! Which images each node should hold, as pure decisions over plain values (the VMDiskImages,
//! a node's labels): the controller decides once for the cluster and hands each node's agent
//! only its own list, so an agent never lists the cluster's images. Images for every node
//! (no `cache.nodeSelector`) go to one list all agents read: one write for 300 nodes, not 300.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use vmdisk_crds::{DesiredImage, PullMethod, VMDiskImage};

/// The most a node's list may take, serialized. The API server refuses objects over 1.5 MiB;
/// the list leaves the rest for the agent's status (about 300 bytes an entry).
pub const MAX_LIST_BYTES: usize = 512 * 1024;

/// An image some node may be asked to hold, with what its list entry costs. It keeps no
/// reference to the image (a kept `Arc` would hold every replaced version in memory).
#[derive(Debug, Clone)]
pub struct Candidate {
    entry: DesiredImage,
    bytes: usize,
    created: Option<Time>,
    /// `None` (or empty): on the every-node list, not on the nodes' own.
    selector: Option<BTreeMap<String, String>>,
}

impl Candidate {
    /// The image's candidate: resolved (agents never resolve tags, so every node caches the
    /// same digest), prefetched, filled through the node cache (`pullMethod` `node` and
    /// `nodeOnly` images are pulled by the node's runtime) and not being deleted.
    fn of(image: &VMDiskImage) -> Option<Self> {
        if image.metadata.deletion_timestamp.is_some()
            || !image.spec.cache.prefetch
            || !image
                .spec
                .source
                .registry
                .pull_method
                .is_none_or(|m| m == PullMethod::Pod)
        {
            return None;
        }
        let entry = DesiredImage::of(image)?;
        let bytes = serde_json::to_vec(&entry).map_or(usize::MAX, |v| v.len() + 1);
        Some(Self {
            entry,
            bytes,
            created: image.metadata.creation_timestamp.clone(),
            selector: image
                .spec
                .cache
                .node_selector
                .clone()
                .filter(|s| !s.is_empty()),
        })
    }

    /// Who keeps a place when a list is full: pinned images first, then the oldest.
    fn rank(&self) -> (bool, Option<&Time>, &str, &str) {
        (
            !self.entry.pinned,
            self.created.as_ref(),
            &self.entry.namespace,
            &self.entry.name,
        )
    }

    fn selects(&self, labels: &BTreeMap<String, String>) -> bool {
        self.selector.as_ref().is_some_and(|s| {
            s.iter()
                .all(|(k, v)| labels.get(k).is_some_and(|have| have == v))
        })
    }
}

/// A node's list.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeList {
    /// Sorted by namespace and name.
    pub images: Vec<DesiredImage>,
    /// Images that select the node but did not fit.
    pub omitted: u32,
}

/// The candidates, kept from round to round: an image is looked at again only when its
/// resourceVersion changed, and a node's list is drawn from the images whose selector names
/// one of the node's labels, not from all of them. At 10,000 images and 300 nodes, deciding
/// every list from scratch took about 190 ms of CPU per round.
#[derive(Debug, Default)]
pub struct Candidates {
    /// By uid: what was looked at last.
    seen: HashMap<String, Seen>,
    /// Rounds of [`Self::update`] so far: an image not marked with the current one is gone.
    round: u64,
    /// Priority order (see [`Candidate::rank`]).
    ordered: Vec<Arc<Candidate>>,
    /// Positions in `ordered` of the images with a selector, under the first of its labels.
    by_label: HashMap<(String, String), Vec<usize>>,
}

/// One image as last looked at.
#[derive(Debug)]
struct Seen {
    resource_version: String,
    /// `None`: not a candidate.
    candidate: Option<Arc<Candidate>>,
    /// The last round that saw it.
    round: u64,
}

impl Candidates {
    /// Takes in the images as they are now; `true` when a candidate changed. An image whose
    /// resourceVersion is the one looked at costs a lookup, nothing is copied (10,000 images
    /// are taken in on every round).
    pub fn update(&mut self, images: &[Arc<VMDiskImage>]) -> bool {
        self.round += 1;
        let round = self.round;
        let mut changed = false;
        for image in images {
            let meta = &image.metadata;
            let uid: std::borrow::Cow<'_, str> = match &meta.uid {
                Some(uid) => uid.as_str().into(),
                None => format!(
                    "{}/{}",
                    meta.namespace.as_deref().unwrap_or_default(),
                    meta.name.as_deref().unwrap_or_default()
                )
                .into(),
            };
            let version = meta.resource_version.as_deref().unwrap_or_default();
            match self.seen.get_mut(uid.as_ref()) {
                Some(seen) if seen.resource_version == version => seen.round = round,
                Some(seen) => {
                    let candidate = Candidate::of(image).map(Arc::new);
                    // A status write leaves the candidate as it was (and the indexed one).
                    if !same(&seen.candidate, &candidate) {
                        changed = true;
                        seen.candidate = candidate;
                    }
                    seen.resource_version = version.to_string();
                    seen.round = round;
                }
                None => {
                    let candidate = Candidate::of(image).map(Arc::new);
                    changed |= candidate.is_some();
                    self.seen.insert(
                        uid.into_owned(),
                        Seen {
                            resource_version: version.to_string(),
                            candidate,
                            round,
                        },
                    );
                }
            }
        }
        self.seen.retain(|_, seen| {
            let keep = seen.round == round;
            changed |= !keep && seen.candidate.is_some();
            keep
        });
        if changed {
            self.index();
        }
        changed
    }

    fn index(&mut self) {
        self.ordered = self
            .seen
            .values()
            .filter_map(|s| s.candidate.clone())
            .collect();
        self.ordered.sort_by(|a, b| a.rank().cmp(&b.rank()));
        self.by_label.clear();
        for (position, c) in self.ordered.iter().enumerate() {
            if let Some((k, v)) = c.selector.as_ref().and_then(|s| s.iter().next()) {
                self.by_label
                    .entry((k.clone(), v.clone()))
                    .or_default()
                    .push(position);
            }
        }
    }

    /// How many images some node may hold.
    pub fn len(&self) -> usize {
        self.ordered.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ordered.is_empty()
    }

    /// The own list of the node with `labels`: every candidate with a node selector that
    /// selects it, in priority order until [`MAX_LIST_BYTES`].
    pub fn node_list(&self, labels: &BTreeMap<String, String>) -> NodeList {
        let mut positions: Vec<usize> = labels
            .iter()
            .filter_map(|(k, v)| self.by_label.get(&(k.clone(), v.clone())))
            .flatten()
            .copied()
            .filter(|&p| self.ordered[p].selects(labels))
            .collect();
        positions.sort_unstable();
        within(
            positions.into_iter().map(|p| &*self.ordered[p]),
            MAX_LIST_BYTES,
        )
    }

    /// The list every node holds besides its own: the candidates without a node selector, in
    /// priority order until [`MAX_LIST_BYTES`].
    pub fn every_node_list(&self) -> NodeList {
        within(
            self.ordered
                .iter()
                .filter(|c| c.selector.is_none())
                .map(|c| &**c),
            MAX_LIST_BYTES,
        )
    }
}

/// The same candidate (or the same absence), by what a list reads of it.
fn same(a: &Option<Arc<Candidate>>, b: &Option<Arc<Candidate>>) -> bool {
    match (a, b) {
        (None, None) => true,
        (Some(a), Some(b)) => {
            a.entry == b.entry && a.created == b.created && a.selector == b.selector
        }
        _ => false,
    }
}

fn within<'a>(candidates: impl Iterator<Item = &'a Candidate>, budget: usize) -> NodeList {
    let mut list = NodeList::default();
    let mut used = 0usize;
    for c in candidates {
        if used.saturating_add(c.bytes) > budget {
            list.omitted += 1;
            continue;
        }
        used += c.bytes;
        list.images.push(c.entry.clone());
    }
    list.images
        .sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    list
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const D: &str = "sha256:abababababababababababababababababababababababababababababababab";

    fn image(
        name: &str,
        created: &str,
        cache: serde_json::Value,
        digest: Option<&str>,
    ) -> Arc<VMDiskImage> {
        Arc::new(
            serde_json::from_value(json!({
                "apiVersion": "vmdisk.io/v1alpha1", "kind": "VMDiskImage",
                "metadata": {"name": name, "namespace": "vms", "creationTimestamp": created},
                "spec": {"source": {"registry": {"url": format!("r.io/vms/{name}:1")}}, "cache": cache},
                "status": {"digest": digest},
            }))
            .unwrap(),
        )
    }

    fn candidates(images: &[Arc<VMDiskImage>]) -> Candidates {
        let mut c = Candidates::default();
        c.update(images);
        c
    }

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn names(list: &NodeList) -> Vec<&str> {
        list.images.iter().map(|i| i.name.as_str()).collect()
    }

    #[test]
    fn a_node_gets_what_selects_it_and_nothing_unresolved_or_pulled_by_the_runtime() {
        let mut by_runtime =
            (*image("runtime", "2026-01-01T00:00:00Z", json!({}), Some(D))).clone();
        by_runtime.spec.source.registry.pull_method = Some(vmdisk_crds::PullMethod::Node);
        let images = vec![
            image("everywhere", "2026-01-01T00:00:00Z", json!({}), Some(D)),
            image(
                "empty-selector",
                "2026-01-01T00:00:00Z",
                json!({"nodeSelector": {}}),
                Some(D),
            ),
            image(
                "gpu",
                "2026-01-01T00:00:00Z",
                json!({"nodeSelector": {"pool": "gpu"}}),
                Some(D),
            ),
            image("unresolved", "2026-01-01T00:00:00Z", json!({}), None),
            image(
                "off",
                "2026-01-01T00:00:00Z",
                json!({"prefetch": false}),
                Some(D),
            ),
            Arc::new(by_runtime),
        ];
        let c = candidates(&images);
        assert_eq!(names(&c.node_list(&labels(&[("pool", "gpu")]))), ["gpu"]);
        assert!(c.node_list(&labels(&[("pool", "cpu")])).images.is_empty());
        assert!(c.node_list(&BTreeMap::new()).images.is_empty());
        // Without a selector (or with an empty one): on the list every node reads.
        assert_eq!(
            names(&c.every_node_list()),
            ["empty-selector", "everywhere"]
        );
        let entry = &c.every_node_list().images[1];
        assert_eq!(entry.digest, D);
        assert_eq!(entry.url, "r.io/vms/everywhere:1");
        assert!(!entry.pull_secret);
    }

    #[test]
    fn a_full_list_keeps_pinned_then_oldest_and_counts_the_rest() {
        let images = vec![
            image("new", "2026-03-01T00:00:00Z", json!({}), Some(D)),
            image("old", "2026-01-01T00:00:00Z", json!({}), Some(D)),
            image(
                "pinned-new",
                "2026-04-01T00:00:00Z",
                json!({"pinned": true}),
                Some(D),
            ),
        ];
        let c = candidates(&images);
        let ordered: Vec<&Candidate> = c.ordered.iter().map(|c| &**c).collect();
        let list = within(ordered.iter().copied(), ordered[0].bytes + ordered[1].bytes);
        assert_eq!(names(&list), ["old", "pinned-new"]);
        assert_eq!(list.omitted, 1);
        assert!(list.images.iter().any(|i| i.pinned));
        let all = c.every_node_list();
        assert_eq!((all.images.len(), all.omitted), (3, 0));
    }

    #[test]
    fn a_thousand_images_fit_far_below_the_object_limit() {
        let images: Vec<_> = (0..1000)
            .map(|i| {
                image(
                    &format!("image-{i:04}"),
                    "2026-01-01T00:00:00Z",
                    json!({}),
                    Some(D),
                )
            })
            .collect();
        let list = candidates(&images).every_node_list();
        assert_eq!((list.images.len(), list.omitted), (1000, 0));
        let bytes = serde_json::to_vec(&list.images).unwrap().len();
        assert!(bytes < MAX_LIST_BYTES, "{bytes} bytes");
    }

    fn versioned(
        name: &str,
        version: &str,
        cache: serde_json::Value,
        digest: &str,
    ) -> Arc<VMDiskImage> {
        let mut i = (*image(name, "2026-01-01T00:00:00Z", cache, Some(digest))).clone();
        i.metadata.uid = Some(format!("uid-{name}"));
        i.metadata.resource_version = Some(version.into());
        Arc::new(i)
    }

    #[test]
    fn an_image_is_looked_at_again_only_when_its_version_changes() {
        const E: &str = "sha256:cdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcd";
        let gpu = json!({"nodeSelector": {"pool": "gpu"}});
        let mut c = Candidates::default();
        assert!(c.update(&[versioned("a", "1", gpu.clone(), D)]));
        assert!(
            !c.update(&[versioned("a", "1", gpu.clone(), D)]),
            "nothing new"
        );
        // The same version is not looked at again (a version names one content).
        assert!(!c.update(&[versioned("a", "1", gpu.clone(), E)]));
        // A status write: a new version, the same candidate.
        assert!(!c.update(&[versioned("a", "2", gpu.clone(), D)]));
        // A new digest.
        assert!(c.update(&[versioned("a", "3", gpu.clone(), E)]));
        let gpu_node = labels(&[("pool", "gpu")]);
        assert_eq!(c.node_list(&gpu_node).images[0].digest, E);
        // The image now selects other nodes.
        assert!(c.update(&[versioned(
            "a",
            "4",
            json!({"nodeSelector": {"pool": "cpu"}}),
            E
        )]));
        assert!(c.node_list(&gpu_node).images.is_empty());
        assert_eq!(names(&c.node_list(&labels(&[("pool", "cpu")]))), ["a"]);
        // Gone from the store: gone from every list.
        assert!(c.update(&[]));
        assert!(c.is_empty());
        assert!(!c.update(&[]));
    }

    #[test]
    fn the_index_picks_what_a_scan_of_every_image_picks() {
        // Selectors of one or two labels over a small set of keys and values, nodes with
        // every combination: each node's list must be what matching every image gives.
        let keys = ["pool", "zone", "gpu"];
        let values = ["a", "b", "c"];
        let mut images = Vec::new();
        for i in 0..300usize {
            let mut selector = serde_json::Map::new();
            selector.insert(keys[i % 3].into(), values[(i / 3) % 3].into());
            if i % 2 == 0 {
                selector.insert(keys[(i + 1) % 3].into(), values[(i / 9) % 3].into());
            }
            let cache = if i % 17 == 0 {
                json!({})
            } else {
                json!({"nodeSelector": selector, "pinned": i % 5 == 0})
            };
            let created = format!("2026-01-{:02}T00:00:00Z", 1 + i % 28);
            images.push(image(&format!("image-{i:03}"), &created, cache, Some(D)));
        }
        let c = candidates(&images);
        let mut checked = 0;
        for pool in values {
            for zone in values {
                for gpu in ["a", "none"] {
                    let mut node = labels(&[("pool", pool), ("zone", zone), ("host", "n")]);
                    if gpu != "none" {
                        node.insert("gpu".into(), gpu.into());
                    }
                    let scanned = within(
                        c.ordered.iter().filter(|x| x.selects(&node)).map(|x| &**x),
                        MAX_LIST_BYTES,
                    );
                    let indexed = c.node_list(&node);
                    assert_eq!(indexed, scanned, "node {node:?}");
                    checked += indexed.images.len();
                }
            }
        }
        assert!(checked > 100, "the nodes were selected {checked} times");
    }
}
