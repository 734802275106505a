//! A stand-in for the Kubernetes API server over plain HTTP, for running the shipped binaries
//! where no cluster runs: collections list what it holds (VMDiskImages, and a NodeDiskCache
//! whose list names every one of them for the node a field selector asks for; everything
//! else is empty), watches stay open without an event, `GET` of a Node returns one, writes are
//! echoed, and the one Lease is kept, so a controller can lead and release it. Nothing is
//! validated: it answers just enough for a binary to start its loops.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};

#[derive(Default)]
struct Cluster {
    images: Vec<Value>,
    lease: Option<Value>,
    writes: u64,
}

pub struct FakeApi {
    pub addr: SocketAddr,
    state: Arc<Mutex<Cluster>>,
    server: tokio::task::JoinHandle<()>,
}

impl FakeApi {
    /// Starts on 127.0.0.1 holding `images` (VMDiskImage objects).
    pub async fn start(images: Vec<Value>) -> Self {
        let state = Arc::new(Mutex::new(Cluster {
            images,
            ..Cluster::default()
        }));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let router = axum::Router::new()
            .fallback(answer)
            .with_state(Arc::clone(&state));
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        Self {
            addr,
            state,
            server,
        }
    }

    /// Writes a kubeconfig pointing at this server into `dir`.
    pub fn kubeconfig(&self, dir: &Path) -> PathBuf {
        let path = dir.join("fake-api.kubeconfig");
        std::fs::write(
            &path,
            format!(
                "apiVersion: v1\nkind: Config\ncurrent-context: fake\n\
                 clusters: [{{name: fake, cluster: {{server: \"http://{}\"}}}}]\n\
                 users: [{{name: fake, user: {{token: fake}}}}]\n\
                 contexts: [{{name: fake, context: {{cluster: fake, user: fake, namespace: default}}}}]\n",
                self.addr
            ),
        )
        .unwrap();
        path
    }

    /// The Lease as last written, if any.
    pub fn lease(&self) -> Option<Value> {
        self.state.lock().unwrap().lease.clone()
    }

    /// Writes (anything but `GET`) received so far.
    pub fn writes(&self) -> u64 {
        self.state.lock().unwrap().writes
    }
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// `count` VMDiskImages in namespace `vms`, resolved (a digest each) and pinned on every node,
/// whose registry is `registry` (host:port, plain HTTP).
pub fn images_at(registry: &str, count: usize) -> Vec<Value> {
    (0..count)
        .map(|i| {
            json!({
                "apiVersion": "vmdisk.io/v1alpha1", "kind": "VMDiskImage",
                "metadata": {"name": format!("img-{i}"), "namespace": "vms",
                             "uid": format!("uid-{i}"), "resourceVersion": "1", "generation": 1},
                "spec": {"source": {"registry": {"url": format!("{registry}/disks/d{i}:1"), "insecure": true}},
                         "format": "raw", "cache": {"pinned": true}},
                "status": {"digest": format!("sha256:{i:064x}")}
            })
        })
        .collect()
}

/// The NodeDiskCache a `fieldSelector=metadata.name=<node>` list asks for, listing every image
/// as the controller's placement would for a node they all select.
fn node_list(query: &str, images: &[Value]) -> Option<Value> {
    let node = query
        .split('&')
        .find_map(|p| p.strip_prefix("fieldSelector=metadata.name%3D"))?;
    let listed: Vec<vmdisk_crds::DesiredImage> = images
        .iter()
        .filter_map(|i| serde_json::from_value::<vmdisk_crds::VMDiskImage>(i.clone()).ok())
        .filter_map(|i| vmdisk_crds::DesiredImage::of(&i))
        .collect();
    Some(
        json!({"apiVersion": "vmdisk.io/v1alpha1", "kind": "NodeDiskCache",
                "metadata": {"name": node, "resourceVersion": "1"},
                "spec": {"nodeName": node, "images": listed}}),
    )
}

fn reply(status: StatusCode, body: &Value) -> Response {
    (
        status,
        [("content-type", "application/json")],
        serde_json::to_vec(body).unwrap(),
    )
        .into_response()
}

fn not_found() -> Response {
    reply(
        StatusCode::NOT_FOUND,
        &json!({"apiVersion": "v1", "kind": "Status", "status": "Failure",
                "reason": "NotFound", "code": 404, "message": "not found"}),
    )
}

/// `/api/v1/<plural>`, `/api/v1/namespaces/<ns>/<plural>`, and the same under `/apis/<g>/<v>`.
fn is_collection(segments: &[&str]) -> bool {
    matches!(
        segments,
        ["api", _, _]
            | ["apis", _, _, _]
            | ["api", _, "namespaces", _, _]
            | ["apis", _, _, "namespaces", _, _]
    )
}

async fn answer(
    State(state): State<Arc<Mutex<Cluster>>>,
    method: Method,
    uri: Uri,
    body: Bytes,
) -> Response {
    let query = uri.query().unwrap_or("");
    if method == Method::GET
        && query
            .split('&')
            .any(|p| p == "watch=true" || p == "watch=1")
    {
        // An open watch without events, until the client goes.
        return Body::from_stream(futures::stream::pending::<Result<Bytes, std::io::Error>>())
            .into_response();
    }
    let segments: Vec<&str> = uri.path().trim_matches('/').split('/').collect();
    let mut st = state.lock().unwrap();
    if method == Method::GET {
        if segments.contains(&"leases") && !is_collection(&segments) {
            return st
                .lease
                .as_ref()
                .map_or_else(not_found, |l| reply(StatusCode::OK, l));
        }
        if let ["api", "v1", "nodes", name] = segments[..] {
            return reply(
                StatusCode::OK,
                &json!({"apiVersion": "v1", "kind": "Node",
                        "metadata": {"name": name, "uid": "node-uid", "resourceVersion": "1",
                                     "labels": {"kubernetes.io/hostname": name}}}),
            );
        }
        if is_collection(&segments) {
            let items = match segments.last() {
                Some(&"vmdiskimages") => st.images.clone(),
                Some(&"nodediskcaches") => node_list(query, &st.images).into_iter().collect(),
                _ => Vec::new(),
            };
            return reply(
                StatusCode::OK,
                &json!({"apiVersion": "v1", "kind": "List",
                        "metadata": {"resourceVersion": "1"}, "items": items}),
            );
        }
        return not_found();
    }
    st.writes += 1;
    if method == Method::DELETE {
        return reply(
            StatusCode::OK,
            &json!({"apiVersion": "v1", "kind": "Status", "status": "Success"}),
        );
    }
    let mut object: Value = serde_json::from_slice(&body).unwrap_or_else(|_| json!({}));
    if object.is_object() {
        object["metadata"]["resourceVersion"] = json!(st.writes.to_string());
        if object["metadata"]["uid"].is_null() {
            object["metadata"]["uid"] = json!(format!("uid-w{}", st.writes));
        }
    }
    if segments.contains(&"leases") {
        st.lease = Some(object.clone());
    }
    let status = if method == Method::POST {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    reply(status, &object)
}
