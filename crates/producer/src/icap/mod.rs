//! The ICAP service (RFC 3507): OPTIONS, REQMOD and RESPMOD on one service path, behind
//! Squid or any ICAP client, sharing the scan path (queue, cache, metrics, audit log) with
//! ext_proc. Parsing and the bytes of answers live in the protocol crate; here the
//! connection is served ([`read`] with limits and timeouts, [`modify`] for REQMOD and
//! RESPMOD, [`answer`] writing what follows from the verdict).
//!
//! Bodies are always read completely before the verdict (a preview is answered with
//! `100 Continue` unless it already holds the whole body), so an infected body can never be
//! half-forwarded.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{RwLock, Semaphore};
use virus_scanner_protocol::icap::{self, Method};

pub use crate::config::IcapConfig;
use crate::scan::{BodyScan, ScanService};

mod answer;
mod modify;
mod read;

use read::{ConnError, read_head};

/// Request headers that ask for part of a representation (RFC 9110 14.2, 13.1.5).
const RANGE_HEADERS: [&str; 2] = ["range", "if-range"];

pub struct IcapServer<S: BodyScan = ScanService> {
    scan: Arc<S>,
    config: IcapConfig,
    slots: Arc<Semaphore>,
    istag: RwLock<(Instant, String)>,
}

impl<S: BodyScan> IcapServer<S> {
    pub fn new(scan: Arc<S>, config: IcapConfig) -> IcapServer<S> {
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
                let answer =
                    icap::bare_answer(503, "Service Unavailable", &self.istag().await, true);
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
        let (read, write) = stream.into_split();
        self.serve_connection(read, write).await;
    }

    /// Serves the requests of one connection until it closes, fails or idles out.
    pub async fn serve_connection<R, W>(&self, read: R, mut write: W)
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let mut reader = BufReader::with_capacity(64 * 1024, read);
        loop {
            match self.request(&mut reader, &mut write).await {
                Ok(true) => continue,
                Ok(false) => break,
                Err(ConnError::Closed | ConnError::Timeout) => break,
                Err(ConnError::Protocol(e)) => {
                    tracing::info!(error = %e, "malformed ICAP request");
                    self.scan.count_icap("invalid", "invalid");
                    let answer = icap::bare_answer(400, "Bad Request", &self.istag().await, true);
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
        R: AsyncRead + Unpin,
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
            let answer = icap::bare_answer(404, "ICAP Service Not Found", &istag, true);
            // The request may carry a body we will not read: close after answering.
            write.write_all(&answer).await?;
            self.scan.count_icap(head.method.as_str(), "not_found");
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
                self.scan.count_icap("OPTIONS", "options");
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

    /// The ISTag changes with the signature database, so caches in front of us drop
    /// answers given under an older one. Refreshed at most every few seconds.
    async fn istag(&self) -> String {
        {
            let cached = self.istag.read().await;
            if cached.0.elapsed() < Duration::from_secs(5) && !cached.1.is_empty() {
                return cached.1.clone();
            }
        }
        let version = self
            .scan
            .signature_version()
            .await
            .unwrap_or_else(|| "unknown".to_owned());
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

#[cfg(test)]
mod tests;
