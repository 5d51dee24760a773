//! JSON texts in UTF-16 and UTF-32, handed on as UTF-8.

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
/// [`JsonStrings`](super::JsonStrings). Outside UTF-8 only ASCII is kept as it is and every other code unit
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
