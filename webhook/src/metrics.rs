//! Prometheus metrics of the admission server (`GET /metrics`).

use std::fmt::Write as _;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::catalog::ClaimFetch;

/// Which admission endpoint a sample belongs to.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Resource {
    Pvc,
    Pod,
}

/// How an admission request ended.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Outcome {
    /// Answered with a patch.
    Patched,
    /// Answered allowed, nothing to change.
    Unchanged,
    /// The review was sound but the object was not what the endpoint handles.
    Skipped,
    /// HTTP 4xx: not an AdmissionReview this server can answer.
    BadRequest,
}

impl Resource {
    pub fn as_str(self) -> &'static str {
        match self {
            Resource::Pvc => "pvc",
            Resource::Pod => "pod",
        }
    }
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Patched => "patched",
            Outcome::Unchanged => "unchanged",
            Outcome::Skipped => "skipped",
            Outcome::BadRequest => "bad_request",
        }
    }
}

impl EncodeLabelValue for Resource {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        encoder.write_str(self.as_str())
    }
}

impl EncodeLabelValue for Outcome {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        encoder.write_str(self.as_str())
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub resource: Resource,
    pub outcome: Outcome,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResourceLabels {
    pub resource: Resource,
}

/// Handles resolved once, so recording a request takes no lock and hashes no labels.
struct Handles {
    requests: [[Counter; 4]; 2],
    latency: [Histogram; 2],
    patches: [Counter; 2],
    warnings: [Counter; 2],
    errors: [Counter; 2],
}

const RESOURCES: [Resource; 2] = [Resource::Pvc, Resource::Pod];
const OUTCOMES: [Outcome; 4] = [
    Outcome::Patched,
    Outcome::Unchanged,
    Outcome::Skipped,
    Outcome::BadRequest,
];

pub struct WebhookMetrics {
    registry: Registry,
    handles: Handles,
    /// Claims asked of the API server at admission, by result: found, absent, failed.
    claim_fetches: [Counter; 3],
    /// The volume populator's metrics, exposed on the same endpoint.
    pub populator: PopulatorMetrics,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: String,
}

/// The volume populator's metrics: how long populations take by result (failures and aborts
/// too), how many are in flight, how many pods were retried. Handles share their values, so
/// clones given to the controller show up on `/metrics`.
#[derive(Clone, Debug)]
pub struct PopulatorMetrics {
    duration: Family<ResultLabels, Histogram>,
    in_flight: prometheus_client::metrics::gauge::Gauge,
    retries: Counter,
}

impl PopulatorMetrics {
    fn register(registry: &mut Registry) -> Self {
        let m = Self {
            duration: Family::new_with_constructor(|| {
                // 1 s … ~2.3 h: a warm copy to a cold multi-GiB pull.
                Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
                    1.0, 2.0, 14,
                ))
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

    pub fn set_in_flight(&self, n: i64) {
        self.in_flight.set(n);
    }

    pub fn retried(&self) {
        self.retries.inc();
    }
}

impl Default for WebhookMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl WebhookMetrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("vmdisk_webhook");
        let requests = Family::<RequestLabels, Counter>::default();
        let latency = Family::<ResourceLabels, Histogram>::new_with_constructor(|| {
            // 50 µs … ~0.4 s: the webhook should live in the first buckets.
            Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
                0.00005, 2.0, 14,
            ))
        });
        let patches = Family::<ResourceLabels, Counter>::default();
        let warnings = Family::<ResourceLabels, Counter>::default();
        let errors = Family::<ResourceLabels, Counter>::default();
        registry.register(
            "admission_requests",
            "Admission requests by resource and outcome",
            requests.clone(),
        );
        registry.register(
            "admission_duration_seconds",
            "Time spent answering an admission request",
            latency.clone(),
        );
        registry.register(
            "patches_applied",
            "Admission answers that carried a JSON patch",
            patches.clone(),
        );
        registry.register(
            "warnings",
            "Warnings returned to API clients",
            warnings.clone(),
        );
        registry.register(
            "errors",
            "Requests that could not be answered (HTTP 4xx)",
            errors.clone(),
        );
        let by_resource = |family: &Family<ResourceLabels, Counter>| {
            RESOURCES.map(|resource| family.get_or_create(&ResourceLabels { resource }).clone())
        };
        let handles = Handles {
            requests: RESOURCES.map(|resource| {
                OUTCOMES.map(|outcome| {
                    requests
                        .get_or_create(&RequestLabels { resource, outcome })
                        .clone()
                })
            }),
            latency: RESOURCES
                .map(|resource| latency.get_or_create(&ResourceLabels { resource }).clone()),
            patches: by_resource(&patches),
            warnings: by_resource(&warnings),
            errors: by_resource(&errors),
        };
        let claim_fetches = Family::<ResultLabels, Counter>::default();
        registry.register(
            "claim_fetches",
            "Claims a pod named before the catalog's watch delivered them, asked of the API server, by result",
            claim_fetches.clone(),
        );
        let claim_fetches = ["found", "absent", "failed"].map(|result| {
            claim_fetches
                .get_or_create(&ResultLabels {
                    result: result.to_string(),
                })
                .clone()
        });
        let populator = PopulatorMetrics::register(&mut registry);
        Self {
            registry,
            handles,
            claim_fetches,
            populator,
        }
    }

    pub fn observe(&self, resource: Resource, outcome: Outcome, warnings: usize, seconds: f64) {
        let r = resource as usize;
        let h = &self.handles;
        h.requests[r][outcome as usize].inc();
        h.latency[r].observe(seconds);
        match outcome {
            Outcome::Patched => {
                h.patches[r].inc();
            }
            Outcome::BadRequest => {
                h.errors[r].inc();
            }
            Outcome::Unchanged | Outcome::Skipped => {}
        }
        if warnings > 0 {
            h.warnings[r].inc_by(warnings as u64);
        }
    }

    pub fn claims_fetched(&self, fetched: ClaimFetch) {
        let [found, absent, failed] = &self.claim_fetches;
        found.inc_by(fetched.found as u64);
        absent.inc_by(fetched.absent as u64);
        failed.inc_by(fetched.failed as u64);
    }

    /// Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_show_up_in_the_exposition() {
        let m = WebhookMetrics::new();
        m.observe(Resource::Pvc, Outcome::Patched, 2, 0.001);
        m.observe(Resource::Pod, Outcome::BadRequest, 0, 0.0001);
        let text = m.encode();
        assert!(
            text.contains(
                r#"vmdisk_webhook_admission_requests_total{resource="pvc",outcome="patched"} 1"#
            ),
            "{text}"
        );
        assert!(
            text.contains(r#"vmdisk_webhook_patches_applied_total{resource="pvc"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"vmdisk_webhook_warnings_total{resource="pvc"} 2"#),
            "{text}"
        );
        assert!(
            text.contains(r#"vmdisk_webhook_errors_total{resource="pod"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(
                r#"vmdisk_webhook_admission_requests_total{resource="pod",outcome="unchanged"} 0"#
            ),
            "{text}"
        );
        assert!(
            text.contains("vmdisk_webhook_admission_duration_seconds_bucket"),
            "{text}"
        );
        let populator = m.populator.clone();
        populator.observe("failed", 3.0);
        populator.set_in_flight(2);
        populator.retried();
        let text = m.encode();
        for line in [
            r#"vmdisk_webhook_populator_operation_duration_seconds_count{result="failed"} 1"#,
            "vmdisk_webhook_populator_operations_in_flight 2",
            "vmdisk_webhook_populator_retries_total 1",
        ] {
            assert!(text.contains(line), "{line} missing from {text}");
        }
    }
}
