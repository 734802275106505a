//! `FileCatalog`: VMDiskImages and PVCs from a directory of YAML files, reloaded on change.
//!
//! Each `*.yaml`/`*.yml`/`*.json` file may hold several documents; documents of other kinds are
//! ignored. A directory that fails to load (bad YAML, an image without a name) keeps the
//! previous contents serving and logs why: an edit in progress must not empty the catalog.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use k8s_openapi::api::core::v1::PersistentVolumeClaim;
use serde::Deserialize;
use thiserror::Error;
use vmdisk_crds::VMDiskImage;

use super::{CatalogSnapshot, ImageCatalog};
use crate::mutate::ImageLookup;
use vmdisk_support::dir_watch::DirWatch;

#[derive(Debug, Error)]
pub enum FileCatalogError {
    #[error("cannot read catalog directory {path}")]
    ReadDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read catalog file {path}")]
    ReadFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("catalog file {path}, document {index}: {message}")]
    Parse {
        path: PathBuf,
        index: usize,
        message: String,
    },
    #[error("cannot watch catalog directory {path}")]
    Watch {
        path: PathBuf,
        source: notify::Error,
    },
}

/// Loads every catalog file of `dir` into one snapshot.
pub fn load_dir(dir: &Path) -> Result<CatalogSnapshot, FileCatalogError> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|source| FileCatalogError::ReadDir {
            path: dir.to_path_buf(),
            source,
        })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            matches!(
                p.extension().and_then(|e| e.to_str()),
                Some("yaml" | "yml" | "json")
            ) && p.is_file()
        })
        .collect();
    files.sort();
    let mut snapshot = CatalogSnapshot::default();
    for path in files {
        let text = std::fs::read_to_string(&path).map_err(|source| FileCatalogError::ReadFile {
            path: path.clone(),
            source,
        })?;
        load_documents(&path, &text, &mut snapshot)?;
    }
    Ok(snapshot)
}

fn load_documents(
    path: &Path,
    text: &str,
    snapshot: &mut CatalogSnapshot,
) -> Result<(), FileCatalogError> {
    for (index, document) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let parse_error = |message: String| FileCatalogError::Parse {
            path: path.to_path_buf(),
            index,
            message,
        };
        let value =
            serde_yaml::Value::deserialize(document).map_err(|e| parse_error(e.to_string()))?;
        if value.is_null() {
            continue;
        }
        let kind = value.get("kind").and_then(|k| k.as_str()).unwrap_or("");
        let api_version = value
            .get("apiVersion")
            .and_then(|k| k.as_str())
            .unwrap_or("");
        match (api_version, kind) {
            ("vmdisk.io/v1alpha1", "VMDiskImage") => {
                let image: VMDiskImage =
                    serde_yaml::from_value(value).map_err(|e| parse_error(e.to_string()))?;
                if image.metadata.name.is_none() {
                    return Err(parse_error("VMDiskImage has no metadata.name".into()));
                }
                let mut image = image;
                image
                    .metadata
                    .namespace
                    .get_or_insert_with(|| "default".to_string());
                snapshot.insert_image(image);
            }
            ("v1", "PersistentVolumeClaim") => {
                let mut pvc: PersistentVolumeClaim =
                    serde_yaml::from_value(value).map_err(|e| parse_error(e.to_string()))?;
                if pvc.metadata.name.is_none() {
                    return Err(parse_error(
                        "PersistentVolumeClaim has no metadata.name".into(),
                    ));
                }
                pvc.metadata
                    .namespace
                    .get_or_insert_with(|| "default".to_string());
                snapshot.insert_claim(&pvc);
            }
            _ => {}
        }
    }
    Ok(())
}

/// A catalog backed by a directory, reloaded when files in it change.
pub struct FileCatalog {
    dir: PathBuf,
    snapshot: ArcSwap<CatalogSnapshot>,
    synced: AtomicBool,
}

impl FileCatalog {
    /// Loads the directory once; fails if the first load fails (a typo at start-up should stop
    /// the server, not serve an empty catalog).
    pub fn open(dir: &Path) -> Result<Arc<Self>, FileCatalogError> {
        let snapshot = load_dir(dir)?;
        tracing::info!(
            dir = %dir.display(),
            images = snapshot.image_count(),
            claims = snapshot.claim_count(),
            "catalog loaded"
        );
        Ok(Arc::new(Self {
            dir: dir.to_path_buf(),
            snapshot: ArcSwap::from_pointee(snapshot),
            synced: AtomicBool::new(true),
        }))
    }

    /// Reloads now; on failure the previous contents stay and the error is returned.
    pub fn reload(&self) -> Result<(), FileCatalogError> {
        let snapshot = load_dir(&self.dir)?;
        tracing::info!(
            dir = %self.dir.display(),
            images = snapshot.image_count(),
            claims = snapshot.claim_count(),
            "catalog reloaded"
        );
        self.snapshot.store(Arc::new(snapshot));
        self.synced.store(true, Ordering::Release);
        Ok(())
    }

    pub fn snapshot(&self) -> Arc<CatalogSnapshot> {
        self.snapshot.load_full()
    }

    /// Watches the directory and reloads on change until the returned guard is dropped.
    pub fn watch(self: &Arc<Self>) -> Result<CatalogWatch, FileCatalogError> {
        let me = Arc::clone(self);
        DirWatch::start(&self.dir, move || {
            if let Err(e) = me.reload() {
                tracing::error!(error = %crate::error_chain(&e), "catalog reload failed; keeping the previous contents");
            }
        })
        .map_err(|source| FileCatalogError::Watch {
            path: self.dir.clone(),
            source,
        })
    }
}

/// Keeps a catalog directory watch alive.
pub type CatalogWatch = DirWatch;

impl ImageLookup for FileCatalog {
    fn image(&self, namespace: &str, name: &str) -> Option<Arc<VMDiskImage>> {
        self.snapshot.load().image(namespace, name)
    }
    fn claim_image(&self, namespace: &str, claim: &str) -> Option<String> {
        self.snapshot.load().claim_image(namespace, claim)
    }
}

impl ImageCatalog for FileCatalog {
    fn is_synced(&self) -> bool {
        self.synced.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const IMAGE: &str = r#"
apiVersion: vmdisk.io/v1alpha1
kind: VMDiskImage
metadata: {name: fedora-40, namespace: vms}
spec:
  source: {registry: {url: quay.io/containerdisks/fedora:40}}
status:
  digest: sha256:aaaa
  virtualSize: 5368709120
---
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: root, namespace: vms, annotations: {vmdisk.io/image: fedora-40}}
spec: {}
---
apiVersion: v1
kind: ConfigMap
metadata: {name: ignored}
"#;

    #[test]
    fn loads_images_and_claims_and_ignores_other_kinds() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.yaml"), IMAGE).unwrap();
        std::fs::write(dir.path().join("notes.txt"), "not yaml: [").unwrap();
        let snap = load_dir(dir.path()).unwrap();
        assert_eq!(
            snap.image("vms", "fedora-40").unwrap().digest(),
            Some("sha256:aaaa")
        );
        assert_eq!(
            snap.claim_image("vms", "root").as_deref(),
            Some("fedora-40")
        );
        assert_eq!(snap.image_count(), 1);
    }

    #[test]
    fn bad_file_names_the_file_and_document() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.yaml"), IMAGE).unwrap();
        std::fs::write(
            dir.path().join("b.yaml"),
            "apiVersion: vmdisk.io/v1alpha1\nkind: VMDiskImage\nmetadata: {name: x}\nspec: {source: 5}\n",
        )
        .unwrap();
        let err = load_dir(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("b.yaml") && err.contains("document 0"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn failed_reload_keeps_previous_contents_and_watch_picks_up_changes() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.yaml"), IMAGE).unwrap();
        let catalog = FileCatalog::open(dir.path()).unwrap();
        let _watch = catalog.watch().unwrap();
        std::fs::write(dir.path().join("a.yaml"), "kind: [unclosed").unwrap();
        assert!(catalog.reload().is_err());
        assert!(catalog.image("vms", "fedora-40").is_some());

        std::fs::write(
            dir.path().join("a.yaml"),
            IMAGE.replace("fedora-40", "fedora-41"),
        )
        .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while catalog.image("vms", "fedora-41").is_none() {
            assert!(
                std::time::Instant::now() < deadline,
                "watch never reloaded the catalog"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(catalog.image("vms", "fedora-40").is_none());
    }
}
