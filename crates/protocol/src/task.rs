//! Encoding and validation of [`ScanTask`] and [`Verdict`] as they travel through Redis.

use prost::Message;
pub use prost::bytes::Bytes;

pub use crate::v1::{
    Direction, Hops, Labels, Priority, RedisChunks, ReplyFormat, ScanTask, Verdict, VerdictStatus,
    scan_task::Content,
};

/// Stream entry field that carries an encoded v1 [`ScanTask`].
pub const TASK_FIELD: &str = "v1";

/// Largest identifier accepted from the wire; ids end up in Redis key names and logs.
pub const MAX_TASK_ID_LEN: usize = 128;

/// Longest tenant label that may name a Redis key (the key of a body stored in chunks).
pub const MAX_TENANT_KEY_LEN: usize = 128;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TaskDecodeError {
    #[error("task is not a valid protobuf message: {0}")]
    Protobuf(String),
    #[error("task id is empty or longer than {MAX_TASK_ID_LEN} bytes")]
    BadId,
    #[error("task id contains characters outside [A-Za-z0-9._:-]")]
    IdCharacters,
    #[error("task has no content (body, path or chunks in Redis)")]
    NoContent,
    #[error("task sha256 has {0} bytes, expected 0 or 32")]
    BadSha256(usize),
    #[error(
        "tenant label of a task stored in Redis is longer than {MAX_TENANT_KEY_LEN} bytes or \
         contains characters outside [A-Za-z0-9._-]"
    )]
    TenantCharacters,
}

/// Task ids appear in Redis key names, file names and log lines: keep them boring.
pub fn validate_task_id(id: &str) -> Result<(), TaskDecodeError> {
    if id.is_empty() || id.len() > MAX_TASK_ID_LEN {
        return Err(TaskDecodeError::BadId);
    }
    if !id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
    {
        return Err(TaskDecodeError::IdCharacters);
    }
    Ok(())
}

/// A tenant label that becomes part of a Redis key name, where a per-tenant ACL can match
/// it: no `:` (the key's separator), nothing a glob or a log line could misread. May be
/// empty.
pub fn validate_tenant_key(tenant: &str) -> Result<(), TaskDecodeError> {
    if tenant.len() > MAX_TENANT_KEY_LEN
        || !tenant
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Err(TaskDecodeError::TenantCharacters);
    }
    Ok(())
}

pub fn encode_task(task: &ScanTask) -> Vec<u8> {
    task.encode_to_vec()
}

/// Encodes the task with `cache_checked` set, without copying its content: a field appended
/// to an encoded message overrides the one before it (protobuf merge rules).
pub fn encode_task_cache_checked(task: &ScanTask) -> Vec<u8> {
    let mut bytes = task.encode_to_vec();
    prost::encoding::bool::encode(12, &true, &mut bytes);
    bytes
}

/// Decodes and validates a task taken from the queue.
pub fn decode_task(bytes: &[u8]) -> Result<ScanTask, TaskDecodeError> {
    let task = ScanTask::decode(bytes).map_err(|e| TaskDecodeError::Protobuf(e.to_string()))?;
    validate_task_id(&task.id)?;
    if task.content.is_none() {
        return Err(TaskDecodeError::NoContent);
    }
    if !(task.sha256.is_empty() || task.sha256.len() == 32) {
        return Err(TaskDecodeError::BadSha256(task.sha256.len()));
    }
    if let Some(Content::RedisChunks(_)) = task.content {
        validate_tenant_key(task.labels.as_ref().map_or("", |l| l.tenant.as_str()))?;
    }
    Ok(task)
}

pub fn encode_verdict(verdict: &Verdict) -> Vec<u8> {
    verdict.encode_to_vec()
}

pub fn decode_verdict(bytes: &[u8]) -> Result<Verdict, TaskDecodeError> {
    Verdict::decode(bytes).map_err(|e| TaskDecodeError::Protobuf(e.to_string()))
}

impl VerdictStatus {
    /// Stable lower-case name used in metrics labels, logs and JSON bodies.
    pub fn label(self) -> &'static str {
        match self {
            VerdictStatus::Unspecified => "unspecified",
            VerdictStatus::Clean => "clean",
            VerdictStatus::Infected => "infected",
            VerdictStatus::Unscannable => "unscannable",
            VerdictStatus::Error => "error",
        }
    }
}

impl Verdict {
    /// Only a definite scan result may be reused for other requests with the same bytes.
    pub fn is_cacheable(&self) -> bool {
        matches!(
            self.status(),
            VerdictStatus::Clean | VerdictStatus::Infected
        )
    }

    pub fn clean() -> Verdict {
        Verdict {
            status: VerdictStatus::Clean as i32,
            ..Verdict::default()
        }
    }

    pub fn infected(signature: impl Into<String>) -> Verdict {
        Verdict {
            status: VerdictStatus::Infected as i32,
            signature: signature.into(),
            ..Verdict::default()
        }
    }

    /// Not scanned completely: a size or scanner limit, or a shape the producer refuses.
    pub fn unscannable(detail: impl Into<String>) -> Verdict {
        Verdict {
            status: VerdictStatus::Unscannable as i32,
            detail: detail.into(),
            ..Verdict::default()
        }
    }

    pub fn error(task_id: &str, detail: impl Into<String>) -> Verdict {
        Verdict {
            task_id: task_id.to_owned(),
            status: VerdictStatus::Error as i32,
            detail: detail.into(),
            ..Verdict::default()
        }
    }
}

impl Priority {
    pub fn label(self) -> &'static str {
        match self {
            Priority::Normal => "normal",
            Priority::High => "high",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task() -> ScanTask {
        ScanTask {
            id: "t-1".into(),
            content: Some(Content::Body(Bytes::from_static(b"a|b\0c"))),
            sha256: vec![0; 32],
            ..ScanTask::default()
        }
    }

    #[test]
    fn task_round_trips_binary_body() {
        let t = task();
        assert_eq!(decode_task(&encode_task(&t)), Ok(t));
    }

    #[test]
    fn cache_checked_encoding_sets_that_field_only() {
        let t = task();
        let mut expected = t.clone();
        expected.cache_checked = true;
        assert_eq!(decode_task(&encode_task_cache_checked(&t)), Ok(expected));
        assert!(!decode_task(&encode_task(&t)).unwrap().cache_checked);
    }

    #[test]
    fn task_without_content_is_refused() {
        let mut t = task();
        t.content = None;
        assert_eq!(
            decode_task(&encode_task(&t)),
            Err(TaskDecodeError::NoContent)
        );
    }

    #[test]
    fn task_id_with_key_separators_or_paths_is_refused() {
        for id in ["", "a/b", "a b", "x\n", &"x".repeat(129)] {
            let mut t = task();
            t.id = id.to_string();
            assert!(decode_task(&encode_task(&t)).is_err(), "{id:?}");
        }
    }

    #[test]
    fn short_sha256_is_refused() {
        let mut t = task();
        t.sha256 = vec![1; 5];
        assert_eq!(
            decode_task(&encode_task(&t)),
            Err(TaskDecodeError::BadSha256(5))
        );
    }

    #[test]
    fn a_task_stored_in_redis_needs_a_tenant_that_can_name_a_key() {
        let mut t = task();
        t.content = Some(Content::RedisChunks(RedisChunks { count: 3 }));
        t.size = 5;
        assert_eq!(decode_task(&encode_task(&t)), Ok(t.clone()));
        for tenant in ["tenant-a", "team_1.prod", ""] {
            t.labels = Some(Labels {
                tenant: tenant.into(),
                ..Labels::default()
            });
            assert_eq!(decode_task(&encode_task(&t)), Ok(t.clone()), "{tenant:?}");
        }
        for tenant in ["a:b", "a*", "a b", "x\n", &"x".repeat(129)] {
            t.labels = Some(Labels {
                tenant: tenant.into(),
                ..Labels::default()
            });
            assert_eq!(
                decode_task(&encode_task(&t)),
                Err(TaskDecodeError::TenantCharacters),
                "{tenant:?}"
            );
        }
        // Other tasks never name a key by their tenant: any label goes.
        t.content = Some(Content::Body(Bytes::from_static(b"x")));
        assert!(decode_task(&encode_task(&t)).is_ok());
    }

    #[test]
    fn garbage_is_a_decode_error() {
        assert!(matches!(
            decode_task(&[0xff, 0xff, 0xff]),
            Err(TaskDecodeError::Protobuf(_))
        ));
    }

    #[test]
    fn only_clean_and_infected_are_cacheable() {
        let mut v = Verdict::error("t", "x");
        assert!(!v.is_cacheable());
        v.set_status(VerdictStatus::Unscannable);
        assert!(!v.is_cacheable());
        v.set_status(VerdictStatus::Clean);
        assert!(v.is_cacheable());
    }
}
