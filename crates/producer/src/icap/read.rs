//! Reading an ICAP request with limits and timeouts: the head, chunk-size lines, chunked
//! bodies. Every length a client controls is bounded, and every read has a deadline.

use std::future::Future;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, BufReader};
use virus_scanner_protocol::icap::{self, Encapsulated, HttpHead, IcapError, RequestHead, Section};

use crate::body::{BodyBuffer, BodyError};

/// Why a connection stops serving requests.
#[derive(Debug, thiserror::Error)]
pub(super) enum ConnError {
    #[error("client closed the connection")]
    Closed,
    #[error("read timed out")]
    Timeout,
    /// The client sent something that is not ICAP: answered 400, then closed.
    #[error("{0}")]
    Protocol(#[from] IcapError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

pub(super) fn body_error(e: BodyError) -> ConnError {
    ConnError::Io(std::io::Error::other(e.to_string()))
}

pub(super) async fn timed<T>(
    limit: Duration,
    f: impl Future<Output = std::io::Result<T>>,
) -> Result<T, ConnError> {
    match tokio::time::timeout(limit, f).await {
        Err(_) => Err(ConnError::Timeout),
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(ConnError::Closed),
        Ok(Err(e)) => Err(ConnError::Io(e)),
        Ok(Ok(v)) => Ok(v),
    }
}

/// Reads an ICAP head: the first byte within `idle` (a persistent connection waiting for
/// its next request), the rest within `read`.
pub(super) async fn read_head<R: AsyncRead + Unpin>(
    reader: &mut BufReader<R>,
    idle: Duration,
    read: Duration,
) -> Result<RequestHead, ConnError> {
    let first = timed(idle, reader.fill_buf()).await?;
    if first.is_empty() {
        return Err(ConnError::Closed);
    }
    let deadline = Instant::now() + read;
    let mut buf = Vec::new();
    loop {
        let old = buf.len();
        let available = reader.buffer();
        let n = available.len();
        buf.extend_from_slice(available);
        // Consume only through the end of the head: what follows belongs to the body.
        match icap::parse_request_head(&buf)? {
            Some((head, used)) => {
                reader.consume(used - old);
                return Ok(head);
            }
            None => reader.consume(n),
        }
        let left = deadline.saturating_duration_since(Instant::now());
        let more = timed(left, reader.fill_buf()).await?;
        if more.is_empty() {
            return Err(ConnError::Closed);
        }
    }
}

/// Reads one CRLF-terminated line of at most `limit` bytes.
async fn read_line<R: AsyncRead + Unpin>(
    reader: &mut BufReader<R>,
    limit: usize,
    timeout: Duration,
) -> Result<Vec<u8>, ConnError> {
    let mut line = Vec::new();
    loop {
        let available = timed(timeout, reader.fill_buf()).await?;
        if available.is_empty() {
            return Err(ConnError::Closed);
        }
        match available.iter().position(|b| *b == b'\n') {
            Some(i) => {
                line.extend_from_slice(&available[..=i]);
                reader.consume(i + 1);
                return Ok(line);
            }
            None => {
                let n = available.len();
                line.extend_from_slice(available);
                reader.consume(n);
            }
        }
        if line.len() > limit {
            return Err(IcapError::Chunk("line too long".into()).into());
        }
    }
}

/// Reads chunks up to and including the last (zero) chunk. Returns whether it carried
/// `ieof`. Past the body limit the data is drained and `too_large` set.
pub(super) async fn read_chunks<R: AsyncRead + Unpin>(
    reader: &mut BufReader<R>,
    buffer: &mut BodyBuffer,
    too_large: &mut bool,
    timeout: Duration,
) -> Result<bool, ConnError> {
    loop {
        let line = read_line(reader, icap::MAX_CHUNK_LINE, timeout).await?;
        let Some((chunk, _)) = icap::parse_chunk_header(&line)? else {
            return Err(IcapError::Chunk("truncated".into()).into());
        };
        if chunk.size == 0 {
            // Trailer fields (rare) end with an empty line.
            loop {
                let trailer = read_line(reader, icap::MAX_CHUNK_LINE, timeout).await?;
                if trailer == b"\r\n" {
                    break;
                }
                if !trailer.ends_with(b"\r\n") {
                    return Err(IcapError::Chunk("malformed trailer".into()).into());
                }
            }
            return Ok(chunk.ieof);
        }
        let mut left = chunk.size;
        while left > 0 {
            let available = timed(timeout, reader.fill_buf()).await?;
            if available.is_empty() {
                return Err(ConnError::Closed);
            }
            let n = available
                .len()
                .min(usize::try_from(left).unwrap_or(usize::MAX));
            if !*too_large {
                match buffer.push(&available[..n]) {
                    Ok(()) => {}
                    Err(BodyError::TooLarge(_)) => *too_large = true,
                    Err(e) => return Err(body_error(e)),
                }
            }
            reader.consume(n);
            left -= n as u64;
        }
        let mut crlf = [0u8; 2];
        timed(timeout, reader.read_exact(&mut crlf)).await?;
        if &crlf != b"\r\n" {
            return Err(IcapError::Chunk("chunk data not followed by CRLF".into()).into());
        }
    }
}

/// The header sections, each parsed as an HTTP head.
pub(super) fn split_sections(
    encapsulated: &Encapsulated,
    area: &[u8],
) -> Result<Vec<(Section, HttpHead)>, IcapError> {
    encapsulated
        .header_ranges()
        .into_iter()
        .map(|(section, range)| Ok((section, icap::parse_http_head(&area[range])?)))
        .collect()
}
