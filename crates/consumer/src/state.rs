//! What the consumer's scan loops and background tasks share.

use std::sync::RwLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use virus_scanner_clamd::{ClamdClient, ClamdConfig, EngineVersion};
use virus_scanner_queue::Consumer;

use crate::config::ConsumerConfig;
use crate::error::ConsumerError;
use crate::metrics::Metrics;
use crate::scan_dir::{PathRejected, ScanDir};

/// The consumer's configuration, its clamd client and metrics, and what it knows of clamd.
pub(crate) struct ConsumerState {
    config: ConsumerConfig,
    clamd: ClamdClient,
    metrics: Metrics,
    scan_dir: ScanDir,
    engine: RwLock<Option<EngineVersion>>,
    clamd_up: AtomicBool,
}

impl ConsumerState {
    pub(crate) fn new(config: ConsumerConfig, scan_dir: ScanDir, metrics: Metrics) -> Self {
        let mut clamd_config = ClamdConfig::new(config.clamd.clone());
        clamd_config.io_timeout = config.scan_timeout;
        clamd_config.max_idle_sessions = config.concurrency + 1;
        clamd_config.local_socket = config.clamd_socket.clone();
        ConsumerState {
            clamd: ClamdClient::new(clamd_config),
            metrics,
            scan_dir,
            engine: RwLock::new(None),
            clamd_up: AtomicBool::new(false),
            config,
        }
    }

    pub(crate) fn config(&self) -> &ConsumerConfig {
        &self.config
    }

    pub(crate) fn clamd(&self) -> &ClamdClient {
        &self.clamd
    }

    pub(crate) fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Opens a PATH task's file, if it is one the consumer may read for `tenant` (trusted):
    /// in that tenant's directory, or for a task of the seed's bridge (`seed`, which only
    /// tasks from the bridge's own streams are), at the top of the scan directory.
    pub(crate) fn open_path(
        &self,
        tenant: &str,
        seed: bool,
        path: &str,
    ) -> Result<std::fs::File, PathRejected> {
        if seed {
            self.scan_dir.open_seed(path)
        } else {
            self.scan_dir.open(tenant, path)
        }
    }

    /// Counts the failure under its `kind`, if it is counted.
    pub(crate) fn count(&self, e: &ConsumerError) {
        if let Some(kind) = e.metric_label() {
            self.metrics.error(kind);
        }
    }

    /// clamd's engine and database versions, once it has answered.
    pub(crate) fn engine(&self) -> Option<EngineVersion> {
        self.engine
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub(crate) fn set_engine(&self, version: EngineVersion) {
        *self.engine.write().unwrap_or_else(|e| e.into_inner()) = Some(version);
    }

    /// Whether clamd answered its last check: a consumer whose clamd is down claims nothing
    /// and is not ready.
    pub(crate) fn clamd_up(&self) -> bool {
        self.clamd_up.load(Ordering::Relaxed)
    }

    pub(crate) fn mark_clamd_up(&self) {
        self.clamd_up.store(true, Ordering::Relaxed);
    }

    /// Marks clamd down; true when it was up until now.
    pub(crate) fn mark_clamd_down(&self) -> bool {
        self.clamd_up.swap(false, Ordering::Relaxed)
    }

    /// Connects a queue consumer named `<CONSUMER_NAME>-<suffix>`, retrying while Redis is
    /// unreachable; `None` on shutdown.
    pub(crate) async fn connect_queue(
        &self,
        suffix: &str,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) -> Option<Consumer> {
        let name = format!("{}-{suffix}", self.config.consumer_name);
        let mut delay = Duration::from_millis(100);
        loop {
            match Consumer::connect(self.config.queue.clone(), name.clone()).await {
                Ok(c) => return Some(c),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot reach redis; retrying");
                    self.count(&ConsumerError::Queue(e));
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = stop.wait_for(|s| *s) => return None,
            }
            delay = (delay * 2).min(Duration::from_secs(2));
        }
    }

    /// Readiness: clamd checked and answering, Redis answering.
    pub(crate) async fn ready(&self, control: &Consumer) -> Result<(), String> {
        if !self.clamd_up() {
            return Err("clamd not checked yet".to_owned());
        }
        control.ping().await.map_err(|e| format!("redis: {e}"))?;
        self.clamd.ping().await.map_err(|e| format!("clamd: {e}"))?;
        Ok(())
    }
}
