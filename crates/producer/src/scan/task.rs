//! One file to one verdict: the in-process memo, the verdict cache, then a task on the queue.

use std::time::{Duration, Instant};

use virus_scanner_protocol::task::{Content, Labels, ScanTask, Verdict};
use virus_scanner_queue::{QueueError, now_ns};

use super::{ScanContext, ScanService};
use crate::body::{Body, BodyData};

impl ScanService {
    /// Scans one file: memo, cache, then queue. The spilled file lives until the verdict.
    pub(super) async fn scan_file(
        &self,
        file: &Body,
        ctx: &ScanContext,
        deadline: Instant,
    ) -> (Verdict, Option<[u8; 32]>, String) {
        let sha = Some(file.sha256);
        if file.len == 0 {
            return (Verdict::clean(), sha, String::new());
        }
        match self.producer.remembered(&file.sha256).await {
            Ok(Some(v)) => {
                self.metrics.cache_hits.inc();
                return (v, sha, String::new());
            }
            Ok(None) => {}
            Err(e) => tracing::debug!(error = %e, "verdict memo lookup failed"),
        }
        let task_id = new_task_id();
        // A body sent through Redis stays there until this function returns.
        let mut stored = None;
        let content = match &file.data {
            BodyData::Memory(bytes) => Content::Body(bytes.clone()),
            // The file stays until this function returns: its owner outlives the scan.
            BodyData::Spilled(spill) if self.policy.spool_shared => {
                Content::Path(spill.path().display().to_string())
            }
            // No consumer can open this spool: the body goes through Redis in chunks, unless
            // the verdict cache already knows it.
            BodyData::Spilled(spill) => {
                if let Ok(Some(v)) = self.producer.cached_verdict(&file.sha256).await {
                    self.metrics.cache_hits.inc();
                    return (v, sha, String::new());
                }
                let path = spill.path();
                match self
                    .producer
                    .store_body(&task_id, path, file.len, deadline)
                    .await
                {
                    Ok(body) => stored.insert(body).content(),
                    Err(e) => {
                        self.metrics.error(match e {
                            QueueError::DeadlineExceeded => "timeout",
                            _ => e.metric_label(),
                        });
                        let why = format!("cannot send the body to the scan queue: {e}");
                        return (Verdict::error(&task_id, why), sha, task_id);
                    }
                }
            }
        };
        let deadline_ns = now_ns()
            + deadline
                .saturating_duration_since(Instant::now())
                .as_nanos() as u64;
        let task = ScanTask {
            id: task_id.clone(),
            content: Some(content),
            priority: ctx.priority as i32,
            enqueued_at_ns: now_ns(),
            deadline_ns,
            sha256: file.sha256.to_vec(),
            labels: Some(Labels {
                tenant: self.policy.tenant.clone(),
                policy: self.policy.policy.clone(),
                route: ctx.route.clone(),
                direction: ctx.direction as i32,
                client_address: ctx.client_address.clone(),
            }),
            size: file.len,
            ..ScanTask::default()
        };
        let enqueued = Instant::now();
        let verdict = match self.producer.submit(&task, deadline).await {
            Ok(v) if v.cached => {
                self.metrics.cache_hits.inc();
                return (v, sha, String::new());
            }
            Ok(v) => {
                let waited = enqueued
                    .elapsed()
                    .saturating_sub(Duration::from_micros(v.scan_time_us));
                self.metrics.queue_wait.observe(waited.as_secs_f64());
                v
            }
            Err(QueueError::DeadlineExceeded) => {
                self.metrics.error("timeout");
                Verdict::error(&task_id, "no verdict before the scan deadline")
            }
            Err(e) => {
                self.metrics.error(e.metric_label());
                Verdict::error(&task_id, format!("scan queue unavailable: {e}"))
            }
        };
        (verdict, sha, task_id)
    }
}

/// A task id nobody can predict: the verdict of a task is pushed to a key named by it, so
/// a guessable id would let another client answer for it. 128 bits of SHA-256 over a
/// random per-process key and a counter (a PRF): unpredictable without the key, and no
/// system call per request, unlike a fresh random UUID.
fn new_task_id() -> String {
    use sha2::{Digest, Sha256};
    static KEY: std::sync::OnceLock<[u8; 32]> = std::sync::OnceLock::new();
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let key = KEY.get_or_init(|| {
        let (a, b) = uuid::Uuid::new_v4().as_u64_pair();
        let (c, d) = uuid::Uuid::new_v4().as_u64_pair();
        let mut key = [0u8; 32];
        for (chunk, word) in key.chunks_exact_mut(8).zip([a, b, c, d]) {
            chunk.copy_from_slice(&word.to_le_bytes());
        }
        key
    });
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let digest = Sha256::new()
        .chain_update(key)
        .chain_update(n.to_le_bytes())
        .finalize();
    hex::encode(&digest[..16])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn task_ids_are_128_bit_and_unrelated() {
        let a = new_task_id();
        let b = new_task_id();
        assert_eq!(a.len(), 32);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
        // No shared prefix as a per-process prefix and a counter would give.
        assert_ne!(a[..16], b[..16]);
    }
}
