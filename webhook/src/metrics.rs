//! Prometheus metrics of the admission server (`GET /metrics`).

use std::fmt::Write as _;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use vmdisk_support::metrics::Exposition;

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
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: String,
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
        Self {
            registry,
            handles,
            claim_fetches,
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
}

impl Exposition for WebhookMetrics {
    fn registry(&self) -> &Registry {
        &self.registry
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
    }
}
