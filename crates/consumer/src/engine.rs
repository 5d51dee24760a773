//! clamd's health and signature-database version, polled.

use std::sync::Arc;
use std::time::Duration;

use virus_scanner_queue::Consumer;

use crate::error::ConsumerError;
use crate::state::ConsumerState;

/// How often clamd's health and database version are checked.
const ENGINE_POLL: Duration = Duration::from_secs(2);

/// Keeps clamd's health and database version current, and tells producers the version.
pub(crate) async fn watch_engine(
    state: Arc<ConsumerState>,
    control: Arc<Consumer>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut published: Option<String> = None;
    let mut rounds = 0u32;
    loop {
        match state.clamd().version().await {
            Ok(version) => {
                // Only this task marks clamd up, so a load then a store is no race.
                let came_up = !state.clamd_up();
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
                state.set_engine(version);
                // Claims and readiness wait for this: by then producers can read the
                // database version, and verdicts are cached under it.
                if came_up {
                    check_threads(&state).await;
                    state.mark_clamd_up();
                }
            }
            Err(e) => {
                if state.mark_clamd_down() || rounds == 0 {
                    tracing::warn!(error = %e, "clamd is unreachable; not claiming tasks");
                }
                state.count(&ConsumerError::Clamd(e));
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
async fn check_threads(state: &ConsumerState) {
    let concurrency = state.config().concurrency;
    match state.clamd().threads().await {
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
