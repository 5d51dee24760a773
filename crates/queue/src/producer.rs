use std::sync::Mutex;
use std::time::{Duration, Instant};

use redis::aio::{ConnectionManager, MultiplexedConnection};
use virus_scanner_protocol::task::{
    Priority, ScanTask, TASK_FIELD, Verdict, decode_verdict, encode_task,
};

use crate::{Keys, QueueConfig, QueueError};

/// How long a looked-up signature-database version is trusted before asking Redis again.
const DB_VERSION_REFRESH: Duration = Duration::from_secs(5);

/// Enqueues tasks and waits for their verdicts.
pub struct Producer {
    client: redis::Client,
    conn: ConnectionManager,
    /// Connections for `BLPOP`, one per waiting request: a blocking command would hold up
    /// every other command on a shared multiplexed connection.
    idle_waiters: Mutex<Vec<MultiplexedConnection>>,
    max_idle_waiters: usize,
    keys: Keys,
    config: QueueConfig,
    db_version: Mutex<Option<(Option<String>, Instant)>>,
}

impl Producer {
    pub async fn connect(config: QueueConfig) -> Result<Producer, QueueError> {
        let client = config.redis.client()?;
        let conn = config.redis.connection_manager(false).await?;
        Ok(Producer {
            client,
            conn,
            idle_waiters: Mutex::new(Vec::new()),
            max_idle_waiters: 256,
            keys: Keys::new(&config.prefix),
            config,
            db_version: Mutex::new(None),
        })
    }

    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    pub async fn ping(&self) -> Result<(), QueueError> {
        let _: String = redis::cmd("PING")
            .query_async(&mut self.conn.clone())
            .await?;
        Ok(())
    }

    pub async fn enqueue(&self, task: &ScanTask) -> Result<(), QueueError> {
        let stream = self.keys.stream(task.priority());
        let _: String = redis::cmd("XADD")
            .arg(stream)
            .arg("*")
            .arg(TASK_FIELD)
            .arg(encode_task(task))
            .query_async(&mut self.conn.clone())
            .await?;
        Ok(())
    }

    /// Enqueues the task and waits for its verdict until `deadline`.
    pub async fn scan(&self, task: &ScanTask, deadline: Instant) -> Result<Verdict, QueueError> {
        self.enqueue(task).await?;
        self.wait_verdict(&task.id, deadline).await
    }

    /// Pops the task's verdict, riding out Redis restarts until the deadline.
    pub async fn wait_verdict(
        &self,
        task_id: &str,
        deadline: Instant,
    ) -> Result<Verdict, QueueError> {
        let key = self.keys.verdict(task_id);
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining < Duration::from_millis(1) {
                return Err(QueueError::DeadlineExceeded);
            }
            let mut conn = match self.take_waiter().await {
                Ok(conn) => conn,
                Err(e) => {
                    tracing::debug!(error = %e, "redis unavailable while waiting for a verdict");
                    tokio::time::sleep(remaining.min(Duration::from_millis(200))).await;
                    continue;
                }
            };
            let mut blpop = redis::cmd("BLPOP");
            blpop.arg(&key).arg(remaining.as_secs_f64().max(0.01));
            let blpop = blpop.query_async::<Option<(String, Vec<u8>)>>(&mut conn);
            // The server-side timeout ends the wait; the local one guards a hung connection.
            match tokio::time::timeout(remaining + Duration::from_secs(1), blpop).await {
                Ok(Ok(Some((_, bytes)))) => {
                    self.put_waiter(conn);
                    return decode_verdict(&bytes)
                        .map_err(|e| QueueError::BadVerdict(e.to_string()));
                }
                Ok(Ok(None)) => {
                    self.put_waiter(conn);
                    return Err(QueueError::DeadlineExceeded);
                }
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "verdict wait interrupted; retrying");
                    tokio::time::sleep(remaining.min(Duration::from_millis(100))).await;
                }
                Err(_) => return Err(QueueError::DeadlineExceeded),
            }
        }
    }

    async fn take_waiter(&self) -> Result<MultiplexedConnection, QueueError> {
        if let Some(conn) = self
            .idle_waiters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop()
        {
            return Ok(conn);
        }
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.config.redis.connect_timeout))
            .set_response_timeout(None);
        Ok(self
            .client
            .get_multiplexed_async_connection_with_config(&config)
            .await?)
    }

    fn put_waiter(&self, conn: MultiplexedConnection) {
        let mut idle = self.idle_waiters.lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() < self.max_idle_waiters {
            idle.push(conn);
        }
    }

    /// The signature-database version the consumers currently scan with, if they know one.
    pub async fn db_version(&self) -> Result<Option<String>, QueueError> {
        if let Some((version, at)) = &*self.db_version.lock().unwrap_or_else(|e| e.into_inner())
            && at.elapsed() < DB_VERSION_REFRESH
        {
            return Ok(version.clone());
        }
        let version: Option<String> = redis::cmd("GET")
            .arg(&self.keys.db_version)
            .query_async(&mut self.conn.clone())
            .await?;
        *self.db_version.lock().unwrap_or_else(|e| e.into_inner()) =
            Some((version.clone(), Instant::now()));
        Ok(version)
    }

    /// A verdict the consumers already reached for the same bytes and the current database.
    pub async fn cached_verdict(&self, sha256: &[u8]) -> Result<Option<Verdict>, QueueError> {
        let Some(db_version) = self.db_version().await? else {
            return Ok(None);
        };
        let bytes: Option<Vec<u8>> = redis::cmd("GET")
            .arg(self.keys.cache(&db_version, sha256))
            .query_async(&mut self.conn.clone())
            .await?;
        Ok(bytes.and_then(|b| decode_verdict(&b).ok()).map(|mut v| {
            v.cached = true;
            v
        }))
    }

    /// Entries in the high and normal streams (waiting or being scanned).
    pub async fn depth(&self) -> Result<(u64, u64), QueueError> {
        let mut conn = self.conn.clone();
        let high: u64 = redis::cmd("XLEN")
            .arg(self.keys.stream(Priority::High))
            .query_async(&mut conn)
            .await?;
        let normal: u64 = redis::cmd("XLEN")
            .arg(self.keys.stream(Priority::Normal))
            .query_async(&mut conn)
            .await?;
        Ok((high, normal))
    }
}
