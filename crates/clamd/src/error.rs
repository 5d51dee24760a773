use virus_scanner_protocol::clamd::ReplyError;

#[derive(Debug, thiserror::Error)]
pub enum ClamdError {
    #[error("cannot connect to clamd at {address}: {source}")]
    Connect {
        address: String,
        source: std::io::Error,
    },
    #[error("connecting to clamd at {0} timed out")]
    ConnectTimeout(String),
    #[error("clamd I/O failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("clamd did not answer within {0:?}")]
    Timeout(std::time::Duration),
    #[error("clamd closed the connection before replying")]
    Closed { reused: bool },
    #[error("clamd reply longer than {0} bytes")]
    ReplyTooLong(usize),
    #[error(transparent)]
    Reply(#[from] ReplyError),
    #[error("reading the file to scan failed: {0}")]
    Input(std::io::Error),
}

impl ClamdError {
    /// True when a pooled session turned out to be closed by clamd before it replied.
    pub(crate) fn is_stale_session(&self) -> bool {
        matches!(self, ClamdError::Closed { reused: true })
    }

    /// Metric label.
    pub fn kind(&self) -> &'static str {
        match self {
            ClamdError::Connect { .. } | ClamdError::ConnectTimeout(_) => "connect",
            ClamdError::Io(_) | ClamdError::Closed { .. } => "io",
            ClamdError::Timeout(_) => "timeout",
            ClamdError::ReplyTooLong(_) | ClamdError::Reply(_) => "protocol",
            ClamdError::Input(_) => "input",
        }
    }
}
