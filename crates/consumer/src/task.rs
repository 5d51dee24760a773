//! The claim loop: claims as many tasks as there are free scan slots, in one round trip when
//! that many are waiting, and runs each in a slot of its own: scan, answer.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;
use virus_scanner_protocol::task::{ScanTask, Verdict, VerdictStatus};
use virus_scanner_queue::{Consumer, Delivery, now_ns};

use crate::error::ConsumerError;
use crate::metrics::VerdictLabels;
use crate::state::ConsumerState;

pub(crate) async fn claim_loop(
    state: Arc<ConsumerState>,
    stop: tokio::sync::watch::Receiver<bool>,
) {
    // One member of the group on two connections: claims block on the first, while the
    // verdicts, heartbeats and body reads of the scans share the second.
    let Some(mut claimer) = state.connect_queue("w0", stop.clone()).await else {
        return;
    };
    let Some(answerer) = state.connect_queue("w0", stop.clone()).await else {
        return;
    };
    let answerer = Arc::new(answerer);
    let concurrency = state.config().concurrency;
    let slots = Arc::new(Semaphore::new(concurrency));
    let mut backoff = Duration::from_millis(100);
    while !*stop.borrow() {
        // A consumer whose clamd is down leaves tasks to consumers that can scan them.
        if !state.clamd_up() {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        }
        // A slot is free before anything is claimed, so a claimed task waits for no scan.
        let Ok(first) = slots.clone().acquire_owned().await else {
            break;
        };
        let free = 1 + slots.available_permits();
        // Not cancelled on shutdown: an entry read but dropped would wait for redelivery.
        match claimer.claim_up_to(Duration::from_secs(1), free).await {
            Ok(deliveries) => {
                backoff = Duration::from_millis(100);
                let mut first = Some(first);
                for d in deliveries {
                    // More than the free slots only from a read that waited or a reclaim.
                    let slot = match first.take() {
                        Some(slot) => slot,
                        None => match slots.clone().acquire_owned().await {
                            Ok(slot) => slot,
                            Err(_) => return,
                        },
                    };
                    let (state, answerer) = (state.clone(), answerer.clone());
                    tokio::spawn(async move {
                        process(&state, &answerer, d).await;
                        drop(slot);
                    });
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
    // Every task claimed is answered once all slots are back: then leave the group, so that
    // it does not list one more departed consumer after every restart.
    let _ = slots.acquire_many(concurrency as u32).await;
    if let Err(e) = claimer.leave().await {
        tracing::warn!(error = %e, consumer = claimer.name(), "cannot leave the consumer group");
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
