//! The admission answer (an AdmissionReview with a `response`), encoded with serde; the patch
//! is base64 (the wire form of a Go `[]byte`), encoded by the `base64` crate.

use std::borrow::Cow;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use serde::Serialize;

use super::review::{API_VERSION, KIND};

/// Warnings longer than this are truncated by the apiserver anyway.
const MAX_WARNING_CHARS: usize = 256;

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
struct Review<'a> {
    api_version: &'static str,
    kind: &'static str,
    response: Response<'a>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Response<'a> {
    uid: &'a str,
    allowed: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    patch_type: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    patch: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    warnings: Vec<Cow<'a, str>>,
}

/// `warning`, cut to [`MAX_WARNING_CHARS`] characters (the last one an ellipsis) if longer.
fn shortened(warning: &str) -> Cow<'_, str> {
    match warning.char_indices().nth(MAX_WARNING_CHARS) {
        None => Cow::Borrowed(warning),
        Some(_) => {
            let mut short: String = warning.chars().take(MAX_WARNING_CHARS - 1).collect();
            short.push('…');
            Cow::Owned(short)
        }
    }
}

impl AdmissionAnswer {
    pub fn allow(uid: &str) -> Self {
        Self {
            uid: uid.to_string(),
            ..Default::default()
        }
    }

    /// The AdmissionReview answer as JSON.
    pub fn to_json(&self) -> Vec<u8> {
        let patch = self.patch.as_ref().map(|p| {
            STANDARD.encode(serde_json::to_vec(p).expect("a JSON patch always serializes"))
        });
        let review = Review {
            api_version: API_VERSION,
            kind: KIND,
            response: Response {
                uid: &self.uid,
                allowed: true,
                patch_type: patch.is_some().then_some("JSONPatch"),
                patch,
                warnings: self.warnings.iter().map(|w| shortened(w)).collect(),
            },
        };
        serde_json::to_vec(&review).expect("an answer always serializes")
    }
}

/// Decodes the `patch` of a response, accepting base64 (the documented wire form) and a JSON
/// array of byte values (what kube-rs's `AdmissionResponse` emits).
pub fn decode_patch_field(value: &serde_json::Value) -> Result<json_patch::Patch, String> {
    let bytes: Vec<u8> = match value {
        serde_json::Value::String(s) => STANDARD
            .decode(s)
            .map_err(|e| format!("patch is not base64: {e}"))?,
        other => serde_json::from_value(other.clone())
            .map_err(|e| format!("patch is neither base64 nor a byte array: {e}"))?,
    };
    serde_json::from_slice(&bytes).map_err(|e| format!("patch is not a JSON Patch: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answer_round_trips_its_patch() {
        let patch: json_patch::Patch =
            serde_json::from_value(serde_json::json!([{"op": "add", "path": "/a", "value": 1}]))
                .unwrap();
        let answer = AdmissionAnswer {
            uid: "u\"".into(),
            patch: Some(patch.clone()),
            warnings: vec!["w".repeat(300), "é".repeat(256), "short".into()],
        };
        let v: serde_json::Value = serde_json::from_slice(&answer.to_json()).unwrap();
        assert_eq!(v["apiVersion"], API_VERSION);
        assert_eq!(v["kind"], KIND);
        assert_eq!(v["response"]["uid"], "u\"");
        assert_eq!(v["response"]["allowed"], true);
        assert_eq!(v["response"]["patchType"], "JSONPatch");
        assert_eq!(decode_patch_field(&v["response"]["patch"]).unwrap(), patch);
        let warning = |i: usize| v["response"]["warnings"][i].as_str().unwrap().to_string();
        assert_eq!(warning(0).chars().count(), 256);
        assert!(warning(0).ends_with('…'));
        assert_eq!(warning(1), "é".repeat(256), "256 characters are kept whole");
        assert_eq!(warning(2), "short");
        let bytes = serde_json::to_value(serde_json::to_vec(&patch).unwrap()).unwrap();
        assert_eq!(decode_patch_field(&bytes).unwrap(), patch);
        assert!(decode_patch_field(&serde_json::json!("not base64!")).is_err());
    }

    #[test]
    fn answer_without_patch_has_no_patch_fields() {
        let v: serde_json::Value =
            serde_json::from_slice(&AdmissionAnswer::allow("u").to_json()).unwrap();
        assert_eq!(v["response"]["uid"], "u");
        assert!(v["response"].get("patch").is_none());
        assert!(v["response"].get("patchType").is_none());
        assert!(v["response"].get("warnings").is_none());
    }
}
