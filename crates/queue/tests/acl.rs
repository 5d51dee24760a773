//! Tenants on one Redis, each with the ACL user `acl::tenant_rules` gives it, over TLS: a
//! tenant submits and gets its verdicts, and cannot read, forge or reorder anyone's scans.

#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use virus_scanner_protocol::task::{Content, Labels, ScanTask, Verdict, VerdictStatus};
use virus_scanner_queue::{Consumer, Producer, QueueConfig, RedisConfig, acl};
use virus_scanner_test_support::{Redis, RedisOptions};

const ADMIN_PASSWORD: &str = "admin-secret";
const PREFIX: &str = "virus-scanner";

fn config(redis: &Redis, user: Option<(&str, &str)>) -> QueueConfig {
    let mut r = RedisConfig::from_host_port(redis.host(), redis.port(), true);
    r.ca_file = Some(redis.ca_file());
    if let Some((user, password)) = user {
        r.username = Some(user.into());
        r.password = Some(password.into());
    }
    r.connect_timeout = Duration::from_secs(2);
    let mut c = QueueConfig::new(r);
    c.visibility_timeout = Duration::from_secs(5);
    c
}

async fn connection(config: &QueueConfig) -> redis::aio::MultiplexedConnection {
    config
        .redis
        .client()
        .unwrap()
        .get_multiplexed_async_connection_with_config(
            // Room for writing a huge entry over TLS from a debug build.
            &redis::AsyncConnectionConfig::new()
                .set_response_timeout(Some(Duration::from_secs(60))),
        )
        .await
        .unwrap()
}

/// Redis with TLS only, an administrator (the default user, as the operator's), the consumers'
/// user and two tenants.
async fn shared_redis() -> Redis {
    let redis = Redis::start_with(RedisOptions {
        tls: true,
        password: Some(ADMIN_PASSWORD.into()),
        ..RedisOptions::default()
    });
    let mut admin = connection(&config(&redis, Some(("default", ADMIN_PASSWORD)))).await;
    let rules = acl::consumer_rules(PREFIX, "scan_queue", "scan_result:");
    acl::set_user(&mut admin, "vs-consumer", "consumer-secret", &rules)
        .await
        .unwrap();
    for tenant in ["a", "b"] {
        acl::provision_tenant(&mut admin, PREFIX, tenant, &format!("{tenant}-secret"))
            .await
            .unwrap();
    }
    redis
}

fn tenant_config(redis: &Redis, tenant: &str) -> QueueConfig {
    let user = acl::tenant_user(tenant);
    let password = format!("{tenant}-secret");
    let mut c = config(redis, Some((&user, &password)));
    c.tenant = tenant.into();
    c
}

/// Answers every task it claims as clean, as the consumers' user.
async fn clean_consumer(redis: &Redis) -> tokio::task::JoinHandle<()> {
    let mut consumer = Consumer::connect(
        config(redis, Some(("vs-consumer", "consumer-secret"))),
        "c1",
    )
    .await
    .unwrap();
    consumer.ensure_group().await.unwrap();
    tokio::spawn(async move {
        loop {
            let claimed = match consumer.claim(Duration::from_millis(200)).await {
                Ok(claimed) => claimed,
                // Redis restarting, or this user not there yet.
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            for d in claimed {
                // As the consumer does: what does not decode is dropped.
                let Ok(task) = d.task.as_ref() else {
                    let _ = consumer.discard(&d).await;
                    continue;
                };
                let verdict = Verdict {
                    task_id: task.id.clone(),
                    status: VerdictStatus::Clean as i32,
                    detail: format!("from {}", d.tenant),
                    ..Verdict::default()
                };
                let _ = consumer.complete(&d, &verdict, None).await;
            }
        }
    })
}

fn body_task(id: &str, labelled_tenant: &str) -> ScanTask {
    ScanTask {
        id: id.into(),
        content: Some(Content::Body(b"hello".to_vec().into())),
        labels: Some(Labels {
            tenant: labelled_tenant.into(),
            ..Labels::default()
        }),
        ..ScanTask::default()
    }
}

fn assert_noperm<T: std::fmt::Debug>(what: &str, result: redis::RedisResult<T>) {
    match result {
        Err(e) if e.code() == Some("NOPERM") || e.to_string().contains("NOPERM") => {}
        // A call inside a function, refused by the key it touches.
        Err(e)
            if e.to_string()
                .contains("can't access at least one of the keys") => {}
        other => panic!("{what}: expected NOPERM, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_submits_and_is_answered_and_can_do_nothing_else() {
    let redis = shared_redis().await;
    let consumer = clean_consumer(&redis).await;
    let a = Producer::connect(tenant_config(&redis, "a")).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    // A task that names another tenant is still a's: its stream decides.
    let v = a.scan(&body_task("00aa", "b"), deadline).await.unwrap();
    assert_eq!(v.status(), VerdictStatus::Clean);
    assert_eq!(v.detail, "from a");

    // A body sent through Redis in chunks (a producer without a shared spool), and removed
    // when the producer drops it: all within a's own keys.
    let path = std::env::temp_dir().join(format!("vs-acl-test-{}", std::process::id()));
    std::fs::write(&path, vec![7u8; 3 << 20]).unwrap();
    let stored = a
        .store_body(
            "00ab",
            &path,
            3 << 20,
            Instant::now() + Duration::from_secs(10),
        )
        .await
        .unwrap();
    let key = stored.key().to_owned();
    assert_eq!(key, "{virus-scanner}:body:a:00ab");
    let mut admin = connection(&config(&redis, Some(("default", ADMIN_PASSWORD)))).await;
    let chunks: i64 = redis::cmd("HLEN")
        .arg(&key)
        .query_async(&mut admin)
        .await
        .unwrap();
    assert_eq!(chunks, 2);
    drop(stored);
    let start = Instant::now();
    loop {
        let n: i64 = redis::cmd("EXISTS")
            .arg(&key)
            .query_async(&mut admin)
            .await
            .unwrap();
        if n == 0 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "the stored body stayed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = std::fs::remove_file(&path);

    let cfg = tenant_config(&redis, "a");
    let mut c = connection(&cfg).await;
    let p = "{virus-scanner}";
    macro_rules! refused {
        ($what:expr, $cmd:expr) => {
            assert_noperm($what, $cmd.query_async::<redis::Value>(&mut c).await)
        };
    }
    // The verdict cache and the database version: read, never written.
    let _: Option<String> = redis::cmd("GET")
        .arg(format!("{p}:db-version"))
        .query_async(&mut c)
        .await
        .unwrap();
    refused!(
        "SET cache",
        redis::cmd("SET")
            .arg(format!("{p}:cache:1:{}", "ab".repeat(32)))
            .arg("clean")
    );
    refused!(
        "SET db-version",
        redis::cmd("SET").arg(format!("{p}:db-version")).arg("0")
    );
    // No stream is read, not even its own.
    for stream in [format!("{p}:tasks:a:normal"), format!("{p}:tasks:b:normal")] {
        refused!(
            "XRANGE",
            redis::cmd("XRANGE").arg(&stream).arg("-").arg("+")
        );
        refused!(
            "XREAD",
            redis::cmd("XREAD").arg("STREAMS").arg(&stream).arg("0")
        );
        refused!(
            "XREADGROUP",
            redis::cmd("XREADGROUP")
                .arg("GROUP")
                .arg("scanners")
                .arg("x")
                .arg("STREAMS")
                .arg(&stream)
                .arg(">")
        );
        refused!(
            "XGROUP",
            redis::cmd("XGROUP")
                .arg("CREATE")
                .arg(&stream)
                .arg("mine")
                .arg("0")
        );
        refused!(
            "HSET on a stream",
            redis::cmd("HSET").arg(&stream).arg("f").arg("v")
        );
    }
    // Another tenant's keys.
    refused!(
        "BLPOP b's verdict",
        redis::cmd("BLPOP")
            .arg(format!("{p}:verdict:b:00aa"))
            .arg(0.1)
    );
    refused!(
        "RPUSH b's verdict",
        redis::cmd("RPUSH")
            .arg(format!("{p}:verdict:b:00aa"))
            .arg("x")
    );
    refused!(
        "XADD b's stream",
        redis::cmd("XADD")
            .arg(format!("{p}:tasks:b:normal"))
            .arg("*")
            .arg("v1")
            .arg("x")
    );
    refused!(
        "HSET b's body",
        redis::cmd("HSET")
            .arg(format!("{p}:body:b:00aa"))
            .arg("0")
            .arg("x")
    );
    refused!(
        "submit into b's stream",
        redis::cmd("FCALL")
            .arg("vs_submit_1")
            .arg(2)
            .arg(format!("{p}:verdict:a:1"))
            .arg(format!("{p}:tasks:b:normal"))
            .arg("")
            .arg("x")
            .arg(60)
            .arg("v1")
    );
    refused!(
        "submit reading b's verdict as a cache entry",
        redis::cmd("FCALL")
            .arg("vs_submit_1")
            .arg(2)
            .arg(format!("{p}:verdict:a:1"))
            .arg(format!("{p}:tasks:a:normal"))
            .arg(format!("{p}:verdict:b:00aa"))
            .arg("x")
            .arg(60)
            .arg("v1")
    );
    // The consumers' tenant list, scripts, functions and administration.
    refused!(
        "SADD tenants",
        redis::cmd("SADD").arg(format!("{p}:tenants")).arg("junk")
    );
    refused!("EVAL", redis::cmd("EVAL").arg("return 1").arg(0));
    refused!(
        "FUNCTION LOAD",
        redis::cmd("FUNCTION")
            .arg("LOAD")
            .arg("#!lua name=x\nredis.register_function('x', function() return 1 end)")
    );
    // Transactions (millions of queued commands stall Redis for everyone), other databases,
    // synchronous deletes of a huge key.
    refused!("MULTI", redis::cmd("MULTI"));
    refused!("SELECT", redis::cmd("SELECT").arg(1));
    refused!(
        "DEL own body",
        redis::cmd("DEL").arg(format!("{p}:body:a:00ab"))
    );
    refused!("CONFIG", redis::cmd("CONFIG").arg("GET").arg("*"));
    refused!("MONITOR", redis::cmd("MONITOR"));
    refused!("KEYS", redis::cmd("KEYS").arg("*"));
    refused!("ACL", redis::cmd("ACL").arg("LIST"));
    refused!("FLUSHALL", redis::cmd("FLUSHALL"));
    consumer.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_credentials_a_wrong_password_and_plain_tcp_are_refused() {
    let redis = shared_redis().await;
    // No credentials: the connection is refused at the first command.
    let mut anonymous = config(&redis, None);
    anonymous.tenant = "a".into();
    assert!(Producer::connect(anonymous).await.is_err());
    let mut wrong = tenant_config(&redis, "a");
    wrong.redis.password = Some("b-secret".into());
    assert!(Producer::connect(wrong).await.is_err());
    // b's password does not open a's keys either.
    let mut as_b = tenant_config(&redis, "b");
    as_b.tenant = "a".into();
    let b = Producer::connect(as_b).await;
    let refused = match b {
        Err(_) => true,
        Ok(b) => b
            .scan(
                &body_task("00bb", "a"),
                Instant::now() + Duration::from_secs(2),
            )
            .await
            .is_err(),
    };
    assert!(refused, "b's user queued a task as a");
    // Plain TCP to the TLS port.
    let mut plain = tenant_config(&redis, "a");
    plain.redis.url = plain.redis.url.replace("rediss://", "redis://");
    plain.redis.ca_file = None;
    assert!(Producer::connect(plain).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_tenant_can_no_longer_connect() {
    let redis = shared_redis().await;
    let mut admin = connection(&config(&redis, Some(("default", ADMIN_PASSWORD)))).await;
    assert_eq!(
        {
            let mut t = acl::provisioned_tenants(&mut admin).await.unwrap();
            t.sort();
            t
        },
        ["a", "b"]
    );
    acl::remove_tenant(&mut admin, PREFIX, "a").await.unwrap();
    assert_eq!(acl::provisioned_tenants(&mut admin).await.unwrap(), ["b"]);
    assert!(Producer::connect(tenant_config(&redis, "a")).await.is_err());
    let tenants: Vec<String> = redis::cmd("SMEMBERS")
        .arg("{virus-scanner}:tenants")
        .query_async(&mut admin)
        .await
        .unwrap();
    assert_eq!(tenants, ["b"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_redis_lost_its_data_a_tenant_is_served_once_its_user_is_back() {
    let mut redis = shared_redis().await;
    let consumer = clean_consumer(&redis).await;
    let a = Producer::connect(tenant_config(&redis, "a")).await.unwrap();
    let deadline = || Instant::now() + Duration::from_secs(15);
    let v = a.scan(&body_task("00c1", "a"), deadline()).await.unwrap();
    assert_eq!(v.status(), VerdictStatus::Clean);

    // No persistence: users, the tenant set, the streams and the functions are gone. The
    // operator applies the users again on its next pass; a tenant's user cannot load the
    // functions, so the consumers must.
    redis.restart();
    let mut admin = connection(&config(&redis, Some(("default", ADMIN_PASSWORD)))).await;
    let rules = acl::consumer_rules(PREFIX, "scan_queue", "scan_result:");
    acl::set_user(&mut admin, "vs-consumer", "consumer-secret", &rules)
        .await
        .unwrap();
    acl::provision_tenant(&mut admin, PREFIX, "a", "a-secret")
        .await
        .unwrap();
    let start = Instant::now();
    loop {
        match a.scan(&body_task("00c2", "a"), deadline()).await {
            Ok(v) => {
                assert_eq!(v.status(), VerdictStatus::Clean);
                break;
            }
            Err(e) => {
                assert!(
                    start.elapsed() < Duration::from_secs(20),
                    "a is not served after the restart: {e}"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    consumer.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_cannot_answer_in_the_seed_s_format_nor_jam_the_consumers_with_a_huge_entry() {
    let redis = shared_redis().await;
    let consumer = clean_consumer(&redis).await;
    let a = Producer::connect(tenant_config(&redis, "a")).await.unwrap();
    let b = Producer::connect(tenant_config(&redis, "b")).await.unwrap();
    let mut admin = connection(&config(&redis, Some(("default", ADMIN_PASSWORD)))).await;
    let deadline = || Instant::now() + Duration::from_secs(10);

    // A task in the seed's reply format from a tenant's stream is answered as a tenant's:
    // on its verdict list, never on the seed's result key that its producers wait on.
    let mut seed_like = body_task("victim-42", "a");
    seed_like.reply_format = virus_scanner_protocol::task::ReplyFormat::LegacyText as i32;
    let v = a.scan(&seed_like, deadline()).await.unwrap();
    assert_eq!(v.status(), VerdictStatus::Clean);
    let planted: i64 = redis::cmd("EXISTS")
        .arg("scan_result:victim-42")
        .query_async(&mut admin)
        .await
        .unwrap();
    assert_eq!(planted, 0, "a tenant wrote a result in the seed's format");

    // An entry larger than any task, written straight to its own stream: dropped unread,
    // and the consumers go on serving everyone.
    let mut c = connection(&tenant_config(&redis, "a")).await;
    let huge = vec![b'x'; virus_scanner_queue::MAX_TASK_BYTES + 1];
    let _: String = redis::cmd("XADD")
        .arg("{virus-scanner}:tasks:a:normal")
        .arg("*")
        .arg("v1")
        .arg(huge)
        .query_async(&mut c)
        .await
        .unwrap();
    let v = b.scan(&body_task("00b7", "b"), deadline()).await.unwrap();
    assert_eq!(v.status(), VerdictStatus::Clean);
    let start = Instant::now();
    loop {
        let left: i64 = redis::cmd("XLEN")
            .arg("{virus-scanner}:tasks:a:normal")
            .query_async(&mut admin)
            .await
            .unwrap();
        if left == 0 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "the huge entry stayed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let v = a.scan(&body_task("00a8", "a"), deadline()).await.unwrap();
    assert_eq!(v.status(), VerdictStatus::Clean);
    assert!(!consumer.is_finished(), "the consumer stopped");
    consumer.abort();
}
