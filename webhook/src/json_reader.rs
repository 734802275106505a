//! A strict JSON pull reader for the admission path: the review's envelope and the objects'
//! metadata are read field by field, and everything vmdisk does not read (managedFields,
//! userInfo, options, other annotations) is skipped in bulk, 16 bytes at a time inside strings.
//!
//! serde_json spent most of an admission skipping those values token by token. Skipping here
//! still validates: a value is accepted only if it is RFC 8259 JSON, as serde_json would accept
//! it (the tests compare the two on mutated reviews). Parts read through serde types (a pod spec,
//! a PVC's data source references) are handed to serde_json in place, without a second scan.

use std::borrow::Cow;

use serde::de::DeserializeOwned;

/// Why a body could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReadError {
    /// Not JSON at all (the message says where).
    #[error("{0}")]
    Syntax(String),
    /// JSON, but a value has the wrong type, or a field is missing or repeated.
    #[error("{0}")]
    Type(String),
}

/// Deepest nesting a skipped value may have (serde_json's limit too).
const MAX_DEPTH: u32 = 128;

pub struct JsonReader<'a> {
    text: &'a str,
    pos: usize,
}

/// Where the reader is inside one object (see [`JsonReader::next_key`]).
pub struct ObjectCursor {
    first: bool,
}

type Result<T> = std::result::Result<T, ReadError>;

impl<'a> JsonReader<'a> {
    pub fn new(text: &'a str) -> Self {
        Self { text, pos: 0 }
    }

    fn bytes(&self) -> &'a [u8] {
        self.text.as_bytes()
    }

    /// Position of the reader, to come back to with [`Self::rewind`].
    pub fn position(&self) -> usize {
        self.pos
    }

    pub fn rewind(&mut self, pos: usize) {
        self.pos = pos;
    }

    /// A syntax error at the current position, with its line and column as serde_json reports them.
    pub fn syntax(&self, what: &str) -> ReadError {
        ReadError::Syntax(format!("{what} at {}", self.location()))
    }

    /// A type error at the current position.
    pub fn wrong_type(&self, what: &str) -> ReadError {
        ReadError::Type(format!("{what} at {}", self.location()))
    }

    fn location(&self) -> String {
        let before = &self.bytes()[..self.pos.min(self.text.len())];
        let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
        let column = before.len()
            - before
                .iter()
                .rposition(|&b| b == b'\n')
                .map_or(0, |i| i + 1);
        format!("line {line} column {column}")
    }
    fn skip_whitespace(&mut self) {
        self.pos = skip_whitespace(self.bytes(), self.pos);
    }

    /// The next byte after whitespace, not consumed.
    pub fn peek(&mut self) -> Result<u8> {
        self.skip_whitespace();
        self.bytes()
            .get(self.pos)
            .copied()
            .ok_or_else(|| self.syntax("EOF while parsing a value"))
    }
    fn expect(&mut self, byte: u8, what: &str) -> Result<()> {
        if self.peek()? == byte {
            self.pos += 1;
            Ok(())
        } else {
            Err(self.syntax(what))
        }
    }

    /// Only whitespace may follow the value read.
    pub fn finish(&mut self) -> Result<()> {
        self.skip_whitespace();
        if self.pos == self.text.len() {
            Ok(())
        } else {
            Err(self.syntax("trailing characters"))
        }
    }

    /// Consumes a `null` if one comes next.
    pub fn null(&mut self) -> Result<bool> {
        if self.peek()? == b'n' {
            self.literal(b"null")?;
            Ok(true)
        } else {
            Ok(false)
        }
    }

    /// Enters an object (`{`); a value of another type is a type error naming `expected`.
    pub fn object(&mut self, expected: &str) -> Result<ObjectCursor> {
        match self.peek()? {
            b'{' => {
                self.pos += 1;
                Ok(ObjectCursor { first: true })
            }
            _ => Err(self.mismatch(expected)),
        }
    }

    /// The next key of the object, positioned at its value; `None` after the closing `}`.
    pub fn next_key(&mut self, cursor: &mut ObjectCursor) -> Result<Option<Cow<'a, str>>> {
        let bytes = self.bytes();
        let mut pos = skip_whitespace(bytes, self.pos);
        match bytes.get(pos) {
            Some(b'}') => {
                self.pos = pos + 1;
                return Ok(None);
            }
            Some(b',') if !cursor.first => pos = skip_whitespace(bytes, pos + 1),
            Some(_) if cursor.first => {}
            Some(_) => {
                self.pos = pos;
                return Err(self.syntax("expected `,` or `}`"));
            }
            None => {}
        }
        cursor.first = false;
        self.pos = pos;
        match bytes.get(pos) {
            Some(b'"') => {}
            Some(_) => return Err(self.syntax("key must be a string")),
            None => return Err(self.syntax("EOF while parsing a value")),
        }
        // Keys are short and almost never escaped: borrow them without the general reader.
        let end = find_string_special(bytes, pos + 1);
        let key = if bytes.get(end) == Some(&b'"') {
            self.pos = end + 1;
            Cow::Borrowed(&self.text[pos + 1..end])
        } else {
            self.string_at_quote()?
        };
        self.expect(b':', "expected `:`")?;
        Ok(Some(key))
    }

    /// A string value; another type is a type error.
    pub fn string(&mut self) -> Result<Cow<'a, str>> {
        if self.peek()? == b'"' {
            self.string_at_quote()
        } else {
            Err(self.mismatch("a string"))
        }
    }

    /// A string or null.
    pub fn optional_string(&mut self) -> Result<Option<Cow<'a, str>>> {
        if self.null()? {
            Ok(None)
        } else {
            self.string().map(Some)
        }
    }

    /// An array of strings, or null.
    pub fn optional_string_array(&mut self) -> Result<Option<Vec<Cow<'a, str>>>> {
        match self.peek()? {
            b'n' => self.literal(b"null").map(|_| None),
            b'[' => {
                self.pos += 1;
                let mut items = Vec::new();
                if self.peek()? == b']' {
                    self.pos += 1;
                    return Ok(Some(items));
                }
                loop {
                    items.push(self.string()?);
                    match self.peek()? {
                        b',' => self.pos += 1,
                        b']' => {
                            self.pos += 1;
                            return Ok(Some(items));
                        }
                        _ => return Err(self.syntax("expected `,` or `]`")),
                    }
                }
            }
            _ => Err(self.mismatch("a sequence")),
        }
    }

    /// A boolean or null.
    pub fn optional_bool(&mut self) -> Result<Option<bool>> {
        match self.peek()? {
            b'n' => self.literal(b"null").map(|_| None),
            b't' => self.literal(b"true").map(|_| Some(true)),
            b'f' => self.literal(b"false").map(|_| Some(false)),
            _ => Err(self.mismatch("a boolean")),
        }
    }

    /// The next value as `T`, decoded by serde_json in place (no second scan). On a type error
    /// the reader is left after the value, which is still checked to be JSON.
    pub fn serde<T: DeserializeOwned>(&mut self) -> Result<T> {
        self.skip_whitespace();
        let start = self.pos;
        let rest = &self.text[start..];
        let mut values = serde_json::Deserializer::from_str(rest).into_iter::<T>();
        match values.next() {
            Some(Ok(value)) => {
                self.pos = start + values.byte_offset();
                Ok(value)
            }
            Some(Err(e)) if e.classify() == serde_json::error::Category::Data => {
                self.skip_value()?;
                Err(ReadError::Type(e.to_string()))
            }
            _ => {
                // Syntax or EOF: let the skipper say where, in the body's terms.
                self.skip_value()?;
                Err(self.syntax("invalid value"))
            }
        }
    }

    /// The next value's text, checked to be JSON (views in tests that leave the object unread).
    #[cfg(test)]
    pub(crate) fn raw(&mut self) -> Result<&'a str> {
        self.skip_whitespace();
        let start = self.pos;
        self.skip_value()?;
        Ok(&self.text[start..self.pos])
    }

    /// A value of the wrong type: a type error if it is JSON at all, else where it is not.
    fn mismatch(&mut self, expected: &str) -> ReadError {
        let at = self.pos;
        if let Err(not_json) = self.skip_value() {
            return not_json;
        }
        self.pos = at;
        let found = match self.bytes().get(self.pos) {
            Some(b'{') => "an object",
            Some(b'[') => "an array",
            Some(b'"') => "a string",
            Some(b't' | b'f') => "a boolean",
            Some(b'n') => "null",
            _ => "a number",
        };
        self.wrong_type(&format!("invalid type: {found}, expected {expected}"))
    }

    fn literal(&mut self, word: &[u8]) -> Result<()> {
        if self.bytes()[self.pos..].starts_with(word) {
            self.pos += word.len();
            Ok(())
        } else {
            Err(self.syntax("expected value"))
        }
    }

    /// Skips one value of any type, checking it is JSON. Iterative: nesting costs one bit.
    ///
    /// One loop over the bytes with the position in a local, strings scanned inline: skipping
    /// is most of an admission's reading, and a call per token was most of skipping.
    pub fn skip_value(&mut self) -> Result<()> {
        let bytes = self.bytes();
        let mut pos = self.pos;
        // Bit i set: level i is an object (else an array).
        let mut objects: u128 = 0;
        let mut depth: u32 = 0;
        macro_rules! fail {
            ($at:expr, $what:expr) => {{
                self.pos = $at;
                return Err(self.syntax($what));
            }};
        }
        // The next byte after whitespace; EOF is an error.
        macro_rules! next_byte {
            () => {{
                pos = skip_whitespace(bytes, pos);
                match bytes.get(pos) {
                    Some(&b) => b,
                    None => fail!(pos, "EOF while parsing a value"),
                }
            }};
        }
        // A string from its opening quote, escapes checked.
        macro_rules! string {
            () => {{
                pos += 1;
                loop {
                    pos = find_string_special(bytes, pos);
                    match bytes.get(pos) {
                        Some(b'"') => {
                            pos += 1;
                            break;
                        }
                        Some(b'\\') => match bytes.get(pos + 1) {
                            Some(b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't') => {
                                pos += 2
                            }
                            _ => {
                                self.pos = pos;
                                self.escape()?;
                                pos = self.pos;
                            }
                        },
                        Some(_) => fail!(
                            pos,
                            "control character (\\u0000-\\u001F) found while parsing a string"
                        ),
                        None => fail!(pos, "EOF while parsing a string"),
                    }
                }
            }};
        }
        // A key and its colon, inside a skipped object.
        macro_rules! key {
            () => {{
                if next_byte!() != b'"' {
                    fail!(pos, "key must be a string");
                }
                string!();
                if next_byte!() != b':' {
                    fail!(pos, "expected `:`");
                }
                pos += 1;
            }};
        }
        loop {
            // A value is expected here.
            match next_byte!() {
                b'"' => string!(),
                open @ (b'{' | b'[') => {
                    pos += 1;
                    let close = if open == b'{' { b'}' } else { b']' };
                    if next_byte!() == close {
                        pos += 1;
                    } else {
                        if depth == MAX_DEPTH {
                            fail!(pos, "recursion limit exceeded");
                        }
                        if open == b'{' {
                            objects |= 1 << depth;
                            depth += 1;
                            key!();
                        } else {
                            objects &= !(1 << depth);
                            depth += 1;
                        }
                        continue;
                    }
                }
                b't' | b'f' | b'n' | b'-' | b'0'..=b'9' => {
                    self.pos = pos;
                    match bytes[pos] {
                        b't' => self.literal(b"true")?,
                        b'f' => self.literal(b"false")?,
                        b'n' => self.literal(b"null")?,
                        _ => self.skip_number()?,
                    }
                    pos = self.pos;
                }
                _ => fail!(pos, "expected value"),
            }
            // After a value: close levels until one continues with `,`.
            loop {
                if depth == 0 {
                    self.pos = pos;
                    return Ok(());
                }
                let in_object = objects & (1 << (depth - 1)) != 0;
                match next_byte!() {
                    b',' => {
                        pos += 1;
                        if in_object {
                            key!();
                        }
                        break;
                    }
                    b'}' if in_object => {
                        pos += 1;
                        depth -= 1;
                    }
                    b']' if !in_object => {
                        pos += 1;
                        depth -= 1;
                    }
                    _ if in_object => fail!(pos, "expected `,` or `}`"),
                    _ => fail!(pos, "expected `,` or `]`"),
                }
            }
        }
    }

    fn skip_number(&mut self) -> Result<()> {
        let bytes = self.bytes();
        let digits = |mut i: usize| {
            while bytes.get(i).is_some_and(u8::is_ascii_digit) {
                i += 1;
            }
            i
        };
        let mut i = self.pos;
        if bytes[i] == b'-' {
            i += 1;
        }
        match bytes.get(i) {
            Some(b'0') => i += 1,
            Some(b'1'..=b'9') => i = digits(i + 1),
            _ => {
                self.pos = i;
                return Err(self.syntax("invalid number"));
            }
        }
        if bytes.get(i) == Some(&b'.') {
            let end = digits(i + 1);
            if end == i + 1 {
                self.pos = end;
                return Err(self.syntax("invalid number"));
            }
            i = end;
        }
        if let Some(b'e' | b'E') = bytes.get(i) {
            i += 1;
            if let Some(b'+' | b'-') = bytes.get(i) {
                i += 1;
            }
            let end = digits(i);
            if end == i {
                self.pos = end;
                return Err(self.syntax("invalid number"));
            }
            i = end;
        }
        self.pos = i;
        Ok(())
    }

    /// Reads a string starting at its opening quote; borrowed unless it has escapes.
    fn string_at_quote(&mut self) -> Result<Cow<'a, str>> {
        self.pos += 1;
        let start = self.pos;
        let mut owned: Option<String> = None;
        let mut copied_to = start;
        loop {
            self.pos = find_string_special(self.bytes(), self.pos);
            match self.bytes().get(self.pos) {
                Some(b'"') => {
                    let tail = &self.text[copied_to..self.pos];
                    self.pos += 1;
                    return Ok(match owned {
                        None => Cow::Borrowed(tail),
                        Some(mut s) => {
                            s.push_str(tail);
                            Cow::Owned(s)
                        }
                    });
                }
                Some(b'\\') => {
                    let s = owned.get_or_insert_with(String::new);
                    s.push_str(&self.text[copied_to..self.pos]);
                    match self.escape()? {
                        Escape::Char(c) => s.push(c),
                        Escape::HighSurrogate(high) => {
                            let low = match self.bytes().get(self.pos..self.pos + 2) {
                                Some(b"\\u") => match self.escape()? {
                                    Escape::LowSurrogate(low) => low,
                                    _ => {
                                        return Err(
                                            self.syntax("lone leading surrogate in hex escape")
                                        )
                                    }
                                },
                                _ => {
                                    return Err(self.syntax("lone leading surrogate in hex escape"))
                                }
                            };
                            let c = 0x10000
                                + ((u32::from(high) - 0xD800) << 10)
                                + (u32::from(low) - 0xDC00);
                            s.push(char::from_u32(c).expect("a surrogate pair is a char"));
                        }
                        Escape::LowSurrogate(_) => {
                            return Err(self.syntax("unexpected end of hex escape"));
                        }
                    }
                    copied_to = self.pos;
                }
                Some(_) => {
                    return Err(self.syntax(
                        "control character (\\u0000-\\u001F) found while parsing a string",
                    ))
                }
                None => return Err(self.syntax("EOF while parsing a string")),
            }
        }
    }

    /// Reads the escape at a backslash.
    fn escape(&mut self) -> Result<Escape> {
        let bytes = self.bytes();
        let c = match bytes.get(self.pos + 1) {
            Some(b'"') => '"',
            Some(b'\\') => '\\',
            Some(b'/') => '/',
            Some(b'b') => '\u{8}',
            Some(b'f') => '\u{c}',
            Some(b'n') => '\n',
            Some(b'r') => '\r',
            Some(b't') => '\t',
            Some(b'u') => {
                let hex = bytes
                    .get(self.pos + 2..self.pos + 6)
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .filter(|h| h.bytes().all(|b| b.is_ascii_hexdigit()))
                    .and_then(|h| u16::from_str_radix(h, 16).ok());
                let Some(unit) = hex else {
                    self.pos += 2;
                    return Err(self.syntax("invalid escape"));
                };
                self.pos += 6;
                return Ok(match unit {
                    0xD800..=0xDBFF => Escape::HighSurrogate(unit),
                    0xDC00..=0xDFFF => Escape::LowSurrogate(unit),
                    _ => Escape::Char(char::from_u32(u32::from(unit)).expect("not a surrogate")),
                });
            }
            Some(_) => {
                self.pos += 1;
                return Err(self.syntax("invalid escape"));
            }
            None => {
                self.pos += 1;
                return Err(self.syntax("EOF while parsing a string"));
            }
        };
        self.pos += 2;
        Ok(Escape::Char(c))
    }
}

enum Escape {
    Char(char),
    HighSurrogate(u16),
    LowSurrogate(u16),
}

/// Index of the first byte at or after `from` that is not JSON whitespace, or the length.
#[inline]
fn skip_whitespace(bytes: &[u8], mut pos: usize) -> usize {
    while let Some(b' ' | b'\n' | b'\t' | b'\r') = bytes.get(pos) {
        pos += 1;
    }
    pos
}

/// Index of the first `"`, `\` or control character at or after `from`, or the length.
pub(crate) fn find_string_special(bytes: &[u8], from: usize) -> usize {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{
            __m128i, _mm_cmpeq_epi8, _mm_loadu_si128, _mm_min_epu8, _mm_movemask_epi8,
            _mm_or_si128, _mm_set1_epi8,
        };
        let mut i = from;
        // SAFETY: SSE2 is part of the x86_64 baseline; every load reads 16 bytes inside `bytes`
        // (`i + 16 <= len`), unaligned loads are allowed.
        unsafe {
            let quote = _mm_set1_epi8(b'"' as i8);
            let backslash = _mm_set1_epi8(b'\\' as i8);
            let control_max = _mm_set1_epi8(0x1f);
            while i + 16 <= bytes.len() {
                let v = _mm_loadu_si128(bytes.as_ptr().add(i) as *const __m128i);
                let special = _mm_or_si128(
                    _mm_or_si128(_mm_cmpeq_epi8(v, quote), _mm_cmpeq_epi8(v, backslash)),
                    // Unsigned v <= 0x1f exactly when min(v, 0x1f) == v.
                    _mm_cmpeq_epi8(_mm_min_epu8(v, control_max), v),
                );
                let mask = _mm_movemask_epi8(special);
                if mask != 0 {
                    return i + mask.trailing_zeros() as usize;
                }
                i += 16;
            }
        }
        find_string_special_scalar(bytes, i)
    }
    #[cfg(not(target_arch = "x86_64"))]
    find_string_special_scalar(bytes, from)
}

fn find_string_special_scalar(bytes: &[u8], from: usize) -> usize {
    bytes[from..]
        .iter()
        .position(|&b| b == b'"' || b == b'\\' || b < 0x20)
        .map_or(bytes.len(), |i| from + i)
}

/// Key-value string pairs of an object, in the order written, borrowed unless escaped.
pub type Entries<'a> = Vec<(Cow<'a, str>, Cow<'a, str>)>;

/// Labels or annotations (an object or null), keeping only keys with `prefix`, in order; their
/// values must be strings, the others are skipped whatever they are. Presence is kept: an
/// object with no such key reads as `Some(empty)`.
pub fn entries_with_prefix<'a>(
    r: &mut JsonReader<'a>,
    prefix: &str,
) -> Result<Option<Entries<'a>>> {
    if r.null()? {
        return Ok(None);
    }
    let mut out = Vec::new();
    let mut cursor = r.object("a map of strings or null")?;
    while let Some(key) = r.next_key(&mut cursor)? {
        if key.starts_with(prefix) {
            out.push((key, r.string()?));
        } else {
            r.skip_value()?;
        }
    }
    Ok(Some(out))
}

/// Reads a field's value into an empty slot; a field seen twice is an error, as with serde's
/// derived structs.
pub fn set_once<'a, T>(
    r: &mut JsonReader<'a>,
    slot: &mut Option<T>,
    field: &str,
    read: impl FnOnce(&mut JsonReader<'a>) -> Result<T>,
) -> Result<()> {
    if slot.is_some() {
        return Err(r.wrong_type(&format!("duplicate field `{field}`")));
    }
    *slot = Some(read(r)?);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn skip(text: &str) -> Result<()> {
        let mut r = JsonReader::new(text);
        r.skip_value()?;
        r.finish()
    }

    fn serde_accepts(text: &str) -> bool {
        serde_json::from_str::<serde::de::IgnoredAny>(text).is_ok()
    }

    #[test]
    fn skipping_accepts_exactly_what_serde_json_accepts() {
        let cases = [
            "{}",
            "[]",
            "[1,2]",
            "[1,]",
            "{\"a\":1,}",
            "{\"a\" 1}",
            "{1:2}",
            "-",
            "-0",
            "01",
            "1.",
            "1.5e",
            "1e+9",
            "-12.5E-3",
            "tru",
            "true",
            "nul",
            "\"\\u12\"",
            "\"\\u12g4\"",
            "\"\\x\"",
            "\"\\/\"",
            "\"a\tb\"",
            "\"\\ud800\"",
            "[[[]]]",
            "[[[]]",
            "{\"a\":[{}]}",
            "{\"a\":[{]}",
            "  [ 1 , { \"b\" : null } ]  ",
            "[1] x",
            "\"unterminated",
            "",
            "{\"a\":\"0123456789abcdef0123456789abcdef\\\"\"}",
            "[\"0123456789abcdef\u{1}\"]",
            "[\"héllo wörld, 16 bytes and more\"]",
        ];
        for case in cases {
            assert_eq!(skip(case).is_ok(), serde_accepts(case), "{case:?}");
        }
        let deep = format!("{}{}", "[".repeat(200), "]".repeat(200));
        assert!(skip(&deep).is_err());
        let fine = format!("{}{}", "[".repeat(100), "]".repeat(100));
        assert!(skip(&fine).is_ok());
    }

    #[test]
    fn strings_decode_like_serde_json() {
        for case in [
            r#""plain""#,
            r#""a\"b\\c\/d\b\f\n\r\t""#,
            r#""\u00e9\u4e2d\ud83d\ude00""#,
            "\"0123456789abcdef0123456789abcdef\\n0123456789abcdef\"",
        ] {
            let mut r = JsonReader::new(case);
            let ours = r.string().unwrap();
            let theirs: String = serde_json::from_str(case).unwrap();
            assert_eq!(ours, theirs, "{case}");
        }
        for bad in [r#""\ud800""#, r#""\ud800\u0041""#, r#""\udc00""#] {
            assert!(JsonReader::new(bad).string().is_err(), "{bad}");
            assert!(serde_json::from_str::<String>(bad).is_err(), "{bad}");
        }
        assert!(matches!(
            JsonReader::new("plain").string(),
            Err(ReadError::Syntax(_))
        ));
        assert!(matches!(
            JsonReader::new("5").string(),
            Err(ReadError::Type(_))
        ));
    }

    #[test]
    fn objects_are_walked_key_by_key_and_errors_say_where() {
        let mut r = JsonReader::new("{\n  \"a\": 1,\n  \"b\": \"x\"\n}");
        let mut c = r.object("an object").unwrap();
        assert_eq!(r.next_key(&mut c).unwrap().as_deref(), Some("a"));
        r.skip_value().unwrap();
        assert_eq!(r.next_key(&mut c).unwrap().as_deref(), Some("b"));
        assert_eq!(r.string().unwrap(), "x");
        assert_eq!(r.next_key(&mut c).unwrap(), None);
        r.finish().unwrap();

        let mut r = JsonReader::new("{\n  \"a\": 1\n  \"b\": 2}");
        let mut c = r.object("an object").unwrap();
        r.next_key(&mut c).unwrap();
        r.skip_value().unwrap();
        assert_eq!(
            r.next_key(&mut c).unwrap_err(),
            ReadError::Syntax("expected `,` or `}` at line 3 column 2".into())
        );
    }

    #[test]
    fn serde_values_are_read_in_place() {
        let mut r = JsonReader::new(r#"{"spec": {"x": [1, 2]}, "next": true}"#);
        let mut c = r.object("an object").unwrap();
        r.next_key(&mut c).unwrap();
        let v: serde_json::Value = r.serde().unwrap();
        assert_eq!(v, serde_json::json!({"x": [1, 2]}));
        assert_eq!(r.next_key(&mut c).unwrap().as_deref(), Some("next"));
        assert_eq!(r.optional_bool().unwrap(), Some(true));

        // A type error leaves the reader after the value.
        let mut r = JsonReader::new(r#"{"spec": "no", "next": null}"#);
        let mut c = r.object("an object").unwrap();
        r.next_key(&mut c).unwrap();
        assert!(matches!(
            r.serde::<std::collections::BTreeMap<String, String>>(),
            Err(ReadError::Type(_))
        ));
        assert_eq!(r.next_key(&mut c).unwrap().as_deref(), Some("next"));
    }
}
