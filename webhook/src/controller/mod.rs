//! Controllers that run in the webhook's Deployment under leader election: the image
//! controller ([`image`], with [`credentials`]) and the volume populator ([`populator`]).

pub mod credentials;
pub mod image;
pub mod leader;
pub mod populator;

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::{reflector, watcher, Controller, WatchStreamExt};
use kube::{Api, Client};
use vmdisk_crds::{
    ApiAccess, ImageReference, NodeDiskCache, VMDiskImage, CREDENTIALS_NAMESPACE, IMAGE_UID_LABEL,
    INSTALL_NAMESPACE,
};
use vmdisk_registry::{DockerConfig, Puller, PullerConfig, RegistryOptions};

use credentials::CredentialsCopier;
use image::{Context, DigestResolver};
use leader::LeaderElector;

/// Everything the controllers ask of the API server.
pub const API_ACCESS: &[&[ApiAccess]] = &[
    image::API_ACCESS,
    credentials::API_ACCESS,
    leader::API_ACCESS,
    populator::API_ACCESS,
];

/// Where the controllers run and keep their objects.
#[derive(Debug, Clone)]
pub struct ControllerConfig {
    /// Namespace of the Lease (the webhook's own).
    pub install_namespace: String,
    /// Namespace of the agents' pull credentials.
    pub credentials_namespace: String,
    /// This replica's name in the Lease.
    pub identity: String,
    pub populator: populator::PopulatorSettings,
    pub populator_metrics: crate::metrics::PopulatorMetrics,
}

impl Default for ControllerConfig {
    fn default() -> Self {
        Self {
            install_namespace: INSTALL_NAMESPACE.into(),
            credentials_namespace: CREDENTIALS_NAMESPACE.into(),
            identity: format!("vmdisk-webhook-{}", std::process::id()),
            populator: populator::PopulatorSettings::default(),
            populator_metrics: crate::metrics::WebhookMetrics::new().populator,
        }
    }
}

/// Resolves references against their registries with the image's CA bundle, `insecure` flag
/// and credentials.
pub struct RegistryResolver {
    puller: Puller,
}

impl Default for RegistryResolver {
    fn default() -> Self {
        Self {
            puller: Puller::new(PullerConfig::default()),
        }
    }
}

impl DigestResolver for RegistryResolver {
    fn resolve<'a>(
        &'a self,
        image: &'a VMDiskImage,
        credentials: Option<&'a DockerConfig>,
    ) -> BoxFuture<'a, Result<String, String>> {
        Box::pin(async move {
            let source = &image.spec.source.registry;
            let reference = ImageReference::parse(&source.url).map_err(|e| e.to_string())?;
            let options = RegistryOptions::for_source(&reference, source, credentials);
            self.puller
                .resolve_digest(&reference.to_string(), &options)
                .await
                .map_err(|e| e.to_string())
        })
    }
}

/// A spawned helper of a controller (a reflector, a sweeper), stopped when dropped: helpers
/// must not outlive the controller, which stops when this replica loses the leadership.
pub(crate) struct TaskGuard(tokio::task::JoinHandle<()>);

impl TaskGuard {
    pub(crate) fn spawn(task: impl std::future::Future<Output = ()> + Send + 'static) -> Self {
        Self(tokio::spawn(task))
    }
}

impl Drop for TaskGuard {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Spawns a reflector that runs (with kube's default backoff) until the guard is dropped.
pub(crate) fn reflect<K>(api: Api<K>, config: watcher::Config) -> (Store<K>, TaskGuard)
where
    K: kube::Resource
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone + Send + Sync,
{
    let (store, writer) = reflector::store::<K>();
    let task = TaskGuard::spawn(
        reflector::reflector(writer, watcher(api, config))
            .default_backoff()
            .touched_objects()
            .for_each(|event| {
                if let Err(e) = event {
                    tracing::warn!(error = %e, "watch error; retrying");
                }
                futures::future::ready(())
            }),
    );
    (store, task)
}

/// How often orphaned credentials copies are looked for.
const COPY_SWEEP: Duration = Duration::from_secs(10);

/// Runs the image controller until the future is dropped.
pub async fn run_image_controller(client: Client, config: ControllerConfig) {
    let images: Api<VMDiskImage> = Api::all(client.clone());
    let caches_api: Api<NodeDiskCache> = Api::all(client.clone());
    let (caches, _caches_task) = reflect(caches_api.clone(), watcher::Config::default());
    let (copies, _copies_task) = reflect(
        Api::<Secret>::namespaced(client.clone(), &config.credentials_namespace),
        watcher::Config::default().labels(IMAGE_UID_LABEL),
    );
    let copier = CredentialsCopier::new(client.clone(), &config.credentials_namespace);
    let ctx = Arc::new(Context {
        client: client.clone(),
        resolver: Arc::new(RegistryResolver::default()),
        caches,
        copies: copies.clone(),
        copier: copier.clone(),
        recorder: Recorder::new(
            client.clone(),
            Reporter {
                controller: "vmdisk-image-controller".into(),
                instance: Some(config.identity.clone()),
            },
        ),
    });
    // Status aggregates the node caches: an empty store would report no warm nodes.
    if ctx.caches.wait_until_ready().await.is_err() {
        tracing::error!("the NodeDiskCache watch stopped before its first list; the image controller is not started");
        return;
    }
    let controller = Controller::new(images, watcher::Config::default());
    let image_store = controller.store();

    // Copies of deleted images (or of images that dropped their pull secret) go away.
    let sweep_images = image_store.clone();
    let _sweeper = TaskGuard::spawn(async move {
        loop {
            tokio::time::sleep(COPY_SWEEP).await;
            if copies.wait_until_ready().await.is_err()
                || sweep_images.wait_until_ready().await.is_err()
            {
                continue;
            }
            for name in credentials::orphaned_copies(&copies.state(), &sweep_images.state()) {
                match copier.delete(&name).await {
                    Ok(()) => {
                        tracing::info!(secret = %name, "deleted the credentials copy of a removed image")
                    }
                    Err(e) => {
                        tracing::warn!(secret = %name, error = %e, "cannot delete a credentials copy")
                    }
                }
            }
        }
    });

    controller
        // A node's cache changed: re-aggregate the images whose digest it mentions.
        .watches(
            caches_api,
            watcher::Config::default(),
            move |cache: NodeDiskCache| {
                let digests: Vec<String> = cache
                    .status
                    .iter()
                    .flat_map(|s| s.entries.iter().map(|e| e.digest.clone()))
                    .collect();
                image_store
                    .state()
                    .into_iter()
                    .filter(|i| i.digest().is_some_and(|d| digests.iter().any(|x| x == d)))
                    .map(|i| ObjectRef::from_obj(&*i))
                    .collect::<Vec<_>>()
            },
        )
        .run(image::reconcile, image::error_policy, ctx)
        .for_each(|result| {
            if let Err(e) = result {
                tracing::debug!(error = %e, "image controller event");
            }
            futures::future::ready(())
        })
        .await;
}

/// Spawns leader election; the controllers run only while this replica leads.
pub fn spawn(client: Client, config: ControllerConfig) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let duration = Duration::from_secs(15);
        let elector = LeaderElector::new(
            client.clone(),
            &config.install_namespace,
            "vmdisk-controller",
            &config.identity,
            duration,
        );
        let identity = config.identity.clone();
        let mut running: Option<tokio::task::JoinHandle<()>> = None;
        loop {
            let leading = match elector.try_lead().await {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!(error = %e, "leader election failed");
                    false
                }
            };
            // Controllers that stopped by themselves are started again while leading.
            if running.as_ref().is_some_and(|t| t.is_finished()) {
                tracing::warn!(%identity, "the controllers stopped; starting them again");
                running = None;
            }
            match (leading, running.is_some()) {
                (true, false) => {
                    tracing::info!(%identity, "became leader; starting the controllers");
                    let (client, config) = (client.clone(), config.clone());
                    running = Some(tokio::spawn(async move {
                        tokio::join!(
                            run_image_controller(client.clone(), config.clone()),
                            populator::run(client, config.populator, config.populator_metrics),
                        );
                    }));
                }
                (false, true) => {
                    tracing::warn!(%identity, "lost leadership; stopping the controllers");
                    if let Some(task) = running.take() {
                        task.abort();
                    }
                }
                _ => {}
            }
            tokio::time::sleep(duration / 3).await;
        }
    })
}

/// A scripted API server for kube's mocked client: answers each request with a closure and
/// records what it was asked. Watches are held open without events.
#[cfg(test)]
pub(crate) mod testing {
    use std::sync::{Arc, Mutex};

    use http_body_util::BodyExt;
    use kube::client::Body;

    #[derive(Debug, Clone)]
    pub struct Request {
        pub method: String,
        pub path: String,
        pub query: String,
        pub body: serde_json::Value,
    }

    pub struct Reply {
        pub status: u16,
        pub body: serde_json::Value,
    }

    impl Reply {
        pub fn json(status: u16, body: serde_json::Value) -> Self {
            Self { status, body }
        }
        /// The request's own body back, as the API server does for creates and applies.
        pub fn echo(request: &Request) -> Self {
            Self::json(
                if request.method == "POST" { 201 } else { 200 },
                request.body.clone(),
            )
        }
        pub fn not_found() -> Self {
            Self::json(
                404,
                serde_json::json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                    "reason": "NotFound", "code": 404, "message": "not found"}),
            )
        }
    }

    pub struct MockApi {
        seen: Arc<Mutex<Vec<Request>>>,
    }

    impl MockApi {
        pub fn start(handler: impl Fn(Request) -> Reply + Send + 'static) -> (kube::Client, Self) {
            let (service, mut handle) =
                tower_test::mock::pair::<http::Request<Body>, http::Response<Body>>();
            let seen = Arc::new(Mutex::new(Vec::new()));
            let record = Arc::clone(&seen);
            tokio::spawn(async move {
                let mut held = Vec::new();
                while let Some((request, send)) = handle.next_request().await {
                    let method = request.method().to_string();
                    let path = request.uri().path().to_string();
                    let query = request.uri().query().unwrap_or_default().to_string();
                    if query.contains("watch=true") {
                        held.push(send);
                        continue;
                    }
                    let bytes = request.into_body().collect().await.unwrap().to_bytes();
                    let body = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
                    let request = Request {
                        method,
                        path,
                        query,
                        body,
                    };
                    record.lock().unwrap().push(request.clone());
                    let reply = handler(request);
                    send.send_response(
                        http::Response::builder()
                            .status(reply.status)
                            .body(Body::from(serde_json::to_vec(&reply.body).unwrap()))
                            .unwrap(),
                    );
                }
            });
            (kube::Client::new(service, "default"), Self { seen })
        }

        pub fn requests(&self) -> Vec<Request> {
            self.seen.lock().unwrap().clone()
        }
    }
}
