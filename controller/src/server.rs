//! The controller's plain-HTTP endpoints, for Prometheus and the kubelet's probes:
//! `GET /metrics`, `GET /healthz` (the process answers) and `GET /readyz` (the Lease answered:
//! this replica leads or stands by; 503 with the reason otherwise).

use std::sync::Arc;

use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;

use crate::metrics::ControllerMetrics;
use crate::supervisor::Leadership;

pub fn router(metrics: Arc<ControllerMetrics>, leadership: Arc<Leadership>) -> Router {
    vmdisk_support::metrics::router(metrics).route(
        "/readyz",
        get(move || {
            let leadership = Arc::clone(&leadership);
            async move {
                match leadership.readiness() {
                    Ok(state) => (StatusCode::OK, state.to_string()),
                    Err(reason) => (StatusCode::SERVICE_UNAVAILABLE, reason),
                }
            }
        }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::supervisor::Round;
    use http_body_util::BodyExt;
    use tower::ServiceExt as _;

    async fn get_path(router: &Router, path: &str) -> (StatusCode, String) {
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
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8(body.to_vec()).unwrap())
    }

    #[tokio::test]
    async fn probes_follow_the_lease_and_metrics_are_served() {
        let metrics = Arc::new(ControllerMetrics::new());
        let leadership = Arc::new(Leadership::default());
        let router = router(Arc::clone(&metrics), Arc::clone(&leadership));
        assert_eq!(get_path(&router, "/healthz").await.0, StatusCode::OK);
        let (status, body) = get_path(&router, "/readyz").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(body.contains("was not read yet"), "{body}");
        leadership.set(Round::Standby);
        assert_eq!(
            get_path(&router, "/readyz").await,
            (StatusCode::OK, "standby".to_string())
        );
        metrics.populator.retried();
        let (status, body) = get_path(&router, "/metrics").await;
        assert_eq!(status, StatusCode::OK);
        assert!(
            body.contains("vmdisk_controller_populator_retries_total 1"),
            "{body}"
        );
        assert_eq!(get_path(&router, "/nope").await.0, StatusCode::NOT_FOUND);
    }
}
