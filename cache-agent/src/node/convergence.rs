//! Convergence of the agent's plan as a property: from any state (images wanted, some of them
//! sharing entries; entries cached, warming, backing off), carrying out each plan (warms
//! started, then each finishing or failing) and planning again comes to rest within a bounded
//! number of steps with nothing moving: every wanted entry is cached or backing off, no entry
//! is ever warmed twice at once, and the same state always gives the same plan.

use std::collections::{HashMap, HashSet};
use std::time::Instant;

use proptest::prelude::*;
use vmdisk_crds::DiskFormat;

use super::plan::{plan, RetryState, WantedImage, WARM_BACKOFF};
use crate::store::EntryKey;

fn key(n: u8, raw: bool) -> EntryKey {
    EntryKey {
        digest: format!("sha256:{}", format!("{n:02x}").repeat(32)),
        format: if raw {
            DiskFormat::Raw
        } else {
            DiskFormat::Qcow2
        },
    }
}

fn wanted(i: usize, n: u8, raw: bool, pinned: bool) -> WantedImage {
    WantedImage {
        namespace: "vms".into(),
        name: format!("image-{i}"),
        key: key(n, raw),
        reference: format!(
            "registry.example.com/disk@sha256:{}",
            format!("{n:02x}").repeat(32)
        ),
        pinned,
        pull_secret: false,
        ca_bundle: None,
        insecure: false,
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn plans_come_to_rest_and_never_warm_an_entry_twice(
        images in prop::collection::vec((0u8..6, any::<bool>(), any::<bool>()), 0..12),
        cached in prop::collection::hash_set((0u8..6, any::<bool>()), 0..6),
        running in prop::collection::hash_set((0u8..6, any::<bool>()), 0..4),
        backing_off in prop::collection::hash_set((0u8..6, any::<bool>()), 0..4),
        // Which entries fail when warmed (a registry down, a refused image).
        failing in prop::collection::hash_set((0u8..6, any::<bool>()), 0..6),
    ) {
        let now = Instant::now();
        let wanted: Vec<WantedImage> = images
            .iter()
            .enumerate()
            .map(|(i, (n, raw, pinned))| wanted(i, *n, *raw, *pinned))
            .collect();
        let mut cached: HashSet<EntryKey> = cached.iter().map(|(n, r)| key(*n, *r)).collect();
        let mut running: HashSet<EntryKey> = running.iter().map(|(n, r)| key(*n, *r)).collect();
        let mut retries: HashMap<EntryKey, RetryState> = backing_off
            .iter()
            .map(|(n, r)| {
                (key(*n, *r), RetryState { failures: 1, next_attempt: now + WARM_BACKOFF.delay(1) })
            })
            .collect();
        let failing: HashSet<EntryKey> = failing.iter().map(|(n, r)| key(*n, *r)).collect();
        let bound = wanted.len() + 2;
        let mut rested = false;
        for _ in 0..bound {
            let p = plan(&wanted, &cached, &running, &retries, now);
            prop_assert_eq!(&p, &plan(&wanted, &cached, &running, &retries, now), "deterministic");
            let started: HashSet<EntryKey> = p.start.iter().map(|w| w.key.clone()).collect();
            prop_assert_eq!(started.len(), p.start.len(), "an entry started twice in one plan");
            for k in &started {
                prop_assert!(!running.contains(k) && !cached.contains(k), "{k} warmed while cached or warming");
            }
            let pinned: HashSet<EntryKey> =
                wanted.iter().filter(|w| w.pinned).map(|w| w.key.clone()).collect();
            prop_assert_eq!(&p.pinned, &pinned);
            if started.is_empty() && running.is_empty() {
                rested = true;
                break;
            }
            // Carry it out: what was warming finishes now, then what started.
            for k in running.drain().chain(started) {
                if failing.contains(&k) {
                    let failures = retries.get(&k).map_or(0, |r| r.failures) + 1;
                    retries.insert(
                        k,
                        RetryState { failures, next_attempt: now + WARM_BACKOFF.delay(failures) },
                    );
                } else {
                    retries.remove(&k);
                    cached.insert(k);
                }
            }
        }
        prop_assert!(rested, "no rest within {bound} steps");
        for w in &wanted {
            prop_assert!(
                cached.contains(&w.key) || retries.get(&w.key).is_some_and(|r| r.next_attempt > now),
                "{} neither cached nor backing off at rest", w.key
            );
        }
    }
}
