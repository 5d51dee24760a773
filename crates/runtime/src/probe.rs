//! `<binary> probe PORT PATH`: asks the process's own ops endpoint on loopback and exits 0 on
//! a 200, 1 otherwise. The injected sidecar's probes run it (`exec`) instead of having the
//! kubelet call the port: a service mesh rewrites HTTP and TCP probes to go through its own
//! agent (Istio sends them to pilot-agent in `istio-proxy`), and a native sidecar whose
//! startup probe waits on a container that starts after it never starts. An `exec` probe is
//! left as it is.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

/// The first argument that selects the probe.
pub const PROBE_COMMAND: &str = "probe";

/// The whole probe, connect to status line: under the kubelet's `timeoutSeconds` (2).
const TIMEOUT: Duration = Duration::from_millis(1500);

/// When `args` (the process's, program name first) are `probe PORT PATH`, runs the probe and
/// returns the exit code; `None` for any other command line.
pub fn probe_command(args: impl IntoIterator<Item = String>) -> Option<i32> {
    let args: Vec<String> = args.into_iter().skip(1).collect();
    if args.first().map(String::as_str) != Some(PROBE_COMMAND) {
        return None;
    }
    let (port, path) = match (args.get(1).map(|p| p.parse::<u16>()), args.get(2)) {
        (Some(Ok(port)), Some(path)) if path.starts_with('/') && args.len() == 3 => (port, path),
        _ => {
            eprintln!("usage: {PROBE_COMMAND} PORT /PATH");
            return Some(2);
        }
    };
    match status(port, path) {
        Ok(200) => Some(0),
        Ok(status) => {
            eprintln!("127.0.0.1:{port}{path} answered {status}");
            Some(1)
        }
        Err(e) => {
            eprintln!("127.0.0.1:{port}{path}: {e}");
            Some(1)
        }
    }
}

/// The HTTP status of `GET path` on loopback `port`.
pub fn status(port: u16, path: &str) -> std::io::Result<u16> {
    let deadline = Instant::now() + TIMEOUT;
    // What is left of the probe's time, never zero (a zero timeout means none).
    let left = || {
        deadline
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
            .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::TimedOut, "probe timed out"))
    };
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut stream = TcpStream::connect_timeout(&addr, left()?)?;
    stream.set_write_timeout(Some(left()?))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )?;
    let mut head = [0u8; 64];
    let mut n = 0;
    while n < 12 {
        stream.set_read_timeout(Some(left()?))?;
        match stream.read(&mut head[n..])? {
            0 => break,
            k => n += k,
        }
    }
    let line = String::from_utf8_lossy(&head[..n]);
    line.strip_prefix("HTTP/1.")
        .and_then(|rest| rest.get(2..5))
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not an HTTP answer: {line:?}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<String> {
        std::iter::once("bin")
            .chain(a.iter().copied())
            .map(str::to_owned)
            .collect()
    }

    /// A one-shot HTTP server answering `status_line`.
    fn serve(status_line: &'static str) -> u16 {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        std::thread::spawn(move || {
            if let Ok((mut s, _)) = listener.accept() {
                let mut buf = [0u8; 256];
                let _ = s.read(&mut buf);
                let _ = write!(s, "{status_line}\r\nContent-Length: 0\r\n\r\n");
            }
        });
        port
    }

    #[test]
    fn other_command_lines_are_not_the_probe() {
        assert_eq!(probe_command(args(&[])), None);
        assert_eq!(probe_command(args(&["--grpc-addr", "x"])), None);
    }

    #[test]
    fn a_200_passes_anything_else_fails() {
        let ok = serve("HTTP/1.1 200 OK");
        assert_eq!(
            probe_command(args(&["probe", &ok.to_string(), "/ready"])),
            Some(0)
        );
        let down = serve("HTTP/1.1 503 Service Unavailable");
        assert_eq!(
            probe_command(args(&["probe", &down.to_string(), "/ready"])),
            Some(1)
        );
        // Nothing listening.
        let closed = std::net::TcpListener::bind("127.0.0.1:0")
            .expect("bind")
            .local_addr()
            .expect("addr")
            .port();
        assert_eq!(
            probe_command(args(&["probe", &closed.to_string(), "/ready"])),
            Some(1)
        );
    }

    #[test]
    fn a_server_that_answers_byte_by_byte_too_slowly_fails_within_the_probe_time() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        std::thread::spawn(move || {
            if let Ok((mut s, _)) = listener.accept() {
                for b in b"HTTP/1.1 200 OK\r\n" {
                    std::thread::sleep(Duration::from_millis(400));
                    if s.write_all(&[*b]).is_err() {
                        return;
                    }
                }
            }
        });
        let start = Instant::now();
        assert_eq!(
            probe_command(args(&["probe", &port.to_string(), "/ready"])),
            Some(1)
        );
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "{:?}",
            start.elapsed()
        );
    }

    #[test]
    fn a_malformed_probe_is_a_usage_error() {
        assert_eq!(probe_command(args(&["probe"])), Some(2));
        assert_eq!(probe_command(args(&["probe", "x", "/ready"])), Some(2));
        assert_eq!(probe_command(args(&["probe", "9141", "ready"])), Some(2));
    }
}
