//! The image controller: the only writer of VMDiskImage status.
//!
//! It resolves each image's reference to a digest once for the whole cluster (agents pull by
//! that digest, so every node caches the same bits), re-resolves moving tags on the image's
//! `pollInterval`, keeps the agents' copy of the image's pull credentials current
//! ([`super::credentials`]), and aggregates source format, virtual size and the warm-node count
//! from the NodeDiskCache objects the agents publish. [`needs_resolve`] and
//! [`aggregate_status`] are the pure decisions; [`reconcile`] does the I/O.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Api, Client, Resource, ResourceExt};
use thiserror::Error;
use vmdisk_crds::{
    credentials_secret_name, format_bytes_quantity, reasons, AccessScope, ApiAccess,
    CacheEntryState, ImagePhase, ImageReference, NodeDiskCache, VMDiskImage, VMDiskImageStatus,
};
use vmdisk_registry::DockerConfig;

use super::credentials::{self, CredentialsCopier};

/// What the image controller asks of the API server (besides [`credentials::API_ACCESS`]).
pub const API_ACCESS: &[ApiAccess] = &[
    ApiAccess::new(
        "vmdisk.io",
        "vmdiskimages",
        &["list", "watch"],
        AccessScope::Cluster,
    ),
    ApiAccess::new(
        "vmdisk.io",
        "vmdiskimages/status",
        &["patch"],
        AccessScope::Cluster,
    ),
    ApiAccess::new(
        "vmdisk.io",
        "nodediskcaches",
        &["list", "watch"],
        AccessScope::Cluster,
    ),
    // Events on VMDiskImages (Resolved, ResolveFailed, PullSecretError).
    ApiAccess::new(
        "events.k8s.io",
        "events",
        &["create", "patch"],
        AccessScope::Cluster,
    ),
];

#[derive(Debug, Error)]
pub enum ControllerError {
    #[error("writing the status of {namespace}/{name}: {source}")]
    Status {
        namespace: String,
        name: String,
        #[source]
        source: kube::Error,
    },
}

/// What resolution did in this reconcile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResolveOutcome {
    Resolved { digest: String },
    Failed { message: String },
    NotAttempted,
}

/// Resolves an image's reference to a digest, with the image's credentials (if any).
pub trait DigestResolver: Send + Sync + 'static {
    fn resolve<'a>(
        &'a self,
        image: &'a VMDiskImage,
        credentials: Option<&'a DockerConfig>,
    ) -> BoxFuture<'a, Result<String, String>>;
}

pub(crate) fn to_timestamp(t: DateTime<Utc>) -> k8s_openapi::jiff::Timestamp {
    k8s_openapi::jiff::Timestamp::from_microsecond(t.timestamp_micros()).unwrap_or_default()
}

pub(crate) fn from_timestamp(t: &k8s_openapi::jiff::Timestamp) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(t.as_microsecond()).unwrap_or_default()
}

/// `30s`, `10m`, `1h30m`.
pub fn parse_interval(text: &str) -> Option<Duration> {
    let mut total = 0u64;
    let mut number = String::new();
    for c in text.chars() {
        if c.is_ascii_digit() {
            number.push(c);
            continue;
        }
        let n: u64 = number.parse().ok()?;
        number.clear();
        total += n * match c {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            _ => return None,
        };
    }
    (number.is_empty() && total > 0).then(|| Duration::from_secs(total))
}

fn last_resolved(image: &VMDiskImage) -> Option<DateTime<Utc>> {
    let text = image.status.as_ref()?.last_resolved.as_deref()?;
    DateTime::parse_from_rfc3339(text)
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

/// Time until a moving tag is due for re-resolution, if it ever is.
pub fn next_poll(image: &VMDiskImage, now: DateTime<Utc>) -> Option<Duration> {
    let interval = parse_interval(image.spec.poll_interval.as_deref()?)?;
    let moving =
        ImageReference::parse(&image.spec.source.registry.url).is_ok_and(|r| r.is_moving());
    if !moving {
        return None;
    }
    let due = last_resolved(image)? + chrono::Duration::from_std(interval).ok()?;
    Some((due - now).to_std().unwrap_or(Duration::ZERO))
}

/// True when the reference must be (re-)resolved now.
pub fn needs_resolve(image: &VMDiskImage, now: DateTime<Utc>) -> bool {
    let status = image.status.as_ref();
    if status.and_then(|s| s.digest.as_ref()).is_none() {
        return true;
    }
    if status.and_then(|s| s.observed_generation) != image.metadata.generation {
        return true;
    }
    next_poll(image, now) == Some(Duration::ZERO)
}

fn condition(
    previous: &[Condition],
    type_: &str,
    ok: bool,
    reason: &str,
    message: String,
    generation: Option<i64>,
    now: DateTime<Utc>,
) -> Condition {
    let status = if ok { "True" } else { "False" };
    let since = previous
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or_else(|| Time(to_timestamp(now)));
    Condition {
        type_: type_.to_string(),
        status: status.to_string(),
        reason: reason.to_string(),
        message,
        observed_generation: generation,
        last_transition_time: since,
    }
}

/// The status this image should have.
pub fn aggregate_status(
    image: &VMDiskImage,
    outcome: &ResolveOutcome,
    caches: &[Arc<NodeDiskCache>],
    now: DateTime<Utc>,
) -> VMDiskImageStatus {
    let previous = image.status.clone().unwrap_or_default();
    let generation = image.metadata.generation;
    let (digest, last_resolved) = match outcome {
        ResolveOutcome::Resolved { digest } => (
            Some(digest.clone()),
            Some(now.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)),
        ),
        // A failed re-resolution keeps the last good digest: nodes keep serving it.
        _ => (previous.digest.clone(), previous.last_resolved.clone()),
    };
    let mut warm = BTreeSet::new();
    let (mut source_format, mut virtual_size) =
        (previous.source_format.clone(), previous.virtual_size);
    if let Some(d) = &digest {
        for cache in caches {
            for e in cache.status.iter().flat_map(|s| s.entries.iter()) {
                if &e.digest != d || e.state != CacheEntryState::Ready {
                    continue;
                }
                source_format = e.source_format.clone().or(source_format);
                virtual_size = e.virtual_size.or(virtual_size);
                if e.format == image.spec.format {
                    warm.insert(cache.name_any());
                }
            }
        }
    }
    let warm_nodes = warm.len() as u32;
    let failed = matches!(outcome, ResolveOutcome::Failed { .. });
    let phase = match (&digest, failed, warm_nodes) {
        (None, true, _) => ImagePhase::Failed,
        (None, false, _) => ImagePhase::Pending,
        (Some(_), _, 0) => ImagePhase::Resolved,
        (Some(_), _, _) => ImagePhase::Ready,
    };
    let resolved_condition = match (outcome, &digest) {
        (ResolveOutcome::Failed { message }, _) => condition(
            &previous.conditions,
            "Resolved",
            false,
            "ResolveFailed",
            message.clone(),
            generation,
            now,
        ),
        (_, Some(d)) => condition(
            &previous.conditions,
            "Resolved",
            true,
            "Resolved",
            format!("{} resolves to {d}", image.spec.source.registry.url),
            generation,
            now,
        ),
        (_, None) => condition(
            &previous.conditions,
            "Resolved",
            false,
            "Pending",
            "not resolved yet".into(),
            generation,
            now,
        ),
    };
    let ready_condition = condition(
        &previous.conditions,
        "Ready",
        warm_nodes > 0,
        if warm_nodes > 0 {
            "CachedOnNodes"
        } else {
            "NotCached"
        },
        format!(
            "{warm_nodes} node(s) hold the image ready as {}",
            image.spec.format
        ),
        generation,
        now,
    );
    VMDiskImageStatus {
        phase: Some(phase),
        digest,
        source_format,
        virtual_size,
        virtual_size_quantity: virtual_size.map(format_bytes_quantity),
        warm_nodes,
        last_resolved,
        observed_generation: generation,
        conditions: vec![resolved_condition, ready_condition],
    }
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
pub async fn reconcile(
    image: Arc<VMDiskImage>,
    ctx: Arc<Context>,
) -> Result<Action, ControllerError> {
    let namespace = image.namespace().unwrap_or_default();
    let name = image.name_any();
    let now = Utc::now();
    let resolve_due = needs_resolve(&image, now);
    let has_pull_secret = image.spec.source.registry.pull_secret_ref.is_some();
    let copy = image.uid().and_then(|uid| {
        ctx.copies
            .get(&ObjectRef::new(&credentials_secret_name(&uid)).within(ctx.copier.namespace()))
    });

    let mut credentials = None;
    let mut failure = None;
    if has_pull_secret && (resolve_due || credentials::needs_refresh(copy.as_deref(), now)) {
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
                ctx.event(
                    &image,
                    EventType::Warning,
                    reasons::PULL_SECRET_ERROR,
                    message.clone(),
                )
                .await;
                failure = Some(message);
            }
        }
    }
    let outcome = match failure {
        Some(message) => ResolveOutcome::Failed { message },
        None if resolve_due => match ctx.resolver.resolve(&image, credentials.as_ref()).await {
            Ok(digest) => ResolveOutcome::Resolved { digest },
            Err(message) => ResolveOutcome::Failed { message },
        },
        None => ResolveOutcome::NotAttempted,
    };
    match &outcome {
        ResolveOutcome::Failed { message } => {
            tracing::warn!(%namespace, %name, %message, "cannot resolve the image reference");
            ctx.event(
                &image,
                EventType::Warning,
                reasons::RESOLVE_FAILED,
                message.clone(),
            )
            .await;
        }
        ResolveOutcome::Resolved { digest } if image.digest() != Some(digest.as_str()) => {
            ctx.event(
                &image,
                EventType::Normal,
                reasons::RESOLVED,
                format!("{} resolves to {digest}", image.spec.source.registry.url),
            )
            .await;
        }
        _ => {}
    }
    let status = aggregate_status(&image, &outcome, &ctx.caches.state(), now);
    if image.status.as_ref() != Some(&status) {
        let api: Api<VMDiskImage> = Api::namespaced(ctx.client.clone(), &namespace);
        api.patch_status(
            &name,
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"status": status})),
        )
        .await
        .map_err(|source| ControllerError::Status {
            namespace: namespace.clone(),
            name: name.clone(),
            source,
        })?;
        tracing::info!(%namespace, %name, phase = ?status.phase, digest = ?status.digest, warm_nodes = status.warm_nodes, "status updated");
    }
    let mut updated = (*image).clone();
    updated.status = Some(status);
    Ok(match outcome {
        ResolveOutcome::Failed { .. } => Action::requeue(Duration::from_secs(30)),
        _ => {
            let mut next = next_poll(&updated, now).unwrap_or(Duration::from_secs(600));
            if has_pull_secret {
                next = next.min(credentials::REFRESH);
            }
            Action::requeue(next.max(Duration::from_secs(1)))
        }
    })
}

pub fn error_policy(
    _image: Arc<VMDiskImage>,
    error: &ControllerError,
    _ctx: Arc<Context>,
) -> Action {
    tracing::warn!(error = %crate::error_chain(error), "image reconcile failed; retrying");
    Action::requeue(Duration::from_secs(15))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::testing::{MockApi, Reply};
    use vmdisk_crds::{CacheEntryStatus, DiskFormat, NodeDiskCacheSpec, NodeDiskCacheStatus};

    const D: &str = "sha256:abababababababababababababababababababababababababababababababab";

    fn image(url: &str, poll: Option<&str>, status: Option<VMDiskImageStatus>) -> VMDiskImage {
        let mut i: VMDiskImage = serde_json::from_value(serde_json::json!({
            "apiVersion": "vmdisk.io/v1alpha1", "kind": "VMDiskImage",
            "metadata": {"name": "fedora", "namespace": "vms", "generation": 1},
            "spec": {"source": {"registry": {"url": url}}, "pollInterval": poll},
        }))
        .unwrap();
        i.status = status;
        i
    }

    fn cache(
        node: &str,
        digest: &str,
        state: CacheEntryState,
        format: DiskFormat,
    ) -> Arc<NodeDiskCache> {
        let mut c = NodeDiskCache::new(
            node,
            NodeDiskCacheSpec {
                node_name: node.into(),
            },
        );
        c.status = Some(NodeDiskCacheStatus {
            entries: vec![CacheEntryStatus {
                digest: digest.into(),
                format,
                state,
                source_format: Some("qcow2".into()),
                virtual_size: Some(5 << 30),
                ..Default::default()
            }],
            ..Default::default()
        });
        Arc::new(c)
    }

    #[test]
    fn intervals() {
        assert_eq!(parse_interval("30s"), Some(Duration::from_secs(30)));
        assert_eq!(parse_interval("1h30m"), Some(Duration::from_secs(5400)));
        assert_eq!(parse_interval("10"), None);
        assert_eq!(parse_interval("5x"), None);
        assert_eq!(parse_interval("0s"), None);
    }

    #[test]
    fn resolution_is_needed_once_then_on_generation_or_poll() {
        let now = Utc::now();
        let fresh = image("quay.io/a/b:1", Some("10m"), None);
        assert!(needs_resolve(&fresh, now));
        let resolved = VMDiskImageStatus {
            digest: Some(D.into()),
            observed_generation: Some(1),
            last_resolved: Some(now.to_rfc3339()),
            ..Default::default()
        };
        let done = image("quay.io/a/b:1", Some("10m"), Some(resolved.clone()));
        assert!(!needs_resolve(&done, now));
        assert!(
            needs_resolve(&done, now + chrono::Duration::minutes(11)),
            "moving tag due again"
        );
        let pinned = image(
            &format!("quay.io/a/b@{D}"),
            Some("10m"),
            Some(resolved.clone()),
        );
        assert!(
            !needs_resolve(&pinned, now + chrono::Duration::hours(5)),
            "digest references never move"
        );
        let mut edited = done.clone();
        edited.metadata.generation = Some(2);
        assert!(needs_resolve(&edited, now));
    }

    #[test]
    fn status_aggregates_warm_nodes_and_keeps_the_digest_on_failure() {
        let now = Utc::now();
        let img = image("quay.io/a/b:1", None, None);
        let caches = vec![
            cache("n1", D, CacheEntryState::Ready, DiskFormat::Raw),
            cache("n2", D, CacheEntryState::Pulling, DiskFormat::Raw),
            cache("n3", D, CacheEntryState::Ready, DiskFormat::Qcow2),
            cache(
                "n4",
                "sha256:other",
                CacheEntryState::Ready,
                DiskFormat::Raw,
            ),
        ];
        let s = aggregate_status(
            &img,
            &ResolveOutcome::Resolved { digest: D.into() },
            &caches,
            now,
        );
        assert_eq!(s.phase, Some(ImagePhase::Ready));
        assert_eq!(
            s.warm_nodes, 1,
            "only n1 holds it ready in the image's format"
        );
        assert_eq!(s.source_format.as_deref(), Some("qcow2"));
        assert_eq!(s.virtual_size_quantity.as_deref(), Some("5Gi"));
        assert_eq!(s.observed_generation, Some(1));
        assert!(s.conditions.iter().all(|c| c.status == "True"));

        let with = image("quay.io/a/b:1", None, Some(s.clone()));
        let failed = aggregate_status(
            &with,
            &ResolveOutcome::Failed {
                message: "registry down".into(),
            },
            &caches,
            now + chrono::Duration::minutes(1),
        );
        assert_eq!(failed.digest.as_deref(), Some(D));
        assert_eq!(failed.phase, Some(ImagePhase::Ready));
        let resolved = failed
            .conditions
            .iter()
            .find(|c| c.type_ == "Resolved")
            .unwrap();
        assert_eq!(
            (resolved.status.as_str(), resolved.reason.as_str()),
            ("False", "ResolveFailed")
        );
        let ready = failed
            .conditions
            .iter()
            .find(|c| c.type_ == "Ready")
            .unwrap();
        assert_eq!(
            ready.last_transition_time, s.conditions[1].last_transition_time,
            "unchanged condition keeps its transition time"
        );

        let never = aggregate_status(
            &img,
            &ResolveOutcome::Failed {
                message: "401".into(),
            },
            &[],
            now,
        );
        assert_eq!(never.phase, Some(ImagePhase::Failed));
        // Unchanged inputs give an identical status: no patch.
        let again = aggregate_status(
            &with,
            &ResolveOutcome::NotAttempted,
            &caches,
            now + chrono::Duration::minutes(5),
        );
        assert_eq!(again, s);
    }

    struct FixedResolver(Result<String, String>);

    impl DigestResolver for FixedResolver {
        fn resolve<'a>(
            &'a self,
            _image: &'a VMDiskImage,
            _credentials: Option<&'a DockerConfig>,
        ) -> BoxFuture<'a, Result<String, String>> {
            Box::pin(async move { self.0.clone() })
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
        Arc::new(Context {
            recorder: Recorder::new(
                client.clone(),
                kube::runtime::events::Reporter {
                    controller: "test".into(),
                    instance: None,
                },
            ),
            copier: CredentialsCopier::new(client.clone(), "vmdisk-credentials"),
            client,
            resolver: Arc::new(resolver),
            caches: cache_store,
            copies,
        })
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
            ) -> BoxFuture<'a, Result<String, String>> {
                Box::pin(async move {
                    match credentials.map(|c| vmdisk_registry::registry_auth_for(c, "r.io")) {
                        Some(oci_client::secrets::RegistryAuth::Basic(u, _)) if u == "u" => {
                            Ok(D.to_string())
                        }
                        other => Err(format!("unexpected credentials {other:?}")),
                    }
                })
            }
        }
        let ctx = context(client, FixedResolver(Err("unused".into())), vec![]);
        let ctx = Arc::new(Context {
            resolver: Arc::new(NeedsCredentials),
            client: ctx.client.clone(),
            caches: ctx.caches.clone(),
            copies: ctx.copies.clone(),
            copier: ctx.copier.clone(),
            recorder: ctx.recorder.clone(),
        });
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
}
