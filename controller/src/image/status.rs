//! The status a VMDiskImage should have, as a pure function of the image, what resolution did
//! in this reconcile and the NodeDiskCaches the agents publish: phase, digest (a failed
//! re-resolution keeps the last good one), source format, virtual size, warm nodes, how they
//! pulled it ([`super::pull`]), the `Resolved` and `Ready` conditions, and `NodePull` for
//! images the node's runtime pulls.

use std::collections::BTreeSet;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::ResourceExt;
use vmdisk_crds::{
    format_bytes_quantity, CacheEntryState, ImagePhase, NodeDiskCache, PullMethod, VMDiskImage,
    VMDiskImageStatus,
};

use crate::node_pull::NodePull;

use super::resolve::PeekedDisk;
use crate::time::to_timestamp;

/// What resolution did in this reconcile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResolveOutcome {
    Resolved {
        digest: String,
        /// The disk as the first bytes of its layer describe it, when they did.
        disk: Option<PeekedDisk>,
    },
    Failed {
        message: String,
    },
    /// Not due, or backing off after a failure: nothing new is known, so what the last
    /// attempt said stands.
    NotAttempted,
}

const RESOLVED: &str = "Resolved";
const RESOLVE_FAILED: &str = "ResolveFailed";

/// The image's `Resolved` condition when it says the last attempt failed.
fn last_failure(image: &VMDiskImage) -> Option<&Condition> {
    image
        .status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == RESOLVED && c.status == "False" && c.reason == RESOLVE_FAILED)
}

/// True when `outcome` is worth an Event: a failure whose message the image does not show
/// already (a registry that stays down is told once, not once per retry).
pub fn is_news(image: &VMDiskImage, outcome: &ResolveOutcome) -> bool {
    match outcome {
        ResolveOutcome::Failed { message } => {
            last_failure(image).is_none_or(|c| &c.message != message)
        }
        ResolveOutcome::Resolved { digest, .. } => image.digest() != Some(digest.as_str()),
        ResolveOutcome::NotAttempted => false,
    }
}

fn condition(
    previous: &[Condition],
    type_: &str,
    ok: bool,
    reason: &str,
    message: String,
    generation: Option<i64>,
    now: DateTime<Utc>,
) -> Condition {
    let status = if ok { "True" } else { "False" };
    let since = previous
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or_else(|| Time(to_timestamp(now)));
    Condition {
        type_: type_.to_string(),
        status: status.to_string(),
        reason: reason.to_string(),
        message,
        observed_generation: generation,
        last_transition_time: since,
    }
}

const NODE_PULL: &str = "NodePull";

/// The `NodePull` condition of an image the node's runtime pulls (`pullMethod: node` or
/// `nodeOnly`): which nodes mount it as an image volume, or why none does and what that means
/// for its PVCs.
fn node_pull_condition(
    previous: &[Condition],
    method: PullMethod,
    node_pull: &NodePull,
    generation: Option<i64>,
    now: DateTime<Utc>,
) -> Condition {
    let (ok, reason, message) = match node_pull {
        NodePull::Nodes(nodes) => {
            let shown: Vec<&str> = nodes.iter().take(5).map(String::as_str).collect();
            let more = nodes.len().saturating_sub(shown.len());
            (
                true,
                "ImageVolumesSupported",
                format!(
                    "{} node(s) mount the image as a volume: {}{}",
                    nodes.len(),
                    shown.join(", "),
                    if more > 0 {
                        format!(" and {more} more")
                    } else {
                        String::new()
                    }
                ),
            )
        }
        NodePull::Unavailable(why) => (
            false,
            "ImageVolumesUnsupported",
            match method {
                PullMethod::NodeOnly => {
                    format!("{why}: PVCs of this image fail (pullMethod nodeOnly)")
                }
                _ => format!("{why}: PVCs of this image are filled through the node cache"),
            },
        ),
    };
    condition(previous, NODE_PULL, ok, reason, message, generation, now)
}

/// The status this image should have. `node_pull`: for an image the node's runtime pulls, its
/// method and where that works.
pub fn aggregate_status(
    image: &VMDiskImage,
    outcome: &ResolveOutcome,
    caches: &[Arc<NodeDiskCache>],
    node_pull: Option<(PullMethod, &NodePull)>,
    now: DateTime<Utc>,
) -> VMDiskImageStatus {
    let previous = image.status.clone().unwrap_or_default();
    let generation = image.metadata.generation;
    let (digest, last_resolved) = match outcome {
        ResolveOutcome::Resolved { digest, .. } => (
            Some(digest.clone()),
            Some(now.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)),
        ),
        // A failed re-resolution keeps the last good digest: nodes keep serving it.
        _ => (previous.digest.clone(), previous.last_resolved.clone()),
    };
    let mut warm = BTreeSet::new();
    // A new digest is a new disk: what was known of the old one goes.
    let (mut source_format, mut virtual_size) = if previous.digest == digest {
        (previous.source_format.clone(), previous.virtual_size)
    } else {
        (None, None)
    };
    if let ResolveOutcome::Resolved {
        disk: Some(disk), ..
    } = outcome
    {
        source_format = source_format.or_else(|| Some(disk.source_format.clone()));
        virtual_size = virtual_size.or(Some(disk.virtual_size));
    }
    if let Some(d) = &digest {
        for cache in caches {
            for e in cache.status.iter().flat_map(|s| s.entries.iter()) {
                if &e.digest != d || e.state != CacheEntryState::Ready {
                    continue;
                }
                // The controller's own reading of the registry stands: one node's report fills
                // in only what it could not read (formats only qemu-img reads), so a node
                // cannot resize an image for every tenant.
                source_format = source_format.or_else(|| e.source_format.clone());
                virtual_size = virtual_size.or(e.virtual_size);
                if e.format == image.spec.format {
                    warm.insert(cache.name_any());
                }
            }
        }
    }
    let warm_nodes = warm.len() as u32;
    // Not attempted: a standing failure stays (else the status would flip between the
    // failure and "not resolved yet" on every reconcile between two attempts).
    let standing = match outcome {
        ResolveOutcome::NotAttempted => last_failure(image),
        _ => None,
    };
    let failed = matches!(outcome, ResolveOutcome::Failed { .. }) || standing.is_some();
    let phase = match (&digest, failed, warm_nodes) {
        (None, true, _) => ImagePhase::Failed,
        (None, false, _) => ImagePhase::Pending,
        (Some(_), _, 0) => ImagePhase::Resolved,
        (Some(_), _, _) => ImagePhase::Ready,
    };
    let resolved_condition = match (outcome, &digest, standing) {
        (_, _, Some(kept)) => Condition {
            observed_generation: generation,
            ..kept.clone()
        },
        (ResolveOutcome::Failed { message }, _, _) => condition(
            &previous.conditions,
            RESOLVED,
            false,
            RESOLVE_FAILED,
            message.clone(),
            generation,
            now,
        ),
        (_, Some(d), _) => condition(
            &previous.conditions,
            RESOLVED,
            true,
            RESOLVED,
            format!("{} resolves to {d}", image.spec.source.registry.url),
            generation,
            now,
        ),
        (_, None, _) => condition(
            &previous.conditions,
            RESOLVED,
            false,
            "Pending",
            "not resolved yet".into(),
            generation,
            now,
        ),
    };
    let ready_condition = condition(
        &previous.conditions,
        "Ready",
        warm_nodes > 0,
        if warm_nodes > 0 {
            "CachedOnNodes"
        } else {
            "NotCached"
        },
        format!(
            "{warm_nodes} node(s) hold the image ready as {}",
            image.spec.format
        ),
        generation,
        now,
    );
    let pull = digest
        .as_deref()
        .and_then(|d| super::pull::pull_summary(image, d, caches));
    VMDiskImageStatus {
        phase: Some(phase),
        digest,
        source_format,
        virtual_size,
        virtual_size_quantity: virtual_size.map(format_bytes_quantity),
        warm_nodes,
        pull,
        last_resolved,
        observed_generation: generation,
        conditions: [resolved_condition, ready_condition]
            .into_iter()
            .chain(node_pull.map(|(method, where_)| {
                node_pull_condition(&previous.conditions, method, where_, generation, now)
            }))
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::test_objects::{cache, image, D};
    use vmdisk_crds::DiskFormat;

    #[test]
    fn status_aggregates_warm_nodes_and_keeps_the_digest_on_failure() {
        let now = Utc::now();
        let img = image("quay.io/a/b:1", None, None);
        let caches = vec![
            cache("n1", D, CacheEntryState::Ready, DiskFormat::Raw),
            cache("n2", D, CacheEntryState::Pulling, DiskFormat::Raw),
            cache("n3", D, CacheEntryState::Ready, DiskFormat::Qcow2),
            cache(
                "n4",
                "sha256:other",
                CacheEntryState::Ready,
                DiskFormat::Raw,
            ),
        ];
        let s = aggregate_status(
            &img,
            &ResolveOutcome::Resolved {
                digest: D.into(),
                disk: None,
            },
            &caches,
            None,
            now,
        );
        assert_eq!(s.phase, Some(ImagePhase::Ready));
        assert_eq!(
            s.warm_nodes, 1,
            "only n1 holds it ready in the image's format"
        );
        assert_eq!(s.source_format.as_deref(), Some("qcow2"));
        assert_eq!(s.virtual_size_quantity.as_deref(), Some("5Gi"));
        assert_eq!(s.observed_generation, Some(1));
        assert!(s.conditions.iter().all(|c| c.status == "True"));

        let with = image("quay.io/a/b:1", None, Some(s.clone()));
        let failed = aggregate_status(
            &with,
            &ResolveOutcome::Failed {
                message: "registry down".into(),
            },
            &caches,
            None,
            now + chrono::Duration::minutes(1),
        );
        assert_eq!(failed.digest.as_deref(), Some(D));
        assert_eq!(failed.phase, Some(ImagePhase::Ready));
        let resolved = failed
            .conditions
            .iter()
            .find(|c| c.type_ == "Resolved")
            .unwrap();
        assert_eq!(
            (resolved.status.as_str(), resolved.reason.as_str()),
            ("False", "ResolveFailed")
        );
        let ready = failed
            .conditions
            .iter()
            .find(|c| c.type_ == "Ready")
            .unwrap();
        assert_eq!(
            ready.last_transition_time, s.conditions[1].last_transition_time,
            "unchanged condition keeps its transition time"
        );

        let never = aggregate_status(
            &img,
            &ResolveOutcome::Failed {
                message: "401".into(),
            },
            &[],
            None,
            now,
        );
        assert_eq!(never.phase, Some(ImagePhase::Failed));
        // Unchanged inputs give an identical status: no patch.
        let again = aggregate_status(
            &with,
            &ResolveOutcome::NotAttempted,
            &caches,
            None,
            now + chrono::Duration::minutes(5),
        );
        assert_eq!(again, s);
    }

    #[test]
    fn a_peeked_disk_sizes_the_image_whatever_nodes_say_and_a_new_digest_forgets_the_old_size() {
        let now = Utc::now();
        let peeked = ResolveOutcome::Resolved {
            digest: D.into(),
            disk: Some(PeekedDisk {
                source_format: "raw".into(),
                virtual_size: 2 << 30,
            }),
        };
        let cold = aggregate_status(&image("quay.io/a/b:1", None, None), &peeked, &[], None, now);
        assert_eq!(cold.phase, Some(ImagePhase::Resolved));
        assert_eq!(cold.virtual_size, Some(2 << 30));
        assert_eq!(cold.source_format.as_deref(), Some("raw"));

        let with = image("quay.io/a/b:1", None, Some(cold.clone()));
        let warm = aggregate_status(
            &with,
            &ResolveOutcome::NotAttempted,
            &[cache("n1", D, CacheEntryState::Ready, DiskFormat::Raw)],
            None,
            now,
        );
        assert_eq!(
            warm.virtual_size,
            Some(2 << 30),
            "the controller's reading stands over a node's report"
        );

        let moved = aggregate_status(
            &image("quay.io/a/b:1", None, Some(warm)),
            &ResolveOutcome::Resolved {
                digest: "sha256:moved".into(),
                disk: None,
            },
            &[],
            None,
            now,
        );
        assert_eq!(moved.virtual_size, None, "the tag moved to another disk");
        assert_eq!(moved.source_format, None);
    }

    /// An image the node's runtime pulls says where that works, or why not and what it means
    /// for its PVCs; the condition keeps its transition time while nothing changes.
    #[test]
    fn node_pull_images_say_where_image_volumes_work() {
        let now = Utc::now();
        let img = image("quay.io/a/b:1", None, None);
        let resolved = ResolveOutcome::Resolved {
            digest: D.into(),
            disk: None,
        };
        let find =
            |s: &VMDiskImageStatus| s.conditions.iter().find(|c| c.type_ == "NodePull").cloned();
        assert!(find(&aggregate_status(&img, &resolved, &[], None, now)).is_none());
        let nodes: Vec<String> = (0..7).map(|i| format!("n{i}")).collect();
        let able = aggregate_status(
            &img,
            &resolved,
            &[],
            Some((PullMethod::Node, &NodePull::Nodes(nodes))),
            now,
        );
        let c = find(&able).unwrap();
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("True", "ImageVolumesSupported")
        );
        assert_eq!(
            c.message,
            "7 node(s) mount the image as a volume: n0, n1, n2, n3, n4 and 2 more"
        );
        let why = NodePull::Unavailable("node n0 runs \"containerd://1.6.20\"".into());
        for (method, tail) in [
            (PullMethod::Node, "filled through the node cache"),
            (PullMethod::NodeOnly, "PVCs of this image fail"),
        ] {
            let unable = aggregate_status(&img, &resolved, &[], Some((method, &why)), now);
            let c = find(&unable).unwrap();
            assert_eq!(
                (c.status.as_str(), c.reason.as_str()),
                ("False", "ImageVolumesUnsupported")
            );
            assert!(
                c.message.contains("containerd://1.6.20") && c.message.contains(tail),
                "{}",
                c.message
            );
            let later = aggregate_status(
                &image("quay.io/a/b:1", None, Some(unable.clone())),
                &ResolveOutcome::NotAttempted,
                &[],
                Some((method, &why)),
                now + chrono::Duration::minutes(5),
            );
            assert_eq!(later, unable, "written once");
        }
    }
}
