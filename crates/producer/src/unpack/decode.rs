//! Content codings undone, with the first member of a gzip body of several kept apart.

use std::io::Read;

use crate::body::{Body, BodyBuffer, BodyError, BodyLimits};
use crate::codings::{self, Coding};

pub(super) enum DecodeFailure {
    Unsupported,
    TooLarge,
    Corrupt(std::io::Error),
    Body(BodyError),
}

/// The decoded body and, for a gzip body of several members, its first member alone:
/// curl and Firefox decode every member, Chromium only the first, so both are files a
/// receiver may get.
pub(super) fn decode(
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
