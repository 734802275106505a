//! Prometheus metrics of `vmdisk-controller` (`GET /metrics`): the volume populator's, and
//! whether this replica leads.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
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

/// Every metric of the controller, under the `vmdisk_controller_` prefix.
pub struct ControllerMetrics {
    registry: Registry,
    pub populator: PopulatorMetrics,
    pub agent_api: AgentApiMetrics,
    pub placement: PlacementMetrics,
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
        Self {
            registry,
            populator,
            agent_api,
            placement,
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
}
