use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::aio::ConnectionManager;
use redis::streams::{StreamClaimReply, StreamId, StreamPendingCountReply, StreamReadReply};
use virus_scanner_protocol::legacy;
use virus_scanner_protocol::task::{
    Content, Priority, ReplyFormat, ScanTask, TASK_FIELD, Verdict, decode_task, decode_verdict,
    encode_verdict,
};

use crate::{Keys, QueueConfig, QueueError, StoredBodyReader};

/// Writes the verdict only if the caller still owns the entry, then acknowledges and deletes
/// it, in one step, with the body the task stored in Redis. KEYS: stream, verdict list, cache
/// key, stored body. ARGV: group, consumer, entry id, verdict, verdict TTL, push verdict
/// (1/0), cache the verdict (1/0), cache TTL, remove the stored body (1/0). A consumer that no
/// longer owns the entry leaves the body to the one that does.
const COMPLETE_SCRIPT: &str = r"
local owned = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1, ARGV[2])
if #owned == 0 then return 0 end
if ARGV[9] == '1' then
  redis.call('UNLINK', KEYS[4])
end
if ARGV[6] == '1' then
  redis.call('RPUSH', KEYS[2], ARGV[4])
  redis.call('EXPIRE', KEYS[2], ARGV[5])
end
if ARGV[7] == '1' then
  redis.call('SET', KEYS[3], ARGV[4], 'EX', ARGV[8])
end
redis.call('XACK', KEYS[1], ARGV[1], ARGV[3])
redis.call('XDEL', KEYS[1], ARGV[3])
return 1
";

/// Claims one new entry, from the high stream if it has one, else from the normal one, in
/// one round trip. KEYS: the streams, highest priority first. ARGV: group, consumer.
const CLAIM_NEW_SCRIPT: &str = r"
for _, stream in ipairs(KEYS) do
  local found = redis.call('XREADGROUP', 'GROUP', ARGV[1], ARGV[2], 'COUNT', 1, 'STREAMS', stream, '>')
  if found then return found end
end
return false
";

/// Removes consumers that hold no entries and were idle for at least ARGV[2] ms from the
/// group, all of them or only the one named ARGV[3]. KEYS: the streams. ARGV: group, min idle
/// ms, name or ''. The check and the removal are one step, so no entry is ever orphaned
/// (`XGROUP DELCONSUMER` drops the entries a consumer holds). Returns how many were removed.
const FORGET_SCRIPT: &str = r"
local forgotten = 0
for _, stream in ipairs(KEYS) do
  local consumers = redis.pcall('XINFO', 'CONSUMERS', stream, ARGV[1])
  if consumers.err == nil then
    for _, c in ipairs(consumers) do
      local info = {}
      for i = 1, #c, 2 do info[c[i]] = c[i + 1] end
      if info['pending'] == 0 and info['idle'] >= tonumber(ARGV[2])
          and (ARGV[3] == '' or info['name'] == ARGV[3]) then
        redis.call('XGROUP', 'DELCONSUMER', stream, ARGV[1], info['name'])
        forgotten = forgotten + 1
      end
    end
  end
end
return forgotten
";

/// A task handed to this consumer. It stays owned until [`Consumer::complete`].
#[derive(Debug, Clone)]
pub struct Delivery {
    pub entry_id: String,
    pub priority: Priority,
    /// How often the entry was handed to a consumer, this time included.
    pub deliveries: u32,
    /// The task, or why it could not be decoded.
    pub task: Result<ScanTask, String>,
}

/// One consumer in the group. Claims block on its own connection, so each concurrent worker
/// has its own `Consumer`.
pub struct Consumer {
    conn: ConnectionManager,
    name: String,
    keys: Keys,
    config: QueueConfig,
    complete_script: redis::Script,
    claim_new_script: redis::Script,
    forget_script: redis::Script,
    read_chunk_script: Arc<redis::Script>,
    last_reclaim: Option<Instant>,
    group_ready: bool,
}

impl Consumer {
    pub async fn connect(
        config: QueueConfig,
        name: impl Into<String>,
    ) -> Result<Consumer, QueueError> {
        let conn = config.redis.connection_manager(true).await?;
        Ok(Consumer {
            conn,
            name: name.into(),
            keys: Keys::new(&config.prefix),
            config,
            complete_script: redis::Script::new(COMPLETE_SCRIPT),
            claim_new_script: redis::Script::new(CLAIM_NEW_SCRIPT),
            forget_script: redis::Script::new(FORGET_SCRIPT),
            read_chunk_script: Arc::new(StoredBodyReader::read_chunk_script()),
            last_reclaim: None,
            group_ready: false,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    pub fn config(&self) -> &QueueConfig {
        &self.config
    }

    pub async fn ping(&self) -> Result<(), QueueError> {
        let _: String = redis::cmd("PING")
            .query_async(&mut self.conn.clone())
            .await?;
        Ok(())
    }

    /// Creates the streams and the group if they do not exist (first start, or a Redis that
    /// restarted without persistence).
    pub async fn ensure_group(&mut self) -> Result<(), QueueError> {
        for stream in [&self.keys.high, &self.keys.normal] {
            let created: Result<String, _> = redis::cmd("XGROUP")
                .arg("CREATE")
                .arg(stream)
                .arg(&self.config.group)
                .arg("0")
                .arg("MKSTREAM")
                .query_async(&mut self.conn)
                .await;
            match created {
                Ok(_) => {}
                Err(e) if e.code() == Some("BUSYGROUP") => {}
                Err(e) => return Err(e.into()),
            }
        }
        self.group_ready = true;
        Ok(())
    }

    /// Claims the next tasks: entries abandoned by dead consumers, then the high stream,
    /// then the normal one; waits up to `block` when both are empty. Poison entries are
    /// answered here and not returned.
    pub async fn claim(&mut self, block: Duration) -> Result<Vec<Delivery>, QueueError> {
        match self.claim_once(block).await {
            Err(QueueError::Redis(e)) if e.code() == Some("NOGROUP") => {
                self.group_ready = false;
                self.claim_once(block).await
            }
            other => other,
        }
    }

    async fn claim_once(&mut self, block: Duration) -> Result<Vec<Delivery>, QueueError> {
        if !self.group_ready {
            self.ensure_group().await?;
        }
        let reclaim_every = self.config.visibility_timeout / 4;
        if self
            .last_reclaim
            .is_none_or(|at| at.elapsed() >= reclaim_every)
        {
            self.last_reclaim = Some(Instant::now());
            let retention = self.config.consumer_retention.as_millis() as u64;
            match self.forget(retention, "").await {
                Ok(0) => {}
                Ok(n) => tracing::info!(
                    consumers = n,
                    "removed consumers that hold nothing and were gone for the retention time"
                ),
                Err(e) => tracing::warn!(error = %e, "cannot remove departed consumers"),
            }
            let reclaimed = self.reclaim().await?;
            if !reclaimed.is_empty() {
                return Ok(reclaimed);
            }
        }
        let found: Option<StreamReadReply> = self
            .claim_new_script
            .key(self.keys.stream(Priority::High))
            .key(self.keys.stream(Priority::Normal))
            .arg(&self.config.group)
            .arg(&self.name)
            .invoke_async(&mut self.conn)
            .await?;
        let found = self.deliveries(found);
        if !found.is_empty() {
            return Ok(found);
        }
        let mut found = self
            .read_new(&[Priority::High, Priority::Normal], block)
            .await?;
        // A read on both streams can return one of each: high first.
        found.sort_by_key(|d| d.priority != Priority::High);
        Ok(found)
    }

    /// Leaves the group on shutdown, if this consumer holds no entries (otherwise they stay
    /// pending and another consumer reclaims them). True when it left.
    pub async fn leave(&mut self) -> Result<bool, QueueError> {
        let name = self.name.clone();
        Ok(self.forget(0, &name).await? > 0)
    }

    async fn forget(&mut self, min_idle_ms: u64, name: &str) -> Result<u64, QueueError> {
        Ok(self
            .forget_script
            .key(self.keys.stream(Priority::High))
            .key(self.keys.stream(Priority::Normal))
            .arg(&self.config.group)
            .arg(min_idle_ms)
            .arg(name)
            .invoke_async(&mut self.conn)
            .await?)
    }

    /// A blocking `XREADGROUP` of new entries (one per stream).
    async fn read_new(
        &mut self,
        priorities: &[Priority],
        block: Duration,
    ) -> Result<Vec<Delivery>, QueueError> {
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg(&self.config.group)
            .arg(&self.name)
            .arg("COUNT")
            .arg(1);
        cmd.arg("BLOCK").arg(block.as_millis().max(1) as u64);
        cmd.arg("STREAMS");
        for &p in priorities {
            cmd.arg(self.keys.stream(p));
        }
        for _ in priorities {
            cmd.arg(">");
        }
        let reply: Option<StreamReadReply> = cmd.query_async(&mut self.conn).await?;
        Ok(self.deliveries(reply))
    }

    fn deliveries(&self, reply: Option<StreamReadReply>) -> Vec<Delivery> {
        let Some(reply) = reply else {
            return Vec::new();
        };
        reply
            .keys
            .into_iter()
            .flat_map(|key| {
                let priority = self.priority_of(&key.key);
                key.ids
                    .into_iter()
                    .map(move |entry| delivery(entry, priority, 1))
            })
            .collect()
    }

    fn priority_of(&self, stream: &str) -> Priority {
        if stream == self.keys.high {
            Priority::High
        } else {
            Priority::Normal
        }
    }

    /// Takes over entries that another consumer has held past the visibility timeout.
    async fn reclaim(&mut self) -> Result<Vec<Delivery>, QueueError> {
        let min_idle = self.config.visibility_timeout.as_millis() as u64;
        let mut out = Vec::new();
        for priority in [Priority::High, Priority::Normal] {
            let stream = self.keys.stream(priority).to_owned();
            let pending: StreamPendingCountReply = redis::cmd("XPENDING")
                .arg(&stream)
                .arg(&self.config.group)
                .arg("IDLE")
                .arg(min_idle)
                .arg("-")
                .arg("+")
                .arg(8)
                .query_async(&mut self.conn)
                .await?;
            for entry in pending.ids {
                // XCLAIM re-checks the idle time, so two consumers never both take it.
                let claimed: StreamClaimReply = redis::cmd("XCLAIM")
                    .arg(&stream)
                    .arg(&self.config.group)
                    .arg(&self.name)
                    .arg(min_idle)
                    .arg(&entry.id)
                    .query_async(&mut self.conn)
                    .await?;
                let deliveries = (entry.times_delivered as u32).saturating_add(1);
                for id in claimed.ids {
                    tracing::warn!(
                        entry = %id.id,
                        previous_owner = %entry.consumer,
                        deliveries,
                        "reclaimed a task from a consumer that stopped"
                    );
                    let d = delivery(id, priority, deliveries);
                    if deliveries > self.config.max_deliveries {
                        self.answer_poison(&d).await?;
                    } else {
                        out.push(d);
                    }
                }
            }
        }
        Ok(out)
    }

    async fn answer_poison(&mut self, d: &Delivery) -> Result<(), QueueError> {
        let detail = format!(
            "task was delivered {} times without a verdict; giving up",
            d.deliveries
        );
        tracing::error!(entry = %d.entry_id, deliveries = d.deliveries, "poison task answered with an error verdict");
        match &d.task {
            Ok(task) => {
                let mut verdict = Verdict::error(&task.id, detail);
                verdict.deliveries = d.deliveries;
                self.complete(d, &verdict, None).await?;
            }
            Err(_) => self.discard(d).await?,
        }
        Ok(())
    }

    /// Resets the entry's idle time so that nobody reclaims it while the scan runs.
    pub async fn heartbeat(&self, d: &Delivery) -> Result<(), QueueError> {
        let _: Vec<String> = redis::cmd("XCLAIM")
            .arg(self.keys.stream(d.priority))
            .arg(&self.config.group)
            .arg(&self.name)
            .arg(0)
            .arg(&d.entry_id)
            .arg("JUSTID")
            .query_async(&mut self.conn.clone())
            .await?;
        Ok(())
    }

    /// Writes the verdict where the producer waits for it, caches it under
    /// `cache = Some((db_version, sha256))` when it may be reused, and acknowledges the entry.
    /// Returns false when the entry was no longer ours (another consumer answered it).
    pub async fn complete(
        &self,
        d: &Delivery,
        verdict: &Verdict,
        cache: Option<(&str, &[u8])>,
    ) -> Result<bool, QueueError> {
        let task = d.task.as_ref().ok();
        let legacy = task.is_some_and(|t| t.reply_format() == ReplyFormat::LegacyText);
        let verdict_key = self
            .keys
            .verdict(task.map(|t| t.id.as_str()).unwrap_or("-"));
        let cache = cache.filter(|_| verdict.is_cacheable());
        let cache_key = match cache {
            Some((db, sha)) => self.keys.cache(db, sha),
            None => verdict_key.clone(),
        };
        let mut cached_form = verdict.clone();
        cached_form.task_id.clear();
        let body_key = task.and_then(|t| self.stored_body_key(t));
        let owned: i64 = self
            .complete_script
            .key(self.keys.stream(d.priority))
            .key(&verdict_key)
            .key(&cache_key)
            .key(body_key.as_ref().unwrap_or(&verdict_key))
            .arg(&self.config.group)
            .arg(&self.name)
            .arg(&d.entry_id)
            .arg(encode_verdict(verdict))
            .arg(self.config.verdict_ttl.as_secs().max(1))
            .arg(if task.is_some() && !legacy { "1" } else { "0" })
            .arg(if cache.is_some() { "1" } else { "0" })
            .arg(self.config.cache_ttl.as_secs().max(1))
            .arg(if body_key.is_some() { "1" } else { "0" })
            .invoke_async(&mut self.conn.clone())
            .await?;
        if let (1, true, Some(task)) = (owned, legacy, task) {
            crate::legacy::push_result(
                &mut self.conn.clone(),
                &self.config,
                &task.id,
                &legacy::result_text(verdict),
            )
            .await?;
        }
        Ok(owned == 1)
    }

    /// The body of a task whose content is stored in Redis, as a byte stream from its start
    /// (each call starts again); `None` for other tasks.
    pub fn stored_body(&self, task: &ScanTask) -> Option<StoredBodyReader> {
        let Some(Content::RedisChunks(chunks)) = &task.content else {
            return None;
        };
        Some(StoredBodyReader::new(
            self.conn.clone(),
            self.read_chunk_script.clone(),
            self.stored_body_key(task)?,
            chunks.count,
            task.size,
        ))
    }

    /// Derived from the task's tenant and id, which `decode_task` checked.
    fn stored_body_key(&self, task: &ScanTask) -> Option<String> {
        let Some(Content::RedisChunks(_)) = task.content else {
            return None;
        };
        let tenant = task.labels.as_ref().map_or("", |l| l.tenant.as_str());
        Some(self.keys.body(tenant, &task.id))
    }

    /// Acknowledges and deletes an entry that cannot be answered (it does not decode).
    pub async fn discard(&self, d: &Delivery) -> Result<(), QueueError> {
        let stream = self.keys.stream(d.priority);
        let mut conn = self.conn.clone();
        let _: i64 = redis::cmd("XACK")
            .arg(stream)
            .arg(&self.config.group)
            .arg(&d.entry_id)
            .query_async(&mut conn)
            .await?;
        let _: i64 = redis::cmd("XDEL")
            .arg(stream)
            .arg(&d.entry_id)
            .query_async(&mut conn)
            .await?;
        Ok(())
    }

    pub async fn cached_verdict(
        &self,
        db_version: &str,
        sha256: &[u8],
    ) -> Result<Option<Verdict>, QueueError> {
        let bytes: Option<Vec<u8>> = redis::cmd("GET")
            .arg(self.keys.cache(db_version, sha256))
            .query_async(&mut self.conn.clone())
            .await?;
        Ok(bytes.and_then(|b| decode_verdict(&b).ok()))
    }

    /// Tells producers which database version verdicts are cached under.
    pub async fn publish_db_version(&self, db_version: &str) -> Result<(), QueueError> {
        let _: () = redis::cmd("SET")
            .arg(&self.keys.db_version)
            .arg(db_version)
            .query_async(&mut self.conn.clone())
            .await?;
        Ok(())
    }

    /// Entries in the high and normal streams (waiting or being scanned).
    pub async fn depth(&self) -> Result<(u64, u64), QueueError> {
        let mut conn = self.conn.clone();
        let high: u64 = redis::cmd("XLEN")
            .arg(&self.keys.high)
            .query_async(&mut conn)
            .await?;
        let normal: u64 = redis::cmd("XLEN")
            .arg(&self.keys.normal)
            .query_async(&mut conn)
            .await?;
        Ok((high, normal))
    }
}

fn delivery(entry: StreamId, priority: Priority, deliveries: u32) -> Delivery {
    let task = match entry.map.get(TASK_FIELD) {
        Some(redis::Value::BulkString(bytes)) => decode_task(bytes).map_err(|e| e.to_string()),
        Some(_) => Err(format!("field {TASK_FIELD} is not a byte string")),
        None => Err(format!(
            "entry has no {TASK_FIELD} field (unknown task version)"
        )),
    };
    Delivery {
        entry_id: entry.id,
        priority,
        deliveries,
        task,
    }
}
