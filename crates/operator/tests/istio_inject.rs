//! Our injection beside Istio's own: `istioctl kube-inject` (Istio's injector, offline; built
//! by `hack/istioctl.sh` from istio.io/istio at a pinned version) with the injection
//! templates, values and mesh config that release's istiod chart renders, on gateway pods of
//! an Istio policy, in both orders:
//!
//! * ours first, then Istio's `sidecar` template (a gateway of its own with Istio's sidecar,
//!   regular and native) or its `gateway` template (the pod template of Istio's gateway
//!   chart): Istio must leave our sidecar, its volumes and annotations as they are, so that
//!   [`inject::check`] still says `Verified` and our webhook, when reinvoked, leaves the pod
//!   alone, probes included: ours are `exec` probes, which Istio does not rewrite (it points
//!   HTTP and TCP probes at pilot-agent, `:15020/app-health/...`, and a native sidecar whose
//!   startup probe goes there never starts when `istio-proxy` starts after it; a test shows
//!   that with `httpGet` probes).
//! * Istio first, then ours, then Istio again (a reinvocation): each injection stays there
//!   once, and ours still verifies.
//!
//! Also: which containers start before which (a native sidecar whose startup probe goes
//! through pilot-agent never starts when `istio-proxy` starts after it), uids, the socket
//! mount in Envoy's container, and ports apart from Istio's.
//!
//! `istioctl` needs `--revision`: without it, it waits for a cluster forever to learn the
//! default revision, even with every input given as a file.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use k8s_openapi::api::core::v1::{Container, Pod, Probe};
use serde_json::{Value, json};
use virus_scan_operator::crd::VirusScanPolicy;
use virus_scan_operator::envoy::SOCKET_DIR;
use virus_scan_operator::inject::{
    self, ANNOTATION_GENERATION, ANNOTATION_HASH, ANNOTATION_POLICY, InjectDefaults, Injection,
    LABEL_SIDECAR, OPS_PORT, SIDECAR, SOCKET_VOLUME, SPOOL_VOLUME,
};
use virus_scanner_test_support::run_checked;

const PROXY: &str = "istio-proxy";
/// pilot-agent's status port (the mesh default), through which Istio sends kubelet's probes
/// of the other containers.
const STATUS_PORT: i32 = 15020;
/// Istio's own proxy uid and gid.
const PROXY_UID: i64 = 1337;
/// The pod annotation that turns Istio's probe rewrite off for the whole pod.
const REWRITE_PROBES: &str = "sidecar.istio.io/rewriteAppHTTPProbers";

/// Istio's injector and its inputs, rendered once per test binary.
struct Istio {
    istioctl: PathBuf,
    inject_config: PathBuf,
    values: PathBuf,
    mesh: PathBuf,
    /// The pod template of Istio's gateway chart, as a pod of namespace `tenant-a`.
    gateway_pod: Pod,
}

fn helm() -> Command {
    Command::new(virus_scanner_test_support::kube::k8s_bin_dir().join("helm"))
}

/// `helm template` of one of the charts `hack/istioctl.sh` keeps: the objects it renders.
fn render(chart: &Path, release: &str, namespace: &str, show: &[&str]) -> Vec<Value> {
    let mut cmd = helm();
    cmd.args(["template", release])
        .arg(chart)
        .args(["--namespace", namespace]);
    for template in show {
        cmd.args(["--show-only", template]);
    }
    let out = run_checked(&mut cmd, "helm template");
    serde_saphyr::from_multiple::<Value>(&String::from_utf8(out.stdout).unwrap())
        .unwrap()
        .into_iter()
        .filter(|doc| !doc.is_null())
        .collect()
}

fn istio() -> &'static Istio {
    static ISTIO: OnceLock<Istio> = OnceLock::new();
    ISTIO.get_or_init(|| {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../hack/istioctl.sh");
        let out = run_checked(&mut Command::new(script), "hack/istioctl.sh");
        let istioctl = PathBuf::from(String::from_utf8(out.stdout).unwrap().trim());
        let charts = istioctl.parent().unwrap().parent().unwrap().join("charts");

        // What istiod reads: ConfigMap `istio-sidecar-injector` (`config`: the templates and
        // injection policy; `values`) and ConfigMap `istio` (`mesh`).
        let configmaps = render(
            &charts.join("istio-discovery"),
            "istiod",
            "istio-system",
            &[
                "templates/istiod-injector-configmap.yaml",
                "templates/configmap.yaml",
            ],
        );
        let data = |name: &str, key: &str| -> String {
            let cm = configmaps
                .iter()
                .find(|cm| cm["metadata"]["name"] == name)
                .unwrap_or_else(|| panic!("no ConfigMap {name} rendered"));
            cm["data"][key].as_str().unwrap().to_owned()
        };
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("istio_inject");
        std::fs::create_dir_all(&dir).unwrap();
        let write = |file: &str, text: String| {
            let path = dir.join(file);
            std::fs::write(&path, text).unwrap();
            path
        };
        let inject_config = write(
            "inject-config.yaml",
            data("istio-sidecar-injector", "config"),
        );
        let values = write("values.json", data("istio-sidecar-injector", "values"));
        let mesh = write("mesh.yaml", data("istio", "mesh"));

        let deployment = render(
            &charts.join("gateway"),
            "istio-ingressgateway",
            "tenant-a",
            &["templates/deployment.yaml"],
        )
        .pop()
        .unwrap();
        let mut template = deployment["spec"]["template"].clone();
        // As the ReplicaSet creates it: Istio names the workload from the owner.
        template["metadata"]["namespace"] = json!("tenant-a");
        template["metadata"]["generateName"] = json!("istio-ingressgateway-5f7d9c8b4-");
        template["metadata"]["ownerReferences"] = json!([{
            "apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "istio-ingressgateway-5f7d9c8b4",
            "uid": "00000000-0000-0000-0000-000000000001", "controller": true
        }]);
        let gateway_pod: Pod = serde_json::from_value(template).unwrap();
        assert_eq!(
            gateway_pod.metadata.annotations.as_ref().unwrap()["inject.istio.io/templates"],
            "gateway"
        );
        Istio {
            istioctl,
            inject_config,
            values,
            mesh,
            gateway_pod,
        }
    })
}

/// Istio's injector on `pod`, as istiod's webhook would run it.
fn kube_inject(pod: &Pod) -> Pod {
    let istio = istio();
    let input = tempfile::Builder::new()
        .prefix("pod-")
        .suffix(".json")
        .tempfile()
        .unwrap();
    std::fs::write(input.path(), serde_json::to_vec(pod).unwrap()).unwrap();
    let out = run_checked(
        Command::new(&istio.istioctl)
            .arg("kube-inject")
            .arg("--revision=default")
            .arg("-f")
            .arg(input.path())
            .arg("--injectConfigFile")
            .arg(&istio.inject_config)
            .arg("--meshConfigFile")
            .arg(&istio.mesh)
            .arg("--valuesFile")
            .arg(&istio.values)
            // Nothing is read from a cluster.
            .env("KUBECONFIG", "/nonexistent"),
        "istioctl kube-inject",
    );
    let mut docs: Vec<Value> =
        serde_saphyr::from_multiple::<Value>(&String::from_utf8(out.stdout).unwrap())
            .unwrap()
            .into_iter()
            .filter(|d| !d.is_null())
            .collect();
    assert_eq!(docs.len(), 1, "kube-inject printed {docs:?}");
    serde_json::from_value(docs.pop().unwrap()).unwrap()
}

fn defaults() -> InjectDefaults {
    InjectDefaults::plain("virus-scanner:test", "redis")
}

/// An Istio policy for the ingress gateway's pods, with these producer settings and spec.
fn policy(name: &str, spec: Value) -> VirusScanPolicy {
    let mut full = json!({
        "gateway": "Istio",
        "selector": { "matchLabels": { "istio": "ingressgateway" } },
    });
    full.as_object_mut()
        .unwrap()
        .extend(spec.as_object().unwrap().clone());
    serde_json::from_value(json!({
        "apiVersion": "virusscan.aether-platform.io/v1alpha1",
        "kind": "VirusScanPolicy",
        "metadata": { "name": name, "namespace": "tenant-a", "generation": 4 },
        "spec": full,
    }))
    .unwrap()
}

/// The forms the sidecar takes: native or not, TCP or the socket, on a shared spool (the
/// tenant's own uid) or not.
fn policies() -> Vec<VirusScanPolicy> {
    vec![
        policy("native-tcp", json!({})),
        policy(
            "native-socket",
            json!({ "producer": { "transport": "UnixSocket" } }),
        ),
        policy(
            "regular-socket",
            json!({ "producer": { "transport": "UnixSocket", "nativeSidecar": false } }),
        ),
        policy(
            "shared-spool",
            json!({ "sharedVolume": { "claimName": "spool" } }),
        ),
    ]
}

/// Which Istio injection a pod gets.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Template {
    /// The `sidecar` template on a gateway that runs its own Envoy; the proxy a regular
    /// container, or a native sidecar (`sidecar.istio.io/nativeSidecar`).
    Sidecar { native: bool },
    /// The `gateway` template on the pod of Istio's gateway chart.
    Gateway,
}

const TEMPLATES: [Template; 3] = [
    Template::Sidecar { native: false },
    Template::Sidecar { native: true },
    Template::Gateway,
];

/// A gateway pod the policies select, before any injection.
fn gateway_pod(template: Template) -> Pod {
    match template {
        Template::Gateway => istio().gateway_pod.clone(),
        Template::Sidecar { native } => serde_json::from_value(json!({
            "metadata": {
                "generateName": "gateway-", "namespace": "tenant-a",
                "labels": { "istio": "ingressgateway", "app": "gateway" },
                "annotations": { "sidecar.istio.io/nativeSidecar": native.to_string() }
            },
            "spec": { "containers": [{
                "name": "envoy", "image": "envoyproxy/envoy:v1.36.2",
                "ports": [{ "name": "http", "containerPort": 8080 }],
                "readinessProbe": { "httpGet": { "path": "/ready", "port": 9901 } }
            }] }
        }))
        .unwrap(),
    }
}

/// The container running the gateway's Envoy: the one that connects to the producer.
fn envoy_container(template: Template) -> &'static str {
    match template {
        Template::Gateway => PROXY,
        Template::Sidecar { .. } => "envoy",
    }
}

/// Every container named `name`, and whether it is an init container.
fn named<'a>(pod: &'a Pod, name: &str) -> Vec<(bool, &'a Container)> {
    let spec = pod.spec.as_ref().unwrap();
    let init = spec.init_containers.iter().flatten().map(|c| (true, c));
    init.chain(spec.containers.iter().map(|c| (false, c)))
        .filter(|(_, c)| c.name == name)
        .collect()
}

fn only<'a>(pod: &'a Pod, name: &str, what: &str) -> (bool, &'a Container) {
    let found = named(pod, name);
    assert_eq!(found.len(), 1, "{what}: {} containers {name}", found.len());
    found[0]
}

fn names(containers: Option<&Vec<Container>>) -> Vec<&str> {
    containers
        .into_iter()
        .flatten()
        .map(|c| c.name.as_str())
        .collect()
}

fn init_names(pod: &Pod) -> Vec<&str> {
    names(pod.spec.as_ref().unwrap().init_containers.as_ref())
}

fn without_probes(c: &Container) -> Container {
    Container {
        startup_probe: None,
        readiness_probe: None,
        liveness_probe: None,
        ..c.clone()
    }
}

fn probes(c: &Container) -> [Option<&Probe>; 3] {
    [
        c.startup_probe.as_ref(),
        c.readiness_probe.as_ref(),
        c.liveness_probe.as_ref(),
    ]
}

/// What `after` (Istio's injection on top of `ours`, our injection) kept of ours: everything
/// but the sidecar's probes, exactly. Returns whether Istio rewrote those probes, having
/// checked that, if it did, they go to pilot-agent, which forwards them to our ops port.
fn assert_ours_kept(what: &str, ours: &Pod, after: &Pod, template: Template) -> bool {
    let (native, sidecar) = only(ours, SIDECAR, what);
    let (native_after, sidecar_after) = only(after, SIDECAR, what);
    assert_eq!(native, native_after, "{what}: sidecar moved");
    assert_eq!(
        without_probes(sidecar),
        without_probes(sidecar_after),
        "{what}: Istio changed the sidecar beyond its probes"
    );

    // Our volumes, each once and as we wrote it (in Go's form: a claim's `readOnly: false`
    // is not written, as the API server would not store it either).
    let volumes = |pod: &Pod| {
        let mut volumes = pod
            .spec
            .as_ref()
            .unwrap()
            .volumes
            .clone()
            .unwrap_or_default();
        for claim in volumes
            .iter_mut()
            .filter_map(|v| v.persistent_volume_claim.as_mut())
        {
            claim.read_only = claim.read_only.filter(|r| *r);
        }
        volumes
    };
    for volume in volumes(ours)
        .iter()
        .filter(|v| [SPOOL_VOLUME, SOCKET_VOLUME].contains(&v.name.as_str()))
    {
        let kept: Vec<_> = volumes(after)
            .into_iter()
            .filter(|v| v.name == volume.name)
            .collect();
        assert_eq!(
            kept,
            std::slice::from_ref(volume),
            "{what}: volume {}",
            volume.name
        );
    }
    // Envoy's container still mounts the socket, once.
    let socket_mounts = |pod: &Pod| -> usize {
        named(pod, envoy_container(template))
            .iter()
            .flat_map(|(_, c)| c.volume_mounts.iter().flatten())
            .filter(|m| m.name == SOCKET_VOLUME && m.mount_path == SOCKET_DIR)
            .count()
    };
    assert_eq!(
        socket_mounts(after),
        socket_mounts(ours),
        "{what}: socket mount of {}",
        envoy_container(template)
    );
    for key in [ANNOTATION_POLICY, ANNOTATION_GENERATION, ANNOTATION_HASH] {
        assert_eq!(
            after.metadata.annotations.as_ref().unwrap().get(key),
            ours.metadata.annotations.as_ref().unwrap().get(key),
            "{what}: annotation {key}"
        );
    }
    assert_eq!(
        after.metadata.labels.as_ref().unwrap().get(LABEL_SIDECAR),
        ours.metadata.labels.as_ref().unwrap().get(LABEL_SIDECAR),
        "{what}: label {LABEL_SIDECAR}"
    );

    if probes(sidecar) == probes(sidecar_after) {
        return false;
    }
    // Rewritten: each probe to pilot-agent's port and its path for this container, the
    // rest of the probe as it was; and pilot-agent told where the probe goes.
    for (kind, (before, rewritten)) in ["startupz", "readyz", "livez"]
        .into_iter()
        .zip(probes(sidecar).into_iter().zip(probes(sidecar_after)))
    {
        let (before, rewritten) = (before.unwrap(), rewritten.unwrap());
        let get = rewritten.http_get.as_ref().unwrap();
        assert_eq!(
            get.path.as_deref(),
            Some(format!("/app-health/{SIDECAR}/{kind}").as_str()),
            "{what}"
        );
        assert_eq!(
            get.port,
            k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(STATUS_PORT),
            "{what}"
        );
        assert_eq!(
            Probe {
                http_get: None,
                ..rewritten.clone()
            },
            Probe {
                http_get: None,
                ..before.clone()
            },
            "{what}: {kind}"
        );
    }
    let (_, proxy) = only(after, PROXY, what);
    let probers: Value = serde_json::from_str(
        proxy
            .env
            .iter()
            .flatten()
            .find(|e| e.name == "ISTIO_KUBE_APP_PROBERS")
            .and_then(|e| e.value.as_deref())
            .unwrap_or_else(|| panic!("{what}: probes rewritten, but no ISTIO_KUBE_APP_PROBERS")),
    )
    .unwrap();
    for (kind, path) in [
        ("startupz", "/ready"),
        ("readyz", "/ready"),
        ("livez", "/health"),
    ] {
        let prober = &probers[format!("/app-health/{SIDECAR}/{kind}")]["httpGet"];
        assert_eq!(prober["path"], path, "{what}: {probers}");
        assert_eq!(prober["port"], OPS_PORT, "{what}: {probers}");
    }
    true
}

/// Whether the sidecar can never start: it is a native sidecar whose startup probe goes
/// through pilot-agent, and `istio-proxy`, which runs pilot-agent, starts only after it (a
/// regular container starts after every init container has started; an init container after
/// the ones before it). The kubelet then restarts the sidecar forever and the gateway never
/// runs.
fn startup_blocked(pod: &Pod) -> bool {
    let (native, sidecar) = only(pod, SIDECAR, "startup");
    let through_agent = sidecar
        .startup_probe
        .as_ref()
        .and_then(|p| p.http_get.as_ref())
        .is_some_and(|g| {
            g.port == k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(STATUS_PORT)
        });
    if !native || !through_agent {
        return false;
    }
    let init = init_names(pod);
    let ours = init.iter().position(|n| *n == SIDECAR).unwrap();
    match init.iter().position(|n| *n == PROXY) {
        Some(proxy) => proxy > ours,
        None => true,
    }
}

/// uids: ours is never Istio's, whose traffic Istio's iptables let pass uncaptured (and the
/// proxy still reaches the socket, which the producer makes 0666).
fn assert_uids(what: &str, pod: &Pod) {
    let uid = |c: &Container| c.security_context.as_ref().and_then(|s| s.run_as_user);
    let (_, sidecar) = only(pod, SIDECAR, what);
    let (_, proxy) = only(pod, PROXY, what);
    assert_eq!(uid(proxy), Some(PROXY_UID), "{what}");
    let ours = uid(sidecar).unwrap();
    assert_ne!(ours, PROXY_UID, "{what}");
    assert!(
        sidecar
            .security_context
            .as_ref()
            .unwrap()
            .run_as_non_root
            .unwrap()
    );
}

/// Ports: none of the sidecar's (declared, or in the addresses it listens on) in the range
/// Istio keeps for itself (15000-15090: admin, capture, HBONE, status, health, DNS, metrics),
/// none declared twice in the pod.
fn assert_ports(what: &str, pod: &Pod) {
    let (_, sidecar) = only(pod, SIDECAR, what);
    let mut ours: Vec<i32> = sidecar
        .ports
        .iter()
        .flatten()
        .map(|p| p.container_port)
        .collect();
    for env in sidecar.env.iter().flatten() {
        if env.name.ends_with("_ADDR")
            && let Some(port) = env.value.as_deref().and_then(|v| v.rsplit_once(':'))
        {
            ours.push(port.1.parse().unwrap());
        }
    }
    for port in &ours {
        assert!(
            !(15000..=15090).contains(port),
            "{what}: port {port} in Istio's range"
        );
    }
    let spec = pod.spec.as_ref().unwrap();
    let mut declared: Vec<i32> = spec
        .init_containers
        .iter()
        .flatten()
        .chain(&spec.containers)
        .flat_map(|c| c.ports.iter().flatten().map(|p| p.container_port))
        .collect();
    let count = declared.len();
    declared.sort();
    declared.dedup();
    assert_eq!(declared.len(), count, "{what}: a port declared twice");
}

/// Where Istio's containers and ours run: init containers in order, then the others.
fn layout(pod: &Pod) -> String {
    let spec = pod.spec.as_ref().unwrap();
    format!(
        "init {:?} containers {:?}",
        init_names(pod),
        names(Some(&spec.containers))
    )
}

/// Ours first: the webhook injects, then Istio's injector runs on the result (a webhook
/// configuration named before Istio's, Istio's reinvocation, or `istioctl kube-inject` on a
/// pod spec that already has the sidecar).
#[test]
fn istio_after_ours_leaves_our_sidecar_untouched() {
    for template in TEMPLATES {
        for policy in policies() {
            let what = format!(
                "{template:?} after {}",
                policy.metadata.name.as_ref().unwrap()
            );
            let ours = inject::inject(&gateway_pod(template), &policy, &defaults());
            assert_eq!(
                inject::check(&ours, &policy, &defaults()),
                Injection::Verified
            );
            let after = kube_inject(&ours);
            only(&after, PROXY, &what);

            let rewritten = assert_ours_kept(&what, &ours, &after, template);
            // Istio rewrites the HTTP and TCP probes of every container but its own, init
            // containers included; ours are `exec` probes, which it leaves alone.
            assert!(!rewritten, "{what}: probes rewritten");
            assert_eq!(
                only(&ours, SIDECAR, &what).1,
                only(&after, SIDECAR, &what).1,
                "{what}"
            );
            // Probes are not in the injection hash: our webhook, reinvoked, leaves the pod.
            assert_eq!(
                inject::check(&after, &policy, &defaults()),
                Injection::Verified,
                "{what}"
            );
            assert_uids(&what, &after);
            assert_ports(&what, &after);

            // Order: Istio puts its native proxy (and istio-init) ahead of ours; a regular
            // proxy starts after every init container, ours among them.
            let native_ours = policy.spec.producer.native_sidecar;
            let expected_init: Vec<&str> = match (template, native_ours) {
                (Template::Sidecar { native: true }, true) => vec!["istio-init", PROXY, SIDECAR],
                (Template::Sidecar { native: true }, false) => vec!["istio-init", PROXY],
                (Template::Sidecar { native: false }, true) => vec![SIDECAR, "istio-init"],
                (Template::Sidecar { native: false }, false) => vec!["istio-init"],
                (Template::Gateway, true) => vec![SIDECAR],
                (Template::Gateway, false) => vec![],
            };
            assert_eq!(
                init_names(&after),
                expected_init,
                "{what}: {}",
                layout(&after)
            );

            // So our native sidecar starts on its own, whatever Istio's proxy is.
            assert!(!startup_blocked(&after), "{what}: {}", layout(&after));
        }
    }
}

/// Why our probes are `exec`: the same sidecar with `httpGet` probes (the kubelet calling its
/// ops port) has them rewritten through pilot-agent, and where Istio's proxy is a regular
/// container (the gateway template, and the sidecar template without native sidecars) the
/// native sidecar's startup probe then waits on a container that starts after it: the
/// gateway pod never runs. `sidecar.istio.io/rewriteAppHTTPProbers: "false"` on the pod
/// avoids it too.
#[test]
fn http_probes_would_be_rewritten_and_block_the_gateway() {
    for template in TEMPLATES {
        let policy = policy("native-tcp", json!({}));
        let what = format!("{template:?}, httpGet probes");
        let mut ours = inject::inject(&gateway_pod(template), &policy, &defaults());
        let sidecar = ours
            .spec
            .as_mut()
            .unwrap()
            .init_containers
            .iter_mut()
            .flatten()
            .find(|c| c.name == SIDECAR)
            .unwrap();
        for (probe, path) in [
            (&mut sidecar.startup_probe, "/ready"),
            (&mut sidecar.readiness_probe, "/ready"),
            (&mut sidecar.liveness_probe, "/health"),
        ] {
            let probe = probe.as_mut().unwrap();
            probe.exec = None;
            probe.http_get = Some(k8s_openapi::api::core::v1::HTTPGetAction {
                path: Some(path.to_owned()),
                port: k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(i32::from(
                    OPS_PORT,
                )),
                ..Default::default()
            });
        }
        let after = kube_inject(&ours);
        assert!(assert_ours_kept(&what, &ours, &after, template), "{what}");
        assert_eq!(
            startup_blocked(&after),
            template != (Template::Sidecar { native: true }),
            "{what}: {}",
            layout(&after)
        );

        // The pod annotation that turns the rewrite off.
        let mut off = ours.clone();
        off.metadata
            .annotations
            .get_or_insert_with(Default::default)
            .insert(REWRITE_PROBES.into(), "false".into());
        let after = kube_inject(&off);
        assert!(!assert_ours_kept(&what, &off, &after, template), "{what}");
        assert!(!startup_blocked(&after), "{what}: {}", layout(&after));
    }
}

/// Istio first (the order by webhook configuration name, `istio-sidecar-injector` before
/// ours, and Istio's default `reinvocationPolicy: Never`), then ours, then Istio again as a
/// reinvocation would: each injection there once, ours verified throughout.
#[test]
fn ours_after_istio_and_istio_again_each_stay_once() {
    for template in TEMPLATES {
        for policy in policies() {
            let what = format!(
                "{template:?} then {}",
                policy.metadata.name.as_ref().unwrap()
            );
            let istio = kube_inject(&gateway_pod(template));
            only(&istio, PROXY, &what);
            assert!(named(&istio, SIDECAR).is_empty());
            assert_eq!(
                inject::check(&istio, &policy, &defaults()),
                Injection::Absent
            );

            let ours = inject::inject(&istio, &policy, &defaults());
            only(&ours, PROXY, &what);
            assert_eq!(
                inject::check(&ours, &policy, &defaults()),
                Injection::Verified,
                "{what}"
            );
            // Istio's proxy as Istio left it, but for the socket mount when it is Envoy.
            let socket =
                policy.spec.producer.transport == virus_scan_operator::crd::Transport::UnixSocket;
            let (_, proxy_before) = only(&istio, PROXY, &what);
            let (proxy_native, proxy_after) = only(&ours, PROXY, &what);
            let mut expected = proxy_before.clone();
            if socket && !proxy_native {
                expected.volume_mounts.get_or_insert_with(Vec::new).push(
                    k8s_openapi::api::core::v1::VolumeMount {
                        name: SOCKET_VOLUME.into(),
                        mount_path: SOCKET_DIR.into(),
                        ..Default::default()
                    },
                );
            }
            assert_eq!(proxy_after, &expected, "{what}: istio-proxy");
            // Ours goes first of all: ahead of istio-init and a native istio-proxy too, so
            // the producer starts before Istio's iptables rules and proxy.
            if policy.spec.producer.native_sidecar {
                assert_eq!(init_names(&ours)[0], SIDECAR, "{what}");
            }
            // With the socket, the gateway's Envoy mounts it; a native istio-proxy of the
            // sidecar template is not the gateway's Envoy and gets none.
            assert_eq!(
                named(&ours, envoy_container(template))
                    .iter()
                    .flat_map(|(_, c)| c.volume_mounts.iter().flatten())
                    .filter(|m| m.name == SOCKET_VOLUME)
                    .count(),
                usize::from(socket),
                "{what}"
            );
            assert!(!startup_blocked(&ours), "{what}: {}", layout(&ours));

            // Istio reinvoked: its containers replaced by fresh ones, ours kept.
            let again = kube_inject(&ours);
            only(&again, PROXY, &what);
            let rewritten = assert_ours_kept(&what, &ours, &again, template);
            assert!(!rewritten, "{what}: probes rewritten on reinvocation");
            assert_eq!(
                inject::check(&again, &policy, &defaults()),
                Injection::Verified,
                "{what}"
            );
            assert_uids(&what, &again);
            assert_ports(&what, &again);
            assert!(!startup_blocked(&again), "{what}: {}", layout(&again));
            // And once more: Istio's injection is stable on its own output.
            let third = kube_inject(&again);
            assert_eq!(
                serde_json::to_value(&third).unwrap(),
                serde_json::to_value(&again).unwrap(),
                "{what}: a third injection changed the pod"
            );
        }
    }
}

/// The checks above catch what they are for: a sidecar Istio dropped, duplicated or changed,
/// and a socket mount it took from Envoy's container.
#[test]
fn the_checks_catch_a_dropped_duplicated_or_altered_sidecar() {
    let template = Template::Gateway;
    let policy = policy(
        "native-socket",
        json!({ "producer": { "transport": "UnixSocket" } }),
    );
    let ours = inject::inject(&gateway_pod(template), &policy, &defaults());
    let after = kube_inject(&ours);
    assert_ours_kept("unchanged", &ours, &after, template);

    fn sidecar(pod: &mut Pod) -> &mut Container {
        let spec = pod.spec.as_mut().unwrap();
        spec.init_containers
            .iter_mut()
            .flatten()
            .find(|c| c.name == SIDECAR)
            .unwrap()
    }
    type Mutation = fn(&mut Pod);
    let mutations: [(&str, Mutation, bool); 6] = [
        (
            "dropped",
            |pod| {
                let spec = pod.spec.as_mut().unwrap();
                spec.init_containers
                    .as_mut()
                    .unwrap()
                    .retain(|c| c.name != SIDECAR);
            },
            false,
        ),
        (
            "duplicated",
            |pod| {
                let copy = sidecar(pod).clone();
                pod.spec.as_mut().unwrap().containers.push(copy);
            },
            false,
        ),
        (
            "env",
            |pod| {
                let env = sidecar(pod).env.as_mut().unwrap();
                env.iter_mut()
                    .find(|e| e.name == "FAIL_OPEN")
                    .unwrap()
                    .value = Some("true".into());
            },
            false,
        ),
        (
            "command",
            |pod| sidecar(pod).command = Some(vec!["sh".into()]),
            false,
        ),
        (
            "mounts",
            |pod| {
                sidecar(pod)
                    .volume_mounts
                    .as_mut()
                    .unwrap()
                    .retain(|m| m.name != SPOOL_VOLUME);
            },
            false,
        ),
        (
            "Envoy's socket mount",
            |pod| {
                let spec = pod.spec.as_mut().unwrap();
                for c in spec.containers.iter_mut().filter(|c| c.name == PROXY) {
                    c.volume_mounts
                        .as_mut()
                        .unwrap()
                        .retain(|m| m.name != SOCKET_VOLUME);
                }
            },
            true,
        ),
    ];
    for (what, mutate, still_verified) in mutations {
        let mut changed = after.clone();
        mutate(&mut changed);
        let caught = std::panic::catch_unwind(|| {
            assert_ours_kept(what, &ours, &changed, template);
        });
        assert!(caught.is_err(), "{what}: not caught");
        // Our own check sees the sidecar's changes too (the webhook would inject again);
        // the socket mount in Envoy's container is not the sidecar's.
        assert_eq!(
            inject::check(&changed, &policy, &defaults()) == Injection::Verified,
            still_verified,
            "{what}"
        );
    }
}
