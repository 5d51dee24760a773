//! Submitting a task and waiting for its verdict.

use std::time::{Duration, Instant};

use virus_scanner_protocol::task::{
    ScanTask, TASK_FIELD, Verdict, decode_verdict, encode_task, encode_task_cache_checked,
};

use super::Producer;
use crate::{QueueError, functions, now_ns};

impl Producer {
    pub(super) async fn submit_and_wait(
        &self,
        task: &ScanTask,
        db_version: Option<&str>,
        deadline: Instant,
    ) -> Result<Verdict, QueueError> {
        let use_cache = db_version.is_some() && task.sha256.len() == 32;
        let cache_key = match db_version {
            Some(db) if use_cache => self.keys.cache(db, &task.sha256),
            _ => String::new(),
        };
        let tenant = &self.config.tenant;
        let verdict_key = self.keys.verdict(tenant, &task.id);
        // A function, not a script: a tenant's Redis user may call the queue's functions but
        // not run scripts of its own.
        let mut submit = redis::cmd("FCALL");
        submit
            .arg(functions::SUBMIT)
            .arg(2)
            .arg(&verdict_key)
            .arg(self.keys.stream(tenant, task.priority()))
            .arg(&cache_key)
            .arg(if use_cache {
                encode_task_cache_checked(task)
            } else {
                encode_task(task)
            })
            .arg(self.config.verdict_ttl.as_secs().max(1))
            .arg(TASK_FIELD);
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining < Duration::from_millis(1) {
            return Err(QueueError::DeadlineExceeded);
        }
        let mut blpop = redis::cmd("BLPOP");
        blpop
            .arg(&verdict_key)
            .arg(remaining.as_secs_f64().max(0.01));

        // An idle connection may have died since its last use (a server-side timeout, a
        // proxy): one more try on a fresh connection. Where the first call did run and only
        // its reply was lost, the task is queued twice: two scans, and a second verdict in a
        // list that expires unread, never a wrong answer.
        let mut fresh = false;
        loop {
            let conn = if fresh {
                self.new_waiter().await?
            } else {
                self.take_waiter().await?
            };
            let (mut c1, mut c2) = (conn.clone(), conn.clone());
            let submitted = submit.query_async::<i64>(&mut c1);
            let popped = blpop.query_async::<Option<(String, Vec<u8>)>>(&mut c2);
            let mut submitted = std::pin::pin!(submitted);
            let mut popped = std::pin::pin!(popped);
            // `biased`: the script is sent before the BLPOP that waits behind it. Replies come
            // in order, so the BLPOP cannot answer first except on a broken connection.
            let first = tokio::select! {
                biased;
                r = &mut submitted => r,
                r = &mut popped => match r {
                    Err(e) => Err(e),
                    Ok(_) => {
                        return Err(QueueError::BadVerdict(
                            "verdict before the task was queued".into(),
                        ));
                    }
                },
            };
            let cached = match first {
                Ok(cached) => cached,
                Err(e) if !fresh && (e.is_io_error() || e.is_connection_dropped()) => {
                    fresh = true;
                    continue;
                }
                // A Redis restarted without persistence forgot the functions until a consumer
                // loads them again; load them here where this user may, and try once more.
                Err(e) if !fresh && functions::is_missing_function(&e) => {
                    functions::load_if_allowed(&mut self.conn.clone()).await?;
                    fresh = true;
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            // The server-side timeout ends the wait; the local one guards a hung connection.
            return match tokio::time::timeout(remaining + Duration::from_secs(1), &mut popped).await
            {
                Ok(Ok(Some((_, bytes)))) => {
                    let woke_ns = now_ns();
                    self.put_waiter(conn);
                    let mut v = decode_verdict(&bytes)
                        .map_err(|e| QueueError::BadVerdict(e.to_string()))?;
                    if let Some(hops) = &mut v.hops {
                        hops.woke_ns = woke_ns;
                    }
                    if cached == 1 {
                        v.cached = true;
                        v.task_id = task.id.clone();
                    }
                    Ok(v)
                }
                Ok(Ok(None)) => {
                    self.put_waiter(conn);
                    Err(QueueError::DeadlineExceeded)
                }
                // The task is queued: wait on, riding out a Redis restart.
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "verdict wait interrupted; retrying");
                    self.pop_verdict(&task.id, deadline).await
                }
                Err(_) => Err(QueueError::DeadlineExceeded),
            };
        }
    }

    /// Pops the task's verdict, riding out Redis restarts until the deadline.
    pub(super) async fn pop_verdict(
        &self,
        task_id: &str,
        deadline: Instant,
    ) -> Result<Verdict, QueueError> {
        let key = self.keys.verdict(&self.config.tenant, task_id);
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining < Duration::from_millis(1) {
                return Err(QueueError::DeadlineExceeded);
            }
            let mut conn = match self.take_waiter().await {
                Ok(conn) => conn,
                Err(e) => {
                    tracing::debug!(error = %e, "redis unavailable while waiting for a verdict");
                    tokio::time::sleep(remaining.min(Duration::from_millis(200))).await;
                    continue;
                }
            };
            let mut blpop = redis::cmd("BLPOP");
            blpop.arg(&key).arg(remaining.as_secs_f64().max(0.01));
            let blpop = blpop.query_async::<Option<(String, Vec<u8>)>>(&mut conn);
            // The server-side timeout ends the wait; the local one guards a hung connection.
            match tokio::time::timeout(remaining + Duration::from_secs(1), blpop).await {
                Ok(Ok(Some((_, bytes)))) => {
                    let woke_ns = now_ns();
                    self.put_waiter(conn);
                    let mut v = decode_verdict(&bytes)
                        .map_err(|e| QueueError::BadVerdict(e.to_string()))?;
                    if let Some(hops) = &mut v.hops {
                        hops.woke_ns = woke_ns;
                    }
                    return Ok(v);
                }
                Ok(Ok(None)) => {
                    self.put_waiter(conn);
                    return Err(QueueError::DeadlineExceeded);
                }
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "verdict wait interrupted; retrying");
                    tokio::time::sleep(remaining.min(Duration::from_millis(100))).await;
                }
                Err(_) => return Err(QueueError::DeadlineExceeded),
            }
        }
    }
}
