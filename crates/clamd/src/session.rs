//! One clamd connection inside an `IDSESSION`.

use std::io::IoSlice;
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd};
use std::time::Duration;

use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use virus_scanner_protocol::clamd as proto;

use crate::{ClamdAddress, ClamdConfig, ClamdError, EngineVersion, ScanInput, ScanReply};

trait Io: AsyncRead + AsyncWrite + AsFd + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + AsFd + Send + Unpin> Io for T {}

pub(crate) enum Command<'a, 'b> {
    Ping,
    Version,
    Stats,
    Scan(&'a mut ScanInput<'b>),
    /// FILDES: clamd reads the file behind the descriptor itself (Unix socket only).
    ScanFd(BorrowedFd<'b>),
}

pub(crate) enum Output {
    Pong,
    Version(EngineVersion),
    Stats(proto::ThreadPool),
    Scan(ScanReply),
}

pub(crate) struct Session {
    stream: Box<dyn Io>,
    /// Number of the last command sent; clamd numbers replies from 1.
    last_id: u32,
    /// Whether a command already completed on this connection.
    used: bool,
    /// Set when the connection is in an unknown state and must not be reused.
    broken: bool,
    io_timeout: Duration,
    buf: Vec<u8>,
}

impl Session {
    pub(crate) async fn open(
        target: &ClamdAddress,
        config: &ClamdConfig,
    ) -> Result<Session, ClamdError> {
        let address = target.to_string();
        let connect = async {
            let stream: Box<dyn Io> = match target {
                ClamdAddress::Tcp(hostport) => {
                    let s = tokio::net::TcpStream::connect(hostport.as_str()).await?;
                    // Chunk headers are 4-byte writes: Nagle would hold them back.
                    s.set_nodelay(true)?;
                    Box::new(s)
                }
                ClamdAddress::Unix(path) => Box::new(tokio::net::UnixStream::connect(path).await?),
            };
            Ok::<_, std::io::Error>(stream)
        };
        let mut stream = match tokio::time::timeout(config.connect_timeout, connect).await {
            Err(_) => return Err(ClamdError::ConnectTimeout(address)),
            Ok(Err(source)) => return Err(ClamdError::Connect { address, source }),
            Ok(Ok(stream)) => stream,
        };
        timed(config.io_timeout, stream.write_all(proto::IDSESSION)).await?;
        Ok(Session {
            stream,
            last_id: 0,
            used: false,
            broken: false,
            io_timeout: config.io_timeout,
            buf: Vec::new(),
        })
    }

    pub(crate) fn reusable(&self) -> bool {
        !self.broken
    }

    pub(crate) async fn run(
        &mut self,
        command: &mut Command<'_, '_>,
        chunk_size: usize,
    ) -> Result<Output, ClamdError> {
        match command {
            Command::Ping => self.ping().await.map(|()| Output::Pong),
            Command::Version => self.version().await.map(Output::Version),
            Command::Stats => {
                let reply = self.command(proto::STATS).await?;
                Ok(Output::Stats(proto::parse_stats_threads(&reply)?))
            }
            Command::Scan(input) => self.instream(input, chunk_size).await.map(Output::Scan),
            Command::ScanFd(fd) => self.fildes(*fd).await.map(Output::Scan),
        }
    }

    /// Sends `zFILDES`, then one NUL byte carrying the descriptor as `SCM_RIGHTS` (as
    /// clamdscan does: clamd refuses ancillary data that arrives with the command itself),
    /// and reads the verdict.
    async fn fildes(&mut self, fd: BorrowedFd<'_>) -> Result<ScanReply, ClamdError> {
        self.broken = true;
        self.last_id += 1;
        if let Err(e) = timed(self.io_timeout, self.stream.write_all(proto::FILDES)).await {
            return Err(self.mark_stale(e));
        }
        let deadline = tokio::time::Instant::now() + self.io_timeout;
        // One byte on a connection idle but for the command: the socket buffer has room, so
        // the non-blocking send returns at once; the loop only covers a full buffer.
        loop {
            let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
            let mut control = SendAncillaryBuffer::new(&mut space);
            let fds = [fd];
            control.push(SendAncillaryMessage::ScmRights(&fds));
            match rustix::net::sendmsg(
                self.stream.as_fd(),
                &[IoSlice::new(&[0])],
                &mut control,
                SendFlags::NOSIGNAL | SendFlags::DONTWAIT,
            ) {
                Ok(1) => break,
                Ok(_) | Err(rustix::io::Errno::INTR) => {}
                Err(rustix::io::Errno::AGAIN) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                Err(e) => return Err(self.mark_stale(ClamdError::Io(e.into()))),
            }
        }
        let reply = match self.read_reply().await {
            Ok(reply) => reply,
            Err(e) => return Err(self.mark_stale(e)),
        };
        let reply = proto::parse_scan_reply(proto::strip_session_id(&reply, self.last_id)?)?;
        self.broken = matches!(reply, ScanReply::Error(_));
        self.used = true;
        Ok(reply)
    }

    async fn ping(&mut self) -> Result<(), ClamdError> {
        let reply = self.command(proto::PING).await?;
        Ok(proto::parse_ping_reply(&reply)?)
    }

    async fn version(&mut self) -> Result<EngineVersion, ClamdError> {
        let reply = self.command(proto::VERSION).await?;
        Ok(proto::parse_version_reply(&reply)?)
    }

    async fn instream(
        &mut self,
        input: &mut ScanInput<'_>,
        chunk_size: usize,
    ) -> Result<ScanReply, ClamdError> {
        self.broken = true;
        self.last_id += 1;
        let sent = self.send_instream(input, chunk_size).await;
        // The stream stopped short of its end: clamd waits for the rest and has nothing to
        // say. The session is left broken and is dropped.
        if let Err(e @ ClamdError::Input(_)) = sent {
            return Err(e);
        }
        // clamd answers "INSTREAM size limit exceeded" and closes while we are still
        // writing: a failed write may still have a reply waiting.
        let reply = match (sent, self.read_reply().await) {
            (_, Ok(reply)) => reply,
            (Err(e), Err(_)) | (Ok(()), Err(e)) => return Err(self.mark_stale(e)),
        };
        let reply = proto::parse_scan_reply(proto::strip_session_id(&reply, self.last_id)?)?;
        // After a size-limit reply clamd has dropped the connection.
        self.broken = matches!(reply, ScanReply::Unscannable(_) | ScanReply::Error(_));
        self.used = true;
        Ok(reply)
    }

    async fn send_instream(
        &mut self,
        input: &mut ScanInput<'_>,
        chunk_size: usize,
    ) -> Result<(), ClamdError> {
        let io_timeout = self.io_timeout;
        timed(io_timeout, self.stream.write_all(proto::INSTREAM)).await?;
        let chunk_size = chunk_size.clamp(1, u32::MAX as usize);
        match input {
            ScanInput::Bytes(bytes) => {
                for chunk in bytes.chunks(chunk_size) {
                    self.buf.clear();
                    self.buf
                        .extend_from_slice(&proto::chunk_header(chunk.len() as u32));
                    self.buf.extend_from_slice(chunk);
                    timed(io_timeout, self.stream.write_all(&self.buf)).await?;
                }
            }
            ScanInput::File(file) => {
                use tokio::io::AsyncSeekExt;
                file.rewind().await.map_err(ClamdError::Input)?;
                self.send_chunks(&mut **file, chunk_size).await?;
            }
            ScanInput::Reader(reader) => self.send_chunks(&mut **reader, chunk_size).await?,
        }
        timed(io_timeout, self.stream.write_all(&proto::INSTREAM_END)).await?;
        Ok(())
    }

    /// Sends what `reader` yields until its end, one INSTREAM chunk per read.
    async fn send_chunks(
        &mut self,
        reader: &mut (dyn AsyncRead + Send + Unpin),
        chunk_size: usize,
    ) -> Result<(), ClamdError> {
        self.buf.resize(4 + chunk_size, 0);
        loop {
            let n = reader
                .read(&mut self.buf[4..])
                .await
                .map_err(ClamdError::Input)?;
            if n == 0 {
                return Ok(());
            }
            self.buf[..4].copy_from_slice(&proto::chunk_header(n as u32));
            timed(self.io_timeout, self.stream.write_all(&self.buf[..4 + n])).await?;
        }
    }

    async fn command(&mut self, command: &[u8]) -> Result<Vec<u8>, ClamdError> {
        self.broken = true;
        self.last_id += 1;
        if let Err(e) = timed(self.io_timeout, self.stream.write_all(command)).await {
            return Err(self.mark_stale(e));
        }
        let reply = match self.read_reply().await {
            Ok(reply) => reply,
            Err(e) => return Err(self.mark_stale(e)),
        };
        let body = proto::strip_session_id(&reply, self.last_id)?.to_vec();
        self.broken = false;
        self.used = true;
        Ok(body)
    }

    /// On a connection that already served a command, a reset or EOF most likely means clamd
    /// closed it while it sat idle.
    fn mark_stale(&self, e: ClamdError) -> ClamdError {
        let closed = match &e {
            ClamdError::Closed { .. } => true,
            ClamdError::Io(io) => matches!(
                io.kind(),
                std::io::ErrorKind::BrokenPipe
                    | std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::ConnectionAborted
                    | std::io::ErrorKind::UnexpectedEof
            ),
            _ => false,
        };
        if closed && self.used {
            ClamdError::Closed { reused: true }
        } else {
            e
        }
    }

    /// Reads one NUL-terminated reply.
    async fn read_reply(&mut self) -> Result<Vec<u8>, ClamdError> {
        let mut reply = Vec::with_capacity(64);
        let mut byte_buf = [0u8; 256];
        loop {
            let n = timed(self.io_timeout, self.stream.read(&mut byte_buf)).await?;
            if n == 0 {
                return Err(ClamdError::Closed { reused: self.used });
            }
            reply.extend_from_slice(&byte_buf[..n]);
            if let Some(end) = reply.iter().position(|&b| b == 0) {
                reply.truncate(end);
                return Ok(reply);
            }
            if reply.len() > proto::MAX_REPLY_LEN {
                return Err(ClamdError::ReplyTooLong(proto::MAX_REPLY_LEN));
            }
        }
    }
}

async fn timed<T>(
    limit: Duration,
    fut: impl std::future::Future<Output = std::io::Result<T>>,
) -> Result<T, ClamdError> {
    match tokio::time::timeout(limit, fut).await {
        Err(_) => Err(ClamdError::Timeout(limit)),
        Ok(result) => Ok(result?),
    }
}
