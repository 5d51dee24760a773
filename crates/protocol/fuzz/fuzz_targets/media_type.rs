//! Content-Type and part head parsers on arbitrary bytes: they may refuse, never panic, and
//! a boundary they find is the one boundary parameter, one a splitter accepts.
#![no_main]

use libfuzzer_sys::fuzz_target;
use virus_scanner_protocol::media_type;
use virus_scanner_protocol::multipart::{self, Boundary, MultipartSplitter};

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = media_type::parse(data) {
        assert!(!m.ty.is_empty() && !m.subtype.is_empty());
        assert!(m.params.len() <= media_type::MAX_PARAMS);
        for p in &m.params {
            assert!(!p.name.is_empty() && p.name == p.name.to_ascii_lowercase());
            assert!(p.quoted || !p.value.is_empty());
        }
    }
    match multipart::boundary_of(data) {
        Boundary::Found(b) => {
            let m = media_type::parse(data).expect("a found boundary comes from a parsed type");
            assert!(m.is_multipart());
            let params: Vec<_> = m.params_named("boundary").collect();
            assert_eq!(params.len(), 1);
            assert_eq!(params[0].value, b.as_bytes());
            assert!(MultipartSplitter::new(&b).is_ok());
        }
        Boundary::NotMultipart => {
            assert!(!media_type::loose_essence(data).starts_with("multipart/"));
        }
        Boundary::Missing | Boundary::Ambiguous(_) => {}
    }
    if let Ok(h) = multipart::parse_part_headers(data) {
        for v in [&h.content_type, &h.transfer_encoding]
            .into_iter()
            .flatten()
        {
            assert!(!v.contains(&b'\r') && !v.contains(&b'\n'));
        }
    }
});
