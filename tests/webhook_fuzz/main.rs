//! Property test: mutated captured AdmissionReviews thrown at the admission handler.
//!
//! Whatever the input, the handler answers (never panics), a sound envelope is answered with
//! its own uid and `allowed: true`, and any patch it returns applies cleanly to the object it
//! was computed for. The handler's JSON reader accepts exactly the bodies serde_json accepts,
//! and never calls JSON a body serde_json reads.

use std::sync::Arc;

use proptest::prelude::*;
use serde_json::{json, Value};
use vmdisk_tests::webhook::{as_sent, fixtures, sample_catalog_yaml};
use vmdisk_webhook::admission::{decode_patch_field, ReviewError};
use vmdisk_webhook::catalog::file::FileCatalog;
use vmdisk_webhook::json_reader::JsonReader;
use vmdisk_webhook::metrics::Resource;
use vmdisk_webhook::mutate::MutationConfig;
use vmdisk_webhook::routes::{Handled, Webhook};

fn webhook() -> Webhook {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("c.yaml"), sample_catalog_yaml()).unwrap();
    let catalog = FileCatalog::open(dir.path()).unwrap();
    Webhook::new(catalog, MutationConfig::default())
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

fn check(webhook: &Webhook, body: &[u8], resource: Resource) -> Result<(), TestCaseError> {
    match webhook.admit(resource, body) {
        Handled::BadRequest(e) => {
            prop_assert!(!e.to_string().is_empty());
            if let ReviewError::NotJson(why) = &e {
                prop_assert!(
                    serde_json::from_slice::<Value>(body).is_err(),
                    "called not JSON ({}) but serde_json reads it",
                    why
                );
            }
        }
        Handled::Answer(answer, _) => {
            let encoded: Value = serde_json::from_slice(&answer.to_json()).unwrap();
            prop_assert_eq!(&encoded["response"]["allowed"], &json!(true));
            prop_assert!(!answer.uid.is_empty());
            // The handler skips fields it does not read without validating them (e.g. a bad
            // `\u` escape in an unread string); only strictly valid bodies are checked further.
            let Ok(review) = serde_json::from_slice::<Value>(body) else {
                return Ok(());
            };
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

/// The reader's skip is the validation of everything vmdisk does not read: it must accept what
/// serde_json accepts and refuse what it refuses.
fn skip_agrees_with_serde_json(body: &[u8]) -> Result<(), TestCaseError> {
    let Ok(text) = std::str::from_utf8(body) else {
        return Ok(());
    };
    let mut r = JsonReader::new(text);
    let ours = r.skip_value().and_then(|_| r.finish());
    let theirs = serde_json::from_str::<serde::de::IgnoredAny>(text);
    prop_assert_eq!(
        ours.is_ok(),
        theirs.is_ok(),
        "reader {:?}, serde_json {:?}",
        ours,
        theirs.map(|_| ())
    );
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
            static STATE: (Arc<Webhook>, Vec<(String, Value)>) = (
                Arc::new(webhook()),
                fixtures().into_iter().map(|(n, b)| (n, serde_json::from_slice(&b).unwrap())).collect(),
            );
        }
        STATE.with(|(webhook, all)| {
            let (_, doc) = &all[index % all.len()];
            let body = apply_ops(doc.clone(), &ops);
            let resource = if to_pod_endpoint { Resource::Pod } else { Resource::Pvc };
            skip_agrees_with_serde_json(&body)?;
            check(webhook, &body, resource)
        })?;
    }
}

#[test]
fn unmutated_fixtures_pass_the_same_checks() {
    let webhook = webhook();
    for (name, body) in fixtures() {
        skip_agrees_with_serde_json(&body).unwrap_or_else(|e| panic!("{name}: {e}"));
        for resource in [Resource::Pvc, Resource::Pod] {
            check(&webhook, &body, resource).unwrap_or_else(|e| panic!("{name}: {e}"));
        }
    }
}

/// Bytes that matter to a JSON grammar, for edits that probe it.
const SIGNIFICANT: &[u8] = b"{}[],:\"\\ \t\n0123456789.eE+-tfnrulsa/\x01\x1f\x7f";

proptest! {
    #![proptest_config(ProptestConfig { cases: 20_000, failure_persistence: None, ..ProptestConfig::default() })]

    /// Byte edits (replace, insert, delete with grammar bytes, a few at a time) of the compact
    /// fixtures, checked against serde_json.
    #[test]
    fn the_reader_accepts_exactly_what_serde_json_accepts(
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
        skip_agrees_with_serde_json(&body)?;
    }
}
