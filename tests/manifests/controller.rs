//! The controller's Deployment agrees with the `vmdisk-controller` binary and with the other
//! workloads: its flags (and the variables it is given) parse, `--metrics-listen` is a declared
//! port and the probes ask paths the binary serves there, the agent DaemonSet it reads exists,
//! it sizes disks as the webhook sizes PVCs, it runs locked down, a standby replica is kept
//! through disruptions, and every workload's image is one `deploy/images/build.sh` builds.

use std::collections::BTreeSet;
use std::sync::Arc;

use clap::Parser;
use vmdisk_controller::config::ControllerArgs;
use vmdisk_webhook::config::WebhookArgs;

use crate::typed::{self, Object};
use crate::{container_argv, deployment, installed_objects, probes_are_served, root};

fn objects() -> Vec<Object> {
    installed_objects()
        .iter()
        .map(|d| typed::parse(d).unwrap())
        .collect()
}

#[test]
fn the_controller_deployment_agrees_with_its_binary() {
    let objects = objects();
    let controller = deployment(&objects, "vmdisk-controller");
    assert_eq!(
        controller.metadata.namespace.as_deref(),
        Some(vmdisk_crds::INSTALL_NAMESPACE)
    );
    let spec = &controller.spec;
    assert!(
        spec.replicas.unwrap_or(1) >= 2,
        "a standby replica takes the Lease over when the leader stops"
    );
    let pod = spec.template.spec.as_ref().unwrap();
    assert_eq!(
        pod.service_account_name.as_deref(),
        Some("vmdisk-controller")
    );
    let container = &pod.containers[0];
    let argv = container_argv(
        container,
        &<ControllerArgs as clap::CommandFactory>::command(),
    );
    let args = ControllerArgs::try_parse_from(&argv).unwrap_or_else(|e| panic!("{argv:?}: {e}"));
    // The replicas' identities in the Lease and its namespace come from the downward API.
    let from_field = |var: &str| {
        container
            .env
            .iter()
            .flatten()
            .find(|e| e.name == var)
            .and_then(|e| e.value_from.as_ref()?.field_ref.as_ref())
            .map(|f| f.field_path.clone())
    };
    assert_eq!(from_field("POD_NAME").as_deref(), Some("metadata.name"));
    assert_eq!(
        from_field("POD_NAMESPACE").as_deref(),
        Some("metadata.namespace")
    );

    // --metrics-listen is the declared port the probes use, on paths the binary serves.
    let port = container
        .ports
        .iter()
        .flatten()
        .find(|p| p.container_port == i32::from(args.metrics_listen.port()))
        .expect("a container port for --metrics-listen");
    assert_eq!(port.name.as_deref(), Some("metrics"));
    let router = vmdisk_controller::server::router(
        Arc::new(vmdisk_controller::metrics::ControllerMetrics::new()),
        Arc::new(vmdisk_controller::supervisor::Leadership::default()),
    );
    assert_eq!(
        probes_are_served(container, &router),
        BTreeSet::from(["/healthz".to_string(), "/readyz".to_string()])
    );

    // The agent DaemonSet whose image and cache directory populator pods use is installed
    // where the controller looks for it.
    let agents = objects
        .iter()
        .find_map(|o| match o {
            Object::DaemonSet(d) if d.metadata.name.as_deref() == Some(&args.agent_daemonset) => {
                Some(d)
            }
            _ => None,
        })
        .unwrap_or_else(|| panic!("DaemonSet {} is installed", args.agent_daemonset));
    assert_eq!(
        agents.metadata.namespace, controller.metadata.namespace,
        "the agent DaemonSet is in the controller's namespace"
    );

    // The populator sizes disk.img by the overhead the webhook sized the PVC with.
    let webhook = deployment(&objects, "vmdisk-webhook");
    let webhook_container = &webhook.spec.template.spec.as_ref().unwrap().containers[0];
    let webhook_args = WebhookArgs::try_parse_from(container_argv(
        webhook_container,
        &<WebhookArgs as clap::CommandFactory>::command(),
    ))
    .unwrap();
    assert_eq!(args.filesystem_overhead, webhook_args.filesystem_overhead);

    // Locked down: non-root (set in the manifest, not only in the image), RuntimeDefault
    // seccomp, read-only root, no privilege escalation, no capabilities.
    let pod_security = pod.security_context.as_ref().unwrap();
    assert_eq!(pod_security.run_as_non_root, Some(true));
    assert!(pod_security.run_as_user.is_some_and(|u| u != 0));
    assert_eq!(
        pod_security
            .seccomp_profile
            .as_ref()
            .map(|p| p.type_.as_str()),
        Some("RuntimeDefault")
    );
    let security = container.security_context.as_ref().unwrap();
    assert_eq!(security.read_only_root_filesystem, Some(true));
    assert_eq!(security.allow_privilege_escalation, Some(false));
    assert_eq!(
        security.capabilities.as_ref().and_then(|c| c.drop.clone()),
        Some(vec!["ALL".to_string()])
    );
    let resources = container.resources.as_ref().unwrap();
    assert!(resources.requests.is_some() && resources.limits.is_some());

    // A node drain leaves a replica running.
    let selector = spec.selector.match_labels.as_ref().unwrap();
    let budget = objects
        .iter()
        .find_map(|o| match o {
            Object::PodDisruptionBudget(b)
                if b.spec
                    .as_ref()
                    .and_then(|s| s.selector.as_ref()?.match_labels.as_ref())
                    == Some(selector) =>
            {
                Some(b)
            }
            _ => None,
        })
        .expect("a PodDisruptionBudget for the controller");
    assert_eq!(
        budget.spec.as_ref().unwrap().min_available,
        Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(1))
    );
}

/// Every workload runs `ghcr.io/vmdisk/<name>:<workspace version>`, an image `build.sh`
/// builds from `deploy/images/<name>.Containerfile` with the container's command as its
/// entrypoint; and build.sh builds nothing no workload runs.
#[test]
fn every_workload_runs_an_image_build_sh_builds() {
    let build = std::fs::read_to_string(root().join("deploy/images/build.sh")).unwrap();
    let built: BTreeSet<String> = build
        .lines()
        .find_map(|l| l.trim().strip_prefix("for name in ")?.strip_suffix("; do"))
        .expect("build.sh's image loop")
        .split_whitespace()
        .map(String::from)
        .collect();
    let mut run = BTreeSet::new();
    for object in objects() {
        let template = match &object {
            Object::Deployment(d) => &d.spec.template,
            Object::DaemonSet(d) => &d.spec.template,
            _ => continue,
        };
        for container in &template.spec.as_ref().unwrap().containers {
            let image = container.image.as_deref().unwrap();
            let (name, tag) = image
                .strip_prefix("ghcr.io/vmdisk/")
                .and_then(|r| r.split_once(':'))
                .unwrap_or_else(|| panic!("{image} is not a vmdisk image"));
            assert_eq!(tag, env!("CARGO_PKG_VERSION"), "{image}");
            let containerfile =
                std::fs::read_to_string(root().join(format!("deploy/images/{name}.Containerfile")))
                    .unwrap_or_else(|e| panic!("{image}: no Containerfile: {e}"));
            let binary = &container.command.as_ref().unwrap()[0];
            assert!(
                containerfile.contains(&format!("ENTRYPOINT [\"{binary}\"]")),
                "{name}.Containerfile's entrypoint is not {binary}"
            );
            run.insert(name.to_string());
        }
    }
    assert_eq!(built, run);
    assert_eq!(
        run,
        BTreeSet::from(["cache-agent", "controller", "webhook"].map(String::from))
    );
}
