//! HTTP routes: the two admission endpoints, probes and metrics.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;

use crate::admission::{
    decode_review, AdmissionAnswer, AdmissionRequest, ObjectView, ReviewError, Timer,
};
use crate::catalog::ImageCatalog;
use crate::metrics::{Outcome, Resource, WebhookMetrics};
use crate::mutate::pod::mutate_pod;
use crate::mutate::pvc::mutate_pvc;
use crate::mutate::view::{PodView, PvcView};
use crate::mutate::{ClaimMisses, ImageLookup, Mutation, MutationConfig};

/// Default limit on an AdmissionReview body. Objects are capped at ~1.5 MiB by etcd and a review
/// carries at most the object and its old version, so 4 MiB leaves room and refuses floods.
pub const DEFAULT_MAX_BODY_BYTES: usize = 4 << 20;

/// Everything a request handler needs.
pub struct Webhook {
    pub catalog: Arc<dyn ImageCatalog>,
    pub config: MutationConfig,
    pub metrics: Arc<WebhookMetrics>,
    /// Set once the serving certificate is loaded.
    pub tls_ready: AtomicBool,
    pub max_body_bytes: usize,
}

/// How an admission body was answered, before it becomes HTTP.
#[derive(Debug)]
pub enum Handled {
    Answer(AdmissionAnswer, Outcome),
    BadRequest(ReviewError),
}

impl Webhook {
    pub fn new(catalog: Arc<dyn ImageCatalog>, config: MutationConfig) -> Self {
        Self {
            catalog,
            config,
            metrics: Arc::new(WebhookMetrics::new()),
            tls_ready: AtomicBool::new(false),
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
        }
    }

    /// Answers one admission body for `resource`'s endpoint from the catalog as it is. Never
    /// panics on input.
    pub fn admit(&self, resource: Resource, body: &[u8]) -> Handled {
        let timer = Timer::start();
        let handled = self.decide(resource, body, self.catalog.as_ref());
        self.observe(resource, &handled, &timer);
        handled
    }

    /// As [`Self::admit`], except that a pod naming claims the catalog has not seen yet (a pod
    /// created right after its PVC) is decided again once the catalog asked its source.
    pub async fn admit_fetching(&self, resource: Resource, body: &[u8]) -> Handled {
        let timer = Timer::start();
        let catalog = self.catalog.as_ref();
        let handled = match resource {
            Resource::Pvc => self.decide(resource, body, catalog),
            Resource::Pod => {
                // The recorder holds a non-Sync borrow: it must not live across the await.
                let (first, missed) = {
                    let lookup = ClaimMisses::new(catalog);
                    let first = self.decide(resource, body, &lookup);
                    (first, lookup.into_missed())
                };
                if missed.is_empty() {
                    first
                } else {
                    let fetched = catalog.fetch_claims(&missed).await;
                    self.metrics.claims_fetched(fetched);
                    if fetched.found > 0 {
                        self.decide(resource, body, catalog)
                    } else {
                        first
                    }
                }
            }
        };
        self.observe(resource, &handled, &timer);
        handled
    }

    fn observe(&self, resource: Resource, handled: &Handled, timer: &Timer) {
        let (outcome, warnings) = match handled {
            Handled::Answer(a, o) => (*o, a.warnings.len()),
            Handled::BadRequest(_) => (Outcome::BadRequest, 0),
        };
        self.metrics
            .observe(resource, outcome, warnings, timer.seconds());
    }

    fn decide(&self, resource: Resource, body: &[u8], images: &dyn ImageLookup) -> Handled {
        match resource {
            Resource::Pvc => self.admit_as::<PvcView>(resource, body, |pvc, ns| {
                mutate_pvc(pvc, ns, images, &self.config)
            }),
            Resource::Pod => self.admit_as::<PodView>(resource, body, |pod, ns| {
                mutate_pod(pod, ns, images, &self.config)
            }),
        }
    }

    /// The review and the endpoint's view are read in one pass; an object that does not fit
    /// the view still gets an answer carrying the review's uid, with a warning.
    fn admit_as<'a, V: ObjectView<'a>>(
        &self,
        resource: Resource,
        body: &'a [u8],
        mutate: impl FnOnce(&V, &str) -> Mutation,
    ) -> Handled {
        let kind = match resource {
            Resource::Pvc => "PersistentVolumeClaim",
            Resource::Pod => "Pod",
        };
        match decode_review::<V>(body) {
            Ok(request) => {
                let (answer, outcome) =
                    self.answer(resource, &request, |object, ns| match object {
                        Ok(view) => Ok(mutate(view, ns)),
                        Err(why) => Err(format!(
                            "vmdisk: object is not a valid {kind}, left unchanged: {why}"
                        )),
                    });
                Handled::Answer(answer, outcome)
            }
            Err(e) => Handled::BadRequest(e),
        }
    }

    fn answer<O>(
        &self,
        resource: Resource,
        request: &AdmissionRequest<O>,
        mutate: impl FnOnce(&Result<O, String>, &str) -> Result<Mutation, String>,
    ) -> (AdmissionAnswer, Outcome) {
        let expected = match resource {
            Resource::Pvc => "persistentvolumeclaims",
            Resource::Pod => "pods",
        };
        let skip = |reason: &str| {
            tracing::debug!(uid = %request.uid, reason, "allowed without patch");
            (AdmissionAnswer::allow(&request.uid), Outcome::Skipped)
        };
        if !request.resource.group.is_empty() || request.resource.resource != expected {
            tracing::warn!(
                uid = %request.uid,
                resource = %request.resource.resource,
                group = %request.resource.group,
                endpoint = resource.as_str(),
                "unexpected resource sent to this endpoint; check the MutatingWebhookConfiguration rules"
            );
            return skip("unexpected resource");
        }
        if request
            .sub_resource
            .as_deref()
            .is_some_and(|s| !s.is_empty())
        {
            return skip("subresource");
        }
        if request.operation != "CREATE" {
            return skip("not a CREATE");
        }
        let Some(object) = request.object.as_ref() else {
            return skip("no object");
        };
        let namespace = request.namespace.as_deref().unwrap_or("default");
        let Mutation { patch, warnings } = match mutate(object, namespace) {
            Ok(m) => m,
            Err(warning) => {
                tracing::warn!(uid = %request.uid, %namespace, %warning, "object not decodable");
                return (
                    AdmissionAnswer {
                        uid: request.uid.to_string(),
                        patch: None,
                        warnings: vec![warning],
                    },
                    Outcome::Skipped,
                );
            }
        };
        let outcome = if patch.is_some() {
            Outcome::Patched
        } else {
            Outcome::Unchanged
        };
        // Every admission at info would cost more than the admission itself; warnings are
        // what an operator needs to see.
        if !warnings.is_empty() {
            tracing::info!(
                uid = %request.uid,
                %namespace,
                name = request.name.as_deref().unwrap_or(""),
                resource = resource.as_str(),
                dry_run = request.dry_run.unwrap_or(false),
                patched = patch.is_some(),
                ?warnings,
                "admitted with warnings"
            );
        } else if patch.is_some() {
            tracing::debug!(
                uid = %request.uid,
                %namespace,
                name = request.name.as_deref().unwrap_or(""),
                resource = resource.as_str(),
                dry_run = request.dry_run.unwrap_or(false),
                "admitted with patch"
            );
        }
        (
            AdmissionAnswer {
                uid: request.uid.to_string(),
                patch,
                warnings,
            },
            outcome,
        )
    }
}

fn too_large(limit: usize, declared: Option<u64>) -> Response {
    let what = match declared {
        Some(len) => format!("request body of {len} bytes"),
        None => "request body".to_string(),
    };
    (
        StatusCode::PAYLOAD_TOO_LARGE,
        format!("{what} exceeds the limit of {limit} bytes (--max-body-bytes)"),
    )
        .into_response()
}

async fn admission_response(
    webhook: &Webhook,
    resource: Resource,
    headers: &HeaderMap,
    body: Body,
) -> Response {
    let reject = |status: StatusCode, message: String| {
        webhook
            .metrics
            .observe(resource, Outcome::BadRequest, 0, 0.0);
        (status, message).into_response()
    };
    if let Some(ct) = headers.get(header::CONTENT_TYPE) {
        let json = ct
            .to_str()
            .map(|v| v.starts_with("application/json"))
            .unwrap_or(false);
        if !json {
            return reject(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                format!("content type {ct:?} is not application/json"),
            );
        }
    }
    let limit = webhook.max_body_bytes;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > limit as u64) {
        webhook
            .metrics
            .observe(resource, Outcome::BadRequest, 0, 0.0);
        return too_large(limit, declared);
    }
    let bytes = match axum::body::to_bytes(body, limit).await {
        Ok(b) => b,
        Err(e) => {
            webhook
                .metrics
                .observe(resource, Outcome::BadRequest, 0, 0.0);
            tracing::debug!(error = %e, "request body not read");
            return too_large(limit, declared);
        }
    };
    match webhook.admit_fetching(resource, &bytes).await {
        Handled::Answer(answer, _) => (
            [(header::CONTENT_TYPE, "application/json")],
            answer.to_json(),
        )
            .into_response(),
        Handled::BadRequest(e) => (StatusCode::BAD_REQUEST, e.to_string()).into_response(),
    }
}

async fn mutate_pvc_route(State(w): State<Arc<Webhook>>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    admission_response(&w, Resource::Pvc, &parts.headers, body).await
}

async fn mutate_pod_route(State(w): State<Arc<Webhook>>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    admission_response(&w, Resource::Pod, &parts.headers, body).await
}

async fn healthz() -> &'static str {
    "ok"
}

async fn readyz(State(w): State<Arc<Webhook>>) -> Response {
    let tls = w.tls_ready.load(Ordering::Acquire);
    let catalog = w.catalog.is_synced();
    if tls && catalog {
        (StatusCode::OK, "ready").into_response()
    } else {
        let mut why = Vec::new();
        if !tls {
            why.push("serving certificate not loaded");
        }
        if !catalog {
            why.push("image catalog not synced");
        }
        (StatusCode::SERVICE_UNAVAILABLE, why.join("; ")).into_response()
    }
}

async fn metrics(State(w): State<Arc<Webhook>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        w.metrics.encode(),
    )
        .into_response()
}

/// The webhook's router.
pub fn router(webhook: Arc<Webhook>) -> Router {
    Router::new()
        .route("/mutate-pvc", post(mutate_pvc_route))
        .route("/mutate-pod", post(mutate_pod_route))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(webhook)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::ClaimFetch;
    use crate::mutate::tests_support::{image, Images};
    use futures::future::BoxFuture;
    use std::sync::Mutex;

    const POD: &str =
        include_str!("../../tests/fixtures/admission/pod-create-virt-launcher-with-pvc.json");
    const DIGEST: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    /// A catalog whose watch has not delivered `vms/fedora-root` yet; its source knows it as
    /// `source_says`.
    struct LateCatalog {
        known: Images,
        source_says: Option<&'static str>,
        learned: Mutex<Option<String>>,
        asked: Mutex<Vec<(String, String)>>,
    }

    impl LateCatalog {
        fn new(source_says: Option<&'static str>) -> Arc<Self> {
            Arc::new(Self {
                known: Images::with(image("fedora-40", Some(DIGEST), None, None)),
                source_says,
                learned: Mutex::new(None),
                asked: Mutex::new(Vec::new()),
            })
        }
    }

    impl ImageLookup for LateCatalog {
        fn image(&self, namespace: &str, name: &str) -> Option<Arc<vmdisk_crds::VMDiskImage>> {
            self.known.image(namespace, name)
        }
        fn claim_image(&self, namespace: &str, claim: &str) -> Option<String> {
            let learned = self.learned.lock().unwrap();
            (namespace == "vms" && claim == "fedora-root")
                .then(|| learned.clone())
                .flatten()
        }
    }

    impl ImageCatalog for LateCatalog {
        fn is_synced(&self) -> bool {
            true
        }
        fn fetch_claims<'a>(&'a self, claims: &'a [(String, String)]) -> BoxFuture<'a, ClaimFetch> {
            self.asked.lock().unwrap().extend_from_slice(claims);
            *self.learned.lock().unwrap() = self.source_says.map(str::to_string);
            let found = usize::from(self.source_says.is_some());
            Box::pin(std::future::ready(ClaimFetch {
                found,
                absent: claims.len() - found,
                failed: 0,
            }))
        }
    }

    fn answer(handled: Handled) -> AdmissionAnswer {
        match handled {
            Handled::Answer(answer, _) => answer,
            Handled::BadRequest(e) => panic!("bad request: {e}"),
        }
    }

    #[tokio::test]
    async fn a_pod_naming_a_claim_the_watch_has_not_delivered_is_decided_again_after_a_fetch() {
        let catalog = LateCatalog::new(Some("fedora-40"));
        let webhook = Webhook::new(catalog.clone(), MutationConfig::default());
        let before = answer(webhook.admit(Resource::Pod, POD.as_bytes()));
        assert!(
            before.patch.is_none(),
            "the catalog alone does not know the claim"
        );
        *catalog.learned.lock().unwrap() = None;

        let after = answer(webhook.admit_fetching(Resource::Pod, POD.as_bytes()).await);
        assert_eq!(
            *catalog.asked.lock().unwrap(),
            [("vms".to_string(), "fedora-root".to_string())]
        );
        let patch = after.patch.expect("a preference once the claim is known");
        let key = vmdisk_crds::node_cache_label_key(DIGEST).unwrap();
        assert!(
            format!("{:?}", patch.operations()).contains(&key),
            "{patch:?}"
        );
        let metrics = webhook.metrics.encode();
        assert!(
            metrics.contains("vmdisk_webhook_claim_fetches_total{result=\"found\"} 1"),
            "{metrics}"
        );
    }

    #[tokio::test]
    async fn a_claim_the_source_does_not_know_leaves_the_first_answer() {
        let catalog = LateCatalog::new(None);
        let webhook = Webhook::new(catalog.clone(), MutationConfig::default());
        let answer = answer(webhook.admit_fetching(Resource::Pod, POD.as_bytes()).await);
        assert!(answer.patch.is_none());
        assert_eq!(catalog.asked.lock().unwrap().len(), 1);
        let metrics = webhook.metrics.encode();
        assert!(
            metrics.contains("vmdisk_webhook_claim_fetches_total{result=\"absent\"} 1"),
            "{metrics}"
        );
    }

    #[tokio::test]
    async fn pvcs_never_ask_the_source() {
        let catalog = LateCatalog::new(Some("fedora-40"));
        let webhook = Webhook::new(catalog.clone(), MutationConfig::default());
        let pvc = include_str!("../../tests/fixtures/admission/pvc-create-annotation-form.json");
        answer(webhook.admit_fetching(Resource::Pvc, pvc.as_bytes()).await);
        assert!(catalog.asked.lock().unwrap().is_empty());
    }
}
