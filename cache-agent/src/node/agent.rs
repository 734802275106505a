//! The DaemonSet's `run` mode: keep this node's cache holding what the controller asks of it.
//!
//! The [`Agent`] loop feeds the pure plan (`plan`: what is wanted here, what is pinned, what
//! to warm now) from the watch of this node's own NodeDiskCache (whose spec lists the images
//! the controller decided this node holds: the agent never lists the cluster's images), of the
//! list of images every node holds (one ConfigMap for all agents) and from the store, runs the warms, and reports, until the stop:
//! then the watches and the report loop end and the warms in flight are dropped (a dropped
//! warm removes its staging directory; what a killed process leaves, the next start cleans),
//! to start again at the next start.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client};
use tokio::task::{JoinHandle, JoinSet};
use tracing::Instrument as _;
use vmdisk_crds::{
    reasons, AccessScope, ApiAccess, CacheEntryState, DesiredImage, ImageReference, NodeDiskCache,
    EVERY_NODE_LIST, INSTALL_NAMESPACE,
};
use vmdisk_registry::RegistryOptions;

use super::credentials::CredentialsSource;
use super::plan::{every_node_images, plan, wanted_images, RetryState, WantedImage, WARM_BACKOFF};
use super::report::{node_cache_status, CacheEntryView, NodeReporter};
use super::AgentMetrics;
use crate::store::{watch_entries, EntryChange, EntryKey};
use crate::warm::{WarmProgress, WarmRequest, Warmer};

/// What the run loop asks of the API server (besides the reports' `API_ACCESS`).
pub const API_ACCESS: &[ApiAccess] = &[
    // This node's NodeDiskCache only (a field selector), but RBAC cannot say so.
    ApiAccess::new(
        "vmdisk.io",
        "nodediskcaches",
        &["list", "watch"],
        AccessScope::Cluster,
    ),
    // The images every node holds (`EVERY_NODE_LIST`, watched by name).
    ApiAccess::new(
        "",
        "configmaps",
        &["list", "watch"],
        AccessScope::InstallNamespace,
    ),
];

/// The shortest time between two reports (status and labels): a node finishing 50 warms in a
/// second writes twice or three times, not 50 times.
const REPORT_EVERY: Duration = Duration::from_millis(500);

/// Live state of warms, for the status report.
#[derive(Debug, Clone)]
struct Running {
    state: CacheEntryState,
    progress: Option<f64>,
}

#[derive(Default)]
struct AgentState {
    running: HashMap<EntryKey, Running>,
    retries: HashMap<EntryKey, RetryState>,
    failures: HashMap<EntryKey, String>,
}

pub struct Agent {
    pub client: Client,
    pub node_name: String,
    /// The controller's agent API, for the pull credentials of prefetched images.
    pub credentials: CredentialsSource,
    pub warmer: Warmer,
    pub reporter: NodeReporter,
    pub metrics: Arc<AgentMetrics>,
    pub resync: Duration,
    /// Where this node's agent serves its peers (its NodeDiskCache status says it); `None`
    /// when peers are off.
    pub peer_endpoint: Option<String>,
}

impl Agent {
    /// Runs until `stop`.
    pub async fn run(self, stop: vmdisk_support::process::Stop) {
        let mut warms = JoinSet::new();
        let mut watches = Vec::new();
        tokio::select! {
            () = self.keep_cache(&mut warms, &mut watches) => {}
            () = stop.cancelled() => {
                tracing::info!(warms = warms.len(), "stopping; warms in flight start again at the next start");
            }
        }
        for watch in watches {
            watch.abort();
        }
        warms.shutdown().await;
    }

    /// The loop: never returns.
    async fn keep_cache(&self, warms: &mut JoinSet<()>, watches: &mut Vec<JoinHandle<()>>) {
        let wake = Arc::new(tokio::sync::Notify::new());
        // This node's list (its NodeDiskCache without the status: a report of the agent's own
        // comes back without waking it) and the images every node holds.
        let (lists, watch) = watch_named(
            Api::<NodeDiskCache>::all(self.client.clone()),
            &self.node_name,
            |c: &mut NodeDiskCache| c.status = None,
            Arc::clone(&wake),
        );
        watches.push(watch);
        let (every, watch) = watch_named(
            Api::<ConfigMap>::namespaced(self.client.clone(), INSTALL_NAMESPACE),
            EVERY_NODE_LIST,
            |_: &mut ConfigMap| {},
            Arc::clone(&wake),
        );
        watches.push(watch);
        let _ = lists.wait_until_ready().await;
        let _ = every.wait_until_ready().await;
        if let Err(e) = self.reporter.ensure_cache_object().await {
            tracing::error!(error = %e, "cannot create this node's NodeDiskCache; will retry");
        }

        let state = Arc::new(Mutex::new(AgentState::default()));
        let mut lost = match watch_entries(Arc::clone(self.warmer.store())) {
            Ok((handle, rx)) => Some((handle, rx)),
            Err(e) => {
                tracing::error!(error = %e, "cannot watch the cache directory; external changes go unnoticed");
                None
            }
        };
        // Reports are coalesced: at most one each REPORT_EVERY, the rest folded into the next.
        let mut last_report: Option<Instant> = None;
        let mut report_due: Option<tokio::time::Instant> = None;
        loop {
            // Finished warms leave their (empty) results behind.
            while warms.try_join_next().is_some() {}
            let wanted = self.iterate(&lists, &every, &state, &wake, warms).await;
            match last_report {
                Some(at) if at.elapsed() < REPORT_EVERY => {
                    report_due.get_or_insert_with(|| (at + REPORT_EVERY).into());
                }
                _ => {
                    self.report(&state, &wanted).await;
                    last_report = Some(Instant::now());
                    report_due = None;
                }
            }
            let due = async {
                match report_due {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            let changed = async {
                match lost.as_mut() {
                    Some((_, rx)) => rx.recv().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = wake.notified() => {}
                change = changed => match change {
                    Some(EntryChange::Lost { key, reason }) => {
                        tracing::warn!(entry = %key, %reason, "cache entry changed behind the agent's back; dropped from the index");
                        let _ = self.reporter.event(reasons::CACHE_ENTRY_LOST, &format!("{key}: {reason}"), true).await;
                    }
                    Some(EntryChange::Adopted { key }) => {
                        tracing::info!(entry = %key, "entry committed by another process (a populator pod) indexed");
                        if let Err(e) = self.warmer.store().make_room(0) {
                            tracing::warn!(error = %e, "cache over budget");
                        }
                    }
                    None => {}
                },
                () = tokio::time::sleep(self.resync) => {}
                () = due => {}
            }
        }
    }

    async fn iterate(
        &self,
        lists: &Store<NodeDiskCache>,
        every: &Store<ConfigMap>,
        state: &Arc<Mutex<AgentState>>,
        wake: &Arc<tokio::sync::Notify>,
        warms: &mut JoinSet<()>,
    ) -> HashSet<String> {
        let mut listed: Vec<DesiredImage> = lists
            .state()
            .first()
            .map(|c| c.spec.images.clone())
            .unwrap_or_default();
        if let Some(map) = every.state().first() {
            match every_node_images(map) {
                Ok(images) => listed.extend(images),
                Err(e) => {
                    tracing::warn!(error = %e, "the every-node list cannot be read; only this node's own list is warmed")
                }
            }
        }
        let wanted = wanted_images(&listed);
        let store = self.warmer.store();
        match store.clean_abandoned_staging() {
            Ok(r) if r.removed_staging > 0 => {
                tracing::info!(
                    removed = r.removed_staging,
                    "removed staging left by processes that died (populator pods)"
                )
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "cannot clean the staging area"),
        }
        let cached: HashSet<EntryKey> = store.entries().into_iter().map(|e| e.key).collect();
        let plan = {
            let st = state.lock().expect("agent state poisoned");
            let running: HashSet<EntryKey> = st.running.keys().cloned().collect();
            plan(&wanted, &cached, &running, &st.retries, Instant::now())
        };
        store.set_pinned(&plan.pinned);
        for w in plan.start {
            self.start_warm(w, Arc::clone(state), Arc::clone(wake), warms)
                .await;
        }
        wanted.iter().map(|w| w.key.digest.clone()).collect()
    }

    async fn start_warm(
        &self,
        wanted: WantedImage,
        state: Arc<Mutex<AgentState>>,
        wake: Arc<tokio::sync::Notify>,
        warms: &mut JoinSet<()>,
    ) {
        let registry = match self.registry_options(&wanted).await {
            Ok(r) => r,
            Err(message) => {
                record_failure(&state, &wanted.key, message.clone());
                self.metrics.warm_failed();
                let _ = self
                    .reporter
                    .event(reasons::PULL_SECRET_ERROR, &message, true)
                    .await;
                return;
            }
        };
        state.lock().expect("agent state poisoned").running.insert(
            wanted.key.clone(),
            Running {
                state: CacheEntryState::Pending,
                progress: None,
            },
        );
        let request = WarmRequest {
            reference: wanted.reference.clone(),
            format: wanted.key.format,
            registry,
        };
        let warmer = self.warmer.clone();
        let metrics = Arc::clone(&self.metrics);
        let reporter = self.reporter.clone();
        let key = wanted.key.clone();
        let progress_state = Arc::clone(&state);
        let progress_key = key.clone();
        let progress_wake = Arc::clone(&wake);
        let progress = Arc::new(move |p: WarmProgress| {
            let (s, fraction) = match p {
                WarmProgress::Resolving => (CacheEntryState::Pulling, None),
                WarmProgress::Pulling { done, total } => (
                    CacheEntryState::Pulling,
                    Some(if total == 0 {
                        0.0
                    } else {
                        done as f64 / total as f64
                    }),
                ),
                WarmProgress::Converting | WarmProgress::Committing => {
                    (CacheEntryState::Converting, None)
                }
            };
            if let Some(r) = progress_state
                .lock()
                .expect("agent state poisoned")
                .running
                .get_mut(&progress_key)
            {
                // A new state, and every tenth of a pull, is reported at once (peers look for
                // nodes pulling an image, and ask those that have bytes); other progress
                // waits for the next report.
                let tenth = |p: Option<f64>| p.map(|p| (p * 10.0) as u32);
                if r.state != s || tenth(r.progress) != tenth(fraction) {
                    progress_wake.notify_one();
                }
                r.state = s;
                r.progress = fraction;
            }
        });
        let span = tracing::info_span!("warm", image = %format!("{}/{}", wanted.namespace, wanted.name), digest = %key.digest, format = %key.format);
        let warm = async move {
            match warmer.warm(request, progress).await {
                Ok(outcome) => {
                    if outcome.pulled {
                        metrics.cache_miss();
                        metrics.observe_pull(outcome.bytes_pulled, outcome.pull_seconds);
                        metrics.observe_from_peers(outcome.bytes_from_peers);
                        metrics.observe_convert(outcome.convert_seconds);
                    } else {
                        metrics.cache_hit();
                    }
                    tracing::info!(pulled = outcome.pulled, conversion = ?outcome.conversion, bytes = outcome.bytes_pulled, from_peers = outcome.bytes_from_peers, "cache entry ready");
                    let mut st = state.lock().expect("agent state poisoned");
                    st.running.remove(&key);
                    st.retries.remove(&key);
                    st.failures.remove(&key);
                }
                Err(e) => {
                    let message = crate::error_chain(e.as_ref());
                    tracing::error!(error = %message, "warm failed");
                    metrics.warm_failed();
                    state
                        .lock()
                        .expect("agent state poisoned")
                        .running
                        .remove(&key);
                    record_failure(&state, &key, message.clone());
                    let _ = reporter
                        .event(
                            reasons::WARM_FAILED,
                            &format!("{}: {message}", wanted.reference),
                            true,
                        )
                        .await;
                }
            }
            wake.notify_one();
        };
        warms.spawn(warm.instrument(span));
    }

    /// Registry options for a wanted image, with its pull credentials from the controller's
    /// agent API when the image names a pull secret.
    async fn registry_options(&self, wanted: &WantedImage) -> Result<RegistryOptions, String> {
        let reference = ImageReference::parse(&wanted.reference).map_err(|e| e.to_string())?;
        let credentials = match wanted.pull_secret {
            false => None,
            true => Some(
                self.credentials
                    .fetch(&self.client, &wanted.namespace, &wanted.name)
                    .await
                    .map_err(|e| {
                        format!(
                            "the pull credentials of {}/{}: {}",
                            wanted.namespace,
                            wanted.name,
                            crate::error_chain(&e)
                        )
                    })?,
            ),
        };
        Ok(RegistryOptions::new(
            &reference,
            wanted.insecure,
            wanted.ca_bundle.as_ref().map(|pem| pem.as_bytes().to_vec()),
            credentials.as_ref(),
        ))
    }

    async fn report(&self, state: &Arc<Mutex<AgentState>>, wanted: &HashSet<String>) {
        let store = self.warmer.store();
        let (running, failures) = {
            let st = state.lock().expect("agent state poisoned");
            (st.running.clone(), st.failures.clone())
        };
        let views = entry_views(store, &running, &failures);
        // A node advertises only what some image still wants: a deleted image takes its label
        // with it, while its entry stays in the cache until the budget evicts it.
        let ready: BTreeSet<String> = views
            .iter()
            .filter(|v| v.state == CacheEntryState::Ready)
            .filter(|v| wanted.contains(&v.digest))
            .map(|v| v.digest.clone())
            .collect();
        self.metrics
            .set_cache(store.used_bytes(), store.budget_bytes(), ready.len() as u64);
        self.metrics.set_evictions(store.evictions());
        let mut status = node_cache_status(
            &views,
            store.capacity_bytes(),
            store.budget_bytes(),
            store.used_bytes(),
        );
        status.peer_endpoint = self.peer_endpoint.clone();
        self.reporter.report(&status, &ready).await;
    }
}

/// Watches the object `name` of `api` into a store (without its managed fields and what
/// `strip` drops), waking `wake` whenever what is kept changes.
fn watch_named<K>(
    api: Api<K>,
    name: &str,
    mut strip: impl FnMut(&mut K) + Send + 'static,
    wake: Arc<tokio::sync::Notify>,
) -> (Store<K>, JoinHandle<()>)
where
    K: kube::Resource
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + serde::Serialize
        + Send
        + Sync
        + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
{
    let (store, writer) = reflector::store::<K>();
    let kind = K::kind(&K::DynamicType::default()).into_owned();
    let mut last: Option<serde_json::Value> = None;
    let watch = tokio::spawn(
        reflector::reflector(
            writer,
            watcher(
                api,
                watcher::Config::default().fields(&format!("metadata.name={name}")),
            )
            .modify(move |o: &mut K| {
                vmdisk_crds::strip_managed_fields(o.meta_mut());
                strip(o);
            }),
        )
        .default_backoff()
        .touched_objects()
        .for_each(move |event| {
            match &event {
                Err(e) => tracing::warn!(%kind, error = %e, "watch error; retrying"),
                Ok(object) => {
                    // What is kept, without the version the API server bumps on every write.
                    let mut kept = serde_json::to_value(object).ok();
                    if let Some(meta) = kept.as_mut().and_then(|v| v.get_mut("metadata")) {
                        meta["resourceVersion"] = serde_json::Value::Null;
                    }
                    if last != kept {
                        last = kept;
                        wake.notify_one();
                    }
                }
            }
            futures::future::ready(())
        }),
    );
    (store, watch)
}

fn record_failure(state: &Arc<Mutex<AgentState>>, key: &EntryKey, message: String) {
    let mut st = state.lock().expect("agent state poisoned");
    let failures = st.retries.get(key).map_or(0, |r| r.failures) + 1;
    st.retries.insert(
        key.clone(),
        RetryState {
            failures,
            next_attempt: Instant::now() + WARM_BACKOFF.delay(failures),
        },
    );
    st.failures.insert(key.clone(), message);
}

fn entry_views(
    store: &crate::store::CacheStore,
    running: &HashMap<EntryKey, Running>,
    failures: &HashMap<EntryKey, String>,
) -> Vec<CacheEntryView> {
    let mut views: Vec<CacheEntryView> = store
        .entries()
        .into_iter()
        .map(|e| CacheEntryView {
            digest: e.key.digest.clone(),
            format: e.key.format,
            state: CacheEntryState::Ready,
            progress: None,
            source_format: Some(e.meta.source_format.clone()),
            virtual_size: Some(e.meta.virtual_size),
            allocated_size: Some(e.meta.allocated_size),
            last_used: Some(e.meta.last_used),
            pinned: store.is_pinned(&e.key),
            message: None,
            pull: e.meta.pull.map(|record| (record, e.meta.created)),
        })
        .collect();
    for (key, r) in running {
        views.push(CacheEntryView {
            digest: key.digest.clone(),
            format: key.format,
            state: r.state,
            progress: r.progress,
            ..CacheEntryView::default()
        });
    }
    for (key, message) in failures {
        if !running.contains_key(key) {
            views.push(CacheEntryView {
                digest: key.digest.clone(),
                format: key.format,
                state: CacheEntryState::Failed,
                message: Some(message.clone()),
                ..CacheEntryView::default()
            });
        }
    }
    views
}
