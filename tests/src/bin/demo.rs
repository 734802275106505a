//! `vmdisk-demo`: vmdisk end to end on this machine, no cluster needed.
//!
//! 1. Starts the admission webhook on 127.0.0.1 over TLS with a freshly generated certificate
//!    and a file-backed catalog, sends it a PVC AdmissionReview captured from a real
//!    kube-apiserver, and prints the JSON patch and the patched PVC.
//! 2. Sends it a Pod that mounts that PVC and prints the node affinity it gains.

use anyhow::Context as _;
use serde_json::Value;
use vmdisk_tests::webhook::{fixtures, sample_catalog_yaml, TestWebhook};
use vmdisk_webhook::admission::decode_patch_field;

fn fixture(name: &str) -> anyhow::Result<Vec<u8>> {
    fixtures()
        .into_iter()
        .find(|(n, _)| n == name)
        .map(|(_, b)| b)
        .with_context(|| format!("fixture {name} missing"))
}

async fn admit(server: &TestWebhook, path: &str, body: Vec<u8>) -> anyhow::Result<Value> {
    let review: Value = serde_json::from_slice(&body)?;
    let mut conn = server.connect().await;
    let reply = conn.post_json(path, body).await?;
    anyhow::ensure!(
        reply.status == 200,
        "webhook answered {}: {}",
        reply.status,
        reply.text()
    );
    let answer = reply.json();
    let response = &answer["response"];
    let mut object = review["request"]["object"].clone();
    if let Some(p) = response.get("patch") {
        let patch = decode_patch_field(p).map_err(anyhow::Error::msg)?;
        println!("JSON patch:\n{}", serde_json::to_string_pretty(&patch)?);
        json_patch::patch(&mut object, &patch)?;
    } else {
        println!("no patch");
    }
    if let Some(w) = response.get("warnings") {
        println!("warnings: {w}");
    }
    Ok(object)
}

fn strip_noise(object: &mut Value) {
    if let Some(m) = object["metadata"].as_object_mut() {
        m.remove("managedFields");
    }
    if let Some(a) = object["metadata"]["annotations"].as_object_mut() {
        a.remove("kubectl.kubernetes.io/last-applied-configuration");
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    println!("== vmdisk demo: admission webhook over TLS on 127.0.0.1 with a file catalog ==");
    let server = TestWebhook::start(&sample_catalog_yaml(), None).await;
    println!(
        "webhook listening on https://{} (catalog: {})\n",
        server.addr,
        server.catalog_dir().display()
    );

    println!("-- PVC `by-annotation` (plain PVC annotated vmdisk.io/image: fedora-40) --");
    let mut pvc = admit(
        &server,
        "/mutate-pvc?timeout=10s",
        fixture("pvc-create-annotation-form.json")?,
    )
    .await?;
    strip_noise(&mut pvc);
    println!("patched PVC:\n{}", serde_yaml::to_string(&pvc)?);

    println!("-- Pod `with-affinity` mounting that PVC --");
    let pod = admit(
        &server,
        "/mutate-pod?timeout=10s",
        fixture("pod-create-existing-affinity-with-pvc.json")?,
    )
    .await?;
    println!(
        "patched pod affinity:\n{}",
        serde_yaml::to_string(&pod["spec"]["affinity"])?
    );
    Ok(())
}
