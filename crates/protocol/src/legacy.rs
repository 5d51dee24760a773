//! The seed's task format, `taskID|MODE|TIMESTAMP|CONTENT`, still accepted on the legacy list.
//!
//! * `MODE` is `BODY` (CONTENT is the body itself) or `PATH` (CONTENT is a file path).
//! * `TIMESTAMP` is nanoseconds since the Unix epoch, decimal.
//! * CONTENT is everything after the third `|` and may itself contain `|` or any byte.
//!
//! The verdict is pushed as text to the list `<result prefix><taskID>` (see README):
//! `CLEAN`, `INFECTED|<signature>`, `UNSCANNABLE|<reason>` or `ERROR|<reason>`.

use crate::task::{Verdict, VerdictStatus, validate_task_id};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LegacyContent {
    Body(Vec<u8>),
    Path(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LegacyTask {
    pub id: String,
    pub timestamp_ns: u64,
    pub content: LegacyContent,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LegacyParseError {
    #[error("legacy task has fewer than four '|'-separated fields")]
    MissingField,
    #[error("legacy task id is invalid: {0}")]
    BadId(String),
    #[error("legacy task mode must be BODY or PATH")]
    BadMode,
    #[error("legacy task timestamp is not a decimal number of nanoseconds")]
    BadTimestamp,
    #[error("legacy PATH task content is not UTF-8")]
    PathNotUtf8,
}

pub fn parse(bytes: &[u8]) -> Result<LegacyTask, LegacyParseError> {
    let mut fields = bytes.splitn(4, |&b| b == b'|');
    let (Some(id), Some(mode), Some(ts), Some(content)) =
        (fields.next(), fields.next(), fields.next(), fields.next())
    else {
        return Err(LegacyParseError::MissingField);
    };
    let id = std::str::from_utf8(id).map_err(|_| LegacyParseError::BadId("not UTF-8".into()))?;
    validate_task_id(id).map_err(|e| LegacyParseError::BadId(e.to_string()))?;
    let timestamp_ns = std::str::from_utf8(ts)
        .ok()
        .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|s| s.parse().ok())
        .ok_or(LegacyParseError::BadTimestamp)?;
    let content = match mode {
        b"BODY" => LegacyContent::Body(content.to_vec()),
        b"PATH" => LegacyContent::Path(
            String::from_utf8(content.to_vec()).map_err(|_| LegacyParseError::PathNotUtf8)?,
        ),
        _ => return Err(LegacyParseError::BadMode),
    };
    Ok(LegacyTask {
        id: id.to_owned(),
        timestamp_ns,
        content,
    })
}

/// The text a legacy producer reads back.
pub fn result_text(verdict: &Verdict) -> String {
    let reason = |s: &str| s.replace(['\r', '\n'], " ");
    match verdict.status() {
        VerdictStatus::Clean => "CLEAN".to_owned(),
        VerdictStatus::Infected => format!("INFECTED|{}", reason(&verdict.signature)),
        VerdictStatus::Unscannable => format!("UNSCANNABLE|{}", reason(&verdict.detail)),
        VerdictStatus::Error | VerdictStatus::Unspecified => {
            format!("ERROR|{}", reason(&verdict.detail))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_content_keeps_its_pipes_and_binary_bytes() {
        let t = parse(b"abc|BODY|1700000000000000000|x|y\0|z").unwrap();
        assert_eq!(t.id, "abc");
        assert_eq!(t.timestamp_ns, 1_700_000_000_000_000_000);
        assert_eq!(t.content, LegacyContent::Body(b"x|y\0|z".to_vec()));
    }

    #[test]
    fn path_mode_is_parsed() {
        let t = parse(b"id-2|PATH|5|/tmp/virusscan/a|b").unwrap();
        assert_eq!(t.content, LegacyContent::Path("/tmp/virusscan/a|b".into()));
    }

    #[test]
    fn empty_body_is_allowed() {
        assert_eq!(
            parse(b"i|BODY|1|").unwrap().content,
            LegacyContent::Body(vec![])
        );
    }

    #[test]
    fn malformed_tasks_are_refused() {
        assert_eq!(parse(b"i|BODY|1"), Err(LegacyParseError::MissingField));
        assert_eq!(parse(b"i|FILE|1|x"), Err(LegacyParseError::BadMode));
        assert_eq!(parse(b"i|BODY|-1|x"), Err(LegacyParseError::BadTimestamp));
        assert_eq!(parse(b"i|BODY||x"), Err(LegacyParseError::BadTimestamp));
        assert_eq!(
            parse(b"i|BODY|99999999999999999999999|x"),
            Err(LegacyParseError::BadTimestamp)
        );
        assert!(matches!(
            parse(b"a/b|BODY|1|x"),
            Err(LegacyParseError::BadId(_))
        ));
        assert_eq!(parse(b"i|PATH|1|\xff"), Err(LegacyParseError::PathNotUtf8));
    }

    #[test]
    fn result_text_names_the_signature() {
        let mut v = Verdict::default();
        v.set_status(VerdictStatus::Infected);
        v.signature = "Eicar".into();
        assert_eq!(result_text(&v), "INFECTED|Eicar");
        v.set_status(VerdictStatus::Clean);
        assert_eq!(result_text(&v), "CLEAN");
        assert_eq!(result_text(&Verdict::error("t", "a\nb")), "ERROR|a b");
    }
}
