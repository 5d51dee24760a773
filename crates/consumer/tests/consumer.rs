//! The consumer binary against real redis-server and clamd.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use virus_scanner_protocol::task::{Content, Labels, Priority, ScanTask, Verdict, VerdictStatus};
use virus_scanner_queue::{Producer, QueueConfig, RedisConfig, now_ns};
use virus_scanner_test_support::{
    Clamd, ClamdOptions, EICAR, EICAR_BODY_SIGNATURE, HASH_SAMPLE_SIGNATURE, Redis, RedisOptions,
    ServiceProcess, clean_bytes, hash_signature_sample, http_get, metric, port_of, wait_for,
};

struct Stack {
    redis: Redis,
    clamd: Clamd,
    scan_dir: tempfile::TempDir,
}

impl Stack {
    fn start() -> Stack {
        Stack::start_with(RedisOptions::default(), ClamdOptions::default())
    }

    fn start_with(redis: RedisOptions, clamd: ClamdOptions) -> Stack {
        Stack {
            redis: Redis::start_with(redis),
            clamd: Clamd::start_with(clamd),
            scan_dir: tempfile::Builder::new()
                .prefix("vs-scan-")
                .tempdir()
                .unwrap(),
        }
    }

    fn queue_config(&self) -> QueueConfig {
        QueueConfig::new(RedisConfig::from_host_port(
            "127.0.0.1",
            self.redis.port(),
            false,
        ))
    }

    async fn producer(&self) -> Producer {
        Producer::connect(self.queue_config()).await.unwrap()
    }

    /// Starts the consumer binary (`virus-scanner-handler`); returns it with its metrics port.
    fn start_consumer(&self, extra: &[&str]) -> (ServiceProcess, u16) {
        let mut args: Vec<String> = [
            "--redis-host",
            "127.0.0.1",
            "--redis-port",
            &self.redis.port().to_string(),
            "--clamd-address",
            &self.clamd.address(),
            "--scan-tmp-dir",
            &self.scan_dir.path().display().to_string(),
            "--metrics-addr",
            "127.0.0.1:0",
            "--visibility-timeout-seconds",
            "2",
            "--log-format",
            "text",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut p = ServiceProcess::spawn(
            Path::new(env!("CARGO_BIN_EXE_virus-scanner-handler")),
            &args,
            &[],
        );
        let metrics = port_of(
            &p.wait_for_fields("consumer started", &["metrics"], Duration::from_secs(20))[0],
        );
        assert!(
            wait_for(Duration::from_secs(20), || {
                http_get(metrics, "/ready").is_some_and(|(s, _)| s == 200)
            }),
            "consumer not ready\n{}",
            p.log_tail()
        );
        (p, metrics)
    }

    /// A file spilled by a producer of the default tenant, in its directory.
    fn spill(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let dir = self
            .scan_dir
            .path()
            .join(virus_scanner_queue::DEFAULT_TENANT);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        std::fs::write(&path, bytes).unwrap();
        path
    }

    /// A file spilled by a producer of the seed, at the top of the scan directory.
    fn spill_seed(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let path = self.scan_dir.path().join(name);
        std::fs::write(&path, bytes).unwrap();
        path
    }
}

fn body_task(id: &str, body: Vec<u8>) -> ScanTask {
    ScanTask {
        id: id.into(),
        content: Some(Content::Body(body.into())),
        enqueued_at_ns: now_ns(),
        ..ScanTask::default()
    }
}

fn path_task(id: &str, path: &Path) -> ScanTask {
    ScanTask {
        id: id.into(),
        content: Some(Content::Path(path.display().to_string())),
        enqueued_at_ns: now_ns(),
        ..ScanTask::default()
    }
}

fn deadline(secs: u64) -> Instant {
    Instant::now() + Duration::from_secs(secs)
}

async fn scan(p: &Producer, task: ScanTask) -> Verdict {
    p.scan(&task, deadline(30)).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eicar_inline_is_infected_and_clean_bytes_are_clean() {
    let stack = Stack::start();
    let (handler, metrics) = stack.start_consumer(&[]);
    let p = stack.producer().await;

    let mut body = b"--boundary\r\n".to_vec();
    body.extend_from_slice(EICAR);
    let v = scan(&p, body_task("eicar", body)).await;
    assert_eq!(v.status(), VerdictStatus::Infected);
    assert_eq!(v.signature, EICAR_BODY_SIGNATURE);
    assert!(v.engine_version.starts_with("ClamAV "));
    assert_eq!(v.db_version, "1000");

    let v = scan(&p, body_task("clean", clean_bytes(100_000, 1))).await;
    assert_eq!(v.status(), VerdictStatus::Clean);
    assert_eq!(v.bytes_scanned, 100_000);

    let path = stack.spill("sample.bin", &hash_signature_sample());
    let v = scan(&p, path_task("hash", &path)).await;
    assert_eq!(v.status(), VerdictStatus::Infected);
    assert_eq!(v.signature, HASH_SAMPLE_SIGNATURE);

    assert_eq!(
        metric(
            metrics,
            "virus_scanner_consumer_scans_total{verdict=\"infected\"}"
        ),
        2.0
    );
    assert_eq!(
        metric(
            metrics,
            "virus_scanner_consumer_scans_total{verdict=\"clean\"}"
        ),
        1.0
    );
    // The producer that blocks a detection logs it; the consumer adds no second line.
    assert_eq!(
        handler.log().matches("infected content detected").count(),
        0,
        "{}",
        handler.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_tasks_for_50_mib_files_get_the_right_verdict() {
    let stack = Stack::start();
    let (_h, _) = stack.start_consumer(&[]);
    let p = stack.producer().await;
    let mut big = clean_bytes(50 << 20, 7);
    let clean = stack.spill("clean-50m", &big);
    let v = scan(&p, path_task("big-clean", &clean)).await;
    assert_eq!(v.status(), VerdictStatus::Clean, "{}", v.detail);
    assert_eq!(v.bytes_scanned, 50 << 20);
    let at = big.len() - 1000;
    big[at..at + EICAR.len()].copy_from_slice(EICAR);
    let infected = stack.spill("infected-50m", &big);
    let v = scan(&p, path_task("big-infected", &infected)).await;
    assert_eq!(v.status(), VerdictStatus::Infected, "{}", v.detail);
    // The consumer never removes or changes spilled files: their producer does.
    assert!(clean.exists() && infected.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_outside_scan_dir_is_an_error_and_the_file_is_untouched() {
    let stack = Stack::start();
    let (_h, _) = stack.start_consumer(&[]);
    let p = stack.producer().await;
    let outside = tempfile::tempdir().unwrap();
    let secret = outside.path().join("secret");
    std::fs::write(&secret, EICAR).unwrap();
    let before = std::fs::metadata(&secret).unwrap().modified().unwrap();

    let v = scan(&p, path_task("outside", &secret)).await;
    assert_eq!(v.status(), VerdictStatus::Error);
    assert!(
        v.detail.contains("outside the scan directory"),
        "{}",
        v.detail
    );

    let dotdot = format!(
        "{}/../{}",
        stack.scan_dir.path().display(),
        secret.display()
    );
    let v = scan(&p, path_task("dotdot", Path::new(&dotdot))).await;
    assert_eq!(v.status(), VerdictStatus::Error);

    let link = stack.scan_dir.path().join("link");
    std::os::unix::fs::symlink(&secret, &link).unwrap();
    let v = scan(&p, path_task("symlink", &link)).await;
    assert_eq!(v.status(), VerdictStatus::Error, "{v:?}");

    assert_eq!(std::fs::read(&secret).unwrap(), EICAR);
    assert_eq!(
        std::fs::metadata(&secret).unwrap().modified().unwrap(),
        before
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn high_priority_tasks_overtake_a_backlog() {
    let stack = Stack::start();
    let p = stack.producer().await;
    for i in 0..200 {
        p.enqueue(&body_task(&format!("n{i}"), clean_bytes(256 * 1024, i)))
            .await
            .unwrap();
    }
    let (_h, _) = stack.start_consumer(&["--concurrency", "1"]);
    // The backlog is being worked on; now urgent tasks arrive.
    p.wait_verdict("n0", deadline(10)).await.unwrap();
    for i in 0..5 {
        let mut t = body_task(&format!("h{i}"), clean_bytes(1024, 1000 + i));
        t.priority = Priority::High as i32;
        p.enqueue(&t).await.unwrap();
    }
    for i in 0..5 {
        let v = p
            .wait_verdict(&format!("h{i}"), deadline(10))
            .await
            .unwrap();
        assert_eq!(v.status(), VerdictStatus::Clean);
    }
    let (_, normal_left) = p.depth().await.unwrap();
    assert!(
        normal_left >= 150,
        "high-priority tasks waited for the backlog: only {normal_left} normal tasks left"
    );
}

/// Entries of the normal stream that a consumer holds without having answered.
async fn pending_count(conn: &mut redis::aio::MultiplexedConnection) -> u64 {
    let summary: redis::streams::StreamPendingReply = redis::cmd("XPENDING")
        .arg("{virus-scanner}:tasks:default:normal")
        .arg("scanners")
        .query_async(conn)
        .await
        .unwrap();
    summary.count() as u64
}

/// The consumers the group knows, on both streams.
async fn group_consumers(conn: &mut redis::aio::MultiplexedConnection) -> Vec<String> {
    let mut names = Vec::new();
    for stream in [
        "{virus-scanner}:tasks:default:high",
        "{virus-scanner}:tasks:default:normal",
    ] {
        let info: redis::streams::StreamInfoConsumersReply = redis::cmd("XINFO")
            .arg("CONSUMERS")
            .arg(stream)
            .arg("scanners")
            .query_async(conn)
            .await
            .unwrap();
        names.extend(info.consumers.into_iter().map(|c| c.name));
    }
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_crash_loses_no_task() {
    let stack = Stack::start();
    let p = stack.producer().await;
    const N: usize = 300;
    for i in 0..N {
        let mut body = clean_bytes(128 * 1024, i as u64);
        if i % 10 == 0 {
            body.extend_from_slice(EICAR);
        }
        p.enqueue(&body_task(&format!("t{i}"), body)).await.unwrap();
    }
    let (mut first, _) = stack.start_consumer(&["--concurrency", "4", "--consumer-name", "first"]);
    let mut conn = redis::Client::open(stack.redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    // Kill it while it holds tasks: frozen first, so that what it holds cannot change between
    // the look and the kill.
    let start = Instant::now();
    loop {
        let answered: Vec<String> = redis::cmd("KEYS")
            .arg("{virus-scanner}:verdict:*")
            .query_async(&mut conn)
            .await
            .unwrap();
        if answered.len() >= 20 {
            first.pause();
            if pending_count(&mut conn).await > 0 {
                first.kill9();
                break;
            }
            first.resume();
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "first consumer made no progress"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let held = pending_count(&mut conn).await;
    assert!(
        held > 0,
        "the killed consumer held no task; the test proved nothing"
    );

    assert!(
        group_consumers(&mut conn)
            .await
            .iter()
            .any(|c| c.starts_with("first-")),
        "the killed consumer is not in the group"
    );
    let (_second, _) = stack.start_consumer(&[
        "--concurrency",
        "4",
        "--consumer-name",
        "second",
        "--consumer-retention-seconds",
        "3",
    ]);
    for i in 0..N {
        let v = p
            .wait_verdict(&format!("t{i}"), deadline(60))
            .await
            .unwrap_or_else(|e| panic!("task t{i} lost: {e}"));
        let want = if i % 10 == 0 {
            VerdictStatus::Infected
        } else {
            VerdictStatus::Clean
        };
        assert_eq!(v.status(), want, "t{i}");
    }
    // Exactly one verdict each: nothing is left over for a second pop.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let leftover: Vec<String> = redis::cmd("KEYS")
        .arg("{virus-scanner}:verdict:*")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(leftover.is_empty(), "duplicate verdicts: {leftover:?}");
    assert_eq!(p.depth().await.unwrap(), (0, 0));
    // The killed consumer holds nothing any more; once unseen for the retention time it is
    // removed from the group, while the live one stays.
    let start = Instant::now();
    loop {
        let names = group_consumers(&mut conn).await;
        if !names.iter().any(|c| c.starts_with("first-")) {
            assert!(names.iter().any(|c| c.starts_with("second-")), "{names:?}");
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "departed consumer still in the group: {names:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_task_ends_with_an_error_verdict() {
    let stack = Stack::start();
    let p = stack.producer().await;
    p.enqueue(&body_task("poison", b"x".to_vec()))
        .await
        .unwrap();
    // Consumers that take the task and die before answering, as a crash loop would.
    let mut cfg = stack.queue_config();
    cfg.visibility_timeout = Duration::from_secs(2);
    for n in 0..3 {
        let mut c = virus_scanner_queue::Consumer::connect(cfg.clone(), format!("crash{n}"))
            .await
            .unwrap();
        let start = Instant::now();
        while c
            .claim(Duration::from_millis(200))
            .await
            .unwrap()
            .is_empty()
        {
            assert!(start.elapsed() < Duration::from_secs(10));
        }
    }
    let (_h, _) = stack.start_consumer(&["--max-deliveries", "3"]);
    let v = p.wait_verdict("poison", deadline(20)).await.unwrap();
    assert_eq!(v.status(), VerdictStatus::Error);
    assert!(v.detail.contains("delivered 4 times"), "{}", v.detail);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restart_mid_run_consumer_reconnects_and_carries_on() {
    let mut stack = Stack::start_with(
        RedisOptions {
            persistent: true,
            ..RedisOptions::default()
        },
        ClamdOptions::default(),
    );
    let (h, _) = stack.start_consumer(&["--concurrency", "2"]);
    let p = stack.producer().await;
    assert_eq!(
        scan(&p, body_task("before", EICAR.to_vec())).await.status(),
        VerdictStatus::Infected
    );
    stack.redis.restart();
    for i in 0..10 {
        let p = stack.producer().await;
        let v = scan(&p, body_task(&format!("after{i}"), clean_bytes(4096, i))).await;
        assert_eq!(v.status(), VerdictStatus::Clean, "{}", h.log_tail());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_bytes_reach_clamd_once_and_a_new_database_misses_the_cache() {
    let stack = Stack::start();
    let (_h, metrics) = stack.start_consumer(&[]);
    let p = stack.producer().await;
    let body = clean_bytes(200_000, 42);
    let first = scan(&p, body_task("a", body.clone())).await;
    assert!(!first.cached);
    let second = scan(&p, body_task("b", body.clone())).await;
    assert!(second.cached);
    assert_eq!(second.status(), VerdictStatus::Clean);
    assert_eq!(second.task_id, "b");
    assert_eq!(
        metric(metrics, "virus_scanner_consumer_scanned_bytes_total"),
        200_000.0
    );
    assert_eq!(
        metric(metrics, "virus_scanner_consumer_cache_hits_total"),
        1.0
    );
    // Producers see the cached verdict too.
    use sha2::Digest;
    let sha = sha2::Sha256::digest(&body);
    assert!(p.cached_verdict(&sha).await.unwrap().is_some());

    // A task marked as having missed the cache in its producer's script is scanned without
    // a second lookup (here the cache does hold a verdict, so the lookup would have hit).
    let mut checked = body_task("d", body.clone());
    checked.cache_checked = true;
    p.enqueue(&checked).await.unwrap();
    let v = p.wait_verdict("d", deadline(30)).await.unwrap();
    assert_eq!((v.cached, v.status()), (false, VerdictStatus::Clean));
    assert_eq!(
        metric(metrics, "virus_scanner_consumer_scanned_bytes_total"),
        400_000.0
    );
    assert_eq!(
        metric(metrics, "virus_scanner_consumer_cache_hits_total"),
        1.0
    );

    stack.clamd.reload_with_db_version(1001);
    // The consumer picks the new version up within its poll interval.
    let start = Instant::now();
    loop {
        let v = scan(
            &p,
            body_task(&format!("c{}", start.elapsed().as_millis()), body.clone()),
        )
        .await;
        if v.db_version == "1001" {
            assert!(
                !v.cached,
                "a new database version must not reuse old verdicts"
            );
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "new database version not seen"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(
        metric(metrics, "virus_scanner_consumer_scanned_bytes_total"),
        600_000.0
    );
}

/// Stores `bytes` in Redis as a producer without a shared spool does, and waits for the
/// verdict of a task that says its producer hashed them to `sha256`.
async fn scan_stored(p: &Producer, id: &str, bytes: &[u8], sha256: Vec<u8>) -> Verdict {
    let spool = tempfile::tempdir().unwrap();
    let path = spool.path().join(id);
    std::fs::write(&path, bytes).unwrap();
    let deadline = deadline(30);
    let stored = p
        .store_body(id, &path, bytes.len() as u64, deadline)
        .await
        .unwrap();
    let task = ScanTask {
        id: id.into(),
        content: Some(stored.content()),
        size: bytes.len() as u64,
        sha256,
        labels: Some(Labels {
            tenant: "tenant-a".into(),
            ..Labels::default()
        }),
        enqueued_at_ns: now_ns(),
        ..ScanTask::default()
    };
    p.scan(&task, deadline).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_in_redis_are_scanned_whole_cached_under_their_own_hash_and_removed() {
    use sha2::Digest;
    let stack = Stack::start();
    let (h, metrics) = stack.start_consumer(&[]);
    let p = stack.producer().await;
    let sha = |b: &[u8]| sha2::Sha256::digest(b).to_vec();

    // EICAR at the very end of three chunks.
    let mut infected = clean_bytes(5 << 20, 31);
    infected.extend_from_slice(EICAR);
    let v = scan_stored(&p, "stored-bad", &infected, sha(&infected)).await;
    assert_eq!(v.status(), VerdictStatus::Infected, "{}", h.log_tail());
    assert_eq!(v.signature, EICAR_BODY_SIGNATURE);

    let clean = clean_bytes(5 << 20, 32);
    let v = scan_stored(&p, "stored-ok", &clean, sha(&clean)).await;
    assert_eq!(v.status(), VerdictStatus::Clean, "{}", h.log_tail());
    assert_eq!(v.bytes_scanned, clean.len() as u64);
    let cached = p.cached_verdict(&sha(&clean)).await.unwrap().unwrap();
    assert_eq!(cached.status(), VerdictStatus::Clean);

    // Bytes that are not the ones the task's producer hashed never pass, and nothing is
    // cached for either hash.
    let other = clean_bytes(3 << 20, 33);
    let claimed = sha(&clean_bytes(3 << 20, 34));
    let v = scan_stored(&p, "stored-swapped", &other, claimed.clone()).await;
    assert_eq!(v.status(), VerdictStatus::Error);
    assert!(
        v.detail.contains("not the one its producer hashed"),
        "{}",
        v.detail
    );
    assert!(p.cached_verdict(&claimed).await.unwrap().is_none());
    assert!(p.cached_verdict(&sha(&other)).await.unwrap().is_none());

    assert_eq!(
        metric(metrics, "virus_scanner_consumer_scanned_bytes_total"),
        (infected.len() + clean.len()) as f64
    );
    let mut conn = redis::Client::open(stack.redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let left: Vec<String> = redis::cmd("KEYS")
        .arg("{virus-scanner}:body:*")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(left.is_empty(), "the verdicts left {left:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_format_task_on_the_legacy_list_is_scanned_and_answered() {
    let stack = Stack::start();
    let (handler, _) = stack.start_consumer(&[]);
    let mut conn = redis::Client::open(stack.redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let mut task = format!("seed-1|BODY|{}|", now_ns()).into_bytes();
    task.extend_from_slice(b"prefix|with|pipes ");
    task.extend_from_slice(EICAR);
    let path = stack.spill_seed("seed-file", b"harmless");
    let path_task = format!("seed-2|PATH|{}|{}", now_ns(), path.display());
    let _: () = redis::cmd("LPUSH")
        .arg("scan_queue")
        .arg(task)
        .arg(path_task)
        .query_async(&mut conn)
        .await
        .unwrap();
    let (_, text): (String, String) = redis::cmd("BLPOP")
        .arg("scan_result:seed-1")
        .arg(20)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(text, format!("INFECTED|{EICAR_BODY_SIGNATURE}"));
    let (_, text): (String, String) = redis::cmd("BLPOP")
        .arg("scan_result:seed-2")
        .arg(20)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(text, "CLEAN");
    // A seed producer logs nothing: the consumer's is the one detection line.
    let log = handler.log();
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("infected content detected"))
        .collect();
    assert_eq!(lines.len(), 1, "{log}");
    assert!(lines[0].contains("seed-1"), "{}", lines[0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_task_is_answered_without_a_scan() {
    let stack = Stack::start();
    let (_h, metrics) = stack.start_consumer(&[]);
    let p = stack.producer().await;
    let mut t = body_task("late", EICAR.to_vec());
    t.deadline_ns = now_ns() - 1;
    let v = scan(&p, t).await;
    assert_eq!(v.status(), VerdictStatus::Error);
    assert!(v.detail.contains("deadline"), "{}", v.detail);
    assert_eq!(
        metric(metrics, "virus_scanner_consumer_scanned_bytes_total"),
        0.0
    );
    assert_eq!(
        metric(metrics, "virus_scanner_consumer_expired_tasks_total"),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_the_scan_in_flight_then_exits() {
    let stack = Stack::start();
    let (mut h, metrics) = stack.start_consumer(&["--concurrency", "1"]);
    let p = stack.producer().await;
    let path = stack.spill("big", &clean_bytes(80 << 20, 3));
    p.enqueue(&path_task("inflight", &path)).await.unwrap();
    assert!(wait_for(Duration::from_secs(10), || {
        metric(metrics, "virus_scanner_consumer_in_flight") >= 1.0
    }));
    h.terminate();
    let v = p.wait_verdict("inflight", deadline(30)).await.unwrap();
    assert_eq!(v.status(), VerdictStatus::Clean, "{}", v.detail);
    let status = h
        .wait_exit(Duration::from_secs(10))
        .expect("consumer did not exit");
    assert!(status.success(), "{status:?}");
    // Draining returned the in-flight entry: nothing is left pending for redelivery.
    assert_eq!(p.depth().await.unwrap(), (0, 0));
    // And the stopped consumer left the group.
    let mut conn = redis::Client::open(stack.redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    assert_eq!(group_consumers(&mut conn).await, Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clamd_down_stops_claims_and_readiness_until_it_is_back() {
    let mut stack = Stack::start();
    let (h, metrics) = stack.start_consumer(&[]);
    let p = stack.producer().await;
    stack.clamd.stop();
    assert!(wait_for(Duration::from_secs(10), || {
        http_get(metrics, "/ready").is_some_and(|(s, _)| s == 503)
    }));
    tokio::time::sleep(Duration::from_secs(3)).await;
    p.enqueue(&body_task("waits", EICAR.to_vec()))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        p.depth().await.unwrap(),
        (0, 1),
        "claimed without a scanner"
    );
    stack.clamd.restart();
    let v = p.wait_verdict("waits", deadline(20)).await.unwrap();
    assert_eq!(v.status(), VerdictStatus::Infected, "{}", h.log_tail());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrency_above_clamd_threads_is_warned_about() {
    // The test clamd runs MaxThreads 8.
    let stack = Stack::start();
    let (mut at_max, _) = stack.start_consumer(&["--concurrency", "8"]);
    let (mut above, _) = stack.start_consumer(&["--concurrency", "9"]);
    for (h, warned) in [(&mut at_max, false), (&mut above, true)] {
        let fields = h.wait_for_fields(
            "clamd's MaxThreads",
            &["concurrency", "clamd_max_threads"],
            Duration::from_secs(20),
        );
        assert_eq!(fields[1], "8", "{}", h.log_tail());
        let line = h.log();
        let line = line
            .lines()
            .find(|l| l.contains("clamd's MaxThreads"))
            .unwrap();
        assert_eq!(line.contains("WARN"), warned, "{line}");
        assert_eq!(line.contains("is above"), warned, "{line}");
    }
}

#[test]
fn invalid_configuration_names_every_setting_and_exits_2() {
    let handler = env!("CARGO_BIN_EXE_virus-scanner-handler");
    let out = virus_scanner_test_support::clean_command(handler)
        .args(["--clamd-address", "nonsense"])
        .env("SCAN_CONCURRENCY", "0")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("CLAMD_ADDRESS"), "{stderr}");
    assert!(stderr.contains("SCAN_CONCURRENCY"), "{stderr}");
}

/// The corpus through a consumer: EICAR and clean bytes inline, the hash-only sample and an
/// infected file as spilled files, a file that is not the body its producer hashed, and a
/// body over the consumer's limit.
async fn corpus_verdicts(stack: &Stack, p: &Producer, tag: &str) {
    let mut body = b"--boundary\r\n".to_vec();
    body.extend_from_slice(EICAR);
    let v = scan(p, body_task(&format!("{tag}-eicar"), body)).await;
    assert_eq!(
        (v.status(), v.signature.as_str()),
        (VerdictStatus::Infected, EICAR_BODY_SIGNATURE)
    );
    let v = scan(
        p,
        body_task(&format!("{tag}-clean"), clean_bytes(100_000, 1)),
    )
    .await;
    assert_eq!(v.status(), VerdictStatus::Clean, "{}", v.detail);

    let path = stack.spill(&format!("{tag}-sample.bin"), &hash_signature_sample());
    let v = scan(p, path_task(&format!("{tag}-hash"), &path)).await;
    assert_eq!(
        (v.status(), v.signature.as_str()),
        (VerdictStatus::Infected, HASH_SAMPLE_SIGNATURE)
    );
    let mut big = clean_bytes(3 << 20, 9);
    let clean = stack.spill(&format!("{tag}-clean-3m"), &big);
    let v = scan(p, path_task(&format!("{tag}-big-clean"), &clean)).await;
    assert_eq!(v.status(), VerdictStatus::Clean, "{}", v.detail);
    let mut lying = path_task(&format!("{tag}-lying"), &clean);
    lying.sha256 = vec![7; 32];
    let v = scan(p, lying).await;
    assert_eq!(v.status(), VerdictStatus::Error, "{}", v.detail);
    big[1000..1000 + EICAR.len()].copy_from_slice(EICAR);
    let infected = stack.spill(&format!("{tag}-infected-3m"), &big);
    let v = scan(p, path_task(&format!("{tag}-big-infected"), &infected)).await;
    assert_eq!(v.status(), VerdictStatus::Infected, "{}", v.detail);

    let v = scan(
        p,
        body_task(&format!("{tag}-large"), clean_bytes(9 << 20, 4)),
    )
    .await;
    assert_eq!(v.status(), VerdictStatus::Unscannable, "{}", v.detail);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scans_by_descriptor_and_by_stream_give_the_same_verdicts() {
    // clamd's own limit below the consumer's: its answer for the large body decides.
    let stack = Stack::start_with(
        RedisOptions::default(),
        ClamdOptions {
            max_file_size: "8M".into(),
            stream_max_length: "8M".into(),
            ..ClamdOptions::default()
        },
    );
    let p = stack.producer().await;
    let socket = stack.clamd.socket_path().display().to_string();
    let absent = stack.scan_dir.path().join("no-clamd.sock");
    let absent = absent.display().to_string();
    for (tag, extra) in [
        ("stream", vec![]),
        ("fildes", vec!["--clamd-socket", socket.as_str()]),
        ("fallback", vec!["--clamd-socket", absent.as_str()]),
    ] {
        let (mut handler, _) = stack.start_consumer(&extra);
        corpus_verdicts(&stack, &p, tag).await;
        handler.kill9();
    }
}
