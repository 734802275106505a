//! Pull credentials for the agents, without letting them read Secrets cluster-wide.
//!
//! A VMDiskImage names a `kubernetes.io/dockerconfigjson` Secret in its own namespace. Agents
//! must not read Secrets there (with a node's token one could read every Secret of the
//! cluster). Instead the image controller, which reads the named Secret anyway to resolve the
//! tag, copies *only the entry for the image's registry host* into `pull-<image uid>` in the
//! `vmdisk-credentials` namespace, which holds nothing but such copies; agents may read Secrets
//! there and nowhere else. Copies are refreshed when the image is resolved and every
//! [`REFRESH`] (credential rotation reaches the nodes within that), and deleted once their
//! image is gone ([`orphaned_copies`]).
//!
//! Populator pods read no Secret either: each gets its own copy next to it
//! ([`CredentialsCopier::write_pod_copy`]), mounted as a volume, so only the kubelet of the node
//! the pod runs on can read it, and it goes with the population.
//!
//! [`copy_is_current`] and [`orphaned_copies`] are the pure decisions; [`CredentialsCopier`]
//! does the I/O.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use k8s_openapi::ByteString;
use kube::api::{DeleteParams, ObjectMeta, Patch, PatchParams};
use kube::{Api, Client, ResourceExt};
use vmdisk_crds::{
    credentials_secret_name, AccessScope, ApiAccess, ImageReference, VMDiskImage,
    CREDENTIALS_SOURCE_ANNOTATION, CREDENTIALS_SYNCED_ANNOTATION, IMAGE_UID_LABEL, MANAGED_BY,
    MANAGED_BY_LABEL,
};
use vmdisk_registry::DockerConfig;

/// What the copier asks of the API server.
pub const API_ACCESS: &[ApiAccess] = &[
    // The pull secret a VMDiskImage names, in the image's namespace.
    ApiAccess::new("", "secrets", &["get"], AccessScope::Cluster),
    // The copies: written (server-side apply creates or updates), watched, garbage-collected.
    ApiAccess::new(
        "",
        "secrets",
        &["create", "patch", "delete", "list", "watch"],
        AccessScope::CredentialsNamespace,
    ),
    // Each populator pod's own copy, next to the pod (garbage-collected with its prime PVC).
    ApiAccess::new(
        "",
        "secrets",
        &["create", "patch"],
        AccessScope::InstallNamespace,
    ),
];

/// How often a copy is refreshed from its source even when nothing else happens.
pub const REFRESH: Duration = Duration::from_secs(300);

const FIELD_MANAGER: &str = "vmdisk-image-controller";
pub const DOCKER_CONFIG_KEY: &str = ".dockerconfigjson";

/// True when `copy` already holds `wanted` and was refreshed less than [`REFRESH`] ago.
pub fn copy_is_current(copy: Option<&Secret>, wanted: &[u8], now: DateTime<Utc>) -> bool {
    let Some(copy) = copy else { return false };
    let same = copy
        .data
        .as_ref()
        .and_then(|d| d.get(DOCKER_CONFIG_KEY))
        .is_some_and(|b| b.0 == wanted);
    let fresh = copy
        .annotations()
        .get(CREDENTIALS_SYNCED_ANNOTATION)
        .and_then(|t| crate::time::parse_rfc3339(t))
        .is_some_and(|t| now - t < chrono::Duration::from_std(REFRESH).unwrap_or_default());
    same && fresh
}

/// True when the copy for `image` needs a look at its source now: missing, or stale.
pub fn needs_refresh(copy: Option<&Secret>, now: DateTime<Utc>) -> bool {
    match copy {
        None => true,
        Some(c) => match c
            .annotations()
            .get(CREDENTIALS_SYNCED_ANNOTATION)
            .and_then(|t| crate::time::parse_rfc3339(t))
        {
            Some(t) => now - t >= chrono::Duration::from_std(REFRESH).unwrap_or_default(),
            None => true,
        },
    }
}

/// Copies whose image no longer exists or no longer names a pull secret.
pub fn orphaned_copies(copies: &[Arc<Secret>], images: &[Arc<VMDiskImage>]) -> Vec<String> {
    let wanted: HashSet<&str> = images
        .iter()
        .filter(|i| i.spec.source.registry.pull_secret_ref.is_some())
        .filter_map(|i| i.metadata.uid.as_deref())
        .collect();
    let mut out: Vec<String> = copies
        .iter()
        .filter(|c| {
            c.labels()
                .get(IMAGE_UID_LABEL)
                .is_none_or(|uid| !wanted.contains(uid.as_str()))
        })
        .map(|c| c.name_any())
        .collect();
    out.sort();
    out
}

/// Reads pull secrets and writes the copies.
#[derive(Clone)]
pub struct CredentialsCopier {
    client: Client,
    namespace: String,
}

impl CredentialsCopier {
    pub fn new(client: Client, credentials_namespace: &str) -> Self {
        Self {
            client,
            namespace: credentials_namespace.to_string(),
        }
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The credentials `image`'s pull secret holds for its registry host; `None` when it names
    /// no pull secret. Errors are messages for the image's status and Events.
    pub async fn read_source(&self, image: &VMDiskImage) -> Result<Option<DockerConfig>, String> {
        let Some(secret_ref) = &image.spec.source.registry.pull_secret_ref else {
            return Ok(None);
        };
        let namespace = image.namespace().unwrap_or_default();
        let secrets: Api<Secret> = Api::namespaced(self.client.clone(), &namespace);
        let secret = secrets
            .get_opt(&secret_ref.name)
            .await
            .map_err(|e| format!("reading pull secret {namespace}/{}: {e}", secret_ref.name))?
            .ok_or_else(|| format!("pull secret {namespace}/{} not found", secret_ref.name))?;
        let config = DockerConfig::from_secret_data(&secret.data.unwrap_or_default())
            .map_err(|e| format!("pull secret {namespace}/{}: {e}", secret_ref.name))?;
        let host = ImageReference::parse(&image.spec.source.registry.url)
            .map(|r| r.registry)
            .map_err(|e| e.to_string())?;
        Ok(Some(config.restricted_to(&host)))
    }

    /// Writes the copy for `image` unless `current` already holds `config` and is fresh.
    pub async fn write_copy(
        &self,
        image: &VMDiskImage,
        config: &DockerConfig,
        current: Option<&Secret>,
        now: DateTime<Utc>,
    ) -> Result<(), String> {
        let uid = image.uid().ok_or("the image has no uid yet")?;
        let data = config.to_json();
        if copy_is_current(current, &data, now) {
            return Ok(());
        }
        let name = credentials_secret_name(&uid);
        let source = format!(
            "{}/{} from Secret {}",
            image.namespace().unwrap_or_default(),
            image.name_any(),
            image
                .spec
                .source
                .registry
                .pull_secret_ref
                .as_ref()
                .map(|s| s.name.as_str())
                .unwrap_or_default()
        );
        let metadata = ObjectMeta {
            name: Some(name.clone()),
            namespace: Some(self.namespace.clone()),
            labels: Some(BTreeMap::from([
                (MANAGED_BY_LABEL.to_string(), MANAGED_BY.to_string()),
                (IMAGE_UID_LABEL.to_string(), uid.clone()),
            ])),
            annotations: Some(BTreeMap::from([
                (CREDENTIALS_SOURCE_ANNOTATION.to_string(), source),
                (
                    CREDENTIALS_SYNCED_ANNOTATION.to_string(),
                    now.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                ),
            ])),
            ..Default::default()
        };
        self.apply(metadata, data)
            .await
            .map_err(|e| format!("writing credentials copy {}/{name}: {e}", self.namespace))
    }

    /// Writes `image`'s credentials for one populator pod: Secret `name` in `namespace` (the
    /// pod's), owned by `owner` (the pod's prime PVC, so it goes when the population ends). The
    /// pod mounts it, the kubelet of the pod's node reads it (the node authorizer allows a
    /// node the Secrets its pods use), and the populator's ServiceAccount reads no Secret.
    pub async fn write_pod_copy(
        &self,
        image: &VMDiskImage,
        namespace: &str,
        name: &str,
        owner: OwnerReference,
    ) -> Result<(), String> {
        let config = self
            .read_source(image)
            .await?
            .ok_or("the image names no pull secret")?;
        let metadata = ObjectMeta {
            name: Some(name.to_string()),
            namespace: Some(namespace.to_string()),
            labels: Some(BTreeMap::from([(
                MANAGED_BY_LABEL.to_string(),
                MANAGED_BY.to_string(),
            )])),
            owner_references: Some(vec![owner]),
            ..Default::default()
        };
        self.apply(metadata, config.to_json())
            .await
            .map_err(|e| format!("writing the populator pod's credentials {namespace}/{name}: {e}"))
    }

    /// Creates or updates (server-side apply) a `kubernetes.io/dockerconfigjson` Secret.
    async fn apply(&self, metadata: ObjectMeta, data: Vec<u8>) -> Result<(), kube::Error> {
        let namespace = metadata.namespace.clone().unwrap_or_default();
        let name = metadata.name.clone().unwrap_or_default();
        let secret = Secret {
            metadata,
            type_: Some("kubernetes.io/dockerconfigjson".into()),
            data: Some(BTreeMap::from([(
                DOCKER_CONFIG_KEY.to_string(),
                ByteString(data),
            )])),
            ..Default::default()
        };
        let mut value = serde_json::to_value(&secret).map_err(kube::Error::SerdeError)?;
        value["apiVersion"] = "v1".into();
        value["kind"] = "Secret".into();
        Api::<Secret>::namespaced(self.client.clone(), &namespace)
            .patch(
                &name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&value),
            )
            .await?;
        Ok(())
    }

    pub async fn delete(&self, name: &str) -> Result<(), kube::Error> {
        match Api::<Secret>::namespaced(self.client.clone(), &self.namespace)
            .delete(name, &DeleteParams::default())
            .await
        {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn copy(uid: &str, data: &[u8], synced: DateTime<Utc>) -> Secret {
        Secret {
            metadata: ObjectMeta {
                name: Some(credentials_secret_name(uid)),
                labels: Some(BTreeMap::from([(IMAGE_UID_LABEL.into(), uid.into())])),
                annotations: Some(BTreeMap::from([(
                    CREDENTIALS_SYNCED_ANNOTATION.into(),
                    synced.to_rfc3339(),
                )])),
                ..Default::default()
            },
            data: Some(BTreeMap::from([(
                DOCKER_CONFIG_KEY.into(),
                ByteString(data.to_vec()),
            )])),
            ..Default::default()
        }
    }

    fn image(uid: &str, with_secret: bool) -> Arc<VMDiskImage> {
        let mut i: VMDiskImage = serde_json::from_value(serde_json::json!({
            "apiVersion": "vmdisk.io/v1alpha1", "kind": "VMDiskImage",
            "metadata": {"name": "i", "namespace": "vms", "uid": uid},
            "spec": {"source": {"registry": {"url": "r.io/a/b:1"}}},
        }))
        .unwrap();
        if with_secret {
            i.spec.source.registry.pull_secret_ref = Some(vmdisk_crds::SecretRef {
                name: "creds".into(),
            });
        }
        Arc::new(i)
    }

    #[test]
    fn a_copy_is_current_only_with_the_same_data_and_recently_synced() {
        let now = Utc::now();
        assert!(!copy_is_current(None, b"x", now));
        let fresh = copy("u", b"x", now - chrono::Duration::seconds(10));
        assert!(copy_is_current(Some(&fresh), b"x", now));
        assert!(
            !copy_is_current(Some(&fresh), b"y", now),
            "rotated credentials"
        );
        let stale = copy("u", b"x", now - chrono::Duration::seconds(301));
        assert!(!copy_is_current(Some(&stale), b"x", now));
        assert!(needs_refresh(None, now));
        assert!(!needs_refresh(Some(&fresh), now));
        assert!(needs_refresh(Some(&stale), now));
    }

    #[test]
    fn copies_of_deleted_images_or_dropped_secrets_are_orphans() {
        let now = Utc::now();
        let copies: Vec<Arc<Secret>> = ["a", "b", "c"]
            .iter()
            .map(|u| Arc::new(copy(u, b"x", now)))
            .collect();
        let images = vec![image("a", true), image("b", false)];
        assert_eq!(orphaned_copies(&copies, &images), vec!["pull-b", "pull-c"]);
        assert!(orphaned_copies(&copies[..1], &images).is_empty());
    }
}
