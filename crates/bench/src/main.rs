//! `make bench`: scans per second through Redis and the consumer against raw clamd INSTREAM
//! of the same bytes on the same clamd, in one run, as a ratio.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
use virus_scanner_clamd::{ClamdClient, ClamdConfig, ScanInput};
use virus_scanner_protocol::task::{Content, ScanTask, VerdictStatus};
use virus_scanner_queue::{Producer, QueueConfig, RedisConfig, now_ns};
use virus_scanner_test_support::{Clamd, Redis, clean_bytes};

mod chaos;
mod envoy;
mod floor;
mod hops;
mod icap;

#[derive(Parser, Debug)]
pub struct Args {
    /// `queue`: Redis + consumer against raw clamd; `envoy`: wrk through Envoy + ext_proc;
    /// `icap`: our ICAP service against c-icap's virus_scan on the same clamd; `chaos`: the
    /// whole stack under load while faults are injected; `hops`: where a cache miss spends
    /// its time, hop by hop, and the CPU per scan of each process.
    #[arg(default_value = "queue")]
    what: String,
    /// Body sizes, e.g. 1K,1M,10M.
    #[arg(long, default_value = "1K,1M,10M", value_delimiter = ',')]
    sizes: Vec<String>,
    /// Scans in flight at once (and consumer concurrency).
    #[arg(long, default_value_t = 4)]
    concurrency: usize,
    /// Seconds per measurement.
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
    /// Alternating rounds per path; the median is reported. clamd speeds up over its first
    /// seconds of load, so one discarded warm-up round comes first.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// `envoy`: how Envoy reaches the producer, `tcp` (loopback port) or `unix` (a socket in a
    /// shared directory, as the sidecar's UnixSocket transport).
    #[arg(long, default_value = "tcp", value_parser = ["tcp", "unix"])]
    processor: String,
    /// `chaos`: one cycle of the fault schedule, under two minutes (what `make test` runs).
    #[arg(long)]
    short: bool,
    /// `chaos`: minutes of load of the long campaign (whole cycles of 75 s).
    #[arg(long, default_value_t = 10.0)]
    minutes: f64,
    /// `chaos`: seed of the load and of the fault choices (default: the clock).
    #[arg(long)]
    seed: Option<u64>,
    /// `chaos`: every request on this route only (buffered-upload, duplex-upload,
    /// buffered-download, duplex-download, icap-reqmod, icap-respmod, abort), to stress one
    /// path under the same faults.
    #[arg(long)]
    route: Option<String>,
    /// `chaos`: also write every request (and, to `<file>.faults`, every fault) as CSV.
    #[arg(long)]
    records: Option<std::path::PathBuf>,
    /// The consumer streams every body to clamd over TCP (INSTREAM) instead of passing its
    /// file descriptor on clamd's Unix socket (FILDES), as with a clamd on another host.
    #[arg(long)]
    stream_to_clamd: bool,
    /// `icap`, `envoy`, `hops`: bodies above this many MiB are spilled by the producer to
    /// the spool it shares with the consumer and scanned from there by path (the producer's
    /// `SCAN_FILE_THRESHOLD_MB`, default 10), instead of travelling inline through Redis.
    #[arg(long)]
    spill_threshold_mb: Option<u64>,
    /// `ext-proc-floor` (run by the Envoy benchmark): serve on this Unix socket.
    #[arg(long, hide = true)]
    socket: Option<String>,
}

pub fn parse_size(s: &str) -> anyhow::Result<usize> {
    let (num, mult) = match s.chars().last() {
        Some('K') | Some('k') => (&s[..s.len() - 1], 1024),
        Some('M') | Some('m') => (&s[..s.len() - 1], 1024 * 1024),
        _ => (s, 1),
    };
    Ok(num.parse::<usize>()? * mult)
}

pub struct Cell {
    scans: u64,
    elapsed: Duration,
}

impl Cell {
    pub fn per_second(&self) -> f64 {
        self.scans as f64 / self.elapsed.as_secs_f64()
    }
}

/// Runs `concurrency` loops of `one` for `seconds`; each call gets a distinct counter value.
pub async fn measure<F, Fut>(concurrency: usize, seconds: f64, one: F) -> anyhow::Result<Cell>
where
    F: Fn(u64) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send,
{
    let one = Arc::new(one);
    let counter = Arc::new(AtomicU64::new(0));
    let end = Instant::now() + Duration::from_secs_f64(seconds);
    let start = Instant::now();
    let mut loops = Vec::new();
    for _ in 0..concurrency {
        let one = one.clone();
        let counter = counter.clone();
        loops.push(tokio::spawn(async move {
            let mut done = 0u64;
            while Instant::now() < end {
                one(counter.fetch_add(1, Ordering::Relaxed)).await?;
                done += 1;
            }
            Ok::<u64, anyhow::Error>(done)
        }));
    }
    let mut scans = 0;
    for l in loops {
        scans += l.await??;
    }
    Ok(Cell {
        scans,
        elapsed: start.elapsed(),
    })
}

/// The body with its first bytes replaced by a counter of this process, so that no two scans
/// in a run share a hash (none can be answered from a cache filled by an earlier round).
pub fn unique(body: &[u8]) -> Vec<u8> {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut b = body.to_vec();
    let tag = n.to_le_bytes();
    let k = tag.len().min(b.len());
    b[..k].copy_from_slice(&tag[..k]);
    b
}

/// The producer flags of a benchmark: bodies up to 200 MiB, and the spill threshold asked
/// for.
pub fn producer_flags(args: &Args) -> Vec<String> {
    let mut flags = vec!["--max-body-mb".to_owned(), "200".to_owned()];
    if let Some(mb) = args.spill_threshold_mb {
        flags.extend(["--scan-file-threshold-mb".to_owned(), mb.to_string()]);
    }
    flags
}

/// The release producer binary on loopback ports, ready; `extra` flags appended.
pub fn start_producer(
    redis: &Redis,
    scan_dir: &std::path::Path,
    extra: &[&str],
) -> anyhow::Result<virus_scanner_test_support::ProducerProcess> {
    let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
    Ok(virus_scanner_test_support::ProducerProcess::start(
        &envoy::release_binary("virus-scanner-producer")?,
        redis.port(),
        scan_dir,
        &extra,
        &[("RUST_LOG", "warn,virus_scanner_producer=info".into())],
    ))
}

/// The consumer running in this process.
type ConsumerTask = tokio::task::JoinHandle<Result<(), virus_scanner_consumer::RunError>>;

/// Runs the consumer in this process; send on the returned channel to stop it.
pub fn start_consumer(
    redis: &Redis,
    clamd: &Clamd,
    scan_dir: &std::path::Path,
    concurrency: usize,
    cache: bool,
    by_descriptor: bool,
) -> anyhow::Result<(tokio::sync::oneshot::Sender<()>, ConsumerTask)> {
    let mut argv: Vec<String> = [
        "virus-scanner-handler",
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
        "--cache-ttl-seconds",
        if cache { "3600" } else { "0" },
        "--log-format",
        "text",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    if by_descriptor {
        argv.extend([
            "--clamd-socket".to_owned(),
            clamd.socket_path().display().to_string(),
        ]);
    }
    let mut config = virus_scanner_consumer::ConsumerArgs::parse_from(argv)
        .validate()
        .map_err(|e| anyhow::anyhow!(e))?;
    config.legacy_enabled = false;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(virus_scanner_consumer::run(config, async move {
        let _ = stop_rx.await;
    }));
    Ok((stop_tx, task))
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    virus_scanner_runtime::init_tracing(virus_scanner_runtime::LogFormat::Text);
    if args.what == "ext-proc-floor" {
        // The child process of the Envoy benchmark; see floor.rs.
        return floor::serve(args.socket.as_deref());
    }
    if args.what == "chaos" {
        return chaos_main(&args);
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(async {
            match args.what.as_str() {
                "queue" => queue(&args).await,
                "envoy" => envoy::run(&args).await,
                "icap" => icap::run(&args).await,
                "hops" => hops::run(&args).await,
                other => anyhow::bail!("unknown benchmark {other:?}: queue, envoy, icap or hops"),
            }
        })
}

/// The fault campaign, in a mount namespace of its own when it can make one (root), where
/// the spool is a small tmpfs that it can fill to ENOSPC; exits 1 when an invariant broke.
fn chaos_main(args: &Args) -> anyhow::Result<()> {
    match std::env::var_os(chaos::NAMESPACE_ENV) {
        None => {
            // Inside, the campaign's temporary files (Redis's AOF among them, rewritten and
            // killed mid-rewrite many times over) live in a tmpfs of their own, never on
            // the machine's disk.
            let scratch = std::env::temp_dir().join(format!("vs-chaos-tmp-{}", std::process::id()));
            std::fs::create_dir_all(&scratch)?;
            let unshare = std::process::Command::new("unshare")
                .args(["--mount", "--propagation", "private", "--"])
                .arg(std::env::current_exe()?)
                .args(std::env::args_os().skip(1))
                .env(chaos::NAMESPACE_ENV, &scratch)
                .env("TMPDIR", &scratch)
                .status();
            let _ = std::fs::remove_dir(&scratch);
            match unshare {
                // unshare itself failed (no privilege): run here, without the ENOSPC fault.
                Ok(status) if status.code() == Some(1) && !namespaces_allowed() => {}
                Ok(status) => std::process::exit(status.code().unwrap_or(1)),
                Err(_) => {}
            }
        }
        Some(scratch) => {
            let _ = std::process::Command::new("mount")
                .args(["-t", "tmpfs", "-o", "size=4g,mode=0700", "tmpfs"])
                .arg(scratch)
                .status();
        }
    }
    let held = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(chaos::run(args))?;
    if !held {
        std::process::exit(1);
    }
    Ok(())
}

/// Whether this process may make a mount namespace (`unshare --mount true` succeeds).
fn namespaces_allowed() -> bool {
    std::process::Command::new("unshare")
        .args(["--mount", "true"])
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Scans per second through Redis and the consumer against raw clamd INSTREAM.
async fn queue(args: &Args) -> anyhow::Result<()> {
    let redis = Redis::start();
    let clamd = Clamd::start();
    let scan_dir = envoy::tempfile_dir("vs-bench")?;
    let (stop_tx, consumer) = start_consumer(
        &redis,
        &clamd,
        &scan_dir,
        args.concurrency,
        false,
        !args.stream_to_clamd,
    )?;

    let producer = Arc::new(
        Producer::connect(QueueConfig::new(RedisConfig::from_host_port(
            "127.0.0.1",
            redis.port(),
            false,
        )))
        .await?,
    );
    let mut raw_config = ClamdConfig::new(clamd.address().parse().map_err(anyhow::Error::msg)?);
    raw_config.max_idle_sessions = args.concurrency;
    let mut fd_config = raw_config.clone();
    fd_config.local_socket = Some(clamd.socket_path());
    let raw = Arc::new(ClamdClient::new(raw_config));
    let raw_fd = Arc::new(ClamdClient::new(fd_config));

    // Warm up both paths (and wait for the consumer to see clamd).
    let warm = ScanTask {
        id: "warm".into(),
        content: Some(Content::Body(b"warm".to_vec().into())),
        ..ScanTask::default()
    };
    producer
        .scan(&warm, Instant::now() + Duration::from_secs(30))
        .await?;

    println!(
        "| body | raw clamd INSTREAM scans/s | raw MB/s | raw clamd FILDES (memfd) scans/s | \
         queue+consumer scans/s | MB/s | ratio to INSTREAM |\n\
         |---|---|---|---|---|---|---|"
    );
    for size_text in &args.sizes {
        let size = parse_size(size_text)?;
        let body = Arc::new(clean_bytes(size, 1));
        let raw_round = |raw: &Arc<ClamdClient>| {
            let raw = raw.clone();
            let body = body.clone();
            measure(args.concurrency, args.seconds, move |_| {
                let raw = raw.clone();
                let bytes = unique(&body);
                async move {
                    raw.scan(ScanInput::Bytes(&bytes)).await?;
                    Ok(())
                }
            })
        };
        let queue_round = || {
            let producer = producer.clone();
            let body = body.clone();
            measure(args.concurrency, args.seconds, move |n| {
                let producer = producer.clone();
                let task = ScanTask {
                    id: format!("bench-{size}-{n}"),
                    content: Some(Content::Body(unique(&body).into())),
                    enqueued_at_ns: now_ns(),
                    ..ScanTask::default()
                };
                async move {
                    let v = producer
                        .scan(&task, Instant::now() + Duration::from_secs(60))
                        .await?;
                    anyhow::ensure!(
                        v.status() == VerdictStatus::Clean,
                        "unexpected verdict {v:?}"
                    );
                    Ok(())
                }
            })
        };
        raw_round(&raw).await?;
        raw_round(&raw_fd).await?;
        queue_round().await?;
        let mut raws = Vec::new();
        let mut fds = Vec::new();
        let mut queues = Vec::new();
        for _ in 0..args.rounds.max(1) {
            raws.push(raw_round(&raw).await?);
            fds.push(raw_round(&raw_fd).await?);
            queues.push(queue_round().await?);
        }
        let raw_cell = median(raws);
        let fd_cell = median(fds);
        let queue_cell = median(queues);
        let mb = |c: &Cell| c.per_second() * size as f64 / 1e6;
        println!(
            "| {size_text} | {:.0} | {:.1} | {:.0} | {:.0} | {:.1} | {:.2} |",
            raw_cell.per_second(),
            mb(&raw_cell),
            fd_cell.per_second(),
            queue_cell.per_second(),
            mb(&queue_cell),
            queue_cell.per_second() / raw_cell.per_second()
        );
    }
    let _ = stop_tx.send(());
    consumer.await??;
    let _ = std::fs::remove_dir_all(&scan_dir);
    Ok(())
}

pub fn median(mut cells: Vec<Cell>) -> Cell {
    cells.sort_by(|a, b| a.per_second().total_cmp(&b.per_second()));
    cells.swap_remove(cells.len() / 2)
}
