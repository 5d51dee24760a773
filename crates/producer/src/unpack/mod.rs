//! Turns a body into the files it carries: `Content-Encoding` is undone (gzip, deflate, br,
//! zstd, in any stack) with a cap on the decoded size against decompression bombs, each
//! part of a `multipart/*` body becomes a file of its own (its transfer encoding undone,
//! nested multipart split in turn, preamble and epilogue files too), and base64 files in
//! the strings of a JSON body are scanned besides the body, because hash signatures only
//! match whole files. What receivers could read in more than one way (an ambiguous
//! boundary, a malformed multipart body, an unknown transfer encoding) is refused: there is
//! no single set of files that is what every one of them reassembles.

mod decode;
mod embedded;
mod multipart;

use std::collections::HashSet;
use std::io::Read;

use virus_scanner_protocol::media_type;
use virus_scanner_protocol::multipart::{Boundary, boundary_of};

use crate::body::{Body, BodyBuffer, BodyError, BodyLimits};

use decode::{DecodeFailure, decode};

/// More parts than this in one body (nested ones included) is refused rather than scanned
/// piecemeal.
pub const MAX_PARTS: usize = 256;
/// Multipart inside multipart deeper than this is refused.
pub const MAX_DEPTH: usize = 4;
/// More distinct files of over [`MAX_SMALL_EMBEDDED`] bytes embedded in JSON strings than
/// this in one body is refused: each is a scan of its own, and scanning only some of them
/// would let decoys hide the file (a sender picks their order).
pub const MAX_EMBEDDED_FILES: usize = 256;
/// A string that decodes to this many bytes or fewer is an identifier, a digest or a key
/// (a SHA-256 is 32 bytes), not a file that a hash signature could name: such strings are
/// scanned together, as one file of their bytes in a row, which body signatures still match.
pub const MAX_SMALL_EMBEDDED: u64 = 32;

#[derive(Debug)]
pub enum Unpacked {
    /// The body is the file.
    Original,
    /// Files to scan; the body passes only if every one is clean.
    Files(Vec<Body>),
    /// The body itself and, besides it, these files found inside it (base64 in JSON): the
    /// body passes only if it and every one of them are clean.
    OriginalAnd(Vec<Body>),
    /// The body cannot be scanned completely within the size limits (a decoded body or a
    /// file inside it above `max_decoded`), or its content coding cannot be undone.
    Unscannable(String),
    /// The body's shape cannot be scanned as every receiver would read it: an ambiguous
    /// multipart boundary, a malformed multipart body or part head, an unknown transfer
    /// encoding, nesting or counts past their bounds. Refused whatever ALLOW_UNSCANNABLE
    /// says: a sender picks the shape, an operator only accepts sizes.
    Refused(String),
}

/// How [`unpack`] reads a body, from the producer's configuration.
#[derive(Debug, Clone)]
pub struct UnpackOptions {
    /// Cap on the bytes decoded from a body (`MAX_DECODED_MB`): a decoded body, a file
    /// inside it, and all the files embedded in its JSON strings together.
    pub max_decoded: u64,
    /// Files carried as base64 in JSON strings are scanned as files of their own
    /// (`EMBEDDED_FILES`).
    pub embedded_files: bool,
}

/// Headers that decide how a body is unpacked.
#[derive(Debug, Clone, Default)]
pub struct BodyHeaders {
    pub content_encoding: Option<String>,
    pub content_type: Option<String>,
    /// Why the message's headers make its body unscannable whatever it holds (a part of a
    /// representation, conflicting media types): the scan refuses it.
    pub refusal: Option<String>,
}

impl BodyHeaders {
    /// True when unpacking may be more than handing the body on: always, since any body
    /// may be JSON whatever its type says (fetch() sends a string as text/plain, and
    /// applications parse what they expect). [`unpack`] looks at the first byte of a body
    /// of another type, and returns at once when embedded files are not looked for.
    pub fn needs_unpacking(&self) -> bool {
        true
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

/// `application/json` or `*/*+json`, read as loosely as frameworks that pick a JSON parser
/// by the start of the header do.
fn is_json(content_type: &[u8]) -> bool {
    let essence = media_type::loose_essence(content_type);
    essence == "application/json" || essence.ends_with("+json")
}

/// `multipart/form-data`: no client puts anything before its first part or after its last.
fn is_form_data(content_type: &[u8]) -> bool {
    media_type::loose_essence(content_type) == "multipart/form-data"
}

pub fn unpack(
    body: &Body,
    headers: &BodyHeaders,
    limits: &BodyLimits,
    options: &UnpackOptions,
) -> Result<Unpacked, BodyError> {
    let max_decoded = options.max_decoded;
    let encodings: Vec<String> = headers.encodings().collect();
    let mut decoded: Option<Body> = None;
    let mut first_member: Option<Body> = None;
    // Codings are listed in the order they were applied: undo them from the last.
    for (left, coding) in encodings.iter().enumerate().rev() {
        let decoded_limits = BodyLimits {
            max: max_decoded,
            ..limits.clone()
        };
        let source = decoded.as_ref().unwrap_or(body);
        decoded = Some(match decode(source, coding, decoded_limits) {
            Ok((decoded, None)) => decoded,
            // The first member of an outer gzip layer would be decoded further by a
            // receiver that stops there: one more reading than we follow.
            Ok((_, Some(_))) if left > 0 => {
                return Ok(Unpacked::Refused(format!(
                    "content-encoding {coding} of several members under another coding"
                )));
            }
            Ok((decoded, Some(first))) => {
                first_member = Some(first);
                decoded
            }
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
    let content = decoded.as_ref().unwrap_or(body);
    let content_type = headers.content_type.as_deref().unwrap_or("").as_bytes();
    let mut found = Found::new(limits, options);
    let split = match boundary_of(content_type) {
        Boundary::Found(boundary) => found.split(content, &boundary, is_form_data(content_type)),
        Boundary::Ambiguous(why) => Err(Stop::Refused(format!("multipart content type: {why}"))),
        Boundary::Missing => {
            // No receiver can split it either: it is one file.
            tracing::debug!("multipart body without a boundary; scanned whole");
            Ok(())
        }
        Boundary::NotMultipart => found.embedded_in_json(content, !is_json(content_type)),
    };
    let split = split.and_then(|()| found.finish_small());
    found.files.extend(first_member);
    match split {
        // A multipart body is scanned whole besides its parts: Chromium saves a
        // multipart/related or mixed download (.mht, .eml) as it is, and object stores and
        // WebDAV store whatever body they are sent.
        Ok(()) | Err(Stop::NotJson) => Ok(match decoded {
            Some(d) => Unpacked::Files(std::iter::once(d).chain(found.files).collect()),
            None if found.files.is_empty() => Unpacked::Original,
            None => Unpacked::OriginalAnd(found.files),
        }),
        Err(Stop::Refused(why)) => Ok(Unpacked::Refused(why)),
        Err(Stop::Unscannable(why)) => Ok(Unpacked::Unscannable(why)),
        Err(Stop::Body(e)) => Err(e),
    }
}

/// Why unpacking stopped short of a list of files.
enum Stop {
    Refused(String),
    Unscannable(String),
    /// A body of another type does not start as JSON: it is scanned as the bytes it is.
    NotJson,
    Body(BodyError),
}

impl From<BodyError> for Stop {
    fn from(e: BodyError) -> Stop {
        match e {
            BodyError::TooLarge(max) => {
                Stop::Unscannable(format!("a file inside the body exceeds {max} bytes"))
            }
            e => Stop::Body(e),
        }
    }
}

impl From<std::io::Error> for Stop {
    fn from(e: std::io::Error) -> Stop {
        Stop::Body(e.into())
    }
}

/// Reads a body in pieces.
fn each_piece(body: &Body, mut f: impl FnMut(&[u8]) -> Result<(), Stop>) -> Result<(), Stop> {
    let mut reader = body.reader()?;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.into()),
        };
        f(&buf[..n])?;
    }
}

/// The files found inside one body, and the counts their bounds apply to.
struct Found<'a> {
    /// For files inside the body: as large as a decoded body may be.
    limits: BodyLimits,
    options: &'a UnpackOptions,
    files: Vec<Body>,
    parts: usize,
    embedded: usize,
    embedded_bytes: u64,
    /// Hashes of the embedded files so far: one file sent many times is one scan.
    embedded_seen: HashSet<[u8; 32]>,
    /// The bytes of the small embedded strings, in a row.
    small: Option<BodyBuffer>,
}

impl<'a> Found<'a> {
    fn new(limits: &BodyLimits, options: &'a UnpackOptions) -> Found<'a> {
        Found {
            limits: BodyLimits {
                max: options.max_decoded.max(limits.max),
                ..limits.clone()
            },
            options,
            files: Vec::new(),
            parts: 0,
            embedded: 0,
            embedded_bytes: 0,
            embedded_seen: HashSet::new(),
            small: None,
        }
    }

    /// The small embedded strings become one file.
    fn finish_small(&mut self) -> Result<(), Stop> {
        if let Some(small) = self.small.take() {
            self.files.push(small.finish()?);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
