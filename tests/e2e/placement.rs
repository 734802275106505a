//! Which node holds which image, at scale: the controller hands each node's agent the list of
//! its node's images (its NodeDiskCache's spec), and aggregates what the agents report into
//! each image's status. The case here is the e2e suite's small version of the `scale`
//! benchmark (30 simulated nodes, 300 images): it asserts the behaviour, not the timings.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Node};
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client, ResourceExt};
use serde_json::json;
use vmdisk_crds::{
    NodeDiskCache, VMDiskImage, EVERY_NODE_LIST, EVERY_NODE_LIST_KEY, INSTALL_NAMESPACE,
};
use vmdisk_tests::registry::TestRegistry;

use crate::fleet::{push_tiny_disks, Fleet, POOL_LABEL};
use crate::local::LocalInstall;
use crate::support::wait_for;
use crate::Case;

/// The label that groups the images one measurement waits for.
const SET_LABEL: &str = "e2e.vmdisk.io/set";
/// Images created at once.
const IN_FLIGHT: usize = 32;

/// An image to create: where, what, and which nodes' pool it selects (`None`: every node).
#[derive(Debug, Clone)]
pub struct Planned {
    pub namespace: String,
    pub name: String,
    pub reference: String,
    pub pool: Option<String>,
}

impl Planned {
    fn object(&self, set: &str) -> VMDiskImage {
        let cache = match &self.pool {
            Some(pool) => json!({"nodeSelector": {POOL_LABEL: pool}}),
            None => json!({}),
        };
        serde_json::from_value(json!({
            "apiVersion": "vmdisk.io/v1alpha1", "kind": "VMDiskImage",
            "metadata": {"name": self.name, "namespace": self.namespace, "labels": {SET_LABEL: set}},
            "spec": {"source": {"registry": {"url": self.reference, "insecure": true}},
                     "cache": cache},
        }))
        .unwrap()
    }
}

/// Creates `images` (labelled `set`), `pace` apart (`None`: as fast as the API server takes
/// them), and waits until each image's status counts at least `expected(image)` warm nodes.
/// Returns each image with the seconds from just before its create to the status that
/// counted them all: what a user waits for between `kubectl apply` and an image cached where
/// it should be.
pub async fn create_and_converge(
    admin: &Client,
    set: &str,
    images: &[Planned],
    expected: impl Fn(&Planned) -> u32,
    pace: Option<Duration>,
    timeout: Duration,
) -> Vec<(Planned, f64)> {
    let want: HashMap<String, u32> = images
        .iter()
        .map(|p| (format!("{}/{}", p.namespace, p.name), expected(p)))
        .collect();
    let converged: Arc<std::sync::Mutex<HashMap<String, Instant>>> = Arc::default();
    let seen = Arc::clone(&converged);
    let watch_want = want.clone();
    // Where each image's time went, for the slowest: its digest in the status, its first
    // node list, its first node's report of it ready.
    let stages: Arc<std::sync::Mutex<Stages>> = Arc::default();
    let image_stages = Arc::clone(&stages);
    let (watch, images_listed) = watch_listed(
        Api::<VMDiskImage>::all(admin.clone()),
        watcher::Config::default().labels(&format!("{SET_LABEL}={set}")),
        move |image: VMDiskImage| {
            let key = format!(
                "{}/{}",
                image.namespace().unwrap_or_default(),
                image.name_any()
            );
            let warm = image.status.as_ref().map_or(0, |s| s.warm_nodes);
            if let Some(digest) = image.status.as_ref().and_then(|s| s.digest.clone()) {
                image_stages.lock().unwrap().resolved(&key, digest);
            }
            if watch_want.get(&key).is_some_and(|w| warm >= *w) {
                seen.lock().unwrap().entry(key).or_insert_with(Instant::now);
            }
        },
    );
    let cache_stages = Arc::clone(&stages);
    let (caches, caches_listed) = watch_listed(
        Api::<NodeDiskCache>::all(admin.clone()),
        watcher::Config::default(),
        move |cache: NodeDiskCache| cache_stages.lock().unwrap().cache(&cache),
    );
    // A watch still making its first list (at 10,000 images, seconds) would see the first
    // images late and charge the list's time to them.
    let _ = tokio::join!(images_listed, caches_listed);
    let mut created: HashMap<String, Instant> = HashMap::new();
    match pace {
        Some(pace) => {
            for p in images {
                let t = Instant::now();
                Api::<VMDiskImage>::namespaced(admin.clone(), &p.namespace)
                    .create(&PostParams::default(), &p.object(set))
                    .await
                    .unwrap();
                created.insert(format!("{}/{}", p.namespace, p.name), t);
                tokio::time::sleep(pace.saturating_sub(t.elapsed())).await;
            }
        }
        None => {
            for chunk in images.chunks(IN_FLIGHT) {
                let made = futures::future::join_all(chunk.iter().map(|p| async move {
                    let t = Instant::now();
                    Api::<VMDiskImage>::namespaced(admin.clone(), &p.namespace)
                        .create(&PostParams::default(), &p.object(set))
                        .await
                        .unwrap();
                    (format!("{}/{}", p.namespace, p.name), t)
                }))
                .await;
                created.extend(made);
            }
        }
    }
    let total = want.len();
    wait_for(
        &format!("{total} images ({set}) cached on all of their nodes"),
        timeout,
        || {
            let n = converged.lock().unwrap().len();
            let missing: Vec<String> = if n < total {
                want.keys()
                    .filter(|k| !converged.lock().unwrap().contains_key(*k))
                    .take(3)
                    .cloned()
                    .collect()
            } else {
                Vec::new()
            };
            async move {
                (n >= total)
                    .then_some(())
                    .ok_or(format!("{n} of {total}; not yet e.g. {missing:?}"))
            }
        },
    )
    .await;
    watch.abort();
    caches.abort();
    let converged = converged.lock().unwrap();
    let timed: Vec<(Planned, f64)> = images
        .iter()
        .map(|p| {
            let k = format!("{}/{}", p.namespace, p.name);
            let s = converged[&k].saturating_duration_since(created[&k]);
            (p.clone(), s.as_secs_f64())
        })
        .collect();
    let mut slowest: Vec<&(Planned, f64)> = timed.iter().collect();
    slowest.sort_by(|a, b| b.1.total_cmp(&a.1));
    let stages = stages.lock().unwrap();
    for (p, s) in slowest.into_iter().take(3) {
        let k = format!("{}/{}", p.namespace, p.name);
        let at = |t: Option<Instant>| {
            t.map_or("-".to_string(), |t| {
                format!(
                    "{:.2}s",
                    t.saturating_duration_since(created[&k]).as_secs_f64()
                )
            })
        };
        let (resolved, listed, reported) = stages.of(&k);
        println!(
            "{set}: slow {k} ({:?}): counted at {s:.2}s; digest at {}, first listed at {}, first reported ready at {}",
            p.pool,
            at(resolved),
            at(listed),
            at(reported)
        );
    }
    timed
}

/// Watches `api`, handing `f` each object as it is listed and as it changes; the receiver
/// fires once the first list is done.
fn watch_listed<K>(
    api: Api<K>,
    config: watcher::Config,
    mut f: impl FnMut(K) + Send + 'static,
) -> (
    tokio::task::JoinHandle<()>,
    tokio::sync::oneshot::Receiver<()>,
)
where
    K: kube::Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + 'static,
{
    let (listed, on_listed) = tokio::sync::oneshot::channel();
    let mut listed = Some(listed);
    let task = tokio::spawn(
        watcher(api, config)
            .default_backoff()
            .for_each(move |event| {
                match event {
                    Ok(watcher::Event::Apply(o) | watcher::Event::InitApply(o)) => f(o),
                    Ok(watcher::Event::InitDone) => {
                        if let Some(listed) = listed.take() {
                            let _ = listed.send(());
                        }
                    }
                    _ => {}
                }
                futures::future::ready(())
            }),
    );
    (task, on_listed)
}

/// When each image (by `namespace/name`) was first seen resolved, on a node's list, and
/// reported ready by a node.
#[derive(Default)]
struct Stages {
    digests: HashMap<String, String>,
    resolved: HashMap<String, Instant>,
    listed: HashMap<String, Instant>,
    /// By digest: reports carry no image name.
    reported: HashMap<String, Instant>,
}

impl Stages {
    fn resolved(&mut self, key: &str, digest: String) {
        self.resolved
            .entry(key.to_string())
            .or_insert_with(Instant::now);
        self.digests.insert(key.to_string(), digest);
    }

    fn cache(&mut self, cache: &NodeDiskCache) {
        let now = Instant::now();
        for i in &cache.spec.images {
            self.listed
                .entry(format!("{}/{}", i.namespace, i.name))
                .or_insert(now);
        }
        for e in cache.status.iter().flat_map(|s| s.entries.iter()) {
            if e.state == vmdisk_crds::CacheEntryState::Ready {
                self.reported.entry(e.digest.clone()).or_insert(now);
            }
        }
    }

    fn of(&self, key: &str) -> (Option<Instant>, Option<Instant>, Option<Instant>) {
        (
            self.resolved.get(key).copied(),
            self.listed.get(key).copied(),
            self.digests
                .get(key)
                .and_then(|d| self.reported.get(d).copied()),
        )
    }
}

/// The `p`-quantile of sorted values.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// The images of a node's list, as `namespace/name`, read as the node's agent reads it (its
/// own token; a list by name, as its watch does).
async fn list_of(agent: &Client, node: &str) -> BTreeSet<String> {
    Api::<NodeDiskCache>::all(agent.clone())
        .list(&ListParams::default().fields(&format!("metadata.name={node}")))
        .await
        .unwrap()
        .items
        .into_iter()
        .flat_map(|c| c.spec.images)
        .map(|i| format!("{}/{}", i.namespace, i.name))
        .collect()
}

/// 30 simulated nodes in 30 pools and 300 images, 10 selecting each pool, and one selecting
/// every node: each agent's list holds exactly its pool's 10 images, and the list every agent
/// reads the one for every node, both read with an agent's own token; every image's status counts its nodes warm. Then a node
/// moves to another pool: its list follows, and the images' counts with it.
pub async fn agents_get_only_their_nodes_images_and_images_converge(
    fx: Arc<LocalInstall>,
    case: Case,
) {
    const NODES: usize = 30;
    const IMAGES: usize = 300;
    let admin = case.admin();
    let namespaces = vec![
        case.namespace("e2e-place").await,
        case.namespace("e2e-place").await,
    ];
    let registry = TestRegistry::start_plain();
    let references = push_tiny_disks(&registry, "place/disk", 0..IMAGES + 1).await;
    let pool = |i: usize| format!("p{}", i % NODES);
    let prefix = format!("sim-{}", &namespaces[0]);
    let fleet = Fleet::start(
        &fx.env,
        fx.work.path(),
        &admin,
        &prefix,
        NODES,
        pool,
        &namespaces,
    )
    .await;
    let planned: Vec<Planned> = (0..=IMAGES)
        .map(|i| Planned {
            namespace: namespaces[i % namespaces.len()].clone(),
            name: format!("img-{i}"),
            reference: references[i].clone(),
            pool: (i < IMAGES).then(|| pool(i)),
        })
        .collect();
    let everywhere = planned[IMAGES].clone();
    // The image for every node also counts the fixture's own (real) agents, when they have
    // warmed it; the simulated ones are the floor.
    let mut seconds: Vec<f64> = create_and_converge(
        &admin,
        &namespaces[0],
        &planned,
        |p| if p.pool.is_some() { 1 } else { NODES as u32 },
        None,
        Duration::from_secs(300),
    )
    .await
    .into_iter()
    .map(|(_, s)| s)
    .collect();
    seconds.sort_by(f64::total_cmp);
    println!(
        "placement: {} images over {NODES} simulated nodes converged, p50 {:.2}s p99 {:.2}s (created as fast as the API server took them)",
        seconds.len(),
        percentile(&seconds, 0.5),
        percentile(&seconds, 0.99)
    );
    let key = |p: &Planned| format!("{}/{}", p.namespace, p.name);
    let expected_list = |pool_name: &str| -> BTreeSet<String> {
        planned
            .iter()
            .filter(|p| p.pool.as_deref() == Some(pool_name))
            .map(key)
            .collect()
    };
    for (i, node) in fleet.nodes.iter().enumerate() {
        let n: usize = node.rsplit('-').next().unwrap().parse().unwrap();
        let list = list_of(&fleet.clients[node], node).await;
        let ours: BTreeSet<String> = list
            .into_iter()
            .filter(|k| namespaces.iter().any(|ns| k.starts_with(&format!("{ns}/"))))
            .collect();
        assert_eq!(ours, expected_list(&pool(n)), "node #{i} {node}'s list");
    }
    // The image for every node is on the one list all agents read, not on each node's.
    let every_node: Vec<vmdisk_crds::DesiredImage> = {
        let agent = fleet.clients.values().next().unwrap();
        let maps = Api::<ConfigMap>::namespaced(agent.clone(), INSTALL_NAMESPACE)
            .list(&ListParams::default().fields(&format!("metadata.name={EVERY_NODE_LIST}")))
            .await
            .unwrap();
        serde_json::from_str(&maps.items[0].data.as_ref().unwrap()[EVERY_NODE_LIST_KEY]).unwrap()
    };
    assert!(
        every_node
            .iter()
            .any(|i| key(&everywhere) == format!("{}/{}", i.namespace, i.name)),
        "{every_node:?}"
    );
    let images: Api<VMDiskImage> = Api::namespaced(admin.clone(), &everywhere.namespace);
    let all = images.get(&everywhere.name).await.unwrap();
    assert!(all.status.unwrap().warm_nodes >= NODES as u32);

    // A node moves from pool p0 to p1: its list follows, and the images' warm counts.
    let moved = format!("{prefix}-0");
    Api::<Node>::all(admin.clone())
        .patch(
            &moved,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {POOL_LABEL: "p1"}}})),
        )
        .await
        .unwrap();
    let agent = fleet.clients[&moved].clone();
    let expected = expected_list("p1");
    let namespaces_for_list = namespaces.clone();
    wait_for(
        &format!("{moved}'s list to follow it to pool p1"),
        Duration::from_secs(60),
        || {
            let (agent, moved, expected, namespaces) = (
                agent.clone(),
                moved.clone(),
                expected.clone(),
                namespaces_for_list.clone(),
            );
            async move {
                let ours: BTreeSet<String> = list_of(&agent, &moved)
                    .await
                    .into_iter()
                    .filter(|k| namespaces.iter().any(|ns| k.starts_with(&format!("{ns}/"))))
                    .collect();
                (ours == expected).then_some(()).ok_or(format!("{ours:?}"))
            }
        },
    )
    .await;
    let counts = |pool_name: &'static str| {
        let planned = planned.clone();
        let admin = admin.clone();
        async move {
            let mut counts = BTreeMap::new();
            for p in planned
                .iter()
                .filter(|p| p.pool.as_deref() == Some(pool_name))
            {
                let i = Api::<VMDiskImage>::namespaced(admin.clone(), &p.namespace)
                    .get(&p.name)
                    .await
                    .map_err(|e| e.to_string())?;
                *counts
                    .entry(i.status.map_or(0, |s| s.warm_nodes))
                    .or_insert(0usize) += 1;
            }
            Ok::<_, String>(counts)
        }
    };
    wait_for(
        "pool p0's images to count no warm node, p1's two",
        Duration::from_secs(60),
        || async {
            let (p0, p1) = (counts("p0").await?, counts("p1").await?);
            (p0.keys().eq([&0]) && p1.keys().eq([&2]))
                .then_some(())
                .ok_or(format!("p0 {p0:?}, p1 {p1:?}"))
        },
    )
    .await;
    fleet.stop().await;
}
