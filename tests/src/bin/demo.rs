//! `vmdisk-demo`: vmdisk end to end on this machine, no cluster needed.
//!
//! 1. Starts the admission webhook on 127.0.0.1 over TLS with a freshly generated certificate
//!    and a file-backed catalog, sends it a PVC AdmissionReview captured from a real
//!    kube-apiserver, and prints the JSON patch and the patched PVC.
//! 2. Sends it a Pod that mounts that PVC and prints the node affinity it gains.
//! 3. Starts a real OCI registry, pushes a containerDisk (a qcow2 ext4 disk made here), warms
//!    it into a node cache as raw, and populates a "PVC" file from the cache, twice: the
//!    second fill is a local copy, not a pull.

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

    cache_demo().await
}

async fn cache_demo() -> anyhow::Result<()> {
    use std::sync::Arc;
    use std::time::Instant;
    use vmdisk_cache_agent::populate::{populate, PopulateRequest};
    use vmdisk_cache_agent::store::{Budget, CacheStore};
    use vmdisk_cache_agent::warm::extract::ExtractLimits;
    use vmdisk_cache_agent::warm::Warmer;
    use vmdisk_crds::DiskFormat;
    use vmdisk_registry::pull::{Puller, PullerConfig};
    use vmdisk_tests::disks::{allocated, make_ext4_raw, same_content, to_format};

    println!("\n== vmdisk demo: node cache agent against a local registry ==");
    let registry = vmdisk_tests::registry::TestRegistry::start_plain();
    let work = tempfile::tempdir()?;
    let raw = make_ext4_raw(work.path(), "demo", 256, 48, 1);
    let qcow2 = to_format(&raw, "qcow2", false);
    let (reference, digest) =
        vmdisk_tests::push::push_container_disk(&registry, "containerdisks/demo", "1", &qcow2)
            .await;
    println!("pushed containerDisk {reference} ({digest})");

    let (store, _) = CacheStore::open(&work.path().join("cache"), Budget::Bytes(4 << 30))?;
    let warmer = Warmer::new(
        Arc::new(store),
        Puller::new(PullerConfig::default()),
        ExtractLimits::default(),
    );
    let options = vmdisk_tests::push::options_for(&registry);
    for attempt in ["cold", "warm"] {
        let started = Instant::now();
        let target = work.path().join(format!("pvc-{attempt}.img"));
        let report = populate(
            &warmer,
            PopulateRequest {
                reference: format!("{reference}@{digest}"),
                format: DiskFormat::Raw,
                registry: options.clone(),
                target: target.clone(),
                size: Some(512 << 20),
                owner: None,
                parallel_copies: None,
            },
            Arc::new(|_| {}),
        )
        .await
        .map_err(|e| anyhow::anyhow!(vmdisk_cache_agent::error_chain(&e)))?;
        let entry = warmer
            .store()
            .get(&report.key)
            .expect("the populated entry");
        println!(
            "{attempt}: {} in {:.2}s; cache entry {} ({} MiB virtual, {} MiB allocated); PVC filled by {:?}, {} MiB written, volume {} MiB",
            if report.cache_hit { "cache hit" } else { "pulled, extracted and converted" },
            started.elapsed().as_secs_f64(),
            entry.disk_path.display(),
            report.virtual_size >> 20,
            allocated(&entry.disk_path) >> 20,
            report.method,
            report.bytes_written >> 20,
            report.target_size >> 20,
        );
        let head = work.path().join("head.raw");
        std::fs::write(&head, &std::fs::read(&target)?[..256 << 20])?;
        anyhow::ensure!(
            same_content(&raw, &head),
            "the populated volume differs from the source disk"
        );
    }
    println!("both volumes hold exactly the source disk (qemu-img compare)");
    Ok(())
}
