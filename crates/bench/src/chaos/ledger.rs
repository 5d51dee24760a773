//! What Redis saw: every verdict pushed (keyspace notifications, counted per task, so a task
//! answered twice shows), and the task streams (entries added over each Redis lifetime,
//! entries still there: enqueued and never answered, since only the script that writes a
//! verdict deletes an entry).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;

/// Every tenant's streams: `{virus-scanner}:tasks:<tenant>:<high|normal>`.
const STREAMS: &str = "{virus-scanner}:tasks:*";
const VERDICT_PREFIX: &str = "{virus-scanner}:verdict:";

#[derive(Default)]
struct Counts {
    /// When each verdict key got a verdict pushed (seconds since `t0`).
    verdicts: HashMap<String, Vec<f64>>,
}

pub struct Ledger {
    url: String,
    counts: Arc<Mutex<Counts>>,
    task: tokio::task::JoinHandle<()>,
}

impl Ledger {
    /// Subscribes to list pushes on Redis at `port`, again after each restart.
    pub fn start(port: u16, t0: std::time::Instant) -> Ledger {
        let url = format!("redis://127.0.0.1:{port}/");
        let counts = Arc::new(Mutex::new(Counts::default()));
        let task = tokio::spawn(watch(url.clone(), counts.clone(), t0));
        Ledger { url, counts, task }
    }

    async fn connection(&self) -> anyhow::Result<redis::aio::MultiplexedConnection> {
        let client = redis::Client::open(self.url.as_str())?;
        Ok(tokio::time::timeout(
            Duration::from_secs(5),
            client.get_multiplexed_async_connection(),
        )
        .await??)
    }

    async fn streams(con: &mut redis::aio::MultiplexedConnection) -> anyhow::Result<Vec<String>> {
        let mut cursor = 0u64;
        let mut streams = Vec::new();
        loop {
            let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(STREAMS)
                .arg("TYPE")
                .arg("stream")
                .arg("COUNT")
                .arg(1000)
                .query_async(con)
                .await?;
            streams.extend(keys);
            if next == 0 {
                return Ok(streams);
            }
            cursor = next;
        }
    }

    /// Entries in the task streams now: enqueued and not (yet) answered.
    pub async fn open_entries(&self) -> anyhow::Result<u64> {
        let mut con = self.connection().await?;
        let mut total = 0;
        for stream in Self::streams(&mut con).await? {
            let n: u64 = redis::cmd("XLEN").arg(stream).query_async(&mut con).await?;
            total += n;
        }
        Ok(total)
    }

    /// Entries ever added to the task streams of this Redis lifetime.
    pub async fn entries_added(&self) -> anyhow::Result<u64> {
        let mut con = self.connection().await?;
        let mut total = 0;
        for stream in Self::streams(&mut con).await? {
            let info: redis::RedisResult<redis::Value> = redis::cmd("XINFO")
                .arg("STREAM")
                .arg(stream)
                .query_async(&mut con)
                .await;
            total += match info {
                Ok(value) => field_u64(&value, "entries-added").unwrap_or(0),
                // No such key: nothing was ever added.
                Err(_) => 0,
            };
        }
        Ok(total)
    }

    /// The pid and data directory of the Redis process.
    pub async fn server(&self) -> anyhow::Result<(u32, std::path::PathBuf)> {
        let mut con = self.connection().await?;
        let info: String = redis::cmd("INFO")
            .arg("server")
            .query_async(&mut con)
            .await?;
        let pid = info
            .lines()
            .find_map(|l| l.strip_prefix("process_id:"))
            .and_then(|v| v.trim().parse().ok())
            .ok_or_else(|| anyhow::anyhow!("no process_id in INFO"))?;
        let dir: Vec<String> = redis::cmd("CONFIG")
            .arg("GET")
            .arg("dir")
            .query_async(&mut con)
            .await?;
        let dir = dir
            .get(1)
            .ok_or_else(|| anyhow::anyhow!("no dir in CONFIG GET"))?;
        Ok((pid, dir.into()))
    }

    /// Tasks that got more than one verdict (key and the times of its verdicts), and
    /// verdicts seen in all.
    pub fn verdicts(&self) -> (Vec<(String, Vec<f64>)>, u64) {
        let counts = self
            .counts
            .lock()
            .map(|c| c.verdicts.clone())
            .unwrap_or_default();
        let all = counts.values().map(|v| v.len() as u64).sum();
        let twice = counts.into_iter().filter(|(_, v)| v.len() > 1).collect();
        (twice, all)
    }
}

impl Drop for Ledger {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn field_u64(value: &redis::Value, name: &str) -> Option<u64> {
    let pairs: Vec<(&redis::Value, &redis::Value)> = match value {
        redis::Value::Array(items) => items
            .chunks(2)
            .filter_map(|p| Some((p.first()?, p.get(1)?)))
            .collect(),
        redis::Value::Map(pairs) => pairs.iter().map(|(k, v)| (k, v)).collect(),
        _ => return None,
    };
    pairs.into_iter().find_map(|(k, v)| {
        let key = match k {
            redis::Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
            redis::Value::SimpleString(s) => s.clone(),
            _ => return None,
        };
        (key == name).then_some(())?;
        match v {
            redis::Value::Int(n) => u64::try_from(*n).ok(),
            _ => None,
        }
    })
}

async fn watch(url: String, counts: Arc<Mutex<Counts>>, t0: std::time::Instant) {
    loop {
        let _ = subscribe_once(&url, &counts, t0).await;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Turns on list-event notifications (a restarted Redis forgets them) once Redis has loaded
/// its data, and counts verdict pushes until the connection ends.
async fn subscribe_once(
    url: &str,
    counts: &Mutex<Counts>,
    t0: std::time::Instant,
) -> anyhow::Result<()> {
    let client = redis::Client::open(url)?;
    let mut con = client.get_multiplexed_async_connection().await?;
    // Not while a restarted Redis replays its AOF: the replayed pushes are not new verdicts.
    loop {
        let info: String = redis::cmd("INFO")
            .arg("persistence")
            .query_async(&mut con)
            .await?;
        if info.lines().any(|l| l.trim() == "loading:0") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("notify-keyspace-events")
        .arg("El")
        .query_async(&mut con)
        .await?;
    let mut pubsub = client.get_async_pubsub().await?;
    pubsub.subscribe("__keyevent@0__:rpush").await?;
    let mut messages = pubsub.on_message();
    while let Some(message) = messages.next().await {
        let key = String::from_utf8_lossy(message.get_payload_bytes()).into_owned();
        if key.starts_with(VERDICT_PREFIX)
            && let Ok(mut c) = counts.lock()
        {
            c.verdicts
                .entry(key)
                .or_default()
                .push(t0.elapsed().as_secs_f64());
        }
    }
    Ok(())
}
