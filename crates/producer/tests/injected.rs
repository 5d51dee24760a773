//! From policy to blocked upload: the sidecar the operator's injector writes into a gateway
//! pod, run as it is written (its environment, through the producer's own configuration),
//! with only the addresses and mounted paths mapped to this machine.
#![allow(clippy::unwrap_used)]

mod support;

use k8s_openapi::api::core::v1::Pod;
use support::{Stack, StackOptions, post_file, temp_file};
use virus_scan_operator::crd::{RedisSettings, VirusScanPolicy};
use virus_scan_operator::inject::{InjectDefaults, SIDECAR, inject};
use virus_scanner_test_support::{BodyMode, EICAR, clean_bytes};

const POLICY: &str = r#"apiVersion: virusscan.aether-platform.io/v1alpha1
kind: VirusScanPolicy
metadata: { name: gateway, namespace: tenant-a }
spec:
  selector: { matchLabels: { app: gateway } }
  scan: { maxBodyMB: 40, fileThresholdMB: 1 }
"#;

const POD: &str = r#"apiVersion: v1
kind: Pod
metadata: { name: gateway-0, namespace: tenant-a, labels: { app: gateway } }
spec:
  containers:
  - { name: envoy, image: envoyproxy/envoy:v1.40.0 }
"#;

/// Addresses and paths are the pod's; on this machine the stack gives its own. Everything
/// else comes from the injected container's environment as written.
const MAPPED: &[&str] = &[
    "REDIS_HOST",
    "REDIS_PORT",
    "GRPC_ADDR",
    "GRPC_SOCKET",
    "HTTP_ADDR",
    "ICAP_ADDR",
    "SCAN_TMP_DIR",
];

fn injected_env() -> Vec<(String, String)> {
    let policy: VirusScanPolicy = serde_saphyr::from_str(POLICY).unwrap();
    let pod: Pod = serde_saphyr::from_str(POD).unwrap();
    let defaults = InjectDefaults {
        image: "virus-scanner:test".into(),
        redis: RedisSettings {
            host: "redis.virus-scanner.svc".into(),
            port: 6379,
            tls: false,
            password_secret_ref: None,
            ca_secret_ref: None,
        },
    };
    let pod = inject(&pod, &policy, &defaults);
    let spec = pod.spec.unwrap();
    let sidecar = spec
        .init_containers
        .unwrap_or_default()
        .into_iter()
        .chain(spec.containers)
        .find(|c| c.name == SIDECAR)
        .expect("the sidecar was injected");
    sidecar
        .env
        .unwrap_or_default()
        .into_iter()
        .filter(|e| !MAPPED.contains(&e.name.as_str()))
        .map(|e| {
            let value = e
                .value
                .unwrap_or_else(|| panic!("{} comes from a Secret; this policy has none", e.name));
            (e.name, value)
        })
        .collect()
}

#[test]
fn an_injected_sidecar_without_a_shared_volume_scans_bodies_over_its_spill_threshold() {
    let env = injected_env();
    // The setting under test comes from the injector, not from this test.
    assert!(
        env.contains(&("SPOOL_SHARED".into(), "false".into())),
        "{env:?}"
    );
    let mut options = StackOptions::new(BodyMode::Buffered);
    options.own_spool = true;
    options.producer_env = env;
    options.envoy_buffer_limit = Some(64 << 20);
    let stack = Stack::start(options);
    let files = tempfile::tempdir().unwrap();

    // 12 MiB, past the policy's 1 MiB spill threshold, held in a spool no consumer sees.
    let mut infected = clean_bytes(12 << 20, 41);
    infected.extend_from_slice(EICAR);
    let r = post_file(
        &stack.url("/upload/big-bad"),
        &temp_file(&files, "bad", &infected),
        &[],
    );
    assert_eq!(r.status, 406, "{}", String::from_utf8_lossy(&r.body));
    assert!(stack.upstream.received().is_empty());

    let clean = clean_bytes(infected.len(), 42);
    let r = post_file(
        &stack.url("/upload/big-ok"),
        &temp_file(&files, "ok", &clean),
        &[],
    );
    stack.assert_only_delivery(&r, &clean);
    assert!(
        stack.producer_metric("virus_scanner_producer_spilled_bytes_total")
            >= (2 * infected.len()) as f64,
        "the bodies were not spilled"
    );
    assert!(stack.leftovers().is_empty(), "{:?}", stack.leftovers());
}
