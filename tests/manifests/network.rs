//! The NetworkPolicies let through exactly what vmdisk serves: every port a vmdisk-system pod
//! listens on is admitted by a policy that selects that pod, and everything else is refused by
//! a default deny.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::PodTemplateSpec;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::typed::{self, Object};

/// Whether `selector` selects a pod with `labels` (matchLabels and the `In` expressions the
/// manifests use; any other operator fails the test rather than being guessed at).
fn selects(selector: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    let labels_match = selector
        .match_labels
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v));
    let expressions_match = selector.match_expressions.iter().flatten().all(|e| {
        assert_eq!(e.operator, "In", "operator {} not handled here", e.operator);
        labels
            .get(&e.key)
            .is_some_and(|v| e.values.iter().flatten().any(|w| w == v))
    });
    labels_match && expressions_match
}

#[test]
fn every_served_port_is_admitted_and_everything_else_denied() {
    let objects: Vec<Object> = crate::installed_objects()
        .iter()
        .map(|d| typed::parse(d).unwrap())
        .collect();
    let policies: Vec<&NetworkPolicy> = objects
        .iter()
        .filter_map(|o| match o {
            Object::NetworkPolicy(p) => Some(p.as_ref()),
            _ => None,
        })
        .collect();
    let templates: Vec<(String, &PodTemplateSpec)> = objects
        .iter()
        .filter_map(|o| match o {
            Object::Deployment(d) => Some((d.metadata.name.clone()?, &d.spec.template)),
            Object::DaemonSet(d) => Some((d.metadata.name.clone()?, &d.spec.template)),
            _ => None,
        })
        .collect();
    assert!(templates.len() >= 3, "webhook, controller and agent");

    let deny_all = policies.iter().any(|p| {
        let spec = p.spec.as_ref().unwrap();
        spec.pod_selector.clone().unwrap_or_default() == LabelSelector::default()
            && spec.policy_types.iter().flatten().any(|t| t == "Ingress")
            && spec.ingress.as_ref().is_none_or(|rules| rules.is_empty())
    });
    assert!(deny_all, "a default-deny ingress policy for vmdisk-system");

    for (name, template) in templates {
        let labels = template
            .metadata
            .as_ref()
            .and_then(|m| m.labels.clone())
            .unwrap_or_default();
        let pod = template.spec.as_ref().unwrap();
        for port in pod.containers.iter().flat_map(|c| c.ports.iter().flatten()) {
            let port_name = port.name.clone().unwrap_or_default();
            let admitted = policies.iter().any(|p| {
                let spec = p.spec.as_ref().unwrap();
                selects(spec.pod_selector.as_ref().unwrap(), &labels)
                    && spec.ingress.iter().flatten().any(|rule| {
                        rule.ports.iter().flatten().any(|p| match &p.port {
                            Some(IntOrString::String(n)) => *n == port_name,
                            Some(IntOrString::Int(n)) => *n == port.container_port,
                            None => true,
                        })
                    })
            });
            assert!(
                admitted,
                "{name}: port {port_name} ({}) is admitted by no NetworkPolicy",
                port.container_port
            );
        }
    }
}
