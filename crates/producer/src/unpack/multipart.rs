//! Multipart bodies split into their parts as they stream through: transfer encodings
//! undone, nested multipart split in turn, preamble and epilogue kept.

use virus_scanner_protocol::multipart::{
    self, Boundary, MultipartError, MultipartSplitter, PartEvent, boundary_of,
};
use virus_scanner_protocol::transfer_encoding::{
    self, Alphabet, Base64Decoder, QuotedPrintableDecoder, TransferEncoding,
};

use super::{Found, MAX_DEPTH, MAX_PARTS, Stop, each_piece, is_form_data, is_json};
use crate::body::{Body, BodyBuffer, BodyLimits};

fn malformed(e: MultipartError) -> Stop {
    // Receivers read broken multipart differently (Go takes `--b--x` for data, others for
    // the end; some keep the parts before a truncation): no single set of files to scan.
    Stop::Refused(format!("multipart body does not parse: {e}"))
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

impl Found<'_> {
    /// Splits a multipart body; the parts of nested multipart parts are split as they
    /// stream through, so no part is held twice.
    pub(super) fn split(
        &mut self,
        body: &Body,
        boundary: &str,
        form_data: bool,
    ) -> Result<(), Stop> {
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
}
