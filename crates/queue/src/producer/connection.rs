//! Redis reachability, and the connections verdict waits park on.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, Weak};
use std::time::{Duration, Instant};

use redis::aio::MultiplexedConnection;

use super::Producer;
use crate::QueueError;

#[derive(Default)]
pub(super) struct Health {
    /// Cleared when the connection to Redis drops, set again once one is made. While it is
    /// clear nothing is decided from memory: with Redis down every body fails closed, even
    /// one decided a moment ago.
    pub(super) up: AtomicBool,
    /// Connections for `BLPOP`, one per waiting request: a blocking command would hold up
    /// every other command on a shared multiplexed connection, each with when it was put
    /// back. Emptied when Redis goes away; one idle for [`WAITER_IDLE`] is closed.
    pub(super) idle_waiters: Mutex<Vec<(MultiplexedConnection, Instant)>>,
    /// [`WAITER_IDLE`] unless set (milliseconds; 0 for the default).
    pub(super) waiter_idle_ms: AtomicU64,
}

/// How long a waiter connection stays open unused. Each keeps the buffers its largest
/// command needed (a whole inline body), and a burst of requests opens many: after the burst
/// they go, and with them the memory and Redis's connections.
pub(super) const WAITER_IDLE: Duration = Duration::from_secs(10);

impl Health {
    /// Closes the waiter connections unused for [`WAITER_IDLE`]. The most recently used are
    /// at the end, where `take_waiter` takes from.
    pub(super) fn close_idle_waiters(&self) {
        let limit = self.waiter_idle();
        let mut idle = self.idle_waiters.lock().unwrap_or_else(|e| e.into_inner());
        idle.retain(|(_, since)| since.elapsed() < limit);
    }

    pub(super) fn waiter_idle(&self) -> Duration {
        match self.waiter_idle_ms.load(Ordering::Relaxed) {
            0 => WAITER_IDLE,
            ms => Duration::from_millis(ms),
        }
    }
}

/// Closes idle waiter connections a few times per idle period (at least every second), until
/// the producer is gone.
pub(super) async fn close_idle_waiters(health: Weak<Health>) {
    loop {
        let period = match health.upgrade() {
            Some(h) => (h.waiter_idle() / 4).min(Duration::from_secs(1)),
            None => return,
        };
        tokio::time::sleep(period).await;
        match health.upgrade() {
            Some(h) => h.close_idle_waiters(),
            None => return,
        }
    }
}

impl Health {
    fn lost(&self) {
        self.up.store(false, Ordering::Relaxed);
        self.idle_waiters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }
}

/// Learns at once when Redis goes away: a connection parked in a `BLPOP` on a key nobody
/// writes returns only when the connection breaks. Marks Redis lost then, and up again once
/// a new connection is made. `register` (the tenants set and this tenant) is added again on
/// every connection: a Redis restarted without its data forgot it, and the consumers would
/// never read this tenant's stream again.
pub(super) async fn watch_connection(
    client: redis::Client,
    connect_timeout: Duration,
    canary: String,
    register: (String, String),
    health: std::sync::Weak<Health>,
) {
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(connect_timeout))
        .set_response_timeout(None);
    loop {
        let connection = client
            .get_multiplexed_async_connection_with_config(&config)
            .await;
        let Some(h) = health.upgrade() else { return };
        match connection {
            Ok(mut conn) => {
                // The connection is what the registration rides on: a failure shows next time.
                let _ = super::register_tenant(&mut conn, &register.0, &register.1).await;
                h.up.store(true, Ordering::Relaxed);
                drop(h);
                let parked: redis::RedisResult<Option<(String, Vec<u8>)>> = redis::cmd("BLPOP")
                    .arg(&canary)
                    .arg(0)
                    .query_async(&mut conn)
                    .await;
                if let Ok(Some(_)) = parked {
                    tracing::warn!(key = canary, "something pushed to the connection canary");
                }
                let Some(h) = health.upgrade() else { return };
                h.lost();
            }
            Err(_) => h.lost(),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

impl Producer {
    /// An idle waiter connection, else a new one.
    pub(super) async fn take_waiter(&self) -> Result<MultiplexedConnection, QueueError> {
        let idle = self
            .health
            .idle_waiters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop();
        match idle {
            Some((conn, _)) => Ok(conn),
            None => self.new_waiter().await,
        }
    }

    pub(super) async fn new_waiter(&self) -> Result<MultiplexedConnection, QueueError> {
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.config.redis.connect_timeout))
            .set_response_timeout(None);
        Ok(self
            .client
            .get_multiplexed_async_connection_with_config(&config)
            .await?)
    }

    pub(super) fn put_waiter(&self, conn: MultiplexedConnection) {
        let mut idle = self
            .health
            .idle_waiters
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if idle.len() < self.max_idle_waiters {
            idle.push((conn, Instant::now()));
        }
    }
}
