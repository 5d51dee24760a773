//! Scanning one task with clamd: the input opened and measured, the verdict cache consulted,
//! the scan retried while clamd fails, the entry kept alive while it runs.

use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncSeekExt, ReadBuf};
use virus_scanner_clamd::{ClamdError, ScanInput, ScanReply};
use virus_scanner_protocol::task::{Content, Hops, ScanTask, Verdict, VerdictStatus};
use virus_scanner_queue::{Consumer, Delivery, now_ns};

use crate::error::{ConsumerError, InputKind};
use crate::scan_dir::PathRejected;
use crate::state::ConsumerState;

/// Attempts per task when clamd fails before giving an error verdict.
const CLAMD_ATTEMPTS: u32 = 3;

/// The content to scan, opened and measured.
enum Input<'a> {
    Bytes(&'a [u8]),
    /// A spilled file, read anew by each attempt and hashed on its way to clamd (or, passed
    /// to clamd by descriptor, hashed again after the scan); the SHA-256 of the last attempt
    /// that read it to the end unchanged.
    File {
        file: tokio::fs::File,
        sha256: Option<Vec<u8>>,
        /// The file's identity and change times when it was opened.
        opened: Option<FileStamp>,
    },
    /// Chunks in Redis, read anew by each attempt and hashed on their way to clamd; the
    /// SHA-256 of the last attempt that read them to the end.
    Stored {
        sha256: Option<Vec<u8>>,
    },
}

impl Input<'_> {
    fn kind(&self) -> InputKind {
        match self {
            Input::Bytes(_) => InputKind::Bytes,
            Input::File { .. } => InputKind::File,
            Input::Stored { .. } => InputKind::Stored,
        }
    }
}

/// A verdict for a task that failed before clamd saw it, counted.
fn refused(state: &ConsumerState, task: &ScanTask, e: ConsumerError) -> Verdict {
    state.count(&e);
    e.verdict(&task.id)
}

/// Scans the task; returns the verdict and, when it may be cached, the cache key
/// `(db version, sha256)`.
pub(crate) async fn scan(
    state: &ConsumerState,
    consumer: &Consumer,
    d: &Delivery,
    task: &ScanTask,
) -> (Verdict, Option<(String, Vec<u8>)>) {
    let config = state.config();
    let (mut input, size) = match &task.content {
        Some(Content::Body(body)) => (Input::Bytes(body), body.len() as u64),
        Some(Content::Path(path)) => {
            let seed = d.is_legacy();
            let file = match state.open_path(trusted_tenant(d), seed, path) {
                Ok(f) => f,
                Err(e) => {
                    tracing::warn!(task_id = %task.id, error = %e, "refused PATH task");
                    return (refused(state, task, e.into()), None);
                }
            };
            let size = file.metadata().map(|m| m.len()).unwrap_or(0);
            // Only a file clamd will read by descriptor needs the stamp (and its wait).
            let opened = match state.clamd().passes_descriptors() {
                true => settled_stamp(&file).await,
                false => None,
            };
            let file = tokio::fs::File::from_std(file);
            let input = Input::File {
                file,
                sha256: None,
                opened,
            };
            (input, size)
        }
        // The size the chunks must add up to; the reader refuses any other.
        Some(Content::RedisChunks(_)) => (Input::Stored { sha256: None }, task.size),
        None => return (refused(state, task, ConsumerError::NoContent), None),
    };
    // Bodies read from Redis or from the spool: what is scanned must be what the producer
    // hashed, since someone else may have written the key, or replaced the file.
    let hashed_by_producer = matches!(input.kind(), InputKind::Stored | InputKind::File);
    let engine = state.engine();
    if size > config.max_scan_bytes {
        let too_large = ConsumerError::TooLarge {
            size,
            limit: config.max_scan_bytes,
        };
        return (refused(state, task, too_large), None);
    }

    let sha = match &mut input {
        Input::Bytes(b) => Some(Sha256::digest(b).to_vec()),
        // Hashed before the scan for the cache lookup, and again as it streams to clamd.
        Input::File { file, .. } => match hash_file(file).await {
            Ok(sha) if task.sha256.len() == 32 && task.sha256 != sha => {
                return (refused(state, task, not_the_hashed_body(task)), None);
            }
            Ok(sha) => Some(sha),
            Err(e) => {
                return (refused(state, task, ConsumerError::FileUnreadable(e)), None);
            }
        },
        // Hashed as it streams to clamd: reading it from Redis twice would double the
        // traffic. So it is not looked up in the cache before the scan.
        Input::Stored { .. } => None,
    };
    let db_version = engine.as_ref().and_then(|e| e.database.clone());
    // A task whose producer found nothing in the cache as it queued it is not looked up again.
    if let (true, false, Some(db), Some(sha)) =
        (config.cache_enabled, task.cache_checked, &db_version, &sha)
    {
        match consumer.cached_verdict(db, sha).await {
            Ok(Some(mut hit)) => {
                state.metrics().cache_hits.inc();
                hit.cached = true;
                return (hit, Some((db.clone(), sha.clone())));
            }
            Ok(None) => {}
            Err(e) => tracing::debug!(error = %e, "verdict cache lookup failed"),
        }
    }

    let pre_scan_sha = sha.clone();
    let started = Instant::now();
    let scan_started_ns = now_ns();
    let reply = scan_with_heartbeat(state, consumer, d, task, &mut input).await;
    let elapsed = started.elapsed();
    let scan_ended_ns = now_ns();
    let input_kind = input.kind();
    let sha = match input {
        Input::Stored { sha256 } | Input::File { sha256, .. } => sha256,
        Input::Bytes(_) => sha,
    };
    let mut verdict = Verdict {
        engine_version: engine
            .as_ref()
            .map(|e| e.engine.clone())
            .unwrap_or_default(),
        db_version: db_version.clone().unwrap_or_default(),
        scan_time_us: elapsed.as_micros() as u64,
        hops: Some(Hops {
            scan_started_ns,
            scan_ended_ns,
            ..Hops::default()
        }),
        ..Verdict::default()
    };
    let failed = match reply {
        Ok(ScanReply::Clean) => {
            verdict.set_status(VerdictStatus::Clean);
            None
        }
        Ok(ScanReply::Infected(name)) => {
            verdict.set_status(VerdictStatus::Infected);
            verdict.signature = name;
            None
        }
        Ok(ScanReply::Unscannable(why)) => {
            verdict.set_status(VerdictStatus::Unscannable);
            verdict.detail = format!("clamd did not scan everything: {why}");
            verdict.signature = why;
            None
        }
        Ok(ScanReply::Error(msg)) => Some(ConsumerError::ClamdReply(msg)),
        Err(e) => Some(ConsumerError::from_scan(e, input_kind)),
    };
    // Only the bytes its producer hashed may pass: anything else in the body's key (written
    // by someone else), or in the file by the time clamd read it, was not what the gateway
    // holds. A seed's task has no hash: the file must not change between the two readings.
    // An infection stays one, whatever it was found in.
    let failed = failed.or_else(|| {
        if !hashed_by_producer || verdict.status() != VerdictStatus::Clean {
            return None;
        }
        let expected = (task.sha256.len() == 32).then_some(task.sha256.as_slice());
        match input_kind {
            InputKind::Stored => match &sha {
                None => Some("the body stored in Redis was not read to its end"),
                Some(sha) if expected.is_some_and(|e| e != sha.as_slice()) => {
                    Some("the body stored in Redis is not the one its producer hashed")
                }
                Some(_) => None,
            }
            .map(ConsumerError::StoredBodyMismatch),
            // Hashed before the scan, and equal to the producer's hash if the task has one.
            _ => (sha.is_none() || sha != pre_scan_sha).then(|| not_the_hashed_body(task)),
        }
    });
    if let Some(e) = failed {
        state.count(&e);
        verdict.set_status(e.verdict_status());
        verdict.detail = e.to_string();
    }
    if matches!(
        verdict.status(),
        VerdictStatus::Clean | VerdictStatus::Infected
    ) {
        verdict.bytes_scanned = size;
        state.metrics().scanned_bytes.inc_by(size);
        state.metrics().scan_seconds.observe(elapsed.as_secs_f64());
    }
    (verdict, db_version.zip(sha))
}

/// A spilled file whose bytes are not those its producer hashed, or that changed while read.
fn not_the_hashed_body(task: &ScanTask) -> ConsumerError {
    let path = match &task.content {
        Some(Content::Path(p)) => p.clone(),
        _ => String::new(),
    };
    ConsumerError::PathRefused(PathRejected::NotTheHashedBody(path))
}

/// The tenant a task is handled for, which decides the only spool directory its PATH may
/// name: the tenant of the stream it was delivered from, which only that tenant's Redis user
/// can write to, never the tenant the task names.
fn trusted_tenant(d: &Delivery) -> &str {
    &d.tenant
}

/// What changes whenever a file's content does: its identity, size and change times.
#[derive(Debug, PartialEq, Eq)]
struct FileStamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

/// How old a file's last change must be before it is stamped. File systems set change times
/// from a coarse clock (a jiffy, up to 10 ms): a write in the same tick as the stamp could
/// leave the change time as it was.
const STAMP_SETTLED: Duration = Duration::from_millis(20);

async fn file_stamp(file: &tokio::fs::File) -> Option<FileStamp> {
    use std::os::unix::fs::MetadataExt;
    let m = file.metadata().await.ok()?;
    Some(FileStamp {
        dev: m.dev(),
        ino: m.ino(),
        size: m.size(),
        mtime: (m.mtime(), m.mtime_nsec()),
        ctime: (m.ctime(), m.ctime_nsec()),
    })
}

/// The stamp of a file whose last change is at least [`STAMP_SETTLED`] old, waiting for that
/// when it was changed just now (a producer spilled it and queued it a moment ago).
async fn settled_stamp(file: &std::fs::File) -> Option<FileStamp> {
    use std::os::unix::fs::MetadataExt;
    let changed = file.metadata().ok().map(|m| {
        std::time::UNIX_EPOCH + Duration::new(m.ctime().max(0) as u64, m.ctime_nsec() as u32)
    })?;
    let age = std::time::SystemTime::now()
        .duration_since(changed)
        .unwrap_or_default();
    if age < STAMP_SETTLED {
        tokio::time::sleep(STAMP_SETTLED - age).await;
    }
    file_stamp(&tokio::fs::File::from_std(file.try_clone().ok()?)).await
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
/// long scan. Retries while the failure is clamd's and may pass (restart, dropped
/// connection, timeout); a failed read of the input is final.
async fn scan_with_heartbeat(
    state: &ConsumerState,
    consumer: &Consumer,
    d: &Delivery,
    task: &ScanTask,
    input: &mut Input<'_>,
) -> Result<ScanReply, ClamdError> {
    let heartbeat = async {
        let period = (state.config().queue.visibility_timeout / 3).max(Duration::from_millis(100));
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
                Input::Bytes(b) => scan_once(state, ScanInput::Bytes(b)).await,
                // clamd reads the file itself: what it read is known to be what was hashed
                // before only if the file is unchanged after the scan, bytes and change time
                // (a write between the two readings and undone before the second changes the
                // change time, which no writer can set back).
                Input::File {
                    file,
                    sha256,
                    opened: opened @ Some(_),
                } if state.clamd().passes_descriptors() => {
                    let result = scan_once(state, ScanInput::File(file)).await;
                    *sha256 = None;
                    if let (Ok(_), Ok(_)) = (&result, file.rewind().await)
                        && let Ok(sha) = hash_file(file).await
                    {
                        let file = &*file;
                        let unchanged = match (opened.as_ref(), file_stamp(file).await) {
                            (Some(before), Some(after)) => *before == after,
                            _ => false,
                        };
                        *sha256 = unchanged.then_some(sha);
                    }
                    result
                }
                Input::File { file, sha256, .. } => match file.rewind().await {
                    Ok(_) => {
                        let mut body = Hashing::new(&mut *file);
                        let result = scan_once(state, ScanInput::Reader(&mut body)).await;
                        *sha256 = body.finish();
                        result
                    }
                    Err(e) => Err(ClamdError::Input(e)),
                },
                Input::Stored { sha256 } => match consumer.stored_body(d, task) {
                    Some(body) => {
                        let mut body = Hashing::new(body);
                        let result = scan_once(state, ScanInput::Reader(&mut body)).await;
                        *sha256 = body.finish();
                        result
                    }
                    None => Err(ClamdError::Input(std::io::Error::other(
                        "task has no body in Redis",
                    ))),
                },
            };
            match result {
                Err(e) if attempt < CLAMD_ATTEMPTS && e.is_retryable() => {
                    tracing::warn!(error = %e, attempt, "clamd scan failed; retrying");
                    if e.is_unreachable() {
                        state.mark_clamd_down();
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

async fn scan_once(state: &ConsumerState, input: ScanInput<'_>) -> Result<ScanReply, ClamdError> {
    let limit = state.config().scan_timeout;
    match tokio::time::timeout(limit, state.clamd().scan(input)).await {
        Ok(r) => r,
        Err(_) => Err(ClamdError::Timeout(limit)),
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
