use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VerdictLabels {
    pub verdict: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct QueueLabels {
    pub tenant: String,
    pub priority: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TenantLabels {
    pub tenant: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub kind: &'static str,
}

/// The consumer's metrics, under the `virus_scanner_consumer` prefix.
pub struct Metrics {
    pub scans: Family<VerdictLabels, Counter>,
    pub scanned_bytes: Counter,
    pub scan_seconds: Histogram,
    pub queue_depth: Family<QueueLabels, Gauge>,
    pub queue_wait: Family<TenantLabels, Histogram>,
    pub redeliveries: Counter,
    pub cache_hits: Counter,
    pub expired: Counter,
    pub errors: Family<ErrorLabels, Counter>,
    pub in_flight: Gauge,
}

impl Metrics {
    pub fn register(registry: &mut Registry) -> Metrics {
        let m = Metrics {
            scans: Family::default(),
            scanned_bytes: Counter::default(),
            scan_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 16)),
            queue_depth: Family::default(),
            queue_wait: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.001, 2.0, 16))
            }),
            redeliveries: Counter::default(),
            cache_hits: Counter::default(),
            expired: Counter::default(),
            errors: Family::default(),
            in_flight: Gauge::default(),
        };
        let r = registry.sub_registry_with_prefix("virus_scanner_consumer");
        r.register("scans", "Tasks answered, by verdict", m.scans.clone());
        r.register(
            "scanned_bytes",
            "Bytes sent to clamd",
            m.scanned_bytes.clone(),
        );
        r.register(
            "scan_duration_seconds",
            "Time clamd took per scan",
            m.scan_seconds.clone(),
        );
        r.register(
            "queue_depth",
            "Entries in each tenant's task streams (waiting or being scanned)",
            m.queue_depth.clone(),
        );
        r.register(
            "queue_wait_seconds",
            "Time from enqueue to claim, per tenant",
            m.queue_wait.clone(),
        );
        r.register(
            "redeliveries",
            "Tasks taken over from a consumer that stopped",
            m.redeliveries.clone(),
        );
        r.register(
            "cache_hits",
            "Verdicts answered from the verdict cache",
            m.cache_hits.clone(),
        );
        r.register(
            "expired_tasks",
            "Tasks answered without a scan because their deadline passed",
            m.expired.clone(),
        );
        r.register(
            "errors",
            "Failures by kind (redis, clamd, path, decode)",
            m.errors.clone(),
        );
        r.register("in_flight", "Scans running now", m.in_flight.clone());
        m
    }

    pub fn error(&self, kind: &'static str) {
        self.errors.get_or_create(&ErrorLabels { kind }).inc();
    }
}
