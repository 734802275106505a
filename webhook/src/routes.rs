//! HTTP routes: the two admission endpoints, probes and metrics.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::admission::{decode_review, AdmissionAnswer, AdmissionRequest, ReviewError, Timer};
use crate::catalog::ImageCatalog;
use crate::metrics::{Outcome, Resource, WebhookMetrics};
use crate::mutate::pod::mutate_pod;
use crate::mutate::pvc::mutate_pvc;
use crate::mutate::{ImageLookup, Mutation, MutationConfig};

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

    /// Answers one admission body for `resource`'s endpoint. Never panics on input.
    pub fn admit(&self, resource: Resource, body: &[u8]) -> Handled {
        let timer = Timer::start();
        let handled = match decode_review(body) {
            Err(e) => Handled::BadRequest(e),
            Ok(request) => {
                let (answer, outcome) = self.answer(resource, &request);
                Handled::Answer(answer, outcome)
            }
        };
        let (outcome, warnings) = match &handled {
            Handled::Answer(a, o) => (*o, a.warnings.len()),
            Handled::BadRequest(_) => (Outcome::BadRequest, 0),
        };
        self.metrics
            .observe(resource, outcome, warnings, timer.seconds());
        handled
    }

    fn answer(&self, resource: Resource, request: &AdmissionRequest) -> (AdmissionAnswer, Outcome) {
        let expected = match resource {
            Resource::Pvc => ("persistentvolumeclaims", "PersistentVolumeClaim"),
            Resource::Pod => ("pods", "Pod"),
        };
        let skip = |reason: &str| {
            tracing::debug!(uid = %request.uid, reason, "allowed without patch");
            (AdmissionAnswer::allow(&request.uid), Outcome::Skipped)
        };
        if request.resource.group != "" || request.resource.resource != expected.0 {
            tracing::warn!(
                uid = %request.uid,
                resource = %request.resource.resource,
                group = %request.resource.group,
                endpoint = resource.as_str(),
                "unexpected resource sent to this endpoint; check the MutatingWebhookConfiguration rules"
            );
            return skip("unexpected resource");
        }
        if request.sub_resource.as_deref().is_some_and(|s| !s.is_empty()) {
            return skip("subresource");
        }
        if request.operation != "CREATE" {
            return skip("not a CREATE");
        }
        let Some(raw) = request.object.as_ref() else {
            return skip("no object");
        };
        let namespace = request.namespace.as_deref().unwrap_or("default");
        let lookup: &dyn ImageLookup = self.catalog.as_ref();
        let result = match resource {
            Resource::Pvc => decide::<PersistentVolumeClaim>(raw.get(), expected.1, |pvc| {
                mutate_pvc(pvc, namespace, lookup, &self.config)
            }),
            Resource::Pod => decide::<Pod>(raw.get(), expected.1, |pod| {
                mutate_pod(pod, namespace, lookup, &self.config)
            }),
        };
        let (patch, warnings) = match result {
            Ok(x) => x,
            Err(warning) => {
                tracing::warn!(uid = %request.uid, %namespace, %warning, "object not decodable");
                return (
                    AdmissionAnswer {
                        uid: request.uid.clone(),
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
        if outcome == Outcome::Patched || !warnings.is_empty() {
            tracing::info!(
                uid = %request.uid,
                %namespace,
                name = request.name.as_deref().unwrap_or(""),
                resource = resource.as_str(),
                dry_run = request.dry_run.unwrap_or(false),
                patched = patch.is_some(),
                ?warnings,
                "admitted"
            );
        }
        (
            AdmissionAnswer {
                uid: request.uid.clone(),
                patch,
                warnings,
            },
            outcome,
        )
    }
}

type Decision = (Option<json_patch::Patch>, Vec<String>);

/// Decodes the object as `T`, runs the mutation and turns its result into a JSON patch. The
/// diff is taken between the typed object before and after, so fields the typed model does
/// not know are neither touched nor removed; the patch is then anchored to the raw object
/// (see [`anchor_patch`]) and checked to apply to it, so the apiserver never receives a patch
/// that fails.
fn decide<T: DeserializeOwned + Serialize + PartialEq>(
    raw: &str,
    kind: &str,
    mutate: impl FnOnce(&T) -> Mutation<T>,
) -> Result<Decision, String> {
    let object: T = serde_json::from_str(raw)
        .map_err(|e| format!("vmdisk: object is not a valid {kind}, left unchanged: {e}"))?;
    let mutation = mutate(&object);
    let Some(patched) = &mutation.patched else {
        return Ok((None, mutation.warnings));
    };
    let before = serde_json::to_value(&object).map_err(|e| e.to_string())?;
    let after = serde_json::to_value(patched).map_err(|e| e.to_string())?;
    let raw_value: serde_json::Value = serde_json::from_str(raw).map_err(|e| e.to_string())?;
    let patch = anchor_patch(&raw_value, &after, json_patch::diff(&before, &after));
    let mut check = raw_value;
    if let Err(e) = json_patch::patch(&mut check, &patch) {
        let mut warnings = mutation.warnings;
        warnings.push(format!("vmdisk: could not build a patch for this {kind}, left unchanged: {e}"));
        return Ok((None, warnings));
    }
    Ok(((!patch.0.is_empty()).then_some(patch), mutation.warnings))
}

/// The typed model fills in containers the raw object may lack (an absent `metadata` becomes
/// `{}`), so a diff of typed values can address paths whose parents do not exist in the raw
/// object. Such operations are replaced by one `add` of the first missing ancestor, with its
/// value taken from the patched object; `replace`s of absent members become `add`s.
pub fn anchor_patch(
    raw: &serde_json::Value,
    after: &serde_json::Value,
    patch: json_patch::Patch,
) -> json_patch::Patch {
    use json_patch::jsonptr::PointerBuf;
    use json_patch::{AddOperation, PatchOperation};

    let mut out: Vec<PatchOperation> = Vec::with_capacity(patch.0.len());
    let mut added_ancestors: Vec<String> = Vec::new();
    for op in patch.0 {
        let (path, value) = match &op {
            PatchOperation::Add(a) => (a.path.to_string(), a.value.clone()),
            PatchOperation::Replace(r) => (r.path.to_string(), r.value.clone()),
            _ => {
                out.push(op);
                continue;
            }
        };
        if added_ancestors
            .iter()
            .any(|a| path.starts_with(a.as_str()) && path[a.len()..].starts_with('/'))
        {
            continue;
        }
        // Walk down until the first component whose parent exists but which itself does not.
        let components: Vec<&str> = path.split('/').skip(1).collect();
        let mut first_missing: Option<String> = None;
        let mut prefix = String::new();
        for (i, c) in components.iter().enumerate() {
            let next = format!("{prefix}/{c}");
            if raw.pointer(&next).is_none() {
                if i + 1 < components.len() {
                    first_missing = Some(next);
                }
                break;
            }
            prefix = next;
        }
        match first_missing {
            Some(ancestor) => {
                if let (Some(v), Ok(ptr)) = (after.pointer(&ancestor), PointerBuf::parse(&ancestor)) {
                    out.push(PatchOperation::Add(AddOperation {
                        path: ptr,
                        value: v.clone(),
                    }));
                    added_ancestors.push(ancestor);
                }
            }
            None => match op {
                PatchOperation::Replace(r) if raw.pointer(&path).is_none() => {
                    out.push(PatchOperation::Add(AddOperation { path: r.path, value }));
                }
                other => out.push(other),
            },
        }
    }
    json_patch::Patch(out)
}

fn admission_response(webhook: &Webhook, resource: Resource, headers: &HeaderMap, body: Bytes) -> Response {
    if let Some(ct) = headers.get(header::CONTENT_TYPE) {
        let ok = ct
            .to_str()
            .map(|v| v.starts_with("application/json"))
            .unwrap_or(false);
        if !ok {
            webhook
                .metrics
                .observe(resource, Outcome::BadRequest, 0, 0.0);
            return (
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                format!("content type {ct:?} is not application/json"),
            )
                .into_response();
        }
    }
    match webhook.admit(resource, &body) {
        Handled::Answer(answer, _) => (
            [(header::CONTENT_TYPE, "application/json")],
            answer.to_json(),
        )
            .into_response(),
        Handled::BadRequest(e) => (StatusCode::BAD_REQUEST, e.to_string()).into_response(),
    }
}

async fn mutate_pvc_route(State(w): State<Arc<Webhook>>, headers: HeaderMap, body: Bytes) -> Response {
    admission_response(&w, Resource::Pvc, &headers, body)
}

async fn mutate_pod_route(State(w): State<Arc<Webhook>>, headers: HeaderMap, body: Bytes) -> Response {
    admission_response(&w, Resource::Pod, &headers, body)
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

/// Body limit error with the limit in the message (axum's default text does not say it).
async fn limit_message(
    State(w): State<Arc<Webhook>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if let Some(len) = declared.filter(|len| *len > w.max_body_bytes as u64) {
        return (
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "request body of {len} bytes exceeds the limit of {} bytes (--max-body-bytes)",
                w.max_body_bytes
            ),
        )
            .into_response();
    }
    let response = next.run(request).await;
    if response.status() == StatusCode::PAYLOAD_TOO_LARGE {
        return (
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "request body exceeds the limit of {} bytes (--max-body-bytes)",
                w.max_body_bytes
            ),
        )
            .into_response();
    }
    response
}

/// The webhook's router.
pub fn router(webhook: Arc<Webhook>) -> Router {
    let limit = webhook.max_body_bytes;
    Router::new()
        .route("/mutate-pvc", post(mutate_pvc_route))
        .route("/mutate-pod", post(mutate_pod_route))
        .layer(DefaultBodyLimit::max(limit))
        .layer(axum::middleware::from_fn_with_state(
            Arc::clone(&webhook),
            limit_message,
        ))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(webhook)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn anchor_adds_missing_parents_whole() {
        let raw = json!({"spec": {}});
        let before = json!({"metadata": {}, "spec": {}});
        let after = json!({"metadata": {"labels": {"a": "b"}, "annotations": {"c": "d"}}, "spec": {"x": 1}});
        let patch = anchor_patch(&raw, &after, json_patch::diff(&before, &after));
        let mut doc = raw.clone();
        json_patch::patch(&mut doc, &patch).unwrap();
        assert_eq!(doc, after);
        assert_eq!(patch.0.len(), 2, "{patch:?}");
    }

    #[test]
    fn anchor_keeps_patches_that_already_apply() {
        let raw = json!({"metadata": {"labels": {"x": "y"}}});
        let after = json!({"metadata": {"labels": {"x": "y", "a": "b"}}});
        let diff = json_patch::diff(&raw, &after);
        assert_eq!(anchor_patch(&raw, &after, diff.clone()), diff);
    }
}
