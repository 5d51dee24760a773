//! A streaming JSON reader (RFC 8259) that checks the whole grammar but hands on only the
//! strings, keys and values alike, with their escapes undone: upload APIs carry files as
//! base64 inside JSON strings, and the producer scans those without building a tree of a
//! body that may be hundreds of MiB. A string is handed on in pieces as it arrives, so no
//! string is held whole either; the reader keeps one byte per nesting level and a few bytes
//! of an unfinished escape.
//!
//! It is as lenient as the common parsers where they are lenient: a leading UTF-8 byte
//! order mark is skipped (Jackson, .NET and many body parsers accept it), lone surrogate
//! escapes are kept (JavaScript's and Python's `JSON.parse`/`json.loads` accept them; they
//! come out as their WTF-8 bytes), and numbers are checked for syntax only. Whatever
//! serde_json accepts, this accepts with the same strings (the fuzz target checks it).
//!
//! [`JsonStrings::lenient`] goes on after a syntax error, handing on every string that
//! follows: receivers read more than RFC 8259 (`NaN` in Python, values after the first in
//! JSON Lines and Go's decoder, control characters with `strict=False`), and the strings
//! after such a spot reach them all the same. [`Utf16`] turns the UTF-16 and UTF-32 that
//! Python's `json.loads` detects into UTF-8 for it.

/// Deeper nesting than this is refused rather than read as not-JSON: parsers without a
/// depth limit (V8's is iterative) would still find the strings inside.
pub const MAX_DEPTH: usize = 1024;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JsonError {
    #[error("JSON is malformed at byte {0}")]
    Syntax(u64),
    #[error("JSON ends inside a value")]
    Truncated,
    #[error("JSON nests deeper than {MAX_DEPTH} levels")]
    TooDeep,
}

#[derive(Debug, PartialEq, Eq)]
pub enum JsonEvent<'a> {
    /// A string begins; `key` when it names an object member.
    StringStart {
        key: bool,
    },
    /// The next bytes of the string, unescaped.
    StringData(&'a [u8]),
    StringEnd,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Number {
    Minus,
    Zero,
    Int,
    Dot,
    Frac,
    E,
    ESign,
    Exp,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// At the start: bytes of a UTF-8 BOM matched so far.
    Bom(u8),
    Value,
    /// After `[`: a value or `]`.
    ArrayFirst,
    /// After `{`: a key or `}`.
    ObjectFirst,
    /// After `,` in an object.
    Key,
    Colon,
    AfterValue,
    InString,
    Escape,
    Unicode {
        high: Option<u16>,
        digits: u8,
        unit: u16,
    },
    /// After a high surrogate escape: is `\u` of its low half next?
    LowSurrogate {
        high: u16,
        backslash: bool,
    },
    Number(Number),
    Literal(&'static [u8]),
    Done,
    /// Lenient, after a syntax error: outside strings, looking for the next one.
    Loose,
}

#[derive(Debug, Clone)]
pub struct JsonStrings {
    state: State,
    /// One entry per open container: true for an object.
    stack: Vec<bool>,
    key: bool,
    offset: u64,
    lenient: bool,
    /// The first syntax error a lenient reader went on after.
    error: Option<JsonError>,
}

impl Default for JsonStrings {
    fn default() -> Self {
        JsonStrings::new()
    }
}

/// WTF-8: UTF-8 that also encodes lone surrogates.
fn push_code_point(cp: u32, out: &mut [u8; 4]) -> usize {
    match cp {
        0..=0x7f => {
            out[0] = cp as u8;
            1
        }
        0x80..=0x7ff => {
            out[0] = 0xc0 | (cp >> 6) as u8;
            out[1] = 0x80 | (cp & 0x3f) as u8;
            2
        }
        0x800..=0xffff => {
            out[0] = 0xe0 | (cp >> 12) as u8;
            out[1] = 0x80 | (cp >> 6 & 0x3f) as u8;
            out[2] = 0x80 | (cp & 0x3f) as u8;
            3
        }
        _ => {
            out[0] = 0xf0 | (cp >> 18) as u8;
            out[1] = 0x80 | (cp >> 12 & 0x3f) as u8;
            out[2] = 0x80 | (cp >> 6 & 0x3f) as u8;
            out[3] = 0x80 | (cp & 0x3f) as u8;
            4
        }
    }
}

fn emit_code_point(cp: u32, on: &mut dyn FnMut(JsonEvent<'_>)) {
    let mut buf = [0u8; 4];
    let n = push_code_point(cp, &mut buf);
    on(JsonEvent::StringData(&buf[..n]));
}

fn is_whitespace(c: u8) -> bool {
    matches!(c, b' ' | b'\t' | b'\n' | b'\r')
}

impl JsonStrings {
    pub fn new() -> JsonStrings {
        JsonStrings {
            state: State::Bom(0),
            stack: Vec::new(),
            key: false,
            offset: 0,
            lenient: false,
            error: None,
        }
    }

    /// A reader that goes on after a syntax error: from there it hands on every
    /// double-quoted string (escapes undone where they are valid, control bytes kept) and
    /// skips everything else; [`JsonStrings::finish`] reports the first error.
    pub fn lenient() -> JsonStrings {
        JsonStrings {
            lenient: true,
            ..JsonStrings::new()
        }
    }

    /// Whether a lenient reader has met a syntax error.
    pub fn is_malformed(&self) -> bool {
        self.error.is_some()
    }

    /// Where a lenient reader goes on after a syntax error at `chunk[i]`; the index of the
    /// next byte to read.
    fn recover(&mut self, chunk: &[u8], i: usize, on: &mut dyn FnMut(JsonEvent<'_>)) -> usize {
        match self.state {
            State::InString | State::Escape => {
                // A control byte, or an escape no parser knows: kept as the byte it is.
                on(JsonEvent::StringData(&chunk[i..=i]));
                self.state = State::InString;
                i + 1
            }
            State::Unicode { .. } | State::LowSurrogate { .. } => {
                self.state = State::InString;
                i
            }
            _ => {
                self.stack.clear();
                self.state = State::Loose;
                i
            }
        }
    }

    fn syntax(&self, at: usize) -> JsonError {
        JsonError::Syntax(self.offset + at as u64)
    }

    fn end_value(&mut self) {
        self.state = if self.stack.is_empty() {
            State::Done
        } else {
            State::AfterValue
        };
    }

    fn open(&mut self, object: bool) -> Result<(), JsonError> {
        if self.stack.len() == MAX_DEPTH {
            return Err(JsonError::TooDeep);
        }
        self.stack.push(object);
        self.state = if object {
            State::ObjectFirst
        } else {
            State::ArrayFirst
        };
        Ok(())
    }

    /// A `\uXXXX` escape completed with `unit`.
    fn code_unit(&mut self, high: Option<u16>, unit: u16, on: &mut dyn FnMut(JsonEvent<'_>)) {
        if let Some(high) = high {
            if (0xdc00..0xe000).contains(&unit) {
                let cp = 0x10000 + ((u32::from(high) - 0xd800) << 10) + (u32::from(unit) - 0xdc00);
                emit_code_point(cp, on);
                self.state = State::InString;
                return;
            }
            emit_code_point(u32::from(high), on);
        }
        if (0xd800..0xdc00).contains(&unit) {
            self.state = State::LowSurrogate {
                high: unit,
                backslash: false,
            };
        } else {
            emit_code_point(u32::from(unit), on);
            self.state = State::InString;
        }
    }

    /// A value may start here.
    fn value(
        &mut self,
        c: u8,
        at: usize,
        on: &mut dyn FnMut(JsonEvent<'_>),
    ) -> Result<(), JsonError> {
        match c {
            b'"' => {
                self.key = false;
                on(JsonEvent::StringStart { key: false });
                self.state = State::InString;
            }
            b'{' => self.open(true)?,
            b'[' => self.open(false)?,
            b'-' => self.state = State::Number(Number::Minus),
            b'0' => self.state = State::Number(Number::Zero),
            b'1'..=b'9' => self.state = State::Number(Number::Int),
            b't' => self.state = State::Literal(b"rue"),
            b'f' => self.state = State::Literal(b"alse"),
            b'n' => self.state = State::Literal(b"ull"),
            _ => return Err(self.syntax(at)),
        }
        Ok(())
    }

    fn close(&mut self, object: bool, at: usize) -> Result<(), JsonError> {
        if self.stack.pop() != Some(object) {
            return Err(self.syntax(at));
        }
        self.end_value();
        Ok(())
    }

    /// Feeds the next bytes of the document.
    pub fn feed(
        &mut self,
        chunk: &[u8],
        on: &mut dyn FnMut(JsonEvent<'_>),
    ) -> Result<(), JsonError> {
        let mut i = 0;
        while i < chunk.len() {
            i = match self.step(chunk, i, on) {
                Ok(next) => next,
                Err(e @ JsonError::Syntax(_)) if self.lenient => {
                    self.error.get_or_insert(e);
                    self.recover(chunk, i, on)
                }
                Err(e) => return Err(e),
            };
        }
        self.offset += chunk.len() as u64;
        Ok(())
    }

    /// Reads `chunk[i]` (or a run of string bytes from there); the index of the next byte
    /// to read.
    fn step(
        &mut self,
        chunk: &[u8],
        i: usize,
        on: &mut dyn FnMut(JsonEvent<'_>),
    ) -> Result<usize, JsonError> {
        let c = chunk[i];
        match self.state {
            State::InString => {
                let run = chunk[i..]
                    .iter()
                    .position(|&b| b == b'"' || b == b'\\' || b < 0x20)
                    .unwrap_or(chunk.len() - i);
                if run > 0 {
                    on(JsonEvent::StringData(&chunk[i..i + run]));
                    return Ok(i + run);
                }
                match c {
                    b'"' => {
                        on(JsonEvent::StringEnd);
                        if self.error.is_some() {
                            self.state = State::Loose;
                        } else if self.key {
                            self.state = State::Colon;
                        } else {
                            self.end_value();
                        }
                    }
                    b'\\' => self.state = State::Escape,
                    _ => return Err(self.syntax(i)),
                }
            }
            State::Escape => {
                let b = match c {
                    b'"' | b'\\' | b'/' => c,
                    b'b' => 0x08,
                    b'f' => 0x0c,
                    b'n' => b'\n',
                    b'r' => b'\r',
                    b't' => b'\t',
                    b'u' => {
                        self.state = State::Unicode {
                            high: None,
                            digits: 0,
                            unit: 0,
                        };
                        return Ok(i + 1);
                    }
                    _ => return Err(self.syntax(i)),
                };
                on(JsonEvent::StringData(&[b]));
                self.state = State::InString;
            }
            State::Unicode { high, digits, unit } => {
                let d = (c as char).to_digit(16).ok_or_else(|| self.syntax(i))?;
                let unit = unit << 4 | d as u16;
                if digits < 3 {
                    self.state = State::Unicode {
                        high,
                        digits: digits + 1,
                        unit,
                    };
                } else {
                    self.code_unit(high, unit, on);
                }
            }
            State::LowSurrogate { high, backslash } => {
                if !backslash && c == b'\\' {
                    self.state = State::LowSurrogate {
                        high,
                        backslash: true,
                    };
                } else if backslash && c == b'u' {
                    self.state = State::Unicode {
                        high: Some(high),
                        digits: 0,
                        unit: 0,
                    };
                } else {
                    // A lone high surrogate; this byte is read again after it.
                    emit_code_point(u32::from(high), on);
                    self.state = if backslash {
                        State::Escape
                    } else {
                        State::InString
                    };
                    return Ok(i);
                }
            }
            State::Number(n) => {
                let next = match (n, c) {
                    (Number::Minus, b'0') => Some(Number::Zero),
                    (Number::Minus, b'1'..=b'9') => Some(Number::Int),
                    (Number::Int, b'0'..=b'9') => Some(Number::Int),
                    (Number::Zero | Number::Int, b'.') => Some(Number::Dot),
                    (Number::Dot | Number::Frac, b'0'..=b'9') => Some(Number::Frac),
                    (Number::Zero | Number::Int | Number::Frac, b'e' | b'E') => Some(Number::E),
                    (Number::E, b'+' | b'-') => Some(Number::ESign),
                    (Number::E | Number::ESign | Number::Exp, b'0'..=b'9') => Some(Number::Exp),
                    (Number::Zero | Number::Int | Number::Frac | Number::Exp, _) => None,
                    _ => return Err(self.syntax(i)),
                };
                match next {
                    Some(n) => self.state = State::Number(n),
                    None => {
                        // The number ended: this byte belongs to what follows it.
                        self.end_value();
                        return Ok(i);
                    }
                }
            }
            State::Literal(rest) => {
                if rest.first() != Some(&c) {
                    return Err(self.syntax(i));
                }
                if rest.len() == 1 {
                    self.end_value();
                } else {
                    self.state = State::Literal(&rest[1..]);
                }
            }
            State::Bom(matched) => {
                const BOM: [u8; 3] = [0xef, 0xbb, 0xbf];
                if c == BOM[usize::from(matched)] {
                    self.state = if matched == 2 {
                        State::Value
                    } else {
                        State::Bom(matched + 1)
                    };
                } else if matched == 0 {
                    self.state = State::Value;
                    return Ok(i);
                } else {
                    return Err(self.syntax(i));
                }
            }
            State::Loose if c == b'"' => {
                self.key = false;
                on(JsonEvent::StringStart { key: false });
                self.state = State::InString;
            }
            State::Loose => {}
            _ if is_whitespace(c) => {}
            State::Value => self.value(c, i, on)?,
            State::ArrayFirst if c == b']' => self.close(false, i)?,
            State::ArrayFirst => self.value(c, i, on)?,
            State::ObjectFirst | State::Key if c == b'"' => {
                self.key = true;
                on(JsonEvent::StringStart { key: true });
                self.state = State::InString;
            }
            State::ObjectFirst if c == b'}' => self.close(true, i)?,
            State::Colon if c == b':' => self.state = State::Value,
            State::AfterValue => match (c, self.stack.last()) {
                (b',', Some(true)) => self.state = State::Key,
                (b',', Some(false)) => self.state = State::Value,
                (b']', _) => self.close(false, i)?,
                (b'}', _) => self.close(true, i)?,
                _ => return Err(self.syntax(i)),
            },
            State::ObjectFirst | State::Key | State::Colon | State::Done => {
                return Err(self.syntax(i));
            }
        }
        Ok(i + 1)
    }

    /// The document ended: it must have been exactly one complete value.
    pub fn finish(self) -> Result<(), JsonError> {
        if let Some(e) = self.error {
            return Err(e);
        }
        match self.state {
            State::Done => Ok(()),
            State::Number(Number::Zero | Number::Int | Number::Frac | Number::Exp)
                if self.stack.is_empty() =>
            {
                Ok(())
            }
            _ => Err(JsonError::Truncated),
        }
    }
}

/// How a JSON text is encoded, found from its first four bytes as Python's `json.loads`
/// finds it (RFC 4627 §3): a byte order mark, or the zero bytes around an ASCII first
/// character.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JsonEncoding {
    Utf8,
    Utf16Le,
    Utf16Be,
    Utf32Le,
    Utf32Be,
}

impl JsonEncoding {
    pub fn detect(head: &[u8]) -> JsonEncoding {
        match head {
            [0, 0, 0xfe, 0xff, ..] => JsonEncoding::Utf32Be,
            [0xff, 0xfe, 0, 0, ..] => JsonEncoding::Utf32Le,
            [0xfe, 0xff, ..] => JsonEncoding::Utf16Be,
            [0xff, 0xfe, ..] => JsonEncoding::Utf16Le,
            [0, 0, 0, _, ..] => JsonEncoding::Utf32Be,
            [0, _, _, _, ..] | [0, _] => JsonEncoding::Utf16Be,
            [_, 0, 0, 0, ..] => JsonEncoding::Utf32Le,
            [_, 0, _, _, ..] | [_, 0] => JsonEncoding::Utf16Le,
            _ => JsonEncoding::Utf8,
        }
    }

    fn unit(self) -> usize {
        match self {
            JsonEncoding::Utf8 => 1,
            JsonEncoding::Utf16Le | JsonEncoding::Utf16Be => 2,
            JsonEncoding::Utf32Le | JsonEncoding::Utf32Be => 4,
        }
    }
}

/// A JSON text in any encoding [`JsonEncoding::detect`] knows, handed on as UTF-8 for
/// [`JsonStrings`]. Outside UTF-8 only ASCII is kept as it is and every other code unit
/// becomes U+FFFD: JSON's syntax and base64 are ASCII, and what is looked for is base64.
#[derive(Debug, Clone, Default)]
pub struct JsonText {
    encoding: Option<JsonEncoding>,
    /// The first bytes, until there are four to detect the encoding from; then the bytes
    /// of an unfinished code unit.
    pending: Vec<u8>,
    /// A code unit has been handed on (a byte order mark is only one at the start).
    started: bool,
}

impl JsonText {
    pub fn new() -> JsonText {
        JsonText::default()
    }

    /// The encoding, once four bytes (or the whole text) have been seen.
    pub fn encoding(&self) -> Option<JsonEncoding> {
        self.encoding
    }

    /// Appends the UTF-8 of the next bytes to `out`.
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) {
        let mut input = input;
        let encoding = match self.encoding {
            Some(e) => e,
            None => {
                let take = (4 - self.pending.len()).min(input.len());
                self.pending.extend_from_slice(&input[..take]);
                input = &input[take..];
                if self.pending.len() < 4 {
                    return;
                }
                let e = JsonEncoding::detect(&self.pending);
                self.encoding = Some(e);
                let head = std::mem::take(&mut self.pending);
                self.convert(e, &head, out);
                e
            }
        };
        self.convert(encoding, input, out);
    }

    /// The text ended: a text of under four bytes is converted now. A last incomplete code
    /// unit is dropped, as no decoder reads it.
    pub fn finish(mut self, out: &mut Vec<u8>) {
        if self.encoding.is_none() {
            let e = JsonEncoding::detect(&self.pending);
            let head = std::mem::take(&mut self.pending);
            self.convert(e, &head, out);
        }
    }

    fn convert(&mut self, encoding: JsonEncoding, mut input: &[u8], out: &mut Vec<u8>) {
        let size = encoding.unit();
        if size == 1 {
            out.extend_from_slice(input);
            return;
        }
        while !input.is_empty() {
            let take = (size - self.pending.len()).min(input.len());
            self.pending.extend_from_slice(&input[..take]);
            input = &input[take..];
            if self.pending.len() < size {
                return;
            }
            let p = std::mem::take(&mut self.pending);
            let unit = match encoding {
                JsonEncoding::Utf16Le => u32::from(u16::from_le_bytes([p[0], p[1]])),
                JsonEncoding::Utf16Be => u32::from(u16::from_be_bytes([p[0], p[1]])),
                JsonEncoding::Utf32Le => u32::from_le_bytes([p[0], p[1], p[2], p[3]]),
                _ => u32::from_be_bytes([p[0], p[1], p[2], p[3]]),
            };
            let first = !self.started;
            self.started = true;
            match unit {
                0xfeff if first => {}
                0..0x80 => out.push(unit as u8),
                _ => out.extend_from_slice("\u{fffd}".as_bytes()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The strings of `doc` fed in chunks of `step` bytes: (is a key, bytes).
    fn strings(doc: &[u8], step: usize) -> Result<Vec<(bool, Vec<u8>)>, JsonError> {
        let mut out: Vec<(bool, Vec<u8>)> = Vec::new();
        let mut open = false;
        let mut on = |e: JsonEvent<'_>| match e {
            JsonEvent::StringStart { key } => {
                assert!(!open);
                open = true;
                out.push((key, Vec::new()));
            }
            JsonEvent::StringData(d) => {
                assert!(open);
                out.last_mut().unwrap().1.extend_from_slice(d);
            }
            JsonEvent::StringEnd => {
                assert!(open);
                open = false;
            }
        };
        let mut p = JsonStrings::new();
        for chunk in doc.chunks(step.max(1)) {
            p.feed(chunk, &mut on)?;
        }
        p.finish()?;
        Ok(out)
    }

    /// What serde_json reads as the strings of `doc`, in document order.
    fn serde_strings(doc: &[u8]) -> Option<Vec<(bool, Vec<u8>)>> {
        fn walk(v: &serde_json::Value, out: &mut Vec<(bool, Vec<u8>)>) {
            match v {
                serde_json::Value::String(s) => out.push((false, s.as_bytes().to_vec())),
                serde_json::Value::Array(a) => a.iter().for_each(|v| walk(v, out)),
                serde_json::Value::Object(o) => o.iter().for_each(|(k, v)| {
                    out.push((true, k.as_bytes().to_vec()));
                    walk(v, out);
                }),
                _ => {}
            }
        }
        let v: serde_json::Value = serde_json::from_slice(doc).ok()?;
        let mut out = Vec::new();
        walk(&v, &mut out);
        Some(out)
    }

    #[test]
    fn strings_come_out_unescaped_at_every_chunk_size() {
        let doc = br#" {"file":"QUJD\/RA==\n","n":[1,-0.5e+3,true,false,null,{}],"k\u00e9y":"\ud83d\ude00\"\\\b\f\r\t"} "#;
        let want = vec![
            (true, b"file".to_vec()),
            (false, b"QUJD/RA==\n".to_vec()),
            (true, b"n".to_vec()),
            (true, "kéy".as_bytes().to_vec()),
            (false, "😀\"\\\x08\x0c\r\t".as_bytes().to_vec()),
        ];
        for step in [1, 2, 3, 5, 8, 1000] {
            assert_eq!(strings(doc, step).unwrap(), want, "step {step}");
        }
    }

    #[test]
    fn agrees_with_serde_json() {
        for doc in [
            &br#"{"a":{"b":["c",{"d":"e"}]},"f":"g"}"#[..],
            br#"["\u0041\u00e9\u4e2d\ud834\udd1e"]"#,
            br#""top-level string""#,
            b"[0,1.5,-2e10,3E-2]",
            b"[[],[[]],{}]",
        ] {
            let serde = serde_strings(doc).expect("serde_json reads it");
            for step in [1, 3, 100] {
                assert_eq!(strings(doc, step).unwrap(), serde);
            }
        }
    }

    #[test]
    fn lenient_where_common_parsers_are() {
        assert_eq!(
            strings(b"\xef\xbb\xbf[\"a\"]", 1).unwrap(),
            vec![(false, b"a".to_vec())]
        );
        // A lone surrogate, then an ordinary escape after it.
        assert_eq!(
            strings(br#"["\ud800\n","\udc00","\ud800\u0041"]"#, 1).unwrap(),
            vec![
                (false, b"\xed\xa0\x80\n".to_vec()),
                (false, b"\xed\xb0\x80".to_vec()),
                (false, b"\xed\xa0\x80A".to_vec()),
            ]
        );
        assert_eq!(strings(b"42", 1).unwrap(), vec![]);
        assert_eq!(strings(b"1e999", 1).unwrap(), vec![]);
    }

    #[test]
    fn malformed_documents_are_errors() {
        for doc in [
            &b"[1,]"[..],
            b"{\"a\":1,}",
            b"{\"a\" 1}",
            b"{1:2}",
            b"[01]",
            b"[1.]",
            b"[-]",
            b"[1e]",
            b"[tru]",
            b"[\"a\x01\"]",
            b"[\"\\x\"]",
            b"[\"\\u12G4\"]",
            b"[1] [2]",
            b"[}",
            b"{]",
            b"'a'",
            b"\xef\xbb[]",
        ] {
            assert!(
                matches!(strings(doc, 1), Err(JsonError::Syntax(_))),
                "{}",
                String::from_utf8_lossy(doc)
            );
        }
        for doc in [&b""[..], b"  ", b"[", b"{\"a\"", b"\"abc", b"-", b"[1"] {
            assert_eq!(strings(doc, 1), Err(JsonError::Truncated), "{doc:?}");
        }
    }

    /// The strings a lenient reader hands on, and whether it found the text malformed.
    fn lenient_strings(doc: &[u8], step: usize) -> (Vec<Vec<u8>>, bool) {
        let mut out: Vec<Vec<u8>> = Vec::new();
        let mut on = |e: JsonEvent<'_>| match e {
            JsonEvent::StringStart { .. } => out.push(Vec::new()),
            JsonEvent::StringData(d) => out.last_mut().unwrap().extend_from_slice(d),
            JsonEvent::StringEnd => {}
        };
        let mut p = JsonStrings::lenient();
        for chunk in doc.chunks(step.max(1)) {
            p.feed(chunk, &mut on).unwrap();
        }
        let malformed = p.is_malformed();
        assert_eq!(malformed, p.finish().is_err());
        (out, malformed)
    }

    #[test]
    fn a_lenient_reader_hands_on_the_strings_after_a_syntax_error() {
        for step in [1, 2, 5, 1000] {
            // Python reads NaN; JSON Lines and Go's decoder read values after the first;
            // `strict=False` accepts control bytes in strings.
            let (s, malformed) = lenient_strings(
                b"{\"a\":NaN,\"f\":\"QUJD\"}\n{\"g\":\"x\ty\\qz\"} 'h' \"i",
                step,
            );
            assert!(malformed);
            let want: Vec<Vec<u8>> = vec![
                b"a".to_vec(),
                b"f".to_vec(),
                b"QUJD".to_vec(),
                b"g".to_vec(),
                b"x\tyqz".to_vec(),
                b"i".to_vec(),
            ];
            assert_eq!(s, want, "step {step}");
            // Well-formed: the strict reading.
            let (s, malformed) = lenient_strings(br#"{"k":["v\u0041"]}"#, step);
            assert!(!malformed);
            assert_eq!(s, vec![b"k".to_vec(), b"vA".to_vec()]);
        }
    }

    fn text(doc: &[u8], step: usize) -> Vec<u8> {
        let mut t = JsonText::new();
        let mut out = Vec::new();
        for chunk in doc.chunks(step.max(1)) {
            t.feed(chunk, &mut out);
        }
        t.finish(&mut out);
        out
    }

    #[test]
    fn utf16_and_utf32_json_is_read_as_python_detects_it() {
        let doc = "{\"f\":\"QUJD\",\"é\":1}";
        let utf16le: Vec<u8> = doc.encode_utf16().flat_map(u16::to_le_bytes).collect();
        let utf16be: Vec<u8> = doc.encode_utf16().flat_map(u16::to_be_bytes).collect();
        let bom16: Vec<u8> = "\u{feff}"
            .encode_utf16()
            .chain(doc.encode_utf16())
            .flat_map(u16::to_le_bytes)
            .collect();
        let utf32be: Vec<u8> = doc
            .chars()
            .flat_map(|c| u32::from(c).to_be_bytes())
            .collect();
        let bom32: Vec<u8> = "\u{feff}"
            .chars()
            .chain(doc.chars())
            .flat_map(|c| u32::from(c).to_le_bytes())
            .collect();
        let want = "{\"f\":\"QUJD\",\"\u{fffd}\":1}".as_bytes();
        for (enc, encoded) in [
            (JsonEncoding::Utf16Le, utf16le),
            (JsonEncoding::Utf16Be, utf16be),
            (JsonEncoding::Utf16Le, bom16),
            (JsonEncoding::Utf32Be, utf32be),
            (JsonEncoding::Utf32Le, bom32),
        ] {
            assert_eq!(JsonEncoding::detect(&encoded[..4]), enc);
            for step in [1, 3, 1000] {
                assert_eq!(text(&encoded, step), want, "{enc:?} step {step}");
            }
        }
        assert_eq!(text(doc.as_bytes(), 3), doc.as_bytes());
        assert_eq!(text(b"[]", 1), b"[]");
        assert_eq!(text(b"[\0]\0", 1), b"[]");
    }

    #[test]
    fn nesting_is_bounded() {
        let deep = "[".repeat(MAX_DEPTH) + &"]".repeat(MAX_DEPTH);
        assert!(strings(deep.as_bytes(), 64).is_ok());
        let deeper = "[".repeat(MAX_DEPTH + 1);
        assert_eq!(strings(deeper.as_bytes(), 64), Err(JsonError::TooDeep));
    }
}
