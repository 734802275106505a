//! Controllers that run in the webhook's Deployment under leader election.

pub mod image;
pub mod leader;

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{reflector, watcher, Controller, WatchStreamExt};
use kube::{Api, Client, ResourceExt};
use vmdisk_cache_agent::auth::{registry_auth_for, DockerConfig};
use vmdisk_cache_agent::pull::{Puller, PullerConfig, RegistryOptions};
use vmdisk_crds::{ImageReference, NodeDiskCache, VMDiskImage};

use image::{Context, DigestResolver};
use leader::LeaderElector;

/// Resolves references against their registries, with the image's CA bundle, `insecure`
/// flag and pull secret.
pub struct RegistryResolver {
    client: Client,
    puller: Puller,
}

impl RegistryResolver {
    pub fn new(client: Client) -> Self {
        Self {
            client,
            puller: Puller::new(PullerConfig::default()),
        }
    }

    async fn options(&self, image: &VMDiskImage) -> Result<RegistryOptions, String> {
        let registry = &image.spec.source.registry;
        let mut options = RegistryOptions {
            insecure: registry.insecure.unwrap_or(false),
            ca_bundle_pem: registry.ca_bundle.as_ref().map(|s| s.as_bytes().to_vec()),
            ..RegistryOptions::default()
        };
        if let Some(secret) = &registry.pull_secret_ref {
            let namespace = image.namespace().unwrap_or_default();
            let secrets: Api<Secret> = Api::namespaced(self.client.clone(), &namespace);
            let s = secrets
                .get(&secret.name)
                .await
                .map_err(|e| format!("reading pull secret {namespace}/{}: {e}", secret.name))?;
            let config = DockerConfig::from_secret_data(&s.data.unwrap_or_default())
                .map_err(|e| format!("pull secret {namespace}/{}: {e}", secret.name))?;
            let host = ImageReference::parse(&registry.url)
                .map(|r| r.registry)
                .unwrap_or_default();
            options.auth = registry_auth_for(&config, &host);
        }
        Ok(options)
    }
}

impl DigestResolver for RegistryResolver {
    fn resolve<'a>(&'a self, image: &'a VMDiskImage) -> BoxFuture<'a, Result<String, String>> {
        Box::pin(async move {
            let reference = ImageReference::parse(&image.spec.source.registry.url)
                .map_err(|e| e.to_string())?;
            let options = self.options(image).await?;
            self.puller
                .resolve_digest(&reference.to_string(), &options)
                .await
                .map_err(|e| e.to_string())
        })
    }
}

/// Runs the image controller until the future is dropped.
pub async fn run_image_controller(client: Client) {
    let images: Api<VMDiskImage> = Api::all(client.clone());
    let caches_api: Api<NodeDiskCache> = Api::all(client.clone());
    let (caches, writer) = reflector::store::<NodeDiskCache>();
    tokio::spawn(
        reflector::reflector(
            writer,
            watcher(caches_api.clone(), watcher::Config::default()),
        )
        .default_backoff()
        .touched_objects()
        .for_each(|_| futures::future::ready(())),
    );
    let ctx = Arc::new(Context {
        client: client.clone(),
        resolver: Arc::new(RegistryResolver::new(client)),
        caches,
    });
    let controller = Controller::new(images, watcher::Config::default());
    let image_store = controller.store();
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
pub fn spawn(client: Client) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let namespace = std::env::var("POD_NAMESPACE").unwrap_or_else(|_| "vmdisk-system".into());
        let identity = std::env::var("POD_NAME")
            .unwrap_or_else(|_| format!("vmdisk-webhook-{}", std::process::id()));
        let duration = Duration::from_secs(15);
        let elector = LeaderElector::new(
            client.clone(),
            &namespace,
            "vmdisk-controller",
            &identity,
            duration,
        );
        let mut running: Option<tokio::task::JoinHandle<()>> = None;
        loop {
            let leading = match elector.try_lead().await {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!(error = %e, "leader election failed");
                    false
                }
            };
            match (leading, running.is_some()) {
                (true, false) => {
                    tracing::info!(%identity, "became leader; starting the image controller");
                    running = Some(tokio::spawn(run_image_controller(client.clone())));
                }
                (false, true) => {
                    tracing::warn!(%identity, "lost leadership; stopping the image controller");
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
