//! What a component asks of the API server, declared next to the code that asks.
//!
//! Each module that calls the API exports an `API_ACCESS` list of [`ApiAccess`]; each binary
//! gathers its modules' lists. A test compares the gathered list with `deploy/rbac.yaml` both
//! ways (nothing missing, nothing extra), and the e2e suite asks the real authorizer. So the
//! RBAC a user installs is exactly what the code uses, and a new call without its grant fails
//! a test instead of a production cluster.

use std::collections::BTreeSet;

/// Where a grant applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum AccessScope {
    /// Cluster-scoped resources, or namespaced ones in every namespace (ClusterRole bound by a
    /// ClusterRoleBinding).
    Cluster,
    /// vmdisk's own namespace (`vmdisk-system`): a Role there.
    InstallNamespace,
    /// The namespace holding the per-image pull credentials (`vmdisk-credentials`): a Role there.
    CredentialsNamespace,
    /// Events about cluster-scoped objects land in `default`: a Role there.
    DefaultNamespace,
}

impl AccessScope {
    /// The namespace of a Role granting this scope, `None` for a ClusterRole.
    pub fn namespace(self) -> Option<&'static str> {
        match self {
            AccessScope::Cluster => None,
            AccessScope::InstallNamespace => Some(crate::INSTALL_NAMESPACE),
            AccessScope::CredentialsNamespace => Some(crate::CREDENTIALS_NAMESPACE),
            AccessScope::DefaultNamespace => Some("default"),
        }
    }
}

/// Requests of some verbs on one resource, in one scope.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApiAccess {
    /// API group, `""` for the core group.
    pub group: &'static str,
    /// Plural resource, with `/subresource` where one is used.
    pub resource: &'static str,
    pub verbs: &'static [&'static str],
    pub scope: AccessScope,
}

impl ApiAccess {
    pub const fn new(
        group: &'static str,
        resource: &'static str,
        verbs: &'static [&'static str],
        scope: AccessScope,
    ) -> Self {
        Self {
            group,
            resource,
            verbs,
            scope,
        }
    }
}

/// Accesses more than one component needs, declared once.
impl ApiAccess {
    /// Watching every VMDiskImage (a reflector): the webhook's catalog and the image
    /// controller (agents watch only their own node's list).
    pub const WATCH_VMDISKIMAGES: ApiAccess = ApiAccess::new(
        "vmdisk.io",
        "vmdiskimages",
        &["list", "watch"],
        AccessScope::Cluster,
    );
    /// Recording and aggregating Events (`events.k8s.io`) in `scope`.
    pub const fn record_events(scope: AccessScope) -> ApiAccess {
        ApiAccess::new("events.k8s.io", "events", &["create", "patch"], scope)
    }
}

/// One (group, resource, verb, scope) permission.
pub type Permission = (String, String, String, AccessScope);

/// The permissions a set of access lists needs, one entry per verb.
pub fn permissions(lists: &[&[ApiAccess]]) -> BTreeSet<Permission> {
    lists
        .iter()
        .flat_map(|list| list.iter())
        .flat_map(|a| {
            a.verbs.iter().map(move |verb| {
                (
                    a.group.to_string(),
                    a.resource.to_string(),
                    verb.to_string(),
                    a.scope,
                )
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permissions_are_one_per_verb_and_deduplicated() {
        const A: &[ApiAccess] = &[ApiAccess::new(
            "",
            "nodes",
            &["get", "list"],
            AccessScope::Cluster,
        )];
        const B: &[ApiAccess] = &[ApiAccess::new("", "nodes", &["get"], AccessScope::Cluster)];
        let p = permissions(&[A, B]);
        assert_eq!(p.len(), 2);
        assert!(p.contains(&(
            "".into(),
            "nodes".into(),
            "list".into(),
            AccessScope::Cluster
        )));
    }
}
