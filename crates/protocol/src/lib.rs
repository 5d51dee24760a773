//! Wire formats shared by the producer and the consumer. Nothing here does I/O: every parser
//! takes bytes and returns a value or a [`ParseError`]-style error, so that each one can be
//! unit-tested on byte strings and fuzzed.
#![forbid(unsafe_code)]

pub mod clamd;
pub mod embedded;
pub mod icap;
pub mod json_strings;
pub mod legacy;
pub mod media_type;
pub mod multipart;
pub mod task;
pub mod transfer_encoding;

/// Generated from `proto/virusscanner/v1/scan.proto`.
pub mod v1 {
    #![allow(clippy::all)]
    include!(concat!(env!("OUT_DIR"), "/virusscanner.v1.rs"));
}
