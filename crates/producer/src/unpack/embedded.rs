//! Files carried as base64 in the strings of a JSON body.

use std::collections::HashSet;
use std::io::Read;

use virus_scanner_protocol::embedded::EmbeddedFile;
use virus_scanner_protocol::json_strings::{JsonEvent, JsonStrings, JsonText};

use super::{Found, MAX_EMBEDDED_FILES, MAX_SMALL_EMBEDDED, Stop, each_piece};
use crate::body::{Body, BodyBuffer, BodyLimits};

impl Found<'_> {
    /// Adds the files that the strings of a JSON document carry as base64: labelled JSON,
    /// or, when `sniff`, a body of another type whose first byte (after whitespace and a
    /// byte order mark) opens an object or an array. What is not quite JSON is read on:
    /// receivers accept `NaN`, values after the first, UTF-16, and the strings after such a
    /// spot reach them all the same.
    pub(super) fn embedded_in_json(&mut self, body: &Body, sniff: bool) -> Result<(), Stop> {
        if !self.options.embedded_files {
            return Ok(());
        }
        let mut strings = EmbeddedStrings {
            limits: &self.limits,
            max_bytes: self.options.max_decoded,
            count: self.embedded,
            bytes: self.embedded_bytes,
            seen: std::mem::take(&mut self.embedded_seen),
            small: self.small.take(),
            files: Vec::new(),
            current: None,
            decoded: Vec::new(),
        };
        let mut text = JsonText::new();
        let mut utf8 = Vec::new();
        let mut start = JsonStart::default();
        let mut parser = JsonStrings::lenient();
        let mut feed = |utf8: &[u8], strings: &mut EmbeddedStrings<'_>| {
            if sniff && !start.is_json(utf8)? {
                return Err(Stop::NotJson);
            }
            let mut stop = None;
            let parsed = parser.feed(utf8, &mut |event| {
                if stop.is_none()
                    && let Err(e) = strings.on(event)
                {
                    stop = Some(e);
                }
            });
            match (stop, parsed) {
                (Some(e), _) => Err(e),
                (None, Ok(())) => Ok(()),
                // Parsers without a depth limit (V8's is iterative) would still find the
                // strings inside.
                (None, Err(e)) => Err(Stop::Refused(e.to_string())),
            }
        };
        let read = each_piece(body, |piece| {
            utf8.clear();
            text.feed(piece, &mut utf8);
            feed(&utf8, &mut strings)
        })
        .and_then(|()| {
            utf8.clear();
            text.finish(&mut utf8);
            feed(&utf8, &mut strings)
        });
        match read {
            Ok(()) => {}
            Err(Stop::NotJson) => {
                tracing::trace!("body does not start as JSON");
                return Ok(());
            }
            Err(e) => return Err(e),
        }
        if let Err(e) = parser.finish() {
            tracing::debug!(error = %e, "JSON body is malformed; its strings are read on");
        }
        self.embedded = strings.count;
        self.embedded_bytes = strings.bytes;
        self.embedded_seen = strings.seen;
        self.small = strings.small;
        self.files.append(&mut strings.files);
        Ok(())
    }
}

/// Whether a text starts as a JSON (or JSON5) document a receiver would parse: what a body of
/// another type must look like to be read as JSON. It opens an object or an array, the next
/// token can follow that opener, and its first bytes hold no raw control character (neither
/// JSON nor JSON5 allows one, in a string or out). Binary bodies that happen to start with `{` or
/// `[` are thus not read as JSON, which would find hundreds of "files" in noise.
#[derive(Default)]
struct JsonStart {
    bom: usize,
    /// The opener, once seen.
    opener: Option<u8>,
    /// Whether the token after the opener was seen.
    followed: bool,
    /// Inside a string: its quote; and whether the last byte was a backslash.
    quote: Option<u8>,
    escaped: bool,
    /// Bytes of the text looked at, from the opener on.
    seen: usize,
    answer: Option<bool>,
}

impl JsonStart {
    /// How much of the text is looked at before it is taken as JSON.
    const LOOK: usize = 64;

    /// Reads the next bytes; `Ok(false)` once the text is known not to be JSON.
    fn is_json(&mut self, data: &[u8]) -> Result<bool, Stop> {
        const BOM: [u8; 3] = [0xef, 0xbb, 0xbf];
        for &c in data {
            if self.answer.is_some() {
                break;
            }
            if self.opener.is_none() {
                if self.bom < BOM.len() && c == BOM[self.bom] {
                    self.bom += 1;
                    continue;
                }
                self.bom = BOM.len();
                if !is_space(c) {
                    if c == b'{' || c == b'[' {
                        self.opener = Some(c);
                    } else {
                        self.answer = Some(false);
                    }
                }
                continue;
            }
            self.seen += 1;
            if self.seen > Self::LOOK {
                self.answer = Some(true);
                break;
            }
            // No raw control character anywhere, strings included (RFC 8259, JSON5).
            if c < 0x20 && !is_space(c) {
                self.answer = Some(false);
                break;
            }
            if let Some(q) = self.quote {
                if self.escaped {
                    self.escaped = false;
                } else if c == b'\\' {
                    self.escaped = true;
                } else if c == q {
                    self.quote = None;
                }
                continue;
            }
            if !self.followed && !is_space(c) {
                self.followed = true;
                let value = c.is_ascii_alphanumeric()
                    || matches!(c, b'"' | b'\'' | b'{' | b'[' | b'-' | b'+' | b'.' | b'/');
                let fits = match self.opener {
                    // A key (quoted, or a JSON5 identifier), a comment, or the end.
                    Some(b'{') => {
                        c.is_ascii_alphabetic()
                            || matches!(c, b'"' | b'\'' | b'}' | b'_' | b'$' | b'/')
                    }
                    _ => value || c == b']',
                };
                if !fits {
                    self.answer = Some(false);
                    break;
                }
            }
            if matches!(c, b'"' | b'\'') {
                self.quote = Some(c);
            }
        }
        Ok(self.answer != Some(false))
    }
}

/// Whitespace to JSON or JSON5 (vertical tab and form feed are JSON5's).
fn is_space(c: u8) -> bool {
    matches!(c, b' ' | b'\t' | b'\r' | b'\n' | 0x0b | 0x0c)
}

/// The strings of one JSON document, decoded as they stream by while they can still be
/// embedded files.
struct EmbeddedStrings<'l> {
    limits: &'l BodyLimits,
    max_bytes: u64,
    count: usize,
    bytes: u64,
    seen: HashSet<[u8; 32]>,
    small: Option<BodyBuffer>,
    files: Vec<Body>,
    current: Option<(EmbeddedFile, Option<BodyBuffer>)>,
    decoded: Vec<u8>,
}

impl EmbeddedStrings<'_> {
    fn on(&mut self, event: JsonEvent<'_>) -> Result<(), Stop> {
        match event {
            JsonEvent::StringStart { .. } => self.current = Some((EmbeddedFile::new(), None)),
            JsonEvent::StringData(data) => {
                if let Some((file, out)) = &mut self.current {
                    self.decoded.clear();
                    file.feed(data, &mut self.decoded);
                    Self::keep(out, &self.decoded, self.limits, self.bytes, self.max_bytes)?;
                }
            }
            JsonEvent::StringEnd => {
                let Some((file, mut out)) = self.current.take() else {
                    return Ok(());
                };
                self.decoded.clear();
                let Some(found) = file.finish(&mut self.decoded) else {
                    return Ok(());
                };
                Self::keep(
                    &mut out,
                    &self.decoded,
                    self.limits,
                    self.bytes,
                    self.max_bytes,
                )?;
                let Some(out) = out else {
                    return Ok(());
                };
                let file = out.finish()?;
                if let Some(stop) = found.node_stop {
                    let mut prefix = BodyBuffer::new(self.limits.clone());
                    let mut reader = file.reader()?.take(stop);
                    std::io::copy(&mut reader, &mut BodyWriter(&mut prefix))?;
                    self.add(prefix.finish()?)?;
                }
                self.add(file)?;
            }
        }
        Ok(())
    }

    /// Counts a file found in a string, unless it is small or one already found.
    fn add(&mut self, file: Body) -> Result<(), Stop> {
        // Only large files are remembered, so that the set stays within the file cap.
        if file.len == 0 || self.seen.contains(&file.sha256) {
            return Ok(());
        }
        if self.bytes + file.len > self.max_bytes {
            return Err(Stop::Unscannable(format!(
                "files embedded in JSON exceed {} bytes decoded",
                self.max_bytes
            )));
        }
        self.bytes += file.len;
        if file.len <= MAX_SMALL_EMBEDDED {
            let mut bytes = Vec::new();
            file.reader()?.read_to_end(&mut bytes)?;
            self.small
                .get_or_insert_with(|| BodyBuffer::new(self.limits.clone()))
                .push(&bytes)?;
            return Ok(());
        }
        self.seen.insert(file.sha256);
        self.count += 1;
        if self.count > MAX_EMBEDDED_FILES {
            return Err(Stop::Refused(format!(
                "more than {MAX_EMBEDDED_FILES} files embedded in JSON"
            )));
        }
        self.files.push(file);
        Ok(())
    }

    /// Appends decoded bytes of the current string; the cap counts them before the
    /// string is known to be a file, so that no string outgrows it meanwhile.
    fn keep(
        out: &mut Option<BodyBuffer>,
        decoded: &[u8],
        limits: &BodyLimits,
        bytes: u64,
        max_bytes: u64,
    ) -> Result<(), Stop> {
        if decoded.is_empty() {
            return Ok(());
        }
        let out = out.get_or_insert_with(|| BodyBuffer::new(limits.clone()));
        if bytes + out.len() + decoded.len() as u64 > max_bytes {
            return Err(Stop::Unscannable(format!(
                "files embedded in JSON exceed {max_bytes} bytes decoded"
            )));
        }
        out.push(decoded)?;
        Ok(())
    }
}

/// `io::Write` into a [`BodyBuffer`].
struct BodyWriter<'a>(&'a mut BodyBuffer);

impl std::io::Write for BodyWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.push(buf).map_err(std::io::Error::other)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod json_start_tests {
    use super::JsonStart;

    fn starts_as_json(text: &[u8]) -> bool {
        // Fed whole and byte by byte: the same answer.
        let whole = JsonStart::default().is_json(text).is_ok_and(|j| j);
        let mut start = JsonStart::default();
        let bytewise = text.iter().all(|b| start.is_json(&[*b]).is_ok_and(|j| j));
        assert_eq!(whole, bytewise, "{:?}", String::from_utf8_lossy(text));
        whole
    }

    #[test]
    fn json_and_json5_documents_are_read_and_binary_that_opens_like_one_is_not() {
        for json in [
            &b"{\"file\": \"TVqQ\"}"[..],
            b"  \r\n[1, 2]",
            b"\xef\xbb\xbf{\"a\":1}",
            b"{}",
            b"[]",
            b"[\"x\"]",
            b"{a: 1, 'b': NaN}",
            b"[// comment\n 1]",
            b"[-1, .5, +2, Infinity]",
        ] {
            assert!(starts_as_json(json), "{:?}", String::from_utf8_lossy(json));
        }
        for not_json in [
            &b"PK\x03\x04"[..],
            b"{\x00\x13\xff\x7f",
            b"[\x90\x01",
            b"{ 9",
            b"{\"a\": 1,\x02}",
            b"[1,\x00\x00]",
            b"{\"ctl in a string \x01\": 1}",
            b"<html>",
        ] {
            assert!(
                !starts_as_json(not_json),
                "{:?}",
                String::from_utf8_lossy(not_json)
            );
        }
    }

    #[test]
    fn few_random_bodies_start_as_json() {
        // Bodies of random bytes that open like JSON: almost none is read as JSON.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut read = 0;
        for i in 0..20_000 {
            let mut body = vec![if i % 2 == 0 { b'{' } else { b'[' }];
            for _ in 0..128 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                body.push(x as u8);
            }
            read += usize::from(starts_as_json(&body));
        }
        assert!(read < 20, "{read} of 20000 random bodies read as JSON");
    }
}
