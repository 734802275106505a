//! Pure admission decisions: given an object's parts (k8s-openapi types) and what the catalog
//! knows, what changes, as a plan and then a `json_patch::Patch`.
//!
//! Nothing here does I/O or decodes requests (the admission module does), so every rule
//! is tested with plain values.

pub mod patch;
pub mod pod;
pub mod pvc;

use std::cell::RefCell;
use std::sync::Arc;

use vmdisk_crds::VMDiskImage;

/// What the mutations need to know about the cluster.
pub trait ImageLookup {
    /// The VMDiskImage `namespace/name`, if known.
    fn image(&self, namespace: &str, name: &str) -> Option<Arc<VMDiskImage>>;
    /// The image a VMDiskImage-backed PVC `namespace/claim` was filled from, if known.
    fn claim_image(&self, namespace: &str, claim: &str) -> Option<String>;
}

/// A lookup that remembers the claims it was asked about and did not know.
///
/// A pod is often created right after its PVC, before the catalog's watch has delivered the
/// PVC: the caller asks the API server about the claims recorded here and decides again.
pub struct ClaimMisses<'a> {
    inner: &'a dyn ImageLookup,
    missed: RefCell<Vec<(String, String)>>,
}

impl<'a> ClaimMisses<'a> {
    pub fn new(inner: &'a dyn ImageLookup) -> Self {
        Self {
            inner,
            missed: RefCell::new(Vec::new()),
        }
    }

    /// The `(namespace, claim)` pairs asked about and not known, each once, in asking order.
    pub fn into_missed(self) -> Vec<(String, String)> {
        self.missed.into_inner()
    }
}

impl ImageLookup for ClaimMisses<'_> {
    fn image(&self, namespace: &str, name: &str) -> Option<Arc<VMDiskImage>> {
        self.inner.image(namespace, name)
    }

    fn claim_image(&self, namespace: &str, claim: &str) -> Option<String> {
        let found = self.inner.claim_image(namespace, claim);
        if found.is_none() {
            let mut missed = self.missed.borrow_mut();
            if !missed.iter().any(|(n, c)| n == namespace && c == claim) {
                missed.push((namespace.to_string(), claim.to_string()));
            }
        }
        found
    }
}

/// Knobs of the mutations, from the command line.
#[derive(Debug, Clone)]
pub struct MutationConfig {
    /// Share of a Filesystem-mode volume the filesystem itself takes (0.0–0.5): a disk of
    /// virtual size V needs a volume of V × (1 + overhead), as in CDI (default 6%, CDI's).
    /// The populator sizes `disk.img` with the same rule (`vmdisk_crds::sizing`).
    pub filesystem_overhead: f64,
    /// Weight (1–100) of the preferred node affinity term toward warm nodes.
    pub affinity_weight: i32,
    /// Access modes given to PVCs when neither the PVC nor the image names any.
    pub default_access_modes: Vec<String>,
}

impl Default for MutationConfig {
    fn default() -> Self {
        Self {
            filesystem_overhead: vmdisk_crds::DEFAULT_FILESYSTEM_OVERHEAD,
            affinity_weight: 80,
            default_access_modes: vec!["ReadWriteOnce".to_string()],
        }
    }
}

/// The outcome of a mutation decision: the JSON patch (if anything changes) and warnings for
/// the user (AdmissionResponse `warnings`: vmdisk never denies).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Mutation {
    pub patch: Option<json_patch::Patch>,
    pub warnings: Vec<String>,
}

#[cfg(test)]
pub(crate) mod tests_support {
    use std::collections::HashMap;
    use std::sync::Arc;

    use vmdisk_crds::{
        CachePolicy, DiskFormat, ImageSource, RegistrySource, VMDiskImage, VMDiskImageSpec,
        VMDiskImageStatus,
    };

    use super::ImageLookup;

    pub fn image(
        name: &str,
        digest: Option<&str>,
        virtual_size: Option<u64>,
        storage_class: Option<&str>,
    ) -> VMDiskImage {
        let mut img = VMDiskImage::new(
            name,
            VMDiskImageSpec {
                source: ImageSource {
                    registry: RegistrySource {
                        url: format!("quay.io/containerdisks/{name}:latest"),
                        pull_secret_ref: None,
                        ca_bundle: None,
                        insecure: None,
                        pull_method: None,
                    },
                },
                format: DiskFormat::Raw,
                size: None,
                storage_class_name: storage_class.map(str::to_string),
                access_modes: None,
                cache: CachePolicy::default(),
                poll_interval: None,
            },
        );
        img.metadata.namespace = Some("vms".into());
        img.status = Some(VMDiskImageStatus {
            digest: digest.map(str::to_string),
            virtual_size,
            ..Default::default()
        });
        img
    }

    #[derive(Default)]
    pub struct Images {
        pub images: HashMap<(String, String), Arc<VMDiskImage>>,
        pub claims: HashMap<(String, String), String>,
    }

    impl Images {
        pub fn with(image: VMDiskImage) -> Self {
            let mut me = Self::default();
            me.images.insert(
                ("vms".into(), image.metadata.name.clone().unwrap()),
                Arc::new(image),
            );
            me
        }
    }

    impl ImageLookup for Images {
        fn image(&self, namespace: &str, name: &str) -> Option<Arc<VMDiskImage>> {
            self.images
                .get(&(namespace.to_string(), name.to_string()))
                .cloned()
        }
        fn claim_image(&self, namespace: &str, claim: &str) -> Option<String> {
            self.claims
                .get(&(namespace.to_string(), claim.to_string()))
                .cloned()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::tests_support::{image, Images};
    use super::*;

    #[test]
    fn claim_misses_records_each_unknown_claim_once_and_passes_answers_through() {
        let mut images = Images::with(image("fedora", Some("sha256:aa"), None, None));
        images
            .claims
            .insert(("vms".into(), "root".into()), "fedora".into());
        let lookup = ClaimMisses::new(&images);
        assert_eq!(lookup.claim_image("vms", "root").as_deref(), Some("fedora"));
        assert_eq!(lookup.claim_image("vms", "data"), None);
        assert_eq!(lookup.claim_image("vms", "data"), None);
        assert_eq!(lookup.claim_image("other", "root"), None);
        assert!(lookup.image("vms", "fedora").is_some());
        assert!(lookup.image("vms", "nope").is_none());
        assert_eq!(
            lookup.into_missed(),
            [
                ("vms".to_string(), "data".to_string()),
                ("other".to_string(), "root".to_string())
            ]
        );
    }
}
