//! The agent API's wiring agrees end to end: the controller serves it on a declared port with
//! the certificate of a Certificate naming the Service, the Service targets that port, and
//! the agents call that Service's name and port with a token for the right audience and the
//! CA that issued the certificate, and nothing else of that Secret.

use std::path::Path;

use clap::Parser;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use vmdisk_controller::config::ControllerArgs;
use vmdisk_crds::AGENT_API_AUDIENCE;

use crate::typed::{self, Object};
use crate::{container_argv, deployment, installed_objects};

fn certificate<'a>(objects: &'a [Object], name: &str) -> &'a typed::Certificate {
    objects
        .iter()
        .find_map(|o| match o {
            Object::Certificate(c) if c.metadata.name == name => Some(&**c),
            _ => None,
        })
        .unwrap_or_else(|| panic!("Certificate {name}"))
}

#[test]
fn agents_call_the_controllers_agent_api_as_it_is_served() {
    let objects: Vec<Object> = installed_objects()
        .iter()
        .map(|d| typed::parse(d).unwrap())
        .collect();

    // The controller: --agent-api-listen is the declared port `agent-api`, its certificate is
    // the vmdisk-controller Certificate's Secret.
    let controller = deployment(&objects, "vmdisk-controller");
    let pod = controller.spec.template.spec.as_ref().unwrap();
    let container = &pod.containers[0];
    let argv = container_argv(
        container,
        &<ControllerArgs as clap::CommandFactory>::command(),
    );
    let args = ControllerArgs::try_parse_from(&argv).unwrap();
    let listen = args
        .agent_api_listen
        .expect("the Deployment serves the agent API");
    let port = container
        .ports
        .iter()
        .flatten()
        .find(|p| p.container_port == i32::from(listen.port()))
        .expect("a container port for --agent-api-listen");
    assert_eq!(port.name.as_deref(), Some("agent-api"));
    let mount = container
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| Path::new(&m.mount_path) == args.agent_api_cert_dir)
        .expect("--agent-api-cert-dir is mounted");
    let volume = pod
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == mount.name)
        .unwrap();
    let serving = certificate(&objects, "vmdisk-controller");
    assert_eq!(
        volume.secret.as_ref().unwrap().secret_name.as_deref(),
        Some(serving.spec.secret_name.as_str())
    );

    // Its Service targets that port and is named in the certificate.
    let service = objects
        .iter()
        .find_map(|o| match o {
            Object::Service(s) if s.metadata.name.as_deref() == Some("vmdisk-controller") => {
                Some(s)
            }
            _ => None,
        })
        .expect("the vmdisk-controller Service");
    let svc_spec = service.spec.as_ref().unwrap();
    assert_eq!(
        svc_spec.selector.as_ref(),
        controller.spec.selector.match_labels.as_ref()
    );
    let svc_port = svc_spec.ports.as_ref().unwrap()[0].clone();
    assert_eq!(
        svc_port.target_port,
        Some(IntOrString::String("agent-api".into()))
    );
    let host = format!(
        "vmdisk-controller.{}.svc",
        service.metadata.namespace.as_deref().unwrap()
    );
    assert!(serving.spec.dns_names.iter().flatten().any(|n| *n == host));

    // The agents call that name and port (reached through the Service's EndpointSlices, whose
    // port is the container port: the two are the same number).
    let daemonset = objects
        .iter()
        .find_map(|o| match o {
            Object::DaemonSet(d) => Some(d),
            _ => None,
        })
        .unwrap();
    let agent_pod = daemonset.spec.template.spec.as_ref().unwrap();
    let agent = &agent_pod.containers[0];
    let flag = |name: &str| -> String {
        let prefix = format!("--{name}=");
        agent
            .args
            .iter()
            .flatten()
            .find_map(|a| a.strip_prefix(&prefix).map(str::to_string))
            .unwrap_or_else(|| {
                let command = <vmdisk_cache_agent::cli::Cli as clap::CommandFactory>::command();
                let run = command.find_subcommand("run").unwrap().clone();
                let arg = run
                    .get_arguments()
                    .find(|a| a.get_long() == Some(name))
                    .unwrap_or_else(|| panic!("run has no --{name}"));
                arg.get_default_values()[0].to_string_lossy().to_string()
            })
    };
    assert_eq!(
        flag("credentials-url"),
        format!("https://{host}:{}", svc_port.port)
    );
    assert_eq!(svc_port.port, i32::from(listen.port()));

    // The token file is a projected token for the agent API's audience; the CA file is the
    // ca.crt of a Certificate from the same issuer, and only that key of its Secret.
    let sources = |file: &str| {
        let file = Path::new(file);
        let mount = agent
            .volume_mounts
            .iter()
            .flatten()
            .find(|m| file.starts_with(&m.mount_path))
            .unwrap_or_else(|| panic!("{} is mounted", file.display()));
        let relative = file
            .strip_prefix(&mount.mount_path)
            .unwrap()
            .display()
            .to_string();
        let volume = agent_pod
            .volumes
            .iter()
            .flatten()
            .find(|v| v.name == mount.name)
            .unwrap();
        (
            relative,
            volume.projected.clone().expect("a projected volume"),
        )
    };
    let (token_path, projected) = sources(&flag("credentials-token"));
    let token = projected
        .sources
        .iter()
        .flatten()
        .find_map(|s| s.service_account_token.clone())
        .expect("a projected ServiceAccount token");
    assert_eq!(token.path, token_path);
    assert_eq!(token.audience.as_deref(), Some(AGENT_API_AUDIENCE));
    let (ca_path, projected) = sources(&flag("credentials-ca"));
    let secret = projected
        .sources
        .iter()
        .flatten()
        .find_map(|s| s.secret.clone())
        .expect("the CA's Secret");
    let items = secret.items.clone().unwrap();
    assert_eq!(items.len(), 1, "only ca.crt of that Secret");
    assert_eq!(
        (items[0].key.as_str(), items[0].path.as_str()),
        ("ca.crt", ca_path.as_str())
    );
    let trust = certificate(&objects, "vmdisk-agent-trust");
    assert_eq!(secret.name, trust.spec.secret_name);
    assert_eq!(trust.spec.issuer_ref.name, serving.spec.issuer_ref.name);
    assert_ne!(
        trust.spec.secret_name, serving.spec.secret_name,
        "the agents never mount the controller's key"
    );
}
