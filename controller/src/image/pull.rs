//! How the nodes asked to hold an image pulled it, as a pure function of their NodeDiskCaches:
//! how many nodes were asked (their list holds the image at its digest, or, for an image
//! without a node selector, every node with a NodeDiskCache), the bytes the
//! registry and other nodes' agents (peers) sent to those holding it ready, and, once every
//! node asked holds it, the time from the first pull's start to the last one's commit. The
//! image's `status.pull`, and the per-image metrics read from it.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use kube::ResourceExt;
use vmdisk_crds::{CacheEntryState, ImagePull, NodeDiskCache, VMDiskImage};

use crate::time::parse_rfc3339;

/// `status.pull` of `image` at `digest`; `None` while no node is asked to hold it and none
/// reported how it pulled it.
pub fn pull_summary(
    image: &VMDiskImage,
    digest: &str,
    caches: &[Arc<NodeDiskCache>],
) -> Option<ImagePull> {
    let (namespace, name) = (image.namespace().unwrap_or_default(), image.name_any());
    // Images for every node are on the every-node list, not on the nodes' own: every node
    // running an agent (each has its NodeDiskCache) is asked.
    let everywhere = image.prefetched_everywhere();
    let mut summary = ImagePull::default();
    let (mut all_warm, mut reported) = (true, false);
    let (mut first_start, mut last_finish): (Option<DateTime<Utc>>, Option<DateTime<Utc>>) =
        (None, None);
    for cache in caches {
        let asked = everywhere
            || cache
                .spec
                .images
                .iter()
                .any(|i| i.namespace == namespace && i.name == name && i.digest == digest);
        let ready = cache
            .status
            .iter()
            .flat_map(|s| s.entries.iter())
            .find(|e| {
                e.digest == digest
                    && e.format == image.spec.format
                    && e.state == CacheEntryState::Ready
            });
        if asked {
            summary.nodes_asked += 1;
            all_warm &= ready.is_some();
        }
        let Some(pull) = ready.and_then(|e| e.pull.as_ref()) else {
            continue;
        };
        reported = true;
        summary.bytes_from_registry += pull.bytes_from_registry;
        summary.bytes_from_peers += pull.bytes_from_peers;
        if asked {
            let started = parse_rfc3339(&pull.started);
            let finished = parse_rfc3339(&pull.finished);
            first_start = match (first_start, started) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            last_finish = last_finish.max(finished);
        }
    }
    if summary.nodes_asked == 0 && !reported {
        return None;
    }
    if all_warm && summary.nodes_asked > 0 {
        if let (Some(start), Some(finish)) = (first_start, last_finish) {
            let millis = (finish - start).num_milliseconds().max(0);
            // A tenth of a second: what a user compares, and a status that does not move
            // with the rounding of a float.
            summary.all_nodes_warm_seconds = Some((millis / 100) as f64 / 10.0);
        }
    }
    Some(summary)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::test_objects::{cache, image, D};
    use vmdisk_crds::{DesiredImage, DiskFormat, EntryPull};

    /// Node `node`: asked for the image or not, its entry in `state`, pulled between the two
    /// times (seconds past 10:00) with these bytes.
    fn node(
        node: &str,
        asked: bool,
        state: CacheEntryState,
        pulled: Option<(u32, u32, u64, u64)>,
    ) -> Arc<NodeDiskCache> {
        let mut c = (*cache(node, D, state, DiskFormat::Raw)).clone();
        if asked {
            c.spec.images.push(DesiredImage {
                namespace: "vms".into(),
                name: "fedora".into(),
                digest: D.into(),
                format: DiskFormat::Raw,
                pinned: false,
                url: "quay.io/a/b:1".into(),
                pull_secret: false,
                ca_bundle: None,
                insecure: None,
            });
        }
        let entry = &mut c.status.as_mut().unwrap().entries[0];
        entry.pull = pulled.map(|(from, to, registry, peers)| EntryPull {
            started: format!("2026-12-04T10:00:{from:02}.250Z"),
            finished: format!("2026-12-04T10:00:{to:02}.750Z"),
            bytes_from_registry: registry,
            bytes_from_peers: peers,
        });
        Arc::new(c)
    }

    /// The test image, for the nodes labelled `pool: gold`.
    fn selective() -> VMDiskImage {
        let mut img = image("quay.io/a/b:1", None, None);
        img.spec.cache.node_selector = Some([("pool".to_string(), "gold".to_string())].into());
        img
    }

    #[test]
    fn sums_bytes_and_times_the_herd_once_every_node_asked_is_warm() {
        let img = selective();
        let mut caches = vec![
            node("n1", true, CacheEntryState::Ready, Some((1, 9, 100, 0))),
            node("n2", true, CacheEntryState::Ready, Some((2, 12, 0, 100))),
            node("n3", true, CacheEntryState::Pulling, None),
        ];
        let pulling = pull_summary(&img, D, &caches).unwrap();
        assert_eq!(
            pulling,
            ImagePull {
                nodes_asked: 3,
                bytes_from_registry: 100,
                bytes_from_peers: 100,
                all_nodes_warm_seconds: None,
            },
            "n3 is still pulling"
        );
        caches[2] = node("n3", true, CacheEntryState::Ready, Some((3, 20, 0, 100)));
        // A node not asked (a PVC's warm, an old list) counts in the bytes, not the time.
        caches.push(node(
            "n4",
            false,
            CacheEntryState::Ready,
            Some((0, 50, 100, 0)),
        ));
        let warm = pull_summary(&img, D, &caches).unwrap();
        assert_eq!(warm.nodes_asked, 3);
        assert_eq!(
            (warm.bytes_from_registry, warm.bytes_from_peers),
            (200, 200)
        );
        assert_eq!(
            warm.all_nodes_warm_seconds,
            Some(19.5),
            "10:00:01.250 to 10:00:20.750"
        );
    }

    #[test]
    fn nothing_to_say_until_a_node_is_asked_or_reports() {
        let img = selective();
        assert_eq!(pull_summary(&img, D, &[]), None);
        let unasked = [node("n1", false, CacheEntryState::Pulling, None)];
        assert_eq!(pull_summary(&img, D, &unasked), None);
        // Entries committed before pulls were recorded: warm, but no time to tell.
        let old = [node("n1", true, CacheEntryState::Ready, None)];
        let summary = pull_summary(&img, D, &old).unwrap();
        assert_eq!(summary.nodes_asked, 1);
        assert_eq!(summary.all_nodes_warm_seconds, None);
        // Another digest's entry says nothing of this one.
        assert_eq!(pull_summary(&img, "sha256:other", &old), None);
    }

    #[test]
    fn an_image_for_every_node_asks_every_node_with_a_cache() {
        let everywhere = image("quay.io/a/b:1", None, None);
        let caches = [
            node("n1", false, CacheEntryState::Ready, Some((1, 3, 100, 0))),
            node("n2", false, CacheEntryState::Pulling, None),
        ];
        let summary = pull_summary(&everywhere, D, &caches).unwrap();
        assert_eq!(
            (summary.nodes_asked, summary.all_nodes_warm_seconds),
            (2, None)
        );
        let mut not_prefetched = everywhere.clone();
        not_prefetched.spec.cache.prefetch = false;
        assert_eq!(
            pull_summary(&not_prefetched, D, &caches)
                .unwrap()
                .nodes_asked,
            0
        );
    }
}
