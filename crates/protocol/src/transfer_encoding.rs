//! `Content-Transfer-Encoding` (RFC 2045 §6) of multipart parts, and base64 decoding for any
//! text that carries a file. The decoders are incremental: they take a part in pieces of any
//! size, hold at most a few bytes between pieces and write what they decode to `out`.
//!
//! They are as lenient as real decoders where all of those agree (line breaks and other
//! whitespace inside base64, missing `=` padding, lower-case hex in quoted-printable) and
//! fail where decoders differ (bytes outside the alphabet, data after padding, a broken `=`
//! escape): one decoder skips such bytes, another stops there, so no single file would be
//! what a receiver reassembles.

/// Whitespace allowed between encoded characters is at most this long in quoted-printable
/// before something that is not whitespace (RFC 2045 lines are at most 76 characters).
pub const MAX_QP_WHITESPACE: usize = 4096;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransferEncodingError {
    #[error("unknown content-transfer-encoding")]
    Unknown,
    #[error("byte {0:#04x} is not base64")]
    Base64Byte(u8),
    #[error("base64 padding is misplaced or incomplete")]
    Base64Padding,
    #[error("base64 ends inside a character group")]
    Base64Truncated,
    #[error("base64 mixes the standard and the URL-safe alphabet")]
    Base64MixedAlphabet,
    #[error("quoted-printable has a malformed = escape")]
    QpEscape,
    #[error("quoted-printable has a CR without LF")]
    QpBareCr,
    #[error("quoted-printable whitespace run exceeds {MAX_QP_WHITESPACE} bytes")]
    QpWhitespace,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransferEncoding {
    /// `7bit`, `8bit`, `binary`: the bytes are the content.
    Identity,
    Base64,
    QuotedPrintable,
}

/// Reads a `Content-Transfer-Encoding` value (case-insensitive, RFC 2045 §6.1).
pub fn parse(value: &[u8]) -> Result<TransferEncoding, TransferEncodingError> {
    let v = value.trim_ascii();
    if [&b"7bit"[..], b"8bit", b"binary"]
        .iter()
        .any(|m| v.eq_ignore_ascii_case(m))
    {
        Ok(TransferEncoding::Identity)
    } else if v.eq_ignore_ascii_case(b"base64") {
        Ok(TransferEncoding::Base64)
    } else if v.eq_ignore_ascii_case(b"quoted-printable") {
        Ok(TransferEncoding::QuotedPrintable)
    } else {
        Err(TransferEncodingError::Unknown)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Alphabet {
    /// RFC 4648 §4: `+` and `/`.
    Standard,
    /// RFC 4648 §5: `-` and `_`.
    UrlSafe,
    /// Whichever the first of those four characters says; mixing them is an error.
    Either,
}

/// Whitespace a base64 decoder skips: line breaks of MIME and PEM, and what the WHATWG
/// forgiving-base64 decode strips.
pub fn is_base64_whitespace(c: u8) -> bool {
    matches!(c, b' ' | b'\t' | b'\r' | b'\n' | 0x0c)
}

#[derive(Debug, Clone)]
pub struct Base64Decoder {
    alphabet: Alphabet,
    /// The alphabet `+ / - _` have shown so far.
    seen: Option<Alphabet>,
    quad: [u8; 4],
    filled: usize,
    padding: usize,
    /// The padding completed a group: only whitespace may follow.
    closed: bool,
}

impl Base64Decoder {
    pub fn new(alphabet: Alphabet) -> Base64Decoder {
        Base64Decoder {
            alphabet,
            seen: None,
            quad: [0; 4],
            filled: 0,
            padding: 0,
            closed: false,
        }
    }

    /// The alphabet the input has used so far.
    pub fn alphabet(&self) -> Alphabet {
        self.seen.unwrap_or(self.alphabet)
    }

    fn value(&mut self, c: u8) -> Result<u8, TransferEncodingError> {
        let (v, alphabet) = match c {
            b'A'..=b'Z' => return Ok(c - b'A'),
            b'a'..=b'z' => return Ok(c - b'a' + 26),
            b'0'..=b'9' => return Ok(c - b'0' + 52),
            b'+' => (62, Alphabet::Standard),
            b'/' => (63, Alphabet::Standard),
            b'-' => (62, Alphabet::UrlSafe),
            b'_' => (63, Alphabet::UrlSafe),
            _ => return Err(TransferEncodingError::Base64Byte(c)),
        };
        if self.alphabet != Alphabet::Either && self.alphabet != alphabet {
            return Err(TransferEncodingError::Base64Byte(c));
        }
        match self.seen {
            Some(seen) if seen != alphabet => {
                return Err(TransferEncodingError::Base64MixedAlphabet);
            }
            _ => self.seen = Some(alphabet),
        }
        Ok(v)
    }

    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<(), TransferEncodingError> {
        for &c in input {
            if is_base64_whitespace(c) {
                continue;
            }
            if c == b'=' {
                // `=` stands for the missing characters of the last group only.
                if self.closed || self.filled < 2 {
                    return Err(TransferEncodingError::Base64Padding);
                }
                self.padding += 1;
                if self.filled + self.padding == 4 {
                    self.flush_partial(out);
                    self.closed = true;
                }
                continue;
            }
            if self.closed || self.padding > 0 {
                return Err(TransferEncodingError::Base64Padding);
            }
            self.quad[self.filled] = self.value(c)?;
            self.filled += 1;
            if self.filled == 4 {
                let [a, b, c, d] = self.quad;
                out.extend_from_slice(&[a << 2 | b >> 4, b << 4 | c >> 2, c << 6 | d]);
                self.filled = 0;
            }
        }
        Ok(())
    }

    fn flush_partial(&mut self, out: &mut Vec<u8>) {
        decode_partial_group(self.quad, self.filled, out);
        self.filled = 0;
    }

    /// The input ended: decodes a last group without padding.
    pub fn finish(mut self, out: &mut Vec<u8>) -> Result<(), TransferEncodingError> {
        if self.closed {
            return Ok(());
        }
        if self.padding > 0 {
            return Err(TransferEncodingError::Base64Padding);
        }
        if self.filled == 1 {
            return Err(TransferEncodingError::Base64Truncated);
        }
        self.flush_partial(out);
        Ok(())
    }
}

/// The bytes of a last base64 group of `filled` (2 or 3) sextets; one alone holds no byte.
fn decode_partial_group(quad: [u8; 4], filled: usize, out: &mut Vec<u8>) {
    let [a, b, c, _] = quad;
    match filled {
        2 => out.push(a << 2 | b >> 4),
        3 => out.extend_from_slice(&[a << 2 | b >> 4, b << 4 | c >> 2]),
        _ => {}
    }
}

/// Base64 as lenient decoders read any text: Python's `b64decode` (without `validate`) and
/// Node's `Buffer.from(s, "base64")` skip every byte outside the alphabet (`.`, spaces,
/// quotes), and Node takes `+/` and `-_` alike, mixed. Where the text is strictly base64
/// the output is the strict decoder's. They part at a `=` that does not complete a group:
/// Python skips it and goes on, Node stops there, so Node's output is a prefix of
/// Python's, the one written here ([`LenientBase64Decoder::node_stop`]). Missing padding
/// at the end is decoded as Node does (Python fails).
#[derive(Debug, Clone, Default)]
pub struct LenientBase64Decoder {
    quad: [u8; 4],
    filled: usize,
    pads: usize,
    /// A `=` completed a group: the rest is ignored.
    done: bool,
    written: u64,
    node_stop: Option<u64>,
}

impl LenientBase64Decoder {
    pub fn new() -> LenientBase64Decoder {
        LenientBase64Decoder::default()
    }

    /// How many of the bytes written are Node's output, when Node stops before the end.
    pub fn node_stop(&self) -> Option<u64> {
        self.node_stop.filter(|&n| n < self.written)
    }

    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) {
        for &c in input {
            if self.done {
                return;
            }
            if c == b'=' {
                if self.node_stop.is_none() {
                    // Node decodes what it has of the group, as at the end.
                    let partial = match self.filled {
                        2 => 1,
                        3 => 2,
                        _ => 0,
                    };
                    self.node_stop = Some(self.written + partial);
                }
                if self.filled >= 2 {
                    self.pads += 1;
                    if self.filled + self.pads >= 4 {
                        self.flush_partial(out);
                        self.done = true;
                    }
                }
                continue;
            }
            let v = match c {
                b'A'..=b'Z' => c - b'A',
                b'a'..=b'z' => c - b'a' + 26,
                b'0'..=b'9' => c - b'0' + 52,
                b'+' | b'-' => 62,
                b'/' | b'_' => 63,
                _ => continue,
            };
            self.pads = 0;
            self.quad[self.filled] = v;
            self.filled += 1;
            if self.filled == 4 {
                let [a, b, c, d] = self.quad;
                out.extend_from_slice(&[a << 2 | b >> 4, b << 4 | c >> 2, c << 6 | d]);
                self.written += 3;
                self.filled = 0;
            }
        }
    }

    fn flush_partial(&mut self, out: &mut Vec<u8>) {
        decode_partial_group(self.quad, self.filled, out);
        self.written += self.filled.saturating_sub(1) as u64;
        self.filled = 0;
    }

    /// The input ended: a last group without padding is decoded (one lone character is
    /// dropped).
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        if !self.done {
            self.flush_partial(out);
            self.done = true;
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum QpState {
    Text,
    /// A CR of a hard line break.
    Cr,
    /// After `=`.
    Eq,
    /// After `=` and one hex digit.
    EqHex(u8),
    /// After `=` and whitespace: only more whitespace and the line break may follow.
    SoftWhitespace,
    /// After `=`, perhaps whitespace, and CR.
    SoftCr,
}

/// RFC 2045 §6.7: `=XX` escapes, `=` soft line breaks, trailing whitespace of a line
/// removed. A hard line break stays what it was (CRLF, or a bare LF as Go and Python keep
/// it).
#[derive(Debug, Clone)]
pub struct QuotedPrintableDecoder {
    state: QpState,
    /// Spaces and tabs not yet known to be inside the line rather than trailing.
    whitespace: Vec<u8>,
    soft_whitespace: usize,
}

impl Default for QuotedPrintableDecoder {
    fn default() -> Self {
        QuotedPrintableDecoder::new()
    }
}

fn hex(c: u8) -> Option<u8> {
    (c as char).to_digit(16).map(|d| d as u8)
}

impl QuotedPrintableDecoder {
    pub fn new() -> QuotedPrintableDecoder {
        QuotedPrintableDecoder {
            state: QpState::Text,
            whitespace: Vec::new(),
            soft_whitespace: 0,
        }
    }

    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<(), TransferEncodingError> {
        for &c in input {
            self.state = match (self.state, c) {
                (QpState::Text, b' ' | b'\t') => {
                    if self.whitespace.len() == MAX_QP_WHITESPACE {
                        return Err(TransferEncodingError::QpWhitespace);
                    }
                    self.whitespace.push(c);
                    QpState::Text
                }
                (QpState::Text, b'\r') => {
                    self.whitespace.clear();
                    QpState::Cr
                }
                (QpState::Text, b'\n') => {
                    self.whitespace.clear();
                    out.push(b'\n');
                    QpState::Text
                }
                (QpState::Text, b'=') => {
                    out.append(&mut self.whitespace);
                    QpState::Eq
                }
                (QpState::Text, _) => {
                    out.append(&mut self.whitespace);
                    out.push(c);
                    QpState::Text
                }
                (QpState::Cr, b'\n') => {
                    out.extend_from_slice(b"\r\n");
                    QpState::Text
                }
                (QpState::Cr, _) => return Err(TransferEncodingError::QpBareCr),
                (QpState::Eq, b'\r') => QpState::SoftCr,
                (QpState::Eq, b'\n') => QpState::Text,
                (QpState::Eq, b' ' | b'\t') => {
                    self.soft_whitespace = 1;
                    QpState::SoftWhitespace
                }
                (QpState::Eq, _) => QpState::EqHex(hex(c).ok_or(TransferEncodingError::QpEscape)?),
                (QpState::EqHex(high), _) => {
                    out.push(high << 4 | hex(c).ok_or(TransferEncodingError::QpEscape)?);
                    QpState::Text
                }
                (QpState::SoftWhitespace, b' ' | b'\t') => {
                    self.soft_whitespace += 1;
                    if self.soft_whitespace > MAX_QP_WHITESPACE {
                        return Err(TransferEncodingError::QpWhitespace);
                    }
                    QpState::SoftWhitespace
                }
                (QpState::SoftWhitespace, b'\r') => QpState::SoftCr,
                (QpState::SoftWhitespace, b'\n') => QpState::Text,
                (QpState::SoftWhitespace, _) => return Err(TransferEncodingError::QpEscape),
                (QpState::SoftCr, b'\n') => QpState::Text,
                (QpState::SoftCr, _) => return Err(TransferEncodingError::QpBareCr),
            };
        }
        Ok(())
    }

    /// The input ended: trailing whitespace of the last line is dropped; an unfinished
    /// escape or line break is an error.
    pub fn finish(self, _out: &mut Vec<u8>) -> Result<(), TransferEncodingError> {
        match self.state {
            QpState::Text => Ok(()),
            QpState::Cr | QpState::SoftCr => Err(TransferEncodingError::QpBareCr),
            QpState::Eq | QpState::EqHex(_) | QpState::SoftWhitespace => {
                Err(TransferEncodingError::QpEscape)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b64(
        alphabet: Alphabet,
        input: &[u8],
        step: usize,
    ) -> Result<Vec<u8>, TransferEncodingError> {
        let mut d = Base64Decoder::new(alphabet);
        let mut out = Vec::new();
        for chunk in input.chunks(step.max(1)) {
            d.feed(chunk, &mut out)?;
        }
        d.finish(&mut out)?;
        Ok(out)
    }

    fn qp(input: &[u8], step: usize) -> Result<Vec<u8>, TransferEncodingError> {
        let mut d = QuotedPrintableDecoder::new();
        let mut out = Vec::new();
        for chunk in input.chunks(step.max(1)) {
            d.feed(chunk, &mut out)?;
        }
        d.finish(&mut out)?;
        Ok(out)
    }

    #[test]
    fn transfer_encodings_are_named_case_insensitively() {
        assert_eq!(parse(b" Base64 "), Ok(TransferEncoding::Base64));
        assert_eq!(
            parse(b"QUOTED-PRINTABLE"),
            Ok(TransferEncoding::QuotedPrintable)
        );
        for v in [&b"7bit"[..], b"8BIT", b"binary"] {
            assert_eq!(parse(v), Ok(TransferEncoding::Identity));
        }
        for v in [&b""[..], b"x-uuencode", b"base64 (comment)", b"gzip"] {
            assert_eq!(parse(v), Err(TransferEncodingError::Unknown));
        }
    }

    #[test]
    fn base64_decodes_with_line_breaks_and_optional_padding_at_every_chunk_size() {
        for step in [1, 2, 3, 5, 100] {
            assert_eq!(
                b64(Alphabet::Standard, b"SGVs\r\nbG8g\n d29y bGQ=\r\n", step).unwrap(),
                b"Hello world"
            );
            assert_eq!(b64(Alphabet::Standard, b"SGVsbG8", step).unwrap(), b"Hello");
            assert_eq!(b64(Alphabet::Standard, b"SGVsbA==", step).unwrap(), b"Hell");
            assert_eq!(b64(Alphabet::Standard, b"SGVsbA", step).unwrap(), b"Hell");
            assert_eq!(b64(Alphabet::Standard, b"", step).unwrap(), b"");
        }
        assert_eq!(
            b64(Alphabet::Standard, b"+/+/", 1).unwrap(),
            [0xfb, 0xff, 0xbf]
        );
        assert_eq!(
            b64(Alphabet::UrlSafe, b"-_-_", 1).unwrap(),
            [0xfb, 0xff, 0xbf]
        );
        assert_eq!(
            b64(Alphabet::Either, b"-_-_", 1).unwrap(),
            [0xfb, 0xff, 0xbf]
        );
    }

    #[test]
    fn base64_that_decoders_read_differently_is_an_error() {
        use TransferEncodingError as E;
        for (input, err) in [
            (&b"SGVs*bG8="[..], E::Base64Byte(b'*')),
            (b"SGVsbA==SGVs", E::Base64Padding),
            (b"SGVsbA=", E::Base64Padding),
            (b"SGVsb===", E::Base64Padding),
            (b"S===", E::Base64Padding),
            (b"=SGV", E::Base64Padding),
            (b"SGVsb", E::Base64Truncated),
            (b"ab-_", E::Base64Byte(b'-')),
        ] {
            assert_eq!(
                b64(Alphabet::Standard, input, 1),
                Err(err.clone()),
                "{input:?}"
            );
            assert_eq!(b64(Alphabet::Standard, input, 64), Err(err), "{input:?}");
        }
        assert_eq!(
            b64(Alphabet::Either, b"ab+_", 1),
            Err(E::Base64MixedAlphabet)
        );
        assert_eq!(b64(Alphabet::UrlSafe, b"ab+/", 1), Err(E::Base64Byte(b'+')));
    }

    fn lenient(input: &[u8], step: usize) -> (Vec<u8>, Option<u64>) {
        let mut d = LenientBase64Decoder::new();
        let mut out = Vec::new();
        for chunk in input.chunks(step.max(1)) {
            d.feed(chunk, &mut out);
        }
        d.finish(&mut out);
        (out, d.node_stop())
    }

    #[test]
    fn lenient_base64_skips_what_python_and_node_skip() {
        for step in [1, 2, 3, 100] {
            // Strict base64 reads the same.
            assert_eq!(
                lenient(b"SGVs\r\nbG8g d29y bGQ=", step),
                (b"Hello world".to_vec(), None)
            );
            assert_eq!(lenient(b"SGVsbA", step), (b"Hell".to_vec(), None));
            // Dots, spaces and quotes skipped; both alphabets, mixed.
            assert_eq!(lenient(b"SG.Vs b\"G8=", step), (b"Hello".to_vec(), None));
            assert_eq!(lenient(b"+/-_", step), (vec![0xfb, 0xff, 0xbf], None));
            // Padding that completes a group ends the data for both.
            assert_eq!(lenient(b"SGVsbA==SGVs", step), (b"Hell".to_vec(), None));
            // A `=` Python skips: Node stops there, with the first byte of the group.
            assert_eq!(lenient(b"SGVs=bG8=", step), (b"Hello".to_vec(), Some(3)));
            assert_eq!(lenient(b"SG=Vs", step), (b"Hel".to_vec(), Some(1)));
            assert_eq!(lenient(b"=SGVs", step), (b"Hel".to_vec(), Some(0)));
        }
    }

    #[test]
    fn quoted_printable_decodes_escapes_soft_breaks_and_drops_trailing_whitespace() {
        let input = b"caf=C3=a9 =\r\nau lait  \r\nnext=  \r\nline\t\nend  ";
        for step in [1, 2, 3, 7, 100] {
            assert_eq!(
                qp(input, step).unwrap(),
                "café au lait\r\nnextline\nend".as_bytes(),
                "step {step}"
            );
        }
        assert_eq!(qp(b"a=\nb", 1).unwrap(), b"ab");
        assert_eq!(qp(b"\x80 8-bit passes", 1).unwrap(), b"\x80 8-bit passes");
    }

    #[test]
    fn quoted_printable_that_decoders_read_differently_is_an_error() {
        use TransferEncodingError as E;
        for (input, err) in [
            (&b"a=ZZ"[..], E::QpEscape),
            (b"a=4", E::QpEscape),
            (b"a=", E::QpEscape),
            (b"a= b", E::QpEscape),
            (b"a\rb", E::QpBareCr),
            (b"a=\rb", E::QpBareCr),
            (b"a\r", E::QpBareCr),
        ] {
            assert_eq!(qp(input, 1), Err(err.clone()), "{input:?}");
            assert_eq!(qp(input, 64), Err(err), "{input:?}");
        }
        let spaces = vec![b' '; MAX_QP_WHITESPACE + 1];
        assert_eq!(qp(&spaces, 100), Err(E::QpWhitespace));
    }
}
