//! HTTP routes, and only HTTP: the two admission endpoints (content type, body limit, status
//! codes; the answer itself is [`crate::admission`]'s), probes and metrics.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;

use crate::admission::{Admission, Admitted, ReviewError};
use crate::catalog::ImageCatalog;
use crate::metrics::{Outcome, Resource, WebhookMetrics};
use crate::mutate::MutationConfig;

/// Default limit on an AdmissionReview body. Objects are capped at ~1.5 MiB by etcd and a review
/// carries at most the object and its old version, so 4 MiB leaves room and refuses floods.
pub const DEFAULT_MAX_BODY_BYTES: usize = 4 << 20;

/// How long a client may take to send a review's body once its headers arrived. The API
/// server sends a review in one go and gives up on the webhook after `timeoutSeconds` (3 s in
/// `deploy/`); a body still trickling in after this is a slow client holding a connection.
pub const BODY_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Everything a request handler needs.
pub struct Webhook {
    pub admission: Admission,
    pub metrics: Arc<WebhookMetrics>,
    /// Set once the serving certificate is loaded.
    pub tls_ready: AtomicBool,
    pub max_body_bytes: usize,
    /// How long a body may take to arrive ([`BODY_READ_TIMEOUT`] unless a test shortens it).
    pub body_read_timeout: Duration,
}

impl Webhook {
    pub fn new(catalog: Arc<dyn ImageCatalog>, config: MutationConfig) -> Self {
        Self {
            admission: Admission::new(catalog, config),
            metrics: Arc::new(WebhookMetrics::new()),
            tls_ready: AtomicBool::new(false),
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            body_read_timeout: BODY_READ_TIMEOUT,
        }
    }

    /// Admission of one body read whole, recorded in the metrics.
    pub async fn admit(&self, resource: Resource, body: &[u8]) -> Result<Admitted, ReviewError> {
        let start = Instant::now();
        let admitted = self.admission.review_fetching(resource, body).await;
        let seconds = start.elapsed().as_secs_f64();
        match &admitted {
            Ok(a) => {
                if let Some(fetched) = a.claims_fetched {
                    self.metrics.claims_fetched(fetched);
                }
                let warnings = a.answer.warnings.len();
                self.metrics.observe(resource, a.outcome, warnings, seconds);
            }
            Err(_) => self
                .metrics
                .observe(resource, Outcome::BadRequest, 0, seconds),
        }
        admitted
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
    let timeout = webhook.body_read_timeout;
    let bytes = match tokio::time::timeout(timeout, axum::body::to_bytes(body, limit)).await {
        Ok(Ok(b)) => b,
        Ok(Err(e)) => {
            webhook
                .metrics
                .observe(resource, Outcome::BadRequest, 0, 0.0);
            tracing::debug!(error = %e, "request body not read");
            return too_large(limit, declared);
        }
        Err(_) => {
            return reject(
                StatusCode::REQUEST_TIMEOUT,
                format!("request body not received within {timeout:?}"),
            )
        }
    };
    match webhook.admit(resource, &bytes).await {
        Ok(admitted) => (
            [(header::CONTENT_TYPE, "application/json")],
            admitted.answer.to_json(),
        )
            .into_response(),
        Err(e) => (StatusCode::BAD_REQUEST, e.to_string()).into_response(),
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
    let catalog = w.admission.catalog().is_synced();
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
    vmdisk_support::metrics::response(&*w.metrics).into_response()
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
    use crate::admission::tests::{LateCatalog, POD};
    use crate::catalog::ClaimFetch;
    use vmdisk_support::metrics::Exposition as _;

    #[tokio::test]
    async fn admissions_and_claim_fetches_are_counted() {
        let webhook = Webhook::new(LateCatalog::new(Some("fedora-40")), Default::default());
        let admitted = webhook.admit(Resource::Pod, POD.as_bytes()).await.unwrap();
        assert_eq!(
            admitted.claims_fetched,
            Some(ClaimFetch {
                found: 1,
                absent: 0,
                failed: 0
            })
        );
        assert!(webhook.admit(Resource::Pod, b"{").await.is_err());
        let metrics = webhook.metrics.encode();
        for line in [
            "vmdisk_webhook_claim_fetches_total{result=\"found\"} 1",
            "vmdisk_webhook_admission_requests_total{resource=\"pod\",outcome=\"patched\"} 1",
            "vmdisk_webhook_errors_total{resource=\"pod\"} 1",
        ] {
            assert!(metrics.contains(line), "{line}\n{metrics}");
        }
    }
}
