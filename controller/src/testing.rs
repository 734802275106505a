//! A scripted API server for kube's mocked client, for the controllers' reconcile tests:
//! answers each request with a closure and records what it was asked. Watches are held open
//! without events.

use std::sync::{Arc, Mutex};

use http_body_util::BodyExt;
use kube::client::Body;

#[derive(Debug, Clone)]
pub struct Request {
    pub method: String,
    pub path: String,
    pub query: String,
    pub body: serde_json::Value,
}

pub struct Reply {
    pub status: u16,
    pub body: serde_json::Value,
}

impl Reply {
    pub fn json(status: u16, body: serde_json::Value) -> Self {
        Self { status, body }
    }
    /// The request's own body back, as the API server does for creates and applies.
    pub fn echo(request: &Request) -> Self {
        Self::json(
            if request.method == "POST" { 201 } else { 200 },
            request.body.clone(),
        )
    }
    pub fn not_found() -> Self {
        Self::json(
            404,
            serde_json::json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                "reason": "NotFound", "code": 404, "message": "not found"}),
        )
    }
}

pub struct MockApi {
    seen: Arc<Mutex<Vec<Request>>>,
}

impl MockApi {
    pub fn start(handler: impl Fn(Request) -> Reply + Send + 'static) -> (kube::Client, Self) {
        let (service, mut handle) =
            tower_test::mock::pair::<http::Request<Body>, http::Response<Body>>();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let record = Arc::clone(&seen);
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Some((request, send)) = handle.next_request().await {
                let method = request.method().to_string();
                let path = request.uri().path().to_string();
                let query = request.uri().query().unwrap_or_default().to_string();
                if query.contains("watch=true") {
                    held.push(send);
                    continue;
                }
                let bytes = request.into_body().collect().await.unwrap().to_bytes();
                let body = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
                let request = Request {
                    method,
                    path,
                    query,
                    body,
                };
                record.lock().unwrap().push(request.clone());
                let reply = handler(request);
                send.send_response(
                    http::Response::builder()
                        .status(reply.status)
                        .body(Body::from(serde_json::to_vec(&reply.body).unwrap()))
                        .unwrap(),
                );
            }
        });
        (kube::Client::new(service, "default"), Self { seen })
    }

    pub fn requests(&self) -> Vec<Request> {
        self.seen.lock().unwrap().clone()
    }
}
