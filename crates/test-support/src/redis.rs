use std::path::PathBuf;
use std::process::Child;
use std::time::Duration;

use crate::process::{
    clean_command, free_port, log_tail, port_open, require_binary, spawn, stop, wait_for,
};

#[derive(Debug, Clone, Default)]
pub struct RedisOptions {
    pub password: Option<String>,
    /// Append-only file with fsync on every write, so that a restart keeps the queue.
    pub persistent: bool,
    /// Serve TLS only, with a certificate for 127.0.0.1 from a CA made for the test.
    pub tls: bool,
}

/// A private `redis-server` on 127.0.0.1.
pub struct Redis {
    child: Option<Child>,
    port: u16,
    options: RedisOptions,
    dir: tempfile::TempDir,
}

impl Redis {
    pub fn start() -> Redis {
        Redis::start_with(RedisOptions::default())
    }

    pub fn start_with(options: RedisOptions) -> Redis {
        require_binary("redis-server", "redis-server");
        let dir = tempfile::Builder::new()
            .prefix("vs-redis-")
            .tempdir()
            .expect("temp dir");
        let mut redis = Redis {
            child: None,
            port: 0,
            options,
            dir,
        };
        for _ in 0..5 {
            redis.port = free_port();
            if redis.launch() {
                return redis;
            }
        }
        panic!(
            "redis-server did not start:\n{}",
            log_tail(&redis.log_path())
        );
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("redis.log")
    }

    fn launch(&mut self) -> bool {
        let mut cmd = clean_command("redis-server");
        if self.options.tls {
            self.make_certificates();
            let d = self.dir.path();
            cmd.args(["--port", "0", "--tls-port"])
                .arg(self.port.to_string())
                .arg("--tls-cert-file")
                .arg(d.join("server.crt"))
                .arg("--tls-key-file")
                .arg(d.join("server.key"))
                .arg("--tls-ca-cert-file")
                .arg(d.join("ca.crt"))
                .args(["--tls-auth-clients", "no"]);
        } else {
            cmd.arg("--port").arg(self.port.to_string());
        }
        cmd.args(["--bind", "127.0.0.1", "--save", "", "--daemonize", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .arg("--logfile")
            .arg(self.log_path());
        if self.options.persistent {
            cmd.args(["--appendonly", "yes", "--appendfsync", "always"]);
        } else {
            cmd.args(["--appendonly", "no"]);
        }
        if let Some(password) = &self.options.password {
            cmd.arg("--requirepass").arg(password);
        }
        let mut child = spawn(&mut cmd, "redis-server");
        let port = self.port;
        let up = wait_for(Duration::from_secs(10), || {
            matches!(child.try_wait(), Ok(None)) && port_open(port)
        });
        if !up {
            stop(&mut child, Duration::from_secs(1));
            return false;
        }
        self.child = Some(child);
        true
    }

    /// The server's process id (0 when stopped), for CPU accounting.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn host(&self) -> &'static str {
        "127.0.0.1"
    }

    /// `redis[s]://[:password@]127.0.0.1:port/`
    pub fn url(&self) -> String {
        let scheme = if self.options.tls { "rediss" } else { "redis" };
        match &self.options.password {
            Some(p) => format!("{scheme}://:{p}@127.0.0.1:{}/", self.port),
            None => format!("{scheme}://127.0.0.1:{}/", self.port),
        }
    }

    /// The CA that signed the server certificate (TLS only).
    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join("ca.crt")
    }

    /// A CA and a server certificate for 127.0.0.1.
    fn make_certificates(&self) {
        let d = self.dir.path();
        if !d.join("server.crt").is_file() {
            crate::certs::issue(d, "server", "/CN=127.0.0.1", Some("127.0.0.1"));
        }
    }

    /// Stops the server (SIGTERM; with persistence the queue is kept on disk).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            stop(&mut child, Duration::from_secs(5));
        }
    }

    /// Starts the server again on the same port.
    pub fn restart(&mut self) {
        self.stop();
        assert!(
            wait_for(Duration::from_secs(5), || !port_open(self.port)),
            "redis port still open"
        );
        assert!(
            self.launch(),
            "redis-server did not restart:\n{}",
            log_tail(&self.log_path())
        );
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
    }
}
