//! ICAP (RFC 3507) without I/O: the request head, `Encapsulated`, the embedded HTTP heads,
//! chunk-size lines with their extensions; the bytes of our answers are in [`answer`]. Every
//! parser takes a byte slice, returns `Ok(None)` when it needs more bytes, and bounds every
//! length.

mod answer;

pub use answer::*;

/// The largest ICAP head (request line and headers) we read.
pub const MAX_HEAD: usize = 64 * 1024;
/// The largest encapsulated HTTP header area (req-hdr and res-hdr together).
pub const MAX_HTTP_HEADERS: usize = 256 * 1024;
/// The longest chunk-size line, extensions included.
pub const MAX_CHUNK_LINE: usize = 4096;
/// The largest single chunk (a body may have many).
pub const MAX_CHUNK: u64 = 1 << 40;
const MAX_HEADERS: usize = 256;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IcapError {
    #[error("head longer than {0} bytes")]
    TooLarge(usize),
    #[error("malformed request line {0:?}")]
    RequestLine(String),
    #[error("unsupported version {0:?}")]
    Version(String),
    #[error("unknown method {0:?}")]
    Method(String),
    #[error("malformed header line {0:?}")]
    Header(String),
    #[error("more than {MAX_HEADERS} header lines")]
    TooManyHeaders,
    #[error("bad Encapsulated header: {0}")]
    Encapsulated(String),
    #[error("bad chunk-size line: {0}")]
    Chunk(String),
    #[error("malformed HTTP head: {0}")]
    HttpHead(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Options,
    Reqmod,
    Respmod,
}

impl Method {
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Options => "OPTIONS",
            Method::Reqmod => "REQMOD",
            Method::Respmod => "RESPMOD",
        }
    }
}

/// Header fields in order; names compare case-insensitively.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Headers(pub Vec<(String, String)>);

impl Headers {
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Whether a comma-separated header holds `token` (e.g. `Allow: 204`).
    pub fn has_token(&self, name: &str, token: &str) -> bool {
        self.0
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .flat_map(|(_, v)| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestHead {
    pub method: Method,
    pub uri: String,
    pub headers: Headers,
}

impl RequestHead {
    /// The path of the ICAP URI (`icap://host:port/avscan?x` → `/avscan`).
    pub fn service_path(&self) -> &str {
        let rest = self
            .uri
            .strip_prefix("icap://")
            .or_else(|| self.uri.strip_prefix("icaps://"))
            .map_or(self.uri.as_str(), |r| r.find('/').map_or("/", |i| &r[i..]));
        rest.split('?').next().unwrap_or(rest)
    }

    /// `Preview: n`, when the client sends a preview.
    pub fn preview(&self) -> Result<Option<u64>, IcapError> {
        self.headers
            .get("Preview")
            .map(|v| {
                v.trim()
                    .parse::<u64>()
                    .map_err(|_| IcapError::Header(format!("Preview: {v}")))
            })
            .transpose()
    }

    pub fn allows_204(&self) -> bool {
        self.headers.has_token("Allow", "204")
    }

    pub fn wants_close(&self) -> bool {
        self.headers.has_token("Connection", "close")
    }
}

/// Where the head ends (just after CRLF CRLF), if it is complete within `limit`.
fn head_end(buf: &[u8], limit: usize) -> Result<Option<usize>, IcapError> {
    match memchr::memmem::find(&buf[..buf.len().min(limit)], b"\r\n\r\n") {
        Some(i) => Ok(Some(i + 4)),
        None if buf.len() >= limit => Err(IcapError::TooLarge(limit)),
        None => Ok(None),
    }
}

fn parse_header_lines<'a>(lines: impl Iterator<Item = &'a [u8]>) -> Result<Headers, IcapError> {
    let mut headers: Vec<(String, String)> = Vec::new();
    for line in lines {
        if line.is_empty() {
            break;
        }
        let text = std::str::from_utf8(line)
            .map_err(|_| IcapError::Header(String::from_utf8_lossy(line).into_owned()))?;
        // Obsolete line folding (RFC 7230 3.2.4), which X-Violations-Found uses.
        if text.starts_with([' ', '\t']) {
            let Some(last) = headers.last_mut() else {
                return Err(IcapError::Header(text.to_owned()));
            };
            last.1.push(' ');
            last.1.push_str(text.trim());
            continue;
        }
        let (name, value) = text
            .split_once(':')
            .ok_or_else(|| IcapError::Header(text.to_owned()))?;
        if name.is_empty() || !name.bytes().all(is_token_byte) {
            return Err(IcapError::Header(text.to_owned()));
        }
        if headers.len() == MAX_HEADERS {
            return Err(IcapError::TooManyHeaders);
        }
        headers.push((name.to_owned(), value.trim().to_owned()));
    }
    Ok(Headers(headers))
}

fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn lines(head: &[u8]) -> impl Iterator<Item = &[u8]> {
    head.split(|b| *b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l))
}

/// Parses an ICAP request head at the start of `buf`: the head and its length.
pub fn parse_request_head(buf: &[u8]) -> Result<Option<(RequestHead, usize)>, IcapError> {
    let Some(end) = head_end(buf, MAX_HEAD)? else {
        return Ok(None);
    };
    let mut it = lines(&buf[..end - 2]);
    let first = it.next().unwrap_or_default();
    let line = std::str::from_utf8(first)
        .map_err(|_| IcapError::RequestLine(String::from_utf8_lossy(first).into_owned()))?;
    let mut parts = line.split(' ');
    let (Some(method), Some(uri), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(IcapError::RequestLine(line.to_owned()));
    };
    if version != "ICAP/1.0" {
        return Err(IcapError::Version(version.to_owned()));
    }
    let method = match method {
        "OPTIONS" => Method::Options,
        "REQMOD" => Method::Reqmod,
        "RESPMOD" => Method::Respmod,
        other => return Err(IcapError::Method(other.to_owned())),
    };
    if uri.is_empty() {
        return Err(IcapError::RequestLine(line.to_owned()));
    }
    let headers = parse_header_lines(it)?;
    Ok(Some((
        RequestHead {
            method,
            uri: uri.to_owned(),
            headers,
        },
        end,
    )))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Section {
    ReqHdr,
    ResHdr,
    ReqBody,
    ResBody,
    OptBody,
    NullBody,
}

impl Section {
    fn parse(name: &str) -> Option<Section> {
        Some(match name {
            "req-hdr" => Section::ReqHdr,
            "res-hdr" => Section::ResHdr,
            "req-body" => Section::ReqBody,
            "res-body" => Section::ResBody,
            "opt-body" => Section::OptBody,
            "null-body" => Section::NullBody,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Section::ReqHdr => "req-hdr",
            Section::ResHdr => "res-hdr",
            Section::ReqBody => "req-body",
            Section::ResBody => "res-body",
            Section::OptBody => "opt-body",
            Section::NullBody => "null-body",
        }
    }
}

/// The `Encapsulated` header (RFC 3507 4.4.1): header sections with their offsets, then
/// exactly one body section (or `null-body`) whose offset is where the body starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encapsulated {
    pub headers: Vec<(Section, usize)>,
    pub body: (Section, usize),
}

impl Encapsulated {
    /// Byte ranges of each header section within the header area.
    pub fn header_ranges(&self) -> Vec<(Section, std::ops::Range<usize>)> {
        let ends = self
            .headers
            .iter()
            .skip(1)
            .map(|(_, o)| *o)
            .chain(std::iter::once(self.body.1));
        self.headers
            .iter()
            .zip(ends)
            .map(|((s, start), end)| (*s, *start..end))
            .collect()
    }

    pub fn has_body(&self) -> bool {
        self.body.0 != Section::NullBody
    }
}

pub fn parse_encapsulated(value: &str, method: Method) -> Result<Encapsulated, IcapError> {
    let bad = |why: &str| IcapError::Encapsulated(format!("{why}: {value:?}"));
    let mut headers = Vec::new();
    let mut body = None;
    let mut last_offset = 0usize;
    for (i, entry) in value.split(',').enumerate() {
        let (name, offset) = entry.trim().split_once('=').ok_or_else(|| bad("no '='"))?;
        let section = Section::parse(name.trim()).ok_or_else(|| bad("unknown section"))?;
        let offset = offset.trim();
        if offset.is_empty() || !offset.bytes().all(|b| b.is_ascii_digit()) || offset.len() > 9 {
            return Err(bad("offset is not a small decimal number"));
        }
        let offset: usize = offset.parse().map_err(|_| bad("offset"))?;
        if i == 0 && offset != 0 {
            return Err(bad("the first section must start at 0"));
        }
        if offset < last_offset {
            return Err(bad("offsets decrease"));
        }
        if offset > MAX_HTTP_HEADERS {
            return Err(IcapError::TooLarge(MAX_HTTP_HEADERS));
        }
        last_offset = offset;
        if body.is_some() {
            return Err(bad("a section follows the body"));
        }
        match section {
            Section::ReqHdr | Section::ResHdr => {
                if headers.iter().any(|(s, _)| *s == section)
                    || (section == Section::ReqHdr && !headers.is_empty())
                {
                    return Err(bad("header sections out of order"));
                }
                headers.push((section, offset));
            }
            _ => body = Some((section, offset)),
        }
    }
    let body = body.ok_or_else(|| bad("no body section"))?;
    let allowed = match method {
        Method::Options => matches!(body.0, Section::NullBody | Section::OptBody),
        Method::Reqmod => matches!(body.0, Section::NullBody | Section::ReqBody),
        Method::Respmod => matches!(body.0, Section::NullBody | Section::ResBody),
    };
    if !allowed {
        return Err(bad("body section does not fit the method"));
    }
    if method == Method::Respmod && !headers.iter().any(|(s, _)| *s == Section::ResHdr) {
        return Err(bad("RESPMOD without res-hdr"));
    }
    if method == Method::Reqmod && headers.iter().any(|(s, _)| *s == Section::ResHdr) {
        return Err(bad("REQMOD with res-hdr"));
    }
    Ok(Encapsulated { headers, body })
}

/// An encapsulated HTTP request or response head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpHead {
    pub start_line: String,
    pub headers: Headers,
}

impl HttpHead {
    /// The request target of a request head (`GET /x HTTP/1.1` → `/x`).
    pub fn target(&self) -> Option<&str> {
        self.start_line.split(' ').nth(1)
    }
}

/// Parses one encapsulated HTTP head, which must be exactly the section's bytes.
pub fn parse_http_head(section: &[u8]) -> Result<HttpHead, IcapError> {
    let bad = |why: &str| IcapError::HttpHead(why.to_owned());
    if !section.ends_with(b"\r\n\r\n") {
        return Err(bad("section does not end with an empty line"));
    }
    let mut it = lines(&section[..section.len() - 2]);
    let first = it.next().unwrap_or_default();
    let start_line = std::str::from_utf8(first)
        .map_err(|_| bad("start line is not text"))?
        .to_owned();
    if start_line.split(' ').count() < 2 {
        return Err(bad("start line"));
    }
    let headers = parse_header_lines(it).map_err(|e| IcapError::HttpHead(e.to_string()))?;
    Ok(HttpHead {
        start_line,
        headers,
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkHeader {
    pub size: u64,
    /// `ieof` on the last chunk of a preview: the body ends here (RFC 3507 4.5).
    pub ieof: bool,
}

/// Parses a chunk-size line (`1a2f; ieof\r\n`) at the start of `buf`.
pub fn parse_chunk_header(buf: &[u8]) -> Result<Option<(ChunkHeader, usize)>, IcapError> {
    let window = &buf[..buf.len().min(MAX_CHUNK_LINE)];
    let Some(nl) = memchr::memchr(b'\n', window) else {
        if buf.len() >= MAX_CHUNK_LINE {
            return Err(IcapError::Chunk("line too long".into()));
        }
        return Ok(None);
    };
    let line = &buf[..nl];
    let line = line
        .strip_suffix(b"\r")
        .ok_or_else(|| IcapError::Chunk("no CR before LF".into()))?;
    let text = std::str::from_utf8(line).map_err(|_| IcapError::Chunk("not text".into()))?;
    let mut parts = text.split(';');
    let size_text = parts.next().unwrap_or_default().trim();
    if size_text.is_empty()
        || size_text.len() > 16
        || !size_text.bytes().all(|b| b.is_ascii_hexdigit())
    {
        return Err(IcapError::Chunk(format!("size {size_text:?}")));
    }
    let size = u64::from_str_radix(size_text, 16)
        .map_err(|_| IcapError::Chunk(format!("size {size_text:?}")))?;
    if size > MAX_CHUNK {
        return Err(IcapError::Chunk(format!("chunk of {size} bytes")));
    }
    let mut ieof = false;
    for ext in parts {
        let name = ext.split('=').next().unwrap_or_default().trim();
        if name.eq_ignore_ascii_case("ieof") {
            ieof = true;
        } else if name.is_empty() || !name.bytes().all(is_token_byte) {
            return Err(IcapError::Chunk(format!("extension {ext:?}")));
        }
    }
    if ieof && size != 0 {
        return Err(IcapError::Chunk("ieof on a chunk with data".into()));
    }
    Ok(Some((ChunkHeader { size, ieof }, nl + 1)))
}

#[cfg(test)]
mod tests {
    use super::*;

    const RESPMOD: &[u8] = b"RESPMOD icap://127.0.0.1:1344/avscan ICAP/1.0\r\nHost: 127.0.0.1\r\nAllow: 204\r\nPreview: 1024\r\nEncapsulated: req-hdr=0, res-hdr=45, res-body=110\r\n\r\nrest";

    #[test]
    fn request_head_with_headers() {
        let (head, used) = parse_request_head(RESPMOD).unwrap().unwrap();
        assert_eq!(head.method, Method::Respmod);
        assert_eq!(head.service_path(), "/avscan");
        assert!(head.allows_204());
        assert_eq!(head.preview(), Ok(Some(1024)));
        assert_eq!(&RESPMOD[used..], b"rest");
        for cut in 0..used {
            assert_eq!(parse_request_head(&RESPMOD[..cut]), Ok(None), "at {cut}");
        }
    }

    #[test]
    fn bad_request_lines_are_refused() {
        for bad in [
            &b"GET / HTTP/1.1\r\n\r\n"[..],
            b"REQMOD icap://x/avscan ICAP/2.0\r\n\r\n",
            b"REQMOD  ICAP/1.0\r\n\r\n",
            b"REQMOD icap://x/ ICAP/1.0 extra\r\n\r\n",
            b"REQMOD icap://x/ ICAP/1.0\r\nno colon\r\n\r\n",
            b"REQMOD icap://x/ ICAP/1.0\r\nBad Name: x\r\n\r\n",
            b"\xff\xfe\r\n\r\n",
        ] {
            assert!(
                parse_request_head(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        let huge = vec![b'a'; MAX_HEAD + 1];
        assert_eq!(
            parse_request_head(&huge),
            Err(IcapError::TooLarge(MAX_HEAD))
        );
    }

    #[test]
    fn service_path_from_absolute_and_relative_uris() {
        let head = |uri: &str| RequestHead {
            method: Method::Options,
            uri: uri.to_owned(),
            headers: Headers::default(),
        };
        assert_eq!(
            head("icap://h:1344/avscan?allow204=on").service_path(),
            "/avscan"
        );
        assert_eq!(head("icap://h").service_path(), "/");
        assert_eq!(head("/avscan").service_path(), "/avscan");
    }

    #[test]
    fn encapsulated_offsets() {
        let e = parse_encapsulated("req-hdr=0, res-hdr=45, res-body=110", Method::Respmod).unwrap();
        assert_eq!(
            e.header_ranges(),
            vec![(Section::ReqHdr, 0..45), (Section::ResHdr, 45..110)]
        );
        assert_eq!(e.body, (Section::ResBody, 110));
        let n = parse_encapsulated("req-hdr=0, null-body=170", Method::Reqmod).unwrap();
        assert!(!n.has_body());
        assert!(parse_encapsulated("null-body=0", Method::Options).is_ok());
    }

    #[test]
    fn bad_encapsulated_is_refused() {
        for (value, method) in [
            ("", Method::Reqmod),
            ("req-hdr=0", Method::Reqmod),
            ("req-hdr=5, req-body=10", Method::Reqmod),
            ("req-hdr=0, req-body=-1", Method::Reqmod),
            ("req-hdr=0, req-body=99999999999", Method::Reqmod),
            ("req-hdr=0, res-hdr=10, res-body=5", Method::Respmod),
            ("req-body=0, req-hdr=10", Method::Reqmod),
            ("res-hdr=0, req-hdr=10, res-body=20", Method::Respmod),
            ("req-hdr=0, res-body=10", Method::Reqmod),
            ("req-hdr=0, req-body=10", Method::Respmod),
            ("req-hdr=0, bogus=10", Method::Reqmod),
            ("req-hdr=0, req-body=10, null-body=20", Method::Reqmod),
            ("req-hdr=0, res-hdr=5, null-body=9", Method::Reqmod),
        ] {
            assert!(parse_encapsulated(value, method).is_err(), "{value}");
        }
    }

    #[test]
    fn chunk_headers_with_extensions() {
        assert_eq!(
            parse_chunk_header(b"1a\r\nxx").unwrap(),
            Some((
                ChunkHeader {
                    size: 26,
                    ieof: false
                },
                4
            ))
        );
        assert_eq!(
            parse_chunk_header(b"0; ieof\r\n\r\n").unwrap(),
            Some((
                ChunkHeader {
                    size: 0,
                    ieof: true
                },
                9
            ))
        );
        assert_eq!(parse_chunk_header(b"1a"), Ok(None));
        for bad in [
            &b"-1\r\n"[..],
            b"zz\r\n",
            b"\r\n",
            b"11111111111111111\r\n",
            b"ffffffffffff\r\n",
            b"5; ieof\r\n",
            b"5\n",
            b"5; \x01\r\n",
        ] {
            assert!(
                parse_chunk_header(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        assert!(parse_chunk_header(&[b'1'; MAX_CHUNK_LINE]).is_err());
    }

    #[test]
    fn http_heads_and_answers() {
        let h = parse_http_head(
            b"GET /files/a.txt HTTP/1.1\r\nHost: x\r\nContent-Encoding: gzip\r\n\r\n",
        )
        .unwrap();
        assert_eq!(h.target(), Some("/files/a.txt"));
        assert_eq!(h.headers.get("content-encoding"), Some("gzip"));
        assert!(parse_http_head(b"GET / HTTP/1.1\r\nHost: x\r\n").is_err());
    }
}
