use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use virus_scanner_clamd::ClamdAddress;
use virus_scanner_queue::QueueConfig;
use virus_scanner_runtime::LogFormat;
use virus_scanner_runtime::cli::RedisArgs;
use virus_scanner_runtime::env::ConfigErrors;

/// The consumer: claims scan tasks from Redis, scans them with clamd and writes verdicts.
///
/// Every flag can also be set through the environment variable named in its help.
#[derive(Debug, Clone, Parser)]
#[command(name = "virus-scanner-handler", version)]
pub struct ConsumerArgs {
    #[command(flatten)]
    pub redis: RedisArgs,
    /// clamd address: host:port, tcp://host:port or unix:///path.
    #[arg(long, env = "CLAMD_ADDRESS", default_value = "127.0.0.1:3310")]
    pub clamd_address: String,
    /// clamd's Unix socket when it runs beside the consumer (same pod or host): scans pass
    /// the body's file descriptor (FILDES) instead of streaming it; while the socket is
    /// absent they stream to CLAMD_ADDRESS. A unix:// CLAMD_ADDRESS is used this way too.
    #[arg(long, env = "CLAMD_SOCKET")]
    pub clamd_socket: Option<PathBuf>,
    /// Scans run at the same time (each holds one task and one clamd session).
    #[arg(long, env = "SCAN_CONCURRENCY", default_value_t = 4)]
    pub concurrency: usize,
    /// Shared directory of spilled bodies; PATH tasks are read only inside it.
    #[arg(long, env = "SCAN_TMP_DIR", default_value = "/tmp/virusscan")]
    pub scan_tmp_dir: PathBuf,
    /// Largest body handed to clamd, in MiB. Keep it at or below clamd's MaxFileSize and
    /// StreamMaxLength: larger bodies get an `unscannable` verdict instead of clamd's OK.
    #[arg(long, env = "MAX_SCAN_SIZE_MB", default_value_t = 100)]
    pub max_scan_size_mb: u64,
    /// Longest clamd scan, in seconds.
    #[arg(long, env = "SCAN_TIMEOUT_SECONDS", default_value_t = 60)]
    pub scan_timeout_seconds: u64,
    /// A task held this long by a consumer that stopped heart-beating is redelivered.
    #[arg(long, env = "VISIBILITY_TIMEOUT_SECONDS", default_value_t = 30)]
    pub visibility_timeout_seconds: u64,
    /// Deliveries after which a task gets an error verdict instead of another scan.
    #[arg(long, env = "MAX_DELIVERIES", default_value_t = 3)]
    pub max_deliveries: u32,
    /// Consumers that stopped without leaving the Redis group (killed, evicted) and hold no
    /// tasks are removed from it after this many seconds unseen.
    #[arg(long, env = "CONSUMER_RETENTION_SECONDS", default_value_t = 3600)]
    pub consumer_retention_seconds: u64,
    /// How long a verdict is reused for the same bytes and database version; 0 disables
    /// the cache.
    #[arg(long, env = "CACHE_TTL_SECONDS", default_value_t = 86400)]
    pub cache_ttl_seconds: u64,
    /// The seed's task list (`taskID|MODE|TIMESTAMP|CONTENT`); empty disables it.
    #[arg(long, env = "LEGACY_QUEUE", default_value = "scan_queue")]
    pub legacy_queue: String,
    /// Legacy verdicts are pushed to the list `<prefix><taskID>`.
    #[arg(long, env = "LEGACY_RESULT_PREFIX", default_value = "scan_result:")]
    pub legacy_result_prefix: String,
    /// Address of /health, /ready and /metrics.
    #[arg(long, env = "METRICS_ADDR", default_value = "0.0.0.0:9090")]
    pub metrics_addr: SocketAddr,
    /// Name of this consumer in the Redis group (default: hostname-pid).
    #[arg(long, env = "CONSUMER_NAME")]
    pub consumer_name: Option<String>,
    /// Log format: json or text.
    #[arg(long, env = "LOG_FORMAT", default_value = "json")]
    pub log_format: LogFormat,
}

/// Validated configuration.
#[derive(Debug, Clone)]
pub struct ConsumerConfig {
    pub queue: QueueConfig,
    pub clamd: ClamdAddress,
    pub clamd_socket: Option<PathBuf>,
    pub concurrency: usize,
    pub scan_tmp_dir: PathBuf,
    pub max_scan_bytes: u64,
    pub scan_timeout: Duration,
    pub cache_enabled: bool,
    pub legacy_enabled: bool,
    pub metrics_addr: SocketAddr,
    pub consumer_name: String,
    pub log_format: LogFormat,
}

impl ConsumerArgs {
    /// The typed configuration, or every setting that is not valid.
    pub fn validate(self) -> Result<ConsumerConfig, ConfigErrors> {
        let mut errors = ConfigErrors::new();
        let clamd = errors.check(
            self.clamd_address
                .parse::<ClamdAddress>()
                .map_err(|e| format!("CLAMD_ADDRESS: {e}")),
        );
        if self.clamd_socket.as_ref().is_some_and(|p| !p.is_absolute()) {
            errors.push("CLAMD_SOCKET must be an absolute path");
        }
        if self.concurrency == 0 || self.concurrency > 256 {
            errors.push("SCAN_CONCURRENCY must be between 1 and 256");
        }
        if self.max_scan_size_mb == 0 {
            errors.push("MAX_SCAN_SIZE_MB must be positive");
        }
        if self.scan_timeout_seconds == 0 {
            errors.push("SCAN_TIMEOUT_SECONDS must be positive");
        }
        if self.visibility_timeout_seconds == 0 {
            errors.push("VISIBILITY_TIMEOUT_SECONDS must be positive");
        }
        if self.max_deliveries == 0 {
            errors.push("MAX_DELIVERIES must be at least 1");
        }
        if self.consumer_retention_seconds == 0 {
            errors.push("CONSUMER_RETENTION_SECONDS must be positive");
        }
        let queue = errors.check(self.redis.to_queue_config());
        let (Some(clamd), Some(mut queue)) = (clamd, queue) else {
            return Err(errors);
        };
        errors.into_result()?;
        queue.visibility_timeout = Duration::from_secs(self.visibility_timeout_seconds);
        queue.max_deliveries = self.max_deliveries;
        queue.consumer_retention = Duration::from_secs(self.consumer_retention_seconds);
        queue.cache_ttl = Duration::from_secs(self.cache_ttl_seconds.max(1));
        queue.legacy_queue = self.legacy_queue.clone();
        queue.legacy_result_prefix = self.legacy_result_prefix;
        let consumer_name = self.consumer_name.unwrap_or_else(|| {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_owned())
                .unwrap_or_else(|_| "consumer".into());
            format!("{host}-{}", std::process::id())
        });
        Ok(ConsumerConfig {
            queue,
            clamd,
            clamd_socket: self.clamd_socket,
            concurrency: self.concurrency,
            scan_tmp_dir: self.scan_tmp_dir,
            max_scan_bytes: self.max_scan_size_mb * 1024 * 1024,
            scan_timeout: Duration::from_secs(self.scan_timeout_seconds),
            cache_enabled: self.cache_ttl_seconds > 0,
            legacy_enabled: !self.legacy_queue.is_empty(),
            metrics_addr: self.metrics_addr,
            consumer_name,
            log_format: self.log_format,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Flags and a map for the environment: the test process's own is never read.
    fn config(argv: &[&str], env: &[(&str, &str)]) -> Result<ConsumerConfig, String> {
        let argv = std::iter::once("virus-scanner-handler").chain(argv.iter().copied());
        virus_scanner_runtime::env::parse_from::<ConsumerArgs, _, _>(argv, env)
            .map_err(|e| e.to_string())?
            .validate()
            .map_err(|e| e.to_string())
    }

    fn args(extra: &[&str]) -> Result<ConsumerConfig, String> {
        config(extra, &[])
    }

    #[test]
    fn seed_flag_and_defaults() {
        let c = args(&["--redis-host", "redis"]).unwrap();
        assert_eq!(c.queue.redis.url, "redis://redis:6379/");
        assert_eq!(c.scan_tmp_dir, PathBuf::from("/tmp/virusscan"));
        assert_eq!(c.max_scan_bytes, 100 << 20);
        assert!(c.cache_enabled && c.legacy_enabled);
    }

    #[test]
    fn tls_and_url() {
        let c = args(&["--redis-host", "r", "--redis-tls"]).unwrap();
        assert_eq!(c.queue.redis.url, "rediss://r:6379/");
        let c = args(&["--redis-url", "rediss://x:1/2"]).unwrap();
        assert_eq!(c.queue.redis.url, "rediss://x:1/2");
    }

    #[test]
    fn bad_settings_name_the_setting() {
        for (argv, name) in [
            (vec!["--clamd-address", "nope"], "CLAMD_ADDRESS"),
            (vec!["--concurrency", "0"], "SCAN_CONCURRENCY"),
            (vec!["--redis-url", "http://x"], "REDIS_URL"),
            (vec!["--queue-prefix", "{a}"], "QUEUE_PREFIX"),
            (vec!["--max-deliveries", "0"], "MAX_DELIVERIES"),
            (vec!["--redis-ca-file", "/nonexistent.pem"], "REDIS_CA_FILE"),
        ] {
            let err = args(&argv).unwrap_err();
            assert!(err.contains(name), "{err}");
        }
    }

    #[test]
    fn settings_come_from_the_environment_and_a_flag_wins() {
        let env = [
            ("REDIS_HOST", "redis"),
            ("REDIS_TLS", "true"),
            ("CLAMD_ADDRESS", "unix:///run/clamd.sock"),
            ("SCAN_CONCURRENCY", "8"),
            ("CACHE_TTL_SECONDS", "0"),
            ("CONSUMER_NAME", "c-1"),
        ];
        let c = config(&[], &env).unwrap();
        assert_eq!(c.queue.redis.url, "rediss://redis:6379/");
        assert_eq!((c.concurrency, c.consumer_name.as_str()), (8, "c-1"));
        assert!(!c.cache_enabled);
        let c = config(&["--concurrency", "2", "--redis-host", "r"], &env).unwrap();
        assert_eq!(c.concurrency, 2);
        assert_eq!(c.queue.redis.url, "rediss://r:6379/");
    }

    #[test]
    fn a_value_from_the_environment_that_does_not_parse_is_named() {
        let err = config(&[], &[("SCAN_CONCURRENCY", "many"), ("REDIS_PORT", "-1")]).unwrap_err();
        assert!(
            err.contains("SCAN_CONCURRENCY") && err.contains("REDIS_PORT"),
            "{err}"
        );
    }

    #[test]
    fn every_invalid_setting_is_reported_at_once() {
        let err = config(
            &["--clamd-address", "nope", "--max-deliveries", "0"],
            &[
                ("SCAN_CONCURRENCY", "0"),
                ("SCAN_TIMEOUT_SECONDS", "0"),
                ("QUEUE_PREFIX", "{a}"),
            ],
        )
        .unwrap_err();
        let lines: Vec<&str> = err.lines().collect();
        let names = [
            "CLAMD_ADDRESS",
            "MAX_DELIVERIES",
            "SCAN_CONCURRENCY",
            "SCAN_TIMEOUT_SECONDS",
            "QUEUE_PREFIX",
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
