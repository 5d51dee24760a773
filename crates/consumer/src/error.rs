//! The consumer's failures, by where they came from. The origin and [`ConsumerError::is_retryable`]
//! decide what happens: a retry (clamd or Redis may come back), or a verdict for the task
//! (`error`, or `unscannable` for a body over the limit), which the producer turns into its
//! fail-closed answer. Each kind is counted under the `kind` label of
//! `virus_scanner_consumer_errors_total`.

use std::net::SocketAddr;
use std::path::PathBuf;

use virus_scanner_clamd::ClamdError;
use virus_scanner_protocol::task::{Verdict, VerdictStatus};
use virus_scanner_queue::QueueError;

use crate::scan_dir::PathRejected;

/// Where a failure came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// The task or its body: what was sent is at fault, and stays so.
    Client,
    /// clamd: unreachable, failing, or saying it failed.
    Scanner,
    /// Redis, or what it held.
    Queue,
    /// This process.
    Internal,
}

/// A failure while consuming tasks.
#[derive(Debug, thiserror::Error)]
pub enum ConsumerError {
    /// A stream entry or a legacy task that does not decode; there is no task to answer.
    #[error("{0}")]
    Undecodable(String),
    #[error("task has no content")]
    NoContent,
    #[error(transparent)]
    PathRefused(#[from] PathRejected),
    #[error("cannot read the file: {0}")]
    FileUnreadable(std::io::Error),
    #[error("{size} bytes is more than the scan limit of {limit} bytes")]
    TooLarge { size: u64, limit: u64 },
    #[error("deadline passed before the scan; not scanned")]
    Expired,
    /// clamd answered the scan with an error of its own.
    #[error("clamd: {0}")]
    ClamdReply(String),
    #[error("scanner unavailable: {0}")]
    Clamd(ClamdError),
    /// A body stored in Redis that could not be read to its end.
    #[error("cannot read the body stored in Redis: {0}")]
    StoredBody(std::io::Error),
    /// A body stored in Redis that was read, but is not the one its producer hashed.
    #[error("{0}")]
    StoredBodyMismatch(&'static str),
    #[error(transparent)]
    Queue(#[from] QueueError),
}

impl ConsumerError {
    pub fn origin(&self) -> Origin {
        match self {
            ConsumerError::Undecodable(_)
            | ConsumerError::NoContent
            | ConsumerError::PathRefused(_)
            | ConsumerError::FileUnreadable(_)
            | ConsumerError::TooLarge { .. } => Origin::Client,
            ConsumerError::ClamdReply(_) | ConsumerError::Clamd(_) => Origin::Scanner,
            ConsumerError::Expired
            | ConsumerError::StoredBody(_)
            | ConsumerError::StoredBodyMismatch(_)
            | ConsumerError::Queue(_) => Origin::Queue,
        }
    }

    /// Whether the same work may succeed if tried again: clamd or Redis coming back. A task's
    /// own fault, an expired task or clamd's own error reply is answered at once.
    pub fn is_retryable(&self) -> bool {
        match self {
            ConsumerError::Clamd(e) => e.is_retryable(),
            ConsumerError::Queue(e) => e.is_retryable(),
            _ => false,
        }
    }

    /// The `kind` label it is counted under, if it is counted: a body over the limit is an
    /// `unscannable` verdict, an expired task is counted in `expired_tasks`.
    pub fn metric_label(&self) -> Option<&'static str> {
        match self {
            ConsumerError::Undecodable(_) => Some("decode"),
            ConsumerError::PathRefused(_) | ConsumerError::FileUnreadable(_) => Some("path"),
            ConsumerError::ClamdReply(_) | ConsumerError::Clamd(_) => Some("clamd"),
            ConsumerError::StoredBody(_)
            | ConsumerError::StoredBodyMismatch(_)
            | ConsumerError::Queue(_) => Some("redis"),
            ConsumerError::NoContent | ConsumerError::TooLarge { .. } | ConsumerError::Expired => {
                None
            }
        }
    }

    /// The status of the verdict that answers a task that failed this way: only a body over
    /// the size limit is `unscannable`, everything else an `error`; neither passes unless the
    /// policy fails open.
    pub fn verdict_status(&self) -> VerdictStatus {
        match self {
            ConsumerError::TooLarge { .. } => VerdictStatus::Unscannable,
            _ => VerdictStatus::Error,
        }
    }

    /// The verdict that answers the task `task_id`.
    pub fn verdict(&self, task_id: &str) -> Verdict {
        let mut verdict = Verdict::error(task_id, self.to_string());
        verdict.set_status(self.verdict_status());
        if let ConsumerError::TooLarge { .. } = self {
            verdict.signature = "size-limit".into();
        }
        verdict
    }

    /// A scan that ended in `e`, reading `input`: a failed read of the input is the input's
    /// fault (a spilled file, or a body stored in Redis), anything else clamd's.
    pub(crate) fn from_scan(e: ClamdError, input: InputKind) -> ConsumerError {
        match (e, input) {
            (ClamdError::Input(io), InputKind::Stored) => ConsumerError::StoredBody(io),
            (ClamdError::Input(io), InputKind::File) => ConsumerError::FileUnreadable(io),
            (e, _) => ConsumerError::Clamd(e),
        }
    }
}

/// Where the bytes of a scan come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum InputKind {
    Bytes,
    File,
    Stored,
}

/// Why the consumer could not start.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("SCAN_TMP_DIR {path}: {source}", path = .path.display())]
    ScanDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("METRICS_ADDR {addr}: {source}")]
    MetricsAddr {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn io() -> std::io::Error {
        std::io::Error::from(std::io::ErrorKind::ConnectionRefused)
    }

    fn redis_down() -> QueueError {
        QueueError::Redis(io().into())
    }

    fn clamd_down() -> ClamdError {
        ClamdError::Connect {
            address: "tcp://127.0.0.1:1".into(),
            source: io(),
        }
    }

    #[test]
    fn clamd_and_redis_outages_are_retried() {
        for e in [
            ConsumerError::Clamd(clamd_down()),
            ConsumerError::Clamd(ClamdError::Timeout(Duration::from_secs(1))),
            ConsumerError::Clamd(ClamdError::Closed { reused: false }),
            ConsumerError::Queue(redis_down()),
        ] {
            assert!(e.is_retryable(), "{e}");
        }
    }

    #[test]
    fn a_task_at_fault_is_answered_at_once() {
        for e in [
            ConsumerError::Undecodable("bad".into()),
            ConsumerError::NoContent,
            ConsumerError::PathRefused(PathRejected::OutsideScanDir("/etc/passwd".into())),
            ConsumerError::FileUnreadable(io()),
            ConsumerError::TooLarge { size: 2, limit: 1 },
            ConsumerError::Expired,
            ConsumerError::ClamdReply("Can't allocate memory ERROR".into()),
            ConsumerError::StoredBody(io()),
            ConsumerError::StoredBodyMismatch("not the body"),
            ConsumerError::Queue(QueueError::BadVerdict("x".into())),
        ] {
            assert!(!e.is_retryable(), "{e}");
        }
    }

    #[test]
    fn origins() {
        assert_eq!(
            ConsumerError::Undecodable(String::new()).origin(),
            Origin::Client
        );
        assert_eq!(
            ConsumerError::TooLarge { size: 2, limit: 1 }.origin(),
            Origin::Client
        );
        assert_eq!(ConsumerError::FileUnreadable(io()).origin(), Origin::Client);
        assert_eq!(ConsumerError::Clamd(clamd_down()).origin(), Origin::Scanner);
        assert_eq!(
            ConsumerError::ClamdReply(String::new()).origin(),
            Origin::Scanner
        );
        assert_eq!(ConsumerError::StoredBody(io()).origin(), Origin::Queue);
        assert_eq!(ConsumerError::Queue(redis_down()).origin(), Origin::Queue);
    }

    #[test]
    fn labels_are_the_dashboards_kinds() {
        let cases = [
            (ConsumerError::Undecodable(String::new()), Some("decode")),
            (
                ConsumerError::PathRefused(PathRejected::NotAbsolute("a".into())),
                Some("path"),
            ),
            (ConsumerError::FileUnreadable(io()), Some("path")),
            (ConsumerError::Clamd(clamd_down()), Some("clamd")),
            (ConsumerError::ClamdReply(String::new()), Some("clamd")),
            (ConsumerError::StoredBody(io()), Some("redis")),
            (ConsumerError::StoredBodyMismatch("x"), Some("redis")),
            (ConsumerError::Queue(redis_down()), Some("redis")),
            (ConsumerError::NoContent, None),
            (ConsumerError::TooLarge { size: 2, limit: 1 }, None),
            (ConsumerError::Expired, None),
        ];
        for (e, label) in cases {
            assert_eq!(e.metric_label(), label, "{e}");
        }
    }

    #[test]
    fn only_an_oversized_body_is_unscannable_and_nothing_is_clean() {
        let big = ConsumerError::TooLarge {
            size: 200,
            limit: 100,
        }
        .verdict("t1");
        assert_eq!(big.status(), VerdictStatus::Unscannable);
        assert_eq!(big.signature, "size-limit");
        assert_eq!(
            big.detail,
            "200 bytes is more than the scan limit of 100 bytes"
        );
        for e in [
            ConsumerError::NoContent,
            ConsumerError::Expired,
            ConsumerError::Clamd(clamd_down()),
            ConsumerError::StoredBody(io()),
        ] {
            let v = e.verdict("t1");
            assert_eq!(
                (v.status(), v.task_id.as_str()),
                (VerdictStatus::Error, "t1")
            );
            assert_eq!(v.detail, e.to_string());
        }
    }

    #[test]
    fn a_failed_read_is_blamed_on_the_input_it_came_from() {
        let input = || ClamdError::Input(io());
        assert!(matches!(
            ConsumerError::from_scan(input(), InputKind::Stored),
            ConsumerError::StoredBody(_)
        ));
        assert!(matches!(
            ConsumerError::from_scan(input(), InputKind::File),
            ConsumerError::FileUnreadable(_)
        ));
        assert!(matches!(
            ConsumerError::from_scan(
                ClamdError::Timeout(Duration::from_secs(1)),
                InputKind::Stored
            ),
            ConsumerError::Clamd(_)
        ));
    }
}
