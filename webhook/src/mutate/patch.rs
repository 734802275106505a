//! JSON Patch assembly on `json_patch`'s types: a plan's changes become `add` operations whose
//! paths are built from plain segments (escaped by `jsonptr`: label keys contain `/`).

use json_patch::jsonptr::PointerBuf;
use json_patch::{AddOperation, Patch, PatchOperation};
use serde_json::Value;

/// `add` operations in the order they are added. An `add` on an existing object member
/// replaces it, which is what every caller wants.
#[derive(Debug, Default)]
pub struct PatchBuilder(Vec<PatchOperation>);

impl PatchBuilder {
    /// `add` of `value` at the path made of `segments` (unescaped).
    pub fn add(&mut self, segments: &[&str], value: Value) {
        self.0.push(PatchOperation::Add(AddOperation {
            path: PointerBuf::from_tokens(segments.iter().copied()),
            value,
        }));
    }

    /// The patch, or `None` when nothing was added.
    pub fn build(self) -> Option<Patch> {
        (!self.0.is_empty()).then_some(Patch(self.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn escapes_segments() {
        let mut b = PatchBuilder::default();
        b.add(&["metadata", "labels", "vmdisk.io/image"], json!("x"));
        b.add(
            &["metadata", "annotations", "a~b\"c\\d\u{1}é"],
            json!({"k": [1, 2]}),
        );
        let p = b.build().unwrap();
        assert_eq!(
            serde_json::to_value(&p).unwrap(),
            json!([
                {"op": "add", "path": "/metadata/labels/vmdisk.io~1image", "value": "x"},
                {"op": "add", "path": "/metadata/annotations/a~0b\"c\\d\u{1}é", "value": {"k": [1, 2]}},
            ])
        );
        assert!(PatchBuilder::default().build().is_none());
    }

    #[test]
    fn built_patches_apply() {
        let mut b = PatchBuilder::default();
        b.add(&["spec", "x"], json!({"y": "z"}));
        b.add(&["spec", "x", "w/v"], json!(3));
        let mut doc = json!({"spec": {}});
        json_patch::patch(&mut doc, &b.build().unwrap()).unwrap();
        assert_eq!(doc, json!({"spec": {"x": {"y": "z", "w/v": 3}}}));
    }
}
