//! Claiming: entries abandoned by stopped members first, then the high stream, then the
//! normal one.

use std::time::{Duration, Instant};

use redis::streams::{StreamId, StreamReadReply};
use virus_scanner_protocol::task::{Priority, TASK_FIELD, decode_task};

use super::{Consumer, Delivery};
use crate::QueueError;

/// Claims one new entry, from the high stream if it has one, else from the normal one, in
/// one round trip. KEYS: the streams, highest priority first. ARGV: group, consumer.
const CLAIM_NEW_SCRIPT: &str = r"
for _, stream in ipairs(KEYS) do
  local found = redis.call('XREADGROUP', 'GROUP', ARGV[1], ARGV[2], 'COUNT', 1, 'STREAMS', stream, '>')
  if found then return found end
end
return false
";

pub(super) fn claim_new_script() -> redis::Script {
    redis::Script::new(CLAIM_NEW_SCRIPT)
}

impl Consumer {
    /// Claims the next tasks: entries abandoned by dead consumers, then the high stream,
    /// then the normal one; waits up to `block` when both are empty. Poison entries are
    /// answered here and not returned.
    pub async fn claim(&mut self, block: Duration) -> Result<Vec<Delivery>, QueueError> {
        match self.claim_once(block).await {
            Err(e) if e.is_missing_group() => {
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
}

pub(super) fn delivery(entry: StreamId, priority: Priority, deliveries: u32) -> Delivery {
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
