//! The whole stack for the producer's tests: redis-server, clamd, the consumer (in
//! process), the producer binary, an upstream and a real Envoy, all on loopback.
#![allow(clippy::unwrap_used, dead_code)]

use std::path::{Path, PathBuf};

use virus_scanner_test_support::{
    BodyMode, Clamd, ClamdOptions, Envoy, EnvoyOptions, Processor, ProducerProcess, Redis,
    RedisOptions, ServiceProcess, Upstream,
};

pub struct StackOptions {
    pub mode: BodyMode,
    pub producer_args: Vec<String>,
    pub consumer_args: Vec<String>,
    pub clamd: ClamdOptions,
    pub unix_socket: bool,
    /// False: the producer spills into a directory of its own, which the consumer cannot
    /// open (a pod-local spool), and runs with `SPOOL_SHARED=false`.
    pub spool_shared: bool,
    /// Environment of the producer process (settings read from the environment only).
    pub producer_env: Vec<(String, String)>,
    /// The producer gets a spool of its own that the consumer cannot open, and whether it
    /// shares one is left to `producer_env` (as an injected sidecar's env says it).
    pub own_spool: bool,
    /// Envoy's listener and route buffer limit, instead of the mode's default.
    pub envoy_buffer_limit: Option<u64>,
}

impl StackOptions {
    pub fn new(mode: BodyMode) -> StackOptions {
        StackOptions {
            mode,
            producer_args: Vec::new(),
            consumer_args: Vec::new(),
            clamd: ClamdOptions::default(),
            unix_socket: false,
            spool_shared: true,
            producer_env: Vec::new(),
            own_spool: false,
            envoy_buffer_limit: None,
        }
    }
}

pub struct Consumer {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), virus_scanner_consumer::RunError>>>,
}

pub struct Stack {
    pub rt: tokio::runtime::Runtime,
    pub redis: Redis,
    pub clamd: Clamd,
    pub scan_dir: tempfile::TempDir,
    /// The producer's own spool, when it shares none with the consumer.
    pub producer_spool: Option<tempfile::TempDir>,
    pub upstream: Upstream,
    pub producer: ServiceProcess,
    pub producer_http: u16,
    pub icap_port: u16,
    pub envoy: Envoy,
    pub consumer: Option<Consumer>,
    consumer_args: Vec<String>,
}

impl Stack {
    pub fn start(options: StackOptions) -> Stack {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let redis = Redis::start_with(RedisOptions {
            persistent: true,
            ..RedisOptions::default()
        });
        let clamd = Clamd::start_with(options.clamd.clone());
        let scan_dir = tempfile::Builder::new()
            .prefix("vs-scan-")
            .tempdir()
            .unwrap();
        let upstream = Upstream::start();
        let socket = scan_dir.path().with_extension("sock");
        let mut extra = Vec::new();
        if options.unix_socket {
            extra.push("--grpc-socket".into());
            extra.push(socket.display().to_string());
        }
        if !options.spool_shared {
            extra.extend(["--spool-shared".into(), "false".into()]);
        }
        let producer_spool = (!options.spool_shared || options.own_spool).then(|| {
            tempfile::Builder::new()
                .prefix("vs-producer-spool-")
                .tempdir()
                .unwrap()
        });
        extra.extend(options.producer_args.iter().cloned());
        let env: Vec<(&str, String)> = options
            .producer_env
            .iter()
            .map(|(k, v)| (k.as_str(), v.clone()))
            .collect();
        let ProducerProcess {
            process: producer,
            grpc,
            http,
            icap,
        } = ProducerProcess::start(
            Path::new(env!("CARGO_BIN_EXE_virus-scanner-producer")),
            redis.port(),
            producer_spool
                .as_ref()
                .map_or(scan_dir.path(), |d| d.path()),
            &extra,
            &env,
        );
        let processor = if options.unix_socket {
            Processor::Unix(socket)
        } else {
            Processor::Tcp(grpc)
        };
        let mut envoy_options = EnvoyOptions::new(processor, upstream.port(), options.mode);
        if let Some(limit) = options.envoy_buffer_limit {
            envoy_options.buffer_limit = limit;
        }
        let envoy = Envoy::start(&envoy_options);
        let mut stack = Stack {
            rt,
            redis,
            clamd,
            scan_dir,
            producer_spool,
            upstream,
            producer,
            producer_http: http,
            icap_port: icap,
            envoy,
            consumer: None,
            consumer_args: options.consumer_args,
        };
        stack.start_consumer();
        stack
    }

    pub fn start_consumer(&mut self) {
        let mut argv: Vec<String> = [
            "virus-scanner-handler",
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
            "5",
            "--log-format",
            "text",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        argv.extend(self.consumer_args.iter().cloned());
        // Flags only: the environment of the test process is not the consumer's.
        let no_env: &[(&str, &str)] = &[];
        let args: virus_scanner_consumer::ConsumerArgs =
            virus_scanner_runtime::env::parse_from(argv, no_env).unwrap();
        let config = args.validate().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = self
            .rt
            .spawn(virus_scanner_consumer::run(config, async move {
                let _ = rx.await;
            }));
        self.consumer = Some(Consumer {
            stop: Some(tx),
            task: Some(task),
        });
    }

    pub fn stop_consumer(&mut self) {
        if let Some(mut c) = self.consumer.take() {
            if let Some(tx) = c.stop.take() {
                let _ = tx.send(());
            }
            if let Some(task) = c.task.take() {
                self.rt.block_on(task).unwrap().unwrap();
            }
        }
    }

    /// The upload answered by `reply` passed: 200, and it is the one body the upstream
    /// received, byte for byte.
    pub fn assert_only_delivery(&self, reply: &Reply, bytes: &[u8]) {
        assert_eq!(
            reply.status,
            200,
            "{}",
            String::from_utf8_lossy(&reply.body)
        );
        let got = self.upstream.received();
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!(
            (got[0].len, got[0].sha256.clone()),
            (bytes.len() as u64, sha256_hex(bytes))
        );
    }

    /// Files left in the scan directory and the producer's own spool: anything but the
    /// tenant directories the producers spill into, and anything in those.
    pub fn leftovers(&self) -> Vec<PathBuf> {
        std::iter::once(self.scan_dir.path())
            .chain(self.producer_spool.as_ref().map(|d| d.path()))
            .flat_map(|dir| std::fs::read_dir(dir).unwrap())
            .map(|e| e.unwrap().path())
            .flat_map(|p| {
                if p.symlink_metadata().unwrap().is_dir() {
                    std::fs::read_dir(&p)
                        .unwrap()
                        .map(|e| e.unwrap().path())
                        .collect()
                } else {
                    vec![p]
                }
            })
            .collect()
    }

    /// The directory the producer spills into (the default tenant's), as the consumer sees it.
    pub fn spill_dir(&self) -> PathBuf {
        self.scan_dir.path().join("default")
    }

    /// Keys in Redis that match `pattern`.
    pub fn redis_keys(&self, pattern: &str) -> Vec<String> {
        self.rt.block_on(async {
            let client = redis::Client::open(self.redis.url()).unwrap();
            let mut conn = client.get_multiplexed_async_connection().await.unwrap();
            redis::cmd("KEYS")
                .arg(pattern)
                .query_async(&mut conn)
                .await
                .unwrap()
        })
    }

    pub fn producer_metric(&self, name: &str) -> f64 {
        virus_scanner_test_support::metric(self.producer_http, name)
    }

    /// Peak resident memory of the producer process, in bytes.
    pub fn producer_peak_rss(&self) -> u64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.producer.pid())).unwrap();
        status
            .lines()
            .find(|l| l.starts_with("VmHWM:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<u64>().ok())
            .unwrap()
            * 1024
    }

    pub fn url(&self, path: &str) -> String {
        self.envoy.url(path)
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        self.stop_consumer();
        if std::thread::panicking() {
            eprintln!(
                "{}\n--- envoy log ---\n{}",
                self.producer.log_tail(),
                self.envoy.log_tail()
            );
        }
    }
}

/// What curl saw.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    /// Header lines, names in lower case.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// curl's own complaints (connection reset, timeout).
    pub error: String,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }
}

/// Runs curl with `args`; returns status, headers and body.
pub fn curl(args: &[&str]) -> Reply {
    let dir = tempfile::tempdir().unwrap();
    let body = dir.path().join("body");
    let headers = dir.path().join("headers");
    let out = virus_scanner_test_support::clean_command("curl")
        .args(["-sS", "--max-time", "300", "-o"])
        .arg(&body)
        .arg("-D")
        .arg(&headers)
        .args(["-w", "%{http_code}"])
        .args(args)
        .output()
        .expect("curl is installed by make test");
    let status = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(0);
    let headers = std::fs::read_to_string(&headers)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Reply {
        status,
        headers,
        body: std::fs::read(&body).unwrap_or_default(),
        error: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// POSTs the file's bytes, streamed from disk.
pub fn post_file(url: &str, file: &Path, extra: &[&str]) -> Reply {
    let data = file.display().to_string();
    let mut args = vec![
        "-X",
        "POST",
        "-T",
        &data,
        "-H",
        "Content-Type: application/octet-stream",
    ];
    args.extend_from_slice(extra);
    args.push(url);
    curl(&args)
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

/// Writes `bytes` to a temp file for curl.
pub fn temp_file(dir: &tempfile::TempDir, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.path().join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}
