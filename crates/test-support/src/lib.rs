//! Real services for tests: `redis-server` and `clamd` from the system's packages, each in
//! its own temporary directory, on a loopback port chosen at run time, stopped on drop.
//!
//! A missing binary is a test failure with a message that names the package, never a skip.
#![forbid(unsafe_code)]

pub mod certs;
mod clamd;
mod envoy;
#[cfg(feature = "kube")]
pub mod kube;
mod process;
mod redis;
mod service;
mod squid;
mod upstream;

pub use clamd::{Clamd, ClamdOptions};
pub use envoy::{BodyMode, Envoy, EnvoyOptions, Processor, config_yaml, envoy_binary};
pub use process::{clean_command, free_port, run_checked, wait_for};
pub use redis::{Redis, RedisOptions};
pub use service::{ProducerProcess, ServiceProcess, http_get, log_field, metric, port_of};
pub use squid::{Origin, Squid, SquidOptions};
pub use upstream::{Received, Served, Upstream};

/// The EICAR anti-virus test file.
pub const EICAR: &[u8] = b"X5O!P%@AP[4\\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*";

/// Name under which the shipped database reports EICAR found anywhere in a body.
pub const EICAR_BODY_SIGNATURE: &str = "VirusScanner.Test.EICAR-Body.UNOFFICIAL";

/// Name under which the shipped database reports [`hash_signature_sample`].
pub const HASH_SAMPLE_SIGNATURE: &str = "VirusScanner.Test.HashSample.UNOFFICIAL";

/// A 64 KiB file whose SHA-256 is a hash signature in the shipped database
/// (`testdata/clamav/daily.hsb`). Hash signatures match only the whole file.
pub fn hash_signature_sample() -> Vec<u8> {
    (0..65536u32).map(|i| ((i * 31 + 7) % 251) as u8).collect()
}

/// Deterministic bytes that match no signature.
pub fn clean_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..len)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 33) as u8
        })
        .collect()
}

/// The repository's `testdata/` directory.
pub fn testdata_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../testdata")
}
