//! One worker: claim, scan, answer, repeat.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, ReadBuf};
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
    /// Chunks in Redis, read anew by each attempt and hashed on their way to clamd; the
    /// SHA-256 of the last attempt that read them to the end.
    Stored {
        sha256: Option<Vec<u8>>,
    },
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
        // The size the chunks must add up to; the reader refuses any other.
        Some(Content::RedisChunks(_)) => (Input::Stored { sha256: None }, task.size),
        None => return (Verdict::error(&task.id, "task has no content"), None),
    };
    let stored = matches!(input, Input::Stored { .. });
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
        Input::Bytes(b) => Some(Sha256::digest(b).to_vec()),
        Input::File(f) => match hash_file(f).await {
            Ok(sha) => Some(sha),
            Err(e) => {
                shared.metrics.error("path");
                return (
                    Verdict::error(&task.id, format!("cannot read the file: {e}")),
                    None,
                );
            }
        },
        // Hashed as it streams to clamd: reading it from Redis twice would double the
        // traffic. So it is not looked up in the cache before the scan.
        Input::Stored { .. } => None,
    };
    let db_version = engine.as_ref().and_then(|e| e.database.clone());
    // A task whose producer found nothing in the cache as it queued it is not looked up again.
    if let (true, false, Some(db), Some(sha)) = (
        shared.config.cache_enabled,
        task.cache_checked,
        &db_version,
        &sha,
    ) {
        match consumer.cached_verdict(db, sha).await {
            Ok(Some(mut hit)) => {
                shared.metrics.cache_hits.inc();
                hit.cached = true;
                return (hit, Some((db.clone(), sha.clone())));
            }
            Ok(None) => {}
            Err(e) => tracing::debug!(error = %e, "verdict cache lookup failed"),
        }
    }

    let started = Instant::now();
    let reply = scan_with_heartbeat(shared, consumer, d, task, &mut input).await;
    let elapsed = started.elapsed();
    let sha = match input {
        Input::Stored { sha256 } => sha256,
        _ => sha,
    };
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
        Err(ClamdError::Input(e)) if stored => {
            shared.metrics.error("redis");
            verdict.set_status(VerdictStatus::Error);
            verdict.detail = format!("cannot read the body stored in Redis: {e}");
        }
        Err(e) => {
            shared.metrics.error("clamd");
            verdict.set_status(VerdictStatus::Error);
            verdict.detail = format!("scanner unavailable: {e}");
        }
    }
    // Only the bytes its producer hashed may pass: anything else in the body's key (written
    // by someone else) was not what the gateway holds. An infection stays one, whatever it
    // was found in.
    if stored && verdict.status() == VerdictStatus::Clean {
        let mismatch = match &sha {
            None => Some("the body stored in Redis was not read to its end"),
            Some(sha) if task.sha256.len() == 32 && task.sha256 != *sha => {
                Some("the body stored in Redis is not the one its producer hashed")
            }
            Some(_) => None,
        };
        if let Some(why) = mismatch {
            shared.metrics.error("redis");
            verdict.set_status(VerdictStatus::Error);
            verdict.detail = why.into();
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
    (verdict, db_version.zip(sha))
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
    task: &ScanTask,
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
            let result = match input {
                Input::Bytes(b) => scan_once(shared, ScanInput::Bytes(b)).await,
                Input::File(f) => scan_once(shared, ScanInput::File(f)).await,
                Input::Stored { sha256 } => match consumer.stored_body(task) {
                    Some(body) => {
                        let mut body = Hashing::new(body);
                        let result = scan_once(shared, ScanInput::Reader(&mut body)).await;
                        *sha256 = body.finish();
                        result
                    }
                    None => Err(ClamdError::Input(std::io::Error::other(
                        "task has no body in Redis",
                    ))),
                },
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

async fn scan_once(shared: &Shared, input: ScanInput<'_>) -> Result<ScanReply, ClamdError> {
    match tokio::time::timeout(shared.config.scan_timeout, shared.clamd.scan(input)).await {
        Ok(r) => r,
        Err(_) => Err(ClamdError::Timeout(shared.config.scan_timeout)),
    }
}

/// Hashes what is read through it.
struct Hashing<R> {
    inner: R,
    hasher: Sha256,
    at_end: bool,
}

impl<R: AsyncRead + Unpin> Hashing<R> {
    fn new(inner: R) -> Hashing<R> {
        Hashing {
            inner,
            hasher: Sha256::new(),
            at_end: false,
        }
    }

    /// The SHA-256 of everything read, if it was read to the end.
    fn finish(self) -> Option<Vec<u8>> {
        self.at_end.then(|| self.hasher.finalize().to_vec())
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for Hashing<R> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let room = buf.remaining();
        ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
        let read = &buf.filled()[before..];
        if read.is_empty() && room > 0 {
            this.at_end = true;
        }
        this.hasher.update(read);
        Poll::Ready(Ok(()))
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
