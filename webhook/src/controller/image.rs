//! The image controller: the only writer of VMDiskImage status.
//!
//! It resolves each image's reference to a digest once for the whole cluster (agents pull by
//! that digest, so every node caches the same bits), re-resolves moving tags on the image's
//! `pollInterval`, and aggregates source format, virtual size and the warm-node count from the
//! NodeDiskCache objects the agents publish. [`needs_resolve`] and [`aggregate_status`] are
//! the pure decisions; [`reconcile`] does the I/O.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::reflector::Store;
use kube::{Api, Client, ResourceExt};
use thiserror::Error;
use vmdisk_crds::{
    format_bytes_quantity, CacheEntryState, ImagePhase, ImageReference, NodeDiskCache, VMDiskImage,
    VMDiskImageStatus,
};

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

/// Resolves an image's reference to a digest.
pub trait DigestResolver: Send + Sync + 'static {
    fn resolve<'a>(&'a self, image: &'a VMDiskImage) -> BoxFuture<'a, Result<String, String>>;
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
}

/// Resolves when due, aggregates, and patches the status only when it changed.
pub async fn reconcile(
    image: Arc<VMDiskImage>,
    ctx: Arc<Context>,
) -> Result<Action, ControllerError> {
    let namespace = image.namespace().unwrap_or_default();
    let name = image.name_any();
    let now = Utc::now();
    let outcome = if needs_resolve(&image, now) {
        match ctx.resolver.resolve(&image).await {
            Ok(digest) => ResolveOutcome::Resolved { digest },
            Err(message) => {
                tracing::warn!(%namespace, %name, %message, "cannot resolve the image reference");
                ResolveOutcome::Failed { message }
            }
        }
    } else {
        ResolveOutcome::NotAttempted
    };
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
        _ => Action::requeue(
            next_poll(&updated, now)
                .unwrap_or(Duration::from_secs(600))
                .max(Duration::from_secs(1)),
        ),
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
    use http_body_util::BodyExt;
    use kube::client::Body;
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
        fn resolve<'a>(&'a self, _image: &'a VMDiskImage) -> BoxFuture<'a, Result<String, String>> {
            Box::pin(async move { self.0.clone() })
        }
    }

    #[tokio::test]
    async fn reconcile_patches_status_once_and_not_when_unchanged() {
        let (service, mut handle) =
            tower_test::mock::pair::<http::Request<Body>, http::Response<Body>>();
        let (caches, mut writer) = kube::runtime::reflector::store::<NodeDiskCache>();
        writer.apply_watcher_event(&kube::runtime::watcher::Event::Apply(
            (*cache("n1", D, CacheEntryState::Ready, DiskFormat::Raw)).clone(),
        ));
        let ctx = Arc::new(Context {
            client: Client::new(service, "default"),
            resolver: Arc::new(FixedResolver(Ok(D.into()))),
            caches,
        });
        let img = Arc::new(image("quay.io/a/b:1", None, None));
        let server = tokio::spawn(async move {
            let (request, send) = handle.next_request().await.unwrap();
            assert_eq!(request.method(), "PATCH");
            assert_eq!(
                request.uri().path(),
                "/apis/vmdisk.io/v1alpha1/namespaces/vms/vmdiskimages/fedora/status"
            );
            let body: serde_json::Value =
                serde_json::from_slice(&request.into_body().collect().await.unwrap().to_bytes())
                    .unwrap();
            assert_eq!(body["status"]["digest"], D);
            assert_eq!(body["status"]["phase"], "Ready");
            assert_eq!(body["status"]["warmNodes"], 1);
            let reply = image("quay.io/a/b:1", None, None);
            send.send_response(
                http::Response::builder()
                    .body(Body::from(serde_json::to_vec(&reply).unwrap()))
                    .unwrap(),
            );
            body
        });
        reconcile(Arc::clone(&img), Arc::clone(&ctx)).await.unwrap();
        let body = server.await.unwrap();
        // The image now carries that status: a second reconcile sends nothing.
        let mut settled = (*img).clone();
        settled.status = Some(serde_json::from_value(body["status"].clone()).unwrap());
        reconcile(Arc::new(settled), ctx).await.unwrap();
    }
}
