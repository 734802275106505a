//! RBAC is derived from the code: what `deploy/rbac.yaml` grants each ServiceAccount is
//! exactly what its binary declares (`api_access()`), both ways, and every account a workload
//! runs as is installed, and every installed account is one a workload (or the populator's
//! pods) runs as.

use std::collections::{BTreeMap, BTreeSet};

use crate::docs;

/// The permissions `deploy/rbac.yaml` grants a ServiceAccount of vmdisk-system, as
/// (group, resource, verb, scope).
fn granted(account: &str) -> BTreeSet<vmdisk_crds::Permission> {
    use k8s_openapi::api::rbac::v1::{
        ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding,
    };
    use vmdisk_crds::AccessScope;
    let docs = docs("deploy/rbac.yaml");
    let of_kind = |kind: &'static str| docs.iter().filter(move |d| d["kind"] == kind).cloned();
    let cluster_roles: BTreeMap<String, ClusterRole> = of_kind("ClusterRole")
        .map(|d| serde_yaml::from_value::<ClusterRole>(d).unwrap())
        .map(|r| (r.metadata.name.clone().unwrap(), r))
        .collect();
    let roles: BTreeMap<(String, String), Role> = of_kind("Role")
        .map(|d| serde_yaml::from_value::<Role>(d).unwrap())
        .map(|r| {
            (
                (
                    r.metadata.namespace.clone().unwrap(),
                    r.metadata.name.clone().unwrap(),
                ),
                r,
            )
        })
        .collect();
    let binds_account = |subjects: &Option<Vec<k8s_openapi::api::rbac::v1::Subject>>| {
        subjects.iter().flatten().any(|s| {
            s.kind == "ServiceAccount"
                && s.name == account
                && s.namespace.as_deref() == Some(vmdisk_crds::INSTALL_NAMESPACE)
        })
    };
    let scope_of = |namespace: &str| match namespace {
        vmdisk_crds::INSTALL_NAMESPACE => AccessScope::InstallNamespace,
        vmdisk_crds::CREDENTIALS_NAMESPACE => AccessScope::CredentialsNamespace,
        "default" => AccessScope::DefaultNamespace,
        other => panic!("a Role in unexpected namespace {other}"),
    };
    let mut out = BTreeSet::new();
    let mut add = |rules: &[PolicyRule], scope: AccessScope| {
        for rule in rules {
            assert!(rule.resource_names.is_none() && rule.non_resource_urls.is_none());
            for group in rule.api_groups.iter().flatten() {
                for resource in rule.resources.iter().flatten() {
                    for verb in &rule.verbs {
                        assert!(
                            group != "*" && resource != "*" && verb != "*",
                            "no wildcards in vmdisk's RBAC"
                        );
                        out.insert((group.clone(), resource.clone(), verb.clone(), scope));
                    }
                }
            }
        }
    };
    for b in of_kind("ClusterRoleBinding") {
        let b: ClusterRoleBinding = serde_yaml::from_value(b).unwrap();
        if binds_account(&b.subjects) {
            assert_eq!(b.role_ref.kind, "ClusterRole");
            let role = &cluster_roles[&b.role_ref.name];
            add(
                role.rules.as_deref().unwrap_or_default(),
                AccessScope::Cluster,
            );
        }
    }
    for b in of_kind("RoleBinding") {
        let b: RoleBinding = serde_yaml::from_value(b).unwrap();
        if binds_account(&b.subjects) {
            let namespace = b.metadata.namespace.clone().unwrap();
            assert_eq!(
                b.role_ref.kind, "Role",
                "vmdisk binds ClusterRoles only cluster-wide"
            );
            let role = &roles[&(namespace.clone(), b.role_ref.name.clone())];
            add(
                role.rules.as_deref().unwrap_or_default(),
                scope_of(&namespace),
            );
        }
    }
    out
}

fn assert_same_permissions(account: &str, used: BTreeSet<vmdisk_crds::Permission>) {
    let granted = granted(account);
    let missing: Vec<_> = used.difference(&granted).collect();
    let extra: Vec<_> = granted.difference(&used).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "deploy/rbac.yaml and the code disagree for {account}:\n  used by the code but not granted: {missing:?}\n  granted but never used: {extra:?}"
    );
}

#[test]
fn webhook_rbac_is_exactly_what_the_code_uses() {
    assert_same_permissions("vmdisk-webhook", vmdisk_webhook::api_access());
}

#[test]
fn controller_rbac_is_exactly_what_the_code_uses() {
    assert_same_permissions("vmdisk-controller", vmdisk_controller::api_access());
}

#[test]
fn cache_agent_rbac_is_exactly_what_the_code_uses() {
    assert_same_permissions("vmdisk-cache-agent", vmdisk_cache_agent::api_access());
}

#[test]
fn populator_pod_rbac_is_exactly_what_populate_uses() {
    assert_same_permissions(
        "vmdisk-populator",
        vmdisk_cache_agent::populator_api_access(),
    );
}

/// The node-side accounts read no Secret at all: agents get the credentials of what their
/// node prefetches from the controller's agent API, and populator pods (root, with the node
/// cache's hostPath) mount theirs as a Secret volume the node's kubelet reads.
#[test]
fn agents_and_populator_pods_read_no_secret() {
    for account in ["vmdisk-cache-agent", "vmdisk-populator"] {
        let granted = granted(account);
        assert!(!granted.is_empty(), "{account}");
        assert!(
            granted
                .iter()
                .all(|(_, resource, _, _)| resource != "secrets"),
            "{account}: {granted:?}"
        );
    }
}

/// The admission server, which the API server calls over the network, only reads: no
/// Secrets, no writes of any kind, nothing in vmdisk's own namespaces.
#[test]
fn the_webhook_only_reads_and_never_secrets() {
    let granted = granted("vmdisk-webhook");
    assert!(!granted.is_empty());
    for (group, resource, verb, scope) in &granted {
        assert!(
            ["get", "list", "watch"].contains(&verb.as_str()),
            "the webhook may {verb} {group}/{resource}"
        );
        assert_ne!(resource, "secrets", "the webhook may {verb} Secrets");
        assert_eq!(
            *scope,
            vmdisk_crds::AccessScope::Cluster,
            "the webhook has a Role in {:?}",
            scope.namespace()
        );
    }
}

/// Every ServiceAccount a workload or the populator's pods run as is installed, each
/// installed one is used by one of them, and each is one whose grants a test above derives.
#[test]
fn service_accounts_are_exactly_the_ones_the_workloads_run_as() {
    let docs = docs("deploy/rbac.yaml");
    let installed: BTreeSet<String> = docs
        .iter()
        .filter(|d| d["kind"] == "ServiceAccount")
        .map(|d| {
            assert_eq!(
                d["metadata"]["namespace"].as_str(),
                Some(vmdisk_crds::INSTALL_NAMESPACE)
            );
            d["metadata"]["name"].as_str().unwrap().to_string()
        })
        .collect();
    let mut used: BTreeSet<String> = crate::installed_objects()
        .iter()
        .filter(|d| d["kind"] == "Deployment" || d["kind"] == "DaemonSet")
        .map(|d| {
            d["spec"]["template"]["spec"]["serviceAccountName"]
                .as_str()
                .unwrap_or_else(|| panic!("{} names no ServiceAccount", d["metadata"]["name"]))
                .to_string()
        })
        .collect();
    used.insert(vmdisk_crds::POPULATOR_SERVICE_ACCOUNT.to_string());
    assert_eq!(installed, used);
    let derived: BTreeSet<String> = [
        "vmdisk-webhook",
        "vmdisk-controller",
        "vmdisk-cache-agent",
        "vmdisk-populator",
    ]
    .map(String::from)
    .into();
    assert_eq!(
        installed, derived,
        "a ServiceAccount without a derivation test"
    );
    // Nothing is bound to an account that is not installed.
    for d in docs
        .iter()
        .filter(|d| d["kind"] == "RoleBinding" || d["kind"] == "ClusterRoleBinding")
    {
        for subject in d["subjects"].as_sequence().unwrap() {
            let name = subject["name"].as_str().unwrap();
            assert!(
                installed.contains(name),
                "{:?} binds {name}",
                d["metadata"]["name"]
            );
        }
    }
}
