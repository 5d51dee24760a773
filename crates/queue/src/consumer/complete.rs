//! Answering an entry: the verdict, the cache, the stored body and the acknowledgement in
//! one script that first checks the entry is still this member's.

use virus_scanner_protocol::legacy;
use virus_scanner_protocol::task::{Content, ScanTask, Verdict, encode_verdict};

use super::{Consumer, Delivery};
use crate::{QueueError, StoredBodyReader};

/// Writes the verdict only if the caller still owns the entry, then acknowledges and deletes
/// it, in one step, with the body the task stored in Redis. KEYS: stream, verdict list, cache
/// key, stored body. ARGV: group, consumer, entry id, verdict, verdict TTL, push verdict
/// (1/0), cache the verdict (1/0), cache TTL, remove the stored body (1/0), the verdict as
/// cached (without the task's id and timings: a cache hit may answer another tenant). A
/// consumer that no longer owns the entry leaves the body to the one that does.
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
  redis.call('SET', KEYS[3], ARGV[10], 'EX', ARGV[8])
end
redis.call('XACK', KEYS[1], ARGV[1], ARGV[3])
redis.call('XDEL', KEYS[1], ARGV[3])
return 1
";

pub(super) fn complete_script() -> redis::Script {
    redis::Script::new(COMPLETE_SCRIPT)
}

impl Consumer {
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
        let legacy = d.is_legacy();
        let verdict_key = self
            .keys
            .verdict(&d.tenant, task.map(|t| t.id.as_str()).unwrap_or("-"));
        let cache = cache.filter(|_| verdict.is_cacheable());
        let cache_key = match cache {
            Some((db, sha)) => self.keys.cache(db, sha),
            None => verdict_key.clone(),
        };
        let mut cached_form = verdict.clone();
        cached_form.task_id.clear();
        cached_form.hops = None;
        let body_key = task.and_then(|t| self.stored_body_key(&d.tenant, t));
        let owned: i64 = self
            .complete_script
            .key(&d.stream)
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
            .arg(encode_verdict(&cached_form))
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

    /// The body of a delivered task whose content is stored in Redis, as a byte stream from
    /// its start (each call starts again); `None` for other tasks.
    pub fn stored_body(&self, d: &Delivery, task: &ScanTask) -> Option<StoredBodyReader> {
        let Some(Content::RedisChunks(chunks)) = &task.content else {
            return None;
        };
        Some(StoredBodyReader::new(
            self.conn.clone(),
            self.read_chunk_script.clone(),
            self.stored_body_key(&d.tenant, task)?,
            chunks.count,
            task.size,
        ))
    }

    /// Derived from the tenant of the stream the task came from and the task's id, which
    /// `decode_task` checked: whatever tenant the task names, it reaches only its own bodies.
    fn stored_body_key(&self, tenant: &str, task: &ScanTask) -> Option<String> {
        let Some(Content::RedisChunks(_)) = task.content else {
            return None;
        };
        Some(self.keys.body(tenant, &task.id))
    }

    /// Acknowledges and deletes an entry that cannot be answered (it does not decode).
    pub async fn discard(&self, d: &Delivery) -> Result<(), QueueError> {
        let stream = &d.stream;
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
}
