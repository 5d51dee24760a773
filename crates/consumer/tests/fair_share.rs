//! Two tenants on the real consumer and clamd: one floods ten times its share, of normal and
//! then of high-priority tasks, while the other sends a steady load; the steady tenant's
//! wait stays close to what it is alone, and none of its scans fails.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::time::{Duration, Instant};

use virus_scanner_protocol::task::{Content, Priority, ScanTask, VerdictStatus};
use virus_scanner_queue::{Producer, QueueConfig, RedisConfig, now_ns};
use virus_scanner_test_support::{
    Clamd, Redis, ServiceProcess, clean_bytes, http_get, port_of, wait_for,
};

fn config(redis: &Redis, tenant: &str) -> QueueConfig {
    let mut c = QueueConfig::new(RedisConfig::from_host_port(
        "127.0.0.1",
        redis.port(),
        false,
    ));
    c.tenant = tenant.into();
    c
}

fn task(id: String, body: Vec<u8>, priority: Priority) -> ScanTask {
    ScanTask {
        id,
        size: body.len() as u64,
        content: Some(Content::Body(body.into())),
        priority: priority as i32,
        enqueued_at_ns: now_ns(),
        ..ScanTask::default()
    }
}

fn start_consumer(redis: &Redis, clamd: &Clamd, scan_dir: &Path) -> ServiceProcess {
    let args: Vec<String> = [
        "--redis-host",
        "127.0.0.1",
        "--redis-port",
        &redis.port().to_string(),
        "--clamd-address",
        &clamd.address(),
        "--scan-tmp-dir",
        &scan_dir.display().to_string(),
        "--metrics-addr",
        "127.0.0.1:0",
        "--concurrency",
        "1",
        "--log-format",
        "text",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut p = ServiceProcess::spawn(
        Path::new(env!("CARGO_BIN_EXE_virus-scanner-handler")),
        &args,
        &[],
    );
    let metrics =
        port_of(&p.wait_for_fields("consumer started", &["metrics"], Duration::from_secs(20))[0]);
    assert!(
        wait_for(Duration::from_secs(20), || {
            http_get(metrics, "/ready").is_some_and(|(s, _)| s == 200)
        }),
        "consumer not ready\n{}",
        p.log_tail()
    );
    p
}

/// b sends one distinct 16 KiB body every 50 ms for `seconds`, each waited for, or until
/// `flood` has fewer than 100 tasks queued; the waits, sorted, and how many were not clean.
async fn steady(
    b: &Producer,
    round: &str,
    seconds: f64,
    flood: Option<&Producer>,
) -> (Vec<Duration>, usize) {
    let start = Instant::now();
    let (mut waits, mut failed) = (Vec::new(), 0);
    let mut n = 0u64;
    while start.elapsed().as_secs_f64() < seconds {
        if let Some(a) = flood {
            let (high, normal) = a.depth().await.unwrap();
            if high + normal < 100 {
                break;
            }
        }
        let t = task(
            format!("b{round}{n}"),
            clean_bytes(16 << 10, 1_000_000 + n + round.len() as u64 * 7919),
            Priority::Normal,
        );
        let sent = Instant::now();
        match b.scan(&t, Instant::now() + Duration::from_secs(30)).await {
            Ok(v) if v.status() == VerdictStatus::Clean => {}
            _ => failed += 1,
        }
        waits.push(sent.elapsed());
        n += 1;
        tokio::time::sleep(Duration::from_millis(50).saturating_sub(sent.elapsed())).await;
    }
    waits.sort();
    (waits, failed)
}

fn pct(waits: &[Duration], p: usize) -> Duration {
    waits[(waits.len() * p / 100).min(waits.len() - 1)]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_flooding_normal_or_high_tasks_leaves_the_other_its_share() {
    let redis = Redis::start();
    let clamd = Clamd::start();
    let scan_dir = tempfile::tempdir().unwrap();
    let _consumer = start_consumer(&redis, &clamd, scan_dir.path());
    let a = Producer::connect(config(&redis, "a")).await.unwrap();
    let b = Producer::connect(config(&redis, "b")).await.unwrap();

    // Warm clamd up, then b alone.
    let _ = steady(&b, "warm", 1.0, None).await;
    let (alone, failed) = steady(&b, "alone", 3.0, None).await;
    assert_eq!(failed, 0);
    let mut report = vec![format!(
        "| b alone | {} | {:?} | {:?} | 0 |",
        alone.len(),
        pct(&alone, 50),
        pct(&alone, 99)
    )];
    for priority in [Priority::Normal, Priority::High] {
        // 512 KiB bodies, far more than the consumer scans in the round: over ten times a's
        // share of it.
        for i in 0..800u64 {
            a.enqueue(&task(
                format!("a{priority:?}{i}"),
                clean_bytes(512 << 10, 5_000_000 + i + priority as u64 * 1000),
                priority,
            ))
            .await
            .unwrap();
        }
        let (queued_high, queued_normal) = a.depth().await.unwrap();
        let (flooded, failed) = steady(&b, &format!("{priority:?}"), 3.0, Some(&a)).await;
        report.push(format!(
            "| b while a floods {priority:?} ({} of a's tasks queued at the start) | {} | {:?} | {:?} | {failed} |",
            queued_high + queued_normal,
            flooded.len(),
            pct(&flooded, 50),
            pct(&flooded, 99)
        ));
        let table = format!(
            "| round | b's scans | p50 wait | p99 wait | b's failures |\n|---|---|---|---|---|\n{}",
            report.join("\n")
        );
        assert!(
            flooded.len() >= 15,
            "a's flood drained too soon to measure b against it\n{table}"
        );
        assert_eq!(failed, 0, "{table}");
        // b waits for the scans in flight and at most one of a's per turn: a bound far
        // below a's backlog (hundreds of scans), stated against b alone.
        let bound = pct(&alone, 99) * 3 + Duration::from_millis(150);
        assert!(
            pct(&flooded, 99) <= bound,
            "b's p99 wait is past {bound:?}\n{table}"
        );
        // Drain a's flood before the next round.
        let start = Instant::now();
        while a.depth().await.unwrap() != (0, 0) {
            assert!(
                start.elapsed() < Duration::from_secs(120),
                "a's flood never drained"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    println!(
        "| round | b's scans | p50 wait | p99 wait | b's failures |\n|---|---|---|---|---|\n{}",
        report.join("\n")
    );
}
