//! A clamd client for the consumer. Commands run inside `IDSESSION`s that are kept in a small
//! pool, so that a scan does not pay for a new connection; a session clamd closed while it was
//! idle (its `IdleTimeout`) is detected on the next use and the command is retried once on a
//! fresh connection.
//!
//! Where clamd runs beside the client (same pod or host) and listens on a Unix socket, a scan
//! passes a file descriptor (`FILDES`) instead of streaming the bytes: clamd reads the file
//! itself instead of copying the stream into a temporary file of its own first. Bytes in
//! memory go into a memfd for that. While the socket cannot be reached, scans fall back to
//! INSTREAM on the main address.
#![forbid(unsafe_code)]

mod address;
mod error;
mod session;

pub use address::ClamdAddress;
pub use error::ClamdError;
pub use virus_scanner_protocol::clamd::{EngineVersion, ScanReply, ThreadPool};

use std::io::Write;
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use session::{Command, Output, Session};

/// What INSTREAM sends: bytes in memory, a file read from its start, or a reader read to its
/// end (from where it is). A failed read ends the scan with [`ClamdError::Input`] at once: a
/// partial stream is never finished, so clamd never judges part of the content.
pub enum ScanInput<'a> {
    Bytes(&'a [u8]),
    File(&'a mut tokio::fs::File),
    Reader(&'a mut (dyn tokio::io::AsyncRead + Send + Unpin)),
}

#[derive(Debug, Clone)]
pub struct ClamdConfig {
    pub address: ClamdAddress,
    pub connect_timeout: Duration,
    /// Longest wait for any single read or write, including the wait for the verdict.
    pub io_timeout: Duration,
    /// Idle sessions kept open for reuse.
    pub max_idle_sessions: usize,
    /// Size of each INSTREAM chunk.
    pub chunk_size: usize,
    /// clamd's Unix socket on this host (its `LocalSocket`), for scans by descriptor.
    pub local_socket: Option<PathBuf>,
}

/// After the local socket could not be reached, scans stream over the main address for this
/// long before the socket is tried again.
const LOCAL_RETRY: Duration = Duration::from_secs(5);

impl ClamdConfig {
    pub fn new(address: ClamdAddress) -> ClamdConfig {
        ClamdConfig {
            address,
            connect_timeout: Duration::from_secs(2),
            io_timeout: Duration::from_secs(60),
            max_idle_sessions: 16,
            chunk_size: 256 * 1024,
            local_socket: None,
        }
    }
}

pub struct ClamdClient {
    config: ClamdConfig,
    idle: Mutex<Vec<Session>>,
    local_idle: Mutex<Vec<Session>>,
    /// Until when the local socket is not tried (it could not be reached).
    local_down_until: Mutex<Option<Instant>>,
}

/// Which of clamd's sockets a command goes to.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Target {
    Main,
    Local,
}

impl ClamdClient {
    /// A main address that is a Unix socket is also used for scans by descriptor.
    pub fn new(mut config: ClamdConfig) -> ClamdClient {
        if let (None, ClamdAddress::Unix(path)) = (&config.local_socket, &config.address) {
            config.local_socket = Some(path.clone());
        }
        ClamdClient {
            config,
            idle: Mutex::new(Vec::new()),
            local_idle: Mutex::new(Vec::new()),
            local_down_until: Mutex::new(None),
        }
    }

    /// Whether the next scan of bytes or of a file will pass a descriptor to clamd.
    pub fn passes_descriptors(&self) -> bool {
        self.config.local_socket.is_some()
            && self
                .local_down_until
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .is_none_or(|until| Instant::now() >= until)
    }

    pub fn address(&self) -> &ClamdAddress {
        &self.config.address
    }

    /// Scans the input: bytes and files by descriptor where clamd's local socket answers,
    /// everything else (and everything while it does not) with INSTREAM.
    pub async fn scan(&self, mut input: ScanInput<'_>) -> Result<ScanReply, ClamdError> {
        if self.passes_descriptors() {
            let scanned = match &mut input {
                ScanInput::Bytes(bytes) => match memfd_with(bytes) {
                    Ok(fd) => Some(self.scan_fd(fd.as_fd()).await),
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot make a memfd; streaming to clamd");
                        self.local_down();
                        None
                    }
                },
                ScanInput::File(file) => {
                    use tokio::io::AsyncSeekExt;
                    file.rewind().await.map_err(ClamdError::Input)?;
                    Some(self.scan_fd(file.as_fd()).await)
                }
                ScanInput::Reader(_) => None,
            };
            match scanned {
                Some(Err(e)) if e.is_unreachable() => {
                    tracing::warn!(error = %e, "clamd's local socket is unreachable; streaming to clamd");
                    self.local_down();
                }
                Some(result) => return result,
                None => {}
            }
        }
        match self
            .run(Target::Main, &mut Command::Scan(&mut input))
            .await?
        {
            Output::Scan(reply) => Ok(reply),
            _ => unreachable!("INSTREAM yields a scan reply"),
        }
    }

    async fn scan_fd(&self, fd: std::os::fd::BorrowedFd<'_>) -> Result<ScanReply, ClamdError> {
        match self.run(Target::Local, &mut Command::ScanFd(fd)).await? {
            Output::Scan(reply) => Ok(reply),
            _ => unreachable!("FILDES yields a scan reply"),
        }
    }

    fn local_down(&self) {
        *self
            .local_down_until
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(Instant::now() + LOCAL_RETRY);
    }

    pub async fn ping(&self) -> Result<(), ClamdError> {
        self.run(Target::Main, &mut Command::Ping).await.map(|_| ())
    }

    pub async fn version(&self) -> Result<EngineVersion, ClamdError> {
        match self.run(Target::Main, &mut Command::Version).await? {
            Output::Version(version) => Ok(version),
            _ => unreachable!("VERSION yields a version"),
        }
    }

    /// clamd's thread pool (`STATS`), for sizing checks.
    pub async fn threads(&self) -> Result<ThreadPool, ClamdError> {
        match self.run(Target::Main, &mut Command::Stats).await? {
            Output::Stats(threads) => Ok(threads),
            _ => unreachable!("STATS yields the thread pool"),
        }
    }

    /// Runs one command on a pooled session. A failure on a reused session before any reply
    /// arrived is most likely clamd having closed it while idle: retry once on a new one.
    /// A reader cannot be sent again from its start, so it goes to a new session at once: a
    /// retry would send only what the failed attempt had not read.
    async fn run(
        &self,
        target: Target,
        command: &mut Command<'_, '_>,
    ) -> Result<Output, ClamdError> {
        let replayable = !matches!(command, Command::Scan(ScanInput::Reader(_)));
        let idle = if replayable {
            self.take_idle(target)
        } else {
            None
        };
        if let Some(mut session) = idle {
            match session.run(command, self.config.chunk_size).await {
                Ok(output) => {
                    self.put_idle(target, session);
                    return Ok(output);
                }
                Err(e) if e.is_stale_session() => {
                    tracing::debug!(error = %e, "pooled clamd session was closed; reconnecting");
                }
                Err(e) => return Err(e),
            }
        }
        let address = match (target, &self.config.local_socket) {
            (Target::Local, Some(path)) => &ClamdAddress::Unix(path.clone()),
            _ => &self.config.address,
        };
        let mut session = Session::open(address, &self.config).await?;
        let output = session.run(command, self.config.chunk_size).await?;
        self.put_idle(target, session);
        Ok(output)
    }

    fn pool(&self, target: Target) -> &Mutex<Vec<Session>> {
        match target {
            Target::Main => &self.idle,
            Target::Local => &self.local_idle,
        }
    }

    fn take_idle(&self, target: Target) -> Option<Session> {
        self.pool(target)
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop()
    }

    fn put_idle(&self, target: Target, session: Session) {
        if !session.reusable() {
            return;
        }
        let mut idle = self.pool(target).lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() < self.config.max_idle_sessions {
            idle.push(session);
        }
    }
}

/// An anonymous in-memory file holding `bytes`, for clamd to read by descriptor. Its offset
/// is left at the start: clamd scans from where the descriptor stands.
fn memfd_with(bytes: &[u8]) -> std::io::Result<OwnedFd> {
    let fd = rustix::fs::memfd_create("virus-scanner-scan", rustix::fs::MemfdFlags::CLOEXEC)?;
    let mut file = std::fs::File::from(fd);
    file.write_all(bytes)?;
    rustix::fs::seek(&file, rustix::fs::SeekFrom::Start(0))?;
    Ok(file.into())
}
