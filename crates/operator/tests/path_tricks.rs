//! A bootstrap merged by the operator, run by a real Envoy in front of the real producer,
//! Redis, consumer and clamd: a path that only looks like an opted-out route (dot segments,
//! their percent-encoded forms, doubled or escaped slashes) is routed by what it resolves
//! to, so an infected upload sent that way is scanned and refused, never delivered.
#![allow(clippy::unwrap_used)]

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use virus_scanner_test_support::{
    Clamd, EICAR, Redis, ServiceProcess, Upstream, clean_bytes, envoy_binary, http_get, port_of,
    wait_for,
};

const POLICY: &str = r#"apiVersion: virusscan.aether-platform.io/v1alpha1
kind: VirusScanPolicy
metadata: { name: gateway, namespace: tenant-a }
spec:
  selector: { matchLabels: { app: gateway } }
  routes:
  - { name: static, pathPrefix: /static/ }
  producer: { transport: UnixSocket }
"#;

/// The tenant's gateway: `/static/` and everything else go to the same backend; the policy
/// opts `/static/` out of scanning. Ports are bound by Envoy (0) and read back from it.
fn tenant_bootstrap(upstream_port: u16) -> String {
    format!(
        r#"admin:
  address: {{ socket_address: {{ address: 127.0.0.1, port_value: 0 }} }}
static_resources:
  listeners:
  - name: gateway
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: 0 }} }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: gateway
          route_config:
            virtual_hosts:
            - name: app
              domains: ["*"]
              routes:
              - match: {{ prefix: /static/ }}
                route: {{ cluster: app }}
              - match: {{ prefix: / }}
                route: {{ cluster: app }}
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
  - name: app
    type: STATIC
    connect_timeout: 2s
    load_assignment:
      cluster_name: app
      endpoints: [{{ lb_endpoints: [{{ endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {upstream_port} }} }} }} }}] }}]
"#
    )
}

/// The producer and the consumer, in process, on one runtime; stopped on drop.
struct Scanner {
    rt: tokio::runtime::Runtime,
    stops: Vec<tokio::sync::oneshot::Sender<()>>,
    tasks: Vec<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl Scanner {
    fn start(redis: &Redis, clamd: &Clamd, scan_dir: &Path, socket: &Path) -> Scanner {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let redis_port = redis.port().to_string();
        let scan_dir = scan_dir.display().to_string();
        let consumer = <virus_scanner_consumer::ConsumerArgs as clap::Parser>::parse_from([
            "virus-scanner-handler",
            "--redis-host",
            "127.0.0.1",
            "--redis-port",
            &redis_port,
            "--clamd-address",
            &clamd.address(),
            "--scan-tmp-dir",
            &scan_dir,
            "--metrics-addr",
            "127.0.0.1:0",
            "--log-format",
            "text",
        ])
        .validate()
        .unwrap();
        let producer = <virus_scanner_producer::ProducerArgs as clap::Parser>::parse_from([
            "virus-scanner-producer",
            "--redis-host",
            "127.0.0.1",
            "--redis-port",
            &redis_port,
            "--grpc-addr",
            "127.0.0.1:0",
            "--grpc-socket",
            &socket.display().to_string(),
            "--http-addr",
            "127.0.0.1:0",
            "--icap-addr",
            "127.0.0.1:0",
            "--scan-tmp-dir",
            &scan_dir,
            "--log-format",
            "text",
        ])
        .validate()
        .unwrap();
        let mut scanner = Scanner {
            rt,
            stops: Vec::new(),
            tasks: Vec::new(),
        };
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = scanner.rt.spawn(async move {
            let stop = async move {
                let _ = rx.await;
            };
            virus_scanner_consumer::run(consumer, stop)
                .await
                .map_err(anyhow::Error::from)
        });
        scanner.stops.push(tx);
        scanner.tasks.push(task);
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = scanner.rt.spawn(async move {
            let stop = async move {
                let _ = rx.await;
            };
            virus_scanner_producer::run(producer, stop)
                .await
                .map_err(anyhow::Error::from)
        });
        scanner.stops.push(tx);
        scanner.tasks.push(task);
        // The producer binds its socket once it reached Redis.
        assert!(
            wait_for(Duration::from_secs(20), || {
                std::os::unix::net::UnixStream::connect(socket).is_ok()
            }),
            "the producer never served {}",
            socket.display()
        );
        scanner
    }
}

impl Drop for Scanner {
    fn drop(&mut self) {
        for stop in self.stops.drain(..) {
            let _ = stop.send(());
        }
        for task in self.tasks.drain(..) {
            let _ = self.rt.block_on(task);
        }
    }
}

/// Envoy on a bootstrap file; the admin and listener ports it bound are read back.
struct Gateway {
    process: ServiceProcess,
    admin: u16,
    port: u16,
}

impl Gateway {
    fn start(bootstrap: &Path, dir: &Path) -> Gateway {
        let admin_file = dir.join("admin-address");
        let process = ServiceProcess::spawn(
            &envoy_binary(),
            &[
                "-c".into(),
                bootstrap.display().to_string(),
                "--disable-hot-restart".into(),
                "--concurrency".into(),
                "1".into(),
                "-l".into(),
                "warning".into(),
                "--admin-address-path".into(),
                admin_file.display().to_string(),
            ],
            &[],
        );
        let mut admin = 0;
        let up = wait_for(Duration::from_secs(30), || {
            admin = std::fs::read_to_string(&admin_file)
                .ok()
                .filter(|a| a.contains(':'))
                .map_or(0, |a| port_of(a.trim()));
            admin != 0 && http_get(admin, "/ready").is_some_and(|(s, _)| s == 200)
        });
        assert!(up, "envoy did not start\n{}", process.log_tail());
        // `gateway::127.0.0.1:<port>`, one line per listener.
        let (_, listeners) = http_get(admin, "/listeners").unwrap();
        let address = listeners
            .lines()
            .find_map(|l| l.trim().strip_prefix("gateway::"))
            .unwrap_or_else(|| panic!("no gateway listener: {listeners}"));
        Gateway {
            process,
            admin,
            port: port_of(address),
        }
    }

    /// ext_proc streams Envoy opened: one per request the filter saw.
    fn scanned_requests(&self) -> u64 {
        let (_, stats) = http_get(self.admin, "/stats?filter=ext_proc.streams_started").unwrap();
        stats
            .lines()
            .filter_map(|l| l.split_once(": "))
            .filter(|(name, _)| name.ends_with("ext_proc.streams_started"))
            .filter_map(|(_, v)| v.trim().parse::<u64>().ok())
            .sum()
    }
}

/// curl with the path exactly as written (`--path-as-is`), the body from `file`; returns
/// the status and the response headers.
fn post(gateway: &Gateway, path: &str, file: &Path, extra: &[&str]) -> (u16, String) {
    let dir = tempfile::tempdir().unwrap();
    let headers = dir.path().join("headers");
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "60", "--path-as-is", "-o", "/dev/null"])
        .arg("-D")
        .arg(&headers)
        .args([
            "-w",
            "%{http_code}",
            "-H",
            "Content-Type: application/octet-stream",
        ])
        .arg("--data-binary")
        .arg(format!("@{}", file.display()))
        .args(extra)
        .arg(format!("http://127.0.0.1:{}{path}", gateway.port))
        .output()
        .expect("curl is installed by make test");
    let status = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(0);
    (
        status,
        std::fs::read_to_string(&headers).unwrap_or_default(),
    )
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

/// The operator's offline merge (the controller's `bootstrap::merge`), with the producer's
/// socket moved to where this test's producer listens.
fn merged_bootstrap(dir: &Path, upstream_port: u16, socket: &Path) -> PathBuf {
    let policy = dir.join("policy.yaml");
    std::fs::write(&policy, POLICY).unwrap();
    let tenant = dir.join("tenant.yaml");
    std::fs::write(&tenant, tenant_bootstrap(upstream_port)).unwrap();
    let out = virus_scanner_test_support::run_checked(
        Command::new(support::operator_binary())
            .args(["envoy-config", "-f"])
            .arg(&policy)
            .arg("--bootstrap")
            .arg(&tenant),
        "virus-scan-operator envoy-config --bootstrap",
    );
    let mut merged: Value = serde_saphyr::from_str(&String::from_utf8_lossy(&out.stdout)).unwrap();
    let clusters = merged["static_resources"]["clusters"]
        .as_array_mut()
        .unwrap();
    let producer = clusters
        .iter_mut()
        .find(|c| c["name"] == virus_scan_operator::envoy::PRODUCER_CLUSTER)
        .unwrap();
    let pipe = &mut producer["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
        ["pipe"]["path"];
    assert_eq!(*pipe, virus_scan_operator::envoy::SOCKET_PATH);
    *pipe = Value::from(socket.display().to_string());
    let file = dir.join("envoy.yaml");
    std::fs::write(&file, virus_scan_operator::envoy::to_yaml(&merged).unwrap()).unwrap();
    file
}

#[test]
fn opted_out_prefix_cannot_be_reached_by_path_tricks() {
    let redis = Redis::start();
    let clamd = Clamd::start();
    let upstream = Upstream::start();
    let dir = tempfile::Builder::new()
        .prefix("vs-path-tricks-")
        .tempdir()
        .unwrap();
    let scan_dir = dir.path().join("scan");
    std::fs::create_dir_all(&scan_dir).unwrap();
    let socket = dir.path().join("producer.sock");
    let _scanner = Scanner::start(&redis, &clamd, &scan_dir, &socket);
    let bootstrap = merged_bootstrap(dir.path(), upstream.port(), &socket);
    let gateway = Gateway::start(&bootstrap, dir.path());
    let context = || {
        format!(
            "{}\nbootstrap: {}",
            gateway.process.log_tail(),
            bootstrap.display()
        )
    };

    let eicar = dir.path().join("eicar");
    std::fs::write(&eicar, EICAR).unwrap();
    let upload = clean_bytes(4096, 1);
    let upload_file = dir.path().join("upload");
    std::fs::write(&upload_file, &upload).unwrap();
    let asset = clean_bytes(4096, 2);
    let asset_file = dir.path().join("asset");
    std::fs::write(&asset_file, &asset).unwrap();

    // A clean upload is scanned and delivered intact.
    let scanned = gateway.scanned_requests();
    let (status, _) = post(&gateway, "/upload", &upload_file, &[]);
    assert_eq!(status, 200, "{}", context());
    assert_eq!(gateway.scanned_requests(), scanned + 1);

    // The opted-out prefix still passes, unscanned.
    let (status, _) = post(&gateway, "/static/file", &asset_file, &[]);
    assert_eq!(status, 200, "{}", context());
    assert_eq!(
        gateway.scanned_requests(),
        scanned + 1,
        "/static/file was scanned"
    );

    // Dot segments, encoded or not, and doubled slashes resolve to /upload: scanned, 406.
    for path in [
        "/static/../upload",
        "/static/./../upload",
        "/static/%2e%2e/upload",
        "/static/%2E%2E/upload",
        "/static/.%2e/upload",
        "//static/../upload",
        "/STATIC/../upload",
    ] {
        let (status, _) = post(&gateway, path, &eicar, &[]);
        assert_eq!(status, 406, "{path}: {}", context());
    }
    // An escaped slash or backslash is answered with a redirect to the path it stands for,
    // which is then routed, and scanned, as what it is.
    for path in [
        "/static%2F..%2Fupload",
        "/static/..%2Fupload",
        "/static/..%2fupload",
        "/static/%2e%2e%2fupload",
        "/static/..%5Cupload",
    ] {
        let (status, headers) = post(&gateway, path, &eicar, &[]);
        assert!(
            (300..400).contains(&status),
            "{path}: {status}\n{headers}\n{}",
            context()
        );
        let (status, _) = post(&gateway, path, &eicar, &["-L", "--post301", "--post302"]);
        assert_eq!(status, 406, "{path}, redirect followed: {}", context());
    }

    let received = upstream.received();
    let eicar_sha = sha256_hex(EICAR);
    assert!(
        received.iter().all(|r| r.sha256 != eicar_sha),
        "an infected body reached the upstream: {received:?}"
    );
    let got: Vec<(&str, &str)> = received
        .iter()
        .map(|r| (r.path.as_str(), r.sha256.as_str()))
        .collect();
    assert_eq!(
        got,
        [
            ("/upload", sha256_hex(&upload).as_str()),
            ("/static/file", sha256_hex(&asset).as_str())
        ]
    );
}
