//! The agent's `run` loop end to end with kube's mocked API client (no API server can run
//! here) and a real registry: it sees an image in its node's list (its NodeDiskCache's spec,
//! the only thing it watches), warms it by its resolved digest, publishes its NodeDiskCache
//! status and labels its own node, and writes nothing else.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http_body_util::BodyExt;
use kube::client::Body;
use serde_json::{json, Value};
use vmdisk_cache_agent::node::{Agent, AgentMetrics, CredentialsSource, NodeReporter};
use vmdisk_cache_agent::store::{Budget, CacheStore};
use vmdisk_cache_agent::warm::extract::ExtractLimits;
use vmdisk_cache_agent::warm::Warmer;
use vmdisk_crds::node_cache_label_key;
use vmdisk_registry::pull::{Puller, PullerConfig};
use vmdisk_tests::disks::{make_ext4_raw, same_content};
use vmdisk_tests::push::push_container_disk;
use vmdisk_tests::registry::TestRegistry;

#[derive(Default)]
struct Cluster {
    /// The node's list, as the controller wrote it.
    list: Value,
    node_labels: BTreeMap<String, String>,
    cache_status: Option<Value>,
    writes: Vec<String>,
}

fn reply(v: &Value) -> http::Response<Body> {
    http::Response::builder()
        .body(Body::from(serde_json::to_vec(v).unwrap()))
        .unwrap()
}

fn node(state: &Cluster) -> Value {
    json!({"apiVersion": "v1", "kind": "Node",
           "metadata": {"name": "node-a", "uid": "u-1", "resourceVersion": "7", "labels": state.node_labels}})
}

/// Plays the API server for one node.
async fn apiserver(
    mut handle: tower_test::mock::Handle<http::Request<Body>, http::Response<Body>>,
    state: Arc<Mutex<Cluster>>,
) {
    let mut pending_watches = Vec::new();
    while let Some((request, send)) = handle.next_request().await {
        let method = request.method().to_string();
        let uri = request.uri().to_string();
        let path = request.uri().path().to_string();
        let body = request.into_body().collect().await.unwrap().to_bytes();
        let body: Value = if body.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&body).unwrap_or(Value::Null)
        };
        if uri.contains("watch=true") {
            pending_watches.push(send);
            continue;
        }
        let mut st = state.lock().unwrap();
        if method != "GET" {
            st.writes.push(format!("{method} {path}"));
        }
        let response = match (method.as_str(), path.as_str()) {
            ("GET", "/apis/vmdisk.io/v1alpha1/nodediskcaches") => {
                assert!(
                    uri.contains("fieldSelector=metadata.name%3Dnode-a"),
                    "{uri}"
                );
                reply(&json!({
                    "apiVersion": "vmdisk.io/v1alpha1", "kind": "NodeDiskCacheList",
                    "metadata": {"resourceVersion": "10"},
                    "items": [{"apiVersion": "vmdisk.io/v1alpha1", "kind": "NodeDiskCache",
                               "metadata": {"name": "node-a", "resourceVersion": "9"},
                               "spec": {"nodeName": "node-a", "images": [st.list.clone()]}}]}))
            }
            // No image for every node here.
            ("GET", "/api/v1/namespaces/vmdisk-system/configmaps") => reply(&json!({
                "apiVersion": "v1", "kind": "ConfigMapList", "metadata": {"resourceVersion": "10"},
                "items": []})),
            ("GET", "/api/v1/nodes/node-a") => reply(&node(&st)),
            ("PATCH", "/api/v1/nodes/node-a") => {
                for (k, v) in body["metadata"]["labels"]
                    .as_object()
                    .cloned()
                    .unwrap_or_default()
                {
                    match v.as_str() {
                        Some(v) => st.node_labels.insert(k, v.to_string()),
                        None => st.node_labels.remove(&k),
                    };
                }
                reply(&node(&st))
            }
            ("PATCH", "/apis/vmdisk.io/v1alpha1/nodediskcaches/node-a") => reply(&body),
            ("PATCH", "/apis/vmdisk.io/v1alpha1/nodediskcaches/node-a/status") => {
                st.cache_status = Some(body["status"].clone());
                reply(
                    &json!({"apiVersion": "vmdisk.io/v1alpha1", "kind": "NodeDiskCache",
                              "metadata": {"name": "node-a"}, "spec": {"nodeName": "node-a"}, "status": body["status"]}),
                )
            }
            ("POST", p) if p.ends_with("/events") => reply(&body),
            other => panic!("unexpected request {other:?} ({uri})"),
        };
        send.send_response(response);
    }
}

#[tokio::test]
async fn run_mode_warms_reports_and_labels_its_own_node() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let registry = TestRegistry::start_plain();
    let work = tempfile::tempdir().unwrap();
    let raw = make_ext4_raw(work.path(), "agent", 24, 3, 55);
    let (reference, digest) = push_container_disk(&registry, "disks/agent", "1", &raw).await;
    let state = Arc::new(Mutex::new(Cluster {
        list: json!({"namespace": "vms", "name": "fedora", "digest": digest, "format": "raw",
                     "pinned": true, "url": reference, "insecure": true}),
        node_labels: [("kubernetes.io/hostname".to_string(), "node-a".to_string())].into(),
        ..Default::default()
    }));
    let (service, handle) = tower_test::mock::pair::<http::Request<Body>, http::Response<Body>>();
    tokio::spawn(apiserver(handle, Arc::clone(&state)));
    let client = kube::Client::new(service, "default");
    let (store, _) = CacheStore::open(&work.path().join("cache"), Budget::Bytes(1 << 30)).unwrap();
    let store = Arc::new(store);
    let agent = Agent {
        client: client.clone(),
        node_name: "node-a".into(),
        credentials: CredentialsSource {
            url: None,
            ca_file: work.path().join("ca.crt"),
            token_file: work.path().join("token"),
        },
        warmer: Warmer::new(
            Arc::clone(&store),
            Puller::new(PullerConfig::default()),
            ExtractLimits::default(),
        ),
        reporter: NodeReporter::new(client, "node-a".into()),
        metrics: Arc::new(AgentMetrics::new()),
        resync: Duration::from_millis(200),
        peer_endpoint: None,
    };
    let task = tokio::spawn(agent.run(vmdisk_support::process::Stop::new()));
    let label = node_cache_label_key(&digest).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        {
            let st = state.lock().unwrap();
            let ready = st.cache_status.as_ref().is_some_and(|s| {
                s["entries"].as_array().is_some_and(|e| {
                    e.iter()
                        .any(|r| r["digest"] == json!(digest) && r["state"] == "Ready")
                })
            });
            if ready && st.node_labels.get(&label).map(String::as_str) == Some("ready") {
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "agent never reported the image ready: {:?}",
            state.lock().unwrap().cache_status
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Removed behind the agent's back: noticed, reported, and warmed again since still wanted.
    let first = store.entries().into_iter().next().unwrap();
    let removed_at = std::fs::metadata(&first.disk_path)
        .unwrap()
        .modified()
        .unwrap();
    std::fs::remove_file(&first.disk_path).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let again = store.entries().into_iter().next().filter(|e| {
            std::fs::metadata(&e.disk_path)
                .is_ok_and(|m| m.modified().is_ok_and(|t| t > removed_at))
        });
        if again.is_some() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the lost entry was not warmed again"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    task.abort();
    let st = state.lock().unwrap();
    assert!(
        st.writes.iter().any(|w| w.ends_with("/events")),
        "the lost entry must be reported with an Event: {:?}",
        st.writes
    );
    let row = st.cache_status.as_ref().unwrap()["entries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["state"] == "Ready")
        .unwrap()
        .clone();
    assert_eq!(row["pinned"], true, "the image's cache policy pins it");
    assert_eq!(row["virtualSize"], json!(24u64 << 20));
    assert_eq!(
        st.node_labels
            .get("kubernetes.io/hostname")
            .map(String::as_str),
        Some("node-a"),
        "other labels untouched"
    );
    assert!(
        st.writes.iter().all(|w| w.contains("/nodes/node-a")
            || w.contains("/nodediskcaches/node-a")
            || w.ends_with("/events")),
        "the agent wrote something that is not its own: {:?}",
        st.writes
    );
    assert!(
        !st.writes.iter().any(|w| w.contains("vmdiskimages")),
        "agents never write VMDiskImages"
    );
    let entry = store.entries().into_iter().next().unwrap();
    assert!(same_content(&raw, &entry.disk_path));
    assert!(store.is_pinned(&entry.key));
}
