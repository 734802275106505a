//! The AdmissionReview envelope (admission.k8s.io/v1), decoded with serde.
//!
//! Only what admission reads is decoded, strings borrowed from the body where they hold no
//! escapes; the rest (userInfo, oldObject, options, ...) is skipped (still checked to be JSON).
//! The admitted object is kept as its raw JSON text: it is decoded through the endpoint's view
//! only once the policy wants it, and a view that does not fit leaves the envelope sound, so
//! the review is still answered with its uid.

use std::borrow::Cow;
use std::fmt;
use std::marker::PhantomData;

use serde::de::value::MapAccessDeserializer;
use serde::de::{IgnoredAny, MapAccess, Visitor};
use serde::{Deserialize, Deserializer};
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

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct GroupVersionResource<'a> {
    #[serde(default, borrow)]
    pub group: Cow<'a, str>,
    #[serde(default, borrow)]
    pub version: Cow<'a, str>,
    #[serde(default, borrow)]
    pub resource: Cow<'a, str>,
}

/// The parts of an admission request this webhook reads.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AdmissionRequest<'a> {
    #[serde(borrow)]
    pub uid: Cow<'a, str>,
    #[serde(borrow, deserialize_with = "object")]
    pub resource: GroupVersionResource<'a>,
    #[serde(default, borrow)]
    pub sub_resource: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    pub name: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    pub namespace: Option<Cow<'a, str>>,
    #[serde(borrow)]
    pub operation: Cow<'a, str>,
    #[serde(default)]
    pub dry_run: Option<bool>,
    /// The admitted object's JSON text (`None`: absent or null).
    #[serde(default, borrow)]
    pub object: Option<&'a RawValue>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Envelope<'a> {
    #[serde(default, borrow)]
    api_version: Cow<'a, str>,
    #[serde(default, borrow)]
    kind: Cow<'a, str>,
    #[serde(default, borrow, deserialize_with = "object_or_null")]
    request: Option<AdmissionRequest<'a>>,
}

/// Decodes the envelope and the request; the object stays raw.
pub fn decode_review(body: &[u8]) -> Result<AdmissionRequest<'_>, ReviewError> {
    let text = std::str::from_utf8(body)
        .map_err(|e| ReviewError::NotJson(format!("invalid UTF-8: {e}")))?;
    let envelope: Envelope = from_object(text).map_err(|e| why_not(text, e))?;
    if envelope.api_version != API_VERSION || envelope.kind != KIND {
        return Err(ReviewError::WrongType {
            api_version: envelope.api_version.into_owned(),
            kind: envelope.kind.into_owned(),
        });
    }
    let request = envelope.request.ok_or(ReviewError::MissingRequest)?;
    if request.uid.is_empty() {
        return Err(ReviewError::EmptyUid);
    }
    Ok(request)
}

/// The clearest reason a body did not decode: not JSON at all (a type error may come before a
/// syntax error further on), then a wrong apiVersion/kind, then the type error itself.
fn why_not(text: &str, e: serde_json::Error) -> ReviewError {
    if !e.is_data() {
        return ReviewError::NotJson(e.to_string());
    }
    if let Err(syntax) = serde_json::from_str::<IgnoredAny>(text) {
        return ReviewError::NotJson(syntax.to_string());
    }
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct TypeOnly {
        #[serde(default)]
        api_version: String,
        #[serde(default)]
        kind: String,
    }
    match serde_json::from_str::<TypeOnly>(text) {
        Ok(t) if t.api_version != API_VERSION || t.kind != KIND => ReviewError::WrongType {
            api_version: t.api_version,
            kind: t.kind,
        },
        _ => ReviewError::NotAReview(e.to_string()),
    }
}

/// `T` from `text`, which must be one JSON object (and nothing after it).
pub(super) fn from_object<'a, T: Deserialize<'a>>(text: &'a str) -> serde_json::Result<T> {
    let mut de = serde_json::Deserializer::from_str(text);
    let value = object(&mut de)?;
    de.end()?;
    Ok(value)
}

/// Deserializes `T` from a JSON object only. Derived structs also accept arrays (fields by
/// position), and a patch addressing members of an array would not apply.
pub(super) fn object<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<T, D::Error> {
    struct Only<T>(PhantomData<T>);
    impl<'de, T: Deserialize<'de>> Visitor<'de> for Only<T> {
        type Value = T;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("an object")
        }
        fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
            T::deserialize(MapAccessDeserializer::new(map))
        }
    }
    d.deserialize_map(Only(PhantomData))
}

/// As [`object`], with null as `None` (an absent field too, with `#[serde(default)]`).
pub(super) fn object_or_null<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
    d: D,
) -> Result<Option<T>, D::Error> {
    struct OrNull<T>(PhantomData<T>);
    impl<'de, T: Deserialize<'de>> Visitor<'de> for OrNull<T> {
        type Value = Option<T>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("an object or null")
        }
        fn visit_none<E>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_unit<E>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            object(d).map(Some)
        }
    }
    d.deserialize_option(OrNull(PhantomData))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_a_minimal_review() {
        let body = br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{"uid":"u1","kind":{"group":"","version":"v1","kind":"Pod"},"resource":{"group":"","version":"v1","resource":"pods"},"operation":"CREATE","object":{"a":1}}}"#;
        let r = decode_review(body).unwrap();
        assert_eq!(r.uid, "u1");
        assert_eq!(r.resource.resource, "pods");
        assert_eq!(r.object.unwrap().get(), r#"{"a":1}"#);
        assert!(matches!(r.uid, Cow::Borrowed(_)), "strings borrow the body");
    }

    #[test]
    fn rejects_bad_envelopes() {
        assert!(matches!(
            decode_review(b"nope"),
            Err(ReviewError::NotJson(_))
        ));
        assert!(matches!(
            decode_review(b"[]"),
            Err(ReviewError::WrongType { .. })
        ));
        assert!(matches!(
            decode_review(b"{\"apiVersion\": 5}"),
            Err(ReviewError::NotAReview(_))
        ));
        assert!(matches!(
            decode_review(b"{\"apiVersion\": "),
            Err(ReviewError::NotJson(_))
        ));
        // A type error first, a syntax error further on: not JSON is the reason.
        assert!(matches!(
            decode_review(b"{\"apiVersion\": 5, ]"),
            Err(ReviewError::NotJson(_))
        ));
        assert!(matches!(
            decode_review(b"{\"apiVersion\": \"\xff\"}"),
            Err(ReviewError::NotJson(_))
        ));
        assert!(matches!(
            decode_review(br#"{"apiVersion":"admission.k8s.io/v1beta1","kind":"AdmissionReview","request":{}}"#),
            Err(ReviewError::WrongType { .. })
        ));
        assert!(matches!(
            decode_review(br#"{"apiVersion":"v1","kind":"Pod"}"#),
            Err(ReviewError::WrongType { .. })
        ));
        assert!(matches!(
            decode_review(br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview"}"#),
            Err(ReviewError::MissingRequest)
        ));
        assert!(matches!(
            decode_review(
                br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":null}"#
            ),
            Err(ReviewError::MissingRequest)
        ));
        let with = |request: &str| {
            format!(
                r#"{{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{request}}}"#
            )
        };
        assert_eq!(
            decode_review(with(r#"{"uid":"","resource":{},"operation":"CREATE"}"#).as_bytes())
                .unwrap_err(),
            ReviewError::EmptyUid
        );
        for unsound in [
            r#"{"resource":{},"operation":"CREATE"}"#,
            r#"{"uid":"u","operation":"CREATE"}"#,
            r#"{"uid":"u","resource":{}}"#,
            r#"{"uid":5}"#,
            r#"{"uid":5,"resource":{},"operation":"CREATE"}"#,
            r#"{"uid":"u","resource":["", "v1", "pods"],"operation":"CREATE"}"#,
            r#"{"uid":"u","resource":null,"operation":"CREATE"}"#,
            r#"{"uid":"u","resource":{},"operation":"CREATE","dryRun":"yes"}"#,
            r#"{"uid":"u","resource":{},"operation":"CREATE","namespace":7}"#,
            r#"{"uid":"u","uid":"v","resource":{},"operation":"CREATE"}"#,
            r#"["u", {}, null, null, null, "CREATE"]"#,
        ] {
            assert!(
                matches!(
                    decode_review(with(unsound).as_bytes()),
                    Err(ReviewError::NotAReview(_))
                ),
                "{unsound}"
            );
        }
        assert!(matches!(
            decode_review(
                format!(
                    "{} x",
                    with(r#"{"uid":"u","resource":{},"operation":"CREATE"}"#)
                )
                .as_bytes()
            ),
            Err(ReviewError::NotJson(_))
        ));
    }

    #[test]
    fn a_body_that_is_not_utf8_is_not_json() {
        let body = b"{\"apiVersion\":\"admission.k8s.io/v1\",\"kind\":\"AdmissionReview\xff\"}";
        match decode_review(body) {
            Err(ReviewError::NotJson(why)) => assert!(why.contains("UTF-8"), "{why}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn optional_request_fields_may_be_null_and_unknown_ones_are_skipped() {
        let body = br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","extra":[1,{"a":null}],"request":{"uid":"u\u0031","resource":{"resource":"persistentvolumeclaims"},"subResource":null,"name":null,"namespace":"vms","operation":"CREATE","dryRun":null,"object":null,"userInfo":{"username":"x"}}}"#;
        let r = decode_review(body).unwrap();
        assert_eq!(r.uid, "u1");
        assert_eq!(r.resource.group, "");
        assert_eq!(r.sub_resource, None);
        assert_eq!(r.namespace.as_deref(), Some("vms"));
        assert_eq!(r.dry_run, None);
        assert!(r.object.is_none());
    }
}
