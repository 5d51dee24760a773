//! What the front ends need of the scan path, as a trait, so that their flows can be tested
//! and fuzzed without Redis.

use std::future::Future;

use virus_scanner_protocol::task::{Priority, Verdict};

use super::{Outcome, ScanContext, ScanService};
use crate::body::{Body, BodyLimits};
use crate::config::RangeRequests;
use crate::metrics::IcapLabels;
use crate::unpack::BodyHeaders;

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
