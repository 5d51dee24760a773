//! A member of the consumer group: claims entries ([`claim`]), takes over the ones a stopped
//! member abandoned ([`reclaim`]), and answers them ([`complete`]).

mod claim;
mod complete;
mod reclaim;

use std::sync::Arc;
use std::time::Instant;

use redis::aio::ConnectionManager;
use virus_scanner_protocol::task::{Priority, ScanTask, Verdict, decode_verdict};

use crate::{Keys, QueueConfig, QueueError, StoredBodyReader};

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

/// One member of the consumer group. Claims block on its own connection, so each scan that
/// runs at the same time has its own `Consumer`.
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
            complete_script: complete::complete_script(),
            claim_new_script: claim::claim_new_script(),
            forget_script: redis::Script::new(FORGET_SCRIPT),
            read_chunk_script: Arc::new(StoredBodyReader::read_chunk_script()),
            last_reclaim: None,
            group_ready: false,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
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
