//! Taking over entries a stopped member held past the visibility timeout, answering poison
//! entries, and keeping a long scan's entry from being taken over.

use redis::streams::{StreamClaimReply, StreamPendingCountReply};
use virus_scanner_protocol::task::Verdict;

use super::claim::delivery;
use super::{Consumer, Delivery};
use crate::QueueError;

impl Consumer {
    /// Takes over entries that another consumer has held past the visibility timeout.
    pub(super) async fn reclaim(&mut self) -> Result<Vec<Delivery>, QueueError> {
        let min_idle = self.config.visibility_timeout.as_millis() as u64;
        let mut out = Vec::new();
        for stream in self.streams_from(0) {
            let Some((tenant, priority)) = self.keys.parse_stream(&stream) else {
                continue;
            };
            let tenant = tenant.to_owned();
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
                    let d = delivery(id, stream.clone(), tenant.clone(), priority, deliveries);
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
            .arg(&d.stream)
            .arg(&self.config.group)
            .arg(&self.name)
            .arg(0)
            .arg(&d.entry_id)
            .arg("JUSTID")
            .query_async(&mut self.conn.clone())
            .await?;
        Ok(())
    }
}
