//! Queue semantics against a real redis-server.

#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt;
use virus_scanner_protocol::task::{
    Content, Labels, Priority, RedisChunks, ReplyFormat, ScanTask, Verdict, VerdictStatus,
};
use virus_scanner_queue::{
    CHUNK_BYTES, Consumer, LegacyBridge, MAX_CHUNK_BYTES, Producer, QueueConfig, QueueError,
    RedisConfig,
};
use virus_scanner_test_support::{Redis, RedisOptions, clean_bytes};

fn config(redis: &Redis) -> QueueConfig {
    let mut c = QueueConfig::new(RedisConfig::from_host_port(
        redis.host(),
        redis.port(),
        false,
    ));
    c.visibility_timeout = Duration::from_millis(400);
    c.max_deliveries = 3;
    c
}

fn tenant_config(redis: &Redis, tenant: &str) -> QueueConfig {
    let mut c = config(redis);
    c.tenant = tenant.into();
    c
}

/// A delivery of `task` from `tenant`'s stream, as a claim returns it.
fn delivered(tenant: &str, task: &ScanTask) -> virus_scanner_queue::Delivery {
    virus_scanner_queue::Delivery {
        entry_id: "0-1".into(),
        stream: format!("{{virus-scanner}}:tasks:{tenant}:normal"),
        tenant: tenant.into(),
        priority: Priority::Normal,
        deliveries: 1,
        task: Ok(task.clone()),
    }
}

fn task(id: &str, priority: Priority) -> ScanTask {
    ScanTask {
        id: id.into(),
        content: Some(Content::Body(id.as_bytes().to_vec().into())),
        priority: priority as i32,
        ..ScanTask::default()
    }
}

fn clean(id: &str) -> Verdict {
    Verdict {
        task_id: id.into(),
        status: VerdictStatus::Clean as i32,
        ..Verdict::default()
    }
}

async fn claim_one(c: &mut Consumer) -> virus_scanner_queue::Delivery {
    let start = Instant::now();
    loop {
        let mut got = c.claim(Duration::from_millis(100)).await.unwrap();
        if !got.is_empty() {
            return got.remove(0);
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "nothing to claim"
        );
    }
}

#[tokio::test]
async fn verdict_reaches_the_waiting_producer() {
    let redis = Redis::start();
    let producer = Producer::connect(config(&redis)).await.unwrap();
    let mut consumer = Consumer::connect(config(&redis), "c1").await.unwrap();
    let t = task("t1", Priority::Normal);
    let wait = {
        let t = t.clone();
        tokio::spawn(async move {
            producer
                .scan(&t, Instant::now() + Duration::from_secs(10))
                .await
        })
    };
    let d = claim_one(&mut consumer).await;
    assert_eq!(d.task.as_ref().unwrap(), &t);
    assert_eq!(d.deliveries, 1);
    assert!(consumer.complete(&d, &clean("t1"), None).await.unwrap());
    let v = wait.await.unwrap().unwrap();
    assert_eq!(v.status(), VerdictStatus::Clean);
    assert_eq!(
        consumer.depth().await.unwrap(),
        (0, 0),
        "completed entries are deleted"
    );
}

#[tokio::test]
async fn high_priority_is_claimed_before_a_normal_backlog() {
    let redis = Redis::start();
    let producer = Producer::connect(config(&redis)).await.unwrap();
    for i in 0..20 {
        producer
            .enqueue(&task(&format!("n{i}"), Priority::Normal))
            .await
            .unwrap();
    }
    producer.enqueue(&task("h1", Priority::High)).await.unwrap();
    producer.enqueue(&task("h2", Priority::High)).await.unwrap();
    let mut consumer = Consumer::connect(config(&redis), "c1").await.unwrap();
    let first = claim_one(&mut consumer).await;
    let second = claim_one(&mut consumer).await;
    let third = claim_one(&mut consumer).await;
    assert_eq!(first.task.unwrap().id, "h1");
    assert_eq!(second.task.unwrap().id, "h2");
    assert_eq!(third.task.unwrap().id, "n0");
}

#[tokio::test]
async fn abandoned_task_is_redelivered_and_the_old_owner_cannot_answer() {
    let redis = Redis::start();
    let producer = Producer::connect(config(&redis)).await.unwrap();
    producer
        .enqueue(&task("t1", Priority::Normal))
        .await
        .unwrap();
    let mut dead = Consumer::connect(config(&redis), "dead").await.unwrap();
    let held = claim_one(&mut dead).await;

    let mut alive = Consumer::connect(config(&redis), "alive").await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let again = claim_one(&mut alive).await;
    assert_eq!(again.entry_id, held.entry_id);
    assert_eq!(again.deliveries, 2);

    assert!(
        !dead.complete(&held, &clean("t1"), None).await.unwrap(),
        "stale owner refused"
    );
    assert!(alive.complete(&again, &clean("t1"), None).await.unwrap());
    let v = producer
        .wait_verdict("t1", Instant::now() + Duration::from_secs(2))
        .await
        .unwrap();
    assert_eq!(v.status(), VerdictStatus::Clean);
    assert!(
        matches!(
            producer
                .wait_verdict("t1", Instant::now() + Duration::from_millis(200))
                .await,
            Err(QueueError::DeadlineExceeded)
        ),
        "exactly one verdict"
    );
}

#[tokio::test]
async fn heartbeat_keeps_a_long_scan_from_being_reclaimed() {
    let redis = Redis::start();
    let producer = Producer::connect(config(&redis)).await.unwrap();
    producer
        .enqueue(&task("t1", Priority::Normal))
        .await
        .unwrap();
    let mut busy = Consumer::connect(config(&redis), "busy").await.unwrap();
    let held = claim_one(&mut busy).await;
    let mut other = Consumer::connect(config(&redis), "other").await.unwrap();
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        busy.heartbeat(&held).await.unwrap();
        assert!(
            other
                .claim(Duration::from_millis(10))
                .await
                .unwrap()
                .is_empty()
        );
    }
    assert!(busy.complete(&held, &clean("t1"), None).await.unwrap());
}

#[tokio::test]
async fn poison_task_gets_an_error_verdict_after_bounded_deliveries() {
    let redis = Redis::start();
    let producer = Producer::connect(config(&redis)).await.unwrap();
    producer
        .enqueue(&task("poison", Priority::High))
        .await
        .unwrap();
    // Three consumers take it in turn and die holding it.
    for n in 0..3 {
        let mut c = Consumer::connect(config(&redis), format!("crash-{n}"))
            .await
            .unwrap();
        let d = claim_one(&mut c).await;
        assert_eq!(d.deliveries, n + 1);
        tokio::time::sleep(Duration::from_millis(450)).await;
    }
    let mut last = Consumer::connect(config(&redis), "last").await.unwrap();
    assert!(
        last.claim(Duration::from_millis(50))
            .await
            .unwrap()
            .is_empty()
    );
    let v = producer
        .wait_verdict("poison", Instant::now() + Duration::from_secs(2))
        .await
        .unwrap();
    assert_eq!(v.status(), VerdictStatus::Error);
    assert_eq!(v.deliveries, 4);
    assert!(v.detail.contains("delivered 4 times"), "{}", v.detail);
    assert_eq!(last.depth().await.unwrap(), (0, 0));
}

#[tokio::test]
async fn waiting_without_a_verdict_ends_at_the_deadline() {
    let redis = Redis::start();
    let producer = Producer::connect(config(&redis)).await.unwrap();
    let start = Instant::now();
    let r = producer
        .wait_verdict("nobody", Instant::now() + Duration::from_millis(300))
        .await;
    assert!(matches!(r, Err(QueueError::DeadlineExceeded)));
    assert!(start.elapsed() < Duration::from_secs(2));
}

/// A burst of waits opens a connection each; once the burst is over they are closed, and
/// the buffers their bodies grew with them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verdict_wait_connections_close_once_idle() {
    let redis = Redis::start();
    let producer = std::sync::Arc::new(
        Producer::connect(config(&redis))
            .await
            .unwrap()
            .with_waiter_idle(Duration::from_millis(400)),
    );
    let mut consumer = Consumer::connect(config(&redis), "c").await.unwrap();
    let waits: Vec<_> = (0..4)
        .map(|i| {
            let producer = producer.clone();
            tokio::spawn(async move {
                producer
                    .scan(
                        &task(&format!("w{i}"), Priority::Normal),
                        Instant::now() + Duration::from_secs(10),
                    )
                    .await
            })
        })
        .collect();
    // Every wait has taken its connection (its task is queued) before any is answered.
    let start = Instant::now();
    while producer.depth().await.unwrap() != (0, 4) {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "the tasks were not queued"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for _ in 0..4 {
        let d = claim_one(&mut consumer).await;
        let id = d.task.as_ref().unwrap().id.clone();
        assert!(consumer.complete(&d, &clean(&id), None).await.unwrap());
    }
    for w in waits {
        w.await.unwrap().unwrap();
    }
    assert_eq!(producer.idle_waiters(), 4, "each wait had its connection");
    let start = Instant::now();
    while producer.idle_waiters() > 0 {
        assert!(
            start.elapsed() < Duration::from_secs(3),
            "{} idle connections still open",
            producer.idle_waiters()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn cached_verdict_is_found_only_for_its_database_version() {
    let redis = Redis::start();
    let producer = Producer::connect(config(&redis)).await.unwrap();
    producer
        .enqueue(&task("t1", Priority::Normal))
        .await
        .unwrap();
    let mut consumer = Consumer::connect(config(&redis), "c").await.unwrap();
    let d = claim_one(&mut consumer).await;
    let sha = [7u8; 32];
    consumer.publish_db_version("100").await.unwrap();
    assert!(
        consumer
            .complete(&d, &clean("t1"), Some(("100", &sha)))
            .await
            .unwrap()
    );
    let hit = producer.cached_verdict(&sha).await.unwrap().unwrap();
    assert!(hit.cached);
    assert_eq!(hit.status(), VerdictStatus::Clean);
    // What the cache holds names no task: a hit may answer another tenant's request.
    assert!(hit.task_id.is_empty(), "{:?}", hit.task_id);
    assert!(hit.hops.is_none());
    assert!(
        consumer
            .cached_verdict("101", &sha)
            .await
            .unwrap()
            .is_none()
    );
    assert!(producer.cached_verdict(&[8u8; 32]).await.unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scan_remembers_verdicts_in_process_but_not_while_redis_is_down() {
    let mut redis = Redis::start();
    let producer = std::sync::Arc::new(
        Producer::connect(config(&redis))
            .await
            .unwrap()
            .with_memo(16, Duration::from_secs(60)),
    );
    let mut consumer = Consumer::connect(config(&redis), "c").await.unwrap();
    consumer.publish_db_version("100").await.unwrap();
    let sha = [5u8; 32];
    let mut first = task("t1", Priority::Normal);
    first.sha256 = sha.to_vec();
    let waiting = tokio::spawn({
        let producer = producer.clone();
        async move {
            producer
                .scan(&first, Instant::now() + Duration::from_secs(10))
                .await
        }
    });
    let d = claim_one(&mut consumer).await;
    let mut verdict = clean("t1");
    verdict.db_version = "100".into();
    // No Redis cache entry: only the producer's memory can answer the same bytes again.
    assert!(consumer.complete(&d, &verdict, None).await.unwrap());
    let scanned = waiting.await.unwrap().unwrap();
    assert!(!scanned.cached);

    let mut again = task("t2", Priority::Normal);
    again.sha256 = sha.to_vec();
    let remembered = producer
        .scan(&again, Instant::now() + Duration::from_secs(10))
        .await
        .unwrap();
    assert!(remembered.cached);
    assert_eq!(remembered.status(), VerdictStatus::Clean);
    assert_eq!(
        producer.depth().await.unwrap(),
        (0, 0),
        "nothing was queued"
    );
    let mut other = again.clone();
    other.sha256 = vec![6; 32];
    assert!(producer.remembered(&other.sha256).await.unwrap().is_none());

    // Redis down: nothing is decided from memory any more.
    redis.stop();
    let start = Instant::now();
    while producer.remembered(&sha).await.is_ok() {
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "the memo still answers with Redis down"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let r = producer
        .scan(&again, Instant::now() + Duration::from_secs(2))
        .await;
    assert!(r.is_err(), "{r:?}");
}

#[tokio::test]
async fn errors_are_never_cached() {
    let redis = Redis::start();
    let producer = Producer::connect(config(&redis)).await.unwrap();
    producer
        .enqueue(&task("t1", Priority::Normal))
        .await
        .unwrap();
    let mut consumer = Consumer::connect(config(&redis), "c").await.unwrap();
    let d = claim_one(&mut consumer).await;
    let sha = [9u8; 32];
    assert!(
        consumer
            .complete(&d, &Verdict::error("t1", "clamd down"), Some(("1", &sha)))
            .await
            .unwrap()
    );
    assert!(consumer.cached_verdict("1", &sha).await.unwrap().is_none());
}

#[tokio::test]
async fn password_protected_redis_works_and_a_wrong_password_fails() {
    let redis = Redis::start_with(RedisOptions {
        password: Some("s3cr:t@/x".into()),
        ..RedisOptions::default()
    });
    let mut c = config(&redis);
    c.redis.password = Some("s3cr:t@/x".into());
    Producer::connect(c.clone())
        .await
        .unwrap()
        .ping()
        .await
        .unwrap();
    c.redis.password = Some("wrong".into());
    let denied = match Producer::connect(c).await {
        Err(e) => e.to_string(),
        Ok(p) => p.ping().await.unwrap_err().to_string(),
    };
    assert!(
        denied.to_lowercase().contains("pass") || denied.contains("WRONGPASS"),
        "{denied}"
    );
}

#[tokio::test]
async fn legacy_task_is_bridged_and_answered_in_text() {
    let redis = Redis::start();
    let cfg = config(&redis);
    let client = cfg.redis.url.clone();
    let mut raw = redis_conn(&client).await;
    let _: () = redis::cmd("LPUSH")
        .arg("scan_queue")
        .arg(&b"legacy-1|BODY|1700000000000000000|a|b\0c"[..])
        .query_async(&mut raw)
        .await
        .unwrap();
    let mut bridge = LegacyBridge::connect(cfg.clone()).await.unwrap();
    assert_eq!(
        bridge.forward(Duration::from_secs(1)).await.unwrap(),
        Some(Ok("legacy-1".to_string()))
    );
    let mut consumer = Consumer::connect(cfg, "c").await.unwrap();
    let d = claim_one(&mut consumer).await;
    let t = d.task.clone().unwrap();
    assert_eq!(t.reply_format(), ReplyFormat::LegacyText);
    assert_eq!(t.content, Some(Content::Body(b"a|b\0c".to_vec().into())));
    let mut v = clean("legacy-1");
    v.set_status(VerdictStatus::Infected);
    v.signature = "Eicar".into();
    assert!(consumer.complete(&d, &v, None).await.unwrap());
    let (_, text): (String, String) = redis::cmd("BLPOP")
        .arg("scan_result:legacy-1")
        .arg(1)
        .query_async(&mut raw)
        .await
        .unwrap();
    assert_eq!(text, "INFECTED|Eicar");

    // A malformed legacy task with a usable id is answered with an error.
    let _: () = redis::cmd("LPUSH")
        .arg("scan_queue")
        .arg("bad-1|NOPE|1|x")
        .query_async(&mut raw)
        .await
        .unwrap();
    assert!(matches!(
        bridge.forward(Duration::from_secs(1)).await.unwrap(),
        Some(Err(_))
    ));
    let (_, text): (String, String) = redis::cmd("BLPOP")
        .arg("scan_result:bad-1")
        .arg(1)
        .query_async(&mut raw)
        .await
        .unwrap();
    assert!(text.starts_with("ERROR|"), "{text}");
}

async fn redis_conn(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

#[tokio::test]
async fn tls_redis_with_a_private_ca_works_and_an_unknown_ca_is_refused() {
    let redis = Redis::start_with(RedisOptions {
        tls: true,
        ..RedisOptions::default()
    });
    let mut redis_config = RedisConfig::from_host_port("127.0.0.1", redis.port(), true);
    assert!(redis_config.url.starts_with("rediss://"));
    redis_config.ca_file = Some(redis.ca_file());
    let mut cfg = QueueConfig::new(redis_config.clone());
    cfg.visibility_timeout = Duration::from_millis(400);
    let producer = Producer::connect(cfg.clone()).await.unwrap();
    let mut consumer = Consumer::connect(cfg, "tls").await.unwrap();
    producer
        .enqueue(&task("t1", Priority::Normal))
        .await
        .unwrap();
    let d = claim_one(&mut consumer).await;
    assert!(consumer.complete(&d, &clean("t1"), None).await.unwrap());
    let v = producer
        .wait_verdict("t1", Instant::now() + Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(v.status(), VerdictStatus::Clean);

    // Without the private CA the server certificate is not trusted.
    redis_config.ca_file = None;
    let refused = match Producer::connect(QueueConfig::new(redis_config)).await {
        Err(_) => true,
        Ok(p) => p.ping().await.is_err(),
    };
    assert!(refused, "an untrusted certificate was accepted");
}

/// A producer's spilled body: a file removed on drop.
struct SpilledFile(std::path::PathBuf);

impl SpilledFile {
    fn new(name: &str, bytes: &[u8]) -> SpilledFile {
        let path =
            std::env::temp_dir().join(format!("vs-queue-test-{}-{name}", std::process::id()));
        std::fs::write(&path, bytes).unwrap();
        SpilledFile(path)
    }
}

impl Drop for SpilledFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn stored_task(id: &str, tenant: &str, count: u32, size: u64) -> ScanTask {
    ScanTask {
        id: id.into(),
        content: Some(Content::RedisChunks(RedisChunks { count })),
        size,
        labels: Some(Labels {
            tenant: tenant.into(),
            ..Labels::default()
        }),
        ..ScanTask::default()
    }
}

async fn exists(conn: &mut redis::aio::MultiplexedConnection, key: &str) -> bool {
    redis::cmd("EXISTS")
        .arg(key)
        .query_async::<i64>(conn)
        .await
        .unwrap()
        == 1
}

async fn read_all(mut body: virus_scanner_queue::StoredBodyReader) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::new();
    body.read_to_end(&mut out).await?;
    Ok(out)
}

#[tokio::test]
async fn a_body_stored_in_chunks_is_read_whole_and_removed_with_its_verdict() {
    let redis = Redis::start();
    let producer = Producer::connect(tenant_config(&redis, "tenant-a"))
        .await
        .unwrap();
    let mut consumer = Consumer::connect(config(&redis), "c1").await.unwrap();
    let mut conn = redis_conn(&redis.url()).await;
    let body = clean_bytes(2 * CHUNK_BYTES + 12345, 5);
    let file = SpilledFile::new("whole", &body);
    let stored = producer
        .store_body(
            "big-1",
            &file.0,
            body.len() as u64,
            Instant::now() + Duration::from_secs(10),
        )
        .await
        .unwrap();
    let key = "{virus-scanner}:body:tenant-a:big-1";
    assert_eq!(stored.key(), key);
    assert_eq!(
        stored.content(),
        Content::RedisChunks(RedisChunks { count: 3 })
    );
    // Kept past the deadline for a scan that began just before it, not for ever.
    let ttl: i64 = redis::cmd("PTTL")
        .arg(key)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!((10_000..=70_000).contains(&ttl), "{ttl}");

    let t = stored_task("big-1", "tenant-a", 3, body.len() as u64);
    producer.enqueue(&t).await.unwrap();
    let d = claim_one(&mut consumer).await;
    let claimed = d.task.as_ref().unwrap();
    assert_eq!(claimed, &t);
    // Every reader starts from the beginning, as a retried scan does.
    for _ in 0..2 {
        let got = read_all(consumer.stored_body(&d, claimed).unwrap())
            .await
            .unwrap();
        assert!(got == body, "the stored body differs");
    }
    assert!(
        consumer
            .stored_body(&d, &task("inline", Priority::Normal))
            .is_none()
    );
    assert!(consumer.complete(&d, &clean("big-1"), None).await.unwrap());
    assert!(
        !exists(&mut conn, key).await,
        "the verdict removes the body"
    );
    drop(stored);
}

#[tokio::test]
async fn a_stored_body_goes_when_its_producer_stops_waiting() {
    let redis = Redis::start();
    let producer = Producer::connect(config(&redis)).await.unwrap();
    let mut conn = redis_conn(&redis.url()).await;
    let body = clean_bytes(CHUNK_BYTES + 1, 6);
    let file = SpilledFile::new("abandoned", &body);
    let deadline = Instant::now() + Duration::from_secs(10);
    let stored = producer
        .store_body("abandoned", &file.0, body.len() as u64, deadline)
        .await
        .unwrap();
    let key = stored.key().to_owned();
    assert_eq!(key, "{virus-scanner}:body:default:abandoned");
    assert!(exists(&mut conn, &key).await);
    drop(stored);
    let start = Instant::now();
    while exists(&mut conn, &key).await {
        assert!(start.elapsed() < Duration::from_secs(5), "{key} stayed");
        tokio::task::yield_now().await;
    }

    // Past the deadline nothing is stored, and the error says why.
    let late = producer
        .store_body("late", &file.0, body.len() as u64, Instant::now())
        .await;
    assert!(
        matches!(late, Err(QueueError::DeadlineExceeded)),
        "{late:?}"
    );
    // A file that is not the size the body had is refused, not sent in part.
    let short = producer
        .store_body("short", &file.0, body.len() as u64 + 1, deadline)
        .await;
    assert!(matches!(short, Err(QueueError::Body(_))), "{short:?}");
    let start = Instant::now();
    while exists(&mut conn, "{virus-scanner}:body:default:short").await {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "a refused body stayed"
        );
        tokio::task::yield_now().await;
    }
}

#[tokio::test]
async fn a_stored_body_that_is_short_long_or_has_a_huge_chunk_never_reads_as_complete() {
    let redis = Redis::start();
    let producer = Producer::connect(tenant_config(&redis, "t")).await.unwrap();
    let consumer = Consumer::connect(config(&redis), "c1").await.unwrap();
    let mut conn = redis_conn(&redis.url()).await;
    let body = clean_bytes(2 * CHUNK_BYTES + 1, 7);
    let size = body.len() as u64;
    let file = SpilledFile::new("checked", &body);
    let stored = producer
        .store_body(
            "checked",
            &file.0,
            size,
            Instant::now() + Duration::from_secs(10),
        )
        .await
        .unwrap();
    let read = |count, size| {
        read_all(
            consumer
                .stored_body(
                    &delivered("t", &stored_task("checked", "t", count, size)),
                    &stored_task("checked", "t", count, size),
                )
                .unwrap(),
        )
    };
    assert!(read(3, size).await.unwrap() == body);
    let kind = |r: std::io::Result<Vec<u8>>| r.unwrap_err().kind();
    assert_eq!(
        kind(read(3, size + 1).await),
        std::io::ErrorKind::UnexpectedEof
    );
    assert_eq!(
        kind(read(3, size - 1).await),
        std::io::ErrorKind::InvalidData
    );
    // A count that does not fit the size in full chunks (many tiny chunks would hold a scan
    // slot for long) is refused before any chunk is read.
    for count in [4, 2, 1000] {
        let e = read(count, size).await.unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidData, "{e}");
        assert!(e.to_string().contains("claims"), "{e}");
    }

    // A chunk removed (expired, or the producer gave up) mid-body.
    let _: i64 = redis::cmd("HDEL")
        .arg(stored.key())
        .arg(1)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(kind(read(3, size).await), std::io::ErrorKind::NotFound);
    // A chunk larger than any producer writes is refused before it is sent.
    let _: i64 = redis::cmd("HSET")
        .arg(stored.key())
        .arg(0)
        .arg(vec![0u8; MAX_CHUNK_BYTES + 1])
        .query_async(&mut conn)
        .await
        .unwrap();
    let huge_size = MAX_CHUNK_BYTES as u64 + 1;
    let huge = read(huge_size.div_ceil(CHUNK_BYTES as u64) as u32, huge_size)
        .await
        .unwrap_err();
    assert!(huge.to_string().contains("more than"), "{huge}");
}

#[tokio::test]
async fn a_batch_takes_one_task_per_tenant_per_turn_and_a_lone_task_at_once() {
    let redis = Redis::start();
    let a = Producer::connect(tenant_config(&redis, "a")).await.unwrap();
    let b = Producer::connect(tenant_config(&redis, "b")).await.unwrap();
    let mut c = Consumer::connect(config(&redis), "c1").await.unwrap();
    c.ensure_group().await.unwrap();
    for i in 0..6 {
        a.enqueue(&task(&format!("a{i}"), Priority::Normal))
            .await
            .unwrap();
    }
    b.enqueue(&task("b0", Priority::Normal)).await.unwrap();
    b.enqueue(&task("b1", Priority::High)).await.unwrap();
    let tenants = |got: &[virus_scanner_queue::Delivery]| -> Vec<String> {
        got.iter()
            .map(|d| d.task.as_ref().unwrap().id.clone())
            .collect()
    };
    // Two turns of both tenants (b's high task first), then a alone.
    let got = c.claim_up_to(Duration::from_millis(100), 5).await.unwrap();
    assert_eq!(tenants(&got), ["a0", "b1", "a1", "b0", "a2"]);
    let got = c.claim_up_to(Duration::from_millis(100), 8).await.unwrap();
    assert_eq!(tenants(&got), ["a3", "a4", "a5"]);
    // Nothing waiting: a task that comes in is handed out at once, not held for a batch.
    let claim = tokio::spawn(async move {
        let started = Instant::now();
        let got = c.claim_up_to(Duration::from_secs(5), 8).await.unwrap();
        (got.len(), started.elapsed())
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    b.enqueue(&task("b2", Priority::Normal)).await.unwrap();
    let (n, waited) = claim.await.unwrap();
    assert_eq!(n, 1);
    assert!(waited < Duration::from_secs(2), "{waited:?}");
}
