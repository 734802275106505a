//! Which images each node should hold, as pure decisions over plain values (the VMDiskImages,
//! a node's labels): the controller decides once for the cluster and hands each node's agent
//! only its own list, so an agent never lists the cluster's images. Images for every node
//! (no `cache.nodeSelector`) go to one list all agents read: one write for 300 nodes, not 300.

use std::collections::BTreeMap;
use std::sync::Arc;

use vmdisk_crds::{DesiredImage, PullMethod, VMDiskImage};

/// The most a node's list may take, serialized. The API server refuses objects over 1.5 MiB;
/// the list leaves the rest for the agent's status (about 300 bytes an entry).
pub const MAX_LIST_BYTES: usize = 512 * 1024;

/// An image some node may be asked to hold, with what its list entry costs.
#[derive(Debug, Clone)]
pub struct Candidate {
    image: Arc<VMDiskImage>,
    entry: DesiredImage,
    bytes: usize,
    /// No node selector: on the every-node list, not on the nodes' own.
    every_node: bool,
}

/// A node's list.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeList {
    /// Sorted by namespace and name.
    pub images: Vec<DesiredImage>,
    /// Images that select the node but did not fit.
    pub omitted: u32,
}

/// The images any node may be asked to hold: resolved (agents never resolve tags, so every
/// node caches the same digest), prefetched and filled through the node cache (`pullMethod`
/// `node` and `nodeOnly` images are pulled by the node's runtime). Ordered by who keeps a place
/// when a node's list is full: pinned images first, then the oldest.
pub fn candidates(images: &[Arc<VMDiskImage>]) -> Vec<Candidate> {
    let mut out: Vec<Candidate> = images
        .iter()
        .filter(|i| i.metadata.deletion_timestamp.is_none())
        .filter(|i| {
            i.spec.cache.prefetch
                && i.spec
                    .source
                    .registry
                    .pull_method
                    .is_none_or(|m| m == PullMethod::Pod)
        })
        .filter_map(|i| {
            let entry = DesiredImage::of(i)?;
            let bytes = serde_json::to_vec(&entry).map_or(usize::MAX, |v| v.len() + 1);
            let every_node = i
                .spec
                .cache
                .node_selector
                .as_ref()
                .is_none_or(|s| s.is_empty());
            Some(Candidate {
                image: Arc::clone(i),
                entry,
                bytes,
                every_node,
            })
        })
        .collect();
    out.sort_by(|a, b| {
        let key = |c: &Candidate| {
            (
                !c.entry.pinned,
                c.image.metadata.creation_timestamp.as_ref().map(|t| t.0),
                c.entry.namespace.clone(),
                c.entry.name.clone(),
            )
        };
        key(a).cmp(&key(b))
    });
    out
}

/// The own list of the node with `labels`: every candidate with a node selector that selects
/// it, in priority order until [`MAX_LIST_BYTES`].
pub fn node_list(candidates: &[Candidate], labels: &BTreeMap<String, String>) -> NodeList {
    within(
        candidates
            .iter()
            .filter(|c| !c.every_node && c.image.prefetched_on(labels)),
        MAX_LIST_BYTES,
    )
}

/// The list every node holds besides its own: the candidates without a node selector, in
/// priority order until [`MAX_LIST_BYTES`].
pub fn every_node_list(candidates: &[Candidate]) -> NodeList {
    within(candidates.iter().filter(|c| c.every_node), MAX_LIST_BYTES)
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
        assert_eq!(names(&node_list(&c, &labels(&[("pool", "gpu")]))), ["gpu"]);
        assert!(node_list(&c, &labels(&[("pool", "cpu")])).images.is_empty());
        assert!(node_list(&c, &BTreeMap::new()).images.is_empty());
        // Without a selector (or with an empty one): on the list every node reads.
        assert_eq!(
            names(&every_node_list(&c)),
            ["empty-selector", "everywhere"]
        );
        let entry = &every_node_list(&c).images[1];
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
        let one = c[0].bytes;
        let list = within(c.iter(), one + c[1].bytes);
        assert_eq!(names(&list), ["old", "pinned-new"]);
        assert_eq!(list.omitted, 1);
        assert!(list.images.iter().any(|i| i.pinned));
        let all = every_node_list(&c);
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
        let list = every_node_list(&candidates(&images));
        assert_eq!((list.images.len(), list.omitted), (1000, 0));
        let bytes = serde_json::to_vec(&list.images).unwrap().len();
        assert!(bytes < MAX_LIST_BYTES, "{bytes} bytes");
    }
}
