//! Cluster access for the e2e suite: the environment it runs in, clients with the admin's or
//! a ServiceAccount's credentials, `kubectl`, bound tokens, and waiting.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Namespace, Secret, ServiceAccount};
use kube::api::{DeleteParams, PostParams};
use kube::config::Kubeconfig;
use kube::{Api, Client};
use serde_json::json;

pub const KUBECONFIG_ENV: &str = "VMDISK_E2E_KUBECONFIG";
/// A directory of third-party CRDs to apply before vmdisk (cert-manager, VolumePopulator) on
/// clusters that lack them.
pub const PREREQ_CRDS_ENV: &str = "VMDISK_E2E_PREREQ_CRDS";
/// Address the API server uses to reach servers the suite runs on this machine (default
/// 127.0.0.1: a control plane on this machine; for kind use the docker bridge gateway).
pub const HOST_ENV: &str = "VMDISK_E2E_HOST";
/// Label on every namespace the suite makes, so a teardown finds what a failed case left.
pub const NAMESPACE_LABEL: &str = "vmdisk.io/e2e";

/// Where the suite runs.
#[derive(Clone)]
pub struct Env {
    pub kubeconfig: PathBuf,
    pub prereq_crds: Option<PathBuf>,
    /// This machine as the API server sees it.
    pub host: String,
    /// The workspace root (where `deploy/` is).
    pub root: PathBuf,
    /// `target/<profile>`: the built binaries.
    pub bin_dir: PathBuf,
}

impl Env {
    /// `Err(reason)` when the suite cannot run here.
    pub fn from_env() -> Result<Self, String> {
        let kubeconfig = std::env::var_os(KUBECONFIG_ENV).ok_or_else(|| {
            format!("{KUBECONFIG_ENV} is not set (point it at the kubeconfig of a disposable cluster; see README)")
        })?;
        let (root, bin_dir) = workspace();
        Ok(Self {
            kubeconfig: kubeconfig.into(),
            prereq_crds: std::env::var_os(PREREQ_CRDS_ENV).map(PathBuf::from),
            host: std::env::var(HOST_ENV).unwrap_or_else(|_| "127.0.0.1".into()),
            root,
            bin_dir,
        })
    }

    /// A built binary of the workspace, e.g. `vmdisk-webhook`.
    pub fn binary(&self, name: &str) -> PathBuf {
        let path = self.bin_dir.join(name);
        assert!(
            path.exists(),
            "{} is missing: build the binaries first (`cargo build --workspace --bins`, part of the README's test command)",
            path.display()
        );
        path
    }

    pub async fn admin(&self) -> Client {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let kubeconfig = Kubeconfig::read_from(&self.kubeconfig)
            .unwrap_or_else(|e| panic!("{KUBECONFIG_ENV}={}: {e}", self.kubeconfig.display()));
        let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
            .await
            .expect("usable kubeconfig");
        Client::try_from(config).expect("client")
    }

    /// `kubectl` with the suite's admin kubeconfig; panics with its output on failure.
    pub fn kubectl(&self, args: &[&str]) -> String {
        let out = self.kubectl_status(args);
        match out {
            Ok(stdout) => stdout,
            Err(message) => panic!("kubectl {}: {message}", args.join(" ")),
        }
    }

    /// Waits for a workload's rollout; on failure panics with what a user would look at next
    /// (pod descriptions, container logs, recent events), so a CI log says why.
    pub fn rollout(&self, namespace: &str, workload: &str) {
        let waited = self.kubectl_status(&[
            "-n",
            namespace,
            "rollout",
            "status",
            workload,
            "--timeout=240s",
        ]);
        if let Err(message) = waited {
            let look = |args: &[&str]| match self.kubectl_status(args) {
                Ok(out) | Err(out) => out,
            };
            // Shortest and most telling first: a CI log may keep only the start of this.
            panic!(
                "{workload} never became available: {message}\n--- events\n{}\n--- pods\n{}\n--- nodes\n{}\n--- logs\n{}\n--- pod descriptions\n{}",
                look(&["-n", namespace, "get", "events", "--sort-by=.lastTimestamp"]),
                look(&["-n", namespace, "get", "pods", "-o", "wide"]),
                look(&["get", "nodes", "-o", "custom-columns=NAME:.metadata.name,TAINTS:.spec.taints[*].key,TRUE_CONDITIONS:.status.conditions[?(@.status==\"True\")].type"]),
                look(&["-n", namespace, "logs", "--all-containers", "--prefix", "--tail=40", "-l", "app.kubernetes.io/part-of=vmdisk"]),
                look(&["-n", namespace, "describe", "pods"]),
            );
        }
    }

    /// `kubectl`, returning stdout or stderr.
    pub fn kubectl_status(&self, args: &[&str]) -> Result<String, String> {
        let out = Command::new("kubectl")
            .args(args)
            .env("KUBECONFIG", &self.kubeconfig)
            .current_dir(&self.root)
            .output()
            .unwrap_or_else(|e| panic!("kubectl is needed by the e2e suite: {e}"));
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }

    /// A kubeconfig file for the same cluster, authenticating with `token`.
    pub fn kubeconfig_with_token(&self, dir: &Path, name: &str, token: &str) -> PathBuf {
        let admin = Kubeconfig::read_from(&self.kubeconfig).unwrap();
        let context = admin
            .current_context
            .as_ref()
            .and_then(|c| admin.contexts.iter().find(|n| &n.name == c))
            .and_then(|c| c.context.clone())
            .expect("a current context");
        let cluster = admin
            .clusters
            .iter()
            .find(|c| c.name == context.cluster)
            .and_then(|c| c.cluster.clone())
            .expect("the context's cluster");
        let mut cluster_yaml = json!({"server": cluster.server});
        if let Some(ca) = &cluster.certificate_authority {
            cluster_yaml["certificate-authority"] = ca.clone().into();
        }
        if let Some(ca) = &cluster.certificate_authority_data {
            cluster_yaml["certificate-authority-data"] = ca.clone().into();
        }
        if cluster.insecure_skip_tls_verify == Some(true) {
            cluster_yaml["insecure-skip-tls-verify"] = true.into();
        }
        let doc = json!({
            "apiVersion": "v1", "kind": "Config",
            "clusters": [{"name": "e2e", "cluster": cluster_yaml}],
            "users": [{"name": name, "user": {"token": token}}],
            "contexts": [{"name": "e2e", "context": {"cluster": "e2e", "user": name}}],
            "current-context": "e2e",
        });
        let path = dir.join(format!("{name}.kubeconfig"));
        std::fs::write(&path, serde_json::to_vec_pretty(&doc).unwrap()).unwrap();
        path
    }
}

/// The workspace root (where `deploy/` is) and `target/<profile>` (the built binaries).
pub fn workspace() -> (PathBuf, PathBuf) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf();
    // target/<profile>/deps/e2e-<hash> → target/<profile>
    let bin_dir = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent()?.parent().map(Path::to_path_buf))
        .expect("the test binary lives in target/<profile>/deps");
    (root, bin_dir)
}

/// The tag of this run's images: new every run, so nodes that cache images by tag
/// (`imagePullPolicy: IfNotPresent`) never run an earlier build.
pub fn image_tag() -> &'static str {
    static TAG: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    TAG.get_or_init(|| {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        format!("e2e-{}-{}", now.as_secs(), std::process::id())
    })
}

/// A client from a kubeconfig file.
pub async fn client_from(path: &Path) -> Client {
    let kubeconfig = Kubeconfig::read_from(path).unwrap();
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .unwrap();
    Client::try_from(config).unwrap()
}

/// A token of ServiceAccount `namespace/name`, bound to `pod` (name, uid) when given: the API
/// server then records the pod's node in the token's user info, as for a real pod's token.
pub async fn service_account_token(
    admin: &Client,
    namespace: &str,
    name: &str,
    pod: Option<(&str, &str)>,
) -> String {
    service_account_token_for(admin, namespace, name, pod, None).await
}

/// As [`service_account_token`], for `audience` instead of the API server's.
pub async fn service_account_token_for(
    admin: &Client,
    namespace: &str,
    name: &str,
    pod: Option<(&str, &str)>,
    audience: Option<&str>,
) -> String {
    let mut spec = json!({"expirationSeconds": 7200});
    if let Some(audience) = audience {
        spec["audiences"] = json!([audience]);
    }
    if let Some((pod_name, uid)) = pod {
        spec["boundObjectRef"] =
            json!({"apiVersion": "v1", "kind": "Pod", "name": pod_name, "uid": uid});
    }
    let request = json!({
        "apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec,
    });
    let api: Api<ServiceAccount> = Api::namespaced(admin.clone(), namespace);
    let response: serde_json::Value = api
        .create_subresource("token", name, &PostParams::default(), &request)
        .await
        .unwrap_or_else(|e| panic!("token for {namespace}/{name}: {e}"));
    response["status"]["token"]
        .as_str()
        .expect("a token in the TokenRequest status")
        .to_string()
}

/// Polls `probe` until it yields a value; panics after `timeout` with `what` and the last
/// observation `describe` gives.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        match probe().await {
            Ok(v) => return v,
            Err(last) if Instant::now() >= deadline => {
                panic!("timed out after {timeout:?} waiting for {what}; last seen: {last}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// Creates a namespace for one case, labelled for the teardown sweep.
pub async fn create_namespace(admin: &Client, prefix: &str) -> String {
    let name = format!("{prefix}-{:06x}", rand::random::<u32>() & 0xff_ffff);
    let ns: Namespace = serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {NAMESPACE_LABEL: "true"}}
    }))
    .unwrap();
    Api::<Namespace>::all(admin.clone())
        .create(&PostParams::default(), &ns)
        .await
        .unwrap();
    name
}

/// Deletes a namespace. Pods bound to fake nodes are never confirmed terminated by a kubelet,
/// so they are removed at once (grace period 0) or the namespace would stay Terminating.
pub async fn delete_namespace(admin: &Client, name: &str) {
    let _ = Api::<Namespace>::all(admin.clone())
        .delete(name, &DeleteParams::default())
        .await;
    force_delete_pods(admin, name).await;
}

/// Deletes every pod of `namespace` with grace period 0.
pub async fn force_delete_pods(admin: &Client, namespace: &str) {
    let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(admin.clone(), namespace);
    let _ = pods
        .delete_collection(
            &DeleteParams::default().grace_period(0),
            &Default::default(),
        )
        .await;
}

/// Removes pods of `namespace` that are already being deleted (grace period 0): a fake node
/// never confirms their end.
pub async fn force_delete_pods_terminating(admin: &Client, namespace: &str) {
    use kube::ResourceExt as _;
    let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(admin.clone(), namespace);
    let Ok(list) = pods.list(&Default::default()).await else {
        return;
    };
    for pod in list
        .items
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_some())
    {
        let _ = pods
            .delete(&pod.name_any(), &DeleteParams::default().grace_period(0))
            .await;
    }
}

/// The API error code of a result, for asserting refusals.
pub fn api_error<T: std::fmt::Debug>(result: Result<T, kube::Error>) -> kube::core::Status {
    match result {
        Err(kube::Error::Api(e)) => *e,
        other => panic!("expected the API server to refuse, got {other:?}"),
    }
}

/// A child process killed (SIGKILL) on drop, with its output in a log file.
pub struct Process {
    pub child: std::process::Child,
    pub log: PathBuf,
}

impl Process {
    pub fn spawn(mut command: Command, log: PathBuf) -> Self {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        command
            .stdin(std::process::Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file);
        let child = command
            .spawn()
            .unwrap_or_else(|e| panic!("starting {command:?}: {e}"));
        Self { child, log }
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The last lines of the log, for failure messages.
    pub fn tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Creates VMDiskImage `namespace/name` with `spec`.
pub async fn create_image(
    admin: &Client,
    namespace: &str,
    name: &str,
    spec: serde_json::Value,
) -> vmdisk_crds::VMDiskImage {
    let image: vmdisk_crds::VMDiskImage = serde_json::from_value(json!({
        "apiVersion": "vmdisk.io/v1alpha1", "kind": "VMDiskImage",
        "metadata": {"name": name, "namespace": namespace}, "spec": spec,
    }))
    .unwrap();
    Api::<vmdisk_crds::VMDiskImage>::namespaced(admin.clone(), namespace)
        .create(&PostParams::default(), &image)
        .await
        .unwrap()
}

/// `GET path` over plain HTTP/1.1 (a component's metrics and probe port): status and body.
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> Result<(u16, String), String> {
    use http_body_util::{BodyExt, Empty};
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("{addr}: {e}"))?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
            .await
            .map_err(|e| e.to_string())?;
    tokio::spawn(connection);
    let request = hyper::Request::get(path)
        .header("host", addr.to_string())
        .body(Empty::<bytes::Bytes>::new())
        .map_err(|e| e.to_string())?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| e.to_string())?;
    let status = response.status().as_u16();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// A `kubernetes.io/dockerconfigjson` Secret for `registry` (host:port) in `namespace`.
pub async fn pull_secret(
    admin: &Client,
    namespace: &str,
    registry: &str,
    user: &str,
    password: &str,
) {
    use base64::Engine as _;
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    let config = json!({"auths": {registry: {"auth": auth}}}).to_string();
    let secret: Secret = serde_json::from_value(json!({
        "metadata": {"name": "registry-credentials"},
        "type": "kubernetes.io/dockerconfigjson",
        "stringData": {".dockerconfigjson": config},
    }))
    .unwrap();
    Api::<Secret>::namespaced(admin.clone(), namespace)
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();
}
