//! The operator keeps a Redis user per tenant namespace on a real Redis that serves TLS only:
//! the Secret it writes lets the tenant's producer submit and get verdicts from the real
//! consumer and clamd, and nothing else; deleting the Secret rotates the password; a namespace
//! without policies loses its user.
#![allow(clippy::unwrap_used)]

mod support;

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use kube::api::DeleteParams;
use support::{EXAMPLES, plane_with_crd};
use virus_scan_operator::tenants::{self, TenantUsers};
use virus_scanner_protocol::task::{Content, ScanTask, VerdictStatus};
use virus_scanner_queue::{Producer, QueueConfig, RedisConfig};
use virus_scanner_test_support::{Clamd, EICAR, Redis, RedisOptions, clean_bytes, wait_for};

const ADMIN_PASSWORD: &str = "operator-secret";
const CONSUMER_PASSWORD: &str = "consumer-secret";

fn admin(redis: &Redis) -> RedisConfig {
    let mut r = RedisConfig::from_host_port(redis.host(), redis.port(), true);
    r.ca_file = Some(redis.ca_file());
    r.password = Some(ADMIN_PASSWORD.into());
    r
}

fn settings(redis: &Redis) -> TenantUsers {
    let defaults = QueueConfig::new(admin(redis));
    TenantUsers {
        redis: admin(redis),
        prefix: defaults.prefix,
        ca_file: Some(redis.ca_file()),
        consumer: Some(("vs-consumer".into(), CONSUMER_PASSWORD.into())),
        legacy_queue: defaults.legacy_queue,
        legacy_result_prefix: defaults.legacy_result_prefix,
        period: Duration::from_secs(1),
        backbone: None,
        envoy_gateway_namespace: None,
    }
}

/// What the tenant's sidecar would be given: host and port from the chart, the rest from the
/// Secret (the CA written to a file, as the mounted Secret).
async fn tenant_config(
    client: &kube::Client,
    redis: &Redis,
    ns: &str,
    dir: &std::path::Path,
) -> QueueConfig {
    let secret = Api::<Secret>::namespaced(client.clone(), ns)
        .get(&tenants::secret_name(ns))
        .await
        .unwrap();
    let data = secret.data.unwrap();
    let field = |k: &str| String::from_utf8(data[k].0.clone()).unwrap();
    let ca = dir.join(format!("{ns}-ca.crt"));
    std::fs::write(&ca, &data[tenants::CA_KEY].0).unwrap();
    let mut r = RedisConfig::from_host_port(redis.host(), redis.port(), true);
    r.username = Some(field(tenants::USERNAME_KEY));
    r.password = Some(field(tenants::PASSWORD_KEY));
    r.ca_file = Some(ca);
    let mut q = QueueConfig::new(r);
    q.tenant = ns.into();
    q
}

fn body_task(id: &str, body: Vec<u8>) -> ScanTask {
    ScanTask {
        id: id.into(),
        size: body.len() as u64,
        content: Some(Content::Body(body.into())),
        ..ScanTask::default()
    }
}

/// The consumer, in process, as the consumers' user.
fn consumer(
    rt: &tokio::runtime::Runtime,
    redis: &Redis,
    clamd: &Clamd,
    scan_dir: &std::path::Path,
) -> tokio::sync::oneshot::Sender<()> {
    let port = redis.port().to_string();
    let ca = redis.ca_file().display().to_string();
    let dir = scan_dir.display().to_string();
    let args = <virus_scanner_consumer::ConsumerArgs as clap::Parser>::parse_from([
        "virus-scanner-handler",
        "--redis-host",
        "127.0.0.1",
        "--redis-port",
        &port,
        "--redis-tls",
        "--redis-ca-file",
        &ca,
        "--redis-username",
        "vs-consumer",
        "--redis-password",
        CONSUMER_PASSWORD,
        "--clamd-address",
        &clamd.address(),
        "--scan-tmp-dir",
        &dir,
        "--metrics-addr",
        "127.0.0.1:0",
        "--log-format",
        "text",
    ])
    .validate()
    .unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    rt.spawn(async move {
        let stop = async move {
            let _ = rx.await;
        };
        if let Err(e) = virus_scanner_consumer::run(args, stop).await {
            panic!("consumer: {e}");
        }
    });
    tx
}

#[test]
fn each_tenant_gets_a_redis_user_that_reaches_only_its_own_scans() {
    let plane = plane_with_crd();
    let example = std::fs::read_to_string(format!("{EXAMPLES}/virusscanpolicy.yaml")).unwrap();
    let policies = tempfile::tempdir().unwrap();
    for ns in ["team-a", "team-b"] {
        plane.kubectl(&["create", "namespace", ns]);
        let file = policies.path().join(format!("{ns}.yaml"));
        std::fs::write(
            &file,
            example.replace("namespace: tenant-a", &format!("namespace: {ns}")),
        )
        .unwrap();
        plane.kubectl(&["apply", "-f", file.to_str().unwrap()]);
    }
    // A tenant whose Gateway's proxies Envoy Gateway runs in its own namespace.
    plane.kubectl(&["create", "namespace", "team-c"]);
    plane.kubectl(&["create", "namespace", "envoy-gateway-system"]);
    let eg = std::fs::read_to_string(format!("{EXAMPLES}/virusscanpolicy-envoy-gateway.yaml"))
        .unwrap()
        .replace("namespace: tenant-a", "namespace: team-c");
    let file = policies.path().join("team-c.yaml");
    std::fs::write(&file, eg).unwrap();
    plane.kubectl(&["apply", "-f", file.to_str().unwrap()]);
    let redis = Redis::start_with(RedisOptions {
        tls: true,
        password: Some(ADMIN_PASSWORD.into()),
        ..RedisOptions::default()
    });
    let clamd = Clamd::start();
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let client = plane.client().await;
        let settings = settings(&redis);
        tenants::reconcile(&client, &settings).await.unwrap();

        // The Secret: the tenant's username, a generated password, the CA; owned by the policy.
        let secret = Api::<Secret>::namespaced(client.clone(), "team-a")
            .get(&tenants::secret_name("team-a"))
            .await
            .unwrap();
        let owners = secret.metadata.owner_references.clone().unwrap();
        assert_eq!(owners.len(), 1);
        assert_eq!(
            (owners[0].kind.as_str(), owners[0].name.as_str()),
            ("VirusScanPolicy", "gateway")
        );
        let data = secret.data.clone().unwrap();
        assert_eq!(data[tenants::USERNAME_KEY].0, b"vs-tenant-team-a");
        assert_eq!(data[tenants::PASSWORD_KEY].0.len(), 64);
        assert_eq!(
            data[tenants::CA_KEY].0,
            std::fs::read(redis.ca_file()).unwrap()
        );
        // Envoy Gateway runs team-c's proxies in its namespace: a copy of team-c's Secret is
        // there (none of team-a's, whose gateway is its own Envoy).
        let mut copy_settings = settings.clone();
        copy_settings.envoy_gateway_namespace = Some("envoy-gateway-system".into());
        tenants::reconcile(&client, &copy_settings).await.unwrap();
        let in_eg = Api::<Secret>::namespaced(client.clone(), "envoy-gateway-system");
        let copy = in_eg.get(&tenants::secret_name("team-c")).await.unwrap();
        let own = Api::<Secret>::namespaced(client.clone(), "team-c")
            .get(&tenants::secret_name("team-c"))
            .await
            .unwrap();
        assert_eq!(copy.data, own.data);
        assert!(copy.metadata.owner_references.is_none());
        assert!(
            in_eg
                .get_opt(&tenants::secret_name("team-a"))
                .await
                .unwrap()
                .is_none()
        );
        // A second pass changes nothing.
        tenants::reconcile(&client, &settings).await.unwrap();
        let again = Api::<Secret>::namespaced(client.clone(), "team-a")
            .get(&tenants::secret_name("team-a"))
            .await
            .unwrap();
        assert_eq!(again.data, secret.data);
        assert_eq!(
            again.metadata.resource_version,
            secret.metadata.resource_version
        );
    });

    let stop = consumer(&rt, &redis, &clamd, dir.path());
    rt.block_on(async {
        let client = plane.client().await;
        let a_config = tenant_config(&client, &redis, "team-a", dir.path()).await;
        let a = Producer::connect(a_config.clone()).await.unwrap();
        let deadline = || Instant::now() + Duration::from_secs(30);
        let mut infected = b"--x\r\n".to_vec();
        infected.extend_from_slice(EICAR);
        let v = a
            .submit(&body_task("00a1", infected), deadline())
            .await
            .unwrap();
        assert_eq!(v.status(), VerdictStatus::Infected, "{}", v.detail);
        let v = a
            .submit(&body_task("00a2", clean_bytes(10_000, 1)), deadline())
            .await
            .unwrap();
        assert_eq!(v.status(), VerdictStatus::Clean, "{}", v.detail);

        // With a's credentials: nothing outside a's own scans.
        let mut c = a_config
            .redis
            .client()
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        let p = "{virus-scanner}";
        let cache = format!("{p}:cache:1:{}", "ab".repeat(32));
        let refused: Vec<(&str, redis::Cmd)> = vec![
            (
                "SET cache",
                redis::cmd("SET").arg(&cache).arg("clean").clone(),
            ),
            (
                "XRANGE",
                redis::cmd("XRANGE")
                    .arg(format!("{p}:tasks:team-b:normal"))
                    .arg("-")
                    .arg("+")
                    .clone(),
            ),
            (
                "XREADGROUP",
                redis::cmd("XREADGROUP")
                    .arg("GROUP")
                    .arg("scanners")
                    .arg("x")
                    .arg("STREAMS")
                    .arg(format!("{p}:tasks:team-a:normal"))
                    .arg(">")
                    .clone(),
            ),
            (
                "BLPOP b's verdict",
                redis::cmd("BLPOP")
                    .arg(format!("{p}:verdict:team-b:00b1"))
                    .arg(0.1)
                    .clone(),
            ),
            (
                "XGROUP",
                redis::cmd("XGROUP")
                    .arg("DESTROY")
                    .arg(format!("{p}:tasks:team-b:normal"))
                    .arg("scanners")
                    .clone(),
            ),
            (
                "CONFIG",
                redis::cmd("CONFIG").arg("GET").arg("requirepass").clone(),
            ),
            ("MONITOR", redis::cmd("MONITOR").clone()),
            ("KEYS", redis::cmd("KEYS").arg("*").clone()),
        ];
        for (what, cmd) in refused {
            let r: redis::RedisResult<redis::Value> = cmd.query_async(&mut c).await;
            assert!(
                matches!(&r, Err(e) if e.code() == Some("NOPERM")),
                "{what}: {r:?}"
            );
        }
        // No credentials, and plain TCP.
        let mut anonymous = a_config.clone();
        anonymous.redis.username = None;
        anonymous.redis.password = None;
        assert!(Producer::connect(anonymous).await.is_err());
        let mut plain = a_config.clone();
        plain.redis.url = plain.redis.url.replace("rediss://", "redis://");
        plain.redis.ca_file = None;
        assert!(Producer::connect(plain).await.is_err());

        // Rotation: the Secret deleted, a new password; the old one opens nothing new.
        let secrets = Api::<Secret>::namespaced(client.clone(), "team-a");
        secrets
            .delete(&tenants::secret_name("team-a"), &DeleteParams::default())
            .await
            .unwrap();
        tenants::reconcile(&client, &settings(&redis))
            .await
            .unwrap();
        let rotated = tenant_config(&client, &redis, "team-a", dir.path()).await;
        assert_ne!(rotated.redis.password, a_config.redis.password);
        assert!(Producer::connect(a_config.clone()).await.is_err());
        let a = Producer::connect(rotated).await.unwrap();
        let v = a
            .submit(&body_task("00a3", clean_bytes(10_000, 2)), deadline())
            .await
            .unwrap();
        assert_eq!(v.status(), VerdictStatus::Clean, "{}", v.detail);

        // A namespace without policies loses its user.
        let b_config = tenant_config(&client, &redis, "team-b", dir.path()).await;
        assert!(Producer::connect(b_config.clone()).await.is_ok());
        plane.kubectl(&["delete", "-n", "team-b", "virusscanpolicy", "gateway"]);
        tenants::reconcile(&client, &settings(&redis))
            .await
            .unwrap();
        assert!(Producer::connect(b_config).await.is_err());
    });
    let _ = stop.send(());
    assert!(wait_for(Duration::from_secs(1), || true));
}

/// The bundled Redis's arguments as the chart renders them, with its mounted paths moved
/// into `dir` and its port replaced.
fn chart_redis_args(dir: &std::path::Path, port: u16) -> Vec<String> {
    let helm = virus_scanner_test_support::kube::k8s_bin_dir().join("helm");
    let chart = concat!(env!("CARGO_MANIFEST_DIR"), "/../../charts/virus-scanner");
    let out = virus_scanner_test_support::run_checked(
        std::process::Command::new(helm).args(["template", "vs", chart, "-n", "virus-scanner"]),
        "helm template",
    );
    let objects: Vec<serde_json::Value> =
        serde_saphyr::from_multiple(&String::from_utf8_lossy(&out.stdout)).unwrap();
    let redis = objects
        .iter()
        .find(|o| o["kind"] == "StatefulSet")
        .expect("the chart's Redis");
    let d = dir.display().to_string();
    let mut args: Vec<String> = redis["spec"]["template"]["spec"]["containers"][0]["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            a.as_str()
                .unwrap()
                .replace("/etc/redis/", &format!("{d}/"))
                .replace("/data", &format!("{d}/data"))
        })
        .collect();
    let i = args.iter().position(|a| a == "--tls-port").unwrap();
    args[i + 1] = port.to_string();
    args.extend([
        "--bind".into(),
        "127.0.0.1".into(),
        "--save".into(),
        "".into(),
    ]);
    args
}

#[test]
fn the_bundled_redis_starts_with_the_secrets_the_operator_made_and_serves_tenants() {
    let plane = plane_with_crd();
    plane.kubectl(&["create", "namespace", "virus-scanner"]);
    plane.kubectl(&["create", "namespace", "team-a"]);
    let example = std::fs::read_to_string(format!("{EXAMPLES}/virusscanpolicy.yaml")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("policy.yaml");
    std::fs::write(
        &file,
        example.replace("namespace: tenant-a", "namespace: team-a"),
    )
    .unwrap();
    plane.kubectl(&["apply", "-f", file.to_str().unwrap()]);
    let port = virus_scanner_test_support::free_port();
    let settings = TenantUsers {
        redis: RedisConfig::from_host_port("127.0.0.1", port, true),
        prefix: "virus-scanner".into(),
        ca_file: None,
        consumer: None,
        legacy_queue: "scan_queue".into(),
        legacy_result_prefix: "scan_result:".into(),
        period: Duration::from_secs(1),
        envoy_gateway_namespace: None,
        backbone: Some(tenants::Backbone {
            namespace: "virus-scanner".into(),
            auth_secret: "vs-virus-scanner-redis-auth".into(),
            admin_user: "vs-operator".into(),
            consumer_user: "vs-consumer".into(),
            tls: virus_scan_operator::certs::ManagedCert {
                namespace: "virus-scanner".into(),
                secret_name: "vs-virus-scanner-redis-tls".into(),
                webhook_config_name: String::new(),
                names: vec!["127.0.0.1".into()],
                validity: Duration::from_secs(24 * 3600),
                renew_before: Duration::from_secs(3600),
            },
        }),
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let client = rt.block_on(plane.client());
    // No Redis yet: the pass makes the secrets Redis needs to start, then fails to reach it.
    assert!(rt.block_on(tenants::reconcile(&client, &settings)).is_err());
    let secrets = Api::<Secret>::namespaced(client.clone(), "virus-scanner");
    let get = |name: &str| rt.block_on(secrets.get(name)).unwrap().data.unwrap();
    let (auth, tls) = (
        get("vs-virus-scanner-redis-auth"),
        get("vs-virus-scanner-redis-tls"),
    );
    for (sub, data, keys) in [
        ("tls", &tls, &["tls.crt", "tls.key", "ca.crt"][..]),
        ("acl", &auth, &["users.acl"][..]),
    ] {
        std::fs::create_dir_all(dir.path().join(sub)).unwrap();
        for k in keys {
            std::fs::write(dir.path().join(sub).join(k), &data[*k].0).unwrap();
        }
    }
    std::fs::create_dir_all(dir.path().join("data")).unwrap();
    let mut redis = virus_scanner_test_support::clean_command("redis-server")
        .args(chart_redis_args(dir.path(), port))
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let up = wait_for(Duration::from_secs(10), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        assert!(up, "redis-server did not start with the chart's arguments");
        rt.block_on(async {
            tenants::reconcile(&client, &settings).await.unwrap();
            let ca = dir.path().join("tls/ca.crt");
            let mut a = tenant_config_with_host(&client, "team-a", dir.path(), port).await;
            a.redis.ca_file = Some(ca.clone());
            let producer = Producer::connect(a.clone()).await.unwrap();
            // The consumers' user, with the password the operator made.
            let mut c = RedisConfig::from_host_port("127.0.0.1", port, true);
            c.ca_file = Some(ca.clone());
            c.username = Some("vs-consumer".into());
            c.password = Some(String::from_utf8(auth["consumer-password"].0.clone()).unwrap());
            let mut consumer = virus_scanner_queue::Consumer::connect(QueueConfig::new(c), "c1")
                .await
                .unwrap();
            consumer.ensure_group().await.unwrap();
            let answer = tokio::spawn(async move {
                loop {
                    for d in consumer.claim(Duration::from_millis(200)).await.unwrap() {
                        let v = virus_scanner_protocol::task::Verdict {
                            task_id: d.task.as_ref().unwrap().id.clone(),
                            status: VerdictStatus::Clean as i32,
                            ..Default::default()
                        };
                        consumer.complete(&d, &v, None).await.unwrap();
                    }
                }
            });
            let v = producer
                .submit(
                    &body_task("00d1", b"hello".to_vec()),
                    Instant::now() + Duration::from_secs(10),
                )
                .await
                .unwrap();
            assert_eq!(v.status(), VerdictStatus::Clean);
            answer.abort();
            // The default user is off.
            let mut anonymous = a.clone();
            anonymous.redis.username = None;
            anonymous.redis.password = None;
            assert!(Producer::connect(anonymous).await.is_err());
        });
    }));
    let _ = redis.kill();
    let _ = redis.wait();
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

async fn tenant_config_with_host(
    client: &kube::Client,
    ns: &str,
    dir: &std::path::Path,
    port: u16,
) -> QueueConfig {
    let secret = Api::<Secret>::namespaced(client.clone(), ns)
        .get(&tenants::secret_name(ns))
        .await
        .unwrap();
    let data = secret.data.unwrap();
    let field = |k: &str| String::from_utf8(data[k].0.clone()).unwrap();
    let ca = dir.join(format!("{ns}-ca.crt"));
    std::fs::write(&ca, &data[tenants::CA_KEY].0).unwrap();
    let mut r = RedisConfig::from_host_port("127.0.0.1", port, true);
    r.username = Some(field(tenants::USERNAME_KEY));
    r.password = Some(field(tenants::PASSWORD_KEY));
    r.ca_file = Some(ca);
    let mut q = QueueConfig::new(r);
    q.tenant = ns.into();
    q
}
