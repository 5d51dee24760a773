//! The environment of the producer sidecar: the names of the settings the operator's injector
//! writes and the producer's configuration reads. Both sides use these constants, so a rename
//! reaches both. A name written but not read would leave its setting at the producer's
//! default (for `FAIL_OPEN`, not what the policy asked for) without a word, which is why a
//! test on each side also checks every name the injector writes against the names the
//! producer declares.

/// Redis host (the Redis settings are `cli::RedisArgs`, which the consumer shares).
pub const REDIS_HOST: &str = "REDIS_HOST";
pub const REDIS_PORT: &str = "REDIS_PORT";
/// The Redis ACL user.
pub const REDIS_USERNAME: &str = "REDIS_USERNAME";
/// The Redis password; the injector sets it from a Secret, never as a literal.
pub const REDIS_PASSWORD: &str = "REDIS_PASSWORD";
pub const REDIS_TLS: &str = "REDIS_TLS";
/// A PEM file with the CA of Redis's certificate.
pub const REDIS_CA_FILE: &str = "REDIS_CA_FILE";

/// ext_proc over TCP.
pub const GRPC_ADDR: &str = "GRPC_ADDR";
/// ext_proc over a Unix socket as well.
pub const GRPC_SOCKET: &str = "GRPC_SOCKET";
/// /health, /ready and /metrics.
pub const HTTP_ADDR: &str = "HTTP_ADDR";
pub const ICAP_ADDR: &str = "ICAP_ADDR";
/// Whether the ICAP listener runs at all.
pub const ICAP_ENABLED: &str = "ICAP_ENABLED";

pub const SCAN_TMP_DIR: &str = "SCAN_TMP_DIR";
pub const SCAN_FILE_THRESHOLD_MB: &str = "SCAN_FILE_THRESHOLD_MB";
/// Whether the consumers can open the files in `SCAN_TMP_DIR`.
pub const SPOOL_SHARED: &str = "SPOOL_SHARED";
pub const MAX_BODY_MB: &str = "MAX_BODY_MB";
pub const SCAN_TIMEOUT_SECONDS: &str = "SCAN_TIMEOUT_SECONDS";
pub const FAIL_OPEN: &str = "FAIL_OPEN";
pub const ALLOW_UNSCANNABLE: &str = "ALLOW_UNSCANNABLE";
pub const INFECTED_STATUS: &str = "INFECTED_STATUS";
pub const DEFAULT_PRIORITY: &str = "DEFAULT_PRIORITY";
pub const RANGE_REQUESTS: &str = "RANGE_REQUESTS";
pub const EMBEDDED_FILES: &str = "EMBEDDED_FILES";

/// The tenant (the policy's namespace) and the policy, for labels and the audit log.
pub const TENANT: &str = "TENANT";
pub const POLICY: &str = "POLICY";
