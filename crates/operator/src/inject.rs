//! What the injector does to a Pod: pure functions from (pod, policies) to a decision and
//! from (pod, policy) to the mutated pod. The webhook turns the difference into a JSON patch.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMapVolumeSource, Container, ContainerPort, EmptyDirVolumeSource, EnvVar,
    EnvVarSource, ExecAction, PersistentVolumeClaimVolumeSource, Pod, Probe, ResourceRequirements,
    SeccompProfile, SecretKeySelector, SecretVolumeSource, SecurityContext, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::ResourceExt;
use sha2::{Digest, Sha256};
use virus_scanner_runtime::sidecar_env;

use crate::crd::{FailureMode, Priority, RangeRequests, RedisSettings, Transport, VirusScanPolicy};
use crate::envoy::SOCKET_DIR;
use crate::selector;

pub const SIDECAR: &str = "virus-scanner-producer";
/// Opt-out: on a pod (annotation or label) `"false"` means never inject.
pub const INJECT: &str = "virusscan.aether-platform.io/inject";
pub const ANNOTATION_HASH: &str = "virusscan.aether-platform.io/injected-hash";
/// The prefix of the Secret that holds a tenant's Redis credentials: `virus-scanner-redis-<ns>`
/// ([`secret_name`]), in the tenant's namespace and, for its Envoy Gateway proxies that run
/// in Envoy Gateway's own namespace, a copy there. The injector names it for the policy's
/// namespace wherever the pod runs.
pub const SECRET_NAME: &str = "virus-scanner-redis";

/// The Secret of `namespace`'s Redis credentials.
pub fn secret_name(namespace: &str) -> String {
    format!("{SECRET_NAME}-{namespace}")
}

/// Pod annotations the injector writes: the policy and its generation.
pub const ANNOTATION_POLICY: &str = "virusscan.aether-platform.io/policy";
pub const ANNOTATION_GENERATION: &str = "virusscan.aether-platform.io/policy-generation";

/// The ConfigMap the operator derives from a tenant's bootstrap, mounted in its place.
pub fn derived_bootstrap_name(policy: &str) -> String {
    format!("vsp-{policy}-bootstrap")
}
/// The label of every pod the injector gave the sidecar.
pub const LABEL_SIDECAR: &str = "virusscan.aether-platform.io/sidecar";
pub const SPOOL_VOLUME: &str = "virus-scanner-spool";
pub const SOCKET_VOLUME: &str = "virus-scanner-socket";
pub const REDIS_CA_VOLUME: &str = "virus-scanner-redis-ca";
pub const SPOOL_DIR: &str = "/var/spool/virus-scanner";
const REDIS_CA_DIR: &str = "/etc/virus-scanner/redis-ca";
/// The sidecar's /health, /ready and /metrics; chosen away from the usual 8080/9901.
pub const OPS_PORT: u16 = 9141;
/// The distroless image's `nonroot` user.
const NON_ROOT_UID: i64 = 65532;
/// The sidecars on a shared spool run as uids (and gids) of `[2^30, 2^31)`, one per tenant:
/// see [`spool_uid`].
const SPOOL_UID_BASE: u64 = 1 << 30;

/// The uid (and gid) of the sidecars of `namespace` on a shared spool volume: stable, so
/// that the tenant's directory there stays its own across pods and restarts, and derived
/// from the namespace alone (the first 8 bytes of its SHA-256, big-endian, modulo 2^30, plus
/// 2^30), so that an administrator can compute it to create the directory ahead.
///
/// On the volume each tenant's producer is a uid of its own: another tenant's cannot enter
/// its directory, nor read, rename or remove its files. The consumers read them through the
/// volume's group, which no sidecar is given (see the producer's `body` module for why a
/// group and not a capability). Two namespaces share a uid with a chance of about n²/2^31
/// for n tenants; such a pair is separated by its subPath mounts alone.
pub fn spool_uid(namespace: &str) -> i64 {
    let digest = Sha256::digest(namespace.as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    (SPOOL_UID_BASE + u64::from_be_bytes(first) % SPOOL_UID_BASE) as i64
}

/// Operator-wide defaults for what a policy leaves out.
#[derive(Debug, Clone)]
pub struct InjectDefaults {
    pub image: String,
    pub redis: RedisSettings,
}

impl InjectDefaults {
    /// `image`, and a Redis at `host:6379` without TLS or credentials (a local stack, tests).
    pub fn plain(image: &str, host: &str) -> InjectDefaults {
        InjectDefaults {
            image: image.to_owned(),
            redis: RedisSettings {
                host: host.to_owned(),
                port: 6379,
                tls: false,
                username_secret_ref: None,
                password_secret_ref: None,
                ca_secret_ref: None,
            },
        }
    }
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
    defaults: &InjectDefaults,
) -> Decision<'a> {
    if opted_out(pod) {
        return Decision::Skip("opted out");
    }
    let matching: Vec<&VirusScanPolicy> = policies
        .into_iter()
        .filter(|p| p.namespace().as_deref() == Some(namespace))
        .filter(|p| selector::matches(&p.spec.selector, pod.labels()))
        .collect();
    match matching.as_slice() {
        [] => Decision::Skip("no policy selects the pod"),
        // A container named like the sidecar, or an annotation, proves nothing: anyone can
        // write them into a pod. Only the sidecar this policy injects, recorded as such, is
        // left alone; anything else is injected over.
        [one] => match check(pod, one, defaults) {
            Injection::Verified => Decision::Skip("already injected"),
            Injection::Absent | Injection::Mismatch => Decision::Inject(one),
        },
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

/// The namespace whose policies decide on a pod, and whether only Envoy Gateway policies
/// may. Envoy Gateway runs a Gateway's proxies in its own namespace (`envoy_gateway`, the
/// operator's `ENVOY_GATEWAY_NAMESPACE`) unless its deploy mode is `GatewayNamespace`, and
/// labels them with the Gateway's namespace: such a pod is decided by the policies of that
/// namespace whose gateway is Envoy Gateway. Only pods in that namespace are read so, as only
/// Envoy Gateway and the administrators make pods there; any other pod is decided by its own
/// namespace's policies.
pub fn deciding_namespace<'a>(
    pod: &'a Pod,
    namespace: &'a str,
    envoy_gateway: Option<&str>,
) -> (&'a str, bool) {
    if envoy_gateway == Some(namespace)
        && let Some(owner) = pod
            .labels()
            .get(crate::gateways::EG_OWNING_GATEWAY_NAMESPACE)
            .filter(|_| {
                pod.labels()
                    .contains_key(crate::gateways::EG_OWNING_GATEWAY_NAME)
            })
    {
        return (owner.as_str(), true);
    }
    (namespace, false)
}

/// On a pod, annotation or label [`INJECT`] `"false"`: never inject.
pub fn opted_out(pod: &Pod) -> bool {
    let off = |m: &BTreeMap<String, String>| m.get(INJECT).is_some_and(|v| v == "false");
    off(pod.annotations()) || off(pod.labels())
}

/// What a pod carries of an injection, against what `policy` injects now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Injection {
    /// No container named [`SIDECAR`] and no injection annotation.
    Absent,
    /// Exactly one sidecar, the one `policy` injects, where it puts it, and the annotations
    /// name the policy and record that sidecar's hash.
    Verified,
    /// A sidecar or an injection annotation that is not what `policy` injects now: written
    /// by hand, edited, copied from another pod, or injected from an older generation.
    Mismatch,
}

/// Recomputes what `policy` injects and compares it with the pod's sidecar and with the
/// hash the injector recorded in [`ANNOTATION_HASH`]. The webhook skips only a `Verified`
/// pod, and the controller counts only those as injected.
pub fn check(pod: &Pod, policy: &VirusScanPolicy, defaults: &InjectDefaults) -> Injection {
    let found: Vec<(bool, &Container)> = pod
        .spec
        .iter()
        .flat_map(|s| {
            let init = s.init_containers.iter().flatten().map(|c| (true, c));
            init.chain(s.containers.iter().map(|c| (false, c)))
        })
        .filter(|(_, c)| c.name == SIDECAR)
        .collect();
    let annotations = pod.annotations();
    let recorded = annotations.get(ANNOTATION_HASH);
    let named = annotations.get(ANNOTATION_POLICY);
    if found.is_empty() && recorded.is_none() && named.is_none() {
        return Injection::Absent;
    }
    let expected = injection_hash(
        &placed_sidecar(policy, defaults),
        policy.spec.producer.native_sidecar,
    );
    match found.as_slice() {
        [(native, container)]
            if named == Some(&policy.name_any())
                && recorded == Some(&expected)
                && injection_hash(container, *native) == expected =>
        {
            Injection::Verified
        }
        _ => Injection::Mismatch,
    }
}

/// The hash recorded in [`ANNOTATION_HASH`]: of the sidecar container and whether it runs
/// as a native sidecar. What decides what runs and how (image, command, arguments,
/// environment, mounts, security context) is in it. Left out is what the API server fills
/// in or rewrites when it stores a pod (pull policy, termination message, probe and port
/// defaults, requests copied from limits, quantities in canonical form), so that a pod read
/// back hashes as it was injected.
pub fn injection_hash(container: &Container, native: bool) -> String {
    let mut c = container.clone();
    c.image_pull_policy = None;
    c.termination_message_path = None;
    c.termination_message_policy = None;
    c.startup_probe = None;
    c.readiness_probe = None;
    c.liveness_probe = None;
    c.resources = None;
    c.ports = None;
    // Go's `bool` and `string` fields with `omitempty`: false and "" are not stored.
    for m in c.volume_mounts.iter_mut().flatten() {
        m.read_only = m.read_only.filter(|r| *r);
        m.sub_path = m.sub_path.take().filter(|p| !p.is_empty());
        m.sub_path_expr = m.sub_path_expr.take().filter(|p| !p.is_empty());
    }
    hex::encode(Sha256::digest(
        serde_json::to_vec(&(native, &c)).unwrap_or_default(),
    ))
}

/// Takes out whatever an earlier injection, real or not, left in the pod: containers named
/// [`SIDECAR`], the injector's volumes and the socket mounts of the other containers.
fn remove_injection(pod: &mut Pod) {
    let Some(spec) = pod.spec.as_mut() else {
        return;
    };
    let ours = [SPOOL_VOLUME, SOCKET_VOLUME, REDIS_CA_VOLUME];
    spec.containers.retain(|c| c.name != SIDECAR);
    if let Some(init) = spec.init_containers.as_mut() {
        init.retain(|c| c.name != SIDECAR);
    }
    if let Some(volumes) = spec.volumes.as_mut() {
        volumes.retain(|v| !ours.contains(&v.name.as_str()));
    }
    let others = spec
        .containers
        .iter_mut()
        .chain(spec.init_containers.iter_mut().flatten());
    for c in others {
        if let Some(mounts) = c.volume_mounts.as_mut() {
            mounts.retain(|m| !ours.contains(&m.name.as_str()));
        }
    }
}

/// The pod with the producer sidecar, its volumes, the bootstrap swap and the annotations.
/// Anything an earlier injection left is replaced, so the result always [`check`]s.
pub fn inject(pod: &Pod, policy: &VirusScanPolicy, defaults: &InjectDefaults) -> Pod {
    let mut pod = pod.clone();
    remove_injection(&mut pod);
    let sidecar = placed_sidecar(policy, defaults);
    let hash = injection_hash(&sidecar, policy.spec.producer.native_sidecar);
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
        spec.init_containers
            .get_or_insert_with(Vec::new)
            .insert(0, sidecar);
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
    // What the chart's NetworkPolicy lets reach Redis. A label is no credential (a tenant can
    // put it on any pod it runs): the tenant's Redis user is.
    pod.metadata
        .labels
        .get_or_insert_with(BTreeMap::new)
        .insert(LABEL_SIDECAR.to_owned(), "injected".to_owned());
    pod
}

/// The policy's Redis, or the operator's with the policy's namespace's own credentials:
/// the Secret `virus-scanner-redis-<policy namespace>` (a copy of which the operator keeps
/// where Envoy Gateway runs that namespace's proxies).
fn redis_settings(policy: &VirusScanPolicy, defaults: &InjectDefaults) -> RedisSettings {
    if let Some(own) = &policy.spec.redis {
        return own.clone();
    }
    let mut redis = defaults.redis.clone();
    let name = secret_name(&policy.namespace().unwrap_or_default());
    for secret in [
        &mut redis.username_secret_ref,
        &mut redis.password_secret_ref,
        &mut redis.ca_secret_ref,
    ]
    .into_iter()
    .flatten()
    {
        if secret.name == SECRET_NAME {
            secret.name = name.clone();
        }
    }
    redis
}

fn env(name: &str, value: impl ToString) -> EnvVar {
    EnvVar {
        name: name.to_owned(),
        value: Some(value.to_string()),
        value_from: None,
    }
}

/// The sidecar as it is placed in the pod.
fn placed_sidecar(policy: &VirusScanPolicy, defaults: &InjectDefaults) -> Container {
    let mut sidecar = sidecar(policy, defaults);
    if policy.spec.producer.native_sidecar {
        // A restartable init container starts before the app containers and stops after
        // them, so Envoy never runs without its processor.
        sidecar.restart_policy = Some("Always".to_owned());
    }
    sidecar
}

fn sidecar(policy: &VirusScanPolicy, defaults: &InjectDefaults) -> Container {
    let spec = &policy.spec;
    let scan = &spec.scan;
    let redis = redis_settings(policy, defaults);
    let mut envs = vec![
        env(sidecar_env::REDIS_HOST, &redis.host),
        env(sidecar_env::REDIS_PORT, redis.port),
        env(sidecar_env::SCAN_TMP_DIR, SPOOL_DIR),
        env(sidecar_env::SCAN_FILE_THRESHOLD_MB, scan.file_threshold_mb),
        env(sidecar_env::MAX_BODY_MB, scan.max_body_mb),
        env(sidecar_env::SCAN_TIMEOUT_SECONDS, scan.timeout_seconds),
        env(
            sidecar_env::FAIL_OPEN,
            scan.failure_mode == FailureMode::FailOpen,
        ),
        env(sidecar_env::ALLOW_UNSCANNABLE, scan.allow_unscannable),
        env(sidecar_env::INFECTED_STATUS, scan.infected_status_code),
        env(
            sidecar_env::DEFAULT_PRIORITY,
            match scan.default_priority {
                Priority::Normal => "normal",
                Priority::High => "high",
            },
        ),
        env(sidecar_env::TENANT, policy.namespace().unwrap_or_default()),
        env(sidecar_env::POLICY, policy.name_any()),
        env(sidecar_env::HTTP_ADDR, format!("0.0.0.0:{OPS_PORT}")),
        // The gateway speaks ext_proc; ICAP runs only when the policy asks, and on loopback,
        // out of reach of other pods that could otherwise submit scans as this tenant.
        env(sidecar_env::ICAP_ENABLED, spec.producer.icap),
        env(sidecar_env::ICAP_ADDR, "127.0.0.1:1344"),
        // Without a shared volume the spool is this pod's emptyDir, which no scanner can
        // open: a body queued by path there could never be scanned.
        env(sidecar_env::SPOOL_SHARED, spec.shared_volume.is_some()),
        env(
            sidecar_env::RANGE_REQUESTS,
            match scan.range_requests {
                RangeRequests::Strip => "strip",
                RangeRequests::Refuse => "refuse",
                RangeRequests::Allow => "allow",
            },
        ),
        env(sidecar_env::EMBEDDED_FILES, scan.embedded_files),
    ];
    if redis.tls {
        envs.push(env(sidecar_env::REDIS_TLS, true));
    }
    for (name, secret) in [
        (sidecar_env::REDIS_USERNAME, &redis.username_secret_ref),
        (sidecar_env::REDIS_PASSWORD, &redis.password_secret_ref),
    ] {
        let Some(secret) = secret else { continue };
        // Not optional: without its credentials the sidecar does not start, and neither does
        // the gateway's pod with it.
        envs.push(EnvVar {
            name: name.to_owned(),
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
    let mut mounts = vec![spool_mount(policy)];
    if let Some(ca) = &redis.ca_secret_ref {
        envs.push(env(
            sidecar_env::REDIS_CA_FILE,
            format!("{REDIS_CA_DIR}/{}", ca.key),
        ));
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
                sidecar_env::GRPC_ADDR,
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
            envs.push(env(sidecar_env::GRPC_ADDR, "127.0.0.1:0"));
            envs.push(env(sidecar_env::GRPC_SOCKET, crate::envoy::SOCKET_PATH));
            mounts.push(VolumeMount {
                name: SOCKET_VOLUME.to_owned(),
                mount_path: SOCKET_DIR.to_owned(),
                ..VolumeMount::default()
            });
        }
    }
    // `exec`, not `httpGet`: a mesh rewrites HTTP and TCP probes through its own agent
    // (Istio: pilot-agent in istio-proxy), which in a gateway pod starts after this native
    // sidecar, so a rewritten startup probe would keep the pod from ever starting.
    let probe = |path: &str, failures: i32| Probe {
        exec: Some(ExecAction {
            command: Some(vec![
                "virus-scanner-producer".to_owned(),
                virus_scanner_runtime::probe::PROBE_COMMAND.to_owned(),
                OPS_PORT.to_string(),
                path.to_owned(),
            ]),
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
        security_context: Some(sidecar_security_context(policy)),
        volume_mounts: Some(mounts),
        ..Container::default()
    }
}

/// The spool: the pod's emptyDir at [`SPOOL_DIR`]; or, on a shared volume, only the
/// tenant's directory of it (`subPath: <namespace>`) at `SPOOL_DIR/<namespace>`, where the
/// producer (`SCAN_TMP_DIR=SPOOL_DIR`, `TENANT=<namespace>`) spills and where the consumers,
/// which mount the whole volume at [`SPOOL_DIR`], find its files under the same path. The
/// sidecar never sees another tenant's directory.
fn spool_mount(policy: &VirusScanPolicy) -> VolumeMount {
    let namespace = policy.namespace().unwrap_or_default();
    match &policy.spec.shared_volume {
        Some(_) if !namespace.is_empty() => VolumeMount {
            name: SPOOL_VOLUME.to_owned(),
            mount_path: format!("{SPOOL_DIR}/{namespace}"),
            sub_path: Some(namespace),
            ..VolumeMount::default()
        },
        _ => VolumeMount {
            name: SPOOL_VOLUME.to_owned(),
            mount_path: SPOOL_DIR.to_owned(),
            ..VolumeMount::default()
        },
    }
}

/// [`restricted_security_context`], as the tenant's own uid and gid ([`spool_uid`]) on a
/// shared spool volume.
fn sidecar_security_context(policy: &VirusScanPolicy) -> SecurityContext {
    let mut context = restricted_security_context();
    if policy.spec.shared_volume.is_some() {
        let uid = spool_uid(&policy.namespace().unwrap_or_default());
        context.run_as_user = Some(uid);
        context.run_as_group = Some(uid);
    }
    context
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
        InjectDefaults::plain("producer:1", "redis.vs.svc")
    }

    #[test]
    fn one_matching_policy_injects_a_native_sidecar_once() {
        let policies = [policy(
            "p",
            json!({"selector": {"matchLabels": {"app": "gw"}}}),
        )];
        let p = pod(json!({"app": "gw"}), json!({}));
        let Decision::Inject(chosen) = decide(&p, "t", &policies, &defaults()) else {
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
            decide(&injected, "t", &policies, &defaults()),
            Decision::Skip("already injected")
        );
    }

    /// A pod whose sidecar is `container` under annotations that claim policy `p`, with a
    /// hash made the way the injector makes it: the strongest forgery a tenant can write.
    fn forged(container: serde_json::Value, generation: &str) -> Pod {
        let mut p = pod(json!({"app": "gw"}), json!({}));
        let fake: Container = serde_json::from_value(container).expect("container");
        let hash = injection_hash(&fake, true);
        p.spec.as_mut().expect("spec").init_containers = Some(vec![fake]);
        p.metadata.annotations = Some(BTreeMap::from([
            (ANNOTATION_POLICY.to_owned(), "p".to_owned()),
            (ANNOTATION_GENERATION.to_owned(), generation.to_owned()),
            (ANNOTATION_HASH.to_owned(), hash),
        ]));
        p
    }

    fn sidecars(pod: &Pod) -> Vec<&Container> {
        let spec = pod.spec.as_ref().expect("spec");
        spec.init_containers
            .iter()
            .flatten()
            .chain(&spec.containers)
            .filter(|c| c.name == SIDECAR)
            .collect()
    }

    #[test]
    fn a_sidecar_named_container_under_a_forged_record_is_injected_over() {
        let policies = [policy(
            "p",
            json!({"selector": {"matchLabels": {"app": "gw"}}}),
        )];
        let fake = forged(
            json!({"name": SIDECAR, "image": "busybox", "command": ["sleep", "inf"],
                   "restartPolicy": "Always"}),
            "3",
        );
        assert_eq!(check(&fake, &policies[0], &defaults()), Injection::Mismatch);
        let Decision::Inject(chosen) = decide(&fake, "t", &policies, &defaults()) else {
            panic!("a fake sidecar was taken for the real one")
        };
        let fixed = inject(&fake, chosen, &defaults());
        let found = sidecars(&fixed);
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].image.as_deref(), Some("producer:1"));
        assert_eq!(
            check(&fixed, &policies[0], &defaults()),
            Injection::Verified
        );
        assert_ne!(
            fixed.annotations()[ANNOTATION_HASH],
            fake.annotations()[ANNOTATION_HASH]
        );

        // The real sidecar with one setting changed is no more the real one.
        let mut edited = fixed.clone();
        let init = edited.spec.as_mut().expect("spec").init_containers.as_mut();
        let env = init.expect("init")[0].env.as_mut().expect("env");
        env.iter_mut()
            .filter(|e| e.name == "FAIL_OPEN")
            .for_each(|e| e.value = Some("true".to_owned()));
        let recorded = injection_hash(sidecars(&edited)[0], true);
        edited
            .metadata
            .annotations
            .as_mut()
            .expect("annotations")
            .insert(ANNOTATION_HASH.to_owned(), recorded);
        assert_eq!(
            check(&edited, &policies[0], &defaults()),
            Injection::Mismatch
        );
        assert!(matches!(
            decide(&edited, "t", &policies, &defaults()),
            Decision::Inject(_)
        ));

        // Annotations alone, or a second copy of the real sidecar, are not an injection.
        let mut bare = pod(json!({"app": "gw"}), json!({}));
        bare.metadata.annotations = fixed.metadata.annotations.clone();
        assert_eq!(check(&bare, &policies[0], &defaults()), Injection::Mismatch);
        let mut twice = fixed.clone();
        let real = sidecars(&fixed)[0].clone();
        twice.spec.as_mut().expect("spec").containers.push(real);
        assert_eq!(
            check(&twice, &policies[0], &defaults()),
            Injection::Mismatch
        );
        assert_eq!(
            sidecars(&inject(&twice, &policies[0], &defaults())).len(),
            1
        );
    }

    #[test]
    fn an_injected_pod_as_the_api_server_stores_it_still_checks() {
        let p = policy(
            "p",
            json!({"selector": {}, "producer": {"resources": {"limits": {"cpu": "0.5"}}}}),
        );
        let mut stored = inject(&pod(json!({}), json!({})), &p, &defaults());
        let init = stored.spec.as_mut().expect("spec").init_containers.as_mut();
        let sidecar = &mut init.expect("init")[0];
        sidecar.image_pull_policy = Some("IfNotPresent".to_owned());
        sidecar.termination_message_path = Some("/dev/termination-log".to_owned());
        sidecar.termination_message_policy = Some("File".to_owned());
        let resources = sidecar.resources.as_mut().expect("resources");
        resources.limits = Some(BTreeMap::from([(
            "cpu".to_owned(),
            Quantity("500m".to_owned()),
        )]));
        resources.requests = resources.limits.clone();
        if let Some(probe) = sidecar.readiness_probe.as_mut() {
            probe.success_threshold = Some(1);
        }
        assert_eq!(check(&stored, &p, &defaults()), Injection::Verified);
        assert_eq!(
            decide(&stored, "t", [&p], &defaults()),
            Decision::Skip("already injected")
        );
    }

    #[test]
    fn a_sidecar_from_an_older_generation_that_differs_is_a_mismatch() {
        let old = policy("p", json!({"selector": {}}));
        let injected = inject(&pod(json!({}), json!({})), &old, &defaults());
        let mut new = policy("p", json!({"selector": {}, "scan": {"timeoutSeconds": 5}}));
        new.metadata.generation = Some(4);
        assert_eq!(check(&injected, &old, &defaults()), Injection::Verified);
        assert_eq!(check(&injected, &new, &defaults()), Injection::Mismatch);
        assert_eq!(
            check(&pod(json!({}), json!({})), &new, &defaults()),
            Injection::Absent
        );
    }

    #[test]
    fn opt_out_other_namespace_and_no_match_are_left_alone() {
        let policies = [policy(
            "p",
            json!({"selector": {"matchLabels": {"app": "gw"}}}),
        )];
        let out = pod(json!({"app": "gw"}), json!({INJECT: "false"}));
        assert_eq!(
            decide(&out, "t", &policies, &defaults()),
            Decision::Skip("opted out")
        );
        let p = pod(json!({"app": "gw"}), json!({}));
        assert!(matches!(
            decide(&p, "other", &policies, &defaults()),
            Decision::Skip(_)
        ));
        let q = pod(json!({"app": "db"}), json!({}));
        assert!(matches!(
            decide(&q, "t", &policies, &defaults()),
            Decision::Skip(_)
        ));
    }

    #[test]
    fn envoy_gateway_proxies_in_its_namespace_are_decided_by_their_gateways_namespace() {
        let labels = json!({
            "gateway.envoyproxy.io/owning-gateway-name": "web",
            "gateway.envoyproxy.io/owning-gateway-namespace": "tenant-a"
        });
        let proxy = pod(labels.clone(), json!({}));
        let eg = Some("envoy-gateway-system");
        assert_eq!(
            deciding_namespace(&proxy, "envoy-gateway-system", eg),
            ("tenant-a", true)
        );
        // The same labels anywhere else claim nothing.
        assert_eq!(
            deciding_namespace(&proxy, "tenant-b", eg),
            ("tenant-b", false)
        );
        assert_eq!(
            deciding_namespace(&proxy, "envoy-gateway-system", None),
            ("envoy-gateway-system", false)
        );
        let unlabelled = pod(json!({"app": "x"}), json!({}));
        assert_eq!(
            deciding_namespace(&unlabelled, "envoy-gateway-system", eg),
            ("envoy-gateway-system", false)
        );
    }

    #[test]
    fn two_matching_policies_deny_with_both_names() {
        let policies = [
            policy("b", json!({"selector": {}})),
            policy("a", json!({"selector": {"matchLabels": {"app": "gw"}}})),
        ];
        let Decision::Deny(why) = decide(
            &pod(json!({"app": "gw"}), json!({})),
            "t",
            &policies,
            &defaults(),
        ) else {
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

    /// Every name the injector writes, in every form of the sidecar, is one the producer
    /// reads: a name only one side renamed would leave its setting at the producer's default
    /// without a word.
    #[test]
    fn every_name_the_injector_writes_is_a_setting_the_producer_reads() {
        use clap::CommandFactory;
        let read: Vec<String> = virus_scanner_producer::ProducerArgs::command()
            .get_arguments()
            .filter_map(|a| a.get_env()?.to_str().map(str::to_owned))
            .collect();
        for spec in [
            json!({"selector": {}}),
            json!({
                "selector": {},
                "producer": {"transport": "UnixSocket", "nativeSidecar": false},
                "sharedVolume": {"claimName": "spool"},
                "redis": {"host": "r", "tls": true,
                          "passwordSecretRef": {"name": "s", "key": "k"},
                          "caSecretRef": {"name": "ca", "key": "ca.crt"}}
            }),
        ] {
            let injected = inject(&pod(json!({}), json!({})), &policy("p", spec), &defaults());
            let names: Vec<&str> = sidecars(&injected)[0]
                .env
                .iter()
                .flatten()
                .map(|e| e.name.as_str())
                .collect();
            for name in &names {
                assert!(
                    read.iter().any(|r| r == name),
                    "the injector writes {name}, which the producer does not read"
                );
            }
            let mut unique = names.clone();
            unique.sort_unstable();
            unique.dedup();
            assert_eq!(unique.len(), names.len(), "{names:?}");
        }
    }

    /// The producer's own configuration, fed the injected environment, holds the policy.
    /// Every setting here differs from the producer's default, so a name that one side
    /// renamed shows up as a default (FAIL_OPEN as fail-closed, or worse the other way).
    #[test]
    fn the_producer_reads_the_policy_from_the_injected_environment() {
        let p = policy(
            "p",
            json!({
                "selector": {},
                "scan": {"maxBodyMB": 40, "fileThresholdMB": 3, "timeoutSeconds": 7,
                         "failureMode": "FailOpen", "allowUnscannable": true,
                         "infectedStatusCode": 403, "defaultPriority": "High",
                         "rangeRequests": "Refuse", "embeddedFiles": false},
                "producer": {"port": 50099},
                "redis": {"host": "redis.example", "port": 6380, "tls": true}
            }),
        );
        let env = sidecar_env(&p);
        let argv = ["virus-scanner-producer"];
        let config =
            virus_scanner_runtime::env::parse_from::<virus_scanner_producer::ProducerArgs, _, _>(
                argv, &env,
            )
            .expect("the injected environment parses")
            .validate()
            .expect("the injected environment is valid");
        assert_eq!(config.queue.redis.url, "rediss://redis.example:6380/");
        assert_eq!(config.grpc_addr.to_string(), "127.0.0.1:50099");
        assert_eq!(config.http_addr.port(), OPS_PORT);
        // ICAP is off unless the policy asks for it.
        assert_eq!(config.icap_addr, None);
        assert_eq!(config.scan_tmp_dir.to_str(), Some(SPOOL_DIR));
        assert_eq!(
            (config.spill_threshold, config.max_body),
            (3 << 20, 40 << 20)
        );
        let scan = &config.scan;
        assert_eq!(scan.scan_timeout.as_secs(), 7);
        assert!(scan.fail_open && scan.allow_unscannable && !scan.embedded_files);
        assert!(!scan.spool_shared);
        assert_eq!(scan.infected_status, 403);
        assert_eq!(format!("{:?}", scan.default_priority), "High");
        assert_eq!(
            scan.range_requests,
            virus_scanner_producer::config::RangeRequests::Refuse
        );
        assert_eq!((scan.tenant.as_str(), scan.policy.as_str()), ("t", "p"));
    }

    #[test]
    fn only_the_probe_and_metrics_port_listens_beyond_loopback() {
        let env = sidecar_env(&policy("p", json!({"selector": {}})));
        assert_eq!(env["ICAP_ENABLED"], "false");
        let with_icap = sidecar_env(&policy(
            "p",
            json!({"selector": {}, "producer": {"icap": true}}),
        ));
        assert_eq!(with_icap["ICAP_ENABLED"], "true");
        assert_eq!(with_icap["ICAP_ADDR"], "127.0.0.1:1344");
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
    fn on_a_shared_volume_the_sidecar_sees_only_its_tenants_directory_as_its_tenants_uid() {
        let shared = |ns: &str| {
            let mut p = policy(
                "p",
                json!({"selector": {}, "sharedVolume": {"claimName": "spool"}}),
            );
            p.metadata.namespace = Some(ns.to_owned());
            let injected = inject(&pod(json!({}), json!({})), &p, &defaults());
            sidecars(&injected)[0].clone()
        };
        let a = shared("team-a");
        let mount = a
            .volume_mounts
            .iter()
            .flatten()
            .find(|m| m.name == SPOOL_VOLUME)
            .expect("spool mount");
        assert_eq!(mount.sub_path.as_deref(), Some("team-a"));
        assert_eq!(mount.mount_path, format!("{SPOOL_DIR}/team-a"));
        let env: BTreeMap<_, _> = a
            .env
            .iter()
            .flatten()
            .filter_map(|e| Some((e.name.clone(), e.value.clone()?)))
            .collect();
        assert_eq!(
            (env["SCAN_TMP_DIR"].as_str(), env["TENANT"].as_str()),
            (SPOOL_DIR, "team-a")
        );
        let ids = |c: &Container| {
            let s = c.security_context.clone().expect("securityContext");
            (s.run_as_user.expect("uid"), s.run_as_group.expect("gid"))
        };
        let (uid, gid) = ids(&a);
        assert_eq!((uid, gid), (spool_uid("team-a"), spool_uid("team-a")));
        assert!(((1 << 30)..(1 << 31)).contains(&uid), "{uid}");
        // Stable per tenant, different between tenants.
        assert_eq!(ids(&shared("team-a")), (uid, gid));
        assert_ne!(ids(&shared("team-b")).0, uid);
        // Without a shared volume: the pod's own emptyDir, whole, as the image's user.
        let local = inject(
            &pod(json!({}), json!({})),
            &policy("p", json!({"selector": {}})),
            &defaults(),
        );
        let local = &sidecars(&local)[0];
        let mount = local
            .volume_mounts
            .iter()
            .flatten()
            .find(|m| m.name == SPOOL_VOLUME)
            .expect("spool mount");
        assert_eq!(
            (mount.mount_path.as_str(), mount.sub_path.as_deref()),
            (SPOOL_DIR, None)
        );
        assert_eq!(ids(local), (NON_ROOT_UID, NON_ROOT_UID));
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
