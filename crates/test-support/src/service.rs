use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::process::{clean_command, log_tail, stop};

/// One of the project's own binaries, started for a test, killed on drop. Its stderr goes to
/// a log file that a failing test prints.
pub struct ServiceProcess {
    child: Option<Child>,
    name: String,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl ServiceProcess {
    pub fn spawn(binary: &Path, args: &[String], env: &[(&str, String)]) -> ServiceProcess {
        let name = binary
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let dir = tempfile::Builder::new()
            .prefix("vs-svc-")
            .tempdir()
            .expect("temp dir");
        let log = dir.path().join(format!("{name}.log"));
        let log_file = std::fs::File::create(&log).expect("log file");
        let mut cmd = clean_command(binary);
        cmd.args(args)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", binary.display()));
        ServiceProcess {
            child: Some(child),
            name,
            log,
            _dir: dir,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// The last lines of its log.
    pub fn log_tail(&self) -> String {
        format!("--- {} log ---\n{}", self.name, log_tail(&self.log))
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL: no chance to clean up, as in a node failure or OOM kill.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends SIGTERM without waiting.
    pub fn terminate(&self) {
        self.signal("TERM");
    }

    /// SIGSTOP: the process is frozen where it stands (it can neither finish nor acknowledge
    /// anything) until `resume`, so a test can look at what it holds at one instant.
    pub fn pause(&self) {
        self.signal("STOP");
    }

    /// SIGCONT after `pause`.
    pub fn resume(&self) {
        self.signal("CONT");
    }

    fn signal(&self, name: &str) {
        if let Some(child) = &self.child {
            let status = Command::new("kill")
                .args([&format!("-{name}"), &child.id().to_string()])
                .status();
            assert!(
                status.is_ok_and(|s| s.success()),
                "cannot send SIG{name} to {}",
                self.name
            );
        }
    }

    /// Waits for the process to exit by itself.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        let child = self.child.as_mut()?;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// Waits for the log line that contains `message` and returns the value of each of `keys`
    /// on it (`key=value`, as the text log format writes fields). Services started on port 0
    /// report the addresses they bound this way: no window in which another process can take
    /// a port picked in advance. Panics with the log if the process exits or `limit` passes.
    pub fn wait_for_fields(
        &mut self,
        message: &str,
        keys: &[&str],
        limit: Duration,
    ) -> Vec<String> {
        let deadline = Instant::now() + limit;
        loop {
            let text = self.log();
            if let Some(line) = text.lines().find(|l| l.contains(message)) {
                return keys
                    .iter()
                    .map(|k| {
                        log_field(line, k)
                            .unwrap_or_else(|| panic!("no {k}= on the log line: {line}"))
                    })
                    .collect();
            }
            if !self.is_running() || Instant::now() > deadline {
                panic!(
                    "{} never logged \"{message}\"\n{}",
                    self.name,
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }
}

impl Drop for ServiceProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            stop(&mut child, Duration::from_secs(5));
        }
        if std::thread::panicking() {
            eprintln!("{}", self.log_tail());
        }
    }
}

/// `virus-scanner-producer` on loopback port 0 (gRPC, HTTP, ICAP), ready, with the ports it
/// bound.
pub struct ProducerProcess {
    pub process: ServiceProcess,
    pub grpc: u16,
    pub http: u16,
    pub icap: u16,
}

impl ProducerProcess {
    /// Starts `binary` against Redis on `redis_port`, spilling into `scan_dir`, with `extra`
    /// flags; panics with its log if it does not become ready.
    pub fn start(
        binary: &Path,
        redis_port: u16,
        scan_dir: &Path,
        extra: &[String],
        env: &[(&str, String)],
    ) -> ProducerProcess {
        let mut args: Vec<String> = [
            "--redis-host",
            "127.0.0.1",
            "--redis-port",
            &redis_port.to_string(),
            "--grpc-addr",
            "127.0.0.1:0",
            "--http-addr",
            "127.0.0.1:0",
            "--icap-addr",
            "127.0.0.1:0",
            "--scan-tmp-dir",
            &scan_dir.display().to_string(),
            "--log-format",
            "text",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(extra.iter().cloned());
        let mut process = ServiceProcess::spawn(binary, &args, env);
        let bound = process.wait_for_fields(
            "producer started",
            &["grpc", "http", "icap"],
            Duration::from_secs(20),
        );
        let [grpc, http] = [0, 1].map(|i| port_of(&bound[i]));
        // 0: the producer serves no ICAP (`ICAP_ENABLED=false`).
        let icap = if bound[2] == "off" {
            0
        } else {
            port_of(&bound[2])
        };
        assert!(
            crate::wait_for(Duration::from_secs(20), || {
                http_get(http, "/ready").is_some_and(|(s, _)| s == 200)
            }),
            "producer not ready\n{}",
            process.log_tail()
        );
        ProducerProcess {
            process,
            grpc,
            http,
            icap,
        }
    }
}

/// The value of `key=value` on a text log line, or `None`.
pub fn log_field(line: &str, key: &str) -> Option<String> {
    line.split_whitespace()
        .find_map(|token| token.strip_prefix(key)?.strip_prefix('='))
        .map(|v| v.trim_matches('"').to_owned())
}

/// The port of a `host:port` address.
pub fn port_of(address: &str) -> u16 {
    address
        .rsplit_once(':')
        .and_then(|(_, p)| p.parse().ok())
        .unwrap_or_else(|| panic!("not an address with a port: {address}"))
}

/// A plain HTTP/1.1 GET on loopback: status code and body.
pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).ok()?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text.split(' ').nth(1)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned())?;
    Some((status, body))
}

/// Sum of the samples whose line starts with `name` (labels included) on a Prometheus
/// `/metrics` page.
pub fn metric(port: u16, name: &str) -> f64 {
    let (_, body) = http_get(port, "/metrics").expect("metrics endpoint answers");
    body.lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_are_read_from_a_text_log_line() {
        let line = "2026-01-01T00:00:00Z  INFO virus_scanner_producer: producer started \
                    grpc=127.0.0.1:41000 grpc_socket=None http=127.0.0.1:41001 name=\"a\"";
        assert_eq!(log_field(line, "grpc").as_deref(), Some("127.0.0.1:41000"));
        assert_eq!(log_field(line, "grpc_socket").as_deref(), Some("None"));
        assert_eq!(log_field(line, "name").as_deref(), Some("a"));
        assert_eq!(log_field(line, "icap"), None);
        assert_eq!(port_of("127.0.0.1:41001"), 41001);
        assert_eq!(port_of("[::1]:8080"), 8080);
    }
}
