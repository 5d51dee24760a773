//! A scanner for the front ends' tests that needs no Redis: infected when the body holds
//! `EVIL`, refused when its headers say so; it records what it scanned and counted.

use std::io::Read;
use std::sync::Mutex;

use virus_scanner_protocol::task::{Priority, Verdict, VerdictStatus};

use super::{BodyScan, Decision, Outcome, ScanContext};
use crate::body::{Body, BodyLimits};
use crate::config::RangeRequests;
use crate::unpack::BodyHeaders;

/// Infected when the body holds `EVIL`; refused when its headers say so.
pub(crate) struct FakeScan {
    pub limits: BodyLimits,
    pub range: RangeRequests,
    pub counted: Mutex<Vec<(&'static str, &'static str)>>,
    pub scanned: Mutex<Vec<(Vec<u8>, Priority)>>,
    _dir: tempfile::TempDir,
}

fn outcome(status: VerdictStatus, detail: &str, block: Option<u16>) -> Outcome {
    Outcome {
        verdict: Verdict {
            status: status as i32,
            signature: if status == VerdictStatus::Infected {
                "Test.Evil".into()
            } else {
                String::new()
            },
            detail: detail.into(),
            ..Verdict::default()
        },
        decision: block.map_or(Decision::Allow, |status| Decision::Block { status }),
        sha256: None,
        task_id: "t1".into(),
    }
}

impl FakeScan {
    /// Bodies over `max` bytes are too large; none is spilled.
    pub(crate) fn new(range: RangeRequests, max: u64) -> FakeScan {
        let dir = tempfile::tempdir().unwrap();
        FakeScan {
            limits: BodyLimits {
                spill_dir: dir.path().to_path_buf(),
                spill_threshold: 1 << 20,
                max,
            },
            range,
            counted: Mutex::default(),
            scanned: Mutex::default(),
            _dir: dir,
        }
    }
}

impl BodyScan for FakeScan {
    fn limits(&self) -> &BodyLimits {
        &self.limits
    }
    fn priority_header(&self) -> &str {
        "x-priority"
    }
    fn priority(&self, v: Option<&str>) -> Priority {
        if v == Some("high") {
            Priority::High
        } else {
            Priority::Normal
        }
    }
    fn range_requests(&self) -> RangeRequests {
        self.range
    }
    async fn scan(&self, body: &Body, headers: &BodyHeaders, ctx: &ScanContext) -> Outcome {
        let mut bytes = Vec::new();
        body.reader().unwrap().read_to_end(&mut bytes).unwrap();
        let infected = bytes.windows(4).any(|w| w == b"EVIL");
        self.scanned.lock().unwrap().push((bytes, ctx.priority));
        if let Some(why) = &headers.refusal {
            return outcome(VerdictStatus::Unscannable, why, Some(413));
        }
        if infected {
            outcome(VerdictStatus::Infected, "", Some(406))
        } else {
            outcome(VerdictStatus::Clean, "", None)
        }
    }
    fn refuse_unscanned(&self, why: String, _: &ScanContext) -> Outcome {
        outcome(VerdictStatus::Unscannable, &why, Some(413))
    }
    fn scan_failed(&self, why: String, _: &ScanContext) -> Outcome {
        outcome(VerdictStatus::Error, &why, Some(503))
    }
    fn front_end_error(&self, _: &'static str) {}
    fn count_icap(&self, method: &'static str, verdict: &'static str) {
        self.counted.lock().unwrap().push((method, verdict));
    }
    async fn signature_version(&self) -> Option<String> {
        Some("27000".into())
    }
}
