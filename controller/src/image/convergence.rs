//! Convergence of the image controller's pure decisions as a property: from any image status
//! (generated), writing the status `aggregate_status` decides and deciding again with nothing
//! new gives the same status (nothing more to write), a failure repeated gives the same
//! status and no Event, and `needs_resolve` asks for no resolution the written status already
//! answers.

use chrono::{DateTime, Utc};
use proptest::prelude::*;
use vmdisk_crds::{CacheEntryState, DiskFormat, ImagePhase, VMDiskImageStatus};

use super::resolve::needs_resolve;
use super::status::{aggregate_status, is_news, ResolveOutcome};
use super::test_objects::{cache, image, D};

const OTHER: &str = "sha256:cdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcd";

fn now() -> DateTime<Utc> {
    DateTime::parse_from_rfc3339("2026-11-24T10:00:00Z")
        .unwrap()
        .with_timezone(&Utc)
}

fn outcome(index: u8) -> ResolveOutcome {
    match index {
        0 => ResolveOutcome::NotAttempted,
        1 => ResolveOutcome::Resolved {
            digest: D.into(),
            disk: None,
        },
        2 => ResolveOutcome::Resolved {
            digest: OTHER.into(),
            disk: Some(crate::image::resolve::PeekedDisk {
                source_format: "qcow2".into(),
                virtual_size: 10 << 30,
            }),
        },
        3 => ResolveOutcome::Failed {
            message: "registry r.io failed after 1 attempt(s): connection refused".into(),
        },
        _ => ResolveOutcome::Failed {
            message: "pull secret vms/creds not found".into(),
        },
    }
}

prop_compose! {
    fn situation()(
        history in proptest::collection::vec(0..5u8, 0..4),
        latest in 0..5u8,
        rows in proptest::collection::vec((0..2u8, 0..5u8, any::<bool>()), 0..4),
        pinned in any::<bool>(),
        generation_bump in any::<bool>(),
    ) -> (vmdisk_crds::VMDiskImage, ResolveOutcome, Vec<std::sync::Arc<vmdisk_crds::NodeDiskCache>>) {
        let url = if pinned { format!("r.io/a/b@{D}") } else { "r.io/a/b:1".to_string() };
        let caches: Vec<_> = rows.iter().enumerate().map(|(i, (digest, state, qcow2))| {
            let state = [CacheEntryState::Pending, CacheEntryState::Pulling,
                CacheEntryState::Converting, CacheEntryState::Ready, CacheEntryState::Failed][*state as usize];
            let format = if *qcow2 { DiskFormat::Qcow2 } else { DiskFormat::Raw };
            cache(&format!("n{i}"), [D, OTHER][*digest as usize], state, format)
        }).collect();
        // The status earlier reconciles left, one outcome after another.
        let mut img = image(&url, Some("10m"), None);
        for (i, h) in history.iter().enumerate() {
            let at = now() - chrono::Duration::minutes(30 - i as i64);
            img.status = Some(aggregate_status(&img, &outcome(*h), &caches, None, at));
        }
        if generation_bump {
            img.metadata.generation = Some(2);
        }
        (img, outcome(latest), caches)
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    #[test]
    fn a_written_status_is_a_fixed_point((img, latest, caches) in situation()) {
        let first = aggregate_status(&img, &latest, &caches, None, now());
        let mut written = img.clone();
        written.status = Some(first.clone());
        // Woken again with nothing new (a cache watch, the safety net, a backoff step):
        // nothing to write.
        let later = now() + chrono::Duration::minutes(3);
        prop_assert_eq!(
            &aggregate_status(&written, &ResolveOutcome::NotAttempted, &caches, None, later),
            &first
        );
        prop_assert!(!is_news(&written, &latest), "told twice: {:?}", latest);
        match &latest {
            // The same failure again: the same status, no Event.
            ResolveOutcome::Failed { .. } => {
                prop_assert_eq!(&aggregate_status(&written, &latest, &caches, None, later), &first);
                prop_assert!(first.phase == Some(ImagePhase::Failed) || first.digest.is_some());
            }
            // A success is written once per resolution (its time), nothing else moves.
            ResolveOutcome::Resolved { .. } => {
                let again = aggregate_status(&written, &latest, &caches, None, later);
                prop_assert_eq!(
                    VMDiskImageStatus { last_resolved: None, ..again },
                    VMDiskImageStatus { last_resolved: None, ..first.clone() }
                );
                prop_assert!(!needs_resolve(&written, now()), "resolved, yet due again");
            }
            ResolveOutcome::NotAttempted => {}
        }
    }
}

#[test]
fn a_registry_that_stays_down_is_one_failed_status_and_one_event() {
    let down = outcome(3);
    let img = image("r.io/a/b:1", None, None);
    let first = aggregate_status(&img, &down, &[], None, now());
    assert_eq!(first.phase, Some(ImagePhase::Failed));
    let mut written = img.clone();
    written.status = Some(first.clone());
    assert!(!is_news(&written, &down));
    // Between two attempts (backing off) the failure stands; it does not flip to "not
    // resolved yet" and back.
    let between = aggregate_status(&written, &ResolveOutcome::NotAttempted, &[], None, now());
    assert_eq!(between, first);
    // A different failure is news, and a success after it too.
    assert!(is_news(&written, &outcome(4)));
    assert!(is_news(&written, &outcome(1)));
}
