//! The Redis and queue flags both binaries take (feature `cli`). They live here rather than in
//! the queue crate, which has no command line of its own.

use std::path::PathBuf;

use virus_scanner_queue::{QueueConfig, RedisConfig};

use crate::sidecar_env;

/// The Redis and queue settings every binary takes, as flags and environment variables.
#[derive(Debug, Clone, clap::Args)]
pub struct RedisArgs {
    /// Redis host.
    #[arg(long, env = sidecar_env::REDIS_HOST, default_value = "localhost")]
    pub redis_host: String,
    /// Redis port.
    #[arg(long, env = sidecar_env::REDIS_PORT, default_value_t = 6379)]
    pub redis_port: u16,
    /// Full Redis URL (`redis://` or `rediss://` for TLS); overrides host and port.
    #[arg(long, env = "REDIS_URL")]
    pub redis_url: Option<String>,
    /// Redis ACL user (AUTH); without it, the default user.
    #[arg(long, env = sidecar_env::REDIS_USERNAME)]
    pub redis_username: Option<String>,
    /// Redis password (AUTH).
    #[arg(long, env = sidecar_env::REDIS_PASSWORD, hide_env_values = true)]
    pub redis_password: Option<String>,
    /// Connect to Redis with TLS.
    #[arg(long, env = sidecar_env::REDIS_TLS, default_value_t = false)]
    pub redis_tls: bool,
    /// PEM CA certificate that signed Redis's TLS certificate (default: system roots).
    #[arg(long, env = sidecar_env::REDIS_CA_FILE)]
    pub redis_ca_file: Option<PathBuf>,
    /// Prefix (and cluster hash tag) of every queue key; the same for producers and consumers.
    #[arg(long, env = "QUEUE_PREFIX", default_value = "virus-scanner")]
    pub queue_prefix: String,
}

impl RedisArgs {
    /// The queue configuration, or a message that names the setting at fault.
    pub fn to_queue_config(&self) -> Result<QueueConfig, String> {
        if self.queue_prefix.is_empty() || self.queue_prefix.contains(['{', '}']) {
            return Err("QUEUE_PREFIX must be non-empty and contain no braces".into());
        }
        let mut redis = match &self.redis_url {
            Some(url) if url.starts_with("redis://") || url.starts_with("rediss://") => {
                let mut r = RedisConfig::from_host_port("localhost", 6379, false);
                r.url = url.clone();
                r
            }
            Some(_) => return Err("REDIS_URL must start with redis:// or rediss://".into()),
            None => RedisConfig::from_host_port(&self.redis_host, self.redis_port, self.redis_tls),
        };
        redis.username = self.redis_username.clone().filter(|u| !u.is_empty());
        redis.password = self.redis_password.clone().filter(|p| !p.is_empty());
        if let Some(ca) = &self.redis_ca_file
            && !ca.is_file()
        {
            return Err(format!(
                "REDIS_CA_FILE {} is not a readable file",
                ca.display()
            ));
        }
        redis.ca_file = self.redis_ca_file.clone();
        let mut queue = QueueConfig::new(redis);
        queue.prefix = self.queue_prefix.clone();
        Ok(queue)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Flags {
        #[command(flatten)]
        redis: RedisArgs,
    }

    fn config(argv: &[&str]) -> Result<QueueConfig, String> {
        let argv = std::iter::once("test").chain(argv.iter().copied());
        Flags::try_parse_from(argv)
            .map_err(|e| e.to_string())?
            .redis
            .to_queue_config()
    }

    #[test]
    fn host_port_tls_and_url() {
        assert_eq!(
            config(&["--redis-host", "redis"]).unwrap().redis.url,
            "redis://redis:6379/"
        );
        assert_eq!(
            config(&["--redis-host", "r", "--redis-tls"])
                .unwrap()
                .redis
                .url,
            "rediss://r:6379/"
        );
        assert_eq!(
            config(&["--redis-url", "rediss://x:1/2"])
                .unwrap()
                .redis
                .url,
            "rediss://x:1/2"
        );
        let c = config(&["--redis-password", "", "--queue-prefix", "p"]).unwrap();
        assert_eq!((c.redis.password, c.prefix.as_str()), (None, "p"));
    }

    #[test]
    fn bad_settings_name_the_setting() {
        for (argv, name) in [
            (["--redis-url", "http://x"], "REDIS_URL"),
            (["--queue-prefix", "{a}"], "QUEUE_PREFIX"),
            (["--queue-prefix", ""], "QUEUE_PREFIX"),
            (["--redis-ca-file", "/nonexistent.pem"], "REDIS_CA_FILE"),
        ] {
            let err = config(&argv).unwrap_err();
            assert!(err.contains(name), "{err}");
        }
    }
}
