//! `virus-scanner-bench hops`: where the time of a cache miss goes, hop by hop, and the CPU
//! each process spends per scan.
//!
//! The hop table follows distinct bodies through the queue's producer (in this process, as
//! the front ends use it), Redis, the consumer (its release binary) and clamd, from the
//! stamps each step leaves in the task and its verdict (wall-clock ns: one host, one clock).
//! The CPU table runs distinct bodies through the producer's ICAP service and reads utime +
//! stime of the producer, the consumer, Redis and clamd from /proc before and after.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use virus_scanner_protocol::task::{Content, ScanTask, VerdictStatus};
use virus_scanner_queue::{Producer, QueueConfig, RedisConfig, now_ns};
use virus_scanner_test_support::{Clamd, Redis, ServiceProcess, clean_bytes};

use crate::envoy::{cpu_seconds, release_binary, tempfile_dir};
use crate::{Args, measure, parse_size};

/// The steps of one task, in order; a hop is the time between two neighbours.
const STEPS: [&str; 8] = [
    "front end has the body",
    "enqueued",
    "claimed",
    "clamd start",
    "clamd end",
    "verdict written",
    "front end woke",
    "answered",
];

/// The consumer's release binary, ready; `--concurrency` as given, verdict cache on.
pub(crate) fn start_consumer_process(
    redis: &Redis,
    clamd: &Clamd,
    scan_dir: &std::path::Path,
    concurrency: usize,
    by_descriptor: bool,
) -> anyhow::Result<ServiceProcess> {
    let socket = clamd.socket_path().display().to_string();
    let mut args: Vec<String> = [
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
        &concurrency.to_string(),
        "--log-format",
        "text",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    if by_descriptor {
        args.extend(["--clamd-socket".to_owned(), socket]);
    }
    let mut consumer = ServiceProcess::spawn(
        &release_binary("virus-scanner-handler")?,
        &args,
        &[("RUST_LOG", "warn,virus_scanner_consumer=info".into())],
    );
    consumer.wait_for_fields("consumer started", &["metrics"], Duration::from_secs(30));
    Ok(consumer)
}

fn percentile(sorted: &[u64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize] as f64 / 1e6
}

pub async fn run(args: &Args) -> anyhow::Result<()> {
    let redis = Redis::start();
    let clamd = Clamd::start();
    let dir = tempfile_dir("vs-bench-hops")?;
    let scan_dir = dir.join("scan");
    std::fs::create_dir_all(&scan_dir)?;
    let consumer = start_consumer_process(
        &redis,
        &clamd,
        &scan_dir,
        args.concurrency,
        !args.stream_to_clamd,
    )?;
    let virus_scanner_test_support::ProducerProcess {
        process: producer_process,
        icap: icap_port,
        ..
    } = {
        let flags = crate::producer_flags(args);
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        crate::start_producer(&redis, &scan_dir, &flags)?
    };
    let producer = Arc::new(
        Producer::connect(QueueConfig::new(RedisConfig::from_host_port(
            "127.0.0.1",
            redis.port(),
            false,
        )))
        .await?,
    );
    // Until the consumer has seen clamd and published the database version.
    let warm = ScanTask {
        id: "warm".into(),
        content: Some(Content::Body(b"warm".to_vec().into())),
        ..ScanTask::default()
    };
    producer
        .submit(&warm, Instant::now() + Duration::from_secs(30))
        .await?;
    for _ in 0..50 {
        if producer.db_version().await?.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    println!(
        "Hops of a cache miss: {} scans in flight, {} s per size, clamd fed by {}; ms, p50 / \
         p99.\n",
        args.concurrency,
        args.seconds,
        if args.stream_to_clamd {
            "INSTREAM over TCP"
        } else {
            "FILDES on its Unix socket"
        }
    );
    let mut head = String::from("| body | scans/s |");
    let mut rule = String::from("|---|---|");
    for pair in STEPS.windows(2) {
        head.push_str(&format!(" {} → {} |", pair[0], pair[1]));
        rule.push_str("---|");
    }
    head.push_str(" total |");
    rule.push_str("---|");
    println!("{head}\n{rule}");
    for size_text in &args.sizes {
        let size = parse_size(size_text)?;
        let body = Arc::new(clean_bytes(size, 5));
        let stamps: Arc<Mutex<Vec<[u64; 8]>>> = Arc::default();
        // One warm-up round, not recorded.
        for record in [false, true] {
            let (producer, body, recorded) = (producer.clone(), body.clone(), stamps.clone());
            let cell = measure(args.concurrency, args.seconds, move |n| {
                let (producer, body, stamps) = (producer.clone(), body.clone(), recorded.clone());
                async move {
                    let bytes = crate::unique(&body);
                    let has_body = now_ns();
                    let task = ScanTask {
                        id: format!("hops-{size}-{record}-{n}"),
                        sha256: Sha256::digest(&bytes).to_vec(),
                        content: Some(Content::Body(bytes.into())),
                        enqueued_at_ns: now_ns(),
                        ..ScanTask::default()
                    };
                    let v = producer
                        .submit(&task, Instant::now() + Duration::from_secs(60))
                        .await?;
                    let answered = now_ns();
                    anyhow::ensure!(
                        v.status() == VerdictStatus::Clean && !v.cached,
                        "unexpected verdict {v:?}"
                    );
                    let h = v.hops.unwrap_or_default();
                    if record {
                        stamps.lock().unwrap_or_else(|e| e.into_inner()).push([
                            has_body,
                            task.enqueued_at_ns,
                            h.claimed_ns,
                            h.scan_started_ns,
                            h.scan_ended_ns,
                            h.written_ns,
                            h.woke_ns,
                            answered,
                        ]);
                    }
                    Ok(())
                }
            })
            .await?;
            if !record {
                continue;
            }
            let stamps = stamps.lock().unwrap_or_else(|e| e.into_inner());
            let mut row = format!("| {size_text} | {:.0} |", cell.per_second());
            // Each hop, then the whole way.
            let spans = (0..STEPS.len() - 1)
                .map(|i| (i, i + 1))
                .chain([(0, STEPS.len() - 1)]);
            for (from, to) in spans {
                let mut d: Vec<u64> = stamps
                    .iter()
                    .map(|s| s[to].saturating_sub(s[from]))
                    .collect();
                d.sort_unstable();
                row.push_str(&format!(
                    " {:.3} / {:.3} |",
                    percentile(&d, 0.5),
                    percentile(&d, 0.99)
                ));
            }
            println!("{row}");
        }
    }

    println!(
        "\nCPU per scan (ms), distinct bodies through the producer's ICAP service, {} \
         connections, {} s per size; /proc/<pid>/stat utime + stime, 10 ms ticks.\n",
        args.concurrency, args.seconds
    );
    println!(
        "| body | req/s | ICAP p50 ms | producer | consumer | Redis | clamd | all four |\n\
         |---|---|---|---|---|---|---|---|"
    );
    let pids = [
        producer_process.pid(),
        consumer.pid(),
        redis.pid(),
        clamd.pid(),
    ];
    for size_text in &args.sizes {
        let size = parse_size(size_text)?;
        let body = clean_bytes(size, 7);
        crate::icap::drive(icap_port, "avscan", &body, true, args).await?;
        let before = pids.map(cpu_seconds);
        let r = crate::icap::drive(icap_port, "avscan", &body, true, args).await?;
        let after = pids.map(cpu_seconds);
        let per = |i: usize| (after[i] - before[i]) / r.requests.max(1) as f64 * 1e3;
        println!(
            "| {size_text} | {:.0} | {:.2} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} |",
            r.rps,
            r.p50_ms,
            per(0),
            per(1),
            per(2),
            per(3),
            (0..4).map(per).sum::<f64>()
        );
    }
    drop(producer_process);
    drop(consumer);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
