//! The seed's task list, moved into the stream.

use std::sync::Arc;
use std::time::Duration;

use virus_scanner_queue::LegacyBridge;

use crate::error::ConsumerError;
use crate::state::ConsumerState;

/// Moves tasks from the seed's list into the stream.
pub(crate) async fn bridge_legacy(
    state: Arc<ConsumerState>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut bridge = loop {
        match LegacyBridge::connect(state.config().queue.clone()).await {
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
                tracing::warn!(error = %e, "malformed legacy task");
                state.count(&ConsumerError::Undecodable(e));
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(error = %e, "legacy bridge");
                state.count(&ConsumerError::Queue(e));
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}
