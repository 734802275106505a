//! JSON text written straight into a buffer, for the admission answer and its patch values:
//! the counterpart of [`crate::json_reader`]. The output is byte for byte what serde_json
//! writes for the same values (the tests compare), so nothing downstream can tell.
//!
//! serde_json's string writer looks at every byte through a table and copies runs between
//! escapes; answers are mostly short names and base64, so a string here is checked in one
//! vector loop and copied whole when nothing in it needs an escape.

use serde::Serialize;

use crate::json_reader::find_string_special;

/// A value that writes itself as JSON text.
pub trait ToJson {
    fn write_json(&self, out: &mut Vec<u8>);
}

impl ToJson for str {
    fn write_json(&self, out: &mut Vec<u8>) {
        write_str(out, self);
    }
}

impl ToJson for String {
    fn write_json(&self, out: &mut Vec<u8>) {
        write_str(out, self);
    }
}

impl<T: ToJson + ?Sized> ToJson for &T {
    fn write_json(&self, out: &mut Vec<u8>) {
        (**self).write_json(out);
    }
}

impl<T: ToJson> ToJson for [T] {
    fn write_json(&self, out: &mut Vec<u8>) {
        out.push(b'[');
        for (i, item) in self.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            item.write_json(out);
        }
        out.push(b']');
    }
}

impl<T: ToJson> ToJson for Vec<T> {
    fn write_json(&self, out: &mut Vec<u8>) {
        self.as_slice().write_json(out);
    }
}

/// Any serde value, through serde_json (for the rare, nested ones: node affinity terms).
pub struct Serde<'a, T: Serialize + ?Sized>(pub &'a T);

impl<T: Serialize + ?Sized> ToJson for Serde<'_, T> {
    fn write_json(&self, out: &mut Vec<u8>) {
        serde_json::to_writer(out, self.0).expect("serializing into a Vec cannot fail");
    }
}

/// An object written member by member; members that are `None` are left out, as
/// `skip_serializing_if = "Option::is_none"` does.
pub struct ObjectWriter<'o> {
    out: &'o mut Vec<u8>,
    first: bool,
}

impl<'o> ObjectWriter<'o> {
    pub fn new(out: &'o mut Vec<u8>) -> Self {
        out.push(b'{');
        Self { out, first: true }
    }

    /// Keys are names fixed in the code (field names, `vmdisk.io/` keys): written as they are.
    pub fn member(mut self, key: &'static str, value: &(impl ToJson + ?Sized)) -> Self {
        debug_assert_eq!(find_string_special(key.as_bytes(), 0), key.len(), "{key}");
        if !self.first {
            self.out.push(b',');
        }
        self.first = false;
        self.out.push(b'"');
        self.out.extend_from_slice(key.as_bytes());
        self.out.extend_from_slice(b"\":");
        value.write_json(self.out);
        self
    }

    pub fn optional(self, key: &'static str, value: Option<&(impl ToJson + ?Sized)>) -> Self {
        match value {
            Some(v) => self.member(key, v),
            None => self,
        }
    }

    pub fn end(self) {
        self.out.push(b'}');
    }
}

/// Whether any byte of `bytes` is one of `special` or a control character. Written as a fold
/// without early exit, so it compiles to a vector loop: most strings here are short names.
#[inline]
pub(crate) fn any_special(bytes: &[u8], special: &[u8]) -> bool {
    bytes.iter().fold(false, |any, &b| {
        any | (b < 0x20) | special.iter().fold(false, |hit, &s| hit | (b == s))
    })
}

/// `s` as a JSON string, escaped as serde_json escapes it.
pub fn write_str(out: &mut Vec<u8>, s: &str) {
    let bytes = s.as_bytes();
    out.reserve(bytes.len() + 2);
    out.push(b'"');
    if !any_special(bytes, b"\"\\") {
        out.extend_from_slice(bytes);
        out.push(b'"');
        return;
    }
    let mut from = 0;
    loop {
        let special = find_string_special(bytes, from);
        out.extend_from_slice(&bytes[from..special]);
        let Some(&c) = bytes.get(special) else {
            break;
        };
        match c {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\x08' => out.extend_from_slice(b"\\b"),
            b'\x0c' => out.extend_from_slice(b"\\f"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            _ => {
                const HEX: &[u8; 16] = b"0123456789abcdef";
                out.extend_from_slice(b"\\u00");
                out.push(HEX[usize::from(c >> 4)]);
                out.push(HEX[usize::from(c & 0xf)]);
            }
        }
        from = special + 1;
    }
    out.push(b'"');
}

/// Standard base64 (RFC 4648, padded) of `bytes` as a JSON string: the admission answer's
/// `patch`. Two output characters per table lookup, six input bytes per step.
pub fn write_base64_str(out: &mut Vec<u8>, bytes: &[u8]) {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    /// The two characters of every 12-bit group.
    static PAIRS: [[u8; 2]; 4096] = {
        let mut table = [[0u8; 2]; 4096];
        let mut i = 0;
        while i < 4096 {
            table[i] = [ALPHABET[i >> 6], ALPHABET[i & 63]];
            i += 1;
        }
        table
    };
    let start = out.len();
    out.resize(start + 2 + bytes.len().div_ceil(3) * 4, 0);
    let dst = &mut out[start..];
    dst[0] = b'"';
    let last = dst.len() - 1;
    dst[last] = b'"';
    let mut dst = &mut dst[1..last];
    let mut src = bytes;
    // Eight bytes loaded, six used: stop while eight remain readable.
    while src.len() >= 8 {
        let n = u64::from_be_bytes(src[..8].try_into().expect("eight bytes"));
        for (k, shift) in [52, 40, 28, 16].into_iter().enumerate() {
            dst[2 * k..2 * k + 2].copy_from_slice(&PAIRS[(n >> shift) as usize & 0xfff]);
        }
        src = &src[6..];
        dst = &mut dst[8..];
    }
    let mut chunks = src.chunks_exact(3);
    for chunk in &mut chunks {
        let n = usize::from(chunk[0]) << 16 | usize::from(chunk[1]) << 8 | usize::from(chunk[2]);
        dst[..2].copy_from_slice(&PAIRS[n >> 12]);
        dst[2..4].copy_from_slice(&PAIRS[n & 0xfff]);
        dst = &mut dst[4..];
    }
    match *chunks.remainder() {
        [a] => {
            let n = usize::from(a) << 4;
            dst[..2].copy_from_slice(&PAIRS[n]);
            dst[2..4].copy_from_slice(b"==");
        }
        [a, b] => {
            let n = usize::from(a) << 10 | usize::from(b) << 2;
            dst[..2].copy_from_slice(&PAIRS[n >> 6]);
            dst[2] = ALPHABET[n & 63];
            dst[3] = b'=';
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn text(value: &impl ToJson) -> String {
        let mut out = Vec::new();
        value.write_json(&mut out);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn strings_are_escaped_exactly_as_serde_json_escapes_them() {
        let mut every_byte: String = (0u8..0x80).map(char::from).collect();
        every_byte.push_str("é∑😀 a long run of plain text that crosses sixteen-byte blocks \"");
        for s in [
            "",
            "plain",
            "quote\" and back\\slash",
            "\u{0}\u{1f}\u{7f}\n\r\t\u{8}\u{c}/",
            "0123456789abcdef\"0123456789abcdef\\",
            every_byte.as_str(),
        ] {
            assert_eq!(text(&s), serde_json::to_string(s).unwrap(), "{s:?}");
        }
    }

    #[test]
    fn base64_is_the_standard_padded_encoding() {
        use base64::Engine as _;
        let data: Vec<u8> = (0..=255u8).chain((0..=255u8).rev()).collect();
        for len in 0..data.len() {
            let mut out = Vec::new();
            write_base64_str(&mut out, &data[..len]);
            let expected = base64::engine::general_purpose::STANDARD.encode(&data[..len]);
            assert_eq!(
                String::from_utf8(out).unwrap(),
                format!("\"{expected}\""),
                "{len}"
            );
        }
    }

    #[test]
    fn arrays_objects_and_serde_values_match_serde_json() {
        let modes = vec!["ReadWriteOnce".to_string(), "Read\"Only".to_string()];
        assert_eq!(text(&modes), serde_json::to_string(&modes).unwrap());
        assert_eq!(text(&Vec::<String>::new()), "[]");
        let mut out = Vec::new();
        ObjectWriter::new(&mut out)
            .member("a", "x")
            .optional("skipped", None::<&str>)
            .optional("b", Some(&modes))
            .member("c/d", &Serde(&json!({"n": 1})))
            .end();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            serde_json::to_string(&json!({"a": "x", "b": modes, "c/d": {"n": 1}})).unwrap()
        );
        let mut out = Vec::new();
        ObjectWriter::new(&mut out).end();
        assert_eq!(out, b"{}");
    }
}
