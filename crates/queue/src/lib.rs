//! The scan queue on Redis.
//!
//! * Tasks are entries in two streams, `{p}:tasks:high` and `{p}:tasks:normal`, read through
//!   one consumer group. Consumers always look at the high stream first.
//! * An entry stays in the group's pending list until the consumer that holds it writes the
//!   verdict; the verdict, `XACK` and `XDEL` happen in one script that first checks that the
//!   caller still owns the entry, so a task gets exactly one verdict.
//! * An entry held longer than the visibility timeout by a consumer that stopped heart-beating
//!   (crashed, killed) is claimed by another consumer. After `max_deliveries` deliveries it is
//!   answered with an error verdict instead of being scanned again (poison task).
//! * The producer waits for the verdict on the per-task list `{p}:verdict:<id>` with `BLPOP`
//!   and a deadline. A task whose deadline passed is answered without a scan.
//! * Verdict cache: `{p}:cache:<db-version>:<sha256>`, written only by consumers, from a hash
//!   they computed themselves over the bytes they scanned. The producer looks it up and, on a
//!   miss, enqueues in one script, with the `BLPOP` pipelined behind it: one round trip per
//!   body. A short-lived in-process memo of recent verdicts, per database version, comes first.
//! * A producer whose scan directory the consumers cannot open sends a spilled body through
//!   Redis in chunks, in the hash `{p}:body:<tenant>:<id>` ([`StoredBody`]); the consumer
//!   streams it to clamd chunk by chunk ([`StoredBodyReader`]) and removes it with the verdict.
//!
//! Every key shares the hash tag `{p}`, so multi-key scripts also run on Redis Cluster.
//!
//! Feature `test-util` adds what only tests and the benchmark call: enqueue without waiting,
//! wait for a verdict by task id, scan in one call, and the queue depth as a producer sees it.
#![forbid(unsafe_code)]

// Linked for its `ring` feature: the crypto provider of `rediss://` connections.
use rustls as _;

pub mod acl;
mod config;
mod consumer;
mod error;
mod functions;
mod keys;
mod legacy;
mod memo;
mod producer;
mod stored_body;

pub use config::{QueueConfig, RedisConfig};
pub use consumer::{Consumer, Delivery};
pub use error::QueueError;
pub use functions::{MAX_CHUNKS, MAX_TASK_BYTES};
pub use keys::{DEFAULT_TENANT, Keys, LEGACY_TENANT};
pub use legacy::LegacyBridge;
pub use producer::Producer;
pub use stored_body::{CHUNK_BYTES, MAX_CHUNK_BYTES, StoredBody, StoredBodyReader};

/// Nanoseconds since the Unix epoch.
pub fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}
