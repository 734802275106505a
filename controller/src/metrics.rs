//! Prometheus metrics of `vmdisk-controller` (`GET /metrics`): the volume populator's, the
//! agent API's, placement's, the images' (how their nodes pulled them), and whether this
//! replica leads.

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use kube::runtime::reflector::Store;
use kube::ResourceExt;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use vmdisk_crds::VMDiskImage;
use vmdisk_support::metrics::Exposition;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StepLabels {
    pub step: String,
}

/// The volume populator's metrics: how long populations take by result (failures and aborts
/// too), how many are in flight, how many pods were retried. Handles share their values, so
/// clones given to the populator show up on `/metrics`.
#[derive(Clone, Debug)]
pub struct PopulatorMetrics {
    duration: Family<ResultLabels, Histogram>,
    steps: Family<StepLabels, Histogram>,
    in_flight: Gauge,
    retries: Counter,
}

impl PopulatorMetrics {
    fn register(registry: &mut Registry) -> Self {
        let m = Self {
            duration: Family::new_with_constructor(|| {
                // 1 s … ~2.3 h: a warm copy to a cold multi-GiB pull.
                Histogram::new(exponential_buckets(1.0, 2.0, 14))
            }),
            steps: Family::new_with_constructor(|| {
                // 10 ms … ~5 min: a watch event to a cold pull.
                Histogram::new(exponential_buckets(0.01, 2.0, 16))
            }),
            in_flight: Default::default(),
            retries: Counter::default(),
        };
        let sub = registry.sub_registry_with_prefix("populator");
        sub.register(
            "operation_duration_seconds",
            "Time from prime PVC creation to the end of a population, by result (succeeded, failed, aborted)",
            m.duration.clone(),
        );
        sub.register(
            "step_duration_seconds",
            "Time from the previous step of a population to this one, as the populator saw it (prime, pod, scheduled, started, copied, rebound, bound)",
            m.steps.clone(),
        );
        sub.register(
            "operations_in_flight",
            "Populations under way (prime PVCs that exist)",
            m.in_flight.clone(),
        );
        sub.register(
            "retries",
            "Populator pods recreated after a failure",
            m.retries.clone(),
        );
        m
    }

    pub fn observe(&self, result: &str, seconds: f64) {
        self.duration
            .get_or_create(&ResultLabels {
                result: result.to_string(),
            })
            .observe(seconds);
    }

    pub fn observe_step(&self, step: &str, seconds: f64) {
        self.steps
            .get_or_create(&StepLabels {
                step: step.to_string(),
            })
            .observe(seconds);
    }

    pub fn set_in_flight(&self, n: i64) {
        self.in_flight.set(n);
    }

    pub fn retried(&self) {
        self.retries.inc();
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: String,
}

/// The agent API's answers, by outcome (granted, unauthenticated, forbidden, not_found,
/// unavailable): a rise in `forbidden` is a node asking for what it does not hold.
#[derive(Clone, Debug, Default)]
pub struct AgentApiMetrics {
    requests: Family<OutcomeLabels, Counter>,
}

impl AgentApiMetrics {
    fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.sub_registry_with_prefix("agent_api").register(
            "credentials_requests",
            "Credential requests of cache agents, by outcome",
            m.requests.clone(),
        );
        m
    }

    pub fn answered(&self, outcome: &str) {
        self.requests
            .get_or_create(&OutcomeLabels {
                outcome: outcome.to_string(),
            })
            .inc();
    }
}

/// Placement's rounds and the node lists they wrote: how long deciding every node's list takes
/// as the cluster grows, and how many lists each change rewrites.
#[derive(Clone, Debug)]
pub struct PlacementMetrics {
    rounds: Histogram,
    writes: Family<ResultLabels, Counter>,
    omitted: Gauge,
}

impl Default for PlacementMetrics {
    fn default() -> Self {
        Self {
            // 1 ms … ~16 s.
            rounds: Histogram::new(exponential_buckets(0.001, 2.0, 15)),
            writes: Family::default(),
            omitted: Gauge::default(),
        }
    }
}

impl PlacementMetrics {
    fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        let sub = registry.sub_registry_with_prefix("placement");
        sub.register(
            "round_duration_seconds",
            "Time to decide every node's image list and write those that changed",
            m.rounds.clone(),
        );
        sub.register(
            "list_writes",
            "Node image lists written, by result (written, failed)",
            m.writes.clone(),
        );
        sub.register(
            "omitted_images",
            "Images left out of full node lists, summed over the nodes, at the last round",
            m.omitted.clone(),
        );
        m
    }

    pub fn observe_round(&self, seconds: f64, omitted: i64) {
        self.rounds.observe(seconds);
        self.omitted.set(omitted);
    }

    pub fn wrote(&self, result: &str) {
        self.writes
            .get_or_create(&ResultLabels {
                result: result.to_string(),
            })
            .inc();
    }
}

/// The labels of an image's series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ImageLabels {
    pub namespace: String,
    pub image: String,
}

/// The images the leader's image controller watches, read at each scrape.
type ImagesSeen = Arc<Mutex<Option<Store<VMDiskImage>>>>;

/// How each image's nodes pulled it, read from the images' `status.pull` at each scrape (a
/// deleted image's series go with it, as with kube-state-metrics), and the time from the first
/// pull of an image to all its nodes warm, observed once per image and digest.
#[derive(Clone, Debug)]
pub struct ImageMetrics {
    images: ImagesSeen,
    all_warm: Histogram,
}

impl ImageMetrics {
    fn register(registry: &mut Registry) -> Self {
        let m = Self {
            images: Arc::default(),
            // 1 s … ~4.5 h: a small image on a few nodes to 20 GiB on 300.
            all_warm: Histogram::new(exponential_buckets(1.0, 2.0, 15)),
        };
        let sub = registry.sub_registry_with_prefix("image");
        sub.register(
            "all_nodes_warm_seconds",
            "Time from the first node beginning to pull an image to every node asked holding it, once per image and digest",
            m.all_warm.clone(),
        );
        sub.register_collector(Box::new(ImageCollector(Arc::clone(&m.images))));
        m
    }

    /// The leader's image store, for the per-image series (`None`: not leading).
    pub fn watch(&self, images: Option<Store<VMDiskImage>>) {
        *self.images.lock().expect("image metrics lock") = images;
    }

    pub fn observe_all_warm(&self, seconds: f64) {
        self.all_warm.observe(seconds);
    }
}

struct ImageCollector(ImagesSeen);

impl std::fmt::Debug for ImageCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ImageCollector")
    }
}

impl Collector for ImageCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        let Some(store) = self.0.lock().expect("image metrics lock").clone() else {
            return Ok(());
        };
        let (registry, peers, asked) = (
            Family::<ImageLabels, Gauge>::default(),
            Family::<ImageLabels, Gauge>::default(),
            Family::<ImageLabels, Gauge>::default(),
        );
        let all_warm = Family::<ImageLabels, Gauge<f64, AtomicU64>>::default();
        for image in store.state() {
            let Some(pull) = image.status.as_ref().and_then(|s| s.pull.as_ref()) else {
                continue;
            };
            let labels = ImageLabels {
                namespace: image.namespace().unwrap_or_default(),
                image: image.name_any(),
            };
            let gauge = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
            registry
                .get_or_create(&labels)
                .set(gauge(pull.bytes_from_registry));
            peers
                .get_or_create(&labels)
                .set(gauge(pull.bytes_from_peers));
            asked
                .get_or_create(&labels)
                .set(i64::from(pull.nodes_asked));
            if let Some(seconds) = pull.all_nodes_warm_seconds {
                all_warm.get_or_create(&labels).set(seconds);
            }
        }
        for (name, help, family) in [
            (
                "registry_bytes",
                "Bytes of an image's layers the registry sent to the nodes holding it ready",
                &registry,
            ),
            (
                "peer_bytes",
                "Bytes of an image's layers other nodes' agents sent to the nodes holding it ready",
                &peers,
            ),
            ("nodes_asked", "Nodes asked to hold an image", &asked),
        ] {
            family.encode(encoder.encode_descriptor(name, help, None, family.metric_type())?)?;
        }
        all_warm.encode(encoder.encode_descriptor(
            "last_all_nodes_warm_seconds",
            "Time from the first node beginning to pull an image to every node asked holding it, for its current digest",
            None,
            all_warm.metric_type(),
        )?)
    }
}

/// Every metric of the controller, under the `vmdisk_controller_` prefix.
pub struct ControllerMetrics {
    registry: Registry,
    pub populator: PopulatorMetrics,
    pub agent_api: AgentApiMetrics,
    pub placement: PlacementMetrics,
    pub images: ImageMetrics,
    leader: Gauge,
}

impl Default for ControllerMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl ControllerMetrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("vmdisk_controller");
        let leader = Gauge::default();
        registry.register(
            "leader",
            "1 while this replica holds the Lease and runs the controllers, else 0",
            leader.clone(),
        );
        let populator = PopulatorMetrics::register(&mut registry);
        let agent_api = AgentApiMetrics::register(&mut registry);
        let placement = PlacementMetrics::register(&mut registry);
        let images = ImageMetrics::register(&mut registry);
        Self {
            registry,
            populator,
            agent_api,
            placement,
            images,
            leader,
        }
    }

    pub fn set_leading(&self, leading: bool) {
        self.leader.set(i64::from(leading));
    }
}

impl Exposition for ControllerMetrics {
    fn registry(&self) -> &Registry {
        &self.registry
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_show_up_in_the_exposition() {
        let m = ControllerMetrics::new();
        let populator = m.populator.clone();
        populator.observe("failed", 3.0);
        populator.set_in_flight(2);
        populator.retried();
        m.agent_api.answered("forbidden");
        m.set_leading(true);
        let text = m.encode();
        for line in [
            r#"vmdisk_controller_populator_operation_duration_seconds_count{result="failed"} 1"#,
            "vmdisk_controller_populator_operations_in_flight 2",
            "vmdisk_controller_populator_retries_total 1",
            "vmdisk_controller_leader 1",
            r#"vmdisk_controller_agent_api_credentials_requests_total{outcome="forbidden"} 1"#,
        ] {
            assert!(text.contains(line), "{line} missing from {text}");
        }
        m.set_leading(false);
        assert!(m.encode().contains("vmdisk_controller_leader 0"));
    }

    /// Per-image series come from the watched images' status, and go when the image does or
    /// when the controller stops watching.
    #[test]
    fn image_series_follow_the_watched_images() {
        use kube::runtime::{reflector::store::Writer, watcher};
        let m = ControllerMetrics::new();
        let image = |name: &str, pull: Option<vmdisk_crds::ImagePull>| {
            let mut i: VMDiskImage = serde_json::from_value(serde_json::json!({
                "apiVersion": "vmdisk.io/v1alpha1", "kind": "VMDiskImage",
                "metadata": {"name": name, "namespace": "vms"},
                "spec": {"source": {"registry": {"url": "r.io/a:1"}}},
            }))
            .unwrap();
            i.status = Some(vmdisk_crds::VMDiskImageStatus {
                pull,
                ..Default::default()
            });
            i
        };
        let mut writer = Writer::<VMDiskImage>::default();
        let warm = image(
            "fedora",
            Some(vmdisk_crds::ImagePull {
                nodes_asked: 8,
                bytes_from_registry: 1 << 30,
                bytes_from_peers: 7 << 30,
                all_nodes_warm_seconds: Some(52.5),
            }),
        );
        writer.apply_watcher_event(&watcher::Event::Apply(warm.clone()));
        writer.apply_watcher_event(&watcher::Event::Apply(image("unpulled", None)));
        m.images.watch(Some(writer.as_reader()));
        m.images.observe_all_warm(52.5);
        let text = m.encode();
        for line in [
            r#"vmdisk_controller_image_registry_bytes{namespace="vms",image="fedora"} 1073741824"#,
            r#"vmdisk_controller_image_peer_bytes{namespace="vms",image="fedora"} 7516192768"#,
            r#"vmdisk_controller_image_nodes_asked{namespace="vms",image="fedora"} 8"#,
            r#"vmdisk_controller_image_last_all_nodes_warm_seconds{namespace="vms",image="fedora"} 52.5"#,
            "vmdisk_controller_image_all_nodes_warm_seconds_count 1",
        ] {
            assert!(text.contains(line), "{line} missing from {text}");
        }
        assert!(!text.contains("unpulled"), "{text}");
        writer.apply_watcher_event(&watcher::Event::Delete(warm));
        assert!(!m.encode().contains(r#"image="fedora""#));
        m.images.watch(None);
        assert!(!m.encode().contains("image_registry_bytes{"));
    }
}
