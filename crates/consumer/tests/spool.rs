//! PATH tasks on a spool shared by tenants: a task is resolved only in the directory of the
//! tenant whose stream delivered it, whatever tenant or path it names, and only the bytes
//! its producer hashed are judged. The consumer binary against real redis-server and clamd.

#![allow(clippy::unwrap_used)]

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use sha2::Digest;
use virus_scanner_protocol::task::{Content, Labels, ScanTask, Verdict, VerdictStatus};
use virus_scanner_queue::{Producer, QueueConfig, RedisConfig, now_ns};
use virus_scanner_test_support::{
    Clamd, EICAR, Redis, ServiceProcess, clean_bytes, http_get, port_of, wait_for,
};

const UID_A: u32 = 47201;
const UID_B: u32 = 47202;

struct Spool {
    redis: Redis,
    _clamd: Clamd,
    scan_dir: tempfile::TempDir,
    _consumer: ServiceProcess,
}

impl Spool {
    fn start() -> Spool {
        let redis = Redis::start();
        let clamd = Clamd::start();
        let scan_dir = tempfile::Builder::new()
            .prefix("vs-spool-")
            .tempdir()
            .unwrap();
        let args: Vec<String> = [
            "--redis-host",
            "127.0.0.1",
            "--redis-port",
            &redis.port().to_string(),
            "--clamd-address",
            &clamd.address(),
            "--scan-tmp-dir",
            &scan_dir.path().display().to_string(),
            "--metrics-addr",
            "127.0.0.1:0",
            "--log-format",
            "text",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let mut consumer = ServiceProcess::spawn(
            Path::new(env!("CARGO_BIN_EXE_virus-scanner-handler")),
            &args,
            &[],
        );
        let metrics = port_of(
            &consumer.wait_for_fields("consumer started", &["metrics"], Duration::from_secs(20))[0],
        );
        assert!(
            wait_for(Duration::from_secs(20), || {
                http_get(metrics, "/ready").is_some_and(|(s, _)| s == 200)
            }),
            "consumer not ready\n{}",
            consumer.log_tail()
        );
        Spool {
            redis,
            _clamd: clamd,
            scan_dir,
            _consumer: consumer,
        }
    }

    /// A tenant's directory, owned by the tenant's uid (as its producer makes it).
    fn tenant_dir(&self, tenant: &str, uid: u32) -> PathBuf {
        let dir = self.scan_dir.path().join(tenant);
        std::fs::create_dir(&dir).unwrap();
        std::os::unix::fs::chown(&dir, Some(uid), Some(uid)).unwrap();
        dir
    }

    /// A producer of `tenant`: its tasks go to that tenant's stream.
    async fn producer(&self, tenant: &str) -> Producer {
        let mut config = QueueConfig::new(RedisConfig::from_host_port(
            "127.0.0.1",
            self.redis.port(),
            false,
        ));
        config.tenant = tenant.into();
        Producer::connect(config).await.unwrap()
    }
}

fn as_root() {
    assert_eq!(
        rustix::process::geteuid().as_raw(),
        0,
        "this test gives files to other uids: run it as root (CI does)"
    );
}

/// A spilled file of the tenant owning `dir`.
fn spill(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    let owner = std::fs::metadata(dir).unwrap().uid();
    std::os::unix::fs::chown(&path, Some(owner), Some(owner)).unwrap();
    path
}

/// A PATH task that names `path` and claims to come from `claimed_tenant`.
fn path_task(id: &str, path: &str, claimed_tenant: &str, sha256: Vec<u8>) -> ScanTask {
    ScanTask {
        id: id.into(),
        content: Some(Content::Path(path.into())),
        enqueued_at_ns: now_ns(),
        sha256,
        labels: Some(Labels {
            tenant: claimed_tenant.into(),
            ..Labels::default()
        }),
        ..ScanTask::default()
    }
}

async fn scan(p: &Producer, task: ScanTask) -> Verdict {
    p.scan(&task, Instant::now() + Duration::from_secs(30))
        .await
        .unwrap()
}

fn fingerprint(path: &Path) -> (Vec<u8>, u64, u64, std::time::SystemTime) {
    let m = std::fs::symlink_metadata(path).unwrap();
    (
        std::fs::read(path).unwrap(),
        m.ino(),
        m.nlink(),
        m.modified().unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_from_tenant_b_cannot_make_the_consumer_read_tenant_a_s_file() {
    as_root();
    let spool = Spool::start();
    let a = spool.tenant_dir("team-a", UID_A);
    let b = spool.tenant_dir("team-b", UID_B);
    // Tenant A's body carries EICAR: a consumer that read it for B would say `infected`.
    let mut body = clean_bytes(4096, 7);
    body[100..100 + EICAR.len()].copy_from_slice(EICAR);
    let secret = spill(&a, "vs-spill-a", &body);
    let sha = sha2::Sha256::digest(&body).to_vec();
    let before = fingerprint(&secret);

    let symlink = b.join("vs-spill-symlink");
    std::os::unix::fs::symlink(&secret, &symlink).unwrap();
    std::os::unix::fs::lchown(&symlink, Some(UID_B), Some(UID_B)).unwrap();
    let hard_link = b.join("vs-spill-hardlink");
    std::fs::hard_link(&secret, &hard_link).unwrap();
    let names = [
        ("absolute", secret.display().to_string()),
        ("dotdot", format!("{}/../team-a/vs-spill-a", b.display())),
        ("symlink", symlink.display().to_string()),
        ("hardlink", hard_link.display().to_string()),
        ("relative", "../team-a/vs-spill-a".to_owned()),
        ("top", format!("{}/team-a", spool.scan_dir.path().display())),
    ];
    let tenant_b = spool.producer("team-b").await;
    for claimed in ["team-b", "team-a", ""] {
        for (how, path) in &names {
            let id = format!("b-{how}-{}", claimed.len());
            let v = scan(&tenant_b, path_task(&id, path, claimed, sha.clone())).await;
            assert_eq!(
                v.status(),
                VerdictStatus::Error,
                "tenant B, claiming {claimed:?}, read A's file by {how} ({path}): {v:?}"
            );
        }
    }
    // Through the hard link B's file is A's: the link went away, A's file stayed.
    std::fs::remove_file(&hard_link).unwrap();
    let (bytes, ino, _, modified) = before;
    let after = fingerprint(&secret);
    assert_eq!((after.0, after.1, after.3), (bytes, ino, modified));

    // The same file, asked for by tenant A: scanned.
    let tenant_a = spool.producer("team-a").await;
    let v = scan(
        &tenant_a,
        path_task("a-own", &secret.display().to_string(), "team-a", sha),
    )
    .await;
    assert_eq!(v.status(), VerdictStatus::Infected, "{v:?}");
    assert!(secret.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spilled_file_that_is_not_the_body_its_producer_hashed_is_an_error_not_clean() {
    as_root();
    let spool = Spool::start();
    let a = spool.tenant_dir("team-a", UID_A);
    let hashed = clean_bytes(8192, 8);
    let on_disk = clean_bytes(8192, 9);
    let path = spill(&a, "vs-spill-swapped", &on_disk);
    let producer = spool.producer("team-a").await;

    let wrong = sha2::Sha256::digest(&hashed).to_vec();
    let v = scan(
        &producer,
        path_task("swapped", &path.display().to_string(), "team-a", wrong),
    )
    .await;
    assert_eq!(v.status(), VerdictStatus::Error, "{v:?}");
    assert!(
        v.detail.contains("not the body its producer hashed"),
        "{v:?}"
    );

    let right = sha2::Sha256::digest(&on_disk).to_vec();
    let v = scan(
        &producer,
        path_task("intact", &path.display().to_string(), "team-a", right),
    )
    .await;
    assert_eq!(v.status(), VerdictStatus::Clean, "{v:?}");
}
