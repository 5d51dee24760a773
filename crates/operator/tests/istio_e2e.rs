//! Istio: the EnvoyFilter a policy renders, applied as Istio applies its patches (context
//! GATEWAY: the cluster added, the ext_proc filter inserted before the router, the
//! connection manager and listener merged, the opted-out route merged by its name) to a
//! gateway listener shaped like the one Istio generates from a VirtualService, run by a real
//! Envoy in front of the producer: a clean upload passes, EICAR gets 406, the opted-out
//! route passes unscanned. The patch values are what Istio hands Envoy verbatim, so this
//! shows Envoy takes them and that they scan and fail closed as meant; Istio's own patching
//! is stood in for by [`apply`], for the patch kinds the renderer uses.
#![allow(clippy::unwrap_used)]

mod support;

use std::path::Path;

use serde_json::{Value, json};
use support::stack::{Gateway, Scanner, post, sha256_hex};
use virus_scan_operator::crd::VirusScanPolicy;
use virus_scan_operator::envoy::SOCKET_PATH;
use virus_scanner_test_support::{Clamd, EICAR, Redis, Upstream, clean_bytes};

const POLICY: &str = r#"apiVersion: virusscan.aether-platform.io/v1alpha1
kind: VirusScanPolicy
metadata: { name: ingress, namespace: tenant-a }
spec:
  selector: { matchLabels: { istio: ingressgateway } }
  scan: { maxBodyMB: 8 }
  producer: { transport: UnixSocket }
  routes:
  - { name: health, path: /healthz }
"#;

/// A gateway listener as Istio builds it for a VirtualService with routes `health` and
/// `default` (names from its `http[].name`).
fn istio_like_bootstrap(upstream_port: u16) -> Value {
    json!({
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "static_resources": {
            "listeners": [{
                "name": "gateway",
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
                "filter_chains": [{"filters": [{
                    "name": "envoy.filters.network.http_connection_manager",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                        "stat_prefix": "outbound_0.0.0.0_8080",
                        "normalize_path": true,
                        "route_config": {"name": "http.8080", "virtual_hosts": [{
                            "name": "*:80", "domains": ["*"],
                            "routes": [
                                {"name": "health", "match": {"prefix": "/healthz"}, "route": {"cluster": "app"}},
                                {"name": "default", "match": {"prefix": "/"}, "route": {"cluster": "app"}}
                            ]
                        }]},
                        "http_filters": [{
                            "name": "envoy.filters.http.router",
                            "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}
                        }]
                    }
                }]}]
            }],
            "clusters": [{
                "name": "app", "type": "STATIC", "connect_timeout": "2s",
                "load_assignment": {"cluster_name": "app", "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {
                    "socket_address": {"address": "127.0.0.1", "port_value": upstream_port}
                }}}]}]}
            }]
        }
    })
}

/// Istio's MERGE: objects merged key by key, anything else replaced.
fn merge(into: &mut Value, from: &Value) {
    match (into, from) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in b {
                merge(a.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
        (a, b) => *a = b.clone(),
    }
}

/// The EnvoyFilter's patches applied to `bootstrap`.
fn apply(bootstrap: &mut Value, patches: &[Value]) {
    let resources = &mut bootstrap["static_resources"];
    for patch in patches {
        assert_eq!(patch["match"]["context"], "GATEWAY");
        let value = &patch["patch"]["value"];
        let operation = patch["patch"]["operation"].as_str().unwrap();
        match (patch["applyTo"].as_str().unwrap(), operation) {
            ("CLUSTER", "ADD") => resources["clusters"]
                .as_array_mut()
                .unwrap()
                .push(value.clone()),
            ("LISTENER", "MERGE") => {
                for l in resources["listeners"].as_array_mut().unwrap() {
                    merge(l, value);
                }
            }
            (apply_to, _) => {
                for l in resources["listeners"].as_array_mut().unwrap() {
                    let hcm = &mut l["filter_chains"][0]["filters"][0];
                    match (apply_to, operation) {
                        ("NETWORK_FILTER", "MERGE") => merge(hcm, value),
                        ("HTTP_FILTER", "INSERT_BEFORE") => {
                            let filters =
                                hcm["typed_config"]["http_filters"].as_array_mut().unwrap();
                            let router = patch["match"]["listener"]["filterChain"]["filter"]
                                ["subFilter"]["name"]
                                .clone();
                            let at = filters.iter().position(|f| f["name"] == router).unwrap();
                            filters.insert(at, value.clone());
                        }
                        ("HTTP_ROUTE", "MERGE") => {
                            let name =
                                &patch["match"]["routeConfiguration"]["vhost"]["route"]["name"];
                            let hosts = hcm["typed_config"]["route_config"]["virtual_hosts"]
                                .as_array_mut()
                                .unwrap();
                            for host in hosts {
                                for route in host["routes"].as_array_mut().unwrap() {
                                    if route["name"] == *name {
                                        merge(route, value);
                                    }
                                }
                            }
                        }
                        other => panic!("patch {other:?} is not stood in for"),
                    }
                }
            }
        }
    }
}

fn bootstrap(dir: &Path, upstream_port: u16, socket: &Path) -> std::path::PathBuf {
    let policy: VirusScanPolicy = serde_saphyr::from_str(POLICY).unwrap();
    let objects =
        virus_scan_operator::gateways::istio::render("ingress", "tenant-a", &policy.spec).unwrap();
    let patches = objects[0]["spec"]["configPatches"].as_array().unwrap();
    let mut b = istio_like_bootstrap(upstream_port);
    apply(&mut b, patches);
    let clusters = b["static_resources"]["clusters"].as_array_mut().unwrap();
    let producer = clusters
        .iter_mut()
        .find(|c| c["name"] == virus_scan_operator::envoy::PRODUCER_CLUSTER)
        .unwrap();
    let pipe = &mut producer["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
        ["pipe"]["path"];
    assert_eq!(*pipe, SOCKET_PATH);
    *pipe = json!(socket.display().to_string());
    let file = dir.join("envoy.json");
    std::fs::write(&file, serde_json::to_vec_pretty(&b).unwrap()).unwrap();
    file
}

#[test]
fn istio_envoy_filter_scans_uploads_and_skips_the_opted_out_route() {
    let dir = tempfile::Builder::new()
        .prefix("vs-istio-e2e-")
        .tempdir()
        .unwrap();
    let redis = Redis::start();
    let clamd = Clamd::start();
    let upstream = Upstream::start();
    let scan_dir = dir.path().join("scan");
    std::fs::create_dir_all(&scan_dir).unwrap();
    let socket = dir.path().join("producer.sock");
    let _scanner = Scanner::start(&redis, &clamd, &scan_dir, &socket);
    let file = bootstrap(dir.path(), upstream.port(), &socket);
    let gateway = Gateway::start(&file, dir.path());
    let context = || {
        format!(
            "{}\nbootstrap: {}",
            gateway.process.log_tail(),
            file.display()
        )
    };

    let eicar = dir.path().join("eicar");
    std::fs::write(&eicar, EICAR).unwrap();
    let upload = clean_bytes(64 * 1024, 1);
    let upload_file = dir.path().join("upload");
    std::fs::write(&upload_file, &upload).unwrap();

    let scanned = gateway.scanned_requests();
    let (status, _) = post(&gateway, "/upload", &upload_file, &[]);
    assert_eq!(status, 200, "clean upload: {}", context());
    let (status, headers) = post(&gateway, "/upload", &eicar, &[]);
    assert_eq!(status, 406, "EICAR: {headers}\n{}", context());
    // A spelling of another path is routed by what it resolves to: scanned.
    let (status, _) = post(&gateway, "/healthz/../upload", &eicar, &[]);
    assert_eq!(status, 406, "dot segments: {}", context());
    assert_eq!(gateway.scanned_requests(), scanned + 3, "{}", context());

    let (status, _) = post(&gateway, "/healthz", &eicar, &[]);
    assert_eq!(status, 200, "opted-out route: {}", context());
    assert_eq!(gateway.scanned_requests(), scanned + 3, "{}", context());

    let received: Vec<(String, String)> = upstream
        .received()
        .iter()
        .map(|r| (r.path.clone(), r.sha256.clone()))
        .collect();
    assert_eq!(
        received,
        [
            ("/upload".to_owned(), sha256_hex(&upload)),
            ("/healthz".to_owned(), sha256_hex(EICAR)),
        ]
    );
}
