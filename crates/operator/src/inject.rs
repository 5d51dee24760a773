//! What the injector does to a Pod: pure functions from (pod, policies) to a decision and
//! from (pod, policy) to the mutated pod. The webhook turns the difference into a JSON patch.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMapVolumeSource, Container, ContainerPort, EmptyDirVolumeSource, EnvVar,
    EnvVarSource, HTTPGetAction, PersistentVolumeClaimVolumeSource, Pod, Probe,
    ResourceRequirements, SeccompProfile, SecretKeySelector, SecretVolumeSource, SecurityContext,
    Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::ResourceExt;
use sha2::{Digest, Sha256};

use crate::controller::{ANNOTATION_GENERATION, ANNOTATION_POLICY, derived_bootstrap_name};
use crate::crd::{FailureMode, Priority, RangeRequests, RedisSettings, Transport, VirusScanPolicy};
use crate::envoy::SOCKET_DIR;
use crate::selector;

pub const SIDECAR: &str = "virus-scanner-producer";
/// Opt-out: on a pod (annotation or label) `"false"` means never inject.
pub const INJECT: &str = "virusscan.aether-platform.io/inject";
pub const ANNOTATION_HASH: &str = "virusscan.aether-platform.io/injected-hash";
pub const SPOOL_VOLUME: &str = "virus-scanner-spool";
pub const SOCKET_VOLUME: &str = "virus-scanner-socket";
pub const REDIS_CA_VOLUME: &str = "virus-scanner-redis-ca";
pub const SPOOL_DIR: &str = "/var/spool/virus-scanner";
const REDIS_CA_DIR: &str = "/etc/virus-scanner/redis-ca";
/// The sidecar's /health, /ready and /metrics; chosen away from the usual 8080/9901.
pub const OPS_PORT: u16 = 9141;
/// The distroless image's `nonroot` user.
const NON_ROOT_UID: i64 = 65532;

/// Operator-wide defaults for what a policy leaves out.
#[derive(Debug, Clone)]
pub struct InjectDefaults {
    pub image: String,
    pub redis: RedisSettings,
}

#[derive(Debug, PartialEq)]
pub enum Decision<'a> {
    /// Leave the pod as it is, for this reason.
    Skip(&'static str),
    Inject(&'a VirusScanPolicy),
    Deny(String),
}

/// Which policy, if any, injects into `pod`. Two policies selecting one pod is a
/// configuration error the tenant must see: the pod is refused with both names.
pub fn decide<'a>(
    pod: &Pod,
    namespace: &str,
    policies: impl IntoIterator<Item = &'a VirusScanPolicy>,
) -> Decision<'a> {
    let opted_out = |m: &BTreeMap<String, String>| m.get(INJECT).is_some_and(|v| v == "false");
    if opted_out(pod.annotations()) || opted_out(pod.labels()) {
        return Decision::Skip("opted out");
    }
    if has_sidecar(pod) {
        return Decision::Skip("already injected");
    }
    let matching: Vec<&VirusScanPolicy> = policies
        .into_iter()
        .filter(|p| p.namespace().as_deref() == Some(namespace))
        .filter(|p| selector::matches(&p.spec.selector, pod.labels()))
        .collect();
    match matching.as_slice() {
        [] => Decision::Skip("no policy selects the pod"),
        [one] => Decision::Inject(one),
        many => {
            let mut names: Vec<String> = many.iter().map(|p| p.name_any()).collect();
            names.sort();
            Decision::Deny(format!(
                "VirusScanPolicies {} all select this pod; make their selectors disjoint or opt the pod out with annotation {INJECT}: \"false\"",
                names.join(", ")
            ))
        }
    }
}

fn has_sidecar(pod: &Pod) -> bool {
    pod.spec.as_ref().is_some_and(|s| {
        s.containers.iter().any(|c| c.name == SIDECAR)
            || s.init_containers
                .iter()
                .flatten()
                .any(|c| c.name == SIDECAR)
    })
}

/// The pod with the producer sidecar, its volumes, the bootstrap swap and the annotations.
pub fn inject(pod: &Pod, policy: &VirusScanPolicy, defaults: &InjectDefaults) -> Pod {
    let mut pod = pod.clone();
    let sidecar = sidecar(policy, defaults);
    let hash = hex::encode(Sha256::digest(
        serde_json::to_vec(&sidecar).unwrap_or_default(),
    ));
    let spec = pod.spec.get_or_insert_with(Default::default);
    let unix = policy.spec.producer.transport == Transport::UnixSocket;

    let volumes = spec.volumes.get_or_insert_with(Vec::new);
    let spool = match &policy.spec.shared_volume {
        Some(shared) => Volume {
            name: SPOOL_VOLUME.to_owned(),
            persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                claim_name: shared.claim_name.clone(),
                read_only: Some(false),
            }),
            ..Volume::default()
        },
        None => Volume {
            name: SPOOL_VOLUME.to_owned(),
            empty_dir: Some(EmptyDirVolumeSource::default()),
            ..Volume::default()
        },
    };
    volumes.push(spool);
    if unix {
        volumes.push(Volume {
            name: SOCKET_VOLUME.to_owned(),
            empty_dir: Some(EmptyDirVolumeSource::default()),
            ..Volume::default()
        });
        // Envoy in the gateway's containers reaches the producer through the socket.
        for c in &mut spec.containers {
            c.volume_mounts
                .get_or_insert_with(Vec::new)
                .push(VolumeMount {
                    name: SOCKET_VOLUME.to_owned(),
                    mount_path: SOCKET_DIR.to_owned(),
                    ..VolumeMount::default()
                });
        }
    }
    if let Some(ca) = redis_settings(policy, defaults).ca_secret_ref.as_ref() {
        volumes.push(Volume {
            name: REDIS_CA_VOLUME.to_owned(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(ca.name.clone()),
                ..SecretVolumeSource::default()
            }),
            ..Volume::default()
        });
    }
    // Bootstrap merge: the tenant's bootstrap volume now shows the derived ConfigMap,
    // which carries the same key, so the mount and any `items` stay valid.
    if let Some(bootstrap) = &policy.spec.envoy.bootstrap {
        for v in volumes.iter_mut() {
            if let Some(cm) = v.config_map.as_mut()
                && cm.name == bootstrap.name
            {
                *cm = ConfigMapVolumeSource {
                    name: derived_bootstrap_name(&policy.name_any()),
                    ..cm.clone()
                };
            }
        }
    }

    if policy.spec.producer.native_sidecar {
        // A restartable init container starts before the app containers and stops after
        // them, so Envoy never runs without its processor.
        let mut init = sidecar;
        init.restart_policy = Some("Always".to_owned());
        spec.init_containers
            .get_or_insert_with(Vec::new)
            .insert(0, init);
    } else {
        spec.containers.push(sidecar);
    }

    let annotations = pod.metadata.annotations.get_or_insert_with(BTreeMap::new);
    annotations.insert(ANNOTATION_POLICY.to_owned(), policy.name_any());
    annotations.insert(
        ANNOTATION_GENERATION.to_owned(),
        policy.metadata.generation.unwrap_or_default().to_string(),
    );
    annotations.insert(ANNOTATION_HASH.to_owned(), hash);
    pod
}

fn redis_settings<'a>(
    policy: &'a VirusScanPolicy,
    defaults: &'a InjectDefaults,
) -> &'a RedisSettings {
    policy.spec.redis.as_ref().unwrap_or(&defaults.redis)
}

fn env(name: &str, value: impl ToString) -> EnvVar {
    EnvVar {
        name: name.to_owned(),
        value: Some(value.to_string()),
        value_from: None,
    }
}

fn sidecar(policy: &VirusScanPolicy, defaults: &InjectDefaults) -> Container {
    let spec = &policy.spec;
    let scan = &spec.scan;
    let redis = redis_settings(policy, defaults);
    let mut envs = vec![
        env("REDIS_HOST", &redis.host),
        env("REDIS_PORT", redis.port),
        env("SCAN_TMP_DIR", SPOOL_DIR),
        env("SCAN_FILE_THRESHOLD_MB", scan.file_threshold_mb),
        env("MAX_BODY_MB", scan.max_body_mb),
        env("SCAN_TIMEOUT_SECONDS", scan.timeout_seconds),
        env("FAIL_OPEN", scan.failure_mode == FailureMode::FailOpen),
        env("ALLOW_UNSCANNABLE", scan.allow_unscannable),
        env("INFECTED_STATUS", scan.infected_status_code),
        env(
            "DEFAULT_PRIORITY",
            match scan.default_priority {
                Priority::Normal => "normal",
                Priority::High => "high",
            },
        ),
        env("TENANT", policy.namespace().unwrap_or_default()),
        env("POLICY", policy.name_any()),
        env("HTTP_ADDR", format!("0.0.0.0:{OPS_PORT}")),
        // The gateway speaks ext_proc; ICAP stays on loopback, out of reach of other pods
        // that could otherwise submit scans as this tenant.
        env("ICAP_ADDR", "127.0.0.1:0"),
        // Without a shared volume the spool is this pod's emptyDir, which no scanner can
        // open: a body queued by path there could never be scanned.
        env("SPOOL_SHARED", spec.shared_volume.is_some()),
        env(
            "RANGE_REQUESTS",
            match scan.range_requests {
                RangeRequests::Strip => "strip",
                RangeRequests::Refuse => "refuse",
                RangeRequests::Allow => "allow",
            },
        ),
        env("EMBEDDED_FILES", scan.embedded_files),
    ];
    if redis.tls {
        envs.push(env("REDIS_TLS", true));
    }
    if let Some(secret) = &redis.password_secret_ref {
        envs.push(EnvVar {
            name: "REDIS_PASSWORD".to_owned(),
            value: None,
            value_from: Some(EnvVarSource {
                secret_key_ref: Some(SecretKeySelector {
                    name: secret.name.clone(),
                    key: secret.key.clone(),
                    optional: Some(false),
                }),
                ..EnvVarSource::default()
            }),
        });
    }
    let mut mounts = vec![VolumeMount {
        name: SPOOL_VOLUME.to_owned(),
        mount_path: SPOOL_DIR.to_owned(),
        ..VolumeMount::default()
    }];
    if let Some(ca) = &redis.ca_secret_ref {
        envs.push(env("REDIS_CA_FILE", format!("{REDIS_CA_DIR}/{}", ca.key)));
        mounts.push(VolumeMount {
            name: REDIS_CA_VOLUME.to_owned(),
            mount_path: REDIS_CA_DIR.to_owned(),
            read_only: Some(true),
            ..VolumeMount::default()
        });
    }
    let mut ports = vec![ContainerPort {
        name: Some("vs-ops".to_owned()),
        container_port: i32::from(OPS_PORT),
        protocol: Some("TCP".to_owned()),
        ..ContainerPort::default()
    }];
    match spec.producer.transport {
        Transport::Tcp => {
            // Envoy is in the same pod: the processor listens on loopback only.
            envs.push(env(
                "GRPC_ADDR",
                format!("127.0.0.1:{}", spec.producer.port),
            ));
            ports.push(ContainerPort {
                name: Some("vs-grpc".to_owned()),
                container_port: i32::from(spec.producer.port),
                protocol: Some("TCP".to_owned()),
                ..ContainerPort::default()
            });
        }
        Transport::UnixSocket => {
            envs.push(env("GRPC_ADDR", "127.0.0.1:0"));
            envs.push(env("GRPC_SOCKET", crate::envoy::SOCKET_PATH));
            mounts.push(VolumeMount {
                name: SOCKET_VOLUME.to_owned(),
                mount_path: SOCKET_DIR.to_owned(),
                ..VolumeMount::default()
            });
        }
    }
    let probe = |path: &str, failures: i32| Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.to_owned()),
            port: IntOrString::Int(i32::from(OPS_PORT)),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(if path == "/health" { 10 } else { 2 }),
        failure_threshold: Some(failures),
        timeout_seconds: Some(2),
        ..Probe::default()
    };
    Container {
        name: SIDECAR.to_owned(),
        image: Some(
            spec.producer
                .image
                .clone()
                .unwrap_or_else(|| defaults.image.clone()),
        ),
        command: Some(vec!["virus-scanner-producer".to_owned()]),
        env: Some(envs),
        ports: Some(ports),
        startup_probe: Some(probe("/ready", 60)),
        readiness_probe: Some(probe("/ready", 3)),
        liveness_probe: Some(probe("/health", 3)),
        resources: Some(
            spec.producer
                .resources
                .clone()
                .unwrap_or_else(default_resources),
        ),
        security_context: Some(restricted_security_context()),
        volume_mounts: Some(mounts),
        ..Container::default()
    }
}

fn default_resources() -> ResourceRequirements {
    let q = |s: &str| Quantity(s.to_owned());
    ResourceRequirements {
        requests: Some(BTreeMap::from([
            ("cpu".to_owned(), q("50m")),
            ("memory".to_owned(), q("64Mi")),
        ])),
        limits: Some(BTreeMap::from([("memory".to_owned(), q("256Mi"))])),
        ..ResourceRequirements::default()
    }
}

/// What the `restricted` Pod Security Standard asks of every container.
pub fn restricted_security_context() -> SecurityContext {
    SecurityContext {
        allow_privilege_escalation: Some(false),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".to_owned()]),
            add: None,
        }),
        privileged: Some(false),
        read_only_root_filesystem: Some(true),
        run_as_non_root: Some(true),
        run_as_user: Some(NON_ROOT_UID),
        run_as_group: Some(NON_ROOT_UID),
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".to_owned(),
            localhost_profile: None,
        }),
        ..SecurityContext::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn policy(name: &str, spec: serde_json::Value) -> VirusScanPolicy {
        let mut p: VirusScanPolicy = serde_json::from_value(json!({
            "apiVersion": "virusscan.aether-platform.io/v1alpha1",
            "kind": "VirusScanPolicy",
            "metadata": { "name": name, "namespace": "t", "generation": 3 },
            "spec": spec
        }))
        .expect("policy");
        p.metadata.uid = Some(format!("uid-{name}"));
        p
    }

    fn pod(labels: serde_json::Value, annotations: serde_json::Value) -> Pod {
        serde_json::from_value(json!({
            "metadata": { "name": "gw", "labels": labels, "annotations": annotations },
            "spec": {
                "containers": [{ "name": "envoy", "image": "envoy" }],
                "volumes": [{ "name": "config", "configMap": { "name": "gw-envoy" } }]
            }
        }))
        .expect("pod")
    }

    fn defaults() -> InjectDefaults {
        InjectDefaults {
            image: "producer:1".to_owned(),
            redis: RedisSettings {
                host: "redis.vs.svc".to_owned(),
                port: 6379,
                tls: false,
                password_secret_ref: None,
                ca_secret_ref: None,
            },
        }
    }

    #[test]
    fn one_matching_policy_injects_a_native_sidecar_once() {
        let policies = [policy(
            "p",
            json!({"selector": {"matchLabels": {"app": "gw"}}}),
        )];
        let p = pod(json!({"app": "gw"}), json!({}));
        let Decision::Inject(chosen) = decide(&p, "t", &policies) else {
            panic!("no injection")
        };
        let injected = inject(&p, chosen, &defaults());
        let spec = injected.spec.as_ref().expect("spec");
        let init = spec.init_containers.as_ref().expect("init");
        assert_eq!(init[0].name, SIDECAR);
        assert_eq!(init[0].restart_policy.as_deref(), Some("Always"));
        assert_eq!(init[0].image.as_deref(), Some("producer:1"));
        assert_eq!(spec.containers.len(), 1);
        let a = injected.annotations();
        assert_eq!(a[ANNOTATION_POLICY], "p");
        assert_eq!(a[ANNOTATION_GENERATION], "3");
        assert_eq!(a[ANNOTATION_HASH].len(), 64);
        assert_eq!(
            decide(&injected, "t", &policies),
            Decision::Skip("already injected")
        );
    }

    #[test]
    fn opt_out_other_namespace_and_no_match_are_left_alone() {
        let policies = [policy(
            "p",
            json!({"selector": {"matchLabels": {"app": "gw"}}}),
        )];
        let out = pod(json!({"app": "gw"}), json!({INJECT: "false"}));
        assert_eq!(decide(&out, "t", &policies), Decision::Skip("opted out"));
        let p = pod(json!({"app": "gw"}), json!({}));
        assert!(matches!(decide(&p, "other", &policies), Decision::Skip(_)));
        let q = pod(json!({"app": "db"}), json!({}));
        assert!(matches!(decide(&q, "t", &policies), Decision::Skip(_)));
    }

    #[test]
    fn two_matching_policies_deny_with_both_names() {
        let policies = [
            policy("b", json!({"selector": {}})),
            policy("a", json!({"selector": {"matchLabels": {"app": "gw"}}})),
        ];
        let Decision::Deny(why) = decide(&pod(json!({"app": "gw"}), json!({})), "t", &policies)
        else {
            panic!("not denied")
        };
        assert!(why.contains("a, b"), "{why}");
    }

    fn sidecar_env(policy: &VirusScanPolicy) -> BTreeMap<String, String> {
        let injected = inject(&pod(json!({}), json!({})), policy, &defaults());
        let spec = injected.spec.expect("spec");
        let sidecar = spec
            .init_containers
            .iter()
            .flatten()
            .chain(&spec.containers)
            .find(|c| c.name == SIDECAR)
            .expect("sidecar");
        sidecar
            .env
            .iter()
            .flatten()
            .filter_map(|e| Some((e.name.clone(), e.value.clone()?)))
            .collect()
    }

    #[test]
    fn only_the_probe_and_metrics_port_listens_beyond_loopback() {
        let env = sidecar_env(&policy("p", json!({"selector": {}})));
        assert_eq!(env["ICAP_ADDR"], "127.0.0.1:0");
        assert!(env["GRPC_ADDR"].starts_with("127.0.0.1:"), "{env:?}");
        assert_eq!(env["HTTP_ADDR"], format!("0.0.0.0:{OPS_PORT}"));
    }

    #[test]
    fn spool_is_shared_with_the_scanners_only_on_a_shared_volume() {
        let local = sidecar_env(&policy("p", json!({"selector": {}})));
        assert_eq!(local["SPOOL_SHARED"], "false");
        let shared = sidecar_env(&policy(
            "p",
            json!({"selector": {}, "sharedVolume": {"claimName": "spool"}}),
        ));
        assert_eq!(shared["SPOOL_SHARED"], "true");
    }

    #[test]
    fn range_requests_and_embedded_files_follow_the_policy() {
        let defaults = sidecar_env(&policy("p", json!({"selector": {}})));
        assert_eq!(defaults["RANGE_REQUESTS"], "strip");
        assert_eq!(defaults["EMBEDDED_FILES"], "true");
        for (value, env) in [("Strip", "strip"), ("Refuse", "refuse"), ("Allow", "allow")] {
            let p = policy(
                "p",
                json!({"selector": {}, "scan": {"rangeRequests": value, "embeddedFiles": false}}),
            );
            let got = sidecar_env(&p);
            assert_eq!(got["RANGE_REQUESTS"], env);
            assert_eq!(got["EMBEDDED_FILES"], "false");
        }
    }

    #[test]
    fn unix_socket_bootstrap_swap_and_regular_container() {
        let p = policy(
            "p",
            json!({
                "selector": {},
                "producer": {"transport": "UnixSocket", "nativeSidecar": false},
                "envoy": {"bootstrap": {"name": "gw-envoy", "key": "envoy.yaml"}},
                "redis": {"host": "r", "passwordSecretRef": {"name": "s", "key": "k"}}
            }),
        );
        let injected = inject(&pod(json!({}), json!({})), &p, &defaults());
        let spec = injected.spec.expect("spec");
        assert!(spec.init_containers.is_none());
        assert_eq!(spec.containers[1].name, SIDECAR);
        let envoy_mounts = spec.containers[0].volume_mounts.as_ref().expect("mounts");
        assert_eq!(envoy_mounts[0].mount_path, SOCKET_DIR);
        let volumes = spec.volumes.expect("volumes");
        let config = volumes.iter().find(|v| v.name == "config").expect("config");
        assert_eq!(
            config.config_map.as_ref().expect("cm").name,
            "vsp-p-bootstrap"
        );
        let env = spec.containers[1].env.as_ref().expect("env");
        let password = env.iter().find(|e| e.name == "REDIS_PASSWORD").expect("pw");
        assert!(password.value.is_none());
        assert!(env.iter().any(|e| e.name == "GRPC_SOCKET"));
        assert!(
            env.iter()
                .any(|e| e.name == "REDIS_HOST" && e.value.as_deref() == Some("r"))
        );
    }
}
