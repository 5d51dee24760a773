//! The producer's ext_proc state machine on any sequence of messages: it must not panic, its
//! answer stream must end, and by the model of Envoy in `virus_scanner_producer_fuzz` no
//! body that holds the marker reaches the other side.
#![no_main]

use libfuzzer_sys::fuzz_target;
use virus_scanner_producer_fuzz::{Exchange, exercise};

fuzz_target!(|exchange: Exchange| exercise(&exchange));
