use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redis::aio::{ConnectionManager, MultiplexedConnection};
use virus_scanner_protocol::task::{
    Priority, ScanTask, TASK_FIELD, Verdict, decode_verdict, encode_task, encode_task_cache_checked,
};

use crate::memo::VerdictMemo;
use crate::{Keys, QueueConfig, QueueError, StoredBody};

/// How long a looked-up signature-database version is trusted before asking Redis again.
const DB_VERSION_REFRESH: Duration = Duration::from_secs(5);

/// Verdict-cache lookup and enqueue in one step. KEYS: cache entry, task stream, verdict list.
/// ARGV: encoded task, verdict TTL, '1' to consult the cache, the stream field of the task.
/// A cached verdict is pushed to the task's verdict list, where the `BLPOP` sent right behind
/// this script finds it; 1 = cached. Sent with EVAL, never EVALSHA: a NOSCRIPT retry would
/// queue behind the blocking `BLPOP`.
const SUBMIT_SCRIPT: &str = r"
if ARGV[3] == '1' then
  local cached = redis.call('GET', KEYS[1])
  if cached then
    redis.call('RPUSH', KEYS[3], cached)
    redis.call('EXPIRE', KEYS[3], ARGV[2])
    return 1
  end
end
redis.call('XADD', KEYS[2], '*', ARGV[4], ARGV[1])
return 0
";

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

#[derive(Default)]
struct Health {
    /// Cleared when the connection to Redis drops, set again once one is made. While it is
    /// clear nothing is decided from memory: with Redis down every body fails closed, even
    /// one decided a moment ago.
    up: AtomicBool,
    /// Connections for `BLPOP`, one per waiting request: a blocking command would hold up
    /// every other command on a shared multiplexed connection. Emptied when Redis goes away.
    idle_waiters: Mutex<Vec<MultiplexedConnection>>,
}

impl Health {
    fn lost(&self) {
        self.up.store(false, Ordering::Relaxed);
        self.idle_waiters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }
}

impl Drop for Producer {
    fn drop(&mut self) {
        self.canary.abort();
    }
}

/// Learns at once when Redis goes away: a connection parked in a `BLPOP` on a key nobody
/// writes returns only when the connection breaks. Marks Redis lost then, and up again once
/// a new connection is made.
async fn watch_connection(
    client: redis::Client,
    connect_timeout: Duration,
    canary: String,
    health: std::sync::Weak<Health>,
) {
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(connect_timeout))
        .set_response_timeout(None);
    loop {
        let connection = client
            .get_multiplexed_async_connection_with_config(&config)
            .await;
        let Some(h) = health.upgrade() else { return };
        match connection {
            Ok(mut conn) => {
                h.up.store(true, Ordering::Relaxed);
                drop(h);
                let parked: redis::RedisResult<Option<(String, Vec<u8>)>> = redis::cmd("BLPOP")
                    .arg(&canary)
                    .arg(0)
                    .query_async(&mut conn)
                    .await;
                if let Ok(Some(_)) = parked {
                    tracing::warn!(key = canary, "something pushed to the connection canary");
                }
                let Some(h) = health.upgrade() else { return };
                h.lost();
            }
            Err(_) => h.lost(),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

impl Producer {
    pub async fn connect(config: QueueConfig) -> Result<Producer, QueueError> {
        let client = config.redis.client()?;
        let conn = config.redis.connection_manager(false).await?;
        let keys = Keys::new(&config.prefix);
        let health = Arc::new(Health::default());
        let canary = tokio::spawn(watch_connection(
            client.clone(),
            config.redis.connect_timeout,
            keys.canary.clone(),
            Arc::downgrade(&health),
        ));
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

    /// Keeps up to `entries` recent verdicts in process for `ttl` (0 turns it off), under the
    /// consumers' current signature-database version.
    pub fn with_memo(mut self, entries: usize, ttl: Duration) -> Producer {
        self.memo = VerdictMemo::new(entries, ttl);
        self
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

    /// Stores the `size` bytes of the spilled file at `path` in Redis, in chunks, for a task
    /// of `tenant` with id `task_id` whose consumers cannot open the file. The returned body
    /// names itself in the task ([`StoredBody::content`]) and is removed from Redis when it is
    /// dropped; its TTL removes it after the deadline otherwise.
    pub async fn store_body(
        &self,
        tenant: &str,
        task_id: &str,
        path: &std::path::Path,
        size: u64,
        deadline: Instant,
    ) -> Result<StoredBody, QueueError> {
        let key = self.keys.body(tenant, task_id);
        crate::stored_body::store(&self.conn, key, path, size, deadline).await
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

    /// The verdict for the task's bytes: from the in-process memo, else from the verdict cache
    /// or a scan. Cache lookup, enqueue and the start of the wait share one round trip to
    /// Redis. A cached verdict comes back with `cached` set.
    pub async fn scan(&self, task: &ScanTask, deadline: Instant) -> Result<Verdict, QueueError> {
        if let Some(v) = self.remembered(&task.sha256).await? {
            return Ok(v);
        }
        self.submit(task, deadline).await
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

    async fn submit_and_wait(
        &self,
        task: &ScanTask,
        db_version: Option<&str>,
        deadline: Instant,
    ) -> Result<Verdict, QueueError> {
        let use_cache = db_version.is_some() && task.sha256.len() == 32;
        let cache_key = match db_version {
            Some(db) if use_cache => self.keys.cache(db, &task.sha256),
            // Unused, but named, and in the same slot as the others.
            _ => self.keys.verdict(&task.id),
        };
        let verdict_key = self.keys.verdict(&task.id);
        let mut submit = redis::cmd("EVAL");
        submit
            .arg(SUBMIT_SCRIPT)
            .arg(3)
            .arg(&cache_key)
            .arg(self.keys.stream(task.priority()))
            .arg(&verdict_key)
            .arg(if use_cache {
                encode_task_cache_checked(task)
            } else {
                encode_task(task)
            })
            .arg(self.config.verdict_ttl.as_secs().max(1))
            .arg(if use_cache { "1" } else { "0" })
            .arg(TASK_FIELD);
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining < Duration::from_millis(1) {
            return Err(QueueError::DeadlineExceeded);
        }
        let mut blpop = redis::cmd("BLPOP");
        blpop
            .arg(&verdict_key)
            .arg(remaining.as_secs_f64().max(0.01));

        // An idle connection may have died since its last use (a server-side timeout, a
        // proxy): on a broken connection the script cannot have run, so one more try on a
        // fresh connection is safe.
        let mut fresh = false;
        loop {
            let conn = if fresh {
                self.new_waiter().await?
            } else {
                self.take_waiter().await?
            };
            let (mut c1, mut c2) = (conn.clone(), conn.clone());
            let submitted = submit.query_async::<i64>(&mut c1);
            let popped = blpop.query_async::<Option<(String, Vec<u8>)>>(&mut c2);
            let mut submitted = std::pin::pin!(submitted);
            let mut popped = std::pin::pin!(popped);
            // `biased`: the script is sent before the BLPOP that waits behind it. Replies come
            // in order, so the BLPOP cannot answer first except on a broken connection.
            let first = tokio::select! {
                biased;
                r = &mut submitted => r,
                r = &mut popped => match r {
                    Err(e) => Err(e),
                    Ok(_) => {
                        return Err(QueueError::BadVerdict(
                            "verdict before the task was queued".into(),
                        ));
                    }
                },
            };
            let cached = match first {
                Ok(cached) => cached,
                Err(e) if !fresh && (e.is_io_error() || e.is_connection_dropped()) => {
                    fresh = true;
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            // The server-side timeout ends the wait; the local one guards a hung connection.
            return match tokio::time::timeout(remaining + Duration::from_secs(1), &mut popped).await
            {
                Ok(Ok(Some((_, bytes)))) => {
                    self.put_waiter(conn);
                    let mut v = decode_verdict(&bytes)
                        .map_err(|e| QueueError::BadVerdict(e.to_string()))?;
                    if cached == 1 {
                        v.cached = true;
                        v.task_id = task.id.clone();
                    }
                    Ok(v)
                }
                Ok(Ok(None)) => {
                    self.put_waiter(conn);
                    Err(QueueError::DeadlineExceeded)
                }
                // The task is queued: wait on, riding out a Redis restart.
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "verdict wait interrupted; retrying");
                    self.wait_verdict(&task.id, deadline).await
                }
                Err(_) => Err(QueueError::DeadlineExceeded),
            };
        }
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

    /// An idle waiter connection, else a new one.
    async fn take_waiter(&self) -> Result<MultiplexedConnection, QueueError> {
        let idle = self
            .health
            .idle_waiters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop();
        match idle {
            Some(conn) => Ok(conn),
            None => self.new_waiter().await,
        }
    }

    async fn new_waiter(&self) -> Result<MultiplexedConnection, QueueError> {
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.config.redis.connect_timeout))
            .set_response_timeout(None);
        Ok(self
            .client
            .get_multiplexed_async_connection_with_config(&config)
            .await?)
    }

    fn put_waiter(&self, conn: MultiplexedConnection) {
        let mut idle = self
            .health
            .idle_waiters
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if idle.len() < self.max_idle_waiters {
            idle.push(conn);
        }
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
