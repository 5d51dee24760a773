//! The scan path every front end shares (ext_proc, ICAP): unpack the body, look each file up
//! in the verdict cache, queue the rest, wait for the verdicts, decide.

use std::future::Future;
use std::time::{Duration, Instant};

use virus_scanner_protocol::task::{
    Content, Direction, Labels, Priority, ScanTask, Verdict, VerdictStatus,
};
use virus_scanner_queue::{Producer, QueueError, now_ns};

use crate::body::{Body, BodyData, BodyLimits};
use crate::config::{RangeRequests, ScanPolicy};
use crate::metrics::{DirectionLabels, IcapLabels, Metrics, RequestLabels};
use crate::unpack::{BodyHeaders, UnpackOptions, Unpacked, unpack};

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

/// What a front end (ext_proc, ICAP) needs of the scan path. The producer's is
/// [`ScanService`]; tests and the fuzz target of the ext_proc state machine bring their own,
/// which need no Redis.
pub trait BodyScan: Send + Sync + 'static {
    fn limits(&self) -> &BodyLimits;
    /// The request header that carries the priority, in lower case.
    fn priority_header(&self) -> &str;
    fn priority(&self, header_value: Option<&str>) -> Priority;
    fn range_requests(&self) -> RangeRequests;
    /// Decides on a complete body; never fails (see [`ScanService::scan`]).
    fn scan(
        &self,
        body: &Body,
        headers: &BodyHeaders,
        ctx: &ScanContext,
    ) -> impl Future<Output = Outcome> + Send;
    /// The answer for a body that could not be held for a scan (too large).
    fn refuse_unscanned(&self, why: String, ctx: &ScanContext) -> Outcome;
    /// The answer for a body lost before its scan (the spool failed).
    fn scan_failed(&self, why: String, ctx: &ScanContext) -> Outcome;
    /// A front end failed outside a verdict (an ext_proc stream, an ICAP connection).
    fn front_end_error(&self, kind: &'static str);
    /// One ICAP request answered.
    fn count_icap(&self, method: &'static str, verdict: &'static str);
    /// The signature database the consumers scan with, for ICAP's ISTag.
    fn signature_version(&self) -> impl Future<Output = Option<String>> + Send;
}

impl BodyScan for ScanService {
    fn limits(&self) -> &BodyLimits {
        &self.limits
    }
    fn priority_header(&self) -> &str {
        &self.policy.priority_header
    }
    fn priority(&self, header_value: Option<&str>) -> Priority {
        self.policy.priority(header_value)
    }
    fn range_requests(&self) -> RangeRequests {
        self.policy.range_requests
    }
    fn scan(
        &self,
        body: &Body,
        headers: &BodyHeaders,
        ctx: &ScanContext,
    ) -> impl Future<Output = Outcome> + Send {
        ScanService::scan(self, body, headers, ctx)
    }
    fn refuse_unscanned(&self, why: String, ctx: &ScanContext) -> Outcome {
        ScanService::refuse_unscanned(self, why, ctx)
    }
    fn scan_failed(&self, why: String, ctx: &ScanContext) -> Outcome {
        self.metrics.error("spill");
        let outcome = self.decide(Verdict::error("", why), None, String::new());
        self.record(&outcome, ctx);
        outcome
    }
    fn front_end_error(&self, kind: &'static str) {
        self.metrics.error(kind);
    }
    fn count_icap(&self, method: &'static str, verdict: &'static str) {
        self.metrics
            .icap_requests
            .get_or_create(&IcapLabels { method, verdict })
            .inc();
    }
    async fn signature_version(&self) -> Option<String> {
        self.producer.db_version().await.ok().flatten()
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
            _ => {}
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
            // Decoding and splitting are CPU and disk work on this request's own thread.
            match tokio::task::block_in_place(|| {
                unpack(body, headers, &self.limits, &self.unpack_options)
            }) {
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

    /// Scans one file: memo, cache, then queue. The spilled file lives until the verdict.
    async fn scan_file(
        &self,
        file: &Body,
        ctx: &ScanContext,
        deadline: Instant,
    ) -> (Verdict, Option<[u8; 32]>, String) {
        let sha = Some(file.sha256);
        if file.len == 0 {
            return (Verdict::clean(), sha, String::new());
        }
        match self.producer.remembered(&file.sha256).await {
            Ok(Some(v)) => {
                self.metrics.cache_hits.inc();
                return (v, sha, String::new());
            }
            Ok(None) => {}
            Err(e) => tracing::debug!(error = %e, "verdict memo lookup failed"),
        }
        let task_id = new_task_id();
        // A body sent through Redis stays there until this function returns.
        let mut stored = None;
        let content = match &file.data {
            BodyData::Memory(bytes) => Content::Body(bytes.clone()),
            // The file stays until this function returns: its owner outlives the scan.
            BodyData::Spilled(spill) if self.policy.spool_shared => {
                Content::Path(spill.path().display().to_string())
            }
            // No consumer can open this spool: the body goes through Redis in chunks, unless
            // the verdict cache already knows it.
            BodyData::Spilled(spill) => {
                if let Ok(Some(v)) = self.producer.cached_verdict(&file.sha256).await {
                    self.metrics.cache_hits.inc();
                    return (v, sha, String::new());
                }
                let tenant = &self.policy.tenant;
                let path = spill.path();
                match self
                    .producer
                    .store_body(tenant, &task_id, path, file.len, deadline)
                    .await
                {
                    Ok(body) => stored.insert(body).content(),
                    Err(e) => {
                        self.metrics.error(match e {
                            QueueError::DeadlineExceeded => "timeout",
                            _ => e.kind(),
                        });
                        let why = format!("cannot send the body to the scan queue: {e}");
                        return (Verdict::error(&task_id, why), sha, task_id);
                    }
                }
            }
        };
        let deadline_ns = now_ns()
            + deadline
                .saturating_duration_since(Instant::now())
                .as_nanos() as u64;
        let task = ScanTask {
            id: task_id.clone(),
            content: Some(content),
            priority: ctx.priority as i32,
            enqueued_at_ns: now_ns(),
            deadline_ns,
            sha256: file.sha256.to_vec(),
            labels: Some(Labels {
                tenant: self.policy.tenant.clone(),
                policy: self.policy.policy.clone(),
                route: ctx.route.clone(),
                direction: ctx.direction as i32,
                client_address: ctx.client_address.clone(),
            }),
            size: file.len,
            ..ScanTask::default()
        };
        let enqueued = Instant::now();
        let verdict = match self.producer.submit(&task, deadline).await {
            Ok(v) if v.cached => {
                self.metrics.cache_hits.inc();
                return (v, sha, String::new());
            }
            Ok(v) => {
                let waited = enqueued
                    .elapsed()
                    .saturating_sub(Duration::from_micros(v.scan_time_us));
                self.metrics.queue_wait.observe(waited.as_secs_f64());
                v
            }
            Err(QueueError::DeadlineExceeded) => {
                self.metrics.error("timeout");
                Verdict::error(&task_id, "no verdict before the scan deadline")
            }
            Err(e) => {
                self.metrics.error(e.kind());
                Verdict::error(&task_id, format!("scan queue unavailable: {e}"))
            }
        };
        (verdict, sha, task_id)
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

/// A task id nobody can predict: the verdict of a task is pushed to a key named by it, so
/// a guessable id would let another client answer for it. 128 bits of SHA-256 over a
/// random per-process key and a counter (a PRF): unpredictable without the key, and no
/// system call per request, unlike a fresh random UUID.
fn new_task_id() -> String {
    use sha2::{Digest, Sha256};
    static KEY: std::sync::OnceLock<[u8; 32]> = std::sync::OnceLock::new();
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let key = KEY.get_or_init(|| {
        let (a, b) = uuid::Uuid::new_v4().as_u64_pair();
        let (c, d) = uuid::Uuid::new_v4().as_u64_pair();
        let mut key = [0u8; 32];
        for (chunk, word) in key.chunks_exact_mut(8).zip([a, b, c, d]) {
            chunk.copy_from_slice(&word.to_le_bytes());
        }
        key
    });
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let digest = Sha256::new()
        .chain_update(key)
        .chain_update(n.to_le_bytes())
        .finalize();
    hex::encode(&digest[..16])
}

/// The policy's answer to a verdict. `refused` marks a body refused for its shape, which
/// no setting lets through.
pub fn decision(policy: &ScanPolicy, status: VerdictStatus, refused: bool) -> Decision {
    match status {
        VerdictStatus::Clean if !refused => Decision::Allow,
        VerdictStatus::Infected => Decision::Block {
            status: policy.infected_status,
        },
        VerdictStatus::Unscannable if policy.allow_unscannable && !refused => Decision::Allow,
        VerdictStatus::Error | VerdictStatus::Unspecified if policy.fail_open && !refused => {
            Decision::Allow
        }
        VerdictStatus::Error | VerdictStatus::Unspecified => Decision::Block {
            status: policy.error_status,
        },
        VerdictStatus::Clean | VerdictStatus::Unscannable => Decision::Block {
            status: policy.unscannable_status,
        },
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

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::config::ProducerArgs;

    fn config(extra: &[&str]) -> ScanPolicy {
        let mut argv = vec!["virus-scanner-producer"];
        argv.extend_from_slice(extra);
        ProducerArgs::try_parse_from(argv)
            .expect("flags")
            .validate()
            .expect("valid")
            .scan
    }

    #[test]
    fn the_default_policy_passes_only_clean_bodies() {
        let c = config(&[]);
        let block = |status| Decision::Block { status };
        assert_eq!(decision(&c, VerdictStatus::Clean, false), Decision::Allow);
        assert_eq!(decision(&c, VerdictStatus::Infected, false), block(406));
        assert_eq!(decision(&c, VerdictStatus::Unscannable, false), block(413));
        assert_eq!(decision(&c, VerdictStatus::Error, false), block(503));
        assert_eq!(decision(&c, VerdictStatus::Unspecified, false), block(503));
    }

    #[test]
    fn fail_open_and_allow_unscannable_never_pass_infected_or_refused_bodies() {
        let c = config(&[
            "--fail-open",
            "--allow-unscannable",
            "--infected-status",
            "451",
            "--unscannable-status",
            "415",
        ]);
        assert_eq!(decision(&c, VerdictStatus::Error, false), Decision::Allow);
        assert_eq!(
            decision(&c, VerdictStatus::Unscannable, false),
            Decision::Allow
        );
        assert_eq!(
            decision(&c, VerdictStatus::Infected, false),
            Decision::Block { status: 451 }
        );
        for status in [
            VerdictStatus::Unscannable,
            VerdictStatus::Clean,
            VerdictStatus::Error,
        ] {
            assert_ne!(decision(&c, status, true), Decision::Allow, "{status:?}");
        }
        assert_eq!(
            decision(&c, VerdictStatus::Unscannable, true),
            Decision::Block { status: 415 }
        );
    }

    #[test]
    fn task_ids_are_128_bit_and_unrelated() {
        let a = new_task_id();
        let b = new_task_id();
        assert_eq!(a.len(), 32);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
        // No shared prefix as a per-process prefix and a counter would give.
        assert_ne!(a[..16], b[..16]);
    }
}
