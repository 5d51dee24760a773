//! The operator binary against a real kube-apiserver.
#![allow(dead_code)]

pub mod stack;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use virus_scanner_test_support::kube::ControlPlane;
use virus_scanner_test_support::{ServiceProcess, http_get, metric, port_of, wait_for};

pub const CRD_FILE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../crds/virusscanpolicies.virusscan.aether-platform.io.yaml"
);
pub const EXAMPLES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../manifests/examples");

/// The binary under test: this build's, or the one `VIRUS_SCAN_OPERATOR_BIN` names (a release
/// build, for the admission-latency figure).
pub fn operator_binary() -> PathBuf {
    std::env::var_os("VIRUS_SCAN_OPERATOR_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_virus-scan-operator")))
}

/// A control plane with the CRD installed and established.
pub fn plane_with_crd() -> ControlPlane {
    let plane = ControlPlane::start();
    plane.kubectl(&["apply", "--server-side", "-f", CRD_FILE]);
    plane.kubectl(&[
        "wait",
        "--for=condition=Established",
        "--timeout=60s",
        "crd/virusscanpolicies.virusscan.aether-platform.io",
    ]);
    plane
}

pub struct Operator {
    pub process: ServiceProcess,
    pub ops_port: u16,
    pub webhook_port: u16,
    pub identity: String,
}

impl Operator {
    /// Runs `virus-scan-operator` out of cluster, its lease in `default`.
    pub fn start(plane: &ControlPlane, identity: &str) -> Operator {
        Operator::start_with(plane, identity, &[])
    }

    /// With more environment (webhook settings).
    pub fn start_with(plane: &ControlPlane, identity: &str, extra: &[(&str, String)]) -> Operator {
        let mut env = vec![
            ("KUBECONFIG", plane.kubeconfig().display().to_string()),
            ("METRICS_ADDR", "127.0.0.1:0".to_owned()),
            ("WEBHOOK_ADDR", "127.0.0.1:0".to_owned()),
            ("WEBHOOK_EXTRA_SANS", "127.0.0.1".to_owned()),
            ("POD_NAMESPACE", "default".to_owned()),
            ("POD_NAME", identity.to_owned()),
            ("LEASE_DURATION_SECONDS", "4".to_owned()),
            ("LOG_FORMAT", "text".to_owned()),
        ];
        for (k, v) in extra {
            env.retain(|(key, _)| key != k);
            env.push((k, v.clone()));
        }
        let mut process = ServiceProcess::spawn(&operator_binary(), &[], &env);
        let limit = Duration::from_secs(30);
        let ops_port = port_of(&process.wait_for_fields("operator started", &["addr"], limit)[0]);
        let webhook_port =
            port_of(&process.wait_for_fields("webhook listening", &["addr"], limit)[0]);
        let op = Operator {
            process,
            ops_port,
            webhook_port,
            identity: identity.to_owned(),
        };
        let up = wait_for(Duration::from_secs(30), || {
            http_get(ops_port, "/health").is_some_and(|(s, _)| s == 200)
        });
        assert!(up, "operator did not start\n{}", op.process.log_tail());
        op
    }

    pub fn metric(&self, name: &str) -> f64 {
        metric(self.ops_port, name)
    }

    pub fn is_leader(&self) -> bool {
        self.metric("virus_scan_operator_leader") == 1.0
    }

    pub fn writes(&self) -> f64 {
        self.metric("virus_scan_operator_writes_total")
    }
}

/// Polls `check` every 200 ms in a blocking-friendly way.
pub async fn eventually<F, Fut>(limit: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if check().await {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {limit:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `envoy --mode validate` on a bootstrap; panics with Envoy's complaint.
pub fn envoy_validates(bootstrap: &str) {
    let file = tempfile::Builder::new()
        .suffix(".yaml")
        .tempfile()
        .expect("temp file");
    std::fs::write(file.path(), bootstrap).expect("write bootstrap");
    virus_scanner_test_support::run_checked(
        std::process::Command::new(virus_scanner_test_support::envoy_binary())
            .args(["--mode", "validate", "--log-level", "warn", "-c"])
            .arg(file.path()),
        &format!("envoy --mode validate of\n{bootstrap}\n"),
    );
}

/// The directory with `envoy-gateway.yaml` and `istio.yaml`: `$GATEWAY_CRDS_DIR`, or what
/// `hack/gateway-crds.sh` prints (built once, then cached).
pub fn gateway_crds() -> PathBuf {
    if let Some(dir) = std::env::var_os("GATEWAY_CRDS_DIR") {
        return PathBuf::from(dir);
    }
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../hack/gateway-crds.sh");
    let out = Command::new(script)
        .stderr(Stdio::inherit())
        .output()
        .expect("run hack/gateway-crds.sh");
    assert!(out.status.success(), "hack/gateway-crds.sh failed");
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}
