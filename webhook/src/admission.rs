//! AdmissionReview decoding and encoding (admission.k8s.io/v1).
//!
//! Decoding happens in two steps so a review whose envelope is sound always gets an answer
//! carrying its `uid`, even when the object inside is not what the endpoint expects: the
//! envelope first (errors here are HTTP 400, there is no uid to answer), then the object
//! (errors here are an allowed-without-patch answer with a warning, per the webhook contract).

use std::time::Instant;

use base64::Engine as _;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use thiserror::Error;

pub const API_VERSION: &str = "admission.k8s.io/v1";
pub const KIND: &str = "AdmissionReview";

/// Why a request body is not an AdmissionReview this webhook can answer (HTTP 400).
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ReviewError {
    #[error("request body is not JSON: {0}")]
    NotJson(String),
    #[error("request body is not an AdmissionReview: {0}")]
    NotAReview(String),
    #[error("expected apiVersion {API_VERSION:?} and kind {KIND:?}, got apiVersion {api_version:?} and kind {kind:?}")]
    WrongType { api_version: String, kind: String },
    #[error("AdmissionReview has no request")]
    MissingRequest,
    #[error("AdmissionReview request has an empty uid")]
    EmptyUid,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct GroupVersionKind {
    #[serde(default)]
    pub group: String,
    #[serde(default)]
    pub version: String,
    #[serde(default)]
    pub kind: String,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct GroupVersionResource {
    #[serde(default)]
    pub group: String,
    #[serde(default)]
    pub version: String,
    #[serde(default)]
    pub resource: String,
}

/// The parts of an admission request this webhook reads, with the object decoded as `O`: the
/// endpoint's lean view on the fast path, or [`RawObject`] when the view did not fit.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AdmissionRequest<O> {
    pub uid: String,
    pub kind: GroupVersionKind,
    pub resource: GroupVersionResource,
    #[serde(default)]
    pub sub_resource: Option<String>,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub namespace: Option<String>,
    pub operation: String,
    #[serde(default)]
    pub dry_run: Option<bool>,
    #[serde(default = "Option::default")]
    pub object: Option<O>,
}

/// An object left undecoded.
pub type RawObject = Box<RawValue>;

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ReviewEnvelope<O> {
    #[serde(default)]
    api_version: String,
    #[serde(default)]
    kind: String,
    #[serde(default = "Option::default")]
    request: Option<AdmissionRequest<O>>,
}

/// Decodes the envelope, the request metadata and the object (as `O`) in one pass.
pub fn decode_review<O: DeserializeOwned>(body: &[u8]) -> Result<AdmissionRequest<O>, ReviewError> {
    let envelope: ReviewEnvelope<O> =
        serde_json::from_slice(body).map_err(|e| match e.classify() {
            serde_json::error::Category::Data => {
                wrong_type(body).unwrap_or(ReviewError::NotAReview(e.to_string()))
            }
            _ => ReviewError::NotJson(e.to_string()),
        })?;
    if envelope.api_version != API_VERSION || envelope.kind != KIND {
        return Err(ReviewError::WrongType {
            api_version: envelope.api_version,
            kind: envelope.kind,
        });
    }
    let request = envelope.request.ok_or(ReviewError::MissingRequest)?;
    if request.uid.is_empty() {
        return Err(ReviewError::EmptyUid);
    }
    Ok(request)
}

/// On a failed decode, a wrong apiVersion/kind is the clearer error to report.
fn wrong_type(body: &[u8]) -> Option<ReviewError> {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct TypeOnly {
        #[serde(default)]
        api_version: String,
        #[serde(default)]
        kind: String,
    }
    let t: TypeOnly = serde_json::from_slice(body).ok()?;
    (t.api_version != API_VERSION || t.kind != KIND).then_some(ReviewError::WrongType {
        api_version: t.api_version,
        kind: t.kind,
    })
}

/// An admission answer. Always `allowed`: vmdisk never denies, it only completes objects and
/// warns.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AdmissionAnswer {
    pub uid: String,
    pub patch: Option<json_patch::Patch>,
    pub warnings: Vec<String>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ResponseOut<'a> {
    uid: &'a str,
    allowed: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    patch_type: Option<&'static str>,
    /// Base64 of the JSON Patch: the wire form of a Go `[]byte`.
    #[serde(skip_serializing_if = "Option::is_none")]
    patch: Option<String>,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    warnings: &'a [String],
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ReviewOut<'a> {
    api_version: &'static str,
    kind: &'static str,
    response: ResponseOut<'a>,
}

/// Warnings longer than this are truncated by the apiserver anyway.
const MAX_WARNING_CHARS: usize = 256;

impl AdmissionAnswer {
    pub fn allow(uid: &str) -> Self {
        Self {
            uid: uid.to_string(),
            ..Default::default()
        }
    }

    pub fn to_json(&self) -> Vec<u8> {
        let patch = self.patch.as_ref().filter(|p| !p.0.is_empty()).map(|p| {
            base64::engine::general_purpose::STANDARD
                .encode(serde_json::to_vec(p).expect("a JSON patch always serializes"))
        });
        let warnings: Vec<String> = self
            .warnings
            .iter()
            .map(|w| {
                if w.chars().count() > MAX_WARNING_CHARS {
                    let mut s: String = w.chars().take(MAX_WARNING_CHARS - 1).collect();
                    s.push('…');
                    s
                } else {
                    w.clone()
                }
            })
            .collect();
        serde_json::to_vec(&ReviewOut {
            api_version: API_VERSION,
            kind: KIND,
            response: ResponseOut {
                uid: &self.uid,
                allowed: true,
                patch_type: patch.as_ref().map(|_| "JSONPatch"),
                patch,
                warnings: &warnings,
            },
        })
        .expect("an admission answer always serializes")
    }
}

/// Decodes the `patch` of a response, accepting base64 (the documented wire form) and a JSON
/// array of byte values (what kube-rs's `AdmissionResponse` emits).
pub fn decode_patch_field(value: &serde_json::Value) -> Result<json_patch::Patch, String> {
    let bytes: Vec<u8> = match value {
        serde_json::Value::String(s) => base64::engine::general_purpose::STANDARD
            .decode(s)
            .map_err(|e| format!("patch is not base64: {e}"))?,
        other => serde_json::from_value(other.clone())
            .map_err(|e| format!("patch is neither base64 nor a byte array: {e}"))?,
    };
    serde_json::from_slice(&bytes).map_err(|e| format!("patch is not a JSON Patch: {e}"))
}

/// Timer for the latency histogram.
pub struct Timer(Instant);

impl Timer {
    pub fn start() -> Self {
        Self(Instant::now())
    }
    pub fn seconds(&self) -> f64 {
        self.0.elapsed().as_secs_f64()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_a_minimal_review() {
        let body = br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{"uid":"u1","kind":{"group":"","version":"v1","kind":"Pod"},"resource":{"group":"","version":"v1","resource":"pods"},"operation":"CREATE","object":{"a":1}}}"#;
        let r = decode_review::<RawObject>(body).unwrap();
        assert_eq!(r.uid, "u1");
        assert_eq!(r.resource.resource, "pods");
        assert_eq!(r.object.unwrap().get(), r#"{"a":1}"#);
    }

    #[test]
    fn rejects_bad_envelopes() {
        assert!(matches!(
            decode_review::<RawObject>(b"nope"),
            Err(ReviewError::NotJson(_))
        ));
        assert!(matches!(
            decode_review::<RawObject>(b"[]"),
            Err(ReviewError::WrongType { .. })
        ));
        assert!(matches!(
            decode_review::<RawObject>(b"{\"apiVersion\": 5}"),
            Err(ReviewError::NotAReview(_))
        ));
        assert!(matches!(
            decode_review::<RawObject>(b"{\"apiVersion\": "),
            Err(ReviewError::NotJson(_))
        ));
        assert!(matches!(
            decode_review::<RawObject>(br#"{"apiVersion":"admission.k8s.io/v1beta1","kind":"AdmissionReview","request":{}}"#),
            Err(ReviewError::WrongType { .. })
        ));
        assert!(matches!(
            decode_review::<RawObject>(br#"{"apiVersion":"v1","kind":"Pod"}"#),
            Err(ReviewError::WrongType { .. })
        ));
        assert!(matches!(
            decode_review::<RawObject>(
                br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview"}"#
            ),
            Err(ReviewError::MissingRequest)
        ));
        assert!(matches!(
            decode_review::<RawObject>(
                br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":null}"#
            ),
            Err(ReviewError::MissingRequest)
        ));
        assert!(matches!(
            decode_review::<RawObject>(br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{"uid":5}}"#),
            Err(ReviewError::NotAReview(_))
        ));
    }

    #[test]
    fn answer_round_trips_its_patch() {
        let patch: json_patch::Patch =
            serde_json::from_value(serde_json::json!([{"op": "add", "path": "/a", "value": 1}]))
                .unwrap();
        let answer = AdmissionAnswer {
            uid: "u".into(),
            patch: Some(patch.clone()),
            warnings: vec!["w".repeat(300)],
        };
        let v: serde_json::Value = serde_json::from_slice(&answer.to_json()).unwrap();
        assert_eq!(v["apiVersion"], API_VERSION);
        assert_eq!(v["response"]["uid"], "u");
        assert_eq!(v["response"]["allowed"], true);
        assert_eq!(v["response"]["patchType"], "JSONPatch");
        assert_eq!(decode_patch_field(&v["response"]["patch"]).unwrap(), patch);
        assert_eq!(
            v["response"]["warnings"][0]
                .as_str()
                .unwrap()
                .chars()
                .count(),
            256
        );
        let bytes = serde_json::to_value(serde_json::to_vec(&patch).unwrap()).unwrap();
        assert_eq!(decode_patch_field(&bytes).unwrap(), patch);
    }

    #[test]
    fn answer_without_patch_has_no_patch_fields() {
        let v: serde_json::Value =
            serde_json::from_slice(&AdmissionAnswer::allow("u").to_json()).unwrap();
        assert!(v["response"].get("patch").is_none());
        assert!(v["response"].get("patchType").is_none());
        assert!(v["response"].get("warnings").is_none());
    }
}
