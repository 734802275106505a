//! AdmissionReview decoding and encoding (admission.k8s.io/v1).
//!
//! A review is read field by field with [`JsonReader`]: what vmdisk does not read is skipped in
//! bulk (still checked to be JSON). A review whose envelope is sound always gets an answer
//! carrying its `uid`, even when the object inside is not what the endpoint expects: envelope
//! errors are HTTP 400 (there is no uid to answer), an object that does not fit its view is
//! kept as the reason, and answered allowed-without-patch with a warning, per the webhook
//! contract.

use std::time::Instant;

use std::borrow::Cow;

use base64::Engine as _;
use serde::Deserialize;
use thiserror::Error;

use crate::json_reader::{set_once, JsonReader, ReadError};
use crate::json_writer::{write_base64_str, write_str};

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

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GroupVersionResource<'a> {
    pub group: Cow<'a, str>,
    pub version: Cow<'a, str>,
    pub resource: Cow<'a, str>,
}

/// The parts of an admission request this webhook reads. Strings borrow from the body (copied
/// only when they hold escapes).
#[derive(Debug)]
pub struct AdmissionRequest<'a, O> {
    pub uid: Cow<'a, str>,
    pub resource: GroupVersionResource<'a>,
    pub sub_resource: Option<Cow<'a, str>>,
    pub name: Option<Cow<'a, str>>,
    pub namespace: Option<Cow<'a, str>>,
    pub operation: Cow<'a, str>,
    pub dry_run: Option<bool>,
    /// The object through the endpoint's view, or why it did not fit (`None`: absent or null).
    pub object: Option<Result<O, String>>,
}

/// How an endpoint reads the admitted object: only the fields its mutation needs.
pub trait ObjectView<'a>: Sized {
    /// Reads one value (the object). A [`ReadError::Type`] means the object does not fit.
    fn read(r: &mut JsonReader<'a>) -> Result<Self, ReadError>;
}

/// Decodes the envelope, the request metadata and the object (as `O`) in one pass.
pub fn decode_review<'a, O: ObjectView<'a>>(
    body: &'a [u8],
) -> Result<AdmissionRequest<'a, O>, ReviewError> {
    // Valid UTF-8 checked once, in bulk, so the reader need not check every string it borrows.
    let text = std::str::from_utf8(body)
        .map_err(|e| ReviewError::NotJson(format!("invalid UTF-8: {e}")))?;
    let mut r = JsonReader::new(text);
    let (api_version, kind, request) = read_envelope::<O>(&mut r)
        .and_then(|envelope| r.finish().map(|_| envelope))
        .map_err(|e| match e {
            ReadError::Syntax(why) => ReviewError::NotJson(why),
            ReadError::Type(why) => wrong_type(body).unwrap_or(ReviewError::NotAReview(why)),
        })?;
    if api_version != API_VERSION || kind != KIND {
        return Err(ReviewError::WrongType {
            api_version: api_version.into_owned(),
            kind: kind.into_owned(),
        });
    }
    let request = request.ok_or(ReviewError::MissingRequest)?;
    if request.uid.is_empty() {
        return Err(ReviewError::EmptyUid);
    }
    Ok(request)
}

type Envelope<'a, O> = (Cow<'a, str>, Cow<'a, str>, Option<AdmissionRequest<'a, O>>);

fn read_envelope<'a, O: ObjectView<'a>>(
    r: &mut JsonReader<'a>,
) -> Result<Envelope<'a, O>, ReadError> {
    let (mut api_version, mut kind, mut request) = (None, None, None);
    let mut cursor = r.object("an AdmissionReview object")?;
    while let Some(key) = r.next_key(&mut cursor)? {
        match &*key {
            "apiVersion" => set_once(r, &mut api_version, "apiVersion", JsonReader::string)?,
            "kind" => set_once(r, &mut kind, "kind", JsonReader::string)?,
            "request" => set_once(r, &mut request, "request", |r| {
                if r.null()? {
                    Ok(None)
                } else {
                    read_request(r).map(Some)
                }
            })?,
            _ => r.skip_value()?,
        }
    }
    Ok((
        api_version.unwrap_or_default(),
        kind.unwrap_or_default(),
        request.flatten(),
    ))
}

fn read_request<'a, O: ObjectView<'a>>(
    r: &mut JsonReader<'a>,
) -> Result<AdmissionRequest<'a, O>, ReadError> {
    let (mut uid, mut resource, mut operation) = (None, None, None);
    let (mut sub_resource, mut name, mut namespace) = (None, None, None);
    let (mut dry_run, mut object) = (None, None);
    let mut cursor = r.object("a request object")?;
    while let Some(key) = r.next_key(&mut cursor)? {
        match &*key {
            "uid" => set_once(r, &mut uid, "uid", JsonReader::string)?,
            "resource" => set_once(r, &mut resource, "resource", read_resource)?,
            "subResource" => set_once(
                r,
                &mut sub_resource,
                "subResource",
                JsonReader::optional_string,
            )?,
            "name" => set_once(r, &mut name, "name", JsonReader::optional_string)?,
            "namespace" => set_once(r, &mut namespace, "namespace", JsonReader::optional_string)?,
            "operation" => set_once(r, &mut operation, "operation", JsonReader::string)?,
            "dryRun" => set_once(r, &mut dry_run, "dryRun", JsonReader::optional_bool)?,
            "object" => set_once(r, &mut object, "object", read_object::<O>)?,
            _ => r.skip_value()?,
        }
    }
    let missing = |field: &str| r.wrong_type(&format!("missing field `{field}`"));
    Ok(AdmissionRequest {
        uid: uid.ok_or_else(|| missing("uid"))?,
        resource: resource.ok_or_else(|| missing("resource"))?,
        sub_resource: sub_resource.flatten(),
        name: name.flatten(),
        namespace: namespace.flatten(),
        operation: operation.ok_or_else(|| missing("operation"))?,
        dry_run: dry_run.flatten(),
        object: object.flatten(),
    })
}

/// The object through the view; a view that does not fit leaves the reader after the object.
fn read_object<'a, O: ObjectView<'a>>(
    r: &mut JsonReader<'a>,
) -> Result<Option<Result<O, String>>, ReadError> {
    if r.null()? {
        return Ok(None);
    }
    let start = r.position();
    match O::read(r) {
        Ok(view) => Ok(Some(Ok(view))),
        Err(ReadError::Type(why)) => {
            r.rewind(start);
            r.skip_value()?;
            Ok(Some(Err(why)))
        }
        Err(syntax) => Err(syntax),
    }
}

fn read_resource<'a>(r: &mut JsonReader<'a>) -> Result<GroupVersionResource<'a>, ReadError> {
    let (mut group, mut version, mut resource) = (None, None, None);
    let mut cursor = r.object("a GroupVersionResource object")?;
    while let Some(key) = r.next_key(&mut cursor)? {
        match &*key {
            "group" => set_once(r, &mut group, "group", JsonReader::string)?,
            "version" => set_once(r, &mut version, "version", JsonReader::string)?,
            "resource" => set_once(r, &mut resource, "resource", JsonReader::string)?,
            _ => r.skip_value()?,
        }
    }
    Ok(GroupVersionResource {
        group: group.unwrap_or_default(),
        version: version.unwrap_or_default(),
        resource: resource.unwrap_or_default(),
    })
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
    pub patch: Option<crate::mutate::patch::JsonPatch>,
    pub warnings: Vec<String>,
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

    /// The AdmissionReview answer, written directly: the patch is base64 (which needs no
    /// escaping) straight into the output, the only strings escaped are the uid and warnings.
    pub fn to_json(&self) -> Vec<u8> {
        let patch = self.patch.as_ref().map(|p| p.as_bytes());
        let base64_len = patch.as_ref().map_or(0, |p| p.len().div_ceil(3) * 4);
        let mut out = Vec::with_capacity(160 + self.uid.len() + base64_len);
        out.extend_from_slice(br#"{"apiVersion":""#);
        out.extend_from_slice(API_VERSION.as_bytes());
        out.extend_from_slice(br#"","kind":""#);
        out.extend_from_slice(KIND.as_bytes());
        out.extend_from_slice(br#"","response":{"uid":"#);
        write_str(&mut out, &self.uid);
        out.extend_from_slice(br#","allowed":true"#);
        if let Some(patch) = patch {
            out.extend_from_slice(br#","patchType":"JSONPatch","patch":"#);
            write_base64_str(&mut out, patch);
        }
        if !self.warnings.is_empty() {
            out.extend_from_slice(br#","warnings":["#);
            for (i, w) in self.warnings.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                if w.chars().count() > MAX_WARNING_CHARS {
                    let mut short: String = w.chars().take(MAX_WARNING_CHARS - 1).collect();
                    short.push('…');
                    write_str(&mut out, &short);
                } else {
                    write_str(&mut out, w);
                }
            }
            out.push(b']');
        }
        out.extend_from_slice(b"}}");
        out
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

    /// An object left unread: its JSON text (the envelope tests need no view).
    #[derive(Debug)]
    struct RawObject<'a>(&'a str);

    impl<'a> ObjectView<'a> for RawObject<'a> {
        fn read(r: &mut JsonReader<'a>) -> Result<Self, ReadError> {
            r.raw().map(RawObject)
        }
    }

    #[test]
    fn decodes_a_minimal_review() {
        let body = br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{"uid":"u1","kind":{"group":"","version":"v1","kind":"Pod"},"resource":{"group":"","version":"v1","resource":"pods"},"operation":"CREATE","object":{"a":1}}}"#;
        let r = decode_review::<RawObject>(body).unwrap();
        assert_eq!(r.uid, "u1");
        assert_eq!(r.resource.resource, "pods");
        assert_eq!(r.object.unwrap().unwrap().0, r#"{"a":1}"#);
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
    fn a_body_that_is_not_utf8_is_not_json() {
        let body = b"{\"apiVersion\":\"admission.k8s.io/v1\",\"kind\":\"AdmissionReview\xff\"}";
        match decode_review::<RawObject>(body) {
            Err(ReviewError::NotJson(why)) => assert!(why.contains("UTF-8"), "{why}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn answer_round_trips_its_patch() {
        let patch: json_patch::Patch =
            serde_json::from_value(serde_json::json!([{"op": "add", "path": "/a", "value": 1}]))
                .unwrap();
        let answer = AdmissionAnswer {
            uid: "u".into(),
            patch: Some((&patch).into()),
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
