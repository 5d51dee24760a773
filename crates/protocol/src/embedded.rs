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
//!
//! Lenient decoders (Python's `b64decode`, Node's `Buffer.from`) also make a file of base64
//! with dots, spaces or other bytes strewn in, and of mixed alphabets: what is written out
//! is their reading ([`LenientBase64Decoder`]), which is the strict one wherever the text
//! is strictly base64. Such a string counts as a file when its alphabet characters look
//! like base64 and not like words: the inserted bytes are the sender's choice, but the
//! alphabet characters, in order, are the base64 of the file, so the sender cannot make
//! them look like prose. Base64 of any file has upper-case letters in about a third of its
//! characters and digits in about a sixth; prose has a capital a word and few digits.

use crate::transfer_encoding::{
    Alphabet, Base64Decoder, LenientBase64Decoder, is_base64_whitespace,
};

/// Fewer base64 characters than this is not taken for a file (12 bytes decoded).
pub const MIN_CHARS: usize = 16;
/// A `data:` URL whose media type and parameters are longer than this is not read.
pub const MAX_DATA_URL_HEAD: usize = 256;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EmbeddedKind {
    DataUrl,
    Base64,
    /// Base64 only to a lenient decoder: bytes outside the alphabet, mixed alphabets, or a
    /// misplaced `=`.
    LenientBase64,
}

/// A string that is a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Embedded {
    pub kind: EmbeddedKind,
    /// Node's reading is only the first this many bytes of the output (it stops at a `=`
    /// Python skips): a second file.
    pub node_stop: Option<u64>,
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
    /// A `data:` URL with `;base64` (its strict decoding may have failed since).
    data_url: bool,
    head: Vec<u8>,
    /// Checks the strict reading; its output is the lenient one's whenever it succeeds.
    decoder: Base64Decoder,
    strict_out: Vec<u8>,
    lenient: LenientBase64Decoder,
    /// Alphabet characters the lenient decoder read, and how many were upper-case letters
    /// and digits.
    alphabet_chars: usize,
    upper_chars: usize,
    lower_chars: usize,
    digit_chars: usize,
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
            data_url: false,
            head: Vec::new(),
            decoder: Base64Decoder::new(Alphabet::Either),
            strict_out: Vec::new(),
            lenient: LenientBase64Decoder::new(),
            alphabet_chars: 0,
            upper_chars: 0,
            lower_chars: 0,
            digit_chars: 0,
            chars: 0,
            upper: false,
            lower: false,
            digit: false,
            run: 0,
            ended_run: None,
        }
    }

    /// Whether the string is still strictly base64 (or a `data:` URL of it).
    pub fn is_strict_candidate(&self) -> bool {
        self.stage != Stage::No
    }

    /// Feeds the next piece of the string; the lenient decoding is appended to `out`.
    pub fn feed(&mut self, piece: &[u8], out: &mut Vec<u8>) {
        match self.stage {
            Stage::No => self.feed_lenient(piece, out),
            Stage::Head => {
                self.head.extend_from_slice(piece);
                self.read_head(out);
            }
            Stage::DataUrl => {
                self.strict_out.clear();
                if self.decoder.feed(piece, &mut self.strict_out).is_err() {
                    self.stage = Stage::No;
                }
                self.feed_lenient(piece, out);
            }
            Stage::Raw => {
                self.feed_raw(piece);
                self.feed_lenient(piece, out);
            }
        }
    }

    fn feed_lenient(&mut self, piece: &[u8], out: &mut Vec<u8>) {
        for &c in piece {
            if c.is_ascii_alphanumeric() || b"+/-_".contains(&c) {
                self.alphabet_chars += 1;
                self.upper_chars += usize::from(c.is_ascii_uppercase());
                self.lower_chars += usize::from(c.is_ascii_lowercase());
                self.digit_chars += usize::from(c.is_ascii_digit());
            }
        }
        self.lenient.feed(piece, out);
    }

    fn read_head(&mut self, out: &mut Vec<u8>) {
        const SCHEME: &[u8] = b"data:";
        let n = self.head.len().min(SCHEME.len());
        if !self.head[..n].eq_ignore_ascii_case(&SCHEME[..n]) {
            self.stage = Stage::Raw;
            let head = std::mem::take(&mut self.head);
            return self.feed(&head, out);
        }
        if n < SCHEME.len() {
            return;
        }
        let Some(comma) = memchr::memchr(b',', &self.head) else {
            if self.head.len() > MAX_DATA_URL_HEAD {
                self.not_a_data_url(out);
            }
            return;
        };
        let meta = &self.head[SCHEME.len()..comma];
        let base64 = meta.len() >= 7 && meta[meta.len() - 7..].eq_ignore_ascii_case(b";base64");
        if comma > MAX_DATA_URL_HEAD || !base64 {
            return self.not_a_data_url(out);
        }
        self.stage = Stage::DataUrl;
        self.data_url = true;
        let data = self.head.split_off(comma + 1);
        self.head = Vec::new();
        self.feed(&data, out)
    }

    /// Only a lenient reading of the whole string is left.
    fn not_a_data_url(&mut self, out: &mut Vec<u8>) {
        self.stage = Stage::No;
        let head = std::mem::take(&mut self.head);
        self.feed_lenient(&head, out);
    }

    fn feed_raw(&mut self, piece: &[u8]) {
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
                return;
            }
            self.run += 1;
            if c != b'=' {
                self.chars += 1;
            }
            self.upper |= c.is_ascii_uppercase();
            self.lower |= c.is_ascii_lowercase();
            self.digit |= c.is_ascii_digit();
        }
        self.strict_out.clear();
        if self.decoder.feed(piece, &mut self.strict_out).is_err() {
            self.stage = Stage::No;
        }
    }

    /// Alphabet characters in the proportions of base64, not of words (see the module).
    fn looks_like_base64(&self) -> bool {
        let n = self.alphabet_chars;
        n >= MIN_CHARS
            && self.lower_chars > 0
            && self.upper_chars * 8 >= n
            && self.digit_chars * 32 >= n
            && self.digit_chars > 0
    }

    /// The string ended: whether it was a file; its last decoded bytes go to `out`.
    pub fn finish(mut self, out: &mut Vec<u8>) -> Option<Embedded> {
        if self.stage == Stage::Head {
            // Shorter than `data:`, or its start.
            let head = std::mem::take(&mut self.head);
            self.feed_lenient(&head, out);
        }
        self.lenient.finish(out);
        let node_stop = self.lenient.node_stop();
        self.strict_out.clear();
        let strict = match self.stage {
            Stage::DataUrl => Some(EmbeddedKind::DataUrl),
            Stage::Raw if self.chars >= MIN_CHARS && self.upper && self.lower && self.digit => {
                Some(EmbeddedKind::Base64)
            }
            _ => None,
        };
        let looks_like_base64 = self.data_url || self.looks_like_base64();
        let strict = strict.filter(|_| self.decoder.finish(&mut self.strict_out).is_ok());
        let kind = match strict {
            Some(kind) => kind,
            None if looks_like_base64 => EmbeddedKind::LenientBase64,
            None => return None,
        };
        Some(Embedded { kind, node_stop })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(s: &[u8], step: usize) -> Option<(EmbeddedKind, Vec<u8>)> {
        let mut e = EmbeddedFile::new();
        let mut out = Vec::new();
        for piece in s.chunks(step.max(1)) {
            e.feed(piece, &mut out);
        }
        e.finish(&mut out).map(|f| (f.kind, out))
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
        // Lenient decoders skip the `*`.
        assert_eq!(
            file(b"data:;base64,a*GkK", 1),
            Some((EmbeddedKind::LenientBase64, b"hi\n".to_vec()))
        );
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
            b"https://example.com/a1B",
            b"/usr/local/bin/python3",
            b"Order 66 shipped to Berlin on Monday, 3 boxes of 12 items each",
            b"Die Katze sitzt auf dem Tisch und der Hund liegt 2 Meter weiter",
        ] {
            assert_eq!(file(s, 1), None, "{}", String::from_utf8_lossy(s));
            assert_eq!(file(s, 100), None, "{}", String::from_utf8_lossy(s));
        }
    }

    #[test]
    fn base64_that_only_lenient_decoders_read_is_a_file() {
        let eicar = file(EICAR_B64, 1000).unwrap().1;
        // Python's b64decode and Node's Buffer.from skip the dots and spaces.
        let dotted: Vec<u8> = EICAR_B64
            .chunks(5)
            .flat_map(|c| [c, b". "].concat())
            .collect();
        // Node takes `+` and `_` in one string.
        let mixed = [b"__-+".as_slice(), EICAR_B64].concat();
        for step in [1, 3, 1000] {
            assert_eq!(
                file(&dotted, step),
                Some((EmbeddedKind::LenientBase64, eicar.clone()))
            );
            let (kind, data) = file(&mixed, step).unwrap();
            assert_eq!(kind, EmbeddedKind::LenientBase64);
            assert_eq!(&data[3..], &eicar[..]);
            assert_eq!(
                file(b"abc+def_ghi1ABCD", step).map(|f| f.0),
                Some(EmbeddedKind::LenientBase64)
            );
        }
        // A `=` Python skips: Node's reading stops there.
        let mut e = EmbeddedFile::new();
        let mut out = Vec::new();
        e.feed(b"QUJD=QUJDQUJDQUJDQUJD1a", &mut out);
        let found = e.finish(&mut out).unwrap();
        assert_eq!(found.node_stop, Some(3));
        assert!(out.starts_with(b"ABCABC"));
    }
}
