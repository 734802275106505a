//! The webhook over real HTTPS: every captured AdmissionReview, certificate renewal under a
//! keep-alive connection, bad input, probes, metrics and graceful shutdown.

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use vmdisk_crds::{format_bytes_quantity, node_cache_label_key};
use vmdisk_tests::webhook::{
    as_sent, endpoint_for, fixtures, sample_catalog_yaml, TestWebhook, SAMPLE_DIGEST,
};
use vmdisk_webhook::admission::decode_patch_field;
use vmdisk_webhook::mutate::pvc::volume_bytes_for_disk;

const FIVE_GIB: u64 = 5 << 30;

fn fs_size() -> String {
    format_bytes_quantity(volume_bytes_for_disk(
        FIVE_GIB,
        true,
        vmdisk_crds::DEFAULT_FILESYSTEM_OVERHEAD,
    ))
}

/// Sets `pointer` in `doc`, creating objects on the way.
fn set(doc: &mut Value, pointer: &str, value: Value) {
    let mut cur = doc;
    let parts: Vec<String> = pointer
        .trim_start_matches('/')
        .split('/')
        .map(|p| p.replace("~1", "/").replace("~0", "~"))
        .collect();
    for (i, part) in parts.iter().enumerate() {
        if i + 1 == parts.len() {
            cur.as_object_mut().unwrap().insert(part.clone(), value);
            return;
        }
        cur = cur
            .as_object_mut()
            .unwrap()
            .entry(part.clone())
            .or_insert_with(|| json!({}));
    }
}

fn image_ref() -> Value {
    json!({"apiGroup": "vmdisk.io", "kind": "VMDiskImage", "name": "fedora-40"})
}

fn warm_term() -> Value {
    json!({"weight": 80, "preference": {"matchExpressions": [
        {"key": node_cache_label_key(SAMPLE_DIGEST).unwrap(), "operator": "Exists"}]}})
}

/// What each fixture's object must look like after the webhook's patch: `None` = no patch.
fn expected_changes(fixture: &str) -> Option<Vec<(&'static str, Value)>> {
    let label = ("/metadata/labels/vmdisk.io~1image", json!("fedora-40"));
    let digest = (
        "/metadata/annotations/vmdisk.io~1digest",
        json!(SAMPLE_DIGEST),
    );
    let class = ("/spec/storageClassName", json!("local-path"));
    let affinity = |existing: Vec<Value>| {
        let mut terms = existing;
        terms.push(warm_term());
        (
            "/spec/affinity/nodeAffinity/preferredDuringSchedulingIgnoredDuringExecution",
            Value::Array(terms),
        )
    };
    Some(match fixture {
        "pvc-create-annotation-form.json" => {
            vec![("/spec/dataSourceRef", image_ref()), class, label, digest]
        }
        "pvc-create-by-ephemeral-controller.json" | "pvc-create-by-statefulset-controller.json" => {
            vec![class, label, digest]
        }
        "pvc-create-datasourceref-block.json" => vec![label, digest],
        "pvc-create-datasourceref-too-small.json" | "pvc-create-dryrun.json" => vec![
            ("/spec/resources/requests/storage", json!(fs_size())),
            class,
            label,
            digest,
        ],
        "pvc-create-legacy-datasource.json" => {
            vec![("/spec/dataSourceRef", image_ref()), class, label, digest]
        }
        "pvc-create-minimal-dryrun.json" | "pvc-create-minimal-no-size-no-accessmodes.json" => {
            vec![
                ("/spec/resources/requests/storage", json!(fs_size())),
                ("/spec/accessModes", json!(["ReadWriteOnce"])),
                class,
                label,
                digest,
            ]
        }
        "pod-create-by-statefulset-controller.json"
        | "pod-create-ephemeral-volume-template.json"
        | "pod-create-virt-launcher-with-pvc.json" => vec![affinity(vec![])],
        "pod-create-existing-affinity-with-pvc.json" => vec![affinity(vec![json!({
            "weight": 10,
            "preference": {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]}
        })])],
        "pvc-create-from-snapshot.json"
        | "pvc-create-other-populator.json"
        | "pvc-create-plain.json"
        | "pvc-update-label.json"
        | "pod-create-by-replicaset-generatename.json"
        | "pod-create-no-pvc.json" => return None,
        other => panic!("fixture {other} has no expectation: add one"),
    })
}

#[tokio::test]
async fn every_fixture_over_https_patches_exactly_what_it_should() {
    let server = TestWebhook::start(&sample_catalog_yaml(), None).await;
    let mut conn = server.connect().await;
    let all = fixtures();
    assert!(all.len() >= 19, "fixtures missing: {}", all.len());
    for (name, body) in all {
        let review: Value = serde_json::from_slice(&body).unwrap();
        let reply = conn
            .post_json(endpoint_for(&name), body.clone())
            .await
            .unwrap();
        assert_eq!(reply.status, 200, "{name}: {}", reply.text());
        // The same review as the apiserver sends it (compact) gets the same answer.
        let compact = as_sent(&body);
        assert!(compact.len() < body.len(), "{name}: nothing stripped");
        assert_eq!(
            serde_json::from_slice::<Value>(&compact).unwrap(),
            review,
            "{name}: stripping changed the review"
        );
        let compact_reply = conn.post_json(endpoint_for(&name), compact).await.unwrap();
        assert_eq!(
            compact_reply.body, reply.body,
            "{name}: compact form answered differently"
        );
        let answer = reply.json();
        assert_eq!(answer["apiVersion"], "admission.k8s.io/v1", "{name}");
        assert_eq!(answer["kind"], "AdmissionReview", "{name}");
        let response = &answer["response"];
        assert_eq!(response["uid"], review["request"]["uid"], "{name}");
        assert_eq!(response["allowed"], true, "{name}");
        let original = review["request"]["object"].clone();
        match expected_changes(&name) {
            None => {
                assert!(
                    response.get("patch").is_none(),
                    "{name}: unexpected patch {response}"
                );
            }
            Some(changes) => {
                assert_eq!(response["patchType"], "JSONPatch", "{name}");
                let patch = decode_patch_field(&response["patch"]).unwrap();
                let mut patched = original.clone();
                json_patch::patch(&mut patched, &patch)
                    .unwrap_or_else(|e| panic!("{name}: patch does not apply: {e}"));
                let mut expected = original.clone();
                for (pointer, value) in changes {
                    set(&mut expected, pointer, value);
                }
                assert_eq!(
                    patched, expected,
                    "{name}: patched object differs from expectation\npatch: {patch:?}"
                );
            }
        }
        let warnings = response["warnings"].as_array().cloned().unwrap_or_default();
        match name.as_str() {
            "pvc-create-datasourceref-too-small.json" | "pvc-create-dryrun.json" => {
                assert_eq!(warnings.len(), 1, "{name}: {warnings:?}");
                assert!(
                    warnings[0].as_str().unwrap().contains("raised from"),
                    "{name}"
                );
            }
            _ => assert!(
                warnings.is_empty(),
                "{name}: unexpected warnings {warnings:?}"
            ),
        }
    }
    assert!(!conn.is_closed(), "keep-alive connection was closed");
}

#[tokio::test]
async fn dry_run_gets_the_same_answer_as_a_real_create() {
    let server = TestWebhook::start(&sample_catalog_yaml(), None).await;
    let mut conn = server.connect().await;
    let all = fixtures();
    let body = |n: &str| all.iter().find(|(f, _)| f == n).unwrap().1.clone();
    let dry = conn
        .post_json("/mutate-pvc", body("pvc-create-minimal-dryrun.json"))
        .await
        .unwrap()
        .json();
    let real = conn
        .post_json(
            "/mutate-pvc",
            body("pvc-create-minimal-no-size-no-accessmodes.json"),
        )
        .await
        .unwrap()
        .json();
    assert_eq!(dry["response"]["patch"], real["response"]["patch"]);
    assert_eq!(dry["response"]["warnings"], real["response"]["warnings"]);
}

#[tokio::test]
async fn missing_and_unresolved_images_warn_and_never_deny() {
    let unresolved = sample_catalog_yaml()
        .replace(&format!("  digest: {SAMPLE_DIGEST}\n"), "")
        .replace("  virtualSize: 5368709120\n", "");
    let server = TestWebhook::start(&unresolved, None).await;
    let mut conn = server.connect().await;
    let all = fixtures();
    let body = |n: &str| all.iter().find(|(f, _)| f == n).unwrap().1.clone();

    let r = conn
        .post_json("/mutate-pvc", body("pvc-create-annotation-form.json"))
        .await
        .unwrap()
        .json();
    assert_eq!(r["response"]["allowed"], true);
    let warnings = r["response"]["warnings"].to_string();
    assert!(warnings.contains("not resolved"), "{warnings}");

    let missing = String::from_utf8(body("pvc-create-annotation-form.json"))
        .unwrap()
        .replace(
            "\"vmdisk.io/image\": \"fedora-40\"",
            "\"vmdisk.io/image\": \"no-such-image\"",
        );
    let r = conn.post_json("/mutate-pvc", missing).await.unwrap().json();
    assert_eq!(r["response"]["allowed"], true);
    assert!(r["response"]["warnings"]
        .to_string()
        .contains("vms/no-such-image not found"));
    // The reference is still completed so the PVC binds once the image appears.
    let patch = decode_patch_field(&r["response"]["patch"]).unwrap();
    assert!(serde_json::to_string(&patch)
        .unwrap()
        .contains("no-such-image"));

    let r = conn
        .post_json(
            "/mutate-pod",
            body("pod-create-virt-launcher-with-pvc.json"),
        )
        .await
        .unwrap()
        .json();
    assert_eq!(r["response"]["allowed"], true);
    assert!(r["response"].get("patch").is_none());
    assert!(r["response"]["warnings"]
        .to_string()
        .contains("not resolved"));
}

#[tokio::test]
async fn bad_input_gets_clear_errors_and_never_a_panic() {
    let server = TestWebhook::start(&sample_catalog_yaml(), Some(64 * 1024)).await;
    let mut conn = server.connect().await;
    let fixture = fixtures()
        .into_iter()
        .find(|(n, _)| n == "pvc-create-plain.json")
        .unwrap()
        .1;

    let r = conn
        .post_json("/mutate-pvc", "this is not json")
        .await
        .unwrap();
    assert_eq!(r.status, 400);
    assert!(r.text().contains("not JSON"), "{}", r.text());

    let wrong = String::from_utf8(fixture.clone())
        .unwrap()
        .replace("admission.k8s.io/v1", "admission.k8s.io/v1beta1");
    let r = conn.post_json("/mutate-pvc", wrong).await.unwrap();
    assert_eq!(r.status, 400);
    assert!(
        r.text().contains("admission.k8s.io/v1beta1"),
        "{}",
        r.text()
    );

    let r = conn
        .post_json(
            "/mutate-pvc",
            r#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview"}"#,
        )
        .await
        .unwrap();
    assert_eq!(r.status, 400);
    assert!(r.text().contains("no request"), "{}", r.text());

    let huge = format!(
        r#"{{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","pad":"{}"}}"#,
        "x".repeat(100 * 1024)
    );
    let mut fresh = server.connect().await;
    let r = fresh.post_json("/mutate-pvc", huge).await.unwrap();
    assert_eq!(r.status, 413);
    assert!(r.text().contains("65536"), "{}", r.text());

    let r = conn
        .request("POST", "/mutate-pvc", Some("text/plain"), fixture.clone())
        .await
        .unwrap();
    assert_eq!(r.status, 415);

    // A Pod review sent to the PVC endpoint: allowed, untouched, uid echoed.
    let pod = fixtures()
        .into_iter()
        .find(|(n, _)| n == "pod-create-virt-launcher-with-pvc.json")
        .unwrap()
        .1;
    let r = conn.post_json("/mutate-pvc", pod.clone()).await.unwrap();
    assert_eq!(r.status, 200);
    let v = r.json();
    let uid: Value = serde_json::from_slice::<Value>(&pod).unwrap()["request"]["uid"].clone();
    assert_eq!(v["response"]["uid"], uid);
    assert_eq!(v["response"]["allowed"], true);
    assert!(v["response"].get("patch").is_none());

    // A PVC review whose object is not a PVC: allowed with a warning.
    let mut broken: Value = serde_json::from_slice(&fixture).unwrap();
    broken["request"]["object"]["spec"] = json!("not an object");
    let r = conn
        .post_json("/mutate-pvc", serde_json::to_vec(&broken).unwrap())
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    let v = r.json();
    assert_eq!(v["response"]["allowed"], true);
    assert!(v["response"]["warnings"][0]
        .as_str()
        .unwrap()
        .contains("not a valid PersistentVolumeClaim"));

    let r = conn.request("GET", "/mutate-pvc", None, "").await.unwrap();
    assert_eq!(r.status, 405);
    let r = conn.request("GET", "/nope", None, "").await.unwrap();
    assert_eq!(r.status, 404);

    // The server still serves after all that.
    let r = conn.post_json("/mutate-pvc", fixture).await.unwrap();
    assert_eq!(r.status, 200);
    let metrics = conn
        .request("GET", "/metrics", None, "")
        .await
        .unwrap()
        .text();
    assert!(
        metrics.contains(r#"vmdisk_webhook_errors_total{resource="pvc"} 5"#),
        "{metrics}"
    );
}

#[tokio::test]
async fn probes_and_metrics() {
    let server = TestWebhook::start(&sample_catalog_yaml(), None).await;
    let mut conn = server.connect().await;
    let r = conn.request("GET", "/healthz", None, "").await.unwrap();
    assert_eq!((r.status, r.text().as_str()), (200, "ok"));
    let r = conn.request("GET", "/readyz", None, "").await.unwrap();
    assert_eq!(r.status, 200);
    server
        .webhook
        .tls_ready
        .store(false, std::sync::atomic::Ordering::Release);
    let r = conn.request("GET", "/readyz", None, "").await.unwrap();
    assert_eq!(r.status, 503);
    assert!(r.text().contains("certificate"));

    let body = fixtures()
        .into_iter()
        .find(|(n, _)| n == "pvc-create-annotation-form.json")
        .unwrap()
        .1;
    conn.post_json("/mutate-pvc", body).await.unwrap();
    let text = conn
        .request("GET", "/metrics", None, "")
        .await
        .unwrap()
        .text();
    assert!(
        text.contains(
            r#"vmdisk_webhook_admission_requests_total{resource="pvc",outcome="patched"} 1"#
        ),
        "{text}"
    );
    assert!(
        text.contains(r#"vmdisk_webhook_patches_applied_total{resource="pvc"} 1"#),
        "{text}"
    );
    assert!(
        text.contains("vmdisk_webhook_admission_duration_seconds_count{resource=\"pvc\"} 1"),
        "{text}"
    );
}

async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn certificate_renewal_by_symlink_swap_keeps_keepalive_connections() {
    let mut server = TestWebhook::start(&sample_catalog_yaml(), None).await;
    let body = fixtures()
        .into_iter()
        .find(|(n, _)| n == "pvc-create-plain.json")
        .unwrap()
        .1;
    let mut old_conn = server.connect().await;
    assert_eq!(
        old_conn
            .post_json("/mutate-pvc", body.clone())
            .await
            .unwrap()
            .status,
        200
    );
    let first_cert = old_conn.peer_certificate.clone();

    server.renew_certificate();
    let resolver = server.resolver.clone();
    wait_for("certificate reload", || resolver.generation() == 2).await;

    // The established connection keeps working on its negotiated session.
    let r = old_conn
        .post_json("/mutate-pvc", body.clone())
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    assert!(!old_conn.is_closed());
    // New connections get the new certificate.
    let mut new_conn = server.connect().await;
    assert_ne!(new_conn.peer_certificate, first_cert);
    assert_eq!(
        new_conn
            .post_json("/mutate-pvc", body.clone())
            .await
            .unwrap()
            .status,
        200
    );
    let second_cert = new_conn.peer_certificate.clone();

    // A broken renewal (key does not match) is refused; the last good pair keeps serving.
    let other = server.ca.issue(&["localhost"]);
    let good = server.ca.issue(&["localhost"]);
    server.write_pair(&good.cert_pem, &other.key_pem);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(server.resolver.generation(), 2);
    let mut after_bad = server.connect().await;
    assert_eq!(after_bad.peer_certificate, second_cert);
    assert_eq!(
        after_bad
            .post_json("/mutate-pvc", body.clone())
            .await
            .unwrap()
            .status,
        200
    );
    assert_eq!(
        old_conn
            .post_json("/mutate-pvc", body)
            .await
            .unwrap()
            .status,
        200
    );
}

#[tokio::test]
async fn shutdown_drains_and_stops_accepting() {
    let mut server = TestWebhook::start(&sample_catalog_yaml(), None).await;
    let body = fixtures()
        .into_iter()
        .find(|(n, _)| n == "pvc-create-plain.json")
        .unwrap()
        .1;
    let mut conn = server.connect().await;
    assert_eq!(
        conn.post_json("/mutate-pvc", body).await.unwrap().status,
        200
    );
    let addr = server.addr;
    tokio::time::timeout(Duration::from_secs(10), server.shutdown())
        .await
        .expect("shutdown with an idle keep-alive connection must not hang");
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "still accepting after shutdown"
    );
}

#[tokio::test]
async fn shutdown_lets_in_flight_requests_finish() {
    use std::sync::Arc;
    use vmdisk_support::tls::{server_config, CertPaths, ReloadingCertResolver};
    use vmdisk_tests::certs::{write_secret_dir, TestCa};
    use vmdisk_tests::https::{client_config, Connection};

    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("drain CA");
    write_secret_dir(dir.path(), &ca.issue(&["localhost"]), 1);
    let resolver = ReloadingCertResolver::load(CertPaths::in_dir(dir.path())).unwrap();
    let (started_tx, started_rx) = tokio::sync::oneshot::channel::<()>();
    let started_tx = Arc::new(std::sync::Mutex::new(Some(started_tx)));
    let router = axum::Router::new().route(
        "/slow",
        axum::routing::post(move || {
            let started = started_tx.lock().unwrap().take();
            async move {
                if let Some(tx) = started {
                    let _ = tx.send(());
                }
                tokio::time::sleep(Duration::from_millis(400)).await;
                "finished"
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(vmdisk_support::https::serve_tls(
        listener,
        server_config(resolver),
        router,
        async {
            let _ = stop_rx.await;
        },
        Duration::from_secs(5),
        vmdisk_support::https::DEFAULT_MAX_CONNECTIONS,
    ));
    let mut conn = Connection::open(addr, "localhost", client_config(&ca.cert_pem()))
        .await
        .unwrap();
    let in_flight = tokio::spawn(async move { conn.request("POST", "/slow", None, "").await });
    started_rx.await.unwrap();
    stop_tx.send(()).unwrap();
    let reply = in_flight
        .await
        .unwrap()
        .expect("in-flight request must complete during drain");
    assert_eq!((reply.status, reply.text().as_str()), (200, "finished"));
    tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .unwrap()
        .unwrap();
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}

/// A client that sends its headers and then trickles (here: stops sending) the body gets a 408
/// once the body read time is up, instead of holding the connection and a task forever.
#[tokio::test]
async fn a_body_that_never_arrives_is_answered_408() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let server = TestWebhook::start_configured(&sample_catalog_yaml(), |w| {
        w.body_read_timeout = Duration::from_millis(500);
    })
    .await;
    let tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let ca = server.ca.cert_pem();
    let mut tls = tokio_rustls::TlsConnector::from(vmdisk_tests::https::client_config(&ca))
        .connect(
            rustls::pki_types::ServerName::try_from("localhost").unwrap(),
            tcp,
        )
        .await
        .unwrap();
    // A deliberately incomplete request: 1000 bytes announced, 10 sent.
    tls.write_all(
        b"POST /mutate-pvc HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\ncontent-length: 1000\r\n\r\n{\"apiVersi",
    )
    .await
    .unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), tls.read_to_end(&mut answer))
        .await
        .expect("the server answers and closes")
        .ok();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(
        answer.contains("request body not received within"),
        "{answer}"
    );
}

/// At most `max_connections` connections are served at once: the next one waits (its TLS
/// handshake is not answered) until one closes, then is served as usual.
#[tokio::test]
async fn connections_over_the_limit_wait_for_a_free_slot() {
    use std::sync::Arc;
    use vmdisk_support::tls::{server_config, CertPaths, ReloadingCertResolver};
    use vmdisk_tests::certs::{write_secret_dir, TestCa};
    use vmdisk_tests::https::{client_config, Connection};

    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("limit CA");
    write_secret_dir(dir.path(), &ca.issue(&["localhost"]), 1);
    let resolver = ReloadingCertResolver::load(CertPaths::in_dir(dir.path())).unwrap();
    let router = axum::Router::new().route("/ping", axum::routing::post(|| async { "pong" }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (_stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(vmdisk_support::https::serve_tls(
        listener,
        server_config(resolver),
        router,
        async {
            let _ = stop_rx.await;
        },
        Duration::from_secs(1),
        1,
    ));
    let config: Arc<rustls::ClientConfig> = client_config(&ca.cert_pem());
    let mut first = Connection::open(addr, "localhost", config.clone())
        .await
        .unwrap();
    assert_eq!(
        first
            .request("POST", "/ping", None, "")
            .await
            .unwrap()
            .status,
        200
    );
    let second = tokio::spawn(Connection::open(addr, "localhost", config));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !second.is_finished(),
        "a second connection was served beside the first"
    );
    drop(first);
    let mut second = tokio::time::timeout(Duration::from_secs(10), second)
        .await
        .expect("served once the first closed")
        .unwrap()
        .unwrap();
    assert_eq!(
        second
            .request("POST", "/ping", None, "")
            .await
            .unwrap()
            .status,
        200
    );
}
