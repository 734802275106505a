//! JSON Patch assembly with escaped path segments.

use json_patch::jsonptr::PointerBuf;
use json_patch::{AddOperation, Patch, PatchOperation};
use serde_json::Value;

#[derive(Debug, Default)]
pub struct PatchBuilder(Vec<PatchOperation>);

impl PatchBuilder {
    /// `add` at the path made of `segments` (escaped here: label keys contain `/`). `add` on an
    /// existing object member replaces it, which is what every caller wants.
    pub fn add(&mut self, segments: &[&str], value: Value) {
        self.0.push(PatchOperation::Add(AddOperation {
            path: PointerBuf::from_tokens(segments.iter().copied()),
            value,
        }));
    }

    pub fn build(self) -> Option<Patch> {
        (!self.0.is_empty()).then_some(Patch(self.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_segments() {
        let mut b = PatchBuilder::default();
        b.add(&["metadata", "labels", "vmdisk.io/image"], Value::from("x"));
        let p = b.build().unwrap();
        assert_eq!(
            serde_json::to_value(&p).unwrap(),
            serde_json::json!([{"op": "add", "path": "/metadata/labels/vmdisk.io~1image", "value": "x"}])
        );
        assert!(PatchBuilder::default().build().is_none());
    }
}
