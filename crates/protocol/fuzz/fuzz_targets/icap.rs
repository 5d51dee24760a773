//! Every ICAP parser on arbitrary bytes: they may refuse, never panic, and what they accept
//! must be consistent (consumed lengths within the input, ranges within the header area).
#![no_main]

use libfuzzer_sys::fuzz_target;
use virus_scanner_protocol::icap::{self, Method};

fuzz_target!(|data: &[u8]| {
    if let Ok(Some((head, used))) = icap::parse_request_head(data) {
        assert!(used <= data.len());
        let _ = head.service_path();
        let _ = head.preview();
        if let Some(value) = head.headers.get("Encapsulated") {
            for method in [Method::Options, Method::Reqmod, Method::Respmod] {
                if let Ok(e) = icap::parse_encapsulated(value, method) {
                    for (_, range) in e.header_ranges() {
                        assert!(range.start <= range.end && range.end <= e.body.1);
                        if let Some(section) = data[used..].get(range) {
                            let _ = icap::parse_http_head(section);
                        }
                    }
                }
            }
        }
    }
    if let Ok(Some((chunk, used))) = icap::parse_chunk_header(data) {
        assert!(used <= data.len());
        assert!(chunk.size <= icap::MAX_CHUNK);
        assert!(!chunk.ieof || chunk.size == 0);
    }
    let _ = icap::parse_http_head(data);
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = icap::parse_encapsulated(text, Method::Reqmod);
    }
});
