//! A bootstrap merged by the operator, run by a real Envoy in front of the real producer,
//! Redis, consumer and clamd: a path that only looks like an opted-out route (dot segments,
//! their percent-encoded forms, doubled or escaped slashes) is routed by what it resolves
//! to, so an infected upload sent that way is scanned and refused, never delivered.
#![allow(clippy::unwrap_used)]

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;
use support::stack::{Gateway, Scanner, post, sha256_hex};
use virus_scanner_test_support::{Clamd, EICAR, Redis, Upstream, clean_bytes};

const POLICY: &str = r#"apiVersion: virusscan.aether-platform.io/v1alpha1
kind: VirusScanPolicy
metadata: { name: gateway, namespace: tenant-a }
spec:
  selector: { matchLabels: { app: gateway } }
  routes:
  - { name: static, pathPrefix: /static/ }
  producer: { transport: UnixSocket }
"#;

/// The tenant's gateway: `/static/` and everything else go to the same backend; the policy
/// opts `/static/` out of scanning. Ports are bound by Envoy (0) and read back from it.
fn tenant_bootstrap(upstream_port: u16) -> String {
    format!(
        r#"admin:
  address: {{ socket_address: {{ address: 127.0.0.1, port_value: 0 }} }}
static_resources:
  listeners:
  - name: gateway
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: 0 }} }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: gateway
          route_config:
            virtual_hosts:
            - name: app
              domains: ["*"]
              routes:
              - match: {{ prefix: /static/ }}
                route: {{ cluster: app }}
              - match: {{ prefix: / }}
                route: {{ cluster: app }}
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
  - name: app
    type: STATIC
    connect_timeout: 2s
    load_assignment:
      cluster_name: app
      endpoints: [{{ lb_endpoints: [{{ endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {upstream_port} }} }} }} }}] }}]
"#
    )
}

/// The operator's offline merge (the controller's `bootstrap::merge`), with the producer's
/// socket moved to where this test's producer listens.
fn merged_bootstrap(dir: &Path, upstream_port: u16, socket: &Path) -> PathBuf {
    let policy = dir.join("policy.yaml");
    std::fs::write(&policy, POLICY).unwrap();
    let tenant = dir.join("tenant.yaml");
    std::fs::write(&tenant, tenant_bootstrap(upstream_port)).unwrap();
    let out = virus_scanner_test_support::run_checked(
        Command::new(support::operator_binary())
            .args(["envoy-config", "-f"])
            .arg(&policy)
            .arg("--bootstrap")
            .arg(&tenant),
        "virus-scan-operator envoy-config --bootstrap",
    );
    let mut merged: Value = serde_saphyr::from_str(&String::from_utf8_lossy(&out.stdout)).unwrap();
    let clusters = merged["static_resources"]["clusters"]
        .as_array_mut()
        .unwrap();
    let producer = clusters
        .iter_mut()
        .find(|c| c["name"] == virus_scan_operator::envoy::PRODUCER_CLUSTER)
        .unwrap();
    let pipe = &mut producer["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
        ["pipe"]["path"];
    assert_eq!(*pipe, virus_scan_operator::envoy::SOCKET_PATH);
    *pipe = Value::from(socket.display().to_string());
    let file = dir.join("envoy.yaml");
    std::fs::write(&file, virus_scan_operator::envoy::to_yaml(&merged).unwrap()).unwrap();
    file
}

#[test]
fn opted_out_prefix_cannot_be_reached_by_path_tricks() {
    let redis = Redis::start();
    let clamd = Clamd::start();
    let upstream = Upstream::start();
    let dir = tempfile::Builder::new()
        .prefix("vs-path-tricks-")
        .tempdir()
        .unwrap();
    let scan_dir = dir.path().join("scan");
    std::fs::create_dir_all(&scan_dir).unwrap();
    let socket = dir.path().join("producer.sock");
    let _scanner = Scanner::start(&redis, &clamd, &scan_dir, &socket);
    let bootstrap = merged_bootstrap(dir.path(), upstream.port(), &socket);
    let gateway = Gateway::start(&bootstrap, dir.path());
    let context = || {
        format!(
            "{}\nbootstrap: {}",
            gateway.process.log_tail(),
            bootstrap.display()
        )
    };

    let eicar = dir.path().join("eicar");
    std::fs::write(&eicar, EICAR).unwrap();
    let upload = clean_bytes(4096, 1);
    let upload_file = dir.path().join("upload");
    std::fs::write(&upload_file, &upload).unwrap();
    let asset = clean_bytes(4096, 2);
    let asset_file = dir.path().join("asset");
    std::fs::write(&asset_file, &asset).unwrap();

    // A clean upload is scanned and delivered intact.
    let scanned = gateway.scanned_requests();
    let (status, _) = post(&gateway, "/upload", &upload_file, &[]);
    assert_eq!(status, 200, "{}", context());
    assert_eq!(gateway.scanned_requests(), scanned + 1);

    // The opted-out prefix still passes, unscanned.
    let (status, _) = post(&gateway, "/static/file", &asset_file, &[]);
    assert_eq!(status, 200, "{}", context());
    assert_eq!(
        gateway.scanned_requests(),
        scanned + 1,
        "/static/file was scanned"
    );

    // Dot segments, encoded or not, and doubled slashes resolve to /upload: scanned, 406.
    for path in [
        "/static/../upload",
        "/static/./../upload",
        "/static/%2e%2e/upload",
        "/static/%2E%2E/upload",
        "/static/.%2e/upload",
        "//static/../upload",
        "/STATIC/../upload",
    ] {
        let (status, _) = post(&gateway, path, &eicar, &[]);
        assert_eq!(status, 406, "{path}: {}", context());
    }
    // An escaped slash or backslash is answered with a redirect to the path it stands for,
    // which is then routed, and scanned, as what it is.
    for path in [
        "/static%2F..%2Fupload",
        "/static/..%2Fupload",
        "/static/..%2fupload",
        "/static/%2e%2e%2fupload",
        "/static/..%5Cupload",
    ] {
        let (status, headers) = post(&gateway, path, &eicar, &[]);
        assert!(
            (300..400).contains(&status),
            "{path}: {status}\n{headers}\n{}",
            context()
        );
        let (status, _) = post(&gateway, path, &eicar, &["-L", "--post301", "--post302"]);
        assert_eq!(status, 406, "{path}, redirect followed: {}", context());
    }

    let received = upstream.received();
    let eicar_sha = sha256_hex(EICAR);
    assert!(
        received.iter().all(|r| r.sha256 != eicar_sha),
        "an infected body reached the upstream: {received:?}"
    );
    let got: Vec<(&str, &str)> = received
        .iter()
        .map(|r| (r.path.as_str(), r.sha256.as_str()))
        .collect();
    assert_eq!(
        got,
        [
            ("/upload", sha256_hex(&upload).as_str()),
            ("/static/file", sha256_hex(&asset).as_str())
        ]
    );
}
