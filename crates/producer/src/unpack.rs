//! Turns a body into the files it carries: `Content-Encoding` is undone (gzip, deflate, br,
//! zstd, in any stack) with a cap on the decoded size against decompression bombs, each
//! part of a `multipart/*` body becomes a file of its own (its transfer encoding undone,
//! nested multipart split in turn, preamble and epilogue files too), and base64 files in
//! the strings of a JSON body are scanned besides the body, because hash signatures only
//! match whole files. What receivers could read in more than one way (an ambiguous
//! boundary, a malformed multipart body, an unknown transfer encoding) is refused: there is
//! no single set of files that is what every one of them reassembles.

use std::collections::HashSet;
use std::io::Read;

use virus_scanner_protocol::embedded::EmbeddedFile;
use virus_scanner_protocol::json_strings::{JsonEvent, JsonStrings, JsonText};
use virus_scanner_protocol::media_type;
use virus_scanner_protocol::multipart::{
    self, Boundary, MultipartError, MultipartSplitter, PartEvent, boundary_of,
};
use virus_scanner_protocol::transfer_encoding::{
    self, Alphabet, Base64Decoder, QuotedPrintableDecoder, TransferEncoding,
};

use crate::body::{Body, BodyBuffer, BodyError, BodyLimits};
use crate::codings::{self, Coding};

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

enum DecodeFailure {
    Unsupported,
    TooLarge,
    Corrupt(std::io::Error),
    Body(BodyError),
}

/// The decoded body and, for a gzip body of several members, its first member alone:
/// curl and Firefox decode every member, Chromium only the first, so both are files a
/// receiver may get.
fn decode(
    body: &Body,
    coding: &str,
    limits: BodyLimits,
) -> Result<(Body, Option<Body>), DecodeFailure> {
    let coding = Coding::parse(coding).ok_or(DecodeFailure::Unsupported)?;
    let source = body.reader().map_err(|e| DecodeFailure::Body(e.into()))?;
    if coding == Coding::Gzip {
        let mut first = flate2::bufread::GzDecoder::new(std::io::BufReader::new(source));
        let mut out = BodyBuffer::new(limits.clone());
        copy_decoded(&mut first, &mut out)?;
        let mut rest = first.into_inner();
        let more = std::io::BufRead::fill_buf(&mut rest).map_err(DecodeFailure::Corrupt)?;
        let first = out.finish().map_err(DecodeFailure::Body)?;
        if more.is_empty() {
            return Ok((first, None));
        }
        let mut whole = BodyBuffer::new(limits);
        copy_decoded(
            &mut first.reader().map_err(|e| DecodeFailure::Body(e.into()))?,
            &mut whole,
        )?;
        copy_decoded(&mut flate2::bufread::MultiGzDecoder::new(rest), &mut whole)?;
        let whole = whole.finish().map_err(DecodeFailure::Body)?;
        let first = (whole.len != first.len).then_some(first);
        return Ok((whole, first));
    }
    let mut decoder = codings::decoder(coding, source).map_err(DecodeFailure::Corrupt)?;
    let mut out = BodyBuffer::new(limits);
    copy_decoded(&mut decoder, &mut out)?;
    Ok((out.finish().map_err(DecodeFailure::Body)?, None))
}

fn copy_decoded(decoder: &mut impl Read, out: &mut BodyBuffer) -> Result<(), DecodeFailure> {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match decoder.read(&mut buf) {
            Ok(0) => return Ok(()),
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

fn malformed(e: MultipartError) -> Stop {
    // Receivers read broken multipart differently (Go takes `--b--x` for data, others for
    // the end; some keep the parts before a truncation): no single set of files to scan.
    Stop::Refused(format!("multipart body does not parse: {e}"))
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

/// One multipart body being split, at some depth of nesting.
struct Level {
    splitter: MultipartSplitter,
    depth: usize,
    /// `multipart/form-data`: a preamble or epilogue with text is refused.
    form_data: bool,
    /// A nested multipart part as it is: Go's and PHP's form readers store a
    /// multipart/mixed part whole, as a file.
    raw: Option<BodyBuffer>,
    part: Option<Part>,
    preamble: Loose,
    epilogue: Loose,
}

enum Part {
    File(Box<PartFile>),
    Nested(Box<Level>),
}

struct PartFile {
    decoder: PartDecoder,
    out: BodyBuffer,
    /// The part as sent when it has a transfer encoding: PHP, busboy (multer) and werkzeug
    /// ignore `Content-Transfer-Encoding` and store these bytes.
    raw: Option<BodyBuffer>,
    json: bool,
    decoded: Vec<u8>,
}

enum PartDecoder {
    Identity,
    Base64(Base64Decoder),
    QuotedPrintable(QuotedPrintableDecoder),
}

/// Preamble or epilogue: a file when it holds more than whitespace. No receiver keeps it,
/// but a reader that misses the first delimiter takes it for content, and nothing else
/// would scan it.
#[derive(Default)]
struct Loose {
    out: Option<BodyBuffer>,
    text: bool,
    /// A line break and how far a blank line after it has come (1: `\n`, 2: `\n\r`).
    line_break: u8,
    /// An empty line: the end of a part head, to a reader that parses the preamble as a
    /// part (Django parses what precedes the first delimiter so).
    blank_line: bool,
}

impl Loose {
    fn push(&mut self, data: &[u8], limits: &BodyLimits) -> Result<(), Stop> {
        for &b in data {
            self.text |= !b.is_ascii_whitespace();
            self.line_break = match (b, self.line_break) {
                (b'\n', 0) => 1,
                (b'\n', _) => {
                    self.blank_line = true;
                    1
                }
                (b'\r', 1) => 2,
                _ => 0,
            };
        }
        self.out
            .get_or_insert_with(|| BodyBuffer::new(limits.clone()))
            .push(data)?;
        Ok(())
    }

    /// The file to scan, if the text is one; `form_data` and `preamble` say where it was.
    fn finish(self, form_data: bool, preamble: bool) -> Result<Option<Body>, Stop> {
        let place = if preamble {
            "before the first"
        } else {
            "after the last"
        };
        if self.text && form_data {
            // Django reads `Content-Disposition: ...` and a blank line there as a file.
            return Err(Stop::Refused(format!(
                "multipart/form-data with text {place} part"
            )));
        }
        if self.text && preamble && self.blank_line {
            return Err(Stop::Refused(
                "multipart preamble that holds a part head and body".to_owned(),
            ));
        }
        match self.out {
            Some(out) if self.text => Ok(Some(out.finish()?)),
            _ => Ok(None),
        }
    }
}

impl PartFile {
    fn push(&mut self, data: &[u8]) -> Result<(), Stop> {
        if let Some(raw) = &mut self.raw {
            raw.push(data)?;
        }
        self.decoded.clear();
        let refused = |e: transfer_encoding::TransferEncodingError| {
            Stop::Refused(format!("multipart part does not decode: {e}"))
        };
        match &mut self.decoder {
            PartDecoder::Identity => return Ok(self.out.push(data)?),
            PartDecoder::Base64(d) => d.feed(data, &mut self.decoded).map_err(refused)?,
            PartDecoder::QuotedPrintable(d) => d.feed(data, &mut self.decoded).map_err(refused)?,
        }
        Ok(self.out.push(&self.decoded)?)
    }

    /// The decoded part, whether it is labelled JSON, and the part as sent when it had a
    /// transfer encoding.
    fn finish(mut self) -> Result<(Body, bool, Option<Body>), Stop> {
        self.decoded.clear();
        let refused = |e: transfer_encoding::TransferEncodingError| {
            Stop::Refused(format!("multipart part does not decode: {e}"))
        };
        match self.decoder {
            PartDecoder::Identity => {}
            PartDecoder::Base64(d) => d.finish(&mut self.decoded).map_err(refused)?,
            PartDecoder::QuotedPrintable(d) => d.finish(&mut self.decoded).map_err(refused)?,
        }
        self.out.push(&self.decoded)?;
        let raw = self.raw.map(BodyBuffer::finish).transpose()?;
        Ok((self.out.finish()?, self.json, raw))
    }
}

impl Level {
    fn new(
        boundary: &str,
        depth: usize,
        form_data: bool,
        raw: Option<BodyBuffer>,
    ) -> Result<Level, Stop> {
        Ok(Level {
            splitter: MultipartSplitter::new(boundary).map_err(malformed)?,
            depth,
            form_data,
            raw,
            part: None,
            preamble: Loose::default(),
            epilogue: Loose::default(),
        })
    }
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

    /// Splits a multipart body; the parts of nested multipart parts are split as they
    /// stream through, so no part is held twice.
    fn split(&mut self, body: &Body, boundary: &str, form_data: bool) -> Result<(), Stop> {
        let mut level = Level::new(boundary, 1, form_data, None)?;
        each_piece(body, |piece| self.feed_level(&mut level, piece))?;
        self.finish_level(level)
    }

    fn feed_level(&mut self, level: &mut Level, piece: &[u8]) -> Result<(), Stop> {
        let Level {
            splitter,
            depth,
            raw,
            part,
            preamble,
            epilogue,
            ..
        } = level;
        if let Some(raw) = raw {
            raw.push(piece)?;
        }
        let mut stop = None;
        let fed = splitter.feed(piece, &mut |event| {
            if stop.is_none()
                && let Err(e) = self.on_event(event, *depth, part, preamble, epilogue)
            {
                stop = Some(e);
            }
        });
        match stop {
            Some(e) => Err(e),
            None => fed.map_err(malformed),
        }
    }

    fn finish_level(&mut self, level: Level) -> Result<(), Stop> {
        let Level {
            splitter,
            depth,
            form_data,
            raw,
            mut part,
            mut preamble,
            mut epilogue,
        } = level;
        let mut stop = None;
        let finished = splitter.finish(&mut |event| {
            if stop.is_none()
                && let Err(e) = self.on_event(event, depth, &mut part, &mut preamble, &mut epilogue)
            {
                stop = Some(e);
            }
        });
        if let Some(e) = stop {
            return Err(e);
        }
        match finished {
            // An empty multipart body (only its closing delimiter) is one to Go and
            // busboy too; its preamble and epilogue are still scanned.
            Ok(_) | Err(MultipartError::NoParts) => {}
            Err(e) => return Err(malformed(e)),
        }
        for (loose, is_preamble) in [(preamble, true), (epilogue, false)] {
            if let Some(file) = loose.finish(form_data, is_preamble)? {
                self.files.push(file);
            }
        }
        if let Some(raw) = raw {
            self.files.push(raw.finish()?);
        }
        Ok(())
    }

    fn on_event(
        &mut self,
        event: PartEvent<'_>,
        depth: usize,
        part: &mut Option<Part>,
        preamble: &mut Loose,
        epilogue: &mut Loose,
    ) -> Result<(), Stop> {
        match event {
            PartEvent::Preamble(data) => preamble.push(data, &self.limits),
            PartEvent::Epilogue(data) => epilogue.push(data, &self.limits),
            PartEvent::Start(head) => {
                self.parts += 1;
                if self.parts > MAX_PARTS {
                    return Err(Stop::Refused(format!(
                        "multipart body has more than {MAX_PARTS} parts"
                    )));
                }
                *part = Some(self.open_part(head, depth)?);
                Ok(())
            }
            PartEvent::Data(data) => match part {
                Some(Part::File(file)) => file.push(data),
                Some(Part::Nested(inner)) => self.feed_level(inner, data),
                None => Ok(()),
            },
            PartEvent::End => match part.take() {
                Some(Part::File(file)) => {
                    let (file, json, raw) = file.finish()?;
                    self.files.extend(raw);
                    if file.len > 0 {
                        self.embedded_in_json(&file, !json)?;
                        self.files.push(file);
                    }
                    Ok(())
                }
                Some(Part::Nested(inner)) => self.finish_level(*inner),
                None => Ok(()),
            },
        }
    }

    fn open_part(&mut self, head: &[u8], depth: usize) -> Result<Part, Stop> {
        let headers = multipart::parse_part_headers(head)
            .map_err(|e| Stop::Refused(format!("multipart part head: {e}")))?;
        let encoding = match &headers.transfer_encoding {
            None => TransferEncoding::Identity,
            Some(value) => transfer_encoding::parse(value).map_err(|_| {
                Stop::Refused(format!(
                    "multipart part with content-transfer-encoding {:?}",
                    String::from_utf8_lossy(value)
                ))
            })?,
        };
        let content_type = headers.content_type.as_deref().unwrap_or(b"");
        match boundary_of(content_type) {
            Boundary::Found(boundary) => {
                // RFC 2045 §6.4: a multipart entity is never encoded; readers that decode
                // one anyway and readers that do not would split different bytes.
                if encoding != TransferEncoding::Identity {
                    return Err(Stop::Refused(
                        "multipart part that is multipart has a content-transfer-encoding"
                            .to_owned(),
                    ));
                }
                if depth >= MAX_DEPTH {
                    return Err(Stop::Refused(format!(
                        "multipart nested deeper than {MAX_DEPTH} levels"
                    )));
                }
                return Ok(Part::Nested(Box::new(Level::new(
                    &boundary,
                    depth + 1,
                    is_form_data(content_type),
                    Some(BodyBuffer::new(self.limits.clone())),
                )?)));
            }
            Boundary::Ambiguous(why) => {
                return Err(Stop::Refused(format!("multipart part content type: {why}")));
            }
            Boundary::Missing | Boundary::NotMultipart => {}
        }
        Ok(Part::File(Box::new(PartFile {
            decoder: match encoding {
                TransferEncoding::Identity => PartDecoder::Identity,
                TransferEncoding::Base64 => {
                    PartDecoder::Base64(Base64Decoder::new(Alphabet::Standard))
                }
                TransferEncoding::QuotedPrintable => {
                    PartDecoder::QuotedPrintable(QuotedPrintableDecoder::new())
                }
            },
            out: BodyBuffer::new(self.limits.clone()),
            raw: (encoding != TransferEncoding::Identity)
                .then(|| BodyBuffer::new(self.limits.clone())),
            json: is_json(content_type),
            decoded: Vec::new(),
        })))
    }

    /// Adds the files that the strings of a JSON document carry as base64: labelled JSON,
    /// or, when `sniff`, a body of another type whose first byte (after whitespace and a
    /// byte order mark) opens an object or an array. What is not quite JSON is read on:
    /// receivers accept `NaN`, values after the first, UTF-16, and the strings after such a
    /// spot reach them all the same.
    fn embedded_in_json(&mut self, body: &Body, sniff: bool) -> Result<(), Stop> {
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

/// Whether a text opens a JSON object or array: what a body of another type must start
/// with to be read as JSON.
#[derive(Default)]
struct JsonStart {
    bom: usize,
    answer: Option<bool>,
}

impl JsonStart {
    /// Reads the next bytes; `Ok(false)` once the text is known not to be JSON.
    fn is_json(&mut self, data: &[u8]) -> Result<bool, Stop> {
        const BOM: [u8; 3] = [0xef, 0xbb, 0xbf];
        for &c in data {
            if self.answer.is_some() {
                break;
            }
            if self.bom < BOM.len() && c == BOM[self.bom] {
                self.bom += 1;
                continue;
            }
            self.bom = BOM.len();
            if !matches!(c, b' ' | b'\t' | b'\r' | b'\n') {
                self.answer = Some(c == b'{' || c == b'[');
            }
        }
        Ok(self.answer != Some(false))
    }
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

    fn opts(max_decoded: u64) -> UnpackOptions {
        UnpackOptions {
            max_decoded,
            embedded_files: true,
        }
    }

    fn read(b: &Body) -> Vec<u8> {
        let mut v = Vec::new();
        b.reader().unwrap().read_to_end(&mut v).unwrap();
        v
    }

    fn contents(u: Unpacked) -> Vec<Vec<u8>> {
        match u {
            Unpacked::Original => vec![b"<original>".to_vec()],
            Unpacked::Files(files) => files.iter().map(read).collect(),
            Unpacked::OriginalAnd(files) => std::iter::once(b"<original>".to_vec())
                .chain(files.iter().map(read))
                .collect(),
            Unpacked::Unscannable(why) => panic!("unscannable: {why}"),
            Unpacked::Refused(why) => panic!("refused: {why}"),
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
            refusal: None,
        }
    }

    #[test]
    fn a_gzip_body_of_several_members_is_scanned_whole_and_as_its_first_member() {
        let dir = tempfile::tempdir().unwrap();
        let l = limits(dir.path());
        let mut body = gzip(b"the file");
        body.extend(gzip(b" and more"));
        let body = Body::from_vec(body, &l).unwrap();
        let out = unpack(&body, &headers(Some("gzip"), None), &l, &opts(1 << 20)).unwrap();
        assert_eq!(
            contents(out),
            vec![b"the file and more".to_vec(), b"the file".to_vec()]
        );
        // One member (or an empty second one): one file.
        let mut body = gzip(b"the file");
        body.extend(gzip(b""));
        let body = Body::from_vec(body, &l).unwrap();
        let out = unpack(&body, &headers(Some("gzip"), None), &l, &opts(1 << 20)).unwrap();
        assert_eq!(contents(out), vec![b"the file".to_vec()]);
        // Several members under another coding: refused.
        let mut two = gzip(&gzip(b"a"));
        two.extend(gzip(&gzip(b"b")));
        let body = Body::from_vec(two, &l).unwrap();
        let out = unpack(
            &body,
            &headers(Some("gzip, gzip"), None),
            &l,
            &opts(1 << 20),
        )
        .unwrap();
        assert!(matches!(out, Unpacked::Refused(_)), "{out:?}");
    }

    #[test]
    fn stacked_encodings_are_undone_in_reverse() {
        let dir = tempfile::tempdir().unwrap();
        let l = limits(dir.path());
        let data = b"the payload ".repeat(300);
        let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::fast());
        z.write_all(&gzip(&data)).unwrap();
        let body = Body::from_vec(z.finish().unwrap(), &l).unwrap();
        let out = unpack(
            &body,
            &headers(Some("gzip, deflate"), None),
            &l,
            &opts(1 << 20),
        )
        .unwrap();
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
            contents(unpack(&body, &headers(Some("deflate"), None), &l, &opts(100)).unwrap()),
            vec![b"raw".to_vec()]
        );
        let body = Body::from_vec(b"plain".to_vec(), &l).unwrap();
        assert!(matches!(
            unpack(&body, &headers(Some("identity"), None), &l, &opts(100)).unwrap(),
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
        let out = unpack(&body, &headers(Some("gzip"), None), &l, &opts(1 << 20)).unwrap();
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
            unpack(&body, &headers(Some("gzip"), None), &l, &opts(100)).unwrap(),
            Unpacked::Unscannable(_)
        ));
        let body = Body::from_vec(b"x".to_vec(), &l).unwrap();
        assert!(matches!(
            unpack(&body, &headers(Some("compress"), None), &l, &opts(100)).unwrap(),
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
            &opts(1 << 20),
        )
        .unwrap();
        assert_eq!(
            contents(out),
            vec![b"<original>".to_vec(), b"field".to_vec(), big]
        );
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
            &opts(1 << 20),
        )
        .unwrap();
        assert_eq!(contents(out), vec![form.to_vec(), b"file".to_vec()]);
    }

    /// Unpacks `body` sent with that Content-Type (and Content-Encoding).
    fn unpack_with(
        l: &BodyLimits,
        ce: Option<&str>,
        ct: &str,
        body: &[u8],
        embedded_files: bool,
    ) -> Unpacked {
        let body = Body::from_vec(body.to_vec(), l).unwrap();
        let options = UnpackOptions {
            max_decoded: 1 << 20,
            embedded_files,
        };
        unpack(&body, &headers(ce, Some(ct)), l, &options).unwrap()
    }

    fn refused(u: Unpacked) -> String {
        match u {
            Unpacked::Refused(why) => why,
            other => panic!("not refused: {:?}", contents(other)),
        }
    }

    const EICAR: &[u8] = br"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*";
    const EICAR_B64: &str = "WDVPIVAlQEFQWzRcUFpYNTQoUF4pN0NDKTd9JEVJQ0FSLVNUQU5EQVJELUFOVElWSVJVUy1URVNULUZJTEUhJEgrSCo=";

    #[test]
    fn malformed_multipart_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let l = limits(dir.path());
        let ct = "multipart/form-data; boundary=B";
        for body in [
            &b"--B\r\n\r\nno end"[..],
            b"no delimiter",
            b"--B\r\n\r\na\r\n--B--x\r\n",
            b"--B\nContent-Type: text/plain\n\nbare LF lines\n--B--\n",
        ] {
            let why = refused(unpack_with(&l, None, ct, body, true));
            assert!(why.contains("does not parse"), "{why}");
        }
        let mut big_head = b"--B\r\nX: ".to_vec();
        big_head.extend(std::iter::repeat_n(b'h', 9000));
        big_head.extend_from_slice(b"\r\n\r\nbody\r\n--B--");
        refused(unpack_with(&l, None, ct, &big_head, true));
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn boundary_hidden_in_a_quoted_parameter_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let l = limits(dir.path());
        // A quoted-string aware server splits at B; one that splits the header at every
        // `;` or searches it for `boundary=` splits at A, where the file is.
        let body = b"--A\r\nContent-Type: application/octet-stream\r\n\r\nfile\r\n--A--\r\n";
        for ct in [
            r#"multipart/form-data; x="; boundary=A;"; boundary=B"#,
            "multipart/form-data; boundary=A; boundary=B",
            "multipart/form-data; boundary=A; boundary*=B",
            r#"multipart/form-data; x="boundary=A""#,
        ] {
            let why = refused(unpack_with(&l, None, ct, body, true));
            assert!(why.starts_with("multipart content type"), "{why}");
        }
        // Without a boundary at all no server splits it: one file.
        assert!(matches!(
            unpack_with(&l, None, "multipart/form-data", body, true),
            Unpacked::Original
        ));
    }

    #[test]
    fn preamble_and_epilogue_become_files() {
        let dir = tempfile::tempdir().unwrap();
        let l = limits(dir.path());
        let body = b"hidden before\r\n--B\r\n\r\npart\r\n--B--\r\nhidden after";
        let out = unpack_with(&l, None, "multipart/mixed; boundary=B", body, true);
        assert_eq!(
            contents(out),
            vec![
                b"<original>".to_vec(),
                b"part".to_vec(),
                b"hidden before".to_vec(),
                b"hidden after".to_vec()
            ]
        );
        let body = b"\r\n \r\n--B\r\n\r\npart\r\n--B--\r\n\r\n";
        for ct in [
            "multipart/mixed; boundary=B",
            "multipart/form-data; boundary=B",
        ] {
            let out = unpack_with(&l, None, ct, body, true);
            assert_eq!(
                contents(out),
                vec![b"<original>".to_vec(), b"part".to_vec()]
            );
        }
    }

    #[test]
    fn form_data_with_text_around_its_parts_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let l = limits(dir.path());
        let ct = "multipart/form-data; boundary=AaB";
        // Django parses a preamble with a head as a part: the file is `F`.
        let preamble = b"Content-Disposition: form-data; name=\"f\"; filename=\"e.com\"\r\n\r\nF\r\n--AaB\r\nContent-Disposition: form-data; name=\"x\"\r\n\r\nx\r\n--AaB--\r\n";
        assert!(refused(unpack_with(&l, None, ct, preamble, true)).contains("before the first"));
        let epilogue = b"--AaB\r\n\r\nx\r\n--AaB--\r\nafter";
        assert!(refused(unpack_with(&l, None, ct, epilogue, true)).contains("after the last"));
        // Other types keep their text as a file, unless it holds a part head and body.
        let out = unpack_with(&l, None, "multipart/mixed; boundary=AaB", epilogue, true);
        assert_eq!(
            contents(out),
            vec![b"<original>".to_vec(), b"x".to_vec(), b"after".to_vec()]
        );
        for ct in [
            "multipart/mixed; boundary=AaB",
            "multipart/related; boundary=AaB",
        ] {
            refused(unpack_with(&l, None, ct, preamble, true));
            let lf = b"X: y\n\nF\r\n--AaB\r\n\r\nx\r\n--AaB--";
            refused(unpack_with(&l, None, ct, lf, true));
        }
    }

    #[test]
    fn boundary_outside_a_delimiter_or_in_another_type_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let l = limits(dir.path());
        let ct = "multipart/form-data; boundary=AaB";
        let head =
            "--AaB\r\nContent-Disposition: form-data; name=\"f\"; filename=\"e.com\"\r\n\r\n";
        let next = "\r\nContent-Disposition: form-data; name=\"x\"\r\n\r\nx\r\n--AaB--\r\n";
        for end in ["\n--AaB", "--AaB", "\n--AaBzz"] {
            let body = format!("{head}F{end}{next}");
            let why = refused(unpack_with(&l, None, ct, body.as_bytes(), true));
            assert!(why.contains("does not parse"), "{why}");
        }
        // formidable splits any type that mentions multipart and a boundary.
        let body = format!("{head}F\r\n--AaB--\r\n");
        let why = refused(unpack_with(
            &l,
            None,
            "text/plain; x=multipart; boundary=AaB",
            body.as_bytes(),
            true,
        ));
        assert!(why.starts_with("multipart content type"), "{why}");
        assert!(headers(None, Some("text/plain; x=multipart; boundary=AaB")).needs_unpacking());
    }

    #[test]
    fn transfer_encoded_parts_are_decoded_and_spill_when_large() {
        let dir = tempfile::tempdir().unwrap();
        let l = limits(dir.path());
        let big: Vec<u8> = (0..5000u32).map(|i| (i * 7 % 251) as u8).collect();
        let mut b64 = Vec::new();
        {
            // MIME wraps base64 at 76 characters.
            let text = encode_base64(&big);
            for line in text.as_bytes().chunks(76) {
                b64.extend_from_slice(line);
                b64.extend_from_slice(b"\r\n");
            }
        }
        let mut body = b"--B\r\nContent-Transfer-Encoding: BASE64\r\n\r\n".to_vec();
        body.extend_from_slice(&b64);
        body.extend_from_slice(
            b"\r\n--B\r\ncontent-transfer-encoding: quoted-printable\r\n\r\ncaf=C3=A9 =\r\nau lait\r\n--B\r\nContent-Transfer-Encoding: 8bit\r\n\r\nraw\r\n--B--",
        );
        let out = unpack_with(&l, None, "multipart/mixed; boundary=B", &body, true);
        // Each encoded part also as sent: PHP, busboy and werkzeug store those bytes.
        assert_eq!(
            contents(out),
            vec![
                b"<original>".to_vec(),
                b64.clone(),
                big,
                b"caf=C3=A9 =\r\nau lait".to_vec(),
                "café au lait".as_bytes().to_vec(),
                b"raw".to_vec()
            ]
        );
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn an_encoded_part_is_scanned_as_sent_besides_decoded() {
        let dir = tempfile::tempdir().unwrap();
        let l = limits(dir.path());
        // A receiver that ignores the encoding stores `=58...`, not `X...`.
        let body = b"--B\r\nContent-Disposition: form-data; name=\"f\"; filename=\"f\"\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n=41stored\r\n--B--\r\n";
        let out = unpack_with(&l, None, "multipart/form-data; boundary=B", body, true);
        assert_eq!(
            contents(out),
            vec![
                b"<original>".to_vec(),
                b"=41stored".to_vec(),
                b"Astored".to_vec()
            ]
        );
    }

    /// Standard base64, padded.
    fn encode_base64(data: &[u8]) -> String {
        const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut out = String::new();
        for group in data.chunks(3) {
            let n =
                group.iter().fold(0u32, |n, &b| n << 8 | u32::from(b)) << (8 * (3 - group.len()));
            for i in 0..4 {
                if i <= group.len() {
                    out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
                } else {
                    out.push('=');
                }
            }
        }
        out
    }

    #[test]
    fn unknown_or_broken_transfer_encodings_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let l = limits(dir.path());
        let ct = "multipart/form-data; boundary=B";
        for body in [
            &b"--B\r\nContent-Transfer-Encoding: x-uuencode\r\n\r\nbegin 644 f\r\n--B--"[..],
            b"--B\r\nContent-Transfer-Encoding: base64\r\n\r\nnot*base64\r\n--B--",
            b"--B\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\nbad =ZZ escape\r\n--B--",
            b"--B\r\nContent-Transfer-Encoding: base64\r\nContent-Transfer-Encoding: 7bit\r\n\r\nQUJD\r\n--B--",
        ] {
            refused(unpack_with(&l, None, ct, body, true));
        }
    }

    #[test]
    fn nested_multipart_is_split_and_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let l = limits(dir.path());
        let inner =
            b"--in\r\nContent-Type: text/plain\r\n\r\nfirst\r\n--in\r\n\r\nsecond\r\n--in--";
        let mut body =
            b"--out\r\n\r\nfield\r\n--out\r\nContent-Type: multipart/mixed; boundary=in\r\n\r\n"
                .to_vec();
        body.extend_from_slice(inner);
        body.extend_from_slice(b"\r\n--out--\r\n");
        let out = unpack_with(&l, None, "multipart/form-data; boundary=out", &body, true);
        // The nested part whole too: Go and PHP store a multipart/mixed part as a file.
        assert_eq!(
            contents(out),
            vec![
                b"<original>".to_vec(),
                b"field".to_vec(),
                b"first".to_vec(),
                b"second".to_vec(),
                inner.to_vec()
            ]
        );
        // Depth 1 holds depth 2 ... up to MAX_DEPTH; one more is refused.
        let nest = |levels: usize| {
            let mut body = b"file".to_vec();
            let mut ct = "text/plain".to_owned();
            for level in 0..levels {
                let b = format!("b{level}");
                let mut outer = format!("--{b}\r\nContent-Type: {ct}\r\n\r\n").into_bytes();
                outer.extend_from_slice(&body);
                outer.extend_from_slice(format!("\r\n--{b}--").as_bytes());
                body = outer;
                ct = format!("multipart/mixed; boundary={b}");
            }
            unpack_with(&l, None, &ct, &body, true)
        };
        let files = contents(nest(MAX_DEPTH));
        assert_eq!(files.len(), MAX_DEPTH + 1);
        assert_eq!(files[1], b"file");
        assert!(refused(nest(MAX_DEPTH + 1)).contains("deeper"));
        // A multipart part is never transfer-encoded (RFC 2045 §6.4).
        let body = b"--out\r\nContent-Type: multipart/mixed; boundary=in\r\nContent-Transfer-Encoding: base64\r\n\r\nLS1pbi0t\r\n--out--";
        refused(unpack_with(
            &l,
            None,
            "multipart/mixed; boundary=out",
            body,
            true,
        ));
    }

    #[test]
    fn too_many_parts_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let l = limits(dir.path());
        let body = b"--B\r\n\r\nx\r\n".repeat(MAX_PARTS + 1);
        let body = [&body[..], b"--B--"].concat();
        assert!(
            refused(unpack_with(
                &l,
                None,
                "multipart/mixed; boundary=B",
                &body,
                true
            ))
            .contains("parts")
        );
    }

    #[test]
    fn base64_files_in_json_strings_are_scanned_besides_the_body() {
        let dir = tempfile::tempdir().unwrap();
        let l = limits(dir.path());
        // `\/` and `\u` escapes are undone as every JSON parser does.
        let escaped = EICAR_B64.replacen('W', r"\u0057", 1);
        let json = format!(
            r#"{{"name":"report.pdf","id":"123e4567-e89b-12d3-a456-426614174000","file":"{escaped}","thumb":"data:image/png;base64,aGk=","note":"Hello world 2024 is here and Today","nested":[{{"k":"QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVo\/\/\/4="}}]}}"#
        );
        let out = unpack_with(
            &l,
            None,
            "application/json; charset=utf-8",
            json.as_bytes(),
            true,
        );
        let files = contents(out);
        // Strings of 32 bytes or fewer decoded are scanned together, in a row.
        assert_eq!(files.len(), 3, "{files:?}");
        assert_eq!(files[0], b"<original>");
        assert_eq!(files[1], EICAR);
        assert_eq!(&files[2][..12], b"hiABCDEFGHIJ");
        // Off: the body alone.
        let out = unpack_with(&l, None, "application/json", json.as_bytes(), false);
        assert!(matches!(out, Unpacked::Original));
        // Not JSON after all: the strings are read all the same, nothing kept on disk.
        let broken = format!("{json},");
        let out = unpack_with(
            &l,
            None,
            "application/vnd.api+json",
            broken.as_bytes(),
            true,
        );
        assert_eq!(contents(out), files);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn json_files_are_found_in_decoded_bodies_and_json_parts() {
        let dir = tempfile::tempdir().unwrap();
        let l = limits(dir.path());
        let json = format!(r#"["{EICAR_B64}"]"#);
        let out = unpack_with(
            &l,
            Some("gzip"),
            "application/json",
            &gzip(json.as_bytes()),
            true,
        );
        assert_eq!(
            contents(out),
            vec![json.as_bytes().to_vec(), EICAR.to_vec()]
        );
        let mut body = b"--B\r\nContent-Type: application/json\r\n\r\n".to_vec();
        body.extend_from_slice(json.as_bytes());
        body.extend_from_slice(b"\r\n--B--");
        let out = unpack_with(&l, None, "multipart/related; boundary=B", &body, true);
        assert_eq!(
            contents(out),
            vec![
                b"<original>".to_vec(),
                EICAR.to_vec(),
                json.as_bytes().to_vec()
            ]
        );
    }

    #[test]
    fn embedded_files_past_their_bounds_are_refused_or_unscannable() {
        let dir = tempfile::tempdir().unwrap();
        let l = limits(dir.path());
        let many: Vec<String> = (0..=MAX_EMBEDDED_FILES)
            .map(|i| {
                format!(
                    r#""data:;base64,{}""#,
                    encode_base64(format!("file {i:<40}").as_bytes())
                )
            })
            .collect();
        let json = format!("[{}]", many.join(","));
        assert!(
            refused(unpack_with(
                &l,
                None,
                "application/json",
                json.as_bytes(),
                true
            ))
            .contains("embedded")
        );
        let deep = "[".repeat(2000) + &"]".repeat(2000);
        refused(unpack_with(
            &l,
            None,
            "application/json",
            deep.as_bytes(),
            true,
        ));
        let big = encode_base64(&vec![1u8; 3000]);
        let json = format!(r#"["data:;base64,{big}"]"#);
        let body = Body::from_vec(json.into_bytes(), &l).unwrap();
        let options = UnpackOptions {
            max_decoded: 2000,
            embedded_files: true,
        };
        let out = unpack(
            &body,
            &headers(None, Some("application/json")),
            &l,
            &options,
        )
        .unwrap();
        assert!(
            matches!(out, Unpacked::Unscannable(ref w) if w.contains("embedded")),
            "{out:?}"
        );
        drop(body);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn every_type_needs_unpacking() {
        for ct in [
            "application/json",
            "application/problem+json; charset=utf-8",
            "multipart/form-data",
            "multipart/form-data; boundary=\"x",
            "text/plain",
        ] {
            assert!(headers(None, Some(ct)).needs_unpacking(), "{ct}");
        }
        assert!(headers(None, None).needs_unpacking());
    }

    #[test]
    fn json_is_read_whatever_the_type_says() {
        let dir = tempfile::tempdir().unwrap();
        let l = limits(dir.path());
        // fetch() sends a string body as text/plain; applications parse what they expect.
        let json = format!(r#"{{"file":"{EICAR_B64}"}}"#);
        let bom = format!("{} \r\n[\"{EICAR_B64}\"]", '\u{feff}');
        for ct in ["text/plain;charset=UTF-8", "application/octet-stream", ""] {
            for body in [&json, &bom] {
                let out = unpack_with(&l, None, ct, body.as_bytes(), true);
                assert_eq!(
                    contents(out),
                    vec![b"<original>".to_vec(), EICAR.to_vec()],
                    "{ct}"
                );
            }
            // Not JSON by its first byte: the body alone.
            let text = format!("see {json}");
            assert!(matches!(
                unpack_with(&l, None, ct, text.as_bytes(), true),
                Unpacked::Original
            ));
        }
        // A JSON part of another type too.
        let mut body = b"--B\r\nContent-Type: text/plain\r\n\r\n".to_vec();
        body.extend_from_slice(json.as_bytes());
        body.extend_from_slice(b"\r\n--B--");
        let out = unpack_with(&l, None, "multipart/mixed; boundary=B", &body, true);
        assert_eq!(
            contents(out),
            vec![
                b"<original>".to_vec(),
                EICAR.to_vec(),
                json.as_bytes().to_vec()
            ]
        );
    }

    #[test]
    fn json_that_is_not_quite_json_keeps_its_files() {
        let dir = tempfile::tempdir().unwrap();
        let l = limits(dir.path());
        let want = vec![b"<original>".to_vec(), EICAR.to_vec()];
        // Python reads NaN; JSON Lines and Go's decoder read values after the first.
        for json in [
            format!(r#"{{"a":NaN,"file":"{EICAR_B64}"}}"#),
            format!(r#"{{"file":"{EICAR_B64}"}} trailing"#),
            format!("{{\"a\":1}}\n{{\"file\":\"{EICAR_B64}\"}}"),
        ] {
            let out = unpack_with(&l, None, "application/json", json.as_bytes(), true);
            assert_eq!(contents(out), want, "{json}");
        }
        // Python's json.loads detects UTF-16.
        let json = format!(r#"{{"file":"{EICAR_B64}"}}"#);
        let utf16: Vec<u8> = json.encode_utf16().flat_map(u16::to_le_bytes).collect();
        let out = unpack_with(&l, None, "application/json", &utf16, true);
        assert_eq!(contents(out), want);
    }

    #[test]
    fn base64_that_lenient_decoders_read_is_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let l = limits(dir.path());
        // Python's b64decode and Node's Buffer.from skip the dots and spaces.
        let dotted: String = EICAR_B64
            .as_bytes()
            .chunks(7)
            .map(|c| format!("{}. ", std::str::from_utf8(c).unwrap()))
            .collect();
        let json = format!(r#"["{dotted}"]"#);
        let out = unpack_with(&l, None, "application/json", json.as_bytes(), true);
        assert_eq!(contents(out), vec![b"<original>".to_vec(), EICAR.to_vec()]);
        // Node takes `+` and `_` in one string; its reading stops at a `=` Python skips
        // (here one after a whole group), Python's goes on.
        let file = [EICAR, b"\n"].concat();
        let node = format!(r#"["{}=QUJD_+"]"#, encode_base64(&file));
        let files = contents(unpack_with(
            &l,
            None,
            "application/json",
            node.as_bytes(),
            true,
        ));
        assert_eq!(files.len(), 3, "{files:?}");
        assert_eq!(files[1], file);
        assert_eq!(files[2], [&file[..], b"ABC", &[0xff]].concat());
    }

    #[test]
    fn many_identifiers_are_not_many_files_but_many_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let l = limits(dir.path());
        // An API listing: 300 objects with 20-character mixed-case ids and a SHA-256.
        let items: Vec<String> = (0..300u32)
            .map(|i| {
                let id = format!("aB3dE5fG7hJ9kL{i:06}");
                let digest = encode_base64(&[(i % 251) as u8; 32]);
                format!(r#"{{"id":"{id}","sha256":"{digest}","name":"item {i}"}}"#)
            })
            .collect();
        let json = format!("[{}]", items.join(","));
        let files = contents(unpack_with(
            &l,
            None,
            "application/json",
            json.as_bytes(),
            true,
        ));
        assert_eq!(files.len(), 2, "the body and its small strings in a row");
        // A file among more decoys than are scanned one by one: refused, not skipped.
        let mut decoys: Vec<String> = (0..MAX_EMBEDDED_FILES)
            .map(|i| {
                format!(
                    r#""{}""#,
                    encode_base64(format!("decoy {i:<40}").as_bytes())
                )
            })
            .collect();
        decoys.push(format!(r#""{EICAR_B64}""#));
        let json = format!("[{}]", decoys.join(","));
        assert!(
            refused(unpack_with(
                &l,
                None,
                "application/json",
                json.as_bytes(),
                true
            ))
            .contains("embedded")
        );
        // The same file many times is one file.
        let same = vec![format!(r#""{EICAR_B64}""#); 2 * MAX_EMBEDDED_FILES].join(",");
        let out = unpack_with(
            &l,
            None,
            "application/json",
            format!("[{same}]").as_bytes(),
            true,
        );
        assert_eq!(contents(out), vec![b"<original>".to_vec(), EICAR.to_vec()]);
    }
}
