//! Base64, quoted-printable and embedded-file decoding on arbitrary text: the output does
//! not depend on how the input is cut into pieces, base64 of any bytes decodes back to them
//! wherever line breaks fall, the lenient reading is the strict one wherever the text is
//! strictly base64, and quoted-printable never grows its input.
#![no_main]

use libfuzzer_sys::fuzz_target;
use virus_scanner_protocol::embedded::EmbeddedFile;
use virus_scanner_protocol::transfer_encoding::{
    Alphabet, Base64Decoder, LenientBase64Decoder, QuotedPrintableDecoder, TransferEncodingError,
};

fn base64(input: &[u8], step: usize) -> Result<Vec<u8>, TransferEncodingError> {
    let mut d = Base64Decoder::new(Alphabet::Either);
    let mut out = Vec::new();
    for piece in input.chunks(step) {
        d.feed(piece, &mut out)?;
    }
    d.finish(&mut out)?;
    Ok(out)
}

fn qp(input: &[u8], step: usize) -> Result<Vec<u8>, TransferEncodingError> {
    let mut d = QuotedPrintableDecoder::new();
    let mut out = Vec::new();
    for piece in input.chunks(step) {
        d.feed(piece, &mut out)?;
    }
    d.finish(&mut out)?;
    Ok(out)
}

fn lenient(input: &[u8], step: usize) -> (Vec<u8>, Option<u64>) {
    let mut d = LenientBase64Decoder::new();
    let mut out = Vec::new();
    for piece in input.chunks(step) {
        d.feed(piece, &mut out);
    }
    d.finish(&mut out);
    (out, d.node_stop())
}

fn embedded(input: &[u8], step: usize) -> Option<(Vec<u8>, Option<u64>)> {
    let mut e = EmbeddedFile::new();
    let mut out = Vec::new();
    for piece in input.chunks(step) {
        e.feed(piece, &mut out);
    }
    e.finish(&mut out).map(|f| (out, f.node_stop))
}

fn encode(data: &[u8], wrap: usize) -> Vec<u8> {
    const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = Vec::new();
    for group in data.chunks(3) {
        let n = group.iter().fold(0u32, |n, &b| n << 8 | u32::from(b)) << (8 * (3 - group.len()));
        for i in 0..=group.len() {
            out.push(A[(n >> (18 - 6 * i) & 63) as usize]);
            if out.len() % (wrap + 2) == wrap {
                out.extend_from_slice(b"\r\n");
            }
        }
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let Some((&step, input)) = data.split_first() else {
        return;
    };
    let step = usize::from(step).max(1);
    let whole = input.len().max(1);
    let b = base64(input, whole);
    assert_eq!(b, base64(input, step));
    if let Ok(out) = &b {
        assert!(out.len() <= input.len() * 3 / 4 + 2);
    }
    let l = lenient(input, whole);
    assert_eq!(l, lenient(input, step));
    if let Ok(out) = &b {
        assert_eq!(&l.0, out, "strict base64 reads the same leniently");
        assert_eq!(l.1, None);
    }
    if let Some(stop) = l.1 {
        assert!(stop < l.0.len() as u64);
    }
    let q = qp(input, whole);
    assert_eq!(q, qp(input, step));
    if let Ok(out) = &q {
        assert!(out.len() <= input.len());
    }
    assert_eq!(embedded(input, whole), embedded(input, step));
    let encoded = encode(input, usize::from(step % 80) + 1);
    assert_eq!(base64(&encoded, step).as_deref(), Ok(input));
    assert_eq!(lenient(&encoded, step), (input.to_vec(), None));
});
