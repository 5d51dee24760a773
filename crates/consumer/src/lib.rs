//! The consumer (binary `virus-scanner-handler`): claims tasks from the queue, scans them with
//! clamd and writes verdicts.
//!
//! [`run`] starts the claim loop ([`task`]), a member of the queue's consumer group that runs
//! up to `SCAN_CONCURRENCY` scans at once, and beside it the clamd watch
//! ([`engine`]), the queue-depth gauge and the bridge from the seed's task list
//! ([`legacy`]). Failures are classified in [`error`].
#![forbid(unsafe_code)]

pub mod config;
pub mod error;
pub mod metrics;
pub mod scan_dir;

mod engine;
mod legacy;
mod scan;
mod state;
mod task;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::registry::Registry;
use virus_scanner_queue::Consumer;

pub use config::{ConsumerArgs, ConsumerConfig};
pub use error::{ConsumerError, Origin, RunError};
use metrics::{Metrics, QueueLabels};
use scan_dir::ScanDir;
use state::ConsumerState;

/// Runs the consumer until `shutdown` resolves, then stops claiming, lets the scans in
/// flight finish, and returns.
pub async fn run(
    config: ConsumerConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), RunError> {
    let scan_dir_error = |source| RunError::ScanDir {
        path: config.scan_tmp_dir.clone(),
        source,
    };
    std::fs::create_dir_all(&config.scan_tmp_dir).map_err(scan_dir_error)?;
    let scan_dir = ScanDir::new(&config.scan_tmp_dir).map_err(scan_dir_error)?;
    let mut registry = Registry::default();
    let metrics = Metrics::register(&mut registry);
    let state = Arc::new(ConsumerState::new(config, scan_dir, metrics));
    let config = state.config();

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let control = match state.connect_queue("control", stop_rx.clone()).await {
        Some(mut c) => {
            // Before readiness: tasks enqueued from now on are seen by this group.
            if let Err(e) = c.ensure_group().await {
                tracing::warn!(error = %e, "cannot create the consumer group yet");
            }
            Arc::new(c)
        }
        None => return Ok(()),
    };

    let ready: virus_scanner_runtime::ReadinessCheck = {
        let state = state.clone();
        let control = control.clone();
        Arc::new(move || {
            let state = state.clone();
            let control = control.clone();
            Box::pin(async move { state.ready(&control).await })
        })
    };
    let router = virus_scanner_runtime::ops_router(Arc::new(registry), ready);
    let mut ops_stop = stop_rx.clone();
    let (ops_addr, ops) =
        virus_scanner_runtime::bind_ops(config.metrics_addr, router, async move {
            let _ = ops_stop.wait_for(|s| *s).await;
        })
        .await
        .map_err(|source| RunError::MetricsAddr {
            addr: config.metrics_addr,
            source,
        })?;
    let ops = tokio::spawn(ops);
    tracing::info!(
        metrics = %ops_addr,
        clamd = %config.clamd,
        concurrency = config.concurrency,
        consumer = %config.consumer_name,
        "consumer started"
    );

    tokio::spawn(engine::watch_engine(
        state.clone(),
        control.clone(),
        stop_rx.clone(),
    ));
    tokio::spawn(sample_depth(
        state.clone(),
        control.clone(),
        stop_rx.clone(),
    ));
    if config.legacy_enabled {
        tokio::spawn(legacy::bridge_legacy(state.clone(), stop_rx.clone()));
    }
    let loops = vec![tokio::spawn(task::claim_loop(
        state.clone(),
        stop_rx.clone(),
    ))];

    shutdown.await;
    tracing::info!("shutting down: no new claims, finishing scans in flight");
    let _ = stop_tx.send(true);
    for l in loops {
        let _ = l.await;
    }
    let _ = ops.await;
    tracing::info!("consumer stopped");
    Ok(())
}

/// Keeps the queue-depth gauge current.
async fn sample_depth(
    state: Arc<ConsumerState>,
    control: Arc<Consumer>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        if let Ok(depths) = control.depth_by_tenant().await {
            let gauge = &state.metrics().queue_depth;
            // Tenants that are gone leave no stale series behind.
            gauge.clear();
            for (tenant, high, normal) in depths {
                for (priority, depth) in [("high", high), ("normal", normal)] {
                    gauge
                        .get_or_create(&QueueLabels {
                            tenant: tenant.clone(),
                            priority,
                        })
                        .set(depth as i64);
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}
