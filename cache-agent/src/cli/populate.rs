//! `vmdisk-cache-agent populate`, what a populator pod runs: fill one volume from the cache
//! (warming the entry first when cold), keep the prime PVC's `vmdisk.io/progress` current,
//! and leave the outcome in one line for the pod's termination message. Exit status 2 (in
//! `main`) when retrying cannot help.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use vmdisk_crds::{parse_quantity, DiskFormat};

use super::setup::{namespaced, open_store, registry_options, warmer, OpenAs};
use super::{CacheArgs, RegistryArgs};
use crate::populate::mounted::MountedRequest;
use crate::populate::{populate, PopulateProgress, PopulateRequest};

/// What populate's `--progress-pvc` asks of the API server (as the populator pods'
/// `vmdisk-populator` ServiceAccount; their pull credentials are a mounted Secret).
pub const POPULATOR_API_ACCESS: &[vmdisk_crds::ApiAccess] = &[vmdisk_crds::ApiAccess::new(
    "",
    "persistentvolumeclaims",
    &["patch"],
    vmdisk_crds::AccessScope::InstallNamespace,
)];

/// `populate`, then the termination log.
pub(super) async fn execute(
    args: PopulateArgs,
    termination_log: Option<PathBuf>,
) -> anyhow::Result<()> {
    let result = run_populate(args).await;
    if let Some(path) = termination_log {
        let line = match &result {
            Ok(summary) => summary.clone(),
            Err(e) => format!("{e:#}"),
        };
        if let Err(e) = std::fs::write(&path, line) {
            tracing::warn!(path = %path.display(), error = %e, "cannot write the termination log");
        }
    }
    println!("{}", result?);
    Ok(())
}

/// The `populate` flags other than `--termination-log`.
pub(super) struct PopulateArgs {
    pub(super) image: String,
    pub(super) source_dir: Option<PathBuf>,
    pub(super) cache: CacheArgs,
    pub(super) format: DiskFormat,
    pub(super) target: PathBuf,
    pub(super) size: Option<String>,
    pub(super) owner: Option<(u32, u32)>,
    pub(super) progress_pvc: Option<String>,
    pub(super) parallel_copies: Option<usize>,
    pub(super) registry: RegistryArgs,
}

/// `populate`; the one-line summary on success. A [`crate::populate::PopulateError`] stays
/// inside the anyhow error, so `main` can tell permanent failures by their type.
async fn run_populate(args: PopulateArgs) -> anyhow::Result<String> {
    let size = args
        .size
        .as_deref()
        .map(|s| parse_quantity(s).map_err(|e| anyhow::anyhow!("--size: {e}")))
        .transpose()?;
    if let Some(source_dir) = &args.source_dir {
        return populate_from_mounted(&args, source_dir, size).await;
    }
    let store = open_store(&args.cache, OpenAs::Guest)?;
    // A warm entry is served to a requester the registry confirmed (see `warm::authorize`),
    // so the credentials are read even then; only NeverVerify serves it without them.
    let cached = crate::warm::pinned_digest(&args.image).is_some_and(|digest| {
        store
            .get_or_adopt(&crate::store::EntryKey {
                digest: digest.to_string(),
                format: args.format,
            })
            .is_some()
    });
    let never_verify =
        args.cache.verification() == crate::warm::authorize::VerifyPolicy::NeverVerify;
    let options = registry_options(&args.image, &args.registry, !(cached && never_verify)).await?;
    let warmer = warmer(&args.cache, store)?;
    let percent = Arc::new(std::sync::atomic::AtomicU8::new(0));
    let reporter = args
        .progress_pvc
        .clone()
        .map(|pvc| tokio::spawn(report_progress(pvc, Arc::clone(&percent))));
    let progress = {
        let percent = Arc::clone(&percent);
        Arc::new(move |p: PopulateProgress| {
            percent.fetch_max(p.percent(), std::sync::atomic::Ordering::Relaxed);
        })
    };
    let result = populate(
        &warmer,
        PopulateRequest {
            reference: args.image.clone(),
            format: args.format,
            registry: options,
            target: args.target.clone(),
            size,
            owner: args.owner,
            parallel_copies: args.parallel_copies,
        },
        progress,
    )
    .await;
    if let Some(task) = reporter {
        task.abort();
    }
    let report = result?;
    let summary = format!(
        "populated {} from {} ({:?}, {} bytes written, {} bytes, {})",
        args.target.display(),
        report.key.digest,
        report.method,
        report.bytes_written,
        report.target_size,
        if report.cache_hit {
            "warm: cache hit"
        } else {
            "cold: pulled"
        }
    );
    // The volume holds the disk, synced: the populator may hand it over now rather than when
    // the kubelet reports this pod's end (up to a second or more later).
    if let Some(pvc) = &args.progress_pvc {
        report_populated(pvc, &summary).await;
    }
    Ok(summary)
}

/// `populate --source-dir`: the disk of the image the node's runtime mounted, converted onto
/// the target.
async fn populate_from_mounted(
    args: &PopulateArgs,
    source_dir: &std::path::Path,
    size: Option<u64>,
) -> anyhow::Result<String> {
    let percent = Arc::new(std::sync::atomic::AtomicU8::new(10));
    let reporter = args
        .progress_pvc
        .clone()
        .map(|pvc| tokio::spawn(report_progress(pvc, Arc::clone(&percent))));
    let result = crate::populate::mounted::populate_from_mounted(&MountedRequest {
        source_dir: source_dir.to_path_buf(),
        format: args.format,
        target: args.target.clone(),
        size,
        owner: args.owner,
    })
    .await;
    if let Some(task) = reporter {
        task.abort();
    }
    let report = result.map_err(crate::populate::PopulateError::Mounted)?;
    let summary = format!(
        "populated {} from {} ({} {}, {} bytes, node: image volume {})",
        args.target.display(),
        args.image,
        report.source_format,
        report.disk.display(),
        report.target_size,
        source_dir.display(),
    );
    if let Some(pvc) = &args.progress_pvc {
        report_populated(pvc, &summary).await;
    }
    Ok(summary)
}

/// Writes [`vmdisk_crds::POPULATED_ANNOTATION`] on the prime PVC. Best effort: without it the
/// populator goes by the pod's end, as it always can.
async fn report_populated(pvc: &str, summary: &str) {
    let written = async {
        let (namespace, name) = namespaced(pvc, "--progress-pvc")?;
        let api: kube::Api<k8s_openapi::api::core::v1::PersistentVolumeClaim> =
            kube::Api::namespaced(kube::Client::try_default().await?, &namespace);
        let patch = serde_json::json!({"metadata": {"annotations": {
            vmdisk_crds::PROGRESS_ANNOTATION: "100%",
            vmdisk_crds::POPULATED_ANNOTATION: summary}}});
        api.patch(&name, &Default::default(), &kube::api::Patch::Merge(&patch))
            .await?;
        anyhow::Ok(())
    };
    match tokio::time::timeout(Duration::from_secs(5), written).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, "the populated volume was not reported"),
        Err(_) => tracing::warn!("the populated volume was not reported within 5 s"),
    }
}

/// Keeps `vmdisk.io/progress` on a PVC in step with `percent` until aborted.
async fn report_progress(pvc: String, percent: Arc<std::sync::atomic::AtomicU8>) {
    let Ok((namespace, name)) = namespaced(&pvc, "--progress-pvc") else {
        return;
    };
    let client = match kube::Client::try_default().await {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %e, "cannot report progress");
            return;
        }
    };
    let api: kube::Api<k8s_openapi::api::core::v1::PersistentVolumeClaim> =
        kube::Api::namespaced(client, &namespace);
    let mut last = None;
    loop {
        let now = percent.load(std::sync::atomic::Ordering::Relaxed);
        if last != Some(now) {
            let patch = serde_json::json!({"metadata": {"annotations": {
                vmdisk_crds::PROGRESS_ANNOTATION: format!("{now}%")}}});
            match api
                .patch(&name, &Default::default(), &kube::api::Patch::Merge(&patch))
                .await
            {
                Ok(_) => last = Some(now),
                Err(e) => tracing::debug!(error = %e, "progress not reported"),
            }
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}
