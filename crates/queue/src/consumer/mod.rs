//! A member of the consumer group: claims entries ([`claim`]), takes over the ones a stopped
//! member abandoned ([`reclaim`]), and answers them ([`complete`]).

mod claim;
mod complete;
mod reclaim;

use std::sync::Arc;
use std::time::Instant;

use redis::aio::ConnectionManager;
use std::time::Duration;

use virus_scanner_protocol::task::{
    Priority, ScanTask, Verdict, decode_verdict, validate_tenant_key,
};

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

impl Delivery {
    /// A task of the seed's bridge, answered in the seed's format: only from the bridge's own
    /// streams, whatever format another tenant's task asks for.
    pub fn is_legacy(&self) -> bool {
        self.tenant == crate::LEGACY_TENANT
            && self.task.as_ref().is_ok_and(|t| {
                t.reply_format() == virus_scanner_protocol::task::ReplyFormat::LegacyText
            })
    }
}

/// How often a consumer reads the set of tenants again, to serve a new tenant's streams.
const TENANTS_REFRESH: Duration = Duration::from_secs(1);

/// A task handed to this consumer. It stays owned until [`Consumer::complete`].
#[derive(Debug, Clone)]
pub struct Delivery {
    pub entry_id: String,
    /// The stream the entry was read from.
    pub stream: String,
    /// The tenant whose stream it came from. Only that tenant's Redis user can write there, so
    /// this, not the tenant the task names, decides where its verdict goes, which stored body
    /// and which spool directory it may use.
    pub tenant: String,
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
    /// The registered tenants, each with its streams' group created, and when they were read.
    tenants: Vec<String>,
    tenants_read: Option<Instant>,
    /// Where the next claim starts in `tenants`: right after the tenant served last, so that
    /// every tenant with waiting tasks gets its turn (round robin), whatever another floods.
    next_tenant: usize,
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
            tenants: Vec::new(),
            tenants_read: None,
            next_tenant: 0,
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

    /// Loads the producers' functions, reads the registered tenants and creates their streams
    /// and the group where they do not exist (first start, a new tenant, or a Redis that
    /// restarted without persistence).
    pub async fn ensure_group(&mut self) -> Result<(), QueueError> {
        crate::functions::load(&mut self.conn).await?;
        self.refresh_tenants(true).await?;
        self.group_ready = true;
        Ok(())
    }

    /// Reads the tenant set again when it is older than [`TENANTS_REFRESH`] (or `force`), and
    /// creates the group on the streams of tenants not seen before.
    async fn refresh_tenants(&mut self, force: bool) -> Result<(), QueueError> {
        if !force
            && self
                .tenants_read
                .is_some_and(|at| at.elapsed() < TENANTS_REFRESH)
        {
            return Ok(());
        }
        // With the tenants, whether the producers' functions are there: a Redis restarted
        // without its data forgot them, and a tenant's user cannot load them again.
        let (mut registered, loaded): (Vec<String>, Vec<redis::Value>) = redis::pipe()
            .cmd("SMEMBERS")
            .arg(&self.keys.tenants)
            .cmd("FUNCTION")
            .arg("LIST")
            .arg("LIBRARYNAME")
            .arg(crate::functions::LIBRARY)
            .query_async(&mut self.conn)
            .await?;
        if loaded.is_empty() {
            crate::functions::load(&mut self.conn).await?;
        }
        // A name that could not have been registered by a producer is not polled.
        registered.retain(|t| !t.is_empty() && validate_tenant_key(t).is_ok());
        registered.sort();
        for tenant in &registered {
            if !force && self.tenants.binary_search(tenant).is_ok() {
                continue;
            }
            for priority in [Priority::High, Priority::Normal] {
                let created: Result<String, _> = redis::cmd("XGROUP")
                    .arg("CREATE")
                    .arg(self.keys.stream(tenant, priority))
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
        }
        self.tenants = registered;
        self.tenants_read = Some(Instant::now());
        Ok(())
    }

    /// Every registered tenant's streams, high before normal per tenant, starting at `first`.
    fn streams_from(&self, first: usize) -> Vec<String> {
        let n = self.tenants.len();
        (0..n)
            .flat_map(|i| {
                let tenant = &self.tenants[(first + i) % n];
                [
                    self.keys.stream(tenant, Priority::High),
                    self.keys.stream(tenant, Priority::Normal),
                ]
            })
            .collect()
    }

    /// Leaves the group on shutdown, if this consumer holds no entries (otherwise they stay
    /// pending and another consumer reclaims them). True when it left.
    pub async fn leave(&mut self) -> Result<bool, QueueError> {
        let name = self.name.clone();
        Ok(self.forget(0, &name).await? > 0)
    }

    async fn forget(&mut self, min_idle_ms: u64, name: &str) -> Result<u64, QueueError> {
        let streams = self.streams_from(0);
        if streams.is_empty() {
            return Ok(0);
        }
        let mut invocation = self.forget_script.prepare_invoke();
        for stream in &streams {
            invocation.key(stream);
        }
        Ok(invocation
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

    /// Entries in the high and normal streams of every tenant (waiting or being scanned).
    pub async fn depth(&self) -> Result<(u64, u64), QueueError> {
        let mut total = (0, 0);
        for (_, high, normal) in self.depth_by_tenant().await? {
            total.0 += high;
            total.1 += normal;
        }
        Ok(total)
    }

    /// Entries in each registered tenant's high and normal streams, in one round trip.
    pub async fn depth_by_tenant(&self) -> Result<Vec<(String, u64, u64)>, QueueError> {
        let mut conn = self.conn.clone();
        let tenants: Vec<String> = redis::cmd("SMEMBERS")
            .arg(&self.keys.tenants)
            .query_async(&mut conn)
            .await?;
        let mut pipe = redis::pipe();
        for tenant in &tenants {
            pipe.cmd("XLEN")
                .arg(self.keys.stream(tenant, Priority::High));
            pipe.cmd("XLEN")
                .arg(self.keys.stream(tenant, Priority::Normal));
        }
        let lengths: Vec<u64> = pipe.query_async(&mut conn).await?;
        Ok(tenants
            .into_iter()
            .zip(lengths.chunks(2))
            .map(|(t, l)| (t, l[0], l[1]))
            .collect())
    }
}
