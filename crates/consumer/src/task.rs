//! One scan loop: claim, scan, answer, repeat. Each loop is a member of the consumer group
//! with a connection of its own.

use std::sync::Arc;
use std::time::{Duration, Instant};

use virus_scanner_protocol::task::{ScanTask, Verdict, VerdictStatus};
use virus_scanner_queue::{Consumer, Delivery, now_ns};

use crate::error::ConsumerError;
use crate::metrics::VerdictLabels;
use crate::state::ConsumerState;

pub(crate) async fn claim_loop(
    state: Arc<ConsumerState>,
    index: usize,
    stop: tokio::sync::watch::Receiver<bool>,
) {
    let Some(mut consumer) = state
        .connect_queue(&format!("w{index}"), stop.clone())
        .await
    else {
        return;
    };
    let mut backoff = Duration::from_millis(100);
    while !*stop.borrow() {
        // A consumer whose clamd is down leaves tasks to consumers that can scan them.
        if !state.clamd_up() {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        }
        // Not cancelled on shutdown: an entry read but dropped would wait for redelivery.
        match consumer.claim(Duration::from_secs(1)).await {
            Ok(deliveries) => {
                backoff = Duration::from_millis(100);
                for d in deliveries {
                    process(&state, &consumer, d).await;
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "claiming tasks failed");
                state.count(&ConsumerError::Queue(e));
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    }
    // Every task this loop claimed is answered: leave the group, so that it does not list
    // one more departed consumer after every restart.
    if let Err(e) = consumer.leave().await {
        tracing::warn!(error = %e, consumer = consumer.name(), "cannot leave the consumer group");
    }
}

async fn process(state: &ConsumerState, consumer: &Consumer, d: Delivery) {
    let claimed_ns = now_ns();
    let metrics = state.metrics();
    let _in_flight = virus_scanner_runtime::InProgress::enter(&metrics.in_flight);
    if d.deliveries > 1 {
        metrics.redeliveries.inc();
    }
    if let Ok(task) = &d.task
        && task.enqueued_at_ns != 0
        && d.deliveries == 1
    {
        let waited = now_ns().saturating_sub(task.enqueued_at_ns);
        metrics
            .queue_wait
            .get_or_create(&crate::metrics::TenantLabels {
                tenant: d.tenant.clone(),
            })
            .observe(waited as f64 / 1e9);
    }
    let task = match &d.task {
        Ok(task) => task,
        Err(e) => {
            tracing::warn!(entry = %d.entry_id, error = %e, "dropping an entry that does not decode");
            state.count(&ConsumerError::Undecodable(e.clone()));
            if let Err(e) = consumer.discard(&d).await {
                tracing::warn!(error = %e, "cannot drop the entry");
            }
            return;
        }
    };
    let (mut verdict, cache_key) = if task.deadline_ns != 0 && now_ns() > task.deadline_ns {
        metrics.expired.inc();
        tracing::info!(task_id = %task.id, "deadline passed before the scan; answered without scanning");
        (ConsumerError::Expired.verdict(&task.id), None)
    } else {
        crate::scan::scan(state, consumer, &d, task).await
    };
    verdict.task_id = task.id.clone();
    verdict.deliveries = d.deliveries;
    let hops = verdict.hops.get_or_insert_default();
    hops.claimed_ns = claimed_ns;
    metrics
        .scans
        .get_or_create(&VerdictLabels {
            verdict: verdict.status().label(),
        })
        .inc();
    // One line per detection: a producer logs the detections it blocks, with what only it
    // knows (request id, whether the policy blocked it); the consumer logs only those of
    // the seed's producers, which log nothing.
    if verdict.status() == VerdictStatus::Infected && d.is_legacy() {
        log_detection(
            task,
            &verdict,
            cache_key.as_ref().map(|(_, sha)| sha.as_slice()),
        );
    }
    let cache = cache_key
        .as_ref()
        .filter(|_| state.config().cache_enabled && !verdict.cached)
        .map(|(db, sha)| (db.as_str(), sha.as_slice()));
    if let Some(hops) = &mut verdict.hops {
        hops.written_ns = now_ns();
    }
    complete(state, consumer, &d, &verdict, cache).await;
}

/// Writes the verdict, riding out a Redis outage for up to the visibility timeout; after
/// that the entry is redelivered and answered by whoever holds it then.
async fn complete(
    state: &ConsumerState,
    consumer: &Consumer,
    d: &Delivery,
    verdict: &Verdict,
    cache: Option<(&str, &[u8])>,
) {
    let give_up = Instant::now() + state.config().queue.visibility_timeout;
    let mut delay = Duration::from_millis(100);
    loop {
        let e = match consumer.complete(d, verdict, cache).await {
            Ok(true) => return,
            Ok(false) => {
                tracing::info!(entry = %d.entry_id, "task was answered by another consumer");
                return;
            }
            Err(e) => ConsumerError::Queue(e),
        };
        if e.is_retryable() && Instant::now() < give_up {
            tracing::warn!(error = %e, entry = %d.entry_id, "cannot write verdict; retrying");
            state.count(&e);
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(2));
        } else {
            tracing::error!(error = %e, entry = %d.entry_id, "giving up on writing the verdict; the task will be redelivered");
            return;
        }
    }
}

/// One structured line per detection of a legacy task, for a SIEM.
fn log_detection(task: &ScanTask, verdict: &Verdict, sha256: Option<&[u8]>) {
    let labels = task.labels.clone().unwrap_or_default();
    tracing::warn!(
        event = "detection",
        task_id = %task.id,
        signature = %verdict.signature,
        sha256 = %sha256.map(hex::encode).unwrap_or_default(),
        tenant = %labels.tenant,
        policy = %labels.policy,
        route = %labels.route,
        direction = labels.direction().as_str_name(),
        client_address = %labels.client_address,
        cached = verdict.cached,
        "infected content detected"
    );
}
