//! The manifests a user applies agree with the code: flags parse, paths exist, examples are
//! valid VMDiskImages, CRDs are the generated ones.

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
