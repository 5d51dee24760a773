//! Spilled bodies sent through Redis, for producers whose scan directory no consumer can open
//! (a pod-local spool). The producer copies the file into the fields `0`, `1`, … of the hash
//! `{p}:body:<tenant>:<task id>`, one chunk at a time, and the consumer streams them to clamd
//! one at a time: neither side holds the whole body. Each field stays far below Redis's
//! `proto-max-bulk-len` (512 MiB), and a hash has no size limit of its own, so any body up
//! to the producer's `MAX_BODY_MB` fits.
//!
//! The hash is removed by the consumer in the script that writes the verdict, by the producer
//! whenever it stops waiting (verdict, deadline, client gone, error), and by its TTL (the
//! task's deadline and a grace period) when both were killed.

use std::future::Future;
use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use redis::aio::ConnectionManager;
use tokio::io::{AsyncRead, AsyncReadExt, ReadBuf};
use virus_scanner_protocol::task::{Content, RedisChunks};

use crate::QueueError;

/// Size of the chunks a producer writes: a few round trips per 10 MiB, and little memory per
/// upload in a sidecar.
pub const CHUNK_BYTES: usize = 2 << 20;

/// Largest chunk a consumer reads. Checked in Redis before the chunk is sent, so that a
/// task cannot make a consumer take a 512 MiB value into memory.
pub const MAX_CHUNK_BYTES: usize = 16 << 20;

/// How long a stored body outlives its task's deadline: a scan that began just before the
/// deadline still reads it to the end.
const GRACE: Duration = Duration::from_secs(60);

/// One chunk, if it is not larger than the limit. KEYS: the body hash. ARGV: field, limit.
const READ_CHUNK_SCRIPT: &str = r"
local len = redis.call('HSTRLEN', KEYS[1], ARGV[1])
if len > tonumber(ARGV[2]) then
  return redis.error_reply('chunk ' .. ARGV[1] .. ' of ' .. KEYS[1] .. ' has ' .. len .. ' bytes, more than ' .. ARGV[2])
end
return redis.call('HGET', KEYS[1], ARGV[1])
";

/// A body the producer stored in Redis. Dropping it removes the hash: on every path out of a
/// scan (verdict, deadline, client gone, error) the producer stops holding Redis memory.
pub struct StoredBody {
    conn: ConnectionManager,
    key: String,
    count: u32,
}

impl std::fmt::Debug for StoredBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoredBody")
            .field("key", &self.key)
            .field("count", &self.count)
            .finish()
    }
}

impl StoredBody {
    /// The task content that points a consumer at this body.
    pub fn content(&self) -> Content {
        Content::RedisChunks(RedisChunks { count: self.count })
    }

    pub fn key(&self) -> &str {
        &self.key
    }
}

impl Drop for StoredBody {
    fn drop(&mut self) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let mut conn = self.conn.clone();
        let key = std::mem::take(&mut self.key);
        // The TTL removes the hash if this never runs (the process is stopping).
        runtime.spawn(async move {
            let removed: redis::RedisResult<i64> =
                redis::cmd("UNLINK").arg(&key).query_async(&mut conn).await;
            if let Err(e) = removed {
                tracing::debug!(error = %e, key, "cannot remove a stored body; its TTL will");
            }
        });
    }
}

/// Copies the `size` bytes of the file at `path` into the hash `key`, chunk by chunk, before
/// `deadline`.
pub(crate) async fn store(
    conn: &ConnectionManager,
    key: String,
    path: &Path,
    size: u64,
    deadline: Instant,
) -> Result<StoredBody, QueueError> {
    let ttl = deadline.saturating_duration_since(Instant::now()) + GRACE;
    let mut stored = StoredBody {
        conn: conn.clone(),
        key,
        count: 0,
    };
    let mut conn = conn.clone();
    let key = stored.key.clone();
    let upload = async {
        let mut file = tokio::fs::File::open(path)
            .await
            .map_err(QueueError::Body)?;
        let mut chunk = vec![0u8; CHUNK_BYTES.min(size as usize)];
        let mut count: u32 = 0;
        let mut total = 0u64;
        loop {
            let n = read_full(&mut file, &mut chunk)
                .await
                .map_err(QueueError::Body)?;
            if n == 0 {
                break;
            }
            total += n as u64;
            if total > size {
                break;
            }
            // The TTL comes with every chunk, in one transaction: no chunk is ever left
            // without one, whatever happens to this connection.
            if count >= crate::functions::MAX_CHUNKS {
                return Err(QueueError::Config(format!(
                    "a body of more than {} chunks cannot be sent through Redis",
                    crate::functions::MAX_CHUNKS
                )));
            }
            // The TTL comes with every chunk, in one function call: no chunk is ever left
            // without one, whatever happens to this connection.
            let _: i64 = redis::cmd("FCALL")
                .arg(crate::functions::STORE_CHUNK)
                .arg(1)
                .arg(&key)
                .arg(count)
                .arg(&chunk[..n])
                .arg(ttl.as_millis().max(1) as u64)
                .query_async(&mut conn)
                .await?;
            count = count.checked_add(1).ok_or_else(|| {
                QueueError::Body(io::Error::other("body has too many chunks for one task"))
            })?;
        }
        if total != size {
            return Err(QueueError::Body(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("the spilled file holds {total} bytes or more, the body {size}"),
            )));
        }
        Ok(count)
    };
    stored.count = tokio::time::timeout_at(deadline.into(), upload)
        .await
        .map_err(|_| QueueError::DeadlineExceeded)??;
    Ok(stored)
}

/// Reads until `buf` is full or the file ends.
async fn read_full(file: &mut tokio::fs::File, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match file.read(&mut buf[filled..]).await? {
            0 => break,
            n => filled += n,
        }
    }
    Ok(filled)
}

type ChunkFuture = Pin<Box<dyn Future<Output = redis::RedisResult<Option<Vec<u8>>>> + Send>>;

/// The chunks of a stored body as one byte stream, fetched one at a time. Ends with an error,
/// never early: a missing chunk (expired, or removed by a producer that gave up) or a total
/// other than the task's size is an error, so a truncated body can never be scanned clean.
pub struct StoredBodyReader {
    conn: ConnectionManager,
    script: Arc<redis::Script>,
    key: String,
    count: u32,
    next: u32,
    size: u64,
    received: u64,
    chunk: Vec<u8>,
    pos: usize,
    fetching: Option<ChunkFuture>,
}

impl StoredBodyReader {
    pub(crate) fn new(
        conn: ConnectionManager,
        script: Arc<redis::Script>,
        key: String,
        count: u32,
        size: u64,
    ) -> StoredBodyReader {
        StoredBodyReader {
            conn,
            script,
            key,
            count,
            next: 0,
            size,
            received: 0,
            chunk: Vec::new(),
            pos: 0,
            fetching: None,
        }
    }

    pub(crate) fn read_chunk_script() -> redis::Script {
        redis::Script::new(READ_CHUNK_SCRIPT)
    }
}

fn fetch_chunk(
    conn: &ConnectionManager,
    script: &Arc<redis::Script>,
    key: &str,
    field: u32,
) -> ChunkFuture {
    let mut conn = conn.clone();
    let script = script.clone();
    let key = key.to_owned();
    Box::pin(async move {
        script
            .key(key)
            .arg(field)
            .arg(MAX_CHUNK_BYTES)
            .invoke_async(&mut conn)
            .await
    })
}

impl AsyncRead for StoredBodyReader {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.pos < this.chunk.len() {
                let n = buf.remaining().min(this.chunk.len() - this.pos);
                buf.put_slice(&this.chunk[this.pos..this.pos + n]);
                this.pos += n;
                return Poll::Ready(Ok(()));
            }
            // Every chunk but the last is full: a body cut into many small chunks (slow to
            // read, holding a scan slot) is refused before any is read.
            if this.next == 0 && u64::from(this.count) != this.size.div_ceil(CHUNK_BYTES as u64) {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "{} claims {} chunks for {} bytes; bodies are sent in chunks of {CHUNK_BYTES}",
                        this.key, this.count, this.size
                    ),
                )));
            }
            if this.next == this.count {
                if this.received != this.size {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!(
                            "{} holds {} bytes, the task {}",
                            this.key, this.received, this.size
                        ),
                    )));
                }
                return Poll::Ready(Ok(()));
            }
            let fetching = this
                .fetching
                .get_or_insert_with(|| fetch_chunk(&this.conn, &this.script, &this.key, this.next));
            let fetched = ready!(fetching.as_mut().poll(cx));
            this.fetching = None;
            let chunk = match fetched {
                Ok(Some(chunk)) => chunk,
                Ok(None) => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::NotFound,
                        format!(
                            "chunk {} of {} is missing: expired, or removed by its producer",
                            this.next, this.key
                        ),
                    )));
                }
                Err(e) => return Poll::Ready(Err(io::Error::other(e))),
            };
            if this.next + 1 < this.count && chunk.len() != CHUNK_BYTES {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "chunk {} of {} has {} bytes, not {CHUNK_BYTES}",
                        this.next,
                        this.key,
                        chunk.len()
                    ),
                )));
            }
            this.received += chunk.len() as u64;
            if this.received > this.size {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "{} holds more than the task's {} bytes",
                        this.key, this.size
                    ),
                )));
            }
            this.next += 1;
            this.chunk = chunk;
            this.pos = 0;
        }
    }
}
