//! Every manifest as typed objects, with unknown fields refused: Kubernetes' own types from
//! k8s-openapi (whose decoders skip unknown fields, so each object is encoded again and every
//! field of the document must survive), vmdisk's CRDs, and minimal strict types for the
//! third-party kinds vmdisk ships objects of (cert-manager, VolumePopulator).

use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding,
};
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::{Namespace, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Meta {
    pub name: String,
    #[serde(default)]
    pub namespace: Option<String>,
    #[serde(default)]
    pub labels: Option<std::collections::BTreeMap<String, String>>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct IssuerRef {
    pub name: String,
    pub kind: String,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PrivateKey {
    pub algorithm: String,
    pub size: u32,
    #[serde(default)]
    pub rotation_policy: Option<String>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct CertificateSpec {
    pub secret_name: String,
    #[serde(default, rename = "isCA")]
    pub is_ca: Option<bool>,
    #[serde(default)]
    pub common_name: Option<String>,
    #[serde(default)]
    pub duration: Option<String>,
    #[serde(default)]
    pub renew_before: Option<String>,
    #[serde(default)]
    pub private_key: Option<PrivateKey>,
    #[serde(default)]
    pub dns_names: Option<Vec<String>>,
    /// cert-manager's key usages (`server auth`, `client auth`, ...).
    #[serde(default)]
    pub usages: Option<Vec<String>>,
    pub issuer_ref: IssuerRef,
}

/// cert-manager.io/v1 Certificate, the fields vmdisk uses.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Certificate {
    pub api_version: String,
    pub kind: String,
    pub metadata: Meta,
    pub spec: CertificateSpec,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct CaIssuer {
    pub secret_name: String,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct IssuerSpec {
    #[serde(default)]
    pub self_signed: Option<serde_json::Map<String, Value>>,
    #[serde(default)]
    pub ca: Option<CaIssuer>,
}

/// cert-manager.io/v1 Issuer.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Issuer {
    pub api_version: String,
    pub kind: String,
    pub metadata: Meta,
    pub spec: IssuerSpec,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct SourceKind {
    pub group: String,
    pub kind: String,
}

/// populator.storage.k8s.io/v1beta1 VolumePopulator.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct VolumePopulator {
    pub api_version: String,
    pub kind: String,
    pub metadata: Meta,
    pub source_kind: SourceKind,
}

/// One manifest, typed. Tests match on the kinds they cross-check; the rest are held only to
/// prove they parse.
#[derive(Debug)]
#[allow(dead_code)]
pub enum Object {
    Namespace(Box<Namespace>),
    ServiceAccount(Box<ServiceAccount>),
    ClusterRole(Box<ClusterRole>),
    ClusterRoleBinding(Box<ClusterRoleBinding>),
    Role(Box<Role>),
    RoleBinding(Box<RoleBinding>),
    Deployment(Box<Deployment>),
    Service(Box<Service>),
    PodDisruptionBudget(Box<PodDisruptionBudget>),
    DaemonSet(Box<DaemonSet>),
    MutatingWebhookConfiguration(Box<MutatingWebhookConfiguration>),
    ValidatingAdmissionPolicy(Box<ValidatingAdmissionPolicy>),
    ValidatingAdmissionPolicyBinding(Box<ValidatingAdmissionPolicyBinding>),
    NetworkPolicy(Box<NetworkPolicy>),
    CustomResourceDefinition(Box<CustomResourceDefinition>),
    Certificate(Box<Certificate>),
    Issuer(Box<Issuer>),
    VolumePopulator(Box<VolumePopulator>),
}

/// Fields of `doc` that `again` (the typed object encoded again) lost: unknown fields.
fn lost_fields(doc: &Value, again: &Value, path: &str, out: &mut Vec<String>) {
    match (doc, again) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in a {
                match b.get(k) {
                    None if !v.is_null() => out.push(format!("{path}.{k}")),
                    None => {}
                    Some(w) => lost_fields(v, w, &format!("{path}.{k}"), out),
                }
            }
        }
        (Value::Array(a), Value::Array(b)) => {
            for (i, (v, w)) in a.iter().zip(b).enumerate() {
                lost_fields(v, w, &format!("{path}[{i}]"), out);
            }
        }
        _ => {}
    }
}

/// `doc` as a `T`, with every field of the document kept (none unknown).
pub fn strict_value<T: DeserializeOwned + Serialize>(doc: &Value) -> Result<T, String> {
    let typed: T = serde_json::from_value(doc.clone()).map_err(|e| e.to_string())?;
    let again = serde_json::to_value(&typed).map_err(|e| e.to_string())?;
    let mut lost = Vec::new();
    lost_fields(doc, &again, "", &mut lost);
    if lost.is_empty() {
        Ok(typed)
    } else {
        Err(format!("unknown fields {lost:?}"))
    }
}

/// Types a manifest; unknown kinds and unknown fields are errors.
pub fn parse(doc: &Value) -> Result<Object, String> {
    let kind = doc["kind"].as_str().unwrap_or_default();
    let name = doc["metadata"]["name"].as_str().unwrap_or_default();
    let object = match kind {
        "Namespace" => strict_value(doc).map(Object::Namespace),
        "ServiceAccount" => strict_value(doc).map(Object::ServiceAccount),
        "ClusterRole" => strict_value(doc).map(Object::ClusterRole),
        "ClusterRoleBinding" => strict_value(doc).map(Object::ClusterRoleBinding),
        "Role" => strict_value(doc).map(Object::Role),
        "RoleBinding" => strict_value(doc).map(Object::RoleBinding),
        "Deployment" => strict_value(doc).map(Object::Deployment),
        "Service" => strict_value(doc).map(Object::Service),
        "PodDisruptionBudget" => strict_value(doc).map(Object::PodDisruptionBudget),
        "DaemonSet" => strict_value(doc).map(Object::DaemonSet),
        "MutatingWebhookConfiguration" => {
            strict_value(doc).map(Object::MutatingWebhookConfiguration)
        }
        "ValidatingAdmissionPolicy" => strict_value(doc).map(Object::ValidatingAdmissionPolicy),
        "ValidatingAdmissionPolicyBinding" => {
            strict_value(doc).map(Object::ValidatingAdmissionPolicyBinding)
        }
        "NetworkPolicy" => strict_value(doc).map(Object::NetworkPolicy),
        "CustomResourceDefinition" => strict_value(doc).map(Object::CustomResourceDefinition),
        "Certificate" => strict_value(doc).map(Object::Certificate),
        "Issuer" => strict_value(doc).map(Object::Issuer),
        "VolumePopulator" => strict_value(doc).map(Object::VolumePopulator),
        other => Err(format!("unexpected kind {other:?}")),
    };
    object.map_err(|e| format!("{kind}/{name}: {e}"))
}
