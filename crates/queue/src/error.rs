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
    /// Whether trying again later can help (Redis down or restarting).
    pub fn is_retryable(&self) -> bool {
        matches!(self, QueueError::Redis(_))
    }

    /// Metric label.
    pub fn kind(&self) -> &'static str {
        match self {
            QueueError::Redis(_) => "redis",
            QueueError::Config(_) => "config",
            QueueError::DeadlineExceeded => "deadline",
            QueueError::BadVerdict(_) => "protocol",
            QueueError::Body(_) => "spill",
        }
    }
}
