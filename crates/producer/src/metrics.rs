use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub direction: &'static str,
    pub verdict: &'static str,
    pub mode: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabels {
    pub direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct IcapLabels {
    pub method: &'static str,
    pub verdict: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: &'static str,
}

/// The producer's metrics, under the `virus_scanner_producer` prefix.
pub struct Metrics {
    pub requests: Family<RequestLabels, Counter>,
    pub bytes: Family<DirectionLabels, Counter>,
    pub scan_latency: Histogram,
    pub queue_wait: Histogram,
    pub cache_hits: Counter,
    pub in_flight: Gauge,
    pub spilled_bytes: Counter,
    pub fail_open: Counter,
    pub errors: Family<KindLabels, Counter>,
    pub icap_requests: Family<IcapLabels, Counter>,
}

impl Metrics {
    pub fn register(registry: &mut Registry) -> Metrics {
        let m = Metrics {
            requests: Family::default(),
            bytes: Family::default(),
            scan_latency: Histogram::new(exponential_buckets(0.0005, 2.0, 18)),
            queue_wait: Histogram::new(exponential_buckets(0.0001, 2.0, 18)),
            cache_hits: Counter::default(),
            in_flight: Gauge::default(),
            spilled_bytes: Counter::default(),
            fail_open: Counter::default(),
            errors: Family::default(),
            icap_requests: Family::default(),
        };
        let r = registry.sub_registry_with_prefix("virus_scanner_producer");
        r.register(
            "requests",
            "Bodies decided, by direction, verdict and mode",
            m.requests.clone(),
        );
        r.register("bytes", "Body bytes scanned, by direction", m.bytes.clone());
        r.register(
            "scan_latency_seconds",
            "From a complete body to its verdict",
            m.scan_latency.clone(),
        );
        r.register(
            "queue_wait_seconds",
            "Time a task waited in the queue",
            m.queue_wait.clone(),
        );
        r.register(
            "cache_hits",
            "Verdicts taken from the verdict cache",
            m.cache_hits.clone(),
        );
        r.register(
            "in_flight",
            "Bodies waiting for a verdict",
            m.in_flight.clone(),
        );
        r.register(
            "spilled_bytes",
            "Body bytes written to the scan directory",
            m.spilled_bytes.clone(),
        );
        r.register(
            "fail_open_passes",
            "Bodies let through unscanned because FAIL_OPEN is set",
            m.fail_open.clone(),
        );
        r.register("errors", "Failures by kind", m.errors.clone());
        r.register(
            "icap_requests",
            "ICAP requests by method and verdict (options, not_found, invalid for the rest)",
            m.icap_requests.clone(),
        );
        m
    }

    pub fn error(&self, kind: &'static str) {
        self.errors.get_or_create(&KindLabels { kind }).inc();
    }
}
