//! Property test: mutated captured AdmissionReviews thrown at admission.
//!
//! Whatever the input, admission answers or refuses (never panics). A body serde_json reads
//! is answered exactly when its envelope is sound (judged here on serde_json's `Value`, apart
//! from the webhook's code): allowed, with its own uid, and any patch applies cleanly to the
//! object it was computed for. Every other body is refused (HTTP 400), and "not JSON" only
//! when serde_json does not read it either.

use std::sync::Arc;

use proptest::prelude::*;
use serde::de::{MapAccess, Visitor};
use serde::{Deserialize, Deserializer};
use serde_json::value::RawValue;
use serde_json::{json, Value};
use vmdisk_tests::webhook::{as_sent, fixtures, sample_catalog_yaml};
use vmdisk_webhook::admission::{decode_patch_field, Admission, ReviewError};
use vmdisk_webhook::catalog::file::FileCatalog;
use vmdisk_webhook::metrics::Resource;
use vmdisk_webhook::mutate::MutationConfig;

fn admission() -> Admission {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("c.yaml"), sample_catalog_yaml()).unwrap();
    let catalog = FileCatalog::open(dir.path()).unwrap();
    Admission::new(catalog, MutationConfig::default())
}
/// Every JSON pointer in `v`.
fn pointers(v: &Value, prefix: String, out: &mut Vec<String>) {
    out.push(prefix.clone());
    match v {
        Value::Object(m) => {
            for (k, child) in m {
                let k = k.replace('~', "~0").replace('/', "~1");
                pointers(child, format!("{prefix}/{k}"), out);
            }
        }
        Value::Array(a) => {
            for (i, child) in a.iter().enumerate() {
                pointers(child, format!("{prefix}/{i}"), out);
            }
        }
        _ => {}
    }
}

fn odd_value(seed: u32) -> Value {
    match seed % 12 {
        0 => Value::Null,
        1 => json!(true),
        2 => json!(-1),
        3 => json!(1.5e300),
        4 => json!(""),
        5 => json!("vmdisk.io"),
        6 => json!("VMDiskImage"),
        7 => json!([]),
        8 => json!({}),
        9 => json!({"apiGroup": "vmdisk.io", "kind": "VMDiskImage", "name": "fedora-40"}),
        10 => json!("1Mi"),
        _ => json!("ü🙂\u{0000}".repeat((seed % 5) as usize)),
    }
}

#[derive(Debug, Clone)]
enum Op {
    Delete(u32),
    Replace(u32, u32),
    InsertSibling(u32, u32),
    Truncate(u32),
    FlipByte(u32, u8),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => any::<u32>().prop_map(Op::Delete),
        6 => (any::<u32>(), any::<u32>()).prop_map(|(a, b)| Op::Replace(a, b)),
        2 => (any::<u32>(), any::<u32>()).prop_map(|(a, b)| Op::InsertSibling(a, b)),
        1 => any::<u32>().prop_map(Op::Truncate),
        1 => (any::<u32>(), any::<u8>()).prop_map(|(a, b)| Op::FlipByte(a, b)),
    ]
}

fn apply_ops(mut doc: Value, ops: &[Op]) -> Vec<u8> {
    let mut raw: Option<Vec<u8>> = None;
    for op in ops {
        if let Some(bytes) = raw.as_mut() {
            match op {
                Op::Truncate(at) if !bytes.is_empty() => bytes.truncate(*at as usize % bytes.len()),
                Op::FlipByte(at, b) if !bytes.is_empty() => {
                    let i = *at as usize % bytes.len();
                    bytes[i] ^= b | 1;
                }
                _ => {}
            }
            continue;
        }
        let mut all = Vec::new();
        pointers(&doc, String::new(), &mut all);
        let pick = |seed: u32| all[seed as usize % all.len()].clone();
        match op {
            Op::Delete(s) => {
                let p = pick(*s);
                if let Some((parent, key)) = p.rsplit_once('/') {
                    match doc.pointer_mut(parent) {
                        Some(Value::Object(m)) => {
                            m.remove(&key.replace("~1", "/").replace("~0", "~"));
                        }
                        Some(Value::Array(a)) => {
                            if let Ok(i) = key.parse::<usize>() {
                                if i < a.len() {
                                    a.remove(i);
                                }
                            }
                        }
                        _ => {}
                    }
                }
            }
            Op::Replace(s, v) => {
                let p = pick(*s);
                if let Some(slot) = doc.pointer_mut(&p) {
                    *slot = odd_value(*v);
                }
            }
            Op::InsertSibling(s, v) => {
                let p = pick(*s);
                if let Some(Value::Object(m)) = doc.pointer_mut(&p) {
                    m.insert(format!("x{v}"), odd_value(*v));
                }
            }
            Op::Truncate(_) | Op::FlipByte(..) => {
                raw = Some(serde_json::to_vec(&doc).unwrap());
                if let Some(bytes) = raw.as_mut() {
                    match op {
                        Op::Truncate(at) => bytes.truncate(*at as usize % bytes.len()),
                        Op::FlipByte(at, b) => {
                            let i = *at as usize % bytes.len();
                            bytes[i] ^= b | 1;
                        }
                        _ => unreachable!(),
                    }
                }
            }
        }
    }
    raw.unwrap_or_else(|| serde_json::to_vec(&doc).unwrap())
}

/// The members of a JSON object in order, repeated keys kept (`Value` keeps the last).
struct Members(Vec<(String, Box<RawValue>)>);

impl<'de> Deserialize<'de> for Members {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Members;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Members, A::Error> {
                let mut members = Vec::new();
                while let Some(entry) = map.next_entry()? {
                    members.push(entry);
                }
                Ok(Members(members))
            }
        }
        d.deserialize_map(V)
    }
}

/// No key repeats in the review, its request or the request's resource.
fn envelope_keys_unique(text: &str) -> bool {
    let unique = |text: &str| -> Option<Members> {
        let members: Members = serde_json::from_str(text).ok()?;
        let mut keys: Vec<&str> = members.0.iter().map(|(k, _)| k.as_str()).collect();
        keys.sort_unstable();
        let before = keys.len();
        keys.dedup();
        (keys.len() == before).then_some(members)
    };
    let member = |m: &Members, key: &str| {
        m.0.iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.get().to_string())
    };
    (|| {
        let review = unique(text)?;
        let request = unique(&member(&review, "request")?)?;
        unique(&member(&request, "resource")?)
    })()
    .is_some()
}

/// Whether admission must answer this review: admission.k8s.io/v1 AdmissionReview, a request
/// object with a non-empty string uid, a resource object (group, version, resource strings if
/// there), a string operation, subResource/name/namespace strings or null, dryRun a bool or
/// null, no repeated key among those. The object may be anything.
fn sound(text: &str, review: &Value) -> bool {
    let is = |v: Option<&Value>, ok: fn(&Value) -> bool| v.is_some_and(ok);
    let absent_or = |v: Option<&Value>, ok: fn(&Value) -> bool| v.is_none_or(ok);
    let Some(request) = review.get("request").and_then(Value::as_object) else {
        return false;
    };
    review.get("apiVersion") == Some(&json!("admission.k8s.io/v1"))
        && review.get("kind") == Some(&json!("AdmissionReview"))
        && request
            .get("uid")
            .and_then(Value::as_str)
            .is_some_and(|uid| !uid.is_empty())
        && is(request.get("operation"), Value::is_string)
        && request
            .get("resource")
            .and_then(Value::as_object)
            .is_some_and(|r| {
                ["group", "version", "resource"]
                    .iter()
                    .all(|k| absent_or(r.get(*k), Value::is_string))
            })
        && ["subResource", "name", "namespace"]
            .iter()
            .all(|k| absent_or(request.get(*k), |v| v.is_string() || v.is_null()))
        && absent_or(request.get("dryRun"), |v| v.is_boolean() || v.is_null())
        && envelope_keys_unique(text)
}

fn check(admission: &Admission, body: &[u8], resource: Resource) -> Result<(), TestCaseError> {
    let admitted = admission.review(resource, body);
    let parsed = serde_json::from_slice::<Value>(body);
    if let Err(ReviewError::NotJson(why)) = &admitted {
        prop_assert!(
            parsed.is_err(),
            "called not JSON ({}) but serde_json reads it",
            why
        );
    }
    // Strings admission does not read are not checked for lone surrogate escapes, which
    // serde_json's Value refuses: such bodies may be answered, and are checked no further.
    let Ok(review) = parsed else {
        if let Ok(admitted) = admitted {
            prop_assert!(!admitted.answer.uid.is_empty());
        }
        return Ok(());
    };
    let text = std::str::from_utf8(body).unwrap();
    match admitted {
        Err(e) => {
            prop_assert!(!e.to_string().is_empty());
            prop_assert!(!sound(text, &review), "a sound review refused: {}", e);
        }
        Ok(admitted) => {
            prop_assert!(sound(text, &review), "an unsound review answered");
            let answer = &admitted.answer;
            let encoded: Value = serde_json::from_slice(&answer.to_json()).unwrap();
            prop_assert_eq!(&encoded["response"]["allowed"], &json!(true));
            prop_assert_eq!(&encoded["response"]["uid"], &review["request"]["uid"]);
            prop_assert_eq!(&review["request"]["uid"], &json!(answer.uid));
            if let Some(p) = encoded["response"].get("patch") {
                let patch = decode_patch_field(p).map_err(TestCaseError::fail)?;
                let mut object = review["request"]["object"].clone();
                prop_assert!(
                    json_patch::patch(&mut object, &patch).is_ok(),
                    "patch {:?} does not apply",
                    patch
                );
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 10_000, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn mutated_fixtures_never_break_the_handler(
        index in any::<usize>(),
        ops in proptest::collection::vec(op(), 1..6),
        to_pod_endpoint in any::<bool>(),
    ) {
        thread_local! {
            static STATE: (Arc<Admission>, Vec<(String, Value)>) = (
                Arc::new(admission()),
                fixtures().into_iter().map(|(n, b)| (n, serde_json::from_slice(&b).unwrap())).collect(),
            );
        }
        STATE.with(|(admission, all)| {
            let (_, doc) = &all[index % all.len()];
            let body = apply_ops(doc.clone(), &ops);
            let resource = if to_pod_endpoint { Resource::Pod } else { Resource::Pvc };
            check(admission, &body, resource)
        })?;
    }
}

#[test]
fn unmutated_fixtures_pass_the_same_checks() {
    let admission = admission();
    for (name, body) in fixtures() {
        let review: Value = serde_json::from_slice(&body).unwrap();
        assert!(
            sound(std::str::from_utf8(&body).unwrap(), &review),
            "{name}"
        );
        for resource in [Resource::Pvc, Resource::Pod] {
            check(&admission, &body, resource).unwrap_or_else(|e| panic!("{name}: {e}"));
        }
    }
}

/// The oracle itself: what it calls unsound is, and admission refuses it.
#[test]
fn unsound_envelopes_are_refused() {
    let admission = admission();
    let (_, body) = fixtures()
        .into_iter()
        .find(|(n, _)| n == "pvc-create-plain.json")
        .unwrap();
    let review: Value = serde_json::from_slice(&body).unwrap();
    let edits: [(&str, Value); 9] = [
        ("/apiVersion", json!("admission.k8s.io/v1beta1")),
        ("/kind", json!("Review")),
        ("/request", json!(null)),
        ("/request/uid", json!("")),
        ("/request/uid", json!(7)),
        ("/request/resource", json!([])),
        ("/request/resource/group", json!(null)),
        ("/request/operation", json!(null)),
        ("/request/dryRun", json!("true")),
    ];
    for (pointer, value) in edits {
        let mut edited = review.clone();
        *edited.pointer_mut(pointer).unwrap() = value.clone();
        let text = serde_json::to_string(&edited).unwrap();
        assert!(!sound(&text, &edited), "{pointer} = {value}");
        assert!(
            admission.review(Resource::Pvc, text.as_bytes()).is_err(),
            "{pointer} = {value}"
        );
        check(&admission, text.as_bytes(), Resource::Pvc).unwrap();
    }
    let text = String::from_utf8(as_sent(&body)).unwrap();
    let repeated = text.replacen(r#""uid":"#, r#""uid":"x","uid":"#, 1);
    assert!(!envelope_keys_unique(&repeated));
    assert!(admission
        .review(Resource::Pvc, repeated.as_bytes())
        .is_err());
    assert!(envelope_keys_unique(&text));
}

/// Bytes that matter to a JSON grammar, for edits that probe it.
const SIGNIFICANT: &[u8] = b"{}[],:\"\\ \t\n0123456789.eE+-tfnrulsa/\x01\x1f\x7f";

proptest! {
    #![proptest_config(ProptestConfig { cases: 20_000, failure_persistence: None, ..ProptestConfig::default() })]

    /// Byte edits (replace, insert, delete with grammar bytes, a few at a time) of the compact
    /// fixtures, through the same checks on both endpoints.
    #[test]
    fn byte_edited_reviews_are_answered_exactly_when_sound(
        index in any::<usize>(),
        edits in proptest::collection::vec((0u8..3, any::<usize>(), any::<usize>()), 1..4),
    ) {
        thread_local! {
            static BODIES: Vec<Vec<u8>> = fixtures().iter().map(|(_, b)| as_sent(b)).collect();
        }
        let mut body = BODIES.with(|all| all[index % all.len()].clone());
        for (kind, at, pick) in edits {
            let at = at % (body.len() + 1);
            let byte = SIGNIFICANT[pick % SIGNIFICANT.len()];
            match kind {
                0 if at < body.len() => body[at] = byte,
                1 => body.insert(at, byte),
                _ if at < body.len() => {
                    body.remove(at);
                }
                _ => {}
            }
        }
        thread_local! {
            static ADMISSION: Admission = admission();
        }
        ADMISSION.with(|admission| {
            check(admission, &body, Resource::Pvc)?;
            check(admission, &body, Resource::Pod)
        })?;
    }
}
