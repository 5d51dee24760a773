//! A streaming splitter for `multipart/*` bodies (RFC 2046 §5.1.1, RFC 7578), so that each
//! part of a form upload is scanned as the file it carries: hash signatures only match
//! whole files. It holds at most one delimiter's worth of body bytes between calls.

use memchr::memmem;

/// Longest part header block accepted: form parts carry two or three short fields.
pub const MAX_PART_HEADERS: usize = 8 * 1024;
/// Longest boundary allowed by RFC 2046.
pub const MAX_BOUNDARY: usize = 70;
/// Transport padding after a delimiter longer than this is not padding.
const MAX_PADDING: usize = 256;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MultipartError {
    #[error("multipart boundary is empty, too long or has invalid characters")]
    BadBoundary,
    #[error("multipart part headers exceed {MAX_PART_HEADERS} bytes")]
    HeadersTooLong,
    #[error("multipart delimiter is followed by garbage")]
    BadDelimiter,
    #[error("multipart boundary appears inside a part, its head or the preamble")]
    BoundaryInData,
    #[error("multipart body ended before its closing delimiter")]
    Truncated,
    #[error("multipart body has no parts")]
    NoParts,
    #[error("multipart part header line is malformed")]
    BadPartHeader,
    #[error("multipart part has more than one {0} header")]
    DuplicatePartHeader(&'static str),
}

/// What the splitter found, in order.
#[derive(Debug, PartialEq, Eq)]
pub enum PartEvent<'a> {
    /// Bytes before the first delimiter (without the CRLF that belongs to it).
    Preamble(&'a [u8]),
    /// A part begins; its raw header block (without the empty line).
    Start(&'a [u8]),
    /// Bytes of the current part's body.
    Data(&'a [u8]),
    /// The current part ended.
    End,
    /// Bytes after the line of the closing delimiter.
    Epilogue(&'a [u8]),
}

/// The `boundary` of a `Content-Type`, as every reader of it would see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Boundary {
    /// Not a `multipart/*` media type.
    NotMultipart,
    /// Multipart without any boundary: no reader can split it.
    Missing,
    Found(String),
    /// Readers could split the body at different boundaries, or at one RFC 2046 forbids
    /// and that some readers accept and others trim or refuse: no single reading to scan.
    Ambiguous(&'static str),
}

/// Finds the boundary of a `Content-Type`. Servers read this header differently: RFC 2045
/// parsers honour quoted strings, others split at every `;`, PHP and several form libraries
/// search the raw value for `boundary=` (PHP's `rfc1867.c`, formidable's regex), some take
/// the first of two parameters and some the last, and RFC 2231 readers also accept
/// `boundary*=`. Only a value on which all of them agree is [`Boundary::Found`].
pub fn boundary_of(content_type: &[u8]) -> Boundary {
    let media = match crate::media_type::parse(content_type) {
        Ok(m) => m,
        Err(_) if crate::media_type::loose_essence(content_type).starts_with("multipart/") => {
            return Boundary::Ambiguous("multipart content type does not parse");
        }
        Err(_) => return not_multipart(content_type),
    };
    if !media.is_multipart() {
        return not_multipart(content_type);
    }
    let raw_mentions = boundary_mentions(content_type);
    if media.params.iter().any(|p| p.name.starts_with("boundary*")) {
        return Boundary::Ambiguous("RFC 2231 boundary parameter");
    }
    let mut params = media.params_named("boundary");
    let (Some(param), None) = (params.next(), params.next()) else {
        return if raw_mentions == 0 {
            Boundary::Missing
        } else if media.params_named("boundary").count() == 0 {
            Boundary::Ambiguous("boundary= only inside another parameter")
        } else {
            Boundary::Ambiguous("more than one boundary parameter")
        };
    };
    if raw_mentions != 1 {
        return Boundary::Ambiguous("boundary= also inside another parameter");
    }
    if param.escaped {
        return Boundary::Ambiguous("boundary with a backslash escape");
    }
    match std::str::from_utf8(&param.value) {
        Ok(b) if validate_boundary(b).is_ok() => Boundary::Found(b.to_owned()),
        _ => Boundary::Ambiguous("boundary that RFC 2046 does not allow"),
    }
}

/// A type that is not `multipart/*` still is to readers that match `multipart` anywhere
/// in the value and then look for `boundary=` (formidable's `/multipart/i`): `text/plain;
/// x=multipart; boundary=A` is split by them and scanned whole by a reader of the essence.
fn not_multipart(content_type: &[u8]) -> Boundary {
    let mentions_multipart =
        memmem::find(&content_type.to_ascii_lowercase(), b"multipart").is_some();
    if mentions_multipart && boundary_mentions(content_type) > 0 {
        Boundary::Ambiguous("multipart and boundary= in a type that is not multipart")
    } else {
        Boundary::NotMultipart
    }
}

/// How often `boundary` followed by `=` or `*` (after optional whitespace) occurs anywhere in
/// the value, in any case: what a reader that searches the raw header can find.
fn boundary_mentions(value: &[u8]) -> usize {
    let lower = value.to_ascii_lowercase();
    memmem::find_iter(&lower, b"boundary")
        .filter(|&at| {
            let rest = &lower[at + b"boundary".len()..];
            let rest = rest.trim_ascii_start();
            rest.first().is_some_and(|&c| c == b'=' || c == b'*')
        })
        .count()
}

/// The fields of a part head that decide how its body is read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PartHeaders {
    pub content_type: Option<Vec<u8>>,
    pub transfer_encoding: Option<Vec<u8>>,
}

/// Reads a part's header block (RFC 2045 §3, RFC 5322 §2.2 folding). A line that readers
/// would split or join differently (bare CR or LF, no colon, whitespace before the colon,
/// a control byte) and a second `Content-Type` or `Content-Transfer-Encoding` (first wins
/// in some readers, last in others) are errors.
pub fn parse_part_headers(block: &[u8]) -> Result<PartHeaders, MultipartError> {
    let mut headers = PartHeaders::default();
    if block.is_empty() {
        return Ok(headers);
    }
    // Unfolded (name, value) fields.
    let mut fields: Vec<(&[u8], Vec<u8>)> = Vec::new();
    let mut rest = block;
    while !rest.is_empty() {
        let (line, next) = match memmem::find(rest, b"\r\n") {
            Some(at) => (&rest[..at], &rest[at + 2..]),
            None => (rest, &b""[..]),
        };
        rest = next;
        if line
            .iter()
            .any(|&c| c == b'\r' || c == b'\n' || c == 0 || c == 0x7f)
        {
            return Err(MultipartError::BadPartHeader);
        }
        if line.first().is_some_and(|&c| c == b' ' || c == b'\t') {
            let (_, value) = fields.last_mut().ok_or(MultipartError::BadPartHeader)?;
            value.push(b' ');
            value.extend_from_slice(line.trim_ascii());
            continue;
        }
        let colon = memchr::memchr(b':', line).ok_or(MultipartError::BadPartHeader)?;
        let name = &line[..colon];
        if name.is_empty() || !name.iter().all(|&c| crate::media_type::is_tchar(c)) {
            return Err(MultipartError::BadPartHeader);
        }
        fields.push((name, line[colon + 1..].trim_ascii().to_vec()));
    }
    for (name, value) in fields {
        let (slot, label) = if name.eq_ignore_ascii_case(b"content-type") {
            (&mut headers.content_type, "Content-Type")
        } else if name.eq_ignore_ascii_case(b"content-transfer-encoding") {
            (&mut headers.transfer_encoding, "Content-Transfer-Encoding")
        } else {
            continue;
        };
        if slot.is_some() {
            return Err(MultipartError::DuplicatePartHeader(label));
        }
        *slot = Some(value);
    }
    Ok(headers)
}

fn validate_boundary(b: &str) -> Result<(), MultipartError> {
    let ok = !b.is_empty()
        && b.len() <= MAX_BOUNDARY
        && b.bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"'()+_,-./:=? ".contains(&c))
        && !b.ends_with(' ');
    if ok {
        Ok(())
    } else {
        Err(MultipartError::BadBoundary)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Preamble,
    AfterDelimiter,
    Headers,
    Body,
    /// After `--` of the closing delimiter, before the end of its line.
    AfterClose,
    Epilogue,
}

#[derive(Debug)]
pub struct MultipartSplitter {
    /// `--boundary`: a delimiter when a CRLF comes before it, an error anywhere else.
    dash_boundary: Vec<u8>,
    buf: Vec<u8>,
    state: State,
    parts: usize,
    /// Bytes of the CRLF put in front of the body that are still in `buf`.
    fake_crlf: usize,
}

impl MultipartSplitter {
    pub fn new(boundary: &str) -> Result<MultipartSplitter, MultipartError> {
        validate_boundary(boundary)?;
        let mut dash_boundary = b"--".to_vec();
        dash_boundary.extend_from_slice(boundary.as_bytes());
        Ok(MultipartSplitter {
            dash_boundary,
            // The first delimiter may open the body without a preceding CRLF.
            buf: b"\r\n".to_vec(),
            state: State::Preamble,
            parts: 0,
            fake_crlf: 2,
        })
    }

    pub fn parts(&self) -> usize {
        self.parts
    }

    /// Feeds the next bytes of the body.
    pub fn feed(
        &mut self,
        chunk: &[u8],
        on: &mut dyn FnMut(PartEvent<'_>),
    ) -> Result<(), MultipartError> {
        self.buf.extend_from_slice(chunk);
        self.process(on)
    }

    /// The body ended: checks that the closing delimiter was seen.
    pub fn finish(mut self, on: &mut dyn FnMut(PartEvent<'_>)) -> Result<usize, MultipartError> {
        self.process(on)?;
        if self.state == State::AfterClose {
            // The closing delimiter may end the body without a CRLF.
            if !self.buf.iter().all(|&b| b == b' ' || b == b'\t') {
                return Err(MultipartError::BadDelimiter);
            }
            self.state = State::Epilogue;
        }
        match self.state {
            State::Epilogue if self.parts > 0 => Ok(self.parts),
            State::Epilogue => Err(MultipartError::NoParts),
            _ => Err(MultipartError::Truncated),
        }
    }

    fn emit_preamble(&mut self, end: usize, on: &mut dyn FnMut(PartEvent<'_>)) {
        let skip = self.fake_crlf.min(end);
        self.fake_crlf -= skip;
        if end > skip {
            on(PartEvent::Preamble(&self.buf[skip..end]));
        }
    }

    fn process(&mut self, on: &mut dyn FnMut(PartEvent<'_>)) -> Result<(), MultipartError> {
        loop {
            match self.state {
                State::Preamble | State::Body => {
                    let in_body = self.state == State::Body;
                    match memmem::find(&self.buf, &self.dash_boundary) {
                        Some(pos) => {
                            // RFC 2046 §5.1.1: the boundary never occurs inside the data.
                            // Readers that find it without its CRLF (PHP after a bare LF,
                            // Django anywhere) end the part there; we would not.
                            if pos < 2 || &self.buf[pos - 2..pos] != b"\r\n" {
                                return Err(MultipartError::BoundaryInData);
                            }
                            let end = pos - 2;
                            if in_body {
                                if end > 0 {
                                    on(PartEvent::Data(&self.buf[..end]));
                                }
                                on(PartEvent::End);
                            } else {
                                self.emit_preamble(end, on);
                            }
                            self.buf.drain(..pos + self.dash_boundary.len());
                            self.state = State::AfterDelimiter;
                        }
                        None => {
                            // Keep what could be the start of a delimiter, with the two
                            // bytes before it.
                            let keep = self.dash_boundary.len() + 1;
                            if self.buf.len() > keep {
                                let emit = self.buf.len() - keep;
                                if in_body {
                                    on(PartEvent::Data(&self.buf[..emit]));
                                } else {
                                    self.emit_preamble(emit, on);
                                }
                                self.buf.drain(..emit);
                            }
                            return Ok(());
                        }
                    }
                }
                State::AfterDelimiter => {
                    if self.buf.len() < 2 {
                        return Ok(());
                    }
                    if self.buf.starts_with(b"--") {
                        self.buf.drain(..2);
                        self.state = State::AfterClose;
                        continue;
                    }
                    if !self.end_of_delimiter_line()? {
                        return Ok(());
                    }
                    self.state = State::Headers;
                }
                State::Headers => {
                    // An empty header block is just the CRLF that ends it.
                    let end = if self.buf.starts_with(b"\r\n") {
                        Some((0, 2))
                    } else {
                        memmem::find(&self.buf, b"\r\n\r\n").map(|p| (p, p + 4))
                    };
                    // A head holding the boundary is a part that ends there to readers that
                    // find the boundary anywhere.
                    let head =
                        end.map_or(&self.buf[..], |(headers_end, _)| &self.buf[..headers_end]);
                    if memmem::find(head, &self.dash_boundary).is_some() {
                        return Err(MultipartError::BoundaryInData);
                    }
                    match end {
                        Some((headers_end, body_start)) => {
                            if headers_end > MAX_PART_HEADERS {
                                return Err(MultipartError::HeadersTooLong);
                            }
                            self.parts += 1;
                            on(PartEvent::Start(&self.buf[..headers_end]));
                            // An empty body is followed at once by the delimiter, whose
                            // leading CRLF belongs to it.
                            self.buf.drain(..body_start);
                            self.state = State::Body;
                        }
                        None if self.buf.len() > MAX_PART_HEADERS + 4 => {
                            return Err(MultipartError::HeadersTooLong);
                        }
                        None => return Ok(()),
                    }
                }
                State::AfterClose => {
                    // `--boundary--garbage` is a close delimiter to some readers and part
                    // data to others (Go's reader): no single reading.
                    if !self.end_of_delimiter_line()? {
                        return Ok(());
                    }
                    self.state = State::Epilogue;
                }
                State::Epilogue => {
                    if !self.buf.is_empty() {
                        on(PartEvent::Epilogue(&self.buf));
                        self.buf.clear();
                    }
                    return Ok(());
                }
            }
        }
    }

    /// Consumes transport padding (spaces, tabs) and the CRLF that end a delimiter line;
    /// false while the CRLF has not arrived yet.
    fn end_of_delimiter_line(&mut self) -> Result<bool, MultipartError> {
        let Some(crlf) = memmem::find(&self.buf, b"\r\n") else {
            if self.buf.len() > MAX_PADDING
                || self
                    .buf
                    .iter()
                    .any(|&b| b != b' ' && b != b'\t' && b != b'\r')
            {
                return Err(MultipartError::BadDelimiter);
            }
            return Ok(false);
        };
        if !self.buf[..crlf].iter().all(|&b| b == b' ' || b == b'\t') {
            return Err(MultipartError::BadDelimiter);
        }
        self.buf.drain(..crlf + 2);
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Headers and data of one part.
    type Part = (Vec<u8>, Vec<u8>);

    /// What a body splits into: preamble, parts, epilogue.
    #[derive(Debug, Default, PartialEq, Eq)]
    struct Split {
        preamble: Vec<u8>,
        parts: Vec<Part>,
        epilogue: Vec<u8>,
    }

    /// Splits `body` fed in chunks of `step` bytes.
    fn split_all(boundary: &str, body: &[u8], step: usize) -> Result<Split, MultipartError> {
        let mut out = Split::default();
        let mut open = false;
        let mut on = |e: PartEvent<'_>| match e {
            PartEvent::Preamble(d) => {
                assert!(!open && out.parts.is_empty());
                out.preamble.extend_from_slice(d);
            }
            PartEvent::Start(h) => {
                assert!(!open);
                open = true;
                out.parts.push((h.to_vec(), Vec::new()));
            }
            PartEvent::Data(d) => {
                assert!(open);
                out.parts.last_mut().unwrap().1.extend_from_slice(d);
            }
            PartEvent::End => {
                assert!(open);
                open = false;
            }
            PartEvent::Epilogue(d) => {
                assert!(!open);
                out.epilogue.extend_from_slice(d);
            }
        };
        let mut s = MultipartSplitter::new(boundary)?;
        for chunk in body.chunks(step.max(1)) {
            s.feed(chunk, &mut on)?;
        }
        s.finish(&mut on)?;
        Ok(out)
    }

    fn split(boundary: &str, body: &[u8], step: usize) -> Result<Vec<Part>, MultipartError> {
        split_all(boundary, body, step).map(|s| s.parts)
    }

    const FORM: &[u8] = b"preamble\r\n--XyZ\r\n\
Content-Disposition: form-data; name=\"a\"\r\n\r\n\
hello\r\n--XyZ\r\n\
Content-Disposition: form-data; name=\"f\"; filename=\"x.bin\"\r\n\
Content-Type: application/octet-stream\r\n\r\n\
bin\r\n--XyY\r\ndata\r\n--XyZ--\r\nepilogue";

    #[test]
    fn parts_come_out_whole_at_every_chunk_size() {
        for step in [1, 2, 3, 5, 7, 13, 64, 4096] {
            let parts = split("XyZ", FORM, step).unwrap();
            assert_eq!(parts.len(), 2, "step {step}");
            assert_eq!(parts[0].1, b"hello");
            assert!(
                parts[1]
                    .0
                    .starts_with(b"Content-Disposition: form-data; name=\"f\"")
            );
            assert_eq!(parts[1].1, b"bin\r\n--XyY\r\ndata", "step {step}");
        }
    }

    #[test]
    fn preamble_and_epilogue_come_out_without_the_delimiter_lines() {
        for step in [1, 2, 3, 7, 4096] {
            let s = split_all("XyZ", FORM, step).unwrap();
            assert_eq!(s.preamble, b"preamble", "step {step}");
            assert_eq!(s.epilogue, b"epilogue", "step {step}");
        }
        let s = split_all("b", b"\r\n\r\n--b\r\n\r\nx\r\n--b-- \t\r\n\r\n", 1).unwrap();
        assert_eq!(
            (s.preamble, s.epilogue),
            (b"\r\n".to_vec(), b"\r\n".to_vec())
        );
        let s = split_all("b", b"--b\r\n\r\nx\r\n--b--", 2).unwrap();
        assert_eq!((s.preamble, s.epilogue), (vec![], vec![]));
        let s = split_all("b", b"--b\r\n\r\nx\r\n--b--  ", 3).unwrap();
        assert_eq!(s.parts.len(), 1);
    }

    #[test]
    fn body_may_start_with_the_boundary_and_parts_may_be_empty() {
        let body = b"--b\r\n\r\n\r\n--b\r\nX: y\r\n\r\nz\r\n--b--";
        for step in [1, 3, 100] {
            let parts = split("b", body, step).unwrap();
            assert_eq!(
                parts,
                vec![(vec![], vec![]), (b"X: y".to_vec(), b"z".to_vec())]
            );
        }
    }

    #[test]
    fn binary_data_with_crlf_runs_survives() {
        let mut data = vec![0u8; 3000];
        for (i, b) in data.iter_mut().enumerate() {
            *b = if i % 7 == 0 {
                b'\r'
            } else if i % 7 == 1 {
                b'\n'
            } else {
                (i % 251) as u8
            };
        }
        data.extend_from_slice(b"\r\n--");
        let mut body = b"--q\r\nContent-Type: x\r\n\r\n".to_vec();
        body.extend_from_slice(&data);
        body.extend_from_slice(b"\r\n--q--\r\n");
        for step in [1, 9, 1000] {
            assert_eq!(split("q", &body, step).unwrap()[0].1, data);
        }
    }

    #[test]
    fn malformed_bodies_are_errors() {
        assert_eq!(
            split("b", b"--b\r\n\r\nabc", 4),
            Err(MultipartError::Truncated)
        );
        assert_eq!(
            split("b", b"no delimiter at all", 4),
            Err(MultipartError::Truncated)
        );
        assert_eq!(split("b", b"--b--", 4), Err(MultipartError::NoParts));
        assert_eq!(
            split("b", b"--bX\r\n\r\na\r\n--b--", 4),
            Err(MultipartError::BadDelimiter)
        );
        // Go's reader takes `--b--x` for part data, others for the end.
        for step in [1, 4, 100] {
            assert_eq!(
                split("b", b"--b\r\n\r\na\r\n--b--x\r\n", step),
                Err(MultipartError::BadDelimiter)
            );
        }
        assert_eq!(
            split("b", b"--b\r\n\r\na\r\n--b--x", 100),
            Err(MultipartError::BadDelimiter)
        );
        let mut long = b"--b\r\n".to_vec();
        long.extend(std::iter::repeat_n(b'h', MAX_PART_HEADERS + 10));
        assert_eq!(split("b", &long, 512), Err(MultipartError::HeadersTooLong));
        assert_eq!(
            MultipartSplitter::new("").unwrap_err(),
            MultipartError::BadBoundary
        );
        assert_eq!(
            MultipartSplitter::new(&"a".repeat(71)).unwrap_err(),
            MultipartError::BadBoundary
        );
    }

    #[test]
    fn boundary_without_its_crlf_is_an_error() {
        // PHP ends the part at `\n--AaB` (and at `--AaBzz`, a prefix match), Django at
        // `--AaB` anywhere: they store `F`, a CRLF-only reader stores `F` and the rest.
        let head =
            "--AaB\r\nContent-Disposition: form-data; name=\"f\"; filename=\"e.com\"\r\n\r\n";
        for tail in [
            "F\n--AaB\r\nContent-Disposition: form-data; name=\"x\"\r\n\r\nx\r\n--AaB--\r\n",
            "F--AaB\r\nContent-Disposition: form-data; name=\"x\"\r\n\r\nx\r\n--AaB--\r\n",
            "F\n--AaBzz\r\nContent-Disposition: form-data; name=\"x\"\r\n\r\nx\r\n--AaB--\r\n",
            "F\r\n--AaB\r\nX: --AaB\r\n\r\nx\r\n--AaB--\r\n",
        ] {
            let body = format!("{head}{tail}");
            for step in [1, 2, 5, 4096] {
                assert_eq!(
                    split("AaB", body.as_bytes(), step),
                    Err(MultipartError::BoundaryInData),
                    "{tail:?} step {step}"
                );
            }
        }
        // In the preamble too; and a prefix match after a CRLF is garbage after a delimiter.
        assert_eq!(
            split("AaB", b"x--AaB\r\n\r\nF\r\n--AaB--", 3),
            Err(MultipartError::BoundaryInData)
        );
        assert_eq!(
            split("AaB", b"--AaB\r\n\r\nF\r\n--AaBzz\r\n\r\nx\r\n--AaB--", 3),
            Err(MultipartError::BadDelimiter)
        );
        // A part head without its blank line that runs into the next delimiter.
        assert_eq!(
            split("AaB", b"--AaB\r\nX: y\r\n--AaB\r\n\r\nF\r\n--AaB--", 100),
            Err(MultipartError::BoundaryInData)
        );
    }

    #[test]
    fn boundary_parameter_is_found() {
        let found = |b: &str| Boundary::Found(b.to_owned());
        assert_eq!(
            boundary_of(b"multipart/form-data; boundary=----WebKit123"),
            found("----WebKit123")
        );
        assert_eq!(
            boundary_of(b"Multipart/Mixed; charset=utf-8; BOUNDARY=\"a b\""),
            found("a b")
        );
        assert_eq!(
            boundary_of(b"multipart/form-data;boundary=\"a=b?c\""),
            found("a=b?c")
        );
        assert_eq!(boundary_of(b"multipart/form-data"), Boundary::Missing);
        assert_eq!(boundary_of(b"application/json"), Boundary::NotMultipart);
        assert_eq!(
            boundary_of(b"text/plain; boundary=x"),
            Boundary::NotMultipart
        );
        assert_eq!(
            boundary_of(b"application/json; profile=multipart"),
            Boundary::NotMultipart
        );
    }

    #[test]
    fn multipart_and_a_boundary_in_another_type_are_ambiguous() {
        // formidable splits any type that matches /multipart/i and has a boundary.
        for ct in [
            &b"text/plain; x=multipart; boundary=AaB"[..],
            b"application/x-MULTIPART; boundary=AaB",
            b"text/plain; boundary=AaB; note=\"multipart\"",
            b"text/plain multipart boundary=AaB",
        ] {
            assert!(
                matches!(boundary_of(ct), Boundary::Ambiguous(_)),
                "{}",
                String::from_utf8_lossy(ct)
            );
        }
    }

    #[test]
    fn boundaries_readers_disagree_on_are_ambiguous() {
        for ct in [
            // A quoted-string aware reader sees B, a `;` splitter or a raw search sees A.
            &b"multipart/form-data; x=\"; boundary=A;\"; boundary=B"[..],
            b"multipart/form-data; boundary=A; boundary=B",
            b"multipart/form-data; boundary=A; Boundary=A",
            b"multipart/form-data; x=\"boundary=A\"",
            b"multipart/form-data; myboundary=A; boundary=B",
            b"multipart/form-data; boundary*=utf-8''A",
            b"multipart/form-data; boundary*0=A; boundary=B",
            b"multipart/form-data; boundary=\"A\\\"B\"",
            b"multipart/form-data; boundary=\"A\\B\"",
            b"multipart/form-data; boundary=\"ends in space \"",
            b"multipart/form-data; boundary=\"a@b\"",
            b"multipart/form-data boundary=A",
            b"multipart/form-data; boundary=\"A",
            b"multipart/form-data, text/plain; boundary=A",
        ] {
            assert!(
                matches!(boundary_of(ct), Boundary::Ambiguous(_)),
                "{}",
                String::from_utf8_lossy(ct)
            );
        }
        let long = format!("multipart/mixed; boundary={}", "a".repeat(71));
        assert!(matches!(
            boundary_of(long.as_bytes()),
            Boundary::Ambiguous(_)
        ));
    }

    #[test]
    fn part_headers_are_read_with_folding() {
        let h = parse_part_headers(
            b"Content-Disposition: form-data; name=\"f\"\r\ncontent-type: multipart/mixed;\r\n\tboundary=x\r\nContent-Transfer-Encoding:  Base64 ",
        )
        .unwrap();
        assert_eq!(
            h.content_type.as_deref(),
            Some(&b"multipart/mixed; boundary=x"[..])
        );
        assert_eq!(h.transfer_encoding.as_deref(), Some(&b"Base64"[..]));
        assert_eq!(parse_part_headers(b""), Ok(PartHeaders::default()));
    }

    #[test]
    fn part_headers_readers_disagree_on_are_errors() {
        for (block, err) in [
            (
                &b"Content-Type: a/b\r\nContent-Type: c/d"[..],
                MultipartError::DuplicatePartHeader("Content-Type"),
            ),
            (
                b"Content-Transfer-Encoding: base64\r\ncontent-transfer-encoding: 7bit",
                MultipartError::DuplicatePartHeader("Content-Transfer-Encoding"),
            ),
            (
                b"Content-Type: a/b\nContent-Transfer-Encoding: base64",
                MultipartError::BadPartHeader,
            ),
            (b"Content-Type : a/b", MultipartError::BadPartHeader),
            (b"no colon", MultipartError::BadPartHeader),
            (b" folded first", MultipartError::BadPartHeader),
            (b"X: a\rb", MultipartError::BadPartHeader),
            (b": empty name", MultipartError::BadPartHeader),
        ] {
            assert_eq!(
                parse_part_headers(block),
                Err(err),
                "{}",
                String::from_utf8_lossy(block)
            );
        }
    }
}
