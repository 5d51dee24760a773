//! Files carried as text inside a string (a JSON value, say): a `data:<type>;base64,` URL, or
//! a string that is plausibly base64 on its own. The string arrives in pieces; what it
//! decodes to is written out as it goes, and [`EmbeddedFile::finish`] says whether it was a
//! file after all.
//!
//! "Plausibly base64" has to leave out the identifiers, words and sentences that fill JSON
//! bodies, since each file found costs a scan and a body with too many is refused: at least
//! [`MIN_CHARS`] characters of one alphabet with upper-case letters, lower-case letters and
//! digits among them (what base64 of any real file has, and hex ids, enum names and words
//! lack), padding only at the end, and whitespace only as line breaks between runs of at
//! least [`MIN_CHARS`] (MIME and PEM wrap at 76 and 64; prose has short words).

use crate::transfer_encoding::{Alphabet, Base64Decoder, is_base64_whitespace};

/// Fewer base64 characters than this is not taken for a file (12 bytes decoded).
pub const MIN_CHARS: usize = 16;
/// A `data:` URL whose media type and parameters are longer than this is not read.
pub const MAX_DATA_URL_HEAD: usize = 256;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EmbeddedKind {
    DataUrl,
    Base64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// Not yet known whether this is a `data:` URL.
    Head,
    DataUrl,
    Raw,
    /// Not a file.
    No,
}

#[derive(Debug, Clone)]
pub struct EmbeddedFile {
    stage: Stage,
    head: Vec<u8>,
    decoder: Base64Decoder,
    chars: usize,
    upper: bool,
    lower: bool,
    digit: bool,
    /// Characters in the current whitespace-separated run.
    run: usize,
    /// Length of the run that whitespace just ended, until another run starts.
    ended_run: Option<usize>,
}

impl Default for EmbeddedFile {
    fn default() -> Self {
        EmbeddedFile::new()
    }
}

impl EmbeddedFile {
    pub fn new() -> EmbeddedFile {
        EmbeddedFile {
            stage: Stage::Head,
            head: Vec::new(),
            decoder: Base64Decoder::new(Alphabet::Either),
            chars: 0,
            upper: false,
            lower: false,
            digit: false,
            run: 0,
            ended_run: None,
        }
    }

    /// Whether the string can still be a file: once false, what was written to `out` is
    /// not one and the rest of the string need not be fed.
    pub fn is_candidate(&self) -> bool {
        self.stage != Stage::No
    }

    /// Feeds the next piece of the string; decoded bytes are appended to `out`.
    pub fn feed(&mut self, piece: &[u8], out: &mut Vec<u8>) -> bool {
        match self.stage {
            Stage::No => false,
            Stage::Head => {
                self.head.extend_from_slice(piece);
                self.read_head(out)
            }
            Stage::DataUrl => {
                if self.decoder.feed(piece, out).is_err() {
                    self.stage = Stage::No;
                }
                self.is_candidate()
            }
            Stage::Raw => self.feed_raw(piece, out),
        }
    }

    fn read_head(&mut self, out: &mut Vec<u8>) -> bool {
        const SCHEME: &[u8] = b"data:";
        let n = self.head.len().min(SCHEME.len());
        if !self.head[..n].eq_ignore_ascii_case(&SCHEME[..n]) {
            self.stage = Stage::Raw;
            let head = std::mem::take(&mut self.head);
            return self.feed_raw(&head, out);
        }
        if n < SCHEME.len() {
            return true;
        }
        let Some(comma) = memchr::memchr(b',', &self.head) else {
            if self.head.len() > MAX_DATA_URL_HEAD {
                self.stage = Stage::No;
            }
            return self.is_candidate();
        };
        let meta = &self.head[SCHEME.len()..comma];
        let base64 = meta.len() >= 7 && meta[meta.len() - 7..].eq_ignore_ascii_case(b";base64");
        if comma > MAX_DATA_URL_HEAD || !base64 {
            self.stage = Stage::No;
            return false;
        }
        self.stage = Stage::DataUrl;
        let data = self.head.split_off(comma + 1);
        self.head = Vec::new();
        self.feed(&data, out)
    }

    fn feed_raw(&mut self, piece: &[u8], out: &mut Vec<u8>) -> bool {
        for &c in piece {
            if is_base64_whitespace(c) {
                if self.run > 0 {
                    self.ended_run = Some(self.run);
                    self.run = 0;
                }
                continue;
            }
            if let Some(len) = self.ended_run.take()
                && len < MIN_CHARS
            {
                self.stage = Stage::No;
                return false;
            }
            self.run += 1;
            if c != b'=' {
                self.chars += 1;
            }
            self.upper |= c.is_ascii_uppercase();
            self.lower |= c.is_ascii_lowercase();
            self.digit |= c.is_ascii_digit();
        }
        if self.decoder.feed(piece, out).is_err() {
            self.stage = Stage::No;
        }
        self.is_candidate()
    }

    /// The string ended: whether it was a file; its last decoded bytes go to `out`.
    pub fn finish(self, out: &mut Vec<u8>) -> Option<EmbeddedKind> {
        let kind = match self.stage {
            Stage::Head | Stage::No => return None,
            Stage::DataUrl => EmbeddedKind::DataUrl,
            Stage::Raw => {
                if self.chars < MIN_CHARS || !(self.upper && self.lower && self.digit) {
                    return None;
                }
                EmbeddedKind::Base64
            }
        };
        self.decoder.finish(out).ok().map(|()| kind)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(s: &[u8], step: usize) -> Option<(EmbeddedKind, Vec<u8>)> {
        let mut e = EmbeddedFile::new();
        let mut out = Vec::new();
        for piece in s.chunks(step.max(1)) {
            if !e.feed(piece, &mut out) {
                assert!(!e.is_candidate());
                return None;
            }
        }
        e.finish(&mut out).map(|k| (k, out))
    }

    const EICAR_B64: &[u8] = b"WDVPIVAlQEFQWzRcUFpYNTQoUF4pN0NDKTd9JEVJQ0FSLVNUQU5EQVJELUFOVElWSVJVUy1URVNULUZJTEUhJEgrSCo=";

    #[test]
    fn base64_strings_are_files_at_every_piece_size() {
        for step in [1, 2, 3, 5, 7, 1000] {
            let (kind, data) = file(EICAR_B64, step).unwrap();
            assert_eq!(kind, EmbeddedKind::Base64);
            assert!(data.starts_with(b"X5O!P%@AP["), "step {step}");
            assert!(data.ends_with(b"$H+H*"));
        }
        // Wrapped as MIME wraps it, without padding, URL-safe.
        let wrapped = [
            &EICAR_B64[..40],
            b"\r\n",
            &EICAR_B64[40..76],
            b"\n",
            &EICAR_B64[76..92],
        ]
        .concat();
        assert_eq!(file(&wrapped, 3).unwrap().1, file(EICAR_B64, 3).unwrap().1);
        assert_eq!(
            file(b"Zm9vYmFyLWJhei1xdXV4LTEy", 4).unwrap().1,
            b"foobar-baz-quux-12"
        );
        assert_eq!(
            file(b"_-_-Ab1_-_-Ab1_-", 4).map(|f| f.0),
            Some(EmbeddedKind::Base64)
        );
    }

    #[test]
    fn data_urls_are_files_whatever_their_length() {
        for step in [1, 4, 1000] {
            assert_eq!(
                file(b"DATA:text/plain;charset=utf-8;BASE64,aGk=", step),
                Some((EmbeddedKind::DataUrl, b"hi".to_vec()))
            );
            assert_eq!(
                file(b"data:;base64,aGk", step),
                Some((EmbeddedKind::DataUrl, b"hi".to_vec()))
            );
        }
        assert_eq!(file(b"data:text/plain,hello", 1), None);
        assert_eq!(file(b"data:;base64,a*b", 1), None);
        let long = [
            b"data:".as_slice(),
            &[b'x'; MAX_DATA_URL_HEAD],
            b";base64,aGk=",
        ]
        .concat();
        assert_eq!(file(&long, 7), None);
        assert_eq!(file(b"data:", 1), None);
    }

    #[test]
    fn identifiers_words_and_prose_are_not_files() {
        for s in [
            &b"short1Aa"[..],
            b"123e4567-e89b-12d3-a456-426614174000",
            b"d41d8cd98f00b204e9800998ecf8427e",
            b"SOME_CONSTANT_VALUE_2",
            b"ThisIsAnIdentifierName",
            b"Hello world 2024 is here and Today",
            b"abc+def_ghi1ABCD",
            b"QUJD==QUJDQUJDQUJDQUJD1a",
            b"https://example.com/a1B",
            b"/usr/local/bin/python3",
        ] {
            assert_eq!(file(s, 1), None, "{}", String::from_utf8_lossy(s));
            assert_eq!(file(s, 100), None, "{}", String::from_utf8_lossy(s));
        }
    }
}
