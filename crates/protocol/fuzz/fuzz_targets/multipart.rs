//! The multipart splitter on arbitrary bodies: the events are the same whatever the sizes of
//! the pieces the body arrives in, and preamble, parts and epilogue never hold more bytes
//! than the body.
#![no_main]

use libfuzzer_sys::fuzz_target;
use virus_scanner_protocol::multipart::{MultipartSplitter, PartEvent};

#[derive(Debug, Default, PartialEq, Eq)]
struct Split {
    preamble: Vec<u8>,
    parts: Vec<(Vec<u8>, Vec<u8>)>,
    epilogue: Vec<u8>,
    result: Option<Result<usize, String>>,
}

fn split(body: &[u8], step: usize) -> Split {
    let mut out = Split::default();
    let mut open = false;
    let mut on = |e: PartEvent<'_>| match e {
        PartEvent::Preamble(d) => {
            assert!(!open && out.parts.is_empty());
            out.preamble.extend_from_slice(d);
        }
        PartEvent::Start(h) => {
            assert!(!open);
            open = true;
            out.parts.push((h.to_vec(), Vec::new()));
        }
        PartEvent::Data(d) => {
            assert!(open);
            out.parts
                .last_mut()
                .expect("a part is open")
                .1
                .extend_from_slice(d);
        }
        PartEvent::End => {
            assert!(open);
            open = false;
        }
        PartEvent::Epilogue(d) => {
            assert!(!open);
            out.epilogue.extend_from_slice(d);
        }
    };
    let mut s = MultipartSplitter::new("b0undary").expect("a valid boundary");
    for piece in body.chunks(step) {
        if let Err(e) = s.feed(piece, &mut on) {
            out.result = Some(Err(e.to_string()));
            return out;
        }
    }
    out.result = Some(s.finish(&mut on).map_err(|e| e.to_string()));
    out
}

fuzz_target!(|data: &[u8]| {
    let Some((&step, body)) = data.split_first() else {
        return;
    };
    let whole = split(body, body.len().max(1));
    let pieces = split(body, usize::from(step).max(1));
    assert_eq!(whole, pieces);
    let held = whole.preamble.len()
        + whole.epilogue.len()
        + whole
            .parts
            .iter()
            .map(|(h, d)| h.len() + d.len())
            .sum::<usize>();
    assert!(held <= body.len());
});
