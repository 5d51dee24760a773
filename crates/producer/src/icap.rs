//! The ICAP service (RFC 3507): OPTIONS, REQMOD and RESPMOD on one service path, behind
//! Squid or any ICAP client, sharing the scan path (queue, cache, metrics, audit log) with
//! ext_proc. Parsing lives in the protocol crate; this file reads with limits and timeouts
//! and writes the answers.
//!
//! Bodies are always read completely before the verdict (a preview is answered with
//! `100 Continue` unless it already holds the whole body), so an infected body can never be
//! half-forwarded.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{RwLock, Semaphore};
use virus_scanner_protocol::icap::{
    self, Encapsulated, HttpHead, IcapError, Method, RequestHead, Section,
};
use virus_scanner_protocol::task::{Direction, VerdictStatus};

use crate::body::{Body, BodyBuffer, BodyData, BodyError};
use crate::config::RangeRequests;
use crate::headers::HeaderFields;
use crate::metrics::IcapLabels;
use crate::scan::{Decision, Outcome, ScanContext, ScanService};

/// Settings of the ICAP front end.
#[derive(Debug, Clone)]
pub struct IcapConfig {
    pub service_path: String,
    pub max_connections: usize,
    pub preview: u64,
    pub options_ttl: Duration,
    /// How long a persistent connection may wait for its next request.
    pub idle_timeout: Duration,
    /// How long one read inside a request may take (slowloris).
    pub read_timeout: Duration,
    /// HTTP status of the block page for an infected body.
    pub block_status: u16,
}

#[derive(Debug, thiserror::Error)]
enum ConnError {
    #[error("client closed the connection")]
    Closed,
    #[error("read timed out")]
    Timeout,
    #[error("{0}")]
    Protocol(#[from] IcapError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

pub struct IcapServer {
    scan: Arc<ScanService>,
    config: IcapConfig,
    slots: Arc<Semaphore>,
    istag: RwLock<(Instant, String)>,
}

impl IcapServer {
    pub fn new(scan: Arc<ScanService>, config: IcapConfig) -> IcapServer {
        IcapServer {
            slots: Arc::new(Semaphore::new(config.max_connections)),
            scan,
            config,
            istag: RwLock::new((Instant::now() - Duration::from_secs(3600), String::new())),
        }
    }

    /// Accepts connections until `shutdown`.
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) {
        tokio::pin!(shutdown);
        loop {
            let (mut stream, _) = tokio::select! {
                () = &mut shutdown => return,
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!(error = %e, "ICAP accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let _ = stream.set_nodelay(true);
            let Ok(permit) = self.slots.clone().try_acquire_owned() else {
                // Max-Connections is what OPTIONS promised: refuse the extra one plainly.
                let answer = bare_answer(503, "Service Unavailable", &self.istag().await, true);
                tokio::spawn(async move {
                    let _ = stream.write_all(&answer).await;
                    let _ = stream.shutdown().await;
                });
                continue;
            };
            let server = self.clone();
            tokio::spawn(async move {
                server.connection(stream).await;
                drop(permit);
            });
        }
    }

    async fn connection(&self, stream: TcpStream) {
        let (read, mut write) = stream.into_split();
        let mut reader = BufReader::with_capacity(64 * 1024, read);
        loop {
            match self.request(&mut reader, &mut write).await {
                Ok(true) => continue,
                Ok(false) => break,
                Err(ConnError::Closed | ConnError::Timeout) => break,
                Err(ConnError::Protocol(e)) => {
                    tracing::info!(error = %e, "malformed ICAP request");
                    self.count("invalid", "invalid");
                    let answer = bare_answer(400, "Bad Request", &self.istag().await, true);
                    let _ = write.write_all(&answer).await;
                    break;
                }
                Err(ConnError::Io(e)) => {
                    tracing::debug!(error = %e, "ICAP connection failed");
                    break;
                }
            }
        }
        let _ = write.shutdown().await;
    }

    /// Serves one request; `Ok(true)` when the connection stays open for the next.
    async fn request<R, W>(
        &self,
        reader: &mut BufReader<R>,
        write: &mut W,
    ) -> Result<bool, ConnError>
    where
        R: tokio::io::AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let head = read_head(reader, self.config.idle_timeout, self.config.read_timeout).await?;
        tracing::debug!(
            method = head.method.as_str(),
            uri = %head.uri,
            encapsulated = head.headers.get("Encapsulated").unwrap_or_default(),
            preview = head.headers.get("Preview").unwrap_or_default(),
            allow = head.headers.get("Allow").unwrap_or_default(),
            "ICAP request"
        );
        let istag = self.istag().await;
        if head.service_path() != self.config.service_path {
            let answer = bare_answer(404, "ICAP Service Not Found", &istag, true);
            // The request may carry a body we will not read: close after answering.
            write.write_all(&answer).await?;
            self.count(head.method.as_str(), "not_found");
            return Ok(false);
        }
        let keep = !head.wants_close();
        match head.method {
            Method::Options => {
                if let Some(value) = head.headers.get("Encapsulated") {
                    let e = icap::parse_encapsulated(value, Method::Options)?;
                    if e.has_body() {
                        // An opt-body we do not use; its length is unknowable without
                        // reading it, so answer and close.
                        write.write_all(&self.options(&istag)).await?;
                        return Ok(false);
                    }
                }
                write.write_all(&self.options(&istag)).await?;
                self.count("OPTIONS", "options");
                Ok(keep)
            }
            Method::Reqmod | Method::Respmod => {
                let complete = self.modify(&head, &istag, reader, write).await?;
                Ok(keep && complete)
            }
        }
    }

    fn options(&self, istag: &str) -> Vec<u8> {
        let max = self.config.max_connections.to_string();
        let ttl = self.config.options_ttl.as_secs().to_string();
        let preview = self.config.preview.to_string();
        let service = concat!("virus-scanner ", env!("CARGO_PKG_VERSION"));
        icap::response_head(
            200,
            "OK",
            &[
                ("Methods", "REQMOD, RESPMOD"),
                ("Service", service),
                ("ISTag", istag),
                ("Max-Connections", &max),
                ("Options-TTL", &ttl),
                ("Allow", "204"),
                ("Preview", &preview),
                ("Transfer-Preview", "*"),
                ("Encapsulated", "null-body=0"),
            ],
        )
    }

    /// REQMOD or RESPMOD; returns whether the request was read to its end (so the
    /// connection can carry another).
    async fn modify<R, W>(
        &self,
        head: &RequestHead,
        istag: &str,
        reader: &mut BufReader<R>,
        write: &mut W,
    ) -> Result<bool, ConnError>
    where
        R: tokio::io::AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let value = head
            .headers
            .get("Encapsulated")
            .ok_or_else(|| IcapError::Encapsulated("missing".into()))?;
        let encapsulated = icap::parse_encapsulated(value, head.method)?;
        let preview = head.preview()?;
        let mut area = vec![0u8; encapsulated.body.1];
        timed(self.config.read_timeout, reader.read_exact(&mut area)).await?;
        let sections = split_sections(&encapsulated, &area)?;
        let direction = match head.method {
            Method::Respmod => Direction::Response,
            _ => Direction::Request,
        };
        let request = sections.iter().find(|(s, _, _)| *s == Section::ReqHdr);
        let http = sections
            .iter()
            .find(|(s, _, _)| {
                *s == if direction == Direction::Response {
                    Section::ResHdr
                } else {
                    Section::ReqHdr
                }
            })
            .map(|(_, h, _)| h);
        let route = request
            .and_then(|(_, h, _)| h.target())
            .map(|t| t.split('?').next().unwrap_or(t).to_owned())
            .unwrap_or_default();
        let ctx = ScanContext {
            direction,
            // The gateway's priority header, in the encapsulated HTTP request (or on the
            // ICAP request itself, for clients that promote it).
            priority: self.scan.config.priority(
                request
                    .and_then(|(_, h, _)| h.headers.get(&self.scan.config.priority_header))
                    .or_else(|| head.headers.get(&self.scan.config.priority_header)),
            ),
            route,
            client_address: head
                .headers
                .get("X-Client-IP")
                .unwrap_or_default()
                .to_owned(),
            request_id: String::new(),
            mode: "icap",
        };
        let method = head.method.as_str();
        let fields = |h: &HttpHead| {
            let mut f = HeaderFields::read(
                h.headers
                    .0
                    .iter()
                    .map(|(k, v)| (k.as_str(), Cow::Borrowed(v.as_str()))),
                &self.scan.config.priority_header,
            );
            if direction == Direction::Response {
                f.status = h.start_line.split(' ').nth(1).map(str::to_owned);
            }
            f
        };

        let asks_for_range =
            direction == Direction::Request && request.is_some_and(|(_, h, _)| fields(h).range);
        if asks_for_range {
            match self.scan.config.range_requests {
                RangeRequests::Allow => {}
                RangeRequests::Refuse => {
                    let outcome = self.scan.decide(
                        virus_scanner_protocol::task::Verdict {
                            status: VerdictStatus::Unscannable as i32,
                            detail: "parts of a file cannot be scanned; request the whole file"
                                .into(),
                            ..Default::default()
                        },
                        None,
                        String::new(),
                    );
                    write
                        .write_all(&block_page(istag, 416, &outcome, false, ""))
                        .await?;
                    write.flush().await?;
                    self.count(method, "range_refused");
                    // A body that was not read ends the connection.
                    return Ok(!encapsulated.has_body());
                }
                // Only a bodiless request asks for a range (RFC 9110 14.2: GET); its head is
                // answered without Range and If-Range, so the origin sends the whole file.
                RangeRequests::Strip if !encapsulated.has_body() => {
                    self.answer_without_range(istag, &encapsulated, &area, write)
                        .await?;
                    self.count(method, "clean");
                    return Ok(true);
                }
                RangeRequests::Strip => {}
            }
        }

        if !encapsulated.has_body() {
            // Nothing to scan: a bodiless message is clean.
            self.answer_unmodified(head, istag, &encapsulated, &area, None, write)
                .await?;
            self.count(method, "clean");
            return Ok(true);
        }

        let mut buffer = BodyBuffer::new(self.scan.limits.clone());
        let mut too_large = false;
        let ended_early = read_chunks(
            reader,
            &mut buffer,
            &mut too_large,
            self.config.read_timeout,
        )
        .await?;
        let complete = match (preview, ended_early) {
            // The preview held the whole body.
            (Some(_), true) => true,
            (Some(_), false) if !too_large => {
                write.write_all(b"ICAP/1.0 100 Continue\r\n\r\n").await?;
                write.flush().await?;
                read_chunks(
                    reader,
                    &mut buffer,
                    &mut too_large,
                    self.config.read_timeout,
                )
                .await?;
                true
            }
            // Over the limit during the preview: the rest was never asked for.
            (Some(_), false) => false,
            (None, _) => true,
        };
        let headers = http.map(|h| fields(h).body_headers()).unwrap_or_default();
        let outcome = if too_large {
            self.scan.refuse_unscanned(
                format!("body larger than {} bytes", self.scan.limits.max),
                &ctx,
            )
        } else {
            match buffer.finish() {
                Ok(body) => {
                    let outcome = self.scan.scan(&body, &headers, &ctx).await;
                    return self
                        .answer(
                            head,
                            istag,
                            &encapsulated,
                            &area,
                            &body,
                            outcome,
                            write,
                            complete,
                        )
                        .await;
                }
                Err(e) => self.scan.decide(
                    virus_scanner_protocol::task::Verdict::error("", e.to_string()),
                    None,
                    String::new(),
                ),
            }
        };
        let empty = Body::from_vec(Vec::new(), &self.scan.limits).map_err(body_error)?;
        self.answer(
            head,
            istag,
            &encapsulated,
            &area,
            &empty,
            outcome,
            write,
            complete,
        )
        .await
    }

    #[allow(clippy::too_many_arguments)]
    async fn answer<W: AsyncWrite + Unpin>(
        &self,
        head: &RequestHead,
        istag: &str,
        encapsulated: &Encapsulated,
        area: &[u8],
        body: &Body,
        outcome: Outcome,
        write: &mut W,
        complete: bool,
    ) -> Result<bool, ConnError> {
        let method = head.method.as_str();
        let status = outcome.verdict.status();
        match outcome.decision {
            Decision::Allow if complete => {
                self.answer_unmodified(head, istag, encapsulated, area, Some(body), write)
                    .await?;
            }
            Decision::Allow => {
                // Allowed unscannable, but we hold only part of it: the client must not
                // get a truncated body back. Error out; a proxy with bypass=off refuses.
                write.write_all(&self.error(istag)).await?;
            }
            Decision::Block { .. }
                if matches!(status, VerdictStatus::Error | VerdictStatus::Unspecified) =>
            {
                // Scanner error or timeout: ICAP 500, which a proxy with bypass=off turns
                // into a refusal.
                write.write_all(&self.error(istag)).await?;
            }
            Decision::Block {
                status: http_status,
            } => {
                let infected = status == VerdictStatus::Infected;
                let code = if infected {
                    self.config.block_status
                } else {
                    http_status
                };
                write
                    .write_all(&block_page(
                        istag,
                        code,
                        &outcome,
                        infected,
                        &file_name(area, encapsulated),
                    ))
                    .await?;
            }
        }
        write.flush().await?;
        self.count(method, status.label());
        Ok(complete)
    }

    /// 204 when the client allows it, else the original message echoed.
    async fn answer_unmodified<W: AsyncWrite + Unpin>(
        &self,
        head: &RequestHead,
        istag: &str,
        encapsulated: &Encapsulated,
        area: &[u8],
        body: Option<&Body>,
        write: &mut W,
    ) -> Result<(), ConnError> {
        if head.allows_204() {
            write
                .write_all(&icap::response_head(204, "No Content", &[("ISTag", istag)]))
                .await?;
            write.flush().await?;
            return Ok(());
        }
        // A RESPMOD answer carries the response only (RFC 3507 4.4.1): the req-hdr the
        // client sent for context is not echoed.
        let keep = if head.method == Method::Respmod {
            Section::ResHdr
        } else {
            Section::ReqHdr
        };
        let mut echoed = Vec::new();
        let mut sections = Vec::new();
        for (section, range) in encapsulated.header_ranges() {
            if section == keep {
                sections.push((section, echoed.len()));
                echoed.extend_from_slice(&area[range]);
            }
        }
        let echo = Encapsulated {
            headers: sections,
            body: (encapsulated.body.0, echoed.len()),
        };
        let value = encapsulated_value(&echo);
        write
            .write_all(&icap::response_head(
                200,
                "OK",
                &[("ISTag", istag), ("Encapsulated", &value)],
            ))
            .await?;
        write.write_all(&echoed).await?;
        if let Some(body) = body.filter(|_| encapsulated.has_body()) {
            write_chunked(body, write).await?;
        }
        write.flush().await?;
        Ok(())
    }

    /// REQMOD of a request for part of a file: the request head is sent back without
    /// `Range` and `If-Range`.
    async fn answer_without_range<W: AsyncWrite + Unpin>(
        &self,
        istag: &str,
        encapsulated: &Encapsulated,
        area: &[u8],
        write: &mut W,
    ) -> Result<(), ConnError> {
        let mut echoed = Vec::new();
        let mut sections = Vec::new();
        for (section, range) in encapsulated.header_ranges() {
            if section == Section::ReqHdr {
                sections.push((section, echoed.len()));
                echoed.extend(icap::remove_header_fields(
                    &area[range],
                    &["range", "if-range"],
                ));
            }
        }
        let echo = Encapsulated {
            headers: sections,
            body: (Section::NullBody, echoed.len()),
        };
        let value = encapsulated_value(&echo);
        write
            .write_all(&icap::response_head(
                200,
                "OK",
                &[("ISTag", istag), ("Encapsulated", &value)],
            ))
            .await?;
        write.write_all(&echoed).await?;
        write.flush().await?;
        Ok(())
    }

    fn error(&self, istag: &str) -> Vec<u8> {
        bare_answer(500, "Server Error", istag, false)
    }

    fn count(&self, method: &'static str, verdict: &'static str) {
        self.scan
            .metrics
            .icap_requests
            .get_or_create(&IcapLabels { method, verdict })
            .inc();
    }

    /// The ISTag changes with the signature database, so caches in front of us drop
    /// answers given under an older one. Refreshed at most every few seconds.
    async fn istag(&self) -> String {
        {
            let cached = self.istag.read().await;
            if cached.0.elapsed() < Duration::from_secs(5) && !cached.1.is_empty() {
                return cached.1.clone();
            }
        }
        let version = match self.scan.producer.db_version().await {
            Ok(Some(v)) => v,
            _ => "unknown".to_owned(),
        };
        // ISTag is a quoted string of at most 32 characters (RFC 3507 4.7).
        let tag: String = format!("VS-{version}")
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '.')
            .take(30)
            .collect();
        let tag = format!("\"{tag}\"");
        *self.istag.write().await = (Instant::now(), tag.clone());
        tag
    }
}

/// An answer without an encapsulated message; `close` when the connection ends after it.
fn bare_answer(status: u16, reason: &str, istag: &str, close: bool) -> Vec<u8> {
    let mut headers = vec![("ISTag", istag), ("Encapsulated", "null-body=0")];
    if close {
        headers.push(("Connection", "close"));
    }
    icap::response_head(status, reason, &headers)
}

fn body_error(e: BodyError) -> ConnError {
    ConnError::Io(std::io::Error::other(e.to_string()))
}

async fn timed<T>(
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
async fn read_head<R: tokio::io::AsyncRead + Unpin>(
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
async fn read_line<R: tokio::io::AsyncRead + Unpin>(
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
async fn read_chunks<R: tokio::io::AsyncRead + Unpin>(
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
fn split_sections(
    encapsulated: &Encapsulated,
    area: &[u8],
) -> Result<Vec<(Section, HttpHead, std::ops::Range<usize>)>, IcapError> {
    encapsulated
        .header_ranges()
        .into_iter()
        .map(|(section, range)| {
            let head = icap::parse_http_head(&area[range.clone()])?;
            Ok((section, head, range))
        })
        .collect()
}

fn encapsulated_value(e: &Encapsulated) -> String {
    e.headers
        .iter()
        .map(|(s, o)| format!("{}={o}", s.name()))
        .chain(std::iter::once(format!("{}={}", e.body.0.name(), e.body.1)))
        .collect::<Vec<_>>()
        .join(", ")
}

async fn write_chunked<W: AsyncWrite + Unpin>(body: &Body, write: &mut W) -> Result<(), ConnError> {
    let mut out = Vec::with_capacity(64 * 1024 + 32);
    match &body.data {
        BodyData::Memory(bytes) => {
            for piece in bytes.chunks(64 * 1024) {
                out.clear();
                icap::chunk(piece, &mut out);
                write.write_all(&out).await?;
            }
        }
        BodyData::Spilled(spill) => {
            let mut file = tokio::fs::File::open(spill.path()).await?;
            let mut piece = vec![0u8; 256 * 1024];
            loop {
                let n = file.read(&mut piece).await?;
                if n == 0 {
                    break;
                }
                out.clear();
                icap::chunk(&piece[..n], &mut out);
                write.write_all(&out).await?;
            }
        }
    }
    write.write_all(icap::LAST_CHUNK).await?;
    Ok(())
}

/// The URL's last path segment, for `X-Violations-Found`.
fn file_name(area: &[u8], encapsulated: &Encapsulated) -> String {
    encapsulated
        .header_ranges()
        .into_iter()
        .find(|(s, _)| *s == Section::ReqHdr)
        .and_then(|(_, r)| icap::parse_http_head(&area[r]).ok())
        .and_then(|h| h.target().map(str::to_owned))
        .map(|t| {
            let path = t.split('?').next().unwrap_or(&t).to_owned();
            path.rsplit('/').next().unwrap_or(&path).to_owned()
        })
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| "-".to_owned())
}

fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// The HTTP response that replaces a blocked message, inside an ICAP 200.
fn block_page(istag: &str, code: u16, outcome: &Outcome, infected: bool, file: &str) -> Vec<u8> {
    let threat = icap::sanitize(&outcome.verdict.signature);
    let (reason, title, text) = if infected {
        (
            "Forbidden",
            "Virus found",
            format!(
                "The content was blocked: it contains <b>{}</b>.",
                html_escape(&threat)
            ),
        )
    } else {
        (
            "Content Not Scanned",
            "Content not scanned",
            format!(
                "The content was blocked because it could not be scanned: {}.",
                html_escape(&icap::sanitize(&outcome.verdict.detail))
            ),
        )
    };
    let page = format!(
        "<!DOCTYPE html>\n<html><head><title>{title}</title></head><body><h1>{title}</h1><p>{text}</p><p>Task {}</p></body></html>\n",
        html_escape(&outcome.task_id)
    );
    let mut http = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: text/html; charset=utf-8\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n",
        page.len()
    );
    if infected {
        http.push_str(&format!(
            "X-Virus-Infected: true\r\nX-Virus-Name: {threat}\r\n"
        ));
    }
    http.push_str("\r\n");
    let value = format!("res-hdr=0, res-body={}", http.len());
    let infection = icap::infection_found(&threat);
    let violations = icap::violations_found(file, &threat);
    let mut headers: Vec<(&str, &str)> = vec![("ISTag", istag), ("Encapsulated", &value)];
    if infected {
        headers.push(("X-Infection-Found", &infection));
        headers.push(("X-Violations-Found", &violations));
    }
    let mut out = icap::response_head(200, "OK", &headers);
    out.extend_from_slice(http.as_bytes());
    icap::chunk(page.as_bytes(), &mut out);
    out.extend_from_slice(icap::LAST_CHUNK);
    out
}
