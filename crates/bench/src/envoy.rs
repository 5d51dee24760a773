//! `virus-scanner-bench envoy`: wrk through a real Envoy with the ext_proc filter against
//! the same Envoy route with the filter disabled, and against raw clamd INSTREAM of the same
//! bytes; producer memory and CPU from /proc.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use virus_scanner_clamd::{ClamdClient, ClamdConfig, ScanInput};
use virus_scanner_test_support::{
    BodyMode, Clamd, Envoy, EnvoyOptions, Processor, Redis, ServiceProcess, Upstream, clean_bytes,
    port_of,
};

use crate::{Args, measure, median, parse_size, unique};

struct Wrk {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    requests: u64,
}

/// Runs wrk with a Lua script that POSTs `body_file`; `unique` appends a tag so that no two
/// requests of the whole benchmark share a hash (every one is a cache miss).
fn wrk(
    url: &str,
    body_file: &Path,
    unique: bool,
    seconds: f64,
    connections: usize,
    dir: &Path,
) -> anyhow::Result<Wrk> {
    // Distinct across threads and across runs (a warm-up run must not fill the cache for
    // the measured one): run number, thread number, request number.
    static RUN: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let run = RUN.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let script = dir.join(format!("post-{run}.lua"));
    let body_expr = if unique {
        format!(r#"body .. "{run}-" .. tid .. "-" .. tostring(n)"#)
    } else {
        "body".to_owned()
    };
    std::fs::write(
        &script,
        format!(
            r#"local f = assert(io.open("{}", "rb"))
local body = f:read("*a")
f:close()
local threads = 0
function setup(thread)
  threads = threads + 1
  thread:set("tid", threads)
end
local n = 0
request = function()
  n = n + 1
  return wrk.format("POST", nil, {{["Content-Type"] = "application/octet-stream"}}, {body_expr})
end
"#,
            body_file.display()
        ),
    )?;
    let out = Command::new("wrk")
        .args([
            "-t",
            "2",
            "-c",
            &connections.to_string(),
            "-d",
            &format!("{}s", seconds.ceil() as u64),
            "--latency",
            "-s",
        ])
        .arg(&script)
        .arg(url)
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    anyhow::ensure!(
        out.status.success(),
        "wrk failed: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    anyhow::ensure!(!text.contains("Non-2xx"), "wrk saw errors:\n{text}");
    let field = |prefix: &str| -> Option<String> {
        text.lines()
            .find(|l| l.trim_start().starts_with(prefix))
            .and_then(|l| l.split_whitespace().nth(1).map(str::to_owned))
    };
    let ms = |s: String| -> f64 {
        let (num, unit) = s.split_at(s.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(s.len()));
        let v: f64 = num.parse().unwrap_or(f64::NAN);
        match unit {
            "us" => v / 1000.0,
            "ms" => v,
            "s" => v * 1000.0,
            "m" => v * 60_000.0,
            _ => f64::NAN,
        }
    };
    let requests = text
        .lines()
        .find(|l| l.contains("requests in"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    Ok(Wrk {
        rps: field("Requests/sec:")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0),
        p50_ms: field("50%").map(ms).unwrap_or(f64::NAN),
        p99_ms: field("99%").map(ms).unwrap_or(f64::NAN),
        requests,
    })
}

fn proc_status(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// utime + stime of a process, in seconds.
pub(crate) fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: u64 = fields.get(11).and_then(|v| v.parse().ok()).unwrap_or(0)
        + fields.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
    ticks as f64 / 100.0
}

/// A binary built next to this one (`cargo build --release --bins`).
pub fn release_binary(name: &str) -> anyhow::Result<PathBuf> {
    std::env::current_exe()?
        .parent()
        .map(|d| d.join(name))
        .filter(|p| p.is_file())
        .ok_or_else(|| anyhow::anyhow!("build {name} first (cargo build --release --bins)"))
}

pub async fn run(args: &Args) -> anyhow::Result<()> {
    let redis = Redis::start();
    let clamd = Clamd::start();
    let dir = tempfile_dir("vs-bench-envoy")?;
    let scan_dir = dir.join("scan");
    std::fs::create_dir_all(&scan_dir)?;
    let socket = dir.join("ext_proc.sock");
    let (stop_tx, consumer) = crate::start_consumer(
        &redis,
        &clamd,
        &scan_dir,
        args.concurrency,
        true,
        !args.stream_to_clamd,
    )?;

    let virus_scanner_test_support::ProducerProcess {
        process: producer,
        grpc,
        ..
    } = {
        let mut flags = crate::producer_flags(args);
        flags.extend(["--grpc-socket".to_owned(), socket.display().to_string()]);
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        crate::start_producer(&redis, &scan_dir, &flags)?
    };
    let unix = args.processor == "unix";
    let processor = if unix {
        Processor::Unix(socket)
    } else {
        Processor::Tcp(grpc)
    };
    let upstream = Upstream::start();
    let envoy = Envoy::start(&EnvoyOptions::new(
        processor,
        upstream.port(),
        BodyMode::Buffered,
    ));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let pid = producer.pid();
    let idle_rss_kib = proc_status(pid, "VmRSS:");

    let mut raw_config = ClamdConfig::new(clamd.address().parse().map_err(anyhow::Error::msg)?);
    raw_config.max_idle_sessions = args.concurrency;
    let raw = Arc::new(ClamdClient::new(raw_config));

    println!(
        "Envoy reaches the producer over {}; {} connections.\n",
        match args.processor.as_str() {
            "unix" => "a Unix socket",
            _ => "loopback TCP",
        },
        args.concurrency
    );
    println!("| body | path | req/s | p50 ms | p99 ms | vs filter off | vs raw clamd |");
    println!("|---|---|---|---|---|---|---|");
    let mut cpu_per_1k_us = (f64::NAN, f64::NAN);
    let mut floor_cpu_us = f64::NAN;
    let mut hit_vs_miss_1m = f64::NAN;
    let mut load_rss_kib = 0;
    for size_text in &args.sizes {
        let size = parse_size(size_text)?;
        let body_file = dir.join(format!("body-{size}"));
        std::fs::write(&body_file, clean_bytes(size, 3))?;
        let seconds = args.seconds;
        let c = args.concurrency;
        // Warm-up on both paths.
        wrk(&envoy.url("/upload"), &body_file, true, 2.0, c, &dir)?;
        let off = wrk(
            &envoy.url("/safe/upload"),
            &body_file,
            true,
            seconds,
            c,
            &dir,
        )?;
        let cpu_before = cpu_seconds(pid);
        let miss = wrk(&envoy.url("/upload"), &body_file, true, seconds, c, &dir)?;
        let cpu = cpu_seconds(pid) - cpu_before;
        load_rss_kib = load_rss_kib.max(proc_status(pid, "VmHWM:"));
        let cpu_before_hit = cpu_seconds(pid);
        let hit = wrk(&envoy.url("/upload"), &body_file, false, seconds, c, &dir)?;
        let cpu_hit = cpu_seconds(pid) - cpu_before_hit;
        // The same load on a processor that only answers: what the exchanges cost by
        // themselves on this machine.
        let floor = if size == 1024 {
            let (floor, floor_processor) = start_floor(unix.then(|| dir.join("floor.sock")))?;
            let floor_envoy = Envoy::start(&EnvoyOptions::new(
                floor_processor,
                upstream.port(),
                BodyMode::Buffered,
            ));
            wrk(&floor_envoy.url("/upload"), &body_file, false, 1.0, c, &dir)?;
            let before = cpu_seconds(floor.pid());
            let w = wrk(
                &floor_envoy.url("/upload"),
                &body_file,
                false,
                seconds,
                c,
                &dir,
            )?;
            floor_cpu_us = (cpu_seconds(floor.pid()) - before) / w.requests.max(1) as f64 * 1e6;
            Some(w)
        } else {
            None
        };
        let body = Arc::new(clean_bytes(size, 3));
        let raw_cell = {
            let mut cells = Vec::new();
            for _ in 0..args.rounds.max(1) {
                let raw = raw.clone();
                let body = body.clone();
                cells.push(
                    measure(c, seconds, move |_| {
                        let raw = raw.clone();
                        let bytes = unique(&body);
                        async move {
                            raw.scan(ScanInput::Bytes(&bytes)).await?;
                            Ok(())
                        }
                    })
                    .await?,
                );
            }
            median(cells)
        };
        let raw_rps = raw_cell.per_second();
        let mut rows = vec![
            ("ext_proc, cache miss", &miss),
            ("ext_proc, cache hit", &hit),
        ];
        if let Some(w) = &floor {
            rows.push(("ext_proc floor (answers only)", w));
        }
        rows.push(("filter disabled", &off));
        for (name, w) in rows {
            println!(
                "| {size_text} | {name} | {:.0} | {:.2} | {:.2} | {:.2} | {:.2} |",
                w.rps,
                w.p50_ms,
                w.p99_ms,
                w.rps / off.rps,
                w.rps / raw_rps
            );
        }
        println!("| {size_text} | raw clamd INSTREAM | {raw_rps:.0} | | | | 1.00 |");
        if size == 1024 && miss.requests > 0 && hit.requests > 0 {
            cpu_per_1k_us = (
                cpu / miss.requests as f64 * 1e6,
                cpu_hit / hit.requests as f64 * 1e6,
            );
        }
        if size == 1 << 20 {
            hit_vs_miss_1m = hit.rps / miss.rps;
        }
    }
    println!();
    println!(
        "producer RSS idle: {:.1} MiB; peak under load: {:.1} MiB",
        idle_rss_kib as f64 / 1024.0,
        load_rss_kib as f64 / 1024.0
    );
    if !cpu_per_1k_us.0.is_nan() {
        println!(
            "producer CPU per 1 KiB request: {:.0} µs on a cache miss, {:.0} µs on a cache hit",
            cpu_per_1k_us.0, cpu_per_1k_us.1
        );
        println!(
            "ext_proc floor, a processor that only answers, on the same load: {floor_cpu_us:.0} µs \
             per 1 KiB request; the producer's scanning adds {:.0} µs on a miss, {:.0} µs on a hit",
            cpu_per_1k_us.0 - floor_cpu_us,
            cpu_per_1k_us.1 - floor_cpu_us
        );
    }
    if !hit_vs_miss_1m.is_nan() {
        println!("1 MiB cache hit vs cache miss throughput: {hit_vs_miss_1m:.1}x");
    }
    let _ = stop_tx.send(());
    consumer.await??;
    drop(envoy);
    drop(producer);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

pub fn tempfile_dir(prefix: &str) -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("{prefix}-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// `virus-scanner-bench ext-proc-floor` as a child process (see floor.rs), and how Envoy
/// reaches it.
fn start_floor(socket: Option<PathBuf>) -> anyhow::Result<(ServiceProcess, Processor)> {
    let mut args = vec!["ext-proc-floor".to_owned()];
    if let Some(path) = &socket {
        args.extend(["--socket".to_owned(), path.display().to_string()]);
    }
    let mut floor = ServiceProcess::spawn(&std::env::current_exe()?, &args, &[]);
    let bound = floor.wait_for_fields(
        "floor processor listening",
        &["address"],
        Duration::from_secs(20),
    );
    let processor = match socket {
        Some(path) => Processor::Unix(path),
        None => Processor::Tcp(port_of(&bound[0])),
    };
    Ok((floor, processor))
}
