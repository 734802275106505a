//! What the API server sees: how much latency a PVC create gains from vmdisk's webhook on a
//! real API server, against no webhook at all and against a bare webhook on the same HTTP and
//! TLS stack that answers allowed with the uid and reads nothing else.
//!
//! The same VMDiskImage-backed PVC (the annotation form) is created in four namespaces:
//! `none` opts out of vmdisk's webhook (`vmdisk.io/webhook: disabled`) and no other webhook
//! selects it; `bare` opts out too, and a MutatingWebhookConfiguration made here (vmdisk's own
//! PVC webhook with another name, another URL, selecting only that namespace) sends its
//! creates to the bare webhook; `vmdisk` gets vmdisk's webhook. A fourth, `bare_patch`, is
//! `bare` answering the patch and warning vmdisk answers for this claim, fixed: it tells what
//! the cluster spends on a completed PVC (applying the patch, the larger object, the watches
//! and controllers it wakes), which no webhook that completes objects avoids, apart from what
//! vmdisk itself spends.
//!
//! Rounds alternate the variants so drift hits all alike, each round in a random order: a
//! completed PVC sets the controllers to work for a moment, and a fixed order would always
//! hand that to the same next variant. The figures are printed, never asserted; asserted is
//! that every create succeeded, that vmdisk's (and the fixed patch's) came out completed and
//! the others not.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhook, MutatingWebhookConfiguration, WebhookClientConfig,
};
use k8s_openapi::api::core::v1::{Namespace, PersistentVolumeClaim};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, LabelSelectorRequirement};
use k8s_openapi::ByteString;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::Api;
use serde::Deserialize;
use serde_json::json;
use vmdisk_crds::{
    format_bytes_quantity, parse_quantity, volume_bytes_for_disk, DEFAULT_FILESYSTEM_OVERHEAD,
    IMAGE_LABEL,
};
use vmdisk_support::https::serve_tls;
use vmdisk_support::tls::{server_config, CertPaths, ReloadingCertResolver};
use vmdisk_tests::certs::{write_secret_dir, TestCa};

use crate::local::LocalInstall;
use crate::support::{create_image, wait_for};
use crate::Case;

/// Creates per variant (`VMDISK_E2E_LATENCY_CREATES` overrides).
const CREATES: usize = 200;
/// The namespace label vmdisk's MutatingWebhookConfiguration opts out on
/// (`deploy/mutating-webhook.yaml`).
const OPT_OUT_LABEL: &str = "vmdisk.io/webhook";
const IMAGE: &str = "latency";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Variant {
    None,
    Bare,
    BarePatch,
    Vmdisk,
}

const VARIANTS: [Variant; 4] = [
    Variant::None,
    Variant::Bare,
    Variant::BarePatch,
    Variant::Vmdisk,
];

impl Variant {
    /// Whether its creates come out completed (see [`patched`]).
    fn patches(self) -> bool {
        matches!(self, Variant::BarePatch | Variant::Vmdisk)
    }
}

/// The bare webhook: its own runtime (as vmdisk's webhook has its own process), the webhook
/// crate's accept loop and TLS configuration, a handler that reads only the uid.
struct BareWebhook {
    runtime: Option<tokio::runtime::Runtime>,
    addr: SocketAddr,
    answered: Arc<AtomicUsize>,
    _dir: tempfile::TempDir,
}

#[derive(Deserialize)]
struct UidOnly {
    request: UidOnlyRequest,
}

#[derive(Deserialize)]
struct UidOnlyRequest {
    uid: String,
}

/// What the bare webhook answers besides the uid: nothing, or a fixed `patch` and `warnings`.
type Extra = Arc<serde_json::Map<String, serde_json::Value>>;

async fn answer_allowed(
    State((answered, extra)): State<(Arc<AtomicUsize>, Extra)>,
    body: Bytes,
) -> Response {
    match serde_json::from_slice::<UidOnly>(&body) {
        Ok(review) => {
            answered.fetch_add(1, Ordering::Relaxed);
            let mut response = (*extra).clone();
            response.insert("uid".into(), review.request.uid.into());
            response.insert("allowed".into(), true.into());
            Json(json!({
                "apiVersion": "admission.k8s.io/v1",
                "kind": "AdmissionReview",
                "response": response,
            }))
            .into_response()
        }
        Err(e) => (StatusCode::BAD_REQUEST, e.to_string()).into_response(),
    }
}

impl BareWebhook {
    /// Serves `/bare` (allowed, nothing else) and `/bare-patch` (allowed with `patch_answer`).
    fn start(
        host: &str,
        ca: &TestCa,
        patch_answer: serde_json::Map<String, serde_json::Value>,
    ) -> Self {
        let dir = tempfile::tempdir().unwrap();
        write_secret_dir(dir.path(), &ca.issue(&[host]), 1);
        let resolver = ReloadingCertResolver::load(CertPaths::in_dir(dir.path())).unwrap();
        let listener = std::net::TcpListener::bind((host, 0)).unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let answered = Arc::new(AtomicUsize::new(0));
        let nothing: Extra = Arc::default();
        let router = Router::new()
            .route(
                "/bare",
                post(answer_allowed).with_state((Arc::clone(&answered), nothing)),
            )
            .route(
                "/bare-patch",
                post(answer_allowed).with_state((Arc::clone(&answered), Arc::new(patch_answer))),
            );
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        runtime.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            serve_tls(
                listener,
                server_config(resolver),
                router,
                std::future::pending(),
                Duration::from_secs(1),
                vmdisk_support::https::DEFAULT_MAX_CONNECTIONS,
            )
            .await
        });
        Self {
            runtime: Some(runtime),
            addr,
            answered,
            _dir: dir,
        }
    }
}

impl Drop for BareWebhook {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// The size vmdisk gives the claim: the image's 1Gi disk with filesystem overhead.
fn completed_size() -> String {
    format_bytes_quantity(volume_bytes_for_disk(
        1 << 30,
        true,
        DEFAULT_FILESYSTEM_OVERHEAD,
    ))
}

/// The answer's `patch` and `warnings` as vmdisk gives them for [`claim`] in `namespace`.
fn vmdisk_answer(namespace: &str) -> serde_json::Map<String, serde_json::Value> {
    use base64::Engine as _;
    let patch = json!([
        {"op": "add", "path": "/metadata/labels", "value": {IMAGE_LABEL: IMAGE}},
        {"op": "add", "path": "/spec/dataSourceRef",
         "value": {"apiGroup": "vmdisk.io", "kind": "VMDiskImage", "name": IMAGE}},
        {"op": "add", "path": "/spec/resources/requests/storage", "value": completed_size()},
    ]);
    serde_json::Map::from_iter([
        ("patchType".to_string(), json!("JSONPatch")),
        (
            "patch".to_string(),
            base64::engine::general_purpose::STANDARD
                .encode(patch.to_string())
                .into(),
        ),
        (
            "warnings".to_string(),
            json!([format!(
                "VMDiskImage {namespace}/{IMAGE} is not resolved to a digest yet: the PVC will be filled once it is"
            )]),
        ),
    ])
}

fn percentile_ms(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1000.0
}

/// The PVC every variant creates: valid without any webhook, named by the annotation form.
fn claim(name: &str) -> PersistentVolumeClaim {
    serde_json::from_value(json!({
        "metadata": {"name": name, "annotations": {"vmdisk.io/image": IMAGE}},
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Mi"}}}
    }))
    .unwrap()
}

/// Whether `pvc` came out completed as vmdisk completes [`claim`]: the reference, the label,
/// the size the image needs (its `spec.size` is 1Gi, the claim asks for 1Mi).
fn patched(pvc: &PersistentVolumeClaim) -> bool {
    let spec = pvc.spec.as_ref().unwrap();
    let storage = spec
        .resources
        .as_ref()
        .and_then(|r| r.requests.as_ref())
        .and_then(|r| r.get("storage"))
        .and_then(|q| parse_quantity(&q.0).ok());
    spec.data_source_ref
        .as_ref()
        .is_some_and(|r| r.name == IMAGE)
        && pvc
            .metadata
            .labels
            .as_ref()
            .is_some_and(|l| l.get(IMAGE_LABEL).map(String::as_str) == Some(IMAGE))
        && storage.is_some_and(|bytes| bytes >= 1 << 30)
}

/// vmdisk's PVC webhook as installed, once per `(name, url, namespace)`: renamed, sent to
/// `url`, selecting only `namespace`.
async fn bare_configuration(
    admin: &kube::Client,
    name: &str,
    ca_pem: &str,
    hooks: &[(&str, String, &str)],
) -> MutatingWebhookConfiguration {
    let installed = Api::<MutatingWebhookConfiguration>::all(admin.clone())
        .get("vmdisk")
        .await
        .unwrap();
    let pvc_hook: MutatingWebhook = installed
        .webhooks
        .unwrap_or_default()
        .into_iter()
        .find(|w| w.name == "pvc.vmdisk.io")
        .expect("vmdisk's PVC webhook");
    let webhooks = hooks
        .iter()
        .map(|(name, url, namespace)| MutatingWebhook {
            name: name.to_string(),
            client_config: WebhookClientConfig {
                url: Some(url.clone()),
                ca_bundle: Some(ByteString(ca_pem.as_bytes().to_vec())),
                service: None,
            },
            namespace_selector: Some(LabelSelector {
                match_expressions: Some(vec![LabelSelectorRequirement {
                    key: "kubernetes.io/metadata.name".into(),
                    operator: "In".into(),
                    values: Some(vec![namespace.to_string()]),
                }]),
                match_labels: None,
            }),
            ..pvc_hook.clone()
        })
        .collect();
    let mut config = MutatingWebhookConfiguration {
        webhooks: Some(webhooks),
        ..Default::default()
    };
    config.metadata.name = Some(name.into());
    config
}

/// Creates `claim(name)` in `api`'s namespace, timed.
async fn timed_create(
    api: &Api<PersistentVolumeClaim>,
    name: &str,
) -> (Duration, PersistentVolumeClaim) {
    let pvc = claim(name);
    let start = Instant::now();
    let created = api
        .create(&PostParams::default(), &pvc)
        .await
        .unwrap_or_else(|e| panic!("creating PVC {name}: {e}"));
    (start.elapsed(), created)
}

pub async fn pvc_create_latency_with_and_without_the_webhook(fx: Arc<LocalInstall>, case: Case) {
    let admin = case.admin();
    let creates = std::env::var("VMDISK_E2E_LATENCY_CREATES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(CREATES);

    let mut namespaces = Vec::new();
    for variant in VARIANTS {
        let ns = case
            .namespace(&format!("lat-{variant:?}").to_lowercase())
            .await;
        if variant != Variant::Vmdisk {
            Api::<Namespace>::all(admin.clone())
                .patch(
                    &ns,
                    &PatchParams::default(),
                    &Patch::Merge(json!({"metadata": {"labels": {OPT_OUT_LABEL: "disabled"}}})),
                )
                .await
                .unwrap();
        }
        if variant.patches() {
            // Never resolved (nothing listens there): its size is known from its spec, and
            // the populator leaves its claims Pending without starting pods, alike in both
            // namespaces whose claims come out completed.
            create_image(
                &admin,
                &ns,
                IMAGE,
                json!({"source": {"registry": {"url": format!("{}:1/e2e/latency:absent", fx.env.host), "insecure": true}},
                       "format": "raw", "size": "1Gi"}),
            )
            .await;
        }
        namespaces.push(ns);
    }
    let namespace = |variant: Variant| {
        namespaces[VARIANTS.iter().position(|v| *v == variant).unwrap()].as_str()
    };

    let ca = TestCa::new("vmdisk e2e bare webhook CA");
    let bare = BareWebhook::start(
        &fx.env.host,
        &ca,
        vmdisk_answer(namespace(Variant::BarePatch)),
    );
    let config_name = format!("vmdisk-e2e-bare-{}", namespace(Variant::Bare));
    let config = bare_configuration(
        &admin,
        &config_name,
        &ca.cert_pem(),
        &[
            (
                "bare.e2e.vmdisk.io",
                format!("https://{}/bare", bare.addr),
                namespace(Variant::Bare),
            ),
            (
                "bare-patch.e2e.vmdisk.io",
                format!("https://{}/bare-patch", bare.addr),
                namespace(Variant::BarePatch),
            ),
        ],
    )
    .await;
    let configs: Api<MutatingWebhookConfiguration> = Api::all(admin.clone());
    configs
        .create(&PostParams::default(), &config)
        .await
        .unwrap();
    case.defer(async move {
        let _ = configs.delete(&config_name, &DeleteParams::default()).await;
    });

    let apis: Vec<Api<PersistentVolumeClaim>> = namespaces
        .iter()
        .map(|ns| Api::namespaced(admin.clone(), ns))
        .collect();
    // Until every variant is in place: the API server has the namespaces' labels and the bare
    // configuration, vmdisk's catalog has the image.
    let mut warmups = 0usize;
    wait_for(
        "every variant to be in place",
        Duration::from_secs(60),
        || {
            warmups += 1;
            let apis = apis.clone();
            let answered = Arc::clone(&bare.answered);
            let n = warmups;
            async move {
                let before = answered.load(Ordering::Relaxed);
                let mut seen = Vec::new();
                for (variant, api) in VARIANTS.iter().zip(&apis) {
                    let (_, pvc) = timed_create(api, &format!("warmup-{n}")).await;
                    seen.push((*variant, patched(&pvc)));
                }
                let bare_calls = answered.load(Ordering::Relaxed) - before;
                let ready = seen
                    .iter()
                    .all(|(variant, patched)| *patched == variant.patches())
                    && bare_calls == 2;
                ready.then_some(()).ok_or(format!(
                    "patched: {seen:?}, bare webhook calls: {bare_calls}"
                ))
            }
        },
    )
    .await;

    let answered_before = bare.answered.load(Ordering::Relaxed);
    let mut latencies: [Vec<Duration>; 4] = Default::default();
    let mut completed: [Option<PersistentVolumeClaim>; 4] = Default::default();
    let mut order: Vec<usize> = (0..VARIANTS.len()).collect();
    for round in 0..creates {
        rand::seq::SliceRandom::shuffle(&mut order[..], &mut rand::rng());
        for &v in &order {
            let (took, pvc) = timed_create(&apis[v], &format!("claim-{round}")).await;
            assert_eq!(
                patched(&pvc),
                VARIANTS[v].patches(),
                "{:?} create {round}: {:?}\n{}",
                VARIANTS[v],
                pvc.spec,
                fx.webhook_log()
            );
            latencies[v].push(took);
            completed[v] = Some(pvc);
        }
    }
    // The fixed patch is the one vmdisk answers: both claims come out alike.
    let [_, _, Some(fixed), Some(by_vmdisk)] = completed else {
        panic!("no creates")
    };
    assert_eq!(fixed.spec, by_vmdisk.spec);
    assert_eq!(fixed.metadata.labels, by_vmdisk.metadata.labels);
    assert_eq!(
        bare.answered.load(Ordering::Relaxed) - answered_before,
        2 * creates,
        "the bare webhook answers each of its creates once"
    );

    for l in latencies.iter_mut() {
        l.sort_unstable();
    }
    let [none, bare_ms, bare_patch, vmdisk] =
        latencies.map(|l| (percentile_ms(&l, 0.5), percentile_ms(&l, 0.99)));
    println!(
        "RESULT admission-e2e creates={creates} none_p50_ms={:.2} none_p99_ms={:.2} bare_p50_ms={:.2} bare_p99_ms={:.2} vmdisk_p50_ms={:.2} vmdisk_p99_ms={:.2} vmdisk_minus_bare_p50_ms={:.2} vmdisk_minus_bare_p99_ms={:.2} bare_patch_p50_ms={:.2} bare_patch_p99_ms={:.2} vmdisk_minus_bare_patch_p50_ms={:.2} vmdisk_minus_bare_patch_p99_ms={:.2}",
        none.0,
        none.1,
        bare_ms.0,
        bare_ms.1,
        vmdisk.0,
        vmdisk.1,
        vmdisk.0 - bare_ms.0,
        vmdisk.1 - bare_ms.1,
        bare_patch.0,
        bare_patch.1,
        vmdisk.0 - bare_patch.0,
        vmdisk.1 - bare_patch.1,
    );
}
