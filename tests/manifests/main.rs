//! The manifests a user applies agree with the code: flags parse, paths exist, examples are
//! valid VMDiskImages, CRDs are the generated ones.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use clap::Parser;
use serde_yaml::Value;
use vmdisk_crds::{ImageReference, VMDiskImage};
use vmdisk_webhook::config::WebhookArgs;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn docs(path: &str) -> Vec<Value> {
    let text = std::fs::read_to_string(root().join(path)).unwrap();
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .filter(|v: &Value| !v.is_null())
        .collect()
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("{kind}/{name} missing"))
}

#[test]
fn webhook_deployment_args_parse_and_paths_match_routes() {
    let deploy = docs("deploy/webhook.yaml");
    let container =
        &find(&deploy, "Deployment", "vmdisk-webhook")["spec"]["template"]["spec"]["containers"][0];
    let mut argv = vec![container["command"][0].as_str().unwrap().to_string()];
    argv.extend(
        container["args"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap().to_string()),
    );
    let args = WebhookArgs::try_parse_from(&argv).unwrap();
    assert_eq!(args.listen.port(), 8443);
    assert_eq!(args.cert_dir, Path::new("/etc/vmdisk/tls"));
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz");

    let hooks = docs("deploy/mutating-webhook.yaml");
    let config = find(&hooks, "MutatingWebhookConfiguration", "vmdisk");
    let paths: Vec<&str> = config["webhooks"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|w| w["clientConfig"]["service"]["path"].as_str().unwrap())
        .collect();
    assert_eq!(paths, ["/mutate-pvc", "/mutate-pod"]);
    for hook in config["webhooks"].as_sequence().unwrap() {
        assert_eq!(
            hook["sideEffects"], "None",
            "dryRun requests need sideEffects None"
        );
        assert_eq!(hook["admissionReviewVersions"][0], "v1");
    }
    let certs = docs("certs/cert-manager.yaml");
    let cert = find(&certs, "Certificate", "vmdisk-webhook");
    assert_eq!(
        config["metadata"]["annotations"]["cert-manager.io/inject-ca-from"],
        "vmdisk-system/vmdisk-webhook"
    );
    let secret = cert["spec"]["secretName"].as_str().unwrap();
    let volumes =
        &find(&deploy, "Deployment", "vmdisk-webhook")["spec"]["template"]["spec"]["volumes"];
    assert_eq!(volumes[0]["secret"]["secretName"].as_str(), Some(secret));
}

#[test]
fn examples_are_valid_images() {
    let examples = docs("deploy/examples/vmdiskimage.yaml");
    assert!(!examples.is_empty());
    for doc in examples {
        let image: VMDiskImage = serde_yaml::from_value(doc).unwrap();
        ImageReference::parse(&image.spec.source.registry.url).unwrap();
        if let Some(size) = &image.spec.size {
            vmdisk_crds::parse_quantity(size).unwrap();
        }
    }
}

#[test]
fn installed_crds_are_the_generated_ones() {
    let on_disk = std::fs::read_to_string(root().join("deploy/crds.yaml")).unwrap();
    assert_eq!(on_disk, vmdisk_crds::crds_yaml());
    let kustomization = docs("deploy/kustomization.yaml");
    let resources: Vec<&str> = kustomization[0]["resources"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap())
        .collect();
    for r in &resources {
        assert!(
            root().join("deploy").join(r).exists(),
            "kustomization names missing {r}"
        );
    }
    assert!(resources.contains(&"crds.yaml"));
}

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

#[test]
fn agents_read_secrets_only_in_the_credentials_namespace() {
    let secrets: Vec<_> = granted("vmdisk-cache-agent")
        .into_iter()
        .filter(|(_, resource, _, _)| resource == "secrets")
        .collect();
    assert_eq!(
        secrets,
        vec![(
            "".to_string(),
            "secrets".to_string(),
            "get".to_string(),
            vmdisk_crds::AccessScope::CredentialsNamespace
        )]
    );
}
