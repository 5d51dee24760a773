//! A streaming splitter for `multipart/*` bodies (RFC 2046 §5.1.1, RFC 7578), so that each
//! part of a form upload is scanned as the file it carries: hash signatures only match
//! whole files. It holds at most one delimiter's worth of body bytes between calls.

use memchr::memmem;

/// Longest part header block accepted.
pub const MAX_PART_HEADERS: usize = 16 * 1024;
/// Longest boundary allowed by RFC 2046.
pub const MAX_BOUNDARY: usize = 70;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MultipartError {
    #[error("multipart boundary is empty, too long or has invalid characters")]
    BadBoundary,
    #[error("multipart part headers exceed {MAX_PART_HEADERS} bytes")]
    HeadersTooLong,
    #[error("multipart delimiter is followed by garbage")]
    BadDelimiter,
    #[error("multipart body ended before its closing delimiter")]
    Truncated,
    #[error("multipart body has no parts")]
    NoParts,
}

/// What the splitter found, in order.
#[derive(Debug, PartialEq, Eq)]
pub enum PartEvent<'a> {
    /// A part begins; its raw header block (without the empty line).
    Start(&'a [u8]),
    /// Bytes of the current part's body.
    Data(&'a [u8]),
    /// The current part ended.
    End,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Preamble,
    AfterDelimiter,
    Headers,
    Body,
    Epilogue,
}

#[derive(Debug)]
pub struct MultipartSplitter {
    /// `\r\n--boundary`
    delimiter: Vec<u8>,
    buf: Vec<u8>,
    state: State,
    parts: usize,
}

/// Extracts the `boundary` parameter of a `multipart/*` Content-Type, or None when the
/// content type is not multipart.
pub fn boundary_of(content_type: &str) -> Option<Result<String, MultipartError>> {
    let mut params = content_type.split(';');
    let media = params.next()?.trim().to_ascii_lowercase();
    if !media.starts_with("multipart/") {
        return None;
    }
    for param in params {
        let Some((name, value)) = param.split_once('=') else {
            continue;
        };
        if name.trim().eq_ignore_ascii_case("boundary") {
            let value = value.trim();
            let value = value
                .strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .unwrap_or(value);
            return Some(validate_boundary(value).map(|()| value.to_owned()));
        }
    }
    Some(Err(MultipartError::BadBoundary))
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

impl MultipartSplitter {
    pub fn new(boundary: &str) -> Result<MultipartSplitter, MultipartError> {
        validate_boundary(boundary)?;
        let mut delimiter = b"\r\n--".to_vec();
        delimiter.extend_from_slice(boundary.as_bytes());
        Ok(MultipartSplitter {
            delimiter,
            // The first delimiter may open the body without a preceding CRLF.
            buf: b"\r\n".to_vec(),
            state: State::Preamble,
            parts: 0,
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
        match self.state {
            State::Epilogue if self.parts > 0 => Ok(self.parts),
            State::Epilogue => Err(MultipartError::NoParts),
            _ => Err(MultipartError::Truncated),
        }
    }

    fn process(&mut self, on: &mut dyn FnMut(PartEvent<'_>)) -> Result<(), MultipartError> {
        loop {
            match self.state {
                State::Preamble | State::Body => {
                    let in_body = self.state == State::Body;
                    match memmem::find(&self.buf, &self.delimiter) {
                        Some(pos) => {
                            if in_body {
                                if pos > 0 {
                                    on(PartEvent::Data(&self.buf[..pos]));
                                }
                                on(PartEvent::End);
                            }
                            self.buf.drain(..pos + self.delimiter.len());
                            self.state = State::AfterDelimiter;
                        }
                        None => {
                            // Keep what could be the start of a delimiter.
                            let keep = self.delimiter.len() - 1;
                            if self.buf.len() > keep {
                                let emit = self.buf.len() - keep;
                                if in_body {
                                    on(PartEvent::Data(&self.buf[..emit]));
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
                        self.buf.clear();
                        self.state = State::Epilogue;
                        continue;
                    }
                    // Transport padding (spaces, tabs) may precede the CRLF.
                    let Some(crlf) = memmem::find(&self.buf, b"\r\n") else {
                        if self.buf.len() > 256 {
                            return Err(MultipartError::BadDelimiter);
                        }
                        return Ok(());
                    };
                    if !self.buf[..crlf].iter().all(|&b| b == b' ' || b == b'\t') {
                        return Err(MultipartError::BadDelimiter);
                    }
                    self.buf.drain(..crlf + 2);
                    self.state = State::Headers;
                }
                State::Headers => {
                    // An empty header block is just the CRLF that ends it.
                    let end = if self.buf.starts_with(b"\r\n") {
                        Some((0, 2))
                    } else {
                        memmem::find(&self.buf, b"\r\n\r\n").map(|p| (p, p + 4))
                    };
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
                State::Epilogue => {
                    self.buf.clear();
                    return Ok(());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Headers and data of one part.
    type Part = (Vec<u8>, Vec<u8>);

    /// Splits `body` fed in chunks of `step` bytes.
    fn split(boundary: &str, body: &[u8], step: usize) -> Result<Vec<Part>, MultipartError> {
        let mut parts: Vec<Part> = Vec::new();
        let mut open = false;
        let mut on = |e: PartEvent<'_>| match e {
            PartEvent::Start(h) => {
                assert!(!open);
                open = true;
                parts.push((h.to_vec(), Vec::new()));
            }
            PartEvent::Data(d) => {
                assert!(open);
                parts.last_mut().unwrap().1.extend_from_slice(d);
            }
            PartEvent::End => {
                assert!(open);
                open = false;
            }
        };
        let mut s = MultipartSplitter::new(boundary)?;
        for chunk in body.chunks(step.max(1)) {
            s.feed(chunk, &mut on)?;
        }
        s.finish(&mut on)?;
        Ok(parts)
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
    fn boundary_parameter_is_found() {
        assert_eq!(
            boundary_of("multipart/form-data; boundary=----WebKit123"),
            Some(Ok("----WebKit123".to_string()))
        );
        assert_eq!(
            boundary_of("Multipart/Mixed; charset=utf-8; BOUNDARY=\"a b\""),
            Some(Ok("a b".to_string()))
        );
        assert_eq!(
            boundary_of("multipart/form-data"),
            Some(Err(MultipartError::BadBoundary))
        );
        assert_eq!(boundary_of("application/json"), None);
    }
}
