//! `virus-scanner-bench chaos`: the whole stack under mixed load while faults are injected on
//! a schedule; checks that no infected body is delivered, that every request ends in its true
//! verdict or a fail-closed answer before its deadline, that no task is lost or answered
//! twice and that the spool ends empty, and prints what each fault cost.
//!
//! `--short` runs one cycle of the schedule (under two minutes, `make test` runs it);
//! without it, cycles repeat for `--minutes` (10 by default).

mod bodies;
mod client;
mod ledger;
mod origin;
mod proxy;
mod report;
mod stack;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bodies::{BodySpec, Kind, Rng};
use ledger::Ledger;
use proxy::{FaultProxy, Link};
pub use stack::NAMESPACE_ENV;
use stack::{SCAN_TIMEOUT_SECONDS, Stack, VISIBILITY_TIMEOUT_SECONDS};

use crate::Args;

/// Seconds of one cycle of the fault schedule: each fault once, a few seconds apart. The
/// short run's cycle ends 60 s after the producer's restart and a little more, when its
/// janitor has removed what the killed producer left in the spool.
const CYCLE: f64 = 66.0;
/// How long the producer may take to give back what the load made it allocate.
const RSS_SETTLE: Duration = Duration::from_secs(20);

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Fault {
    ProducerKill,
    RedisRestart,
    RedisWipe,
    ClamdRestart,
    ConsumerStop,
    NetStall,
    NetReset,
    SpoolFull,
    ConsumerKill,
}

impl Fault {
    pub fn label(self) -> &'static str {
        match self {
            Fault::ProducerKill => "producer kill -9, restart under Envoy",
            Fault::RedisRestart => "Redis kill -9, restart from AOF",
            Fault::RedisWipe => "Redis restart without persistence",
            Fault::ClamdRestart => "clamd stopped 2 s, restarted",
            Fault::ConsumerStop => "consumer SIGSTOP 7 s (past 4 s visibility), SIGCONT",
            Fault::NetStall => "producer-Redis link stalled 4 s",
            Fault::NetReset => "producer-Redis link reset, refused 3 s",
            Fault::SpoolFull => "spool full (ENOSPC) 4 s",
            Fault::ConsumerKill => "consumer kill -9, restart",
        }
    }

    pub fn key(self) -> &'static str {
        match self {
            Fault::ProducerKill => "producer-kill",
            Fault::RedisRestart => "redis-restart",
            Fault::RedisWipe => "redis-wipe",
            Fault::ClamdRestart => "clamd-restart",
            Fault::ConsumerStop => "consumer-stop",
            Fault::NetStall => "net-stall",
            Fault::NetReset => "net-reset",
            Fault::SpoolFull => "spool-full",
            Fault::ConsumerKill => "consumer-kill",
        }
    }
}

/// One injected fault: seconds since the load started.
#[derive(Debug, Clone)]
pub struct FaultEvent {
    pub fault: Fault,
    pub start: f64,
    pub end: f64,
    /// Not injected (why), e.g. no mount namespace for the spool.
    pub skipped: Option<String>,
    pub note: String,
    /// Spilled bodies in the spool when the producer was killed.
    pub orphans: u64,
    /// Queued tasks lost with Redis's data.
    pub wiped: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Route {
    BufferedUpload,
    DuplexUpload,
    BufferedDownload,
    DuplexDownload,
    IcapReqmod,
    IcapRespmod,
    /// An upload through Envoy that the client abandons half-way.
    Abort,
}

impl Route {
    const ALL: [Route; 7] = [
        Route::BufferedUpload,
        Route::DuplexUpload,
        Route::BufferedDownload,
        Route::DuplexDownload,
        Route::IcapReqmod,
        Route::IcapRespmod,
        Route::Abort,
    ];

    /// The name `--route` takes.
    pub fn key(self) -> &'static str {
        match self {
            Route::BufferedUpload => "buffered-upload",
            Route::DuplexUpload => "duplex-upload",
            Route::BufferedDownload => "buffered-download",
            Route::DuplexDownload => "duplex-download",
            Route::IcapReqmod => "icap-reqmod",
            Route::IcapRespmod => "icap-respmod",
            Route::Abort => "abort",
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Route::BufferedUpload => "Envoy BUFFERED upload",
            Route::DuplexUpload => "Envoy FULL_DUPLEX_STREAMED upload",
            Route::BufferedDownload => "Envoy BUFFERED download",
            Route::DuplexDownload => "Envoy FULL_DUPLEX_STREAMED download",
            Route::IcapReqmod => "ICAP REQMOD",
            Route::IcapRespmod => "ICAP RESPMOD",
            Route::Abort => "client abort half-way (Envoy)",
        }
    }

    fn upload(self) -> bool {
        matches!(
            self,
            Route::BufferedUpload | Route::DuplexUpload | Route::Abort
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Let through (200 from the origin, ICAP 204 or an unmodified 200).
    Passed,
    /// Refused as infected (406 from Envoy, the ICAP block page).
    Blocked,
    /// Another answer: the scan failed and the request was refused.
    FailClosed(u16),
    /// The connection ended without an answer, or could not be made.
    Reset,
    /// Refused as unscannable (413 from Envoy, 413 in the ICAP answer): a verdict on the
    /// body itself, not a failure of the path.
    Unscannable,
    /// No answer before the request's deadline.
    Hung,
    /// The client walked away.
    Aborted,
    /// A clean body let through, but not whole or not the same bytes.
    Corrupt,
}

#[derive(Debug, Clone)]
pub struct Record {
    pub id: u64,
    pub route: Route,
    pub spec: BodySpec,
    pub unique: bool,
    pub high: bool,
    pub probe: bool,
    pub start: f64,
    pub end: f64,
    pub outcome: Outcome,
    /// The client got bytes of an infected body.
    pub leaked: bool,
}

impl Record {
    pub fn correct(&self) -> bool {
        match self.outcome {
            Outcome::Passed => !self.spec.kind.infected(),
            Outcome::Blocked => self.spec.kind.infected(),
            _ => false,
        }
    }

    pub fn fail_closed(&self) -> bool {
        matches!(self.outcome, Outcome::FailClosed(_) | Outcome::Reset)
    }
}

struct Load {
    buffered_port: u16,
    duplex_port: u16,
    live: Arc<stack::Live>,
    t0: Instant,
    next_id: AtomicU64,
    sizes: Vec<(usize, u32)>,
    /// Every request on this route (`--route`), to stress one path.
    only: Option<Route>,
    records: Mutex<Vec<Record>>,
    stop: AtomicBool,
}

impl Load {
    fn now(&self) -> f64 {
        self.t0.elapsed().as_secs_f64()
    }

    fn id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }
}

pub async fn run(args: &Args) -> anyhow::Result<bool> {
    let short = args.short;
    let cycles = if short {
        1
    } else {
        ((args.minutes * 60.0) / CYCLE).ceil().max(1.0) as usize
    };
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
    });
    let mut sizes: Vec<(usize, u32)> = vec![
        (1 << 10, 30),
        (8 << 10, 20),
        (64 << 10, 15),
        (256 << 10, 10),
        (1 << 20, 8),
        (3 << 19, 6),
        (4 << 20, 4),
    ];
    if !short {
        sizes.extend([(16 << 20, 3), (50 << 20, 1)]);
    }
    let tmpfs_mib = if short { 160 } else { 768 };
    eprintln!(
        "chaos: {} campaign, {cycles} cycle(s) of {CYCLE:.0} s, seed {seed}",
        if short { "short" } else { "long" }
    );

    let began = Instant::now();
    let origin = origin::Origin::start().await?;
    let handle = tokio::runtime::Handle::current();
    let stack = tokio::task::block_in_place(|| {
        Stack::start(
            origin,
            |redis_port| handle.block_on(FaultProxy::start(redis_port)),
            tmpfs_mib,
        )
    })?;
    let only =
        match args.route.as_deref() {
            None => None,
            Some(key) => Some(Route::ALL.into_iter().find(|r| r.key() == key).ok_or_else(
                || {
                    let keys: Vec<&str> = Route::ALL.iter().map(|r| r.key()).collect();
                    anyhow::anyhow!("--route {key}: one of {}", keys.join(", "))
                },
            )?),
        };
    let new_load = |stack: &Stack, sizes: Vec<(usize, u32)>, first_id: u64| Load {
        buffered_port: stack.buffered.port(),
        duplex_port: stack.duplex.port(),
        live: stack.live.clone(),
        t0: Instant::now(),
        next_id: AtomicU64::new(first_id),
        sizes,
        only,
        records: Mutex::new(Vec::new()),
        stop: AtomicBool::new(false),
    };

    eprintln!(
        "chaos: stack up after {:.1} s",
        began.elapsed().as_secs_f64()
    );
    // The consumers are up and the path works before anything is measured.
    let warm_up = new_load(&stack, Vec::new(), 1);
    loop {
        let r = one(
            &warm_up,
            Route::BufferedUpload,
            Kind::Clean,
            1024,
            true,
            false,
        )
        .await;
        if r.outcome == Outcome::Passed {
            break;
        }
        anyhow::ensure!(
            warm_up.now() < 90.0,
            "the stack never passed a clean body: {:?}",
            r.outcome
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_idle_kib = rss_kib(stack.live.producer_pid.load(Ordering::Relaxed));
    eprintln!(
        "chaos: load starts after {:.1} s",
        began.elapsed().as_secs_f64()
    );
    let load = Arc::new(new_load(
        &stack,
        sizes,
        warm_up.next_id.load(Ordering::Relaxed),
    ));
    let ledger = Ledger::start(stack.redis.port(), load.t0);
    let stack = Arc::new(Mutex::new(stack));
    let duration = CYCLE * cycles as f64;

    let mut tasks = Vec::new();
    let workers = 4;
    for w in 0..workers {
        let load = load.clone();
        tasks.push(tokio::spawn(async move {
            let mut rng = Rng::new(seed ^ ((w as u64 + 1) * 0x5851_F42D));
            while !load.stop.load(Ordering::Relaxed) {
                let (route, kind, size, unique, high) = choose(&mut rng, &load.sizes);
                let route = load.only.unwrap_or(route);
                let r = one(&load, route, kind, size, unique, high).await;
                load.records.lock().map(|mut v| v.push(r)).ok();
            }
        }));
    }
    let probes = {
        let load = load.clone();
        tokio::spawn(async move {
            let mut inflight = Vec::new();
            while !load.stop.load(Ordering::Relaxed) {
                let load = load.clone();
                inflight.push(tokio::spawn(async move {
                    let mut r =
                        one(&load, Route::BufferedUpload, Kind::Clean, 1024, true, true).await;
                    r.probe = true;
                    load.records.lock().map(|mut v| v.push(r)).ok();
                }));
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            for t in inflight {
                let _ = t.await;
            }
        })
    };
    let rss_peak = Arc::new(AtomicU64::new(rss_idle_kib));
    let sampler = {
        let (load, peak) = (load.clone(), rss_peak.clone());
        tokio::spawn(async move {
            while !load.stop.load(Ordering::Relaxed) {
                let kib = rss_kib(load.live.producer_pid.load(Ordering::Relaxed));
                peak.fetch_max(kib, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        })
    };
    let events = Arc::new(Mutex::new(Vec::<FaultEvent>::new()));
    let wiped = Arc::new(AtomicU64::new(0));
    let added_before_wipes = Arc::new(AtomicU64::new(0));
    let ledger = Arc::new(ledger);
    let schedule = {
        let (stack, load, events, ledger) =
            (stack.clone(), load.clone(), events.clone(), ledger.clone());
        let (wiped, added) = (wiped.clone(), added_before_wipes.clone());
        tokio::spawn(async move {
            let mut rng = Rng::new(seed ^ 0xC4A0_5000);
            for cycle in 0..cycles {
                let base = cycle as f64 * CYCLE;
                // Without persistence once: in the first cycle of a short run, the middle
                // cycle of a long one.
                let wipe_cycle = cycles / 2;
                let plan = [
                    (2.0, Fault::ProducerKill),
                    (10.0, Fault::RedisRestart),
                    (17.0, Fault::ClamdRestart),
                    (24.0, Fault::ConsumerStop),
                    (33.0, Fault::NetStall),
                    (40.0, Fault::NetReset),
                    (46.0, Fault::SpoolFull),
                    (
                        53.0,
                        if cycle == wipe_cycle {
                            Fault::RedisWipe
                        } else {
                            Fault::RedisRestart
                        },
                    ),
                ];
                for (at, fault) in plan {
                    sleep_until(&load, base + at).await;
                    let e = inject(fault, &stack, &ledger, &load, &mut rng, &wiped, &added).await;
                    events.lock().map(|mut v| v.push(e)).ok();
                }
            }
        })
    };
    let kills = {
        let (stack, load, events, ledger) =
            (stack.clone(), load.clone(), events.clone(), ledger.clone());
        let (wiped, added) = (wiped.clone(), added_before_wipes.clone());
        // At least 50 over a 10-minute run.
        let every = if short { 7.0 } else { 9.0 };
        tokio::spawn(async move {
            let mut rng = Rng::new(seed ^ 0x0C0F_FEE0);
            let mut at = every;
            while at < duration - 5.0 {
                sleep_until(&load, at).await;
                let e = inject(
                    Fault::ConsumerKill,
                    &stack,
                    &ledger,
                    &load,
                    &mut rng,
                    &wiped,
                    &added,
                )
                .await;
                events.lock().map(|mut v| v.push(e)).ok();
                at += every;
            }
        })
    };

    sleep_until(&load, duration).await;
    let _ = schedule.await;
    let _ = kills.await;
    load.stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = t.await;
    }
    let _ = probes.await;
    let _ = sampler.await;
    let load_end = load.now();
    eprintln!(
        "chaos: load over after {:.1} s",
        began.elapsed().as_secs_f64()
    );

    // Drain: every entry still in a stream must get its verdict (or its error, once its
    // deadline passed) within a redelivery and a deadline.
    let drain_limit =
        Duration::from_secs(SCAN_TIMEOUT_SECONDS + 3 * VISIBILITY_TIMEOUT_SECONDS + 10);
    let drain_start = Instant::now();
    let mut open = ledger.open_entries().await.unwrap_or(u64::MAX);
    while open > 0 && drain_start.elapsed() < drain_limit {
        tokio::time::sleep(Duration::from_millis(250)).await;
        open = ledger.open_entries().await.unwrap_or(u64::MAX);
    }
    eprintln!(
        "chaos: queue drained after {:.1} s",
        began.elapsed().as_secs_f64()
    );
    let enqueued =
        added_before_wipes.load(Ordering::Relaxed) + ledger.entries_added().await.unwrap_or(0);
    // The allocator returns freed pages after a few seconds: the RSS once it is within a
    // quarter of the idle figure, or after RSS_SETTLE.
    let settle = Instant::now();
    let rss_after_kib = loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let rss = rss_kib(load.live.producer_pid.load(Ordering::Relaxed));
        if rss * 4 <= rss_idle_kib * 5 || settle.elapsed() >= RSS_SETTLE {
            break rss;
        }
    };
    let rss_settle_seconds = settle.elapsed().as_secs_f64();
    let (duplicates, verdicts) = ledger.verdicts();

    let mut stack = match Arc::try_unwrap(stack) {
        Ok(m) => m
            .into_inner()
            .map_err(|_| anyhow::anyhow!("stack lock poisoned"))?,
        Err(_) => anyhow::bail!("the stack is still in use"),
    };
    stack.empty_spool_filler();
    let spool_left = stack.spool_files();
    let records = load.records.lock().map(|r| r.clone()).unwrap_or_default();
    let events = events.lock().map(|e| e.clone()).unwrap_or_default();
    let summary = report::Summary {
        short,
        seed,
        duration: load_end,
        records,
        events,
        origin_leaks: origin_leaks(&stack, &load),
        anonymous_leaks: stack.origin.anonymous_leaks(),
        open_entries: open,
        enqueued,
        wiped: wiped.load(Ordering::Relaxed),
        duplicates,
        verdicts,
        spool_left,
        tmpfs: stack.tmpfs_mib.is_some(),
        rss_idle_kib,
        rss_peak_kib: rss_peak.load(Ordering::Relaxed),
        rss_after_kib,
        rss_settle_seconds,
        arrivals: stack.origin.arrivals(),
        envoy_stats: [
            ("buffered", &stack.buffered),
            ("full duplex", &stack.duplex),
        ]
        .iter()
        .map(|(name, envoy)| {
            let stats =
                virus_scanner_test_support::http_get(envoy.admin_port(), "/stats?filter=ext_proc")
                    .map(|(_, body)| body)
                    .unwrap_or_default();
            // Counter lines only (the admin answer may come in chunks).
            let stats: Vec<&str> = stats.lines().filter(|l| l.contains(": ")).collect();
            format!("{name}:\n{}", stats.join("\n"))
        })
        .collect::<Vec<_>>()
        .join("\n"),
    };
    // Envoy's line for each request (its answer and ext_proc's calls), before the Envoys go.
    let access_logs = format!(
        "{}{}",
        stack.buffered.access_log(),
        stack.duplex.access_log()
    );
    let mut producer_logs = std::mem::take(&mut stack.producer_logs);
    if let Some(p) = stack.producer.take() {
        producer_logs.push_str(&p.log());
        tokio::task::block_in_place(|| drop(p));
    }
    tokio::task::block_in_place(|| stack.shutdown());
    if let Some(path) = &args.records {
        write_csv(path, &summary)?;
        std::fs::write(path.with_extension("producer.log"), &producer_logs)?;
    }
    let held = report::print(&summary);
    // Something infected got through: what the producer logged is the next clue.
    if report::Invariants::of(&summary).infected_delivered > 0 {
        // Each decision on a delivered body's bytes, and every warning and error.
        let delivered: Vec<String> = report::Invariants::of(&summary)
            .delivered
            .iter()
            .filter_map(|id| summary.records.iter().find(|r| r.id == *id))
            .map(|r| hex::encode(<sha2::Sha256 as sha2::Digest>::digest(r.spec.bytes())))
            .collect();
        let notable: Vec<&str> = producer_logs
            .lines()
            .filter(|l| {
                delivered.iter().any(|sha| l.contains(sha.as_str()))
                    || (!l.contains(" INFO ") && !l.contains(" DEBUG "))
            })
            .collect();
        println!(
            "\nThe producer's decisions on the delivered bodies' bytes, its warnings, errors and detections ({} lines; the first 400):\n```",
            notable.len()
        );
        for line in notable.iter().take(400) {
            println!("{line}");
        }
        println!("```");
        // Envoy's line of each delivered request, and what the producer logged under its
        // request id (the body messages it was sent, its decisions).
        println!(
            "\nEnvoy's access-log lines of the delivered requests, and the producer's lines of their request ids:\n```"
        );
        for id in &report::Invariants::of(&summary).delivered {
            let tag = format!("chaos-id={id}\"");
            for line in access_logs.lines().filter(|l| l.contains(&tag)) {
                println!("{line}");
                let request_id = line
                    .split(' ')
                    .find_map(|f| f.strip_prefix("request_id="))
                    .filter(|r| r.len() > 1);
                if let Some(request_id) = request_id {
                    for p in producer_logs.lines().filter(|p| p.contains(request_id)) {
                        println!("  {p}");
                    }
                }
            }
        }
        println!("```");
    }
    Ok(held)
}

/// Ids of uploads that reached the origin with EICAR or the hash sample in them, and of any
/// infected upload of which the origin saw a byte.
fn origin_leaks(stack: &Stack, load: &Load) -> Vec<u64> {
    let mut leaks = stack.origin.infected_arrivals();
    let records = load.records.lock().map(|r| r.clone()).unwrap_or_default();
    for r in records
        .iter()
        .filter(|r| r.route.upload() && r.spec.kind.infected())
    {
        if stack.origin.arrival(r.id).is_some_and(|a| a.bytes > 0) && !leaks.contains(&r.id) {
            leaks.push(r.id);
        }
    }
    leaks
}

fn write_csv(path: &std::path::Path, s: &report::Summary) -> anyhow::Result<()> {
    let mut out = String::from("id,route,kind,size,unique,high,probe,start,end,outcome,leaked\n");
    for r in &s.records {
        out.push_str(&format!(
            "{},{:?},{:?},{},{},{},{},{:.3},{:.3},{:?},{}\n",
            r.id,
            r.route,
            r.spec.kind,
            r.spec.size,
            r.unique,
            r.high,
            r.probe,
            r.start,
            r.end,
            r.outcome,
            r.leaked
        ));
    }
    std::fs::write(path, out)?;
    let mut out = String::from("fault,start,end,skipped,note\n");
    for e in &s.events {
        out.push_str(&format!(
            "{},{:.3},{:.3},{},{}\n",
            e.fault.key(),
            e.start,
            e.end,
            e.skipped.as_deref().unwrap_or(""),
            e.note
        ));
    }
    std::fs::write(path.with_extension("faults"), out)?;
    Ok(())
}

async fn sleep_until(load: &Load, at: f64) {
    let wait = at - load.now();
    if wait > 0.0 {
        tokio::time::sleep(Duration::from_secs_f64(wait)).await;
    }
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn choose(rng: &mut Rng, sizes: &[(usize, u32)]) -> (Route, Kind, usize, bool, bool) {
    let route = Route::ALL[rng.weighted(&[22, 20, 10, 10, 12, 12, 6])];
    let weights: Vec<u32> = sizes.iter().map(|(_, w)| *w).collect();
    let mut size = sizes[rng.weighted(&weights)].0;
    let high = rng.below(10) < 3;
    let (kind, unique) = match rng.below(100) {
        0..25 => (Kind::Eicar, true),
        25..30 => (Kind::HashSample, false),
        // The same bytes again: the verdict cache answers them.
        30..35 => {
            size = 16 << 10;
            (Kind::Clean, false)
        }
        _ => (Kind::Clean, true),
    };
    (route, kind, size, unique, high)
}

/// Seconds a request may take before it counts as hung: the producer's scan deadline, the
/// transfer, and a margin for a loaded 2-core machine.
fn deadline(size: usize) -> Duration {
    Duration::from_secs_f64(
        SCAN_TIMEOUT_SECONDS as f64 + 20.0 + size as f64 / (1 << 20) as f64 * 0.5,
    )
}

/// One request of the load, timed and judged.
async fn one(
    load: &Load,
    route: Route,
    kind: Kind,
    size: usize,
    unique: bool,
    high: bool,
) -> Record {
    let id = load.id();
    let spec = BodySpec::new(kind, size, if unique { id } else { 1 });
    let start = load.now();
    let body = spec.bytes();
    let answer = tokio::time::timeout(
        deadline(spec.size),
        exchange(load, route, id, &spec, &body, high),
    )
    .await;
    let (outcome, leaked) = answer.unwrap_or((Outcome::Hung, false));
    Record {
        id,
        route,
        spec,
        unique,
        high,
        probe: false,
        start,
        end: load.now(),
        outcome,
        leaked,
    }
}

async fn exchange(
    load: &Load,
    route: Route,
    id: u64,
    spec: &BodySpec,
    body: &[u8],
    high: bool,
) -> (Outcome, bool) {
    let priority = if high { "X-Priority: high\r\n" } else { "" };
    let infected = spec.kind.infected();
    let leaks = |bytes: &[u8]| infected && (bodies::contains_eicar(bytes) || bytes == body);
    match route {
        Route::BufferedUpload | Route::DuplexUpload | Route::Abort => {
            let port = if route == Route::DuplexUpload
                || (route == Route::Abort && id.is_multiple_of(2))
            {
                load.duplex_port
            } else {
                load.buffered_port
            };
            let head = format!(
                "POST /upload/{id}?chaos-id={id} HTTP/1.1\r\nHost: origin.test\r\nContent-Type: application/octet-stream\r\n\
                 Content-Length: {}\r\nX-Chaos-Id: {id}\r\n{priority}Connection: close\r\n\r\n",
                body.len()
            );
            if route == Route::Abort {
                return match client::http_abort(port, &head, body, body.len() / 2).await {
                    Ok(()) => (Outcome::Aborted, false),
                    Err(_) => (Outcome::Reset, false),
                };
            }
            match client::http(port, &head, body).await {
                Ok(Some(r)) => (judge_http(&r, None), leaks(&r.body)),
                _ => (Outcome::Reset, false),
            }
        }
        Route::BufferedDownload | Route::DuplexDownload => {
            let port = if route == Route::DuplexDownload {
                load.duplex_port
            } else {
                load.buffered_port
            };
            let head = format!(
                "GET /files/{}?chaos-id={id} HTTP/1.1\r\nHost: origin.test\r\nX-Chaos-Id: {id}\r\n{priority}Connection: close\r\n\r\n",
                spec.name()
            );
            match client::http(port, &head, &[]).await {
                Ok(Some(r)) => (judge_http(&r, Some(body)), leaks(&r.body)),
                _ => (Outcome::Reset, false),
            }
        }
        Route::IcapReqmod | Route::IcapRespmod => {
            let port = load.live.icap_port.load(Ordering::Relaxed);
            match client::icap(port, route == Route::IcapReqmod, body, high).await {
                Ok(r) => {
                    let outcome = match (r.status, r.http_status) {
                        (204, _) => Outcome::Passed,
                        (200, _) if r.infection_found => Outcome::Blocked,
                        (200, Some(403)) => Outcome::Blocked,
                        (200, Some(413)) => Outcome::Unscannable,
                        (200, Some(s)) if (200..300).contains(&s) => Outcome::Passed,
                        (200, Some(s)) => Outcome::FailClosed(s),
                        (200, None) => Outcome::Passed,
                        (s, _) => Outcome::FailClosed(s),
                    };
                    // An answer that passes the body on hands the proxy the original.
                    let leaked = leaks(&r.body) || (infected && outcome == Outcome::Passed);
                    (outcome, leaked)
                }
                Err(_) => (Outcome::Reset, false),
            }
        }
    }
}

/// An answer through Envoy; `expected` is the body of a download.
fn judge_http(r: &client::HttpReply, expected: Option<&[u8]>) -> Outcome {
    match r.status {
        200 if !r.complete => Outcome::Reset,
        200 => match expected {
            Some(body) if r.body != body => Outcome::Corrupt,
            _ => Outcome::Passed,
        },
        406 => Outcome::Blocked,
        413 => Outcome::Unscannable,
        s => Outcome::FailClosed(s),
    }
}

/// Injects one fault and waits until it is over; the event records when it started and when
/// the faulty part was back.
#[allow(clippy::too_many_arguments)]
async fn inject(
    fault: Fault,
    stack: &Arc<Mutex<Stack>>,
    ledger: &Ledger,
    load: &Load,
    rng: &mut Rng,
    wiped: &AtomicU64,
    added_before_wipes: &AtomicU64,
) -> FaultEvent {
    let mut event = FaultEvent {
        fault,
        start: load.now(),
        end: load.now(),
        skipped: None,
        note: String::new(),
        orphans: 0,
        wiped: 0,
    };
    let blocking = |f: Box<dyn FnOnce(&mut Stack) -> String + Send>| {
        let stack = stack.clone();
        async move {
            tokio::task::spawn_blocking(move || match stack.lock() {
                Ok(mut s) => f(&mut s),
                Err(_) => "stack lock poisoned".to_owned(),
            })
            .await
            .unwrap_or_else(|e| format!("fault failed: {e}"))
        }
    };
    match fault {
        Fault::ConsumerKill => {
            let pick = rng.below(stack::CONSUMERS as u64) as usize;
            event.note = blocking(Box::new(move |s: &mut Stack| {
                let i = if s.paused == Some(pick) {
                    (pick + 1) % stack::CONSUMERS
                } else {
                    pick
                };
                s.consumers[i].kill9();
                std::thread::sleep(Duration::from_millis(300));
                s.consumers[i] = s.spawn_consumer();
                format!("consumer {i}")
            }))
            .await;
        }
        Fault::ConsumerStop => {
            let i = rng.below(stack::CONSUMERS as u64) as usize;
            let pid = blocking(Box::new(move |s: &mut Stack| {
                s.paused = Some(i);
                let pid = s.consumers[i].pid();
                stack::signal(pid, "STOP");
                pid.to_string()
            }))
            .await;
            event.start = load.now();
            tokio::time::sleep(Duration::from_secs(VISIBILITY_TIMEOUT_SECONDS + 3)).await;
            blocking(Box::new(move |s: &mut Stack| {
                stack::signal(s.consumers[i].pid(), "CONT");
                s.paused = None;
                String::new()
            }))
            .await;
            event.note = format!("consumer {i} (pid {pid})");
        }
        Fault::RedisRestart | Fault::RedisWipe => {
            let server = ledger.server().await;
            let Ok((pid, dir)) = server else {
                event.skipped = Some("Redis did not answer INFO".into());
                return event;
            };
            let wipe = fault == Fault::RedisWipe;
            if wipe {
                added_before_wipes
                    .fetch_add(ledger.entries_added().await.unwrap_or(0), Ordering::Relaxed);
                let open = ledger.open_entries().await.unwrap_or(0);
                wiped.fetch_add(open, Ordering::Relaxed);
                event.wiped = open;
            }
            event.start = load.now();
            let note = blocking(Box::new(move |s: &mut Stack| {
                stack::signal(pid, "KILL");
                if wipe {
                    let _ = std::fs::remove_dir_all(dir.join("appendonlydir"));
                    let _ = std::fs::remove_file(dir.join("appendonly.aof"));
                    let _ = std::fs::remove_file(dir.join("dump.rdb"));
                }
                s.redis.restart();
                String::new()
            }))
            .await;
            event.note.push_str(&note);
        }
        Fault::ClamdRestart => {
            event.note = blocking(Box::new(|s: &mut Stack| {
                s.clamd.stop();
                std::thread::sleep(Duration::from_secs(2));
                s.clamd.restart();
                String::new()
            }))
            .await;
        }
        Fault::ProducerKill => {
            event.note = blocking(Box::new(|s: &mut Stack| {
                if let Some(p) = s.producer.as_mut() {
                    p.kill9();
                }
                let orphans = s.spool_files().len();
                std::thread::sleep(Duration::from_millis(300));
                s.start_producer();
                orphans.to_string()
            }))
            .await;
            event.orphans = event.note.parse().unwrap_or(0);
            event.note.clear();
        }
        Fault::NetStall | Fault::NetReset => {
            let (link, hold) = if fault == Fault::NetStall {
                (Link::Stalled, 4)
            } else {
                (Link::Down, 3)
            };
            blocking(Box::new(move |s: &mut Stack| {
                s.proxy.set(link);
                String::new()
            }))
            .await;
            event.start = load.now();
            tokio::time::sleep(Duration::from_secs(hold)).await;
            blocking(Box::new(|s: &mut Stack| {
                s.proxy.set(Link::Up);
                String::new()
            }))
            .await;
        }
        Fault::SpoolFull => {
            let filled = blocking(Box::new(|s: &mut Stack| {
                if s.tmpfs_mib.is_none() {
                    "no tmpfs spool (needs root and a mount namespace)".into()
                } else if s.fill_spool() {
                    String::new()
                } else {
                    s.empty_spool_filler();
                    "the spool could not be filled".into()
                }
            }))
            .await;
            if !filled.is_empty() {
                event.skipped = Some(filled);
                return event;
            }
            event.start = load.now();
            tokio::time::sleep(Duration::from_secs(4)).await;
            blocking(Box::new(|s: &mut Stack| {
                s.empty_spool_filler();
                String::new()
            }))
            .await;
        }
    }
    event.end = load.now();
    event
}
