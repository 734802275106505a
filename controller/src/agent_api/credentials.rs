//! `GET /v1/credentials/<namespace>/<image>`: the pull credentials of one VMDiskImage, for the
//! cache agent of a node that prefetches it, and for nobody else.
//!
//! The caller's node comes from its token ([`super::identity`]); the node's labels and the
//! image come from the API server at the time of the request; [`may_fetch`] decides. The
//! answer is the image controller's copy (only the entry for the image's registry host), as
//! the `.dockerconfigjson` bytes. A node whose agent is taken over learns the credentials of
//! the images its node prefetches, which it pulls anyway, and no others.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Node, Secret};
use kube::{Api, ResourceExt};
use thiserror::Error;
use vmdisk_crds::{credentials_secret_name, VMDiskImage};

use super::AgentApi;
use crate::credentials::DOCKER_CONFIG_KEY;
use vmdisk_cache_agent::identity::AgentIdentity;

/// Why a node may not have an image's credentials.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum Refusal {
    #[error("VMDiskImage {image} names no pull secret: it is pulled without credentials")]
    NoPullSecret { image: String },
    #[error("node {node} does not prefetch VMDiskImage {image} (its cache policy does not select the node, or the node's runtime pulls it): its agent gets no credentials for it")]
    NotThisNodes { node: String, image: String },
}

/// Whether the agent of `node` (with `node_labels`) may have `image`'s credentials: only if
/// its agent would prefetch the image, the same rule the agents' plan follows.
pub fn may_fetch(
    image: &VMDiskImage,
    node: &str,
    node_labels: &BTreeMap<String, String>,
) -> Result<String, Refusal> {
    let name = format!(
        "{}/{}",
        image.namespace().unwrap_or_default(),
        image.name_any()
    );
    if image.spec.source.registry.pull_secret_ref.is_none() {
        return Err(Refusal::NoPullSecret { image: name });
    }
    if !image.prefetched_on(node_labels) {
        return Err(Refusal::NotThisNodes {
            node: node.to_string(),
            image: name,
        });
    }
    Ok(credentials_secret_name(
        image.metadata.uid.as_deref().unwrap_or_default(),
    ))
}

/// What the handler answers: a status and a body.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub body: Vec<u8>,
    /// For the log and the metric: granted, unauthenticated, forbidden, not_found, unavailable.
    pub outcome: &'static str,
}

impl Answer {
    fn text(status: u16, outcome: &'static str, message: String) -> Self {
        Self {
            status,
            body: message.into_bytes(),
            outcome,
        }
    }
}

/// Carries out one request of an identified agent.
pub async fn answer(api: &AgentApi, agent: &AgentIdentity, namespace: &str, name: &str) -> Answer {
    let unavailable = |what: &str, e: kube::Error| {
        Answer::text(503, "unavailable", format!("reading {what}: {e}"))
    };
    let node = match Api::<Node>::all(api.client.clone())
        .get_opt(&agent.node)
        .await
    {
        Ok(Some(node)) => node,
        Ok(None) => {
            return Answer::text(
                403,
                "forbidden",
                format!("node {} of the caller's pod does not exist", agent.node),
            )
        }
        Err(e) => return unavailable(&format!("node {}", agent.node), e),
    };
    let image = match Api::<VMDiskImage>::namespaced(api.client.clone(), namespace)
        .get_opt(name)
        .await
    {
        Ok(Some(image)) => image,
        Ok(None) => {
            return Answer::text(
                404,
                "not_found",
                format!("no VMDiskImage {namespace}/{name}"),
            )
        }
        Err(e) => return unavailable(&format!("VMDiskImage {namespace}/{name}"), e),
    };
    let copy = match may_fetch(&image, &agent.node, node.labels()) {
        Ok(copy) => copy,
        Err(refusal) => return Answer::text(403, "forbidden", refusal.to_string()),
    };
    let secret = match Api::<Secret>::namespaced(api.client.clone(), &api.credentials_namespace)
        .get_opt(&copy)
        .await
    {
        Ok(Some(secret)) => secret,
        Ok(None) => {
            return Answer::text(
                404,
                "not_found",
                format!(
                    "the credentials of VMDiskImage {namespace}/{name} are not copied yet (the image controller copies them when it resolves the image)"
                ),
            )
        }
        Err(e) => return unavailable(&format!("{}/{copy}", api.credentials_namespace), e),
    };
    match secret.data.unwrap_or_default().remove(DOCKER_CONFIG_KEY) {
        Some(bytes) => Answer {
            status: 200,
            body: bytes.0,
            outcome: "granted",
        },
        None => Answer::text(
            503,
            "unavailable",
            format!(
                "{}/{copy} holds no {DOCKER_CONFIG_KEY}",
                api.credentials_namespace
            ),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmdisk_crds::{PullMethod, SecretRef};

    fn image(selector: Option<&[(&str, &str)]>, secret: bool) -> VMDiskImage {
        let mut image: VMDiskImage = serde_json::from_value(serde_json::json!({
            "apiVersion": "vmdisk.io/v1alpha1", "kind": "VMDiskImage",
            "metadata": {"name": "golden", "namespace": "team-a", "uid": "u-1"},
            "spec": {"source": {"registry": {"url": "r.example/a/golden:1"}}}
        }))
        .unwrap();
        image.spec.cache.node_selector = selector.map(|s| {
            s.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        });
        if secret {
            image.spec.source.registry.pull_secret_ref = Some(SecretRef {
                name: "pull".into(),
            });
        }
        image
    }

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn a_node_gets_the_credentials_of_what_it_prefetches_only() {
        let gpu = image(Some(&[("pool", "gpu")]), true);
        assert_eq!(
            may_fetch(&gpu, "n1", &labels(&[("pool", "gpu")])),
            Ok("pull-u-1".to_string())
        );
        let e = may_fetch(&gpu, "n2", &labels(&[("pool", "cpu")])).unwrap_err();
        assert_eq!(
            e,
            Refusal::NotThisNodes {
                node: "n2".into(),
                image: "team-a/golden".into()
            }
        );
        assert!(e
            .to_string()
            .contains("node n2 does not prefetch VMDiskImage team-a/golden"));
        // Prefetch off: no node prefetches it, so no agent needs its credentials.
        let mut off = image(None, true);
        off.spec.cache.prefetch = false;
        assert!(may_fetch(&off, "n1", &labels(&[])).is_err());
        // The node's runtime pulls it: agents do not.
        let mut node_pulled = image(None, true);
        node_pulled.spec.source.registry.pull_method = Some(PullMethod::Node);
        assert!(may_fetch(&node_pulled, "n1", &labels(&[])).is_err());
        // Anonymous images have nothing to hand out.
        assert_eq!(
            may_fetch(&image(None, false), "n1", &labels(&[])),
            Err(Refusal::NoPullSecret {
                image: "team-a/golden".into()
            })
        );
    }
}
