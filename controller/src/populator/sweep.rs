//! Prime PVCs and populator pods whose user PVC is gone: left by a claim whose finalizer
//! someone removed by hand, or deleted while no controller ran. [`orphaned`] is the pure rule;
//! [`sweep_orphans`] deletes them every [`ORPHAN_SWEEP`].

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod};
use kube::{Api, ResourceExt};

use super::reconcile::{delete, Context};

/// Names of prime PVCs or populator pods whose user PVC (by UID) no longer exists: left by a
/// claim whose finalizer someone removed by hand, or deleted while the controller was down
/// before it could add one.
pub fn orphaned<'a>(
    objects: impl IntoIterator<Item = &'a kube::api::ObjectMeta>,
    live_claims: &std::collections::HashSet<String>,
) -> Vec<String> {
    objects
        .into_iter()
        .filter(|o| {
            o.labels
                .as_ref()
                .and_then(|l| l.get(vmdisk_crds::CLAIM_UID_LABEL))
                .is_none_or(|uid| !live_claims.contains(uid))
        })
        .filter_map(|o| o.name.clone())
        .collect()
}

/// How often orphaned primes and pods are looked for.
pub const ORPHAN_SWEEP: Duration = Duration::from_secs(30);

pub async fn sweep_orphans(ctx: Arc<Context>) {
    loop {
        tokio::time::sleep(ORPHAN_SWEEP).await;
        if crate::tasks::ready(&ctx.claims).await.is_err()
            || crate::tasks::ready(&ctx.pods).await.is_err()
            || crate::tasks::ready(&ctx.primes).await.is_err()
        {
            continue;
        }
        let claims = ctx.claims.state();
        // Timelines of claims deleted before their population ended.
        ctx.timelines
            .retain(|claim| ctx.claims.get(claim).is_some());
        let live: std::collections::HashSet<String> =
            claims.iter().filter_map(|c| c.uid()).collect();
        let primes = ctx.primes.state();
        let pods = ctx.pods.state();
        let prime_api: Api<PersistentVolumeClaim> =
            Api::namespaced(ctx.client.clone(), &ctx.settings.namespace);
        let pod_api: Api<Pod> = Api::namespaced(ctx.client.clone(), &ctx.settings.namespace);
        for name in orphaned(pods.iter().map(|p| &p.metadata), &live) {
            tracing::info!(pod = %name, "deleting a populator pod whose claim is gone");
            let _ = delete(&pod_api, &name).await;
        }
        for name in orphaned(primes.iter().map(|p| &p.metadata), &live) {
            tracing::info!(prime = %name, "deleting a prime PVC whose claim is gone");
            let _ = delete(&prime_api, &name).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn primes_and_pods_of_vanished_claims_are_orphans() {
        let object = |name: &str, uid: Option<&str>| -> Pod {
            let mut p: Pod =
                serde_json::from_value(serde_json::json!({"metadata": {"name": name}})).unwrap();
            if let Some(uid) = uid {
                p.metadata.labels =
                    Some([(vmdisk_crds::CLAIM_UID_LABEL.to_string(), uid.to_string())].into());
            }
            p
        };
        let objects = [
            object("populate-a", Some("a")),
            object("populate-b", Some("b")),
            object("stray", None),
        ];
        let live: std::collections::HashSet<String> = ["a".to_string()].into();
        assert_eq!(
            orphaned(objects.iter().map(|o| &o.metadata), &live),
            ["populate-b", "stray"]
        );
    }
}
