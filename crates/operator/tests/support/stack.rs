//! The scan path in front of a real Envoy: the producer and the consumer in process (Redis
//! and clamd from the test harness), Envoy on a bootstrap file, and curl as the client.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use virus_scanner_test_support::{
    Clamd, Redis, ServiceProcess, envoy_binary, http_get, port_of, wait_for,
};

/// The producer and the consumer, in process, on one runtime; stopped on drop.
pub struct Scanner {
    rt: tokio::runtime::Runtime,
    stops: Vec<tokio::sync::oneshot::Sender<()>>,
    tasks: Vec<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl Scanner {
    pub fn start(redis: &Redis, clamd: &Clamd, scan_dir: &Path, socket: &Path) -> Scanner {
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
        scanner.spawn(|stop| async move {
            virus_scanner_consumer::run(consumer, stop)
                .await
                .map_err(anyhow::Error::from)
        });
        scanner.spawn(|stop| async move {
            virus_scanner_producer::run(producer, stop)
                .await
                .map_err(anyhow::Error::from)
        });
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

impl Scanner {
    /// Runs a service until the scanner is dropped; `service` gets the future that resolves
    /// then.
    fn spawn<F, Fut>(&mut self, service: F)
    where
        F: FnOnce(std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>) -> Fut,
        Fut: std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let stop = Box::pin(async move {
            let _ = rx.await;
        });
        self.tasks.push(self.rt.spawn(service(stop)));
        self.stops.push(tx);
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
pub struct Gateway {
    pub process: ServiceProcess,
    pub admin: u16,
    pub port: u16,
}

impl Gateway {
    /// Envoy with the listener named `gateway`.
    pub fn start(bootstrap: &Path, dir: &Path) -> Gateway {
        Gateway::start_listener(bootstrap, dir, "gateway")
    }

    /// Envoy, the port of listener `listener` read back.
    pub fn start_listener(bootstrap: &Path, dir: &Path, listener: &str) -> Gateway {
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
        // `<name>::127.0.0.1:<port>`, one line per listener.
        let (_, listeners) = http_get(admin, "/listeners").unwrap();
        let prefix = format!("{listener}::");
        let address = listeners
            .lines()
            .find_map(|l| l.trim().strip_prefix(prefix.as_str()))
            .unwrap_or_else(|| panic!("no listener {listener}: {listeners}"));
        Gateway {
            process,
            admin,
            port: port_of(address),
        }
    }

    /// ext_proc streams Envoy opened: one per request the filter saw.
    pub fn scanned_requests(&self) -> u64 {
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
pub fn post(gateway: &Gateway, path: &str, file: &Path, extra: &[&str]) -> (u16, String) {
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

/// A GET through the gateway: the status and the body.
pub fn get(gateway: &Gateway, path: &str) -> (u16, Vec<u8>) {
    let dir = tempfile::tempdir().unwrap();
    let body = dir.path().join("body");
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "60", "--path-as-is", "-o"])
        .arg(&body)
        .args(["-w", "%{http_code}"])
        .arg(format!("http://127.0.0.1:{}{path}", gateway.port))
        .output()
        .expect("curl is installed by make test");
    let status = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(0);
    (status, std::fs::read(&body).unwrap_or_default())
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}
