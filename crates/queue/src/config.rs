use std::path::PathBuf;
use std::time::Duration;

use crate::QueueError;

/// How to reach Redis.
#[derive(Debug, Clone)]
pub struct RedisConfig {
    /// `redis://host:port/db` or `rediss://host:port/db` (TLS).
    pub url: String,
    /// The ACL user (a tenant's, the consumers'); overrides a user in the URL.
    pub username: Option<String>,
    /// Overrides a password in the URL; kept out of the URL so that it can come from a secret.
    pub password: Option<String>,
    /// PEM file with the CA that signed the server's certificate (TLS), instead of the
    /// system's trust store.
    pub ca_file: Option<PathBuf>,
    /// The same CA as PEM bytes, for a caller that holds it in memory; wins over `ca_file`.
    pub ca_pem: Option<Vec<u8>>,
    pub connect_timeout: Duration,
    /// Longest wait for a reply to a non-blocking command.
    pub response_timeout: Duration,
}

impl RedisConfig {
    pub fn from_host_port(host: &str, port: u16, tls: bool) -> RedisConfig {
        let scheme = if tls { "rediss" } else { "redis" };
        let host = if host.contains(':') && !host.starts_with('[') {
            format!("[{host}]")
        } else {
            host.to_owned()
        };
        RedisConfig {
            url: format!("{scheme}://{host}:{port}/"),
            username: None,
            password: None,
            ca_file: None,
            ca_pem: None,
            connect_timeout: Duration::from_secs(3),
            response_timeout: Duration::from_secs(5),
        }
    }

    /// A reconnecting connection. `blocking` leaves room in the reply timeout for commands
    /// that wait on the server (`XREADGROUP BLOCK`, `BLMOVE`) for up to 5 seconds.
    pub(crate) async fn connection_manager(
        &self,
        blocking: bool,
    ) -> Result<redis::aio::ConnectionManager, QueueError> {
        let extra = if blocking {
            Duration::from_secs(5)
        } else {
            Duration::ZERO
        };
        let manager_config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.connect_timeout))
            .set_response_timeout(Some(self.response_timeout + extra))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_secs(1));
        Ok(self
            .client()?
            .get_connection_manager_with_config(manager_config)
            .await?)
    }

    pub fn client(&self) -> Result<redis::Client, QueueError> {
        use redis::IntoConnectionInfo;
        let mut info = self
            .url
            .as_str()
            .into_connection_info()
            .map_err(|e| QueueError::Config(format!("invalid Redis URL: {e}")))?;
        // Verdict waits are latency-bound: no Nagle delay on small commands.
        info = info.set_tcp_settings(redis::io::tcp::TcpSettings::default().set_nodelay(true));
        // No `CLIENT SETINFO` after connecting: a tenant's ACL user may not run it.
        let settings = info.redis_settings().clone().set_skip_set_lib_name();
        info = info.set_redis_settings(settings);
        if let Some(username) = &self.username {
            let settings = info.redis_settings().clone().set_username(username);
            info = info.set_redis_settings(settings);
        }
        if let Some(password) = &self.password {
            let settings = info.redis_settings().clone().set_password(password);
            info = info.set_redis_settings(settings);
        }
        let root_cert = match (&self.ca_pem, &self.ca_file) {
            (Some(pem), _) => Some(pem.clone()),
            (None, Some(path)) => Some(std::fs::read(path).map_err(|e| {
                QueueError::Config(format!("cannot read Redis CA file {}: {e}", path.display()))
            })?),
            (None, None) => None,
        };
        match root_cert {
            None => Ok(redis::Client::open(info)?),
            Some(root_cert) => Ok(redis::Client::build_with_tls(
                info,
                redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(root_cert),
                },
            )?),
        }
    }
}

/// Queue behaviour shared by producers and consumers.
#[derive(Debug, Clone)]
pub struct QueueConfig {
    pub redis: RedisConfig,
    /// Hash tag and prefix of every key.
    pub prefix: String,
    /// The tenant a producer queues for: the streams, verdict lists and stored bodies it uses
    /// carry it, and a per-tenant Redis user may touch only those. Consumers read every
    /// tenant's streams and ignore it.
    pub tenant: String,
    pub group: String,
    /// A task held this long by a consumer that stopped heart-beating is redelivered.
    pub visibility_timeout: Duration,
    /// After this many deliveries a task is answered with an error verdict (poison).
    pub max_deliveries: u32,
    /// A consumer that holds no entries and has not been seen for this long (it stopped
    /// without leaving the group: killed, evicted) is removed from the group.
    pub consumer_retention: Duration,
    /// How long a verdict waits for its producer.
    pub verdict_ttl: Duration,
    /// How long a cached verdict is reused (within one signature-database version).
    pub cache_ttl: Duration,
    /// The seed's task list (`taskID|MODE|TIMESTAMP|CONTENT`).
    pub legacy_queue: String,
    /// Legacy verdicts are pushed to `<prefix><taskID>`.
    pub legacy_result_prefix: String,
}

impl QueueConfig {
    pub fn new(redis: RedisConfig) -> QueueConfig {
        QueueConfig {
            redis,
            prefix: "virus-scanner".into(),
            tenant: crate::DEFAULT_TENANT.into(),
            group: "scanners".into(),
            visibility_timeout: Duration::from_secs(30),
            max_deliveries: 3,
            consumer_retention: Duration::from_secs(3600),
            verdict_ttl: Duration::from_secs(300),
            cache_ttl: Duration::from_secs(24 * 3600),
            legacy_queue: "scan_queue".into(),
            legacy_result_prefix: "scan_result:".into(),
        }
    }
}
