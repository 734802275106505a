//! Pull credentials reach a node only if its node prefetches the image: agents read no Secret,
//! and the controller's agent API answers by the node the API server vouches for (TokenReview
//! of the agent pod's token), on the real API with the shipped ServiceAccounts.

use std::sync::Arc;

use k8s_openapi::api::core::v1::Secret;
use kube::api::PostParams;
use kube::{Api, ResourceExt};
use serde_json::json;
use vmdisk_cache_agent::node::{CredentialsError, CredentialsSource};
use vmdisk_crds::{
    credentials_secret_name, VMDiskImage, AGENT_API_AUDIENCE, CREDENTIALS_NAMESPACE,
    INSTALL_NAMESPACE,
};
use vmdisk_tests::disks::make_ext4_raw;
use vmdisk_tests::push::push_container_disk;
use vmdisk_tests::registry::TestRegistry;

use crate::api::agent_client;
use crate::local::LocalInstall;
use crate::support::{api_error, create_image, pull_secret, service_account_token_for, wait_for};
use crate::Case;

const WAIT: std::time::Duration = std::time::Duration::from_secs(120);

/// Asks the agent API for `namespace/name` as the agent's own client does, showing `token`.
async fn ask(
    fx: &LocalInstall,
    token: &str,
    namespace: &str,
    name: &str,
) -> Result<vmdisk_registry::DockerConfig, CredentialsError> {
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, token).unwrap();
    CredentialsSource {
        url: Some(fx.agent_api_url.clone()),
        ca_file: fx.agent_api_ca.clone(),
        token_file,
    }
    .fetch(&fx.admin, namespace, name)
    .await
}

fn refused(result: Result<vmdisk_registry::DockerConfig, CredentialsError>) -> (u16, String) {
    match result {
        Err(CredentialsError::Refused {
            status, message, ..
        }) => (status, message),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

pub async fn agents_read_no_secret_and_get_only_their_nodes_credentials(
    fx: Arc<LocalInstall>,
    case: Case,
) {
    let ns = case.namespace("e2e-creds").await;
    let admin = case.admin().clone();
    let fakes = fx.fake_nodes();
    let (own, other) = (fakes[0].clone(), fakes[1].clone());

    // A private image prefetched on `own` only.
    let registry = TestRegistry::start_tls_htpasswd("cred", "entials");
    let work = tempfile::tempdir().unwrap();
    let raw = make_ext4_raw(work.path(), "creds", 8, 1, 4004);
    let (reference, _) = push_container_disk(&registry, "disks/creds", "v1", &raw).await;
    pull_secret(&admin, &ns, &registry.addr, "cred", "entials").await;
    create_image(
        &admin,
        &ns,
        "private",
        json!({"source": {"registry": {"url": reference, "pullSecretRef": {"name": "registry-credentials"},
                                      "caBundle": registry.ca_pem().unwrap()}},
               "cache": {"nodeSelector": {"kubernetes.io/hostname": own}}}),
    )
    .await;
    let image = Api::<VMDiskImage>::namespaced(admin.clone(), &ns)
        .get("private")
        .await
        .unwrap();
    let copy = credentials_secret_name(&image.uid().unwrap());
    let copies: Api<Secret> = Api::namespaced(admin.clone(), CREDENTIALS_NAMESPACE);
    wait_for("the credentials copy", WAIT, || {
        let (copies, copy) = (copies.clone(), copy.clone());
        async move {
            copies
                .get_opt(&copy)
                .await
                .map_err(|e| e.to_string())?
                .map(|_| ())
                .ok_or_else(|| "not yet".to_string())
        }
    })
    .await;

    // The agents' own tokens read no Secret: not the copy, not a tenant's, not vmdisk's.
    let secret: Secret = serde_json::from_value(json!({
        "metadata": {"name": "database-password"}, "stringData": {"password": "hunter2"}
    }))
    .unwrap();
    Api::<Secret>::namespaced(admin.clone(), &ns)
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();
    let agent = agent_client(&fx, &own, "secrets-probe").await;
    for (namespace, name) in [
        (CREDENTIALS_NAMESPACE, copy.as_str()),
        (ns.as_str(), "database-password"),
        (ns.as_str(), "registry-credentials"),
        (INSTALL_NAMESPACE, "vmdisk-controller-tls"),
        ("kube-system", "anything"),
    ] {
        let e = api_error(
            Api::<Secret>::namespaced(agent.clone(), namespace)
                .get(name)
                .await,
        );
        assert_eq!(e.code, 403, "agent read Secret {namespace}/{name}: {e:?}");
    }

    // The agent API: the node that prefetches the image gets its registry's entry only.
    let granted = ask(
        &fx,
        &fx.agent_token(&own, Some(AGENT_API_AUDIENCE)).await,
        &ns,
        "private",
    )
    .await
    .expect("the prefetching node's agent gets the credentials");
    assert_eq!(
        granted.restricted_to(&registry.addr),
        granted,
        "one registry's entry"
    );
    assert!(matches!(
        vmdisk_registry::registry_auth_for(&granted, &registry.addr),
        oci_client::secrets::RegistryAuth::Basic(user, password) if user == "cred" && password == "entials"
    ));

    // Another node's agent: refused, and told why.
    let (status, message) = refused(
        ask(
            &fx,
            &fx.agent_token(&other, Some(AGENT_API_AUDIENCE)).await,
            &ns,
            "private",
        )
        .await,
    );
    assert_eq!(status, 403, "{message}");
    assert!(
        message.contains(&format!(
            "node {other} does not prefetch VMDiskImage {ns}/private"
        )),
        "{message}"
    );
    // The agent's API-server token (as lifted from its default mount): the API server
    // refuses it for the agent API's audience.
    let (status, message) =
        refused(ask(&fx, &fx.agent_token(&own, None).await, &ns, "private").await);
    assert_eq!(status, 401, "{message}");
    assert!(
        message.contains("is invalid for the target audiences [\"vmdisk-controller\"]"),
        "{message}"
    );
    // Another account, even for the right audience and bound to no pod: not an agent.
    let webhook = service_account_token_for(
        &admin,
        INSTALL_NAMESPACE,
        "vmdisk-webhook",
        None,
        Some(AGENT_API_AUDIENCE),
    )
    .await;
    let (status, message) = refused(ask(&fx, &webhook, &ns, "private").await);
    assert_eq!(status, 403, "{message}");
    assert!(message.contains("is not a vmdisk cache agent"), "{message}");
    // The agents' account, but a token bound to no pod: no node to vouch for.
    let unbound = service_account_token_for(
        &admin,
        INSTALL_NAMESPACE,
        "vmdisk-cache-agent",
        None,
        Some(AGENT_API_AUDIENCE),
    )
    .await;
    let (status, message) = refused(ask(&fx, &unbound, &ns, "private").await);
    assert_eq!(status, 403, "{message}");
    assert!(message.contains("not bound to a pod"), "{message}");
    // A forged token.
    let (status, _) = refused(ask(&fx, "not-a-token", &ns, "private").await);
    assert_eq!(status, 401);
    // An image that does not exist, asked by a real agent.
    let (status, message) = refused(
        ask(
            &fx,
            &fx.agent_token(&own, Some(AGENT_API_AUDIENCE)).await,
            &ns,
            "nothing",
        )
        .await,
    );
    assert_eq!(
        (status, message),
        (404, format!("no VMDiskImage {ns}/nothing"))
    );

    // The controller counted each answer.
    let metrics = fx.controller_metrics().await;
    for outcome in ["granted", "forbidden", "unauthenticated", "not_found"] {
        assert!(
            metrics.contains(&format!(
                "vmdisk_controller_agent_api_credentials_requests_total{{outcome=\"{outcome}\"}}"
            )),
            "{outcome} missing from the controller's metrics"
        );
    }
}
