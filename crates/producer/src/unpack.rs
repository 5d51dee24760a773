//! Turns a body into the files it carries: `Content-Encoding` is undone (gzip, deflate, br,
//! zstd, in any stack) with a cap on the decoded size against decompression bombs, and each
//! part of a `multipart/*` body becomes a file of its own, because hash signatures only
//! match whole files.

use std::io::Read;

use virus_scanner_protocol::multipart::{MultipartSplitter, PartEvent, boundary_of};

use crate::body::{Body, BodyBuffer, BodyError, BodyLimits};

/// More parts than this in one body is refused rather than scanned piecemeal.
pub const MAX_PARTS: usize = 256;

#[derive(Debug)]
pub enum Unpacked {
    /// The body is the file.
    Original,
    /// Files to scan; the body passes only if every one is clean.
    Files(Vec<Body>),
    /// The body cannot be scanned faithfully.
    Unscannable(String),
}

/// Headers that decide how a body is unpacked.
#[derive(Debug, Clone, Default)]
pub struct BodyHeaders {
    pub content_encoding: Option<String>,
    pub content_type: Option<String>,
}

impl BodyHeaders {
    /// True when unpacking is more than handing the body on.
    pub fn needs_unpacking(&self) -> bool {
        self.encodings().next().is_some()
            || self
                .content_type
                .as_deref()
                .is_some_and(|ct| boundary_of(ct).is_some())
    }

    fn encodings(&self) -> impl Iterator<Item = String> + '_ {
        self.content_encoding
            .as_deref()
            .unwrap_or("")
            .split(',')
            .map(|e| e.trim().to_ascii_lowercase())
            .filter(|e| !e.is_empty() && e != "identity")
    }
}

pub fn unpack(
    body: &Body,
    headers: &BodyHeaders,
    limits: &BodyLimits,
    max_decoded: u64,
) -> Result<Unpacked, BodyError> {
    let encodings: Vec<String> = headers.encodings().collect();
    let mut decoded: Option<Body> = None;
    // Codings are listed in the order they were applied: undo them from the last.
    for coding in encodings.iter().rev() {
        let decoded_limits = BodyLimits {
            max: max_decoded,
            ..limits.clone()
        };
        let source = decoded.as_ref().unwrap_or(body);
        decoded = Some(match decode(source, coding, decoded_limits) {
            Ok(decoded) => decoded,
            Err(DecodeFailure::Unsupported) => {
                return Ok(Unpacked::Unscannable(format!(
                    "unsupported content-encoding {coding:?}"
                )));
            }
            Err(DecodeFailure::TooLarge) => {
                return Ok(Unpacked::Unscannable(format!(
                    "decoded body exceeds {max_decoded} bytes (content-encoding {coding})"
                )));
            }
            Err(DecodeFailure::Corrupt(e)) => {
                return Ok(Unpacked::Unscannable(format!(
                    "content-encoding {coding} does not decode: {e}"
                )));
            }
            Err(DecodeFailure::Body(e)) => return Err(e),
        });
    }
    let whole = |decoded: Option<Body>| match decoded {
        Some(d) => Unpacked::Files(vec![d]),
        None => Unpacked::Original,
    };
    let boundary = match headers.content_type.as_deref().and_then(boundary_of) {
        Some(Ok(boundary)) => boundary,
        Some(Err(e)) => {
            tracing::debug!(error = %e, "multipart body without a usable boundary; scanned whole");
            return Ok(whole(decoded));
        }
        None => return Ok(whole(decoded)),
    };
    match split_parts(decoded.as_ref().unwrap_or(body), &boundary, limits)? {
        Parts::Split(parts) => Ok(Unpacked::Files(parts)),
        Parts::TooMany => Ok(Unpacked::Unscannable(format!(
            "multipart body has more than {MAX_PARTS} parts"
        ))),
        Parts::Malformed(e) => {
            // Scanned whole: body signatures still match anywhere in it.
            tracing::info!(error = %e, "malformed multipart body; scanned whole");
            Ok(whole(decoded))
        }
    }
}

enum DecodeFailure {
    Unsupported,
    TooLarge,
    Corrupt(std::io::Error),
    Body(BodyError),
}

fn decode(body: &Body, coding: &str, limits: BodyLimits) -> Result<Body, DecodeFailure> {
    let source = body.reader().map_err(|e| DecodeFailure::Body(e.into()))?;
    let mut decoder: Box<dyn Read + Send + '_> = match coding {
        "gzip" | "x-gzip" => Box::new(flate2::read::MultiGzDecoder::new(source)),
        "deflate" => {
            // HTTP's deflate is a zlib stream; some servers send raw deflate instead.
            let mut head = [0u8; 2];
            let mut peek = body.reader().map_err(|e| DecodeFailure::Body(e.into()))?;
            let n = peek.read(&mut head).map_err(DecodeFailure::Corrupt)?;
            let zlib = n == 2
                && head[0] & 0x0f == 8
                && (u16::from(head[0]) << 8 | u16::from(head[1])) % 31 == 0;
            if zlib {
                Box::new(flate2::read::ZlibDecoder::new(source))
            } else {
                Box::new(flate2::read::DeflateDecoder::new(source))
            }
        }
        "br" => Box::new(brotli_decompressor::Decompressor::new(source, 64 * 1024)),
        "zstd" => Box::new(
            ruzstd::decoding::StreamingDecoder::new(source)
                .map_err(|e| DecodeFailure::Corrupt(std::io::Error::other(e.to_string())))?,
        ),
        _ => return Err(DecodeFailure::Unsupported),
    };
    let mut out = BodyBuffer::new(limits);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match decoder.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(DecodeFailure::Corrupt(e)),
        };
        match out.push(&buf[..n]) {
            Ok(()) => {}
            Err(BodyError::TooLarge(_)) => return Err(DecodeFailure::TooLarge),
            Err(e) => return Err(DecodeFailure::Body(e)),
        }
    }
    out.finish().map_err(DecodeFailure::Body)
}

enum Parts {
    Split(Vec<Body>),
    TooMany,
    Malformed(String),
}

fn split_parts(body: &Body, boundary: &str, limits: &BodyLimits) -> Result<Parts, BodyError> {
    let mut splitter = match MultipartSplitter::new(boundary) {
        Ok(s) => s,
        Err(e) => return Ok(Parts::Malformed(e.to_string())),
    };
    let mut parts: Vec<Body> = Vec::new();
    let mut current: Option<BodyBuffer> = None;
    let mut failure: Option<BodyError> = None;
    let mut too_many = false;
    let mut on = |event: PartEvent<'_>| {
        if failure.is_some() || too_many {
            return;
        }
        match event {
            PartEvent::Start(_) => current = Some(BodyBuffer::new(limits.clone())),
            PartEvent::Data(d) => {
                if let Some(b) = current.as_mut()
                    && let Err(e) = b.push(d)
                {
                    failure = Some(e);
                }
            }
            PartEvent::End => {
                if let Some(b) = current.take() {
                    if parts.len() >= MAX_PARTS {
                        too_many = true;
                        return;
                    }
                    match b.finish() {
                        Ok(part) if part.len > 0 => parts.push(part),
                        Ok(_) => {}
                        Err(e) => failure = Some(e),
                    }
                }
            }
        }
    };
    let mut reader = body.reader()?;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = reader.read(&mut buf)?;
        if n == 0 {
            break;
        }
        if let Err(e) = splitter.feed(&buf[..n], &mut on) {
            return Ok(Parts::Malformed(e.to_string()));
        }
    }
    let finished = splitter.finish(&mut on);
    if let Some(e) = failure {
        return Err(e);
    }
    if too_many {
        return Ok(Parts::TooMany);
    }
    match finished {
        Ok(_) => Ok(Parts::Split(parts)),
        Err(e) => Ok(Parts::Malformed(e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    fn limits(dir: &std::path::Path) -> BodyLimits {
        BodyLimits {
            spill_dir: dir.to_path_buf(),
            spill_threshold: 1024,
            max: 1 << 20,
        }
    }

    fn contents(u: Unpacked) -> Vec<Vec<u8>> {
        match u {
            Unpacked::Original => vec![b"<original>".to_vec()],
            Unpacked::Files(files) => files
                .iter()
                .map(|b| {
                    let mut v = Vec::new();
                    b.reader().unwrap().read_to_end(&mut v).unwrap();
                    v
                })
                .collect(),
            Unpacked::Unscannable(why) => panic!("unscannable: {why}"),
        }
    }

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    fn headers(ce: Option<&str>, ct: Option<&str>) -> BodyHeaders {
        BodyHeaders {
            content_encoding: ce.map(str::to_owned),
            content_type: ct.map(str::to_owned),
        }
    }

    #[test]
    fn stacked_encodings_are_undone_in_reverse() {
        let dir = tempfile::tempdir().unwrap();
        let l = limits(dir.path());
        let data = b"the payload ".repeat(300);
        let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::fast());
        z.write_all(&gzip(&data)).unwrap();
        let body = Body::from_vec(z.finish().unwrap(), &l).unwrap();
        let out = unpack(&body, &headers(Some("gzip, deflate"), None), &l, 1 << 20).unwrap();
        assert_eq!(contents(out), vec![data]);
    }

    #[test]
    fn raw_deflate_and_identity_are_accepted() {
        let dir = tempfile::tempdir().unwrap();
        let l = limits(dir.path());
        let mut d = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::fast());
        d.write_all(b"raw").unwrap();
        let body = Body::from_vec(d.finish().unwrap(), &l).unwrap();
        assert_eq!(
            contents(unpack(&body, &headers(Some("deflate"), None), &l, 100).unwrap()),
            vec![b"raw".to_vec()]
        );
        let body = Body::from_vec(b"plain".to_vec(), &l).unwrap();
        assert!(!headers(Some("identity"), None).needs_unpacking());
        assert!(matches!(
            unpack(&body, &headers(Some("identity"), None), &l, 100).unwrap(),
            Unpacked::Original
        ));
    }

    #[test]
    fn decompression_bomb_is_unscannable() {
        let dir = tempfile::tempdir().unwrap();
        let l = limits(dir.path());
        let bomb = gzip(&vec![0u8; 10 << 20]);
        assert!(bomb.len() < 64 * 1024);
        let body = Body::from_vec(bomb, &l).unwrap();
        let out = unpack(&body, &headers(Some("gzip"), None), &l, 1 << 20).unwrap();
        assert!(
            matches!(out, Unpacked::Unscannable(ref w) if w.contains("exceeds")),
            "{out:?}"
        );
        // Only the body itself is on disk: the partial decoded output was removed.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        drop(body);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn corrupt_and_unknown_encodings_are_unscannable() {
        let dir = tempfile::tempdir().unwrap();
        let l = limits(dir.path());
        let body = Body::from_vec(b"not gzip at all".to_vec(), &l).unwrap();
        assert!(matches!(
            unpack(&body, &headers(Some("gzip"), None), &l, 100).unwrap(),
            Unpacked::Unscannable(_)
        ));
        let body = Body::from_vec(b"x".to_vec(), &l).unwrap();
        assert!(matches!(
            unpack(&body, &headers(Some("compress"), None), &l, 100).unwrap(),
            Unpacked::Unscannable(_)
        ));
    }

    #[test]
    fn multipart_parts_become_files_including_spilled_ones() {
        let dir = tempfile::tempdir().unwrap();
        let l = limits(dir.path());
        let big = vec![7u8; 5000];
        let mut form = b"--B\r\nContent-Disposition: form-data; name=\"t\"\r\n\r\nfield\r\n--B\r\nContent-Disposition: form-data; name=\"f\"; filename=\"a\"\r\n\r\n".to_vec();
        form.extend_from_slice(&big);
        form.extend_from_slice(b"\r\n--B--\r\n");
        let body = Body::from_vec(form, &l).unwrap();
        let out = unpack(
            &body,
            &headers(None, Some("multipart/form-data; boundary=B")),
            &l,
            1 << 20,
        )
        .unwrap();
        assert_eq!(contents(out), vec![b"field".to_vec(), big]);
    }

    #[test]
    fn gzip_encoded_multipart_is_decoded_then_split() {
        let dir = tempfile::tempdir().unwrap();
        let l = limits(dir.path());
        let form = b"--B\r\n\r\nfile\r\n--B--";
        let body = Body::from_vec(gzip(form), &l).unwrap();
        let out = unpack(
            &body,
            &headers(Some("gzip"), Some("multipart/form-data; boundary=B")),
            &l,
            1 << 20,
        )
        .unwrap();
        assert_eq!(contents(out), vec![b"file".to_vec()]);
    }

    #[test]
    fn malformed_multipart_is_scanned_whole() {
        let dir = tempfile::tempdir().unwrap();
        let l = limits(dir.path());
        let body = Body::from_vec(b"--B\r\n\r\nno end".to_vec(), &l).unwrap();
        let out = unpack(
            &body,
            &headers(None, Some("multipart/form-data; boundary=B")),
            &l,
            100,
        )
        .unwrap();
        assert!(matches!(out, Unpacked::Original));
    }
}
