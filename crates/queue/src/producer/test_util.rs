//! Entry points for tests and the benchmark (feature `test-util`): production submits
//! through [`Producer::submit`] and never enqueues without waiting.

use std::time::Instant;

use virus_scanner_protocol::task::{Priority, ScanTask, TASK_FIELD, Verdict, encode_task};

use super::Producer;
use crate::QueueError;

impl Producer {
    pub async fn enqueue(&self, task: &ScanTask) -> Result<(), QueueError> {
        let stream = self.keys.stream(&self.config.tenant, task.priority());
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

    /// Pops the verdict of a task queued with [`Producer::enqueue`], riding out Redis restarts
    /// until the deadline.
    pub async fn wait_verdict(
        &self,
        task_id: &str,
        deadline: Instant,
    ) -> Result<Verdict, QueueError> {
        self.pop_verdict(task_id, deadline).await
    }

    /// Entries in this tenant's high and normal streams (waiting or being scanned).
    pub async fn depth(&self) -> Result<(u64, u64), QueueError> {
        let mut conn = self.conn.clone();
        let high: u64 = redis::cmd("XLEN")
            .arg(self.keys.stream(&self.config.tenant, Priority::High))
            .query_async(&mut conn)
            .await?;
        let normal: u64 = redis::cmd("XLEN")
            .arg(self.keys.stream(&self.config.tenant, Priority::Normal))
            .query_async(&mut conn)
            .await?;
        Ok((high, normal))
    }
}
