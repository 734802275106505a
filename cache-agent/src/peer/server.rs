//! This node's side of peers: `GET /v1/blobs/<digest>` over HTTPS, for other nodes' agents.
//!
//! A request is answered only when all of these hold, in this order:
//! 1. its bearer token is a cache agent's pod-bound token for audience [`PEER_AUDIENCE`]
//!    (TokenReview; 401 otherwise, 403 for another account);
//! 2. this node holds or is writing a copy of the blob (404);
//! 3. the caller's node was asked to hold an image the copy was downloaded for: its
//!    NodeDiskCache lists that image's digest, or the every-node list does (403). The registry's authorization of a
//!    tenant's credentials is not bypassed by this: a node is asked to hold an image only
//!    once the controller resolved it with that image's own credentials, and a populator pod
//!    still has the registry confirm its requester before a cached disk is served;
//! 4. an upload slot is free (`--peer-max-uploads`; 503, so the caller goes elsewhere).
//!
//! The answer is `206` from the requested offset to the end, sent as the copy is written, at
//! most `--peer-upload-bytes-per-second` over all uploads of this node.

use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path as UrlPath, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use futures::StreamExt;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use kube::{Api, Client};
use vmdisk_crds::{AccessScope, ApiAccess, NodeDiskCache, PEER_AUDIENCE};
use vmdisk_registry::pull::peers::PEER_BLOBS_PATH;
use vmdisk_support::https::{serve_cert_dir, ServeError};

use super::blobs::Blobs;
use crate::identity::TokenReviewer;
use crate::node::metrics::AgentMetrics;

/// What serving peers asks of the API server: who a caller is, and what its node was asked
/// to hold.
pub const API_ACCESS: &[ApiAccess] = &[
    ApiAccess::new(
        "authentication.k8s.io",
        "tokenreviews",
        &["create"],
        AccessScope::Cluster,
    ),
    ApiAccess::new(
        "vmdisk.io",
        "nodediskcaches",
        &["get"],
        AccessScope::Cluster,
    ),
    // The images every node is asked to hold.
    ApiAccess::new("", "configmaps", &["list"], AccessScope::InstallNamespace),
];

/// Connections served at once (a few per peer).
const MAX_CONNECTIONS: usize = 256;
/// How long uploads in flight may go on once the agent stops.
const DRAIN: Duration = Duration::from_secs(3);
/// How long a request for a layer this node does not hold yet waits for its download to
/// begin (shorter than a peer's patience, [`vmdisk_registry::pull::PeerClient::stall`]).
const HOLD_ON: Duration = Duration::from_secs(5);
/// The rate limiter's unit: bytes are paced in KiB.
const KIB: u64 = 1024;

/// How much this node gives its peers.
#[derive(Debug, Clone, Copy)]
pub struct UploadLimits {
    /// Uploads at once; further requests get 503.
    pub max_uploads: usize,
    /// Bytes per second over all uploads; `None`: unlimited.
    pub bytes_per_second: Option<u64>,
}

/// What the handler shares.
pub struct PeerServer {
    client: Client,
    blobs: Arc<Blobs>,
    reviewer: TokenReviewer,
    caches: Api<NodeDiskCache>,
    uploads: Arc<tokio::sync::Semaphore>,
    /// The pace of uploads in KiB, and its burst.
    pace: Option<(Arc<DefaultDirectRateLimiter>, NonZeroU32)>,
    metrics: Arc<AgentMetrics>,
}

impl PeerServer {
    pub fn new(
        client: Client,
        install_namespace: &str,
        blobs: Arc<Blobs>,
        limits: UploadLimits,
        metrics: Arc<AgentMetrics>,
    ) -> Self {
        let pace = limits.bytes_per_second.map(|rate| {
            let kib_per_second = NonZeroU32::new((rate / KIB).clamp(1, u32::MAX as u64) as u32)
                .expect("clamped to at least 1");
            // A burst of one read chunk (256 KiB) at most.
            let burst = NonZeroU32::new(256).expect("not zero").min(kib_per_second);
            (
                Arc::new(RateLimiter::direct(
                    Quota::per_second(kib_per_second).allow_burst(burst),
                )),
                burst,
            )
        });
        Self {
            blobs,
            reviewer: TokenReviewer::new(client.clone(), install_namespace, PEER_AUDIENCE),
            caches: Api::all(client.clone()),
            client,
            uploads: Arc::new(tokio::sync::Semaphore::new(limits.max_uploads.max(1))),
            pace,
            metrics,
        }
    }
}

pub fn router(server: Arc<PeerServer>) -> Router {
    Router::new()
        .route(&format!("{PEER_BLOBS_PATH}/{{digest}}"), get(get_blob))
        .with_state(server)
}

fn refuse(
    server: &PeerServer,
    status: StatusCode,
    outcome: &'static str,
    message: String,
) -> Response {
    server.metrics.peer_request(outcome);
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        message,
    )
        .into_response()
}

async fn get_blob(
    State(server): State<Arc<PeerServer>>,
    UrlPath(digest): UrlPath<String>,
    headers: HeaderMap,
) -> Response {
    let caller = match server.reviewer.review_bearer(&headers).await {
        Ok(caller) => caller,
        Err(e) => {
            let status = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::FORBIDDEN);
            tracing::info!(%digest, error = %e, "peer request refused");
            return refuse(&server, status, "unauthenticated", e.to_string());
        }
    };
    let Some(blob) = server.blobs.wait_for(&digest, HOLD_ON).await else {
        return refuse(
            &server,
            StatusCode::NOT_FOUND,
            "not_held",
            format!("this node holds no copy of {digest}"),
        );
    };
    let asked = match server.caches.get_opt(&caller.node).await {
        Ok(cache) => cache
            .is_some_and(|c| blob.serves_any_of(c.spec.images.iter().map(|i| i.digest.as_str()))),
        Err(e) => {
            return refuse(
                &server,
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                format!("reading the NodeDiskCache of {}: {e}", caller.node),
            )
        }
    };
    let asked = asked
        || match super::every_node_digests(&server.client).await {
            Ok(every) => blob.serves_any_of(every.iter().map(String::as_str)),
            Err(e) => {
                return refuse(
                    &server,
                    StatusCode::SERVICE_UNAVAILABLE,
                    "unavailable",
                    format!("reading the every-node list: {e}"),
                )
            }
        };
    if !asked {
        tracing::info!(%digest, node = %caller.node, "peer request refused: its node was not asked to hold an image of this layer");
        return refuse(
            &server,
            StatusCode::FORBIDDEN,
            "not_asked",
            format!(
                "node {} was not asked to hold an image with layer {digest}",
                caller.node
            ),
        );
    }
    let start = match headers.get(header::RANGE).map(|v| v.to_str()) {
        None => 0,
        Some(Ok(range)) => match http_range_header::parse_range_header(range)
            .ok()
            .and_then(|r| r.validate(blob.size).ok())
            .as_deref()
        {
            Some([only]) if *only.end() == blob.size - 1 => *only.start(),
            _ => {
                return refuse(
                    &server,
                    StatusCode::RANGE_NOT_SATISFIABLE,
                    "bad_range",
                    format!("one range to the end of the {} bytes is served", blob.size),
                )
            }
        },
        Some(Err(_)) => {
            return refuse(
                &server,
                StatusCode::RANGE_NOT_SATISFIABLE,
                "bad_range",
                "unreadable Range".into(),
            )
        }
    };
    let Ok(permit) = Arc::clone(&server.uploads).try_acquire_owned() else {
        return refuse(
            &server,
            StatusCode::SERVICE_UNAVAILABLE,
            "busy",
            "this node serves as many peers as it may; ask another or the registry".into(),
        );
    };
    server.metrics.peer_request("served");
    tracing::info!(%digest, node = %caller.node, start, "serving a peer");
    let pace = server.pace.clone();
    let metrics = Arc::clone(&server.metrics);
    let body = blob.read_from(start).then(move |chunk| {
        let pace = pace.clone();
        let metrics = Arc::clone(&metrics);
        // The permit lives as long as the body.
        let _held = &permit;
        async move {
            let chunk = chunk?;
            if let Some((pace, burst)) = &pace {
                // In pieces no larger than the burst (a larger one is refused).
                let mut kib = chunk.len().div_ceil(KIB as usize) as u32;
                while let Some(piece) = NonZeroU32::new(kib.min(burst.get())) {
                    let _ = pace.until_n_ready(piece).await;
                    kib -= piece.get();
                }
            }
            metrics.peer_bytes_served(chunk.len() as u64);
            Ok::<_, std::io::Error>(chunk)
        }
    });
    let end = blob.size.saturating_sub(1);
    (
        StatusCode::PARTIAL_CONTENT,
        [
            (
                header::CONTENT_RANGE,
                format!("bytes {start}-{end}/{}", blob.size),
            ),
            (header::CONTENT_LENGTH, (blob.size - start).to_string()),
            (header::CONTENT_TYPE, "application/octet-stream".to_string()),
        ],
        Body::from_stream(body),
    )
        .into_response()
}

/// Serves peers on `listen` with the certificate in `cert_dir` (`tls.crt`, `tls.key`,
/// reloaded when they change) until `shutdown`.
pub async fn serve(
    listen: SocketAddr,
    cert_dir: &Path,
    server: Arc<PeerServer>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), ServeError> {
    tracing::info!(%listen, "serving peers");
    serve_cert_dir(
        listen,
        cert_dir,
        router(server),
        shutdown,
        DRAIN,
        MAX_CONNECTIONS,
    )
    .await
}
