//! `Content-Encoding` decoders, as real clients decode: browsers and curl undo every zstd
//! frame and every gzip member, and accept `deflate` both zlib-wrapped (RFC 9110 8.4.1.2)
//! and raw. A decoder that stops early would let an attacker hide a file behind an empty
//! first frame, so each one here reads the body to its end or fails.

use std::io::Read;

use ruzstd::decoding::{FrameDecoder, StreamingDecoder};

/// The codings this producer undoes; any other is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Coding {
    Gzip,
    Deflate,
    Brotli,
    Zstd,
}

impl Coding {
    /// Coding names are case-insensitive (RFC 9110 8.4.1); `x-gzip` is gzip (8.4.1.3).
    /// `identity` is no coding at all and yields `None` from [`codings`].
    pub fn parse(name: &str) -> Option<Coding> {
        let name = name.trim();
        [
            ("gzip", Coding::Gzip),
            ("x-gzip", Coding::Gzip),
            ("deflate", Coding::Deflate),
            ("br", Coding::Brotli),
            ("zstd", Coding::Zstd),
        ]
        .into_iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, c)| c)
    }
}

/// The codings of a `Content-Encoding` value in the order they were applied, `identity`
/// and empty members left out; an unknown name is returned as the error.
pub fn codings(header: &str) -> Result<Vec<Coding>, String> {
    header
        .split(',')
        .map(str::trim)
        .filter(|c| !c.is_empty() && !c.eq_ignore_ascii_case("identity"))
        .map(|c| Coding::parse(c).ok_or_else(|| c.to_owned()))
        .collect()
}

/// A reader of the decoded bytes.
pub fn decoder<'a>(
    coding: Coding,
    source: impl Read + Send + 'a,
) -> std::io::Result<Box<dyn Read + Send + 'a>> {
    Ok(match coding {
        Coding::Gzip => Box::new(flate2::read::MultiGzDecoder::new(source)),
        Coding::Deflate => deflate(source)?,
        Coding::Brotli => Box::new(brotli_decompressor::Decompressor::new(source, 64 * 1024)),
        Coding::Zstd => Box::new(ZstdFrames::new(source)),
    })
}

/// `deflate` as browsers read it: a zlib stream when the first two bytes are a zlib header
/// (RFC 1950 2.2), raw deflate (RFC 1951) otherwise.
fn deflate<'a>(mut source: impl Read + Send + 'a) -> std::io::Result<Box<dyn Read + Send + 'a>> {
    let mut head = [0u8; 2];
    let mut n = 0;
    while n < head.len() {
        match source.read(&mut head[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    let zlib = n == 2
        && head[0] & 0x0f == 8
        && head[0] >> 4 <= 7
        && (u16::from(head[0]) << 8 | u16::from(head[1])) % 31 == 0;
    let whole = std::io::Cursor::new(head[..n].to_vec()).chain(source);
    Ok(if zlib {
        Box::new(flate2::read::ZlibDecoder::new(whole))
    } else {
        Box::new(flate2::read::DeflateDecoder::new(whole))
    })
}

/// Every frame of a zstd body, in order (RFC 8878 3: a body is a sequence of frames);
/// skippable frames (3.1.2) are skipped. Each frame is decoded as a stream, so a large
/// frame holds no more than its window in memory.
struct ZstdFrames<R: Read> {
    state: ZstdState<R>,
}

enum ZstdState<R: Read> {
    /// Between frames: the next one starts here, or the body ends.
    Between(PushBack<R>),
    Frame(Box<StreamingDecoder<PushBack<R>, FrameDecoder>>),
    Failed,
}

/// A reader that can be handed back the few bytes read ahead of it.
struct PushBack<R> {
    ahead: Vec<u8>,
    inner: R,
}

impl<R: Read> Read for PushBack<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.ahead.is_empty() {
            return self.inner.read(buf);
        }
        let n = self.ahead.len().min(buf.len());
        buf[..n].copy_from_slice(&self.ahead[..n]);
        self.ahead.drain(..n);
        Ok(n)
    }
}

impl<R: Read> ZstdFrames<R> {
    fn new(source: R) -> Self {
        ZstdFrames {
            state: ZstdState::Between(PushBack {
                ahead: Vec::new(),
                inner: source,
            }),
        }
    }
}

fn corrupt(e: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string())
}

/// Reads up to `buf.len()` bytes; fewer only at the end of the body.
fn read_full(source: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match source.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Magic numbers of skippable frames (RFC 8878 3.1.2).
const SKIPPABLE: std::ops::RangeInclusive<u32> = 0x184D_2A50..=0x184D_2A5F;

impl<R: Read> Read for ZstdFrames<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            match std::mem::replace(&mut self.state, ZstdState::Failed) {
                ZstdState::Failed => return Err(corrupt("zstd body failed to decode before")),
                ZstdState::Frame(mut frame) => match frame.read(buf)? {
                    0 => {
                        if !frame.decoder.is_finished() {
                            return Err(corrupt("zstd frame truncated"));
                        }
                        self.state = ZstdState::Between(frame.into_inner());
                    }
                    n => {
                        self.state = ZstdState::Frame(frame);
                        return Ok(n);
                    }
                },
                ZstdState::Between(mut source) => {
                    let mut magic = [0u8; 4];
                    match read_full(&mut source, &mut magic)? {
                        0 => {
                            self.state = ZstdState::Between(source);
                            return Ok(0);
                        }
                        4 => {}
                        _ => return Err(corrupt("zstd body ends inside a frame header")),
                    }
                    if SKIPPABLE.contains(&u32::from_le_bytes(magic)) {
                        let mut length = [0u8; 4];
                        if read_full(&mut source, &mut length)? != 4 {
                            return Err(corrupt("zstd skippable frame truncated"));
                        }
                        let length = u64::from(u32::from_le_bytes(length));
                        let skipped =
                            std::io::copy(&mut (&mut source).take(length), &mut std::io::sink())?;
                        if skipped != length {
                            return Err(corrupt("zstd skippable frame truncated"));
                        }
                        self.state = ZstdState::Between(source);
                        continue;
                    }
                    source.ahead.extend_from_slice(&magic);
                    self.state =
                        ZstdState::Frame(Box::new(StreamingDecoder::new(source).map_err(corrupt)?));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    fn decode(coding: Coding, data: &[u8]) -> std::io::Result<Vec<u8>> {
        let mut out = Vec::new();
        decoder(coding, data)?.read_to_end(&mut out)?;
        Ok(out)
    }

    fn zstd(data: &[u8]) -> Vec<u8> {
        ruzstd::encoding::compress_to_vec(data, ruzstd::encoding::CompressionLevel::Fastest)
    }

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    #[test]
    fn every_zstd_frame_is_decoded_and_skippable_frames_are_skipped() {
        let mut body = zstd(b"");
        body.extend_from_slice(&0x184D_2A53u32.to_le_bytes());
        body.extend_from_slice(&3u32.to_le_bytes());
        body.extend_from_slice(b"xyz");
        body.extend(zstd(b"second frame"));
        body.extend(zstd(b", third"));
        assert_eq!(decode(Coding::Zstd, &body).unwrap(), b"second frame, third");
    }

    #[test]
    fn truncated_zstd_is_corrupt() {
        let mut body = zstd(b"first");
        let second = zstd(&b"0123456789".repeat(100));
        body.extend_from_slice(&second[..second.len() - 3]);
        assert!(decode(Coding::Zstd, &body).is_err());
        let mut skip = 0x184D_2A50u32.to_le_bytes().to_vec();
        skip.extend_from_slice(&10u32.to_le_bytes());
        skip.extend_from_slice(b"abc");
        assert!(decode(Coding::Zstd, &skip).is_err());
        assert!(decode(Coding::Zstd, b"\x28\xb5").is_err());
        assert!(decode(Coding::Zstd, b"not zstd at all").is_err());
    }

    #[test]
    fn every_gzip_member_is_decoded() {
        let mut body = gzip(b"");
        body.extend(gzip(b"member two"));
        assert_eq!(decode(Coding::Gzip, &body).unwrap(), b"member two");
    }

    #[test]
    fn deflate_is_read_zlib_wrapped_or_raw() {
        let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::fast());
        z.write_all(b"zlib").unwrap();
        assert_eq!(
            decode(Coding::Deflate, &z.finish().unwrap()).unwrap(),
            b"zlib"
        );
        let mut r = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::fast());
        r.write_all(b"raw").unwrap();
        assert_eq!(
            decode(Coding::Deflate, &r.finish().unwrap()).unwrap(),
            b"raw"
        );
        assert!(decode(Coding::Deflate, b"\xff").is_err());
    }

    #[test]
    fn coding_names_are_case_insensitive_and_unknown_ones_are_named() {
        assert_eq!(
            codings(" GZip, identity,X-GZIP ,Br,ZSTD,deflate").unwrap(),
            vec![
                Coding::Gzip,
                Coding::Gzip,
                Coding::Brotli,
                Coding::Zstd,
                Coding::Deflate
            ]
        );
        assert_eq!(codings("").unwrap(), vec![]);
        assert_eq!(codings("gzip, compress").unwrap_err(), "compress");
        assert_eq!(codings("gzip;q=1").unwrap_err(), "gzip;q=1");
    }
}
