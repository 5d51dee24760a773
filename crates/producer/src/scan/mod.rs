//! The scan path every front end shares (ext_proc, ICAP): unpack the body, look each file up
//! in the verdict cache, queue the rest, wait for the verdicts, decide.

use std::time::Instant;

use virus_scanner_protocol::task::{Direction, Priority, Verdict, VerdictStatus};
use virus_scanner_queue::Producer;

use crate::body::{Body, BodyData, BodyLimits};
use crate::config::ScanPolicy;
use crate::metrics::{DirectionLabels, Metrics, RequestLabels};
use crate::unpack::{BodyHeaders, UnpackOptions, Unpacked, unpack};

/// Bodies below this size, in memory and without a content coding, are unpacked on the
/// serving thread.
const IN_PLACE_UNPACK_BYTES: u64 = 256 * 1024;

#[cfg(test)]
pub(crate) mod fake;
mod front;
mod policy;
mod task;

pub use front::BodyScan;
pub use policy::decision;

/// Who is asking, for the task labels and the audit log.
#[derive(Debug, Clone, Default)]
pub struct ScanContext {
    pub direction: Direction,
    pub priority: Priority,
    pub route: String,
    pub client_address: String,
    pub request_id: String,
    /// `buffered`, `full_duplex`, `icap`: metrics label.
    pub mode: &'static str,
}

/// What the gateway does with the body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Allow,
    Block { status: u16 },
}

#[derive(Debug, Clone)]
pub struct Outcome {
    pub verdict: Verdict,
    pub decision: Decision,
    /// SHA-256 of the file the verdict is about, when one was hashed.
    pub sha256: Option<[u8; 32]>,
    /// Id of the task whose verdict decided.
    pub task_id: String,
}

impl Outcome {
    /// The SHA-256 in hex, empty when none was hashed: for answers and logs only, so that
    /// a clean pass never formats it.
    pub fn sha256_hex(&self) -> String {
        self.sha256.map(hex::encode).unwrap_or_default()
    }
}

pub struct ScanService {
    pub policy: ScanPolicy,
    pub producer: Producer,
    pub metrics: Metrics,
    pub limits: BodyLimits,
    unpack_options: UnpackOptions,
}

impl ScanService {
    pub fn new(
        policy: ScanPolicy,
        limits: BodyLimits,
        producer: Producer,
        metrics: Metrics,
    ) -> ScanService {
        let unpack_options = UnpackOptions {
            max_decoded: policy.max_decoded,
            embedded_files: policy.embedded_files,
        };
        ScanService {
            policy,
            producer,
            metrics,
            limits,
            unpack_options,
        }
    }

    /// Decides on a complete body. Never fails: every problem becomes a verdict, which the
    /// policy turns into a block unless it says otherwise.
    pub async fn scan(&self, body: &Body, headers: &BodyHeaders, ctx: &ScanContext) -> Outcome {
        let started = Instant::now();
        let deadline = started + self.policy.scan_timeout;
        // A guard: the caller's future can be dropped mid-scan (client gone, stream reset).
        let in_flight = virus_scanner_runtime::InProgress::enter(&self.metrics.in_flight);
        if let BodyData::Spilled(_) = body.data {
            self.metrics.spilled_bytes.inc_by(body.len);
        }
        self.metrics
            .bytes
            .get_or_create(&DirectionLabels {
                direction: direction_label(ctx.direction),
            })
            .inc_by(body.len);
        let outcome = self.scan_inner(body, headers, ctx, deadline).await;
        drop(in_flight);
        self.metrics
            .scan_latency
            .observe(started.elapsed().as_secs_f64());
        self.record(&outcome, ctx);
        outcome
    }

    /// Answers for a body that never reached a scan (too large to hold, the stream's
    /// message refused): counted and logged as every other verdict.
    pub fn refuse_unscanned(&self, why: String, ctx: &ScanContext) -> Outcome {
        let outcome = self.decide(Verdict::unscannable(&why), None, String::new());
        self.record(&outcome, ctx);
        outcome
    }

    /// Metrics and log lines of one decided body: one place for every front end.
    fn record(&self, outcome: &Outcome, ctx: &ScanContext) {
        self.metrics
            .requests
            .get_or_create(&RequestLabels {
                direction: direction_label(ctx.direction),
                verdict: outcome.verdict.status().label(),
                mode: ctx.mode,
            })
            .inc();
        match outcome.verdict.status() {
            VerdictStatus::Infected => self.log_detection(outcome, ctx),
            VerdictStatus::Error | VerdictStatus::Unscannable => tracing::warn!(
                task_id = %outcome.task_id,
                verdict = outcome.verdict.status().label(),
                detail = %outcome.verdict.detail,
                route = %ctx.route,
                direction = direction_label(ctx.direction),
                allowed = outcome.decision == Decision::Allow,
                "body not scanned clean"
            ),
            // Where an allowed body's verdict came from, for tracing a wrong one back.
            status => tracing::debug!(
                task_id = %outcome.task_id,
                verdict = status.label(),
                cached = outcome.verdict.cached,
                sha256 = %outcome.sha256_hex(),
                route = %ctx.route,
                request_id = %ctx.request_id,
                direction = direction_label(ctx.direction),
                mode = ctx.mode,
                "body decided"
            ),
        }
    }

    async fn scan_inner(
        &self,
        body: &Body,
        headers: &BodyHeaders,
        ctx: &ScanContext,
        deadline: Instant,
    ) -> Outcome {
        let sha = Some(body.sha256);
        if let Some(why) = &headers.refusal {
            return self.refuse(why, sha);
        }
        let unpacked = if headers.needs_unpacking() {
            let run = || unpack(body, headers, &self.limits, &self.unpack_options);
            // Decoding can write far more than it reads, and large bodies are CPU and disk
            // work: both leave the serving thread. A small body without a coding only
            // shrinks as it is split, so it is unpacked in place, without the hand-off
            // every request would otherwise pay.
            let small = matches!(body.data, BodyData::Memory(_))
                && body.len < IN_PLACE_UNPACK_BYTES
                && headers
                    .content_encoding
                    .as_deref()
                    .is_none_or(|c| c.trim().is_empty());
            match if small {
                run()
            } else {
                tokio::task::block_in_place(run)
            } {
                Ok(u) => u,
                // A sender can make unpacking fail (fill the spool with its own decoded
                // bytes): that error is refused even under FAIL_OPEN.
                Err(e) => {
                    self.metrics.error("spill");
                    return Outcome {
                        decision: decision(&self.policy, VerdictStatus::Error, true),
                        verdict: Verdict::error("", e.to_string()),
                        sha256: sha,
                        task_id: String::new(),
                    };
                }
            }
        } else {
            Unpacked::Original
        };
        // Files taken out of the body (decoded, split, embedded) are the sender's choice: a
        // size limit reached by one of them is refused, not passed by ALLOW_UNSCANNABLE
        // (a small gzip that decodes past the scanner's limit).
        let derived_from = match &unpacked {
            Unpacked::Original => usize::MAX,
            Unpacked::OriginalAnd(_) => 1,
            _ => 0,
        };
        let files: Vec<&Body> = match &unpacked {
            Unpacked::Original => vec![body],
            Unpacked::Files(files) => files.iter().collect(),
            Unpacked::OriginalAnd(files) => std::iter::once(body).chain(files).collect(),
            Unpacked::Refused(why) => return self.refuse(why, sha),
            // What the sender chose (an unknown or corrupt coding, a decompression bomb, a
            // body in too many parts) is refused whatever ALLOW_UNSCANNABLE says: that
            // setting is about sizes an operator accepts, not about shapes an attacker picks.
            Unpacked::Unscannable(why) => return self.refuse(why, sha),
        };
        if files.is_empty() {
            return self.decide(Verdict::clean(), sha, String::new());
        }
        // Scan the files at once; the body passes only if all are clean.
        let results = futures_util::future::join_all(
            files.into_iter().map(|f| self.scan_file(f, ctx, deadline)),
        )
        .await;
        let (index, (verdict, file_sha, task_id)) = results
            .into_iter()
            .enumerate()
            .max_by_key(|(i, (v, _, _))| (severity(v.status()), *i >= derived_from))
            .unwrap_or_else(|| (0, (Verdict::clean(), sha, String::new())));
        if index >= derived_from && verdict.status() == VerdictStatus::Unscannable {
            return Outcome {
                decision: decision(&self.policy, VerdictStatus::Unscannable, true),
                verdict,
                sha256: file_sha,
                task_id,
            };
        }
        self.decide(verdict, file_sha, task_id)
    }

    /// Turns a verdict into what the gateway does, following the policy.
    pub fn decide(&self, verdict: Verdict, sha256: Option<[u8; 32]>, task_id: String) -> Outcome {
        let decision = decision(&self.policy, verdict.status(), false);
        if decision == Decision::Allow
            && matches!(
                verdict.status(),
                VerdictStatus::Error | VerdictStatus::Unspecified
            )
        {
            self.metrics.fail_open.inc();
        }
        Outcome {
            verdict,
            decision,
            sha256,
            task_id,
        }
    }

    /// A body whose shape cannot be scanned faithfully: blocked as unscannable, always.
    fn refuse(&self, why: &str, sha256: Option<[u8; 32]>) -> Outcome {
        Outcome {
            verdict: Verdict::unscannable(why),
            decision: decision(&self.policy, VerdictStatus::Unscannable, true),
            sha256,
            task_id: String::new(),
        }
    }

    /// One JSON line per detection, for a SIEM.
    fn log_detection(&self, outcome: &Outcome, ctx: &ScanContext) {
        tracing::warn!(
            event = "detection",
            task_id = %outcome.task_id,
            signature = %outcome.verdict.signature,
            sha256 = %outcome.sha256_hex(),
            tenant = %self.policy.tenant,
            policy = %self.policy.policy,
            route = %ctx.route,
            direction = direction_label(ctx.direction),
            client_address = %ctx.client_address,
            request_id = %ctx.request_id,
            mode = ctx.mode,
            cached = outcome.verdict.cached,
            "infected content blocked"
        );
    }
}

/// Which verdict of several files decides: infected over error over unscannable over clean.
fn severity(status: VerdictStatus) -> u8 {
    match status {
        VerdictStatus::Clean => 0,
        VerdictStatus::Unscannable => 1,
        VerdictStatus::Error | VerdictStatus::Unspecified => 2,
        VerdictStatus::Infected => 3,
    }
}

pub fn direction_label(d: Direction) -> &'static str {
    match d {
        Direction::Request => "request",
        Direction::Response => "response",
        Direction::Unspecified => "unspecified",
    }
}
