//! A real Kubernetes control plane for tests: etcd and kube-apiserver on free loopback
//! ports, with certificates and service-account keys made for the run (flags in the spirit
//! of controller-runtime's envtest), a kubeconfig with a `system:masters` client
//! certificate, and a `kube::Client`. Dropping it stops both processes, also when the test
//! panics.
//!
//! The binaries come from `hack/k8s-bin.sh` (built from Go modules and cached), or from
//! `$K8S_BIN_DIR`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::process::{clean_command, free_port, log_tail, spawn, stop, wait_for};

/// The directory with kube-apiserver, kubectl, helm, kubeconform and etcd.
pub fn k8s_bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("K8S_BIN_DIR") {
        return PathBuf::from(dir);
    }
    let script = crate::testdata_dir().join("../hack/k8s-bin.sh");
    let out = Command::new(&script)
        .stderr(Stdio::inherit())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
    assert!(out.status.success(), "hack/k8s-bin.sh failed");
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

pub struct ControlPlane {
    etcd: Option<Child>,
    apiserver: Option<Child>,
    port: u16,
    bin: PathBuf,
    dir: tempfile::TempDir,
}

impl ControlPlane {
    pub fn start() -> ControlPlane {
        let bin = k8s_bin_dir();
        let dir = tempfile::Builder::new()
            .prefix("vs-k8s-")
            .tempdir()
            .expect("temp dir");
        let d = dir.path();
        crate::certs::issue(d, "apiserver", "/CN=kube-apiserver", Some("127.0.0.1"));
        crate::certs::issue(d, "admin", "/CN=admin/O=system:masters", None);
        crate::certs::key_pair(d, "sa");

        let mut plane = ControlPlane {
            etcd: None,
            apiserver: None,
            port: 0,
            bin,
            dir,
        };
        plane.start_etcd();
        plane.start_apiserver();
        plane.write_kubeconfig();
        plane
    }

    fn start_etcd(&mut self) {
        let d = self.dir.path().to_path_buf();
        for _ in 0..3 {
            let (client, peer) = (free_port(), free_port());
            let client_url = format!("http://127.0.0.1:{client}");
            let peer_url = format!("http://127.0.0.1:{peer}");
            let log = std::fs::File::create(d.join("etcd.log")).expect("etcd log");
            let mut child = spawn(
                clean_command(self.bin.join("etcd"))
                    .arg("--data-dir")
                    .arg(d.join("etcd-data"))
                    .args(["--name", "default"])
                    .args(["--listen-client-urls", &client_url])
                    .args(["--advertise-client-urls", &client_url])
                    .args(["--listen-peer-urls", &peer_url])
                    .args(["--initial-advertise-peer-urls", &peer_url])
                    .args(["--initial-cluster", &format!("default={peer_url}")])
                    .arg("--unsafe-no-fsync")
                    .stdout(Stdio::null())
                    .stderr(log),
                "etcd",
            );
            let up = wait_for(Duration::from_secs(20), || {
                matches!(child.try_wait(), Ok(None))
                    && crate::http_get(client, "/health").is_some_and(|(s, _)| s == 200)
            });
            if up {
                self.etcd = Some(child);
                std::fs::write(d.join("etcd.url"), &client_url).expect("etcd url");
                return;
            }
            stop(&mut child, Duration::from_secs(2));
        }
        panic!("etcd did not start:\n{}", log_tail(&d.join("etcd.log")));
    }

    fn start_apiserver(&mut self) {
        let d = self.dir.path().to_path_buf();
        let etcd_url = std::fs::read_to_string(d.join("etcd.url")).expect("etcd url");
        for _ in 0..3 {
            let port = free_port();
            let log = std::fs::File::create(d.join("apiserver.log")).expect("apiserver log");
            let mut child = spawn(
                clean_command(self.bin.join("kube-apiserver"))
                    .arg(format!("--etcd-servers={etcd_url}"))
                    .args(["--bind-address=127.0.0.1", "--advertise-address=127.0.0.1"])
                    .arg(format!("--secure-port={port}"))
                    .arg(format!("--cert-dir={}", d.display()))
                    .arg(format!(
                        "--tls-cert-file={}",
                        d.join("apiserver.crt").display()
                    ))
                    .arg(format!(
                        "--tls-private-key-file={}",
                        d.join("apiserver.key").display()
                    ))
                    .arg(format!("--client-ca-file={}", d.join("ca.crt").display()))
                    .arg(format!(
                        "--service-account-key-file={}",
                        d.join("sa.pub").display()
                    ))
                    .arg(format!(
                        "--service-account-signing-key-file={}",
                        d.join("sa.key").display()
                    ))
                    .arg("--service-account-issuer=https://kubernetes.default.svc.cluster.local")
                    .arg("--service-cluster-ip-range=10.0.0.0/24")
                    .arg("--authorization-mode=RBAC")
                    .arg("--allow-privileged=true")
                    // No token controller runs: pods must not wait for service-account tokens.
                    .arg("--disable-admission-plugins=ServiceAccount")
                    .arg("--enable-priority-and-fairness=false")
                    .stdout(Stdio::null())
                    .stderr(log),
                "kube-apiserver",
            );
            self.port = port;
            let ready = wait_for(Duration::from_secs(90), || {
                matches!(child.try_wait(), Ok(None)) && self.readyz()
            });
            if ready {
                self.apiserver = Some(child);
                return;
            }
            stop(&mut child, Duration::from_secs(5));
        }
        panic!(
            "kube-apiserver did not become ready:\n{}",
            log_tail(&d.join("apiserver.log"))
        );
    }

    fn readyz(&self) -> bool {
        let d = self.dir.path();
        Command::new("curl")
            .args(["-sf", "-o", "/dev/null", "--max-time", "2"])
            .arg("--cacert")
            .arg(d.join("ca.crt"))
            .arg("--cert")
            .arg(d.join("admin.crt"))
            .arg("--key")
            .arg(d.join("admin.key"))
            .arg(format!("https://127.0.0.1:{}/readyz", self.port))
            .status()
            .is_ok_and(|s| s.success())
    }

    fn write_kubeconfig(&self) {
        let d = self.dir.path();
        let config = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: https://127.0.0.1:{port}\n    certificate-authority: {ca}\nusers:\n- name: admin\n  user:\n    client-certificate: {crt}\n    client-key: {key}\ncontexts:\n- name: test\n  context:\n    cluster: test\n    user: admin\n    namespace: default\ncurrent-context: test\n",
            port = self.port,
            ca = d.join("ca.crt").display(),
            crt = d.join("admin.crt").display(),
            key = d.join("admin.key").display(),
        );
        std::fs::write(self.kubeconfig(), config).expect("write kubeconfig");
    }

    pub fn kubeconfig(&self) -> PathBuf {
        self.dir.path().join("kubeconfig")
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn bin_dir(&self) -> &Path {
        &self.bin
    }

    /// A client authenticated as a cluster admin.
    pub async fn client(&self) -> kube::Client {
        let kubeconfig =
            kube::config::Kubeconfig::read_from(self.kubeconfig()).expect("kubeconfig");
        let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
            .await
            .expect("client config");
        kube::Client::try_from(config).expect("client")
    }

    /// Runs one of the cached binaries (kubectl, helm, kubeconform) against this cluster.
    pub fn command(&self, binary: &str) -> Command {
        let mut cmd = Command::new(self.bin.join(binary));
        cmd.env("KUBECONFIG", self.kubeconfig());
        cmd
    }

    /// Runs `kubectl args...` and returns stdout; panics with stderr on failure.
    pub fn kubectl(&self, args: &[&str]) -> String {
        let out = crate::process::run_checked(
            self.command("kubectl").args(args),
            &format!("kubectl {args:?}"),
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The CA that signs certificates made for this cluster's tests (webhooks too).
    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join("ca.crt")
    }

    /// A server certificate for 127.0.0.1 from the cluster's test CA.
    pub fn issue_server_certificate(&self, name: &str) -> (PathBuf, PathBuf) {
        crate::certs::issue(self.dir.path(), name, "/CN=127.0.0.1", Some("127.0.0.1"))
    }

    pub fn apiserver_log(&self) -> String {
        log_tail(&self.dir.path().join("apiserver.log"))
    }

    /// How long a start took, for reports.
    pub fn timed_start() -> (ControlPlane, Duration) {
        let started = Instant::now();
        let plane = ControlPlane::start();
        (plane, started.elapsed())
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        if let Some(mut c) = self.apiserver.take() {
            stop(&mut c, Duration::from_secs(10));
        }
        if let Some(mut c) = self.etcd.take() {
            stop(&mut c, Duration::from_secs(5));
        }
    }
}
