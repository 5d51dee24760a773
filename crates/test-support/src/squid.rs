//! A real Squid forward proxy (Debian `squid-openssl`) with ICAP REQMOD and RESPMOD pointed
//! at a service under test (`bypass=off`: an ICAP failure refuses the request), optionally
//! bumping TLS with a CA made for the test; and a small origin (`hack/upstream.py`) that
//! serves files over HTTP or HTTPS.

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::process::{clean_command, free_port, log_tail, spawn, stop, wait_for};

pub struct SquidOptions {
    pub icap_port: u16,
    pub icap_service: String,
    /// Certificate and key of the CA that signs bumped certificates; TLS is bumped when set.
    pub bump_ca: Option<(PathBuf, PathBuf)>,
    /// The CA that Squid trusts for origins.
    pub origin_ca: Option<PathBuf>,
}

pub struct Squid {
    child: Option<Child>,
    port: u16,
    dir: tempfile::TempDir,
}

fn squid_binary() -> PathBuf {
    ["/usr/sbin/squid", "/usr/bin/squid"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("squid is not installed (Debian package squid-openssl)"))
}

impl Squid {
    pub fn start(options: &SquidOptions) -> Squid {
        let dir = tempfile::Builder::new()
            .prefix("vs-squid-")
            .tempdir()
            .expect("temp dir");
        let d = dir.path();
        let db = d.join("ssl_db");
        if options.bump_ca.is_some() {
            crate::process::run_checked(
                Command::new("/usr/lib/squid/security_file_certgen")
                    .args(["-c", "-s"])
                    .arg(&db)
                    .args(["-M", "4MB"]),
                "security_file_certgen (squid-openssl)",
            );
        }
        // A port picked in advance can be taken before Squid binds it: a few attempts.
        for _ in 0..3 {
            let port = free_port();
            if let Some(child) = Squid::launch(options, d, &db, port) {
                return Squid {
                    child: Some(child),
                    port,
                    dir,
                };
            }
        }
        panic!(
            "squid did not start:\n{}\n{}",
            log_tail(&d.join("stderr.log")),
            log_tail(&d.join("cache.log"))
        );
    }

    /// Squid on `port`, or `None` if it did not come up there.
    fn launch(options: &SquidOptions, d: &Path, db: &Path, port: u16) -> Option<Child> {
        let listen = if let Some((crt, key)) = &options.bump_ca {
            format!(
                "http_port 127.0.0.1:{port} ssl-bump tls-cert={} tls-key={} generate-host-certificates=on dynamic_cert_mem_cache_size=4MB\n\
                 sslcrtd_program /usr/lib/squid/security_file_certgen -s {} -M 4MB\n\
                 sslcrtd_children 2 startup=1 idle=1\n\
                 acl step1 at_step SslBump1\n\
                 ssl_bump peek step1\n\
                 ssl_bump bump all\n",
                crt.display(),
                key.display(),
                db.display()
            )
        } else {
            format!("http_port 127.0.0.1:{port}\n")
        };
        let trust = options
            .origin_ca
            .as_ref()
            .map(|ca| format!("tls_outgoing_options cafile={}\n", ca.display()))
            .unwrap_or_default();
        let icap = format!(
            "icap://127.0.0.1:{}{}",
            options.icap_port, options.icap_service
        );
        let config = format!(
            "{listen}{trust}\
             acl localnet src 127.0.0.0/8\n\
             http_access allow localnet\n\
             http_access deny all\n\
             icap_enable on\n\
             icap_preview_enable on\n\
             icap_preview_size 1024\n\
             icap_persistent_connections on\n\
             icap_service scan_req reqmod_precache {icap} bypass=off\n\
             icap_service scan_resp respmod_precache {icap} bypass=off\n\
             adaptation_access scan_req allow all\n\
             adaptation_access scan_resp allow all\n\
             cache deny all\n\
             pid_filename {dir}/squid.pid\n\
             cache_log {dir}/cache.log\n\
             access_log stdio:{dir}/access.log\n\
             coredump_dir {dir}\n\
             visible_hostname virus-scanner-test\n\
             shutdown_lifetime 1 seconds\n\
             dns_v4_first on\n",
            dir = d.display()
        );
        let conf = d.join("squid.conf");
        std::fs::write(&conf, config).expect("squid.conf");
        // Squid started as root drops to its own user, which must write here.
        let _ = Command::new("chmod").arg("-R").arg("a+rwX").arg(d).status();
        let log = std::fs::File::create(d.join("stderr.log")).expect("log");
        let mut child = spawn(
            clean_command(squid_binary())
                .args(["-N", "-f"])
                .arg(&conf)
                .stdout(Stdio::null())
                .stderr(log),
            "squid",
        );
        // Up means Squid is alive and has said so in its own log: a listener on the port
        // could belong to another process.
        let accepting = format!("local=127.0.0.1:{port} ");
        let up = wait_for(Duration::from_secs(30), || {
            matches!(child.try_wait(), Ok(None))
                && std::fs::read_to_string(d.join("cache.log")).is_ok_and(|log| {
                    log.lines()
                        .any(|l| l.contains("Accepting") && l.contains(&accepting))
                })
                && TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        if up {
            Some(child)
        } else {
            stop(&mut child, Duration::from_secs(2));
            None
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn proxy_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn log_tail(&self) -> String {
        format!(
            "--- squid cache.log ---\n{}\n--- squid access.log ---\n{}",
            log_tail(&self.dir.path().join("cache.log")),
            log_tail(&self.dir.path().join("access.log"))
        )
    }
}

impl Drop for Squid {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            stop(&mut c, Duration::from_secs(5));
        }
    }
}

/// `hack/upstream.py`: files under `/files/<name>`, uploads answered with their SHA-256.
pub struct Origin {
    child: Option<Child>,
    port: u16,
    root: tempfile::TempDir,
    tls: bool,
}

impl Origin {
    /// Over HTTPS when given a certificate and key.
    pub fn start(tls: Option<(&Path, &Path)>) -> Origin {
        let root = tempfile::Builder::new()
            .prefix("vs-origin-")
            .tempdir()
            .expect("temp dir");
        let script = crate::testdata_dir().join("../hack/upstream.py");
        for _ in 0..3 {
            let port = free_port();
            let mut cmd = clean_command("python3");
            cmd.arg(&script).arg(port.to_string()).arg(root.path());
            if let Some((crt, key)) = tls {
                cmd.arg(crt).arg(key);
            }
            let mut child = spawn(cmd.stdout(Stdio::null()).stderr(Stdio::null()), "python3");
            if wait_for(Duration::from_secs(10), || {
                matches!(child.try_wait(), Ok(None))
                    && TcpStream::connect(("127.0.0.1", port)).is_ok()
            }) {
                return Origin {
                    child: Some(child),
                    port,
                    root,
                    tls: tls.is_some(),
                };
            }
            stop(&mut child, Duration::from_secs(2));
        }
        panic!("the origin did not start");
    }

    pub fn put_file(&self, name: &str, bytes: &[u8]) {
        std::fs::write(self.root.path().join(name), bytes).expect("origin file");
    }

    /// URL of a path; HTTPS origins are named `localhost` (their certificate's name).
    pub fn url(&self, path: &str) -> String {
        if self.tls {
            format!("https://localhost:{}{path}", self.port)
        } else {
            format!("http://127.0.0.1:{}{path}", self.port)
        }
    }
}

impl Drop for Origin {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            stop(&mut c, Duration::from_secs(2));
        }
    }
}
