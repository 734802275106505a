//! `PodAffinityMutation`: steer pods that use VMDiskImage-backed volumes toward warm nodes.
//!
//! The webhook only adds *preferred* node affinity: the scheduler still decides, so a pod is
//! never unschedulable because no node is warm yet.

use std::collections::BTreeSet;

use k8s_openapi::api::core::v1::{
    Affinity, NodeAffinity, NodeSelectorRequirement, NodeSelectorTerm, Pod,
    PreferredSchedulingTerm, Volume,
};
use vmdisk_crds::{node_cache_label_key, IMAGE_ANNOTATION};

use super::pvc::image_claim;
use super::{ImageLookup, Mutation, MutationConfig};

/// Names of the VMDiskImages a pod's volumes come from, with warnings for claims the catalog
/// cannot place yet.
fn images_of_volume(
    volume: &Volume,
    namespace: &str,
    images: &dyn ImageLookup,
) -> Option<String> {
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

/// Decides the patch for a Pod at CREATE.
pub fn mutate_pod(
    pod: &Pod,
    namespace: &str,
    images: &dyn ImageLookup,
    config: &MutationConfig,
) -> Mutation<Pod> {
    let mut warnings = Vec::new();
    let volumes = pod.spec.as_ref().and_then(|s| s.volumes.as_ref());
    let image_names: BTreeSet<String> = volumes
        .into_iter()
        .flatten()
        .filter_map(|v| images_of_volume(v, namespace, images))
        .collect();
    let mut label_keys = Vec::new();
    for name in &image_names {
        match images.image(namespace, name) {
            None => warnings.push(format!(
                "VMDiskImage {namespace}/{name} not found: no node preference added"
            )),
            Some(image) => match image.digest().and_then(node_cache_label_key) {
                Some(key) => label_keys.push(key),
                None => warnings.push(format!(
                    "VMDiskImage {namespace}/{name} is not resolved yet: no node preference added"
                )),
            },
        }
    }
    if label_keys.is_empty() {
        return Mutation {
            patched: None,
            warnings,
        };
    }

    let mut out = pod.clone();
    let spec = out.spec.get_or_insert_with(Default::default);
    let preferred = spec
        .affinity
        .get_or_insert_with(Affinity::default)
        .node_affinity
        .get_or_insert_with(NodeAffinity::default)
        .preferred_during_scheduling_ignored_during_execution
        .get_or_insert_with(Vec::new);
    for key in label_keys {
        if !has_term_for(preferred, &key) {
            preferred.push(warm_node_term(&key, config.affinity_weight));
        }
    }
    let changed = out != *pod;
    Mutation {
        patched: changed.then_some(out),
        warnings,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mutate::tests_support::{image, Images};
    use serde_json::json;

    const DIGEST: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn pod(spec: serde_json::Value) -> Pod {
        serde_json::from_value(json!({"metadata": {"generateName": "web-"}, "spec": spec})).unwrap()
    }

    fn catalog() -> Images {
        let mut imgs = Images::with(image("fedora", Some(DIGEST), Some(1 << 30), None));
        imgs.claims.insert(("vms".into(), "root".into()), "fedora".into());
        imgs
    }

    fn preferred(p: &Pod) -> Vec<PreferredSchedulingTerm> {
        p.spec.as_ref().unwrap().affinity.as_ref().unwrap().node_affinity.as_ref().unwrap()
            .preferred_during_scheduling_ignored_during_execution.clone().unwrap()
    }

    #[test]
    fn pvc_volume_gets_preferred_affinity() {
        let p = pod(json!({"containers": [], "volumes": [{"name": "d", "persistentVolumeClaim": {"claimName": "root"}}]}));
        let m = mutate_pod(&p, "vms", &catalog(), &MutationConfig::default());
        let out = m.patched.unwrap();
        let terms = preferred(&out);
        assert_eq!(terms.len(), 1);
        let expr = &terms[0].preference.match_expressions.as_ref().unwrap()[0];
        assert_eq!(expr.key, node_cache_label_key(DIGEST).unwrap());
        assert_eq!(expr.operator, "Exists");
        assert_eq!(terms[0].weight, 80);
    }

    #[test]
    fn existing_affinity_is_merged_and_required_untouched() {
        let required = json!({"nodeSelectorTerms": [{"matchExpressions": [{"key": "kubernetes.io/arch", "operator": "In", "values": ["amd64"]}]}]});
        let p = pod(json!({
            "containers": [],
            "affinity": {"nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": required,
                "preferredDuringSchedulingIgnoredDuringExecution": [{"weight": 10, "preference": {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]}}]
            }},
            "volumes": [{"name": "d", "persistentVolumeClaim": {"claimName": "root"}}]
        }));
        let out = mutate_pod(&p, "vms", &catalog(), &MutationConfig::default()).patched.unwrap();
        let na = out.spec.as_ref().unwrap().affinity.as_ref().unwrap().node_affinity.as_ref().unwrap();
        assert_eq!(serde_json::to_value(&na.required_during_scheduling_ignored_during_execution).unwrap(), required);
        let terms = preferred(&out);
        assert_eq!(terms.len(), 2);
        assert_eq!(terms[0].weight, 10);
    }

    #[test]
    fn reinvocation_is_idempotent() {
        let p = pod(json!({"containers": [], "volumes": [{"name": "d", "persistentVolumeClaim": {"claimName": "root"}}]}));
        let once = mutate_pod(&p, "vms", &catalog(), &MutationConfig::default()).patched.unwrap();
        assert_eq!(mutate_pod(&once, "vms", &catalog(), &MutationConfig::default()).patched, None);
    }

    #[test]
    fn two_volumes_of_one_image_add_one_term() {
        let mut imgs = catalog();
        imgs.claims.insert(("vms".into(), "data".into()), "fedora".into());
        let p = pod(json!({"containers": [], "volumes": [
            {"name": "a", "persistentVolumeClaim": {"claimName": "root"}},
            {"name": "b", "persistentVolumeClaim": {"claimName": "data"}}]}));
        let out = mutate_pod(&p, "vms", &imgs, &MutationConfig::default()).patched.unwrap();
        assert_eq!(preferred(&out).len(), 1);
    }

    #[test]
    fn ephemeral_template_naming_an_image_counts() {
        let p = pod(json!({"containers": [], "volumes": [{"name": "s", "ephemeral": {"volumeClaimTemplate": {"spec": {
            "dataSourceRef": {"apiGroup": "vmdisk.io", "kind": "VMDiskImage", "name": "fedora"}}}}}]}));
        let out = mutate_pod(&p, "vms", &catalog(), &MutationConfig::default()).patched.unwrap();
        assert_eq!(preferred(&out).len(), 1);
    }

    #[test]
    fn unknown_claims_and_plain_volumes_pass_through() {
        let p = pod(json!({"containers": [], "volumes": [
            {"name": "x", "persistentVolumeClaim": {"claimName": "unrelated"}},
            {"name": "e", "emptyDir": {}}]}));
        assert_eq!(mutate_pod(&p, "vms", &catalog(), &MutationConfig::default()), Mutation::unchanged());
    }

    #[test]
    fn unresolved_image_warns_without_patch() {
        let mut imgs = Images::with(image("fedora", None, None, None));
        imgs.claims.insert(("vms".into(), "root".into()), "fedora".into());
        let p = pod(json!({"containers": [], "volumes": [{"name": "d", "persistentVolumeClaim": {"claimName": "root"}}]}));
        let m = mutate_pod(&p, "vms", &imgs, &MutationConfig::default());
        assert_eq!(m.patched, None);
        assert!(m.warnings[0].contains("not resolved"));
    }
}
