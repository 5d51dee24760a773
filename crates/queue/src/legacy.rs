//! The seed's queue: producers `LPUSH` `taskID|MODE|TIMESTAMP|CONTENT` onto a list (default
//! `scan_queue`) and `BLPOP` the plain-text verdict from `<result prefix><taskID>` (default
//! `scan_result:<taskID>`). The bridge moves each legacy task into the reliable stream, so
//! it gets redelivery and poison handling like any other task.

use std::time::Duration;

use redis::aio::ConnectionManager;
use virus_scanner_protocol::legacy::{self, LegacyContent};
use virus_scanner_protocol::task::{
    Content, Priority, ReplyFormat, ScanTask, TASK_FIELD, encode_task,
};

use crate::{Keys, LEGACY_TENANT, QueueConfig, QueueError};

pub struct LegacyBridge {
    conn: ConnectionManager,
    keys: Keys,
    config: QueueConfig,
    processing: String,
}

impl LegacyBridge {
    pub async fn connect(config: QueueConfig) -> Result<LegacyBridge, QueueError> {
        let mut conn = config.redis.connection_manager(true).await?;
        let keys = Keys::new(&config.prefix);
        // Legacy tasks are queued as a tenant of their own.
        let _: i64 = redis::cmd("SADD")
            .arg(&keys.tenants)
            .arg(LEGACY_TENANT)
            .query_async(&mut conn)
            .await?;
        // Same hash slot as the legacy list itself, so LMOVE works on Redis Cluster.
        let processing = format!("{{{}}}:processing", config.legacy_queue);
        Ok(LegacyBridge {
            conn,
            keys,
            config,
            processing,
        })
    }

    /// Puts back tasks a bridge took but did not forward before it stopped.
    pub async fn recover(&mut self) -> Result<usize, QueueError> {
        let mut moved = 0;
        loop {
            let item: Option<Vec<u8>> = redis::cmd("LMOVE")
                .arg(&self.processing)
                .arg(&self.config.legacy_queue)
                .arg("RIGHT")
                .arg("RIGHT")
                .query_async(&mut self.conn)
                .await?;
            if item.is_none() {
                return Ok(moved);
            }
            moved += 1;
        }
    }

    /// Moves one legacy task into the stream, waiting up to `block` for one. Returns the
    /// task id, or the parse error for a malformed entry (answered if it has an id, dropped
    /// otherwise).
    pub async fn forward(
        &mut self,
        block: Duration,
    ) -> Result<Option<Result<String, String>>, QueueError> {
        let raw: Option<Vec<u8>> = redis::cmd("BLMOVE")
            .arg(&self.config.legacy_queue)
            .arg(&self.processing)
            .arg("RIGHT")
            .arg("LEFT")
            .arg(block.as_secs_f64().max(0.01))
            .query_async(&mut self.conn)
            .await?;
        let Some(raw) = raw else {
            return Ok(None);
        };
        let outcome = match legacy::parse(&raw) {
            Ok(task) => {
                let id = task.id.clone();
                let content = match task.content {
                    LegacyContent::Body(body) => Content::Body(body.into()),
                    LegacyContent::Path(path) => Content::Path(path),
                };
                let scan_task = ScanTask {
                    id: task.id,
                    content: Some(content),
                    priority: Priority::Normal as i32,
                    enqueued_at_ns: task.timestamp_ns,
                    reply_format: ReplyFormat::LegacyText as i32,
                    ..ScanTask::default()
                };
                let _: String = redis::cmd("XADD")
                    .arg(self.keys.stream(LEGACY_TENANT, Priority::Normal))
                    .arg("*")
                    .arg(TASK_FIELD)
                    .arg(encode_task(&scan_task))
                    .query_async(&mut self.conn)
                    .await?;
                Ok(id)
            }
            Err(e) => {
                let id = raw
                    .split(|&b| b == b'|')
                    .next()
                    .and_then(|id| std::str::from_utf8(id).ok());
                if let Some(id) =
                    id.filter(|id| virus_scanner_protocol::task::validate_task_id(id).is_ok())
                {
                    push_result(
                        &mut self.conn,
                        &self.config,
                        id,
                        &format!("ERROR|malformed task: {e}"),
                    )
                    .await?;
                }
                Err(e.to_string())
            }
        };
        let _: i64 = redis::cmd("LREM")
            .arg(&self.processing)
            .arg(1)
            .arg(&raw)
            .query_async(&mut self.conn)
            .await?;
        Ok(Some(outcome))
    }
}

pub(crate) async fn push_result(
    conn: &mut ConnectionManager,
    config: &QueueConfig,
    task_id: &str,
    text: &str,
) -> Result<(), QueueError> {
    let key = format!("{}{task_id}", config.legacy_result_prefix);
    let _: () = redis::pipe()
        .atomic()
        .cmd("RPUSH")
        .arg(&key)
        .arg(text)
        .ignore()
        .cmd("EXPIRE")
        .arg(&key)
        .arg(config.verdict_ttl.as_secs().max(1))
        .ignore()
        .query_async(conn)
        .await?;
    Ok(())
}
