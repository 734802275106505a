//! [`PodAffinityMutation`]: steer pods that use VMDiskImage-backed volumes toward warm nodes.
//!
//! The webhook only adds *preferred* node affinity: the scheduler still decides, so a pod is
//! never unschedulable because no node is warm yet.

use std::collections::BTreeSet;

use k8s_openapi::api::core::v1::{
    NodeSelectorRequirement, NodeSelectorTerm, PodSpec, PreferredSchedulingTerm, Volume,
};
use serde_json::json;
use vmdisk_crds::{node_cache_label_key, IMAGE_ANNOTATION};

use super::patch::PatchBuilder;
use super::pvc::image_claim;
use super::{ImageLookup, Mutation, MutationConfig};

/// The VMDiskImage a pod volume comes from, if the catalog knows it.
fn image_of_volume(volume: &Volume, namespace: &str, images: &dyn ImageLookup) -> Option<String> {
    if let Some(pvc) = &volume.persistent_volume_claim {
        return images.claim_image(namespace, &pvc.claim_name);
    }
    let template = volume.ephemeral.as_ref()?.volume_claim_template.as_ref()?;
    let annotation = template
        .metadata
        .as_ref()
        .and_then(|m| m.annotations.as_ref())
        .and_then(|a| a.get(IMAGE_ANNOTATION))
        .map(String::as_str);
    let (claim, _) = image_claim(Some(&template.spec), annotation);
    claim.map(|c| c.image_name().to_string())
}

/// The preferred term this webhook adds for one node label key.
pub fn warm_node_term(label_key: &str, weight: i32) -> PreferredSchedulingTerm {
    PreferredSchedulingTerm {
        weight,
        preference: NodeSelectorTerm {
            match_expressions: Some(vec![NodeSelectorRequirement {
                key: label_key.to_string(),
                operator: "Exists".to_string(),
                values: None,
            }]),
            match_fields: None,
        },
    }
}

/// A term already asks for this key, whatever its weight: adding another would only double it.
fn has_term_for(terms: &[PreferredSchedulingTerm], label_key: &str) -> bool {
    terms.iter().any(|t| {
        t.preference
            .match_expressions
            .iter()
            .flatten()
            .any(|e| e.key == label_key && e.operator == "Exists")
    })
}

/// The preferred terms a pod gains, toward nodes whose cache holds its images.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct PodAffinityMutation {
    pub terms: Vec<PreferredSchedulingTerm>,
    pub warnings: Vec<String>,
}

impl PodAffinityMutation {
    /// Decides the terms for a Pod at CREATE. `spec` is the pod's (`None`: absent or null);
    /// only its volumes and affinity are read.
    pub fn plan(
        spec: Option<&PodSpec>,
        namespace: &str,
        images: &dyn ImageLookup,
        config: &MutationConfig,
    ) -> Self {
        let mut out = Self::default();
        let image_names: BTreeSet<String> = spec
            .and_then(|s| s.volumes.as_ref())
            .into_iter()
            .flatten()
            .filter_map(|v| image_of_volume(v, namespace, images))
            .collect();
        if image_names.is_empty() {
            return out;
        }
        let existing: &[PreferredSchedulingTerm] = spec
            .and_then(|s| s.affinity.as_ref())
            .and_then(|a| a.node_affinity.as_ref())
            .and_then(|n| {
                n.preferred_during_scheduling_ignored_during_execution
                    .as_deref()
            })
            .unwrap_or(&[]);
        for name in &image_names {
            match images.image(namespace, name) {
                None => out.warnings.push(format!(
                    "VMDiskImage {namespace}/{name} not found: no node preference added"
                )),
                Some(image) => match image.digest().and_then(node_cache_label_key) {
                    Some(key) => {
                        if !has_term_for(existing, &key) && !has_term_for(&out.terms, &key) {
                            out.terms.push(warm_node_term(&key, config.affinity_weight));
                        }
                    }
                    None => out.warnings.push(format!(
                        "VMDiskImage {namespace}/{name} is not resolved yet: no node preference added"
                    )),
                },
            }
        }
        out
    }

    /// The JSON patch appending the terms, addressing only parents that exist in the pod
    /// whose `spec` this is.
    pub fn patch(&self, spec: Option<&PodSpec>) -> Option<json_patch::Patch> {
        if self.terms.is_empty() {
            return None;
        }
        const PREFERRED: &str = "preferredDuringSchedulingIgnoredDuringExecution";
        let terms = serde_json::to_value(&self.terms).expect("terms serialize");
        let mut b = PatchBuilder::default();
        match spec.map(|s| s.affinity.as_ref()) {
            None => b.add(
                &["spec"],
                json!({"affinity": {"nodeAffinity": {PREFERRED: terms}}}),
            ),
            Some(None) => b.add(
                &["spec", "affinity"],
                json!({"nodeAffinity": {PREFERRED: terms}}),
            ),
            Some(Some(a)) => match &a.node_affinity {
                None => b.add(
                    &["spec", "affinity", "nodeAffinity"],
                    json!({PREFERRED: terms}),
                ),
                Some(n)
                    if n.preferred_during_scheduling_ignored_during_execution
                        .is_none() =>
                {
                    b.add(&["spec", "affinity", "nodeAffinity", PREFERRED], terms)
                }
                Some(_) => {
                    for term in &self.terms {
                        b.add(
                            &["spec", "affinity", "nodeAffinity", PREFERRED, "-"],
                            serde_json::to_value(term).expect("a term serializes"),
                        );
                    }
                }
            },
        }
        b.build()
    }
}

/// Decides and builds the patch for a Pod at CREATE.
pub fn mutate_pod(
    spec: Option<&PodSpec>,
    namespace: &str,
    images: &dyn ImageLookup,
    config: &MutationConfig,
) -> Mutation {
    let plan = PodAffinityMutation::plan(spec, namespace, images, config);
    Mutation {
        patch: plan.patch(spec),
        warnings: plan.warnings,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mutate::tests_support::{image, Images};
    use k8s_openapi::api::core::v1::Pod;
    use serde_json::Value;

    const DIGEST: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn pod(spec: Value) -> Value {
        json!({"metadata": {"generateName": "web-"}, "spec": spec})
    }

    /// The pod's spec as the decision reads it: volumes and affinity as k8s-openapi reads them.
    fn spec_of(doc: &Value) -> Option<PodSpec> {
        let spec = &doc["spec"];
        (!spec.is_null()).then(|| PodSpec {
            volumes: serde_json::from_value(spec["volumes"].clone()).unwrap(),
            affinity: serde_json::from_value(spec["affinity"].clone()).unwrap(),
            ..Default::default()
        })
    }

    fn run(images: &Images, doc: Value) -> (Option<Pod>, Vec<String>) {
        let spec = spec_of(&doc);
        let m = mutate_pod(spec.as_ref(), "vms", images, &MutationConfig::default());
        let patched = m.patch.map(|p| {
            let mut doc = doc;
            json_patch::patch(&mut doc, &p).unwrap();
            serde_json::from_value(doc).unwrap()
        });
        (patched, m.warnings)
    }

    fn catalog() -> Images {
        let mut imgs = Images::with(image("fedora", Some(DIGEST), Some(1 << 30), None));
        imgs.claims
            .insert(("vms".into(), "root".into()), "fedora".into());
        imgs
    }

    fn preferred(p: &Pod) -> Vec<PreferredSchedulingTerm> {
        p.spec
            .as_ref()
            .unwrap()
            .affinity
            .as_ref()
            .unwrap()
            .node_affinity
            .as_ref()
            .unwrap()
            .preferred_during_scheduling_ignored_during_execution
            .clone()
            .unwrap()
    }

    fn pvc_volume() -> Value {
        json!([{"name": "d", "persistentVolumeClaim": {"claimName": "root"}}])
    }

    #[test]
    fn pvc_volume_gets_preferred_affinity() {
        let (out, _) = run(
            &catalog(),
            pod(json!({"containers": [], "volumes": pvc_volume()})),
        );
        let terms = preferred(&out.unwrap());
        assert_eq!(terms.len(), 1);
        let expr = &terms[0].preference.match_expressions.as_ref().unwrap()[0];
        assert_eq!(expr.key, node_cache_label_key(DIGEST).unwrap());
        assert_eq!(expr.operator, "Exists");
        assert_eq!(terms[0].weight, 80);
    }

    #[test]
    fn existing_affinity_is_merged_and_required_untouched() {
        let required = json!({"nodeSelectorTerms": [{"matchExpressions": [{"key": "kubernetes.io/arch", "operator": "In", "values": ["amd64"]}]}]});
        let (out, _) = run(
            &catalog(),
            pod(json!({
                "containers": [],
                "affinity": {"nodeAffinity": {
                    "requiredDuringSchedulingIgnoredDuringExecution": required,
                    "preferredDuringSchedulingIgnoredDuringExecution": [{"weight": 10, "preference": {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]}}]
                }},
                "volumes": pvc_volume()
            })),
        );
        let out = out.unwrap();
        let na = out
            .spec
            .as_ref()
            .unwrap()
            .affinity
            .as_ref()
            .unwrap()
            .node_affinity
            .as_ref()
            .unwrap();
        assert_eq!(
            serde_json::to_value(&na.required_during_scheduling_ignored_during_execution).unwrap(),
            required
        );
        let terms = preferred(&out);
        assert_eq!(terms.len(), 2);
        assert_eq!(terms[0].weight, 10);
    }

    #[test]
    fn affinity_without_node_affinity_is_extended() {
        let (out, _) = run(
            &catalog(),
            pod(json!({"affinity": {"podAffinity": {}}, "volumes": pvc_volume()})),
        );
        let out = out.unwrap();
        assert!(out
            .spec
            .as_ref()
            .unwrap()
            .affinity
            .as_ref()
            .unwrap()
            .pod_affinity
            .is_some());
        assert_eq!(preferred(&out).len(), 1);
    }

    #[test]
    fn reinvocation_is_idempotent() {
        let (once, _) = run(
            &catalog(),
            pod(json!({"containers": [], "volumes": pvc_volume()})),
        );
        let (twice, w) = run(&catalog(), serde_json::to_value(once.unwrap()).unwrap());
        assert!(twice.is_none() && w.is_empty());
    }

    #[test]
    fn two_volumes_of_one_image_add_one_term() {
        let mut imgs = catalog();
        imgs.claims
            .insert(("vms".into(), "data".into()), "fedora".into());
        let (out, _) = run(
            &imgs,
            pod(json!({"containers": [], "volumes": [
            {"name": "a", "persistentVolumeClaim": {"claimName": "root"}},
            {"name": "b", "persistentVolumeClaim": {"claimName": "data"}}]})),
        );
        assert_eq!(preferred(&out.unwrap()).len(), 1);
    }

    #[test]
    fn ephemeral_template_naming_an_image_counts() {
        let (out, _) = run(
            &catalog(),
            pod(
                json!({"containers": [], "volumes": [{"name": "s", "ephemeral": {"volumeClaimTemplate": {"spec": {
            "dataSourceRef": {"apiGroup": "vmdisk.io", "kind": "VMDiskImage", "name": "fedora"}}}}}]}),
            ),
        );
        assert_eq!(preferred(&out.unwrap()).len(), 1);
    }

    #[test]
    fn unknown_claims_and_plain_volumes_pass_through() {
        let (out, w) = run(
            &catalog(),
            pod(json!({"containers": [], "volumes": [
            {"name": "x", "persistentVolumeClaim": {"claimName": "unrelated"}},
            {"name": "e", "emptyDir": {}}]})),
        );
        assert!(out.is_none() && w.is_empty());
    }

    #[test]
    fn unresolved_image_warns_without_patch() {
        let mut imgs = Images::with(image("fedora", None, None, None));
        imgs.claims
            .insert(("vms".into(), "root".into()), "fedora".into());
        let (out, w) = run(
            &imgs,
            pod(json!({"containers": [], "volumes": pvc_volume()})),
        );
        assert!(out.is_none());
        assert!(w[0].contains("not resolved"));
    }
}
