//! One worker: claim, scan, answer, repeat.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use tokio::io::AsyncReadExt;
use virus_scanner_clamd::{ClamdError, ScanInput, ScanReply};
use virus_scanner_protocol::task::{Content, ScanTask, Verdict, VerdictStatus};
use virus_scanner_queue::{Consumer, Delivery, now_ns};

use crate::Shared;
use crate::metrics::VerdictLabels;

/// Attempts per task when clamd fails before giving an error verdict.
const CLAMD_ATTEMPTS: u32 = 3;

pub(crate) async fn run(
    shared: Arc<Shared>,
    index: usize,
    stop: tokio::sync::watch::Receiver<bool>,
) {
    let Some(mut consumer) =
        crate::connect_with_retry(&shared, &format!("w{index}"), stop.clone()).await
    else {
        return;
    };
    let mut backoff = Duration::from_millis(100);
    while !*stop.borrow() {
        // A consumer whose clamd is down leaves tasks to consumers that can scan them.
        if !shared.clamd_up() {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        }
        // Not cancelled on shutdown: an entry read but dropped would wait for redelivery.
        match consumer.claim(Duration::from_secs(1)).await {
            Ok(deliveries) => {
                backoff = Duration::from_millis(100);
                for d in deliveries {
                    process(&shared, &consumer, d).await;
                }
            }
            Err(e) => {
                shared.metrics.error("redis");
                tracing::warn!(error = %e, "claiming tasks failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    }
    // Every task this worker claimed is answered: leave the group, so that it does not list
    // one more departed consumer after every restart.
    if let Err(e) = consumer.leave().await {
        tracing::warn!(error = %e, consumer = consumer.name(), "cannot leave the consumer group");
    }
}

async fn process(shared: &Shared, consumer: &Consumer, d: Delivery) {
    let _in_flight = virus_scanner_runtime::InProgress::enter(&shared.metrics.in_flight);
    if d.deliveries > 1 {
        shared.metrics.redeliveries.inc();
    }
    let task = match &d.task {
        Ok(task) => task,
        Err(e) => {
            shared.metrics.error("decode");
            tracing::warn!(entry = %d.entry_id, error = %e, "dropping an entry that does not decode");
            if let Err(e) = consumer.discard(&d).await {
                tracing::warn!(error = %e, "cannot drop the entry");
            }
            return;
        }
    };
    let (mut verdict, cache_key) = if task.deadline_ns != 0 && now_ns() > task.deadline_ns {
        shared.metrics.expired.inc();
        tracing::info!(task_id = %task.id, "deadline passed before the scan; answered without scanning");
        (
            Verdict::error(&task.id, "deadline passed before the scan; not scanned"),
            None,
        )
    } else {
        scan(shared, consumer, &d, task).await
    };
    verdict.task_id = task.id.clone();
    verdict.deliveries = d.deliveries;
    shared
        .metrics
        .scans
        .get_or_create(&VerdictLabels {
            verdict: verdict.status().label(),
        })
        .inc();
    if verdict.status() == VerdictStatus::Infected {
        log_detection(
            task,
            &verdict,
            cache_key.as_ref().map(|(_, sha)| sha.as_slice()),
        );
    }
    let cache = cache_key
        .as_ref()
        .filter(|_| shared.config.cache_enabled && !verdict.cached)
        .map(|(db, sha)| (db.as_str(), sha.as_slice()));
    complete(shared, consumer, &d, &verdict, cache).await;
}

/// Writes the verdict, riding out a Redis outage for up to the visibility timeout; after
/// that the entry is redelivered and answered by whoever holds it then.
async fn complete(
    shared: &Shared,
    consumer: &Consumer,
    d: &Delivery,
    verdict: &Verdict,
    cache: Option<(&str, &[u8])>,
) {
    let give_up = Instant::now() + shared.config.queue.visibility_timeout;
    let mut delay = Duration::from_millis(100);
    loop {
        match consumer.complete(d, verdict, cache).await {
            Ok(true) => return,
            Ok(false) => {
                tracing::info!(entry = %d.entry_id, "task was answered by another consumer");
                return;
            }
            Err(e) if Instant::now() < give_up => {
                shared.metrics.error("redis");
                tracing::warn!(error = %e, entry = %d.entry_id, "cannot write verdict; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
            }
            Err(e) => {
                tracing::error!(error = %e, entry = %d.entry_id, "giving up on writing the verdict; the task will be redelivered");
                return;
            }
        }
    }
}

/// The content to scan, opened and measured.
enum Input<'a> {
    Bytes(&'a [u8]),
    File(tokio::fs::File),
}

/// Scans the task; returns the verdict and, when it may be cached, the cache key
/// `(db version, sha256)`.
async fn scan(
    shared: &Shared,
    consumer: &Consumer,
    d: &Delivery,
    task: &ScanTask,
) -> (Verdict, Option<(String, Vec<u8>)>) {
    let (mut input, size) = match &task.content {
        Some(Content::Body(body)) => (Input::Bytes(body), body.len() as u64),
        Some(Content::Path(path)) => {
            let file = match shared.scan_dir.open(path) {
                Ok(f) => f,
                Err(e) => {
                    shared.metrics.error("path");
                    tracing::warn!(task_id = %task.id, error = %e, "refused PATH task");
                    return (Verdict::error(&task.id, e.to_string()), None);
                }
            };
            let size = file.metadata().map(|m| m.len()).unwrap_or(0);
            (Input::File(tokio::fs::File::from_std(file)), size)
        }
        None => return (Verdict::error(&task.id, "task has no content"), None),
    };
    let engine = shared.engine();
    let unscannable = |detail: String| Verdict {
        status: VerdictStatus::Unscannable as i32,
        signature: "size-limit".into(),
        detail,
        bytes_scanned: 0,
        ..Verdict::default()
    };
    if size > shared.config.max_scan_bytes {
        return (
            unscannable(format!(
                "{size} bytes is more than the scan limit of {} bytes",
                shared.config.max_scan_bytes
            )),
            None,
        );
    }

    let sha = match &mut input {
        Input::Bytes(b) => Sha256::digest(b).to_vec(),
        Input::File(f) => match hash_file(f).await {
            Ok(sha) => sha,
            Err(e) => {
                shared.metrics.error("path");
                return (
                    Verdict::error(&task.id, format!("cannot read the file: {e}")),
                    None,
                );
            }
        },
    };
    let db_version = engine.as_ref().and_then(|e| e.database.clone());
    // A task whose producer found nothing in the cache as it queued it is not looked up again.
    if let (true, false, Some(db)) = (shared.config.cache_enabled, task.cache_checked, &db_version)
    {
        match consumer.cached_verdict(db, &sha).await {
            Ok(Some(mut hit)) => {
                shared.metrics.cache_hits.inc();
                hit.cached = true;
                return (hit, Some((db.clone(), sha)));
            }
            Ok(None) => {}
            Err(e) => tracing::debug!(error = %e, "verdict cache lookup failed"),
        }
    }

    let started = Instant::now();
    let reply = scan_with_heartbeat(shared, consumer, d, &mut input).await;
    let elapsed = started.elapsed();
    let mut verdict = Verdict {
        engine_version: engine
            .as_ref()
            .map(|e| e.engine.clone())
            .unwrap_or_default(),
        db_version: db_version.clone().unwrap_or_default(),
        scan_time_us: elapsed.as_micros() as u64,
        ..Verdict::default()
    };
    match reply {
        Ok(ScanReply::Clean) => verdict.set_status(VerdictStatus::Clean),
        Ok(ScanReply::Infected(name)) => {
            verdict.set_status(VerdictStatus::Infected);
            verdict.signature = name;
        }
        Ok(ScanReply::Unscannable(why)) => {
            verdict.set_status(VerdictStatus::Unscannable);
            verdict.signature = why.clone();
            verdict.detail = format!("clamd did not scan everything: {why}");
        }
        Ok(ScanReply::Error(msg)) => {
            shared.metrics.error("clamd");
            verdict.set_status(VerdictStatus::Error);
            verdict.detail = format!("clamd: {msg}");
        }
        Err(e) => {
            shared.metrics.error("clamd");
            verdict.set_status(VerdictStatus::Error);
            verdict.detail = format!("scanner unavailable: {e}");
        }
    }
    if matches!(
        verdict.status(),
        VerdictStatus::Clean | VerdictStatus::Infected
    ) {
        verdict.bytes_scanned = size;
        shared.metrics.scanned_bytes.inc_by(size);
        shared.metrics.scan_seconds.observe(elapsed.as_secs_f64());
    }
    (verdict, db_version.map(|db| (db, sha)))
}

async fn hash_file(file: &mut tokio::fs::File) -> std::io::Result<Vec<u8>> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = file.read(&mut buf).await?;
        if n == 0 {
            return Ok(hasher.finalize().to_vec());
        }
        hasher.update(&buf[..n]);
    }
}

/// Runs the scan while keeping the entry's idle time low, so no other consumer takes over a
/// long scan. Retries when clamd itself failed (restart, dropped connection).
async fn scan_with_heartbeat(
    shared: &Shared,
    consumer: &Consumer,
    d: &Delivery,
    input: &mut Input<'_>,
) -> Result<ScanReply, ClamdError> {
    let heartbeat = async {
        let period = (shared.config.queue.visibility_timeout / 3).max(Duration::from_millis(100));
        loop {
            tokio::time::sleep(period).await;
            if let Err(e) = consumer.heartbeat(d).await {
                tracing::debug!(error = %e, "heartbeat failed");
            }
        }
    };
    let attempts = async {
        let mut attempt = 1;
        loop {
            let scan_input = match input {
                Input::Bytes(b) => ScanInput::Bytes(b),
                Input::File(f) => ScanInput::File(f),
            };
            let result = match tokio::time::timeout(
                shared.config.scan_timeout,
                shared.clamd.scan(scan_input),
            )
            .await
            {
                Ok(r) => r,
                Err(_) => Err(ClamdError::Timeout(shared.config.scan_timeout)),
            };
            match result {
                Err(e) if attempt < CLAMD_ATTEMPTS && !matches!(e, ClamdError::Input(_)) => {
                    tracing::warn!(error = %e, attempt, "clamd scan failed; retrying");
                    if e.kind() == "connect" {
                        shared.clamd_up.store(false, Ordering::Relaxed);
                    }
                    tokio::time::sleep(Duration::from_millis(250 * u64::from(attempt))).await;
                    attempt += 1;
                }
                other => return other,
            }
        }
    };
    tokio::select! {
        r = attempts => r,
        _ = heartbeat => unreachable!("the heartbeat loop never ends"),
    }
}

/// One structured line per detection, for a SIEM.
fn log_detection(task: &ScanTask, verdict: &Verdict, sha256: Option<&[u8]>) {
    let labels = task.labels.clone().unwrap_or_default();
    tracing::warn!(
        event = "detection",
        task_id = %task.id,
        signature = %verdict.signature,
        sha256 = %sha256.map(hex::encode).unwrap_or_default(),
        tenant = %labels.tenant,
        policy = %labels.policy,
        route = %labels.route,
        direction = labels.direction().as_str_name(),
        client_address = %labels.client_address,
        cached = verdict.cached,
        "infected content detected"
    );
}
