//! clamd's command protocol (see clamd(8)): commands use the `z` prefix, so every command and
//! every reply ends with a NUL byte. Inside an `IDSESSION`, replies are prefixed with the
//! request number, `"<n>: "`.

/// Starts a session in which several commands share one connection.
pub const IDSESSION: &[u8] = b"zIDSESSION\0";
pub const END: &[u8] = b"zEND\0";
pub const PING: &[u8] = b"zPING\0";
pub const VERSION: &[u8] = b"zVERSION\0";
/// State of clamd's thread pool and queue, several lines ending in `END`.
pub const STATS: &[u8] = b"zSTATS\0";
/// Followed by chunks (`u32` big-endian length + bytes) and a zero-length chunk.
pub const INSTREAM: &[u8] = b"zINSTREAM\0";
/// Scans the file behind a descriptor passed with it as `SCM_RIGHTS` (Unix socket only).
pub const FILDES: &[u8] = b"zFILDES\0";
/// Terminates an INSTREAM body.
pub const INSTREAM_END: [u8; 4] = [0; 4];

/// Longest reply we accept (signature names are short; the VERSION line is ~50 bytes).
pub const MAX_REPLY_LEN: usize = 4096;

pub fn chunk_header(len: u32) -> [u8; 4] {
    len.to_be_bytes()
}

/// Outcome of one INSTREAM scan as clamd reported it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScanReply {
    Clean,
    Infected(String),
    /// clamd stopped before the end of the data: `INSTREAM size limit exceeded`
    /// (StreamMaxLength), or a heuristic alert for a limit (`Heuristics.Limits.Exceeded.*`,
    /// with AlertExceedsMax) or for encrypted content (`Heuristics.Encrypted.*`). Such data
    /// was not scanned completely and must never be reported as clean.
    Unscannable(String),
    Error(String),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplyError {
    #[error("clamd reply is not UTF-8")]
    NotUtf8,
    #[error("clamd reply is not understood: {0:?}")]
    Unexpected(String),
    #[error("clamd session reply id {got} does not match request {expected}")]
    WrongSessionId { expected: u32, got: u32 },
}

fn reply_text(bytes: &[u8]) -> Result<&str, ReplyError> {
    let bytes = bytes.strip_suffix(b"\0").unwrap_or(bytes);
    let text = std::str::from_utf8(bytes).map_err(|_| ReplyError::NotUtf8)?;
    Ok(text.trim_end_matches(['\n', '\r']))
}

/// Strips the `"<n>: "` prefix of a reply inside an IDSESSION and checks the request number.
pub fn strip_session_id(bytes: &[u8], expected: u32) -> Result<&[u8], ReplyError> {
    let colon = bytes
        .iter()
        .position(|&b| b == b':')
        .ok_or_else(|| ReplyError::Unexpected(String::from_utf8_lossy(bytes).into_owned()))?;
    let got = std::str::from_utf8(&bytes[..colon])
        .ok()
        .and_then(|s| s.parse::<u32>().ok())
        .ok_or_else(|| ReplyError::Unexpected(String::from_utf8_lossy(bytes).into_owned()))?;
    if got != expected {
        return Err(ReplyError::WrongSessionId { expected, got });
    }
    let rest = &bytes[colon + 1..];
    Ok(rest.strip_prefix(b" ").unwrap_or(rest))
}

/// Parses the reply to INSTREAM or FILDES, e.g. `stream: OK`, `fd[12]: OK`,
/// `stream: Eicar-Signature FOUND`, `INSTREAM size limit exceeded. ERROR`.
pub fn parse_scan_reply(bytes: &[u8]) -> Result<ScanReply, ReplyError> {
    let text = reply_text(bytes)?;
    if text.starts_with("INSTREAM size limit exceeded") {
        return Ok(ScanReply::Unscannable(
            "clamd StreamMaxLength exceeded".into(),
        ));
    }
    let Some(rest) = text
        .strip_prefix("stream: ")
        .or_else(|| descriptor_reply(text))
    else {
        if let Some(msg) = text.strip_suffix(" ERROR") {
            return Ok(ScanReply::Error(msg.to_owned()));
        }
        return Err(ReplyError::Unexpected(text.to_owned()));
    };
    if rest == "OK" {
        return Ok(ScanReply::Clean);
    }
    if let Some(name) = rest.strip_suffix(" FOUND") {
        if name.is_empty() {
            return Err(ReplyError::Unexpected(text.to_owned()));
        }
        if name.starts_with("Heuristics.Limits.Exceeded")
            || name.starts_with("Heuristics.Encrypted")
        {
            return Ok(ScanReply::Unscannable(name.to_owned()));
        }
        return Ok(ScanReply::Infected(name.to_owned()));
    }
    if let Some(msg) = rest.strip_suffix(" ERROR") {
        return Ok(ScanReply::Error(msg.to_owned()));
    }
    Err(ReplyError::Unexpected(text.to_owned()))
}

/// What follows `fd[<n>]: `, the name clamd gives a file passed by descriptor.
fn descriptor_reply(text: &str) -> Option<&str> {
    let (name, rest) = text.strip_prefix("fd[")?.split_once("]: ")?;
    (!name.is_empty() && name.bytes().all(|b| b.is_ascii_digit())).then_some(rest)
}

pub fn parse_ping_reply(bytes: &[u8]) -> Result<(), ReplyError> {
    match reply_text(bytes)? {
        "PONG" => Ok(()),
        other => Err(ReplyError::Unexpected(other.to_owned())),
    }
}

/// What `VERSION` reports. The database version is only present when clamd loaded a
/// versioned `daily` database (`.cvd`, `.cld` or unsigned `.cud`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineVersion {
    /// e.g. `ClamAV 1.4.3`
    pub engine: String,
    /// e.g. `27832`
    pub database: Option<String>,
    /// Build time of the database as clamd prints it.
    pub database_time: Option<String>,
}

/// Parses `ClamAV 1.4.3/27832/Tue Nov 25 08:00:00 2026` or a bare `ClamAV 1.4.3`.
pub fn parse_version_reply(bytes: &[u8]) -> Result<EngineVersion, ReplyError> {
    let text = reply_text(bytes)?;
    let mut parts = text.splitn(3, '/');
    let engine = parts.next().unwrap_or_default();
    if !engine.starts_with("ClamAV ") {
        return Err(ReplyError::Unexpected(text.to_owned()));
    }
    let database = parts
        .next()
        .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()));
    Ok(EngineVersion {
        engine: engine.to_owned(),
        database: database.map(str::to_owned),
        database_time: parts.next().map(str::to_owned),
    })
}

/// clamd's thread pool as `STATS` reports it: `THREADS: live 1  idle 0 max 8 idle-timeout 30`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ThreadPool {
    /// Threads that exist now.
    pub live: u32,
    /// Of those, threads waiting for work.
    pub idle: u32,
    /// `MaxThreads`: scans past this many at once wait in clamd's queue.
    pub max: u32,
}

/// Reads the `THREADS:` line of a `STATS` reply.
pub fn parse_stats_threads(bytes: &[u8]) -> Result<ThreadPool, ReplyError> {
    let text = reply_text(bytes)?;
    let unexpected = || ReplyError::Unexpected(text.to_owned());
    let line = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("THREADS:"))
        .ok_or_else(unexpected)?;
    let words: Vec<&str> = line.split_whitespace().collect();
    let field = |name: &str| -> Result<u32, ReplyError> {
        words
            .windows(2)
            .find(|w| w[0] == name)
            .and_then(|w| w[1].parse().ok())
            .ok_or_else(unexpected)
    };
    Ok(ThreadPool {
        live: field("live")?,
        idle: field("idle")?,
        max: field("max")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_give_the_thread_pool() {
        let reply =
            b"POOLS: 1\n\nSTATE: VALID PRIMARY\nTHREADS: live 1  idle 0 max 8 idle-timeout 30\n\
                      QUEUE: 0 items\n\tSTATS 0.000044 \n\nMEMSTATS: heap N/A mmap N/A used N/A \
                      free N/A releasable N/A pools 1 pools_used 5.885M pools_total 5.968M\nEND\0";
        assert_eq!(
            parse_stats_threads(reply),
            Ok(ThreadPool {
                live: 1,
                idle: 0,
                max: 8
            })
        );
        assert!(matches!(
            parse_stats_threads(b"POOLS: 1\nEND\0"),
            Err(ReplyError::Unexpected(_))
        ));
        assert!(matches!(
            parse_stats_threads(b"THREADS: live 1 idle x max 8\nEND\0"),
            Err(ReplyError::Unexpected(_))
        ));
    }

    #[test]
    fn ok_is_clean() {
        assert_eq!(parse_scan_reply(b"stream: OK\0"), Ok(ScanReply::Clean));
        assert_eq!(parse_scan_reply(b"fd[12]: OK\0"), Ok(ScanReply::Clean));
        assert_eq!(
            parse_scan_reply(b"fd[7]: Eicar-Test-Signature FOUND\0"),
            Ok(ScanReply::Infected("Eicar-Test-Signature".into()))
        );
        assert_eq!(
            parse_scan_reply(b"fd[7]: Heuristics.Limits.Exceeded.MaxFileSize FOUND\0"),
            Ok(ScanReply::Unscannable(
                "Heuristics.Limits.Exceeded.MaxFileSize".into()
            ))
        );
        assert!(parse_scan_reply(b"fd[x]: OK\0").is_err());
    }

    #[test]
    fn found_names_the_signature() {
        assert_eq!(
            parse_scan_reply(b"stream: Eicar-Test-Signature FOUND\0"),
            Ok(ScanReply::Infected("Eicar-Test-Signature".into()))
        );
        assert_eq!(
            parse_scan_reply(b"stream: Win.Test.EICAR_HDB-1 FOUND"),
            Ok(ScanReply::Infected("Win.Test.EICAR_HDB-1".into()))
        );
    }

    #[test]
    fn size_limit_is_unscannable_never_clean() {
        assert!(matches!(
            parse_scan_reply(b"INSTREAM size limit exceeded. ERROR\0"),
            Ok(ScanReply::Unscannable(_))
        ));
        assert_eq!(
            parse_scan_reply(b"stream: Heuristics.Limits.Exceeded.MaxFileSize FOUND\0"),
            Ok(ScanReply::Unscannable(
                "Heuristics.Limits.Exceeded.MaxFileSize".into()
            ))
        );
        assert!(matches!(
            parse_scan_reply(b"stream: Heuristics.Encrypted.Zip FOUND\0"),
            Ok(ScanReply::Unscannable(_))
        ));
    }

    #[test]
    fn errors_carry_the_message() {
        assert_eq!(
            parse_scan_reply(b"stream: Can't allocate memory ERROR\0"),
            Ok(ScanReply::Error("Can't allocate memory".into()))
        );
        assert_eq!(
            parse_scan_reply(b"UNKNOWN COMMAND ERROR\0"),
            Ok(ScanReply::Error("UNKNOWN COMMAND".into()))
        );
    }

    #[test]
    fn unknown_replies_are_errors_not_verdicts() {
        for reply in [
            &b""[..],
            b"stream: ",
            b"stream:  FOUND",
            b"OK",
            b"stream: maybe",
            b"\xff\xfe",
        ] {
            assert!(parse_scan_reply(reply).is_err(), "{reply:?}");
        }
    }

    #[test]
    fn session_prefix_is_checked_and_stripped() {
        assert_eq!(
            strip_session_id(b"3: stream: OK\0", 3),
            Ok(&b"stream: OK\0"[..])
        );
        assert_eq!(
            strip_session_id(b"2: PONG\0", 3),
            Err(ReplyError::WrongSessionId {
                expected: 3,
                got: 2
            })
        );
        assert!(strip_session_id(b"PONG", 1).is_err());
        assert!(strip_session_id(b"x: PONG", 1).is_err());
    }

    #[test]
    fn version_with_and_without_database() {
        assert_eq!(
            parse_version_reply(b"ClamAV 1.4.6/1001/Wed Nov 25 19:26:25 2026\0"),
            Ok(EngineVersion {
                engine: "ClamAV 1.4.6".into(),
                database: Some("1001".into()),
                database_time: Some("Wed Nov 25 19:26:25 2026".into()),
            })
        );
        assert_eq!(
            parse_version_reply(b"ClamAV 1.4.6\0").unwrap().database,
            None
        );
        assert!(parse_version_reply(b"PONG\0").is_err());
    }

    #[test]
    fn ping_expects_pong() {
        assert!(parse_ping_reply(b"PONG\0").is_ok());
        assert!(parse_ping_reply(b"PANG\0").is_err());
    }
}
