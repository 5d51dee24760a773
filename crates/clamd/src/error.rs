use virus_scanner_protocol::clamd::ReplyError;

/// What went wrong talking to clamd. Everything but [`ClamdError::Input`] is the scanner's
/// fault; `Input` is the content to scan failing to read, which another try at clamd cannot
/// mend.
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

    /// Whether the same scan may succeed on another try: clamd restarting, a dropped
    /// connection, a scan that timed out. Not a failed read of the input (the scan would
    /// fail the same way, and a reader cannot be read again), nor a reply clamd should never
    /// have sent.
    pub fn is_retryable(&self) -> bool {
        match self {
            ClamdError::Connect { .. }
            | ClamdError::ConnectTimeout(_)
            | ClamdError::Io(_)
            | ClamdError::Timeout(_)
            | ClamdError::Closed { .. } => true,
            // Retried today as well: a garbled reply most often comes from a connection cut
            // mid-reply.
            ClamdError::ReplyTooLong(_) | ClamdError::Reply(_) => true,
            ClamdError::Input(_) => false,
        }
    }

    /// No connection to clamd could be made: it is down or not there.
    pub fn is_unreachable(&self) -> bool {
        matches!(
            self,
            ClamdError::Connect { .. } | ClamdError::ConnectTimeout(_)
        )
    }

    /// The content to scan could not be read; clamd itself is not at fault.
    pub fn is_input(&self) -> bool {
        matches!(self, ClamdError::Input(_))
    }

    /// What part of the exchange failed, for logs and metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            ClamdError::Connect { .. } | ClamdError::ConnectTimeout(_) => "connect",
            ClamdError::Io(_) | ClamdError::Closed { .. } => "io",
            ClamdError::Timeout(_) => "timeout",
            ClamdError::ReplyTooLong(_) | ClamdError::Reply(_) => "protocol",
            ClamdError::Input(_) => "input",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn io() -> std::io::Error {
        std::io::Error::from(std::io::ErrorKind::ConnectionRefused)
    }

    #[test]
    fn scanner_failures_retry_and_input_failures_do_not() {
        let connect = ClamdError::Connect {
            address: "tcp://x:1".into(),
            source: io(),
        };
        for e in [
            &connect,
            &ClamdError::ConnectTimeout("tcp://x:1".into()),
            &ClamdError::Io(io()),
            &ClamdError::Timeout(Duration::from_secs(1)),
            &ClamdError::Closed { reused: false },
            &ClamdError::ReplyTooLong(1),
        ] {
            assert!(e.is_retryable() && !e.is_input(), "{e}");
        }
        let input = ClamdError::Input(io());
        assert!(!input.is_retryable() && input.is_input());
    }

    #[test]
    fn only_a_failed_connect_means_clamd_is_unreachable() {
        assert!(ClamdError::ConnectTimeout("x".into()).is_unreachable());
        assert!(
            ClamdError::Connect {
                address: "x".into(),
                source: io()
            }
            .is_unreachable()
        );
        assert!(!ClamdError::Io(io()).is_unreachable());
        assert!(!ClamdError::Timeout(Duration::from_secs(1)).is_unreachable());
        assert!(!ClamdError::Input(io()).is_unreachable());
    }

    #[test]
    fn labels() {
        assert_eq!(
            ClamdError::ConnectTimeout("x".into()).metric_label(),
            "connect"
        );
        assert_eq!(ClamdError::Closed { reused: true }.metric_label(), "io");
        assert_eq!(
            ClamdError::Timeout(Duration::from_secs(1)).metric_label(),
            "timeout"
        );
        assert_eq!(ClamdError::ReplyTooLong(1).metric_label(), "protocol");
        assert_eq!(ClamdError::Input(io()).metric_label(), "input");
    }
}
