//! The agent API: what the controller serves to the cache agents, over HTTPS, so that agents
//! read no Secret at all. Today that is one call, the pull credentials of an image their node
//! prefetches ([`credentials`]).
//!
//! Every request carries the agent pod's projected ServiceAccount token for the audience
//! `vmdisk-controller`; the API server's TokenReview names the caller's node ([`identity`]).
//! Both replicas serve it (it needs no leadership: every answer is read from the API server
//! at the time of the request). The serving certificate is hot-reloaded from its mounted
//! Secret, as the webhook's is.

pub mod credentials;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path as UrlPath, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use kube::Client;
use vmdisk_crds::{AccessScope, ApiAccess, AGENT_API_CREDENTIALS_PATH};
use vmdisk_support::https::{serve_cert_dir, ServeError};

use crate::metrics::AgentApiMetrics;
use vmdisk_cache_agent::identity::TokenReviewer;
use vmdisk_crds::AGENT_API_AUDIENCE;

/// What the agent API asks of the API server.
pub const API_ACCESS: &[ApiAccess] = &[
    // Who is calling, and on which node.
    ApiAccess::new(
        "authentication.k8s.io",
        "tokenreviews",
        &["create"],
        AccessScope::Cluster,
    ),
    // The caller's node's labels, and the image it asks about.
    ApiAccess::new("", "nodes", &["get"], AccessScope::Cluster),
    ApiAccess::new("vmdisk.io", "vmdiskimages", &["get"], AccessScope::Cluster),
    // The image controller's copy, handed out.
    ApiAccess::new("", "secrets", &["get"], AccessScope::CredentialsNamespace),
];

/// Connections served at once: one or two per node's agent, briefly.
const MAX_CONNECTIONS: usize = 512;
/// How long in-flight requests may finish on the stop.
const DRAIN: Duration = Duration::from_secs(5);

/// What the handlers share.
pub struct AgentApi {
    pub client: Client,
    pub credentials_namespace: String,
    reviewer: TokenReviewer,
    metrics: AgentApiMetrics,
}

impl AgentApi {
    pub fn new(
        client: Client,
        install_namespace: &str,
        credentials_namespace: &str,
        metrics: AgentApiMetrics,
    ) -> Self {
        Self {
            reviewer: TokenReviewer::new(client.clone(), install_namespace, AGENT_API_AUDIENCE),
            client,
            credentials_namespace: credentials_namespace.to_string(),
            metrics,
        }
    }
}

pub fn router(api: Arc<AgentApi>) -> Router {
    Router::new()
        .route(
            &format!("{AGENT_API_CREDENTIALS_PATH}/{{namespace}}/{{name}}"),
            get(get_credentials),
        )
        .with_state(api)
}

async fn get_credentials(
    State(api): State<Arc<AgentApi>>,
    UrlPath((namespace, name)): UrlPath<(String, String)>,
    headers: HeaderMap,
) -> Response {
    let answer = match api.reviewer.review_bearer(&headers).await {
        Ok(agent) => {
            let answer = credentials::answer(&api, &agent, &namespace, &name).await;
            tracing::info!(node = %agent.node, pod = %agent.pod, image = %format!("{namespace}/{name}"), outcome = answer.outcome, status = answer.status, "credentials requested");
            answer
        }
        Err(e) => {
            tracing::info!(image = %format!("{namespace}/{name}"), error = %e, "credentials request refused");
            credentials::Answer {
                status: e.status(),
                body: e.to_string().into_bytes(),
                outcome: if e.status() == 503 {
                    "unavailable"
                } else {
                    "unauthenticated"
                },
            }
        }
    };
    api.metrics.answered(answer.outcome);
    let status = StatusCode::from_u16(answer.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let content_type = if status == StatusCode::OK {
        "application/json"
    } else {
        "text/plain; charset=utf-8"
    };
    (status, [(header::CONTENT_TYPE, content_type)], answer.body).into_response()
}

/// Serves the agent API on `listen` with the certificate in `cert_dir` (`tls.crt`, `tls.key`,
/// reloaded when they change) until `shutdown`.
pub async fn serve(
    listen: SocketAddr,
    cert_dir: &Path,
    api: Arc<AgentApi>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), ServeError> {
    tracing::info!(%listen, "serving the agent API");
    serve_cert_dir(
        listen,
        cert_dir,
        router(api),
        shutdown,
        DRAIN,
        MAX_CONNECTIONS,
    )
    .await
}
