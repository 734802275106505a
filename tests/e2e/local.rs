//! Phase `local`: vmdisk installed from `deploy/` with `kubectl apply -k`, its components run
//! as the shipped binaries on this machine with their production credentials.
//!
//! - The webhook (admission only) authenticates with a token of the `vmdisk-webhook`
//!   ServiceAccount; the MutatingWebhookConfiguration, as shipped except that `clientConfig`
//!   becomes a `url` on this machine and the `caBundle` the suite's CA.
//! - The controller (image controller and populator, leading: the Deployment's pods never
//!   run here) authenticates with a token of the `vmdisk-controller` ServiceAccount.
//! - One cache agent per node authenticates with a token of `vmdisk-cache-agent` bound to
//!   the DaemonSet's pod on that node, so the API server records the node in the token and the
//!   ValidatingAdmissionPolicy can hold the agent to its own node. (The DaemonSet's pods exist
//!   as objects; on the suite's fake nodes they never run, which is what makes room for the
//!   local agent.)

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{ListParams, Patch, PatchParams};
use kube::{Api, Client, Resource, ResourceExt};
use tempfile::TempDir;
use vmdisk_crds::{
    NodeDiskCache, VMDiskImage, AGENT_API_AUDIENCE, CREDENTIALS_NAMESPACE, INSTALL_NAMESPACE,
    NODE_CACHE_LABEL_PREFIX, PEER_AUDIENCE,
};
use vmdisk_tests::certs::TestCa;
use vmdisk_tests::https::{client_config, Connection};

use crate::support::{
    service_account_token, service_account_token_for, wait_for, Env, Process, NAMESPACE_LABEL,
};
use crate::{cases, CaseDef, Phase};

pub fn phase() -> Phase<LocalInstall> {
    Phase {
        name: "local",
        cases: cases(),
        // Measures latency, removes a piece of the installation, starts two more
        // controllers briefly, adds 30 nodes, or has every agent pull at once: alone, after
        // the others.
        exclusive: cases![
            crate::latency::pvc_create_latency_with_and_without_the_webhook,
            crate::settle::a_claim_waiting_for_the_missing_agent_daemonset_is_written_a_handful_of_times,
            crate::settle::many_images_behind_an_unreachable_registry_back_off,
            crate::api::a_selected_node_with_a_taint_gets_no_populator_pod,
            crate::placement::agents_get_only_their_nodes_images_and_images_converge,
            crate::stop::a_stopped_controller_hands_its_lease_to_the_standby,
            crate::peers::peers_warm_a_new_image_with_one_registry_pull_and_survive_its_puller,
        ],
        benchmark: false,
    }
}

fn cases() -> Vec<CaseDef<LocalInstall>> {
    cases![
        crate::api::crds_refuse_invalid_images_with_their_messages,
        crate::api::rbac_grants_exactly_what_the_components_use,
        crate::api::the_webhook_cannot_touch_secrets_volumes_or_claims,
        crate::credentials::agents_read_no_secret_and_get_only_their_nodes_credentials,
        crate::api::an_agent_cannot_write_another_nodes_objects,
        crate::api::a_claims_digest_cannot_change_after_creation,
        crate::settle::claims_waiting_for_other_missing_pieces_are_written_a_handful_of_times,
        crate::flow::private_image_is_resolved_warmed_where_selected_and_steers_pods,
        crate::flow::an_agent_killed_mid_warm_finishes_after_restart,
        crate::flow::deleting_an_image_clears_its_label_and_credentials,
        crate::peers::peers_serve_only_agents_of_nodes_asked_to_hold_the_image,
    ]
}

/// A cache agent process and how to start it again.
pub struct LocalAgent {
    pub process: Option<Process>,
    pub cache_dir: PathBuf,
    command: Vec<String>,
    kubeconfig: PathBuf,
}

pub struct LocalInstall {
    pub env: Env,
    pub admin: Client,
    pub work: TempDir,
    pub webhook: Mutex<Process>,
    pub controller: Mutex<Process>,
    pub agents: Mutex<BTreeMap<String, LocalAgent>>,
    /// Fake nodes first (pods there never run), then real ones.
    pub nodes: Vec<String>,
    /// The controller's agent API (`https://127.0.0.1:<port>`) and the CA file its
    /// certificate is checked with.
    pub agent_api_url: String,
    pub agent_api_ca: PathBuf,
    /// The controller's plain-HTTP endpoint (`/metrics`, `/readyz`).
    pub controller_metrics: SocketAddr,
    /// Each agent's peer address (a loopback address of its own), and the CA of the
    /// certificate they all serve peers with.
    pub peer_addrs: BTreeMap<String, SocketAddr>,
    pub peer_ca: String,
}

/// The name the agents' peer certificate carries (as `certs/` issues it).
pub const PEER_SERVER_NAME: &str = "vmdisk-peer.vmdisk-system.svc";

fn free_port(host: &str) -> u16 {
    std::net::TcpListener::bind((host, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl LocalInstall {
    pub async fn setup(env: Env) -> Result<Self, String> {
        let admin = env.admin().await;
        let work = tempfile::tempdir().unwrap();
        if let Some(dir) = &env.prereq_crds {
            env.kubectl(&["apply", "-f", &dir.display().to_string()]);
        }
        // As a user installs it.
        env.kubectl(&["apply", "-k", "deploy/"]);
        env.kubectl(&[
            "wait",
            "--for=condition=established",
            "--timeout=60s",
            "crd/vmdiskimages.vmdisk.io",
            "crd/nodediskcaches.vmdisk.io",
        ]);

        // The webhook on this machine, reached by the API server through clientConfig.url.
        let ca = TestCa::new("vmdisk e2e webhook CA");
        let pair = ca.issue(&[env.host.as_str()]);
        let tls_dir = work.path().join("webhook-tls");
        std::fs::create_dir_all(&tls_dir).unwrap();
        std::fs::write(tls_dir.join("tls.crt"), &pair.cert_pem).unwrap();
        std::fs::write(tls_dir.join("tls.key"), &pair.key_pem).unwrap();
        let port = free_port(&env.host);
        let listen = format!("{}:{port}", env.host);
        point_webhooks_at(&admin, &format!("https://{listen}"), &ca.cert_pem()).await;

        let token = service_account_token(&admin, INSTALL_NAMESPACE, "vmdisk-webhook", None).await;
        let kubeconfig = env.kubeconfig_with_token(work.path(), "vmdisk-webhook", &token);
        let mut command = Command::new(env.binary("vmdisk-webhook"));
        command
            .args(["--listen", &listen, "--cert-dir"])
            .arg(&tls_dir)
            .env("KUBECONFIG", &kubeconfig)
            .env("POD_NAME", "e2e-local-webhook")
            .env("RUST_LOG", "info,vmdisk_webhook=debug");
        let webhook = Process::spawn(command, work.path().join("webhook.log"));
        let config = client_config(&ca.cert_pem());
        let addr: SocketAddr = listen.parse().map_err(|e| format!("{listen}: {e}"))?;
        let host = env.host.clone();
        wait_for("the webhook to be ready", Duration::from_secs(60), || {
            let config = Arc::clone(&config);
            let host = host.clone();
            async move {
                let mut c = Connection::open(addr, &host, config)
                    .await
                    .map_err(|e| e.to_string())?;
                let reply = c
                    .request("GET", "/readyz", None, "")
                    .await
                    .map_err(|e| e.to_string())?;
                (reply.status == 200).then_some(()).ok_or(reply.text())
            }
        })
        .await;

        // The controller, with its own account; ready once it holds the Lease.
        let token =
            service_account_token(&admin, INSTALL_NAMESPACE, "vmdisk-controller", None).await;
        let kubeconfig = env.kubeconfig_with_token(work.path(), "vmdisk-controller", &token);
        let metrics: SocketAddr = format!("127.0.0.1:{}", free_port("127.0.0.1"))
            .parse()
            .unwrap();
        // Its agent API, with a certificate of the suite's CA.
        let agent_api = format!("127.0.0.1:{}", free_port("127.0.0.1"));
        let agent_api_url = format!("https://{agent_api}");
        let agent_api_tls = work.path().join("agent-api-tls");
        std::fs::create_dir_all(&agent_api_tls).unwrap();
        let pair = ca.issue(&["127.0.0.1"]);
        std::fs::write(agent_api_tls.join("tls.crt"), &pair.cert_pem).unwrap();
        std::fs::write(agent_api_tls.join("tls.key"), &pair.key_pem).unwrap();
        let agent_api_ca = work.path().join("agent-api-ca.crt");
        std::fs::write(&agent_api_ca, ca.cert_pem()).unwrap();
        let mut command = Command::new(env.binary("vmdisk-controller"));
        command
            .args(["--metrics-listen", &metrics.to_string()])
            .args(["--agent-api-listen", &agent_api, "--agent-api-cert-dir"])
            .arg(&agent_api_tls)
            .env("KUBECONFIG", &kubeconfig)
            .env("POD_NAME", "e2e-local-controller")
            .env("RUST_LOG", "info,vmdisk_controller=debug");
        let controller = Process::spawn(command, work.path().join("controller.log"));
        wait_for(
            "the controller to lead",
            Duration::from_secs(60),
            || async move {
                match crate::support::http_get(metrics, "/readyz").await? {
                    (200, body) if body == "leading" => Ok(()),
                    (status, body) => Err(format!("{status} {body}")),
                }
            },
        )
        .await;

        // One agent per node, each bound to the DaemonSet's pod object on its node.
        let mut nodes: Vec<Node> = Api::<Node>::all(admin.clone())
            .list(&ListParams::default())
            .await
            .unwrap()
            .items;
        nodes.sort_by_key(|n| (is_real(n), n.name_any()));
        let nodes: Vec<String> = nodes.iter().map(|n| n.name_any()).collect();
        let pods: Api<Pod> = Api::namespaced(admin.clone(), INSTALL_NAMESPACE);
        let mut agents = BTreeMap::new();
        // Peers: one certificate for every agent, as certs/ issues it, with the CA beside it.
        let peer_tls = work.path().join("peer-tls");
        std::fs::create_dir_all(&peer_tls).unwrap();
        let peer_pair = ca.issue(&[PEER_SERVER_NAME]);
        std::fs::write(peer_tls.join("tls.crt"), &peer_pair.cert_pem).unwrap();
        std::fs::write(peer_tls.join("tls.key"), &peer_pair.key_pem).unwrap();
        std::fs::write(peer_tls.join("ca.crt"), ca.cert_pem()).unwrap();
        let mut peer_addrs = BTreeMap::new();
        for (i, node) in nodes.iter().enumerate() {
            let pod = wait_for(
                &format!("the cache agent DaemonSet pod on {node}"),
                Duration::from_secs(60),
                || {
                    let pods = pods.clone();
                    let node = node.clone();
                    async move {
                        pods.list(
                            &ListParams::default()
                                .labels("app.kubernetes.io/name=vmdisk-cache-agent")
                                .fields(&format!("spec.nodeName={node}")),
                        )
                        .await
                        .map_err(|e| e.to_string())?
                        .items
                        .into_iter()
                        .next()
                        .ok_or_else(|| "no pod yet".to_string())
                    }
                },
            )
            .await;
            let token = service_account_token(
                &admin,
                INSTALL_NAMESPACE,
                "vmdisk-cache-agent",
                Some((&pod.name_any(), &pod.uid().unwrap())),
            )
            .await;
            let kubeconfig =
                env.kubeconfig_with_token(work.path(), &format!("agent-{node}"), &token);
            // What the kubelet projects into the agent's pod for the agent API.
            let api_token = service_account_token_for(
                &admin,
                INSTALL_NAMESPACE,
                "vmdisk-cache-agent",
                Some((&pod.name_any(), &pod.uid().unwrap())),
                Some(AGENT_API_AUDIENCE),
            )
            .await;
            let api_token_file = work.path().join(format!("agent-api-token-{node}"));
            std::fs::write(&api_token_file, api_token).unwrap();
            // And for its peers, on a loopback address of its own.
            let peer_token = service_account_token_for(
                &admin,
                INSTALL_NAMESPACE,
                "vmdisk-cache-agent",
                Some((&pod.name_any(), &pod.uid().unwrap())),
                Some(PEER_AUDIENCE),
            )
            .await;
            let peer_token_file = work.path().join(format!("peer-token-{node}"));
            std::fs::write(&peer_token_file, peer_token).unwrap();
            let peer_host = format!("127.0.0.{}", 10 + i);
            let peer_addr: SocketAddr = format!("{peer_host}:{}", free_port(&peer_host))
                .parse()
                .unwrap();
            peer_addrs.insert(node.clone(), peer_addr);
            let cache_dir = work.path().join(format!("cache-{node}"));
            let command = vec![
                "run".to_string(),
                "--node-name".into(),
                node.clone(),
                "--cache-dir".into(),
                cache_dir.display().to_string(),
                "--budget".into(),
                "8Gi".into(),
                "--metrics-listen".into(),
                "127.0.0.1:0".into(),
                "--resync-seconds".into(),
                "5".into(),
                "--credentials-url".into(),
                agent_api_url.clone(),
                "--credentials-ca".into(),
                agent_api_ca.display().to_string(),
                "--credentials-token".into(),
                api_token_file.display().to_string(),
                "--peer-listen".into(),
                peer_addr.to_string(),
                "--peer-advertise".into(),
                format!("https://{peer_addr}"),
                "--peer-tls-dir".into(),
                peer_tls.display().to_string(),
                "--peer-token".into(),
                peer_token_file.display().to_string(),
                "--peer-seed-wait-seconds".into(),
                "10".into(),
            ];
            let mut agent = LocalAgent {
                process: None,
                cache_dir,
                command,
                kubeconfig,
            };
            agent.process = Some(spawn_agent(&env, work.path(), node, &agent));
            agents.insert(node.clone(), agent);
        }
        Ok(Self {
            env,
            admin,
            work,
            webhook: Mutex::new(webhook),
            controller: Mutex::new(controller),
            agents: Mutex::new(agents),
            nodes,
            agent_api_url,
            agent_api_ca,
            controller_metrics: metrics,
            peer_addrs,
            peer_ca: ca.cert_pem(),
        })
    }

    /// A token of the cache agent DaemonSet's pod on `node` (its node recorded by the API
    /// server), for `audience` (the API server's when `None`).
    pub async fn agent_token(&self, node: &str, audience: Option<&str>) -> String {
        let pod = Api::<Pod>::namespaced(self.admin.clone(), INSTALL_NAMESPACE)
            .list(
                &ListParams::default()
                    .labels("app.kubernetes.io/name=vmdisk-cache-agent")
                    .fields(&format!("spec.nodeName={node}")),
            )
            .await
            .unwrap()
            .items
            .remove(0);
        service_account_token_for(
            &self.admin,
            INSTALL_NAMESPACE,
            "vmdisk-cache-agent",
            Some((&pod.name_any(), &pod.uid().unwrap())),
            audience,
        )
        .await
    }

    /// The controller's `/metrics` text.
    pub async fn controller_metrics(&self) -> String {
        match crate::support::http_get(self.controller_metrics, "/metrics").await {
            Ok((200, body)) => body,
            other => panic!("the controller's /metrics: {other:?}"),
        }
    }

    /// The fake nodes (pods bound there never run), for placement tests.
    pub fn fake_nodes(&self) -> Vec<String> {
        self.nodes
            .iter()
            .filter(|n| n.as_str() != "node-real")
            .cloned()
            .collect()
    }

    pub fn cache_dir(&self, node: &str) -> PathBuf {
        self.agents.lock().unwrap()[node].cache_dir.clone()
    }

    /// SIGKILLs the node's agent (as a crashing pod would die).
    pub fn kill_agent(&self, node: &str) {
        if let Some(p) = &mut self.agents.lock().unwrap().get_mut(node).unwrap().process {
            p.kill();
        }
    }

    /// Restarts every agent, with peers on or off (their `--peer-*` flags dropped).
    pub fn restart_agents(&self, peers: bool) {
        let mut agents = self.agents.lock().unwrap();
        for (node, agent) in agents.iter_mut() {
            if let Some(p) = &mut agent.process {
                p.kill();
            }
            let mut command = agent.command.clone();
            if !peers {
                let mut kept = Vec::new();
                let mut args = command.into_iter();
                while let Some(arg) = args.next() {
                    if arg.starts_with("--peer-") {
                        args.next();
                    } else {
                        kept.push(arg);
                    }
                }
                command = kept;
            }
            let configured = LocalAgent {
                process: None,
                cache_dir: agent.cache_dir.clone(),
                command,
                kubeconfig: agent.kubeconfig.clone(),
            };
            agent.process = Some(spawn_agent(&self.env, self.work.path(), node, &configured));
        }
    }

    /// Starts the node's agent again, on the same cache directory.
    pub fn start_agent(&self, node: &str) {
        let mut agents = self.agents.lock().unwrap();
        let agent = agents.get_mut(node).unwrap();
        agent.process = Some(spawn_agent(&self.env, self.work.path(), node, agent));
    }

    /// The agent's log tail, for failure messages.
    pub fn agent_log(&self, node: &str) -> String {
        self.agents.lock().unwrap()[node]
            .process
            .as_ref()
            .map(Process::tail)
            .unwrap_or_default()
    }

    pub fn webhook_log(&self) -> String {
        self.webhook.lock().unwrap().tail()
    }

    pub fn controller_log(&self) -> String {
        self.controller.lock().unwrap().tail()
    }

    pub async fn teardown(&self) {
        // The cases' namespaces go first, while the populator still runs to release its
        // finalizers; then the components stop and the installation goes.
        delete_case_namespaces(&self.env, &self.admin).await;
        self.webhook.lock().unwrap().kill();
        self.controller.lock().unwrap().kill();
        for agent in self.agents.lock().unwrap().values_mut() {
            if let Some(p) = &mut agent.process {
                p.kill();
            }
        }
        uninstall(&self.env, &self.admin).await;
    }
}

fn is_real(node: &Node) -> bool {
    node.status
        .as_ref()
        .and_then(|s| s.node_info.as_ref())
        .is_some_and(|i| !i.kubelet_version.is_empty())
}

fn spawn_agent(env: &Env, work: &std::path::Path, node: &str, agent: &LocalAgent) -> Process {
    let mut command = Command::new(env.binary("vmdisk-cache-agent"));
    command
        .args(&agent.command)
        .env("KUBECONFIG", &agent.kubeconfig)
        .env("RUST_LOG", "info");
    Process::spawn(command, work.join(format!("agent-{node}.log")))
}

/// Rewrites each webhook's `clientConfig` from the in-cluster Service to `base` + its path,
/// trusting `ca_pem`. Everything else stays as shipped.
async fn point_webhooks_at(admin: &Client, base: &str, ca_pem: &str) {
    use base64::Engine as _;
    let api: Api<MutatingWebhookConfiguration> = Api::all(admin.clone());
    let config = api.get("vmdisk").await.unwrap();
    let bundle = base64::engine::general_purpose::STANDARD.encode(ca_pem);
    let ops: Vec<serde_json::Value> = config
        .webhooks
        .unwrap_or_default()
        .iter()
        .enumerate()
        .map(|(i, hook)| {
            let path = hook
                .client_config
                .service
                .as_ref()
                .and_then(|s| s.path.clone())
                .unwrap_or_default();
            serde_json::json!({"op": "replace", "path": format!("/webhooks/{i}/clientConfig"),
                "value": {"url": format!("{base}{path}"), "caBundle": bundle}})
        })
        .collect();
    api.patch(
        "vmdisk",
        &PatchParams::default(),
        &Patch::<()>::Json(serde_json::from_value(serde_json::Value::Array(ops)).unwrap()),
    )
    .await
    .unwrap();
}

/// Removes everything an installation and its cases left: the `deploy/` objects (CRDs, and with
/// them every VMDiskImage and NodeDiskCache), the cases' namespaces, the agents' node labels.
pub async fn uninstall(env: &Env, admin: &Client) {
    let _ = env.kubectl_status(&[
        "delete",
        "-k",
        "deploy/",
        "--ignore-not-found",
        "--wait=false",
    ]);
    wait_for_namespaces_gone(admin, |n| {
        n.labels().contains_key(NAMESPACE_LABEL)
            || [INSTALL_NAMESPACE, CREDENTIALS_NAMESPACE].contains(&n.name_any().as_str())
    })
    .await;
    // A CRD being deleted waits for its objects to go; one still Terminating when the next
    // installation applies it disappears under that installation (its webhook then never
    // syncs its catalog and never becomes ready).
    let crds: Api<CustomResourceDefinition> = Api::all(admin.clone());
    wait_for("vmdisk's CRDs to go", Duration::from_secs(180), || {
        let crds = crds.clone();
        async move {
            let mut left = Vec::new();
            for name in [
                format!("{}.{}", VMDiskImage::plural(&()), VMDiskImage::group(&())),
                format!(
                    "{}.{}",
                    NodeDiskCache::plural(&()),
                    NodeDiskCache::group(&())
                ),
            ] {
                if crds
                    .get_opt(&name)
                    .await
                    .map_err(|e| e.to_string())?
                    .is_some()
                {
                    left.push(name);
                }
            }
            left.is_empty().then_some(()).ok_or(format!("{left:?}"))
        }
    })
    .await;
    let nodes: Api<Node> = Api::all(admin.clone());
    for node in nodes.list(&ListParams::default()).await.unwrap().items {
        let stale: serde_json::Map<String, serde_json::Value> = node
            .labels()
            .keys()
            .filter(|k| k.starts_with(NODE_CACHE_LABEL_PREFIX))
            .map(|k| (k.clone(), serde_json::Value::Null))
            .collect();
        if !stale.is_empty() {
            let _ = nodes
                .patch(
                    &node.name_any(),
                    &PatchParams::default(),
                    &Patch::Merge(serde_json::json!({"metadata": {"labels": stale}})),
                )
                .await;
        }
    }
}

/// Deletes the namespaces the cases made (a failed case may leave its own).
pub async fn delete_case_namespaces(env: &Env, admin: &Client) {
    let _ = env.kubectl_status(&[
        "delete",
        "namespace",
        "-l",
        &format!("{NAMESPACE_LABEL}=true"),
        "--wait=false",
    ]);
    wait_for_namespaces_gone(admin, |n| n.labels().contains_key(NAMESPACE_LABEL)).await;
}

/// Waits until no namespace `doomed` selects is left, deleting their pods (and vmdisk's
/// populator pods) with grace period 0 meanwhile: pods on fake nodes never finish terminating
/// by themselves.
async fn wait_for_namespaces_gone(
    admin: &Client,
    doomed: impl Fn(&k8s_openapi::api::core::v1::Namespace) -> bool,
) {
    use k8s_openapi::api::core::v1::Namespace;
    let namespaces: Api<Namespace> = Api::all(admin.clone());
    let doomed = &doomed;
    wait_for(
        "the suite's namespaces to go",
        Duration::from_secs(180),
        || {
            let namespaces = namespaces.clone();
            let admin = admin.clone();
            async move {
                let left: Vec<String> = namespaces
                    .list(&ListParams::default())
                    .await
                    .map_err(|e| e.to_string())?
                    .items
                    .into_iter()
                    .filter(doomed)
                    .map(|n| n.name_any())
                    .collect();
                for ns in left.iter().map(String::as_str).chain([INSTALL_NAMESPACE]) {
                    crate::support::force_delete_pods_terminating(&admin, ns).await;
                }
                left.is_empty().then_some(()).ok_or(format!("{left:?}"))
            }
        },
    )
    .await;
}
