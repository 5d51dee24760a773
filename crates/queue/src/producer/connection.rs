//! Redis reachability, and the connections verdict waits park on.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

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
    /// every other command on a shared multiplexed connection. Emptied when Redis goes away.
    pub(super) idle_waiters: Mutex<Vec<MultiplexedConnection>>,
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
            Some(conn) => Ok(conn),
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
            idle.push(conn);
        }
    }
}
