use std::io;

use virus_scanner_queue::QueueError;

/// Why the producer could not start: a setting whose address or directory cannot be used
/// (named, with its value), or Redis refusing for good (a wrong password, a bad URL; an
/// unreachable Redis is waited for instead).
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{setting} {value}: {source}")]
    Setting {
        setting: &'static str,
        value: String,
        source: io::Error,
    },
    #[error("redis: {0}")]
    Redis(QueueError),
    #[error(transparent)]
    Io(#[from] io::Error),
}

impl StartError {
    pub(crate) fn setting(
        setting: &'static str,
        value: impl std::fmt::Display,
    ) -> impl FnOnce(io::Error) -> StartError {
        let value = value.to_string();
        move |source| StartError::Setting {
            setting,
            value,
            source,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_start_error_names_the_setting_and_its_value() {
        let e = StartError::setting("HTTP_ADDR", "0.0.0.0:8080")(io::Error::from(
            io::ErrorKind::AddrInUse,
        ));
        assert!(e.to_string().starts_with("HTTP_ADDR 0.0.0.0:8080: "), "{e}");
        let e = StartError::Redis(QueueError::Config("invalid Redis URL".into()));
        assert_eq!(
            e.to_string(),
            "redis: redis configuration: invalid Redis URL"
        );
    }
}
