//! JSON Patch assembly, written straight to its wire text with escaped path segments.
//!
//! A patch goes out as JSON text (base64 in the answer); building it as `json_patch` values and
//! serializing those was a fifth of an admission's cost. [`JsonPatch::operations`] parses it
//! back for tests and for anything that applies it.

use crate::json_writer::{any_special, ToJson};

/// A JSON Patch (RFC 6902) as its JSON text: an array of at least one operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JsonPatch(Vec<u8>);

impl JsonPatch {
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// The operations, parsed (the text is always a valid patch).
    pub fn operations(&self) -> json_patch::Patch {
        serde_json::from_slice(&self.0).expect("a built patch is a valid JSON Patch")
    }
}

impl From<&json_patch::Patch> for JsonPatch {
    fn from(patch: &json_patch::Patch) -> Self {
        Self(serde_json::to_vec(patch).expect("a JSON patch always serializes"))
    }
}

/// Appends `add` operations to a patch's text.
#[derive(Debug)]
pub struct PatchBuilder {
    out: Vec<u8>,
    operations: usize,
}

impl Default for PatchBuilder {
    fn default() -> Self {
        // Room for a PVC's patch (about 420 bytes) without growing.
        let mut out = Vec::with_capacity(512);
        out.push(b'[');
        Self { out, operations: 0 }
    }
}

impl PatchBuilder {
    /// `add` of `value` at the path made of `segments` (escaped here: label keys contain `/`).
    /// `add` on an existing object member replaces it, which is what every caller wants.
    pub fn add(&mut self, segments: &[&str], value: &(impl ToJson + ?Sized)) {
        if self.operations > 0 {
            self.out.push(b',');
        }
        self.operations += 1;
        self.out.extend_from_slice(br#"{"op":"add","path":""#);
        for segment in segments {
            self.out.push(b'/');
            let bytes = segment.as_bytes();
            if !any_special(bytes, b"~/\"\\") {
                self.out.extend_from_slice(bytes);
                continue;
            }
            // Pointer escapes (RFC 6901), then JSON string escapes; UTF-8 passes as it is.
            let mut from = 0;
            for (i, &c) in bytes.iter().enumerate() {
                let escaped: &[u8] = match c {
                    b'~' => b"~0",
                    b'/' => b"~1",
                    b'"' => b"\\\"",
                    b'\\' => b"\\\\",
                    c if c < 0x20 => {
                        const HEX: &[u8; 16] = b"0123456789abcdef";
                        self.out.extend_from_slice(&bytes[from..i]);
                        self.out.extend_from_slice(b"\\u00");
                        self.out.push(HEX[usize::from(c >> 4)]);
                        self.out.push(HEX[usize::from(c & 0xf)]);
                        from = i + 1;
                        continue;
                    }
                    _ => continue,
                };
                self.out.extend_from_slice(&bytes[from..i]);
                self.out.extend_from_slice(escaped);
                from = i + 1;
            }
            self.out.extend_from_slice(&bytes[from..]);
        }
        self.out.extend_from_slice(br#"","value":"#);
        value.write_json(&mut self.out);
        self.out.push(b'}');
    }

    pub fn build(mut self) -> Option<JsonPatch> {
        if self.operations == 0 {
            return None;
        }
        self.out.push(b']');
        Some(JsonPatch(self.out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::json_writer::Serde;
    use serde_json::{json, Value};

    #[test]
    fn escapes_segments() {
        let mut b = PatchBuilder::default();
        b.add(&["metadata", "labels", "vmdisk.io/image"], &"x");
        b.add(
            &["metadata", "annotations", "a~b\"c\\d\u{1}é"],
            &Serde(&json!({"k": [1, 2]})),
        );
        let p = b.build().unwrap();
        let parsed: Value = serde_json::from_slice(p.as_bytes()).unwrap();
        assert_eq!(
            parsed,
            json!([
                {"op": "add", "path": "/metadata/labels/vmdisk.io~1image", "value": "x"},
                {"op": "add", "path": "/metadata/annotations/a~0b\"c\\d\u{1}é", "value": {"k": [1, 2]}},
            ])
        );
        // The text is what json_patch itself would write, so applying it behaves the same.
        assert_eq!(JsonPatch::from(&p.operations()), p);
        assert!(PatchBuilder::default().build().is_none());
    }

    #[test]
    fn built_patches_apply() {
        let mut b = PatchBuilder::default();
        b.add(&["spec", "x"], &Serde(&json!({"y": "z"})));
        b.add(&["spec", "x", "w/v"], &Serde(&3));
        let mut doc = json!({"spec": {}});
        json_patch::patch(&mut doc, &b.build().unwrap().operations()).unwrap();
        assert_eq!(doc, json!({"spec": {"x": {"y": "z", "w/v": 3}}}));
    }
}
