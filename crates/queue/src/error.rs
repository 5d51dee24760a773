/// What went wrong with the queue. Every variant but [`QueueError::Body`] and
/// [`QueueError::Config`] comes from Redis or from what it held; the caller decides from
/// [`QueueError::is_retryable`] whether to try again, and counts it under
/// [`QueueError::metric_label`].
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("redis configuration: {0}")]
    Config(String),
    #[error("no verdict before the deadline")]
    DeadlineExceeded,
    #[error("malformed verdict from the queue: {0}")]
    BadVerdict(String),
    #[error("cannot read the spilled body to store it in Redis: {0}")]
    Body(std::io::Error),
}

impl QueueError {
    /// Whether trying again later can help (Redis down or restarting). A bad configuration, a
    /// malformed verdict or an unreadable spilled file stays what it is; a deadline is spent.
    pub fn is_retryable(&self) -> bool {
        matches!(self, QueueError::Redis(_))
    }

    /// The `kind` label of the binaries' `errors` counters.
    pub fn metric_label(&self) -> &'static str {
        match self {
            QueueError::Redis(_) => "redis",
            QueueError::Config(_) => "config",
            QueueError::DeadlineExceeded => "timeout",
            QueueError::BadVerdict(_) => "protocol",
            QueueError::Body(_) => "spill",
        }
    }

    /// Redis answered that the consumer group does not exist (a Redis that restarted without
    /// persistence, or streams deleted under a running consumer).
    pub(crate) fn is_missing_group(&self) -> bool {
        matches!(self, QueueError::Redis(e) if e.code() == Some("NOGROUP"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn redis_error() -> QueueError {
        QueueError::Redis(redis::RedisError::from(std::io::Error::from(
            std::io::ErrorKind::ConnectionRefused,
        )))
    }

    #[test]
    fn only_redis_failures_are_retried() {
        assert!(redis_error().is_retryable());
        for e in [
            QueueError::Config("bad url".into()),
            QueueError::DeadlineExceeded,
            QueueError::BadVerdict("garbage".into()),
            QueueError::Body(std::io::Error::other("gone")),
        ] {
            assert!(!e.is_retryable(), "{e}");
        }
    }

    #[test]
    fn labels_are_the_dashboards_kinds() {
        assert_eq!(redis_error().metric_label(), "redis");
        assert_eq!(QueueError::Config(String::new()).metric_label(), "config");
        assert_eq!(QueueError::DeadlineExceeded.metric_label(), "timeout");
        assert_eq!(
            QueueError::BadVerdict(String::new()).metric_label(),
            "protocol"
        );
        assert_eq!(
            QueueError::Body(std::io::Error::other("x")).metric_label(),
            "spill"
        );
    }

    #[test]
    fn a_missing_group_is_recognised_by_its_code() {
        let nogroup = QueueError::Redis(redis::make_extension_error(
            "NOGROUP".into(),
            Some("No such key or consumer group".into()),
        ));
        assert!(nogroup.is_missing_group());
        assert!(!redis_error().is_missing_group());
    }
}
