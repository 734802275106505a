//! One reconcile of a VMDiskImage: refresh the credentials copy when due, resolve when due,
//! aggregate, and patch the status only when it changed; `error_policy` and the [`Context`]
//! every reconcile shares.

use std::sync::Arc;
use std::time::Duration;

use crate::events::Recorder;
use chrono::Utc;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Api, Client, Resource, ResourceExt};
use thiserror::Error;
use vmdisk_crds::{credentials_secret_name, reasons, NodeDiskCache, PullMethod, VMDiskImage};
use vmdisk_support::{Backoff, Failures};

use super::resolve::{needs_resolve, next_poll, DigestResolver, Resolution, RESOLVE_BACKOFF};
use super::status::{aggregate_status, is_news, ResolveOutcome};
use crate::credentials::{self, CredentialsCopier};

#[derive(Debug, Error)]
pub enum ImageError {
    #[error("writing the status of {namespace}/{name}: {source}")]
    Status {
        namespace: String,
        name: String,
        #[source]
        source: kube::Error,
    },
}

/// Shared by every reconcile.
pub struct Context {
    pub client: Client,
    pub resolver: Arc<dyn DigestResolver>,
    pub caches: Store<NodeDiskCache>,
    /// The credentials copies in the credentials namespace.
    pub copies: Store<Secret>,
    pub copier: CredentialsCopier,
    pub recorder: Recorder,
    /// Consecutive failed resolutions per image ([`RESOLVE_BACKOFF`]): no new attempt, log
    /// line or Event before the image's delay has passed, unless its spec changes.
    pub resolve_failures: Failures<ObjectRef<VMDiskImage>>,
    /// Consecutive failed reconciles per image (a status patch refused), [`ERROR_BACKOFF`].
    pub errors: Failures<ObjectRef<VMDiskImage>>,
    /// Where images pulled by the node's runtime can be mounted, for their `NodePull`
    /// condition (`None`: not reported).
    pub pull_methods: Option<super::ImageSettings>,
    /// Where the time to all nodes warm is observed (`None`: nowhere).
    pub metrics: Option<crate::metrics::ImageMetrics>,
}

/// How long an image whose reconcile failed waits before the next try.
pub const ERROR_BACKOFF: Backoff = Backoff::new(Duration::from_secs(5), Duration::from_secs(300));

impl Context {
    /// A context with empty backoff records.
    pub fn new(
        client: Client,
        resolver: Arc<dyn DigestResolver>,
        caches: Store<NodeDiskCache>,
        copies: Store<Secret>,
        copier: CredentialsCopier,
        recorder: Recorder,
    ) -> Self {
        Self {
            client,
            resolver,
            caches,
            copies,
            copier,
            recorder,
            resolve_failures: Failures::new(RESOLVE_BACKOFF),
            errors: Failures::new(ERROR_BACKOFF),
            pull_methods: None,
            metrics: None,
        }
    }
}

impl Context {
    async fn event(&self, image: &VMDiskImage, type_: EventType, reason: &str, note: String) {
        let event = Event {
            type_,
            reason: reason.into(),
            note: Some(note.chars().take(1000).collect()),
            action: "Resolve".into(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&event, &image.object_ref(&())).await {
            tracing::debug!(error = %e, reason, "cannot publish an Event");
        }
    }
}

/// Refreshes the credentials copy when due, resolves when due, aggregates, and patches the
/// status only when it changed.
pub async fn reconcile(image: Arc<VMDiskImage>, ctx: Arc<Context>) -> Result<Action, ImageError> {
    let key = ObjectRef::from_obj(&*image);
    let result = reconcile_image(image, &ctx).await;
    if result.is_ok() {
        ctx.errors.succeeded(&key);
    }
    result
}

async fn reconcile_image(image: Arc<VMDiskImage>, ctx: &Context) -> Result<Action, ImageError> {
    let namespace = image.namespace().unwrap_or_default();
    let name = image.name_any();
    let now = Utc::now();
    let key = ObjectRef::from_obj(&*image);
    let edited =
        image.status.as_ref().and_then(|s| s.observed_generation) != image.metadata.generation;
    if edited {
        // A new spec may resolve at once, whatever the old one did.
        ctx.resolve_failures.succeeded(&key);
    }
    let backing_off = ctx.resolve_failures.waiting(&key);
    let resolve_due = backing_off.is_none() && needs_resolve(&image, now);
    let has_pull_secret = image.spec.source.registry.pull_secret_ref.is_some();
    let copy = image.uid().and_then(|uid| {
        ctx.copies
            .get(&ObjectRef::new(&credentials_secret_name(&uid)).within(ctx.copier.namespace()))
    });

    let mut credentials = None;
    let mut failure = None;
    let mut secret_failed = false;
    if has_pull_secret
        && backing_off.is_none()
        && (resolve_due || credentials::needs_refresh(copy.as_deref(), now))
    {
        match ctx.copier.read_source(&image).await {
            Ok(config) => {
                if let Some(config) = &config {
                    if let Err(message) = ctx
                        .copier
                        .write_copy(&image, config, copy.as_deref(), now)
                        .await
                    {
                        failure = Some(message);
                    }
                }
                credentials = config;
            }
            Err(message) => {
                secret_failed = true;
                failure = Some(message);
            }
        }
    }
    let outcome = match failure {
        Some(message) => ResolveOutcome::Failed { message },
        None if resolve_due => match ctx.resolver.resolve(&image, credentials.as_ref()).await {
            Ok(Resolution { digest, disk }) => ResolveOutcome::Resolved { digest, disk },
            Err(message) => ResolveOutcome::Failed { message },
        },
        None => ResolveOutcome::NotAttempted,
    };
    // One attempt per backoff step, so one log line per step; Events only when the image
    // does not show the news already.
    let news = is_news(&image, &outcome);
    let mut retry_in = backing_off;
    match &outcome {
        ResolveOutcome::Failed { message } => {
            let (failures, delay) = ctx.resolve_failures.failed(key.clone());
            retry_in = Some(delay);
            tracing::warn!(%namespace, %name, %message, failures, retry_in = ?delay, "cannot resolve the image reference");
            if news && secret_failed {
                ctx.event(
                    &image,
                    EventType::Warning,
                    reasons::PULL_SECRET_ERROR,
                    message.clone(),
                )
                .await;
            }
            if news {
                ctx.event(
                    &image,
                    EventType::Warning,
                    reasons::RESOLVE_FAILED,
                    message.clone(),
                )
                .await;
            }
        }
        ResolveOutcome::Resolved { digest, .. } => {
            if ctx.resolve_failures.succeeded(&key) {
                tracing::info!(%namespace, %name, %digest, "the image reference resolves again");
            }
            if news {
                ctx.event(
                    &image,
                    EventType::Normal,
                    reasons::RESOLVED,
                    format!("{} resolves to {digest}", image.spec.source.registry.url),
                )
                .await;
            }
        }
        ResolveOutcome::NotAttempted => {}
    }
    let node_pull = ctx.pull_methods.as_ref().and_then(|settings| {
        let method = image
            .spec
            .source
            .registry
            .pull_method
            .unwrap_or(settings.default_pull_method);
        (method != PullMethod::Pod).then(|| (method, settings.runtimes.node_pull(None)))
    });
    let status = aggregate_status(
        &image,
        &outcome,
        &ctx.caches.state(),
        node_pull.as_ref().map(|(m, n)| (*m, n)),
        now,
    );
    if image.status.as_ref() != Some(&status) {
        let api: Api<VMDiskImage> = Api::namespaced(ctx.client.clone(), &namespace);
        api.patch_status(
            &name,
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"status": status})),
        )
        .await
        .map_err(|source| ImageError::Status {
            namespace: namespace.clone(),
            name: name.clone(),
            source,
        })?;
        tracing::info!(%namespace, %name, phase = ?status.phase, digest = ?status.digest, warm_nodes = status.warm_nodes, "status updated");
        if let (Some(seconds), Some(metrics)) = (newly_all_warm(&image, &status), &ctx.metrics) {
            tracing::info!(%namespace, %name, seconds, pull = ?status.pull, "every node asked holds the image");
            metrics.observe_all_warm(seconds);
        }
    }
    let mut updated = (*image).clone();
    updated.status = Some(status);
    // Backing off: the next try when the delay has passed (a change to the spec comes
    // sooner, through the watch).
    Ok(match retry_in {
        Some(delay) => Action::requeue(delay.max(Duration::from_secs(1))),
        None => {
            let mut next = next_poll(&updated, now).unwrap_or(Duration::from_secs(600));
            if has_pull_secret {
                next = next.min(credentials::REFRESH);
            }
            Action::requeue(next.max(Duration::from_secs(1)))
        }
    })
}

/// The time to all nodes warm when `status` is the first to tell it for its digest.
fn newly_all_warm(image: &VMDiskImage, status: &vmdisk_crds::VMDiskImageStatus) -> Option<f64> {
    let seconds = status.pull.as_ref()?.all_nodes_warm_seconds?;
    let before = image.status.as_ref().filter(|s| s.digest == status.digest);
    let told = before
        .and_then(|s| s.pull.as_ref())
        .is_some_and(|p| p.all_nodes_warm_seconds.is_some());
    (!told).then_some(seconds)
}

/// A failed reconcile (the status patch refused) is retried after the image's own backoff,
/// logged once per retry.
pub fn error_policy(image: Arc<VMDiskImage>, error: &ImageError, ctx: Arc<Context>) -> Action {
    let (failures, delay) = ctx.errors.failed(ObjectRef::from_obj(&*image));
    tracing::warn!(error = %crate::error_chain(error), failures, retry_in = ?delay, "image reconcile failed");
    Action::requeue(delay)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::test_objects::{cache, image, D};
    use crate::testing::{MockApi, Reply};
    use futures::future::BoxFuture;
    use vmdisk_crds::{CacheEntryState, DiskFormat};
    use vmdisk_registry::DockerConfig;

    struct FixedResolver(Result<String, String>);

    impl DigestResolver for FixedResolver {
        fn resolve<'a>(
            &'a self,
            _image: &'a VMDiskImage,
            _credentials: Option<&'a DockerConfig>,
        ) -> BoxFuture<'a, Result<Resolution, String>> {
            Box::pin(async move { self.0.clone().map(Resolution::digest_only) })
        }
    }

    fn context(
        client: Client,
        resolver: FixedResolver,
        caches: Vec<Arc<NodeDiskCache>>,
    ) -> Arc<Context> {
        let (cache_store, mut writer) = kube::runtime::reflector::store::<NodeDiskCache>();
        for c in caches {
            writer.apply_watcher_event(&kube::runtime::watcher::Event::Apply((*c).clone()));
        }
        let (copies, _) = kube::runtime::reflector::store::<Secret>();
        Arc::new(Context::new(
            client.clone(),
            Arc::new(resolver),
            cache_store,
            copies,
            CredentialsCopier::new(client.clone(), "vmdisk-credentials"),
            Recorder::new(
                client,
                kube::runtime::events::Reporter {
                    controller: "test".into(),
                    instance: None,
                },
            ),
        ))
    }

    #[tokio::test]
    async fn reconcile_patches_status_once_and_not_when_unchanged() {
        let (client, api) = MockApi::start(|req| match (req.method.as_str(), req.path.as_str()) {
            ("POST", "/apis/events.k8s.io/v1/namespaces/vms/events") => Reply::echo(&req),
            ("PATCH", "/apis/vmdisk.io/v1alpha1/namespaces/vms/vmdiskimages/fedora/status") => {
                Reply::json(
                    200,
                    serde_json::to_value(image("quay.io/a/b:1", None, None)).unwrap(),
                )
            }
            _ => Reply::not_found(),
        });
        let ctx = context(
            client,
            FixedResolver(Ok(D.into())),
            vec![cache("n1", D, CacheEntryState::Ready, DiskFormat::Raw)],
        );
        let img = Arc::new(image("quay.io/a/b:1", None, None));
        reconcile(Arc::clone(&img), Arc::clone(&ctx)).await.unwrap();
        let seen = api.requests();
        let event = seen.iter().find(|r| r.method == "POST").expect("an Event");
        assert_eq!(event.body["reason"], "Resolved");
        let patch = seen
            .iter()
            .find(|r| r.method == "PATCH")
            .expect("a status patch");
        assert_eq!(patch.body["status"]["digest"], D);
        assert_eq!(patch.body["status"]["phase"], "Ready");
        assert_eq!(patch.body["status"]["warmNodes"], 1);
        // The image now carries that status: a second reconcile sends nothing.
        let mut settled = (*img).clone();
        settled.status = Some(serde_json::from_value(patch.body["status"].clone()).unwrap());
        reconcile(Arc::new(settled), ctx).await.unwrap();
        assert_eq!(api.requests().len(), seen.len(), "{:?}", api.requests());
    }

    #[tokio::test]
    async fn pull_secret_is_copied_for_the_registry_host_only_and_used_to_resolve() {
        use base64::Engine as _;
        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        let config = format!(
            r#"{{"auths": {{"r.io": {{"auth": "{}"}}, "elsewhere.io": {{"auth": "{}"}}}}}}"#,
            b64("u:p"),
            b64("other:secret")
        );
        let source = serde_json::json!({
            "apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/dockerconfigjson",
            "metadata": {"name": "creds", "namespace": "vms"},
            "data": {".dockerconfigjson": b64(&config)},
        });
        let (client, api) =
            MockApi::start(move |req| match (req.method.as_str(), req.path.as_str()) {
                ("GET", "/api/v1/namespaces/vms/secrets/creds") => Reply::json(200, source.clone()),
                ("PATCH", "/api/v1/namespaces/vmdisk-credentials/secrets/pull-uid-1") => {
                    Reply::echo(&req)
                }
                ("POST", _) => Reply::echo(&req),
                ("PATCH", _) => Reply::json(
                    200,
                    serde_json::to_value(image("r.io/a/b:1", None, None)).unwrap(),
                ),
                _ => Reply::not_found(),
            });
        struct NeedsCredentials;
        impl DigestResolver for NeedsCredentials {
            fn resolve<'a>(
                &'a self,
                _image: &'a VMDiskImage,
                credentials: Option<&'a DockerConfig>,
            ) -> BoxFuture<'a, Result<Resolution, String>> {
                Box::pin(async move {
                    match credentials.map(|c| vmdisk_registry::registry_auth_for(c, "r.io")) {
                        Some(oci_client::secrets::RegistryAuth::Basic(u, _)) if u == "u" => {
                            Ok(Resolution::digest_only(D.to_string()))
                        }
                        other => Err(format!("unexpected credentials {other:?}")),
                    }
                })
            }
        }
        let ctx = context(client, FixedResolver(Err("unused".into())), vec![]);
        let ctx = Arc::new(Context::new(
            ctx.client.clone(),
            Arc::new(NeedsCredentials),
            ctx.caches.clone(),
            ctx.copies.clone(),
            ctx.copier.clone(),
            ctx.recorder.clone(),
        ));
        let mut img = image("r.io/a/b:1", None, None);
        img.metadata.uid = Some("uid-1".into());
        img.spec.source.registry.pull_secret_ref = Some(vmdisk_crds::SecretRef {
            name: "creds".into(),
        });
        let action = reconcile(Arc::new(img), ctx).await.unwrap();
        assert!(
            action == Action::requeue(credentials::REFRESH),
            "{action:?}"
        );
        let seen = api.requests();
        let copy = seen
            .iter()
            .find(|r| r.path.ends_with("/secrets/pull-uid-1"))
            .expect("the copy was written");
        assert!(
            copy.query.contains("fieldManager=vmdisk-image-controller"),
            "{}",
            copy.query
        );
        assert_eq!(
            copy.body["metadata"]["labels"]["vmdisk.io/image-uid"],
            "uid-1"
        );
        let written = base64::engine::general_purpose::STANDARD
            .decode(copy.body["data"][".dockerconfigjson"].as_str().unwrap())
            .unwrap();
        let written: serde_json::Value = serde_json::from_slice(&written).unwrap();
        assert!(written["auths"].get("r.io").is_some());
        assert!(
            written["auths"].get("elsewhere.io").is_none(),
            "only the image's registry: {written}"
        );
        let status = seen.iter().find(|r| r.path.ends_with("/status")).unwrap();
        assert_eq!(status.body["status"]["digest"], D);
    }

    #[tokio::test]
    async fn a_missing_pull_secret_fails_resolution_with_an_event() {
        let (client, api) = MockApi::start(|req| match (req.method.as_str(), req.path.as_str()) {
            ("POST", _) => Reply::echo(&req),
            ("PATCH", _) => Reply::json(
                200,
                serde_json::to_value(image("r.io/a/b:1", None, None)).unwrap(),
            ),
            _ => Reply::not_found(),
        });
        let ctx = context(client, FixedResolver(Ok(D.into())), vec![]);
        let mut img = image("r.io/a/b:1", None, None);
        img.metadata.uid = Some("uid-2".into());
        img.spec.source.registry.pull_secret_ref = Some(vmdisk_crds::SecretRef {
            name: "gone".into(),
        });
        reconcile(Arc::new(img), ctx).await.unwrap();
        let seen = api.requests();
        let reasons: Vec<&str> = seen
            .iter()
            .filter(|r| r.path.ends_with("/events"))
            .filter_map(|r| r.body["reason"].as_str())
            .collect();
        assert_eq!(reasons, ["PullSecretError", "ResolveFailed"]);
        let status = seen.iter().find(|r| r.path.ends_with("/status")).unwrap();
        assert_eq!(status.body["status"]["phase"], "Failed");
        let message = status.body["status"]["conditions"][0]["message"]
            .as_str()
            .unwrap();
        assert!(
            message.contains("pull secret vms/gone not found"),
            "{message}"
        );
    }

    /// Counts its calls; the registry is down.
    struct Down(std::sync::atomic::AtomicU32);

    impl DigestResolver for Down {
        fn resolve<'a>(
            &'a self,
            _image: &'a VMDiskImage,
            _credentials: Option<&'a DockerConfig>,
        ) -> BoxFuture<'a, Result<Resolution, String>> {
            self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Box::pin(async {
                Err("registry r.io failed after 1 attempt(s): connection refused".to_string())
            })
        }
    }

    /// Reconciles `times` times, feeding each status patch back into the image as the watch
    /// would; returns the requests sent.
    async fn wake(
        ctx: &Arc<Context>,
        api: &MockApi,
        img: &mut VMDiskImage,
        times: usize,
    ) -> Vec<crate::testing::Request> {
        for _ in 0..times {
            let before = api.requests().len();
            reconcile(Arc::new(img.clone()), Arc::clone(ctx))
                .await
                .unwrap();
            if let Some(patch) = api.requests()[before..]
                .iter()
                .find(|r| r.path.ends_with("/status"))
            {
                img.status = Some(serde_json::from_value(patch.body["status"].clone()).unwrap());
            }
        }
        api.requests()
    }

    fn down_context(client: Client, backoff: Backoff) -> (Arc<Context>, Arc<Down>) {
        let down = Arc::new(Down(Default::default()));
        let base = context(client, FixedResolver(Ok(D.into())), vec![]);
        let ctx = Context {
            resolve_failures: Failures::new(backoff),
            ..Context::new(
                base.client.clone(),
                Arc::clone(&down) as Arc<dyn DigestResolver>,
                base.caches.clone(),
                base.copies.clone(),
                base.copier.clone(),
                base.recorder.clone(),
            )
        };
        (Arc::new(ctx), down)
    }

    fn scripted() -> (Client, MockApi) {
        MockApi::start(|req| match req.method.as_str() {
            "POST" => Reply::echo(&req),
            "PATCH" => Reply::json(
                200,
                serde_json::to_value(image("r.io/a/b:1", None, None)).unwrap(),
            ),
            _ => Reply::not_found(),
        })
    }

    #[tokio::test]
    async fn an_unreachable_registry_is_tried_once_per_backoff_step() {
        let (client, api) = scripted();
        let (ctx, down) = down_context(client, RESOLVE_BACKOFF);
        let mut img = image("r.io/a/b:1", None, None);
        let seen = wake(&ctx, &api, &mut img, 10).await;
        assert_eq!(
            down.0.load(std::sync::atomic::Ordering::Relaxed),
            1,
            "woken ten times within the first backoff step: one attempt"
        );
        let patches = seen.iter().filter(|r| r.method == "PATCH").count();
        let events = seen.iter().filter(|r| r.path.ends_with("/events")).count();
        assert_eq!((patches, events), (1, 1), "{seen:?}");
        assert_eq!(
            img.status.unwrap().phase,
            Some(vmdisk_crds::ImagePhase::Failed)
        );
        assert_eq!(
            ctx.resolve_failures
                .count(&ObjectRef::new("fedora").within("vms")),
            1
        );
    }

    #[tokio::test]
    async fn a_failure_repeated_is_written_and_told_once() {
        // Every wake-up is past the backoff (none at all): each one tries the registry, and
        // none after the first writes the status or records an Event.
        let (client, api) = scripted();
        let (ctx, down) = down_context(client, Backoff::new(Duration::ZERO, Duration::ZERO));
        let mut img = image("r.io/a/b:1", None, None);
        let seen = wake(&ctx, &api, &mut img, 5).await;
        assert_eq!(down.0.load(std::sync::atomic::Ordering::Relaxed), 5);
        let patches = seen.iter().filter(|r| r.method == "PATCH").count();
        let events = seen.iter().filter(|r| r.path.ends_with("/events")).count();
        assert_eq!((patches, events), (1, 1), "{seen:?}");
        // A new spec is tried at once, whatever the backoff.
        let (client, api) = scripted();
        let (ctx, down) = down_context(client, RESOLVE_BACKOFF);
        let mut img = image("r.io/a/b:1", None, None);
        wake(&ctx, &api, &mut img, 1).await;
        img.metadata.generation = Some(2);
        wake(&ctx, &api, &mut img, 3).await;
        assert_eq!(down.0.load(std::sync::atomic::Ordering::Relaxed), 2);
    }
}
