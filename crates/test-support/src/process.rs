use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

/// A loopback port that was free a moment ago. Services are started on it right away and
/// the caller retries on the rare collision.
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral loopback port");
    listener.local_addr().expect("local address").port()
}

/// What a spawned service keeps of the environment of the tests: where programs, the home
/// and temporary files are, the locale, and the log level and backtraces asked for.
const PASSED_THROUGH: &[&str] = &[
    "PATH",
    "HOME",
    "TMPDIR",
    "LANG",
    "LC_ALL",
    "RUST_LOG",
    "RUST_BACKTRACE",
];

/// `program` with a cleared environment plus [`PASSED_THROUGH`]. Nothing else leaks in from
/// the shell that runs the tests: a `REDIS_URL` or `SCAN_TMP_DIR` exported there would
/// otherwise configure our binaries behind the test's back, and a proxy variable would
/// reroute a service's traffic. A test passes what a service needs explicitly.
pub fn clean_command(program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut cmd = Command::new(program);
    cmd.env_clear();
    for name in PASSED_THROUGH {
        if let Some(value) = std::env::var_os(name) {
            cmd.env(name, value);
        }
    }
    cmd
}

/// Runs a command to completion and insists on success; a failure panics with `what` and
/// the command's stderr. Returns the output for its stdout.
pub fn run_checked(cmd: &mut std::process::Command, what: &str) -> std::process::Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Polls `check` until it returns true or `limit` passes.
pub fn wait_for(limit: Duration, mut check: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if check() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    check()
}

pub(crate) fn port_open(port: u16) -> bool {
    TcpStream::connect(("127.0.0.1", port)).is_ok()
}

/// Panics with the Debian package to install when `binary` is not on PATH.
pub(crate) fn require_binary(binary: &str, package: &str) {
    let found = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|dir| dir.join(binary).is_file()))
        .unwrap_or(false)
        || Path::new("/usr/sbin").join(binary).is_file();
    assert!(
        found,
        "`{binary}` is not installed: `make test` installs it (apt-get install {package})"
    );
}

pub(crate) fn spawn(command: &mut Command, what: &str) -> Child {
    command
        .stdin(std::process::Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {what}: {e}"))
}

/// SIGTERM, then SIGKILL after a grace period; always reaps the child.
pub(crate) fn stop(child: &mut Child, grace: Duration) {
    if let Ok(Some(_)) = child.try_wait() {
        return;
    }
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// The last 20 lines of a log, without backtrace frames (which would push the message that
/// explains a failure out of view).
pub(crate) fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().filter(|l| !is_backtrace_frame(l)).collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// `  12: some::function` or `             at ./src/file.rs:1:2`
fn is_backtrace_frame(line: &str) -> bool {
    let t = line.trim_start();
    if t.len() == line.len() {
        return false;
    }
    t.starts_with("at ")
        || t.split_once(": ")
            .is_some_and(|(n, _)| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backtrace_frames_are_left_out_of_a_log_tail() {
        let dir = tempfile::tempdir().expect("temp dir");
        let log = dir.path().join("x.log");
        std::fs::write(
            &log,
            "Error: GRPC_ADDR 127.0.0.1:1: Address in use\n\nStack backtrace:\n   0: main\n  \
             12: std::rt::lang_start\n             at ./src/main.rs:1:2\nlast: line\n",
        )
        .expect("write");
        assert_eq!(
            log_tail(&log),
            "Error: GRPC_ADDR 127.0.0.1:1: Address in use\n\nStack backtrace:\nlast: line"
        );
    }
}
