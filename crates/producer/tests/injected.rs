//! From policy to blocked upload: the sidecar the operator's injector writes into a gateway
//! pod, run as it is written (its environment, through the producer's own configuration),
//! with only the addresses and mounted paths mapped to this machine.
#![allow(clippy::unwrap_used)]

mod support;

use k8s_openapi::api::core::v1::{Container, Pod};
use support::{Stack, StackOptions, post_file, temp_file};
use virus_scan_operator::crd::VirusScanPolicy;
use virus_scan_operator::inject::{InjectDefaults, SIDECAR, inject};
use virus_scanner_runtime::sidecar_env;
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
    sidecar_env::REDIS_HOST,
    sidecar_env::REDIS_PORT,
    sidecar_env::GRPC_ADDR,
    sidecar_env::GRPC_SOCKET,
    sidecar_env::HTTP_ADDR,
    sidecar_env::ICAP_ADDR,
    sidecar_env::SCAN_TMP_DIR,
];

/// The sidecar the injector writes into the gateway pod for the policy.
fn injected_sidecar() -> Container {
    let policy: VirusScanPolicy = serde_saphyr::from_str(POLICY).unwrap();
    let pod: Pod = serde_saphyr::from_str(POD).unwrap();
    let defaults = InjectDefaults::plain("virus-scanner:test", "redis.virus-scanner.svc");
    let spec = inject(&pod, &policy, &defaults).spec.unwrap();
    spec.init_containers
        .unwrap_or_default()
        .into_iter()
        .chain(spec.containers)
        .find(|c| c.name == SIDECAR)
        .expect("the sidecar was injected")
}

/// The injected sidecar's environment, every name and value as written (`None` for a value
/// from a Secret).
fn injected_sidecar_env() -> Vec<(String, Option<String>)> {
    injected_sidecar()
        .env
        .unwrap_or_default()
        .into_iter()
        .map(|e| (e.name, e.value))
        .collect()
}

/// The injected sidecar's probes: startup, readiness, liveness, each an `exec` command.
fn injected_probe_commands() -> Vec<Vec<String>> {
    let sidecar = injected_sidecar();
    [
        sidecar.startup_probe,
        sidecar.readiness_probe,
        sidecar.liveness_probe,
    ]
    .into_iter()
    .map(|p| {
        let p = p.expect("each probe is set");
        assert!(p.http_get.is_none() && p.tcp_socket.is_none() && p.grpc.is_none());
        p.exec.and_then(|e| e.command).expect("an exec probe")
    })
    .collect()
}

/// The probes run as the kubelet runs them, with the producer binary of the image: they pass
/// against a producer that is up, and fail where nothing answers.
#[test]
fn the_injected_exec_probes_pass_against_a_running_producer_and_fail_without_one() {
    let commands = injected_probe_commands();
    let mut options = StackOptions::new(BodyMode::Buffered);
    options.producer_env = injected_env();
    let stack = Stack::start(options);
    let binary = env!("CARGO_BIN_EXE_virus-scanner-producer");
    let run = |command: &[String], port: u16| {
        assert_eq!(command[0], "virus-scanner-producer", "{command:?}");
        // The pod's ops port is this machine's producer's.
        let mut args: Vec<String> = command[1..].to_vec();
        let at = args
            .iter()
            .position(|a| a == &virus_scan_operator::inject::OPS_PORT.to_string())
            .expect("the probe names the ops port");
        args[at] = port.to_string();
        std::process::Command::new(binary)
            .args(&args)
            .status()
            .unwrap()
            .code()
    };
    for command in &commands {
        assert_eq!(run(command, stack.producer_http), Some(0), "{command:?}");
    }
    let nothing = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    for command in &commands {
        assert_eq!(run(command, nothing), Some(1), "{command:?}");
    }
}

fn injected_env() -> Vec<(String, String)> {
    injected_sidecar_env()
        .into_iter()
        .filter(|(name, _)| !MAPPED.contains(&name.as_str()))
        .map(|(name, value)| {
            let value =
                value.unwrap_or_else(|| panic!("{name} comes from a Secret; this policy has none"));
            (name, value)
        })
        .collect()
}

/// The run below would not notice a setting the producer does not read: it would run with
/// that setting's default. So every name the injector writes, the mapped ones too, must be
/// one the producer declares.
#[test]
fn every_setting_the_injector_writes_is_one_the_producer_reads() {
    use clap::CommandFactory;
    let read: Vec<String> = virus_scanner_producer::ProducerArgs::command()
        .get_arguments()
        .filter_map(|a| a.get_env()?.to_str().map(str::to_owned))
        .collect();
    let written = injected_sidecar_env();
    assert!(!written.is_empty());
    for (name, _) in &written {
        assert!(
            read.contains(name),
            "the injector writes {name}, which the producer does not read"
        );
    }
    // The addresses and paths mapped to this machine are still the producer's settings.
    for name in MAPPED {
        assert!(read.iter().any(|r| r == name), "{name}");
    }
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
