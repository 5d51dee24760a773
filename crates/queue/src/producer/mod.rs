//! The producer's side of the queue: submit a task and wait for its verdict ([`submit`]),
//! with the verdict cache and an in-process memo in front; bodies stored in Redis for
//! consumers that cannot open the spool; Redis reachability ([`connection`]).

mod connection;
mod submit;
#[cfg(feature = "test-util")]
mod test_util;

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redis::aio::ConnectionManager;
use virus_scanner_protocol::task::{
    MAX_TENANT_KEY_LEN, ScanTask, Verdict, decode_verdict, validate_tenant_key,
};

use crate::memo::VerdictMemo;
use crate::{Keys, QueueConfig, QueueError, StoredBody};
use connection::{Health, watch_connection};

/// How long a looked-up signature-database version is trusted before asking Redis again.
const DB_VERSION_REFRESH: Duration = Duration::from_secs(5);

/// Enqueues tasks and waits for their verdicts.
pub struct Producer {
    client: redis::Client,
    conn: ConnectionManager,
    /// Redis reachability and the idle `BLPOP` connections, shared with the connection
    /// watcher.
    health: Arc<Health>,
    max_idle_waiters: usize,
    keys: Keys,
    config: QueueConfig,
    db_version: Mutex<Option<(Option<String>, Instant)>>,
    memo: VerdictMemo,
    canary: tokio::task::AbortHandle,
}

impl Drop for Producer {
    fn drop(&mut self) {
        self.canary.abort();
    }
}

impl Producer {
    /// Connects as `config.tenant`, registers the tenant with the consumers and loads the
    /// queue's functions where its Redis user may (a tenant's user may not: the operator and
    /// the consumers did).
    pub async fn connect(config: QueueConfig) -> Result<Producer, QueueError> {
        if config.tenant.is_empty() || validate_tenant_key(&config.tenant).is_err() {
            return Err(QueueError::Config(format!(
                "the tenant must be 1 to {MAX_TENANT_KEY_LEN} characters of [A-Za-z0-9._-], \
                 got {:?}",
                config.tenant
            )));
        }
        let client = config.redis.client()?;
        let mut conn = config.redis.connection_manager(false).await?;
        let keys = Keys::new(&config.prefix);
        register_tenant(&mut conn, &keys.tenants, &config.tenant).await?;
        crate::functions::load_if_allowed(&mut conn).await?;
        let health = Arc::new(Health::default());
        let canary = tokio::spawn(watch_connection(
            client.clone(),
            config.redis.connect_timeout,
            keys.canary(&config.tenant),
            (keys.tenants.clone(), config.tenant.clone()),
            Arc::downgrade(&health),
        ));
        tokio::spawn(connection::close_idle_waiters(Arc::downgrade(&health)));
        Ok(Producer {
            client,
            conn,
            health,
            max_idle_waiters: 256,
            keys,
            config,
            db_version: Mutex::new(None),
            memo: VerdictMemo::new(0, Duration::ZERO),
            canary: canary.abort_handle(),
        })
    }

    /// Closes a verdict-wait connection after `idle` unused (10 s unless set).
    pub fn with_waiter_idle(self, idle: Duration) -> Producer {
        let ms = u64::try_from(idle.as_millis()).unwrap_or(u64::MAX).max(1);
        self.health.waiter_idle_ms.store(ms, Ordering::Relaxed);
        self
    }

    /// Verdict-wait connections open and unused now.
    pub fn idle_waiters(&self) -> usize {
        self.health
            .idle_waiters
            .lock()
            .map(|w| w.len())
            .unwrap_or(0)
    }

    /// Keeps up to `entries` recent verdicts in process for `ttl` (0 turns it off), under the
    /// consumers' current signature-database version.
    pub fn with_memo(mut self, entries: usize, ttl: Duration) -> Producer {
        self.memo = VerdictMemo::new(entries, ttl);
        self
    }

    pub async fn ping(&self) -> Result<(), QueueError> {
        let _: String = redis::cmd("PING")
            .query_async(&mut self.conn.clone())
            .await?;
        Ok(())
    }

    /// Stores the `size` bytes of the spilled file at `path` in Redis, in chunks, for this
    /// producer's task `task_id` whose consumers cannot open the file. The returned body
    /// names itself in the task ([`StoredBody::content`]) and is removed from Redis when it is
    /// dropped; its TTL removes it after the deadline otherwise.
    pub async fn store_body(
        &self,
        task_id: &str,
        path: &std::path::Path,
        size: u64,
        deadline: Instant,
    ) -> Result<StoredBody, QueueError> {
        let key = self.keys.body(&self.config.tenant, task_id);
        crate::stored_body::store(&self.conn, key, path, size, deadline).await
    }

    /// `scan` for a caller that has already asked `remembered` (and builds the task only on a
    /// miss): the verdict cache or a scan, and the memo filled from the answer.
    pub async fn submit(&self, task: &ScanTask, deadline: Instant) -> Result<Verdict, QueueError> {
        let db_version = self.db_version().await?;
        let verdict = self
            .submit_and_wait(task, db_version.as_deref(), deadline)
            .await?;
        if let Some(db) = &db_version
            && (verdict.cached || verdict.db_version == *db)
        {
            self.memo.put(db, &task.sha256, &verdict);
        }
        Ok(verdict)
    }

    /// A verdict for these bytes from the in-process memo (`cached` set), without a round trip
    /// to Redis except to refresh the database version now and then.
    pub async fn remembered(&self, sha256: &[u8]) -> Result<Option<Verdict>, QueueError> {
        let Some(db) = self.db_version().await? else {
            return Ok(None);
        };
        Ok(self.memo.get(&db, sha256).map(|mut v| {
            v.cached = true;
            v
        }))
    }

    /// The signature-database version the consumers currently scan with, if they know one.
    pub async fn db_version(&self) -> Result<Option<String>, QueueError> {
        if let Some((version, at)) = &*self.db_version.lock().unwrap_or_else(|e| e.into_inner())
            && at.elapsed() < DB_VERSION_REFRESH
            && self.health.up.load(Ordering::Relaxed)
        {
            return Ok(version.clone());
        }
        let version: Option<String> = redis::cmd("GET")
            .arg(&self.keys.db_version)
            .query_async(&mut self.conn.clone())
            .await?;
        self.health.up.store(true, Ordering::Relaxed);
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
}

/// Adds the tenant to the set whose streams the consumers read. A tenant's own user may not
/// (it could fill the set with names for the consumers to poll): the operator registered it.
pub(super) async fn register_tenant<C: redis::aio::ConnectionLike>(
    conn: &mut C,
    tenants: &str,
    tenant: &str,
) -> Result<(), QueueError> {
    let added: redis::RedisResult<i64> = redis::cmd("SADD")
        .arg(tenants)
        .arg(tenant)
        .query_async(conn)
        .await;
    match added {
        Ok(_) => Ok(()),
        Err(e) if e.code() == Some("NOPERM") => Ok(()),
        Err(e) => Err(e.into()),
    }
}
