//! Envoy Gateway end to end, without a cluster: a Gateway, an HTTPRoute with a rule the
//! policy opts out, and the objects `virus-scan-operator envoy-config --target envoy-gateway`
//! renders are translated by Envoy Gateway's own translator (`egctl x translate`, v1.9.1,
//! built by `hack/egctl.sh`) into the Envoy configuration it would serve; a real Envoy runs
//! that configuration in front of the real producer on its Unix socket. A clean upload
//! passes, EICAR is refused with 406, the opted-out rule passes unscanned, and 6 MiB bodies
//! (far past Envoy Gateway's 32 KiB default buffer) are held whole and scanned both ways.
//!
//! Only what ties the translation to this machine is changed: the listener binds a free
//! loopback port, the routes' backend is this test's upstream, and the socket path is the
//! test producer's; EDS and RDS resources are inlined as static ones.
#![allow(clippy::unwrap_used)]

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{Value, json};
use support::stack::{Gateway, Scanner, get, post, sha256_hex};
use virus_scan_operator::envoy::SOCKET_PATH;
use virus_scanner_test_support::{Clamd, EICAR, Redis, Upstream, clean_bytes};

const POLICY: &str = r#"apiVersion: virusscan.aether-platform.io/v1alpha1
kind: VirusScanPolicy
metadata: { name: web, namespace: default }
spec:
  selector: { matchLabels: { gateway.envoyproxy.io/owning-gateway-name: eg } }
  scan: { maxBodyMB: 8, timeoutSeconds: 20 }
  producer: { transport: UnixSocket }
  routes:
  - { name: assets, httpRoute: { name: site, sectionName: assets } }
"#;

const GATEWAY_API: &str = r#"apiVersion: gateway.networking.k8s.io/v1
kind: GatewayClass
metadata: { name: eg }
spec: { controllerName: gateway.envoyproxy.io/gatewayclass-controller }
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: { name: eg, namespace: default }
spec:
  gatewayClassName: eg
  listeners: [{ name: http, protocol: HTTP, port: 8080 }]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: { name: site, namespace: default }
spec:
  parentRefs: [{ name: eg }]
  rules:
  - name: assets
    matches: [{ path: { type: PathPrefix, value: /assets/ } }]
    backendRefs: [{ name: upstream, port: 8081 }]
  - name: upload
    matches: [{ path: { type: PathPrefix, value: / } }]
    backendRefs: [{ name: upstream, port: 8081 }]
"#;

fn egctl() -> PathBuf {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../hack/egctl.sh");
    let out = virus_scanner_test_support::run_checked(&mut Command::new(script), "hack/egctl.sh");
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

/// What Envoy Gateway would serve for the Gateway, the HTTPRoute and the policy's objects.
fn translated(dir: &Path) -> Value {
    let policy = dir.join("policy.yaml");
    std::fs::write(&policy, POLICY).unwrap();
    let ours = virus_scanner_test_support::run_checked(
        Command::new(support::operator_binary())
            .args(["envoy-config", "--target", "envoy-gateway", "-f"])
            .arg(&policy),
        "virus-scan-operator envoy-config --target envoy-gateway",
    );
    let input = dir.join("input.yaml");
    std::fs::write(
        &input,
        format!("{GATEWAY_API}{}", String::from_utf8_lossy(&ours.stdout)),
    )
    .unwrap();
    let out = virus_scanner_test_support::run_checked(
        Command::new(egctl())
            .args(["x", "translate", "--from", "gateway-api", "--to", "xds"])
            .args(["-t", "all", "-o", "json", "--add-missing-resources", "-f"])
            .arg(&input),
        "egctl x translate",
    );
    let all: Value = serde_json::from_slice(&out.stdout).unwrap();
    all["xds"]["default/eg"]["configs"].clone()
}

fn dump<'a>(configs: &'a Value, kind: &str) -> &'a Value {
    configs
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["@type"].as_str().is_some_and(|t| t.ends_with(kind)))
        .unwrap_or_else(|| panic!("no {kind} in the translation"))
}

/// A resource of a config dump, as it goes inline into a bootstrap (without its `@type`).
fn untyped(resource: &Value) -> Value {
    let mut resource = resource.clone();
    if let Some(object) = resource.as_object_mut() {
        object.remove("@type");
    }
    resource
}

/// The translation as a static bootstrap for this machine.
fn bootstrap(configs: &Value, upstream_port: u16, socket: &Path) -> Value {
    let routes: Vec<Value> = dump(configs, "RoutesConfigDump")["dynamicRouteConfigs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| untyped(&r["routeConfig"]))
        .collect();
    let endpoints: Vec<Value> = dump(configs, "EndpointsConfigDump")["dynamicEndpointConfigs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| untyped(&e["endpointConfig"]))
        .collect();
    let mut listeners = Vec::new();
    for l in dump(configs, "ListenersConfigDump")["dynamicListeners"]
        .as_array()
        .unwrap()
    {
        let mut listener = untyped(&l["activeState"]["listener"]);
        if listener["name"] != "default/eg/http" {
            continue;
        }
        listener["address"] = json!({"socketAddress": {"address": "127.0.0.1", "portValue": 0}});
        let mut chains: Vec<&mut Value> = Vec::new();
        if let Some(object) = listener.as_object_mut() {
            for (key, value) in object.iter_mut() {
                match key.as_str() {
                    "defaultFilterChain" => chains.push(value),
                    "filterChains" => chains.extend(value.as_array_mut().unwrap().iter_mut()),
                    _ => {}
                }
            }
        }
        for chain in chains {
            for filter in chain["filters"].as_array_mut().unwrap() {
                let hcm = &mut filter["typedConfig"];
                let Some(name) = hcm["rds"]["routeConfigName"].as_str().map(str::to_owned) else {
                    continue;
                };
                let config = routes.iter().find(|r| r["name"] == name.as_str()).unwrap();
                hcm.as_object_mut().unwrap().remove("rds");
                hcm["routeConfig"] = config.clone();
            }
        }
        listeners.push(listener);
    }
    assert_eq!(listeners.len(), 1, "the Gateway's listener");
    let mut clusters = Vec::new();
    for c in dump(configs, "ClustersConfigDump")["dynamicActiveClusters"]
        .as_array()
        .unwrap()
    {
        let mut cluster = untyped(&c["cluster"]);
        let name = cluster["name"].as_str().unwrap().to_owned();
        let mut assignment = endpoints
            .iter()
            .find(|e| e["clusterName"] == name.as_str())
            .unwrap_or_else(|| panic!("no endpoints for {name}"))
            .clone();
        for locality in assignment["endpoints"].as_array_mut().unwrap() {
            for lb in locality["lbEndpoints"].as_array_mut().unwrap() {
                let address = &mut lb["endpoint"]["address"];
                if let Some(pipe) = address.get_mut("pipe") {
                    assert_eq!(pipe["path"], SOCKET_PATH, "the Backend's socket");
                    pipe["path"] = json!(socket.display().to_string());
                } else {
                    *address = json!({"socketAddress": {"address": "127.0.0.1", "portValue": upstream_port}});
                }
            }
        }
        let object = cluster.as_object_mut().unwrap();
        object.remove("edsClusterConfig");
        object.insert("type".to_owned(), json!("STATIC"));
        object.insert("loadAssignment".to_owned(), assignment);
        clusters.push(cluster);
    }
    json!({
        "admin": {"address": {"socketAddress": {"address": "127.0.0.1", "portValue": 0}}},
        "staticResources": {"listeners": listeners, "clusters": clusters}
    })
}

#[test]
fn envoy_gateway_translation_scans_uploads_and_skips_the_opted_out_rule() {
    let dir = tempfile::Builder::new()
        .prefix("vs-eg-e2e-")
        .tempdir()
        .unwrap();
    let configs = translated(dir.path());
    let redis = Redis::start();
    let clamd = Clamd::start();
    let upstream = Upstream::start();
    let scan_dir = dir.path().join("scan");
    std::fs::create_dir_all(&scan_dir).unwrap();
    let socket = dir.path().join("producer.sock");
    let _scanner = Scanner::start(&redis, &clamd, &scan_dir, &socket);
    let file = dir.path().join("envoy.json");
    std::fs::write(
        &file,
        serde_json::to_vec_pretty(&bootstrap(&configs, upstream.port(), &socket)).unwrap(),
    )
    .unwrap();
    let gateway = Gateway::start_listener(&file, dir.path(), "default/eg/http");
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
    let asset = clean_bytes(4096, 2);
    let asset_file = dir.path().join("asset");
    std::fs::write(&asset_file, &asset).unwrap();

    let scanned = gateway.scanned_requests();
    let (status, _) = post(&gateway, "/upload", &upload_file, &[]);
    assert_eq!(status, 200, "clean upload: {}", context());
    assert_eq!(gateway.scanned_requests(), scanned + 1, "{}", context());

    let (status, headers) = post(&gateway, "/upload", &eicar, &[]);
    assert_eq!(status, 406, "EICAR: {headers}\n{}", context());

    // The opted-out rule: not scanned, delivered (EICAR too: that is what an opt-out means).
    let (status, _) = post(&gateway, "/assets/file", &asset_file, &[]);
    assert_eq!(status, 200, "opted-out rule: {}", context());
    let (status, _) = post(&gateway, "/assets/eicar", &eicar, &[]);
    assert_eq!(status, 200, "opted-out rule: {}", context());
    assert_eq!(gateway.scanned_requests(), scanned + 2, "{}", context());

    // Bodies far past Envoy Gateway's default 32 KiB connection buffer, both ways: the
    // ClientTrafficPolicy's limit (the policy's 8 MiB + 64 KiB) lets Envoy hold them whole
    // for the scan, and the scan still decides.
    let big = clean_bytes(6 << 20, 3);
    let mut big_bad = clean_bytes(6 << 20, 4);
    big_bad.extend_from_slice(EICAR);
    let big_file = dir.path().join("big");
    std::fs::write(&big_file, &big).unwrap();
    let big_bad_file = dir.path().join("big-bad");
    std::fs::write(&big_bad_file, &big_bad).unwrap();
    let (status, _) = post(&gateway, "/upload-big", &big_file, &[]);
    assert_eq!(status, 200, "6 MiB clean upload: {}", context());
    let (status, headers) = post(&gateway, "/upload-big", &big_bad_file, &[]);
    assert_eq!(
        status,
        406,
        "6 MiB infected upload: {headers}\n{}",
        context()
    );
    upstream.serve("big", big.clone(), &[]);
    upstream.serve("big-bad", big_bad.clone(), &[]);
    let (status, body) = get(&gateway, "/files/big");
    assert_eq!(status, 200, "6 MiB clean download: {}", context());
    assert_eq!(
        sha256_hex(&body),
        sha256_hex(&big),
        "the download arrived whole"
    );
    let (status, body) = get(&gateway, "/files/big-bad");
    assert_eq!(status, 406, "6 MiB infected download: {}", context());
    assert!(
        !body.windows(EICAR.len()).any(|w| w == EICAR),
        "infected bytes reached the client"
    );

    let received: Vec<(String, String)> = upstream
        .received()
        .iter()
        .map(|r| (r.path.clone(), r.sha256.clone()))
        .collect();
    assert_eq!(
        received,
        [
            ("/upload".to_owned(), sha256_hex(&upload)),
            ("/assets/file".to_owned(), sha256_hex(&asset)),
            ("/assets/eicar".to_owned(), sha256_hex(EICAR)),
            ("/upload-big".to_owned(), sha256_hex(&big)),
        ]
    );
}
