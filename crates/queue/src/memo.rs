//! The producer's in-process copy of recent verdict-cache entries: the same bytes seen again
//! within a short time (a popular download, a repeated response) are decided without a
//! round trip to Redis.
//!
//! Only verdicts that are valid for the consumers' current signature-database version are
//! kept, under that version: a database update empties it. Entries also expire after a TTL,
//! and the size is bounded with two generations (the older one is dropped whole when the
//! newer fills up), so a lookup and an insert are O(1) and memory never grows past
//! `capacity` entries.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use virus_scanner_protocol::task::Verdict;

type Sha256 = [u8; 32];

pub(crate) struct VerdictMemo {
    /// Entries per generation; 0 disables the memo.
    generation_size: usize,
    ttl: Duration,
    inner: Mutex<Generations>,
}

#[derive(Default)]
struct Generations {
    db_version: String,
    current: HashMap<Sha256, (Verdict, Instant)>,
    previous: HashMap<Sha256, (Verdict, Instant)>,
}

impl VerdictMemo {
    pub(crate) fn new(capacity: usize, ttl: Duration) -> VerdictMemo {
        VerdictMemo {
            generation_size: if ttl.is_zero() { 0 } else { capacity / 2 },
            ttl,
            inner: Mutex::new(Generations::default()),
        }
    }

    pub(crate) fn get(&self, db_version: &str, sha256: &[u8]) -> Option<Verdict> {
        let key: Sha256 = sha256.try_into().ok()?;
        if self.generation_size == 0 {
            return None;
        }
        let g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if g.db_version != db_version {
            return None;
        }
        let (verdict, at) = g.current.get(&key).or_else(|| g.previous.get(&key))?;
        (at.elapsed() < self.ttl).then(|| verdict.clone())
    }

    /// Keeps a definite verdict reached under `db_version`.
    pub(crate) fn put(&self, db_version: &str, sha256: &[u8], verdict: &Verdict) {
        let Ok(key) = Sha256::try_from(sha256) else {
            return;
        };
        if self.generation_size == 0 || !verdict.is_cacheable() {
            return;
        }
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if g.db_version != db_version {
            *g = Generations {
                db_version: db_version.to_owned(),
                ..Generations::default()
            };
        }
        if g.current.len() >= self.generation_size {
            g.previous = std::mem::take(&mut g.current);
        }
        let mut kept = verdict.clone();
        kept.task_id.clear();
        g.current.insert(key, (kept, Instant::now()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virus_scanner_protocol::task::VerdictStatus;

    fn verdict(status: VerdictStatus) -> Verdict {
        let mut v = Verdict {
            task_id: "t".into(),
            ..Verdict::default()
        };
        v.set_status(status);
        v
    }

    #[test]
    fn a_verdict_is_found_under_its_database_version_only() {
        let memo = VerdictMemo::new(8, Duration::from_secs(60));
        memo.put("100", &[1; 32], &verdict(VerdictStatus::Infected));
        let hit = memo.get("100", &[1; 32]).unwrap();
        assert_eq!(hit.status(), VerdictStatus::Infected);
        assert!(
            hit.task_id.is_empty(),
            "the memo keeps no request's task id"
        );
        assert!(memo.get("101", &[1; 32]).is_none());
        assert!(memo.get("100", &[2; 32]).is_none());
        // A new database version empties it.
        memo.put("101", &[2; 32], &verdict(VerdictStatus::Clean));
        assert!(memo.get("100", &[1; 32]).is_none());
        assert!(memo.get("101", &[1; 32]).is_none());
        assert!(memo.get("101", &[2; 32]).is_some());
    }

    #[test]
    fn errors_and_unscannable_bodies_are_never_kept() {
        let memo = VerdictMemo::new(8, Duration::from_secs(60));
        memo.put("1", &[1; 32], &verdict(VerdictStatus::Error));
        memo.put("1", &[2; 32], &verdict(VerdictStatus::Unscannable));
        memo.put("1", &[3; 5], &verdict(VerdictStatus::Clean));
        assert!(memo.get("1", &[1; 32]).is_none());
        assert!(memo.get("1", &[2; 32]).is_none());
        assert!(memo.get("1", &[3; 5]).is_none());
    }

    #[test]
    fn size_is_bounded_and_entries_expire() {
        let memo = VerdictMemo::new(4, Duration::from_secs(60));
        for i in 0..10u8 {
            memo.put("1", &[i; 32], &verdict(VerdictStatus::Clean));
        }
        let kept = (0..10u8)
            .filter(|i| memo.get("1", &[*i; 32]).is_some())
            .count();
        assert!(kept <= 4, "{kept} entries kept for a capacity of 4");
        assert!(
            memo.get("1", &[9; 32]).is_some(),
            "the newest entry is kept"
        );

        let short = VerdictMemo::new(4, Duration::from_millis(20));
        short.put("1", &[1; 32], &verdict(VerdictStatus::Clean));
        assert!(short.get("1", &[1; 32]).is_some());
        std::thread::sleep(Duration::from_millis(40));
        assert!(short.get("1", &[1; 32]).is_none());

        let off = VerdictMemo::new(4, Duration::ZERO);
        off.put("1", &[1; 32], &verdict(VerdictStatus::Clean));
        assert!(off.get("1", &[1; 32]).is_none());
    }
}
