//! The manifests a user applies agree with the code and with each other: every object is a
//! typed object without unknown fields, flags parse, ports, Secrets, certificates and paths
//! line up, examples are valid, CRDs are the generated ones, RBAC is what the code uses.

mod agent_api;
mod controller;
mod network;
mod rbac;
mod typed;

use std::collections::BTreeSet;
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

/// Every object `kubectl apply -k deploy/` installs: the kustomize output when kubectl is here
/// (it is what a user applies), the files it names otherwise.
fn installed_objects() -> Vec<serde_json::Value> {
    let rendered = std::process::Command::new("kubectl")
        .args(["kustomize", "deploy/"])
        .current_dir(root())
        .output();
    let text = match rendered {
        Ok(out) if out.status.success() => String::from_utf8(out.stdout).unwrap(),
        other => {
            println!("kubectl kustomize unavailable ({other:?}): checking the files instead");
            let mut text = String::new();
            for file in kustomization_files() {
                text.push_str(&std::fs::read_to_string(file).unwrap());
                text.push_str("\n---\n");
            }
            text
        }
    };
    yaml_documents(&text)
}

fn yaml_documents(text: &str) -> Vec<serde_json::Value> {
    serde_yaml::Deserializer::from_str(text)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .filter(|v: &serde_json::Value| !v.is_null())
        .collect()
}

/// The files deploy/kustomization.yaml names, following ../certs.
fn kustomization_files() -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        let k: serde_yaml::Value =
            serde_yaml::from_str(&std::fs::read_to_string(dir.join("kustomization.yaml")).unwrap())
                .unwrap();
        for r in k["resources"].as_sequence().unwrap() {
            let path = dir.join(r.as_str().unwrap());
            if path.is_dir() {
                walk(&path, out);
            } else {
                out.push(path);
            }
        }
    }
    let mut out = Vec::new();
    walk(&root().join("deploy"), &mut out);
    out
}

/// The installed Deployment of that name.
fn deployment<'a>(
    objects: &'a [typed::Object],
    name: &str,
) -> &'a k8s_openapi::api::apps::v1::Deployment {
    objects
        .iter()
        .find_map(|o| match o {
            typed::Object::Deployment(d) if d.metadata.name.as_deref() == Some(name) => Some(&**d),
            _ => None,
        })
        .unwrap_or_else(|| panic!("the {name} Deployment"))
}

/// A container's command line as its binary sees it: command, args, and a flag for each
/// environment variable the manifest sets. Every variable must name a flag of the binary: a
/// variable nothing reads is a manifest out of step with the code.
fn container_argv(
    container: &k8s_openapi::api::core::v1::Container,
    command: &clap::Command,
) -> Vec<String> {
    let mut argv: Vec<String> = container
        .command
        .iter()
        .flatten()
        .chain(container.args.iter().flatten())
        .cloned()
        .collect();
    for var in container.env.iter().flatten() {
        let arg = command
            .get_arguments()
            .find(|a| a.get_env().is_some_and(|e| e == var.name.as_str()))
            .unwrap_or_else(|| {
                panic!(
                    "container {} sets {}, which no flag of {} reads",
                    container.name,
                    var.name,
                    command.get_name()
                )
            });
        argv.push(format!(
            "--{}=from-the-environment",
            arg.get_long().unwrap()
        ));
    }
    argv
}

/// Each probe of `container` asks a path `router` serves (anything but a 404), on a port the
/// container declares; returns the probed paths.
fn probes_are_served(
    container: &k8s_openapi::api::core::v1::Container,
    router: &axum::Router,
) -> BTreeSet<String> {
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let mut paths = BTreeSet::new();
    for probe in [&container.readiness_probe, &container.liveness_probe]
        .into_iter()
        .flatten()
    {
        let get = probe.http_get.as_ref().expect("an HTTP probe");
        let declared = container.ports.iter().flatten().any(|p| match &get.port {
            IntOrString::String(name) => p.name.as_deref() == Some(name.as_str()),
            IntOrString::Int(n) => p.container_port == *n,
        });
        assert!(
            declared,
            "{}: probe port {:?} is not declared",
            container.name, get.port
        );
        let path = get.path.clone().unwrap();
        let status = runtime.block_on(async {
            use tower::ServiceExt as _;
            router
                .clone()
                .oneshot(
                    http::Request::get(&path)
                        .body(axum::body::Body::empty())
                        .unwrap(),
                )
                .await
                .unwrap()
                .status()
        });
        assert_ne!(
            status, 404,
            "{}: the probe's {path} is not served",
            container.name
        );
        paths.insert(path);
    }
    paths
}

#[test]
fn every_manifest_is_a_typed_object_without_unknown_fields() {
    let mut files: Vec<PathBuf> = kustomization_files();
    files.extend(example_files());
    let mut problems = Vec::new();
    let mut count = 0;
    for file in &files {
        for doc in yaml_documents(&std::fs::read_to_string(file).unwrap()) {
            count += 1;
            let result = match doc["kind"].as_str() {
                Some("VMDiskImage") => typed::strict_value::<VMDiskImage>(&doc).map(|_| ()),
                Some("Pod") => {
                    typed::strict_value::<k8s_openapi::api::core::v1::Pod>(&doc).map(|_| ())
                }
                Some("PersistentVolumeClaim") => {
                    typed::strict_value::<k8s_openapi::api::core::v1::PersistentVolumeClaim>(&doc)
                        .map(|_| ())
                }
                _ => typed::parse(&doc).map(|_| ()),
            };
            if let Err(e) = result {
                problems.push(format!("{}: {e}", file.display()));
            }
        }
    }
    for doc in installed_objects() {
        if let Err(e) = typed::parse(&doc) {
            problems.push(format!("kustomize output: {e}"));
        }
    }
    assert!(problems.is_empty(), "{problems:#?}");
    assert!(count > 30, "only {count} documents found");
}

#[test]
fn the_installed_objects_agree_with_each_other_and_with_the_binaries() {
    use typed::Object;
    let objects: Vec<Object> = installed_objects()
        .iter()
        .map(|d| typed::parse(d).unwrap())
        .collect();
    let deployment = deployment(&objects, "vmdisk-webhook");
    let daemonset = objects
        .iter()
        .find_map(|o| match o {
            Object::DaemonSet(d) => Some(d),
            _ => None,
        })
        .expect("the agent DaemonSet");
    let service = objects
        .iter()
        .find_map(|o| match o {
            Object::Service(s) if s.metadata.name.as_deref() == Some("vmdisk-webhook") => Some(s),
            _ => None,
        })
        .expect("the webhook Service");
    let hooks = objects
        .iter()
        .find_map(|o| match o {
            Object::MutatingWebhookConfiguration(m) => Some(m),
            _ => None,
        })
        .expect("the MutatingWebhookConfiguration");
    let certificate = objects
        .iter()
        .find_map(|o| match o {
            Object::Certificate(c) if c.metadata.name == "vmdisk-webhook" => Some(c),
            _ => None,
        })
        .expect("the serving Certificate");
    let namespaces: BTreeSet<String> = objects
        .iter()
        .filter_map(|o| match o {
            Object::Namespace(n) => n.metadata.name.clone(),
            _ => None,
        })
        .collect();
    let accounts: BTreeSet<String> = objects
        .iter()
        .filter_map(|o| match o {
            Object::ServiceAccount(a) => a.metadata.name.clone(),
            _ => None,
        })
        .collect();

    // The webhook's container: its flags parse, its port is the Service's target, its
    // certificate is the Certificate's Secret, its account exists, it runs as non-root.
    let pod = deployment.spec.template.spec.as_ref().unwrap();
    let webhook = &pod.containers[0];
    let argv = container_argv(webhook, &<WebhookArgs as clap::CommandFactory>::command());
    let args = WebhookArgs::try_parse_from(&argv).unwrap_or_else(|e| panic!("{argv:?}: {e}"));
    let port = webhook
        .ports
        .iter()
        .flatten()
        .find(|p| p.container_port == i32::from(args.listen.port()))
        .expect("a container port for --listen");
    let svc_spec = service.spec.as_ref().unwrap();
    let target = svc_spec.ports.as_ref().unwrap()[0]
        .target_port
        .as_ref()
        .unwrap();
    match target {
        k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String(name) => {
            assert_eq!(
                port.name.as_deref(),
                Some(name.as_str()),
                "Service → container port"
            )
        }
        k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(n) => {
            assert_eq!(*n, port.container_port)
        }
    }
    assert_eq!(
        svc_spec.selector.as_ref().unwrap(),
        deployment.spec.selector.match_labels.as_ref().unwrap(),
        "the Service selects the webhook pods"
    );
    let tls_mount = webhook
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| Path::new(&m.mount_path) == args.cert_dir)
        .expect("--cert-dir is mounted");
    let tls_volume = pod
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == tls_mount.name)
        .unwrap();
    assert_eq!(
        tls_volume.secret.as_ref().unwrap().secret_name.as_deref(),
        Some(certificate.spec.secret_name.as_str()),
        "the Deployment mounts the Certificate's Secret"
    );
    let svc_name = service.metadata.name.clone().unwrap();
    let svc_ns = service.metadata.namespace.clone().unwrap();
    assert!(
        certificate
            .spec
            .dns_names
            .iter()
            .flatten()
            .any(|n| *n == format!("{svc_name}.{svc_ns}.svc")),
        "the certificate names the Service"
    );
    assert_eq!(
        pod.security_context.as_ref().unwrap().run_as_non_root,
        Some(true)
    );
    assert!(
        pod.security_context
            .as_ref()
            .unwrap()
            .run_as_user
            .is_some_and(|u| u != 0),
        "the user is set in the manifest, not only in the image"
    );
    for spec in [pod, daemonset.spec.template.spec.as_ref().unwrap()] {
        let account = spec.service_account_name.clone().unwrap();
        assert!(
            accounts.contains(&account),
            "ServiceAccount {account} is installed"
        );
    }
    for ns in [&svc_ns, &vmdisk_crds::CREDENTIALS_NAMESPACE.to_string()] {
        assert!(namespaces.contains(ns), "namespace {ns} is installed");
    }

    // The agent's flags parse, with what the downward API puts in its environment.
    let agent = &daemonset.spec.template.spec.as_ref().unwrap().containers[0];
    let mut argv: Vec<String> = agent
        .command
        .iter()
        .flatten()
        .chain(agent.args.iter().flatten())
        .cloned()
        .collect();
    let command = <vmdisk_cache_agent::cli::Cli as clap::CommandFactory>::command();
    let run = command.find_subcommand("run").unwrap();
    for var in agent.env.iter().flatten() {
        if let Some(arg) = run
            .get_arguments()
            .find(|a| a.get_env().is_some_and(|e| e == var.name.as_str()))
        {
            argv.push(format!(
                "--{}=from-the-environment",
                arg.get_long().unwrap()
            ));
        }
    }
    vmdisk_cache_agent::cli::Cli::try_parse_from(&argv).unwrap_or_else(|e| panic!("{argv:?}: {e}"));

    // The webhook configuration: the CA comes from that Certificate, each webhook calls the
    // Service on a port it has and a path the server serves.
    let annotation = hooks
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get("cert-manager.io/inject-ca-from"))
        .expect("inject-ca-from");
    assert_eq!(
        annotation,
        &format!(
            "{}/{}",
            certificate.metadata.namespace.as_deref().unwrap(),
            certificate.metadata.name
        )
    );
    struct NoImages;
    impl vmdisk_webhook::mutate::ImageLookup for NoImages {
        fn image(&self, _: &str, _: &str) -> Option<std::sync::Arc<VMDiskImage>> {
            None
        }
        fn claim_image(&self, _: &str, _: &str) -> Option<String> {
            None
        }
    }
    impl vmdisk_webhook::catalog::ImageCatalog for NoImages {
        fn is_synced(&self) -> bool {
            true
        }
    }
    let router = vmdisk_webhook::routes::router(std::sync::Arc::new(
        vmdisk_webhook::routes::Webhook::new(std::sync::Arc::new(NoImages), Default::default()),
    ));
    assert_eq!(
        probes_are_served(webhook, &router),
        BTreeSet::from(["/healthz".to_string(), "/readyz".to_string()])
    );
    let runtime = tokio::runtime::Runtime::new().unwrap();
    for hook in hooks.webhooks.as_ref().unwrap() {
        let svc = hook.client_config.service.as_ref().unwrap();
        assert_eq!(
            (svc.name.as_str(), svc.namespace.as_str()),
            (svc_name.as_str(), svc_ns.as_str())
        );
        assert!(svc_spec
            .ports
            .as_ref()
            .unwrap()
            .iter()
            .any(|p| Some(p.port) == svc.port));
        assert_eq!(hook.side_effects, "None", "dry runs need sideEffects None");
        assert_eq!(hook.admission_review_versions, ["v1"]);
        let path = svc.path.clone().unwrap();
        let status = runtime.block_on(async {
            use tower::ServiceExt as _;
            router
                .clone()
                .oneshot(
                    http::Request::post(&path)
                        .header("content-type", "application/json")
                        .body(axum::body::Body::from("{}"))
                        .unwrap(),
                )
                .await
                .unwrap()
                .status()
        });
        assert_eq!(
            status, 400,
            "{path} is served (a bad review is a 400, a missing route a 404)"
        );
    }
    let pvc_hook = &hooks.webhooks.as_ref().unwrap()[0];
    assert_eq!(pvc_hook.failure_policy.as_deref(), Some("Fail"));
    assert!(pvc_hook
        .match_conditions
        .as_ref()
        .is_some_and(|c| !c.is_empty()));
    let pod_hook = &hooks.webhooks.as_ref().unwrap()[1];
    assert_eq!(pod_hook.failure_policy.as_deref(), Some("Ignore"));
}

#[test]
fn images_pinned_by_an_overlay_reach_every_workload() {
    let dir = root().join(format!("target/manifest-overlay-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("kustomization.yaml"),
        "resources: [../../deploy]\nimages:\n  - {name: ghcr.io/vmdisk/webhook, newName: registry.example.com/vmdisk/webhook, newTag: v9}\n  - {name: ghcr.io/vmdisk/controller, newName: registry.example.com/vmdisk/controller, newTag: v9}\n  - {name: ghcr.io/vmdisk/cache-agent, newName: registry.example.com/vmdisk/cache-agent, newTag: v9}\n",
    )
    .unwrap();
    let out = std::process::Command::new("kubectl")
        .args(["kustomize"])
        .arg(&dir)
        .output();
    let _ = std::fs::remove_dir_all(&dir);
    let Some(out) = out.ok().filter(|o| o.status.success()) else {
        println!("skipped: kubectl kustomize is not available");
        return;
    };
    let text = String::from_utf8(out.stdout).unwrap();
    let images: BTreeSet<&str> = text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("image: "))
        .collect();
    assert_eq!(
        images,
        BTreeSet::from([
            "registry.example.com/vmdisk/cache-agent:v9",
            "registry.example.com/vmdisk/controller:v9",
            "registry.example.com/vmdisk/webhook:v9"
        ])
    );
}

/// The walkthrough's files, in the order a user applies them.
fn example_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(root().join("deploy/examples"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
}

#[test]
fn examples_are_valid_images_in_their_own_namespace() {
    let examples: Vec<serde_yaml::Value> = example_files()
        .iter()
        .flat_map(|f| docs(&f.strip_prefix(root()).unwrap().display().to_string()))
        .collect();
    let namespaces: Vec<&str> = examples
        .iter()
        .filter(|d| d["kind"] == "Namespace")
        .map(|d| d["metadata"]["name"].as_str().unwrap())
        .collect();
    for doc in &examples {
        if doc["kind"] != "Namespace" {
            let ns = doc["metadata"]["namespace"].as_str();
            assert!(
                ns.is_some_and(|ns| namespaces.contains(&ns)),
                "{:?} names a namespace the examples create",
                doc["metadata"]["name"]
            );
        }
    }
    let images: Vec<_> = examples
        .into_iter()
        .filter(|d| d["kind"] == "VMDiskImage")
        .collect();
    assert!(!images.is_empty());
    for doc in images {
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
