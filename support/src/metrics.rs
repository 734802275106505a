//! The one way a vmdisk binary exposes Prometheus metrics: each component registers its metrics
//! in a `prometheus_client` [`Registry`] under its own prefix, and [`encode`] and [`router`]
//! turn that registry into `GET /metrics` (with `GET /healthz` beside it for the kubelet).

use std::sync::Arc;

use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use prometheus_client::registry::Registry;

/// The exposition format [`encode`] writes.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Something with a registry to show on `/metrics`.
pub trait Exposition: Send + Sync + 'static {
    fn registry(&self) -> &Registry;

    /// The registry in OpenMetrics text.
    fn encode(&self) -> String {
        encode(self.registry())
    }
}

/// A registry in OpenMetrics text.
pub fn encode(registry: &Registry) -> String {
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, registry)
        .expect("writing to a String cannot fail");
    out
}

/// The `/metrics` answer for `metrics`, with its content type.
pub fn response(metrics: &dyn Exposition) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, CONTENT_TYPE)], metrics.encode())
}

/// `GET /metrics` and `GET /healthz` (which answers while the process does). Components add
/// their own routes (readiness, ...) to it.
pub fn router<M: Exposition>(metrics: Arc<M>) -> Router {
    Router::new()
        .route(
            "/metrics",
            get(move || {
                let metrics = Arc::clone(&metrics);
                async move { response(&*metrics) }
            }),
        )
        .route("/healthz", get(|| async { "ok" }))
}

/// Serves `router` as plain HTTP on `listener` until `shutdown` completes.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use prometheus_client::metrics::counter::Counter;
    use tower::ServiceExt as _;

    struct Sample {
        registry: Registry,
        hits: Counter,
    }

    impl Exposition for Sample {
        fn registry(&self) -> &Registry {
            &self.registry
        }
    }

    async fn get_path(router: &Router, path: &str) -> (http::StatusCode, Option<String>, String) {
        let response = router
            .clone()
            .oneshot(
                http::Request::get(path)
                    .body(axum::body::Body::empty())
                    .unwrap(),
            )
            .await
            .unwrap();
        let status = response.status();
        let ctype = response
            .headers()
            .get(header::CONTENT_TYPE)
            .map(|v| v.to_str().unwrap().to_string());
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (status, ctype, String::from_utf8(body.to_vec()).unwrap())
    }

    #[tokio::test]
    async fn metrics_and_health_are_served() {
        let mut registry = Registry::with_prefix("vmdisk_sample");
        let hits = Counter::default();
        registry.register("hits", "Hits", hits.clone());
        let sample = Arc::new(Sample { registry, hits });
        sample.hits.inc_by(3);
        let router = router(Arc::clone(&sample));
        let (status, ctype, body) = get_path(&router, "/metrics").await;
        assert_eq!(status, http::StatusCode::OK);
        assert_eq!(ctype.as_deref(), Some(CONTENT_TYPE));
        assert!(body.contains("vmdisk_sample_hits_total 3"), "{body}");
        assert!(body.ends_with("# EOF\n"), "{body}");
        assert_eq!(get_path(&router, "/healthz").await.2, "ok");
        assert_eq!(
            get_path(&router, "/nope").await.0,
            http::StatusCode::NOT_FOUND
        );
    }
}
