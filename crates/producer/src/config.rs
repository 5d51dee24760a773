use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use virus_scanner_protocol::task::Priority;
use virus_scanner_queue::QueueConfig;
use virus_scanner_runtime::LogFormat;
use virus_scanner_runtime::cli::RedisArgs;
use virus_scanner_runtime::env::ConfigErrors;
use virus_scanner_runtime::sidecar_env;

/// The gateway sidecar: Envoy ext_proc (and ICAP) in front of the scan queue.
///
/// Every flag can also be set through the environment variable named in its help.
#[derive(Debug, Clone, Parser)]
#[command(name = "virus-scanner-producer", version)]
pub struct ProducerArgs {
    #[command(flatten)]
    pub redis: RedisArgs,
    /// ext_proc gRPC listen address.
    #[arg(long, env = sidecar_env::GRPC_ADDR, default_value = "0.0.0.0:50051")]
    pub grpc_addr: SocketAddr,
    /// Also serve ext_proc on this Unix socket (for gateways that refuse loopback backends).
    #[arg(long, env = sidecar_env::GRPC_SOCKET)]
    pub grpc_socket: Option<PathBuf>,
    /// /health, /ready and /metrics listen address.
    #[arg(long, env = sidecar_env::HTTP_ADDR, default_value = "0.0.0.0:8080")]
    pub http_addr: SocketAddr,
    /// Shared directory for bodies above the threshold (the consumers read them there).
    #[arg(long, env = sidecar_env::SCAN_TMP_DIR, default_value = "/tmp/virusscan")]
    pub scan_tmp_dir: PathBuf,
    /// Bodies above this many MiB are spilled to SCAN_TMP_DIR and queued by path.
    #[arg(long, env = sidecar_env::SCAN_FILE_THRESHOLD_MB, default_value_t = 10)]
    pub scan_file_threshold_mb: u64,
    /// Whether the consumers can open files in SCAN_TMP_DIR (a shared volume). When false,
    /// spilled bodies are sent through Redis in chunks instead of by path.
    #[arg(
        long,
        env = sidecar_env::SPOOL_SHARED,
        default_value_t = true,
        action = clap::ArgAction::Set,
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub spool_shared: bool,
    /// Largest body accepted for scanning, in MiB; larger ones are `unscannable`.
    #[arg(long, env = sidecar_env::MAX_BODY_MB, default_value_t = 100)]
    pub max_body_mb: u64,
    /// Largest decoded size of a Content-Encoding'd body, in MiB (decompression bombs).
    #[arg(long, env = "MAX_DECODED_MB", default_value_t = 200)]
    pub max_decoded_mb: u64,
    /// Time from a complete body to its verdict, in seconds.
    #[arg(long, env = sidecar_env::SCAN_TIMEOUT_SECONDS, default_value_t = 30)]
    pub scan_timeout_seconds: u64,
    /// Let bodies through when the scan fails or times out (never for infected bodies).
    #[arg(long, env = sidecar_env::FAIL_OPEN, default_value_t = false)]
    pub fail_open: bool,
    /// Let bodies through that could not be scanned completely (too large, encrypted).
    #[arg(long, env = sidecar_env::ALLOW_UNSCANNABLE, default_value_t = false)]
    pub allow_unscannable: bool,
    /// HTTP status for an infected body.
    #[arg(long, env = sidecar_env::INFECTED_STATUS, default_value_t = 406)]
    pub infected_status: u16,
    /// HTTP status when the scan failed or timed out.
    #[arg(long, env = "ERROR_STATUS", default_value_t = 503)]
    pub error_status: u16,
    /// HTTP status for a body that could not be scanned completely.
    #[arg(long, env = "UNSCANNABLE_STATUS", default_value_t = 413)]
    pub unscannable_status: u16,
    /// Request header whose value `high` puts the scan in the high-priority queue.
    #[arg(long, env = "PRIORITY_HEADER", default_value = "x-priority")]
    pub priority_header: String,
    /// Queue for requests without the priority header: normal or high.
    #[arg(long, env = sidecar_env::DEFAULT_PRIORITY, default_value = "normal")]
    pub default_priority: String,
    /// The tenant: names this producer's streams and verdict lists in Redis (its Redis user
    /// may touch only those), and labels metrics and the audit log. Empty: `default`.
    #[arg(long, env = sidecar_env::TENANT, default_value = "")]
    pub tenant: String,
    /// Policy label for the audit log.
    #[arg(long, env = sidecar_env::POLICY, default_value = "")]
    pub policy: String,
    /// Log format: json or text.
    #[arg(long, env = "LOG_FORMAT", default_value = "json")]
    pub log_format: LogFormat,
    /// ICAP (RFC 3507) address.
    #[arg(long, env = sidecar_env::ICAP_ADDR, default_value = "0.0.0.0:1344")]
    pub icap_addr: SocketAddr,
    /// Serve ICAP at all (a gateway sidecar speaks ext_proc only, unless its policy asks).
    #[arg(long, env = sidecar_env::ICAP_ENABLED, default_value_t = true, action = clap::ArgAction::Set)]
    pub icap_enabled: bool,
    /// The ICAP service path that answers REQMOD and RESPMOD.
    #[arg(long, env = "ICAP_SERVICE", default_value = "/avscan")]
    pub icap_service: String,
    /// Concurrent ICAP connections (announced as Max-Connections; more are refused).
    #[arg(long, env = "ICAP_MAX_CONNECTIONS", default_value_t = 1024)]
    pub icap_max_connections: usize,
    /// Preview size announced in OPTIONS.
    #[arg(long, env = "ICAP_PREVIEW_BYTES", default_value_t = 1024)]
    pub icap_preview_bytes: u64,
    /// Options-TTL announced in OPTIONS.
    #[arg(long, env = "ICAP_OPTIONS_TTL_SECONDS", default_value_t = 300)]
    pub icap_options_ttl_seconds: u64,
    /// How long an idle persistent ICAP connection is kept.
    #[arg(long, env = "ICAP_IDLE_TIMEOUT_SECONDS", default_value_t = 60)]
    pub icap_idle_timeout_seconds: u64,
    /// How long one read inside an ICAP request may take.
    #[arg(long, env = "ICAP_READ_TIMEOUT_SECONDS", default_value_t = 30)]
    pub icap_read_timeout_seconds: u64,
    /// HTTP status of the ICAP block page for an infected body.
    #[arg(long, env = "ICAP_BLOCK_STATUS", default_value_t = 403)]
    pub icap_block_status: u16,
    /// Recent verdicts kept in process (per signature-database version) so that the same
    /// bytes seen again skip Redis; 0 turns the memo off.
    #[arg(long, env = "VERDICT_MEMO_ENTRIES", default_value_t = 4096)]
    pub verdict_memo_entries: usize,
    /// How long a verdict stays in the in-process memo, in seconds; 0 turns it off.
    #[arg(long, env = "VERDICT_MEMO_SECONDS", default_value_t = 60)]
    pub verdict_memo_seconds: u64,
    /// What to do with `Range`/`If-Range` on scanned routes: `strip` (the upstream then
    /// sends the whole representation, which is scanned), `refuse` (416) or `allow` (a 206
    /// that does not cover the whole representation is refused when it reaches a scan).
    #[arg(long, env = sidecar_env::RANGE_REQUESTS, default_value = "strip")]
    pub range_requests: String,
    /// Decode files sent as base64 inside JSON string values and scan them as files.
    #[arg(long, env = sidecar_env::EMBEDDED_FILES, default_value_t = true, action = clap::ArgAction::Set)]
    pub embedded_files: bool,
    /// Threads that serve the streams. One is the cheapest per request for a sidecar;
    /// decoding, splitting and storing large bodies run off that thread either way.
    #[arg(long, env = "WORKER_THREADS", default_value_t = 1)]
    pub worker_threads: usize,
}

/// Settings of the ICAP front end.
#[derive(Debug, Clone)]
pub struct IcapConfig {
    pub service_path: String,
    pub max_connections: usize,
    pub preview: u64,
    pub options_ttl: Duration,
    /// How long a persistent connection may wait for its next request.
    pub idle_timeout: Duration,
    /// How long one read inside a request may take (slowloris).
    pub read_timeout: Duration,
    /// HTTP status of the block page for an infected body.
    pub block_status: u16,
}

/// Validated configuration.
#[derive(Debug, Clone)]
pub struct ProducerConfig {
    pub queue: QueueConfig,
    pub grpc_addr: SocketAddr,
    pub grpc_socket: Option<PathBuf>,
    pub http_addr: SocketAddr,
    pub scan_tmp_dir: PathBuf,
    pub spill_threshold: usize,
    pub max_body: u64,
    /// What the scan core uses.
    pub scan: ScanPolicy,
    pub log_format: LogFormat,
    /// `None`: no ICAP listener.
    pub icap_addr: Option<SocketAddr>,
    pub icap: IcapConfig,
    pub verdict_memo_entries: usize,
    pub verdict_memo_ttl: Duration,
    pub worker_threads: usize,
}

/// The scan policy: how each verdict is answered, how long a scan may take, how bodies are
/// unpacked and queued, and the labels of the tasks. The scan core gets this and nothing
/// of the listeners or the ICAP settings.
#[derive(Debug, Clone)]
pub struct ScanPolicy {
    pub scan_timeout: Duration,
    pub fail_open: bool,
    pub allow_unscannable: bool,
    pub infected_status: u16,
    pub error_status: u16,
    pub unscannable_status: u16,
    /// The request header whose value `high` or `normal` picks the queue, in lower case.
    pub priority_header: String,
    pub default_priority: Priority,
    pub range_requests: RangeRequests,
    /// Cap on the bytes decoded from one body (`MAX_DECODED_MB`).
    pub max_decoded: u64,
    pub embedded_files: bool,
    /// Spilled bodies are queued by path (the consumers share SCAN_TMP_DIR), else sent
    /// through Redis in chunks.
    pub spool_shared: bool,
    pub tenant: String,
    pub policy: String,
}

/// What the producer does with a request for part of a representation. A file fetched in
/// pieces is never whole in one scan, so no piece may pass as if it had been scanned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RangeRequests {
    /// `Range` and `If-Range` are removed from requests: the upstream answers with the whole
    /// representation, which is scanned.
    #[default]
    Strip,
    /// A request with `Range` is answered 416.
    Refuse,
    /// Passed on; a 206 that is not the whole representation is refused at its scan.
    Allow,
}

impl std::str::FromStr for RangeRequests {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "strip" => Ok(RangeRequests::Strip),
            "refuse" => Ok(RangeRequests::Refuse),
            "allow" => Ok(RangeRequests::Allow),
            other => Err(format!(
                "RANGE_REQUESTS must be strip, refuse or allow, got {other:?}"
            )),
        }
    }
}

impl ScanPolicy {
    /// The queue a request goes to: the priority header's value (`high` or `normal`), else
    /// the default. One rule for ext_proc and ICAP.
    pub fn priority(&self, header_value: Option<&str>) -> Priority {
        match header_value.map(str::trim) {
            Some(v) if v.eq_ignore_ascii_case("high") => Priority::High,
            Some(v) if v.eq_ignore_ascii_case("normal") => Priority::Normal,
            _ => self.default_priority,
        }
    }
}

fn http_status(name: &str, code: u16) -> Result<u16, String> {
    if (400..=599).contains(&code) {
        Ok(code)
    } else {
        Err(format!(
            "{name} must be an HTTP status between 400 and 599, got {code}"
        ))
    }
}

impl ProducerArgs {
    /// The typed configuration, or every setting that is not valid.
    pub fn validate(mut self) -> Result<ProducerConfig, ConfigErrors> {
        let mut errors = ConfigErrors::new();
        if self.scan_file_threshold_mb == 0 {
            errors.push("SCAN_FILE_THRESHOLD_MB must be positive");
        }
        if self.worker_threads == 0 || self.worker_threads > 256 {
            errors.push("WORKER_THREADS must be between 1 and 256");
        }
        if self.max_body_mb == 0 || self.max_body_mb > 64 * 1024 {
            errors.push("MAX_BODY_MB must be between 1 and 65536");
        }
        if self.scan_file_threshold_mb > 64 {
            // Smaller bodies travel inside the task, and the queue takes none larger.
            errors.push("SCAN_FILE_THRESHOLD_MB must be at most 64");
        }
        if self.scan_file_threshold_mb > self.max_body_mb {
            errors.push("SCAN_FILE_THRESHOLD_MB must not exceed MAX_BODY_MB");
        }
        if self.max_decoded_mb == 0 {
            errors.push("MAX_DECODED_MB must be positive");
        }
        // The tenant names this producer's Redis keys (its streams, verdict lists, bodies sent
        // through Redis), where its per-tenant ACL user can match them. No limit on
        // MAX_BODY_MB: a body is stored in chunks far below Redis's proto-max-bulk-len, in one
        // hash, which has no size limit of its own.
        if self.tenant.is_empty() {
            self.tenant = virus_scanner_queue::DEFAULT_TENANT.to_owned();
        }
        if virus_scanner_protocol::task::validate_tenant_key(&self.tenant).is_err() {
            errors.push(format!(
                "TENANT must be at most {} characters of [A-Za-z0-9._-] (it names the \
                 producer's Redis keys), got {:?}",
                virus_scanner_protocol::task::MAX_TENANT_KEY_LEN,
                self.tenant
            ));
        }
        if self.scan_timeout_seconds == 0 {
            errors.push("SCAN_TIMEOUT_SECONDS must be positive");
        }
        if self.priority_header.is_empty() {
            errors.push("PRIORITY_HEADER must not be empty");
        }
        let default_priority =
            errors.check(match self.default_priority.to_ascii_lowercase().as_str() {
                "normal" => Ok(Priority::Normal),
                "high" => Ok(Priority::High),
                other => Err(format!(
                    "DEFAULT_PRIORITY must be normal or high, got {other:?}"
                )),
            });
        if !self.icap_service.starts_with('/') {
            errors.push(format!(
                "ICAP_SERVICE must be a path starting with '/', got {:?}",
                self.icap_service
            ));
        }
        if self.icap_max_connections == 0 {
            errors.push("ICAP_MAX_CONNECTIONS must be positive");
        }
        if self.icap_idle_timeout_seconds == 0 {
            errors.push("ICAP_IDLE_TIMEOUT_SECONDS must be positive");
        }
        if self.icap_read_timeout_seconds == 0 {
            errors.push("ICAP_READ_TIMEOUT_SECONDS must be positive");
        }
        let block_status = errors.check(http_status("ICAP_BLOCK_STATUS", self.icap_block_status));
        let infected_status = errors.check(http_status("INFECTED_STATUS", self.infected_status));
        let error_status = errors.check(http_status("ERROR_STATUS", self.error_status));
        let unscannable_status =
            errors.check(http_status("UNSCANNABLE_STATUS", self.unscannable_status));
        let range_requests = errors.check(self.range_requests.parse::<RangeRequests>());
        let queue = errors.check(self.redis.to_queue_config()).map(|mut q| {
            q.tenant = self.tenant.clone();
            q
        });
        let (
            Some(default_priority),
            Some(block_status),
            Some(infected_status),
            Some(error_status),
            Some(unscannable_status),
            Some(range_requests),
            Some(queue),
        ) = (
            default_priority,
            block_status,
            infected_status,
            error_status,
            unscannable_status,
            range_requests,
            queue,
        )
        else {
            return Err(errors);
        };
        errors.into_result()?;
        let icap = IcapConfig {
            service_path: self.icap_service.clone(),
            max_connections: self.icap_max_connections,
            preview: self.icap_preview_bytes,
            options_ttl: Duration::from_secs(self.icap_options_ttl_seconds),
            idle_timeout: Duration::from_secs(self.icap_idle_timeout_seconds),
            read_timeout: Duration::from_secs(self.icap_read_timeout_seconds),
            block_status,
        };
        Ok(ProducerConfig {
            queue,
            grpc_addr: self.grpc_addr,
            grpc_socket: self.grpc_socket,
            http_addr: self.http_addr,
            scan_tmp_dir: self.scan_tmp_dir,
            spill_threshold: (self.scan_file_threshold_mb * 1024 * 1024) as usize,
            max_body: self.max_body_mb * 1024 * 1024,
            scan: ScanPolicy {
                scan_timeout: Duration::from_secs(self.scan_timeout_seconds),
                fail_open: self.fail_open,
                allow_unscannable: self.allow_unscannable,
                infected_status,
                error_status,
                unscannable_status,
                priority_header: self.priority_header.to_ascii_lowercase(),
                default_priority,
                range_requests,
                max_decoded: self.max_decoded_mb * 1024 * 1024,
                embedded_files: self.embedded_files,
                spool_shared: self.spool_shared,
                tenant: self.tenant,
                policy: self.policy,
            },
            log_format: self.log_format,
            icap_addr: self.icap_enabled.then_some(self.icap_addr),
            icap,
            verdict_memo_entries: self.verdict_memo_entries,
            verdict_memo_ttl: Duration::from_secs(self.verdict_memo_seconds),
            worker_threads: self.worker_threads,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Flags and a map for the environment: the test process's own is never read.
    fn config(argv: &[&str], env: &[(&str, &str)]) -> Result<ProducerConfig, String> {
        let argv = std::iter::once("virus-scanner-producer").chain(argv.iter().copied());
        virus_scanner_runtime::env::parse_from::<ProducerArgs, _, _>(argv, env)
            .map_err(|e| e.to_string())?
            .validate()
            .map_err(|e| e.to_string())
    }

    fn args(extra: &[&str]) -> Result<ProducerConfig, String> {
        config(extra, &[])
    }

    #[test]
    fn seed_defaults() {
        let c = args(&[]).unwrap();
        assert_eq!(c.queue.redis.url, "redis://localhost:6379/");
        assert_eq!(c.spill_threshold, 10 << 20);
        assert_eq!(c.scan_tmp_dir, PathBuf::from("/tmp/virusscan"));
        assert_eq!((c.scan.infected_status, c.scan.error_status), (406, 503));
        assert!(!c.scan.fail_open);
        assert_eq!(c.worker_threads, 1);
        assert!(c.scan.spool_shared);
        assert_eq!(c.scan.range_requests, RangeRequests::Strip);
        assert!(c.scan.embedded_files);
    }

    #[test]
    fn an_unshared_spool_takes_any_body_size_and_a_tenant_that_can_name_a_key() {
        for off in [&["--spool-shared", "false"][..], &["--spool-shared=no"][..]] {
            let c = args(&[off, &["--max-body-mb", "65536", "--tenant", "team-a.prod"]].concat())
                .unwrap();
            assert!(!c.scan.spool_shared);
            assert_eq!(c.max_body, 64 << 30);
        }
        assert!(args(&["--spool-shared", "true"]).unwrap().scan.spool_shared);
        // The tenant names the producer's Redis keys, shared spool or not.
        for shared in ["true", "false"] {
            let err = args(&["--spool-shared", shared, "--tenant", "a:b"]).unwrap_err();
            assert!(err.contains("TENANT"), "{err}");
        }
        let c = args(&["--tenant", ""]).unwrap();
        assert_eq!(c.queue.tenant, virus_scanner_queue::DEFAULT_TENANT);
        assert_eq!(
            args(&["--tenant", "team-a"]).unwrap().queue.tenant,
            "team-a"
        );
    }

    #[test]
    fn bad_settings_name_the_setting() {
        for (argv, name) in [
            (vec!["--infected-status", "700"], "INFECTED_STATUS"),
            (
                vec!["--scan-file-threshold-mb", "0"],
                "SCAN_FILE_THRESHOLD_MB",
            ),
            (
                vec!["--scan-file-threshold-mb", "200"],
                "SCAN_FILE_THRESHOLD_MB",
            ),
            (vec!["--redis-url", "tcp://x"], "REDIS_URL"),
            (vec!["--scan-timeout-seconds", "0"], "SCAN_TIMEOUT_SECONDS"),
            (vec!["--worker-threads", "0"], "WORKER_THREADS"),
            (vec!["--range-requests", "sometimes"], "RANGE_REQUESTS"),
        ] {
            let err = args(&argv).unwrap_err();
            assert!(err.contains(name), "{err}");
        }
    }

    #[test]
    fn settings_come_from_the_environment_and_a_flag_wins() {
        let env = [
            ("REDIS_HOST", "redis"),
            ("SPOOL_SHARED", "false"),
            ("TENANT", "team-a"),
            ("FAIL_OPEN", "true"),
            ("MAX_BODY_MB", "300"),
            ("INFECTED_STATUS", "403"),
            ("GRPC_ADDR", "127.0.0.1:1"),
        ];
        let c = config(&[], &env).unwrap();
        assert_eq!(c.queue.redis.url, "redis://redis:6379/");
        assert!(!c.scan.spool_shared && c.scan.fail_open);
        assert_eq!((c.max_body, c.scan.infected_status), (300 << 20, 403));
        assert_eq!(c.grpc_addr.to_string(), "127.0.0.1:1");
        let c = config(&["--max-body-mb", "50", "--spool-shared", "true"], &env).unwrap();
        assert_eq!(c.max_body, 50 << 20);
        assert!(c.scan.spool_shared);
    }

    #[test]
    fn a_value_from_the_environment_that_does_not_parse_is_named() {
        let err = config(&[], &[("GRPC_ADDR", "nowhere"), ("FAIL_OPEN", "yes")]).unwrap_err();
        assert!(
            err.contains("GRPC_ADDR") && err.contains("FAIL_OPEN"),
            "{err}"
        );
    }

    #[test]
    fn every_invalid_setting_is_reported_at_once() {
        let err = config(
            &["--infected-status", "700", "--worker-threads", "0"],
            &[
                ("SCAN_TIMEOUT_SECONDS", "0"),
                ("RANGE_REQUESTS", "sometimes"),
                ("REDIS_URL", "tcp://x"),
                ("ICAP_SERVICE", "avscan"),
                ("DEFAULT_PRIORITY", "urgent"),
            ],
        )
        .unwrap_err();
        let lines: Vec<&str> = err.lines().collect();
        let names = [
            "INFECTED_STATUS",
            "WORKER_THREADS",
            "SCAN_TIMEOUT_SECONDS",
            "RANGE_REQUESTS",
            "REDIS_URL",
            "ICAP_SERVICE",
            "DEFAULT_PRIORITY",
        ];
        assert_eq!(lines.len(), names.len(), "{err}");
        for name in names {
            assert_eq!(
                lines.iter().filter(|l| l.contains(name)).count(),
                1,
                "{name}: {err}"
            );
        }
    }
}
