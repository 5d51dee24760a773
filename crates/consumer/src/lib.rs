//! The consumer (`virus-scanner-handler`): claims tasks from the queue, scans them with
//! clamd and writes verdicts.
#![forbid(unsafe_code)]

pub mod config;
pub mod metrics;
pub mod scan_dir;
mod worker;

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use prometheus_client::registry::Registry;
use virus_scanner_clamd::{ClamdClient, ClamdConfig, EngineVersion};
use virus_scanner_queue::{Consumer, LegacyBridge};

pub use config::{HandlerArgs, HandlerConfig};
use metrics::{Metrics, PriorityLabels};
use scan_dir::ScanDir;

/// How often clamd's health and database version are checked.
const ENGINE_POLL: Duration = Duration::from_secs(2);

/// State shared by the workers.
pub(crate) struct Shared {
    pub config: HandlerConfig,
    pub clamd: ClamdClient,
    pub metrics: Metrics,
    pub scan_dir: ScanDir,
    pub engine: RwLock<Option<EngineVersion>>,
    pub clamd_up: AtomicBool,
}

impl Shared {
    pub fn engine(&self) -> Option<EngineVersion> {
        self.engine
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn clamd_up(&self) -> bool {
        self.clamd_up.load(Ordering::Relaxed)
    }
}

/// Runs the consumer until `shutdown` resolves, then stops claiming, lets the scans in
/// flight finish, and returns.
pub async fn run(
    config: HandlerConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(&config.scan_tmp_dir)
        .map_err(|e| anyhow::anyhow!("SCAN_TMP_DIR {}: {e}", config.scan_tmp_dir.display()))?;
    let scan_dir = ScanDir::new(&config.scan_tmp_dir)
        .map_err(|e| anyhow::anyhow!("SCAN_TMP_DIR {}: {e}", config.scan_tmp_dir.display()))?;
    let mut registry = Registry::default();
    let metrics = Metrics::register(&mut registry);
    let mut clamd_config = ClamdConfig::new(config.clamd.clone());
    clamd_config.io_timeout = config.scan_timeout;
    clamd_config.max_idle_sessions = config.concurrency + 1;
    let shared = Arc::new(Shared {
        clamd: ClamdClient::new(clamd_config),
        metrics,
        scan_dir,
        engine: RwLock::new(None),
        clamd_up: AtomicBool::new(false),
        config,
    });

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let control = connect_with_retry(&shared, "control", stop_rx.clone()).await;
    let control = match control {
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
        let shared = shared.clone();
        let control = control.clone();
        Arc::new(move || {
            let shared = shared.clone();
            let control = control.clone();
            Box::pin(async move {
                if !shared.clamd_up() {
                    return Err("clamd not checked yet".to_owned());
                }
                control.ping().await.map_err(|e| format!("redis: {e}"))?;
                shared
                    .clamd
                    .ping()
                    .await
                    .map_err(|e| format!("clamd: {e}"))?;
                Ok(())
            })
        })
    };
    let router = virus_scanner_runtime::ops_router(Arc::new(registry), ready);
    let mut ops_stop = stop_rx.clone();
    let (ops_addr, ops) =
        virus_scanner_runtime::bind_ops(shared.config.metrics_addr, router, async move {
            let _ = ops_stop.wait_for(|s| *s).await;
        })
        .await
        .map_err(|e| anyhow::anyhow!("METRICS_ADDR {}: {e}", shared.config.metrics_addr))?;
    let ops = tokio::spawn(ops);
    tracing::info!(
        metrics = %ops_addr,
        clamd = %shared.config.clamd,
        concurrency = shared.config.concurrency,
        consumer = %shared.config.consumer_name,
        "consumer started"
    );

    tokio::spawn(watch_engine(
        shared.clone(),
        control.clone(),
        stop_rx.clone(),
    ));
    tokio::spawn(sample_depth(
        shared.clone(),
        control.clone(),
        stop_rx.clone(),
    ));
    if shared.config.legacy_enabled {
        tokio::spawn(bridge_legacy(shared.clone(), stop_rx.clone()));
    }
    let mut workers = Vec::new();
    for index in 0..shared.config.concurrency {
        workers.push(tokio::spawn(worker::run(
            shared.clone(),
            index,
            stop_rx.clone(),
        )));
    }

    shutdown.await;
    tracing::info!("shutting down: no new claims, finishing scans in flight");
    let _ = stop_tx.send(true);
    for w in workers {
        let _ = w.await;
    }
    let _ = ops.await;
    tracing::info!("consumer stopped");
    Ok(())
}

/// Connects a queue consumer, retrying while Redis is unreachable; `None` on shutdown.
pub(crate) async fn connect_with_retry(
    shared: &Shared,
    suffix: &str,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> Option<Consumer> {
    let name = format!("{}-{suffix}", shared.config.consumer_name);
    let mut delay = Duration::from_millis(100);
    loop {
        match Consumer::connect(shared.config.queue.clone(), name.clone()).await {
            Ok(c) => return Some(c),
            Err(e) => {
                shared.metrics.error("redis");
                tracing::warn!(error = %e, "cannot reach redis; retrying");
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = stop.wait_for(|s| *s) => return None,
        }
        delay = (delay * 2).min(Duration::from_secs(2));
    }
}

/// Keeps clamd's health and database version current, and tells producers the version.
async fn watch_engine(
    shared: Arc<Shared>,
    control: Arc<Consumer>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut published: Option<String> = None;
    let mut rounds = 0u32;
    loop {
        match shared.clamd.version().await {
            Ok(version) => {
                // Only this task sets it, so a load then a store is no race.
                let came_up = !shared.clamd_up.load(Ordering::Relaxed);
                if came_up {
                    tracing::info!(engine = %version.engine, database = ?version.database, "clamd is up");
                }
                if version.database.is_none() && published.is_none() && rounds == 0 {
                    tracing::warn!(
                        "clamd reports no signature-database version (no daily database); \
                         the verdict cache is off"
                    );
                }
                if let Some(db) = &version.database
                    && (published.as_ref() != Some(db) || rounds.is_multiple_of(30))
                {
                    match control.publish_db_version(db).await {
                        Ok(()) => published = Some(db.clone()),
                        Err(e) => tracing::debug!(error = %e, "cannot publish db version"),
                    }
                }
                *shared.engine.write().unwrap_or_else(|e| e.into_inner()) = Some(version);
                // Claims and readiness wait for this: by then producers can read the
                // database version, and verdicts are cached under it.
                if came_up {
                    check_threads(&shared).await;
                    shared.clamd_up.store(true, Ordering::Relaxed);
                }
            }
            Err(e) => {
                if shared.clamd_up.swap(false, Ordering::Relaxed) || rounds == 0 {
                    tracing::warn!(error = %e, "clamd is unreachable; not claiming tasks");
                }
                shared.metrics.error("clamd");
            }
        }
        rounds = rounds.wrapping_add(1);
        tokio::select! {
            _ = tokio::time::sleep(ENGINE_POLL) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

/// Scans past clamd's `MaxThreads` only wait in its queue, while each holds a session that
/// counts against `MaxQueue`: warn when the concurrency is set above it.
async fn check_threads(shared: &Shared) {
    let concurrency = shared.config.concurrency;
    match shared.clamd.threads().await {
        Ok(threads) if concurrency > threads.max as usize => tracing::warn!(
            concurrency,
            clamd_max_threads = threads.max,
            "SCAN_CONCURRENCY is above clamd's MaxThreads: the scans past it wait in clamd's \
             queue and hold sessions that count against its MaxQueue"
        ),
        Ok(threads) => tracing::info!(
            concurrency,
            clamd_max_threads = threads.max,
            "SCAN_CONCURRENCY is within clamd's MaxThreads"
        ),
        Err(e) => tracing::warn!(error = %e, "cannot read clamd's MaxThreads (STATS)"),
    }
}

async fn sample_depth(
    shared: Arc<Shared>,
    control: Arc<Consumer>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        if let Ok((high, normal)) = control.depth().await {
            for (priority, depth) in [("high", high), ("normal", normal)] {
                shared
                    .metrics
                    .queue_depth
                    .get_or_create(&PriorityLabels { priority })
                    .set(depth as i64);
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

/// Moves tasks from the seed's list into the stream.
async fn bridge_legacy(shared: Arc<Shared>, mut stop: tokio::sync::watch::Receiver<bool>) {
    let mut bridge = loop {
        match LegacyBridge::connect(shared.config.queue.clone()).await {
            Ok(b) => break b,
            Err(e) => tracing::debug!(error = %e, "legacy bridge cannot reach redis"),
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    };
    match bridge.recover().await {
        Ok(0) => {}
        Ok(n) => tracing::info!(
            tasks = n,
            "legacy tasks put back after an interrupted bridge"
        ),
        Err(e) => tracing::warn!(error = %e, "legacy recovery failed"),
    }
    while !*stop.borrow() {
        match bridge.forward(Duration::from_secs(1)).await {
            Ok(Some(Ok(id))) => tracing::debug!(task_id = %id, "legacy task queued"),
            Ok(Some(Err(e))) => {
                shared.metrics.error("decode");
                tracing::warn!(error = %e, "malformed legacy task");
            }
            Ok(None) => {}
            Err(e) => {
                shared.metrics.error("redis");
                tracing::warn!(error = %e, "legacy bridge");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}
