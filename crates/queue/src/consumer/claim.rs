//! Claiming: entries abandoned by stopped members first, then new entries, tenant by tenant
//! in turn (round robin), each tenant's high stream before its normal one.

use std::time::{Duration, Instant};

use redis::streams::{StreamId, StreamReadReply};
use virus_scanner_protocol::task::{Priority, TASK_FIELD, decode_task};

use super::{Consumer, Delivery};
use crate::QueueError;

/// Claims up to ARGV[4] new entries in one round trip, in turns: each turn takes at most one
/// entry per tenant, its high stream before its normal one, tenants in the order of KEYS, and
/// the next turn serves only the tenants the last one found something for. So a batch never
/// takes a second task of a tenant while another tenant has one waiting. KEYS: each tenant's
/// high and normal stream, in pairs. ARGV: group, consumer, the largest entry (bytes of its
/// fields and values) to hand out, most entries. A larger entry cannot be a task a producer
/// queued through the submit function: it is acknowledged and deleted here, never sent to a
/// consumer that would have to hold it. Returns the entries as `XREADGROUP` does, one stream
/// per entry, or false.
const CLAIM_NEW_SCRIPT: &str = r"
local function next_entry(stream)
  while true do
    local found = redis.call('XREADGROUP', 'GROUP', ARGV[1], ARGV[2], 'COUNT', 1, 'STREAMS', stream, '>')
    if not found then return nil end
    local entry = found[1][2][1]
    local size = 0
    for _, part in ipairs(entry[2]) do size = size + #part end
    if size <= tonumber(ARGV[3]) then return found[1] end
    redis.call('XACK', stream, ARGV[1], entry[1])
    redis.call('XDEL', stream, entry[1])
  end
end
local found = {}
local most = tonumber(ARGV[4])
local waiting = {}
for t = 1, #KEYS, 2 do waiting[#waiting + 1] = t end
while #found < most and #waiting > 0 do
  local again = {}
  for _, t in ipairs(waiting) do
    if #found >= most then break end
    local entry = next_entry(KEYS[t]) or next_entry(KEYS[t + 1])
    if entry then
      found[#found + 1] = entry
      again[#again + 1] = t
    end
  end
  waiting = again
end
if #found == 0 then return false end
return found
";

pub(super) fn claim_new_script() -> redis::Script {
    redis::Script::new(CLAIM_NEW_SCRIPT)
}

impl Consumer {
    /// Claims the next tasks: entries abandoned by dead consumers, then the high stream,
    /// then the normal one; waits up to `block` when both are empty. Poison entries are
    /// answered here and not returned.
    pub async fn claim(&mut self, block: Duration) -> Result<Vec<Delivery>, QueueError> {
        self.claim_up_to(block, 1).await
    }

    /// [`Consumer::claim`] of up to `most` new entries in one round trip when that many are
    /// waiting, tenants taking turns within the batch; the first one as soon as it is there
    /// when none was (a read that had to wait, and a reclaim, may return more than `most`).
    pub async fn claim_up_to(
        &mut self,
        block: Duration,
        most: usize,
    ) -> Result<Vec<Delivery>, QueueError> {
        match self.claim_once(block, most).await {
            Err(e) if e.is_missing_group() => {
                self.group_ready = false;
                self.claim_once(block, most).await
            }
            other => other,
        }
    }

    async fn claim_once(
        &mut self,
        block: Duration,
        most: usize,
    ) -> Result<Vec<Delivery>, QueueError> {
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
        self.refresh_tenants(false).await?;
        if self.tenants.is_empty() {
            tokio::time::sleep(block).await;
            return Ok(Vec::new());
        }
        let first = self.next_tenant % self.tenants.len();
        let streams = self.streams_from(first);
        let mut invocation = self.claim_new_script.prepare_invoke();
        for stream in &streams {
            invocation.key(stream);
        }
        let found: Option<StreamReadReply> = invocation
            .arg(&self.config.group)
            .arg(&self.name)
            .arg(crate::functions::MAX_TASK_BYTES + 64)
            .arg(most.max(1))
            .invoke_async(&mut self.conn)
            .await?;
        let found = self.deliveries(found);
        if let Some(d) = found.last() {
            let tenant = d.tenant.clone();
            self.served(&tenant);
            return Ok(found);
        }
        let mut found = self.read_new(&streams, block).await?;
        // A read on several streams can return one entry of each: high first.
        found.sort_by_key(|d| d.priority != Priority::High);
        if let Some(d) = found.first() {
            let tenant = d.tenant.clone();
            self.served(&tenant);
        }
        Ok(found)
    }

    /// The next claim starts with the tenant after this one.
    fn served(&mut self, tenant: &str) {
        if let Some(i) = self.tenants.iter().position(|t| t == tenant) {
            self.next_tenant = i + 1;
        }
    }

    /// A blocking `XREADGROUP` of new entries (one per stream).
    async fn read_new(
        &mut self,
        streams: &[String],
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
        for stream in streams {
            cmd.arg(stream);
        }
        for _ in streams {
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
            .filter_map(|key| {
                let (tenant, priority) = self.keys.parse_stream(&key.key)?;
                let (tenant, stream) = (tenant.to_owned(), key.key.clone());
                Some(
                    key.ids.into_iter().map(move |entry| {
                        delivery(entry, stream.clone(), tenant.clone(), priority, 1)
                    }),
                )
            })
            .flatten()
            .collect()
    }
}

pub(super) fn delivery(
    entry: StreamId,
    stream: String,
    tenant: String,
    priority: Priority,
    deliveries: u32,
) -> Delivery {
    let task = match entry.map.get(TASK_FIELD) {
        // Only a blocking read can hand one out (the claim script drops them): dropped too.
        Some(redis::Value::BulkString(bytes)) if bytes.len() > crate::functions::MAX_TASK_BYTES => {
            Err(format!(
                "entry of {} bytes, more than any task",
                bytes.len()
            ))
        }
        Some(redis::Value::BulkString(bytes)) => decode_task(bytes).map_err(|e| e.to_string()),
        Some(_) => Err(format!("field {TASK_FIELD} is not a byte string")),
        None => Err(format!(
            "entry has no {TASK_FIELD} field (unknown task version)"
        )),
    };
    Delivery {
        entry_id: entry.id,
        stream,
        tenant,
        priority,
        deliveries,
        task,
    }
}
