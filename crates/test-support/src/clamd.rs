use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::process::{clean_command, free_port, log_tail, require_binary, spawn, stop, wait_for};

/// A private `clamd` on 127.0.0.1 with the repository's test signatures
/// (`testdata/clamav`), packed into a versioned `daily.cud` so that clamd's `VERSION`
/// reports a database version the way it does with the official database.
pub struct Clamd {
    child: Option<Child>,
    port: u16,
    options: ClamdOptions,
    dir: tempfile::TempDir,
}

#[derive(Debug, Clone)]
pub struct ClamdOptions {
    pub db_version: u32,
    /// clamd's StreamMaxLength, e.g. `120M`.
    pub stream_max_length: String,
    /// clamd's MaxFileSize and MaxScanSize.
    pub max_file_size: String,
}

impl Default for ClamdOptions {
    fn default() -> Self {
        ClamdOptions {
            db_version: 1000,
            stream_max_length: "120M".into(),
            max_file_size: "100M".into(),
        }
    }
}

impl Clamd {
    pub fn start() -> Clamd {
        Clamd::start_with(ClamdOptions::default())
    }

    pub fn start_with(options: ClamdOptions) -> Clamd {
        require_binary("clamd", "clamav-daemon");
        require_binary("sigtool", "clamav");
        let dir = tempfile::Builder::new()
            .prefix("vs-clamd-")
            .tempdir()
            .expect("temp dir");
        std::fs::create_dir_all(dir.path().join("db")).expect("db dir");
        std::fs::create_dir_all(dir.path().join("tmp")).expect("tmp dir");
        build_database(&dir.path().join("db"), options.db_version);
        let mut clamd = Clamd {
            child: None,
            port: 0,
            options,
            dir,
        };
        for _ in 0..3 {
            clamd.port = free_port();
            if clamd.launch() {
                return clamd;
            }
        }
        panic!("clamd did not start:\n{}", log_tail(&clamd.log_path()));
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("clamd.log")
    }

    fn launch(&mut self) -> bool {
        let conf = self.dir.path().join("clamd.conf");
        let d = self.dir.path().display();
        std::fs::write(
            &conf,
            format!(
                "Foreground yes\n\
                 TCPSocket {port}\n\
                 LocalSocket {d}/clamd.sock\n\
                 TCPAddr 127.0.0.1\n\
                 DatabaseDirectory {d}/db\n\
                 TemporaryDirectory {d}/tmp\n\
                 LogFile {d}/clamd.log\n\
                 LogTime yes\n\
                 MaxThreads 8\n\
                 StreamMaxLength {max}\n\
                 MaxFileSize {file}\n\
                 MaxScanSize {file}\n\
                 AlertExceedsMax yes\n\
                 SelfCheck 3600\n",
                port = self.port,
                max = self.options.stream_max_length,
                file = self.options.max_file_size,
            ),
        )
        .expect("write clamd.conf");
        let mut child = spawn(
            clean_command("clamd")
                .arg("-c")
                .arg(&conf)
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
            "clamd",
        );
        let port = self.port;
        let up = wait_for(Duration::from_secs(60), || {
            matches!(child.try_wait(), Ok(None))
                && command(port, b"zPING\0").as_deref() == Some("PONG")
        });
        if !up {
            stop(&mut child, Duration::from_secs(2));
            return false;
        }
        self.child = Some(child);
        true
    }

    /// The daemon's process id (0 when stopped), for CPU accounting.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Its Unix socket (`LocalSocket`), where scans may pass a file descriptor.
    pub fn socket_path(&self) -> PathBuf {
        self.dir.path().join("clamd.sock")
    }

    /// `127.0.0.1:<port>`
    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Replaces the database with the same signatures under a new version and waits until
    /// clamd reports it, as after a freshclam update.
    pub fn reload_with_db_version(&self, version: u32) {
        build_database(&self.dir.path().join("db"), version);
        assert_eq!(
            command(self.port, b"zRELOAD\0").as_deref(),
            Some("RELOADING"),
            "clamd RELOAD"
        );
        let want = format!("/{version}/");
        assert!(
            wait_for(Duration::from_secs(30), || {
                command(self.port, b"zVERSION\0").is_some_and(|v| v.contains(&want))
            }),
            "clamd did not load database version {version}"
        );
    }

    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            stop(&mut child, Duration::from_secs(5));
        }
    }

    /// Starts clamd again on the same port after [`Clamd::stop`].
    pub fn restart(&mut self) {
        self.stop();
        assert!(
            self.launch(),
            "clamd did not restart:\n{}",
            log_tail(&self.log_path())
        );
    }
}

impl Drop for Clamd {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Packs `testdata/clamav/daily.*` into `<db>/daily.cud` (hack/build-test-db.sh).
fn build_database(db: &Path, version: u32) {
    let script = crate::testdata_dir().join("../hack/build-test-db.sh");
    let out = Command::new(&script)
        .arg(db)
        .arg(version.to_string())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
    assert!(
        out.status.success(),
        "building the test signature database failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// One clamd command on a fresh connection; the reply without its NUL.
fn command(port: u16, cmd: &[u8]) -> Option<String> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    stream.write_all(cmd).ok()?;
    let mut reply = Vec::new();
    stream.read_to_end(&mut reply).ok()?;
    let text = String::from_utf8(reply).ok()?;
    Some(text.trim_end_matches('\0').to_owned())
}
