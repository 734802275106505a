//! Which admission requests vmdisk mutates: a CREATE of the endpoint's own resource (core
//! `persistentvolumeclaims` or `pods`), not of a subresource, with an object. Anything else is
//! answered allowed and unchanged.
//!
//! A dry run is decided as the real request is: vmdisk's mutations have no side effects
//! (`sideEffects: None`), so a dry run gets exactly the answer the real request would get.

use serde_json::value::RawValue;

use super::review::AdmissionRequest;
use crate::metrics::Resource;

/// The resource (core group) an endpoint mutates.
pub fn resource_name(resource: Resource) -> &'static str {
    match resource {
        Resource::Pvc => "persistentvolumeclaims",
        Resource::Pod => "pods",
    }
}

/// The kind of object an endpoint mutates, for warnings.
pub fn kind_name(resource: Resource) -> &'static str {
    match resource {
        Resource::Pvc => "PersistentVolumeClaim",
        Resource::Pod => "Pod",
    }
}

/// Why a sound review is answered without looking at its object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Skip {
    /// Another resource than the endpoint's: the MutatingWebhookConfiguration's rules are off.
    UnexpectedResource,
    Subresource,
    NotACreate,
    NoObject,
}

impl Skip {
    pub fn as_str(self) -> &'static str {
        match self {
            Skip::UnexpectedResource => "unexpected resource",
            Skip::Subresource => "subresource",
            Skip::NotACreate => "not a CREATE",
            Skip::NoObject => "no object",
        }
    }
}

/// The object to mutate (its JSON text), or why the request is left alone.
pub fn object_to_mutate<'a>(
    resource: Resource,
    request: &AdmissionRequest<'a>,
) -> Result<&'a RawValue, Skip> {
    if !request.resource.group.is_empty() || request.resource.resource != resource_name(resource) {
        return Err(Skip::UnexpectedResource);
    }
    if request
        .sub_resource
        .as_deref()
        .is_some_and(|s| !s.is_empty())
    {
        return Err(Skip::Subresource);
    }
    if request.operation != "CREATE" {
        return Err(Skip::NotACreate);
    }
    request.object.ok_or(Skip::NoObject)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admission::review::decode_review;

    fn decide(resource: Resource, request: &str) -> Result<String, Skip> {
        let body = format!(
            r#"{{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{request}}}"#
        );
        let request = decode_review(body.as_bytes()).unwrap();
        object_to_mutate(resource, &request).map(|o| o.get().to_string())
    }

    #[test]
    fn only_creates_of_the_endpoints_resource_with_an_object_are_mutated() {
        let pvc = |rest: &str| {
            format!(
                r#"{{"uid":"u","resource":{{"group":"","version":"v1","resource":"persistentvolumeclaims"}}{rest}}}"#
            )
        };
        assert_eq!(
            decide(Resource::Pvc, &pvc(r#","operation":"CREATE","object":{}"#)),
            Ok("{}".into())
        );
        assert_eq!(
            decide(
                Resource::Pvc,
                &pvc(r#","operation":"CREATE","subResource":"","dryRun":true,"object":{"a":1}"#)
            ),
            Ok(r#"{"a":1}"#.into()),
            "an empty subresource is none, a dry run is decided as the real request"
        );
        assert_eq!(
            decide(Resource::Pod, &pvc(r#","operation":"CREATE","object":{}"#)),
            Err(Skip::UnexpectedResource)
        );
        assert_eq!(
            decide(
                Resource::Pvc,
                r#"{"uid":"u","resource":{"group":"cdi.kubevirt.io","resource":"persistentvolumeclaims"},"operation":"CREATE","object":{}}"#
            ),
            Err(Skip::UnexpectedResource)
        );
        assert_eq!(
            decide(
                Resource::Pvc,
                &pvc(r#","subResource":"status","operation":"CREATE","object":{}"#)
            ),
            Err(Skip::Subresource)
        );
        assert_eq!(
            decide(Resource::Pvc, &pvc(r#","operation":"UPDATE","object":{}"#)),
            Err(Skip::NotACreate)
        );
        assert_eq!(
            decide(
                Resource::Pvc,
                &pvc(r#","operation":"CREATE","object":null"#)
            ),
            Err(Skip::NoObject)
        );
        assert_eq!(
            decide(Resource::Pvc, &pvc(r#","operation":"CREATE""#)),
            Err(Skip::NoObject)
        );
    }
}
