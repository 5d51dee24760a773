//! The HTTP header fields the scan uses, read the same way for every front end (Envoy's
//! header map, the HTTP head inside an ICAP request), so that ext_proc and ICAP cannot
//! disagree about how a body is encoded or what it is.

use std::borrow::Cow;

use crate::unpack::BodyHeaders;

/// The fields of one HTTP message head the scan looks at; the others are not copied.
#[derive(Debug, Default, PartialEq)]
pub struct HeaderFields {
    /// `:path` (ext_proc) or the request target (ICAP is given it apart).
    pub path: Option<String>,
    pub forwarded_for: Option<String>,
    pub external_address: Option<String>,
    pub request_id: Option<String>,
    pub priority: Option<String>,
    /// Every `Content-Encoding` line, joined with ", " (a list field, RFC 9110 5.3).
    pub content_encoding: Option<String>,
    pub content_type: Option<String>,
    /// A second `Content-Type` that differs from the first: servers pick one or the other.
    pub conflicting_content_type: bool,
    /// `:status` of a response (ext_proc; ICAP reads it from the status line).
    pub status: Option<String>,
    pub content_range: Option<String>,
    /// The request asks for part of a representation (`Range` or `If-Range`).
    pub range: bool,
    /// `Content-Length`, when it is one decimal number.
    pub content_length: Option<u64>,
}

impl HeaderFields {
    /// Names match in any case. List fields (content codings, forwarding hops) sent on
    /// several lines are joined with ", " as HTTP defines, so that no coding is left
    /// undone; of the single-valued ones the first line counts.
    pub fn read<'a>(
        headers: impl IntoIterator<Item = (&'a str, Cow<'a, str>)>,
        priority_header: &str,
    ) -> HeaderFields {
        let mut f = HeaderFields::default();
        for (key, value) in headers {
            let (slot, list) = if key.eq_ignore_ascii_case(":path") {
                (&mut f.path, false)
            } else if key.eq_ignore_ascii_case("x-forwarded-for") {
                (&mut f.forwarded_for, true)
            } else if key.eq_ignore_ascii_case("x-envoy-external-address") {
                (&mut f.external_address, false)
            } else if key.eq_ignore_ascii_case("x-request-id") {
                (&mut f.request_id, false)
            } else if key.eq_ignore_ascii_case(priority_header) {
                (&mut f.priority, false)
            } else if key.eq_ignore_ascii_case("content-encoding") {
                (&mut f.content_encoding, true)
            } else if key.eq_ignore_ascii_case("content-type") {
                if let Some(first) = &f.content_type
                    && first.trim() != value.trim()
                {
                    f.conflicting_content_type = true;
                }
                (&mut f.content_type, false)
            } else if key.eq_ignore_ascii_case(":status") {
                (&mut f.status, false)
            } else if key.eq_ignore_ascii_case("content-range") {
                (&mut f.content_range, false)
            } else if key.eq_ignore_ascii_case("range") || key.eq_ignore_ascii_case("if-range") {
                f.range = true;
                continue;
            } else if key.eq_ignore_ascii_case("content-length") {
                if f.content_length.is_none() {
                    f.content_length = value.trim().parse().ok();
                }
                continue;
            } else {
                continue;
            };
            match slot {
                Some(joined) if list => {
                    joined.push_str(", ");
                    joined.push_str(&value);
                }
                Some(_) => {}
                None => *slot = Some(value.into_owned()),
            }
        }
        f
    }

    /// What decides how this message's body is unpacked, and whether it can be scanned.
    pub fn body_headers(&self) -> BodyHeaders {
        let refusal = if self.conflicting_content_type {
            Some("conflicting Content-Type headers".to_owned())
        } else {
            partial_content(
                self.status.as_deref(),
                self.content_range.as_deref(),
                self.content_type.as_deref(),
            )
        };
        BodyHeaders {
            content_encoding: self.content_encoding.clone(),
            content_type: self.content_type.clone(),
            refusal,
        }
    }
}

/// Why a response body is only part of its representation, if it is. A 206 is whole only
/// when its `Content-Range` runs from the first byte to the last of a known length
/// (RFC 9110 14.4); a `multipart/byteranges` body is pieces by definition. A piece is never
/// scanned as if it were the file: the pieces of one file can each look clean.
pub fn partial_content(
    status: Option<&str>,
    content_range: Option<&str>,
    content_type: Option<&str>,
) -> Option<String> {
    let byteranges = content_type.is_some_and(|ct| {
        ct.split(';')
            .next()
            .is_some_and(|t| t.trim().eq_ignore_ascii_case("multipart/byteranges"))
    });
    if byteranges {
        return Some("multipart/byteranges: parts of a representation".into());
    }
    if status.map(str::trim) != Some("206") {
        return None;
    }
    let whole =
        content_range
            .and_then(parse_content_range)
            .is_some_and(|(first, last, complete)| {
                first == 0 && complete.is_some_and(|c| last.checked_add(1) == Some(c))
            });
    if whole {
        None
    } else {
        Some(format!(
            "206 with Content-Range {:?}: part of a representation",
            content_range.unwrap_or("")
        ))
    }
}

/// `bytes first-last/complete` (`complete` may be `*`), RFC 9110 14.4.
fn parse_content_range(value: &str) -> Option<(u64, u64, Option<u64>)> {
    let (unit, rest) = value.trim().split_once(' ')?;
    if !unit.eq_ignore_ascii_case("bytes") {
        return None;
    }
    let (range, complete) = rest.trim().split_once('/')?;
    let (first, last) = range.split_once('-')?;
    let digits = |s: &str| {
        let s = s.trim();
        (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
            .then(|| s.parse::<u64>().ok())
            .flatten()
    };
    let (first, last) = (digits(first)?, digits(last)?);
    let complete = match complete.trim() {
        "*" => None,
        c => Some(digits(c)?),
    };
    (first <= last).then_some((first, last, complete))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(pairs: &[(&'static str, &'static str)]) -> HeaderFields {
        HeaderFields::read(
            pairs.iter().map(|(k, v)| (*k, Cow::Borrowed(*v))),
            "x-scan-priority",
        )
    }

    #[test]
    fn fields_are_read_in_any_case_and_list_fields_are_joined() {
        let f = read(&[
            (":path", "/upload?x=1"),
            ("Content-Encoding", "gzip"),
            ("content-encoding", "br"),
            ("content-type", "multipart/form-data; boundary=a"),
            ("X-Forwarded-For", "203.0.113.7"),
            ("x-forwarded-for", "10.0.0.1"),
            ("X-Scan-Priority", "high"),
            ("x-scan-priority", "normal"),
            ("x-request-id", "abc"),
            ("Range", "bytes=0-10"),
        ]);
        assert_eq!(
            f,
            HeaderFields {
                path: Some("/upload?x=1".into()),
                forwarded_for: Some("203.0.113.7, 10.0.0.1".into()),
                request_id: Some("abc".into()),
                priority: Some("high".into()),
                content_encoding: Some("gzip, br".into()),
                content_type: Some("multipart/form-data; boundary=a".into()),
                range: true,
                ..HeaderFields::default()
            }
        );
        assert_eq!(f.body_headers().refusal, None);
        assert!(read(&[("If-Range", "\"etag\"")]).range);
    }

    #[test]
    fn a_second_differing_content_type_is_refused() {
        let f = read(&[
            ("content-type", "text/plain"),
            ("Content-Type", "multipart/form-data; boundary=B"),
        ]);
        assert!(f.body_headers().refusal.is_some());
        let same = read(&[
            ("content-type", "text/plain"),
            ("content-type", "text/plain "),
        ]);
        assert_eq!(same.body_headers().refusal, None);
    }

    #[test]
    fn a_206_is_whole_only_from_the_first_byte_to_the_last() {
        let whole = |cr: &str| partial_content(Some("206"), Some(cr), None).is_none();
        assert!(whole("bytes 0-67/68"));
        assert!(whole("Bytes 0-0/1"));
        assert!(!whole("bytes 0-33/68"));
        assert!(!whole("bytes 34-67/68"));
        assert!(!whole("bytes 0-67/*"));
        assert!(!whole("bytes 0-67/100"));
        assert!(!whole("bytes 10-5/68"));
        assert!(!whole("items 0-67/68"));
        assert!(!whole("bytes 0-18446744073709551615/0"));
        assert!(!whole("garbage"));
        assert!(partial_content(Some("206"), None, None).is_some());
        assert!(partial_content(Some("200"), Some("bytes 0-1/9"), None).is_none());
        assert!(partial_content(None, None, None).is_none());
        assert!(
            partial_content(Some("200"), None, Some("Multipart/ByteRanges; boundary=x")).is_some()
        );
    }
}
