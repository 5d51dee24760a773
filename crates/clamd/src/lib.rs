//! A clamd client for the consumer. Commands run inside `IDSESSION`s that are kept in a small
//! pool, so that a scan does not pay for a new connection; a session clamd closed while it was
//! idle (its `IdleTimeout`) is detected on the next use and the command is retried once on a
//! fresh connection.
#![forbid(unsafe_code)]

mod address;
mod error;
mod session;

pub use address::ClamdAddress;
pub use error::ClamdError;
pub use virus_scanner_protocol::clamd::{EngineVersion, ScanReply, ThreadPool};

use std::sync::Mutex;
use std::time::Duration;

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
}

impl ClamdConfig {
    pub fn new(address: ClamdAddress) -> ClamdConfig {
        ClamdConfig {
            address,
            connect_timeout: Duration::from_secs(2),
            io_timeout: Duration::from_secs(60),
            max_idle_sessions: 16,
            chunk_size: 256 * 1024,
        }
    }
}

pub struct ClamdClient {
    config: ClamdConfig,
    idle: Mutex<Vec<Session>>,
}

impl ClamdClient {
    pub fn new(config: ClamdConfig) -> ClamdClient {
        ClamdClient {
            config,
            idle: Mutex::new(Vec::new()),
        }
    }

    pub fn address(&self) -> &ClamdAddress {
        &self.config.address
    }

    /// Scans the input with INSTREAM.
    pub async fn scan(&self, mut input: ScanInput<'_>) -> Result<ScanReply, ClamdError> {
        match self.run(&mut Command::Scan(&mut input)).await? {
            Output::Scan(reply) => Ok(reply),
            _ => unreachable!("INSTREAM yields a scan reply"),
        }
    }

    pub async fn ping(&self) -> Result<(), ClamdError> {
        self.run(&mut Command::Ping).await.map(|_| ())
    }

    pub async fn version(&self) -> Result<EngineVersion, ClamdError> {
        match self.run(&mut Command::Version).await? {
            Output::Version(version) => Ok(version),
            _ => unreachable!("VERSION yields a version"),
        }
    }

    /// clamd's thread pool (`STATS`), for sizing checks.
    pub async fn threads(&self) -> Result<ThreadPool, ClamdError> {
        match self.run(&mut Command::Stats).await? {
            Output::Stats(threads) => Ok(threads),
            _ => unreachable!("STATS yields the thread pool"),
        }
    }

    /// Runs one command on a pooled session. A failure on a reused session before any reply
    /// arrived is most likely clamd having closed it while idle: retry once on a new one.
    /// A reader cannot be sent again from its start, so it goes to a new session at once: a
    /// retry would send only what the failed attempt had not read.
    async fn run(&self, command: &mut Command<'_, '_>) -> Result<Output, ClamdError> {
        let replayable = !matches!(command, Command::Scan(ScanInput::Reader(_)));
        let idle = if replayable { self.take_idle() } else { None };
        if let Some(mut session) = idle {
            match session.run(command, self.config.chunk_size).await {
                Ok(output) => {
                    self.put_idle(session);
                    return Ok(output);
                }
                Err(e) if e.is_stale_session() => {
                    tracing::debug!(error = %e, "pooled clamd session was closed; reconnecting");
                }
                Err(e) => return Err(e),
            }
        }
        let mut session = Session::open(&self.config).await?;
        let output = session.run(command, self.config.chunk_size).await?;
        self.put_idle(session);
        Ok(output)
    }

    fn take_idle(&self) -> Option<Session> {
        self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop()
    }

    fn put_idle(&self, session: Session) {
        if !session.reusable() {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() < self.config.max_idle_sessions {
            idle.push(session);
        }
    }
}
