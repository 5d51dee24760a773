//! The bytes of our ICAP answers: response heads, chunks, `Encapsulated` values, the block
//! page and the header fields c-icap clients read.

use std::fmt::Write as _;

use super::Encapsulated;

/// An ICAP response head: status line, headers, empty line.
pub fn response_head(status: u16, reason: &str, headers: &[(&str, &str)]) -> Vec<u8> {
    let mut out = format!("ICAP/1.0 {status} {reason}\r\n");
    for (name, value) in headers {
        let _ = write!(out, "{name}: {value}\r\n");
    }
    out.push_str("\r\n");
    out.into_bytes()
}

/// An encapsulated HTTP head without the header fields named in `names` (any case),
/// continuation lines of a removed field included. Everything else, line endings and
/// order, is kept byte for byte.
pub fn remove_header_fields(head: &[u8], names: &[&str]) -> Vec<u8> {
    let mut out = Vec::with_capacity(head.len());
    let mut removing = false;
    let mut first = true;
    let mut rest = head;
    while !rest.is_empty() {
        let end = rest
            .iter()
            .position(|&b| b == b'\n')
            .map_or(rest.len(), |i| i + 1);
        let (line, tail) = rest.split_at(end);
        rest = tail;
        let content = line.strip_suffix(b"\n").unwrap_or(line);
        let content = content.strip_suffix(b"\r").unwrap_or(content);
        if first || content.is_empty() {
            // The start line, and the empty line that ends the head.
            first = false;
            removing = false;
            out.extend_from_slice(line);
            continue;
        }
        if matches!(content[0], b' ' | b'\t') {
            if !removing {
                out.extend_from_slice(line);
            }
            continue;
        }
        let name = content
            .iter()
            .position(|&b| b == b':')
            .map_or(content, |i| &content[..i]);
        removing = names
            .iter()
            .any(|n| name.eq_ignore_ascii_case(n.as_bytes()));
        if !removing {
            out.extend_from_slice(line);
        }
    }
    out
}

/// One chunk of a chunked body.
pub fn chunk(data: &[u8], out: &mut Vec<u8>) {
    if data.is_empty() {
        return;
    }
    let _ = write!(StringSink(out), "{:x}\r\n", data.len());
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
}

pub const LAST_CHUNK: &[u8] = b"0\r\n\r\n";

struct StringSink<'a>(&'a mut Vec<u8>);

impl std::fmt::Write for StringSink<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.0.extend_from_slice(s.as_bytes());
        Ok(())
    }
}

/// `X-Infection-Found` as c-icap writes it (draft-stecher-icap-subid): type 0 (virus),
/// resolution 2 (blocked).
pub fn infection_found(threat: &str) -> String {
    format!("Type=0; Resolution=2; Threat={};", sanitize(threat))
}

/// `X-Violations-Found` as c-icap writes it: a count, then per violation the file name,
/// the threat, a violation id and the resolution on folded lines.
pub fn violations_found(file: &str, threat: &str) -> String {
    format!(
        "1\r\n\t{}\r\n\t{}\r\n\t0\r\n\t2",
        sanitize(file),
        sanitize(threat)
    )
}

/// Header values must not carry line breaks or control characters.
pub fn sanitize(value: &str) -> String {
    value
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

/// The value of an `Encapsulated` header for these sections (RFC 3507 4.4.1).
pub fn encapsulated_value(e: &Encapsulated) -> String {
    e.headers
        .iter()
        .map(|(s, o)| format!("{}={o}", s.name()))
        .chain(std::iter::once(format!("{}={}", e.body.0.name(), e.body.1)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// An answer without an encapsulated message; `close` when the connection ends after it.
pub fn bare_answer(status: u16, reason: &str, istag: &str, close: bool) -> Vec<u8> {
    let mut headers = vec![("ISTag", istag), ("Encapsulated", "null-body=0")];
    if close {
        headers.push(("Connection", "close"));
    }
    response_head(status, reason, &headers)
}

fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Why a message was blocked, for the page that replaces it.
#[derive(Debug, Clone, Copy)]
pub enum Blocked<'a> {
    /// The scanner found this threat.
    Infected { threat: &'a str },
    /// The message could not be scanned, for this reason.
    NotScanned { detail: &'a str },
}

/// The HTTP response that replaces a blocked message, inside an ICAP 200: an HTML page with
/// the threat (or the reason), and for infections c-icap's `X-Infection-Found` and
/// `X-Violations-Found` naming `file`, so that proxies and their logs read it as they read
/// c-icap's.
pub fn block_page(istag: &str, code: u16, why: Blocked<'_>, task_id: &str, file: &str) -> Vec<u8> {
    let (reason, title, text, threat) = match why {
        Blocked::Infected { threat } => {
            let threat = sanitize(threat);
            (
                "Forbidden",
                "Virus found",
                format!(
                    "The content was blocked: it contains <b>{}</b>.",
                    html_escape(&threat)
                ),
                Some(threat),
            )
        }
        Blocked::NotScanned { detail } => (
            "Content Not Scanned",
            "Content not scanned",
            format!(
                "The content was blocked because it could not be scanned: {}.",
                html_escape(&sanitize(detail))
            ),
            None,
        ),
    };
    let page = format!(
        "<!DOCTYPE html>\n<html><head><title>{title}</title></head><body><h1>{title}</h1><p>{text}</p><p>Task {}</p></body></html>\n",
        html_escape(task_id)
    );
    let mut http = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: text/html; charset=utf-8\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n",
        page.len()
    );
    if let Some(threat) = &threat {
        let _ = write!(http, "X-Virus-Infected: true\r\nX-Virus-Name: {threat}\r\n");
    }
    http.push_str("\r\n");
    let value = format!("res-hdr=0, res-body={}", http.len());
    let mut headers: Vec<(&str, String)> =
        vec![("ISTag", istag.to_owned()), ("Encapsulated", value)];
    if let Some(threat) = &threat {
        headers.push(("X-Infection-Found", infection_found(threat)));
        headers.push(("X-Violations-Found", violations_found(file, threat)));
    }
    let headers: Vec<(&str, &str)> = headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
    let mut out = response_head(200, "OK", &headers);
    out.extend_from_slice(http.as_bytes());
    chunk(page.as_bytes(), &mut out);
    out.extend_from_slice(LAST_CHUNK);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::icap::Section;

    #[test]
    fn heads_chunks_and_c_icap_fields() {
        let mut out = Vec::new();
        chunk(b"hello", &mut out);
        assert_eq!(out, b"5\r\nhello\r\n");
        assert_eq!(
            response_head(204, "No Content", &[("ISTag", "\"x\"")]),
            b"ICAP/1.0 204 No Content\r\nISTag: \"x\"\r\n\r\n"
        );
        assert_eq!(
            infection_found("Eicar\r\nX: y"),
            "Type=0; Resolution=2; Threat=Eicar  X: y;"
        );
    }

    #[test]
    fn named_header_fields_are_removed_and_the_rest_kept_byte_for_byte() {
        let head = b"GET /f HTTP/1.1\r\nHost: a\r\nRange: bytes=0-9\r\nX-A: 1\r\nIF-RANGE: \"e\"\r\n  folded\r\nAccept: */*\r\n\r\n";
        assert_eq!(
            remove_header_fields(head, &["range", "if-range"]),
            b"GET /f HTTP/1.1\r\nHost: a\r\nX-A: 1\r\nAccept: */*\r\n\r\n".to_vec()
        );
        let plain = b"GET / HTTP/1.1\nHost: a\n\n";
        assert_eq!(remove_header_fields(plain, &["range"]), plain.to_vec());
    }

    #[test]
    fn encapsulated_values_list_the_sections_in_order() {
        let e = Encapsulated {
            headers: vec![(Section::ReqHdr, 0), (Section::ResHdr, 45)],
            body: (Section::ResBody, 110),
        };
        assert_eq!(
            encapsulated_value(&e),
            "req-hdr=0, res-hdr=45, res-body=110"
        );
        assert_eq!(
            bare_answer(503, "Service Unavailable", "\"t\"", true),
            b"ICAP/1.0 503 Service Unavailable\r\nISTag: \"t\"\r\nEncapsulated: null-body=0\r\nConnection: close\r\n\r\n"
        );
    }

    #[test]
    fn the_block_page_names_the_threat_escaped_and_its_lengths_add_up() {
        let out = block_page(
            "\"t\"",
            403,
            Blocked::Infected {
                threat: "Eicar<script>\r\nX: 1",
            },
            "id&1",
            "a.exe",
        );
        let text = String::from_utf8(out).unwrap();
        let (icap_head, rest) = text.split_once("\r\n\r\n").unwrap();
        assert!(icap_head.starts_with("ICAP/1.0 200 OK\r\nISTag: \"t\"\r\n"));
        assert!(
            icap_head
                .contains("X-Infection-Found: Type=0; Resolution=2; Threat=Eicar<script>  X: 1;")
        );
        assert!(
            icap_head.contains(
                "X-Violations-Found: 1\r\n\ta.exe\r\n\tEicar<script>  X: 1\r\n\t0\r\n\t2"
            )
        );
        let res_body: usize = icap_head
            .rsplit_once("res-body=")
            .unwrap()
            .1
            .split("\r\n")
            .next()
            .unwrap()
            .parse()
            .unwrap();
        let (http_head, chunked) = rest.split_at(res_body);
        assert!(http_head.starts_with("HTTP/1.1 403 Forbidden\r\n"));
        assert!(http_head.ends_with("\r\n\r\n"));
        assert!(http_head.contains("X-Virus-Name: Eicar<script>  X: 1\r\n"));
        let (size, page) = chunked.split_once("\r\n").unwrap();
        let size = usize::from_str_radix(size, 16).unwrap();
        assert!(page.ends_with("\r\n0\r\n\r\n"));
        let page = &page[..size];
        assert!(page.contains("&lt;script&gt;") && !page.contains("<script>"));
        assert!(page.contains("Task id&amp;1"));
        let length: usize = http_head
            .split("Content-Length: ")
            .nth(1)
            .unwrap()
            .split("\r\n")
            .next()
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(length, size);

        let not_scanned = block_page(
            "\"t\"",
            413,
            Blocked::NotScanned {
                detail: "too large",
            },
            "",
            "-",
        );
        let text = String::from_utf8(not_scanned).unwrap();
        assert!(text.contains("HTTP/1.1 413 Content Not Scanned\r\n"));
        assert!(!text.contains("X-Infection-Found") && !text.contains("X-Virus-Name"));
        assert!(text.contains("could not be scanned: too large."));
    }
}
